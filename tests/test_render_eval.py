"""`taichi-neus render` and `taichi-neus eval` on a small trained run, on known shapes and on a
stand-in for DTU's files; their refusals."""

import json
import pathlib

import numpy as np
import pytest
from PIL import Image
from run_helpers import small_run
from test_evaluation import fake_dtu, fibonacci_sphere, quad  # noqa: F401  (fake_dtu is a fixture)

from taichi_neus.app import cli
from taichi_neus.app.results import mp4_backend
from taichi_neus.data import default_scene_path, load_dtu
from taichi_neus.export.ply import write_ply
from taichi_neus.render.camera_paths import OrbitRig, look_at, orbit_path
from taichi_neus.render.image_metrics import psnr

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory, ti_arch):
    r = small_run(tmp_path_factory, ti_arch)
    assert r["rc"] == 0
    return r


@pytest.fixture(scope="module")
def scene():
    return load_dtu(default_scene_path())


def _refused(capsys, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("taichi-neus: error:"), err
    for w in words:
        assert w in err[0], err[0]


def uv_sphere(r, n_lat=96, n_lon=192):
    """A triangulated sphere of radius r (chords sag by at most r (1 - cos(pi / n_lon)) ~ 1.3e-4 r)."""
    th = np.linspace(0, np.pi, n_lat + 1)[1:-1]
    ph = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    t, p = np.meshgrid(th, ph, indexing="ij")
    v = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], -1).reshape(-1, 3)
    v = np.concatenate([[[0, 0, 1.0]], v, [[0, 0, -1.0]]]) * r
    idx = np.arange(1, 1 + (n_lat - 1) * n_lon).reshape(n_lat - 1, n_lon)
    nxt = np.roll(idx, -1, axis=1)
    f = [np.stack([np.zeros(n_lon, int), idx[0], nxt[0]], 1),
         np.stack([idx[:-1].ravel(), idx[1:].ravel(), nxt[1:].ravel()], 1),
         np.stack([idx[:-1].ravel(), nxt[1:].ravel(), nxt[:-1].ravel()], 1),
         np.stack([np.full(n_lon, len(v) - 1), nxt[-1], idx[-1]], 1)]
    return v, np.concatenate(f)


# --------------------------------------------------------------------------- camera paths
def test_orbit_path_circles_the_centre_at_the_cameras_distance_and_elevation(scene):
    c2w = scene.c2w[scene.train_ids]
    poses = orbit_path(c2w, 8)
    rig = OrbitRig.from_cameras(c2w)
    assert rig.up @ np.array([0, -1.0, 0]) > 0.95  # the synthetic scene's up is -y
    dist = np.linalg.norm(c2w[:, :3, 3], axis=1)
    for k, p in enumerate(poses):
        eye = p[:3, 3]
        assert np.linalg.norm(eye) == pytest.approx(dist.mean())
        az, el, r = rig.spherical(eye)
        assert el == pytest.approx(rig.elevation) and np.cos(az - 2 * np.pi * k / 8) == pytest.approx(1.0)
        np.testing.assert_allclose(p[:3, 2], -eye / np.linalg.norm(eye), atol=1e-12)  # looks at the origin
        np.testing.assert_allclose(p[:3, :3].T @ p[:3, :3], np.eye(3), atol=1e-12)
    # look_at agrees with the synthetic scene's own cameras (OpenCV axes)
    from taichi_neus.data.synthetic import look_at as scene_look_at

    eye = np.array([0.3, -2.0, 1.5])
    R, t = scene_look_at(eye)
    np.testing.assert_allclose(np.linalg.inv(look_at(eye))[:3], np.concatenate([R, t[:, None]], 1), atol=1e-12)


