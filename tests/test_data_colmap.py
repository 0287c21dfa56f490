"""COLMAP loader: text and binary models of a scene rendered from the analytic object, radial
undistortion against a distorted rendering, the region of interest, every refusal, fuzzing."""

import pathlib
import shutil
import struct
import tempfile

import numpy as np
import pytest
from format_helpers import render_rgba, undistort_points, write_colmap, write_model_text
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from taichi_neus.data import synthetic as syn
from taichi_neus.data.cameras import camera_to_world
from taichi_neus.data.colmap import (
    load_colmap,
    qvec_to_rotation,
    read_model,
    rotation_to_qvec,
    undistort,
    undistorted_camera,
)
from taichi_neus.data.loader import detect_format, load_scene
from taichi_neus.errors import UserInputError

W, H = 40, 32
QUIET = {"log": lambda *a: None}


@pytest.fixture(scope="module")
def text_scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("colmap") / "s"
    names = [f"img_{i}.png" for i in (2, 10, 1, 3, 0, 11)]  # natural order: 0 1 2 3 10 11
    truth = write_colmap(root, n_views=6, W=W, H=H, seed=1, names=names)
    return root, truth


@pytest.fixture
def copy(text_scene, tmp_path):
    dst = tmp_path / "s"
    shutil.copytree(text_scene[0], dst)
    return dst


def _world_c2w(s):
    w = s.c2w.astype(np.float64).copy()
    w[:, :3, 3] = w[:, :3, 3] @ s.scale_mat[:3, :3].T + s.scale_mat[:3, 3]
    return w


def test_loads_text_model(text_scene, capsys):
    root, truth = text_scene
    assert detect_format(root) == "colmap"
    s = load_scene(root, holdout_every=3)
    out = capsys.readouterr().out
    assert out.count("unit sphere") == 1 and "sparse points" in out
    assert s.image_names == [f"img_{i}.png" for i in (0, 1, 2, 3, 10, 11)]
    assert s.test_ids.tolist() == [0, 3] and s.train_ids.tolist() == [1, 2, 4, 5]
    order = [truth["names"].index(n) for n in s.image_names]
    np.testing.assert_array_equal(s.images, truth["images"][order])
    assert s.masks is None
    np.testing.assert_allclose(s.K[0], truth["K"], rtol=1e-6)
    c2w = np.stack([camera_to_world(*truth["poses"][i]) for i in order])
    np.testing.assert_allclose(_world_c2w(s), c2w, atol=1e-5)
    # the object lies inside the unit sphere, and fills a good part of it (the 30 outliers are ignored)
    r = np.linalg.norm(s.world_to_unit(syn.sample_surface(4000, seed=4)), axis=1)
    assert 0.6 < r.max() < 0.97, r.max()
    assert s.scale_mat[0, 0] < 2.0


def test_downscale_that_does_not_divide_crops_right_and_bottom(tmp_path):
    # undistorted photographs come in odd sizes (DTU's 1600x1200 -> 1591x1193): the remainder is dropped
    truth = write_colmap(tmp_path, n_views=4, W=43, H=34, seed=2, with_masks=True)
    logs = []
    s = load_colmap(tmp_path, downscale=4, log=logs.append)
    assert (s.W, s.H) == (10, 8) and s.images.shape == (4, 8, 10, 3) and s.masks.shape == (4, 8, 10)
    assert any("lose their last 3 columns and 2 rows" in line for line in logs)
    want = truth["images"][:, :32, :40].reshape(4, 8, 4, 10, 4, 3).astype(np.float64).mean(axis=(2, 4))
    assert np.abs(s.images.astype(np.float64) - want).max() <= 0.5 + 1e-9
    m = truth["masks"][:, :32, :40].reshape(4, 8, 4, 10, 4).astype(np.float64).mean(axis=(2, 4))
    assert ((s.masks > 127) == (np.floor(m + 0.5) > 127)).all()
    np.testing.assert_allclose(s.K[0, :2], truth["K"][:2] / 4, rtol=1e-6)  # pixel (0, 0) did not move
    full = load_colmap(tmp_path, downscale=1, log=logs.append)
    assert (full.W, full.H) == (43, 34)
    np.testing.assert_array_equal(full.images, truth["images"])


