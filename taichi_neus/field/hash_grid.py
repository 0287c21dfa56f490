"""Multi-resolution hash encoding (Müller et al., "Instant Neural Graphics Primitives with a
Multiresolution Hash Encoding", SIGGRAPH 2022), forward and hand-written backward.

Level ``l`` has ``R_l = floor(N_min * b**l)`` cells per axis over the cube
``[-bound, bound]^3`` (so ``R_l + 1`` vertices per axis). A level whose ``(R_l+1)^3``
vertices fit into ``2^T`` entries is indexed densely; the others use the spatial hash
``(x·1 ⊕ y·2654435761 ⊕ z·805459861) mod 2^T`` in u32 arithmetic. Each entry holds ``F``
features; a point's feature at a level is the trilinear interpolation of its cell's
8 corners. The table gradient is a scatter: different points share entries. On the CPU
each task owns whole levels and adds without atomics (:func:`hash_encode_backward_by_level`);
the GPU backends use one thread per point and level with atomic adds.
"""


import math
from dataclasses import dataclass

import numpy as np
import taichi as ti

from taichi_neus import buffers
from taichi_neus.field.params import ParamLayout

PRIME_Y = 2654435761
PRIME_Z = 805459861


@dataclass
class HashGridConfig:
    n_levels: int = 16  # resolution levels
    n_features: int = 2  # features per table entry
    log2_table: int = 19  # log2 of the table size per level (entries)
    base_resolution: int = 32  # cells per axis of the coarsest level
    per_level_scale: float = 1.3195079107728942  # resolution growth per level (32 * 1.3195^15 ≈ 2048)
    bound: float = 1.0  # encoded domain is [-bound, bound]^3, unit-sphere coordinates
    init_scale: float = 1e-4  # table initialised uniformly in [-init_scale, init_scale]

    @property
    def out_dim(self) -> int:
        return self.n_levels * self.n_features


def level_layout(cfg: HashGridConfig):
    """Per level: resolution R_l (cells per axis), entry offset, entry count, dense flag."""
    res, offs, sizes, dense = [], [], [], []
    total = 0
    cap = 1 << cfg.log2_table
    for lvl in range(cfg.n_levels):
        r = int(math.floor(cfg.base_resolution * cfg.per_level_scale ** lvl))
        r = max(r, 1)
        n_vert = (r + 1) ** 3
        is_dense = n_vert <= cap
        size = n_vert if is_dense else cap
        size = (size + 7) // 8 * 8
        res.append(r)
        offs.append(total)
        sizes.append(size)
        dense.append(int(is_dense))
        total += size
    return (np.array(res, np.int32), np.array(offs, np.int32), np.array(sizes, np.int32),
            np.array(dense, np.int32), total)


def cell_widths(cfg: HashGridConfig) -> np.ndarray:
    """(L,) float64 cell width ``2·bound/R_l`` of each level, unit-sphere units (coarse to fine)."""
    res = level_layout(cfg)[0].astype(np.float64)
    return 2.0 * cfg.bound / res


def levels_for_footprint(cfg: HashGridConfig, footprint: float) -> int:
    """How many levels (from the coarsest) have cells at least ``footprint`` wide (unit-sphere units):
    the finer ones resolve detail below that size. At least 1; all levels for ``footprint <= 0``."""
    if footprint <= 0:
        return cfg.n_levels
    return max(1, int(np.count_nonzero(cell_widths(cfg) >= footprint)))


@ti.func
def _corner_index(ix: ti.i32, iy: ti.i32, iz: ti.i32, r: ti.i32, size: ti.i32, dense: ti.i32) -> ti.i32:
    idx = 0
    if dense != 0:
        idx = ix + (r + 1) * (iy + (r + 1) * iz)
    else:
        h = ti.u32(ix) ^ (ti.u32(iy) * ti.u32(PRIME_Y)) ^ (ti.u32(iz) * ti.u32(PRIME_Z))
        idx = ti.i32(h & ti.u32(size - 1))
    return idx


@ti.func
def _cell(x: ti.f32, bound: ti.f32, r: ti.i32):
    """Cell index and fractional position of coordinate x at resolution r."""
    u = ti.min(ti.max((x + bound) / (2.0 * bound), 0.0), 1.0) * r
    i0 = ti.min(ti.cast(ti.floor(u), ti.i32), r - 1)
    return i0, u - i0


ROWS16 = buffers.ROWS16
get, put = buffers.get, buffers.put


