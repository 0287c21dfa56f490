"""Hash grid, MLP layers, SH and the full field against the float64 torch reference."""

import numpy as np
import pytest
import torch
from field_helpers import random_batch, small_field, t64

from taichi_neus import buffers
from taichi_neus.field import hash_grid
from taichi_neus.field.hash_grid import HashGrid, HashGridConfig, level_layout
from taichi_neus.field.mlp import Linear
from taichi_neus.field.params import ParamLayout
from taichi_neus.field.torch_reference import TorchField, hash_encode, sh16

pytestmark = pytest.mark.portable


def _rel(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-12)


def test_level_layout_dense_then_hashed():
    res, off, size, dense, total = level_layout(HashGridConfig())
    assert res[0] == 32 and res[-1] == 2047
    assert dense.tolist()[:4] == [1, 1, 1, 1] and not dense[4:].any()
    assert (size[4:] == 1 << 19).all() and total == off[-1] + size[-1]


@pytest.mark.parametrize("n_levels", [5, 12])  # the CPU scatter's tasks: 2 of up to 4 levels; 4 of 3 (made even)
def test_hash_encoding_values_and_table_gradient(n_levels):
    cfg = HashGridConfig(n_levels=n_levels, n_features=2, log2_table=10, base_resolution=3,
                         per_level_scale=2.2 if n_levels == 5 else 1.5, init_scale=0.5)
    layout = ParamLayout()
    grid = HashGrid(cfg, layout)
    # float32 cell fractions lose ~R·2⁻²⁴ at R cells per axis (R up to 260 with 12 levels)
    tol = 1e-5 if n_levels == 5 else 1e-4
    assert grid.ldense_np.tolist()[:2] == [1, 1] and not grid.ldense_np[-1]  # both indexing paths are exercised
    params = layout.allocate()
    grid.init_params(params, seed=3)
    n = 200
    pts, _ = random_batch(n, seed=1, lo=-1.1, hi=1.1)  # includes points outside the domain (clamped)
    theta = t64(buffers.to_numpy(params)).requires_grad_()
    table = theta[grid.slice.offset:grid.slice.offset + grid.slice.size].view(*grid.slice.shape)
    ref = hash_encode(t64(pts), table, grid.res_np, grid.loff_np, grid.lsize_np, grid.ldense_np, cfg.bound)
    # the backend's own choice, then both forward kernels explicitly (levels as vector lanes, one level
    # at a time), with all levels and with the finest three off (their columns start non-zero)
    for kernel in [None, hash_grid.hash_encode_forward_levels, hash_grid.hash_encode_forward]:
        for n_active in (cfg.n_levels, 2):
            X = buffers.rows16_upload(np.concatenate([pts, np.full((n, cfg.out_dim), 3.0, np.float32)], 1))
            if kernel is None:
                grid.forward(X, n, 3, params, n_active)
            elif kernel is hash_grid.hash_encode_forward_levels:
                kernel(X, n, 3, params, grid.slice.offset, *grid._level_arrays(), cfg.bound, cfg.n_features,
                       cfg.n_levels, hash_grid.lane_width(cfg.n_levels), n_active, 0)
            else:
                kernel(X, n, 3, params, grid.slice.offset, *grid._level_arrays(), cfg.bound, cfg.n_features,
                       n_active, 0)
            got = buffers.rows16_to_numpy(X, 3 + cfg.out_dim)[:, 3:]
            on = n_active * cfg.n_features
            assert _rel(got[:, :on], ref.detach().numpy()[:, :on]) < tol, (kernel, n_active)
            assert (got[:, on:] == 0.0).all(), (kernel, n_active)
    X = buffers.rows16_upload(np.concatenate([pts, np.zeros((n, cfg.out_dim), np.float32)], 1))
    grid.forward(X, n, 3, params)
    upstream = np.random.default_rng(2).normal(size=(n, cfg.out_dim)).astype(np.float32)
    upstream[::7, 2:4] = 0.0  # levels without gradient at some points are skipped
    dX = buffers.rows16_upload(np.concatenate([np.zeros((n, 3), np.float32), upstream], 1))
    (ref * t64(upstream)).sum().backward()
    # the backend's own choice, then both scatters explicitly (per level without atomics, per point with)
    kernels = [None, hash_grid.hash_encode_backward_by_level, hash_grid.hash_encode_backward_atomic]
    for kernel in kernels:
        grads = layout.allocate()
        buffers.from_numpy(grads, np.full(layout.total, 0.5, np.float32))  # the scatter adds to what is there
        if kernel is None:
            grid.backward(X, dX, n, 3, grads)
        elif kernel is hash_grid.hash_encode_backward_by_level:
            kernel(X, dX, n, 3, grads, grid.slice.offset, *grid._level_arrays(), cfg.bound, cfg.n_features,
                   cfg.n_levels, cfg.n_levels, 0)
        else:
            kernel(X, dX, n, 3, grads, grid.slice.offset, *grid._level_arrays(), cfg.bound, cfg.n_features,
                   cfg.n_levels, 0)
        assert _rel(buffers.to_numpy(grads) - 0.5, theta.grad.numpy()) < tol, kernel


