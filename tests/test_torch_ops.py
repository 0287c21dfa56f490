"""Torch autograd over the kernels: field, compositing, whole rays. Values and every gradient (parameters,
points, view directions, ray origins and directions, variance) against float64 torch references;
float32 finite-difference gradchecks for the ray inputs; repeated backward calls give equal gradients."""

import numpy as np
import pytest
import torch
from field_helpers import random_batch, small_field, t64
from test_compositing import make_packed, torch_reference

from taichi_neus import buffers
from taichi_neus.field.hash_grid import HashGridConfig
from taichi_neus.field.params import ParamLayout
from taichi_neus.field.sdf_field import FieldConfig, SDFField
from taichi_neus.field.torch_ops import field_forward
from taichi_neus.field.torch_reference import TorchField
from taichi_neus.render.occupancy import OccupancyGrid
from taichi_neus.render.torch_ops import Renderer, composite

# torch tensors into Vulkan kernels are copied on every launch: the torch path is for CPU and CUDA
# (it runs on Vulkan too, slowly; the Tape path covers Vulkan, tests/test_tape_ops.py)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


def _np(t):
    return t.detach().double().numpy()


@pytest.mark.parametrize("view_degree", [3, 1, 0])
def test_field_forward_values_and_gradients_match_float64(view_degree):
    """Also with the view direction cut to SH band 1 or 0 (``field.view_degree``): the higher bands are fed
    as zeros, forward and backward, and at band 0 the colour does not depend on the view at all."""
    field, layout, params = small_field(seed=21, view_degree=view_degree)
    n = 96
    pts, d = random_batch(n, seed=22)
    theta = torch.from_numpy(buffers.to_numpy(params).copy()).requires_grad_()
    x, v = torch.from_numpy(pts).requires_grad_(), torch.from_numpy(d).requires_grad_()
    sdf, normal, rgb = field_forward(field, theta, x, v, eps=1e-2)
    rng = np.random.default_rng(23)
    w = [torch.from_numpy(rng.normal(size=s).astype(np.float32)) for s in [(n,), (n, 3), (n, 3)]]
    ((sdf * w[0]).sum() + (normal * w[1]).sum() + (rgb * w[2]).sum()).backward()

    th64, x64, v64 = t64(buffers.to_numpy(params)).requires_grad_(), t64(pts).requires_grad_(), t64(d).requires_grad_()
    s2, n2, r2 = TorchField(field).forward(th64, x64, v64, 1e-2)
    ((s2 * t64(w[0])).sum() + (n2 * t64(w[1])).sum() + (r2 * t64(w[2])).sum()).backward()
    assert _rel(_np(sdf), _np(s2)) < 1e-5 and _rel(_np(normal), _np(n2)) < 1e-4 and _rel(_np(rgb), _np(r2)) < 1e-5
    for name, a, b in (("params", theta, th64), ("points", x, x64), ("dirs", v, v64)):
        if name == "dirs" and view_degree == 0:
            assert np.abs(_np(a.grad)).max() == 0 and np.abs(_np(b.grad)).max() == 0
            continue
        assert np.abs(_np(b.grad)).max() > 1e-3, name
        assert _rel(_np(a.grad), _np(b.grad)) < 2e-4, name
    if view_degree < 3:  # the colour MLP's weights on the unused SH inputs get no gradient
        w0 = field.color_layers[0].W
        g = _np(theta.grad)[w0.offset:w0.offset + w0.size].reshape(w0.shape)
        n_sh = (view_degree + 1) ** 2
        assert np.abs(g[6 + n_sh:6 + 16]).max() == 0  # weight_t: (inputs, outputs), SH inputs at 6..21


