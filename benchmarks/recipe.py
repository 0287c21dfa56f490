"""The training recipe at equal time: each change against the defaults, on a real DTU scan and on the
built-in object rendered DTU-like (exact surface known).

    python benchmarks/recipe.py --scene scan24 --budget 300 --runs old new        # two runs, ~12 min
    python benchmarks/recipe.py --scene synthetic --budget 1080 --runs old new     # the 20-minute check
    python benchmarks/recipe.py --scene scan24 --budget 300 --runs new new-eikonal_points --seeds 0 1
    python benchmarks/recipe.py --scene scan24 --iters 2000 --runs new new+sparse_adam   # equal steps instead

Every run is the user's command, ``examples/train_dtu.py --data DIR --downscale K --train.time_budget B``
plus the run's options, in its own process, one after the other (never two at once on this 2-core
machine). ``--train.time_budget`` makes every schedule follow the elapsed share of the budget, so each
run ends annealed whatever its step rate. Runs: ``old`` pins the defaults before the recipe work
(commit d8082ae) explicitly, ``new`` is today's defaults (no option), and ``new-X`` / ``old+X`` take one
change out of / into them (the table ``CHANGES`` below lists them).

Scenes: ``scan24`` is ``../shared/data/dtu_scan24`` at ¼ resolution (400×300, skipped when absent);
``synthetic`` is the built-in object rendered like a DTU scan (400×300, 49 views, masks; generated once
into the cache); ``synthetic_colmap`` is the same object as a COLMAP scene whose sparse points are its
exact surface with realistic noise (for ``new+sparse_points``); ``--data`` takes any scene folder, e.g. the
output of ``taichi-neus poses``.

Metrics, all from the run's own ``metrics.json`` except the surface figures: held-out PSNR
inside the masks at the training resolution, the mesh's silhouette IoU against the held-out masks, and on
the synthetic object the Chamfer distance of the mesh to the exact surface (unit-sphere units, 20k points
each way) and the shares of the mesh's area inside the object, outside it and within 0.02 of the surface
(:func:`taichi_neus.export.evaluation.surface_shares` on the exact SDF). Wall time includes the mesh and
the evaluation. Output: a table on stdout and JSON (``--json``, default ``benchmarks/results/recipe_<scene>.json``).
"""

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCAN24 = ROOT.parent / "shared" / "data" / "dtu_scan24"

# The defaults before the recipe work (d8082ae), pinned so "old" stays the same run after defaults change.
OLD = {"render.coarse_step": 2.0 * 3**0.5 / 128, "render.n_fine": 32, "train.grad_scaling": "paper",
       "train.eikonal_points": 0, "train.level_start": 0, "train.eps_from_level": False,
       "train.level_footprint": 0.0, "train.sparse_adam": False, "field.grid.log2_table": 19,
       "train.curvature_weight": 0.0,
       "train.lr": 1e-2, "train.mask_weight": 0.1, "train.eikonal_weight": 0.1,
       "mesh.min_component": 0.0, "mesh.cull_unseen": False, "train.sparse_weight": 0.0,
       "field.normal_mode": "tetrahedral", "train.photo_weight": 0.0, "field.color_encoding": False,
       "render.occupancy_sweep": 1}

