"""`taichi-neus train` refuses bad input with one sentence and exit status 2, writing nothing."""

import shutil
import subprocess
import sys

import numpy as np
import pytest

from taichi_neus.data import default_scene_path


@pytest.fixture(scope="module")
def scene_copy(tmp_path_factory):
    src = default_scene_path()
    dst = tmp_path_factory.mktemp("scene") / "s"
    shutil.copytree(src, dst)
    return dst


def _run(args, tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "taichi_neus.app.cli", "train", "--out", str(out), *args],
                       capture_output=True, text=True, timeout=300)
    return p, out


def _assert_refused(p, out, *words):
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("taichi-neus: error:")]
    assert len(lines) == 1, p.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_missing_cameras(scene_copy, tmp_path):
    bad = tmp_path / "nocam"
    shutil.copytree(scene_copy, bad)
    (bad / "cameras_sphere.npz").unlink()
    p, out = _run(["--data", str(bad), "--arch", "cpu"], tmp_path)
    _assert_refused(p, out, "cameras_sphere.npz")


def test_fewer_masks_than_images(scene_copy, tmp_path):
    bad = tmp_path / "fewmasks"
    shutil.copytree(scene_copy, bad)
    sorted((bad / "mask").iterdir())[-1].unlink()
    p, out = _run(["--data", str(bad), "--arch", "cpu"], tmp_path)
    _assert_refused(p, out, "mask")


def test_unreadable_image(scene_copy, tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(scene_copy, bad)
    img = sorted((bad / "image").iterdir())[3]
    img.write_bytes(img.read_bytes()[:60])  # truncated PNG
    p, out = _run(["--data", str(bad), "--arch", "cpu"], tmp_path)
    _assert_refused(p, out, img.name)


def test_nan_in_cameras(scene_copy, tmp_path):
    bad = tmp_path / "nancam"
    shutil.copytree(scene_copy, bad)
    cams = dict(np.load(bad / "cameras_sphere.npz"))
    cams["world_mat_2"][0, 0] = np.nan
    np.savez(bad / "cameras_sphere.npz", **cams)
    p, out = _run(["--data", str(bad), "--arch", "cpu"], tmp_path)
    _assert_refused(p, out, "cameras_sphere.npz")


@pytest.mark.parametrize("arch", ["metal", "cuda"])
def test_unavailable_arch(tmp_path, arch):
    # the console script in a child process where no GPU backend is available, whatever this machine has
    mock = ("import sys; from taichi_neus import runtime; runtime._arch_available = lambda name: name == 'cpu'; "
            "from taichi_neus.app.cli import main; sys.exit(main())")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", mock, "train", "--out", str(out), "--arch", arch],
                       capture_output=True, text=True, timeout=300)
    _assert_refused(p, out, arch)


def test_unknown_arch_and_option(tmp_path):
    p, out = _run(["--arch", "tpu"], tmp_path)
    _assert_refused(p, out, "tpu")
    p, out = _run(["--train.nonsense", "3"], tmp_path)
    _assert_refused(p, out, "nonsense")


def test_existing_run_is_not_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    keep = out / "mesh_000100.ply"
    keep.write_bytes(b"precious")
    p, _ = _run(["--arch", "cpu"], tmp_path)
    assert p.returncode == 2 and "already holds" in p.stderr
    assert keep.read_bytes() == b"precious"