# (inputs, outputs, first input column): widths that are not multiples of 16 (padded), the field's
# 3 + 32 → 64 and 64 → 1 + 15 layers, inputs starting inside a 16-column block (the background), and
# 1, 2, 3 and 4 blocks per register tile.
_SHAPES = [(9, 6, 2), (35, 64, 0), (32, 64, 3), (64, 3, 0), (37, 16, 0), (20, 33, 14), (24, 32, 5)]


@pytest.mark.parametrize("act", ["none", "relu", "softplus", "sigmoid"])
@pytest.mark.parametrize("n_in,n_out,xcol", _SHAPES)
def test_linear_layer_forward_backward(act, n_in, n_out, xcol):
    layout = ParamLayout()
    layout.add("before", (5,), "other")  # the layer's slices do not start at 0
    lin = Linear(layout, "l", n_in, n_out, act=act, beta=10.0)
    params = layout.allocate()
    rng = np.random.default_rng(n_in + n_out)
    theta_np = rng.normal(0, 0.5, layout.total).astype(np.float32)
    buffers.from_numpy(params, theta_np)
    n = 301  # not a multiple of the 4-point tile
    x = rng.normal(size=(n, xcol + n_in)).astype(np.float32)
    X, Y = buffers.rows16_upload(x), buffers.rows16(n, n_out)
    lin.forward(X, xcol, Y, n, params)
    theta = t64(theta_np).requires_grad_()
    xt = t64(x).requires_grad_()
    w, b = lin.W, lin.b
    z = torch.nn.functional.linear(xt[:, xcol:], theta[w.offset:w.offset + w.size].view(n_in, n_out).t(),
                                   theta[b.offset:b.offset + b.size])
    y = {"none": z, "relu": torch.relu(z), "softplus": torch.nn.functional.softplus(z, beta=10.0),
         "sigmoid": torch.sigmoid(z)}[act]
    assert _rel(buffers.rows16_to_numpy(Y, n_out), y.detach().numpy()) < 1e-5
    up = rng.normal(size=(n, n_out)).astype(np.float32)
    dY, dX, grads = buffers.rows16_upload(up), buffers.rows16(n, xcol + n_in), layout.allocate()
    lin.backward(X, xcol, Y, dY, n, params, grads, n_chunks=7, dX=dX, dxcol=xcol)  # 7 chunks: do not divide n
    (y * t64(up)).sum().backward()
    g = buffers.to_numpy(grads)
    assert _rel(g, theta.grad.numpy()) < 1e-5
    assert not g[:5].any()  # nothing lands outside the layer's slices (padding is dropped)
    assert _rel(buffers.rows16_to_numpy(dX, xcol + n_in)[:, xcol:], xt.grad.numpy()[:, xcol:]) < 1e-5


