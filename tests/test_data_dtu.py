"""NeuS/DTU loader: a tiny folder written here, downscaling, every refusal, fuzzing, and scan24."""

import pathlib
import tempfile
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from taichi_neus.data.cameras import camera_to_world, project, projection_matrix
from taichi_neus.data.dtu import block_mean, load_dtu, natural_key, read_mask
from taichi_neus.data.rays import pixel_rays
from taichi_neus.errors import UserInputError

W, H = 32, 24
SCALE = np.array([[1.5, 0, 0, 0.3], [0, 1.5, 0, -0.2], [0, 0, 1.5, 0.1], [0, 0, 0, 1.0]])


def look_at(centre):
    z = -centre / np.linalg.norm(centre)
    x = np.cross(z, [0.0, -1.0, 0.0])
    x /= np.linalg.norm(x)
    R = np.stack([x, np.cross(z, x), z])
    return R, -R @ centre


def unit_cameras(n):
    """Ground truth: K (3, 3) and unit-sphere poses on a circle of radius 3, tilted."""
    K = np.array([[40.0, 0.3, W / 2 + 0.4], [0.0, 41.0, H / 2 - 0.3], [0.0, 0.0, 1.0]])
    poses = []
    for i in range(n):
        a = 2 * np.pi * i / n
        poses.append(look_at(3.0 * np.array([np.cos(a), -0.4, np.sin(a)])))
    return K, poses


def world_mat(K, R, t):
    """K[R|t] padded to 4x4 projecting WORLD points (world = SCALE @ unit)."""
    P = np.eye(4)
    P[:3] = projection_matrix(K, R, t) @ np.linalg.inv(SCALE)
    return P


def write_scene(root, n=3, image_dir="image", names=None, mask_channels=3, with_masks=True, size=(W, H)):
    """A tiny NeuS-layout scene; returns (images (n, H, W, 3), masks (n, H, W), K, poses)."""
    root = pathlib.Path(root)
    rng = np.random.default_rng(n)
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    K, poses = unit_cameras(n)
    names = names or [f"{i:06d}.png" for i in range(n)]
    images = rng.integers(0, 256, size=(n, size[1], size[0], 3), dtype=np.uint8)
    masks = np.where(rng.uniform(size=(n, size[1], size[0])) < 0.5, 255, 0).astype(np.uint8)
    for i in range(n):
        Image.fromarray(images[i]).save(root / image_dir / names[i])
    if with_masks:
        (root / "mask").mkdir(exist_ok=True)
        for i in range(n):
            m = masks[i] if mask_channels == 1 else np.repeat(masks[i][..., None], 3, axis=-1)
            Image.fromarray(m).save(root / "mask" / f"{i:03d}.png")
    cams = {}
    for i, (R, t) in enumerate(poses):
        cams[f"world_mat_{i}"] = world_mat(K, R, t)
        cams[f"scale_mat_{i}"] = SCALE
        cams[f"camera_mat_{i}"] = np.eye(4)  # present in NeuS files, unused
    np.savez(root / "cameras_sphere.npz", **cams)
    return images, masks, K, poses


def rewrite_cameras(root, edit):
    f = pathlib.Path(root) / "cameras_sphere.npz"
    with np.load(f) as d:
        cams = dict(d)
    edit(cams)
    np.savez(f, **cams)


