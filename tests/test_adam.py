import numpy as np
import pytest
import taichi as ti
import torch

from taichi_neus import buffers
from taichi_neus.field.params import ParamLayout
from taichi_neus.train.adam import Adam, GroupSettings

pytestmark = pytest.mark.portable


def test_adam_matches_torch_with_groups():
    layout = ParamLayout()
    layout.add("a", (50,), "g1")
    layout.add("b", (7, 3), "g2")
    layout.add("c", (5,), "g1")
    params, grads = layout.allocate(), layout.allocate()
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=layout.total).astype(np.float32)
    buffers.from_numpy(params, p0)
    opt = Adam(layout, {"g1": (1e-2, 0.0), "g2": (3e-3, 0.1)}, betas=(0.9, 0.99), eps=1e-8)
    tp = {k: torch.tensor(layout.view(p0.astype(np.float64), k).copy(), requires_grad=True) for k in "abc"}
    topt = torch.optim.AdamW([{"params": [tp["a"], tp["c"]], "lr": 1e-2, "weight_decay": 0.0},
                              {"params": [tp["b"]], "lr": 3e-3, "weight_decay": 0.1}], betas=(0.9, 0.99), eps=1e-8)
    for step in range(5):
        g = rng.normal(size=layout.total).astype(np.float32)
        buffers.from_numpy(grads, g)
        opt.step(params, grads, lr_scale=0.5 if step == 4 else 1.0)
        for grp in topt.param_groups:
            grp["lr"] = (1e-2 if grp["weight_decay"] == 0 else 3e-3) * (0.5 if step == 4 else 1.0)
        for k in "abc":
            tp[k].grad = torch.tensor(layout.view(g.astype(np.float64), k).copy())
        topt.step()
    got = buffers.to_numpy(params).astype(np.float64)
    for k in "abc":
        np.testing.assert_allclose(layout.view(got, k), tp[k].detach().numpy(), rtol=1e-5, atol=1e-6)


def _adam_reference(p, m, v, g, step, lr, b1, b2, eps, wd):
    """Dense AdamW in float64 (decoupled weight decay on the parameter before the step)."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    upd = (m / (1 - b1 ** step)) / (np.sqrt(v / (1 - b2 ** step)) + eps) + wd * p
    return p - lr * upd, m, v


def test_dense_adam_vector_path_matches_float64_with_unaligned_ends(monkeypatch):
    """On the CPU the dense update runs 16-float vectors over the 16-aligned middle of each run and the scalar
    kernel over its ends; elsewhere the scalar kernel over all. Runs whose start and end are not multiples of
    16 (a limit cutting a group, a direct call at an odd start) must update every entry by the float64 rule,
    and clear every gradient, whichever kernel took it."""
    from taichi_neus import runtime
    from taichi_neus.train import adam as adam_mod

    calls = []
    vec = adam_mod._adam_run16
    monkeypatch.setattr(adam_mod, "_adam_run16", lambda *a: (calls.append(a[0].shape), vec(*a))[1])
    layout = ParamLayout()
    layout.add("t", (1000,), "enc")
    layout.add("w", (37,), "mlp")
    params, grads = layout.allocate(), layout.allocate()
    rng = np.random.default_rng(7)
    p0 = rng.normal(size=layout.total).astype(np.float32)
    buffers.from_numpy(params, p0)
    b1, b2, eps, wd = 0.9, 0.99, 1e-8, 0.01
    opt = Adam(layout, {"enc": GroupSettings(1e-2, wd), "mlp": GroupSettings(3e-3)}, betas=(b1, b2), eps=eps)
    t_sl = layout["t"]
    used = 997  # cut inside a 16-float block: the vector middle ends at 992, the tail is 5 floats
    ref = layout.view(p0.astype(np.float64), "t").copy()[:used]
    m = np.zeros_like(ref)
    v = np.zeros_like(ref)
    for step in range(1, 4):
        g = rng.normal(size=layout.total).astype(np.float32)
        buffers.from_numpy(grads, g)
        opt.step(params, grads, zero_grads=True, limits={"enc": used})
        ref, m, v = _adam_reference(ref, m, v, layout.view(g.astype(np.float64), "t")[:used], step, 1e-2, b1, b2,
                                    eps, wd)
        left = buffers.to_numpy(grads)
        np.testing.assert_array_equal(left[:t_sl.offset + used], 0.0)  # cleared as read ...
        np.testing.assert_array_equal(layout.view(left, "t")[used:], layout.view(g, "t")[used:])  # ... and no further
    got = layout.view(buffers.to_numpy(params).astype(np.float64), "t")
    np.testing.assert_allclose(got[:used], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[used:], layout.view(p0, "t")[used:])  # beyond the limit: untouched
    # a direct call at an odd start: a scalar head, the vector middle, a scalar tail
    before = buffers.to_numpy(params).astype(np.float64)
    g = rng.normal(size=layout.total).astype(np.float32)
    buffers.from_numpy(grads, g)
    mo, vo = (buffers.to_numpy(x).astype(np.float64) for x in (opt.m, opt.v))
    opt._dense(params, grads, 5, 300, (1e-2, b1, b2, eps, 0.5, 0.6, 0.0, 1.0, 1))
    mi = b1 * mo + (1 - b1) * g
    vi = b2 * vo + (1 - b2) * g.astype(np.float64) ** 2
    want = before - 1e-2 * (mi / 0.5) / (np.sqrt(vi / 0.6) + eps)
    after = buffers.to_numpy(params)
    np.testing.assert_allclose(after[5:305], want[5:305], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(after[:5], before[:5])
    np.testing.assert_array_equal(after[305:], before[305:])
    if runtime.simd_enabled():  # the CPU took the vector kernel for the aligned middles (992 and 16..304)
        assert calls[-1] == (18, 16) and calls[0] == (62, 16)
    else:
        assert calls == []


def _sparse_adam_reference(p, m, v, t, g, lr, b1, b2, eps, wd):
    """tiny-cuda-nn's rule for hash tables in float64: untouched entries (g == 0) do not move at all."""
    hit = g != 0
    t = t + hit
    m = np.where(hit, b1 * m + (1 - b1) * g, m)
    v = np.where(hit, b2 * v + (1 - b2) * g * g, v)
    with np.errstate(divide="ignore", invalid="ignore"):
        upd = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps) + wd * p
    p = np.where(hit, p - lr * upd, p)
    return p, m, v, t


