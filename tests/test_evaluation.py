"""Metrics against hand-computed answers: images (render.image_metrics), Chamfer, mesh sampling, DTU protocol."""

import numpy as np
import pytest
from scipy.io import savemat
from scipy.spatial import cKDTree

from taichi_neus.errors import UserInputError
from taichi_neus.export.evaluation import chamfer, downsample_points, dtu_chamfer, sample_mesh_points
from taichi_neus.export.ply import write_ply
from taichi_neus.render.image_metrics import mask_iou, psnr, ssim

# ------------------------------------------------------------------------------ images


def test_psnr_hand_computed_and_against_skimage():
    from skimage.metrics import peak_signal_noise_ratio

    gt = np.zeros((4, 5, 3))
    pred = gt + 0.1  # MSE 0.01 -> 20 dB
    assert psnr(pred, gt) == pytest.approx(20.0)
    rng = np.random.default_rng(0)
    a, b = rng.random((8, 9, 3)), rng.random((8, 9, 3))
    assert psnr(a, b) == pytest.approx(peak_signal_noise_ratio(b, a, data_range=1.0))
    # uint8 input is divided by 255
    assert psnr((a * 255).astype(np.uint8), (a * 255).astype(np.uint8)) == float("inf")


def test_psnr_mask_uses_only_masked_pixels():
    gt = np.zeros((4, 4, 3))
    pred = gt.copy()
    pred[:2] = 0.1  # error only in the top half
    pred[2:] = 0.5
    mask = np.zeros((4, 4), np.uint8)
    mask[:2] = 255
    assert psnr(pred, gt, mask) == pytest.approx(20.0)
    assert psnr(pred, gt, mask.astype(bool)) == pytest.approx(20.0)


def test_ssim_identical_and_against_skimage():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(1)
    a = rng.random((16, 16, 3))
    b = np.clip(a + 0.1 * rng.normal(size=a.shape), 0, 1)
    assert ssim(a, a) == pytest.approx(1.0)
    ref = structural_similarity(a, b, data_range=1.0, channel_axis=-1)
    assert ssim(a, b) == pytest.approx(ref) and ssim(a, b) < 0.95


def _known_run(H=24, W=32, box=(6, 18, 8, 24)):
    """A stand-in for a trained run with two held-out views whose photos are a random texture inside a
    rectangular mask (rows y0:y1, columns x0:x1) and black outside, trained with masks on a black background."""
    import types

    rng = np.random.default_rng(3)
    images = np.zeros((2, H, W, 3), np.uint8)
    masks = np.zeros((2, H, W), np.uint8)
    y0, y1, x0, x1 = box
    images[:, y0:y1, x0:x1] = rng.integers(20, 200, (2, y1 - y0, x1 - x0, 3))  # +0.1 stays in [0, 1]
    masks[:, y0:y1, x0:x1] = 255
    c2w = np.repeat(np.eye(4)[None], 2, axis=0)
    c2w[:, 0, 3] = [0, 1]  # the view index, for the fake renderer
    scene = types.SimpleNamespace(test_ids=np.array([0, 1]), K=np.repeat(np.eye(3)[None], 2, axis=0), c2w=c2w,
                                  images=images, masks=masks, H=H, W=W)
    cfg = types.SimpleNamespace(render=types.SimpleNamespace(background=(0.0, 0.0, 0.0)))
    return types.SimpleNamespace(scene=scene, cfg=cfg, use_masks=True)


def _fake_renderer(monkeypatch, shift=0):
    """``render_image`` returns the photo itself (at the requested size) and the mask, moved right by
    ``shift`` pixels, as opacity."""
    from taichi_neus.app import results

    def render_image(tr, K, c2w, H, W):
        v = int(c2w[0, 3])
        k = tr.scene.H // H
        photo = results._block_mean(tr.scene.images[v] / 255.0, k)
        opacity = np.roll(results._block_mean(tr.scene.masks[v] / 255.0, k), shift, axis=1)
        return {"rgb": photo, "opacity": opacity}  # float64: photo / 255 is not exact in float32

    monkeypatch.setattr(results, "render_image", render_image)


