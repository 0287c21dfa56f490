"""Training throughput: samples and rays per second of the default configuration, with the time of one
step broken down by stage.

    python benchmarks/step_throughput.py                                   # built-in scene (+ scan24 ¼ if present)
    python benchmarks/step_throughput.py --steps 100 --baseline 14bf453    # also time another commit, same run
    python benchmarks/step_throughput.py --variant field.normal_mode=analytic   # defaults, then a variant, same run

Each scene is loaded, a trainer with the default configuration (the one ``taichi-neus train`` uses)
runs ``--warmup`` steps (compilation, occupancy warm-up, the ray count settling; half-way through them
the step count jumps to ``--progress`` of the run, 0.5 by default, so the timed steps see a mid-run's
schedules: the hash levels on, ε, the learning rate), then ``--steps``
timed steps. Stages are timed by wrapping the trainer's own calls (nothing in the package is
changed for this): pixel sampling and ray set-up, occupancy-grid refresh, ray marching (coarse SDF
samples and fine-sample placement), field forward, compositing (with the background model when
one is used), losses, backward passes (compositing, gradient hook, field, background), the
optimiser step; "host and other" is the rest of the step (the NaN check, gradient zeroing,
uploads, bookkeeping). Calls nested inside a timed call count once, to the outer stage. A second table
gives each stage's cores busy (the process's CPU time over the stage's wall time): a stage near 1 on a
2-core machine runs on one core.

``--baseline REV`` checks REV out into a temporary git worktree and runs this same script there in
a subprocess, one after the other on the same machine, so the ratio is measured side by side.
Stages that REV's trainer lacks are reported as missing.

``--rounds N`` (with ``--baseline``): REV and this tree are timed alternately N times, and the ratio is
reported as the median round's with the range over the rounds (this machine's speed drifts by 20% and
more within an hour: one pair can mislead). The first round's tables are printed; JSON keeps every round.

``--variant KEY=VALUE[,KEY=VALUE...]`` (repeatable): after the defaults, each scene is timed again with
those options changed (a fresh trainer), in the same process, one after the other.

Prints a table and writes JSON (default ``benchmarks/results/step_throughput.json``). Speed is
measured here, never asserted in a test. Run it with nothing else running.
"""

import argparse
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

SCAN24 = HERE.parent.parent / "shared" / "data" / "dtu_scan24"

STAGES = ["pixels+rays", "occupancy", "ray marching", "field fwd", "compositing", "losses", "backward",
          "optimiser", "host+other"]


def _import_trainer():
    """The Trainer and Config of whichever package layout is on the path (this commit's or an older one)."""
    try:
        from taichi_neus.train import losses
        from taichi_neus.train.config import Config
        from taichi_neus.train.trainer import Trainer
    except ImportError:  # the flat layout before the tree was split into stages
        from taichi_neus.config import Config
        from taichi_neus.trainer import Trainer

        from taichi_neus import losses
    return Trainer, Config, losses


class StageClock:
    """Wraps callables so their wall time (after a device sync) and the process's CPU time over it are added
    to a named stage; nested wrapped calls are counted once, in the outermost stage."""

    def __init__(self, sync):
        self.sync = sync
        self.seconds = {s: 0.0 for s in STAGES}
        self.cpu = {s: 0.0 for s in STAGES}
        self.missing: list[str] = []
        self._depth = 0

    def wrap(self, owner, attr: str, stage: str) -> None:
        fn = getattr(owner, attr, None)
        if fn is None:
            self.missing.append(f"{stage}: {type(owner).__name__}.{attr}")
            return
        clock = self

        def timed(*a, **k):
            if clock._depth:
                return fn(*a, **k)
            clock._depth += 1
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                clock.sync()
                clock.seconds[stage] += time.perf_counter() - t0
                clock.cpu[stage] += time.process_time() - c0
                clock._depth -= 1

        setattr(owner, attr, timed)


def instrument(tr, losses, clock: StageClock):
    clock.wrap(tr, "_batch", "pixels+rays")
    clock.wrap(tr.occupancy, "update", "occupancy")
    clock.wrap(tr.sampler, "sample", "ray marching")
    clock.wrap(tr.field, "forward", "field fwd")
    clock.wrap(tr.compositor, "forward", "compositing")
    if getattr(tr, "bg", None) is not None:
        clock.wrap(tr.bg, "forward", "compositing")
        clock.wrap(tr.bg, "backward", "backward")
    for name in ("colour_l1", "mask_bce", "eikonal"):
        clock.wrap(losses, name, "losses")
    if getattr(tr, "s3im", None) is not None:
        clock.wrap(tr.s3im, "loss_and_grad", "losses")
    clock.wrap(tr.compositor, "backward", "backward")
    clock.wrap(tr.grad_scaling, "apply", "backward")
    clock.wrap(tr.field, "backward", "backward")
    clock.wrap(tr.opt, "step", "optimiser")