# --------------------------------------------------------------------------------- render
def test_render_orbit_writes_pngs_and_gif(run, capsys, ti_arch):
    assert cli.main(["render", "--out", str(run["run"]), "--arch", ti_arch, "--path", "orbit", "--frames", "4",
                     "--downscale", "2", "--modes", "rgb,depth", "--gif"]) == 0
    d = run["run"] / "renders" / "orbit"
    names = sorted(p.name for p in d.iterdir())
    assert names == sorted([f"{m}_{i:03d}.png" for m in ("rgb", "depth") for i in range(4)]
                           + ["rgb.gif", "depth.gif", "cameras.json"])
    for m in ("rgb", "depth"):
        with Image.open(d / f"{m}.gif") as g:
            assert g.n_frames == 4 and g.size == (48, 48)
    frames = [np.asarray(Image.open(d / f"rgb_{i:03d}.png"), float) / 255 for i in range(4)]
    assert frames[0].shape == (48, 48, 3)
    assert frames[0].std() > 0.05 and frames[0][:4, :4].max() < 0.05  # an object on a black background
    assert np.abs(frames[0] - frames[2]).mean() > 0.01  # the other side of the object
    depth = np.asarray(Image.open(d / "depth_000.png"), float) / 255
    fg = frames[0].max(axis=2) > 0.15
    assert depth[fg].mean() > 0.3 and depth[~fg].mean() < 0.1
    cams = json.loads((d / "cameras.json").read_text())
    assert cams["step"] == 60 and [f["view"] for f in cams["frames"]] == [-1] * 4


def test_render_refuses_an_existing_folder_and_overwrites_it_whole(run, capsys, ti_arch):
    args = ["render", str(run["run"]), "--arch", ti_arch, "--name", "again", "--downscale", "4", "--modes", "rgb"]
    assert cli.main([*args, "--frames", "3"]) == 0
    d = run["run"] / "renders" / "again"
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    assert cli.main([*args, "--frames", "2"]) == 2
    _refused(capsys, str(d), "already exists", "--overwrite")
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert cli.main([*args, "--frames", "2", "--overwrite"]) == 0
    # the old third frame is gone: the folder holds one consistent set
    assert sorted(p.name for p in d.iterdir()) == ["cameras.json", "rgb_000.png", "rgb_001.png"]
    assert len(json.loads((d / "cameras.json").read_text())["frames"]) == 2


def test_render_test_views_match_the_photographs(run, scene, ti_arch):
    assert cli.main(["render", "--out", str(run["run"]), "--arch", ti_arch, "--path", "test", "--modes", "rgb"]) == 0
    d = run["run"] / "renders" / "test"
    cams = json.loads((d / "cameras.json").read_text())
    assert [f["view"] for f in cams["frames"]] == [int(v) for v in scene.test_ids]
    for i, v in enumerate(scene.test_ids):
        img = np.asarray(Image.open(d / f"rgb_{i:03d}.png"))
        assert img.shape == (96, 96, 3)
        # the run's own held-out PSNR after 60 steps is ~19 dB; a wrong pose gives < 12
        assert psnr(img, scene.images[v]) > 15.0


def test_render_refusals(run, tmp_path, capsys, ti_arch):
    if mp4_backend() is None:
        assert cli.main(["render", "--out", str(run["run"]), "--arch", ti_arch, "--mp4"]) == 2
        _refused(capsys, "--mp4", "--gif")
    assert cli.main(["render", "--out", str(tmp_path / "nothing"), "--arch", ti_arch]) == 2
    _refused(capsys, "nothing", "does not exist")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((run["run"] / "config.json").read_text())
    assert cli.main(["render", "--out", str(bare), "--arch", ti_arch]) == 2
    _refused(capsys, "checkpoint")
    assert cli.main(["render", "--out", str(run["run"]), "--arch", ti_arch, "--modes", "rgb,albedo"]) == 2
    _refused(capsys, "--modes")


# ----------------------------------------------------------------------------------- eval
def test_eval_synthetic_run_uses_the_exact_surface(run, capsys, ti_arch):
    assert cli.main(["eval", "--out", str(run["run"]), "--arch", ti_arch, "--overwrite", "--downscale", "2",
                     "--points", "20000"]) == 0
    table = capsys.readouterr().out
    for label in ("PSNR, full image", "PSNR, inside mask", "SSIM", "mask IoU", "Chamfer mean"):
        assert label in table
    ev = json.loads((run["run"] / "eval.json").read_text())
    m, train_metrics = ev["images"]["mean"], run["metrics"]
    assert len(ev["images"]["views"]) == 4 and ev["step"] == 60
    # the same renders and photos as the training command's own half-resolution figure ...
    assert m["psnr"] == pytest.approx(train_metrics["heldout_psnr_half_res"], abs=1e-3)
    assert m["psnr_masked"] == pytest.approx(train_metrics["heldout_psnr_masked_half_res"], abs=1e-3)
    # measured after 60 steps: SSIM 0.34, IoU 0.84 (2 threads; the metrics themselves are checked on known
    # answers in test_evaluation.py)
    assert 0.25 < m["ssim"] < 1 and 0.75 < m["mask_iou"] < 1
    # ... and the same Chamfer distance to the exact surface (same mesh file, point counts and seeds)
    g = ev["geometry"]
    assert "synthetic" in g["ground_truth"] and g["units"] == "world"
    assert g["chamfer"] == pytest.approx(train_metrics["chamfer_to_true_surface"], rel=1e-6)
    assert ev["mesh"].endswith("mesh_000060.ply")


