"""Hash-grid encoding throughput on the CPU: the forward with the levels as vector lanes against one
level at a time, and the table-gradient scatter of this tree against another commit's, on points laid
out as a training batch sees them and on uniformly scattered points.

    python benchmarks/hash_grid_throughput.py [--n 65536] [--baseline 208ce05]
        [--json benchmarks/results/hash_grid_throughput.json]

Point layouts (N samples, each with the field's 5-point tetrahedral stencil at ε = 1/1024, so 5N rows):

- ``rays``: 32 samples spaced over 0.03 along each of N/32 random rays, in ray order — a training
  batch's fine samples cluster like this around the surface, so neighbouring rows share cache lines;
- ``uniform``: samples uniform in [-0.9, 0.9]³ (the field benchmark's points): every lookup misses cache.

Beside them, the analytic normal's kernels (``field.normal_mode analytic``): the forward with the
encoding's Jacobian and the scatter of value and Jacobian gradients, over the N samples themselves
(one lookup per sample instead of the stencil's five).

Each is timed with all 16 levels on, with 10 (scan24 at ¼ resolution caps the levels at its pixel
footprint) and with 6 (early in a coarse-to-fine run). Kernels run alternately (A B A B ...),
``--repeats`` times each; the least time is kept. ``--baseline REV`` loads that commit's
``hash_grid.py`` (``git show``, no checkout; it must take rows-of-16 buffers, i.e. be from after
cfe4880) and times its backward beside today's.

Prints a table and writes JSON. Speed is measured here, never asserted in a test. Nothing else
should run at the same time.
"""

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def layouts(n: int, rng) -> dict:
    """name → (5n, 3) float32 stencil rows (sample k's rows are 5k .. 5k + 4)."""
    from taichi_neus.field.sdf_field import stencil
    off, _ = stencil("tetrahedral")
    n_rays = max(n // 32, 1)
    o = rng.uniform(-0.9, 0.9, (n_rays, 3))
    d = rng.normal(size=(n_rays, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    t = np.linspace(0.0, 0.03, 32)
    rays = (o[:, None] + t[None, :, None] * d[:, None]).reshape(-1, 3)[:n]
    uniform = rng.uniform(-0.9, 0.9, (n, 3))
    return {name: (c[:, None] + off[None] / 1024.0).reshape(-1, 3).astype(np.float32)
            for name, c in (("rays", rays), ("uniform", uniform))}


def alternate(fns: dict, repeats: int, sync) -> dict:
    """Least seconds of each callable, run in turn ``repeats`` times after one untimed call each."""
    for f in fns.values():
        f()
    sync()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            sync()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def kernels(grid, old, baseline: str, params, grads, X, dX, m: int, n_active: int, XJ=None, dXJ=None) -> dict:
    """name → callable running one kernel over the ``m`` rows of ``X`` with ``n_active`` levels on (and,
    given ``XJ``/``dXJ``, the analytic normal's forward and backward with the Jacobian over the m/5 samples)."""
    from taichi_neus.field import hash_grid
    cfg, lv_arrays = grid.cfg, grid._level_arrays()

    def lanes():
        hash_grid.hash_encode_forward_levels(X, m, 3, params, grid.slice.offset, *lv_arrays, cfg.bound,
                                             cfg.n_features, cfg.n_levels, hash_grid.lane_width(cfg.n_levels),
                                             n_active, 0)

    def per_level():
        hash_grid.hash_encode_forward(X, m, 3, params, grid.slice.offset, *lv_arrays, cfg.bound, cfg.n_features,
                                      n_active, 0)

    fns = {"forward, levels as lanes": lanes, "forward, one level at a time": per_level,
           "backward (table scatter)": lambda: grid.backward(X, dX, m, 3, grads, n_active)}
    if old is not None:
        fns[f"backward at {baseline}"] = lambda: old.backward(X, dX, m, 3, grads, n_active)
    if XJ is not None:
        fns["forward + Jacobian (samples)"] = lambda: grid.forward(XJ, m // 5, 3, params, n_active, jacobian=True)
        fns["backward + Jacobian (samples)"] = lambda: grid.backward(XJ, dXJ, m // 5, 3, grads, n_active,
                                                                      jacobian=True)
    return fns


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1 << 16, help="samples (rows: 5 per sample)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--baseline", default="", help="git revision whose hash-grid backward to time beside today's")
    ap.add_argument("--json", default=str(HERE / "results" / "hash_grid_throughput.json"))
    args = ap.parse_args(argv)

    import taichi as ti

    from taichi_neus import buffers, runtime
    runtime.init("cpu", verbose=False)
    from taichi_neus.field import hash_grid
    from taichi_neus.field.params import ParamLayout

    cfg = hash_grid.HashGridConfig()
    layout = ParamLayout()
    grid = hash_grid.HashGrid(cfg, layout)
    params = layout.allocate()
    grid.init_params(params, 0)
    host = buffers.to_numpy(params)
    host[:] = np.random.default_rng(1).normal(size=host.shape).astype(np.float32)  # trained-like, not 1e-4
    buffers.from_numpy(params, host)
    grads = layout.allocate()
    old = None
    if args.baseline:
        from field_throughput import _load_rev_module
        old_mod = _load_rev_module(args.baseline, "taichi_neus/field/hash_grid.py", "baseline_hash_grid")
        old = old_mod.HashGrid(old_mod.HashGridConfig(**vars(cfg)), ParamLayout())
    rng = np.random.default_rng(0)
    rows = {}
    for name, pts in layouts(args.n, rng).items():
        m = pts.shape[0]
        X = buffers.rows16_upload(np.concatenate([pts, np.zeros((m, cfg.out_dim), np.float32)], 1))
        up = np.concatenate([np.zeros((m, 3)), rng.normal(size=(m, cfg.out_dim))], 1).astype(np.float32)
        dX = buffers.rows16_upload(up)
        # the analytic normal's layout: sample k in row 4k (its stencil's centre row 5k), tangents in 4k + 1..3
        xj = np.zeros((4 * (m // 5), 3 + cfg.out_dim), np.float32)
        xj[0::4, :3] = pts[0::5]
        XJ = buffers.rows16_upload(xj)
        dXJ = buffers.rows16_upload(np.concatenate([np.zeros((xj.shape[0], 3)), rng.normal(
            size=(xj.shape[0], cfg.out_dim))], 1).astype(np.float32))
        for n_active in (cfg.n_levels, 10, 6):
            best = alternate(kernels(grid, old, args.baseline, params, grads, X, dX, m, n_active, XJ, dXJ),
                             args.repeats, ti.sync)
            cpus = os.cpu_count() or 1
            for k, s in best.items():
                rows.setdefault(f"{name}, {n_active} levels", {})[k] = {
                    "ms": round(s * 1e3, 2), "ns_per_level_lookup_per_core": round(s * cpus * 1e9 / (m * n_active), 1)}
    res = {"command": "python benchmarks/hash_grid_throughput.py " + " ".join(argv or sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M"), "n_samples": args.n, "rows": 5 * args.n,
           "machine": platform.machine(), "cpus": os.cpu_count(), "baseline": args.baseline or None, "cases": rows}
    kinds = list(next(iter(rows.values())).keys())
    print(f"hash grid, CPU, {args.n} samples × 5 stencil rows, least of {args.repeats} (ms)")
    print("| points, levels on | " + " | ".join(kinds) + " |")
    print("|---|" + "---:|" * len(kinds))
    for case, r in rows.items():
        print(f"| {case} | " + " | ".join(f"{r[k]['ms']:.1f}" for k in kinds) + " |")
    for case, r in rows.items():
        a, b = r["forward, levels as lanes"]["ms"], r["forward, one level at a time"]["ms"]
        line = f"{case}: forward {b / a:.2f}x faster with the levels as lanes"
        if old is not None:
            line += f"; backward {r[f'backward at {args.baseline}']['ms'] / r['backward (table scatter)']['ms']:.2f}x"
            line += f" against {args.baseline}"
        print(line)
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