def test_field_forward_with_analytic_normals():
    """An analytic-normal field through torch autograd: values and parameter gradients match the float64
    double backward, without point gradients asked for and with them (then through the trilinear weights'
    second derivatives)."""
    field, layout, params = small_field("analytic", seed=24)
    n = 64
    pts, d = random_batch(n, seed=25)
    theta = torch.from_numpy(buffers.to_numpy(params).copy()).requires_grad_()
    sdf, normal, rgb = field_forward(field, theta, torch.from_numpy(pts), torch.from_numpy(d))
    w = [torch.from_numpy(np.random.default_rng(26).normal(size=s).astype(np.float32)) for s in [(n,), (n, 3), (n, 3)]]
    ((sdf * w[0]).sum() + (normal * w[1]).sum() + (rgb * w[2]).sum()).backward()
    th64 = t64(buffers.to_numpy(params)).requires_grad_()
    s2, n2, r2 = TorchField(field).forward(th64, t64(pts), t64(d), 1.0)
    ((s2 * t64(w[0])).sum() + (n2 * t64(w[1])).sum() + (r2 * t64(w[2])).sum()).backward()
    assert _rel(_np(normal), _np(n2)) < 1e-4 and _rel(_np(rgb), _np(r2)) < 1e-5
    assert _rel(_np(theta.grad), _np(th64.grad)) < 2e-4
    theta.grad = None
    x, v = torch.from_numpy(pts).requires_grad_(), torch.from_numpy(d).requires_grad_()
    sdf, normal, rgb = field_forward(field, theta, x, v)
    ((sdf * w[0]).sum() + (normal * w[1]).sum() + (rgb * w[2]).sum()).backward()
    th64, x64, v64 = t64(buffers.to_numpy(params)).requires_grad_(), t64(pts).requires_grad_(), t64(d).requires_grad_()
    s2, n2, r2 = TorchField(field).forward(th64, x64, v64, 1.0)
    ((s2 * t64(w[0])).sum() + (n2 * t64(w[1])).sum() + (r2 * t64(w[2])).sum()).backward()
    for name, a, b in (("params", theta, th64), ("points", x, x64), ("dirs", v, v64)):
        assert np.abs(_np(b.grad)).max() > 1e-3, name
        assert _rel(_np(a.grad), _np(b.grad)) < 2e-4, name


def test_field_backward_twice_and_no_state_between_calls():
    field, layout, params = small_field(seed=24)
    pts, d = random_batch(64, seed=25)
    pts2, d2 = random_batch(80, seed=26)
    theta = torch.from_numpy(buffers.to_numpy(params).copy()).requires_grad_()
    x = torch.from_numpy(pts).requires_grad_()
    out = field_forward(field, theta, x, torch.from_numpy(d))
    loss = out[0].square().sum() + out[2].sum() + out[1].square().sum()
    loss.backward(retain_graph=True)
    g1, gx1 = theta.grad.clone(), x.grad.clone()
    # another call of the same field in between overwrites its activations; the first backward must not care
    other = field_forward(field, theta.detach(), torch.from_numpy(pts2), torch.from_numpy(d2))
    assert other[0].shape == (80,)
    loss.backward()
    tol = 1e-6 * float(g1.abs().max())  # the hash table's atomic adds may sum in another order
    assert float((theta.grad - 2 * g1).abs().max()) <= 2 * tol  # accumulated once more: not doubled, not lost
    assert float((x.grad - 2 * gx1).abs().max()) <= 2 * tol
    assert float(g1.abs().max()) > 0