# One change each: the options that turn it on (their values in the new recipe).
CHANGES = {
    "sampling": {"render.coarse_step": 2.0 * 3**0.5 / 512, "render.n_fine": 12},
    "no_grad_scaling": {"train.grad_scaling": "auto"},
    "eikonal_points": {"train.eikonal_points": 4096},
    "levels": {"train.level_start": 4, "train.eps_from_level": True},
    "footprint": {"train.level_footprint": 1.0},
    "sparse_adam": {"train.sparse_adam": True},
    "table17": {"field.grid.log2_table": 17},
    "curvature": {"train.curvature_weight": 5e-4},
    "mesh_clean": {"mesh.min_component": 0.01, "mesh.cull_unseen": True},
    "sparse_points": {"train.sparse_weight": 0.1},  # COLMAP scenes only (Geo-NeuS; issue 12)
    "sparse_points_strong": {"train.sparse_weight": 1.0},
    "refine_poses": {"train.refine_poses": True},
    "view1": {"field.view_degree": 1},  # the colour's view dependence cut to SH band 1
    "view0": {"field.view_degree": 0},  # no view dependence
    "batch8k": {"train.sample_budget": 8192},  # half the samples per step: ~2x the steps
    "batch4k": {"train.sample_budget": 4096},
    "lr2": {"train.lr": 2e-2},
    "lr3": {"train.lr": 3e-2},
    "sfloor1k": {"train.s_floor": 1000.0},  # NeuS's s held at least at 1000 from 0.75 of training on
    "sfloor3k": {"train.s_floor": 3000.0},
    # fewer fine samples per ray: the sample budget then buys more rays per step (the held-out error on
    # scan 24 is blur of the brick and tile texture, and a 20-minute run sees each training pixel < once)
    "fine16": {"render.n_fine": 16},
    "fine8": {"render.n_fine": 8},
    "fine64": {"render.n_fine": 64},
    "fine64_32k": {"render.n_fine": 64, "train.sample_budget": 32768},  # the rays per step kept
    # the exact SDF gradient by forward-mode tangents (NeuS2) instead of the tetrahedral stencil: one hash
    # lookup per sample instead of five, so more steps in the same time (issue 10); "new-analytic" is the stencil
    "analytic": {"field.normal_mode": "analytic"},
    # multi-view photo consistency (Geo-NeuS): patch NCC through the rendered surface's plane into nearby views
    "photo": {"train.photo_weight": 0.1},
    "photo_strong": {"train.photo_weight": 0.5},
    "photo03": {"train.photo_weight": 0.3},
    # the photo term's gradient also turns the surface's normal (by default it moves the depth only)
    "photo_normal": {"train.photo_normal": True},
    # a hash grid of the colour network's own: texture apart from the eikonal-smoothed SDF grid
    "color_grid": {"field.color_encoding": True},
    "table21": {"field.grid.log2_table": 21, "train.sparse_adam": True},
    # the colour grid's table at 2^16 entries a level (from 2^18) with the sparse table update: ~10% more
    # samples/s on scan 24 (its Adam pass, forward and scatter touch a quarter of the memory)
    "color16_sparse": {"field.color_grid.log2_table": 16, "train.sparse_adam": True},
    # occupancy updates that re-evaluate the occupied cells and their neighbours every time and the rest of the
    # grid over 4 (8) updates, a quarter (an eighth) each time: the refresh is ~10% of a mid-run step on scan 24
    "occ_sweep4": {"render.occupancy_sweep": 4},
    "occ_sweep8": {"render.occupancy_sweep": 8},
    # half the uniform eikonal points per step (same weight: the term is a mean, so the same expected gradient
    # with more variance): they are ~12% of a mid-run step on scan 24
    "eikonal2048": {"train.eikonal_points": 2048},
}


def run_options(name: str) -> dict:
    """The options of run ``name``: ``old``, ``new``, ``old+<change>`` or ``new-<change>`` (options this
    version of the package does not have are left out)."""
    from taichi_neus.train.config import options

    known = {o.key for o in options()}
    return {k: v for k, v in _run_options(name).items() if k in known}


def _run_options(name: str) -> dict:
    if name == "new":
        return {}
    if name == "old":
        return dict(OLD)
    for sep, base in (("+", OLD), ("-", None)):
        head, _, change = name.partition(sep)
        if change and (head in ("old", "new") if sep == "+" else head == "new"):
            if change not in CHANGES:
                raise SystemExit(f"unknown change '{change}' in run '{name}'; changes: {', '.join(CHANGES)}")
            if sep == "+":
                return {**(base if head == "old" else {}), **CHANGES[change]}
            return {k: OLD[k] for k in CHANGES[change]}  # the new defaults with this change set back
    raise SystemExit(f"unknown run '{name}': use old, new, old+CHANGE or new-CHANGE ({', '.join(CHANGES)})")


