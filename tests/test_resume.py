"""`--resume` continues exactly the interrupted run; options given again are applied (and recorded) or refused."""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from training_helpers import small_config

from taichi_neus.app.resume import merge_resume_config
from taichi_neus.data import default_scene_path, load_dtu
from taichi_neus.errors import UserInputError
from taichi_neus.train.trainer import CKPT_RUN_KEYS, SAMPLER_PREFIX, Trainer

SCRIPTS = pathlib.Path(__file__).parent / "scripts"


@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_bit_identical(tmp_path):
    """Uniform, quadtree and soft-mining samplers, a rejected (NaN) step before the interruption: parameters,
    Adam moments, learning-rate factor and sampler state after resuming equal the uninterrupted run's bit for
    bit. Bit-exact because the script runs Taichi on one CPU thread (a fixed order of the atomic adds; see the
    script's docstring)."""
    f = tmp_path / "resume.npz"
    p = subprocess.run([sys.executable, str(SCRIPTS / "resume_exact.py"), str(f)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    z = np.load(f)
    keys = [k for k in z.files if "/a/" in k]
    for sampler in ("uniform", "quadtree", "soft_mining"):
        assert f"{sampler}/a/params" in keys
    assert any(k.startswith("quadtree/a/sampler.leaf_ema") for k in keys)
    assert any(k.startswith("soft_mining/a/sampler.q") for k in keys)
    for k in keys:
        b = k.replace("/a/", "/b/")
        assert b in z.files, b
        np.testing.assert_array_equal(z[k], z[b], err_msg=k)
    assert float(z["uniform/a/lr_factor"]) == 0.5  # the rejected step's halving reached the end of both runs


# ------------------------------------------------------------------ merge_resume_config
def test_merge_applies_schedule_options_and_reports_each_change():
    saved = small_config(iters=300)
    cfg, changes = merge_resume_config(saved, {"train.iters": 600, "train.lr": 5e-3, "arch": "cpu",
                                               "data.path": "/moved/scene", "train.seed": 0,
                                               "field.sdf_hidden": saved.field.sdf_hidden})
    assert (cfg.train.iters, cfg.train.lr, cfg.arch, cfg.data.path) == (600, 5e-3, "cpu", "/moved/scene")
    assert saved.train.iters == 300 and saved.arch == "auto"  # the saved config is not modified
    assert changes == ["train.iters: 300 -> 600", "train.lr: 0.01 -> 0.005", "arch: 'auto' -> 'cpu'",
                       "data.path: '' -> '/moved/scene'"]  # unchanged values are no change
    assert merge_resume_config(saved, {"render.background": [0.0, 0.0, 0.0]})[1] == []


@pytest.mark.parametrize("key,value", [("field.sdf_hidden", 16), ("field.grid.log2_table", 12),
                                       ("background.hidden", 32), ("render.occupancy_resolution", 64),
                                       ("data.downscale", 2), ("data.use_masks", False), ("train.seed", 3),
                                       ("train.init_variance", 0.5)])
def test_merge_refuses_what_defines_the_trained_model(key, value):
    with pytest.raises(UserInputError) as e:
        merge_resume_config(small_config(), {key: value})
    msg = str(e.value)
    assert f"--{key} cannot change when resuming" in msg and "\n" not in msg


def test_merge_refuses_unknown_option():
    with pytest.raises(UserInputError, match="unknown option --train.lrr"):
        merge_resume_config(small_config(), {"train.lrr": 1.0})


# ------------------------------------------------------------------ through the console script
def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "taichi_neus.app.cli", "train", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def scene():
    return load_dtu(default_scene_path())


def _run_folder(root: pathlib.Path, scene, data_path: str, steps: int = 3) -> pathlib.Path:
    """A run as `train` leaves it when interrupted at ``steps``: config.json and one checkpoint."""
    cfg = small_config(iters=steps)
    cfg.data.path = data_path
    cfg.arch = "cpu"
    cfg.mesh.resolution = 32
    cfg.train.ckpt_every = steps
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(cfg.to_json())
    tr = Trainer(scene, cfg, run, log=lambda *a: None)
    tr.fit()
    return run


def test_resume_refuses_a_changed_model_size_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    saved = small_config().to_json()
    (run / "config.json").write_text(saved)
    p = _cli("--out", str(run), "--resume", "--arch", "cpu", "--field.sdf_hidden", "16")
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("taichi-neus: error:")]
    assert len(lines) == 1 and "--field.sdf_hidden cannot change when resuming" in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert (run / "config.json").read_text() == saved and sorted(run.iterdir()) == [run / "config.json"]


@pytest.mark.slow
def test_resume_honours_arch_moved_data_and_a_lower_lr(tmp_path, scene):
    """The divergence message says: resume with a lower --train.lr. That, --arch and a moved --data are applied,
    printed and recorded in config.json, and training goes on from the checkpoint."""
    data = tmp_path / "scene"
    shutil.copytree(default_scene_path(), data)
    run = _run_folder(tmp_path, scene, str(data))
    moved = tmp_path / "moved"
    data.rename(moved)
    p = _cli("--out", str(run), "--resume", "--data", str(moved), "--arch", "cpu", "--train.lr", "0.005",
             "--iters", "4")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed at step 3" in p.stdout
    assert "resume with train.lr: 0.01 -> 0.005" in p.stdout
    assert f"resume with data.path: '{data}' -> '{moved}'" in p.stdout
    assert "resume with train.iters: 3 -> 4" in p.stdout
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["train"]["lr"], cfg["train"]["iters"], cfg["data"]["path"], cfg["arch"]) == (0.005, 4, str(moved),
                                                                                             "cpu")
    assert (run / "checkpoints" / "ckpt_0000004.npz").is_file()


