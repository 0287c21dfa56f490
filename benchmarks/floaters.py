"""Does gradient scaling (Philip & Deschaintre 2023) keep near-camera floaters away without a near plane?

    python benchmarks/floaters.py --clock cpu --budget 150                      # ~12 min on 2 cores
    python benchmarks/floaters.py --clock cpu --budget 150 --background room \
        --out benchmarks/results/floaters_room.json

The scene: the built-in synthetic object shrunk to a bounding radius of 0.3 (``object_scale``
0.375) with the cameras at radius 0.9, i.e. *inside* the unit sphere the field models, looking at
the object; 12 views, alternate ones held out, so 6 training views. No background field, no masks
(``--masks`` to use them), ``render.near = 0`` so every ray starts at its camera, and the occupancy
grid off (``--occupancy`` to prune) so the coarse march samples all space from the camera on:
everything a photo shows must be explained inside the unit sphere. Pixels that miss the object show
(``--background``):

- ``environment`` (default): a distant environment, a function of the ray direction only. No
  surface inside the unit sphere reproduces it for every view (the cameras sit near the sphere's
  edge, so its parallax differs from view to view), but each camera's own near space, seen by no
  other training camera, can hold a private screen: the "background collapse" of the paper, with
  nothing else that could explain the background.
- ``room``: the same texture painted on a sphere of radius 0.97 around everything: a real wall
  inside the modelled region, so a floater-free explanation exists and is the right one.
- ``black``: nothing (only useful with ``--masks``; unmasked runs collapse to an empty field).

The hook (``paper``: per-sample gradients x min(1, d²/σ²), d the sample's distance from its
camera, σ = 0.9 the camera distance) is claimed to prevent near-camera density without a near plane.

Two starts: the SDF's sphere initialisation of radius 0.5 (its surface lies 0.4 in front of every
camera) and of radius 0.2 (inside the object; the space near the cameras starts empty). Each is
trained with gradient scaling off and on, from the same seeds, for the same budget (schedules on
the elapsed share of the budget, see ``budget_training.py``).

Measured on the held-out views (mean over all pixels):
- ``near20``: opacity accumulated over the first 20% of each ray's length inside the unit sphere
  (from the camera): space where the true scene has nothing.
- ``front``: opacity accumulated before the ray reaches the object's bounding sphere (radius 0.3),
  or, if it misses it, along the whole ray (``room``: up to 0.05 before the wall): density that can
  be neither the object nor the wall.
- held-out PSNR, over the whole image and over the object's pixels (exact masks): floaters in
  front of the object show up in the second.
and ``near20`` on the training views, where floaters that explain the training images would sit.
Output: table on stdout and JSON (default ``benchmarks/results/floaters.json``).
"""

import argparse
import gc
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from budget_training import BudgetTrainer, mean_std  # noqa: E402

from taichi_neus.data.synthetic import ROOM_RADIUS  # noqa: E402

CAMERA_RADIUS = 0.9
OBJECT_SCALE = 0.375  # bounding radius 0.8 * 0.375 = 0.3
OBJECT_BOUND = 0.8 * OBJECT_SCALE


def config(args, init_radius: float, hook: str, seed: int):
    from taichi_neus.field.hash_grid import HashGridConfig
    from taichi_neus.field.sdf_field import FieldConfig
    from taichi_neus.train.config import Config

    cfg = Config()
    cfg.field = FieldConfig(grid=HashGridConfig(n_levels=8, n_features=2, log2_table=15, base_resolution=16,
                                                per_level_scale=1.45), sdf_hidden=32, color_hidden=32,
                            feature_dim=7, sphere_init_radius=init_radius, color_encoding=False)
    cfg.data.use_masks = args.masks
    cfg.background.mode = "off"  # no model beyond the unit sphere: everything must be explained inside it
    rc, tc = cfg.render, cfg.train
    rc.near = args.near  # 0: rays start at the camera
    rc.background = (0.0, 0.0, 0.0)
    rc.occupancy_resolution, rc.occupancy_warmup, rc.occupancy_every = 32, 32, 8
    if not args.occupancy:  # every cell stays occupied: the coarse march samples all space, near the camera too
        rc.occupancy_warmup = 1 << 30
    rc.coarse_step = 2 * 3**0.5 / 96
    rc.n_fine = 24
    tc.eps_start, tc.eps_end = 1 / 32, 1 / 256
    tc.iters, tc.warmup = 1000, 50  # virtual steps (budget_training.py)
    tc.min_rays = tc.max_rays = args.rays
    tc.sample_budget = args.rays * rc.n_fine
    tc.val_every = tc.ckpt_every = 0
    tc.seed = seed
    tc.grad_scaling = hook
    return cfg


