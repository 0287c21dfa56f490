"""NeRF-synthetic (Blender) loader: a small scene rendered from the analytic object, every refusal, fuzzing."""

import json
import pathlib
import shutil
import tempfile

import numpy as np
import pytest
from format_helpers import write_blender
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from taichi_neus.data import synthetic as syn
from taichi_neus.data.blender import load_blender
from taichi_neus.data.loader import detect_format, load_scene
from taichi_neus.errors import UserInputError

W, H = 40, 32
QUIET = {"log": lambda *a: None}


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("blender") / "s"
    truth = write_blender(root, n_train=6, n_test=4, W=W, H=H, seed=2)
    return root, truth


@pytest.fixture
def copy(scene_dir, tmp_path):
    dst = tmp_path / "s"
    shutil.copytree(scene_dir[0], dst)
    return dst


def _world_c2w(s):
    w = s.c2w.astype(np.float64).copy()
    w[:, :3, 3] = w[:, :3, 3] @ s.scale_mat[:3, :3].T + s.scale_mat[:3, 3]
    return w


def test_loads_cameras_images_and_masks(scene_dir, capsys):
    root, truth = scene_dir
    assert detect_format(root) == "blender"
    s = load_scene(root, holdout_every=2)
    summary = [ln for ln in capsys.readouterr().out.splitlines() if "unit sphere" in ln]
    assert len(summary) == 1 and "masks" in summary[0]
    # train: all 6 frames of transforms_train.json; held out: test frames 0 and 2
    assert s.train_ids.tolist() == list(range(6)) and s.test_ids.tolist() == [6, 7]
    assert s.images.shape == (8, H, W, 3) and s.images.dtype == np.uint8
    assert s.masks.shape == (8, H, W) and set(np.unique(s.masks)) <= {0, 255}
    keep = [0, 1, 2, 3, 4, 5, 6, 8]
    # OpenGL -> OpenCV and back to world units through scale_mat: the poses written
    np.testing.assert_allclose(_world_c2w(s), truth["c2w_world"][keep], atol=2e-6 * np.abs(s.scale_mat).max())
    np.testing.assert_allclose(s.K, np.broadcast_to(truth["K"], s.K.shape), rtol=1e-6)
    # RGBA composited on white: rgb·a + 255·(1 − a), to rounding of the 8-bit PNG
    rgb = np.clip(np.round(truth["rgb"][keep] * 255), 0, 255)
    a = np.clip(np.round(truth["alpha"][keep] * 255), 0, 255)[..., None]
    expect = (rgb * a + 255 * (255 - a)) / 255
    assert np.abs(s.images - expect).max() <= 1.0
    np.testing.assert_array_equal(s.masks, np.where(a[..., 0] > 127, 255, 0))
    assert s.background == (1.0, 1.0, 1.0)
    # the unit sphere holds the whole object: world surface points map inside it
    surf = s.world_to_unit(syn.sample_surface(4000, seed=3))
    assert np.linalg.norm(surf, axis=1).max() < 0.95


