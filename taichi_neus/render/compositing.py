"""NeuS volume compositing over packed samples, forward and hand-written backward.

Maths (Wang et al. 2021, "NeuS", eq. 13 and the released code's annealed cosine; DESIGN §4):

* ``s = clamp(exp(10·v), 1e-6, 1e6)`` — the inverse standard deviation of the logistic
  density; ``v`` is the learnable variance parameter.
* per sample ``i`` with signed distance ``f``, raw SDF gradient ``n`` (not normalised),
  ray direction ``d`` (unit) and interval length ``δ``::

      cosθ  = d·n
      c     = −( relu(½ − ½cosθ)·(1 − r) + relu(−cosθ)·r )       (r = cos_anneal_ratio, 0 → 1)
      f_prev = f − c·δ/2,   f_next = f + c·δ/2
      α     = clamp((Φ(s·f_prev) − Φ(s·f_next)) / Φ(s·f_prev), 0, 1),   Φ = sigmoid

  evaluated as ``α = −expm1(logΦ(s·f_next) − logΦ(s·f_prev))`` so that neither an underflowing
  ``Φ(s·f_prev)`` inside the surface nor a tiny α far outside loses precision.
* ``T_i = Π_{j<i}(1 − α_j)``, ``w_i = T_i·α_i``;
  colour ``= Σ w_i·rgb_i + (1 − Σ w_i)·background``, opacity ``= Σ w_i``, depth ``= Σ w_i·t_i``.
  Opacity and the background share are computed as ``1 − T_end`` and ``T_end`` (equal to
  ``Σ w_i`` and ``1 − Σ w_i`` in exact arithmetic) so opacity never exceeds 1 by rounding.

Backward (no Taichi autodiff, DESIGN §3): with ``e_i = ∂L/∂w_i = g_C·(rgb_i − bg) + g_O + g_D·t_i``
the gradient of the loss with respect to ``α_i`` is ``T_i·(e_i − S_i)`` where
``S_i = Σ_{k>i} e_k·α_k·Π_{i<j<k}(1 − α_j)`` obeys ``S_{i−1} = e_i·α_i + (1 − α_i)·S_i``: one reverse
scan per ray over the saved α and T, with no division by ``1 − α``. The clamp of α passes the
gradient only where the unclamped value lies in [0, 1] (as ``torch.clamp``); the relu's in the
annealed cosine pass it only where their argument is positive. ``∂L/∂v`` is summed per ray first,
then over rays in a second (serial, deterministic) kernel: no per-sample atomics into one scalar.

All arrays are ``ti.ndarray`` float32 / int32 on the current backend. Samples are packed: ray
``r`` owns samples ``ray_offsets[r] .. ray_offsets[r] + ray_counts[r] − 1``. Entries of per-sample
buffers that no ray owns are neither read nor written.
"""

from dataclasses import dataclass

import taichi as ti

from taichi_neus import buffers
from taichi_neus.errors import UserInputError

F1 = ti.types.ndarray(dtype=ti.f32, ndim=1)
F2 = ti.types.ndarray(dtype=ti.f32, ndim=2)
I1 = ti.types.ndarray(dtype=ti.i32, ndim=1)
vec3 = ti.types.vector(3, ti.f32)

S_MIN = 1e-6
S_MAX = 1e6


# ----------------------------------------------------------------------------------------------
# Scalar helpers shared with sampling.py and occupancy.py
# ----------------------------------------------------------------------------------------------
@ti.func
def log1p(y):
    """log(1 + y) accurate for small y (Kahan's trick), y >= 0."""
    u = 1.0 + y
    res = y
    if u != 1.0:
        res = ti.log(u) * y / (u - 1.0)
    return res


@ti.func
def expm1(x):
    """exp(x) − 1 accurate for small |x| (Kahan's trick), x <= 0 here."""
    u = ti.exp(x)
    res = x
    if u != 1.0:
        um1 = u - 1.0
        if um1 == -1.0:
            res = -1.0
        else:
            res = um1 * x / ti.log(u)
    return res


@ti.func
def log_sigmoid(x):
    """log Φ(x) = min(x, 0) − log1p(exp(−|x|)), finite for every finite x."""
    return ti.min(x, 0.0) - log1p(ti.exp(-ti.abs(x)))


@ti.func
def sigmoid(x):
    return 1.0 / (1.0 + ti.exp(-x))


@ti.func
def annealed_cos(cos_theta, r):
    """NeuS's annealed cosine c(cosθ, r) (≤ 0), see the module docstring."""
    return -(ti.max(0.5 - 0.5 * cos_theta, 0.0) * (1.0 - r) + ti.max(-cos_theta, 0.0) * r)