def synthetic_scene(width: int, height: int, views: int) -> pathlib.Path:
    """The built-in object rendered like a DTU scan, generated once into the cache."""
    from taichi_neus.data.synthetic import cache_root, make_synthetic_scene

    path = cache_root() / f"dtu_like_{width}x{height}_{views}"
    if not (path / "scene.json").is_file():
        print(f"rendering the synthetic object: {views} views at {width}x{height} into {path} …", flush=True)
        make_synthetic_scene(path, n_views=views, width=width, height=height)
    return path


def synthetic_colmap_scene(width: int, height: int, views: int, noise_px: float = 1.0,
                           outliers: float = 0.02, n_points: int = 8000, seed: int = 0) -> pathlib.Path:
    """The DTU-like synthetic object as a COLMAP scene (PINHOLE, its true cameras) whose sparse points are
    the exact surface with realistic noise: Gaussian of ``noise_px`` pixels' footprint at the object
    (isotropic, world units) and an ``outliers`` share uniform in the object's bounding sphere; each point
    gets a track of 2-8 views and a reprojection error around 0.5 px, as COLMAP's have. Written once into
    the cache (images and masks are links to the NeuS-layout scene's); ``scene.json`` comes along so the
    surface figures are computed."""
    from taichi_neus.data.cameras import decompose_projection
    from taichi_neus.data.colmap import rotation_to_qvec
    from taichi_neus.data.synthetic import BOUND_RADIUS, OFFSET, SCALE, cache_root, sample_surface

    src = synthetic_scene(width, height, views)
    path = cache_root() / f"dtu_like_{width}x{height}_{views}_colmap_{noise_px:g}px"
    if (path / "scene.json").is_file():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = tmp / "sparse" / "0"
    for d in (tmp / "images", tmp / "masks", model):
        d.mkdir(parents=True)
    cams = np.load(src / "cameras_sphere.npz")
    lines, centres = [], []
    for i, img in enumerate(sorted((src / "image").glob("*.png"))):
        (tmp / "images" / img.name).symlink_to(img)
        (tmp / "masks" / img.name).symlink_to(src / "mask" / img.name)
        K, R, t = decompose_projection(cams[f"world_mat_{i}"][:3], f"world_mat_{i}")
        centres.append(-R.T @ t)
        lines += [f"{i + 1} " + " ".join(repr(float(x)) for x in (*rotation_to_qvec(R), *t)) + f" 1 {img.name}", ""]
    (model / "images.txt").write_text("\n".join(lines) + "\n")
    fx, fy, cx, cy = (float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]))
    (model / "cameras.txt").write_text(f"1 PINHOLE {width} {height} {fx!r} {fy!r} {cx!r} {cy!r}\n")
    rng = np.random.default_rng(seed)
    footprint = np.median(np.linalg.norm(np.array(centres) - OFFSET, axis=1)) / K[0, 0]  # world units per pixel
    n_out = int(round(outliers * n_points))
    pts = sample_surface(n_points - n_out, seed=seed + 7) + rng.normal(0, noise_px * footprint, (n_points - n_out, 3))
    d = rng.normal(size=(n_out, 3))
    r = BOUND_RADIUS * SCALE * rng.uniform(0, 1, n_out) ** (1 / 3)
    pts = np.concatenate([pts, OFFSET + d / np.linalg.norm(d, axis=1, keepdims=True) * r[:, None]])
    rows = []
    for j, q in enumerate(pts):
        track = rng.choice(views, size=int(rng.integers(2, 9)), replace=False)
        err = 0.3 + abs(rng.normal(0, 0.3))
        rows.append(f"{j + 1} {float(q[0])!r} {float(q[1])!r} {float(q[2])!r} 128 128 128 {err:.4f} "
                    + " ".join(f"{v + 1} 0" for v in track))
    (model / "points3D.txt").write_text("\n".join(rows) + "\n")
    shutil.copy(src / "scene.json", tmp / "scene.json")
    tmp.rename(path)
    return path