@ti.func
def _corner(c, ix, iy, iz, fx, fy, fz, r, size, dense):
    """Trilinear weight and level-local entry of corner ``c`` (bits: dx, dy, dz) of a cell."""
    dx, dy, dz = c & 1, (c >> 1) & 1, (c >> 2) & 1
    w = (fx if dx else 1.0 - fx) * (fy if dy else 1.0 - fy) * (fz if dz else 1.0 - fz)
    return w, _corner_index(ix + dx, iy + dy, iz + dz, r, size, dense)


@ti.func
def _corner_dw(c: ti.template(), fx: ti.template(), fy: ti.template(), fz: ti.template()):
    """∂w/∂(fx, fy, fz) of corner ``c``'s trilinear weight (static ``c``; scalars or W-lane vectors):
    the derivative of one factor times the other two."""
    dx, dy, dz = c & 1, (c >> 1) & 1, (c >> 2) & 1
    wx, wy, wz = (fx if dx else 1.0 - fx), (fy if dy else 1.0 - fy), (fz if dz else 1.0 - fz)
    # signs as factors: a unary minus on a vector aborts Taichi 1.7.4's LLVM codegen with SIMD on
    return (wy * wz) * (1.0 if dx else -1.0), (wx * wz) * (1.0 if dy else -1.0), (wx * wy) * (1.0 if dz else -1.0)


@ti.func
def _cell_slope(x: ti.f32, bound: ti.f32, r) -> ti.f32:
    """d(fractional position)/dx of :func:`_cell`: r/2b inside the domain, 0 where the clamp holds it
    (as torch.clamp: the gradient passes at the bounds themselves). ``r`` a scalar or lane vector."""
    u = (x + bound) / (2.0 * bound)
    inside = ti.select((u >= 0.0) & (u <= 1.0), 1.0, 0.0)
    return r * (inside / (2.0 * bound))


# Rows per point of a forward with the encoding's Jacobian (``JAC``): row m·4 holds the point and
# its encoding, rows m·4 + 1 + t the encoding's derivative along axis t (forward-mode tangents).
JAC_ROWS = 4


@ti.kernel
def hash_encode_forward(
    X: ROWS16,  # (M, D) rows16: xyz in cols 0..2, encoding written at col0
    n: ti.i32,
    col0: ti.i32,
    params: ti.types.ndarray(dtype=ti.f32, ndim=1),
    table_off: ti.i32,
    res: ti.types.ndarray(dtype=ti.i32, ndim=1),
    loff: ti.types.ndarray(dtype=ti.i32, ndim=1),
    lsize: ti.types.ndarray(dtype=ti.i32, ndim=1),
    ldense: ti.types.ndarray(dtype=ti.i32, ndim=1),
    bound: ti.f32,
    F: ti.template(),
    n_active: ti.i32,  # levels lv >= n_active are off: their features are written as 0, nothing is read
    JAC: ti.template(),  # 1: also the encoding's Jacobian, in rows m·4 + 1 + t (JAC_ROWS); n counts points
):
    """One thread per point, its position read once, the levels in turn."""
    L = res.shape[0]
    La = ti.max(ti.min(n_active, L), 0)
    R = ti.static(JAC_ROWS if JAC else 1)
    for m in range(n):
        row = m * R
        x0 = X[row, 0]
        for lv in range(La):
            r = res[lv]
            ix, fx = _cell(x0[0], bound, r)
            iy, fy = _cell(x0[1], bound, r)
            iz, fz = _cell(x0[2], bound, r)
            acc = ti.Vector([0.0] * F)
            jac = [ti.Vector([0.0] * F) for _ in ti.static(range(3))]
            for c in ti.static(range(8)):
                w, e = _corner(c, ix, iy, iz, fx, fy, fz, r, lsize[lv], ldense[lv])
                base = table_off + (loff[lv] + e) * F
                for f in ti.static(range(F)):
                    acc[f] += w * params[base + f]
                if ti.static(JAC):
                    dw = _corner_dw(c, fx, fy, fz)
                    for t in ti.static(range(3)):
                        for f in ti.static(range(F)):
                            jac[t][f] += dw[t] * params[base + f]
            for f in ti.static(range(F)):
                put(X, row, col0 + lv * F + f, acc[f])
            if ti.static(JAC):
                for t in ti.static(range(3)):
                    s = _cell_slope(x0[t], bound, r)
                    for f in ti.static(range(F)):
                        put(X, row + 1 + t, col0 + lv * F + f, jac[t][f] * s)
        for lv in range(La, L):
            for q in ti.static(range(R)):
                for f in ti.static(range(F)):
                    put(X, row + q, col0 + lv * F + f, 0.0)


