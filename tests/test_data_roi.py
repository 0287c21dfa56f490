"""Region of interest -> unit sphere: frusta, points and masks against analytic cases."""

import numpy as np
import pytest

from taichi_neus.data import roi
from taichi_neus.data.cameras import camera_to_world
from taichi_neus.data.synthetic import look_at
from taichi_neus.errors import UserInputError


def ring(n, radius, target=(0.0, 0.0, 0.0), elevation=0.3):
    c2w = []
    for i in range(n):
        a = 2 * np.pi * i / n
        centre = np.asarray(target) + radius * np.array([np.cos(a), -elevation, np.sin(a)])
        c2w.append(camera_to_world(*look_at(centre, target)))
    return np.stack(c2w)


def test_frusta_centre_and_inscribed_radius():
    """Cameras at distance D looking at c through a square image of half-angle t: the largest sphere
    around c that each camera sees whole has radius D sin t."""
    target = np.array([1.0, -2.0, 0.5])
    c2w = ring(8, 4.0, target)
    D = np.linalg.norm(c2w[0, :3, 3] - target)
    W = H = 64
    f = 80.0
    K = np.broadcast_to(np.array([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]]), (8, 3, 3))
    r = roi.from_frusta(K, c2w, W, H, "test")
    np.testing.assert_allclose(r.centre, target, atol=1e-9)
    assert r.radius == pytest.approx(D * np.sin(np.arctan(W / 2 / f)), rel=1e-9)
    S = r.scale_mat()
    np.testing.assert_allclose(S @ [0, 0, 0, 1], [*target, 1])
    np.testing.assert_allclose(S @ [1, 0, 0, 1], [target[0] + r.radius, *target[1:], 1])
    unit = roi.to_unit(c2w, r)
    np.testing.assert_allclose(np.linalg.norm(unit[:, :3, 3], axis=1), D / r.radius)
    roi.check_cameras_see_sphere(K, unit, W, H, "test")


def test_frusta_refuses_parallel_cameras():
    c2w = np.stack([np.eye(4)] * 4)
    c2w[:, 0, 3] = np.arange(4)  # a row of cameras all looking along +z
    K = np.broadcast_to(np.array([[50.0, 0, 32], [0, 50, 32], [0, 0, 1]]), (4, 3, 3))
    with pytest.raises(UserInputError, match="parallel"):
        roi.from_frusta(K, c2w, 64, 64, "cams.txt")


def test_points_are_robust_to_outliers_and_capped_by_cameras():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(5000, 3))
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)  # the unit sphere's surface
    pts = np.concatenate([pts + [3.0, 0, 0], rng.uniform(-100, 100, (20, 3))])  # + 0.4 % far outliers
    c2w = ring(6, 10.0, (3.0, 0.0, 0.0))
    r = roi.from_points(pts, c2w, "p")
    np.testing.assert_allclose(r.centre, [3, 0, 0], atol=0.05)
    assert 1.05 < r.radius < 1.15  # 1.1 x the 99th-percentile distance (~1.0)
    near = ring(6, 1.0, (3.0, 0.0, 0.0))
    r = roi.from_points(pts, near, "p")
    assert "capped" in r.detail and r.radius == pytest.approx(
        0.9 * np.linalg.norm(near[:, :3, 3] - r.centre, axis=1).min())


def test_masks_visual_hull_of_a_sphere():
    """Masks of a ball of radius 0.5 at c: the hull's sphere holds the ball and is not much larger.

    Six views per ring leave the hull's corners ~0.5 / cos 30° = 0.58 out, plus a voxel and the
    masks' dilation (~0.06 each); times the 1.1 margin: measured 0.79."""
    c = np.array([0.3, 0.1, -0.2])
    c2w = np.concatenate([ring(6, 3.0, c, 0.9), ring(6, 3.0, c, 0.0), ring(6, 3.0, c, -0.9)])
    n = len(c2w)
    W = H = 48
    K = np.broadcast_to(np.array([[60.0, 0, 24], [0, 60.0, 24], [0, 0, 1]]), (n, 3, 3))
    masks = np.zeros((n, H, W), np.uint8)
    ys, xs = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    for v in range(n):
        d = np.stack([(xs - 24) / 60, (ys - 24) / 60, np.ones_like(xs)], -1) @ c2w[v, :3, :3].T
        d /= np.linalg.norm(d, axis=-1, keepdims=True)
        oc = c2w[v, :3, 3] - c
        b = d @ oc
        masks[v] = np.where(b * b - (oc @ oc - 0.25) > 0, 255, 0)
    r = roi.from_masks(K, c2w, masks, "masks/")
    assert np.linalg.norm(r.centre - c) < 0.05
    assert 0.5 * 1.1 <= r.radius < 0.85, r.radius
    with pytest.raises(UserInputError, match="no common foreground"):
        roi.from_masks(K, c2w, np.roll(masks, 20, axis=2) * (np.arange(n) % 2 == 0)[:, None, None], "masks/")


def test_given_sphere():
    c2w = ring(4, 5.0)
    r = roi.given((0, 0, 0, 1.5), c2w, "x")
    assert r.method == "option --data.roi" and r.radius == 1.5
    with pytest.raises(UserInputError, match="contains a camera"):
        roi.given((0, 0, 0, 6.0), c2w, "x")
    with pytest.raises(UserInputError, match="radius > 0"):
        roi.given((0, 0, 0, -1), c2w, "x")
