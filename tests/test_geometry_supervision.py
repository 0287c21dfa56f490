"""Geometric supervision in training: the SDF at sparse points (Geo-NeuS) and depth maps.

The loss kernels themselves are checked in test_losses.py; here: the trainer's sparse-point step
(field + loss backward) against the float64 torch field, the depth maps' conversion on load against
sphere-traced distances, the sparse-point selection, and both terms wired into a training step.
"""

import shutil

import numpy as np
import pytest
import torch
from training_helpers import small_config

from taichi_neus import buffers
from taichi_neus.data import default_scene_path
from taichi_neus.data import synthetic as syn
from taichi_neus.data.loader import load_scene
from taichi_neus.data.rays import image_pixels, pixel_rays
from taichi_neus.data.sparse_points import point_weights, supervision_points
from taichi_neus.errors import UserInputError
from taichi_neus.field.torch_reference import TorchField
from taichi_neus.train.trainer import Trainer

QUIET = {"log": lambda *a: None}


@pytest.fixture(scope="module")
def depth_scene(tmp_path_factory):
    """The built-in scene with exact z-depth maps in world units (depths/<stem>.npy); unit-sphere ray
    distances from sphere tracing for comparison."""
    root = tmp_path_factory.mktemp("depth") / "s"
    shutil.copytree(default_scene_path(), root)
    sc = load_scene(root, holdout_every=8, **QUIET)
    (root / "depths").mkdir()
    pix = image_pixels(sc.H, sc.W)
    truth = np.zeros((sc.n_views, sc.H, sc.W))
    for v in range(sc.n_views):
        o, d = pixel_rays(sc.K[v].astype(np.float64), sc.c2w[v].astype(np.float64), pix)
        hit, t, _ = syn.sphere_trace(o.astype(np.float64), d.astype(np.float64))
        z_axis = sc.c2w[v, :3, 2].astype(np.float64)
        z_world = np.where(hit, t * (d @ z_axis) * syn.SCALE, 0.0)  # along the optical axis, world units
        np.save(root / "depths" / f"{v:03d}.npy", z_world.reshape(sc.H, sc.W))
        truth[v] = np.where(hit, t, 0.0).reshape(sc.H, sc.W)
    return root, truth