@ti.func
def d_annealed_cos(cos_theta, r):
    """∂c/∂cosθ; the relu derivative is taken as 0 at 0 (as torch does)."""
    g = 0.0
    if 0.5 - 0.5 * cos_theta > 0.0:
        g += 0.5 * (1.0 - r)
    if -cos_theta > 0.0:
        g += r
    return g


@ti.func
def neus_alpha_raw(f, c, delta, s):
    """Unclamped NeuS α for sdf ``f``, annealed cosine ``c``, interval ``delta`` and sharpness ``s``."""
    a_p = s * (f - c * delta * 0.5)
    a_n = s * (f + c * delta * 0.5)
    return -expm1(log_sigmoid(a_n) - log_sigmoid(a_p))


@ti.func
def neus_alpha(f, c, delta, s):
    """NeuS α clamped to [0, 1]."""
    return ti.min(ti.max(neus_alpha_raw(f, c, delta, s), 0.0), 1.0)


@ti.func
def inv_s_from_variance(v):
    return ti.min(ti.max(ti.exp(10.0 * v), S_MIN), S_MAX)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@ti.func
def _v3(a: ti.template(), i):
    return ti.Vector([a[i, 0], a[i, 1], a[i, 2]])


@ti.kernel
def _forward(sdf: F1, normal: F2, rgb: F2, delta: F1, t: F1, dirs: F2, offsets: I1, counts: I1,
             variance: F1, r: ti.f32, bg: vec3,
             alpha: F1, trans: F1, weights: F1, colour: F2, opacity: F1, depth: F1):
    for ray in range(counts.shape[0]):
        s = inv_s_from_variance(variance[0])
        d = _v3(dirs, ray)
        start = offsets[ray]
        T = 1.0
        acc_c = ti.Vector([0.0, 0.0, 0.0])
        acc_d = 0.0
        for k in range(counts[ray]):
            i = start + k
            c = annealed_cos(d.dot(_v3(normal, i)), r)
            a = neus_alpha(sdf[i], c, delta[i], s)
            w = T * a
            alpha[i] = a
            trans[i] = T
            weights[i] = w
            acc_c += w * _v3(rgb, i)
            acc_d += w * t[i]
            T = T * (1.0 - a)
        col = acc_c + T * bg
        for q in ti.static(range(3)):
            colour[ray, q] = col[q]
        opacity[ray] = 1.0 - T
        depth[ray] = acc_d


@ti.kernel
def _backward(sdf: F1, normal: F2, rgb: F2, delta: F1, t: F1, dirs: F2, offsets: I1, counts: I1,
              variance: F1, r: ti.f32, bg: vec3, alpha: F1, trans: F1, weights: F1,
              g_colour: F2, g_opacity: F1, g_depth: F1,
              g_sdf: F1, g_normal: F2, g_rgb: F2, g_v_ray: F1):
    for ray in range(counts.shape[0]):
        v = variance[0]
        s_raw = ti.exp(10.0 * v)
        s = ti.min(ti.max(s_raw, S_MIN), S_MAX)
        ds_dv = 0.0
        if s_raw >= S_MIN and s_raw <= S_MAX:
            ds_dv = 10.0 * s
        d = _v3(dirs, ray)
        gc = _v3(g_colour, ray)
        base = g_opacity[ray] - gc.dot(bg)
        gd = g_depth[ray]
        start = offsets[ray]
        n = counts[ray]
        suffix = 0.0
        gv = 0.0
        for kk in range(n):
            i = start + n - 1 - kk
            a = alpha[i]
            e = gc.dot(_v3(rgb, i)) + base + gd * t[i]
            wi = weights[i]
            for q in ti.static(range(3)):
                g_rgb[i, q] = wi * gc[q]
            g_a = trans[i] * (e - suffix)
            suffix = e * a + (1.0 - a) * suffix
            # recompute the local derivatives of α
            nrm = _v3(normal, i)
            cos_theta = d.dot(nrm)
            c = annealed_cos(cos_theta, r)
            half = 0.5 * delta[i]
            f = sdf[i]
            f_p = f - c * half
            f_n = f + c * half
            a_p = s * f_p
            a_n = s * f_n
            dlog = log_sigmoid(a_n) - log_sigmoid(a_p)
            a_raw = -expm1(dlog)
            one_minus = ti.exp(dlog)
            if a_raw < 0.0 or a_raw > 1.0:
                g_a = 0.0
            sp = sigmoid(-a_p)
            sn = sigmoid(-a_n)
            da_df = s * one_minus * (sp - sn)
            da_dc = -s * half * one_minus * (sp + sn)
            da_ds = one_minus * (sp * f_p - sn * f_n)
            g_sdf[i] = g_a * da_df
            g_cos = g_a * da_dc * d_annealed_cos(cos_theta, r)
            for q in ti.static(range(3)):
                g_normal[i, q] = g_cos * d[q]
            gv += g_a * da_ds * ds_dv
        g_v_ray[ray] = gv


