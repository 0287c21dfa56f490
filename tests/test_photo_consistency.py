"""The patch NCC photo-consistency loss on a scene with a known answer: a textured plane seen by five
cameras, its photos rendered exactly (each pixel centre's ray meets the plane z = 0). At the true depth
the warped patches agree; off it they do not, and the depth gradient points back to the plane."""

import numpy as np
import pytest
import torch

from taichi_neus.data.rays import pixel_rays
from taichi_neus.errors import UserInputError
from taichi_neus.train.photo_consistency import PhotoConsistency, nearest_views

H = W = 64
F = 70.0


def texture(x, y):
    return 0.5 + 0.2 * np.sin(40.0 * x) * np.cos(47.0 * y) + 0.15 * np.sin(31.0 * x - 23.0 * y)


def look_at(centre, target=(0.0, 0.0, 0.0)):
    """OpenCV camera-to-world (x right, y down, z forward) at ``centre`` looking at ``target``."""
    c = np.asarray(centre, np.float64)
    f = np.asarray(target, np.float64) - c
    f /= np.linalg.norm(f)
    r = np.cross([0.0, 1.0, 0.0], f)
    r /= np.linalg.norm(r)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = r, np.cross(f, r), f, c
    return m


@pytest.fixture(scope="module")
def plane_scene():
    centres = [(0.0, 0.0, -2.0), (0.5, 0.0, -1.9), (-0.5, 0.1, -1.9), (0.0, 0.5, -1.9), (0.1, -0.5, -1.9),
               (3.0, 3.0, 2.0)]  # the last one looks at the plane from behind: never a useful source
    c2w = np.stack([look_at(c) for c in centres]).astype(np.float32)
    K = np.tile(np.array([[F, 0, W / 2], [0, F, H / 2], [0, 0, 1]], np.float32), (len(c2w), 1, 1))
    jj, ii = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    pix = np.stack([ii.reshape(-1), jj.reshape(-1)], axis=-1)
    images = []
    for v in range(len(c2w)):
        o, d = pixel_rays(K[v], c2w[v], pix)
        t = -o[:, 2] / d[:, 2]
        X = o.astype(np.float64) + t[:, None] * d
        g = np.clip(texture(X[:, 0], X[:, 1]), 0, 1)
        images.append(np.repeat((g * 255.0).round().astype(np.uint8).reshape(H, W, 1), 3, axis=2))
    return np.stack(images), K, c2w


def batch(c2w, K, view=0, n=40, seed=0):
    """Rays of ``view`` through random pixel centres away from the border, their true plane depth and
    the plane's normal (pointing at the cameras, -z)."""
    rng = np.random.default_rng(seed)
    pix = rng.integers(10, W - 10, size=(n, 2)) + 0.5
    o, d = pixel_rays(K[view], c2w[view], pix)
    depth = -o[:, 2] / d[:, 2]
    normals = np.tile([0.0, 0.0, -1.0], (n, 1))
    return np.full(n, view), pix, o, d, depth.astype(np.float64), normals


def test_sources_are_the_nearest_axes_and_never_the_view_itself_or_a_held_out_one(plane_scene):
    _, _, c2w = plane_scene
    train = np.array([0, 1, 2, 3, 5])
    src = nearest_views(c2w, train, 3)
    assert src.shape == (6, 3)
    for v in range(6):
        assert v not in src[v] and 4 not in src[v]
    axes = c2w[:, :3, 2].astype(np.float64)
    cos0 = {int(s): float(axes[0] @ axes[s]) for s in train if s != 0}
    assert list(src[0]) == sorted(cos0, key=lambda s: -cos0[s])[:3]
    assert 5 not in src[0]  # the camera behind the plane is the farthest axis


def test_true_surface_agrees_and_a_wrong_depth_does_not(plane_scene):
    images, K, c2w = plane_scene
    pc = PhotoConsistency(images, K, c2w, np.arange(5), weight=1.0, radius=3, n_sources=4, n_best=2)
    vids, pix, o, d, depth, normals = batch(c2w, K)
    ones = torch.ones(len(depth), dtype=torch.float64)
    at = lambda D: float(pc.loss(vids, pix, o, d, torch.tensor(D), ones, normals, c2w)[0])  # noqa: E731
    true = at(depth)
    assert true < 0.01  # uint8 rounding and bilinear lookups only
    for delta in (-0.1, -0.05, 0.05, 0.1):  # 0.4–0.9 px in the nearest sources
        assert at(depth + delta) > true + 0.02


