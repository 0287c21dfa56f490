"""Background NeRF for unmasked scenes: sampling, volume rendering, blend and all gradients against torch."""

import numpy as np
import pytest
import torch
from field_helpers import t64

from taichi_neus import buffers
from taichi_neus.data.rays import unit_sphere_near_far
from taichi_neus.field.hash_grid import HashGridConfig
from taichi_neus.field.params import ParamLayout
from taichi_neus.field.torch_reference import hash_encode, sh16
from taichi_neus.render.background import Background, BackgroundConfig, blend, blend_backward

pytestmark = pytest.mark.portable


def _rays(n, seed):
    rng = np.random.default_rng(seed)
    o = rng.normal(size=(n, 3))
    o = 3.0 * o / np.linalg.norm(o, axis=1, keepdims=True)
    target = rng.uniform(-0.6, 0.6, (n, 3))
    d = target - o
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    near, far, hit = unit_sphere_near_far(o.astype(np.float32), d.astype(np.float32))
    return o.astype(np.float32), d.astype(np.float32), far.astype(np.float32)


def _setup(seed=0):
    cfg = BackgroundConfig(n_samples=8, grid=HashGridConfig(n_levels=3, log2_table=9, base_resolution=4,
                                                             per_level_scale=2.0, bound=2.0, init_scale=0.3),
                           hidden=16, feature_dim=3)
    layout = ParamLayout()
    bg = Background(cfg, layout)
    params = layout.allocate()
    bg.init_params(params, seed)
    return bg, layout, params


def test_samples_are_contracted_and_ordered():
    bg, _, params = _setup()
    o, d, far = _rays(20, 1)
    bg.forward(buffers.upload(o), buffers.upload(d), buffers.upload(far), params)
    X = buffers.rows16_to_numpy(bg._bufs["X"], 3).reshape(20, 8, 3)
    r = np.linalg.norm(X, axis=2)
    assert (r[:, :-1] >= 1.0 - 1e-5).all() and (r <= 2.0 + 1e-5).all()
    assert (np.diff(r, axis=1) > 0).all()  # moving outwards, towards the contracted infinity at radius 2
    # exact positions: evenly spaced disparity from 1/far to 1e-3/far (bin centres), then infinity
    f = (np.arange(7) + 0.5) / 7
    disp = (1 - f)[None] / far[:, None] + f[None] * 1e-3 / far[:, None]
    x = o[:, None] + d[:, None] / disp[..., None]
    rx = np.linalg.norm(x, axis=2, keepdims=True)
    want = np.concatenate([(2 - 1 / rx) * x / rx, 2 * d[:, None]], 1)
    np.testing.assert_allclose(X, want, atol=2e-5)


def test_background_values_and_gradients_match_torch():
    bg, layout, params = _setup(seed=2)
    n = 24
    o, d, far = _rays(n, 3)
    out = bg.forward(buffers.upload(o), buffers.upload(d), buffers.upload(far), params).to_numpy()
    X = t64(buffers.rows16_to_numpy(bg._bufs["X"], 3))
    delta = t64(bg._bufs["delta"].to_numpy()).view(n, 8)
    theta = t64(buffers.to_numpy(params)).requires_grad_()
    w = lambda s: theta[s.offset:s.offset + s.size].view(*s.shape)  # noqa: E731

    def lin(x, L, act=None):
        y = x @ w(L.W) + w(L.b)
        return torch.relu(y) if act == "relu" else torch.sigmoid(y) if act == "sigmoid" else y

    e = bg.encoding
    enc = hash_encode(X, w(e.slice), e.res_np, e.loff_np, e.lsize_np, e.ldense_np, 2.0)
    raw = lin(lin(enc, bg.density[0], "relu"), bg.density[1])
    dirs = t64(np.repeat(d, 8, axis=0))
    rgb = lin(lin(torch.cat([sh16(dirs), raw[:, 1:]], 1), bg.color[0], "relu"), bg.color[1], "sigmoid")
    sigma = torch.nn.functional.softplus(raw[:, 0]).view(n, 8)
    alpha = 1 - torch.exp(-sigma * delta)
    alpha = torch.cat([alpha[:, :-1], torch.ones(n, 1, dtype=alpha.dtype)], 1)
    T = torch.cumprod(torch.cat([torch.ones(n, 1, dtype=alpha.dtype), 1 - alpha[:, :-1]], 1), 1)
    ref = ((T * alpha)[..., None] * rgb.view(n, 8, 3)).sum(1)
    assert np.abs(out - ref.detach().numpy()).max() < 1e-5
    g = np.random.default_rng(4).normal(size=(n, 3)).astype(np.float32)
    grads = layout.allocate()
    bg.backward(buffers.upload(g), params, grads)
    (ref * t64(g)).sum().backward()
    got, want = buffers.to_numpy(grads), theta.grad.numpy()
    for name, sl in layout.slices.items():
        a, b = got[sl.offset:sl.offset + sl.size], want[sl.offset:sl.offset + sl.size]
        assert np.abs(b).max() > 0, name
        assert np.abs(a - b).max() <= 2e-4 * np.abs(b).max(), name