def test_sparse_adam_skips_zero_gradients_and_counts_steps_per_entry():
    layout = ParamLayout()
    layout.add("table", (200,), "enc")
    layout.add("w", (30,), "mlp")
    params, grads = layout.allocate(), layout.allocate()
    rng = np.random.default_rng(1)
    p0 = rng.normal(size=layout.total).astype(np.float32)
    buffers.from_numpy(params, p0)
    b1, b2, eps = 0.9, 0.99, 1e-8
    opt = Adam(layout, {"enc": GroupSettings(1e-2, 0.01, sparse=True), "mlp": GroupSettings(3e-3)},
               betas=(b1, b2), eps=eps)
    dense = Adam(layout, {"enc": GroupSettings(1e-2, 0.01), "mlp": GroupSettings(3e-3)}, betas=(b1, b2), eps=eps)
    params_dense = layout.allocate()
    buffers.from_numpy(params_dense, p0)
    ref_p = layout.view(p0.astype(np.float64), "table").copy()
    ref_m, ref_v, ref_t = np.zeros_like(ref_p), np.zeros_like(ref_p), np.zeros(ref_p.shape, np.int64)
    for step in range(6):
        g = rng.normal(size=layout.total).astype(np.float32)
        gt = layout.view(g, "table")
        gt[rng.random(gt.shape) < 0.6] = 0.0  # most cells untouched this step
        if step == 0:
            gt[:10] = 0.0  # these are never touched: they must not move at all
            never = np.arange(10)
        else:
            gt[never] = 0.0
        buffers.from_numpy(grads, g)
        opt.step(params, grads)
        dense.step(params_dense, grads)
        ref_p, ref_m, ref_v, ref_t = _sparse_adam_reference(ref_p, ref_m, ref_v, ref_t, gt.astype(np.float64),
                                                            1e-2, b1, b2, eps, 0.01)
    got = buffers.to_numpy(params).astype(np.float64)
    np.testing.assert_allclose(layout.view(got, "table"), ref_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(layout.view(got, "table")[never], layout.view(p0, "table")[never])
    st = opt.state_dict()
    np.testing.assert_array_equal(layout.view(st["t"], "table"), ref_t)
    # The dense group follows ordinary Adam, identical to the all-dense optimiser.
    np.testing.assert_array_equal(layout.view(got, "w"), layout.view(buffers.to_numpy(params_dense), "w"))
    # The sparse rule differs from dense Adam wherever a gradient was zero (dense decays the moments).
    assert not np.allclose(layout.view(got, "table"), layout.view(buffers.to_numpy(params_dense), "table"))


def test_sparse_adam_state_round_trips_and_fills_counts_from_a_dense_checkpoint():
    layout = ParamLayout()
    layout.add("table", (64,), "enc")
    params, grads = layout.allocate(), layout.allocate()
    buffers.from_numpy(grads, np.ones(64, np.float32))
    dense = Adam(layout, {"enc": GroupSettings(1e-2)})
    for _ in range(3):
        dense.step(params, grads)
    sparse = Adam(layout, {"enc": GroupSettings(1e-2, sparse=True)})
    sparse.load_state_dict(dense.state_dict())
    np.testing.assert_array_equal(sparse.state_dict()["t"], np.full(64, 3))
    again = Adam(layout, {"enc": GroupSettings(1e-2, sparse=True)})
    again.load_state_dict(sparse.state_dict())
    for k in ("m", "v", "t"):
        np.testing.assert_array_equal(again.state_dict()[k], sparse.state_dict()[k])


def test_sparse_adam_bias_corrections_hold_past_the_first_table():
    """The sparse kernel reads 1 − β^t from a host table that grows with the step count: a run resumed at
    step 3000 (entries touched 0, 5 or 2999 times before) must match the float64 rule across the growth."""
    layout = ParamLayout()
    layout.add("table", (90,), "enc")
    params, grads = layout.allocate(), layout.allocate()
    rng = np.random.default_rng(4)
    p0 = rng.normal(size=90).astype(np.float32)
    b1, b2, eps = 0.9, 0.999, 1e-8  # β2 close to 1: its correction still differs from 1 at t ≈ 3000
    m0 = (rng.normal(size=90) * 0.1).astype(np.float32)
    v0 = (rng.random(90) * 0.01).astype(np.float32)
    t0 = np.repeat(np.array([0, 5, 2999], np.int32), 30)
    opt = Adam(layout, {"enc": GroupSettings(1e-2, sparse=True)}, betas=(b1, b2), eps=eps)
    opt.load_state_dict({"m": m0, "v": v0, "step": np.int64(2999), "t": t0})
    buffers.from_numpy(params, p0)
    ref = (p0.astype(np.float64), m0.astype(np.float64), v0.astype(np.float64), t0.astype(np.int64))
    for _ in range(3):
        g = rng.normal(size=90).astype(np.float32)
        g[rng.random(90) < 0.3] = 0.0
        buffers.from_numpy(grads, g)
        opt.step(params, grads)
        ref = _sparse_adam_reference(*ref, g.astype(np.float64), 1e-2, b1, b2, eps, 0.0)
    np.testing.assert_allclose(buffers.to_numpy(params), ref[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(opt.state_dict()["t"], ref[3])


def test_large_buffers_round_trip_in_chunks_float_and_int():
    """Buffers above the copy chunk (2²¹) go through staged copies: float32 parameters and the sparse
    optimiser's int32 step counts (a checkpoint of a full-size sparse run once failed here)."""
    n = buffers._CHUNK * 2 + 12345
    f = np.random.default_rng(0).normal(size=n).astype(np.float32)
    i = np.arange(n, dtype=np.int32) * 7
    a, b = buffers.f32(n), ti.ndarray(ti.i32, shape=(n,))
    buffers.from_numpy(a, f)
    buffers.from_numpy(b, i)
    assert np.array_equal(buffers.to_numpy(a), f) and buffers.to_numpy(a).dtype == np.float32
    assert np.array_equal(buffers.to_numpy(b), i) and buffers.to_numpy(b).dtype == np.int32


def _table_and_mlp(table: int, mlp: int, sparse: bool, seed: int):
    """A layout of a hash-table-like group and an MLP-like one, its initial parameters and an Adam factory."""
    layout = ParamLayout()
    layout.add("t", (table,), "table")
    layout.add("w", (mlp,), "mlp")
    p0 = np.random.default_rng(seed).normal(size=layout.total).astype(np.float32)

    def fresh():
        params, grads = layout.allocate(), layout.allocate()
        buffers.from_numpy(params, p0)
        return params, grads, Adam(layout, {"table": GroupSettings(1e-2, sparse=sparse),
                                            "mlp": GroupSettings(3e-3, 0.01)})
    return layout, p0, fresh


@pytest.mark.parametrize("sparse", [False, True])
def test_zero_grads_clears_the_gradients_and_updates_as_without(sparse):
    """``zero_grads``: the kernels clear the gradient buffer as they read it (the trainer's next backward then
    starts from zeros without a pass of its own); the parameters and moments are exactly those of a step
    without it."""
    layout, p0, fresh = _table_and_mlp(300, 40, sparse, seed=5)
    results = []
    for zero in (False, True):
        params, grads, opt = fresh()
        g_rng = np.random.default_rng(6)
        for _ in range(3):
            g = g_rng.normal(size=layout.total).astype(np.float32)
            g[g_rng.random(layout.total) < 0.4] = 0.0  # untouched entries, as in a hash table
            g[300:304] = 0.0  # the alignment padding between the groups: no parameter, never a gradient
            buffers.from_numpy(grads, g)
            opt.step(params, grads, zero_grads=zero)
            left = buffers.to_numpy(grads)
            assert np.array_equal(left, np.zeros_like(g) if zero else g)
        results.append([buffers.to_numpy(a).copy() for a in (params, opt.m, opt.v)])
    for a, b in zip(*results, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("sparse", [False, True])
def test_limits_skip_entries_out_of_use_exactly(sparse):
    """``limits``: the tail of a group whose gradients and moments are zero (hash-grid levels not yet on) is
    skipped; Adam would have left it unchanged, so parameters and moments equal a full update's, bit for bit."""
    layout, p0, fresh = _table_and_mlp(500, 24, sparse, seed=8)
    results = []
    for limits in (None, {"table": 320}):
        params, grads, opt = fresh()
        g_rng = np.random.default_rng(9)
        for _ in range(4):
            g = g_rng.normal(size=layout.total).astype(np.float32)
            g[320:500] = 0.0  # the levels that are off: never a gradient
            buffers.from_numpy(grads, g)
            opt.step(params, grads, limits=limits)
        results.append([buffers.to_numpy(a).copy() for a in (params, opt.m, opt.v)])
    for a, b in zip(*results, strict=True):
        assert np.array_equal(a, b)
    assert not np.array_equal(results[0][0][:320], p0[:320]) and np.array_equal(results[0][0][320:500], p0[320:500])


def test_host_views_alias_the_buffer_and_copies_take_rows():
    """On the CPU a float32/int32 ndarray's host view is its memory (a write shows in a kernel's read, a kernel's
    write in the view); to_numpy(rows) copies the first rows; from_numpy fills any shape. Elsewhere there is no
    view and the same calls go through Taichi's copies with the same results."""
    from taichi_neus import runtime

    rng = np.random.default_rng(3)
    a = buffers.f32(37, 3)
    vals = rng.normal(size=(37, 3)).astype(np.float32)
    buffers.from_numpy(a, vals)
    np.testing.assert_array_equal(a.to_numpy(), vals)  # Taichi's own copy sees what the view wrote
    np.testing.assert_array_equal(buffers.to_numpy(a, 5), vals[:5])
    got = buffers.to_numpy(a)
    got[0, 0] = 99.0  # a copy, not the buffer
    assert a.to_numpy()[0, 0] == vals[0, 0]
    ids = buffers.upload(np.arange(10, dtype=np.int32), ti.i32)
    np.testing.assert_array_equal(buffers.to_numpy(ids, 4), np.arange(4))
    with pytest.raises(ValueError, match="size mismatch"):
        buffers.from_numpy(a, np.zeros(10, np.float32))
    h = buffers.host_view(a)
    vec = ti.ndarray(buffers.V16, shape=(2,))
    assert buffers.host_view(vec) is None  # vector ndarrays have no flat view
    if runtime.current_arch() != "cpu":
        assert h is None and buffers.vec16_view(a, 0, 16) is None
        return
    buffers.fill_(a, 2.5)  # a kernel's write shows in the view
    np.testing.assert_array_equal(h, 2.5)
    flat = buffers.f32(64)
    assert buffers.vec16_view(flat, 8, 40) is None and buffers.vec16_view(flat, 0, 40) is None  # not 16-aligned
    assert buffers.vec16_view(flat, 16, 80) is None  # past the end
    if runtime.simd_enabled():
        v = buffers.vec16_view(flat, 16, 48)
        assert v.shape == (2, 16)
        v[:] = 1.0
        np.testing.assert_array_equal(buffers.to_numpy(flat), np.r_[np.zeros(16), np.ones(32), np.zeros(16)])