def test_black_background_downscale_and_no_masks(scene_dir):
    root, _ = scene_dir
    s = load_blender(root, downscale=2, background="black", use_masks=False, holdout_every=0, **QUIET)
    full = load_blender(root, background="black", holdout_every=0, **QUIET)
    assert s.masks is None and s.test_ids.size == 0 and s.n_views == 6
    assert s.images.shape == (6, H // 2, W // 2, 3)
    np.testing.assert_allclose(s.K[:, :2], full.K[:, :2] / 2, rtol=1e-6)
    # background pixels (alpha 0 in every sub-pixel) are black, foreground equals the stored RGB
    assert (full.images[full.masks == 0].max(axis=-1) <= 128).all()
    assert (full.images[full.masks == 0] == 0).mean() > 0.9
    assert full.background == (0.0, 0.0, 0.0)
    np.testing.assert_allclose(full.scale_mat, load_blender(root, holdout_every=0, **QUIET).scale_mat)


def test_single_transforms_json_with_focal_keys(copy):
    """instant-ngp/nerfstudio style: one transforms.json with fl_x/fl_y/cx/cy and file names with .png."""
    meta = json.loads((copy / "transforms_train.json").read_text())
    for f in ("transforms_train.json", "transforms_val.json", "transforms_test.json"):
        (copy / f).unlink()
    meta.pop("camera_angle_x")
    meta.update(fl_x=50.0, fl_y=52.0, cx=19.0, cy=17.5, w=W, h=H, k1=0.0)
    for fr in meta["frames"]:
        fr["file_path"] += ".png"
    (copy / "transforms.json").write_text(json.dumps(meta))
    s = load_scene(copy, holdout_every=3, **QUIET)
    assert s.test_ids.tolist() == [0, 3] and s.train_ids.tolist() == [1, 2, 4, 5]
    np.testing.assert_allclose(s.K[0], [[50, 0, 19], [0, 52, 17.5], [0, 0, 1]])


def test_roi_override(scene_dir):
    root, _ = scene_dir
    s = load_blender(root, roi=(0.2, -0.1, 0.3, 1.5), **QUIET)
    np.testing.assert_allclose(s.scale_mat, [[1.5, 0, 0, 0.2], [0, 1.5, 0, -0.1], [0, 0, 1.5, 0.3], [0, 0, 0, 1]])
    with pytest.raises(UserInputError, match="contains a camera"):
        load_blender(root, roi=(0.2, -0.1, 0.3, 50.0), **QUIET)
    with pytest.raises(UserInputError, match="four numbers"):
        load_blender(root, roi=(1.0, 2.0), **QUIET)


def test_opaque_images_use_the_camera_frusta(copy, capsys):
    for p in (copy / "train").glob("*.png"):
        Image.open(p).convert("RGB").save(p)
    for p in (copy / "test").glob("*.png"):
        Image.open(p).convert("RGB").save(p)
    s = load_blender(copy, holdout_every=0)
    assert s.masks is None
    assert "camera frusta" in capsys.readouterr().out
    # the cameras look at the scene's world centre: the frusta put the unit sphere there
    np.testing.assert_allclose(s.scale_mat[:3, 3], syn.OFFSET, atol=1e-6)


# ----------------------------------------------------------------------------------- refusals
def _edit(root, fn, name="transforms_train.json"):
    f = pathlib.Path(root) / name
    meta = json.loads(f.read_text())
    fn(meta)
    f.write_text(json.dumps(meta))


def _refused(root, *words, **kw):
    with pytest.raises(UserInputError) as e:
        load_blender(root, **QUIET, **kw)
    msg = str(e.value)
    for w in words:
        assert w in msg, msg
    assert "\n" not in msg
    return msg


def test_refuses_invalid_json(copy):
    (copy / "transforms_train.json").write_text("{not json")
    _refused(copy, "transforms_train.json", "not valid JSON")


def test_refuses_missing_frames_and_focal(copy):
    _edit(copy, lambda m: m.pop("camera_angle_x"))
    _refused(copy, "camera_angle_x", "transforms_train.json")
    _edit(copy, lambda m: m.update(frames=[]))
    _refused(copy, "lists no frames")


def test_refuses_bad_matrices(copy):
    def nan(m):
        m["frames"][2]["transform_matrix"][0][3] = float("nan")
    _edit(copy, nan)
    _refused(copy, "frame 2", "NaN")

    def scaled(m):
        m["frames"][2]["transform_matrix"] = (np.array(m["frames"][1]["transform_matrix"]) * [[2], [2], [2], [1]]
                                              ).tolist()
    _edit(copy, scaled)
    _refused(copy, "frame 2", "not a rigid camera pose")

    def short(m):
        m["frames"][1]["transform_matrix"] = [[1, 0], [0, 1]]
    _edit(copy, short)
    _refused(copy, "frame 1", "shape")


def test_refuses_distortion_and_other_models(copy):
    _edit(copy, lambda m: m.update(k1=0.1))
    _refused(copy, "lens distortion", "k1")
    _edit(copy, lambda m: m.update(k1=0.0, camera_model="OPENCV_FISHEYE"))
    _refused(copy, "OPENCV_FISHEYE")


def test_refuses_missing_and_corrupt_images(copy):
    (copy / "train" / "r_3.png").unlink()
    _refused(copy, "r_3", "missing")
    shutil.copy(copy / "train" / "r_2.png", copy / "train" / "r_3.png")
    f = copy / "train" / "r_4.png"
    f.write_bytes(f.read_bytes()[:120])
    _refused(copy, "r_4.png")


def test_refuses_sizes_that_differ_and_mixed_alpha(copy):
    Image.new("RGBA", (W + 2, H)).save(copy / "train" / "r_1.png")
    _refused(copy, "r_1.png", f"{W + 2}x{H}")
    Image.new("RGB", (W, H)).save(copy / "train" / "r_1.png")
    _refused(copy, "r_1.png", "no alpha channel")


def test_refuses_cameras_looking_away(copy):
    def away(m):  # rotate frame 0 by 180 degrees about its y axis: it looks away from the object
        M = np.array(m["frames"][0]["transform_matrix"])
        M[:3, :3] = M[:3, :3] @ np.diag([-1.0, 1.0, -1.0])
        m["frames"][0]["transform_matrix"] = M.tolist()
    _edit(copy, away)
    _refused(copy, "frame 0", "region of interest")


def test_refuses_bad_background(scene_dir):
    _refused(scene_dir[0], "background", background="grey")


# ------------------------------------------------------------------------------------ fuzzing
_json = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers(-5, 5) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=8), c, max_size=5), max_leaves=25)