# In-process from here (main() returns the exit status): the same refusals, one per kind of bad input.
def _refused_inprocess(capsys, args, tmp_path, *words):
    from taichi_neus.app.cli import main
    out = tmp_path / "out"
    code = main(["train", "--out", str(out), "--arch", "cpu", "--iters", "1", *args])  # 1 step if not refused
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("taichi-neus: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
    assert not out.exists()


def _broken_copy(scene_copy, tmp_path, name):
    bad = tmp_path / name
    shutil.copytree(scene_copy, bad)
    return bad


def test_refuses_missing_folder(tmp_path, capsys):
    _refused_inprocess(capsys, ["--data", str(tmp_path / "nowhere")], tmp_path, "nowhere", "does not exist")


def test_refuses_no_images(scene_copy, tmp_path, capsys):
    bad = _broken_copy(scene_copy, tmp_path, "noimg")
    for p in (bad / "image").iterdir():
        p.unlink()
    _refused_inprocess(capsys, ["--data", str(bad)], tmp_path, "image", "no .png")


def test_refuses_mask_size_mismatch(scene_copy, tmp_path, capsys):
    bad = _broken_copy(scene_copy, tmp_path, "masksize")
    from PIL import Image
    Image.new("L", (50, 40)).save(bad / "mask" / "005.png")
    _refused_inprocess(capsys, ["--data", str(bad)], tmp_path, "005.png", "50x40")


def test_refuses_image_sizes_that_differ(scene_copy, tmp_path, capsys):
    bad = _broken_copy(scene_copy, tmp_path, "imgsize")
    from PIL import Image
    Image.new("RGB", (64, 96)).save(bad / "image" / "007.png")
    _refused_inprocess(capsys, ["--data", str(bad)], tmp_path, "007.png", "64x96")


def test_refuses_camera_file_missing_keys(scene_copy, tmp_path, capsys):
    bad = _broken_copy(scene_copy, tmp_path, "nokey")
    cams = dict(np.load(bad / "cameras_sphere.npz"))
    del cams["world_mat_4"]
    np.savez(bad / "cameras_sphere.npz", **cams)
    _refused_inprocess(capsys, ["--data", str(bad)], tmp_path, "cameras_sphere.npz", "world_mat_4")


def test_refuses_singular_camera(scene_copy, tmp_path, capsys):
    bad = _broken_copy(scene_copy, tmp_path, "singular")
    cams = dict(np.load(bad / "cameras_sphere.npz"))
    cams["world_mat_3"][:3, 1] = cams["world_mat_3"][:3, 0]
    np.savez(bad / "cameras_sphere.npz", **cams)
    _refused_inprocess(capsys, ["--data", str(bad)], tmp_path, "cameras_sphere.npz", "singular")


def test_refuses_cameras_not_seeing_the_unit_sphere(scene_copy, tmp_path, capsys):
    bad = _broken_copy(scene_copy, tmp_path, "away")
    cams = dict(np.load(bad / "cameras_sphere.npz"))
    from taichi_neus.data.cameras import decompose_projection, projection_matrix
    S = cams["scale_mat_6"]
    K, R, t = decompose_projection(cams["world_mat_6"][:3] @ S)
    t[2] = -t[2]  # the unit sphere's centre is now behind the camera
    cams["world_mat_6"][:3] = projection_matrix(K, R, t) @ np.linalg.inv(S)
    np.savez(bad / "cameras_sphere.npz", **cams)
    _refused_inprocess(capsys, ["--data", str(bad)], tmp_path, "camera 6", "unit sphere")


def test_refuses_colmap_unsupported_camera_model(tmp_path, capsys):
    from format_helpers import write_colmap
    root = tmp_path / "colmap"
    write_colmap(root, n_views=3, W=24, H=24, seed=0, n_points=50)
    (root / "sparse" / "0" / "cameras.txt").write_text("1 OPENCV_FISHEYE 24 24 30 30 12 12 0.1 0 0 0\n")
    _refused_inprocess(capsys, ["--data", str(root)], tmp_path, "OPENCV_FISHEYE", "cameras.txt")


def test_refuses_nerf_synthetic_bad_json(tmp_path, capsys):
    from format_helpers import write_blender
    root = tmp_path / "blender"
    write_blender(root, n_train=2, n_test=1, W=16, H=16, with_val=False)
    (root / "transforms_train.json").write_text('{"camera_angle_x": 0.6, "frames": [{"file_path": "x"}]}')
    _refused_inprocess(capsys, ["--data", str(root)], tmp_path, "transforms_train.json", "frame 0")


def test_refuses_batch_too_large_for_memory(tmp_path, capsys):
    # (over 2^31 elements here; tests/test_faults.py checks the memory rule with a given available size)
    _refused_inprocess(capsys, ["--train.max_rays", "50000000", "--train.sample_budget", "10000000000"], tmp_path,
                       "--train.max_rays 50000000", "lower --train.max_rays")