def test_packed_weights_are_reused_only_inside_their_block(monkeypatch):
    """Inside packed_weights_reused() a layer packs once per parameter buffer; a second buffer, a new block or
    no block at all packs again, so a parameter written between blocks (the optimiser) is always seen."""
    from taichi_neus.field import mlp

    calls = []
    pack = mlp.pack_weights
    monkeypatch.setattr(mlp, "pack_weights", lambda *a: (calls.append(1), pack(*a))[1])
    layout = ParamLayout()
    lin = Linear(layout, "l", 20, 7)
    p1, p2 = layout.allocate(), layout.allocate()
    rng = np.random.default_rng(5)
    buffers.from_numpy(p1, rng.normal(size=layout.total).astype(np.float32))
    x = rng.normal(size=(9, 20)).astype(np.float32)
    X, Y = buffers.rows16_upload(x), buffers.rows16(9, 7)

    def run(params):
        lin.forward(X, 0, Y, 9, params)
        return buffers.rows16_to_numpy(Y, 7)

    W = layout.view(buffers.to_numpy(p1), "l.weight_t").reshape(20, 7)
    with mlp.packed_weights_reused():
        first = run(p1)
        np.testing.assert_allclose(run(p1), first)
        assert len(calls) == 1  # reused
        run(p2)
        assert len(calls) == 2  # another buffer packs its own
        run(p1)
        assert len(calls) == 3
    np.testing.assert_allclose(first, x @ W + layout.view(buffers.to_numpy(p1), "l.bias"), rtol=1e-5, atol=1e-5)
    host = buffers.to_numpy(p1)
    host[lin.W.offset:lin.W.offset + lin.W.size] *= 2.0  # as an optimiser step between blocks would
    buffers.from_numpy(p1, host)
    with mlp.packed_weights_reused():
        second = run(p1)
    assert len(calls) == 4
    np.testing.assert_allclose(second, x @ (2 * W) + layout.view(host, "l.bias"), rtol=1e-5, atol=1e-5)
    run(p1)
    run(p1)
    assert len(calls) == 6  # outside a block every call packs


@pytest.mark.parametrize("mode", ["analytic", "tetrahedral"])
def test_geometry_only_forward_gives_the_same_geometry_and_gradients(mode):
    """forward(color=False) (the eikonal and sparse points: the colour is never read) skips the colour grid and
    network: sdf, normal and the geometry terms' parameter gradients equal a full forward's; a colour gradient
    after it is refused."""
    field, layout, params = small_field(mode, color_encoding=True)
    n = 97
    pts, d = random_batch(n, seed=3)
    P, D = buffers.upload(pts), buffers.upload(d)
    rng = np.random.default_rng(4)
    dsdf = buffers.upload(rng.normal(size=n).astype(np.float32))
    dnormal = buffers.upload(rng.normal(size=(n, 3)).astype(np.float32))
    results = []
    for color in (True, False):
        out = field.forward(P, D, n, params, color=color)
        assert (out.rgb is None) == (not color)
        grads = layout.allocate()
        field.backward(dsdf, dnormal, None, params, grads)
        results.append((buffers.to_numpy(out.sdf, n), buffers.to_numpy(out.normal, n), buffers.to_numpy(grads)))
    for full, geo in zip(*results, strict=True):
        np.testing.assert_array_equal(geo, full)
    assert np.abs(results[0][2]).max() > 0
    with pytest.raises(ValueError, match="color=False"):
        field.backward(dsdf, dnormal, dnormal, params, layout.allocate())


