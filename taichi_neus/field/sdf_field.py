"""The neural SDF field: hash encoding → SDF MLP → (sdf, feature); normal by finite
differences or forward-mode tangents; colour MLP(x, normal, SH(view dir), feature[, colour encoding]) → rgb.

With ``color_encoding`` the colour network also reads a hash grid of its own at the point (PermutoSDF,
Rosu & Behnke, CVPR 2023, and Voxurf keep appearance apart from geometry the same way): the SDF grid is held
smooth by the eikonal term and switched on coarse to fine, so texture that has to pass through it as the
geometry feature is blurred; the colour grid carries texture without bending the surface.
Forward and backward are Taichi kernels; nothing here uses Taichi autodiff, so gradients are
identical on CPU, CUDA, Vulkan and Metal.

The eikonal loss needs d(∇f)/dθ, a second-order gradient. With finite differences of the SDF
network (Neuralangelo, Li et al. CVPR 2023) it is just the first-order gradient of a few extra
SDF evaluations.
Two stencils:
- ``central``: n_c = [f(x + ε e_c) − f(x − ε e_c)] / 2ε (6 extra evaluations);
- ``tetrahedral``: n = Σ_k v_k f(x + ε v_k) / 4ε with v_k the tetrahedron corners
  (±1, ±1, ±1) of even parity (4 extra evaluations; Σ v_k v_kᵀ = 4I so this is ∇f + O(ε²)).

And ``analytic``, the exact gradient as NeuS2 computes it (Wang et al., ICCV 2023, §3.2): forward-mode
tangents. Row m·4 is the point, rows m·4 + 1 + t carry ∂/∂x_t: the hash grid writes its Jacobian there
(the trilinear weights' derivative), each linear layer maps them without its bias, each activation
multiplies them by its derivative (:func:`mlp.tangent_act_forward`), so the output layer's rows
m·4 + 1 + t hold ∂f/∂x_t. The backward is the transpose of the same operations (the activation's second
derivative couples value and tangents); the hash grid's table then receives the value's and the
Jacobian's gradients in one scatter per point. One hash lookup per point instead of five; but the
normal only sees the point's own cell (the finite-difference stencils smooth across cells, which
Neuralangelo credits for its coarse-to-fine optimisation).

Rows of the SDF network's buffers are laid out point-major: row ``m·K + k`` is point ``m``
displaced by stencil offset ``k`` (k = 0 is the point itself), so a point's K evaluations are
neighbours in memory and share the hash table's cache lines.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import taichi as ti

from taichi_neus import buffers
from taichi_neus.field.hash_grid import JAC_ROWS, HashGrid, HashGridConfig
from taichi_neus.field.mlp import Linear, kaiming_uniform, set_weight
from taichi_neus.field.params import ParamLayout
from taichi_neus.field.sh import SH_DIM, sh16, sh16_vjp

_TETRA = np.array([[1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]], np.float32)


@dataclass
class FieldConfig:
    grid: HashGridConfig = field(default_factory=HashGridConfig)  # the SDF's hash grid
    include_xyz: bool = True  # SDF MLP input = [xyz, encoding] (needed for the sphere init)
    sdf_hidden: int = 64  # width of the SDF MLP's hidden layers
    sdf_layers: int = 1  # hidden layers of the SDF MLP
    feature_dim: int = 15  # geometry feature passed to the colour MLP
    softplus_beta: float = 100.0  # β of the SDF MLP's softplus
    sphere_init_radius: float = 0.5  # the SDF starts as a sphere of this radius (unit-sphere units)
    color_hidden: int = 64  # width of the colour MLP's hidden layers
    color_layers: int = 2  # hidden layers of the colour MLP
    # "analytic": exact, by forward-mode tangents (one hash lookup per sample); "tetrahedral" / "central": finite
    # differences (4 / 6 extra points); "auto" (the trainer's default): analytic unless the curvature loss or
    # pose refinement is on (train.config.resolved_normal_mode)
    normal_mode: str = "tetrahedral"  # SDF gradient: analytic, tetrahedral, central; auto: analytic where it can
    # Lower bands leave the colour less freedom to explain a wrong surface from each view (the
    # shape-radiance ambiguity, Zhang et al. 2020, NeRF++ §3); on scan24 1 and 0 did not beat 3.
    view_degree: int = 3  # highest SH band of the view direction fed to the colour MLP (3: 16 coefficients; 0: none)
    fd_eps: float = 1.0 / 256  # finite-difference step, unit-sphere units (trainer anneals it)
    # on by default: on scan 24 at ¼, 3000 steps, +2.2 dB held out inside the masks (22.56 → 24.73 dB), the
    # training views fitted as much better, so the texture was underfitted, not the surface wrong
    # (benchmarks/results/color_grid_scan24.json); ~30% more time per step (2272 against 1745 steps in 600 s)
    color_encoding: bool = True  # the colour network also reads a hash grid of its own (texture apart from shape)
    # the colour grid: 12 levels from 32 to ~670 cells per axis (cells to 0.003 unit-sphere units, under a
    # DTU ¼ pixel's 0.004), 2^18 entries per level: it only has to hold the surface's texture
    color_grid: HashGridConfig = field(default_factory=lambda: HashGridConfig(n_levels=12, log2_table=18))


def stencil(mode: str):
    """(offsets (K,3), coef (K,3)): normal_c = Σ_k coef[k,c]·f(x + ε·offsets[k]) / ε.

    ``analytic``: K = 4 rows (the point and its three tangents, all at offset 0), coef picks row 1 + c
    for normal_c (and ε is taken as 1)."""
    if mode == "analytic":
        off = np.zeros((JAC_ROWS, 3), np.float32)
        coef = np.concatenate([np.zeros((1, 3), np.float32), np.eye(3, dtype=np.float32)])
    elif mode == "central":
        off = np.zeros((7, 3), np.float32)
        coef = np.zeros((7, 3), np.float32)
        for c in range(3):
            off[1 + 2 * c, c], off[2 + 2 * c, c] = 1.0, -1.0
            coef[1 + 2 * c, c], coef[2 + 2 * c, c] = 0.5, -0.5
    elif mode == "tetrahedral":
        off = np.concatenate([np.zeros((1, 3), np.float32), _TETRA])
        coef = np.concatenate([np.zeros((1, 3), np.float32), _TETRA / 4.0])
    else:
        raise ValueError(f"unknown normal_mode '{mode}': use 'tetrahedral', 'central' or 'analytic'")
    return off, coef


def laplacian_coef(mode: str) -> np.ndarray:
    """(K,) float32: Δf ≈ Σ_k lap[k]·f(x + ε·offsets[k]) / ε², from the same stencil as the normal.

    ``central``: the 7-point Laplacian, Σ_c [f(x+εe_c) + f(x−εe_c) − 2f(x)] / ε².
    ``tetrahedral``: Σ_k f(x+εv_k) − 4f(x) = (ε²/2)·Σ_k v_kᵀ H v_k + O(ε⁴) = 2ε²·tr H + O(ε⁴)
    (Σ_k v_k = 0 and Σ_k v_k v_kᵀ = 4I), so Δf ≈ [Σ_k f(x+εv_k) − 4f(x)] / 2ε².
    Neuralangelo's curvature loss (Li et al. CVPR 2023, eq. 9) is the mean |Δf| from such a stencil."""
    if mode == "central":
        return np.array([-6.0] + [1.0] * 6, np.float32)
    if mode == "tetrahedral":
        return np.array([-2.0] + [0.5] * 4, np.float32)
    if mode == "analytic":
        raise ValueError("the Laplacian (curvature loss) comes from a finite-difference stencil: "
                         "use normal_mode 'tetrahedral' or 'central' with it")
    raise ValueError(f"unknown normal_mode '{mode}': use 'tetrahedral', 'central' or 'analytic'")