@ti.kernel
def _ray_input_grads(g_normal: F2, normal: F2, dirs: F2, weights: F1, g_depth: F1, offsets: I1, counts: I1,
                     g_dirs: F2, g_t: F1):
    """∂L/∂(ray direction) through cosθ = d·n, and ∂L/∂t through depth = Σ w·t (overwritten).

    ``_backward`` writes ∂L/∂n_i = (∂L/∂cosθ_i)·d, so ∂L/∂cosθ_i = (∂L/∂n_i)·d / |d|² and
    ∂L/∂d = Σ_i (∂L/∂cosθ_i)·n_i; α does not depend on t, so ∂L/∂t_i = g_depth·w_i. Run right after
    ``_backward``, before anything rescales ∂L/∂n."""
    for ray in range(counts.shape[0]):
        d = _v3(dirs, ray)
        dd = d.dot(d)
        inv = 0.0
        if dd > 0.0:
            inv = 1.0 / dd
        gd = g_depth[ray]
        acc = ti.Vector([0.0, 0.0, 0.0])
        start = offsets[ray]
        for k in range(counts[ray]):
            i = start + k
            acc += (_v3(g_normal, i).dot(d) * inv) * _v3(normal, i)
            g_t[i] = gd * weights[i]
        for q in ti.static(range(3)):
            g_dirs[ray, q] = acc[q]


@ti.kernel
def _sum_serial(x: F1, out: F1):
    """out[0] = Σ x (one thread, fixed order: deterministic)."""
    acc = 0.0
    ti.loop_config(serialize=True)
    for i in range(x.shape[0]):
        acc += x[i]
    out[0] = acc


# ----------------------------------------------------------------------------------------------
# Python API
# ----------------------------------------------------------------------------------------------
@dataclass
class CompositeOutput:
    """Per-ray results of :meth:`NeuSCompositor.forward` (owned by the compositor, reused).

    colour  (R, 3) float32, linear RGB in [0, 1] (background blended in)
    opacity (R,)   float32, Σ w ∈ [0, 1]
    depth   (R,)   float32, Σ w·t, distance along the unit ray direction (unit-sphere units)
    """

    colour: object
    opacity: object
    depth: object


@dataclass
class CompositeGrads:
    """Gradients from :meth:`NeuSCompositor.backward` (owned by the compositor, reused).

    sdf      (S_cap,)   float32, ∂L/∂sdf
    normal   (S_cap, 3) float32, ∂L/∂(raw SDF gradient)
    rgb      (S_cap, 3) float32, ∂L/∂rgb
    variance (1,)       float32, ∂L/∂v (stays on the device; ``float(variance.to_numpy()[0])``)
    dirs     (R, 3)     float32, ∂L/∂(ray direction), only with ``backward(..., ray_inputs=True)``
    t        (S_cap,)   float32, ∂L/∂t (through the depth), only with ``ray_inputs=True``
    Only the entries of samples owned by some ray are written.
    """

    sdf: object
    normal: object
    rgb: object
    variance: object
    dirs: object = None
    t: object = None


def _check_shape(name: str, a, shape: tuple) -> None:
    if tuple(a.shape) != tuple(shape):
        raise UserInputError(f"compositing: '{name}' has shape {tuple(a.shape)}, expected {tuple(shape)}; "
                             "pass the packed sample buffers produced by the sampler.")