def test_misaligned_vector_buffer_is_refused_not_crashed():
    # LLVM's vector loads assume 64-byte alignment: a misaligned view would segfault the process.
    layout = ParamLayout()
    lin = Linear(layout, "l", 16, 16)
    params = layout.allocate()
    rng = np.random.default_rng(0)
    buffers.from_numpy(params, rng.normal(size=layout.total).astype(np.float32))
    n = 8
    x = rng.normal(size=(n, 16)).astype(np.float32)

    def view(shift):  # (n, 1, 16) host array starting `shift` floats after a 64-byte boundary
        store = np.zeros(n * 16 + 32, np.float32)
        start = (-store.ctypes.data % 64) // 4 + shift
        v = store[start:start + n * 16].reshape(n, 1, 16)
        v[:] = x.reshape(n, 1, 16)
        return v

    aligned, misaligned = view(0), view(1)
    Y = buffers.rows16(n, 16)
    with pytest.raises(buffers.MisalignedBufferError, match="64-byte boundary"):
        lin.forward(misaligned, 0, Y, n, params)
    with pytest.raises(buffers.MisalignedBufferError, match="64-byte boundary"):
        lin.backward(buffers.rows16_upload(x), 0, Y, misaligned, n, params, layout.allocate())
    # the same data, aligned, goes through and gives the layer's result: only the alignment was refused
    lin.forward(aligned, 0, Y, n, params)
    Wt = buffers.to_numpy(params)[lin.W.offset:lin.W.offset + 256].reshape(16, 16)
    b = buffers.to_numpy(params)[lin.b.offset:lin.b.offset + 16]
    assert _rel(buffers.rows16_to_numpy(Y), x @ Wt + b) < 1e-5
    # every buffer the package makes for these kernels is aligned by construction
    for rows, cols in [(1, 1), (3, 35), (1000, 64), (7, 3)]:
        buffers.check_aligned(buffers.rows16(rows, cols))
    _, layout, params = small_field()
    buffers.check_aligned(params, "the parameter buffer")
    assert all(s.offset % 16 == 0 for s in layout.slices.values()) and len(layout.slices) > 5


def test_sh_basis_is_orthonormal():
    # Gauss-Legendre in cos(theta) × uniform in phi integrates these polynomials exactly.
    from taichi_neus.field.sdf_field import _gather_outputs  # noqa: F401  (SH is evaluated inside the field)
    ct, wt = np.polynomial.legendre.leggauss(12)
    phi = np.arange(24) * 2 * np.pi / 24
    C, P = np.meshgrid(ct, phi, indexing="ij")
    W = np.repeat(wt[:, None], 24, 1) * (2 * np.pi / 24)
    st = np.sqrt(1 - C**2)
    d = np.stack([st * np.cos(P), st * np.sin(P), C], -1).reshape(-1, 3)
    field, _, params = small_field()
    n = d.shape[0]
    out = field.forward(buffers.upload(np.zeros((n, 3), np.float32)), buffers.upload(d.astype(np.float32)), n,
                        params)
    del out
    Y = buffers.rows16_to_numpy(field.ws.get("Xc", n, field.color_in))[:n, 6:22].astype(np.float64)
    gram = (Y * W.reshape(-1, 1)).T @ Y
    assert np.abs(gram - np.eye(16)).max() < 1e-5
    assert np.abs(Y - sh16(t64(d)).numpy()).max() < 1e-5


@pytest.mark.parametrize("mode,color_encoding", [("tetrahedral", False), ("central", False), ("analytic", False),
                                                 ("analytic", True), ("tetrahedral", True)])
def test_field_forward_backward_matches_torch(mode, color_encoding):
    """Values and parameter gradients against the float64 torch twin; with ``color_encoding`` the colour
    network's own hash grid too (its table among the slices that must match)."""
    field, layout, params = small_field(mode, seed=4, color_encoding=color_encoding)
    assert ("color_encoding.table" in layout.slices) == color_encoding
    n = 256
    pts, d = random_batch(n, seed=5)
    out = field.forward(buffers.upload(pts), buffers.upload(d), n, params, eps=1e-2)
    theta = t64(buffers.to_numpy(params)).requires_grad_()
    s, nr, rgb = TorchField(field).forward(theta, t64(pts), t64(d), 1e-2)
    assert _rel(out.sdf.to_numpy()[:n], s.detach().numpy()) < 1e-5
    assert _rel(out.normal.to_numpy()[:n], nr.detach().numpy()) < 1e-4  # /ε amplifies f32 rounding
    assert _rel(out.rgb.to_numpy()[:n], rgb.detach().numpy()) < 1e-5
    rng = np.random.default_rng(6)
    ds, dn, dr = (rng.normal(size=sh).astype(np.float32) for sh in [(n,), (n, 3), (n, 3)])
    grads = layout.allocate()
    field.backward(buffers.upload(ds), buffers.upload(dn), buffers.upload(dr), params, grads)
    ((s * t64(ds)).sum() + (nr * t64(dn)).sum() + (rgb * t64(dr)).sum()).backward()
    g, gt = buffers.to_numpy(grads), theta.grad.numpy()
    for name, sl in layout.slices.items():
        a, b = g[sl.offset:sl.offset + sl.size], gt[sl.offset:sl.offset + sl.size]
        assert np.abs(b).max() > 0, name
        assert _rel(a, b) < 2e-4, name