def surface_figures(mesh_path: str) -> dict:
    """Chamfer (unit-sphere units) and inside/outside/near shares of a synthetic-object mesh (world units)."""
    from taichi_neus.data.synthetic import OFFSET, SCALE, sample_surface, synthetic_sdf_unit
    from taichi_neus.export.evaluation import chamfer, sample_mesh_points, surface_shares
    from taichi_neus.export.mesh import Mesh

    mesh = Mesh.load(mesh_path)
    unit = lambda p: (np.asarray(p, np.float64) - OFFSET) / SCALE  # noqa: E731
    pts = unit(sample_mesh_points(mesh.vertices, mesh.faces, n=20000, seed=0))
    c = chamfer(pts, unit(sample_surface(20000, seed=1)))
    shares = surface_shares(mesh.vertices, mesh.faces, lambda p: synthetic_sdf_unit(unit(p)), tol=0.02)
    return {"chamfer_unit": float(c["chamfer"]), **{f"share_{k}": float(v) for k, v in shares.items()}}


def launch(out: pathlib.Path, data: pathlib.Path, downscale: int, options: dict, extra: list[str],
           budget: float = 0.0, iters: int = 0, seed: int = 0, label: str = "") -> float:
    """Run the user's command (``examples/train_dtu.py``) into a fresh ``out`` in its own process, to
    ``budget`` training seconds (``--train.time_budget``) or ``iters`` steps; returns its wall seconds.
    ``options``: {config key: value}; ``extra``: further command-line arguments."""
    if out.exists():  # a folder of an earlier benchmark run: train would resume it
        shutil.rmtree(out)
    args = [sys.executable, str(ROOT / "examples" / "train_dtu.py"), "--data", str(data), "--out", str(out),
            "--downscale", str(downscale), "--seed", str(seed), "--train.val_every", "0"]
    args += ["--train.time_budget", str(budget), "--iters", "1000000"] if budget > 0 else ["--iters", str(iters)]
    for k, v in options.items():
        args += [f"--{k}" if v is True else f"--no-{k}" if v is False else f"--{k}={v}"]
    args += extra
    print(f"[{time.strftime('%H:%M:%S')}] {label or out.name}: {' '.join(args[2:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.time() - t0
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        raise SystemExit(f"run {label or out.name} failed (exit {proc.returncode})")
    return wall


def train(name: str, data: pathlib.Path, downscale: int, budget: float, seed: int, out_root: pathlib.Path,
          extra: list[str], iters: int = 0) -> dict:
    out = out_root / f"{name}_seed{seed}"
    wall = launch(out, data, downscale, run_options(name), extra, budget=budget, iters=iters, seed=seed,
                  label=f"{name} seed {seed}")
    return collect(name, seed, out, data, wall)


def collect(name: str, seed: int, out: pathlib.Path, data: pathlib.Path, wall: float | None = None) -> dict:
    """The table row of a finished run folder (``--collect`` rebuilds a table from earlier runs' folders)."""
    opts = run_options(name)
    m = json.loads((out / "metrics.json").read_text())
    wall = m.get("wall_time_s") if wall is None else wall
    row = {"run": name, "seed": seed, "options": opts, "wall_s": wall, "steps": m.get("steps"),
           "train_time_s": m.get("train_time_s"), "psnr_masked": m.get("heldout_psnr_masked"),
           "psnr": m.get("heldout_psnr"), "psnr_masked_half_res": m.get("heldout_psnr_masked_half_res"),
           "mesh_iou": m.get("heldout_mesh_mask_iou"), "render_iou": m.get("heldout_render_mask_iou"),
           "mesh": m.get("mesh"), "run_dir": str(out)}
    if (data / "scene.json").is_file() and m.get("mesh"):
        row.update(surface_figures(m["mesh"]))
    print("    " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)
    return row


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return ""


def table(rows: list[dict]) -> str:
    cols = [("run", "run", "{}"), ("seeds", "n", "{}"), ("steps", "steps", "{:.0f}"),
            ("psnr_masked", "PSNR mask (dB)", "{:.2f}"), ("mesh_iou", "mesh IoU", "{:.4f}"),
            ("chamfer_unit", "Chamfer", "{:.4f}"), ("share_inside", "inside", "{:.3f}"),
            ("share_outside", "outside", "{:.3f}"), ("share_near", "near", "{:.3f}"), ("wall_s", "wall (s)", "{:.0f}")]
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(r["run"], []).append(r)
    lines = []
    for name, rs in groups.items():
        cells = []
        for key, _, fmt in cols:
            if key == "run":
                cells.append(name)
            elif key == "seeds":
                cells.append(str(len(rs)))
            else:
                vals = [r[key] for r in rs if r.get(key) is not None]
                if not vals:
                    cells.append("-")
                elif len(vals) == 1:
                    cells.append(fmt.format(vals[0]))
                else:
                    cells.append(fmt.format(np.mean(vals)) + " ±" + fmt.format(np.std(vals)).strip())
        lines.append(cells)
    head = [h for _, h, _ in cols]
    w = [max(len(head[i]), *(len(line[i]) for line in lines)) for i in range(len(cols))]
    out = ["  ".join(h.ljust(w[i]) for i, h in enumerate(head))]
    out += ["  ".join(c.ljust(w[i]) for i, c in enumerate(line)) for line in lines]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scene", choices=("scan24", "synthetic", "synthetic_colmap"), default="synthetic",
                    help="synthetic_colmap: the synthetic object as a COLMAP scene with noisy exact sparse points")
    ap.add_argument("--data", default="", help="a scene folder (any layout) instead of --scene's")
    ap.add_argument("--downscale", type=int, default=0, help="image downscale (0: 4 for real scans, 1 synthetic)")
    ap.add_argument("--budget", type=float, default=300.0, help="training seconds per run")
    ap.add_argument("--iters", type=int, default=0,
                    help="train this many steps instead of --budget seconds (equal steps: quality per step, apart "
                         "from the machine's speed, which drifts between and within sessions)")
    ap.add_argument("--runs", nargs="+", default=["old", "new"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out-root", default="/tmp/taichi_neus_recipe")
    ap.add_argument("--json", default="")
    ap.add_argument("--collect", action="store_true", help="no training: the table of the runs' existing folders")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: options passed to every run")
    args = ap.parse_args(argv)
    for name in args.runs:
        run_options(name)  # refuse a bad name before any run
    if args.data:
        data, downscale = pathlib.Path(args.data), 4
    elif args.scene == "scan24":
        if not (SCAN24 / "cameras_sphere.npz").is_file():
            print(f"skipped: {SCAN24} is not here")
            return 0
        data, downscale = SCAN24, 4
    elif args.scene == "synthetic_colmap":
        data, downscale = synthetic_colmap_scene(400, 300, 49), 1
    else:
        data, downscale = synthetic_scene(400, 300, 49), 1
    downscale = args.downscale or downscale
    extra = [a for a in args.extra if a != "--"]
    out_root = pathlib.Path(args.out_root) / (args.scene if not args.data else data.name)
    path = pathlib.Path(args.json or ROOT / "benchmarks" / "results" / f"recipe_{args.scene}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for name in args.runs:
            if args.collect:
                rows.append(collect(name, seed, out_root / f"{name}_seed{seed}", data))
            else:
                rows.append(train(name, data, downscale, 0.0 if args.iters else args.budget, seed, out_root, extra,
                                  iters=args.iters))
            # written after every run, so a long batch that stops keeps what it measured
            path.write_text(json.dumps({"scene": str(data), "downscale": downscale,
                                        "budget_s": None if args.iters else args.budget, "iters": args.iters or None,
                                        "extra": extra, "machine": platform.processor() or platform.machine(),
                                        "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M"),
                                        "commit": _commit(), "rows": rows}, indent=1))
    print(table(rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