def _torch_composite64(sdf, normal, rgb, delta, t, dirs, var, offsets, counts, r, bg):
    """Float64 NeuS compositing over torch tensors (the maths of tests/test_compositing.torch_reference)."""
    s = torch.clamp(torch.exp(10.0 * var[0]), 1e-6, 1e6)
    bg = torch.tensor(bg, dtype=torch.float64)
    cols, ops, deps = [], [], []
    for ray, (o, n) in enumerate(zip(offsets.tolist(), counts.tolist(), strict=True)):
        sl = slice(o, o + n)
        cos = (normal[sl] * dirs[ray]).sum(-1)
        c = -(torch.relu(-cos * 0.5 + 0.5) * (1.0 - r) + torch.relu(-cos) * r)
        a_p, a_n = (sdf[sl] - c * delta[sl] * 0.5) * s, (sdf[sl] + c * delta[sl] * 0.5) * s
        alpha = (-torch.expm1(torch.nn.functional.logsigmoid(a_n) - torch.nn.functional.logsigmoid(a_p))).clamp(0, 1)
        trans = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.float64), 1.0 - alpha[:-1]]), 0)
        w = trans * alpha
        cols.append((w[:, None] * rgb[sl]).sum(0) + (1.0 - w.sum()) * bg)
        ops.append(w.sum())
        deps.append((w * t[sl]).sum())
    return torch.stack(cols), torch.stack(ops), torch.stack(deps)


def test_composite_function_matches_float64_and_repeats():
    counts = [3, 0, 1, 7, 12, 2]
    p = make_packed(counts, seed=31)
    bg = (0.2, 0.5, 0.9)
    leaves, col, opa, dep, _ = torch_reference(p, 0.3, 0.5, bg, ray_leaves=True)
    rng = np.random.default_rng(32)
    g = [torch.from_numpy(rng.normal(size=s)) for s in [(6, 3), (6,), (6,)]]
    ((col * g[0]).sum() + (opa * g[1]).sum() + (dep * g[2]).sum()).backward()
    mine = [torch.tensor(p[k], dtype=torch.float32, requires_grad=True) for k in ("sdf", "normal", "rgb")]
    t = torch.tensor(p["t"], dtype=torch.float32, requires_grad=True)
    dirs = torch.tensor(p["dirs"], dtype=torch.float32, requires_grad=True)
    var = torch.tensor([0.3], dtype=torch.float32, requires_grad=True)
    out = composite(*mine, torch.tensor(p["delta"], dtype=torch.float32), t, dirs, var, torch.from_numpy(p["offsets"]),
                    torch.from_numpy(p["counts"]), 0.5, bg)
    for a, b in zip(out, (col, opa, dep), strict=True):
        assert _rel(_np(a), _np(b)) < 1e-5
    loss = sum((o * gg.float()).sum() for o, gg in zip(out, g, strict=True))
    loss.backward(retain_graph=True)
    sdf64, normal64, rgb64, var64, dirs64, t64_ = leaves
    pairs = [(mine[0], sdf64), (mine[1], normal64), (mine[2], rgb64), (t, t64_), (dirs, dirs64), (var, var64)]
    first = []
    for a, b in pairs:
        ref = _np(b.grad).reshape(_np(a.grad).shape)
        np.testing.assert_allclose(_np(a.grad), ref, rtol=1e-4, atol=2e-5 * max(1.0, np.abs(ref).max()))
        first.append(a.grad.clone())
    loss.backward()  # a second backward through the same graph: the same gradients again, added once
    for (a, _), g1 in zip(pairs, first, strict=True):
        assert torch.equal(a.grad, 2 * g1)


def _renderer(seed=41, coarse=False):
    if coarse:  # finest cell 2/6 wide: few finite-difference probes straddle a cell face (where slopes jump)
        grid = HashGridConfig(n_levels=2, n_features=2, log2_table=10, base_resolution=3, per_level_scale=2.0,
                              init_scale=0.3)
        layout = ParamLayout()
        field = SDFField(FieldConfig(grid=grid, sdf_hidden=16, feature_dim=3, color_hidden=16, fd_eps=2e-2,
                                         color_encoding=False), layout)
        params = layout.allocate()
        field.init_params(params, seed)
    else:
        field, layout, params = small_field(seed=seed)
    var = layout.add("variance", (1,), "variance")
    host = np.zeros(layout.total, np.float32)
    old = buffers.to_numpy(params)
    host[:old.size] = old
    host[var.offset] = 0.25
    occ = OccupancyGrid(16, 1.0)
    r = Renderer(field, host, occ, var.offset, coarse_step=0.04, max_coarse=96, n_fine=12, eps=field.cfg.fd_eps,
                 cos_anneal_ratio=0.7, background=(0.1, 0.2, 0.3))
    return r, layout