def test_loads_tiny_scene(tmp_path):
    images, masks, K, poses = write_scene(tmp_path / "scan1", n=10)
    s = load_dtu(tmp_path / "scan1")
    assert s.n_views == 10 and (s.H, s.W) == (H, W) and s.name == "scan1" and s.downscale == 1
    assert s.images.dtype == np.uint8 and s.masks.dtype == np.uint8
    assert s.K.dtype == np.float32 and s.c2w.dtype == np.float32 and s.scale_mat.dtype == np.float64
    np.testing.assert_array_equal(s.images, images)
    np.testing.assert_array_equal(s.masks, masks)
    np.testing.assert_allclose(s.scale_mat, SCALE)
    for i, (R, t) in enumerate(poses):
        np.testing.assert_allclose(s.K[i], K, rtol=1e-6)
        np.testing.assert_allclose(s.c2w[i], camera_to_world(R, t), atol=1e-6)
    np.testing.assert_array_equal(s.test_ids, [0, 8])
    np.testing.assert_array_equal(s.train_ids, [1, 2, 3, 4, 5, 6, 7, 9])
    np.testing.assert_allclose(s.camera_sigma(), 3.0 * np.sqrt(1.16), rtol=1e-6)
    x = np.array([[0.1, -0.2, 0.3]])
    np.testing.assert_allclose(s.unit_to_world(x), [[0.45, -0.5, 0.55]])
    np.testing.assert_allclose(s.world_to_unit(s.unit_to_world(x)), x)
    # Rays of the loaded cameras see, in WORLD units, what world_mat projects.
    o, d = pixel_rays(s.K[3], s.c2w[3], np.array([[5.5, 7.5]]))
    X_world = s.unit_to_world(o + 2.0 * d)
    uv, _ = project(world_mat(K, *poses[3]), X_world)
    np.testing.assert_allclose(uv[0], [5.5, 7.5], atol=1e-4)


def test_holdout_options(tmp_path):
    write_scene(tmp_path, n=17)
    s = load_dtu(tmp_path, holdout_every=0)
    assert s.test_ids.size == 0 and s.train_ids.tolist() == list(range(17))
    s = load_dtu(tmp_path, holdout_every=8)
    assert s.test_ids.tolist() == [0, 8, 16]
    s = load_dtu(tmp_path, holdout_every=5, use_masks=False)
    assert s.test_ids.tolist() == [0, 5, 10, 15] and s.masks is None
    for bad in (1, -1, 2.5):
        with pytest.raises(UserInputError, match="holdout_every"):
            load_dtu(tmp_path, holdout_every=bad)


def test_images_folder_natural_order_and_one_channel_masks(tmp_path):
    names = ["1.png", "2.png", "10.png"]
    images, masks, _, _ = write_scene(tmp_path, n=3, image_dir="images", names=names, mask_channels=1)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    (tmp_path / "images" / ".hidden.png").write_bytes(b"junk")
    s = load_dtu(tmp_path)
    assert s.image_names == names
    np.testing.assert_array_equal(s.images, images)  # 10.png is the third view, not the second
    np.testing.assert_array_equal(s.masks, masks)
    assert sorted(["a10", "a2", "b1"], key=natural_key) == ["a2", "a10", "b1"]


def test_missing_mask_folder_warns(tmp_path):
    write_scene(tmp_path, with_masks=False)
    with pytest.warns(UserWarning, match="no mask"):
        s = load_dtu(tmp_path)
    assert s.masks is None


