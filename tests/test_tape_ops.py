"""The field and the compositing inside ``ti.ad.Tape``, composed with the caller's own differentiable Taichi
kernels (x = o + t·d before, a loss after): the gradients equal the torch path's, on CPU and Vulkan.

On the CPU these run in their own process with SIMD vectors off (``TAICHI_NEUS_SIMD=0``, scripts/test.sh):
Taichi 1.7.4 aborts compiling the caller's whole-vector kernels with them on, so the Tape operations
refuse to start there (checked in the main run)."""

import numpy as np
import pytest
import taichi as ti
import torch
from field_helpers import small_field

from taichi_neus import buffers, runtime
from taichi_neus.field.tape_ops import TapeField
from taichi_neus.field.torch_ops import field_forward
from taichi_neus.render.tape_ops import TapeCompositor
from taichi_neus.render.torch_ops import composite

pytestmark = pytest.mark.portable


@pytest.fixture(autouse=True)
def _scalarised_cpu(ti_arch, request):
    if runtime.simd_enabled() and request.node.name != "test_tape_operations_refuse_simd_cpu":
        pytest.skip("Tape operations run in the TAICHI_NEUS_SIMD=0 job (Taichi cannot compile their vector kernels)")


def test_tape_operations_refuse_simd_cpu():
    if not runtime.simd_enabled():
        pytest.skip("only where the CPU runs with SIMD vectors")
    field, _, params = small_field("tetrahedral", seed=1)
    for make in (lambda: TapeField(field, params), lambda: TapeCompositor(0.3)):
        with pytest.raises(runtime.BackendError, match=r"simd=False.*TAICHI_NEUS_SIMD=0"):
            make()

R, K = 6, 8  # rays, samples per ray (the last ray gets none)
V3 = ti.types.vector(3, ti.f32)


@ti.kernel
def _points(o: ti.template(), d: ti.template(), t: ti.template(), rid: ti.template(), pos: ti.template(),
            vdir: ti.template()):
    for i in pos:
        r = rid[i]
        pos[i] = o[r] + t[i] * d[r]
        vdir[i] = d[r]


@ti.kernel
def _loss(colour: ti.template(), opacity: ti.template(), depth: ti.template(), wc: ti.template(),
          wo: ti.template(), wd: ti.template(), loss: ti.template()):
    for r in colour:
        loss[None] += colour[r].dot(wc[r]) + opacity[r] * wo[r] + depth[r] * wd[r]


