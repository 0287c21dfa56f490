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
    p = subprocess.run([sys.executable, "-m", "taichi_neus.cli", "train", "--out", str(out), *args],
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
    p, out = _run(["--arch", arch], tmp_path)
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