def _rays(n, seed):
    rng = np.random.default_rng(seed)
    o = np.array([0.1, -0.2, -2.2]) + rng.normal(0, 0.05, (n, 3))
    d = np.array([0.0, 0.05, 1.0]) + rng.normal(0, 0.15, (n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return torch.tensor(o, dtype=torch.float32), torch.tensor(d, dtype=torch.float32)


def test_render_rays_gradients_match_float64_reference():
    ren, layout = _renderer()
    o, d = _rays(10, seed=42)
    o.requires_grad_()
    d.requires_grad_()
    theta = ren.params.clone().requires_grad_()
    smp = ren.sample(o, d)
    assert int(smp.ray_counts.sum()) == smp.t.shape[0] > 0
    out = ren.render_samples(o, d, smp, theta)
    rng = np.random.default_rng(43)
    g = [torch.from_numpy(rng.normal(size=s).astype(np.float32)) for s in [(10, 3), (10,), (10,)]]
    sum((a * b).sum() for a, b in zip(out.values(), g, strict=True)).backward()

    th64, o64, d64 = (t64(a.detach()).requires_grad_() for a in (theta, o, d))
    rid, tt = smp.ray_ids, smp.t.double()
    pos = o64[rid] + tt[:, None] * d64[rid]
    s, nr, rgb = TorchField(ren.field).forward(th64, pos, d64[rid], ren.eps)
    var = th64[ren.variance_offset:ren.variance_offset + 1]
    ref = _torch_composite64(s, nr, rgb, smp.delta.double(), tt, d64, var, smp.ray_offsets, smp.ray_counts,
                             ren.cos_anneal_ratio, ren.background)
    for a, b in zip(out.values(), ref, strict=True):
        assert _rel(_np(a), _np(b)) < 1e-4
    sum((a * t64(b)).sum() for a, b in zip(ref, g, strict=True)).backward()
    for name, a, b in (("params", theta, th64), ("origins", o, o64), ("directions", d, d64)):
        assert np.abs(_np(b.grad)).max() > 1e-2, name
        assert _rel(_np(a.grad), _np(b.grad)) < 5e-4, name
    gv = _np(theta.grad)[ren.variance_offset]
    assert gv != 0 and gv == pytest.approx(_np(th64.grad)[ren.variance_offset], rel=1e-3)
    # render_rays = sample + render_samples (deterministic sampling)
    again = ren.render_rays(o.detach(), d.detach(), theta.detach())
    assert torch.equal(again["colour"], out["colour"].detach())


@pytest.mark.filterwarnings("ignore:Input #")  # float32 on purpose: the kernels' precision
def test_gradcheck_ray_origins_and_directions_float32():
    """torch.autograd.gradcheck in float32 (the kernels' precision): central differences with eps 1e-3,
    stated tolerance atol 3e-3 + rtol 3e-2 of the analytic Jacobian, samples held fixed (as the gradient
    defines them), a coarse grid so that few probes straddle a cell face."""
    ren, _ = _renderer(seed=44, coarse=True)
    o, d = _rays(4, seed=45)
    smp = ren.sample(o, d)
    assert (smp.ray_counts > 0).all()

    def fn(o, d):
        out = ren.render_samples(o, d, smp)
        return out["colour"], out["opacity"], out["depth"]

    o.requires_grad_()
    d.requires_grad_()
    assert torch.autograd.gradcheck(fn, (o, d), eps=1e-3, atol=3e-3, rtol=3e-2, nondet_tol=1e-6)


@pytest.mark.filterwarnings("ignore:Input #")
def test_gradcheck_field_parameters_fast_mode():
    """All parameters at once along random directions (gradcheck fast mode), float32, stated tolerance."""
    ren, _ = _renderer(seed=46, coarse=True)
    o, d = _rays(4, seed=47)
    smp = ren.sample(o, d)
    theta = ren.params.clone().requires_grad_()

    def fn(th):
        out = ren.render_samples(o, d, smp, th)
        return out["colour"], out["opacity"]

    assert torch.autograd.gradcheck(fn, (theta,), eps=1e-3, atol=3e-3, rtol=3e-2, fast_mode=True, nondet_tol=1e-5)


def test_render_gradients_equal_over_two_backward_calls():
    ren, _ = _renderer(seed=48)
    o, d = _rays(8, seed=49)
    o.requires_grad_()
    d.requires_grad_()
    theta = ren.params.clone().requires_grad_()
    loss = ren.render_rays(o, d, theta)["colour"].square().sum()
    loss.backward(retain_graph=True)
    first = [a.grad.clone() for a in (o, d, theta)]
    for a in (o, d, theta):
        a.grad = None
    loss.backward()
    for a, g1 in zip((o, d, theta), first, strict=True):
        assert float(g1.abs().max()) > 0
        torch.testing.assert_close(a.grad, g1, rtol=1e-5, atol=1e-6 * float(g1.abs().max()))


def test_sphere_exit_and_its_gradient():
    """The differentiable sphere exit equals unit_sphere_near_far's far; its torch gradient equals
    sphere_exit_vjp (the numpy chain the trainer uses); rays that miss get zero."""
    from taichi_neus.data.rays import sphere_exit_vjp, unit_sphere_near_far
    from taichi_neus.render.torch_ops import sphere_exit
    o, d = _rays(12, seed=71)
    d = d.clone()
    d[0] = torch.tensor([1.0, 0.0, 0.0])  # from z = -2.2 sideways: misses the sphere
    _, far, hit = unit_sphere_near_far(o.numpy(), d.numpy())
    assert not hit[0] and hit[1:].all()
    o64, d64 = o.double().requires_grad_(), d.double().requires_grad_()
    t = sphere_exit(o64, d64)
    np.testing.assert_allclose(t.detach().numpy(), far, rtol=1e-6, atol=1e-6)
    g = torch.from_numpy(np.random.default_rng(72).normal(size=12))
    (t * g).sum().backward()
    go, gd = sphere_exit_vjp(o.numpy(), d.numpy(), far, g.numpy())
    np.testing.assert_allclose(go, o64.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gd, d64.grad.numpy(), rtol=1e-4, atol=1e-6)
    assert np.abs(go[0]).max() == 0 and np.abs(go[1:]).max() > 0.1


def _bg_renderer(seed=81):
    from taichi_neus.render.background import Background, BackgroundConfig
    ren, layout = _renderer(seed=seed, coarse=True)
    cfg = BackgroundConfig(n_samples=8, grid=HashGridConfig(n_levels=2, n_features=2, log2_table=9, base_resolution=3,
                                                             per_level_scale=2.0, bound=2.0, init_scale=0.3),
                           hidden=16, feature_dim=3)
    bg = Background(cfg, layout)
    host = np.zeros(layout.total, np.float32)
    host[:ren.params.shape[0]] = ren.params.numpy()
    params = layout.allocate()
    buffers.from_numpy(params, host)
    bg.init_params(params, seed)
    ren.params = torch.from_numpy(buffers.to_numpy(params).copy())
    ren.bg, ren.background = bg, (0.0, 0.0, 0.0)
    return ren


@pytest.mark.filterwarnings("ignore:Input #")
def test_render_rays_with_a_background_model_gradcheck_float32():
    """A run trained without masks: the background model's colour blends in behind the surface and the ray
    origins', directions' and parameters' gradients include it (float32 central differences, eps 1e-3,
    atol 3e-3 + rtol 3e-2, samples held fixed, coarse grids); two backward calls agree."""
    ren = _bg_renderer()
    o, d = _rays(4, seed=82)
    smp = ren.sample(o, d)
    out = ren.render_samples(o, d, smp)
    assert float(out["opacity"].min()) < 0.99  # some of the background shows

    def fn(o, d):
        r = ren.render_samples(o, d, smp)
        return r["colour"], r["opacity"]

    o.requires_grad_()
    d.requires_grad_()
    assert torch.autograd.gradcheck(fn, (o, d), eps=1e-3, atol=3e-3, rtol=3e-2, nondet_tol=1e-6)
    theta = ren.params.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda th: ren.render_samples(o.detach(), d.detach(), smp, th)["colour"],
                                    (theta,), eps=1e-3, atol=3e-3, rtol=3e-2, fast_mode=True, nondet_tol=1e-5)
    loss = ren.render_rays(o, d, theta)["colour"].square().sum()
    g1 = torch.autograd.grad(loss, (o, d, theta), retain_graph=True)
    g2 = torch.autograd.grad(loss, (o, d, theta))
    bg_part = theta.shape[0] - ren.bg.encoding.slice.offset  # the background's parameters get a gradient too
    assert bg_part > 0 and float(g1[2][ren.bg.encoding.slice.offset:].abs().max()) > 0
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_fixed_parameters_skip_their_gradient_and_keep_the_input_gradients():
    field, _, params = small_field(seed=27)
    pts, d = random_batch(50, seed=28)
    grads = []
    for trainable in (True, False):
        theta = torch.from_numpy(buffers.to_numpy(params).copy()).requires_grad_(trainable)
        x, v = torch.from_numpy(pts).requires_grad_(), torch.from_numpy(d).requires_grad_()
        s, n, c = field_forward(field, theta, x, v)
        (s.sum() + n.square().sum() + c.sum()).backward()
        assert (theta.grad is not None) == trainable
        grads.append((x.grad, v.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=0)


def test_cuda_tensors_give_the_cpu_tensors_results(ti_arch):
    """On the CUDA backend, torch CUDA tensors go into the kernels without a copy: the field and whole rays
    give the values and gradients of the same calls with CPU tensors (which Taichi copies), to float32
    summation order. Runs only where Taichi runs on CUDA and torch sees the GPU (never in CI)."""
    if ti_arch != "cuda" or not torch.cuda.is_available():
        pytest.skip("needs Taichi on CUDA and a CUDA torch")
    field, _, params = small_field(seed=61)
    pts, d = random_batch(200, seed=62)
    results = []
    for dev in ("cpu", "cuda"):
        theta = torch.from_numpy(buffers.to_numpy(params).copy()).to(dev).requires_grad_()
        x = torch.from_numpy(pts).to(dev).requires_grad_()
        v = torch.from_numpy(d).to(dev).requires_grad_()
        s, n, c = field_forward(field, theta, x, v)
        assert s.device.type == dev
        (s.square().sum() + (n * 0.3).sum() + c.sum()).backward()
        results.append([t.detach().cpu() for t in (s, n, c, theta.grad, x.grad, v.grad)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * max(1.0, float(a.abs().max())))

    ren, _ = _renderer(seed=63)
    ren_cuda, _ = _renderer(seed=63)
    ren_cuda.params = ren_cuda.params.to("cuda")
    o, dd = _rays(12, seed=64)
    results = []
    for r, dev in ((ren, "cpu"), (ren_cuda, "cuda")):
        oo, d2 = o.to(dev).requires_grad_(), dd.to(dev).requires_grad_()
        theta = r.params.clone().requires_grad_()
        out = r.render_rays(oo, d2, theta)
        (out["colour"].square().sum() + out["depth"].sum() + out["opacity"].sum()).backward()
        results.append([t.detach().cpu() for t in (*out.values(), theta.grad, oo.grad, d2.grad)])
    assert float(results[0][-1].abs().max()) > 0
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * max(1.0, float(a.abs().max())))