def make_scene(root: pathlib.Path, args):
    """The training scene (masks only if ``args.masks``) and the exact (V, H, W) bool object masks,
    which score the held-out object pixels whether or not training used them."""
    from taichi_neus.data import load_dtu
    from taichi_neus.data.synthetic import make_synthetic_scene

    make_synthetic_scene(root, n_views=2 * args.train_views, width=args.size, height=args.size, seed=args.scene_seed,
                         camera_radius=CAMERA_RADIUS, object_scale=OBJECT_SCALE,
                         backdrop=args.background)
    exact = load_dtu(root, holdout_every=2, use_masks=True).masks > 127
    return load_dtu(root, holdout_every=2, use_masks=args.masks), exact


def view_rays(scene, v):
    from taichi_neus.data.rays import image_rays
    return image_rays(scene.K[v], scene.c2w[v], scene.H, scene.W)


def measure(tr, scene, exact_masks, room: bool) -> dict:
    from taichi_neus.data.rays import unit_sphere_near_far
    from taichi_neus.render.image_metrics import psnr

    out = {"near20": [], "front": [], "psnr": [], "psnr_object": [], "near20_train": []}
    for split, views in (("test", scene.test_ids), ("train", scene.train_ids)):
        for v in views:
            o, d = view_rays(scene, int(v))
            near, far, _ = unit_sphere_near_far(o, d, min_near=0.0)
            t20 = near + 0.2 * (far - near)
            r20 = tr.render_rays(o, d, max_t=t20)
            if split == "train":
                out["near20_train"].append(float(r20["opacity"].mean()))
                continue
            out["near20"].append(float(r20["opacity"].mean()))
            entry, _, hit = unit_sphere_near_far(o, d, radius=OBJECT_BOUND)
            # rays that miss the object: the whole ray, or up to just before the room's wall if there is one
            _, wall, _ = unit_sphere_near_far(o, d, radius=ROOM_RADIUS, min_near=0.0)
            miss_stop = wall - 0.05 if room else np.inf
            front = tr.render_rays(o, d, max_t=np.where(hit, entry, miss_stop).astype(np.float32))
            out["front"].append(float(front["opacity"].mean()))
            full = tr.render_rays(o, d)
            gt = scene.images[int(v)].astype(np.float32) / 255.0
            rgb = np.clip(full["rgb"].reshape(gt.shape), 0, 1)
            out["psnr"].append(float(psnr(rgb, gt)))
            m = exact_masks[int(v)]
            out["psnr_object"].append(float(psnr(rgb[m], gt[m])))
    return {k: float(np.mean(val)) for k, val in out.items()} | {"per_view": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=90.0, help="training seconds per run (default 90)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--init-radius", type=float, nargs="+", default=[0.5, 0.2],
                    help="radii of the SDF's sphere initialisation to start from")
    ap.add_argument("--train-views", type=int, default=6)
    ap.add_argument("--size", type=int, default=96, help="image side in pixels")
    ap.add_argument("--scene-seed", type=int, default=0)
    ap.add_argument("--rays", type=int, default=1024, help="rays per step")
    ap.add_argument("--near", type=float, default=0.0,
                    help="near bound from the camera, unit-sphere units (default 0: no near plane)")
    ap.add_argument("--hooks", nargs="+", choices=("none", "paper"), default=["none", "paper"],
                    help="gradient scaling settings to train with")
    ap.add_argument("--occupancy", dest="occupancy", action="store_true",
                    help="prune space with the occupancy grid (default off: the coarse march samples everywhere, "
                         "so density can grow anywhere along a ray)")
    ap.add_argument("--background", choices=("environment", "room", "black"), default="environment",
                    help="what pixels that miss the object show: a distant environment (default), the same "
                         "texture on a wall around everything inside the unit sphere (room), or black")
    ap.add_argument("--masks", dest="masks", action="store_true",
                    help="train with the masks (their loss forbids opacity on background pixels, so no floaters "
                         "can form there)")
    ap.add_argument("--arch", default="cpu")
    ap.add_argument("--progress", type=float, default=30.0)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results" / "floaters.json"))
    args = ap.parse_args(argv)

    from taichi_neus import runtime
    runtime.init(args.arch, verbose=False)
    results = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = pathlib.Path(tmpdir)
        scene, exact_masks = make_scene(tmp / "scene", args)
        room = args.background == "room"
        print(f"scene: {len(scene.train_ids)} train / {len(scene.test_ids)} held-out views {scene.W}x{scene.H}, "
              f"cameras at radius {CAMERA_RADIUS}, object radius {OBJECT_BOUND}; sigma {scene.camera_sigma():.3f}",
              flush=True)
        for init in args.init_radius:
            for seed in args.seeds:
                for hook in args.hooks:
                    name = f"init {init} seed {seed} hook {hook}"
                    cfg = config(args, init, hook, seed)
                    warm = BudgetTrainer(scene, cfg, tmp / "warm", budget_s=1e9)
                    warm.train_step()
                    warm.train_step()
                    del warm
                    tr = BudgetTrainer(scene, cfg, tmp / name.replace(" ", "_"), budget_s=args.budget,
                                       clock=args.clock)
                    first = hook == args.hooks[0] and seed == args.seeds[0]
                    before = measure(tr, scene, exact_masks, room) if first else None
                    stats = tr.run(progress_every_s=args.progress, label=name)
                    m = measure(tr, scene, exact_masks, room)
                    r = {"name": name, "init_radius": init, "seed": seed, "grad_scaling": hook, **stats, **m}
                    if before is not None:
                        r["at_init"] = {k: before[k] for k in ("near20", "front", "psnr", "psnr_object",
                                                               "near20_train")}
                    results.append(r)
                    print(f"{name}: held-out PSNR {m['psnr']:.2f} (object {m['psnr_object']:.2f})  "
                          f"near20 {m['near20']:.4f}  front {m['front']:.4f}  "
                          f"near20(train views) {m['near20_train']:.4f}  steps {stats['steps']}", flush=True)
                    del tr
                    gc.collect()
    lines = ["| start | gradient scaling | held-out PSNR (dB) | held-out PSNR on the object (dB) | "
             "near-20% opacity, held-out | "
             "opacity in front of the object, held-out | near-20% opacity, training views | steps |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for init in args.init_radius:
        for hook in args.hooks:
            g = [r for r in results if r["init_radius"] == init and r["grad_scaling"] == hook]
            cells = []
            for key, spec in (("psnr", ".2f"), ("psnr_object", ".2f"), ("near20", ".4f"), ("front", ".4f"),
                              ("near20_train", ".4f")):
                m, s = mean_std([r[key] for r in g])
                vals = " / ".join(format(r[key], spec) for r in g)
                cells.append(f"{m:{spec}} ({vals})" if len(g) > 1 else format(m, spec))
            steps = " / ".join(str(r["steps"]) for r in g)
            lines.append(f"| sphere r={init} | {hook} | " + " | ".join(cells) + f" | {steps} |")
    init_rows = [f"at initialisation (r={r['init_radius']}): near20 {r['at_init']['near20']:.4f}, "
                 f"front {r['at_init']['front']:.4f}, near20 on training views {r['at_init']['near20_train']:.4f}"
                 for r in results if "at_init" in r]
    text = "\n".join(lines)
    print("\n" + text)
    for line in init_rows:
        print(line)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]), "args": vars(args),
            "camera_radius": CAMERA_RADIUS, "object_bound": OBJECT_BOUND,
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    out.write_text(json.dumps({"meta": meta, "runs": results, "table": text, "at_init": init_rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