def lane_width(n_levels: int) -> int:
    """Vector width of :func:`hash_encode_forward_levels`: the power of two >= ``n_levels``."""
    return 1 << max(int(n_levels) - 1, 0).bit_length()


@ti.func
def _lanes_to_i32(v: ti.template(), L: ti.template()):
    """Float vector → i32 vector, one lane at a time: Taichi 1.7.4 aborts in LLVM (an invalid cast)
    when it casts a whole vector between float and int with ``real_matrix_scalarize=False``."""
    return ti.Vector([ti.cast(v[l], ti.i32) for l in ti.static(range(L))])


@ti.func
def _lanes_to_f32(v: ti.template(), L: ti.template()):
    return ti.Vector([ti.cast(v[l], ti.f32) for l in ti.static(range(L))])


@ti.func
def _level_lanes(lv: ti.template(), W: ti.template(), res: ti.template(), loff: ti.template(), lsize: ti.template(),
                 ldense: ti.template(), table_off, F: ti.template()):
    """Per-lane level constants for the levels in the i32 vector ``lv`` (W lanes, each a valid level):
    resolution (i32 and f32), hash mask (u32), dense flag, and the level's first float in the flat buffer.
    Build them inside the parallel loop: a vector computed before a parallel loop is handed to its tasks
    through a global temporary that is not 64-byte aligned, and the vector load from it segfaults
    (Taichi 1.7.4, CPU, SIMD on)."""
    ri = ti.Vector([res[lv[j]] for j in ti.static(range(W))])
    hmask = ti.Vector([ti.cast(lsize[lv[j]] - 1, ti.u32) for j in ti.static(range(W))])
    dense = ti.Vector([ldense[lv[j]] for j in ti.static(range(W))])
    base0 = ti.Vector([table_off + loff[lv[j]] * F for j in ti.static(range(W))])
    return ri, _lanes_to_f32(ri, W), hmask, dense, base0


@ti.func
def _cell_lanes(x: ti.f32, bound: ti.f32, ri: ti.template(), rf: ti.template(), W: ti.template()):
    """:func:`_cell` in every lane: (cell index, fractional position), each a W-lane vector."""
    u = ti.min(ti.max((x + bound) / (2.0 * bound), 0.0), 1.0) * rf
    i0 = ti.min(_lanes_to_i32(ti.floor(u), W), ri - 1)
    return i0, u - _lanes_to_f32(i0, W)


@ti.func
def _corner_lanes(c: ti.template(), ix: ti.template(), iy: ti.template(), iz: ti.template(), fx: ti.template(),
                  fy: ti.template(), fz: ti.template(), ri: ti.template(), hmask: ti.template(), dense: ti.template()):
    """:func:`_corner` in every lane: trilinear weight and level-local entry of corner ``c`` (static)."""
    dx, dy, dz = c & 1, (c >> 1) & 1, (c >> 2) & 1
    w = (fx if dx else 1.0 - fx) * (fy if dy else 1.0 - fy) * (fz if dz else 1.0 - fz)
    cx, cy, cz = ix + dx, iy + dy, iz + dz
    e_dense = cx + (ri + 1) * (cy + (ri + 1) * cz)
    h = ti.cast(cx, ti.u32) ^ (ti.cast(cy, ti.u32) * ti.u32(PRIME_Y)) ^ (ti.cast(cz, ti.u32) * ti.u32(PRIME_Z))
    return w, ti.select(dense != 0, e_dense, ti.cast(h & hmask, ti.i32))


