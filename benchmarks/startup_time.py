"""Start-up time: a fresh process from its start to the end of its first training steps, with Taichi's
kernel cache cold and warm.

    python benchmarks/startup_time.py                              # this tree, 2 rounds
    python benchmarks/startup_time.py --baseline HEAD~1 --rounds 3 # also an older commit, alternately

Each measurement is a new Python process that imports the package, initialises Taichi on the CPU, loads
the built-in scene, builds a trainer with the default configuration (what ``taichi-neus train`` uses) and
runs ``--steps`` training steps; the first step compiles most of the kernels (field, ray marching,
compositing, losses, optimiser). The phases are timed inside the process (import, Taichi and the scene,
the trainer, the first step, the other steps) and the whole process from outside. "cold": a new, empty
offline cache (``TAICHI_NEUS_CACHE``), as on a fresh machine or in CI; "warm": that cache again, as a
user's second run. Taichi rebuilds each kernel's IR from its Python source in every process, warm cache or
not (the cache is keyed on that IR), so the warm figure is mostly that Python pass.

``--baseline REV`` checks REV out into a temporary git worktree and measures it the same way, alternating
with this tree ``--rounds`` times (this machine's speed drifts); ratios are the median round's, with their
range. Prints a table and writes JSON (default ``benchmarks/results/startup_time.json``). Run it with
nothing else running.
"""

import argparse
import contextlib
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from git_worktree import worktree  # noqa: E402

PHASES = ["import", "init+scene", "trainer", "first step", "other steps"]

# Runs in the child process, with the tree to time first on PYTHONPATH; prints one JSON line.
CHILD = r"""
import json, sys, tempfile, time
t0 = time.perf_counter()
from taichi_neus import runtime
from taichi_neus.data.loader import load_scene
from taichi_neus.train.config import Config
from taichi_neus.train.trainer import Trainer
t1 = time.perf_counter()
runtime.init("cpu", verbose=False)
scene = load_scene(sys.argv[1])
t2 = time.perf_counter()
cfg = Config()
cfg.train.iters, cfg.train.val_every, cfg.train.ckpt_every = 1000, 0, 0
tr = Trainer(scene, cfg, tempfile.mkdtemp(), log=lambda *a: None)
t3 = time.perf_counter()
tr.train_step()
t4 = time.perf_counter()
for _ in range(int(sys.argv[2]) - 1):
    tr.train_step()
t5 = time.perf_counter()
import taichi_neus
print(json.dumps({"package": taichi_neus.__file__, "import": t1 - t0, "init+scene": t2 - t1, "trainer": t3 - t2,
                  "first step": t4 - t3, "other steps": t5 - t4}))
"""


def measure(tree: pathlib.Path, scene: str, steps: int, cache: pathlib.Path) -> dict:
    """One fresh process of ``tree`` with the offline cache at ``cache``: its phases and its whole wall time (s)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "TAICHI_NEUS_CACHE": str(cache)}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, scene, str(steps)], env=env, capture_output=True, text=True,
                       cwd=tempfile.gettempdir())
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"the timed process failed:\n{p.stderr[-2000:]}")
    phases = json.loads(p.stdout.strip().splitlines()[-1])
    if not phases.pop("package").startswith(str(tree)):
        raise SystemExit(f"the timed process did not import the package from {tree}")
    return {"process_s": wall, **{k: phases[k] for k in PHASES}}


def time_tree(tree: pathlib.Path, scene: str, steps: int) -> dict:
    """Cold, then warm, for ``tree``, in a new cache folder of its own."""
    with tempfile.TemporaryDirectory() as cache:
        cold = measure(tree, scene, steps, pathlib.Path(cache))
        warm = measure(tree, scene, steps, pathlib.Path(cache))
    return {"cold": cold, "warm": warm}


def table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| tree | cache | whole process (s) | " + " | ".join(PHASES) + " |",
             "|---|---|---:|" + "---:|" * len(PHASES)]
    for name, r in rows:
        for cache in ("cold", "warm"):
            m = r[cache]
            lines.append(f"| {name} | {cache} | {m['process_s']:.1f} | " + " | ".join(f"{m[p]:.1f}" for p in PHASES)
                         + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2, help="training steps per process (the first compiles)")
    ap.add_argument("--rounds", type=int, default=2, help="measurements of each tree, alternating with the baseline")
    ap.add_argument("--baseline", default="", help="git revision to time alternately with this tree")
    ap.add_argument("--json", default=str(HERE / "results" / "startup_time.json"))
    args = ap.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        ap.error("--steps and --rounds must be at least 1")
    from taichi_neus.data import default_scene_path

    scene = str(default_scene_path())  # generated once here, so no timed process generates it
    here = HERE.parent
    rounds = []
    with worktree(args.baseline) if args.baseline else contextlib.nullcontext((None, None)) as (wt, sha):
        for i in range(args.rounds):
            rnd = {}
            if wt is not None:
                rnd["baseline"] = time_tree(wt, scene, args.steps)
            rnd["this tree"] = time_tree(here, scene, args.steps)
            rounds.append(rnd)
            print(f"round {i + 1}/{args.rounds}:\n" + table(list(rnd.items())), flush=True)
    out = {"machine": platform.machine(), "cpus": os.cpu_count(), "args": vars(args), "baseline_commit": sha,
           "this_commit": _head(), "rounds": rounds}
    if args.baseline:
        out["ratio"], out["ratio_range"] = {}, {}
        for cache in ("cold", "warm"):
            per = [r["baseline"][cache]["process_s"] / r["this tree"][cache]["process_s"] for r in rounds]
            out["ratio"][cache], out["ratio_range"][cache] = statistics.median(per), [min(per), max(per)]
            print(f"{cache} cache: the baseline's whole process over this tree's: {out['ratio'][cache]:.2f}x "
                  f"(median of {len(per)} rounds, range {min(per):.2f}-{max(per):.2f})")
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"JSON: {path}")
    return 0


def _head() -> str:
    p = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return p.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