_frame = st.fixed_dictionaries(
    {"file_path": st.sampled_from(["./train/r_0", "./train/r_1.png", "nothing", "", 3]),
     "transform_matrix": st.one_of(
         st.lists(st.lists(st.floats(-5, 5) | st.floats(allow_nan=True), min_size=4, max_size=4), min_size=3,
                  max_size=4), _json)})


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz") / "s"
    write_blender(root, n_train=2, n_test=1, W=16, H=16, seed=5, with_val=False)
    return root


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(meta=st.one_of(_json, st.fixed_dictionaries(
    {"camera_angle_x": st.floats(allow_nan=True) | st.integers() | st.text(max_size=3),
     "frames": st.lists(_frame, max_size=3)}, optional={"fl_x": st.floats(allow_nan=True), "w": _json})))
def test_fuzz_random_transforms_json(fuzz_root, meta):
    with tempfile.TemporaryDirectory() as d:
        root = pathlib.Path(d) / "s"
        shutil.copytree(fuzz_root, root)
        (root / "transforms_train.json").write_text(json.dumps(meta))
        try:
            s = load_blender(root, **QUIET)
        except UserInputError as e:
            assert "\n" not in str(e)
        else:
            assert np.isfinite(s.K).all() and np.isfinite(s.c2w).all() and s.images.dtype == np.uint8


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), which=st.sampled_from(["json", "png", "png_header"]))
def test_fuzz_random_bytes(fuzz_root, data, which):
    with tempfile.TemporaryDirectory() as d:
        root = pathlib.Path(d) / "s"
        shutil.copytree(fuzz_root, root)
        if which == "json":
            (root / "transforms_train.json").write_bytes(data)
        else:
            f = root / "train" / "r_1.png"
            f.write_bytes((f.read_bytes()[:33] if which == "png_header" else b"") + data)
        try:
            load_blender(root, **QUIET)
        except UserInputError as e:
            assert "\n" not in str(e)