@ti.kernel
def hash_encode_forward_levels(
    X: ROWS16,  # (M, D) rows16: xyz in cols 0..2, encoding written at col0
    n: ti.i32,
    col0: ti.i32,
    params: ti.types.ndarray(dtype=ti.f32, ndim=1),
    table_off: ti.i32,
    res: ti.types.ndarray(dtype=ti.i32, ndim=1),
    loff: ti.types.ndarray(dtype=ti.i32, ndim=1),
    lsize: ti.types.ndarray(dtype=ti.i32, ndim=1),
    ldense: ti.types.ndarray(dtype=ti.i32, ndim=1),
    bound: ti.f32,
    F: ti.template(),
    L: ti.template(),  # number of levels
    LV: ti.template(),  # vector width: the power of two >= L (lanes >= L are padding, always off)
    n_active: ti.i32,  # levels lv >= n_active are off: their features are written as 0
    JAC: ti.template(),  # 1: also the encoding's Jacobian, in rows m·4 + 1 + t (JAC_ROWS); n counts points
):
    """:func:`hash_encode_forward` with the levels as the lanes of one L-wide vector (the CPU's kernel).

    Same arithmetic, per level, in the same order; only the shape differs: a point's cell, trilinear
    weights and hash of every level are computed together, so with ``real_matrix_scalarize=False``
    they are SIMD instructions, and the table reads are one gather per corner and feature. On
    ray-ordered points (neighbouring samples share cache lines, as a training batch's do) the
    per-level loop is bound by that index arithmetic, not by memory; with the lanes it runs 1.9–2.0x
    faster at 10–16 levels on (``benchmarks/hash_grid_throughput.py``, 2-core CPU). An off level's
    lanes read entry 0 of the table (a cached line) and write 0. Vulkan/Metal scalarise the same
    source and compute the same values (the tests run it there); they use the per-level kernel."""
    R = ti.static(JAC_ROWS if JAC else 1)
    for m in range(n):
        row = m * R
        # Lanes past the last level (the width is padded to a power of two: 5 lanes came out wrong)
        # repeat it and are always off.
        lanes = ti.Vector([l for l in ti.static(range(LV))])
        ri, rf, hmask, dense, base0 = _level_lanes(ti.min(lanes, L - 1), LV, res, loff, lsize, ldense, table_off, F)
        on = lanes < ti.min(n_active, L)
        x0 = X[row, 0]
        ix, fx = _cell_lanes(x0[0], bound, ri, rf, LV)
        iy, fy = _cell_lanes(x0[1], bound, ri, rf, LV)
        iz, fz = _cell_lanes(x0[2], bound, ri, rf, LV)
        acc = [ti.Vector([0.0] * LV) for _ in ti.static(range(F))]
        jac = [[ti.Vector([0.0] * LV) for _ in ti.static(range(F))] for _ in ti.static(range(3 if JAC else 0))]
        for c in ti.static(range(8)):
            w, e = _corner_lanes(c, ix, iy, iz, fx, fy, fz, ri, hmask, dense)
            base = base0 + ti.select(on, e, 0) * F
            for f in ti.static(range(F)):
                v = ti.Vector([params[base[l] + f] for l in ti.static(range(LV))])
                acc[f] = acc[f] + w * v
                if ti.static(JAC):
                    dw = _corner_dw(c, fx, fy, fz)  # the same per f: LLVM keeps one copy
                    for t in ti.static(range(3)):
                        jac[t][f] = jac[t][f] + dw[t] * v
        for f in ti.static(range(F)):
            # (whole-vector select: reading one lane of the boolean vector ``on`` miscompiled, SIMD on)
            acc[f] = ti.select(on, acc[f], 0.0)
        for lv in ti.static(range(L)):
            for f in ti.static(range(F)):
                put(X, row, col0 + lv * F + f, acc[f][lv])
        if ti.static(JAC):
            for t in ti.static(range(3)):
                s = _cell_slope(x0[t], bound, rf)
                for f in ti.static(range(F)):
                    jt = ti.select(on, jac[t][f] * s, 0.0)
                    for lv in ti.static(range(L)):
                        put(X, row + 1 + t, col0 + lv * F + f, jt[lv])


