"""Coarse-to-fine hash-grid levels (Neuralangelo, NeuS2): the kernels with ``n_active`` levels on, the field's
``active_levels``, the trainer's level and ε schedules, the pixel-footprint cap, and a short training run."""

import math

import numpy as np
import pytest
from field_helpers import random_batch, small_field, t64
from training_helpers import small_config

from taichi_neus import buffers
from taichi_neus.field import hash_grid
from taichi_neus.field.hash_grid import HashGrid, HashGridConfig, cell_widths, levels_for_footprint
from taichi_neus.field.params import ParamLayout
from taichi_neus.field.torch_reference import TorchField, hash_encode
from taichi_neus.train.config import Config

# 2 dense and 3 hashed levels (as tests/test_field.py), so both indexing paths are switched off and on
CFG = HashGridConfig(n_levels=5, n_features=2, log2_table=10, base_resolution=3, per_level_scale=2.2, init_scale=0.5)
N = 200


def _rel(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-12)


def _grid(seed):
    layout = ParamLayout()
    grid = HashGrid(CFG, layout)
    params = layout.allocate()
    grid.init_params(params, seed=seed)
    return grid, layout, params


def _points(seed):
    pts, _ = random_batch(N, seed=seed, lo=-1.1, hi=1.1)  # some outside the domain (clamped)
    return pts


def _encode(grid, params, pts, n_active, fill=7.0):
    """Encoding (N, L·F) of ``pts``; the output columns start as ``fill``, so zeros must be written."""
    X = buffers.rows16_upload(np.concatenate([pts, np.full((N, CFG.out_dim), fill, np.float32)], 1))
    grid.forward(X, N, 3, params, n_active)
    return X, buffers.rows16_to_numpy(X, 3 + CFG.out_dim)[:, 3:]


def _table(grid, theta):
    return theta[grid.slice.offset:grid.slice.offset + grid.slice.size].view(*grid.slice.shape)


@pytest.mark.portable
def test_inactive_levels_encode_exactly_zero_and_active_ones_as_the_full_encoding():
    grid, _, params = _grid(seed=3)
    pts = _points(1)
    _, full = _encode(grid, params, pts, None)
    assert np.isfinite(full).all() and np.abs(full).min() < 0.5  # all levels computed (no fill left)
    F = CFG.n_features
    for k in (0, 1, 2, 4, 5, 9):  # 9 > L: all levels
        _, enc = _encode(grid, params, pts, k)
        on = min(k, CFG.n_levels) * F
        np.testing.assert_array_equal(enc[:, :on], full[:, :on])
        assert (enc[:, on:] == 0.0).all(), k


@pytest.mark.portable
@pytest.mark.parametrize("k", [1, 3])
def test_table_gradient_of_inactive_levels_is_zero_and_active_levels_match_float64(k):
    grid, layout, params = _grid(seed=5)
    pts = _points(2)
    X, _ = _encode(grid, params, pts, k)
    # upstream gradient on every level, inactive ones included: the kernels must ignore theirs
    upstream = np.random.default_rng(4).normal(size=(N, CFG.out_dim)).astype(np.float32)
    dX = buffers.rows16_upload(np.concatenate([np.zeros((N, 3), np.float32), upstream], 1))
    theta = t64(buffers.to_numpy(params)).requires_grad_()
    ref = hash_encode(t64(pts), _table(grid, theta), grid.res_np, grid.loff_np, grid.lsize_np, grid.ldense_np,
                      CFG.bound, n_active=k)
    (ref * t64(upstream)).sum().backward()
    want = theta.grad.numpy()
    off = grid.slice.offset
    first_off = off + int(grid.loff_np[k]) * CFG.n_features  # where level k's entries start
    assert np.abs(want[off:first_off]).max() > 0 and not want[first_off:].any()
    for kernel in (None, hash_grid.hash_encode_backward_by_level, hash_grid.hash_encode_backward_atomic):
        grads = layout.allocate()
        buffers.from_numpy(grads, np.full(layout.total, 0.5, np.float32))
        if kernel is None:
            grid.backward(X, dX, N, 3, grads, n_active=k)
        elif kernel is hash_grid.hash_encode_backward_by_level:
            kernel(X, dX, N, 3, grads, off, *grid._level_arrays(), CFG.bound, CFG.n_features, CFG.n_levels, k, 0)
        else:
            kernel(X, dX, N, 3, grads, off, *grid._level_arrays(), CFG.bound, CFG.n_features, k, 0)
        got = buffers.to_numpy(grads) - 0.5
        assert (got[first_off:] == 0.0).all(), kernel  # inactive levels' slices untouched, bit for bit
        assert _rel(got[:first_off], want[:first_off]) < 1e-5, kernel


