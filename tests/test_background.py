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