def test_eval_sphere_against_larger_sphere(run, tmp_path, ti_arch):
    v, f = uv_sphere(1.0)
    write_ply(tmp_path / "r1.ply", v, f)
    write_ply(tmp_path / "r11_points.ply", fibonacci_sphere(40000, 1.1))
    v2, f2 = uv_sphere(1.1)
    write_ply(tmp_path / "r11_mesh.ply", v2, f2)
    for flag, gt in (("--gt-points", "r11_points.ply"), ("--gt-mesh", "r11_mesh.ply")):
        assert cli.main(["eval", "--out", str(run["run"]), "--arch", ti_arch, "--overwrite", "--downscale", "4",
                         "--mesh", str(tmp_path / "r1.ply"), flag, str(tmp_path / gt), "--points", "40000"]) == 0
        g = json.loads((run["run"] / "eval.json").read_text())["geometry"]
        # |r1 - r2| = 0.1; sampling adds about (spacing / 2)^2 / 0.2 < 2e-3 at 40000 points
        assert g["accuracy"] == pytest.approx(0.1, abs=2e-3)
        assert g["completeness"] == pytest.approx(0.1, abs=2e-3)
        assert g["chamfer"] == pytest.approx(0.1, abs=2e-3)


def test_eval_dtu_protocol_through_the_command(run, fake_dtu, tmp_path, ti_arch):  # noqa: F811
    root, _ = fake_dtu
    v, f = quad(0, 20, 0, 10, 1.0)  # 1 mm above the stand-in STL plane (see test_evaluation)
    write_ply(tmp_path / "plane.ply", v, f)
    assert cli.main(["eval", "--out", str(run["run"]), "--arch", ti_arch, "--overwrite", "--downscale", "4",
                     "--mesh", str(tmp_path / "plane.ply"), "--dtu-dir", str(root), "--scan", "7"]) == 0
    g = json.loads((run["run"] / "eval.json").read_text())["geometry"]
    assert g["protocol"] == "dtu" and g["units"] == "mm" and g["scan"] == 7
    # 0.2 mm sampling against a 0.1 mm STL grid adds at most sqrt(1 + 2 * 0.1^2) - 1 = 0.01
    assert g["accuracy"] == pytest.approx(1.0, abs=0.012)
    assert g["completeness"] == pytest.approx(1.0, abs=0.012)
    assert g["chamfer"] == pytest.approx(1.0, abs=0.012)


def test_eval_clean_and_refusals(run, tmp_path, capsys, ti_arch):
    assert cli.main(["eval", "--out", str(run["run"]), "--arch", ti_arch, "--overwrite", "--downscale", "4", "--clean",
                     "--points", "5000"]) == 0
    ev = json.loads((run["run"] / "eval.json").read_text())
    assert ev["clean"] and 0 < ev["mesh_faces"] <= run["metrics"]["mesh_faces"]
    capsys.readouterr()
    assert cli.main(["eval", "--out", str(run["run"]), "--arch", ti_arch, "--overwrite", "--gt-points",
                     str(tmp_path / "missing.ply")]) == 2
    _refused(capsys, "missing.ply")
    assert cli.main(["eval", "--out", str(run["run"]), "--arch", ti_arch, "--overwrite", "--dtu-dir",
                     str(tmp_path / "nodtu")]) == 2
    _refused(capsys, "nodtu")
    assert cli.main(["eval", "--out", str(tmp_path / "norun"), "--arch", ti_arch]) == 2
    _refused(capsys, "norun")