ROWS16 = buffers.ROWS16
get, put = buffers.get, buffers.put


@ti.kernel
def _expand_points(pts: ti.types.ndarray(dtype=ti.f32, ndim=2), n: ti.i32, X0: ROWS16,
                   off: ti.types.ndarray(dtype=ti.f32, ndim=2), eps: ti.f32):
    K = off.shape[0]
    for m, k in ti.ndrange(n, K):
        for c in ti.static(range(3)):
            put(X0, m * K + k, c, pts[m, c] + eps * off[k, c])


@ti.kernel
def _expand_tangent_rows(pts: ti.types.ndarray(dtype=ti.f32, ndim=2), n: ti.i32, X0: ROWS16):
    """Row m·4: the point; rows m·4 + 1 + t: the tangent e_t of the xyz input (analytic normals)."""
    for m in range(n):
        for c in ti.static(range(3)):
            put(X0, m * JAC_ROWS, c, pts[m, c])
            for t in ti.static(range(3)):
                put(X0, m * JAC_ROWS + 1 + t, c, 1.0 if t == c else 0.0)


@ti.kernel
def _gather_outputs(O: ROWS16, X0: ROWS16,
                    dirs: ti.types.ndarray(dtype=ti.f32, ndim=2), n: ti.i32,
                    coef: ti.types.ndarray(dtype=ti.f32, ndim=2), inv_eps: ti.f32,
                    sdf: ti.types.ndarray(dtype=ti.f32, ndim=1),
                    normal: ti.types.ndarray(dtype=ti.f32, ndim=2),
                    Xc: ROWS16, feat: ti.i32, n_sh: ti.i32):
    K = coef.shape[0]
    for m in range(n):
        sdf[m] = get(O, m * K, 0)
        g = ti.Vector([0.0, 0.0, 0.0])
        for k in range(1, K):
            f = get(O, m * K + k, 0)
            for c in ti.static(range(3)):
                g[c] += coef[k, c] * f
        g *= inv_eps
        sh = sh16(dirs[m, 0], dirs[m, 1], dirs[m, 2])
        for c in ti.static(range(3)):
            normal[m, c] = g[c]
            put(Xc, m, c, get(X0, m * K, c))
            put(Xc, m, 3 + c, g[c])
        for i in ti.static(range(SH_DIM)):  # bands above view_degree are fed as zeros
            put(Xc, m, 6 + i, ti.select(i < n_sh, sh[i], 0.0))
        for i in range(feat):
            put(Xc, m, 6 + SH_DIM + i, get(O, m * K, 1 + i))


