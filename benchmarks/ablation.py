"""Ablation of the accuracy and efficiency techniques at an equal time budget.

    python benchmarks/ablation.py                       # built-in synthetic scene, ~22 min on 2 cores
    python benchmarks/ablation.py --budget 60 --only baseline +S3IM
    python benchmarks/ablation.py --data ../shared/data/dtu_scan24 --downscale 4 --eval-downscale 2

Every run trains the same scene from the same seed for the same training-step time (``--budget``
seconds; ``--clock cpu`` counts this process's CPU seconds instead of wall seconds). Schedules
follow the elapsed share of the budget (see ``budget_training.py``), so each run ends annealed.

Runs: ``baseline`` (uniform pixels, no S3IM, gradient scaling off), each technique alone on top of
it (``+S3IM``, ``+quadtree``, ``+soft mining``, ``+gradient scaling``) and everything on. The two
samplers exclude each other, so "all on" is run once with each. ``--repeat`` names runs to do
again (same seed): the spread between the copies is this machine's timing noise (a different
number of steps in the same time changes the result), reported in the table's last rows.

Ray budget (the same for every run): ``--rays`` rays per step (default 1024), fixed (the trainer's
adaptive ray count is pinned with min_rays = max_rays). S3IM needs whole virtual patches
(``s3im_batch`` rays, a multiple of ``--s3im-patch``), so its batch is exactly these rays; fixing the
count for every run means S3IM gets no larger batch than the others, and the samplers redistribute
the same number of rays instead of changing it. Samples per ray still follow the occupancy grid.

Metrics: held-out views (every 8th view): PSNR and SSIM of the render against the photo with the
background set to the background colour (the model is trained with masks), and on the built-in
scene the Chamfer distance (world units, mean of accuracy and completeness, 20k points each way)
of the ``--mesh-res`` marching-cubes mesh to the analytic surface; steps done, rays per CPU-second
and rays/s of the median step (both steadier than rays/s over the run on a shared machine). Output:
a table on stdout and JSON (default ``benchmarks/results/ablation.json``).
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

RUNS = {
    "baseline": {},
    "+S3IM": {"s3im": True},
    "+quadtree": {"sampler": "quadtree"},
    "+soft mining": {"sampler": "soft_mining"},
    "+gradient scaling": {"grad_scaling": True},
    "all on (quadtree)": {"s3im": True, "sampler": "quadtree", "grad_scaling": True},
    "all on (soft mining)": {"s3im": True, "sampler": "soft_mining", "grad_scaling": True},
}


def base_config(args):
    from taichi_neus.field.hash_grid import HashGridConfig
    from taichi_neus.field.sdf_field import FieldConfig
    from taichi_neus.train.config import Config

    cfg = Config()
    if args.field == "small":  # the training tests' field: 8 levels x 2 features, 2^15 table
        cfg.field = FieldConfig(grid=HashGridConfig(n_levels=8, n_features=2, log2_table=15, base_resolution=16,
                                                    per_level_scale=1.45), sdf_hidden=32, color_hidden=32,
                                feature_dim=7, color_encoding=False)
        cfg.render.occupancy_resolution = 32
        cfg.render.coarse_step = 2 * 3**0.5 / 96
        cfg.train.eps_start, cfg.train.eps_end = 1 / 32, 1 / 256
    tc, rc = cfg.train, cfg.render
    tc.iters = args.nominal_iters  # the schedule's length in "virtual steps" (budget_training.py)
    tc.warmup = max(1, args.nominal_iters // 20)
    tc.seed = args.seed
    tc.val_every = tc.ckpt_every = 0
    rc.n_fine = args.n_fine
    rc.occupancy_warmup, rc.occupancy_every = 32, 8
    tc.min_rays = tc.max_rays = args.rays
    tc.sample_budget = args.rays * rc.n_fine
    tc.grad_scaling = "none"
    tc.pixel_sampler = "uniform"
    tc.s3im_weight = 0.0
    tc.s3im_batch, tc.s3im_patch = args.rays, args.s3im_patch
    if args.data:
        cfg.data.path, cfg.data.downscale = args.data, args.downscale
    return cfg


def configure(cfg, switches: dict, args):
    if switches.get("s3im"):
        cfg.train.s3im_weight = args.s3im_weight
    if switches.get("sampler"):
        cfg.train.pixel_sampler = switches["sampler"]
    if switches.get("grad_scaling"):
        cfg.train.grad_scaling = "paper"
    return cfg


def load(args):
    from taichi_neus.data import default_scene_path, load_dtu
    from taichi_neus.data.loader import load_scene

    if args.data:
        return load_scene(args.data, downscale=args.downscale, holdout_every=8, use_masks=True)
    return load_dtu(default_scene_path())


def evaluate(tr, scene, args) -> dict:
    from taichi_neus.export.evaluation import chamfer, sample_mesh_points
    from taichi_neus.export.mesh import mesh_from_run
    from taichi_neus.render.image_metrics import ssim

    views = [int(v) for v in scene.test_ids]
    psnrs, ssims = [], []
    for v in views:
        ev = tr.evaluate_view(v, args.eval_downscale)
        psnrs.append(ev["psnr"])
        ssims.append(float(ssim(np.clip(ev["render"]["rgb"], 0, 1), ev["gt"])))
    out = {"heldout_views": views, "psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)),
           "psnr_per_view": psnrs, "ssim_per_view": ssims}
    if not args.data:
        from taichi_neus.data import sample_surface
        t0 = time.perf_counter()
        mesh = mesh_from_run(tr, resolution=args.mesh_res, clean=False)
        if mesh.is_empty:
            out.update(chamfer=None, accuracy=None, completeness=None)
        else:
            pts = sample_mesh_points(mesh.vertices, mesh.faces, n=20000, seed=0)
            c = chamfer(pts, sample_surface(20000, seed=1))
            out.update(chamfer=c["chamfer"], accuracy=c["accuracy"], completeness=c["completeness"])
        out["mesh_s"] = time.perf_counter() - t0
    return out


def run_one(name, switches, scene, args, tmp) -> dict:
    cfg = configure(base_config(args), switches, args)
    # Warm-up: compile (or load from the offline cache) every kernel this configuration uses, outside the budget.
    warm = BudgetTrainer(scene, cfg, tmp / "warm", budget_s=1e9)
    for _ in range(2):
        warm.train_step()
    del warm
    gc.collect()
    tr = BudgetTrainer(scene, cfg, tmp / name.replace(" ", "_"), budget_s=args.budget, clock=args.clock)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    stats = tr.run(progress_every_s=args.progress, label=name)
    stats["loadavg_1min_start_end"] = [load0, os.getloadavg()[0]]
    stats.update(evaluate(tr, scene, args))
    stats["total_s"] = time.perf_counter() - t0
    stats["switches"] = switches
    stats["config"] = {"pixel_sampler": cfg.train.pixel_sampler, "s3im_weight": cfg.train.s3im_weight,
                       "grad_scaling": cfg.train.grad_scaling}
    del tr
    gc.collect()
    return stats


def fmt(x, spec):
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def table(results: list[dict], has_mesh: bool) -> str:
    head = "| run | held-out PSNR (dB) | SSIM |" + (" Chamfer (world units) |" if has_mesh else "") + \
           " steps | CPU ms / step | samples / ray | rays per CPU-second | train s (wall / CPU) |"
    sep = "|---|---:|---:|" + ("---:|" if has_mesh else "") + "---:|---:|---:|---:|---:|"
    rows = [head, sep]
    for r in results:
        row = f"| {r['name']} | {fmt(r['psnr'], '.2f')} | {fmt(r['ssim'], '.4f')} |"
        if has_mesh:
            row += f" {fmt(r.get('chamfer'), '.4f')} |"
        row += (f" {r['steps']} | {1000 * r['train_cpu_s'] / max(r['steps'], 1):.0f} |"
                f" {r['samples'] / max(r['rays'], 1):.1f} | {r['rays'] / r['train_cpu_s']:.0f} |"
                f" {r['train_wall_s']:.0f} / {r['train_cpu_s']:.0f} |")
        rows.append(row)
    return "\n".join(rows)


def noise_rows(results: list[dict], has_mesh: bool) -> list[str]:
    """Mean ± sample std over the copies of each repeated run."""
    out = []
    for base in dict.fromkeys(r["base_name"] for r in results):
        group = [r for r in results if r["base_name"] == base]
        if len(group) < 2:
            continue
        p, ps = mean_std([g["psnr"] for g in group])
        s, ss = mean_std([g["ssim"] for g in group])
        st, sts = mean_std([g["steps"] for g in group])
        line = (f"{base}: {len(group)} runs, PSNR {p:.2f} ± {ps:.2f} dB, SSIM {s:.4f} ± {ss:.4f}, "
                f"steps {st:.0f} ± {sts:.0f}")
        if has_mesh:
            c, cs = mean_std([g.get("chamfer") for g in group])
            line += f", Chamfer {c:.4f} ± {cs:.4f}"
        out.append(line)
    return out


def summary(docs: list[dict]) -> str:
    """Mean ± sample std per run name over every run of the given JSONs; a repeated run (same seed) counts
    once (its first copy), so the spread is over seeds."""
    runs = {}
    for d in docs:
        seed = d["meta"]["args"]["seed"]
        for r in d["runs"]:
            runs.setdefault(r["base_name"], {}).setdefault(seed, r)
    has_mesh = all(not d["meta"]["args"]["data"] for d in docs)
    mesh_head = " Chamfer (world units) |" if has_mesh else ""
    lines = ["| run | seeds | held-out PSNR (dB) | SSIM |" + mesh_head + " steps |",
             "|---|---|---:|---:|" + ("---:|" if has_mesh else "") + "---:|"]
    for name, by_seed in runs.items():
        rs = [by_seed[k] for k in sorted(by_seed)]
        cells = []
        for key, spec in (("psnr", ".2f"), ("ssim", ".4f")) + ((("chamfer", ".4f"),) if has_mesh else ()):
            m, sd = mean_std([r.get(key) for r in rs])
            # one seed has no spread: print the value alone rather than a misleading "± 0"
            cells.append(f"{m:{spec}} ± {sd:{spec}}" if len(rs) > 1 else f"{m:{spec}}")
        steps = " / ".join(str(r["steps"]) for r in rs)
        seeds = ", ".join(str(k) for k in sorted(by_seed))
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + f" | {steps} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="", help="scene folder (NeuS/DTU layout); default: the built-in synthetic scene")
    ap.add_argument("--downscale", type=int, default=4, help="image downscale for --data")
    ap.add_argument("--budget", type=float, default=140.0, help="training seconds per run (default 140)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rays", type=int, default=1024, help="rays per step, every run (a multiple of --s3im-patch)")
    ap.add_argument("--s3im-patch", type=int, default=32, help="S3IM virtual patch height")
    ap.add_argument("--s3im-weight", type=float, default=1.0, help="S3IM lambda")
    ap.add_argument("--n-fine", type=int, default=24, help="samples per ray that carry gradients")
    ap.add_argument("--field", choices=("small", "full"), default="small")
    ap.add_argument("--nominal-iters", type=int, default=1000, help="schedule length in virtual steps")
    ap.add_argument("--eval-downscale", type=int, default=1, help="held-out views rendered at 1/k resolution")
    ap.add_argument("--mesh-res", type=int, default=128)
    ap.add_argument("--only", nargs="+", choices=list(RUNS), help="run only these")
    ap.add_argument("--repeat", nargs="*", default=["baseline"], choices=list(RUNS),
                    help="runs done a second time to show the noise (default: baseline)")
    ap.add_argument("--arch", default="cpu")
    ap.add_argument("--progress", type=float, default=30.0, help="print progress every this many seconds (0: off)")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results" / "ablation.json"))
    ap.add_argument("--table-from", metavar="JSON", help="print the table of an earlier run's JSON and exit")
    ap.add_argument("--summarize", nargs="+", metavar="JSON",
                    help="print mean ± std per run over several runs' JSONs (e.g. one per seed) and exit")
    args = ap.parse_args(argv)
    if args.summarize:
        print(summary([json.loads(pathlib.Path(f).read_text()) for f in args.summarize]))
        return 0
    if args.table_from:
        d = json.loads(pathlib.Path(args.table_from).read_text())
        has_mesh = not d["meta"]["args"]["data"]
        print(d["meta"]["command"] + "\n\n" + table(d["runs"], has_mesh))
        for line in noise_rows(d["runs"], has_mesh):
            print("noise: " + line)
        return 0
    if args.rays % args.s3im_patch:
        ap.error(f"--rays ({args.rays}) must be a multiple of --s3im-patch ({args.s3im_patch})")

    from taichi_neus import runtime
    runtime.init(args.arch, verbose=False)
    scene = load(args)
    names = args.only or list(RUNS)
    plan = [(n, n) for n in names] + [(f"{n} (repeat)", n) for n in args.repeat if n in names]
    print(f"scene {scene.name}: {len(scene.train_ids)} train / {len(scene.test_ids)} held-out views "
          f"{scene.W}x{scene.H}; {len(plan)} runs x {args.budget:.0f} s ({args.clock} clock), "
          f"{args.rays} rays/step, seed {args.seed}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for name, base in plan:
            r = run_one(name, RUNS[base], scene, args, pathlib.Path(tmpdir))
            r["name"], r["base_name"] = name, base
            results.append(r)
            print(f"{name}: PSNR {r['psnr']:.2f}  SSIM {r['ssim']:.4f}  Chamfer {fmt(r.get('chamfer'), '.4f')}  "
                  f"steps {r['steps']}  rays/s {r['rays_per_s']:.0f}", flush=True)
    has_mesh = not args.data
    text = table(results, has_mesh)
    noise = noise_rows(results, has_mesh)
    print("\n" + text)
    for line in noise:
        print("noise: " + line)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]), "args": vars(args),
            "scene": scene.name, "train_views": len(scene.train_ids), "heldout_views": len(scene.test_ids),
            "image_size": [scene.W, scene.H], "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    out.write_text(json.dumps({"meta": meta, "runs": results, "table": text, "noise": noise}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
