"""Two training steps on the built-in synthetic scene on the arch in argv[1]; writes the second step's
loss, per-parameter gradients and rendered colours, the parameters before the first step and after the second,
and the parameter groups' runs to argv[2] (.npz). Used by test_portability.py."""

import sys

import numpy as np

from taichi_neus import buffers, runtime

runtime.init(sys.argv[1], verbose=False)
sys.path.insert(0, __file__.rsplit("/", 2)[0])
from training_helpers import small_config  # noqa: E402

from taichi_neus.data import default_scene_path, load_dtu  # noqa: E402
from taichi_neus.train.trainer import Trainer  # noqa: E402

scene = load_dtu(default_scene_path())
cfg = small_config(iters=10)
cfg.train.sample_budget = 2048
tr = Trainer(scene, cfg, sys.argv[2] + ".run", log=lambda *a: None)
tr.keep_grads = True  # the second step's gradients stay readable after its update
params0 = buffers.to_numpy(tr.params).copy()
tr.train_step()
st = tr.train_step()
groups = {f"group_{g}": np.array(runs, np.int64) for g, runs in tr.layout.groups().items()}
np.savez(sys.argv[2], loss=np.float64(st["loss"]), samples=np.int64(st["samples"]),
         grads=buffers.to_numpy(tr.grads), params=buffers.to_numpy(tr.params), params0=params0,
         colour=tr.compositor._bufs["colour"].to_numpy(), **groups)
