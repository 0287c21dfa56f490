"""Joint pose refinement without masks (the background model on): the foreground's ray gradients alone
against those plus the background model's (``--train.pose_background``), one run after the other.

    python benchmarks/refine_poses_unmasked.py --scene scan24 --budget 300          # ~12 min
    python benchmarks/refine_poses_unmasked.py --scene builtin --iters 600 --pose-start 0

Every *training* camera of the scene is turned by ``--rotation`` degrees and moved by ``--translation``
unit-sphere units (one fixed draw, ``--perturb-seed``, as ``benchmarks/refine_poses_train.py``); the trainer
(the default configuration, ``data.use_masks`` off, ``train.refine_poses`` on) then runs in this process
for ``--budget`` seconds (``--train.time_budget``) or ``--iters`` steps. Figure: the training cameras'
mean rotation error (degrees) and centre error (relative to the cameras' mean distance from their centroid)
against the true poses after a similarity fit (the frame is free). Prints a table and writes JSON
(``--json``, default ``benchmarks/results/refine_poses_unmasked_<scene>.json``).
"""

import argparse
import json
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCAN24 = ROOT.parent / "shared" / "data" / "dtu_scan24"
sys.path.insert(0, str(ROOT / "benchmarks"))
from recipe import _commit  # noqa: E402


def run(scene_name: str, with_background: bool, args) -> dict:
    from taichi_neus.data import default_scene_path
    from taichi_neus.data.loader import load_scene
    from taichi_neus.data.sfm import compare_cameras
    from taichi_neus.render.pose import perturb_pose
    from taichi_neus.train.config import Config
    from taichi_neus.train.trainer import Trainer

    if scene_name == "scan24":
        sc = load_scene(str(SCAN24), downscale=args.downscale)
    else:
        sc = load_scene(str(default_scene_path()))
    true = sc.c2w.astype(np.float64).copy()
    rng = np.random.default_rng(args.perturb_seed)
    ids = sc.train_ids
    for v in ids:
        sc.c2w[v] = perturb_pose(true[v], args.rotation, args.translation, rng)
    given = sc.c2w.copy()
    cfg = Config()
    cfg.data.use_masks = False
    cfg.train.seed = args.seed
    cfg.train.refine_poses, cfg.train.pose_background = True, with_background
    if args.pose_start is not None:
        cfg.train.pose_start = args.pose_start
    if args.budget > 0:
        cfg.train.time_budget, cfg.train.iters = args.budget, 10**6
    else:
        cfg.train.iters = args.iters
    cfg.train.val_every = cfg.train.ckpt_every = 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(sc, cfg, pathlib.Path(tmp) / "run", log=lambda *a: None)
        tr.fit()

    def errors(c2w):
        c = compare_cameras(np.linalg.inv(c2w[ids].astype(np.float64)), np.linalg.inv(true[ids]))
        return float(c["rotation_deg"].mean()), float(c["centre_rel"].mean())

    (r0, c0), (r1, c1) = errors(given), errors(sc.c2w)
    return {"scene": scene_name, "pose_background": with_background, "steps": tr.step,
            "wall_s": time.perf_counter() - t0, "rotation_deg_given": r0, "centre_rel_given": c0,
            "rotation_deg": r1, "centre_rel": c1}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scene", choices=("builtin", "scan24"), default="builtin")
    ap.add_argument("--downscale", type=int, default=4, help="scan24's image downscale")
    ap.add_argument("--budget", type=float, default=0.0, help="training seconds per run (0: --iters steps)")
    ap.add_argument("--iters", type=int, default=600)
    ap.add_argument("--pose-start", type=float, default=None, help="--train.pose_start (default: the default)")
    ap.add_argument("--rotation", type=float, default=2.0)
    ap.add_argument("--translation", type=float, default=0.03)
    ap.add_argument("--perturb-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", default="cpu")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if args.scene == "scan24" and not (SCAN24 / "cameras_sphere.npz").is_file():
        print(f"note: {SCAN24} not found; nothing to measure", file=sys.stderr)
        return 0
    from taichi_neus import runtime
    runtime.init(args.arch, verbose=False)
    rows = [run(args.scene, bg, args) for bg in (False, True)]
    print(f"\n{args.scene}, no masks, training cameras turned {args.rotation} deg and moved {args.translation}")
    print("| background's ray gradients | steps | rotation error (deg) | centre error (rel.) |")
    print("|---|---:|---:|---:|")
    print(f"| (as given) | - | {rows[0]['rotation_deg_given']:.2f} | {rows[0]['centre_rel_given']:.4f} |")
    for r in rows:
        print(f"| {'on' if r['pose_background'] else 'off (default)'} | {r['steps']} | {r['rotation_deg']:.2f} "
              f"| {r['centre_rel']:.4f} |")
    out = pathlib.Path(args.json or ROOT / "benchmarks" / "results" / f"refine_poses_unmasked_{args.scene}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "commit": _commit(), "machine": platform.processor(),
                               "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