@pytest.mark.parametrize("mode", ["tetrahedral", "central"])
def test_finite_difference_normal_matches_analytic_gradient(mode):
    # A coarse grid (finest cell 0.5 wide) so few stencils straddle a trilinear cell boundary, where the
    # analytic gradient jumps; elsewhere both stencils are O(ε²) accurate.
    from taichi_neus.field.sdf_field import FieldConfig, SDFField
    grid = HashGridConfig(n_levels=3, log2_table=10, base_resolution=2, per_level_scale=1.5, init_scale=0.3)
    layout = ParamLayout()
    field = SDFField(FieldConfig(grid=grid, normal_mode=mode, sdf_hidden=16, feature_dim=3, softplus_beta=10.0,
                                 color_encoding=False),
                     layout)
    params = layout.allocate()
    field.init_params(params, seed=7)
    host = buffers.to_numpy(params).copy()
    w = field.sdf_layers[0].W
    host[w.offset:w.offset + w.size] += np.random.default_rng(1).normal(0, 0.5, w.size).astype(np.float32)
    buffers.from_numpy(params, host)
    n = 128
    pts, d = random_batch(n, seed=8, lo=-0.7, hi=0.7)
    eps = 2e-3
    out = field.forward(buffers.upload(pts), buffers.upload(d), n, params, eps=eps)
    theta = t64(buffers.to_numpy(params))
    x = t64(pts).requires_grad_()
    sdf = TorchField(field).sdf_net(theta, x)[:, 0]
    (grad,) = torch.autograd.grad(sdf.sum(), x)
    fd = out.normal.to_numpy()[:n]
    err = np.linalg.norm(fd - grad.numpy(), axis=1) / np.maximum(np.linalg.norm(grad.numpy(), axis=1), 1e-6)
    # central: O(ε²); tetrahedral: O(ε) (its stencil's third moment Σ v_x v_y v_z ≠ 0)
    tol = 2e-3 if mode == "central" else 1e-2
    assert np.median(err) < tol and np.mean(err < 5 * tol) > 0.9


def test_eikonal_gradient_reaches_hash_table():
    field, layout, params = small_field(seed=9)
    n = 128
    pts, d = random_batch(n, seed=10)
    out = field.forward(buffers.upload(pts), buffers.upload(d), n, params)
    nrm = out.normal.to_numpy()[:n]
    norm = np.linalg.norm(nrm, axis=1, keepdims=True)
    dnormal = (2 * (norm - 1) * nrm / norm / n).astype(np.float32)  # d/dn of mean((|n|-1)^2)
    grads = layout.allocate()
    field.backward(buffers.f32(n), buffers.upload(dnormal), None, params, grads)
    g = buffers.to_numpy(grads)
    tab = layout["encoding.table"]
    assert np.abs(g[tab.offset:tab.offset + tab.size]).max() > 1e-6
    theta = t64(buffers.to_numpy(params)).requires_grad_()
    _, nr, _ = TorchField(field).forward(theta, t64(pts), t64(d), field.cfg.fd_eps)
    ((nr.norm(dim=1) - 1) ** 2).mean().backward()
    assert _rel(g, theta.grad.numpy()) < 2e-4


def test_backward_twice_gives_same_gradient():
    field, layout, params = small_field(seed=11)
    n = 100
    pts, d = random_batch(n, seed=12)
    rng = np.random.default_rng(13)
    ups = [buffers.upload(rng.normal(size=s).astype(np.float32)) for s in [(n,), (n, 3), (n, 3)]]
    field.forward(buffers.upload(pts), buffers.upload(d), n, params)
    g1, g2 = layout.allocate(), layout.allocate()
    field.backward(*ups, params, g1)
    field.backward(*ups, params, g2)
    a, b = buffers.to_numpy(g1), buffers.to_numpy(g2)
    # equal up to the summation order of the table's atomic adds (threads interleave differently)
    tol = 1e-6 * np.abs(a).max()
    assert np.abs(a).max() > 0 and np.abs(a - b).max() <= tol
    field.backward(*ups, params, g2)  # into the same buffer: accumulates, nothing is doubled or lost
    assert np.abs(buffers.to_numpy(g2) - 2 * a).max() <= 2 * tol