@pytest.mark.parametrize("delta", [-0.03, 0.03])
def test_depth_gradient_points_back_to_the_plane(plane_scene, delta):
    images, K, c2w = plane_scene
    pc = PhotoConsistency(images, K, c2w, np.arange(5), weight=1.0, radius=3, n_sources=4, n_best=2)
    vids, pix, o, d, depth, normals = batch(c2w, K, n=60, seed=1)
    loss, gD, gO, gN, n = pc.loss_and_grad(vids, pix, o, d, depth + delta, np.ones(len(depth)), normals, c2w)
    assert n == len(depth) and gN is None  # the normal is held fixed unless asked
    # descending moves each ray's depth toward the plane in most rays (a ray's cost is not convex far out)
    assert np.mean(np.sign(gD) == np.sign(delta)) > 0.8
    # x = o + (D / O)·d: ∂/∂O = −D/O·∂/∂D at O = 1
    np.testing.assert_allclose(gO, -(depth + delta) * gD, rtol=1e-5, atol=1e-9)


def test_gradients_match_finite_differences(plane_scene):
    images, K, c2w = plane_scene
    pc = PhotoConsistency(images, K, c2w, np.arange(5), weight=0.7, radius=2, n_sources=3, n_best=2)
    vids, pix, o, d, depth, normals = batch(c2w, K, n=8, seed=2)
    D = torch.tensor(depth + 0.01, requires_grad=True)
    O = torch.tensor(np.full(len(depth), 0.9), requires_grad=True)  # D/O: the surface point
    f = lambda D, O: pc.loss(vids, pix, o, d, D, O, normals, c2w)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (D, O), eps=1e-7, atol=1e-6, rtol=1e-4)


def test_loss_and_grad_equals_float64_autograd_and_leaves_other_rays_alone(plane_scene):
    images, K, c2w = plane_scene
    pc = PhotoConsistency(images, K, c2w, np.arange(5), weight=0.5)
    vids, pix, o, d, depth, normals = batch(c2w, K, n=20, seed=3)
    depth = depth + 0.02
    valid = np.ones(20, bool)
    valid[:5] = False  # e.g. outside the mask
    normals[5:8] = -normals[5:8]  # facing away from the camera
    D = torch.tensor(depth, requires_grad=True)
    O = torch.tensor(np.ones(20), requires_grad=True)
    loss_t, n_t = pc.loss(vids, pix, o, d, D, O, normals, c2w, valid)
    gD_t, gO_t = torch.autograd.grad(loss_t, (D, O))
    loss, gD, gO, _, n = pc.loss_and_grad(vids, pix, o, d, depth, np.ones(20), normals, c2w, valid)
    assert n == n_t == 12
    # loss_and_grad works in float32, the reference here in float64
    assert loss == pytest.approx(float(loss_t), rel=1e-4)
    for a, b in ((gD, gD_t.numpy()), (gO, gO_t.numpy())):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-3 * np.abs(b).max())
    assert np.all(gD[:8] == 0) and np.all(gO[:8] == 0) and np.all(gD[8:] != 0)


def _tilted(normals, deg, axis=0):
    """The normals turned by ``deg`` degrees about the x (axis 0) or y (axis 1) axis."""
    a = np.radians(deg)
    c, s = np.cos(a), np.sin(a)
    R = np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) if axis == 0 else np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return normals @ R.T


def test_normal_gradients_match_float64_autograd_and_finite_differences(plane_scene):
    """With ``normal_grad`` the loss is differentiable in the (unnormalised) normals too: gradcheck in float64
    through :meth:`loss`, and :meth:`loss_and_grad`'s float32 normal gradient against that reference."""
    images, K, c2w = plane_scene
    pc = PhotoConsistency(images, K, c2w, np.arange(5), weight=0.7, radius=2, n_sources=3, n_best=2,
                          normal_grad=True)
    vids, pix, o, d, depth, normals = batch(c2w, K, n=8, seed=4)
    normals = 1.3 * _tilted(normals, 8.0)  # not unit, and off the plane's normal
    D = torch.tensor(depth + 0.01, requires_grad=True)
    O = torch.tensor(np.full(len(depth), 0.9), requires_grad=True)
    N = torch.tensor(normals, requires_grad=True)
    f = lambda D, O, N: pc.loss(vids, pix, o, d, D, O, N, c2w)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (D, O, N), eps=1e-7, atol=1e-6, rtol=1e-4)
    gN_t = torch.autograd.grad(f(D, O, N), N)[0].numpy()
    # the loss is blind to a normal's length: its gradient is orthogonal to the normal
    assert np.abs((gN_t * normals).sum(-1)).max() < 1e-9 * np.abs(gN_t).max() + 1e-12
    _, gD, _, gN, n = pc.loss_and_grad(vids, pix, o, d, depth + 0.01, np.full(len(depth), 0.9), normals, c2w)
    assert n == len(depth) and gN.shape == (len(depth), 3)
    np.testing.assert_allclose(gN, gN_t, rtol=0, atol=2e-3 * np.abs(gN_t).max())


