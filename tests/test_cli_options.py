"""The `taichi-neus` command line as a user meets it, through the console script in a subprocess:
options generated from the typed config, --help, --key=value, boolean flags, typo suggestions, range
checks, --version, --print-config; mesh/render/eval refusing an existing output before any work; the
default run folder; what a finished run prints and writes."""

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

import taichi_neus
from taichi_neus.train.config import LIMITS, Config, options

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cli(*args, cwd=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "taichi_neus.app.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env)


def listing(folder: pathlib.Path) -> dict:
    """Every file under ``folder`` with its bytes: a refused command must leave it exactly as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(p, *words) -> str:
    """Exit 2, no traceback, exactly one line on stderr (`taichi-neus: error: ...`) holding ``words``."""
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("taichi-neus: error: "), p.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------ the typed config
def test_every_field_has_help_and_every_number_or_choice_a_range():
    for opt in options():
        assert opt.help, f"{opt.key} has no comment in its dataclass (the comment is the option's help)"
        if opt.type in (int, float) or (opt.type is str and opt.key not in ("data.path",)):
            assert opt.key in LIMITS, f"{opt.key} has no entry in config.LIMITS"
    Config().validate()  # the defaults are allowed values


def test_validate_is_the_trainers_check_too():
    from taichi_neus.errors import UserInputError
    cfg = Config()
    cfg.train.iters = -5
    with pytest.raises(UserInputError, match=r"--train\.iters must be ≥ 1, got -5"):
        cfg.validate()
    cfg = Config()
    cfg.render.n_fine = 2.5
    with pytest.raises(UserInputError, match="--render.n_fine must be an integer"):
        cfg.validate()
    with pytest.raises(UserInputError, match="did you mean 'train.iters'"):
        Config.from_dict({"train": {"iterz": 3}})


# --------------------------------------------------------------------------------------- --help
def test_help_lists_every_field_grouped_with_default_and_help():
    p = cli("train", "--help")
    assert p.returncode == 0, p.stderr
    h = " ".join(p.stdout.split())  # argparse wraps lines
    for title in ("--data.* options", "--field.* options", "--render.* options", "--train.* options",
                  "--mesh.* options", "--background.* options"):
        assert title in h
    for opt in options():
        assert f"--{opt.key}" in h, opt.key
    # section order: a field is listed under its own section
    assert h.index("--train.* options") < h.index("--train.iters N") < h.index("--mesh.* options")
    assert "--train.iters N, --iters N training steps [default: 6000; ≥ 1]" in h
    assert "--data.downscale N, --downscale N" in h and "--data.path DIR, --data DIR" in h
    assert "--data.use_masks, --no-data.use_masks" in h and "[default: on]" in h
    assert "--train.lr_final X final learning rate as a fraction (cosine decay) [default: 0.1; in [0, 1]]" in h
    assert "--arch {auto,cpu,cuda,vulkan,metal}" in h
    assert "Aliases: --data = --data.path" in h and "--no-mask = --no-data.use_masks" in h
    for cmd in ("mesh", "render", "eval"):
        p = cli(cmd, "--help")
        assert p.returncode == 0 and "RUN" in p.stdout and "--overwrite" in p.stdout and "--name" in p.stdout


def test_version():
    p = cli("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"taichi-neus {taichi_neus.__version__}"


# ---------------------------------------------------------------- values, flags, --print-config
def test_print_config_resolves_key_value_flags_aliases_and_config_file(tmp_path):
    base = Config()
    base.train.iters, base.render.n_fine, base.train.seed = 11, 20, 3
    (tmp_path / "cfg.json").write_text(base.to_json())
    p = cli("train", "--config", "cfg.json", "--iters=7", "--render.n_fine", "12", "--no-data.use_masks",
            "--field.normal_mode=central", "--data.roi=0.1,0,0,2", "--print-config", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    cfg = json.loads(p.stdout)  # stdout is the JSON alone (no Taichi banner): it can be redirected to a file
    assert cfg["train"]["iters"] == 7 and cfg["render"]["n_fine"] == 12  # options win over the file
    assert cfg["train"]["seed"] == 3  # the file wins over the defaults
    assert cfg["data"]["use_masks"] is False and cfg["field"]["normal_mode"] == "central"
    assert cfg["data"]["roi"] == [0.1, 0.0, 0.0, 2.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json"]  # nothing written
    p = cli("train", "--no-mask", "--data.use_masks", "--print-config", cwd=tmp_path)  # the last one wins
    assert json.loads(p.stdout)["data"]["use_masks"] is True
    p = cli("train", "--no-mask", "--print-config", cwd=tmp_path)
    assert json.loads(p.stdout)["data"]["use_masks"] is False


def test_parser_reports_the_overrides_the_user_gave():
    from taichi_neus.app.cli import parse_args
    _, cfg, overrides = parse_args(["train", "--iters", "9", "--data", "x", "--no-mask", "--arch", "cpu",
                                    "--render.background=1,1,1"])
    assert overrides == {"train.iters": 9, "data.path": "x", "data.use_masks": False, "arch": "cpu",
                         "render.background": (1.0, 1.0, 1.0)}
    assert cfg.train.iters == 9 and cfg.arch == "cpu"


@pytest.mark.parametrize("args, words", [
    (["--train.iterz", "5"], ["unknown option --train.iterz", "did you mean --train.iters?", "train --help"]),
    (["--iterz=5"], ["unknown option --iterz", "did you mean --iters?"]),
    (["--n_fine", "5"], ["did you mean --render.n_fine?"]),
    (["--iters", "-5"], ["--train.iters must be ≥ 1, got -5"]),
    (["--iters", "abc"], ["--train.iters expects an integer, got 'abc'"]),
    (["--train.lr_final", "1.5"], ["--train.lr_final must be in [0, 1], got 1.5"]),
    (["--train.lr=0"], ["--train.lr must be > 0, got 0"]),
    (["--render.n_fine", "0"], ["--render.n_fine must be ≥ 1, got 0"]),
    (["--data.holdout_every", "-1"], ["--data.holdout_every must be ≥ 0"]),
    (["--train.pixel_sampler", "quad"], ["--train.pixel_sampler must be one of uniform, quadtree, soft_mining"]),
    (["--render.background", "1,2"], ["--render.background takes r,g,b in [0, 1]"]),
    (["--train.min_rays", "512", "--train.max_rays", "256"], ["--train.min_rays (512) must not exceed"]),
    (["--data.use_masks=yes"], ["--data.use_masks is a flag", "--no-data.use_masks"]),
    (["--arch", "tpu"], ["--arch must be one of auto, cpu, cuda, vulkan, metal, got 'tpu'"]),
    (["--field.normal_mode", "analytic", "--train.curvature_weight", "1e-3"],
     ["curvature loss", "use --field.normal_mode tetrahedral or central"]),
    (["--train.photo_weight", "0.1", "--train.photo_sources", "2", "--train.photo_best", "3"],
     ["--train.photo_best (3) must not exceed --train.photo_sources (2)"]),
    (["--train.photo_start", "2"], ["--train.photo_start must be in [0, 1], got 2"]),
])
def test_bad_options_are_refused_in_one_sentence_before_anything_is_written(tmp_path, args, words):
    p = cli("train", *args, "--out", tmp_path / "run", cwd=tmp_path)
    line = refused(p, *words)
    assert "config.py" not in line
    assert list(tmp_path.iterdir()) == []  # no run folder, no runs/


def test_unknown_command_gets_a_suggestion(tmp_path):
    refused(cli("trian", cwd=tmp_path), "unknown command 'trian'", "did you mean 'train'?")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(sys.platform == "darwin", reason="Metal exists on macOS")
def test_metal_is_macos_only(tmp_path):
    refused(cli("train", "--arch", "metal", cwd=tmp_path), "Metal is macOS only")
    assert list(tmp_path.iterdir()) == []


def test_cuda_probe_prints_no_libcuda_warning():
    code = "from taichi_neus import runtime; print('cuda', runtime._arch_available('cuda'))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0 and "cuda " in p.stdout, p.stderr
    assert "libcuda" not in p.stdout + p.stderr


# ------------------------------------------------------- mesh / render / eval on a run folder
@pytest.fixture
def fake_run(tmp_path):
    """A run folder whose only checkpoint is garbage: any command that gets as far as loading it fails
    with 'no readable checkpoint', so a refusal naming the existing output proves the check came first."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(Config().to_json())
    (run / "checkpoints" / "ckpt_0000060.npz").write_bytes(b"not a checkpoint")
    (run / "mesh_000060.ply").write_bytes(b"precious mesh")
    (run / "renders" / "orbit").mkdir(parents=True)
    (run / "renders" / "orbit" / "rgb_000.png").write_bytes(b"precious frame")
    (run / "eval.json").write_text('{"precious": true}')
    return run


@pytest.mark.parametrize("cmd, existing", [("mesh", "mesh_000060.ply"), ("render", "renders/orbit"),
                                           ("eval", "eval.json")])
def test_existing_output_is_refused_before_any_work(fake_run, cmd, existing):
    before = listing(fake_run)
    for form in ([fake_run], ["--out", fake_run]):  # RUN, or --out RUN as train names it
        p = cli(cmd, *form, "--arch", "cpu")
        refused(p, str(fake_run / existing), "already exists", "--overwrite", "--name")
        assert listing(fake_run) == before
    # past the check (--overwrite, or another --name), the garbage checkpoint is what stops it
    for extra in (["--overwrite"], ["--name", "other.ply" if cmd == "mesh" else "other"]):
        p = cli(cmd, fake_run, "--arch", "cpu", *extra)
        refused(p, "no readable checkpoint")
        assert listing(fake_run) == before


def test_run_folder_given_twice_or_not_at_all(fake_run, tmp_path):
    refused(cli("mesh", fake_run, "--out", tmp_path / "elsewhere"), "not both")
    refused(cli("render"), "name the run folder", "taichi-neus render RUN")
    refused(cli("eval", tmp_path / "nothing"), "does not exist")


def test_mesh_takes_the_mesh_options_and_refuses_a_bad_value(fake_run):
    from taichi_neus.app.cli import parse_args
    args, cfg, overrides = parse_args(["mesh", "RUN", "--mesh.min_component", "0.01", "--mesh.cull_unseen",
                                       "--mesh.min_views=2"])
    assert cfg is None and overrides == {"mesh.min_component": 0.01, "mesh.cull_unseen": True, "mesh.min_views": 2}
    p = cli("mesh", "--help")
    h = " ".join(p.stdout.split())
    assert "--mesh.min_component X" in h and "--mesh.cull_unseen, --no-mesh.cull_unseen" in h
    assert "--train.iters" not in h  # only the mesh section
    before = listing(fake_run)
    for args, words in ((["--mesh.min_component", "1.5"], ["--mesh.min_component must be in [0, 1], got 1.5"]),
                        (["--mesh.min_views", "0"], ["--mesh.min_views must be ≥ 1, got 0"]),
                        (["--mesh.cull_unseen=yes"], ["--mesh.cull_unseen is a flag"]),
                        (["--mesh.min_componentt", "0.1"], ["did you mean --mesh.min_component?"])):
        refused(cli("mesh", fake_run, "--name", "other.ply", *args), *words)
    # good values pass the checks: the garbage checkpoint is what stops it
    refused(cli("mesh", fake_run, "--arch", "cpu", "--name", "other.ply", "--mesh.min_component", "0.01",
                "--mesh.cull_unseen"), "no readable checkpoint")
    assert listing(fake_run) == before
    p = cli("train", "--mesh.min_component=0.02", "--mesh.cull_unseen", "--print-config")
    assert json.loads(p.stdout)["mesh"] == {**json.loads(Config().to_json())["mesh"], "min_component": 0.02,
                                            "cull_unseen": True}


# ------------------------------------------------------------------- a whole (short) training run
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """`taichi-neus train` with the default --out, from a folder where the names it would choose for
    the next two minutes are already taken by other runs."""
    from training_helpers import small_config
    cwd = tmp_path_factory.mktemp("cwd")
    cfg = small_config(iters=4)
    cfg.train.ckpt_every = 4
    cfg.mesh.resolution = 24
    (cwd / "cfg.json").write_text(cfg.to_json())
    now = time.time()
    taken = []
    for dt in range(-2, 120):
        d = cwd / "runs" / f"synthetic-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now + dt))}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "metrics.json").write_text("another run")
        taken.append(d)
    p = cli("train", "--config", "cfg.json", "--arch", "cpu", cwd=cwd)
    return {"p": p, "cwd": cwd, "taken": taken}


@pytest.mark.slow
def test_default_out_never_lands_in_an_existing_run(finished):
    p, cwd = finished["p"], finished["cwd"]
    assert p.returncode == 0, p.stderr[-3000:]
    for d in finished["taken"]:
        assert [f.name for f in d.iterdir()] == ["metrics.json"] and (d / "metrics.json").read_text() == "another run"
    new = [d for d in (cwd / "runs").iterdir() if d not in finished["taken"]]
    assert len(new) == 1 and new[0].name.rsplit("-", 1)[-1] == "2", new
    assert (new[0] / "metrics.json").is_file() and (new[0] / "checkpoints").is_dir()
    from taichi_neus.app.cli import default_out
    cfg = Config()
    cfg.data.path = "/data/dtu_scan24"
    assert default_out(cfg, cwd / "runs", now=0).name.startswith("dtu_scan24-")


@pytest.mark.slow
def test_a_finished_run_says_what_it_did_and_where(finished):
    p, cwd = finished["p"], finished["cwd"]
    run = next(d for d in (cwd / "runs").iterdir() if d.name.endswith("-2"))
    rel = pathlib.Path("runs") / run.name
    out = p.stdout
    for line in (f"run folder: {rel}", "mesh: marching cubes on 24³ cells", f"mesh: wrote {rel / 'mesh_000004.ply'}",
                 "evaluation: rendering 4 held-out views at the training resolution, 96x96",
                 f"picture: wrote {rel / 'result.png'}",
                 f"metrics: wrote {rel / 'metrics.json'}"):
        assert line in out, out
    # a summary table at the end, not the JSON (that is in metrics.json)
    assert "{" not in out and '"heldout_psnr"' not in out
    tail = out[out.index("metrics: wrote"):]
    for label in ("held-out PSNR", "Chamfer to the true surface", "mesh", "picture", "next"):
        assert f"\n{label}" in tail, tail
    m = json.loads((run / "metrics.json").read_text())
    assert f"{m['heldout_psnr']:.2f} dB over 4 views" in tail
    # progress fields are named; no bare s= / spr=; no libcuda warning on a CPU run
    assert "sharpness s=" in p.stderr and "samples/ray" in p.stderr and "PSNR" in p.stderr
    assert " spr=" not in p.stderr and " s=" not in p.stderr.replace("sharpness s=", "")
    assert "libcuda" not in out + p.stderr
    assert "sharpness s = NeuS's 1/σ" in out  # the legend, printed once
    assert out.count("sharpness s = ") == 1


@pytest.mark.slow
def test_result_picture_is_labelled_and_big_enough(finished):
    import imageio.v2 as imageio

    from taichi_neus.app.preview import RESULT_BAND, RESULT_GAP, RESULT_MIN_HEIGHT
    run = next(d for d in (finished["cwd"] / "runs").iterdir() if d.name.endswith("-2"))
    a = imageio.imread(run / "result.png").astype(float) / 255
    H, W = a.shape[:2]
    h = H - RESULT_BAND
    assert h >= RESULT_MIN_HEIGHT and h % 48 == 0  # 48x48 views enlarged by a whole factor (7)
    pw = (W + RESULT_GAP) // 4
    assert pw - RESULT_GAP == h  # four square panels side by side
    band = a[h:].mean(axis=2)
    for i in range(4):  # every panel has its label written under it
        assert (band[:22, i * pw: i * pw + pw // 2] > 0.5).sum() > 30, i
    assert (band[22:, : W // 3] > 0.3).sum() > 30  # the line naming scene, view and step
    photo, render = a[:h, :h], a[:h, pw: pw + h]
    assert photo.std() > 0.05 and render.std() > 0.02


@pytest.mark.slow
def test_mesh_refuses_then_writes_another_name(finished):
    run = next(d for d in (finished["cwd"] / "runs").iterdir() if d.name.endswith("-2"))
    first = (run / "mesh_000004.ply").read_bytes()
    refused(cli("mesh", run, "--arch", "cpu"), "mesh_000004.ply already exists")
    assert (run / "mesh_000004.ply").read_bytes() == first
    p = cli("mesh", run, "--arch", "cpu", "--name", "again.ply")
    assert p.returncode == 0, p.stderr
    assert f"mesh: wrote {run / 'again.ply'}" in p.stdout
    from taichi_neus.export.mesh import Mesh
    a, b = Mesh.load(run / "mesh_000004.ply"), Mesh.load(run / "again.ply")
    np.testing.assert_allclose(a.vertices, b.vertices, atol=1e-5)  # the same checkpoint, the same mesh


@pytest.mark.slow
def test_mesh_with_clean_up_options_and_the_surface_shares(finished):
    run = next(d for d in (finished["cwd"] / "runs").iterdir() if d.name.endswith("-2"))
    m = json.loads((run / "metrics.json").read_text())
    assert m["surface_inside"] + m["surface_outside"] + m["surface_near"] == pytest.approx(1.0)
    p = cli("mesh", run, "--arch", "cpu", "--name", "cleaned.ply", "--mesh.min_component", "0.01",
            "--mesh.cull_unseen")
    assert p.returncode == 0, p.stderr
    assert "training views" in p.stdout and "largest one's area" in p.stdout
    from taichi_neus.export.mesh import Mesh
    a, b = Mesh.load(run / "mesh_000004.ply"), Mesh.load(run / "cleaned.ply")
    assert 0 < len(b.faces) <= len(a.faces)


# ------------------------------------------------------------------------------- torch is optional
def test_the_package_works_without_torch_except_s3im():
    """torch is an extra: every module but the ones built on torch (the S3IM loss, the photo-consistency term,
    the tests' torch reference, the torch autograd adapters and the pose refinement built on them, in rendering
    and in training) imports without it, and asking for S3IM or --train.refine_poses without torch is refused
    in one sentence."""
    code = """
import importlib, pkgutil, sys
sys.modules["torch"] = None  # as if torch were not installed: import torch raises ImportError
import taichi_neus
skip = {"taichi_neus.train.s3im", "taichi_neus.field.torch_reference", "taichi_neus.field.torch_ops",
        "taichi_neus.render.torch_ops", "taichi_neus.render.pose", "taichi_neus.train.pose_refiner",
        "taichi_neus.train.photo_consistency"}
for m in pkgutil.walk_packages(taichi_neus.__path__, "taichi_neus."):
    if m.name not in skip:
        importlib.import_module(m.name)
from taichi_neus.app.cli import main
sys.exit(main(["train", sys.argv[1], "--print-config"]))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for option, words in (("--train.s3im_weight=1", ("S3IM", "needs torch", "pip install torch")),
                          ("--train.refine_poses", ("--train.refine_poses", "needs torch", "pip install torch"))):
        p = subprocess.run([sys.executable, "-c", code, option], capture_output=True, text=True, timeout=120, env=env)
        refused(p, *words)
    # the photo-consistency term is on by default: without torch the defaults still pass (the trainer then
    # leaves the term off and says so, tests/test_photo_consistency.py)
    p = subprocess.run([sys.executable, "-c", code, "--iters=3"], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr[-2000:]


@pytest.mark.slow
def test_refine_poses_without_masks_trains_with_the_background_model(tmp_path):
    """Joint pose refinement also covers runs without masks: the background model's ray gradients join the
    foreground's. A short run through the console script writes the refined poses."""
    out = tmp_path / "run"
    p = cli("train", "--out", out, "--train.refine_poses", "--train.pose_start", "0", "--no-data.use_masks",
            "--iters", "12", "--train.val_every", "0", "--mesh.resolution", "32", "--render.render_refine", "1",
            "--arch", "cpu")  # renders at the training step: the held-out figure is not what this test reads
    assert p.returncode == 0, p.stderr[-2000:]
    poses = json.loads((out / "poses_refined.json").read_text())
    assert poses["max_rotation_change_deg"] > 0 and poses["max_translation_change"] > 0


def test_progress_bar_follows_a_time_budget(monkeypatch):
    """A run that stops on --train.time_budget long before --train.iters: the bar shows the trainer's share
    done and the time left to the budget, not the steps' (which would read hours)."""
    import io

    from taichi_neus.app import progress as pg
    now = [1000.0]
    monkeypatch.setattr(pg.time, "time", lambda: now[0])
    out = io.StringIO()
    bar = pg.Progress(100000, stream=out, every=10)
    now[0] += 60.0
    bar.update(500, "PSNR 20.00 dB", fraction=0.25)  # a quarter of the budget in 60 s: 180 s left
    line = out.getvalue().splitlines()[-1]
    assert line.startswith("[######..................] 500 steps  25% ")
    assert "60s< 180s 8.33 steps/s | PSNR 20.00 dB" in line
    # resumed half way through: the time left comes from the share this process has done
    out2 = io.StringIO()
    bar = pg.Progress(100000, start=2000, stream=out2, every=10, start_fraction=0.5)
    now[0] += 30.0
    bar.update(2250, fraction=0.6)
    assert "30s< 120s" in out2.getvalue()
    # without a fraction: steps over the total, as before
    out3 = io.StringIO()
    bar = pg.Progress(1000, stream=out3, every=10)
    now[0] += 10.0
    bar.update(100)
    assert "] 100/1000    10s<  90s 10.00 steps/s" in out3.getvalue()


def test_a_run_written_before_the_colour_grid_loads_without_one():
    """config.json of a run from before ``field.color_encoding`` existed has no such entry: it loads with the
    colour grid off (its checkpoint holds no table for one), while a new config keeps what it says."""
    from taichi_neus.train.config import Config

    d = Config().to_dict()
    assert d["field"]["color_encoding"] is True  # the default now
    old = {**d, "field": {k: v for k, v in d["field"].items() if k not in ("color_encoding", "color_grid")}}
    assert Config.from_dict(old).field.color_encoding is False
    assert Config.from_dict(d).field.color_encoding is True
