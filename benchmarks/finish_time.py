"""Time of what a training run does after its last step: the mesh, the held-out evaluation at the
training resolution and at the figure's old half resolution, the result picture and the mesh's silhouette
IoU (``taichi_neus.app.cli.finish_run``, the stage ``metrics.json`` calls ``mesh_time_s``).

    python benchmarks/finish_time.py runs/scan24                       # this tree
    python benchmarks/finish_time.py runs/scan24 --baseline 550fafb    # and another commit, alternately

The run's latest checkpoint and ``config.json`` are copied into a temporary folder (nothing in the run
is touched), the trainer is loaded from them and ``finish_run`` is timed in a fresh process per round
(so each round compiles its render and mesh kernels, as the end of a real run partly does). With
``--baseline REV`` the commit is checked out into a temporary git worktree and the two are timed one
after the other, ``--rounds`` times. The metrics of both are printed beside the times: a change that
only makes the stage faster leaves them equal.

Prints a table and writes JSON (default ``benchmarks/results/finish_time.json``). Run it with nothing
else running.
"""

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from git_worktree import worktree  # noqa: E402

METRICS = ("heldout_psnr", "heldout_psnr_masked", "heldout_psnr_half_res", "heldout_mesh_mask_iou", "mesh_faces")


def time_once(run: pathlib.Path, arch: str) -> dict:
    """``finish_run`` on a copy of ``run``'s latest checkpoint, in this process: seconds and metrics."""
    from taichi_neus.app import cli
    from taichi_neus.app.results import load_run

    ckpts = sorted((run / "checkpoints").glob("ckpt_*.npz"))
    if not ckpts or not (run / "config.json").is_file():
        sys.exit(f"{run} has no checkpoints/ckpt_*.npz or config.json: give a run folder 'taichi-neus train' wrote.")
    with tempfile.TemporaryDirectory() as tmp:
        copy = pathlib.Path(tmp) / "run"
        (copy / "checkpoints").mkdir(parents=True)
        shutil.copy(run / "config.json", copy / "config.json")
        shutil.copy(ckpts[-1], copy / "checkpoints" / ckpts[-1].name)
        _, _, tr = load_run(copy, arch)
        t0 = time.perf_counter()
        m = cli.finish_run(tr, {}, time.time())
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "step": tr.step, **{k: m.get(k) for k in METRICS}}


def in_subprocess(run: pathlib.Path, arch: str, pythonpath: pathlib.Path) -> dict:
    """:func:`time_once` in a fresh interpreter that imports taichi_neus from ``pythonpath``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "one.json"
        subprocess.run([sys.executable, str(HERE / "finish_time.py"), str(run), "--arch", arch, "--one", str(out)],
                       check=True, env={**os.environ, "PYTHONPATH": str(pythonpath)})
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run folder (checkpoints/ and config.json)")
    ap.add_argument("--arch", default="cpu")
    ap.add_argument("--baseline", default="", help="git revision to time alternately with this tree")
    ap.add_argument("--rounds", type=int, default=1, help="with --baseline: this many alternating pairs")
    ap.add_argument("--json", default=str(HERE / "results" / "finish_time.json"))
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: one timing into this JSON file
    a = ap.parse_args()
    run = pathlib.Path(a.run).resolve()
    if a.one:
        pathlib.Path(a.one).write_text(json.dumps(time_once(run, a.arch)))
        return
    rows = {"this tree": []}
    with contextlib.ExitStack() as stack:
        if a.baseline:
            wt, sha = stack.enter_context(worktree(a.baseline))
            rows[f"{a.baseline} ({sha})"] = []
        for _ in range(max(a.rounds, 1) if a.baseline else 1):
            if a.baseline:
                rows[f"{a.baseline} ({sha})"].append(in_subprocess(run, a.arch, wt))
            rows["this tree"].append(in_subprocess(run, a.arch, HERE.parent))
    print(f"\nafter-training stage of {run} (step {rows['this tree'][0]['step']}), arch={a.arch}")
    print("| code | seconds (median, range) | " + " | ".join(METRICS) + " |")
    print("|---|---:|" + "---:|" * len(METRICS))
    for name, rs in rows.items():
        secs = [r["seconds"] for r in rs]
        print(f"| {name} | {statistics.median(secs):.1f} ({min(secs):.1f}–{max(secs):.1f}) | "
              + " | ".join(f"{rs[0][k]:.4f}" if isinstance(rs[0][k], float) else str(rs[0][k]) for k in METRICS)
              + " |")
    out = {"command": " ".join(sys.argv), "run": str(run), "arch": a.arch, "date": time.strftime("%Y-%m-%d %H:%M"),
           "rows": rows}
    pathlib.Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