class NeuSCompositor:
    """NeuS compositing with a saved forward state for the hand-written backward.

    Buffers (outputs, saved α/T/w, gradients) are allocated on first use and reused while the
    shapes stay the same, so a training loop allocates nothing per step. ``forward`` keeps
    references to its inputs; do not overwrite them before ``backward``.
    """

    def __init__(self):
        self._bufs: dict = {}
        self._saved = None

    def _buf(self, key, maker, *shape):
        b = self._bufs.get(key)
        if b is None or tuple(b.shape) != tuple(shape):
            b = maker(*shape)
            self._bufs[key] = b
        return b

    def _variance(self, variance):
        if isinstance(variance, (int, float)):
            v = self._buf("variance_in", buffers.f32, 1)
            buffers.fill_(v, float(variance))
            return v
        _check_shape("variance", variance, (1,))
        return variance

    def forward(self, sdf, normal, rgb, delta, t, dirs, ray_offsets, ray_counts, variance,
                cos_anneal_ratio: float = 1.0, background=(0.0, 0.0, 0.0)) -> CompositeOutput:
        """Composite packed samples into per-ray colour, opacity and depth.

        sdf (S_cap,), normal (S_cap, 3) raw SDF gradient, rgb (S_cap, 3), delta (S_cap,) interval
        length and t (S_cap,) sample distance, all float32 in unit-sphere units; dirs (R, 3) unit
        ray directions; ray_offsets, ray_counts (R,) int32; variance: python float or a (1,)
        float32 ndarray holding v (s = exp(10·v)); cos_anneal_ratio r ∈ [0, 1]; background (3,)
        RGB. Returns :class:`CompositeOutput`; α, T and w per sample are kept in
        ``self.alpha``, ``self.transmittance`` and ``self.weights`` (S_cap,).
        """
        s_cap = sdf.shape[0]
        n_rays = ray_counts.shape[0]
        for name, a, shape in (("normal", normal, (s_cap, 3)), ("rgb", rgb, (s_cap, 3)),
                               ("delta", delta, (s_cap,)), ("t", t, (s_cap,)), ("dirs", dirs, (n_rays, 3)),
                               ("ray_offsets", ray_offsets, (n_rays,))):
            _check_shape(name, a, shape)
        var = self._variance(variance)
        bg = ti.Vector([float(x) for x in background], dt=ti.f32)
        self.alpha = self._buf("alpha", buffers.f32, s_cap)
        self.transmittance = self._buf("trans", buffers.f32, s_cap)
        self.weights = self._buf("weights", buffers.f32, s_cap)
        out = CompositeOutput(self._buf("colour", buffers.f32, n_rays, 3),
                              self._buf("opacity", buffers.f32, n_rays),
                              self._buf("depth", buffers.f32, n_rays))
        _forward(sdf, normal, rgb, delta, t, dirs, ray_offsets, ray_counts, var, float(cos_anneal_ratio), bg,
                 self.alpha, self.transmittance, self.weights, out.colour, out.opacity, out.depth)
        self._saved = (sdf, normal, rgb, delta, t, dirs, ray_offsets, ray_counts, var,
                       float(cos_anneal_ratio), bg)
        return out

    def backward(self, grad_colour=None, grad_opacity=None, grad_depth=None,
                 ray_inputs: bool = False) -> CompositeGrads:
        """Gradients of the loss with respect to the per-sample inputs and the variance.

        grad_colour (R, 3), grad_opacity (R,), grad_depth (R,) float32: ∂L/∂ of the forward
        outputs; ``None`` means zero. ``ray_inputs`` also returns ∂L/∂dirs and ∂L/∂t (what pose
        gradients need; the interval lengths δ get none). Returns :class:`CompositeGrads`.
        """
        if self._saved is None:
            raise RuntimeError("NeuSCompositor.backward called before forward")
        sdf, normal, rgb, delta, t, dirs, offsets, counts, var, r, bg = self._saved
        s_cap = sdf.shape[0]
        n_rays = counts.shape[0]
        if grad_colour is None:
            grad_colour = self._buf("zero_r3", buffers.f32, n_rays, 3)
        if grad_opacity is None:
            grad_opacity = self._buf("zero_r", buffers.f32, n_rays)
        if grad_depth is None:
            grad_depth = self._buf("zero_r", buffers.f32, n_rays)
        _check_shape("grad_colour", grad_colour, (n_rays, 3))
        _check_shape("grad_opacity", grad_opacity, (n_rays,))
        _check_shape("grad_depth", grad_depth, (n_rays,))
        grads = CompositeGrads(self._buf("g_sdf", buffers.f32, s_cap),
                               self._buf("g_normal", buffers.f32, s_cap, 3),
                               self._buf("g_rgb", buffers.f32, s_cap, 3),
                               self._buf("g_variance", buffers.f32, 1))
        g_v_ray = self._buf("g_v_ray", buffers.f32, n_rays)
        _backward(sdf, normal, rgb, delta, t, dirs, offsets, counts, var, r, bg,
                  self.alpha, self.transmittance, self.weights, grad_colour, grad_opacity, grad_depth,
                  grads.sdf, grads.normal, grads.rgb, g_v_ray)
        _sum_serial(g_v_ray, grads.variance)
        if ray_inputs:
            grads.dirs = self._buf("g_dirs", buffers.f32, n_rays, 3)
            grads.t = self._buf("g_t", buffers.f32, s_cap)
            _ray_input_grads(grads.normal, normal, dirs, self.weights, grad_depth, offsets, counts,
                             grads.dirs, grads.t)
        return grads
