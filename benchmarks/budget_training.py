"""Training for a fixed wall-clock (or CPU-time) budget, shared by ``ablation.py`` and ``floaters.py``.

Comparing techniques that change the cost of a step (S3IM's torch loss, the samplers' host-side
bookkeeping) is only fair at equal time, not at equal steps. :class:`BudgetTrainer` runs the normal
:class:`taichi_neus.train.trainer.Trainer` step, but every schedule that is defined in steps (learning-rate
warm-up and cosine decay, cos-anneal, finite-difference ε, the quadtree's all-pixel phase, soft
mining's α warm-up) follows the elapsed fraction of the budget instead: the "virtual step" is
``cfg.train.iters × elapsed / budget``. So every run, fast or slow, goes through the whole schedule
and ends fully annealed. Step-count rules that are about the data, not the schedule (occupancy
refresh every k steps, the quadtree's refine-every-k-updates), stay on real steps.

Not a package module: the benchmark scripts import it from their own folder.
"""

import math
import os
import time

import numpy as np

from taichi_neus.train.trainer import Trainer


def _cpu_time() -> float:
    """CPU seconds of this process, all threads (Taichi's and torch's workers included)."""
    t = os.times()
    return t.user + t.system


class _VirtualStepSampler:
    """Wraps a pixel sampler so that ``update`` gets the trainer's virtual step."""

    def __init__(self, inner, trainer):
        self._inner, self._trainer = inner, trainer

    def update(self, view_ids, pix, errors, step):
        return self._inner.update(view_ids, pix, errors, self._trainer.virtual_step())

    def __getattr__(self, name):
        return getattr(self._inner, name)


class BudgetTrainer(Trainer):
    """A Trainer whose step-defined schedules run on the elapsed share of a time budget (module docstring).

    ``budget_s``: seconds of training-step time. ``clock``: ``"wall"`` (time.perf_counter) or ``"cpu"``
    (this process's CPU seconds, all threads; steadier on a shared machine, but on 2 threads it runs
    about twice as fast as the wall clock).
    """

    def __init__(self, scene, cfg, out_dir, budget_s: float, clock: str = "wall", log=lambda *a: None):
        super().__init__(scene, cfg, out_dir, log=log)
        if clock not in ("wall", "cpu"):
            raise ValueError(f"clock must be 'wall' or 'cpu', not {clock!r}")
        self.budget_s = float(budget_s)
        self.clock = clock
        self.pixels = _VirtualStepSampler(self.pixels, self)
        self.used_s = 0.0  # budget consumed (on the chosen clock)
        self.wall_s = 0.0
        self.cpu_s = 0.0

    def fraction(self) -> float:
        return min(1.0, self.used_s / self.budget_s) if self.budget_s > 0 else 1.0

    def virtual_step(self) -> int:
        return int(round(self.cfg.train.iters * self.fraction()))

    def schedules(self, step: int) -> dict:
        return super().schedules(self.virtual_step())

    def run(self, progress_every_s: float = 0.0, label: str = "") -> dict:
        """Train until the budget is used up. Returns steps, rays, samples and times."""
        steps = rays = samples = rejected = 0
        last_print = 0.0
        step_wall = []
        while self.used_s < self.budget_s:
            w0, c0 = time.perf_counter(), _cpu_time()
            st = self.train_step()
            dw, dc = time.perf_counter() - w0, _cpu_time() - c0
            self.wall_s += dw
            self.cpu_s += dc
            self.used_s += dw if self.clock == "wall" else dc
            step_wall.append(dw)
            self.train_time = self.wall_s
            steps += 1
            if st.get("rejected"):
                rejected += 1
                continue
            rays += int(st["rays"])
            samples += int(st["samples"])
            if progress_every_s and self.used_s - last_print >= progress_every_s:
                last_print = self.used_s
                print(f"  [{label}] {self.used_s:6.1f}/{self.budget_s:.0f} s  step {steps:5d}  "
                      f"loss {st['loss']:.4f}  psnr {st['psnr']:5.2f}  s {st['s']:.0f}", flush=True)
        # rays/s over the whole run is at the mercy of other processes on a shared machine (and of a
        # paused process); rays per CPU-second and the median step are steadier.
        med = float(np.median(step_wall)) if step_wall else float("nan")
        return {"steps": steps, "rejected_steps": rejected, "rays": rays, "samples": samples,
                "train_wall_s": self.wall_s, "train_cpu_s": self.cpu_s,
                "rays_per_s": rays / max(self.wall_s, 1e-9), "samples_per_s": samples / max(self.wall_s, 1e-9),
                "rays_per_cpu_s": rays / max(self.cpu_s, 1e-9), "median_step_ms": 1000 * med,
                "rays_per_s_median_step": rays / max(steps - rejected, 1) / med if step_wall else float("nan")}


def mean_std(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