@pytest.mark.parametrize("axis", [0, 1])
def test_normal_gradient_turns_a_tilted_plane_back(plane_scene, axis):
    """At the true depth with the plane's normal tilted by 10°, a step down the normal gradient lowers the
    tilt for most rays: the term now orients the surface, not only places it."""
    images, K, c2w = plane_scene
    pc = PhotoConsistency(images, K, c2w, np.arange(5), weight=1.0, radius=3, n_sources=4, n_best=2,
                          normal_grad=True)
    vids, pix, o, d, depth, normals = batch(c2w, K, n=60, seed=6)
    tilted = _tilted(normals, 10.0, axis)
    loss, gD, _, gN, n = pc.loss_and_grad(vids, pix, o, d, depth, np.ones(len(depth)), tilted, c2w)
    assert n > 40
    stepped = tilted - 0.05 * gN / np.abs(gN).max()  # the largest change 0.05 rad, under the 10° (0.17) tilt
    cos = lambda a: (a @ [0.0, 0.0, -1.0]) / np.linalg.norm(a, axis=-1)  # noqa: E731
    assert np.mean(cos(stepped) > cos(tilted)) > 0.9
    assert pc.loss_and_grad(vids, pix, o, d, depth, np.ones(len(depth)), stepped, c2w)[0] < loss


def test_flat_patches_and_too_few_sources_do_not_count(plane_scene):
    images, K, c2w = plane_scene
    flat = np.full_like(images, 128)
    pc = PhotoConsistency(flat, K, c2w, np.arange(5))
    vids, pix, o, d, depth, normals = batch(c2w, K, n=10)
    loss, gD, _, _, n = pc.loss_and_grad(vids, pix, o, d, depth, np.ones(10), normals, c2w)
    assert n == 0 and loss == 0.0 and not gD.any()
    # a patch that leaves the image in the reference view does not count either
    pc = PhotoConsistency(images, K, c2w, np.arange(5))
    edge = np.array([[1.5, 30.5]])
    o1, d1 = pixel_rays(K[0], c2w[0], edge)
    assert pc.loss_and_grad([0], edge, o1, d1, -o1[:, 2] / d1[:, 2], [1.0], [[0, 0, -1.0]], c2w)[4] == 0


def test_refusals(plane_scene):
    images, K, c2w = plane_scene
    with pytest.raises(UserInputError, match="must not exceed"):
        PhotoConsistency(images, K, c2w, np.arange(5), n_sources=2, n_best=3)
    with pytest.raises(UserInputError, match="at least 5 training views"):
        PhotoConsistency(images, K, c2w, np.arange(3), n_sources=4)


# ------------------------------------------------------------------ in the trainer
def _step_grads(tmp_path, **train):
    from training_helpers import small_config

    from taichi_neus import buffers
    from taichi_neus.data import default_scene_path
    from taichi_neus.data.loader import load_scene
    from taichi_neus.train.trainer import Trainer

    sc = load_scene(default_scene_path(), downscale=4, log=lambda *a: None)
    cfg = small_config(iters=10)
    for k, v in train.items():
        setattr(cfg.train, k, v)
    tr = Trainer(sc, cfg, tmp_path, log=lambda *a: None)
    tr.keep_grads = True
    # the sphere init silences the hash table (zero first-layer weights on it): perturb both a little, the same
    # way in every trainer, so the table's gradient is not zero by construction
    rng = np.random.default_rng(5)
    host = buffers.to_numpy(tr.params).copy()
    for sl, sd in ((tr.field.encoding.slice, 0.02), (tr.field.sdf_layers[0].W, 0.05)):
        host[sl.offset:sl.offset + sl.size] += rng.normal(0, sd, sl.size).astype(np.float32)
    buffers.from_numpy(tr.params, host)
    st = tr.train_step()
    return tr, st, buffers.to_numpy(tr.grads).copy()


