"""Training losses as Taichi kernels with hand-written gradients (NeuS, Wang et al. 2021, eq. 14-16).

* :func:`colour_l1`  — mean absolute colour error over rays and channels (``F.l1_loss``), optionally
  over foreground rays only; gradient with respect to the rendered colour (R, 3).
* :func:`mask_bce`   — binary cross-entropy between the rendered opacity, clamped to
  [eps, 1 − eps], and the mask; gradient with respect to the opacity (R,).
* :func:`eikonal`    — ``mean((‖∇f‖ − 1)²)`` over the samples inside a sphere of radius 1.05
  (Gropp et al. 2020, as in NeuS); gradient with respect to the raw SDF gradient (S, 3).
* :func:`sparse_sdf` — weighted mean of ``|f|`` at structure-from-motion points (Geo-NeuS, Fu et al.
  2022, eq. 7, with per-point weights); gradient with respect to the SDF values (N,).
* :func:`depth_l1`   — mean absolute error between the rendered depth and a target depth over the rays
  whose target is known (> 0); gradient with respect to the rendered depth (R,).

Each function returns ``(loss: float, grad: ti.ndarray)``; the loss includes its ``weight`` and the
gradient is that of the weighted loss. ``grad_out`` (optional) is written, or added to with
``accumulate=True`` (e.g. the eikonal gradient onto the compositing's ∂L/∂normal). Sums are
deterministic: per-chunk partial sums in parallel, then one serial pass over the partials;
the host reads back two floats per loss.
"""

import taichi as ti

from taichi_neus import buffers, runtime
from taichi_neus.errors import UserInputError

F1 = ti.types.ndarray(dtype=ti.f32, ndim=1)
F2 = ti.types.ndarray(dtype=ti.f32, ndim=2)

CHUNK = 256

_cache: dict = {}


def _scratch(name: str, *shape: int):
    key = (runtime.current_arch(), name, shape)
    b = _cache.get(key)
    if b is None:
        b = buffers.f32(*shape)
        _cache[key] = b
    return b


