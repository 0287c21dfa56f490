"""Background model for scenes trained without masks (NeRF++, Zhang et al. 2020; mip-NeRF 360,
Barron et al. CVPR 2022).

Everything a ray sees beyond the unit sphere is explained by a small NeRF of its own, so the
SDF inside the sphere is not pulled towards the walls and table of the photographs:

- ``n_samples`` samples per ray from the unit sphere's exit to infinity, evenly spaced in
  disparity (1/t), the last at infinity;
- positions contracted as in mip-NeRF 360: c(x) = x for |x| ≤ 1, (2 − 1/|x|)·x/|x| outside, so
  all of space fits in the ball of radius 2 that a hash grid with ``bound = 2`` covers;
- density σ = softplus(raw) from hash encoding → MLP, colour from MLP(SH₄(dir), feature);
- volume rendering α_k = 1 − exp(−σ_k·δ_k) with δ_k measured in contracted space, and α = 1 for
  the last sample (nothing is behind infinity), so the background is opaque;
- the per-ray background colour B enters the foreground as C = C_fg + (1 − O_fg)·B.

Forward and backward are Taichi kernels (no autodiff), tested against torch in float64.
"""

from dataclasses import dataclass, field

import numpy as np
import taichi as ti

from taichi_neus import buffers
from taichi_neus.field.hash_grid import HashGrid, HashGridConfig
from taichi_neus.field.mlp import Linear, kaiming_uniform, set_weight
from taichi_neus.field.params import ParamLayout
from taichi_neus.field.sh import SH_DIM, sh16, sh16_vjp

ROWS16 = buffers.ROWS16
get, put = buffers.get, buffers.put


def _bg_grid() -> HashGridConfig:
    return HashGridConfig(n_levels=8, n_features=2, log2_table=17, base_resolution=16, per_level_scale=1.5,
                          bound=2.0)


@dataclass
class BackgroundConfig:
    mode: str = "auto"  # "auto": on when training without masks; "on"; "off"
    n_samples: int = 32  # samples per ray from the unit sphere's exit to infinity
    grid: HashGridConfig = field(default_factory=_bg_grid)  # the background's hash grid (bound 2: contracted space)
    hidden: int = 64  # width of the background MLPs
    feature_dim: int = 15  # feature passed from the density MLP to the colour MLP
    far_disparity_ratio: float = 1e-3  # the second-to-last sample sits at 1000× the sphere exit distance


@ti.func
def _contract(p):
    r = p.norm()
    out = p
    if r > 1.0:
        out = (2.0 - 1.0 / r) * p / r
    return out


@ti.func
def _contract_vjp(p, g):
    """Jᵀg of the contraction at p (J is symmetric): J = I inside the unit ball; outside, with
    c = (2/r − 1/r²)·p, J = (2/r − 1/r²)·I + (2/r⁴ − 2/r³)·p pᵀ."""
    r = p.norm()
    out = g
    if r > 1.0:
        out = (2.0 / r - 1.0 / (r * r)) * g + (2.0 / (r * r * r * r) - 2.0 / (r * r * r)) * p.dot(g) * p
    return out


@ti.func
def _jitter(r, jitter, seed):
    """The offset u ∈ [0, 1) of ray r's samples within their disparity bins (0.5 without jitter)."""
    u = 0.5
    if jitter != 0:
        h = (ti.u32(r) * ti.u32(747796405) + seed * ti.u32(2891336453) + ti.u32(1))
        h = ((h >> ((h >> ti.u32(28)) + ti.u32(4))) ^ h) * ti.u32(277803737)
        h = (h >> ti.u32(22)) ^ h
        u = ti.cast(h >> ti.u32(8), ti.f32) * (1.0 / 16777216.0)
    return u


@ti.func
def _distance_factor(k, u, ns, far_ratio):
    """a_k with sample k < ns−1 at distance start·a_k: disparity from 1/start down to far_ratio/start."""
    f = (k + u) / (ns - 1)
    return 1.0 / ((1.0 - f) + f * far_ratio)


