"""Losses: values and hand-written gradients against float64 torch autograd."""

import numpy as np
import pytest
import torch

from taichi_neus import buffers
from taichi_neus.train import losses

torch.set_default_dtype(torch.float64)


def f32(a):
    return np.asarray(a, np.float32).astype(np.float64)


@pytest.mark.portable
@pytest.mark.parametrize("use_mask", [False, True])
def test_colour_l1_matches_torch(use_mask):
    rng = np.random.default_rng(0)
    r = 300  # more than one reduction chunk
    pred, target = f32(rng.uniform(0, 1, (r, 3))), f32(rng.uniform(0, 1, (r, 3)))
    mask = f32(rng.uniform(0, 1, r) > 0.4)
    p = torch.tensor(pred, requires_grad=True)
    if use_mask:
        sel = torch.tensor(mask) > 0.5
        ref = torch.nn.functional.l1_loss(p[sel], torch.tensor(target)[sel])
    else:
        ref = torch.nn.functional.l1_loss(p, torch.tensor(target))
    (2.0 * ref).backward()
    loss, grad = losses.colour_l1(buffers.upload(pred), buffers.upload(target),
                                  buffers.upload(mask) if use_mask else None, weight=2.0)
    assert loss == pytest.approx(2.0 * ref.item(), rel=1e-5)
    np.testing.assert_allclose(grad.to_numpy(), p.grad.numpy(), rtol=1e-5, atol=1e-9)


@pytest.mark.portable
def test_colour_l1_accumulates_and_empty_mask():
    rng = np.random.default_rng(1)
    pred, target = rng.uniform(0, 1, (10, 3)), rng.uniform(0, 1, (10, 3))
    g = buffers.upload(np.full((10, 3), 0.5))
    loss, grad = losses.colour_l1(buffers.upload(pred), buffers.upload(target), buffers.upload(np.zeros(10)),
                                  grad_out=g, accumulate=True)
    assert loss == 0.0
    np.testing.assert_array_equal(grad.to_numpy(), np.full((10, 3), 0.5, np.float32))
    loss, grad = losses.colour_l1(buffers.upload(pred), buffers.upload(target), grad_out=g, accumulate=True)
    expected = 0.5 + np.sign(pred - target) / 30.0
    np.testing.assert_allclose(grad.to_numpy(), expected, rtol=1e-6)


@pytest.mark.portable
def test_mask_bce_matches_torch():
    rng = np.random.default_rng(2)
    r = 260
    opacity = rng.uniform(0, 1, r)
    opacity[:5] = [0.0, 1.0, 5e-4, 1 - 1e-4, 0.5]  # some clamped
    opacity = f32(opacity)
    mask = f32(rng.uniform(0, 1, r) > 0.5)
    mask[:3] = 0.3  # soft mask values too
    o = torch.tensor(opacity, requires_grad=True)
    oc = o.clamp(1e-3, 1 - 1e-3)
    m = torch.tensor(mask)
    ref = 0.1 * torch.nn.functional.binary_cross_entropy(oc, m)
    ref.backward()
    loss, grad = losses.mask_bce(buffers.upload(opacity), buffers.upload(mask))
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    np.testing.assert_allclose(grad.to_numpy(), o.grad.numpy(), rtol=1e-4, atol=1e-8)
    assert np.all(grad.to_numpy()[:4] == 0.0)


@pytest.mark.portable
def test_eikonal_matches_torch():
    rng = np.random.default_rng(3)
    cap, n = 700, 650
    normal = f32(rng.normal(size=(cap, 3)) * rng.uniform(0.3, 2.0, (cap, 1)))
    positions = f32(rng.uniform(-1.2, 1.2, (cap, 3)))
    nt = torch.tensor(normal, requires_grad=True)
    inside = torch.tensor(np.linalg.norm(positions, axis=1) < 1.05)
    inside[n:] = False
    assert 50 < int(inside.sum()) < n
    ref = 0.1 * ((nt[inside].norm(dim=-1) - 1.0) ** 2).mean()
    ref.backward()
    g0 = np.full((cap, 3), 7.0, np.float32)  # entries >= n must stay untouched
    g = buffers.upload(g0)
    loss, grad = losses.eikonal(buffers.upload(normal), buffers.upload(positions), n, grad_out=g)
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    out = grad.to_numpy()
    np.testing.assert_allclose(out[:n], nt.grad.numpy()[:n], rtol=1e-4, atol=1e-9)
    np.testing.assert_array_equal(out[n:], g0[n:])


