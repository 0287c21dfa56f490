"""Gradient-scaling hook: per-sample gradients are multiplied by exactly the rule's scale."""

import numpy as np
import pytest
import taichi as ti

from taichi_neus import buffers
from taichi_neus.errors import UserInputError
from taichi_neus.render.grad_scaling import GradScaling

CAP, N = 64, 50  # capacity and number of valid samples


def make_grads(seed=0):
    rng = np.random.default_rng(seed)
    g = dict(sdf=rng.normal(size=CAP), normal=rng.normal(size=(CAP, 3)), rgb=rng.normal(size=(CAP, 3)))
    t = rng.uniform(0.05, 3.0, CAP)
    return g, t


def apply(hook, g, t):
    bufs = {k: buffers.upload(v) for k, v in g.items()}
    hook.apply(bufs["sdf"], bufs["normal"], bufs["rgb"], buffers.upload(t), N)
    return {k: v.to_numpy() for k, v in bufs.items()}


def check_scaled(out, g, scale):
    full = np.ones(CAP)
    full[:N] = scale[:N]
    np.testing.assert_allclose(out["sdf"], g["sdf"] * full, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(out["normal"], g["normal"] * full[:, None], rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(out["rgb"], g["rgb"] * full[:, None], rtol=2e-6, atol=1e-7)


@pytest.mark.portable
def test_paper_rule():
    g, t = make_grads()
    sigma = 1.3
    out = apply(GradScaling("paper", sigma=sigma), g, t)
    scale = np.minimum(1.0, t.astype(np.float32).astype(np.float64) ** 2 / sigma**2)
    assert (scale[:N] < 1).any() and (scale[:N] == 1).any()
    check_scaled(out, g, scale)


@pytest.mark.portable
def test_none_is_identity():
    g, t = make_grads(1)
    out = apply(GradScaling("none"), g, t)
    check_scaled(out, g, np.ones(CAP))


@pytest.mark.portable
def test_custom_numpy_callable():
    g, t = make_grads(2)
    out = apply(GradScaling(lambda d: np.exp(-d)), g, t)
    check_scaled(out, g, np.exp(-t.astype(np.float32).astype(np.float64)))


@ti.func
def linear_ramp(d, sigma):
    return ti.min(1.0, d / sigma)


@pytest.mark.portable
def test_custom_ti_func():
    g, t = make_grads(3)
    out = apply(GradScaling(linear_ramp, sigma=2.0), g, t)
    check_scaled(out, g, np.minimum(1.0, t.astype(np.float32).astype(np.float64) / 2.0))


def test_bad_rules_are_user_errors():
    with pytest.raises(UserInputError):
        GradScaling("quadratic")
    with pytest.raises(UserInputError):
        GradScaling("paper", sigma=0.0)
    g, t = make_grads(4)
    with pytest.raises(UserInputError):
        apply(GradScaling(lambda d: np.ones(3)), g, t)