@pytest.mark.parametrize("downscale", [1, 2])
def test_evaluate_images_render_equal_to_photo_is_perfect(monkeypatch, downscale):
    from taichi_neus.app.results import evaluate_images

    _fake_renderer(monkeypatch)
    ev = evaluate_images(_known_run(), downscale, log=lambda *a: None)
    assert len(ev["views"]) == 2 and ev["size"] == [32 // downscale, 24 // downscale]
    m = ev["mean"]
    assert m["psnr"] == np.inf and m["psnr_masked"] == np.inf
    assert m["ssim"] == pytest.approx(1.0, abs=1e-12) and m["ssim_masked"] == pytest.approx(1.0, abs=1e-12)
    assert m["mask_iou"] == 1.0
    assert "renders" not in ev  # nothing kept unless asked
    kept = evaluate_images(_known_run(), downscale, log=lambda *a: None, keep=(1,))["renders"]
    assert list(kept) == [1] and kept[1]["rgb"].shape == (24 // downscale, 32 // downscale, 3)


def test_evaluate_images_shifted_opacity_gives_the_known_iou(monkeypatch):
    """A 16-pixel-wide mask and the same mask 4 pixels to the right: IoU = (16 − 4) / (16 + 4) = 0.6; the
    colours are still the photo's, so PSNR and SSIM stay perfect."""
    from taichi_neus.app.results import evaluate_images

    _fake_renderer(monkeypatch, shift=4)
    m = evaluate_images(_known_run(), 1, log=lambda *a: None)["mean"]
    assert m["mask_iou"] == pytest.approx(12 / 20)
    assert m["psnr"] == np.inf and m["ssim"] == pytest.approx(1.0, abs=1e-12)


def test_evaluate_images_scores_a_wrong_colour_exactly(monkeypatch):
    """Every rendered colour 0.1 too bright inside the mask: PSNR inside the mask is 20 dB; over the whole image
    the error covers 12·16 of 24·32 pixels, so MSE = 0.01 · 192 / 768 and PSNR = 20 + 10·log10(4) dB."""
    from taichi_neus.app import results

    _fake_renderer(monkeypatch)
    exact = results.render_image

    def brighter(tr, K, c2w, H, W):
        r = exact(tr, K, c2w, H, W)
        r["rgb"] = r["rgb"].astype(np.float64) + 0.1 * (r["opacity"][..., None] > 0.5)
        return r

    monkeypatch.setattr(results, "render_image", brighter)
    m = results.evaluate_images(_known_run(), 1, log=lambda *a: None)["mean"]
    assert m["psnr_masked"] == pytest.approx(20.0, abs=1e-9)
    assert m["psnr"] == pytest.approx(20.0 + 10 * np.log10(4), abs=1e-9)
    assert m["ssim"] < 0.999 and m["mask_iou"] == 1.0


def test_mask_iou_hand_computed():
    op = np.zeros((4, 4))
    op[:2, :2] = 0.9  # 4 pixels
    mask = np.zeros((4, 4), np.uint8)
    mask[:2, :3] = 255  # 6 pixels, 4 shared
    assert mask_iou(op, mask) == pytest.approx(4 / 6)
    assert mask_iou(op, mask, thresh=0.95) == pytest.approx(0.0)
    assert mask_iou(np.zeros((3, 3)), np.zeros((3, 3), bool)) == 1.0


# ------------------------------------------------------------------------------ point clouds


def fibonacci_sphere(n, r):
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5**0.5) * i
    return r * np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)


def test_chamfer_concentric_spheres():
    a, b = fibonacci_sphere(20000, 1.0), fibonacci_sphere(20000, 1.1)
    r = chamfer(a, b)
    # the nearest point on a sphere of radius 1.1 is 0.1 away; sampling adds ~ (spacing/2)^2 / 0.2
    assert r["accuracy"] == pytest.approx(0.1, abs=2e-3)
    assert r["completeness"] == pytest.approx(0.1, abs=2e-3)
    assert r["chamfer"] == pytest.approx(0.5 * (r["accuracy"] + r["completeness"]))
    assert r["accuracy_median"] == pytest.approx(0.1, abs=2e-3)
    assert r["n_a"] == 20000 and r["n_b"] == 20000


