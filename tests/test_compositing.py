"""NeuS compositing: values and every gradient against a float64 torch autograd reference."""

import numpy as np
import pytest
import taichi as ti
import torch

from taichi_neus import buffers
from taichi_neus.render.compositing import NeuSCompositor

torch.set_default_dtype(torch.float64)


def make_packed(counts, seed=0, negative_delta_at=None):
    rng = np.random.default_rng(seed)
    counts = np.asarray(counts, np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
    s = int(counts.sum())
    dirs = rng.normal(size=(len(counts), 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    sdf = rng.uniform(-0.3, 0.3, s)
    normal = rng.normal(size=(s, 3)) * rng.uniform(0.5, 1.5, (s, 1))
    rgb = rng.uniform(0, 1, (s, 3))
    delta = rng.uniform(0.01, 0.15, s)
    t = np.zeros(s)
    for o, n in zip(offsets, counts, strict=True):
        t[o:o + n] = 0.5 + np.cumsum(rng.uniform(0.01, 0.1, n))
    if negative_delta_at is not None:
        delta[negative_delta_at] = -0.05  # α_raw < 0: clamped, zero gradient
    return dict(sdf=sdf, normal=normal, rgb=rgb, delta=delta, t=t, dirs=dirs, offsets=offsets, counts=counts)


def torch_reference(p, v, r, bg, stable=False, ray_leaves=False):
    """Straightforward float64 NeuS compositing (NeuS renderer.py maths), differentiable by autograd.

    ``stable`` evaluates the same α through log-sigmoids (needed when Φ(s·f_prev) underflows)."""
    sdf = torch.tensor(p["sdf"], requires_grad=True)
    normal = torch.tensor(p["normal"], requires_grad=True)
    rgb = torch.tensor(p["rgb"], requires_grad=True)
    var = torch.tensor(v, requires_grad=True)
    delta = torch.tensor(p["delta"])
    t = torch.tensor(p["t"], requires_grad=ray_leaves)
    dirs = torch.tensor(p["dirs"], requires_grad=ray_leaves)
    bg = torch.tensor(bg)
    s = torch.clamp(torch.exp(10.0 * var), 1e-6, 1e6)
    colours, opac, depth, weights = [], [], [], []
    for ray, (o, n) in enumerate(zip(p["offsets"], p["counts"], strict=True)):
        sl = slice(int(o), int(o + n))
        cos = (normal[sl] * dirs[ray]).sum(-1)
        c = -(torch.relu(-cos * 0.5 + 0.5) * (1.0 - r) + torch.relu(-cos) * r)
        f_prev = sdf[sl] - c * delta[sl] * 0.5
        f_next = sdf[sl] + c * delta[sl] * 0.5
        if stable:
            alpha = -torch.expm1(torch.nn.functional.logsigmoid(f_next * s)
                                 - torch.nn.functional.logsigmoid(f_prev * s))
        else:
            p_cdf = torch.sigmoid(f_prev * s)
            n_cdf = torch.sigmoid(f_next * s)
            alpha = (p_cdf - n_cdf) / p_cdf
        alpha = alpha.clamp(0.0, 1.0)
        trans = torch.cumprod(torch.cat([torch.ones(1), 1.0 - alpha[:-1]]), 0)
        w = trans * alpha
        weights.append(w)
        colours.append((w[:, None] * rgb[sl]).sum(0) + (1.0 - w.sum()) * bg)
        opac.append(w.sum())
        depth.append((w * t[sl]).sum())
    leaves = (sdf, normal, rgb, var) + ((dirs, t) if ray_leaves else ())
    return leaves, torch.stack(colours), torch.stack(opac), torch.stack(depth), torch.cat(weights)


def run_taichi(p, v, r, bg, g_c, g_o, g_d, comp=None):
    comp = comp or NeuSCompositor()
    up = buffers.upload
    ins = [up(p["sdf"]), up(p["normal"]), up(p["rgb"]), up(p["delta"]), up(p["t"]), up(p["dirs"]),
           up(p["offsets"], ti.i32), up(p["counts"], ti.i32)]
    out = comp.forward(*ins, v, r, bg)
    grads = comp.backward(up(g_c), up(g_o), up(g_d))
    return comp, out, grads


@pytest.mark.portable
@pytest.mark.parametrize("v,r", [(0.3, 0.0), (0.3, 0.4), (0.5, 1.0)])
def test_forward_and_gradients_match_torch(v, r):
    counts = [3, 0, 1, 7, 12, 2]
    p = make_packed(counts, seed=1, negative_delta_at=5)
    bg = (0.2, 0.5, 0.9)
    rng = np.random.default_rng(2)
    g_c, g_o, g_d = rng.normal(size=(len(counts), 3)), rng.normal(size=len(counts)), rng.normal(size=len(counts))

    leaves, col, opa, dep, w_ref = torch_reference(p, v, r, bg)
    loss = (col * torch.tensor(g_c)).sum() + (opa * torch.tensor(g_o)).sum() + (dep * torch.tensor(g_d)).sum()
    loss.backward()

    comp, out, grads = run_taichi(p, v, r, bg, g_c, g_o, g_d)
    np.testing.assert_allclose(out.colour.to_numpy(), col.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.opacity.to_numpy(), opa.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.depth.to_numpy(), dep.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(comp.weights.to_numpy(), w_ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    # the ray with 0 samples shows the background, opacity 0
    np.testing.assert_allclose(out.colour.to_numpy()[1], bg, rtol=1e-6)
    assert out.opacity.to_numpy()[1] == 0.0

    sdf, normal, rgb, var = leaves
    scale = lambda a: max(1.0, float(np.abs(a).max()))  # noqa: E731
    for name, mine, ref in (("sdf", grads.sdf, sdf.grad), ("normal", grads.normal, normal.grad),
                            ("rgb", grads.rgb, rgb.grad)):
        ref = ref.numpy()
        np.testing.assert_allclose(mine.to_numpy(), ref, rtol=1e-4, atol=2e-5 * scale(ref), err_msg=name)
    gv = float(grads.variance.to_numpy()[0])
    assert gv == pytest.approx(float(var.grad), rel=1e-4, abs=1e-5)
    # the clamped sample (negative δ) gets no sdf / normal gradient
    assert grads.sdf.to_numpy()[5] == 0.0
    assert np.all(grads.normal.to_numpy()[5] == 0.0)


@pytest.mark.portable
@pytest.mark.parametrize("r", [0.0, 0.4, 1.0])
def test_ray_direction_and_t_gradients_match_torch(r):
    counts = [3, 0, 1, 7, 12, 2]
    p = make_packed(counts, seed=7)
    rng = np.random.default_rng(8)
    g_c, g_o, g_d = rng.normal(size=(len(counts), 3)), rng.normal(size=len(counts)), rng.normal(size=len(counts))
    leaves, col, opa, dep, _ = torch_reference(p, 0.3, r, (0.2, 0.5, 0.9), ray_leaves=True)
    ((col * torch.tensor(g_c)).sum() + (opa * torch.tensor(g_o)).sum() + (dep * torch.tensor(g_d)).sum()).backward()
    comp = NeuSCompositor()
    up = buffers.upload
    ins = [up(p["sdf"]), up(p["normal"]), up(p["rgb"]), up(p["delta"]), up(p["t"]), up(p["dirs"]),
           up(p["offsets"], ti.i32), up(p["counts"], ti.i32)]
    comp.forward(*ins, 0.3, r, (0.2, 0.5, 0.9))
    plain = comp.backward(up(g_c), up(g_o), up(g_d))
    assert plain.dirs is None and plain.t is None  # the training step's call computes nothing extra
    grads = comp.backward(up(g_c), up(g_o), up(g_d), ray_inputs=True)
    dirs, t = leaves[4], leaves[5]
    assert np.abs(dirs.grad.numpy()).max() > 1e-3
    np.testing.assert_allclose(grads.dirs.to_numpy(), dirs.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads.t.to_numpy(), t.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.portable
def test_weights_sum_at_most_one_and_backward_repeatable():
    # sharp density, many samples: weights saturate
    counts = [40, 25, 1]
    p = make_packed(counts, seed=3)
    p["sdf"] = -np.abs(p["sdf"])  # all inside: α close to 1 - exp(-sδ)
    rng = np.random.default_rng(4)
    g_c, g_o, g_d = rng.normal(size=(3, 3)), rng.normal(size=3), rng.normal(size=3)
    comp, out, grads = run_taichi(p, 0.6, 1.0, (1.0, 1.0, 1.0), g_c, g_o, g_d)
    w = comp.weights.to_numpy()
    for o, n in zip(p["offsets"], p["counts"], strict=True):
        assert w[o:o + n].sum() <= 1.0 + 1e-6
        assert np.all(w[o:o + n] >= 0.0)
    opa = out.opacity.to_numpy()
    assert np.all(opa <= 1.0) and np.all(opa >= 0.0)
    assert opa[0] > 0.99
    first = [grads.sdf.to_numpy().copy(), grads.normal.to_numpy().copy(), grads.variance.to_numpy().copy()]
    grads2 = comp.backward(buffers.upload(g_c), buffers.upload(g_o), buffers.upload(g_d))
    np.testing.assert_array_equal(grads2.sdf.to_numpy(), first[0])
    np.testing.assert_array_equal(grads2.normal.to_numpy(), first[1])
    np.testing.assert_array_equal(grads2.variance.to_numpy(), first[2])


@pytest.mark.portable
def test_variance_as_device_buffer_and_extreme_s_is_finite():
    counts = [6, 4]
    p = make_packed(counts, seed=5)
    var = buffers.upload(np.array([1.2], np.float32))  # s = e^12 ≈ 1.6e5: Φ(s·f) underflows inside
    comp = NeuSCompositor()
    up = buffers.upload
    out = comp.forward(up(p["sdf"]), up(p["normal"]), up(p["rgb"]), up(p["delta"]), up(p["t"]),
                       up(p["dirs"]), up(p["offsets"], ti.i32), up(p["counts"], ti.i32), var, 0.5)
    grads = comp.backward(up(np.ones((2, 3))), None, None)
    for a in (out.colour, out.opacity, out.depth, grads.sdf, grads.normal, grads.rgb, grads.variance):
        assert np.all(np.isfinite(a.to_numpy()))
    leaves, col, *_ = torch_reference(p, 1.2, 0.5, (0.0, 0.0, 0.0), stable=True)
    np.testing.assert_allclose(out.colour.to_numpy(), col.detach().numpy(), rtol=1e-4, atol=1e-5)


@ti.kernel
def _sphere_field(p: ti.types.ndarray(dtype=ti.f32, ndim=2), sdf: ti.types.ndarray(dtype=ti.f32, ndim=1),
                  normal: ti.types.ndarray(dtype=ti.f32, ndim=2), n: ti.i32, radius: ti.f32):
    for i in range(n):
        x = ti.Vector([p[i, 0], p[i, 1], p[i, 2]])
        sdf[i] = x.norm() - radius
        g = x.normalized()
        for q in ti.static(range(3)):
            normal[i, q] = g[q]


@pytest.mark.portable
def test_sampler_and_compositing_render_a_sphere():
    """End to end with an analytic sphere (radius 0.5): rays that hit are opaque at the right depth,
    rays that miss show the background."""
    from taichi_neus.render.occupancy import OccupancyGrid
    from taichi_neus.render.sampling import RaySampler

    def sdf_fn(points):
        out, nrm = buffers.f32(points.shape[0]), buffers.f32(points.shape[0], 3)
        _sphere_field(points, out, nrm, points.shape[0], 0.5)
        return out

    grid = OccupancyGrid(resolution=32)
    grid.update(sdf_fn, inv_s=500.0, step=0)
    xy = np.array([[0.0, 0.0], [0.2, 0.1], [-0.3, 0.25], [0.8, 0.0], [0.0, -0.9]])
    o = np.concatenate([xy, np.full((5, 1), -2.0)], 1)
    d = np.tile([0.0, 0.0, 1.0], (5, 1))
    sq = np.sqrt(np.maximum(1.0 - (xy**2).sum(1), 0.0))
    near, far = np.where(sq > 0, 2.0 - sq, 0.0), np.where(sq > 0, 2.0 + sq, 0.0)
    sampler = RaySampler(grid, step=0.005, max_coarse=256, n_fine=32)
    dirs = buffers.upload(d)
    ps = sampler.sample(buffers.upload(o), dirs, buffers.upload(near), buffers.upload(far), sdf_fn, 500.0)
    cap = ps.t.shape[0]
    sdf, normal, rgb = buffers.f32(cap), buffers.f32(cap, 3), buffers.f32(cap, 3)
    _sphere_field(ps.positions, sdf, normal, ps.n_samples, 0.5)
    buffers.fill_(rgb, 0.25)
    out = NeuSCompositor().forward(sdf, normal, rgb, ps.delta, ps.t, dirs, ps.ray_offsets, ps.ray_counts,
                                   np.log(500.0) / 10.0, 1.0, (1.0, 1.0, 1.0))
    hit = (xy**2).sum(1) < 0.25
    t_hit = 2.0 - np.sqrt(np.maximum(0.25 - (xy**2).sum(1), 0.0))
    opa, dep, col = out.opacity.to_numpy(), out.depth.to_numpy(), out.colour.to_numpy()
    assert np.all(opa[hit] > 0.99) and np.all(opa[~hit] == 0.0)
    np.testing.assert_allclose(dep[hit], t_hit[hit], atol=1e-3)
    np.testing.assert_allclose(col[hit], 0.25, atol=0.01)
    np.testing.assert_allclose(col[~hit], 1.0)