@ti.kernel
def _scatter_grads(dXc: ROWS16, dnormal: ti.types.ndarray(dtype=ti.f32, ndim=2),
                   dsdf: ti.types.ndarray(dtype=ti.f32, ndim=1), n: ti.i32,
                   coef: ti.types.ndarray(dtype=ti.f32, ndim=2), inv_eps: ti.f32,
                   dO: ROWS16, feat: ti.i32, use_color: ti.i32):
    K = coef.shape[0]
    for m in range(n):
        gn = ti.Vector([dnormal[m, 0], dnormal[m, 1], dnormal[m, 2]])
        if use_color != 0:
            for c in ti.static(range(3)):
                gn[c] += get(dXc, m, 3 + c)
        put(dO, m * K, 0, dsdf[m])
        for i in range(feat):
            put(dO, m * K, 1 + i, get(dXc, m, 6 + SH_DIM + i) if use_color != 0 else 0.0)
        for k in range(1, K):
            acc = 0.0
            for c in ti.static(range(3)):
                acc += coef[k, c] * gn[c]
            put(dO, m * K + k, 0, acc * inv_eps)
            for i in range(feat):
                put(dO, m * K + k, 1 + i, 0.0)


@ti.kernel
def _gather_laplacian(O: ROWS16, n: ti.i32, lcoef: ti.types.ndarray(dtype=ti.f32, ndim=1), inv_eps2: ti.f32,
                      lap: ti.types.ndarray(dtype=ti.f32, ndim=1)):
    """lap[m] = Σ_k lcoef[k]·f(row m·K + k) / ε² (see :func:`laplacian_coef`)."""
    K = lcoef.shape[0]
    for m in range(n):
        acc = 0.0
        for k in range(K):
            acc += lcoef[k] * get(O, m * K + k, 0)
        lap[m] = acc * inv_eps2


@ti.kernel
def _scatter_laplacian(dlap: ti.types.ndarray(dtype=ti.f32, ndim=1), n: ti.i32,
                       lcoef: ti.types.ndarray(dtype=ti.f32, ndim=1), inv_eps2: ti.f32, dO: ROWS16):
    """dO[m·K + k, 0] += lcoef[k]·dL/dlap[m] / ε² (the transpose of :func:`_gather_laplacian`)."""
    K = lcoef.shape[0]
    for m in range(n):
        g = dlap[m] * inv_eps2
        for k in range(K):
            put(dO, m * K + k, 0, get(dO, m * K + k, 0) + lcoef[k] * g)