def test_chamfer_max_dist_drops_or_clips():
    a = np.array([[0.0, 0, 0], [0, 0, 10]])
    b = np.array([[0.0, 0, 1]])
    assert chamfer(a, b)["accuracy"] == pytest.approx(5.0)  # (1 + 9) / 2
    assert chamfer(a, b, max_dist=5)["accuracy"] == pytest.approx(1.0)  # 9 dropped
    assert chamfer(a, b, max_dist=5, drop_far=False)["accuracy"] == pytest.approx(3.0)  # 9 -> 5
    assert chamfer(a, b, max_dist=5)["n_a"] == 1


def two_triangle_mesh():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 2, 0], [5, 0, 0], [8, 0, 0], [5, 2, 0]], float)
    return v, np.array([[0, 1, 2], [3, 4, 5]])  # areas 1 and 3


def test_sample_mesh_points_uniform_by_area():
    v, f = two_triangle_mesh()
    p = sample_mesh_points(v, f, n=40000, seed=3)
    assert p.shape == (40000, 3) and np.all(p[:, 2] == 0)
    in_first = p[:, 0] < 2.5
    assert in_first.mean() == pytest.approx(0.25, abs=0.01)
    # inside the triangles: barycentric check for the first one (x/1 + y/2 <= 1)
    q = p[in_first]
    assert (q[:, 0] >= 0).all() and (q[:, 1] >= 0).all() and (q[:, 0] + q[:, 1] / 2 <= 1 + 1e-12).all()
    # uniform inside: mean is the centroid
    np.testing.assert_allclose(q.mean(axis=0), [1 / 3, 2 / 3, 0], atol=0.02)
    # same seed, same points
    np.testing.assert_array_equal(p, sample_mesh_points(v, f, n=40000, seed=3))


def test_surface_shares_of_a_sphere_its_shrunk_copy_and_a_bubble():
    from taichi_neus.export.evaluation import surface_shares
    from taichi_neus.export.mesh import Mesh, extract_mesh

    def sphere(r):
        return lambda p: (np.linalg.norm(np.asarray(p, np.float64), axis=1) - r).astype(np.float32)

    true = sphere(0.5)
    same = extract_mesh(sphere(0.5), resolution=48, coarse_resolution=None)
    sh = surface_shares(same.vertices, same.faces, true, tol=0.02, n=20000)
    assert sh["near"] == 1.0 and sh["inside"] == 0.0 and sh["outside"] == 0.0
    shrunk = extract_mesh(sphere(0.45), resolution=48, coarse_resolution=None)
    sh = surface_shares(shrunk.vertices, shrunk.faces, true, tol=0.02, n=20000)
    assert sh["inside"] == 1.0 and sh["near"] == 0.0
    # sphere + a closed bubble of radius 0.25 in its solid: the bubble's share of the area is 0.2
    bubble = extract_mesh(sphere(0.25), resolution=48, coarse_resolution=None)
    both = Mesh(np.concatenate([same.vertices, bubble.vertices]),
                np.concatenate([same.faces, bubble.faces + len(same.vertices)]))
    sh = surface_shares(both.vertices, both.faces, true, tol=0.02, n=50000, seed=1)
    assert sh["inside"] == pytest.approx(0.25**2 / (0.25**2 + 0.5**2), abs=0.01)
    assert sh["outside"] == 0.0 and sh["inside"] + sh["near"] == pytest.approx(1.0)
    # units: the mesh and the SDF in world units (x2), the band scaled with them
    sh = surface_shares(2 * shrunk.vertices, shrunk.faces, lambda q: 2 * true(q / 2), tol=0.04, n=5000)
    assert sh["inside"] == 1.0
    empty = surface_shares(np.zeros((0, 3)), np.zeros((0, 3), int), true)
    assert all(np.isnan(x) for x in empty.values())


