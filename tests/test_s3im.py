"""S3IM against a straightforward re-implementation with explicit loops over windows.

The reference below builds the virtual image pixel by pixel (repeat r's ray j at row j // W_p,
column r * W_p + j % W_p, zero padding around), visits every window position in Python loops
and accumulates the window-weighted moments tap by tap, all in float64 torch so that autograd
gives the reference gradient.
"""

import math

import numpy as np
import pytest
import torch

from taichi_neus.errors import UserInputError
from taichi_neus.train.s3im import S3IM


def reference_s3im(pred, target, index, *, kernel, stride, padding, patch_height, weight, window,
                   sigma=1.5):
    m, b = index.shape
    wp = b // patch_height
    height, width = patch_height + 2 * padding, m * wp + 2 * padding
    src = [[-1] * width for _ in range(height)]
    for r in range(m):
        for j in range(b):
            src[padding + j // wp][padding + r * wp + j % wp] = int(index[r, j])
    if window == "gaussian":
        taps = [math.exp(-((i - kernel // 2) ** 2) / (2 * sigma**2)) for i in range(kernel)]
    else:
        taps = [1.0] * kernel
    total = sum(taps)
    taps = [t / total for t in taps]
    zero = torch.zeros(3, dtype=torch.float64)
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for top in range(0, height - kernel + 1, stride):
        for left in range(0, width - kernel + 1, stride):
            mx = my = exx = eyy = exy = 0.0
            for a in range(kernel):
                for bb in range(kernel):
                    k = src[top + a][left + bb]
                    xv = pred[k] if k >= 0 else zero
                    yv = target[k] if k >= 0 else zero
                    w = taps[a] * taps[bb]
                    mx = mx + w * xv
                    my = my + w * yv
                    exx = exx + w * xv * xv
                    eyy = eyy + w * yv * yv
                    exy = exy + w * xv * yv
            vx, vy, cxy = exx - mx * mx, eyy - my * my, exy - mx * my
            values.append(((2 * mx * my + c1) * (2 * cxy + c2))
                          / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return weight * (1.0 - torch.stack(values).mean())


CONFIGS = [
    # the paper's code: Gaussian window, K = stride = 4, zero padding (K - 1) // 2 = 1
    dict(kernel=4, stride=4, repeats=3, patch_height=16, weight=1.0, window="gaussian", padding=None),
    # overlapping windows, odd kernel, box window, no padding, lambda != 1
    dict(kernel=3, stride=2, repeats=2, patch_height=8, weight=0.7, window="uniform", padding=0),
    # odd Gaussian kernel with padding 1 and a stride that leaves a remainder
    dict(kernel=5, stride=3, repeats=4, patch_height=8, weight=2.0, window="gaussian", padding=2),
]


def _batch(b, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    target = rng.random((b, 3))
    pred = np.clip(target + 0.2 * rng.standard_normal((b, 3)), 0, 1)
    return pred.astype(dtype), target.astype(dtype)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_value_and_gradient_match_loop_reference(cfg):
    b = cfg["patch_height"] * 16 if cfg["kernel"] == 4 else cfg["patch_height"] * 8
    s3im = S3IM(**cfg)
    pred, target = _batch(b, seed=1)
    seed = 1234
    loss, grad = s3im.loss_and_grad(pred, target, seed=seed)
    assert grad.dtype == np.float64 and grad.shape == pred.shape

    index = s3im.permutation(b, torch.Generator().manual_seed(seed))
    x = torch.tensor(pred, requires_grad=True)
    padding = (cfg["kernel"] - 1) // 2 if cfg["padding"] is None else cfg["padding"]
    ref = reference_s3im(x, torch.tensor(target), index.numpy(), kernel=cfg["kernel"],
                         stride=cfg["stride"], padding=padding, patch_height=cfg["patch_height"],
                         weight=cfg["weight"], window=cfg["window"])
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-12, abs=1e-14)
    assert 0.01 < loss / cfg["weight"] < 1.0  # a real, non-trivial loss
    np.testing.assert_allclose(grad, x.grad.numpy(), rtol=1e-9, atol=1e-14)
    assert np.abs(grad).max() > 1e-5


def test_torch_loss_is_the_same_function_and_gradchecks():
    s3im = S3IM(kernel=4, stride=4, repeats=2, patch_height=8, weight=1.0)
    pred, target = _batch(64, seed=2)
    x = torch.tensor(pred, requires_grad=True)
    y = torch.tensor(target)

    def f(p):
        return s3im.loss(p, y, torch.Generator().manual_seed(7))

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)
    loss, grad = s3im.loss_and_grad(pred, target, seed=7)
    value = f(x)
    value.backward()
    assert loss == pytest.approx(value.item(), rel=1e-12)
    np.testing.assert_allclose(grad, x.grad.numpy(), rtol=1e-10, atol=1e-15)


def test_float32_path_close_to_float64_at_paper_defaults():
    s3im = S3IM()  # K = 4, stride 4, M = 10, 64 x 64 patch, lambda = 1
    pred, target = _batch(4096, seed=3)
    loss64, grad64 = s3im.loss_and_grad(pred, target, seed=5)
    loss32, grad32 = s3im.loss_and_grad(pred.astype(np.float32), target.astype(np.float32), seed=5)
    assert grad32.dtype == np.float32 and grad32.shape == (4096, 3)
    assert loss32 == pytest.approx(loss64, rel=1e-5)
    scale = np.abs(grad64).max()
    assert np.abs(grad32 - grad64).max() < 1e-3 * scale
    # the virtual image of the paper: 64 rows, M * B / 64 = 640 columns
    index = s3im.permutation(4096, torch.Generator().manual_seed(0))
    assert s3im.virtual_image(torch.tensor(pred), index).shape == (1, 3, 64, 640)


def test_identical_inputs_give_zero_loss_and_zero_gradient():
    s3im = S3IM()
    _, target = _batch(4096, seed=4, dtype=np.float32)
    loss, grad = s3im.loss_and_grad(target, target, seed=0)
    assert abs(loss) < 1e-6
    assert np.abs(grad).max() < 1e-6
    t = torch.tensor(target)
    assert abs(s3im.loss(t, t, torch.Generator().manual_seed(1)).item()) < 1e-6


def test_permutations_repeat_zero_is_batch_order_and_others_are_permutations():
    s3im = S3IM(repeats=5)
    index = s3im.permutation(256, torch.Generator().manual_seed(0)).numpy()
    assert index.shape == (5, 256)
    np.testing.assert_array_equal(index[0], np.arange(256))
    for row in index[1:]:
        np.testing.assert_array_equal(np.sort(row), np.arange(256))
        assert (row != np.arange(256)).mean() > 0.9
    assert (index[1] != index[2]).any()
    again = s3im.permutation(256, torch.Generator().manual_seed(0)).numpy()
    np.testing.assert_array_equal(index, again)


def test_layout_places_repeats_side_by_side():
    s3im = S3IM(repeats=2, patch_height=2)
    values = torch.arange(8, dtype=torch.float64)[:, None].repeat(1, 3)  # ray i has value i
    index = torch.stack([torch.arange(8), torch.arange(8).flip(0)])
    img = s3im.virtual_image(values, index)[0, 0]
    expected = [[0, 1, 2, 3, 7, 6, 5, 4],
                [4, 5, 6, 7, 3, 2, 1, 0]]
    np.testing.assert_array_equal(img.numpy(), expected)


def test_weight_scales_loss_and_gradient():
    pred, target = _batch(512, seed=6)
    l1, g1 = S3IM(patch_height=16, weight=1.0).loss_and_grad(pred, target, seed=3)
    l3, g3 = S3IM(patch_height=16, weight=3.0).loss_and_grad(pred, target, seed=3)
    assert l3 == pytest.approx(3 * l1, rel=1e-12)
    np.testing.assert_allclose(g3, 3 * g1, rtol=1e-12)


def test_batch_size_not_multiple_of_patch_height_raises_value_error():
    s3im = S3IM()
    pred, target = _batch(4000, seed=7, dtype=np.float32)
    with pytest.raises(ValueError, match="multiple of patch_height"):
        s3im.loss_and_grad(pred, target, seed=0)
    with pytest.raises(UserInputError):
        s3im.loss(torch.tensor(pred), torch.tensor(target))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        S3IM(kernel=4, repeats=1, patch_height=64, padding=0).loss(torch.zeros(128, 3), torch.zeros(128, 3))