def test_depth_maps_load_as_unit_ray_distance(depth_scene):
    root, truth = depth_scene
    sc = load_scene(root, **QUIET)
    assert sc.depths.shape == (sc.n_views, sc.H, sc.W)
    hit = truth > 0
    assert 0.2 < hit.mean() < 0.9
    np.testing.assert_allclose(sc.depths[hit], truth[hit], rtol=2e-4)  # float32 ray directions
    assert np.all(sc.depths[~hit] == 0.0)
    half = load_scene(root, downscale=2, **QUIET)
    assert half.depths.shape == (sc.n_views, sc.H // 2, sc.W // 2)
    # a block's value is the mean of its known pixels (checked where all 4 are known, away from edges)
    b = truth[3].reshape(sc.H // 2, 2, sc.W // 2, 2)
    full = (b > 0).sum((1, 3)) == 4
    assert full.sum() > 100
    np.testing.assert_allclose(half.depths[3][full], b.sum((1, 3))[full] / 4, rtol=1e-3)
    assert np.all(half.depths[3][(b > 0).sum((1, 3)) == 0] == 0.0)


def test_depth_maps_refused_when_missing(depth_scene, tmp_path):
    root, _ = depth_scene
    bad = tmp_path / "s"
    shutil.copytree(root, bad)
    (bad / "depths" / "005.npy").unlink()
    with pytest.raises(UserInputError, match="005.npy"):
        load_scene(bad, **QUIET)
    np.save(bad / "depths" / "005.npy", np.zeros((7, 9)))
    with pytest.raises(UserInputError, match="shape"):
        load_scene(bad, **QUIET)


def test_supervision_points_selection_and_weights():
    rng = np.random.default_rng(0)
    S = np.diag([2.0, 2.0, 2.0, 1.0])
    S[:3, 3] = [1.0, 0.0, -1.0]
    unit = np.concatenate([rng.uniform(-0.5, 0.5, (50, 3)), [[0.0, 0.0, 1.5]]])  # the last outside the sphere
    world = unit * 2.0 + S[:3, 3]
    err = rng.uniform(0.1, 2.0, 51)
    track = rng.integers(2, 9, 51)
    track[0] = 1  # seen once: not a triangulated point
    pts, w = supervision_points(world, err, track, S, None, None, None)
    assert len(pts) == 49
    np.testing.assert_allclose(pts, unit[1:50], atol=1e-6)
    ref = point_weights(err[1:50], track[1:50])
    np.testing.assert_allclose(w, ref / ref.mean(), rtol=1e-5)
    # better reprojection and longer tracks weigh more
    assert point_weights([0.2], [6])[0] > point_weights([1.5], [6])[0] > 0
    assert point_weights([0.5], [5])[0] > point_weights([0.5], [2])[0]


def test_supervision_points_keep_the_object_with_masks():
    """A point on the object lands on every mask; a table point beside it on none: only the first stays."""
    sc = load_scene(default_scene_path(), downscale=2, **QUIET)
    surface = sc.world_to_unit(syn.sample_surface(200, seed=3))  # sample_surface gives world points
    beside = np.array([[0.0, 0.93, 0.0], [0.9, 0.0, 0.3]])  # inside the unit sphere, off the object
    unit = np.concatenate([surface, beside])
    world = sc.unit_to_world(unit)
    pts, _ = supervision_points(world, np.full(len(unit), 0.5), np.full(len(unit), 4), sc.scale_mat, sc.K, sc.c2w,
                                sc.masks)
    assert len(pts) >= 0.95 * len(surface)
    d_beside = np.linalg.norm(pts[:, None, :] - beside[None].astype(np.float32), axis=-1).min(0)
    assert d_beside.min() > 1e-3


def _away_from_init(tr, rng) -> np.ndarray:
    """Perturb the hash table and the first SDF layer (the sphere init silences both, so the hash table would
    not matter); returns the new parameters (host copy)."""
    host = buffers.to_numpy(tr.params).copy()
    for sl, sd in ((tr.field.encoding.slice, 0.05), (tr.field.sdf_layers[0].W, 0.3)):
        host[sl.offset:sl.offset + sl.size] += rng.normal(0, sd, sl.size).astype(np.float32)
    buffers.from_numpy(tr.params, host)
    return host


def _trainer(scene, tmp_path, **train):
    cfg = small_config(iters=10)
    for k, v in train.items():
        setattr(cfg.train, k, v)
    tr = Trainer(scene, cfg, tmp_path, **QUIET)
    tr.keep_grads = True  # the tests read a step's gradients after it
    return tr


def test_sparse_point_step_gradient_matches_torch(tmp_path):
    sc = load_scene(default_scene_path(), downscale=4, **QUIET)
    rng = np.random.default_rng(1)
    sc.points = (sc.world_to_unit(syn.sample_surface(300, seed=2)) + rng.normal(0, 0.02, (300, 3))).astype(np.float32)
    sc.point_weights = rng.uniform(0.2, 2.0, 300).astype(np.float32)
    tr = _trainer(sc, tmp_path, sparse_weight=0.5, sparse_batch=4096)  # the batch holds every point
    _away_from_init(tr, rng)
    buffers.zero_(tr.grads)
    loss = tr._sparse_point_step(eps=1e-2)
    g = buffers.to_numpy(tr.grads)
    theta = torch.tensor(buffers.to_numpy(tr.params), dtype=torch.float64, requires_grad=True)
    f = TorchField(tr.field).sdf_net(theta, torch.tensor(sc.points, dtype=torch.float64))[:, 0]
    w = torch.tensor(sc.point_weights, dtype=torch.float64)
    ref = 0.5 * (w * f.abs()).sum() / w.sum()
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-4)
    gt = theta.grad.numpy()
    for name, sl in tr.layout.slices.items():
        a, b = g[sl.offset:sl.offset + sl.size], gt[sl.offset:sl.offset + sl.size]
        if name.startswith("color") or name == "variance":
            assert np.all(a == 0.0), name
            continue
        assert np.abs(b).max() > 0, name
        assert np.abs(a - b).max() <= 2e-4 * np.abs(b).max(), name


def test_training_step_adds_both_terms(depth_scene, tmp_path):
    root, _ = depth_scene
    sc = load_scene(root, downscale=2, **QUIET)
    sc.points = sc.world_to_unit(syn.sample_surface(500, seed=4)).astype(np.float32)
    sc.point_weights = np.ones(500, np.float32)
    base = _trainer(sc, tmp_path / "a")
    st0 = base.train_step()
    g0 = buffers.to_numpy(base.grads).copy()
    both = _trainer(sc, tmp_path / "b", sparse_weight=0.1, depth_weight=0.5, sparse_batch=256)
    st = both.train_step()
    g = buffers.to_numpy(both.grads)
    assert st0["sparse"] == 0.0 and st0["depth"] == 0.0
    assert st["sparse"] > 0 and st["depth"] > 0
    assert st["loss"] == pytest.approx(st["l1"] + st["eikonal"] + st["eikonal_points"] + st["mask_bce"] + st["sparse"]
                                       + st["depth"], rel=1e-6)
    assert np.isfinite(g).all() and np.abs(g - g0).max() > 0


# ------------------------------------------------------------------ eikonal at uniform points
def test_uniform_in_ball_is_uniform():
    from taichi_neus.train.trainer import uniform_in_ball
    p = uniform_in_ball(200_000, np.random.default_rng(0)).astype(np.float64)
    r = np.linalg.norm(p, axis=1)
    assert r.max() <= 1.0
    # uniform in volume: r³ is uniform on [0, 1] (deciles within 1%), directions have zero mean
    assert np.allclose(np.quantile(r**3, np.linspace(0.1, 0.9, 9)), np.linspace(0.1, 0.9, 9), atol=0.01)
    assert np.abs((p / r[:, None]).mean(0)).max() < 0.01


def test_eikonal_points_step_gradient_matches_torch(tmp_path):
    """The uniform-point eikonal term (field forward, loss, field backward through the stencil) against the
    float64 torch field: the loss, and gradients that reach the hash table and the SDF MLP only."""
    from taichi_neus.train.trainer import uniform_in_ball
    sc = load_scene(default_scene_path(), downscale=4, **QUIET)
    tr = _trainer(sc, tmp_path, eikonal_points=512, eikonal_weight=0.3)
    rng = np.random.default_rng(3)
    host = _away_from_init(tr, rng)
    buffers.zero_(tr.grads)
    state = tr.rng.bit_generator.state
    pts = uniform_in_ball(512, tr.rng)  # the points the step will draw
    tr.rng.bit_generator.state = state
    eps = 1e-2
    loss = tr._eikonal_points_step(eps=eps)
    g = buffers.to_numpy(tr.grads)
    theta = torch.tensor(host, dtype=torch.float64, requires_grad=True)
    x = torch.tensor(pts, dtype=torch.float64)
    _, normal, _ = TorchField(tr.field).forward(theta, x, torch.zeros_like(x), eps)
    ref = 0.3 * ((normal.norm(dim=1) - 1.0) ** 2).mean()
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-4)
    gt = theta.grad.numpy()
    for name, sl in tr.layout.slices.items():
        a, b = g[sl.offset:sl.offset + sl.size], gt[sl.offset:sl.offset + sl.size]
        if name.startswith("color") or name == "variance":
            assert np.all(a == 0.0), name
            continue
        if np.abs(b).max() < 1e-12:  # an output bias: a constant shift leaves the finite differences alone
            assert np.abs(a).max() < 1e-6, name
            continue
        assert np.abs(a - b).max() <= 2e-4 * np.abs(b).max(), name
    enc = tr.field.encoding.slice
    assert np.count_nonzero(g[enc.offset:enc.offset + enc.size]) > 1000  # the term reaches the hash table