def test_sphere_initialisation():
    from taichi_neus.field.sdf_field import FieldConfig, SDFField
    grid = HashGridConfig(n_levels=4, log2_table=12, base_resolution=8, per_level_scale=2.0)
    layout = ParamLayout()
    field = SDFField(FieldConfig(grid=grid, sphere_init_radius=0.5, color_encoding=False), layout)
    params = layout.allocate()
    field.init_params(params, seed=0)
    pts, _ = random_batch(500, seed=14)
    sdf = field.sdf(buffers.upload(pts), 500, params).to_numpy()
    r = np.linalg.norm(pts, axis=1)
    # sdf ≈ c(direction)·|x| − 0.5 with c ≈ 1 (a random 64-wide layer: c varies by ~15% with direction)
    assert (sdf[r < 0.3] < 0).all() and (sdf[r > 0.75] > 0).all()
    slope = np.polyfit(r, sdf, 1)
    assert abs(slope[0] - 1) < 0.2 and abs(slope[1] + 0.5) < 0.1
    assert np.corrcoef(sdf, r)[0, 1] > 0.85


def test_hash_encoding_point_gradient_matches_float64():
    cfg = HashGridConfig(n_levels=5, n_features=2, log2_table=10, base_resolution=3, per_level_scale=2.2,
                         init_scale=0.5)
    layout = ParamLayout()
    grid = HashGrid(cfg, layout)
    params = layout.allocate()
    grid.init_params(params, seed=4)
    n = 200
    pts, _ = random_batch(n, seed=2, lo=-1.1, hi=1.1)  # some outside the domain: clamped, zero gradient
    X = buffers.rows16_upload(np.concatenate([pts, np.zeros((n, cfg.out_dim), np.float32)], 1))
    grid.forward(X, n, 3, params)
    upstream = np.random.default_rng(3).normal(size=(n, cfg.out_dim)).astype(np.float32)
    dX = buffers.rows16_upload(np.concatenate([np.zeros((n, 3), np.float32), upstream], 1))
    dP = buffers.f32(n, 3)
    grid.backward_points(X, dX, n, 3, params, dP)
    theta = t64(buffers.to_numpy(params))
    table = theta[grid.slice.offset:grid.slice.offset + grid.slice.size].view(*grid.slice.shape)
    x = t64(pts).requires_grad_()
    ref = hash_encode(x, table, grid.res_np, grid.loff_np, grid.lsize_np, grid.ldense_np, cfg.bound)
    (ref * t64(upstream)).sum().backward()
    got, want = dP.to_numpy(), x.grad.numpy()
    outside = (np.abs(pts) > 1.0).any(1)
    assert outside.any() and np.abs(want).max() > 1
    assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("mode,include_xyz,view_degree,color_encoding", [
    ("tetrahedral", True, 3, False), ("central", True, 3, False), ("tetrahedral", False, 3, False),
    ("tetrahedral", True, 1, False), ("analytic", True, 3, False), ("analytic", False, 3, False),
    ("analytic", True, 3, True), ("tetrahedral", False, 3, True)])