@ti.kernel
def hash_encode_backward_atomic(
    X: ROWS16,  # (M, D) rows16: positions in cols 0..2
    dX: ROWS16,  # (M, D') rows16: dL/d(encoding) at col0
    n: ti.i32,
    col0: ti.i32,
    grads: ti.types.ndarray(dtype=ti.f32, ndim=1),
    table_off: ti.i32,
    res: ti.types.ndarray(dtype=ti.i32, ndim=1),
    loff: ti.types.ndarray(dtype=ti.i32, ndim=1),
    lsize: ti.types.ndarray(dtype=ti.i32, ndim=1),
    ldense: ti.types.ndarray(dtype=ti.i32, ndim=1),
    bound: ti.f32,
    F: ti.template(),
    n_active: ti.i32,  # only levels lv < n_active receive gradient
    JAC: ti.template(),  # 1: rows m·4 + 1 + t hold dL/d(Jacobian) too (JAC_ROWS); n counts points
):
    """Table gradient, one thread per (point, level), atomic adds (for the massively parallel backends).
    With ``JAC``, each corner's entry receives w·g + Σ_t (∂w/∂x_t)·g_t: the value's and the Jacobian's
    gradients at once, one scatter per point and level."""
    La = ti.max(ti.min(n_active, res.shape[0]), 0)
    R = ti.static(JAC_ROWS if JAC else 1)
    for m, lv in ti.ndrange(n, La):
        row = m * R
        r = res[lv]
        x0 = ti.Vector([get(X, row, 0), get(X, row, 1), get(X, row, 2)])
        ix, fx = _cell(x0[0], bound, r)
        iy, fy = _cell(x0[1], bound, r)
        iz, fz = _cell(x0[2], bound, r)
        g = [ti.Vector([0.0] * F) for _ in ti.static(range(R))]
        nz = 0.0
        for q in ti.static(range(R)):
            for f in ti.static(range(F)):
                g[q][f] = get(dX, row + q, col0 + lv * F + f)
            if ti.static(q > 0):
                g[q] *= _cell_slope(x0[q - 1], bound, r)
            nz += g[q].norm_sqr()
        if nz > 0.0:
            for c in ti.static(range(8)):
                w, e = _corner(c, ix, iy, iz, fx, fy, fz, r, lsize[lv], ldense[lv])
                base = table_off + (loff[lv] + e) * F
                gc = w * g[0]
                if ti.static(JAC):
                    dw = _corner_dw(c, fx, fy, fz)
                    for t in ti.static(range(3)):
                        gc += dw[t] * g[1 + t]
                for f in ti.static(range(F)):
                    ti.atomic_add(grads[base + f], gc[f])


@ti.kernel
def hash_encode_backward_points(
    X: ROWS16,  # (M, D) positions in cols 0..2
    dX: ROWS16,  # (M, D') dL/d(encoding) at col0
    n: ti.i32,
    col0: ti.i32,
    params: ti.types.ndarray(dtype=ti.f32, ndim=1),
    table_off: ti.i32,
    res: ti.types.ndarray(dtype=ti.i32, ndim=1),
    loff: ti.types.ndarray(dtype=ti.i32, ndim=1),
    lsize: ti.types.ndarray(dtype=ti.i32, ndim=1),
    ldense: ti.types.ndarray(dtype=ti.i32, ndim=1),
    bound: ti.f32,
    F: ti.template(),
    n_active: ti.i32,  # only levels lv < n_active contribute (the others' features are constant 0)
    dP: ti.types.ndarray(dtype=ti.f32, ndim=2),  # (M, 3) out: dL/dx, overwritten
    JAC: ti.template(),  # 1: rows m·4 + 1 + t hold dL/d(Jacobian) (JAC_ROWS); n counts points
):
    """dP[m] = Σ_levels Σ_corners (g·table[corner]) ∂w_corner/∂x: the derivative of the trilinear weights.
    With ``JAC`` the Jacobian rows' gradients g_t add Σ_t (g_t·table[corner]) ∂²w_corner/∂x_t∂x (the
    trilinear weights' mixed second derivatives: zero on the diagonal); dP's row m·4 gets the point's
    gradient and rows m·4 + 1 + t zeros.

    One thread per point, levels in a loop, so no atomics; the table is only read."""
    La = ti.max(ti.min(n_active, res.shape[0]), 0)
    R = ti.static(JAC_ROWS if JAC else 1)
    for m in range(n):
        row = m * R
        x0 = ti.Vector([get(X, row, 0), get(X, row, 1), get(X, row, 2)])
        gp = ti.Vector([0.0, 0.0, 0.0])
        for lv in range(La):
            r = res[lv]
            ix, fx = _cell(x0[0], bound, r)
            iy, fy = _cell(x0[1], bound, r)
            iz, fz = _cell(x0[2], bound, r)
            s = ti.Vector([_cell_slope(x0[0], bound, r), _cell_slope(x0[1], bound, r), _cell_slope(x0[2], bound, r)])
            g = [ti.Vector([get(dX, row + q, col0 + lv * F + f) for f in ti.static(range(F))])
                 for q in ti.static(range(R))]
            nz = 0.0
            for q in ti.static(range(R)):
                nz += g[q].norm_sqr()
            gl = ti.Vector([0.0, 0.0, 0.0])  # dL/d(fx, fy, fz) at this level
            if nz > 0.0:
                for c in ti.static(range(8)):
                    w, e = _corner(c, ix, iy, iz, fx, fy, fz, r, lsize[lv], ldense[lv])
                    tv = ti.Vector([params[table_off + (loff[lv] + e) * F + f] for f in ti.static(range(F))])
                    dw = _corner_dw(c, fx, fy, fz)
                    gl += g[0].dot(tv) * ti.Vector([dw[0], dw[1], dw[2]])
                    if ti.static(JAC):
                        # ∂²w/∂f_t∂f_u (t ≠ u) = sign_t·sign_u·(the third factor); J_t carries the slope s_t
                        sg = ti.Vector([1.0 if (c >> a) & 1 else -1.0 for a in ti.static(range(3))])
                        wf = ti.Vector([fx if c & 1 else 1.0 - fx, fy if (c >> 1) & 1 else 1.0 - fy,
                                        fz if (c >> 2) & 1 else 1.0 - fz])
                        for t in ti.static(range(3)):
                            vt = g[1 + t].dot(tv) * s[t]
                            for u in ti.static(range(3)):
                                if ti.static(u != t):
                                    gl[u] += vt * sg[t] * sg[u] * wf[3 - t - u]
            gp += gl * s
        dP[row, 0], dP[row, 1], dP[row, 2] = gp[0], gp[1], gp[2]
        for q in ti.static(range(1, R)):
            for c in ti.static(range(3)):
                dP[row + q, c] = 0.0