def test_sample_mesh_points_grid_spacing():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], float)  # right triangle, legs 1
    p = sample_mesh_points(v, np.array([[0, 1, 2]]), spacing=0.1)
    # t = 0.1 * sqrt(1 * 1 / 1) = 0.1, n1 = n2 = 10: points ((i+.5)/10, (j+.5)/10) with sum < 1
    i, j = np.meshgrid(np.arange(11), np.arange(11), indexing="ij")
    expected = (i + j + 1) / 10 < 1
    assert p.shape[0] == 3 + expected.sum()  # the three vertices + the interior grid
    np.testing.assert_allclose(p[:3], v)
    np.testing.assert_allclose(np.sort(p[3:, 0]), np.sort(((i + 0.5) / 10)[expected]))
    # zero-area triangles contribute only their vertices
    flat = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0]], float)
    assert sample_mesh_points(flat, np.array([[0, 1, 2]]), spacing=0.1).shape == (3, 3)
    with pytest.raises(ValueError):
        sample_mesh_points(v, np.array([[0, 1, 2]]))


def test_sample_mesh_points_grid_matches_per_triangle_loop():
    """The grouped, vectorised sampler equals the formula applied triangle by triangle."""
    rng = np.random.default_rng(2)
    v = rng.random((40, 3)) * rng.choice([0.3, 1.0, 3.0], size=(40, 1))
    f = rng.integers(0, 40, size=(60, 3))
    spacing = 0.1
    ref = [v]
    for a, b, c in v[f]:
        e1, e2 = b - a, c - a
        area2 = np.linalg.norm(np.cross(e1, e2))
        if area2 == 0:
            continue
        l1, l2 = np.linalg.norm(e1), np.linalg.norm(e2)
        t = spacing * np.sqrt(l1 * l2 / area2)
        n1, n2 = int(np.floor(l1 / t)), int(np.floor(l2 / t))
        for i in range(n1 + 1):
            for j in range(n2 + 1):
                ka, kb = (i + 0.5) / max(n1, 1e-7), (j + 0.5) / max(n2, 1e-7)
                if ka + kb < 1:
                    ref.append((a + ka * e1 + kb * e2)[None])
    ref = np.concatenate(ref)
    got = sample_mesh_points(v, f, spacing=spacing)
    assert got.shape == ref.shape
    order = lambda x: x[np.lexsort(np.round(x, 9).T[::-1])]  # noqa: E731
    np.testing.assert_allclose(order(got), order(ref), atol=1e-9)


def greedy_reference(points, radius, seed):
    """The DTU scripts' loop, written plainly."""
    order = np.random.default_rng(seed).permutation(len(points))
    tree = cKDTree(points)
    keep = np.ones(len(points), bool)
    for i in order:
        if keep[i]:
            keep[tree.query_ball_point(points[i], radius)] = False
            keep[i] = True
    return points[keep]


def test_downsample_points_matches_sequential_greedy():
    rng = np.random.default_rng(5)
    pts = rng.random((3000, 3)) * [4, 4, 0.5]
    for seed in (0, 1):
        got = downsample_points(pts, 0.2, seed=seed)
        ref = greedy_reference(pts, 0.2, seed)
        np.testing.assert_array_equal(got, ref)
    # properties: kept points are more than r apart, every point is within r of a kept one
    d, _ = cKDTree(got).query(got, k=2)
    assert d[:, 1].min() > 0.2
    assert cKDTree(got).query(pts)[0].max() <= 0.2
    assert downsample_points(np.zeros((0, 3)), 0.2).shape == (0, 3)


# ------------------------------------------------------------------------------ DTU protocol


def quad(x0, x1, y0, y1, z):
    v = np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]], float)
    return v, np.array([[0, 1, 2], [0, 2, 3]])


def grid_plane(x0, x1, y0, y1, z, step):
    x, y = np.meshgrid(np.arange(x0, x1 + 1e-9, step), np.arange(y0, y1 + 1e-9, step), indexing="ij")
    return np.stack([x.ravel(), y.ravel(), np.full(x.size, z)], axis=1)