def _setup(seed):
    rng = np.random.default_rng(seed)
    o = (np.array([0.1, -0.2, -2.2]) + rng.normal(0, 0.05, (R, 3))).astype(np.float32)
    d = np.array([0.0, 0.05, 1.0]) + rng.normal(0, 0.15, (R, 3))
    d = (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)
    counts = np.array([K] * (R - 1) + [0], np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
    S = int(counts.sum())
    t = np.concatenate([1.6 + 0.13 * np.arange(K) + rng.uniform(0, 0.02, K) for _ in range(R - 1)]).astype(np.float32)
    delta = np.full(S, 0.13, np.float32)
    rid = np.repeat(np.arange(R), counts).astype(np.int32)
    w = [rng.normal(size=s).astype(np.float32) for s in [(R, 3), (R,), (R,)]]
    return dict(o=o, d=d, counts=counts, offsets=offsets, t=t, delta=delta, rid=rid, w=w, S=S)


def _torch_path(field, params_np, p, var, eps, r, bg):
    theta = torch.from_numpy(params_np.copy()).requires_grad_()
    o, d = torch.from_numpy(p["o"]).requires_grad_(), torch.from_numpy(p["d"]).requires_grad_()
    t = torch.from_numpy(p["t"]).requires_grad_()
    v = torch.tensor([var], dtype=torch.float32, requires_grad=True)
    rid = torch.from_numpy(p["rid"]).long()
    pos = o[rid] + t[:, None] * d[rid]
    sdf, normal, rgb = field_forward(field, theta, pos, d[rid], eps)
    col, opa, dep = composite(sdf, normal, rgb, torch.from_numpy(p["delta"]), t, d, v, torch.from_numpy(p["offsets"]),
                              torch.from_numpy(p["counts"]), r, bg)
    w = [torch.from_numpy(a) for a in p["w"]]
    loss = (col * w[0]).sum() + (opa * w[1]).sum() + (dep * w[2]).sum()
    loss.backward()
    return {"loss": float(loss.detach()), "params": theta.grad.numpy(), "o": o.grad.numpy(), "d": d.grad.numpy(),
            "t": t.grad.numpy(), "variance": v.grad.numpy()}


def _vec(n, data=None, grad=True):
    f = ti.Vector.field(3, ti.f32, shape=(n,), needs_grad=grad)
    if data is not None:
        f.from_numpy(data)
    return f


def _scal(n, data=None, grad=True, dtype=ti.f32):
    f = ti.field(dtype, shape=(n,), needs_grad=grad and dtype == ti.f32)
    if data is not None:
        f.from_numpy(data)
    return f


def test_tape_gradients_equal_torch_path():
    field, layout, params = small_field(seed=51)
    p = _setup(52)
    S, var, eps, r, bg = p["S"], 0.28, 1e-2, 0.6, (0.1, 0.2, 0.3)
    params_np = buffers.to_numpy(params).copy()
    ref = _torch_path(field, params_np, p, var, eps, r, bg)

    tf = TapeField(field, params_np, eps=eps)
    tc = TapeCompositor(var, cos_anneal_ratio=r, background=bg)
    o, d = _vec(R, p["o"]), _vec(R, p["d"])
    t, delta = _scal(S, p["t"]), _scal(S, p["delta"], grad=False)
    rid = _scal(S, p["rid"], dtype=ti.i32)
    offsets, counts = _scal(R, p["offsets"], dtype=ti.i32), _scal(R, p["counts"], dtype=ti.i32)
    pos, vdir = _vec(S), _vec(S)
    sdf, normal, rgb = _scal(S), _vec(S), _vec(S)
    colour, opacity, depth = _vec(R), _scal(R), _scal(R)
    wc, wo, wd = _vec(R, p["w"][0], grad=False), _scal(R, p["w"][1], grad=False), _scal(R, p["w"][2], grad=False)
    loss = ti.field(ti.f32, shape=(), needs_grad=True)

    def run():
        with ti.ad.Tape(loss=loss):
            _points(o, d, t, rid, pos, vdir)
            tf.forward(pos, vdir, sdf, normal, rgb)
            tc.forward(sdf, normal, rgb, delta, t, d, offsets, counts, colour, opacity, depth)
            _loss(colour, opacity, depth, wc, wo, wd, loss)
        return {"loss": float(loss[None]), "params": tf.params.grad.to_numpy(), "o": o.grad.to_numpy(),
                "d": d.grad.to_numpy(), "t": t.grad.to_numpy(), "variance": tc.variance.grad.to_numpy()}

    got = run()
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-5)
    for k in ("params", "o", "d", "t", "variance"):
        scale = np.abs(ref[k]).max()
        assert scale > 1e-4, k
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=2e-5 * scale, err_msg=k)
    # the Tape clears every gradient on entry: a second run gives the same gradients, not twice them
    again = run()
    for k in ("params", "o", "d", "variance"):
        np.testing.assert_allclose(again[k], got[k], rtol=1e-5, atol=1e-6 * np.abs(got[k]).max(), err_msg=k)


def test_tape_field_twice_on_one_tape_adds_both_calls():
    """Two forwards of the same field on one Tape: each backward recomputes its own activations."""
    field, _, params = small_field(seed=53)
    rng = np.random.default_rng(54)
    n = 40
    pa, pb = (rng.uniform(-0.8, 0.8, (n, 3)).astype(np.float32) for _ in range(2))
    dn = rng.normal(size=(n, 3))
    dn = (dn / np.linalg.norm(dn, axis=1, keepdims=True)).astype(np.float32)
    params_np = buffers.to_numpy(params).copy()
    tf = TapeField(field, params_np)
    xa, xb, dirs = _vec(n, pa), _vec(n, pb), _vec(n, dn, grad=False)
    outs = [(_scal(n), _vec(n), _vec(n)) for _ in range(2)]
    loss = ti.field(ti.f32, shape=(), needs_grad=True)

    @ti.kernel
    def total(s1: ti.template(), c1: ti.template(), s2: ti.template(), c2: ti.template(), loss: ti.template()):
        for i in s1:
            loss[None] += s1[i] * 2.0 + c1[i].sum() - s2[i] + 0.5 * c2[i].sum()

    with ti.ad.Tape(loss=loss):
        tf.forward(xa, dirs, *outs[0])
        tf.forward(xb, dirs, *outs[1])
        total(outs[0][0], outs[0][2], outs[1][0], outs[1][2], loss)

    theta = torch.from_numpy(params_np).requires_grad_()
    ta, tb = torch.from_numpy(pa).requires_grad_(), torch.from_numpy(pb).requires_grad_()
    s1, _, c1 = field_forward(field, theta, ta, torch.from_numpy(dn))
    s2, _, c2 = field_forward(field, theta, tb, torch.from_numpy(dn))
    (s1.sum() * 2 + c1.sum() - s2.sum() + 0.5 * c2.sum()).backward()
    for got, want in ((tf.params.grad.to_numpy(), theta.grad.numpy()), (xa.grad.to_numpy(), ta.grad.numpy()),
                      (xb.grad.to_numpy(), tb.grad.numpy())):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5 * np.abs(want).max())