@pytest.mark.portable
@pytest.mark.parametrize("k", [2, 4])
def test_point_gradient_goes_through_active_levels_only(k):
    grid, _, params = _grid(seed=6)
    pts = _points(3)
    X, _ = _encode(grid, params, pts, k)
    upstream = np.random.default_rng(5).normal(size=(N, CFG.out_dim)).astype(np.float32)
    dX = buffers.rows16_upload(np.concatenate([np.zeros((N, 3), np.float32), upstream], 1))
    dP = buffers.f32(N, 3)
    grid.backward_points(X, dX, N, 3, params, dP, n_active=k)
    theta = t64(buffers.to_numpy(params))
    x = t64(pts).requires_grad_()
    ref = hash_encode(x, _table(grid, theta), grid.res_np, grid.loff_np, grid.lsize_np, grid.ldense_np,
                      CFG.bound, n_active=k)
    (ref * t64(upstream)).sum().backward()
    assert _rel(dP.to_numpy(), x.grad.numpy()) < 1e-5
    # the finer levels' upstream gradient would have changed dP (the mask is what the comparison checks)
    xf = t64(pts).requires_grad_()
    full = hash_encode(xf, _table(grid, theta), grid.res_np, grid.loff_np, grid.lsize_np, grid.ldense_np, CFG.bound)
    (full * t64(upstream)).sum().backward()
    assert _rel(x.grad.numpy(), xf.grad.numpy()) > 1e-2


@pytest.mark.portable
def test_field_with_active_levels_matches_float64_and_backward_uses_the_forwards_count():
    field, layout, params = small_field("tetrahedral", seed=21)
    L = field.cfg.grid.n_levels
    k = 2
    n = 96
    pts, d = random_batch(n, seed=22)
    eps = 1e-2
    field.active_levels = k
    out = field.forward(buffers.upload(pts), buffers.upload(d), n, params, eps=eps)
    sdf_only = field.sdf(buffers.upload(pts), n, params).to_numpy()[:n]
    got = [out.sdf.to_numpy()[:n], out.normal.to_numpy()[:n], out.rgb.to_numpy()[:n]]
    rng = np.random.default_rng(23)
    ups = [rng.normal(size=sh).astype(np.float32) for sh in [(n,), (n, 3), (n, 3)]]
    field.active_levels = None  # changed after the forward: the backward must still use the forward's k
    grads = layout.allocate()
    dp, dd = buffers.f32(n, 3), buffers.f32(n, 3)
    field.backward(*(buffers.upload(u) for u in ups), params, grads, dpoints=dp, ddirs=dd)
    field.active_levels = k
    theta = t64(buffers.to_numpy(params)).requires_grad_()
    x = t64(pts).requires_grad_()
    ref = TorchField(field).forward(theta, x, t64(d), eps)
    for g, r in zip(got, ref, strict=True):
        assert _rel(g, r.detach().numpy()) < 1e-5
    np.testing.assert_allclose(sdf_only, got[0], rtol=0, atol=1e-6)
    sum(((r * t64(u)).sum() for r, u in zip(ref, ups, strict=True))).backward()
    g = buffers.to_numpy(grads)
    assert _rel(g, theta.grad.numpy()) < 1e-5
    assert _rel(dp.to_numpy(), x.grad.numpy()) < 1e-5
    enc = field.encoding
    first_off = enc.slice.offset + int(enc.loff_np[k]) * field.cfg.grid.n_features
    assert not g[first_off:enc.slice.offset + enc.slice.size].any()
    assert np.abs(g[enc.slice.offset:first_off]).max() > 0
    # all levels on gives another function (the test above is not vacuous)
    field.active_levels = L
    full = field.sdf(buffers.upload(pts), n, params).to_numpy()[:n]
    assert np.abs(full - sdf_only).max() > 1e-4


def test_footprint_helpers():
    cfg = HashGridConfig(n_levels=4, base_resolution=4, per_level_scale=2.0, bound=1.0)
    np.testing.assert_allclose(cell_widths(cfg), [0.5, 0.25, 0.125, 0.0625])
    assert levels_for_footprint(cfg, 0.0) == 4
    assert levels_for_footprint(cfg, 0.2) == 2  # cells 0.5 and 0.25 are at least 0.2 wide
    assert levels_for_footprint(cfg, 0.125) == 3
    assert levels_for_footprint(cfg, 10.0) == 1  # never fewer than one level


# --------------------------------------------------------------------------------------------- trainer
@pytest.fixture(scope="module")
def scene():
    from taichi_neus.data import default_scene_path, load_dtu
    return load_dtu(default_scene_path())