# Levels handled together: task t owns levels t, t + T, t + 2T, t + 3T (T = ceil(L / 4), made even: _level_tasks),
# so the four tasks of 16 levels each mix dense coarse and hashed fine levels (balanced), and each row's
# four scatters are independent (more table accesses in flight: they wait on the cache).
LEVELS_PER_TASK = 4
# Iterations of the task loop per task. Taichi 1.7.4's CPU backend hands a range-for to its threads
# in blocks of up to 512 iterations and ignores loop_config(block_dim) there (measured: a
# 16-iteration loop runs on one core): padding each task to 512 iterations, of which the first does
# the work, gives every task a block of its own, so both cores get tasks.
_TASK_STRIDE = 512


def _level_tasks(L: int) -> int:
    """Tasks of :func:`hash_encode_backward_by_level` for L levels: ceil(L / LEVELS_PER_TASK), made even so the
    two cores of this machine get equal shares. The colour grid's 12 levels made 3 tasks of 4 levels: one core
    ran two of them while the other idled for one; 4 tasks of 3 levels finish in 6 level-times, not 8. Which
    task owns a level does not change its sum (its points are still added in point order)."""
    t = (L + LEVELS_PER_TASK - 1) // LEVELS_PER_TASK
    return t + (t % 2)


@ti.kernel
def hash_encode_backward_by_level(
    X: ROWS16,
    dX: ROWS16,
    n: ti.i32,
    col0: ti.i32,
    grads: ti.types.ndarray(dtype=ti.f32, ndim=1),
    table_off: ti.i32,
    res: ti.types.ndarray(dtype=ti.i32, ndim=1),
    loff: ti.types.ndarray(dtype=ti.i32, ndim=1),
    lsize: ti.types.ndarray(dtype=ti.i32, ndim=1),
    ldense: ti.types.ndarray(dtype=ti.i32, ndim=1),
    bound: ti.f32,
    F: ti.template(),
    L: ti.template(),  # number of levels
    n_active: ti.i32,  # only levels lv < n_active receive gradient (a task owning none of them does nothing)
    JAC: ti.template(),  # 1: rows m·4 + 1 + t hold dL/d(Jacobian) too (JAC_ROWS); n counts points
):
    """Table gradient for the CPU: each task owns whole levels (see LEVELS_PER_TASK), so its points
    are scattered one after the other with plain loads and stores, in point order, no atomics.

    Why (profiled on the 2-core CPU, 16 levels × 2^19, N = 2^16 points × 5 stencil rows): the
    per-(point, level) scatter does 256 float atomics per point, each a compare-and-swap loop
    (≈1.0 s of CPU time); owning the levels removes the atomics and their contention on the dense
    coarse levels (0.45 s), and scattering four levels per row keeps more cache misses in flight
    (0.26 s). A task's four levels are the lanes of one vector for the cell, weight and hash
    arithmetic (as :func:`hash_encode_forward_levels`; ~10-20% faster, the scattered adds dominate).
    The result differs from the atomic scatter only by float32 summation order, and is
    deterministic. With ``JAC`` a corner's entry receives w·g + Σ_t (∂w/∂x_t)·g_t in one store."""
    La = ti.max(ti.min(n_active, L), 0)
    # T from all L levels, not the active ones: with few levels active each still gets a task of its own
    # (task t's first level is t), so both cores keep working early in a coarse-to-fine run.
    T = ti.static(_level_tasks(L))
    J = ti.static(LEVELS_PER_TASK)
    R = ti.static(JAC_ROWS if JAC else 1)
    for it in range(T * _TASK_STRIDE):
        t = it // _TASK_STRIDE
        if it % _TASK_STRIDE == 0 and t < La:
            for m in range(n):
                row = m * R
                # lane j is level t + j·T (clamped into the table for the lanes past the last level;
                # those lanes, and the levels that are off, store nothing); built per point (_level_lanes)
                lv = ti.Vector([t + j * T for j in ti.static(range(J))])
                lc = ti.min(lv, L - 1)
                ri, rf, hmask, dense, base0 = _level_lanes(lc, J, res, loff, lsize, ldense, table_off, F)
                x0 = X[row, 0]
                # No test for a zero gradient (a data-dependent branch here made it 1.5x slower; adding
                # zero leaves the sum unchanged). The upstream gradient is read before the stores,
                # which might alias it.
                g = [[ti.Vector([get(dX, row + q, col0 + lc[j] * F + f) for j in ti.static(range(J))])
                      for f in ti.static(range(F))] for q in ti.static(range(R))]
                if ti.static(JAC):
                    for q in ti.static(range(1, R)):
                        s = _cell_slope(x0[q - 1], bound, rf)
                        for f in ti.static(range(F)):
                            g[q][f] = g[q][f] * s
                ix, fx = _cell_lanes(x0[0], bound, ri, rf, J)
                iy, fy = _cell_lanes(x0[1], bound, ri, rf, J)
                iz, fz = _cell_lanes(x0[2], bound, ri, rf, J)
                for c in ti.static(range(8)):
                    w, e = _corner_lanes(c, ix, iy, iz, fx, fy, fz, ri, hmask, dense)
                    base = base0 + e * F
                    wg = [w * g[0][f] for f in ti.static(range(F))]
                    if ti.static(JAC):
                        dw = _corner_dw(c, fx, fy, fz)
                        for q in ti.static(range(3)):
                            for f in ti.static(range(F)):
                                wg[f] = wg[f] + dw[q] * g[1 + q][f]
                    for j in ti.static(range(J)):
                        if lv[j] < La:  # the same for every point: a predictable branch
                            for f in ti.static(range(F)):
                                grads[base[j] + f] = grads[base[j] + f] + wg[f][j]  # plain add: this task owns it