@pytest.mark.portable
def test_sparse_sdf_matches_torch():
    rng = np.random.default_rng(4)
    cap, n = 600, 530  # more than one reduction chunk; entries >= n ignored
    sdf = f32(rng.normal(0, 0.05, cap))
    sdf[:2] = 0.0  # |f| has no gradient at 0
    w = f32(rng.uniform(0.1, 2.0, cap))
    s = torch.tensor(sdf, requires_grad=True)
    wt = torch.tensor(w)
    ref = 0.3 * (wt[:n] * s[:n].abs()).sum() / wt[:n].sum()
    ref.backward()
    g0 = np.full(cap, 5.0, np.float32)
    loss, grad = losses.sparse_sdf(buffers.upload(sdf), buffers.upload(w), n, weight=0.3, grad_out=buffers.upload(g0))
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    out = grad.to_numpy()
    np.testing.assert_allclose(out[:n], s.grad.numpy()[:n], rtol=1e-5, atol=1e-10)
    np.testing.assert_array_equal(out[n:], g0[n:])
    assert np.all(out[:2] == 0.0)


@pytest.mark.portable
def test_sparse_sdf_accumulates_and_zero_weights():
    sdf = buffers.upload(np.array([0.1, -0.2, 0.3], np.float32))
    loss, grad = losses.sparse_sdf(sdf, buffers.upload(np.zeros(3, np.float32)), 3)
    assert loss == 0.0 and np.all(grad.to_numpy() == 0.0)
    g = buffers.upload(np.ones(3, np.float32))
    loss, grad = losses.sparse_sdf(sdf, buffers.upload(np.ones(3, np.float32)), 3, weight=0.6, grad_out=g,
                                   accumulate=True)
    assert loss == pytest.approx(0.6 * 0.2, rel=1e-6)
    np.testing.assert_allclose(grad.to_numpy(), [1.2, 0.8, 1.2], rtol=1e-6)


@pytest.mark.portable
def test_depth_l1_matches_torch():
    rng = np.random.default_rng(5)
    r = 700
    depth = f32(rng.uniform(0.5, 3.0, r))
    target = f32(rng.uniform(0.5, 3.0, r))
    target[rng.uniform(0, 1, r) < 0.3] = 0.0  # unknown
    target[:3] = [-1.0, 0.0, float(depth[2])]  # negative: unknown; equal: no gradient
    d = torch.tensor(depth, requires_grad=True)
    known = torch.tensor(target > 0)
    ref = 0.2 * (d[known] - torch.tensor(target)[known]).abs().mean()
    ref.backward()
    loss, grad = losses.depth_l1(buffers.upload(depth), buffers.upload(target), weight=0.2)
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    np.testing.assert_allclose(grad.to_numpy(), d.grad.numpy(), rtol=1e-5, atol=1e-10)
    assert np.all(grad.to_numpy()[:3] == 0.0)
    loss, grad = losses.depth_l1(buffers.upload(depth), buffers.upload(np.zeros(r, np.float32)))
    assert loss == 0.0 and np.all(grad.to_numpy() == 0.0)


@pytest.mark.portable
def test_curvature_loss_value_and_gradient():
    """weight · mean |Δf| over the samples inside r = 1.05, and its (sub)gradient, against numpy."""
    rng = np.random.default_rng(11)
    cap, n = 300, 257
    lap = rng.normal(0, 3, cap).astype(np.float32)
    lap[5] = 0.0
    pos = rng.uniform(-1.2, 1.2, (cap, 3)).astype(np.float32)
    loss, g = losses.curvature(buffers.upload(lap), buffers.upload(pos), n, weight=0.02)
    inside = (pos[:n].astype(np.float64) ** 2).sum(1) < 1.05**2
    ref = 0.02 * np.abs(lap[:n][inside]).mean()
    assert loss == pytest.approx(ref, rel=1e-5)
    gref = np.where(inside, 0.02 * np.sign(lap[:n]) / inside.sum(), 0.0)
    assert np.allclose(g.to_numpy()[:n], gref, rtol=1e-5, atol=1e-9)