def test_trainer_routes_the_term_through_depth_and_opacity_only(tmp_path):
    """The same first batch with and without the term: the loss gains the term, the SDF's parameters (and
    NeuS's variance) get a different gradient, the colour network's does not (depth and opacity do not
    depend on the colour), and a term that starts later is off at step 0."""
    base, st0, g0 = _step_grads(tmp_path / "a", photo_weight=0.0)
    tr, st, g = _step_grads(tmp_path / "b", photo_weight=0.5, photo_start=0.0)
    late, st_late, g_late = _step_grads(tmp_path / "c", photo_weight=0.5, photo_start=0.5)
    assert st0["photo"] == 0.0 and st_late["photo"] == 0.0 and np.array_equal(g_late, g0)
    assert st["photo"] > 0 and st["photo_rays"] >= 10
    assert st["loss"] == pytest.approx(st0["loss"] + st["photo"], rel=1e-5)
    assert np.isfinite(g).all()
    for name, sl in tr.layout.slices.items():
        a, b = g[sl.offset:sl.offset + sl.size], g0[sl.offset:sl.offset + sl.size]
        if name.startswith("color"):
            assert np.array_equal(a, b), name
        else:
            assert np.abs(a - b).max() > 0, name


def test_the_normal_gradient_reaches_the_sdf_only(tmp_path):
    """``photo_normal``: the same first batch as with the term on the depth only; the SDF's parameters get a
    different gradient (the normal is ∇f), except the output layer's bias (a constant in f, nothing in ∇f); the
    colour network's and the variance's are the same (the composited normal's weights are held fixed)."""
    base, st0, g0 = _step_grads(tmp_path / "a", photo_weight=0.5, photo_start=0.0)
    tr, st, g = _step_grads(tmp_path / "b", photo_weight=0.5, photo_start=0.0, photo_normal=True)
    assert st["photo"] == pytest.approx(st0["photo"], rel=1e-6) and st["photo_rays"] == st0["photo_rays"]
    assert np.isfinite(g).all()
    last_bias = f"sdf.{len(tr.field.sdf_layers) - 1}.bias"
    for name, sl in tr.layout.slices.items():
        a, b = g[sl.offset:sl.offset + sl.size], g0[sl.offset:sl.offset + sl.size]
        if name.startswith("color") or name in ("variance", last_bias):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7 * max(np.abs(b).max(), 1e-3), err_msg=name)
        else:
            assert np.abs(a - b).max() > 1e-6 * max(np.abs(b).max(), 1e-12), name


def _trainer_log(tmp_path, scene, **train):
    from training_helpers import small_config

    from taichi_neus.train.trainer import Trainer

    cfg = small_config(iters=10)
    for k, v in train.items():
        setattr(cfg.train, k, v)
    lines = []
    return Trainer(scene, cfg, tmp_path, log=lines.append), lines


def test_the_default_term_adapts_to_the_scene_instead_of_refusing_it(tmp_path, monkeypatch):
    """On by default, the term must not stop a run: with 3 training views each is compared with the other 2,
    with one view or without torch it is off, and each case is said in one line."""
    from taichi_neus.data import default_scene_path
    from taichi_neus.data.loader import load_scene

    sc = load_scene(default_scene_path(), downscale=4, log=lambda *a: None)
    sc.train_ids = sc.train_ids[:3]
    tr, lines = _trainer_log(tmp_path / "a", sc, photo_weight=0.1, photo_sources=4, photo_best=2)
    assert tr.photo is not None and tr.photo.sources.shape[1] == 2 and tr.photo.n_best == 2
    assert any("compared with 2" in m for m in lines)
    assert tr.train_step()["photo"] >= 0.0
    sc.train_ids = sc.train_ids[:1]
    tr, lines = _trainer_log(tmp_path / "b", sc, photo_weight=0.1)
    assert tr.photo is None and any("no other to compare with" in m for m in lines)
    sc.train_ids = np.arange(8)
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # as if torch were not installed
    tr, lines = _trainer_log(tmp_path / "c", sc, photo_weight=0.1)
    assert tr.photo is None and any("needs torch" in m for m in lines)
