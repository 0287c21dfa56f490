"""The analytic normal (field.normal_mode = "analytic"): the hash grid's Jacobian, the linear layers'
bias on the points' rows only, the activations' forward-mode rule and its transpose, each against
float64 torch (forward-mode AD or double backward). The whole field in this mode is checked in
test_field.py (values and every parameter gradient) and on Vulkan in test_portability.py."""

import numpy as np
import pytest
import torch
from field_helpers import random_batch, small_field, t64

from taichi_neus import buffers
from taichi_neus.field import hash_grid
from taichi_neus.field.hash_grid import JAC_ROWS, HashGrid, HashGridConfig
from taichi_neus.field.mlp import Linear, tangent_act_backward, tangent_act_forward
from taichi_neus.field.params import ParamLayout
from taichi_neus.field.torch_reference import hash_encode

pytestmark = pytest.mark.portable


def _rel(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-12)


def _tangent_rows(a: np.ndarray, tangents: list) -> np.ndarray:
    """(n, D) values and three (n, D) tangents → (4n, D) rows: m·4 the value, m·4 + 1 + t tangent t."""
    out = np.empty((a.shape[0] * JAC_ROWS, a.shape[1]), a.dtype)
    out[0::JAC_ROWS] = a
    for t, v in enumerate(tangents):
        out[1 + t::JAC_ROWS] = v
    return out


def _jvp_encoding(x, table, grid, n_active):
    """∂encoding/∂x_t for t = 0, 1, 2 by torch forward-mode AD, float64."""
    def enc(p):
        return hash_encode(p, table, grid.res_np, grid.loff_np, grid.lsize_np, grid.ldense_np, grid.cfg.bound,
                           n_active)
    return [torch.func.jvp(enc, (x,), (torch.zeros_like(x).index_fill_(1, torch.tensor([t]), 1.0),))[1]
            for t in range(3)]