def test_binary_model_equals_text(tmp_path, text_scene):
    root, truth = text_scene
    b = tmp_path / "bin"
    write_colmap(b, n_views=6, W=W, H=H, seed=1, names=truth["names"], binary=True)
    assert not (b / "sparse" / "0" / "cameras.txt").exists()
    cams_t, recs_t, pts_t, _ = read_model(root / "sparse" / "0")
    cams_b, recs_b, pts_b, _ = read_model(b / "sparse" / "0")
    assert cams_t.keys() == cams_b.keys() and np.array_equal(cams_t[1].params, cams_b[1].params)
    assert [r.name for r in recs_t] == [r.name for r in recs_b]
    np.testing.assert_array_equal(np.stack([r.qvec for r in recs_t]), np.stack([r.qvec for r in recs_b]))
    np.testing.assert_array_equal(pts_t, pts_b)
    st_, sb = load_colmap(root, **QUIET), load_colmap(b, **QUIET)
    np.testing.assert_array_equal(st_.c2w, sb.c2w)
    np.testing.assert_array_equal(st_.scale_mat, sb.scale_mat)


def test_quaternion_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(50):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        q *= np.sign(q[0])
        R = qvec_to_rotation(q)
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(R) > 0
        np.testing.assert_allclose(rotation_to_qvec(R), q, atol=1e-9)
    # COLMAP's convention: q = (cos a/2, sin a/2 axis); a quarter turn about z maps x to y
    a = np.pi / 2
    np.testing.assert_allclose(qvec_to_rotation([np.cos(a / 2), 0, 0, np.sin(a / 2)]) @ [1, 0, 0], [0, 1, 0],
                               atol=1e-12)


@pytest.mark.parametrize("k", [(-0.25, 0.05), (0.2, 0.1)])
def test_undistort_matches_an_analytic_pattern(k):
    """A smooth pattern g(u, v) of undistorted normalised coordinates, photographed through COLMAP's
    radial lens, comes back as g at the undistorted camera's pixels to interpolation error."""
    W, H = 96, 72
    K = np.array([[60.0, 0, 48.3], [0, 60.0, 35.8], [0, 0, 1]])

    def g(u, v):
        return 127.5 + 100 * np.sin(3 * u + 0.5) * np.cos(4 * v - 0.3)

    ys, xs = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    u, v = undistort_points((xs - K[0, 2]) / K[0, 0], (ys - K[1, 2]) / K[1, 1], *k)
    photo = np.round(g(u, v)).astype(np.uint8)
    Ku = undistorted_camera(K, k, W, H, "test")
    assert (Ku[0, 0] == K[0, 0]) == (k[0] < 0)  # pincushion zooms in, barrel keeps the focal length
    out = undistort(photo, K, k, Ku).astype(float)
    want = g((xs - Ku[0, 2]) / Ku[0, 0], (ys - Ku[1, 2]) / Ku[1, 1])
    inner = (slice(1, -1), slice(1, -1))
    err = np.abs(out - want)[inner]
    raw = np.abs(photo - want)[inner]
    assert err.max() < 2.0 and err.mean() < 0.1 * raw.mean(), (err.max(), err.mean(), raw.mean())


@pytest.mark.parametrize("model,dist", [("SIMPLE_RADIAL", (0.3, 0.0)), ("RADIAL", (0.2, 0.4))])
def test_distorted_scene_loads_undistorted(tmp_path, model, dist):
    """Photographs of the object through a distorted lens, loaded, match pinhole renders of the same
    poses with the loader's K to interpolation error (measured 0.6-1.4 grey levels mean; the
    photographs as they are: 2.4-8.7)."""
    Wd, Hd = 64, 48
    truth = write_colmap(tmp_path, n_views=3, W=Wd, H=Hd, seed=2, model=model, dist=dist)
    s = load_colmap(tmp_path, holdout_every=0, **QUIET)
    Ku = s.K[0].astype(np.float64)
    assert Ku[0, 0] > truth["K"][0, 0] * 1.05  # pincushion: zoomed in so no pixel is invented
    for v in range(3):
        R, t = truth["poses"][v]
        rgb, cov = render_rgba(Ku, R, t, Wd, Hd)
        ref = np.clip(np.round(rgb * cov[..., None] * 255), 0, 255)
        err = np.abs(s.images[v].astype(float) - ref).mean()
        err_raw = np.abs(truth["images"][v].astype(float) - ref).mean()
        assert err < 2.5 and err < 0.4 * err_raw, (err, err_raw)


def test_folding_distortion_is_refused():
    K = np.array([[50.0, 0, 32], [0, 50.0, 24], [0, 0, 1]])
    with pytest.raises(UserInputError, match="folds the image over"):
        undistorted_camera(K, (-2.0, 0.0), 64, 48, "camera 1 in cameras.txt")