def _n_chunks(n: int) -> int:
    return max(1, (n + CHUNK - 1) // CHUNK)


@ti.kernel
def _finish(part: F2, stats: F1):
    """stats[q] = Σ_c part[c, q] in a fixed order (one thread)."""
    a = 0.0
    b = 0.0
    ti.loop_config(serialize=True)
    for c in range(part.shape[0]):
        a += part[c, 0]
        b += part[c, 1]
    stats[0] = a
    stats[1] = b


def _reduce(part) -> tuple[float, float]:
    stats = _scratch("stats", 2)
    _finish(part, stats)
    s = buffers.to_numpy(stats)
    return float(s[0]), float(s[1])


# ------------------------------------------------------------------------------------------ colour
@ti.kernel
def _l1_partials(pred: F2, target: F2, mask: F1, use_mask: ti.i32, chunk: ti.i32, part: F2):
    n = pred.shape[0]
    for c in range(part.shape[0]):
        acc = 0.0
        cnt = 0.0
        for k in range(chunk):
            i = c * chunk + k
            if i < n:
                if use_mask == 0 or mask[i] > 0.5:
                    for q in ti.static(range(3)):
                        acc += ti.abs(pred[i, q] - target[i, q])
                    cnt += 1.0
        part[c, 0] = acc
        part[c, 1] = cnt


@ti.kernel
def _l1_grad(pred: F2, target: F2, mask: F1, use_mask: ti.i32, scale: ti.f32, accumulate: ti.i32, grad: F2):
    for i in range(pred.shape[0]):
        inc = 1.0
        if use_mask != 0 and mask[i] <= 0.5:
            inc = 0.0
        for q in ti.static(range(3)):
            e = pred[i, q] - target[i, q]
            g = 0.0
            if e > 0.0:
                g = scale * inc
            elif e < 0.0:
                g = -scale * inc
            if accumulate != 0:
                grad[i, q] += g
            else:
                grad[i, q] = g


def colour_l1(pred, target, mask=None, *, weight: float = 1.0, grad_out=None, accumulate: bool = False):
    """Colour L1 loss and its gradient.

    pred, target (R, 3) float32 linear RGB; mask (R,) float32 or None: with a mask only rays with
    ``mask > 0.5`` count (foreground only), without one every ray counts. Loss
    ``weight · Σ_{included} Σ_c |pred − target| / (3 · n_included)`` (0 when no ray is included).
    Returns ``(loss, grad)`` with grad (R, 3) float32 = ∂loss/∂pred.
    """
    n = pred.shape[0]
    if tuple(target.shape) != (n, 3) or tuple(pred.shape) != (n, 3):
        raise UserInputError(f"colour_l1: pred {tuple(pred.shape)} and target {tuple(target.shape)} "
                             "must both be (R, 3).")
    use_mask = mask is not None
    if use_mask and tuple(mask.shape) != (n,):
        raise UserInputError(f"colour_l1: mask has shape {tuple(mask.shape)}, expected ({n},).")
    m = mask if use_mask else _scratch("dummy", 1)
    part = _scratch("l1_part", _n_chunks(n), 2)
    _l1_partials(pred, target, m, int(use_mask), CHUNK, part)
    total, count = _reduce(part)
    grad = grad_out if grad_out is not None else buffers.f32(n, 3)
    scale = weight / (3.0 * count) if count > 0 else 0.0
    _l1_grad(pred, target, m, int(use_mask), scale, int(accumulate), grad)
    return total * scale, grad


# ------------------------------------------------------------------------------------------ mask
@ti.kernel
def _bce_partials(opacity: F1, mask: F1, eps: ti.f32, chunk: ti.i32, part: F2):
    n = opacity.shape[0]
    for c in range(part.shape[0]):
        acc = 0.0
        cnt = 0.0
        for k in range(chunk):
            i = c * chunk + k
            if i < n:
                o = ti.min(ti.max(opacity[i], eps), 1.0 - eps)
                m = mask[i]
                acc += -(m * ti.log(o) + (1.0 - m) * ti.log(1.0 - o))
                cnt += 1.0
        part[c, 0] = acc
        part[c, 1] = cnt


@ti.kernel
def _bce_grad(opacity: F1, mask: F1, eps: ti.f32, scale: ti.f32, accumulate: ti.i32, grad: F1):
    for i in range(opacity.shape[0]):
        o = opacity[i]
        m = mask[i]
        g = 0.0
        if o >= eps and o <= 1.0 - eps:  # zero gradient where the clamp is active
            g = scale * (-m / o + (1.0 - m) / (1.0 - o))
        if accumulate != 0:
            grad[i] += g
        else:
            grad[i] = g


def mask_bce(opacity, mask, *, weight: float = 0.1, eps: float = 1e-3, grad_out=None, accumulate: bool = False):
    """Mask loss ``weight · mean_r BCE(clamp(opacity_r, eps, 1 − eps), mask_r)`` (NeuS eq. 16).

    opacity (R,) float32 (Σ w from compositing), mask (R,) float32 in [0, 1].
    Returns ``(loss, grad)``, grad (R,) float32 = ∂loss/∂opacity (0 where the clamp is active).
    """
    n = opacity.shape[0]
    if tuple(mask.shape) != (n,):
        raise UserInputError(f"mask_bce: mask has shape {tuple(mask.shape)}, expected ({n},).")
    part = _scratch("bce_part", _n_chunks(n), 2)
    _bce_partials(opacity, mask, eps, CHUNK, part)
    total, count = _reduce(part)
    grad = grad_out if grad_out is not None else buffers.f32(n)
    scale = weight / count if count > 0 else 0.0
    _bce_grad(opacity, mask, eps, scale, int(accumulate), grad)
    return total * scale, grad


# ------------------------------------------------------------------------------------------ eikonal
@ti.func
def _inside(positions: ti.template(), i, radius):
    r2 = positions[i, 0] ** 2 + positions[i, 1] ** 2 + positions[i, 2] ** 2
    return r2 < radius * radius


@ti.func
def _norm(normal: ti.template(), i):
    return ti.sqrt(normal[i, 0] ** 2 + normal[i, 1] ** 2 + normal[i, 2] ** 2)


@ti.kernel
def _eik_partials(normal: F2, positions: F2, n: ti.i32, radius: ti.f32, chunk: ti.i32, part: F2):
    for c in range(part.shape[0]):
        acc = 0.0
        cnt = 0.0
        for k in range(chunk):
            i = c * chunk + k
            if i < n and _inside(positions, i, radius):
                e = _norm(normal, i) - 1.0
                acc += e * e
                cnt += 1.0
        part[c, 0] = acc
        part[c, 1] = cnt


@ti.kernel
def _eik_grad(normal: F2, positions: F2, n: ti.i32, radius: ti.f32, scale: ti.f32, accumulate: ti.i32,
              grad: F2):
    ti.loop_config(block_dim=1024)
    for i in range(n):
        g = ti.Vector([0.0, 0.0, 0.0])
        if _inside(positions, i, radius):
            nn = _norm(normal, i)
            if nn > 0.0:
                k = scale * 2.0 * (nn - 1.0) / nn
                g = k * ti.Vector([normal[i, 0], normal[i, 1], normal[i, 2]])
        for q in ti.static(range(3)):
            if accumulate != 0:
                grad[i, q] += g[q]
            else:
                grad[i, q] = g[q]


def eikonal(normal, positions, n_samples: int, *, weight: float = 0.1, radius: float = 1.05, grad_out=None,
            accumulate: bool = False):
    """Eikonal loss ``weight · mean_{i inside} (‖n_i‖ − 1)²`` over the first ``n_samples`` samples
    whose position lies strictly inside the sphere of ``radius`` (unit-sphere coordinates).

    normal (S_cap, 3) float32 raw SDF gradient, positions (S_cap, 3) float32.
    Returns ``(loss, grad)``, grad (S_cap, 3) float32 = ∂loss/∂normal (entries ≥ n_samples
    untouched; 0 for samples outside the sphere or with a zero normal).
    """
    cap = normal.shape[0]
    n = int(n_samples)
    if tuple(positions.shape) != (cap, 3) or tuple(normal.shape) != (cap, 3) or not 0 <= n <= cap:
        raise UserInputError(f"eikonal: normal {tuple(normal.shape)} and positions {tuple(positions.shape)} "
                             f"must be (S, 3) with n_samples={n} <= S.")
    part = _scratch("eik_part", _n_chunks(cap), 2)
    _eik_partials(normal, positions, n, radius, CHUNK, part)
    total, count = _reduce(part)
    grad = grad_out if grad_out is not None else buffers.f32(cap, 3)
    scale = weight / count if count > 0 else 0.0
    if n > 0:
        _eik_grad(normal, positions, n, radius, scale, int(accumulate), grad)
    return total * scale, grad



# ------------------------------------------------------------------------------------------ curvature
@ti.kernel
def _curv_partials(lap: F1, positions: F2, n: ti.i32, radius: ti.f32, chunk: ti.i32, part: F2):
    for c in range(part.shape[0]):
        acc = 0.0
        cnt = 0.0
        for k in range(chunk):
            i = c * chunk + k
            if i < n and _inside(positions, i, radius):
                acc += ti.abs(lap[i])
                cnt += 1.0
        part[c, 0] = acc
        part[c, 1] = cnt


@ti.kernel
def _curv_grad(lap: F1, positions: F2, n: ti.i32, radius: ti.f32, scale: ti.f32, grad: F1):
    ti.loop_config(block_dim=1024)
    for i in range(n):
        g = 0.0
        if _inside(positions, i, radius):
            if lap[i] > 0.0:
                g = scale
            elif lap[i] < 0.0:
                g = -scale
        grad[i] = g


def curvature(laplacian, positions, n_samples: int, *, weight: float, radius: float = 1.05, grad_out=None):
    """Curvature loss ``weight · mean_{i inside} |Δf_i|`` (Neuralangelo, Li et al. CVPR 2023, eq. 9) over the
    first ``n_samples`` samples inside the sphere of ``radius``; Δf the field's finite-difference Laplacian
    (:meth:`SDFField.forward` with ``laplacian=True``), (S_cap,) float32. Returns ``(loss, grad)``, grad
    (S_cap,) float32 = ∂loss/∂Δf (subgradient 0 at Δf = 0; entries ≥ n_samples untouched)."""
    cap = laplacian.shape[0]
    n = int(n_samples)
    if tuple(positions.shape) != (cap, 3) or not 0 <= n <= cap:
        raise UserInputError(f"curvature: laplacian {tuple(laplacian.shape)} and positions {tuple(positions.shape)} "
                             f"must be (S,) and (S, 3) with n_samples={n} <= S.")
    part = _scratch("curv_part", _n_chunks(cap), 2)
    _curv_partials(laplacian, positions, n, radius, CHUNK, part)
    total, count = _reduce(part)
    grad = grad_out if grad_out is not None else buffers.f32(cap)
    scale = weight / count if count > 0 else 0.0
    if n > 0:
        _curv_grad(laplacian, positions, n, radius, scale, grad)
    return total * scale, grad


# ------------------------------------------------------------------------------- sparse points
@ti.kernel
def _sparse_partials(sdf: F1, w: F1, n: ti.i32, chunk: ti.i32, part: F2):
    for c in range(part.shape[0]):
        acc = 0.0
        wsum = 0.0
        for k in range(chunk):
            i = c * chunk + k
            if i < n:
                acc += w[i] * ti.abs(sdf[i])
                wsum += w[i]
        part[c, 0] = acc
        part[c, 1] = wsum


@ti.kernel
def _sparse_grad(sdf: F1, w: F1, n: ti.i32, scale: ti.f32, accumulate: ti.i32, grad: F1):
    for i in range(n):
        g = 0.0
        if sdf[i] > 0.0:
            g = scale * w[i]
        elif sdf[i] < 0.0:
            g = -scale * w[i]
        if accumulate != 0:
            grad[i] += g
        else:
            grad[i] = g


def sparse_sdf(sdf, point_weights, n_points: int, *, weight: float = 0.1, grad_out=None, accumulate: bool = False):
    """Sparse-point SDF loss ``weight · Σ_{i<n} w_i |f_i| / Σ_{i<n} w_i`` (Geo-NeuS eq. 7: the SDF at
    structure-from-motion points pulled to zero; 0 when the weights sum to 0).

    sdf (N_cap,) float32 SDF at the points (unit-sphere units), point_weights (N_cap,) float32 >= 0;
    only the first ``n_points`` entries count. Returns ``(loss, grad)``, grad (N_cap,) float32 =
    ∂loss/∂sdf (entries >= n_points untouched; 0 where f = 0).
    """
    cap = sdf.shape[0]
    n = int(n_points)
    if tuple(point_weights.shape) != (cap,) or not 0 <= n <= cap:
        raise UserInputError(f"sparse_sdf: sdf {tuple(sdf.shape)} and weights {tuple(point_weights.shape)} must "
                             f"be (N,) with n_points={n} <= N.")
    part = _scratch("sparse_part", _n_chunks(cap), 2)
    _sparse_partials(sdf, point_weights, n, CHUNK, part)
    total, wsum = _reduce(part)
    grad = grad_out if grad_out is not None else buffers.f32(cap)
    scale = weight / wsum if wsum > 0 else 0.0
    if n > 0:
        _sparse_grad(sdf, point_weights, n, scale, int(accumulate), grad)
    return total * scale, grad


# ------------------------------------------------------------------------------------------ depth
@ti.kernel
def _depth_partials(depth: F1, target: F1, chunk: ti.i32, part: F2):
    n = depth.shape[0]
    for c in range(part.shape[0]):
        acc = 0.0
        cnt = 0.0
        for k in range(chunk):
            i = c * chunk + k
            if i < n:
                if target[i] > 0.0:
                    acc += ti.abs(depth[i] - target[i])
                    cnt += 1.0
        part[c, 0] = acc
        part[c, 1] = cnt


@ti.kernel
def _depth_grad(depth: F1, target: F1, scale: ti.f32, accumulate: ti.i32, grad: F1):
    for i in range(depth.shape[0]):
        g = 0.0
        if target[i] > 0.0:
            e = depth[i] - target[i]
            if e > 0.0:
                g = scale
            elif e < 0.0:
                g = -scale
        if accumulate != 0:
            grad[i] += g
        else:
            grad[i] = g


def depth_l1(depth, target, *, weight: float = 0.1, grad_out=None, accumulate: bool = False):
    """Depth loss ``weight · Σ_{r: target_r > 0} |depth_r − target_r| / n_known`` (0 without known targets).

    depth (R,) float32 rendered depth Σ w·t (distance along the unit ray, unit-sphere units), target (R,)
    float32 in the same units, 0 (or negative) where unknown. Returns ``(loss, grad)``, grad (R,) float32
    = ∂loss/∂depth (0 on unknown rays).
    """
    n = depth.shape[0]
    if tuple(target.shape) != (n,):
        raise UserInputError(f"depth_l1: target has shape {tuple(target.shape)}, expected ({n},).")
    part = _scratch("depth_part", _n_chunks(n), 2)
    _depth_partials(depth, target, CHUNK, part)
    total, count = _reduce(part)
    grad = grad_out if grad_out is not None else buffers.f32(n)
    scale = weight / count if count > 0 else 0.0
    _depth_grad(depth, target, scale, int(accumulate), grad)
    return total * scale, grad