@pytest.mark.parametrize("n_active", [5, 3])
def test_hash_encoding_jacobian_and_its_table_gradient(n_active):
    cfg = HashGridConfig(n_levels=5, n_features=2, log2_table=10, base_resolution=3, per_level_scale=2.2,
                         init_scale=0.5)
    layout = ParamLayout()
    layout.add("before", (7,), "other")
    grid = HashGrid(cfg, layout)
    params = layout.allocate()
    grid.init_params(params, seed=3)
    n = 203
    pts = np.random.default_rng(4).uniform(-1.1, 1.1, (n, 3)).astype(np.float32)  # some outside the bound
    theta = t64(buffers.to_numpy(params)).requires_grad_()
    table = theta[grid.slice.offset:grid.slice.offset + grid.slice.size].view(*grid.slice.shape)
    x = t64(pts)
    ref = hash_encode(x, table, grid.res_np, grid.loff_np, grid.lsize_np, grid.ldense_np, cfg.bound, n_active)
    jac = _jvp_encoding(x, table, grid, n_active)
    D, on = cfg.out_dim, n_active * cfg.n_features
    assert all(j[:, :on].abs().max() > 1.0 for j in jac)  # the fine levels' slopes are large: a real check
    rows0 = _tangent_rows(np.concatenate([pts, np.full((n, D), 3.0, np.float32)], 1),
                          [np.full((n, 3 + D), 3.0, np.float32)] * 3)  # the encoding columns start non-zero
    args = (params, grid.slice.offset, *grid._level_arrays(), cfg.bound, cfg.n_features)
    runs = {"backend's": lambda X: grid.forward(X, n, 3, params, n_active, jacobian=True),
            "lanes": lambda X: hash_grid.hash_encode_forward_levels(
                X, n, 3, *args, cfg.n_levels, hash_grid.lane_width(cfg.n_levels), n_active, 1),
            "per level": lambda X: hash_grid.hash_encode_forward(X, n, 3, *args, n_active, 1)}
    for name, run in runs.items():
        X = buffers.rows16_upload(rows0)
        run(X)
        got = buffers.rows16_to_numpy(X, 3 + D)[:, 3:]
        assert _rel(got[0::4, :on], ref.detach().numpy()[:, :on]) < 1e-5, name
        for t in range(3):  # the fractional position's float32 rounding, times the level's resolution
            assert _rel(got[1 + t::4, :on], jac[t].detach().numpy()[:, :on]) < 5e-5, (name, t)
        assert (got[:, on:] == 0.0).all(), name  # off levels: value and Jacobian exactly 0
    # the table gradient of L = Σ G0·enc + Σ_t G_t·∂enc/∂x_t, with ∂enc/∂x_t kept differentiable
    rng = np.random.default_rng(5)
    G = [rng.normal(size=(n, D)).astype(np.float32) for _ in range(4)]
    G[0][::5] = 0.0  # a point whose value carries no gradient still scatters its Jacobian's
    xr = x.clone().requires_grad_()
    enc = hash_encode(xr, table, grid.res_np, grid.loff_np, grid.lsize_np, grid.ldense_np, cfg.bound, n_active)
    loss = (enc * t64(G[0])).sum()
    for t in range(3):
        (gx,) = torch.autograd.grad((enc * t64(G[1 + t])).sum(), xr, create_graph=True)
        loss = loss + gx[:, t].sum()
    loss.backward()
    want = theta.grad.numpy()
    dX = buffers.rows16_upload(_tangent_rows(np.concatenate([np.zeros((n, 3), np.float32), G[0]], 1),
                                             [np.concatenate([np.zeros((n, 3), np.float32), g], 1) for g in G[1:]]))
    X = buffers.rows16_upload(rows0)
    grid.forward(X, n, 3, params, n_active, jacobian=True)
    scatters = {"backend's": lambda g: grid.backward(X, dX, n, 3, g, n_active, jacobian=True),
                "by level": lambda g: hash_grid.hash_encode_backward_by_level(
                    X, dX, n, 3, g, grid.slice.offset, *grid._level_arrays(), cfg.bound, cfg.n_features,
                    cfg.n_levels, n_active, 1),
                "atomic": lambda g: hash_grid.hash_encode_backward_atomic(
                    X, dX, n, 3, g, grid.slice.offset, *grid._level_arrays(), cfg.bound, cfg.n_features,
                    n_active, 1)}
    for name, scatter in scatters.items():
        grads = layout.allocate()
        buffers.from_numpy(grads, np.full(layout.total, 0.5, np.float32))  # the scatter adds to what is there
        scatter(grads)
        got = buffers.to_numpy(grads) - 0.5
        assert np.abs(want).max() > 0
        assert _rel(got, want) < 1e-5, name