@pytest.mark.slow
def test_heldout_error_benchmark_splits_the_runs_own_figure(run, tmp_path):
    """benchmarks/heldout_error.py on the small run: its masked PSNR is the run's own held-out figure, the
    regions split every mask pixel and all the error, a blurrier photo scores lower; a folder that is no
    run is refused in one sentence."""
    import pathlib
    import subprocess
    import sys

    script = str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "heldout_error.py")
    out, pic = tmp_path / "err.json", tmp_path / "err.png"
    res = subprocess.run([sys.executable, script, str(run["run"]), "--n-fine", "16", "--render-refine", "8", "1",
                          "--render-stop", "1e-4", "0", "--train-views", "2", "--json", str(out), "--image", str(pic)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    d = json.loads(out.read_text())
    mean = d["mean"]
    assert mean["psnr_masked"] == pytest.approx(run["metrics"]["heldout_psnr_masked"], abs=0.05)
    for kind in ("pixel", "error"):
        assert sum(mean[f"{r}_{kind}_share"] for r in ("miss", "edge", "interior")) == pytest.approx(1.0)
    blur = [mean[f"photo_blur_{s}_psnr"] for s in (0.5, 1.0, 1.5, 2.0)]
    assert blur == sorted(blur, reverse=True) and 0 < mean["sharpness_ratio"] < 10
    w, h = Image.open(pic).size  # photo | render | error, side by side
    assert set(d["other_n_fine"]) == {"16"} and w % 3 == 0 and h > 0
    # the run's own render_refine (8) reproduces its figure; the training step itself (1) renders differently
    assert d["render_refine"] == 8 and set(d["other_render_refine"]) == {"8", "1"}
    assert d["other_render_refine"]["8"]["psnr_masked"] == pytest.approx(mean["psnr_masked"], abs=1e-9)
    assert d["other_render_refine"]["1"]["psnr_masked"] != pytest.approx(mean["psnr_masked"], abs=1e-6)
    # the run's own render_stop (1e-4) reproduces its figure; marching every ray to its end (0) evaluates the SDF
    # a different number of times and changes the figure by less than the transmittance it leaves out
    stop = d["other_render_stop"]
    assert [r["render_stop"] for r in stop] == [1e-4, 0.0]
    assert stop[0]["psnr_masked"] == pytest.approx(mean["psnr_masked"], abs=1e-9)
    assert stop[1]["psnr_masked"] == pytest.approx(mean["psnr_masked"], abs=0.05)
    assert stop[0]["sdf_evaluations"] > 0 and stop[1]["sdf_evaluations"] not in (0, stop[0]["sdf_evaluations"])
    # training views, scored the same way: two of them, none held out
    assert len(d["train_views"]) == 2 and not set(d["train_views"]) & set(d["views"])
    assert len(d["per_train_view"]) == 2 and 5 < d["train_mean"]["psnr_masked"] < 60
    bad = subprocess.run([sys.executable, script, str(tmp_path), "--json", str(tmp_path / "x.json")],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "not a run folder" in bad.stderr
    assert not (tmp_path / "x.json").exists()
    bad = subprocess.run([sys.executable, script, str(run["run"]), "--render-refine", "0", "--json",
                          str(tmp_path / "y.json")], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--render-refine" in bad.stderr
    assert not (tmp_path / "y.json").exists()
    bad = subprocess.run([sys.executable, script, str(run["run"]), "--render-stop", "2", "--json",
                          str(tmp_path / "z.json")], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--render-stop" in bad.stderr
    assert not (tmp_path / "z.json").exists()


@pytest.mark.slow
def test_finish_time_benchmark_reproduces_the_runs_metrics(run, tmp_path, ti_arch):
    """benchmarks/finish_time.py re-runs the after-training stage on a copy of the run's checkpoint: the
    metrics it reports are the training command's own (same renders, same mesh), and the run folder is
    left exactly as it was."""
    import subprocess
    import sys

    root = run["run"]
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    out = tmp_path / "finish.json"
    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "finish_time.py"
    cmd = [sys.executable, str(script), str(root), "--arch", ti_arch, "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]["this tree"]
    m = run["metrics"]
    assert row["seconds"] > 0 and row["step"] == 60 and row["mesh_faces"] == m["mesh_faces"]
    for k in ("heldout_psnr", "heldout_psnr_masked", "heldout_psnr_half_res", "heldout_mesh_mask_iou"):
        assert row[k] == pytest.approx(m[k], abs=1e-4), k
    assert "| this tree |" in res.stdout
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