def test_block_mean_matches_pillow_reduce_and_downscale(tmp_path):
    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    for k in (2, 4, 8):
        ref = np.round(a.reshape(24 // k, k, 32 // k, k, 3).astype(np.float64).mean(axis=(1, 3)) + 1e-9)
        np.testing.assert_array_equal(block_mean(a, k), ref.astype(np.uint8))
        np.testing.assert_array_equal(np.asarray(Image.fromarray(a).reduce(k)), block_mean(a, k))

    images, masks, K, poses = write_scene(tmp_path, n=2, size=(2 * W, 2 * H))
    s = load_dtu(tmp_path, downscale=4)
    assert (s.H, s.W) == (H // 2, W // 2)
    for i in range(2):
        np.testing.assert_array_equal(s.images[i], block_mean(images[i], 4))
        expect = np.where(masks[i].reshape(H // 2, 4, W // 2, 4).mean(axis=(1, 3)) > 127, 255, 0)
        np.testing.assert_array_equal(s.masks[i], expect)
        np.testing.assert_allclose(s.K[i][:2], K[:2] / 4, rtol=1e-6)
    # Pixel edges align: the ray through a small pixel's centre hits the centre of its 4x4 block.
    o, d = pixel_rays(s.K[1], s.c2w[1], np.array([[2.5, 3.5]]))
    uv, _ = project(projection_matrix(K, *poses[1]), o + 3.0 * d)
    np.testing.assert_allclose(uv[0], [10.0, 14.0], atol=1e-4)


def test_mask_greyscale_threshold(tmp_path):
    m = np.zeros((8, 8, 3), np.uint8)
    m[:4] = (120, 130, 140)  # grey 128 -> foreground
    m[4:] = (126, 127, 127)  # grey 127 -> background
    Image.fromarray(m).save(tmp_path / "m.png")
    got = read_mask(tmp_path / "m.png")
    assert (got[:4] == 255).all() and (got[4:] == 0).all()


# ------------------------------------------------------------------ refusals (one test each)

def expect_refusal(root, match, **kw):
    with pytest.raises(UserInputError, match=match) as e:
        load_dtu(root, **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith(".")
    return msg


def test_refuses_missing_folder(tmp_path):
    expect_refusal(tmp_path / "nope", "nope does not exist")


def test_refuses_no_image_folder(tmp_path):
    write_scene(tmp_path)
    (tmp_path / "image").rename(tmp_path / "pics")
    expect_refusal(tmp_path, f"{tmp_path} has no image/ or images/")


def test_refuses_both_image_folders(tmp_path):
    write_scene(tmp_path)
    (tmp_path / "images").mkdir()
    expect_refusal(tmp_path, "both image/ and images/")


def test_refuses_no_images(tmp_path):
    write_scene(tmp_path)
    for f in (tmp_path / "image").iterdir():
        f.unlink()
    expect_refusal(tmp_path, "image holds no .png or .jpg images")


def test_refuses_no_camera_file(tmp_path):
    write_scene(tmp_path)
    (tmp_path / "cameras_sphere.npz").unlink()
    expect_refusal(tmp_path, "has no cameras_sphere.npz")


def test_refuses_corrupt_camera_file(tmp_path):
    write_scene(tmp_path)
    (tmp_path / "cameras_sphere.npz").write_bytes(b"PK\x03\x04 not really a zip")
    expect_refusal(tmp_path, "cannot read .*cameras_sphere.npz")


def test_refuses_missing_keys(tmp_path):
    write_scene(tmp_path)
    rewrite_cameras(tmp_path, lambda c: c.pop("world_mat_2"))
    expect_refusal(tmp_path, "cameras_sphere.npz lacks world_mat_2")


def test_refuses_extra_cameras(tmp_path):
    write_scene(tmp_path)
    rewrite_cameras(tmp_path, lambda c: c.update(world_mat_3=c["world_mat_0"], scale_mat_3=SCALE))
    expect_refusal(tmp_path, "cameras_sphere.npz has 4 cameras .* but there are 3 images")


def test_refuses_nan_world_mat(tmp_path):
    write_scene(tmp_path)
    rewrite_cameras(tmp_path, lambda c: c["world_mat_1"].__setitem__((0, 1), np.nan))
    expect_refusal(tmp_path, "'world_mat_1' in .*cameras_sphere.npz contains NaN or Inf")


def test_refuses_inf_scale_mat(tmp_path):
    write_scene(tmp_path)
    rewrite_cameras(tmp_path, lambda c: c.__setitem__("scale_mat_0", np.full((4, 4), np.inf)))
    expect_refusal(tmp_path, "'scale_mat_0' in .*cameras_sphere.npz contains NaN or Inf")


def test_refuses_singular_projection(tmp_path):
    write_scene(tmp_path)

    def edit(c):
        c["world_mat_2"][2, :3] = c["world_mat_2"][0, :3]

    rewrite_cameras(tmp_path, edit)
    expect_refusal(tmp_path, r"camera 2 \(world_mat_2 @ scale_mat_2\) in .*cameras_sphere.npz is singular")


def test_refuses_singular_scale_mat(tmp_path):
    write_scene(tmp_path)
    rewrite_cameras(tmp_path, lambda c: c.__setitem__("scale_mat_0", np.diag([1.0, 1.0, 0.0, 1.0])))
    expect_refusal(tmp_path, "scale_mat_0 in .*cameras_sphere.npz is singular")


def test_refuses_differing_scale_mats(tmp_path):
    write_scene(tmp_path)
    other = SCALE.copy()
    other[:3, :3] *= 2.0
    rewrite_cameras(tmp_path, lambda c: c.__setitem__("scale_mat_1", other))
    expect_refusal(tmp_path, "scale_mat_1 in .*cameras_sphere.npz differs from scale_mat_0")


def test_refuses_wrong_matrix_shape(tmp_path):
    write_scene(tmp_path)
    rewrite_cameras(tmp_path, lambda c: c.__setitem__("world_mat_0", np.eye(3)))
    expect_refusal(tmp_path, "'world_mat_0' in .*cameras_sphere.npz has shape")


def test_refuses_camera_facing_away(tmp_path):
    write_scene(tmp_path)
    R, t = look_at(np.array([0.0, 0.0, 3.0]))
    R_away = np.diag([-1.0, 1.0, -1.0]) @ R  # turned round: the centre is behind it
    K, _ = unit_cameras(3)
    rewrite_cameras(tmp_path, lambda c: c.__setitem__("world_mat_1", world_mat(K, R_away, R_away @ R.T @ t)))
    expect_refusal(tmp_path, "camera 1 in .*cameras_sphere.npz does not look at the unit sphere's centre .*behind")


def test_refuses_camera_looking_far_off(tmp_path):
    write_scene(tmp_path)
    K, poses = unit_cameras(3)
    K_off = K.copy()
    K_off[0, 2] += 3 * W  # principal point far off: the centre projects 3 images to the right
    rewrite_cameras(tmp_path, lambda c: c.__setitem__("world_mat_0", world_mat(K_off, *poses[0])))
    expect_refusal(tmp_path, "camera 0 in .*does not look at the unit sphere's centre .*at pixel")


def test_refuses_fewer_masks(tmp_path):
    write_scene(tmp_path)
    (tmp_path / "mask" / "002.png").unlink()
    expect_refusal(tmp_path, "mask holds 2 masks but .*image holds 3 images")


def test_refuses_more_masks(tmp_path):
    write_scene(tmp_path)
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "mask" / "003.png")
    expect_refusal(tmp_path, "mask holds 4 masks")


def test_refuses_mask_size(tmp_path):
    write_scene(tmp_path)
    Image.fromarray(np.zeros((H, W + 8), np.uint8)).save(tmp_path / "mask" / "001.png")
    expect_refusal(tmp_path, f"mask .*001.png is {W + 8}x{H} but the images are {W}x{H}")


def test_refuses_image_sizes_that_differ(tmp_path):
    write_scene(tmp_path)
    Image.fromarray(np.zeros((H + 8, W, 3), np.uint8)).save(tmp_path / "image" / "000002.png")
    expect_refusal(tmp_path, f"image .*000002.png is {W}x{H + 8} but 000000.png is {W}x{H}")


def test_refuses_corrupt_image(tmp_path):
    write_scene(tmp_path)
    (tmp_path / "image" / "000001.png").write_bytes(np.random.default_rng(0).bytes(500))
    expect_refusal(tmp_path, "cannot read image .*000001.png")


def test_refuses_truncated_image(tmp_path):
    write_scene(tmp_path)
    f = tmp_path / "image" / "000001.png"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    expect_refusal(tmp_path, "cannot read image .*000001.png .*truncated")


def test_refuses_corrupt_mask(tmp_path):
    write_scene(tmp_path)
    f = tmp_path / "mask" / "002.png"
    f.write_bytes(f.read_bytes()[:-40])
    expect_refusal(tmp_path, "cannot read image .*mask.*002.png")


def test_refuses_16_bit_image(tmp_path):
    write_scene(tmp_path)
    Image.fromarray(np.zeros((H, W), np.uint16)).save(tmp_path / "image" / "000000.png")
    expect_refusal(tmp_path, "000000.png has pixel mode")


def test_refuses_downscale_not_dividing(tmp_path):
    write_scene(tmp_path)
    expect_refusal(tmp_path, f"downscale 5 does not divide the {W}x{H} images in .*image; use one of", downscale=5)


def test_refuses_downscale_too_small_result(tmp_path):
    write_scene(tmp_path)
    expect_refusal(tmp_path, "downscale 4 leaves 8x6 pixels", downscale=4)
    expect_refusal(tmp_path, "downscale 8 leaves 4x3 pixels", downscale=8)
    expect_refusal(tmp_path, "downscale must be a positive integer", downscale=0)
    expect_refusal(tmp_path, "downscale must be a positive integer", downscale=2.0)


# ------------------------------------------------------------------ fuzzing

def _fuzz_scene():
    d = tempfile.TemporaryDirectory()
    write_scene(d.name, n=2)
    return d


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300), keep_header=st.booleans())
def test_fuzz_random_bytes_as_png(data, keep_header):
    with _fuzz_scene() as root:
        f = pathlib.Path(root) / "image" / "000001.png"
        if keep_header:  # a real PNG signature and IHDR, then garbage
            data = f.read_bytes()[:33] + data
        f.write_bytes(data)
        try:
            load_dtu(root)
        except UserInputError as e:
            assert "000001.png" in str(e)


matrix_entries = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.floats(-100, 100),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    world=arrays(np.float64, st.sampled_from([(4, 4), (3, 4), (3, 3)]), elements=matrix_entries),
    scale=arrays(np.float64, (4, 4), elements=matrix_entries),
    which=st.sampled_from(["world", "scale", "both"]),
)
def test_fuzz_random_camera_matrices(world, scale, which):
    with _fuzz_scene() as root:
        def edit(c):
            if which in ("world", "both"):
                c["world_mat_1"] = world
            if which in ("scale", "both"):
                c["scale_mat_0"] = scale
                c["scale_mat_1"] = scale

        rewrite_cameras(root, edit)
        try:
            s = load_dtu(root)
        except UserInputError as e:
            assert "cameras_sphere.npz" in str(e)
        else:
            assert np.isfinite(s.K).all() and np.isfinite(s.c2w).all()


# ------------------------------------------------------------------ the real scan


def test_dtu_scan24_loads(dtu_scan24):
    t0 = time.perf_counter()
    s = load_dtu(dtu_scan24, downscale=8)
    seconds = time.perf_counter() - t0
    assert s.n_views == 49 and (s.H, s.W) == (150, 200)
    assert s.images.shape == (49, 150, 200, 3) and s.masks.shape == (49, 150, 200)
    assert set(np.unique(s.masks)) == {0, 255}
    assert s.test_ids.tolist() == [0, 8, 16, 24, 32, 40, 48] and len(s.train_ids) == 42
    assert s.image_names[0] == "000000.png" and s.image_names[-1] == "000048.png"
    # K at 1/8 of the 1600x1200 resolution: focal ~2890/8, principal point near the middle.
    assert np.all((s.K[:, 0, 0] > 300) & (s.K[:, 0, 0] < 420)) and np.all(np.abs(s.K[:, 0, 2] - 100) < 30)
    # The unit sphere's centre projects inside every image and lands on the object (mask).
    for v in range(49):
        P = s.K[v].astype(np.float64) @ np.linalg.inv(s.c2w[v].astype(np.float64))[:3]
        uv, depth = project(P, np.zeros((1, 3)))
        assert depth[0] > 0 and 0 <= uv[0, 0] < s.W and 0 <= uv[0, 1] < s.H
        assert s.masks[v, int(uv[0, 1]), int(uv[0, 0])] == 255
    # Cameras outside the unit sphere, all at similar distances; the object's masks are in frame.
    dist = np.linalg.norm(s.c2w[:, :3, 3], axis=-1)
    assert dist.min() > 1.5 and dist.max() / dist.min() < 1.5
    assert 2.0 < s.camera_sigma() < 5.0
    assert 0.2 < (s.masks > 0).mean() < 0.95
    print(f"scan24 at downscale 8 loaded in {seconds:.2f} s")