def parse_variant(text: str, Config) -> dict:
    """``'field.normal_mode=analytic,render.n_fine=16'`` → {key: value typed as the option's default}."""
    from taichi_neus.train.config import get_value
    out = {}
    for item in filter(None, text.split(",")):
        key, _, raw = item.partition("=")
        tp = type(get_value(Config(), key))
        out[key] = (raw.lower() in ("1", "true", "yes")) if tp is bool else tp(raw)
    return out


def bench_scene(name: str, scene, args, variant: dict | None = None) -> dict:
    import taichi as ti

    Trainer, Config, losses = _import_trainer()
    cfg = Config()
    if variant:
        from taichi_neus.train.config import set_value
        for k, v in variant.items():
            set_value(cfg, k, v)
        name = f"{name} [{','.join(f'{k}={v}' for k, v in variant.items())}]"
    cfg.train.seed = args.seed
    cfg.train.iters = max(cfg.train.iters, args.warmup + args.steps)
    cfg.train.val_every = cfg.train.ckpt_every = 0
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(scene, cfg, pathlib.Path(tmp) / "run", log=lambda *a: None)
        half = args.warmup // 2
        for i in range(args.warmup):
            if i == half and args.progress > 0:
                # the schedules (hash levels on, ε, learning rate) of a run ``progress`` of the way through,
                # so the step is timed as most of a run sees it, not as its first coarse-level steps
                tr.step = max(tr.step, int(args.progress * cfg.train.iters))
            tr.train_step()
        ti.sync()
        clock = StageClock(ti.sync)
        saved = {n: getattr(losses, n) for n in ("colour_l1", "mask_bce", "eikonal")}
        instrument(tr, losses, clock)
        rays = samples = 0
        cpu0, t0 = time.process_time(), time.perf_counter()
        try:
            for _ in range(args.steps):
                st = tr.train_step()
                rays += int(st.get("rays", 0))
                samples += int(st.get("samples", 0))
            ti.sync()
        finally:
            for n, f in saved.items():  # the losses module is shared by every trainer in this process
                setattr(losses, n, f)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        # before the kernel pass, whose steps the clock would add
        stage_s, stage_cpu = dict(clock.seconds), dict(clock.cpu)
        kernels = kernel_times(tr, args.kernels) if args.kernels > 0 else None
    timed = sum(v for k, v in stage_s.items() if k != "host+other")
    stage_s["host+other"] = max(wall - timed, 0.0)
    stage_cpu["host+other"] = max(cpu - sum(v for k, v in stage_cpu.items() if k != "host+other"), 0.0)
    return {"kernels_ms_per_step": kernels,
            "scene": name, "steps": args.steps, "warmup": args.warmup, "progress": args.progress,
            "levels": tr.schedules(tr.step).get("levels") if hasattr(tr, "schedules") else None,
            "wall_s": wall, "cpu_s": cpu,
            "rays_per_s": rays / wall, "samples_per_s": samples / wall, "rays_per_step": rays / args.steps,
            "samples_per_ray": samples / max(rays, 1),
            "stage_ms_per_step": {k: 1e3 * v / args.steps for k, v in stage_s.items()},
            # CPU seconds over wall seconds of each stage: how many cores it kept busy (2 = both, here)
            "stage_cores": {k: stage_cpu[k] / stage_s[k] if stage_s[k] > 0 else 0.0 for k in stage_s},
            "missing_stages": clock.missing}