@ti.kernel
def _bg_sample(origins: ti.types.ndarray(dtype=ti.f32, ndim=2), dirs: ti.types.ndarray(dtype=ti.f32, ndim=2),
               t0: ti.types.ndarray(dtype=ti.f32, ndim=1), ns: ti.i32, far_ratio: ti.f32, jitter: ti.i32,
               seed: ti.u32, X: ROWS16, delta: ti.types.ndarray(dtype=ti.f32, ndim=1), Xc: ROWS16):
    """Sample positions (contracted, in X[:, 0:3]), contracted spacing δ, and SH(dir) into Xc[:, 0:16]."""
    for r in range(t0.shape[0]):
        o = ti.Vector([origins[r, 0], origins[r, 1], origins[r, 2]])
        d = ti.Vector([dirs[r, 0], dirs[r, 1], dirs[r, 2]])
        start = ti.max(t0[r], 1e-4)
        u = _jitter(r, jitter, seed)
        sh = sh16(d[0], d[1], d[2])
        prev = ti.Vector([0.0, 0.0, 0.0])
        for k in range(ns):
            # disparity from 1/start down to far_ratio/start over the first ns-1 samples; the last is at ∞
            c = ti.Vector([0.0, 0.0, 0.0])
            if k < ns - 1:
                c = _contract(o + d * (start * _distance_factor(k, u, ns, far_ratio)))
            else:
                c = 2.0 * d  # the contraction of the point at infinity along d
            row = r * ns + k
            for a in ti.static(range(3)):
                put(X, row, a, c[a])
            for i in ti.static(range(SH_DIM)):
                put(Xc, row, i, sh[i])
            if k > 0:
                delta[row - 1] = (c - prev).norm()
            prev = c
        delta[r * ns + ns - 1] = 0.0


@ti.func
def _softplus(x):
    return x if x > 20.0 else ti.log(1.0 + ti.exp(x))


@ti.kernel
def _bg_composite(raw: ROWS16, rgb: ROWS16,
                  delta: ti.types.ndarray(dtype=ti.f32, ndim=1), ns: ti.i32,
                  trans: ti.types.ndarray(dtype=ti.f32, ndim=1), alpha: ti.types.ndarray(dtype=ti.f32, ndim=1),
                  out: ti.types.ndarray(dtype=ti.f32, ndim=2)):
    """NeRF volume rendering of each ray's ns samples; saves T_k and α_k for the backward scan."""
    for r in range(out.shape[0]):
        T = 1.0
        acc = ti.Vector([0.0, 0.0, 0.0])
        for k in range(ns):
            i = r * ns + k
            a = 1.0
            if k < ns - 1:
                a = 1.0 - ti.exp(-_softplus(get(raw, i, 0)) * delta[i])
            trans[i] = T
            alpha[i] = a
            w = T * a
            for c in ti.static(range(3)):
                acc[c] += w * get(rgb, i, c)
            T = T * (1.0 - a)
        for c in ti.static(range(3)):
            out[r, c] = acc[c]


@ti.kernel
def _bg_composite_backward(raw: ROWS16, rgb: ROWS16,
                           delta: ti.types.ndarray(dtype=ti.f32, ndim=1), ns: ti.i32,
                           trans: ti.types.ndarray(dtype=ti.f32, ndim=1),
                           alpha: ti.types.ndarray(dtype=ti.f32, ndim=1),
                           g_out: ti.types.ndarray(dtype=ti.f32, ndim=2),
                           g_raw: ROWS16, feat: ti.i32, g_rgb: ROWS16,
                           g_delta: ti.types.ndarray(dtype=ti.f32, ndim=1)):
    """Reverse scan. With w_k = T_k α_k, α_k = 1 − e^{−σ_k δ_k}:
    ∂L/∂c_k = w_k g;  ∂L/∂σ_k = δ_k (T_{k+1} g·c_k − Σ_{j>k} w_j g·c_j);  σ = softplus(raw);
    ∂L/∂δ_k = σ_k (T_{k+1} g·c_k − Σ_{j>k} w_j g·c_j) into ``g_delta`` (what the ray gradients need)."""
    for r in range(g_out.shape[0]):
        g = ti.Vector([g_out[r, 0], g_out[r, 1], g_out[r, 2]])
        behind = 0.0  # Σ_{j>k} w_j g·c_j
        for kk in range(ns):
            k = ns - 1 - kk
            i = r * ns + k
            a = alpha[i]
            T = trans[i]
            w = T * a
            gc = 0.0
            for c in ti.static(range(3)):
                put(g_rgb, i, c, w * g[c])
                gc += g[c] * get(rgb, i, c)
            gs = 0.0
            gd = 0.0
            if k < ns - 1:
                inner = T * (1.0 - a) * gc - behind
                gs = delta[i] * inner / (1.0 + ti.exp(-get(raw, i, 0)))  # softplus'
                gd = _softplus(get(raw, i, 0)) * inner
            put(g_raw, i, 0, gs)
            g_delta[i] = gd
            for f in range(feat):
                put(g_raw, i, 1 + f, 0.0)
            behind += w * gc