def test_masks_and_roi_choices(tmp_path, capsys):
    write_colmap(tmp_path / "m", n_views=6, W=W, H=H, seed=1, with_masks=True)
    s = load_colmap(tmp_path / "m", holdout_every=0)
    assert "masks" in capsys.readouterr().out and s.masks.shape == (6, H, W)
    assert np.linalg.norm(s.world_to_unit(syn.sample_surface(4000, seed=4)), axis=1).max() < 0.97
    assert load_colmap(tmp_path / "m", use_masks=False, **QUIET).masks is None
    # no points3D: the cameras' optical axes meet at the object's world centre
    write_colmap(tmp_path / "f", n_views=6, W=W, H=H, seed=1, with_points=False)
    s = load_colmap(tmp_path / "f")
    assert "camera frusta" in capsys.readouterr().out
    np.testing.assert_allclose(s.scale_mat[:3, 3], syn.OFFSET, atol=1e-6)
    # the user's sphere
    s = load_colmap(tmp_path / "f", roi=(0.0, 0.0, 0.0, 2.0), **QUIET)
    np.testing.assert_allclose(np.diag(s.scale_mat), [2, 2, 2, 1])


# ----------------------------------------------------------------------------------- refusals
def _refused(root, *words, **kw):
    with pytest.raises(UserInputError) as e:
        load_colmap(root, **QUIET, **kw)
    msg = str(e.value)
    for w in words:
        assert w in msg, msg
    assert "\n" not in msg
    return msg


def _rewrite(root, name, fn):
    f = pathlib.Path(root) / "sparse" / "0" / name
    f.write_text(fn(f.read_text()))


@pytest.mark.parametrize("model", ["OPENCV", "OPENCV_FISHEYE", "FOV", "THIN_PRISM_FISHEYE"])
def test_refuses_unsupported_camera_model(copy, model):
    from taichi_neus.data.colmap import MODEL_IDS
    n = MODEL_IDS[model][1]
    params = " ".join(["30.0", "20", "16"] + ["0.01"] * (n - 3))
    _rewrite(copy, "cameras.txt", lambda t: f"1 {model} {W} {H} {params}\n")
    msg = _refused(copy, model, "cameras.txt", "image_undistorter")
    assert msg.count(".") <= 4  # one sentence (the dots of file names aside)


def test_refuses_unknown_model_and_wrong_parameter_count(copy):
    _rewrite(copy, "cameras.txt", lambda t: f"1 FANCY {W} {H} 1 2 3\n")
    _refused(copy, "FANCY", "cameras.txt")
    _rewrite(copy, "cameras.txt", lambda t: f"1 PINHOLE {W} {H} 1 2 3\n")
    _refused(copy, "3 parameters", "cameras.txt")


def test_refuses_malformed_text(copy):
    shutil.copytree(copy, copy.parent / "b")
    _rewrite(copy, "images.txt", lambda t: t.replace("img_0.png", ""))
    _refused(copy, "images.txt")
    _rewrite(copy.parent / "b", "points3D.txt", lambda t: t + "7 1.0 abc 2.0 1 1 1 0.1\n")
    _refused(copy.parent / "b", "points3D.txt", "non-number")


def test_refuses_truncated_binary(tmp_path):
    write_colmap(tmp_path, n_views=3, W=W, H=H, seed=1, binary=True)
    f = tmp_path / "sparse" / "0" / "images.bin"
    f.write_bytes(f.read_bytes()[:-30])
    _refused(tmp_path, "images.bin", "truncated")
    f.write_bytes(struct.pack("<Q", 2**40) + b"\0" * 64)
    _refused(tmp_path, "images.bin", "announces")


def test_refuses_missing_pieces(copy):
    (copy / "images" / "img_3.png").unlink()
    _refused(copy, "img_3.png", "images.txt")
    shutil.rmtree(copy / "images")
    _refused(copy, "no images/ folder")
    (copy / "sparse" / "0" / "images.txt").unlink()
    _refused(copy, "images.bin or images.txt")
    shutil.rmtree(copy / "sparse")
    with pytest.raises(UserInputError, match="holds no cameras"):
        load_scene(copy)
    with pytest.raises(UserInputError, match="does not exist"):
        load_scene(copy / "nope")


def test_refuses_sizes(copy):
    Image.new("RGB", (W, H + 4)).save(copy / "images" / "img_1.png")
    _refused(copy, "img_1.png", f"{W}x{H + 4}")