@ti.kernel
def _uniform_init(params: ti.types.ndarray(dtype=ti.f32, ndim=1), off: ti.i32, size: ti.i32,
                  scale: ti.f32, seed: ti.u32):
    # Stateless integer hash (PCG-style) so the same seed gives the same table on every backend.
    ti.loop_config(block_dim=1024)
    for i in range(size):
        h = ti.u32(i) * ti.u32(747796405) + seed * ti.u32(2891336453) + ti.u32(1)
        h = ((h >> ((h >> ti.u32(28)) + ti.u32(4))) ^ h) * ti.u32(277803737)
        h = (h >> ti.u32(22)) ^ h
        u = ti.cast(h >> ti.u32(8), ti.f32) * (1.0 / 16777216.0)
        params[off + i] = (2.0 * u - 1.0) * scale


class HashGrid:
    """The encoding's table lives in a slice of the model's flat parameter buffer."""

    def __init__(self, cfg: HashGridConfig, layout: ParamLayout, name: str = "encoding"):
        self.cfg = cfg
        self.res_np, self.loff_np, self.lsize_np, self.ldense_np, self.n_entries = level_layout(cfg)
        self.slice = layout.add(f"{name}.table", (self.n_entries, cfg.n_features), group=name)
        self._dev = None

    @property
    def out_dim(self) -> int:
        return self.cfg.out_dim

    def _level_arrays(self):
        if self._dev is None:
            self._dev = tuple(buffers.upload(a, ti.i32) for a in
                              (self.res_np, self.loff_np, self.lsize_np, self.ldense_np))
        return self._dev

    def init_params(self, params, seed: int = 0) -> None:
        _uniform_init(params, self.slice.offset, self.slice.size, self.cfg.init_scale, seed & 0xFFFFFFFF)

    def _active(self, n_active: int | None) -> int:
        """Levels on, in [0, L]: ``None`` is all of them."""
        L = self.cfg.n_levels
        return L if n_active is None else min(max(int(n_active), 0), L)

    def forward(self, X, n: int, col0: int, params, n_active: int | None = None, jacobian: bool = False) -> None:
        """Encode the points in ``X[:n, 0:3]`` (unit-sphere coords) into ``X[:n, col0:col0+L*F]``
        (``X`` a :func:`taichi_neus.buffers.rows16` buffer). With ``n_active`` only the coarsest
        ``n_active`` levels are looked up; the finer levels' features are written as exactly 0
        (coarse-to-fine training, Neuralangelo / NeuS2). CPU: the levels as vector lanes
        (:func:`hash_encode_forward_levels`); other backends: one level at a time.

        ``jacobian``: ``n`` counts points, point m is row m·4 of ``X`` and rows m·4 + 1 + t receive
        ∂encoding/∂x_t in the same columns (:data:`JAC_ROWS`; forward-mode tangents for an analytic normal,
        as NeuS2 computes it). The Jacobian is the trilinear weights' derivative, piecewise constant across
        cell faces, zero outside ``[-bound, bound]``."""
        from taichi_neus import runtime
        res, loff, lsize, ldense = self._level_arrays()
        if runtime.current_arch() == "cpu":
            hash_encode_forward_levels(X, n, col0, params, self.slice.offset, res, loff, lsize, ldense,
                                       self.cfg.bound, self.cfg.n_features, self.cfg.n_levels,
                                       lane_width(self.cfg.n_levels), self._active(n_active), int(jacobian))
        else:
            hash_encode_forward(X, n, col0, params, self.slice.offset, res, loff, lsize, ldense,
                                self.cfg.bound, self.cfg.n_features, self._active(n_active), int(jacobian))

    def backward(self, X, dX, n: int, col0: int, grads, n_active: int | None = None, jacobian: bool = False) -> None:
        """Add ``dX[:n, col0:col0+L*F]`` (dL/d encoding) scattered onto the table into ``grads``
        (CPU: one task per level, no atomics; other backends: one thread per point and level, atomics).
        Only the levels ``< n_active`` (all for None) receive gradient; the others' slices are untouched.
        ``jacobian``: the rows are laid out as by ``forward(..., jacobian=True)`` (``n`` points) and rows
        m·4 + 1 + t of ``dX`` hold dL/d(∂encoding/∂x_t); both reach the table in one scatter."""
        from taichi_neus import runtime
        res, loff, lsize, ldense = self._level_arrays()
        if runtime.current_arch() == "cpu":
            hash_encode_backward_by_level(X, dX, n, col0, grads, self.slice.offset, res, loff, lsize, ldense,
                                          self.cfg.bound, self.cfg.n_features, self.cfg.n_levels,
                                          self._active(n_active), int(jacobian))
        else:
            hash_encode_backward_atomic(X, dX, n, col0, grads, self.slice.offset, res, loff, lsize, ldense,
                                        self.cfg.bound, self.cfg.n_features, self._active(n_active), int(jacobian))

    def backward_points(self, X, dX, n: int, col0: int, params, dP, n_active: int | None = None,
                        jacobian: bool = False) -> None:
        """dL/d(position) (n, 3) into ``dP`` (overwritten) from ``dX[:n, col0:col0+L*F]`` (dL/d encoding),
        through the levels ``< n_active`` only (all for None; the others' features are constant).
        ``jacobian``: rows as in ``forward(..., jacobian=True)`` (``n`` points, dP has 4n rows, the point's
        gradient in row m·4), the Jacobian rows' gradients taken through the weights' second derivatives.

        Piecewise smooth: the trilinear weights' derivative jumps across cell faces (either side's is
        returned, as torch autograd of the same interpolation does); zero outside ``[-bound, bound]``."""
        res, loff, lsize, ldense = self._level_arrays()
        hash_encode_backward_points(X, dX, n, col0, params, self.slice.offset, res, loff, lsize, ldense,
                                    self.cfg.bound, self.cfg.n_features, self._active(n_active), dP, int(jacobian))
