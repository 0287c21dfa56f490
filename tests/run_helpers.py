"""One small trained run shared by the preview, render and eval tests: trained once per test session
through ``taichi-neus train --gui-frames`` (headless live preview), with a checkpoint and a mesh."""

import json
import pathlib

from training_helpers import small_config

from taichi_neus.app import cli

STEPS = 60
_cache: dict = {}


def small_run(tmp_path_factory, arch: str) -> dict:
    """``{"run": run folder, "frames": preview frame folder, "rc": exit status, "stdout": str}``."""
    if "run" not in _cache:
        root = tmp_path_factory.mktemp("small_run")
        cfg = small_config(iters=STEPS)
        cfg.train.ckpt_every = STEPS
        cfg.mesh.resolution = 64
        (root / "cfg.json").write_text(cfg.to_json())
        run, frames = root / "run", root / "frames"
        rc = cli.main(["train", "--out", str(run), "--config", str(root / "cfg.json"), "--arch", arch,
                       "--gui-frames", str(frames), "--gui-width", "40", "--gui-share", "0.3"])
        _cache.update(run=run, frames=frames, rc=rc, metrics=json.loads((run / "metrics.json").read_text()))
    return dict(_cache)


def frame_image(path: pathlib.Path):
    """The rendered part of a saved preview frame (without the text band), float in [0, 1]."""
    import imageio.v2 as imageio

    from taichi_neus.app.preview import BAND

    a = imageio.imread(path).astype(float) / 255.0
    return a[: a.shape[0] - BAND]