def test_field_point_and_direction_gradients_match_torch(mode, include_xyz, view_degree, color_encoding):
    field, layout, params = small_field(mode, seed=15, include_xyz=include_xyz, view_degree=view_degree,
                                        color_encoding=color_encoding)
    n = 128
    pts, d = random_batch(n, seed=16)
    eps = 1e-2
    field.forward(buffers.upload(pts), buffers.upload(d), n, params, eps=eps)
    rng = np.random.default_rng(17)
    ds, dn, dr = (rng.normal(size=sh).astype(np.float32) for sh in [(n,), (n, 3), (n, 3)])
    grads, dp, dd = layout.allocate(), buffers.f32(n, 3), buffers.f32(n, 3)
    field.backward(buffers.upload(ds), buffers.upload(dn), buffers.upload(dr), params, grads, dpoints=dp, ddirs=dd)
    theta = t64(buffers.to_numpy(params)).requires_grad_()
    x, v = t64(pts).requires_grad_(), t64(d).requires_grad_()
    s, nr, rgb = TorchField(field).forward(theta, x, v, eps)
    ((s * t64(ds)).sum() + (nr * t64(dn)).sum() + (rgb * t64(dr)).sum()).backward()
    assert _rel(buffers.to_numpy(grads), theta.grad.numpy()) < 2e-4  # the parameter path is unchanged
    # the normal's /ε amplifies f32 rounding of the stencil rows' gradients (as for the normal itself)
    assert _rel(dp.to_numpy(), x.grad.numpy()) < 2e-4
    assert _rel(dd.to_numpy(), v.grad.numpy()) < 1e-5
    # geometry-only backward: no colour network, so the view direction gets nothing
    grads2 = layout.allocate()
    field.backward(buffers.upload(ds), buffers.upload(dn), None, params, grads2, dpoints=dp, ddirs=dd)
    x2 = t64(pts).requires_grad_()
    s2, nr2, _ = TorchField(field).forward(theta.detach(), x2, t64(d), eps)
    ((s2 * t64(ds)).sum() + (nr2 * t64(dn)).sum()).backward()
    assert _rel(dp.to_numpy(), x2.grad.numpy()) < 2e-4 and np.abs(dd.to_numpy()).max() == 0


@pytest.mark.parametrize("mode", ["tetrahedral", "central"])
def test_field_laplacian_and_its_gradient_match_torch(mode):
    """The finite-difference Laplacian (the curvature loss's input) and its backward against float64 torch
    of the same stencil; and the stencil's Laplacian of a known function (x² + 2y² − z²: Δf = 4)."""
    from taichi_neus.field.sdf_field import laplacian_coef, stencil
    off, _ = stencil(mode)
    lc = laplacian_coef(mode)
    eps = 0.05
    x = np.random.default_rng(0).normal(size=(5, 3))
    quad = lambda p: p[..., 0] ** 2 + 2 * p[..., 1] ** 2 - p[..., 2] ** 2  # noqa: E731
    vals = quad(x[:, None, :] + eps * off[None].astype(np.float64))
    assert np.allclose((vals * lc).sum(1) / eps**2, 4.0, atol=1e-9)
    field, layout, params = small_field(mode, seed=4)
    n = 256
    pts, d = random_batch(n, seed=5)
    out = field.forward(buffers.upload(pts), buffers.upload(d), n, params, eps=1e-2, laplacian=True)
    theta = t64(buffers.to_numpy(params)).requires_grad_()
    offs = torch.as_tensor(off, dtype=torch.float64)
    f = TorchField(field).sdf_net(theta, (t64(pts)[None] + 1e-2 * offs[:, None]).reshape(-1, 3))[:, 0]
    lap = (t64(lc)[:, None] * f.view(off.shape[0], n)).sum(0) / 1e-4
    # Δf divides by ε²: float32 rounding of the five values is amplified ×1e4
    assert _rel(out.laplacian.to_numpy()[:n], lap.detach().numpy()) < 5e-3
    dl = np.random.default_rng(7).normal(size=n).astype(np.float32)
    zero3 = buffers.upload(np.zeros((n, 3), np.float32))
    grads = layout.allocate()
    field.backward(buffers.upload(np.zeros(n, np.float32)), zero3, None, params, grads, dlaplacian=buffers.upload(dl))
    (lap * t64(dl)).sum().backward()
    g, gt = buffers.to_numpy(grads), theta.grad.numpy()
    for name, sl in layout.slices.items():
        a, b = g[sl.offset:sl.offset + sl.size], gt[sl.offset:sl.offset + sl.size]
        if name.startswith("color"):
            assert np.all(a == 0), name
        elif np.abs(b).max() < 1e-9:  # the output bias: a constant shift has no Laplacian (float32 leaves
            assert np.abs(a).max() < 1e-6 * np.abs(dl).sum() / 1e-4, name  # a cancellation residue)
        else:
            assert _rel(a, b) < 2e-4, name