@ti.kernel
def _input_grads(dP: ti.types.ndarray(dtype=ti.f32, ndim=2), dX0: ROWS16,
                 dXc: ROWS16, dirs: ti.types.ndarray(dtype=ti.f32, ndim=2),
                 n: ti.i32, K: ti.i32, xyz_in_sdf: ti.i32, use_color: ti.i32, n_sh: ti.i32,
                 dpoints: ti.types.ndarray(dtype=ti.f32, ndim=2), ddirs: ti.types.ndarray(dtype=ti.f32, ndim=2),
                 xyz_rows: ti.i32):
    """dL/dx and dL/d(view dir) per point (overwritten). Every stencil row m·K + k evaluates the SDF
    network at x + ε·v_k, so dL/dx sums the rows' position gradients (hash encoding ``dP``, plus the
    xyz input of the SDF MLP when it has one, from the first ``xyz_rows`` rows of each point: K for a
    stencil, 1 for the analytic normal, whose tangent rows' xyz inputs are constants); the colour MLP
    adds its xyz input's, and the view direction's comes through the SH encoding."""
    for m in range(n):
        g = ti.Vector([0.0, 0.0, 0.0])
        for k in range(K):
            for c in ti.static(range(3)):
                g[c] += dP[m * K + k, c]
                if xyz_in_sdf != 0 and k < xyz_rows:
                    g[c] += get(dX0, m * K + k, c)
        gd = ti.Vector([0.0, 0.0, 0.0])
        if use_color != 0:
            for c in ti.static(range(3)):
                g[c] += get(dXc, m, c)
            gs = ti.Vector([0.0] * SH_DIM)
            for i in ti.static(range(SH_DIM)):
                gs[i] = ti.select(i < n_sh, get(dXc, m, 6 + i), 0.0)
            gd = sh16_vjp(dirs[m, 0], dirs[m, 1], dirs[m, 2], gs)
        for c in ti.static(range(3)):
            dpoints[m, c] = g[c]
            ddirs[m, c] = gd[c]


@ti.kernel
def _rows_to16(src: ti.types.ndarray(dtype=ti.f32, ndim=2), dst: ROWS16, n: ti.i32):
    """dst[:n, 0:3] = src[:n] (an (n,3) gradient into a vector buffer)."""
    for m in range(n):
        for c in ti.static(range(3)):
            put(dst, m, c, src[m, c])


@ti.kernel
def _rows_from16(src: ROWS16, dst: ti.types.ndarray(dtype=ti.f32, ndim=2), n: ti.i32):
    """dst[:n] = src[:n, 0:3] (the colour network's output into the (rows,3) rgb buffer)."""
    for m in range(n):
        for c in ti.static(range(3)):
            dst[m, c] = get(src, m, c)


@ti.kernel
def _points_to_rows(pts: ti.types.ndarray(dtype=ti.f32, ndim=2), start: ti.i32, n: ti.i32, X0: ROWS16):
    for m in range(n):
        for c in ti.static(range(3)):
            put(X0, m, c, pts[start + m, c])


@ti.kernel
def _col_to_out(O: ROWS16, start: ti.i32, n: ti.i32, out: ti.types.ndarray(dtype=ti.f32, ndim=1)):
    for m in range(n):
        out[start + m] = get(O, m, 0)


class _Workspace:
    """Capacity-sized scratch buffers, grown (×1.5) when a batch needs more."""

    def __init__(self):
        self._bufs: dict = {}  # name → capacity-sized buffer (get)
        self._exact: dict = {}  # name → {shape: buffer}, least recently used first (exact)

    def get(self, name: str, rows: int, cols: int | None = None):
        """A 1-D float32 buffer (``cols`` None) or a :func:`buffers.rows16` buffer of ``cols`` columns."""
        rows = max(int(rows), 1)  # a batch without samples still gets a (1-row) buffer: ndarrays can't be empty
        cur = self._bufs.get(name)
        if cur is not None and cur.shape[0] >= rows and (cols is None or cur.shape[1] == buffers.blocks(cols)):
            return cur
        cap = max(rows, int(cur.shape[0] * 1.5) if cur is not None else rows)
        buf = buffers.f32(cap) if cols is None else buffers.rows16(cap, cols)
        self._bufs[name] = buf
        return buf

    def all_buffers(self):
        """Every buffer held (the memory estimate's test sums them)."""
        yield from self._bufs.values()
        for kept in self._exact.values():
            yield from kept.values()

    # shapes kept per exact-size name: a training step evaluates the field at its samples and at the
    # eikonal points, two sizes under the same names, which reallocated (and zero-filled) both every step
    EXACT_SHAPES = 3

    def exact(self, name: str, rows: int, cols: int | None = None):
        """A buffer of exactly ``rows`` rows: the last few shapes asked under ``name`` are kept, the
        least recently used dropped. Contents are whatever the last user of that shape left."""
        shape = (rows,) if cols is None else (rows, cols)
        kept = self._exact.setdefault(name, {})
        buf = kept.pop(shape, None)
        if buf is None:
            buf = buffers.f32(*shape)
            if len(kept) >= self.EXACT_SHAPES:
                kept.pop(next(iter(kept)))
        kept[shape] = buf  # re-inserted last: dict order is the recency order
        return buf