def kernel_times(tr, steps: int, top: int = 25) -> dict:
    """Per Taichi kernel: ms per step and launches per step over ``steps`` more training steps, each
    launch followed by a sync (so launches no longer overlap host work: these add up to more than a
    step's time above, and they are not part of it). The ``top`` kernels by time, each with its cores busy
    (CPU over wall time of its launches: a loop of a few hundred iterations runs on one core, and each launch
    carries ~0.25 ms of single-threaded Python and thread-pool set-up), and ``(outside kernels)``: the
    synced steps' time between launches (Python, numpy, torch) with the launches per step."""
    import collections

    import taichi as ti
    from taichi.lang import kernel_impl

    orig = kernel_impl.Kernel.launch_kernel
    secs, cpu, calls = collections.defaultdict(float), collections.defaultdict(float), collections.Counter()

    def timed(self, *a, **k):
        t0, c0 = time.perf_counter(), time.process_time()
        r = orig(self, *a, **k)
        ti.sync()
        secs[self.func.__name__] += time.perf_counter() - t0
        cpu[self.func.__name__] += time.process_time() - c0
        calls[self.func.__name__] += 1
        return r

    kernel_impl.Kernel.launch_kernel = timed
    t0 = time.perf_counter()
    try:
        for _ in range(steps):
            tr.train_step()
    finally:
        kernel_impl.Kernel.launch_kernel = orig
    wall = time.perf_counter() - t0
    ranked = sorted(secs, key=secs.get, reverse=True)[:top]
    out = {k: {"ms_per_step": round(1e3 * secs[k] / steps, 3), "launches_per_step": calls[k] / steps,
               "cores": round(cpu[k] / secs[k], 2) if secs[k] > 0 else 0.0} for k in ranked}
    # the step's time outside every kernel (Python, torch, launch set-up), these steps being synced per launch
    out["(outside kernels)"] = {"ms_per_step": round(1e3 * (wall - sum(secs.values())) / steps, 3),
                                "launches_per_step": sum(calls.values()) / steps, "cores": None}
    return out


def load_scenes(args) -> list:
    from taichi_neus.data.dtu import load_dtu
    from taichi_neus.data.loader import load_scene
    from taichi_neus.data.synthetic import default_scene_path

    scenes = [("built-in", load_dtu(default_scene_path()))]
    scan = pathlib.Path(args.scan24)
    if args.scan24 and (scan / "cameras_sphere.npz").is_file():
        scenes.append((f"scan24 /{args.downscale}", load_scene(str(scan), downscale=args.downscale)))
    elif args.scan24:
        print(f"note: {scan} not found, scan24 skipped", file=sys.stderr)
    return scenes


def run_here(args, scenes=None) -> list[dict]:
    from taichi_neus import runtime

    runtime.init(args.arch, verbose=False)
    Config = _import_trainer()[1]
    variants = [None] + [parse_variant(v, Config) for v in getattr(args, "variant", None) or []]
    scenes = load_scenes(args) if scenes is None else scenes
    return [bench_scene(name, scene, args, var) for name, scene in scenes for var in variants]


class Baseline:
    """Commit ``rev`` checked out in a temporary worktree; :meth:`run` times it with this script in a
    subprocess (as often as asked: the worktree is made once)."""

    def __init__(self, rev: str, args):
        self.rev, self.args = rev, args
        self._tmp = tempfile.TemporaryDirectory()
        self._worktree = worktree(rev)
        self.wt, self.sha = self._worktree.__enter__()

    def run(self) -> dict:
        a = self.args
        out = pathlib.Path(self._tmp.name) / "baseline.json"
        cmd = [sys.executable, str(HERE / "step_throughput.py"), "--steps", str(a.steps), "--warmup",
               str(a.warmup), "--progress", str(a.progress), "--arch", a.arch, "--seed", str(a.seed),
               "--scan24", a.scan24, "--downscale", str(a.downscale), "--json", str(out)]
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(self.wt)})
        return {"rev": self.rev, "commit": self.sha, "results": json.loads(out.read_text())["results"]}

    def close(self) -> None:
        self._worktree.__exit__(None, None, None)
        self._tmp.cleanup()


def sample_ratios(results: list[dict], baseline: list[dict]) -> dict:
    """{scene (with its variant): samples/s against the baseline's same scene}."""
    ratios = {}
    for new in results:  # a variant ("scan24 /4 [key=value]") against the baseline's same scene
        old = next((o for o in baseline if new["scene"].split(" [")[0] == o["scene"]), None)
        if old:
            ratios[new["scene"]] = new["samples_per_s"] / old["samples_per_s"]
    return ratios