@ti.kernel
def _bg_ray_backward(origins: ti.types.ndarray(dtype=ti.f32, ndim=2), dirs: ti.types.ndarray(dtype=ti.f32, ndim=2),
                     t0: ti.types.ndarray(dtype=ti.f32, ndim=1), ns: ti.i32, far_ratio: ti.f32, jitter: ti.i32,
                     seed: ti.u32, X: ROWS16, delta: ti.types.ndarray(dtype=ti.f32, ndim=1),
                     dP: ti.types.ndarray(dtype=ti.f32, ndim=2), g_delta: ti.types.ndarray(dtype=ti.f32, ndim=1),
                     g_Xc: ROWS16, g_o: ti.types.ndarray(dtype=ti.f32, ndim=2),
                     g_d: ti.types.ndarray(dtype=ti.f32, ndim=2), g_t0: ti.types.ndarray(dtype=ti.f32, ndim=1)):
    """dL/d(origin), dL/d(direction) (R, 3) and dL/d(t0) (R,) of each ray (overwritten), from the samples'
    contracted-position gradients ``dP`` (hash encoding), the spacings' ``g_delta`` (δ_k = |c_{k+1} − c_k|)
    and the SH inputs' ``g_Xc[:, 0:16]``. Sample k < ns−1 sits at c_k = contract(o + d·t0·a_k) (t0 clamped
    at 1e-4, where its gradient is zero); the last at 2d, the contraction of infinity along d."""
    for r in range(t0.shape[0]):
        o = ti.Vector([origins[r, 0], origins[r, 1], origins[r, 2]])
        d = ti.Vector([dirs[r, 0], dirs[r, 1], dirs[r, 2]])
        start = ti.max(t0[r], 1e-4)
        u = _jitter(r, jitter, seed)
        go = ti.Vector([0.0, 0.0, 0.0])
        gd = ti.Vector([0.0, 0.0, 0.0])
        gt = 0.0
        for k in range(ns):
            row = r * ns + k
            c = ti.Vector([get(X, row, 0), get(X, row, 1), get(X, row, 2)])
            gc = ti.Vector([dP[row, 0], dP[row, 1], dP[row, 2]])
            if k < ns - 1:  # δ_k = |c_{k+1} − c_k|
                if delta[row] > 0.0:
                    nxt = ti.Vector([get(X, row + 1, 0), get(X, row + 1, 1), get(X, row + 1, 2)])
                    # not `-=`: augmented subtraction of a vector trips Taichi's LLVM codegen with SIMD vectors on
                    gc = gc - g_delta[row] * (nxt - c) / delta[row]
            if k > 0:  # δ_{k−1} = |c_k − c_{k−1}|
                if delta[row - 1] > 0.0:
                    prv = ti.Vector([get(X, row - 1, 0), get(X, row - 1, 1), get(X, row - 1, 2)])
                    gc += g_delta[row - 1] * (c - prv) / delta[row - 1]
            # per sample, not summed over the ray first: a loop-carried 16-float vector trips Taichi's
            # LLVM codegen with the CPU's SIMD vectors on
            gsh = ti.Vector([get(g_Xc, row, i) for i in ti.static(range(SH_DIM))])
            gd += sh16_vjp(d[0], d[1], d[2], gsh)
            if k < ns - 1:
                a = _distance_factor(k, u, ns, far_ratio)
                gp = _contract_vjp(o + d * (start * a), gc)
                go += gp
                gd += (start * a) * gp
                if t0[r] > 1e-4:
                    gt += a * d.dot(gp)
            else:
                gd += 2.0 * gc
        for a in ti.static(range(3)):
            g_o[r, a] = go[a]
            g_d[r, a] = gd[a]
        g_t0[r] = gt