@dataclass
class FieldOutputs:
    """Views of capacity-sized buffers; rows ``[0, n)`` are valid.

    sdf (n,) float32 signed distance, unit-sphere units, positive outside;
    normal (n,3) float32 SDF gradient, exact or by the stencil (not normalised);
    rgb (n,3) float32 in [0, 1] (None from ``forward(color=False)``).
    """

    sdf: object
    normal: object
    rgb: object
    n: int
    laplacian: object = None  # (n,) float32 finite-difference Laplacian Δf, when forward(laplacian=True)


class SDFField:
    """Hash-grid SDF field with a colour network (DESIGN §1), parameters in a flat buffer."""

    def __init__(self, cfg: FieldConfig, layout: ParamLayout):
        self.cfg = cfg
        g = cfg.grid
        self.encoding = HashGrid(g, layout, name="encoding")
        self.enc_col = 3
        self.sdf_in_col = 0 if cfg.include_xyz else 3
        sdf_in = g.out_dim + (3 if cfg.include_xyz else 0)
        dims = [sdf_in] + [cfg.sdf_hidden] * cfg.sdf_layers + [1 + cfg.feature_dim]
        self.sdf_layers = [
            Linear(layout, f"sdf.{i}", dims[i], dims[i + 1],
                   act="softplus" if i < len(dims) - 2 else "none", beta=cfg.softplus_beta, group="sdf_mlp")
            for i in range(len(dims) - 1)
        ]
        if not 0 <= int(cfg.view_degree) <= 3:
            raise ValueError(f"view_degree must be 0, 1, 2 or 3, got {cfg.view_degree!r}")
        self.n_sh = (int(cfg.view_degree) + 1) ** 2  # SH coefficients fed to the colour MLP (the rest: zeros)
        self.color_in = 6 + SH_DIM + cfg.feature_dim
        # the colour grid's features follow the geometry feature in the colour network's input
        self.color_encoding = HashGrid(cfg.color_grid, layout, name="color_encoding") if cfg.color_encoding else None
        self.color_enc_col = self.color_in
        if self.color_encoding is not None:
            self.color_in += self.color_encoding.out_dim
        cdims = [self.color_in] + [cfg.color_hidden] * cfg.color_layers + [3]
        self.color_layers = [
            Linear(layout, f"color.{i}", cdims[i], cdims[i + 1],
                   act="relu" if i < len(cdims) - 2 else "sigmoid", group="color_mlp")
            for i in range(len(cdims) - 1)
        ]
        self.x0_cols = 3 + g.out_dim
        self.set_normal_mode(cfg.normal_mode)
        self.ws = _Workspace()
        self._n = 0
        self.forward_count = 0
        # Hash-grid levels on (coarse to fine; None: all). Read by forward, sdf and sdf_fn; backward uses
        # the count of the forward whose activations it differentiates. The trainer sets it once per step.
        self.active_levels: int | None = None
        self._levels = None

    # ------------------------------------------------------------------ setup
    def set_normal_mode(self, mode: str) -> None:
        off, coef = stencil(mode)
        self.K = off.shape[0]
        self.analytic = mode == "analytic"
        self._off_np, self._coef_np = off, coef
        self._off_dev = self._coef_dev = None
        self._lap_np, self._lap_dev = (None if self.analytic else laplacian_coef(mode)), None

    def _laplacian_dev(self):
        if self._lap_np is None:
            laplacian_coef("analytic")  # raises: says which modes give one
        if self._lap_dev is None:
            self._lap_dev = buffers.upload(self._lap_np)
        return self._lap_dev

    def _stencil_dev(self):
        if self._off_dev is None:
            self._off_dev = buffers.upload(self._off_np)
            self._coef_dev = buffers.upload(self._coef_np)
        return self._off_dev, self._coef_dev

    def init_params(self, params, seed: int = 0) -> None:
        """Hash table ~U(±1e-4); SDF MLP geometric init (Atzmon & Lipman, SAL, CVPR 2020, as NeuS
        uses it) so the initial SDF is ≈ |x| − r, a sphere of radius ``sphere_init_radius``;
        colour MLP with torch's default uniform init."""
        self.encoding.init_params(params, seed)
        if self.color_encoding is not None:
            self.color_encoding.init_params(params, seed + 1)
        host = buffers.to_numpy(params).copy()
        rng = np.random.default_rng(seed)
        cfg = self.cfg
        n_layers = len(self.sdf_layers)
        for li, lin in enumerate(self.sdf_layers):
            W = np.zeros((lin.n_out, lin.n_in), np.float32)
            b = np.zeros(lin.n_out, np.float32)
            if li == n_layers - 1:
                W[:] = rng.normal(math.sqrt(math.pi) / math.sqrt(lin.n_in), 1e-4, size=W.shape)
                b[:] = -cfg.sphere_init_radius
            else:
                W[:] = rng.normal(0.0, math.sqrt(2.0) / math.sqrt(lin.n_out), size=W.shape)
                if li == 0 and cfg.include_xyz:
                    W[:, 3:] = 0.0  # encoding starts silent: the sphere comes from xyz alone
            set_weight(host, lin, W)
            host[lin.b.offset:lin.b.offset + lin.b.size] = b
        for lin in self.color_layers:
            set_weight(host, lin, kaiming_uniform(rng, lin.n_out, lin.n_in))
            bound = 1.0 / math.sqrt(lin.n_in)
            host[lin.b.offset:lin.b.offset + lin.b.size] = rng.uniform(-bound, bound, lin.n_out)
        buffers.from_numpy(params, host)

    # ---------------------------------------------------------------- forward
    def _sdf_net_forward(self, X0, rows: int, params, tag: str):
        self.encoding.forward(X0, rows, self.enc_col, params, self.active_levels)
        h, col = X0, self.sdf_in_col
        outs = []
        for i, lin in enumerate(self.sdf_layers):
            Y = self.ws.get(f"{tag}sdf_h{i}", rows, lin.n_out)
            lin.forward(h, col, Y, rows, params)
            outs.append(Y)
            h, col = Y, 0
        return outs

    def _sdf_net_forward_tangents(self, X0, n: int, params):
        """The SDF network on ``n`` points with their three tangents (rows m·4 + t, see the module
        docstring): the hash grid with its Jacobian, then per layer the linear map (bias on the points'
        rows only) and the activation's forward-mode rule. Returns (outputs, pre-activations) per layer."""
        rows = JAC_ROWS * n
        self.encoding.forward(X0, n, self.enc_col, params, self.active_levels, jacobian=True)
        h, col = X0, self.sdf_in_col
        outs, zs = [], []
        for i, lin in enumerate(self.sdf_layers):
            Y = self.ws.get(f"sdf_h{i}", rows, lin.n_out)
            if i < len(self.sdf_layers) - 1:
                Z = self.ws.get(f"sdf_z{i}", rows, lin.n_out)
                lin.forward(h, col, Y, rows, params, bias_every=JAC_ROWS, preact=Z)  # Y: tangent_act_forward(Z)
            else:  # the output layer has no activation
                Z = Y
                lin.forward(h, col, Y, rows, params, bias_every=JAC_ROWS)
            outs.append(Y)
            zs.append(Z)
            h, col = Y, 0
        return outs, zs

    def forward(self, points, dirs, n: int, params, eps: float | None = None,
                out_rows: int | None = None, laplacian: bool = False, color: bool = True) -> FieldOutputs:
        """Evaluate the field at ``points`` (n,3) with unit view ``dirs`` (n,3); keeps activations
        for :meth:`backward`. Rows ``[0, n)`` of the returned buffers are valid; with ``out_rows``
        the sdf/normal/rgb buffers have exactly that many rows (the renderer's packed capacity).
        Only the hash grid's :attr:`active_levels` coarsest levels are on (None: all). ``laplacian``:
        also the finite-difference Laplacian of the SDF from the same stencil (a curvature loss's input;
        :func:`laplacian_coef`). ``color=False``: geometry only (sdf, normal; ``rgb`` None), for terms that
        never read the colour (the eikonal points, the sparse points): the colour grid and network are skipped,
        and the :meth:`backward` that follows takes ``drgb=None``."""
        out_rows = max(n, 1) if out_rows is None else int(out_rows)
        eps = self.cfg.fd_eps if eps is None else float(eps)
        if self.analytic:
            if laplacian:
                laplacian_coef("analytic")  # raises: the curvature loss needs a stencil
            eps = 1.0  # the normal is read off the tangent rows: nothing to divide by
        off, coef = self._stencil_dev()
        rows = self.K * n
        X0 = self.ws.get("X0", rows, self.x0_cols)
        self._sdf_zs = None
        if self.analytic:
            _expand_tangent_rows(points, n, X0)
            outs, self._sdf_zs = self._sdf_net_forward_tangents(X0, n, params)
        else:
            _expand_points(points, n, X0, off, eps)
            outs = self._sdf_net_forward(X0, rows, params, "")
        O = outs[-1]
        sdf = self.ws.exact("sdf", out_rows)
        normal = self.ws.exact("normal", out_rows, 3)
        Xc = self.ws.get("Xc", n, self.color_in)
        _gather_outputs(O, X0, dirs, n, coef, 1.0 / eps, sdf, normal, Xc, self.cfg.feature_dim, self.n_sh)
        rgb, couts = None, None
        if color:
            if self.color_encoding is not None:  # reads the point from Xc's first columns
                self.color_encoding.forward(Xc, n, self.color_enc_col, params)
            h = Xc
            couts = []
            for i, lin in enumerate(self.color_layers):
                Y = self.ws.get(f"color_h{i}", n, lin.n_out)
                lin.forward(h, 0, Y, n, params)
                couts.append(Y)
                h = Y
            rgb = self.ws.exact("rgb", out_rows, 3)
            _rows_from16(couts[-1], rgb, n)
        lap = None
        if laplacian:
            lap = self.ws.exact("laplacian", out_rows)
            _gather_laplacian(O, n, self._laplacian_dev(), 1.0 / (eps * eps), lap)
        self._n, self._eps, self._dirs, self._levels = n, eps, dirs, self.active_levels
        self._sdf_outs, self._color_outs = outs, couts
        self.forward_count += 1  # lets a caller holding saved inputs tell whether the activations are still its own
        return FieldOutputs(sdf=sdf, normal=normal, rgb=rgb, n=n, laplacian=lap)

    # --------------------------------------------------------------- backward
    def backward(self, dsdf, dnormal, drgb, params, grads, dpoints=None, ddirs=None, dlaplacian=None) -> None:
        """Add dL/dθ into ``grads`` given dL/dsdf (n,), dL/dnormal (n,3), dL/drgb (n,3) for the
        batch of the last :meth:`forward`. ``drgb=None`` skips the colour network (geometry-only
        losses). The inputs are not modified.

        With ``dpoints`` and ``ddirs`` ((n, 3) float32, overwritten) the gradients with respect to the
        points (through the hash encoding's trilinear weights, the MLPs' xyz inputs and every
        finite-difference stencil point) and to the view directions (through the SH encoding; zero when
        ``drgb`` is None) are written too; ``grads=None`` then skips the parameter gradients (e.g. a camera
        pose refined through a fixed field). The training step passes neither and runs exactly as before.
        ``dlaplacian`` (n,): dL/dΔf of the Laplacian the forward returned with ``laplacian=True``."""
        want_inputs = dpoints is not None or ddirs is not None
        n, eps = self._n, self._eps
        rows = self.K * n
        X0 = self.ws.get("X0", rows, self.x0_cols)
        Xc = self.ws.get("Xc", n, self.color_in)
        dXc = self.ws.get("dXc", n, self.color_in)
        use_color = drgb is not None
        if use_color and self._color_outs is None:
            raise ValueError("the last forward ran with color=False: its backward takes drgb=None")
        if use_color:
            dY = self.ws.get("dcolor_out", n, 3)
            _rows_to16(drgb, dY, n)
            last = len(self.color_layers) - 1
            for i in reversed(range(len(self.color_layers))):
                lin = self.color_layers[i]
                Xin = Xc if i == 0 else self._color_outs[i - 1]
                if i == 0:
                    lin.backward(Xin, 0, self._color_outs[i], dY, n, params, grads,
                                 dX=dXc, dxcol=0, dx_range=(0 if want_inputs else 3, lin.n_in), dy_preact=i < last)
                else:
                    dH = self.ws.get(f"dcolor_h{i - 1}", n, lin.n_in)
                    lin.backward(Xin, 0, self._color_outs[i], dY, n, params, grads, dX=dH,
                                 dy_preact=i < last, dx_act=self.color_layers[i - 1])
                    dY = dH
            if self.color_encoding is not None and grads is not None:
                self.color_encoding.backward(Xc, dXc, n, self.color_enc_col, grads)
        _, coef = self._stencil_dev()
        last = self.sdf_layers[-1]
        dO = self.ws.get("dO", rows, last.n_out)
        _scatter_grads(dXc, dnormal, dsdf, n, coef, 1.0 / eps, dO, self.cfg.feature_dim, int(use_color))
        if dlaplacian is not None:
            _scatter_laplacian(dlaplacian, n, self._laplacian_dev(), 1.0 / (eps * eps), dO)
        dY = dO
        dX0 = self.ws.get("dX0", rows, self.x0_cols)
        last = len(self.sdf_layers) - 1
        if self.analytic:
            # the transpose of _sdf_net_forward_tangents: every row carries gradient (tangent rows: dL/dż),
            # the activation's rule runs as its own pass, the bias sums the points' rows only
            for i in reversed(range(len(self.sdf_layers))):
                lin = self.sdf_layers[i]
                Xin, xcol = (X0, self.sdf_in_col) if i == 0 else (self._sdf_outs[i - 1], 0)
                lo = 3 if self.cfg.include_xyz and not want_inputs else 0
                dX, dxcol, dxr = ((dX0, self.sdf_in_col, (lo, lin.n_in)) if i == 0
                                  else (self.ws.get(f"dsdf_h{i - 1}", rows, lin.n_in), 0, None))
                # a hidden layer's input gradient leaves through its activation's tangent rule (the
                # transpose of tangent_act_forward) in the same kernel
                prev = self.sdf_layers[i - 1] if i > 0 else None
                lin.backward(Xin, xcol, self._sdf_outs[i], dY, rows, params, grads, dX=dX, dxcol=dxcol,
                             dx_range=dxr, dy_preact=True, bias_every=JAC_ROWS, dx_act=prev,
                             dx_preact=self._sdf_zs[i - 1] if i > 0 else None)
                if i > 0:
                    dY = dX
            if grads is not None:
                self.encoding.backward(X0, dX0, n, self.enc_col, grads, self._levels, jacobian=True)
            if want_inputs:  # the tangent rows' gradients reach x through the encoding's second derivatives
                self._point_grads(X0, dX0, dXc, n, use_color, dpoints, ddirs, params, jacobian=True)
            return
        for i in reversed(range(len(self.sdf_layers))):
            lin = self.sdf_layers[i]
            if i == 0:
                lo = 3 if self.cfg.include_xyz and not want_inputs else 0
                lin.backward(X0, self.sdf_in_col, self._sdf_outs[0], dY, rows, params, grads,
                             dX=dX0, dxcol=self.sdf_in_col, dx_range=(lo, lin.n_in), dy_preact=i < last)
            else:
                dH = self.ws.get(f"dsdf_h{i - 1}", rows, lin.n_in)
                lin.backward(self._sdf_outs[i - 1], 0, self._sdf_outs[i], dY, rows, params, grads,
                             dX=dH, dy_preact=i < last, dx_act=self.sdf_layers[i - 1])
                dY = dH
        if grads is not None:
            self.encoding.backward(X0, dX0, rows, self.enc_col, grads, self._levels)
        if want_inputs:
            self._point_grads(X0, dX0, dXc, n, use_color, dpoints, ddirs, params, jacobian=False)

    def _point_grads(self, X0, dX0, dXc, n: int, use_color: bool, dpoints, ddirs, params, jacobian: bool) -> None:
        """dL/dx and dL/d(view dir) into ``dpoints``/``ddirs`` from the SDF network's input gradients."""
        rows = self.K * n
        dP = self.ws.exact("dP", rows, 3)
        self.encoding.backward_points(X0, dX0, n if jacobian else rows, self.enc_col, params, dP, self._levels,
                                      jacobian=jacobian)
        dpoints = dpoints if dpoints is not None else self.ws.exact("dpoints_unused", n, 3)
        ddirs = ddirs if ddirs is not None else self.ws.exact("ddirs_unused", n, 3)
        _input_grads(dP, dX0, dXc, self._dirs, n, self.K, int(self.cfg.include_xyz), int(use_color), self.n_sh,
                     dpoints, ddirs, 1 if jacobian else self.K)
        if use_color and self.color_encoding is not None:  # the colour grid's trilinear weights move with x too
            dPc = self.ws.exact("dP_color", n, 3)
            Xc = self.ws.get("Xc", n, self.color_in)
            self.color_encoding.backward_points(Xc, dXc, n, self.color_enc_col, params, dPc)
            buffers.add_rows3_(dpoints, dPc, n)

    # ----------------------------------------------------------- sdf queries
    def sdf(self, points, n: int, params, out=None, chunk: int = 1 << 18):
        """SDF only (no normals, colour or saved state) at ``points`` (n,3); returns (n,) ndarray."""
        out = out if out is not None else buffers.f32(max(n, 1))
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            X0 = self.ws.get("q_X0", m, self.x0_cols)
            _points_to_rows(points, s, m, X0)
            outs = self._sdf_net_forward(X0, m, params, "q_")
            _col_to_out(outs[-1], s, m, out)
        return out

    def sdf_fn(self, params):
        """``sdf_fn(points ndarray (M,3)) -> ndarray (M,)`` closure for samplers and the occupancy grid."""
        def fn(points):
            return self.sdf(points, points.shape[0], params)
        return fn
