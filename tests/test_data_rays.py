"""Rays: pixel-centre convention (project ray points back), batching, near/far on the sphere."""

import numpy as np
import pytest

from taichi_neus.data.cameras import camera_to_world, project, projection_matrix
from taichi_neus.data.rays import (
    image_pixels,
    image_rays,
    iter_image_rays,
    pixel_rays,
    unit_sphere_near_far,
)


def camera(seed):
    rng = np.random.default_rng(seed)
    K = np.array([[rng.uniform(80, 300), rng.uniform(-2, 2), rng.uniform(30, 70)],
                  [0.0, rng.uniform(80, 300), rng.uniform(20, 60)],
                  [0.0, 0.0, 1.0]])
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    R = q * np.sign(np.diag(r))
    R *= np.sign(np.linalg.det(R))
    t = rng.normal(size=3) + np.array([0.0, 0.0, 3.0])
    return K, R, t


def test_ray_points_project_back_to_the_pixel():
    K, R, t = camera(0)
    c2w = camera_to_world(R, t)
    rng = np.random.default_rng(1)
    pix = rng.uniform(0, 100, size=(500, 2))
    o, d = pixel_rays(K, c2w, pix)
    assert o.dtype == np.float32 and d.dtype == np.float32 and o.shape == d.shape == (500, 3)
    np.testing.assert_allclose(np.linalg.norm(d, axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(o, np.broadcast_to(-R.T @ t, (500, 3)), atol=1e-6)
    P = projection_matrix(K, R, t)
    for s in (0.5, 2.0, 7.0):
        uv, depth = project(P, o.astype(np.float64) + s * d.astype(np.float64))
        assert (depth > 0).all()
        np.testing.assert_allclose(uv, pix, atol=2e-3)  # float32 rays, pixels of ~1/200 rad


def test_pixel_centre_convention():
    # A camera at the origin looking down +z with K = [[f, 0, W/2], [0, f, H/2]]: the optical axis
    # passes through the corner shared by the four middle pixels, so the pixel (W/2, H/2) whose
    # centre is (W/2 + 0.5, H/2 + 0.5) has a ray half a pixel off the axis in x and y.
    W, H, f = 8, 6, 10.0
    K = np.array([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1.0]])
    pix = image_pixels(H, W)
    np.testing.assert_array_equal(pix[0], [0.5, 0.5])
    np.testing.assert_array_equal(pix[W + 2], [2.5, 1.5])  # row-major: k = row * W + col
    o, d = pixel_rays(K, np.eye(4), pix[[(H // 2) * W + W // 2]])
    np.testing.assert_allclose(d[0] / d[0, 2], [0.5 / f, 0.5 / f, 1.0], rtol=1e-6)
    # Image x goes right (+x), image y goes down (+y): the first pixel looks up-left.
    _, d0 = pixel_rays(K, np.eye(4), pix[:1])
    assert d0[0, 0] < 0 and d0[0, 1] < 0


def test_batched_cameras_match_single():
    cams = [camera(s) for s in range(4)]
    Ks = np.stack([c[0] for c in cams])
    c2ws = np.stack([camera_to_world(c[1], c[2]) for c in cams])
    pix = np.random.default_rng(2).uniform(0, 90, size=(4, 2))
    o, d = pixel_rays(Ks, c2ws, pix)
    for b in range(4):
        o1, d1 = pixel_rays(Ks[b], c2ws[b], pix[b:b + 1])
        np.testing.assert_allclose(o[b], o1[0], atol=1e-6)
        np.testing.assert_allclose(d[b], d1[0], atol=1e-6)


def test_image_rays_and_chunks_agree():
    K, R, t = camera(3)
    c2w = camera_to_world(R, t)
    o, d = image_rays(K, c2w, 7, 11)
    assert o.shape == (77, 3)
    chunks = list(iter_image_rays(K, c2w, 7, 11, chunk=10))
    assert [c[:2] for c in chunks][-1] == (70, 77)
    np.testing.assert_array_equal(np.concatenate([c[3] for c in chunks]), d)
    np.testing.assert_array_equal(np.concatenate([c[2] for c in chunks]), o)
    with pytest.raises(ValueError):
        next(iter_image_rays(K, c2w, 7, 11, chunk=0))


def test_near_far_on_the_sphere():
    o = np.array([[0, 0, -3.0], [0, 0, -3.0], [0.5, 0, -3], [0, 0, 0.0], [0, 0, 3.0], [0, 2.0, -3.0],
                  [1.0, 0, -3.0]])
    d = np.array([[0, 0, 1.0], [0, 0, 2.0], [0, 0, 1.0], [1.0, 0, 0], [0, 0, 1.0], [0, 0, 1.0], [0, 0, 1.0]])
    near, far, hit = unit_sphere_near_far(o, d)
    np.testing.assert_array_equal(hit, [True, True, True, True, False, False, False])
    np.testing.assert_allclose(near[:4], [2.0, 1.0, 3 - np.sqrt(0.75), 0.0], rtol=1e-6)
    np.testing.assert_allclose(far[:4], [4.0, 2.0, 3 + np.sqrt(0.75), 1.0], rtol=1e-6)
    np.testing.assert_array_equal(near[4:], 0.0)
    np.testing.assert_array_equal(far[4:], 0.0)
    near, far, hit = unit_sphere_near_far(o[:1], d[:1], radius=2.0, min_near=1.5)
    np.testing.assert_allclose([near[0], far[0]], [1.5, 5.0])
    near, far, hit = unit_sphere_near_far(o[:1], d[:1], min_near=4.5)
    assert not hit[0] and near[0] == far[0] == 4.5


def test_near_far_random_points_on_the_sphere():
    rng = np.random.default_rng(5)
    o = rng.normal(size=(1000, 3)) * 3
    d = rng.normal(size=(1000, 3))
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    near, far, hit = unit_sphere_near_far(o, d, radius=0.7)
    assert hit.any() and (~hit).any()
    for s in (near, far):
        r = np.linalg.norm(o[hit] + s[hit, None].astype(np.float64) * d[hit], axis=-1)
        inside_start = np.linalg.norm(o[hit], axis=-1) < 0.7
        expect = np.where(inside_start & (s is near), r, 0.7)  # near is 0 for origins inside
        np.testing.assert_allclose(r, expect, atol=1e-5)
    # Misses: the closest approach of the whole line or the forward half is outside the sphere.
    s_close = np.maximum(-(o[~hit] * d[~hit]).sum(-1), 0.0)
    assert (np.linalg.norm(o[~hit] + s_close[:, None] * d[~hit], axis=-1) >= 0.7 - 1e-9).all()