@ti.kernel
def _blend(fg: ti.types.ndarray(dtype=ti.f32, ndim=2), opacity: ti.types.ndarray(dtype=ti.f32, ndim=1),
           bg: ti.types.ndarray(dtype=ti.f32, ndim=2), out: ti.types.ndarray(dtype=ti.f32, ndim=2)):
    for r in range(out.shape[0]):
        for c in ti.static(range(3)):
            out[r, c] = fg[r, c] + (1.0 - opacity[r]) * bg[r, c]


@ti.kernel
def _blend_backward(g_out: ti.types.ndarray(dtype=ti.f32, ndim=2), opacity: ti.types.ndarray(dtype=ti.f32, ndim=1),
                    bg: ti.types.ndarray(dtype=ti.f32, ndim=2), g_opacity: ti.types.ndarray(dtype=ti.f32, ndim=1),
                    accumulate: ti.i32, g_bg: ti.types.ndarray(dtype=ti.f32, ndim=2)):
    """C = C_fg + (1 − O)·B: ∂L/∂C_fg = g (the caller reuses g), ∂L/∂O = −g·B, ∂L/∂B = (1 − O)·g."""
    for r in range(g_out.shape[0]):
        go = 0.0
        for c in ti.static(range(3)):
            go -= g_out[r, c] * bg[r, c]
            g_bg[r, c] = (1.0 - opacity[r]) * g_out[r, c]
        if accumulate != 0:
            g_opacity[r] += go
        else:
            g_opacity[r] = go


@ti.kernel
def _copy_cols(src: ROWS16, c0: ti.i32, n_cols: ti.i32, dst: ROWS16, d0: ti.i32, n: ti.i32):
    for m, c in ti.ndrange(n, n_cols):
        put(dst, m, d0 + c, get(src, m, c0 + c))


