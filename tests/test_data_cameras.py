"""Camera decomposition: K[R|t] round trips, sign/scale invariance, refusals, fuzzing."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from taichi_neus.data.cameras import (
    camera_to_world,
    decompose_projection,
    missing_view_keys,
    project,
    projection_matrix,
    read_matrix,
    require_view_keys,
)
from taichi_neus.errors import UserInputError


def random_rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def random_camera(rng):
    K = np.array([
        [rng.uniform(50, 5000), rng.uniform(-5, 5), rng.uniform(0, 2000)],
        [0.0, rng.uniform(50, 5000), rng.uniform(0, 2000)],
        [0.0, 0.0, 1.0],
    ])
    return K, random_rotation(rng), rng.normal(scale=3.0, size=3)


def assert_round_trip(K, R, t, P):
    K2, R2, t2 = decompose_projection(P)
    np.testing.assert_allclose(K2, K, rtol=1e-9, atol=1e-9 * np.abs(K).max())
    np.testing.assert_allclose(R2, R, atol=1e-9)
    np.testing.assert_allclose(t2, t, rtol=1e-9, atol=1e-9 * max(1.0, np.abs(t).max()))
    assert K2[2, 2] == 1.0 and K2[0, 0] > 0 and K2[1, 1] > 0
    assert K2[1, 0] == K2[2, 0] == K2[2, 1] == 0.0
    np.testing.assert_allclose(np.linalg.det(R2), 1.0, atol=1e-12)
    np.testing.assert_allclose(R2 @ R2.T, np.eye(3), atol=1e-12)


def test_round_trip_random_cameras():
    rng = np.random.default_rng(0)
    for _ in range(200):
        K, R, t = random_camera(rng)
        assert_round_trip(K, R, t, projection_matrix(K, R, t))


@pytest.mark.parametrize("scale", [1e-6, -1.0, -3.7e4, 2.5e8])
def test_scale_and_sign_do_not_matter(scale):
    rng = np.random.default_rng(1)
    K, R, t = random_camera(rng)
    assert_round_trip(K, R, t, scale * projection_matrix(K, R, t))


def test_accepts_padded_4x4():
    rng = np.random.default_rng(2)
    K, R, t = random_camera(rng)
    P = np.eye(4)
    P[:3] = projection_matrix(K, R, t)
    assert_round_trip(K, R, t, P)


def test_camera_to_world_centre_and_axes():
    rng = np.random.default_rng(3)
    K, R, t = random_camera(rng)
    c2w = camera_to_world(R, t)
    centre = c2w[:3, 3]
    np.testing.assert_allclose(R @ centre + t, 0.0, atol=1e-12)  # the centre maps to the camera origin
    np.testing.assert_allclose(c2w @ np.linalg.inv(c2w), np.eye(4), atol=1e-12)
    # A point 2 units along the camera's z axis lies in front (depth 2) at the principal point.
    X = centre + 2.0 * c2w[:3, 2]
    uv, depth = project(projection_matrix(K, R, t), X[None])
    np.testing.assert_allclose(depth, [2.0], rtol=1e-12)
    np.testing.assert_allclose(uv[0], K[:2, 2], rtol=1e-9)
    # The camera's +x axis goes right in the image (u grows), +y goes down (v grows).
    uvx, _ = project(projection_matrix(K, R, t), (X + 0.1 * c2w[:3, 0])[None])
    uvy, _ = project(projection_matrix(K, R, t), (X + 0.1 * c2w[:3, 1])[None])
    assert uvx[0, 0] > uv[0, 0] and uvy[0, 1] > uv[0, 1]


@pytest.mark.parametrize("bad", ["nan", "inf", "zeros", "singular", "shape", "text"])
def test_refusals_name_the_matrix(bad):
    rng = np.random.default_rng(4)
    P = projection_matrix(*random_camera(rng))
    if bad == "nan":
        P[1, 2] = np.nan
    elif bad == "inf":
        P[0, 3] = np.inf
    elif bad == "zeros":
        P[:] = 0.0
    elif bad == "singular":
        P[2, :3] = P[0, :3] + P[1, :3]
    elif bad == "shape":
        P = P[:2]
    elif bad == "text":
        P = np.array([["a", "b"]])
    with pytest.raises(UserInputError, match="camera 7 in /x/cameras_sphere.npz"):
        decompose_projection(P, "camera 7 in /x/cameras_sphere.npz")


def test_read_matrix_and_keys():
    data = {"world_mat_0": np.eye(4), "bad": np.full((4, 4), np.nan), "obj": np.array(["x"] * 16).reshape(4, 4)}
    np.testing.assert_array_equal(read_matrix(data, "world_mat_0", [(4, 4)], "f.npz"), np.eye(4))
    with pytest.raises(UserInputError, match=r"f\.npz has no 'world_mat_1'"):
        read_matrix(data, "world_mat_1", [(4, 4)], "f.npz")
    with pytest.raises(UserInputError, match=r"'bad' in f\.npz contains NaN"):
        read_matrix(data, "bad", [(4, 4)], "f.npz")
    with pytest.raises(UserInputError, match=r"'world_mat_0' in f\.npz has shape"):
        read_matrix(data, "world_mat_0", [(3, 4)], "f.npz")
    with pytest.raises(UserInputError, match=r"'obj' in f\.npz is not a numeric"):
        read_matrix(data, "obj", [(4, 4)], "f.npz")
    keys = ["world_mat_0", "scale_mat_0", "world_mat_1"]
    assert missing_view_keys(keys, 3, ["world_mat_", "scale_mat_"]) == ["scale_mat_1", "world_mat_2", "scale_mat_2"]
    with pytest.raises(UserInputError, match=r"cams\.npz lacks scale_mat_1, world_mat_2, scale_mat_2"):
        require_view_keys(keys, 3, ["world_mat_", "scale_mat_"], "cams.npz")


finite_or_not = st.floats(allow_nan=True, allow_infinity=True, width=64)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays(np.float64, st.sampled_from([(3, 4), (4, 4), (3, 3), (2, 4)]), elements=finite_or_not))
def test_fuzz_decomposition_only_user_errors(P):
    try:
        K, R, t = decompose_projection(P, "fuzz")
    except UserInputError:
        return
    assert np.isfinite(K).all() and np.isfinite(R).all() and np.isfinite(t).all()
    assert K[0, 0] > 0 and K[1, 1] > 0 and K[2, 2] == 1.0
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-9)
    # What comes back reproduces P up to scale.
    P3 = np.asarray(P, np.float64)[:3]
    P3 = P3 / np.abs(P3).max()  # compare at unit size: near 1e308 the rescaled product would overflow
    P2 = projection_matrix(K, R, t)
    big = np.unravel_index(np.abs(P3).argmax(), P3.shape)
    s = P3[big] / P2[big]
    # solve() is backward stable, so t's residual grows with the condition of K R.
    cond = np.linalg.cond(P3[:, :3])
    np.testing.assert_allclose(P2 * s, P3, atol=max(1e-9, 1e-14 * cond))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_fuzz_round_trip_seeds(seed):
    rng = np.random.default_rng(seed)
    K, R, t = random_camera(rng)
    assert_round_trip(K, R, t, rng.choice([-1.0, 1.0]) * rng.uniform(1e-3, 1e3) * projection_matrix(K, R, t))
