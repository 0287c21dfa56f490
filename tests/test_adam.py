import numpy as np
import pytest
import torch

from taichi_neus import buffers
from taichi_neus.field.params import ParamLayout
from taichi_neus.train.adam import Adam

pytestmark = pytest.mark.portable


def test_adam_matches_torch_with_groups():
    layout = ParamLayout()
    layout.add("a", (50,), "g1")
    layout.add("b", (7, 3), "g2")
    layout.add("c", (5,), "g1")
    params, grads = layout.allocate(), layout.allocate()
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=layout.total).astype(np.float32)
    buffers.from_numpy(params, p0)
    opt = Adam(layout, {"g1": (1e-2, 0.0), "g2": (3e-3, 0.1)}, betas=(0.9, 0.99), eps=1e-8)
    tp = {k: torch.tensor(layout.view(p0.astype(np.float64), k).copy(), requires_grad=True) for k in "abc"}
    topt = torch.optim.AdamW([{"params": [tp["a"], tp["c"]], "lr": 1e-2, "weight_decay": 0.0},
                              {"params": [tp["b"]], "lr": 3e-3, "weight_decay": 0.1}], betas=(0.9, 0.99), eps=1e-8)
    for step in range(5):
        g = rng.normal(size=layout.total).astype(np.float32)
        buffers.from_numpy(grads, g)
        opt.step(params, grads, lr_scale=0.5 if step == 4 else 1.0)
        for grp in topt.param_groups:
            grp["lr"] = (1e-2 if grp["weight_decay"] == 0 else 3e-3) * (0.5 if step == 4 else 1.0)
        for k in "abc":
            tp[k].grad = torch.tensor(layout.view(g.astype(np.float64), k).copy())
        topt.step()
    got = buffers.to_numpy(params).astype(np.float64)
    for k in "abc":
        np.testing.assert_allclose(layout.view(got, k), tp[k].detach().numpy(), rtol=1e-5, atol=1e-6)