@pytest.fixture
def fake_dtu(tmp_path):
    """A stand-in for DTU's files, scan 7.

    STL: the plane z = 0 over [0, 10]^2 (step 0.1), plus points below the ground plane (z = -3)
    and points far above (z = 30). Ground plane P = (0, 0, 1, 2): z > -2 is above.
    ObsMask: 1 mm voxels from BB[0] = (-5, -5, -35); set only where x < 9.5.
    """
    stl_main = grid_plane(0, 10, 0, 10, 0.0, 0.1)
    stl_below = grid_plane(0, 10, 0, 10, -3.0, 0.5)
    stl_far = grid_plane(0, 10, 0, 10, 30.0, 0.5)
    (tmp_path / "Points" / "stl").mkdir(parents=True)
    (tmp_path / "ObsMask").mkdir()
    write_ply(tmp_path / "Points" / "stl" / "stl007_total.ply", np.concatenate([stl_main, stl_below, stl_far]))
    bb = np.array([[-5.0, -5, -35], [25, 15, 45]])
    obs = np.zeros((31, 21, 81), bool)
    obs[:15] = True  # voxel index round(x + 5) <= 14  <=>  x < 9.5
    savemat(tmp_path / "ObsMask" / "ObsMask7_10.mat", {"ObsMask": obs, "BB": bb, "Res": np.array([[1.0]])})
    savemat(tmp_path / "ObsMask" / "Plane7.mat", {"P": np.array([[0.0], [0], [1], [2]])})
    return tmp_path, stl_main


def test_dtu_chamfer_plane_shifted_by_one_mm(fake_dtu):
    root, stl_main = fake_dtu
    # data: the plane z = 1 over x in [0, 20] (the part x >= 9.5 lies outside ObsMask) and a far
    # patch at z = -30 inside ObsMask, more than 20 mm from any STL point
    v1, f1 = quad(0, 20, 0, 10, 1.0)
    v2, f2 = quad(0, 5, 0, 5, -30.0)
    v, f = np.concatenate([v1, v2]), np.concatenate([f1, f2 + 4])
    r = dtu_chamfer(v, f, 7, root, density=0.1)
    # accuracy: in-mask samples of z = 1 are 1 mm above the STL grid (0.1 mm step: <= 0.0025 extra);
    # the z = -30 patch (27 mm from z = -3) is discarded; samples at x >= 9.5 are outside the mask
    assert r["accuracy"] == pytest.approx(1.0, abs=4e-3)
    # completeness: z = 0 STL points -> samples 1 mm above; z = -3 is below the ground plane,
    # z = 30 is 29 mm from the data and discarded
    assert r["completeness"] == pytest.approx(1.0, abs=4e-3)
    assert r["overall"] == pytest.approx(1.0, abs=4e-3)
    assert r["n_stl_above"] == stl_main.shape[0] + 21 * 21
    assert r["n_completeness"] == stl_main.shape[0]
    assert r["n_accuracy"] < r["n_in_mask"] < r["n_samples"]
    assert r["accuracy_median"] == pytest.approx(1.0, abs=4e-3)
    # the outlier cut matters: with a 100 mm cut the far patch and the far STL points count
    r100 = dtu_chamfer(v, f, 7, root, density=0.1, max_dist=100.0)
    assert r100["accuracy"] > 2.0
    n_main, n_far = stl_main.shape[0], 21 * 21
    assert r100["completeness"] == pytest.approx((n_main * 1.0 + n_far * 29.0) / (n_main + n_far), abs=4e-3)


def test_dtu_chamfer_respects_obs_mask(fake_dtu):
    root, _ = fake_dtu
    # a plane entirely outside the observation mask (x > 12) contributes no accuracy samples,
    # and completeness sees the STL at lateral distances >= 2 mm
    v, f = quad(12, 20, 0, 10, 0.0)
    r = dtu_chamfer(v, f, 7, root, density=0.2)
    assert r["n_accuracy"] == 0 and np.isnan(r["accuracy"])
    assert r["completeness"] > 2.0


def test_dtu_chamfer_missing_files_named(tmp_path, fake_dtu):
    root, _ = fake_dtu
    v, f = quad(0, 1, 0, 1, 0.0)
    with pytest.raises(UserInputError, match="stl024_total.ply"):
        dtu_chamfer(v, f, 24, tmp_path / "nowhere")
    (root / "ObsMask" / "Plane7.mat").unlink()
    with pytest.raises(UserInputError, match="Plane7.mat"):
        dtu_chamfer(v, f, 7, root)
    savemat(root / "ObsMask" / "Plane7.mat", {"Q": np.zeros(4)})
    with pytest.raises(UserInputError, match="lacks the variable"):
        dtu_chamfer(v, f, 7, root)