def _trainer(scene, tmp_path, log=None, **train):
    from taichi_neus.train.trainer import Trainer
    cfg = small_config(iters=100)
    # every level from the start, the ε schedule and no footprint cap unless a test asks (not the defaults)
    for k, v in {"level_start": 0, "eps_from_level": False, "level_footprint": 0.0, **train}.items():
        setattr(cfg.train, k, v)
    return Trainer(scene, cfg, tmp_path, log=log or (lambda *a: None))


def test_pixel_footprint_is_median_distance_over_focal(scene):
    ids = scene.train_ids
    focal = 0.5 * (scene.K[ids, 0, 0] + scene.K[ids, 1, 1])  # fx and fy differ a little in this scene
    want = np.median(np.linalg.norm(scene.c2w[ids, :3, 3].astype(np.float64), axis=1) / focal)
    assert scene.pixel_footprint() == pytest.approx(want, rel=1e-6)
    assert 1e-4 < scene.pixel_footprint() < 0.1


def test_level_schedule_from_level_start_to_all_at_level_anneal(scene, tmp_path):
    tr = _trainer(scene, tmp_path, level_start=2, level_anneal=0.5)
    L = tr.cfg.field.grid.n_levels
    levels = [tr.schedules(s)["levels"] for s in range(101)]
    assert levels[0] == 2 and levels[50] == L and levels[100] == L and levels[49] == L - 1
    assert all(a <= b for a, b in zip(levels[:-1], levels[1:], strict=True))  # never switches a level off
    assert sorted(set(levels)) == list(range(2, L + 1))  # one level at a time
    for s in range(51):  # linear in the progress: level_start + floor((L − level_start)·p/level_anneal)
        assert levels[s] == 2 + math.floor((L - 2) * (s / 100) / 0.5 + 1e-9)
    assert tr.schedules(0)["eps"] == pytest.approx(tr.cfg.train.eps_start)  # ε schedule unchanged by default
    default = _trainer(scene, tmp_path / "d")
    assert {default.schedules(s)["levels"] for s in (0, 30, 100)} == {L}  # level_start 0: all from the start
    assert Config().train.level_start > 0 and Config().train.eps_from_level  # the defaults: coarse to fine


def test_eps_from_level_is_the_finest_active_cell_floored_at_eps_end(scene, tmp_path):
    tr = _trainer(scene, tmp_path, level_start=1, level_anneal=0.5, eps_from_level=True)
    widths = cell_widths(tr.cfg.field.grid)
    for s in (0, 10, 30, 50, 100):
        sch = tr.schedules(s)
        assert sch["eps"] == pytest.approx(max(widths[sch["levels"] - 1], tr.cfg.train.eps_end))
    assert tr.schedules(0)["eps"] == pytest.approx(widths[0])  # 2/16: coarse
    assert tr.schedules(100)["eps"] == pytest.approx(max(widths[-1], tr.cfg.train.eps_end))


def test_footprint_caps_the_levels_for_the_whole_run(scene, tmp_path):
    lines = []
    tr = _trainer(scene, tmp_path, level_footprint=4.0, log=lines.append)
    cap = levels_for_footprint(tr.cfg.field.grid, 4.0 * scene.pixel_footprint())
    assert 1 <= cap < tr.cfg.field.grid.n_levels  # the small grid's finest cells are under 4 pixels here
    assert tr.level_cap == cap and {tr.schedules(s)["levels"] for s in (0, 50, 100)} == {cap}
    assert any("hash levels" in ln and f"{cap} of" in ln for ln in lines), lines


def test_training_coarse_to_fine_still_trains_and_keeps_fine_levels_at_init(scene, tmp_path):
    tr = _trainer(scene, tmp_path, level_start=2, level_anneal=0.5)
    tr.cfg.train.iters = 120
    grid = tr.cfg.field.grid
    enc = tr.field.encoding
    fine = slice(enc.slice.offset + int(enc.loff_np[grid.n_levels - 1]) * grid.n_features,
                 enc.slice.offset + enc.slice.size)
    init = buffers.to_numpy(tr.params)[fine].copy()
    stats = []
    while tr.step < 40:  # levels 2 → 5 of 8
        stats.append(tr.train_step())
    assert [s["levels"] for s in stats][::10] == [2, 3, 4, 5]
    np.testing.assert_array_equal(buffers.to_numpy(tr.params)[fine], init)  # no gradient, no Adam step
    while not tr.done():
        stats.append(tr.train_step())
    assert stats[-1]["levels"] == grid.n_levels
    assert not np.array_equal(buffers.to_numpy(tr.params)[fine], init)  # trained once switched on
    psnr = [s["psnr"] for s in stats]
    first, last = np.mean(psnr[:10]), np.mean(psnr[-10:])
    # measured (2 threads): 11.8 → 18.0 dB, the same as with all levels from the start (11.8 → 18.0)
    assert last > first + 4.0, (first, last)