class Background:
    """The background NeRF: parameters in slices of the model's flat buffer (group ``background``)."""

    def __init__(self, cfg: BackgroundConfig, layout: ParamLayout):
        self.cfg = cfg
        self.encoding = HashGrid(cfg.grid, layout, name="background")
        self.x_cols = 3 + cfg.grid.out_dim
        self.density = [Linear(layout, "bg.density.0", cfg.grid.out_dim, cfg.hidden, act="relu", group="background"),
                        Linear(layout, "bg.density.1", cfg.hidden, 1 + cfg.feature_dim, group="background")]
        self.c_cols = SH_DIM + cfg.feature_dim
        self.color = [Linear(layout, "bg.color.0", self.c_cols, cfg.hidden, act="relu", group="background"),
                      Linear(layout, "bg.color.1", cfg.hidden, 3, act="sigmoid", group="background")]
        self._bufs: dict = {}
        self.forward_count = 0  # which forward's activations the buffers hold (the torch adapter checks it)

    def init_params(self, params, seed: int = 0) -> None:
        self.encoding.init_params(params, seed + 101)
        host = buffers.to_numpy(params).copy()
        rng = np.random.default_rng(seed + 101)
        for lin in self.density + self.color:
            set_weight(host, lin, kaiming_uniform(rng, lin.n_out, lin.n_in))
            host[lin.b.offset:lin.b.offset + lin.b.size] = 0.0
        buffers.from_numpy(params, host)

    def _buf(self, name, *shape):
        b = self._bufs.get(name)
        if b is None or tuple(b.shape) != shape:
            b = buffers.f32(*shape)
            self._bufs[name] = b
        return b

    def _rows(self, name, rows, cols):
        """A :func:`buffers.rows16` activation buffer of ``rows`` × ``cols``."""
        b = self._bufs.get(name)
        if b is None or tuple(b.shape) != (rows, buffers.blocks(cols)):
            b = buffers.rows16(rows, cols)
            self._bufs[name] = b
        return b

    def forward(self, origins, dirs, t0, params, seed: int = 0, perturb: bool = False):
        """Background colour (R,3) of rays starting at distance ``t0`` (R,) (the unit sphere's exit)."""
        R, ns = t0.shape[0], self.cfg.n_samples
        M = R * ns
        X = self._rows("X", M, self.x_cols)
        Xc = self._rows("Xc", M, self.c_cols)
        delta = self._buf("delta", M)
        _bg_sample(origins, dirs, t0, ns, self.cfg.far_disparity_ratio, int(perturb), seed & 0x7FFFFFFF, X, delta,
                   Xc)
        self.encoding.forward(X, M, 3, params)
        h0 = self._rows("h0", M, self.cfg.hidden)
        raw = self._rows("raw", M, 1 + self.cfg.feature_dim)
        self.density[0].forward(X, 3, h0, M, params)
        self.density[1].forward(h0, 0, raw, M, params)
        _copy_cols(raw, 1, self.cfg.feature_dim, Xc, SH_DIM, M)
        c0 = self._rows("c0", M, self.cfg.hidden)
        rgb = self._rows("rgb", M, 3)
        self.color[0].forward(Xc, 0, c0, M, params)
        self.color[1].forward(c0, 0, rgb, M, params)
        trans, alpha = self._buf("trans", M), self._buf("alpha", M)
        out = self._buf("out", R, 3)
        _bg_composite(raw, rgb, delta, ns, trans, alpha, out)
        self._saved = (R, M)
        self._rays = (origins, dirs, t0, int(perturb), seed & 0x7FFFFFFF)
        self.forward_count += 1
        return out

    def backward(self, g_out, params, grads, g_origins=None, g_dirs=None, g_t0=None) -> None:
        """Add dL/dθ of the background into ``grads`` (``None``: skip them) given dL/d(background colour)
        (R,3) of the last :meth:`forward`.

        With ``g_origins``, ``g_dirs`` (R,3) and ``g_t0`` (R,) (all three, overwritten), also the gradient
        with respect to that forward's rays: through the sample positions (hash encoding, contraction,
        distances t0·a_k), the contracted spacings δ and the SH of the direction. ``t0`` (the unit sphere's
        exit) is an input of its own; a caller whose t0 depends on the ray chains ``g_t0`` through it.
        """
        R, M = self._saved
        ns, feat = self.cfg.n_samples, self.cfg.feature_dim
        rays = g_origins is not None
        if rays and (g_dirs is None or g_t0 is None):
            raise ValueError("the ray gradients need g_origins, g_dirs and g_t0 together")
        b = self._bufs
        g_raw = self._rows("g_raw", M, 1 + feat)
        g_rgb = self._rows("g_rgb", M, 3)
        g_delta = self._buf("g_delta", M)
        _bg_composite_backward(b["raw"], b["rgb"], b["delta"], ns, b["trans"], b["alpha"], g_out, g_raw, feat, g_rgb,
                               g_delta)
        g_c0 = self._rows("g_c0", M, self.cfg.hidden)
        g_Xc = self._rows("g_Xc", M, self.c_cols)
        self.color[1].backward(b["c0"], 0, b["rgb"], g_rgb, M, params, grads, dX=g_c0, dx_act=self.color[0])
        # the SH inputs' gradient only when the direction needs it
        self.color[0].backward(b["Xc"], 0, b["c0"], g_c0, M, params, grads, dX=g_Xc,
                               dx_range=(0 if rays else SH_DIM, self.c_cols), dy_preact=True)
        _copy_cols(g_Xc, SH_DIM, feat, g_raw, 1, M)  # the feature's gradient joins the density head's
        g_h0 = self._rows("g_h0", M, self.cfg.hidden)
        g_X = self._rows("g_X", M, self.x_cols)
        self.density[1].backward(b["h0"], 0, b["raw"], g_raw, M, params, grads, dX=g_h0, dx_act=self.density[0])
        self.density[0].backward(b["X"], 3, b["h0"], g_h0, M, params, grads, dX=g_X, dxcol=3, dy_preact=True)
        if grads is not None:
            self.encoding.backward(b["X"], g_X, M, 3, grads)
        if rays:
            dP = self._buf("dP", M, 3)
            self.encoding.backward_points(b["X"], g_X, M, 3, params, dP)
            origins, dirs, t0, jitter, seed = self._rays
            _bg_ray_backward(origins, dirs, t0, ns, self.cfg.far_disparity_ratio, jitter, seed, b["X"], b["delta"],
                             dP, g_delta, g_Xc, g_origins, g_dirs, g_t0)


def blend(fg, opacity, bg, out) -> None:
    """out (R,3) = fg + (1 − opacity)·bg."""
    _blend(fg, opacity, bg, out)


def blend_backward(g_out, opacity, bg, g_opacity, g_bg, accumulate: bool = False) -> None:
    """Gradients of :func:`blend`: into g_opacity (R,) (added if ``accumulate``) and g_bg (R,3)."""
    _blend_backward(g_out, opacity, bg, g_opacity, int(accumulate), g_bg)