def test_refuses_bad_masks(copy):
    (copy / "masks").mkdir()
    for p in (copy / "images").iterdir():
        Image.new("L", (W, H), 255).save(copy / "masks" / (p.name + ".png"))
    (copy / "masks" / "img_2.png.png").unlink()
    _refused(copy, "no mask for image img_2.png")
    Image.new("L", (W + 1, H), 255).save(copy / "masks" / "img_2.png.png")
    _refused(copy, "img_2.png.png", "masks must match")


def test_refuses_bad_poses(copy):
    lines = (copy / "sparse" / "0" / "images.txt").read_text().splitlines()
    tok = lines[1].split()
    orig = list(tok)
    tok[1:5] = ["0", "0", "0", "0"]
    lines[1] = " ".join(tok)
    (copy / "sparse" / "0" / "images.txt").write_text("\n".join(lines) + "\n")
    _refused(copy, "zero quaternion")
    orig[5:8] = ["1e300", "0", "1e300"]  # a camera absurdly far away
    lines[1] = " ".join(orig)
    (copy / "sparse" / "0" / "images.txt").write_text("\n".join(lines) + "\n")
    _refused(copy, orig[9], "too far")


def test_refuses_camera_looking_away(tmp_path, text_scene):
    root, truth = text_scene
    cams, recs, pts, _ = read_model(root / "sparse" / "0")
    R, t = truth["poses"][2]
    flip = np.diag([-1.0, 1.0, -1.0]) @ R  # turned 180 degrees about its y axis, same centre
    recs = [(r.id, rotation_to_qvec(flip) if r.name == truth["names"][2] else r.qvec,
             (flip @ (-R.T @ t)) * -1 if r.name == truth["names"][2] else r.tvec, r.camera_id, r.name)
            for r in recs]
    shutil.copytree(root, tmp_path / "s")
    write_model_text(tmp_path / "s" / "sparse" / "0", [(c.id, c.model, c.width, c.height, c.params)
                                                        for c in cams.values()], recs, pts)
    _refused(tmp_path / "s", truth["names"][2], "region of interest")


# ------------------------------------------------------------------------------------ fuzzing
@pytest.fixture(scope="module")
def fuzz_roots(tmp_path_factory):
    out = {}
    for kind in ("txt", "bin"):
        root = tmp_path_factory.mktemp("fuzz") / kind
        write_colmap(root, n_views=3, W=16, H=16, seed=3, n_points=40, n_outliers=2, binary=kind == "bin")
        out[kind] = root
    return out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["txt", "bin"]), which=st.sampled_from(["cameras", "images", "points3D"]),
       mode=st.sampled_from(["replace", "truncate", "flip", "append"]), data=st.binary(max_size=200),
       cut=st.floats(0, 1))
def test_fuzz_model_files(fuzz_roots, kind, which, mode, data, cut):
    with tempfile.TemporaryDirectory() as d:
        root = pathlib.Path(d) / "s"
        shutil.copytree(fuzz_roots[kind], root)
        f = root / "sparse" / "0" / f"{which}.{kind}"
        raw = f.read_bytes()
        if mode == "replace":
            raw = data
        elif mode == "truncate":
            raw = raw[:int(cut * len(raw))]
        elif mode == "flip" and raw:
            i = int(cut * (len(raw) - 1))
            raw = raw[:i] + bytes([raw[i] ^ (data[0] if data else 0xFF)]) + raw[i + 1:]
        else:
            raw = raw + data
        f.write_bytes(raw)
        try:
            s = load_colmap(root, **QUIET)
        except UserInputError as e:
            assert "\n" not in str(e)
        else:
            assert np.isfinite(s.K).all() and np.isfinite(s.c2w).all() and np.isfinite(s.scale_mat).all()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(line=st.lists(st.one_of(st.sampled_from(["1", "PINHOLE", "SIMPLE_RADIAL", "nan", "inf", "-1", "0", "16",
                                                "1e308", "img_0.png"]), st.text(max_size=4)), max_size=12))
def test_fuzz_text_lines(fuzz_roots, line):
    with tempfile.TemporaryDirectory() as d:
        root = pathlib.Path(d) / "s"
        shutil.copytree(fuzz_roots["txt"], root)
        for name in ("cameras.txt", "images.txt"):
            f = root / "sparse" / "0" / name
            f.write_text(" ".join(line) + "\n" + f.read_text())
            try:
                s = load_colmap(root, **QUIET)
            except UserInputError as e:
                assert "\n" not in str(e)
            else:
                assert np.isfinite(s.K).all() and np.isfinite(s.c2w).all()