def test_resumed_trainer_uses_the_new_learning_rate(scene, tmp_path):
    run = _run_folder(tmp_path, scene, "")
    saved = small_config(iters=3)
    cfg, _ = merge_resume_config(saved, {"train.lr": 2.5e-3, "train.lr_variance": 1e-3})
    tr = Trainer(scene, cfg, run, log=lambda *a: None)
    assert tr.resume_latest() == 3
    assert {g: s.lr for g, s in tr.opt.settings.items()} == {
        "encoding": 2.5e-3, "color_encoding": 2.5e-3, "sdf_mlp": 2.5e-3, "color_mlp": 2.5e-3, "variance": 1e-3,
        "background": 2.5e-3}


def test_checkpoint_without_the_run_state_loads_with_a_note(scene, tmp_path):
    """A checkpoint written before the learning-rate factor and sampler state were saved still resumes (step,
    parameters, RNG), with one line saying what restarts."""
    run = _run_folder(tmp_path, scene, "")
    path = next((run / "checkpoints").glob("ckpt_*.npz"))
    with np.load(path) as z:
        old = {k: z[k] for k in z.files if k not in CKPT_RUN_KEYS and not k.startswith(SAMPLER_PREFIX)}
    np.savez(path, **old)
    notes = []
    tr = Trainer(scene, small_config(iters=3), run, log=notes.append)
    tr.lr_factor = 0.25
    assert tr.resume_latest() == 3
    np.testing.assert_array_equal(tr.state()["params"], old["params"])
    assert tr.lr_factor == 1.0
    notes = [n for n in notes if "hash levels" not in n]  # the trainer's start-up line on the level cap
    assert len(notes) == 1 and "predates" in notes[0] and "\n" not in notes[0]


def test_changed_pixel_sampler_starts_fresh_with_a_note(scene, tmp_path):
    run = _run_folder(tmp_path, scene, "")
    cfg = small_config(iters=3)
    cfg.train.pixel_sampler = "quadtree"
    notes = []
    tr = Trainer(scene, cfg, run, log=notes.append)
    assert tr.resume_latest() == 3
    notes = [n for n in notes if "hash levels" not in n]  # the trainer's start-up line on the level cap
    assert len(notes) == 1 and "uniform pixel sampler" in notes[0]
