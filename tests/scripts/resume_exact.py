"""An interrupted and resumed run against an uninterrupted one, on one CPU thread (argv[1]: output .npz).

With one thread Taichi's atomic float adds run in a fixed order, so a run is bit-reproducible and the resumed
run must end bit-identical to the uninterrupted one. (With several threads the hash-grid gradients sum in a
different order every run and two uninterrupted runs already differ; Adam then amplifies that.)

For each pixel sampler: run A trains ``ITERS`` steps; run B stops after ``STOP`` steps (the checkpoint the
trainer writes when stopped), then a new Trainer loads it and trains to ``ITERS``. Both runs see one poisoned
batch at step ``POISON`` (rejected: learning-rate factor halved) so the divergence guard's state crosses the
interruption too. Writes, per sampler, both runs' parameters, Adam moments and sampler state.
"""

import sys

import numpy as np

from taichi_neus import runtime

runtime.init("cpu", verbose=False, cpu_max_num_threads=1)
sys.path.insert(0, __file__.rsplit("/", 2)[0])
from training_helpers import small_config  # noqa: E402

from taichi_neus.data import default_scene_path, load_dtu  # noqa: E402
from taichi_neus.train.trainer import Trainer  # noqa: E402

ITERS, STOP, POISON = 64, 29, 10
SAMPLERS = sys.argv[2].split(",") if len(sys.argv) > 2 else ["uniform", "quadtree", "soft_mining"]


def trainer(scene, sampler, out):
    cfg = small_config(iters=ITERS)
    cfg.train.pixel_sampler = sampler
    cfg.train.ckpt_every = 1000  # only the checkpoints written at the stop and at the end
    cfg.train.log_every = 1000
    tr = Trainer(scene, cfg, out, log=lambda *a: None)
    if sampler == "quadtree":  # judge and split leaves before and after the interruption
        tr.pixels.refine_every, tr.pixels.min_rays = 8, 16
    real_batch = tr._batch

    def batch(n_rays):  # one corrupt batch (NaN colours): the step is rejected and the rate halved
        b = real_batch(n_rays)
        return (*b[:6], np.full_like(b[6], np.nan), *b[7:]) if tr.step == POISON else b

    tr._batch = batch
    return tr


def snapshot(tr) -> dict:
    st = tr.state()
    keep = {k: st[k] for k in ("params", "adam_m", "adam_v", "step", "lr_factor", "n_rays")}
    keep.update({k: v for k, v in st.items() if k.startswith("sampler.")})
    return keep


scene = load_dtu(default_scene_path())
out = {}
for name in SAMPLERS:
    a = trainer(scene, name, f"{sys.argv[1]}.{name}.a")
    a.fit()
    b = trainer(scene, name, f"{sys.argv[1]}.{name}.b")
    b.fit(callback=lambda tr, st: tr.step < STOP)  # stops (and writes a checkpoint) at step STOP
    assert b.step == STOP
    b2 = trainer(scene, name, f"{sys.argv[1]}.{name}.b")
    assert b2.resume_latest() == STOP
    assert b2.lr_factor == 0.5, b2.lr_factor
    b2.fit()
    for k, v in snapshot(a).items():
        out[f"{name}/a/{k}"] = v
    for k, v in snapshot(b2).items():
        out[f"{name}/b/{k}"] = v
np.savez(sys.argv[1], **out)
