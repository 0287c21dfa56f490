"""The floaters benchmark runs end to end on a tiny budget and writes the table and JSON it promises.

Its numbers are measured in benchmarks/ (never asserted here); this only guards the script against
breaking: the scene with each backdrop, both hooks, the measures in range.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("backdrop", ["environment", "room"])
def test_floaters_benchmark_smoke(tmp_path, backdrop):
    out = tmp_path / "floaters.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "floaters.py"), "--clock", "cpu", "--budget", "2",
           "--seeds", "0", "--init-radius", "0.2", "--train-views", "2", "--size", "24", "--rays", "128",
           "--progress", "0", "--background", backdrop, "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    d = json.loads(out.read_text())
    assert [r["grad_scaling"] for r in d["runs"]] == ["none", "paper"]
    for r in d["runs"]:
        assert r["steps"] >= 1
        for k in ("near20", "front", "near20_train"):
            assert 0.0 <= r[k] <= 1.0
        assert r["psnr"] > 0 and r["psnr_object"] > 0
    assert "| sphere r=0.2 | none |" in d["table"] and d["meta"]["args"]["background"] == backdrop


@pytest.mark.slow
def test_step_throughput_benchmark_smoke(tmp_path):
    """Every stage hook still finds the trainer call it wraps, and the stages add up to the step time."""
    out = tmp_path / "steps.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_throughput.py"), "--steps", "2", "--warmup", "1",
           "--scan24", "", "--kernels", "1", "--baseline", "HEAD", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    d = json.loads(out.read_text())
    (r,) = d["results"]
    # the baseline (HEAD, in a worktree) ran this script in its own process: its figure and the ratio to it
    (b,) = d["baseline"]["results"]
    assert b["scene"] == "built-in" and b["samples_per_s"] > 0 and d["baseline"]["rev"] == "HEAD"
    assert d["samples_per_s_ratio"]["built-in"] == pytest.approx(r["samples_per_s"] / b["samples_per_s"])
    assert "samples/s x" in res.stdout
    assert r["scene"] == "built-in" and r["missing_stages"] == []
    kernels = r["kernels_ms_per_step"]  # the per-kernel pass: the field's kernels are among those timed
    assert "hash_encode_forward_levels" in kernels and all(v["launches_per_step"] > 0 for v in kernels.values())
    outside = kernels.pop("(outside kernels)")  # the step's time between launches, and its launch count
    assert outside["ms_per_step"] >= 0 and outside["launches_per_step"] >= max(v["launches_per_step"]
                                                                             for v in kernels.values())
    # cores busy per kernel: threads of the pool still winding down from the launch before count in a launch of
    # a few microseconds, so only the heaviest kernel's figure is held to the machine's cores
    heaviest = max(kernels.values(), key=lambda v: v["ms_per_step"])
    assert all(v["cores"] >= 0 for v in kernels.values()) and heaviest["cores"] <= (os.cpu_count() or 1) + 0.5
    ms = r["stage_ms_per_step"]
    assert sum(ms.values()) == pytest.approx(1e3 * r["wall_s"] / r["steps"], rel=1e-6)
    for stage in ("ray marching", "field fwd", "backward", "optimiser"):
        assert ms[stage] > 0, stage
    assert r["samples_per_s"] > 0 and r["samples_per_ray"] > 1
    assert "| built-in |" in res.stdout
    # cores busy per stage: each at most the machine's cores (plus timer slack), and the stages' CPU time adds
    # up to the step's
    cores = r["stage_cores"]
    assert set(cores) == set(ms) and all(0 <= c <= (os.cpu_count() or 1) + 0.5 for c in cores.values())
    cpu_ms = sum(cores[k] * ms[k] for k in ms)
    assert cpu_ms == pytest.approx(1e3 * r["cpu_s"] / r["steps"], rel=1e-3)
    assert "cores busy" in res.stdout


def test_step_throughput_rounds_alternate_with_the_baseline(tmp_path, monkeypatch, capsys):
    """--rounds times the baseline and this tree alternately (the baseline first in each round); the ratio
    reported is the median of the rounds' own ratios, with their range, and every round is kept. The timed runs
    are stand-ins here (the smoke test above runs a real baseline); --rounds 0 is refused."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import step_throughput as st

    calls, speeds = [], {"baseline": [100.0, 100.0, 100.0], "here": [150.0, 300.0, 120.0]}

    def result(samples_per_s):
        return {"scene": "built-in", "samples_per_s": samples_per_s, "rays_per_s": samples_per_s / 32,
                "rays_per_step": 512, "samples_per_ray": 32.0, "wall_s": 1.0, "cpu_s": 1.5,
                "stage_ms_per_step": {k: 1.0 for k in st.STAGES}}

    class StandIn:
        def __init__(self, rev, args):
            self.rev = rev

        def run(self):
            calls.append("baseline")
            return {"rev": self.rev, "commit": "abc1234", "results": [result(speeds["baseline"][len(calls) // 2])]}

        def close(self):
            calls.append("closed")

    def run_here(args, scenes=None):
        calls.append("here")
        return [result(speeds["here"][len(calls) // 2 - 1])]

    monkeypatch.setattr(st, "Baseline", StandIn)
    monkeypatch.setattr(st, "run_here", run_here)
    monkeypatch.setattr(st, "load_scenes", lambda args: [])
    out = tmp_path / "rounds.json"
    assert st.main(["--scan24", "", "--baseline", "HEAD", "--rounds", "3", "--json", str(out)]) == 0
    assert calls == ["baseline", "here"] * 3 + ["closed"]
    d = json.loads(out.read_text())
    per = [r["samples_per_s_ratio"]["built-in"] for r in d["rounds"]]
    assert per == pytest.approx([1.5, 3.0, 1.2])
    assert d["samples_per_s_ratio"]["built-in"] == pytest.approx(1.5)  # the median, not the mean (1.9)
    assert d["samples_per_s_ratio_range"]["built-in"] == pytest.approx([1.2, 3.0])
    assert "median of 3 rounds" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:
        st.main(["--scan24", "", "--baseline", "HEAD", "--rounds", "0", "--json", str(out)])
    assert bad.value.code == 2 and "--rounds must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_refine_poses_unmasked_benchmark_smoke(tmp_path):
    """Both runs (the background's ray gradients off, then on) train, and the JSON holds the errors."""
    out = tmp_path / "unmasked.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "refine_poses_unmasked.py"), "--iters", "3", "--pose-start", "0",
           "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["pose_background"] for r in rows] == [False, True] and all(r["steps"] == 3 for r in rows)
    assert all(1.9 < r["rotation_deg_given"] < 2.1 and r["rotation_deg"] > 0 for r in rows)
    assert "| off (default) | 3 |" in res.stdout


@pytest.mark.slow
def test_hash_grid_throughput_benchmark_smoke(tmp_path):
    """Both point layouts, every level count, every kernel timed (the baseline and the analytic normal's Jacobian
    kernels included), JSON written."""
    out = tmp_path / "hash.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "hash_grid_throughput.py"), "--n", "256", "--repeats", "1",
           "--baseline", "HEAD", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    d = json.loads(out.read_text())
    assert sorted(d["cases"]) == sorted(f"{p}, {k} levels" for p in ("rays", "uniform") for k in (16, 10, 6))
    for case in d["cases"].values():
        assert len(case) == 6 and all(v["ms"] > 0 for v in case.values())  # incl. the two Jacobian kernels
    assert "faster with the levels as lanes" in res.stdout


def test_startup_time_benchmark_times_each_tree_cold_then_warm(tmp_path, monkeypatch):
    """benchmarks/startup_time.py's plumbing, with a stand-in for the timed process (a real one compiles for a
    minute): each tree's process imports the package from that tree, cold and warm share one new cache folder
    per tree and round, the ratio is the median round's, and bad counts are refused with exit status 2."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import startup_time

    stand_in = ("import json, os, sys, taichi_neus\n"
                "print(json.dumps({'package': taichi_neus.__file__, 'import': 0.1, 'init+scene': 0.1, 'trainer': 0.1,"
                " 'first step': float(len(os.listdir(os.environ['TAICHI_NEUS_CACHE']))), 'other steps': 0.1}))\n"
                "open(os.path.join(os.environ['TAICHI_NEUS_CACHE'], 'kernel'), 'w').close()\n")
    monkeypatch.setattr(startup_time, "CHILD", stand_in)
    out = tmp_path / "startup.json"
    assert startup_time.main(["--baseline", "HEAD", "--rounds", "3", "--steps", "1", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert len(d["rounds"]) == 3 and d["baseline_commit"] == d["this_commit"]
    for rnd in d["rounds"]:
        for tree in ("baseline", "this tree"):
            assert rnd[tree]["cold"]["first step"] == 0.0 and rnd[tree]["warm"]["first step"] == 1.0
    per = [r["baseline"]["warm"]["process_s"] / r["this tree"]["warm"]["process_s"] for r in d["rounds"]]
    assert d["ratio"]["warm"] == pytest.approx(sorted(per)[1])
    assert d["ratio_range"]["warm"] == pytest.approx([min(per), max(per)])
    with pytest.raises(SystemExit) as bad:
        startup_time.main(["--rounds", "0", "--json", str(out)])
    assert bad.value.code == 2