@pytest.mark.parametrize("act", ["relu", "softplus", "sigmoid"])
def test_fused_tangent_activation_equals_its_separate_passes(act):
    """The field runs a hidden layer's tangent rule inside the layer kernels: forward(preact=Z) writes Z and
    tangent_act_forward(Z) in one kernel; the next layer's backward(dx_act=…, dx_preact=Z) applies
    tangent_act_backward to its input gradient in one kernel. Both equal the separate passes (which the
    tests above hold against torch's jvp and double backward)."""
    n_in, n_hid, n_out, n = 20, 33, 17, 75
    layout = ParamLayout()
    l1 = Linear(layout, "l1", n_in, n_hid, act=act, beta=10.0)
    l2 = Linear(layout, "l2", n_hid, n_out)
    params = layout.allocate()
    rng = np.random.default_rng(12)
    buffers.from_numpy(params, rng.normal(0, 0.5, layout.total).astype(np.float32))
    x = rng.normal(size=(n, n_in)).astype(np.float32)
    rows = JAC_ROWS * n
    X = buffers.rows16_upload(_tangent_rows(x, [rng.normal(size=(n, n_in)).astype(np.float32) for _ in range(3)]))
    Z, Y = buffers.rows16(rows, n_hid), buffers.rows16(rows, n_hid)
    l1.forward(X, 0, Z, rows, params, bias_every=JAC_ROWS, activate=False)
    tangent_act_forward(Z, Y, n, JAC_ROWS, l1.act, l1.beta)
    Zf, Yf = buffers.rows16(rows, n_hid), buffers.rows16(rows, n_hid)
    l1.forward(X, 0, Yf, rows, params, bias_every=JAC_ROWS, preact=Zf)
    np.testing.assert_allclose(buffers.rows16_to_numpy(Zf, n_hid), buffers.rows16_to_numpy(Z, n_hid), rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(buffers.rows16_to_numpy(Yf, n_hid), buffers.rows16_to_numpy(Y, n_hid), rtol=1e-6,
                               atol=1e-7)
    out = buffers.rows16(rows, n_out)
    l2.forward(Y, 0, out, rows, params, bias_every=JAC_ROWS)
    U = rng.normal(size=(rows, n_out)).astype(np.float32)
    dX, dXf = buffers.rows16(rows, n_hid), buffers.rows16(rows, n_hid)
    g, gf = layout.allocate(), layout.allocate()
    l2.backward(Y, 0, out, buffers.rows16_upload(U), rows, params, g, dX=dX, dy_preact=True, bias_every=JAC_ROWS)
    tangent_act_backward(Z, Y, dX, n, JAC_ROWS, l1.act, l1.beta)
    l2.backward(Y, 0, out, buffers.rows16_upload(U), rows, params, gf, dX=dXf, dy_preact=True, bias_every=JAC_ROWS,
                dx_act=l1, dx_preact=Z)
    want = buffers.rows16_to_numpy(dX, n_hid)
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(buffers.rows16_to_numpy(dXf, n_hid), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(buffers.to_numpy(gf), buffers.to_numpy(g))
    with pytest.raises(ValueError, match="preact"):
        l1.forward(X, 0, Yf, rows - 1, params, bias_every=JAC_ROWS, preact=Zf)
    with pytest.raises(ValueError, match="dx_preact"):
        l2.backward(Y, 0, out, buffers.rows16_upload(U), rows, params, None, dX=dXf, dy_preact=True,
                    bias_every=JAC_ROWS, dx_preact=Z)


@pytest.mark.parametrize("act", ["none", "relu", "softplus", "sigmoid"])
def test_linear_layer_with_tangent_rows(act):
    """bias_every=4 + the activation's forward-mode rule = torch's jvp of the layer; the backward (bias
    from the points' rows, the activation's second derivative) = torch's double backward."""
    n_in, n_out, n = 20, 33, 75
    layout = ParamLayout()
    layout.add("before", (5,), "other")
    lin = Linear(layout, "l", n_in, n_out, act=act, beta=10.0)
    params = layout.allocate()
    rng = np.random.default_rng(11)
    theta_np = rng.normal(0, 0.5, layout.total).astype(np.float32)
    buffers.from_numpy(params, theta_np)
    x = rng.normal(size=(n, n_in)).astype(np.float32)
    xd = [rng.normal(size=(n, n_in)).astype(np.float32) for _ in range(3)]
    rows = JAC_ROWS * n
    X = buffers.rows16_upload(_tangent_rows(x, xd))
    Z, Y = buffers.rows16(rows, n_out), buffers.rows16(rows, n_out)
    lin.forward(X, 0, Z, rows, params, bias_every=JAC_ROWS, activate=False)
    tangent_act_forward(Z, Y, n, JAC_ROWS, lin.act, lin.beta)

    theta = t64(theta_np).requires_grad_()
    w, b = lin.W, lin.b

    def layer(inp):
        z = torch.nn.functional.linear(inp, theta[w.offset:w.offset + w.size].view(n_in, n_out).t(),
                                       theta[b.offset:b.offset + b.size])
        return {"none": z, "relu": torch.relu(z), "softplus": torch.nn.functional.softplus(z, beta=10.0),
                "sigmoid": torch.sigmoid(z)}[act]

    y = layer(t64(x))
    yd = [torch.func.jvp(layer, (t64(x),), (t64(v),))[1] for v in xd]
    got = buffers.rows16_to_numpy(Y, n_out)
    assert _rel(got[0::4], y.detach().numpy()) < 1e-5
    for t in range(3):
        assert _rel(got[1 + t::4], yd[t].detach().numpy()) < 1e-5, t
    # backward: L = Σ U0·y + Σ_t U_t·ẏ_t, with ẏ_t = J(x)·ẋ_t differentiable in θ (double backward)
    U = [rng.normal(size=(n, n_out)).astype(np.float32) for _ in range(4)]
    dY = buffers.rows16_upload(_tangent_rows(U[0], U[1:]))
    tangent_act_backward(Z, Y, dY, n, JAC_ROWS, lin.act, lin.beta)
    grads, dX = layout.allocate(), buffers.rows16(rows, n_in)
    lin.backward(X, 0, Y, dY, rows, params, grads, n_chunks=7, dX=dX, dy_preact=True, bias_every=JAC_ROWS)
    xr = t64(x).requires_grad_()
    xdr = [t64(v).requires_grad_() for v in xd]
    yr = layer(xr)
    loss = (yr * t64(U[0])).sum()
    for t in range(3):
        # ẏ_t = d/ds layer(x + s·ẋ_t) at s = 0, as a graph in θ, x and ẋ_t (double backward)
        s = torch.zeros((), dtype=torch.float64, requires_grad=True)
        (yt,) = torch.autograd.grad((layer(xr + s * xdr[t]) * t64(U[1 + t])).sum(), s, create_graph=True)
        loss = loss + yt
    loss.backward()
    g = buffers.to_numpy(grads)
    assert np.abs(theta.grad.numpy()).max() > 0
    assert _rel(g, theta.grad.numpy()) < 1e-5
    assert not g[:5].any()
    dx = buffers.rows16_to_numpy(dX, n_in)
    assert _rel(dx[0::4], xr.grad.numpy()) < 1e-5
    for t in range(3):
        assert _rel(dx[1 + t::4], xdr[t].grad.numpy()) < 1e-5, t


def test_analytic_normal_is_the_sdf_gradient():
    """At points away from cell faces the analytic normal equals the central difference of the SDF to
    O(ε²), and the eikonal term's gradient reaches the hash table through the Jacobian."""
    field, layout, params = small_field("analytic", seed=12)
    n = 200
    pts, d = random_batch(n, seed=13)
    out = field.forward(buffers.upload(pts), buffers.upload(d), n, params)
    normal = out.normal.to_numpy()[:n].astype(np.float64)
    eps = 1e-3
    fd = np.zeros_like(normal)
    for c in range(3):
        e = np.zeros(3, np.float32)
        e[c] = eps
        hi = field.sdf(buffers.upload(pts + e), n, params).to_numpy()[:n].astype(np.float64)
        lo = field.sdf(buffers.upload(pts - e), n, params).to_numpy()[:n].astype(np.float64)
        fd[:, c] = (hi - lo) / (2 * eps)
    err = np.linalg.norm(fd - normal, axis=1) / np.maximum(np.linalg.norm(normal, axis=1), 1e-6)
    assert np.median(err) < 1e-2 and np.mean(err < 5e-2) > 0.8  # the rest straddle a cell face
    grads = layout.allocate()
    dn = np.random.default_rng(14).normal(size=(n, 3)).astype(np.float32)
    field.backward(buffers.upload(np.zeros(n, np.float32)), buffers.upload(dn), None, params, grads)
    sl = field.encoding.slice
    assert np.abs(buffers.to_numpy(grads)[sl.offset:sl.offset + sl.size]).max() > 0


def test_analytic_mode_refuses_the_laplacian():
    field, layout, params = small_field("analytic", seed=15)
    n = 16
    pts, d = random_batch(n, seed=16)
    with pytest.raises(ValueError, match="Laplacian"):
        field.forward(buffers.upload(pts), buffers.upload(d), n, params, laplacian=True)