def test_blend_and_its_gradient():
    rng = np.random.default_rng(5)
    fg, bgc = rng.uniform(size=(10, 3)).astype(np.float32), rng.uniform(size=(10, 3)).astype(np.float32)
    op = rng.uniform(size=10).astype(np.float32)
    out = buffers.f32(10, 3)
    blend(buffers.upload(fg), buffers.upload(op), buffers.upload(bgc), out)
    np.testing.assert_allclose(out.to_numpy(), fg + (1 - op[:, None]) * bgc, rtol=1e-6)
    g = rng.normal(size=(10, 3)).astype(np.float32)
    g_op, g_bg = buffers.upload(np.ones(10, np.float32)), buffers.f32(10, 3)
    blend_backward(buffers.upload(g), buffers.upload(op), buffers.upload(bgc), g_op, g_bg, accumulate=True)
    np.testing.assert_allclose(g_op.to_numpy(), 1 - (g * bgc).sum(1), rtol=1e-5)
    np.testing.assert_allclose(g_bg.to_numpy(), (1 - op[:, None]) * g, rtol=1e-6)


def _jitter_np(n, seed):
    """The kernel's per-ray bin offset u (its integer hash, in numpy uint32 arithmetic)."""
    with np.errstate(over="ignore"):
        r = np.arange(n, dtype=np.uint32)
        h = r * np.uint32(747796405) + np.uint32(seed) * np.uint32(2891336453) + np.uint32(1)
        h = ((h >> ((h >> np.uint32(28)) + np.uint32(4))) ^ h) * np.uint32(277803737)
        h = (h >> np.uint32(22)) ^ h
    return (h >> np.uint32(8)).astype(np.float64) / 16777216.0


@pytest.mark.parametrize("perturb", [False, True])
def test_background_ray_gradients_match_torch(perturb):
    """dL/d(origin), dL/d(direction) and dL/d(t0) through the contracted sample positions, their spacings δ
    and the SH of the direction, against float64 torch autograd of the same sampling and rendering; the
    parameter gradients are those of the plain backward."""
    bg, layout, params = _setup(seed=6)
    n, ns, seed = 16, 8, 12345
    o, d, far = _rays(n, 7)
    bg.forward(buffers.upload(o), buffers.upload(d), buffers.upload(far), params, seed=seed, perturb=perturb)
    out = buffers.to_numpy(bg._bufs["out"])
    g = np.random.default_rng(8).normal(size=(n, 3)).astype(np.float32)
    grads, grads2 = layout.allocate(), layout.allocate()
    g_o, g_d, g_t = buffers.f32(n, 3), buffers.f32(n, 3), buffers.f32(n)
    bg.backward(buffers.upload(g), params, grads, g_origins=g_o, g_dirs=g_d, g_t0=g_t)
    bg.forward(buffers.upload(o), buffers.upload(d), buffers.upload(far), params, seed=seed, perturb=perturb)
    bg.backward(buffers.upload(g), params, grads2)
    a, b = buffers.to_numpy(grads), buffers.to_numpy(grads2)  # equal up to the table's atomic summation order
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()

    theta = t64(buffers.to_numpy(params))
    w = lambda s: theta[s.offset:s.offset + s.size].view(*s.shape)  # noqa: E731

    def lin(x, L, act=None):
        y = x @ w(L.W) + w(L.b)
        return torch.relu(y) if act == "relu" else torch.sigmoid(y) if act == "sigmoid" else y

    o64, d64, t64_ = t64(o).requires_grad_(), t64(d).requires_grad_(), t64(far).requires_grad_()
    u = t64(_jitter_np(n, seed)) if perturb else torch.full((n,), 0.5, dtype=torch.float64)
    f = (torch.arange(ns - 1, dtype=torch.float64)[None] + u[:, None]) / (ns - 1)
    dist = t64_[:, None] / ((1 - f) + f * bg.cfg.far_disparity_ratio)  # (n, ns-1)
    x = o64[:, None] + d64[:, None] * dist[..., None]
    rx = x.norm(dim=2, keepdim=True)
    c = torch.where(rx > 1, (2 - 1 / rx) * x / rx, x)
    c = torch.cat([c, 2 * d64[:, None]], 1)  # (n, ns, 3)
    delta = torch.cat([(c[:, 1:] - c[:, :-1]).norm(dim=2), torch.zeros(n, 1, dtype=torch.float64)], 1)
    e = bg.encoding
    enc = hash_encode(c.reshape(-1, 3), w(e.slice), e.res_np, e.loff_np, e.lsize_np, e.ldense_np, 2.0)
    raw = lin(lin(enc, bg.density[0], "relu"), bg.density[1])
    dirs = d64[:, None].expand(n, ns, 3).reshape(-1, 3)
    rgb = lin(lin(torch.cat([sh16(dirs), raw[:, 1:]], 1), bg.color[0], "relu"), bg.color[1], "sigmoid")
    sigma = torch.nn.functional.softplus(raw[:, 0]).view(n, ns)
    alpha = 1 - torch.exp(-sigma * delta)
    alpha = torch.cat([alpha[:, :-1], torch.ones(n, 1, dtype=alpha.dtype)], 1)
    T = torch.cumprod(torch.cat([torch.ones(n, 1, dtype=alpha.dtype), 1 - alpha[:, :-1]], 1), 1)
    ref = ((T * alpha)[..., None] * rgb.view(n, ns, 3)).sum(1)
    assert np.abs(out - ref.detach().numpy()).max() < 1e-5
    (ref * t64(g)).sum().backward()
    for name, got, want in (("origins", g_o, o64), ("directions", g_d, d64), ("t0", g_t, t64_)):
        a, b = got.to_numpy(), want.grad.numpy()
        assert np.abs(b).max() > 1e-3, name
        assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max(), (name, np.abs(a - b).max(), np.abs(b).max())