def table(results: list[dict], title: str) -> str:
    lines = [f"\n{title}",
             "| scene | rays/s | samples/s | rays/step | samples/ray | " + " | ".join(STAGES) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(STAGES)]
    for r in results:
        ms = r["stage_ms_per_step"]
        lines.append(f"| {r['scene']} | {r['rays_per_s']:.0f} | {r['samples_per_s']:.0f} | {r['rays_per_step']:.0f} "
                     f"| {r['samples_per_ray']:.1f} | " + " | ".join(f"{ms[s]:.1f}" for s in STAGES) + " |")
    lines.append("(stage columns: ms per step)")
    if all("stage_cores" in r for r in results):
        lines += ["", "| scene | whole step | " + " | ".join(STAGES) + " |", "|---|---:|" + "---:|" * len(STAGES)]
        for r in results:
            c = r["stage_cores"]
            lines.append(f"| {r['scene']} | {r['cpu_s'] / r['wall_s']:.2f} | "
                         + " | ".join(f"{c[s]:.2f}" for s in STAGES) + " |")
        lines.append("(cores busy: the process's CPU time over the wall time of each stage)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="timed steps per scene")
    ap.add_argument("--warmup", type=int, default=30, help="untimed steps first (compilation, occupancy)")
    ap.add_argument("--progress", type=float, default=0.5,
                    help="time the steps at this share of a run (its schedules: hash levels, ε, lr); 0: at the start")
    ap.add_argument("--arch", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scan24", default=str(SCAN24), help="DTU scan24 folder ('' to skip)")
    ap.add_argument("--downscale", type=int, default=4)
    ap.add_argument("--kernels", type=int, default=0,
                    help="after the timed steps, this many more with every Taichi kernel timed (synced; not in the "
                         "step figures), the top 25 per scene with their cores busy (noisy under ~1 ms) and the time "
                         "outside every kernel, in the table and JSON")
    ap.add_argument("--baseline", default="", help="git revision to time side by side (before this commit's run)")
    ap.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="also time the scenes with these options changed (repeatable)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with --baseline: time the baseline and this tree alternately this many times and report "
                         "the median ratio and its range (on a machine whose speed drifts, one pair can be 20%% off)")
    ap.add_argument("--json", default=str(HERE / "results" / "step_throughput.json"))
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    res = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "args": vars(args)}
    if args.baseline:
        base = Baseline(args.baseline, args)
        try:
            scenes, rounds = None, []
            for i in range(args.rounds):
                if args.rounds > 1:
                    print(f"round {i + 1}/{args.rounds}: baseline {args.baseline}, then this tree", flush=True)
                b = base.run()
                if scenes is None:
                    scenes = load_scenes(args)
                here = run_here(args, scenes)
                rounds.append({"baseline": b, "results": here,
                               "samples_per_s_ratio": sample_ratios(here, b["results"])})
        finally:
            base.close()
        res["baseline"], res["results"] = rounds[0]["baseline"], rounds[0]["results"]
        if args.rounds > 1:
            res["rounds"] = rounds
    else:
        res["results"] = run_here(args)
    print(table(res["results"], f"this tree, arch={args.arch}, {res['cpus']} CPUs, {args.steps} steps"))
    for r in res["results"]:
        if r.get("kernels_ms_per_step"):
            print(f"\n{r['scene']}: Taichi kernels over {args.kernels} more steps, each launch synced (ms per step, "
                  "launches per step, cores busy)")
            for k, v in r["kernels_ms_per_step"].items():
                cores = "" if v.get("cores") is None else f"{v['cores']:5.2f}"
                print(f"  {v['ms_per_step']:8.2f}  {v['launches_per_step']:5.1f}  {cores:>5}  {k}")
    if args.baseline:
        b = res["baseline"]
        print(table(b["results"], f"baseline {b['rev']} ({b['commit']})"))
        if args.rounds == 1:
            ratios = sample_ratios(res["results"], b["results"])
            for scene, r in ratios.items():
                print(f"  {scene}: samples/s x{r:.2f} against {b['commit']}")
        else:  # the median round's ratio, and the range over the rounds
            per = {k: [r["samples_per_s_ratio"][k] for r in rounds] for k in rounds[0]["samples_per_s_ratio"]}
            ratios = {k: statistics.median(v) for k, v in per.items()}
            res["samples_per_s_ratio_range"] = {k: [min(v), max(v)] for k, v in per.items()}
            for k, v in per.items():
                print(f"  {k}: samples/s x{ratios[k]:.2f} against {b['commit']} (median of {len(v)} rounds; "
                      f"range {min(v):.2f}-{max(v):.2f}: " + ", ".join(f"{x:.2f}" for x in v) + ")")
        res["samples_per_s_ratio"] = ratios
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
