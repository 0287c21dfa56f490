"""The synthetic scene's optional camera radius and object scale (cameras inside the unit sphere)."""

import numpy as np
import pytest

from taichi_neus.data import load_dtu
from taichi_neus.data import synthetic as syn
from taichi_neus.data.rays import image_rays
from taichi_neus.errors import UserInputError


@pytest.fixture(scope="module")
def inside_scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_inside")
    syn.make_synthetic_scene(root, n_views=3, width=48, height=40, seed=1, camera_radius=0.9, object_scale=0.375)
    return root


def test_scaled_sdf_is_the_scaled_object():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(5000, 3))
    np.testing.assert_array_equal(syn.scaled_sdf_unit(x, 1.0), syn.synthetic_sdf_unit(x))
    np.testing.assert_allclose(syn.scaled_sdf_unit(0.375 * x, 0.375), 0.375 * syn.synthetic_sdf_unit(x), rtol=1e-12)
    # the surface samples lie on the scaled surface, within the scaled bound
    pts = syn.sample_surface(3000, seed=2, object_scale=0.375)
    unit = (pts - syn.OFFSET) / syn.SCALE
    np.testing.assert_allclose(syn.scaled_sdf_unit(unit, 0.375), 0.0, atol=1e-9)
    assert np.linalg.norm(unit, axis=1).max() < 0.8 * 0.375


def test_cameras_inside_the_unit_sphere_see_the_scaled_object(inside_scene):
    s = load_dtu(inside_scene, holdout_every=0)
    np.testing.assert_allclose(np.linalg.norm(s.c2w[:, :3, 3], axis=-1), 0.9, rtol=1e-5)
    np.testing.assert_allclose(s.K[0], syn.intrinsics(48, 40, 0.9, 0.8 * 0.375), rtol=1e-5, atol=1e-5)
    for v in range(s.n_views):
        o, d = image_rays(s.K[v], s.c2w[v], s.H, s.W)
        hit, _, pts = syn.sphere_trace(o, d, object_scale=0.375)
        fg = s.masks[v] == 255
        assert 0.1 < fg.mean() < 0.7
        assert (hit.reshape(s.H, s.W) != fg).sum() <= 2
        np.testing.assert_allclose(syn.scaled_sdf_unit(pts[hit], 0.375), 0.0, atol=2e-6)
        assert (s.images[v][fg].max(axis=-1) > 0).mean() > 0.99
    assert '"object_scale": 0.375' in (inside_scene / "scene.json").read_text()


def test_refuses_cameras_inside_the_object(tmp_path):
    with pytest.raises(UserInputError, match="outside the object"):
        syn.make_synthetic_scene(tmp_path, n_views=2, width=16, height=16, camera_radius=0.25, object_scale=0.375)


def test_environment_fills_the_background_and_leaves_the_object(tmp_path, inside_scene):
    """With the environment backdrop every pixel that misses the object shows the distant environment
    of its ray direction (a pixel well inside the background: all 4 sub-pixels miss, and the
    environment is smooth, so the 2x2 average is within a few 8-bit steps of the centre ray's
    colour); object pixels and masks are exactly those of the black-background scene."""
    root = syn.make_synthetic_scene(tmp_path / "env", n_views=3, width=48, height=40, seed=1, camera_radius=0.9,
                                    object_scale=0.375, backdrop="environment")
    env, black = load_dtu(root, holdout_every=0), load_dtu(inside_scene, holdout_every=0)
    np.testing.assert_array_equal(env.masks, black.masks)
    for v in range(env.n_views):
        fg = black.masks[v] == 255
        # interior background pixels: no foreground pixel within 1 (so no sub-pixel touches the object)
        near_fg = np.zeros_like(fg)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                near_fg |= np.roll(np.roll(fg, dy, 0), dx, 1)
        bg = ~near_fg
        assert bg.mean() > 0.2
        _, d = image_rays(env.K[v], env.c2w[v], env.H, env.W)
        expect = syn.environment(d.reshape(env.H, env.W, 3)[bg]) * 255.0
        np.testing.assert_allclose(env.images[v][bg].astype(np.float64), expect, atol=4.0)
        assert env.images[v][bg].min() >= 0.1 * 255 - 1  # never black: the field must explain it
        # object pixels whose whole 2x2 supersample hits the object are unchanged; pixels on silhouettes and
        # on sub-pixel slits (between torus and sphere) have a sub-pixel that misses, so compare the interior
        # and allow those few
        interior_fg = fg.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                interior_fg &= np.roll(np.roll(fg, dy, 0), dx, 1)
        assert interior_fg.sum() > 50
        same = (env.images[v][interior_fg] == black.images[v][interior_fg]).all(axis=-1)
        assert same.mean() > 0.98
    assert '"backdrop": "environment"' in (root / "scene.json").read_text()
    # a function of direction only: the same direction gives the same colour, any length
    d = np.random.default_rng(0).normal(size=(100, 3))
    np.testing.assert_allclose(syn.environment(d), syn.environment(3.0 * d), rtol=1e-12)


def test_room_backdrop_is_a_wall_with_parallax(tmp_path):
    """The room: the environment texture on the sphere of radius ROOM_RADIUS, seen from inside; the same
    wall point has the same colour from two cameras (it is geometry, not a direction lookup)."""
    o = np.array([[0.5, 0.0, 0.0], [-0.3, 0.2, 0.1]])
    p = np.array([0.0, 0.0, syn.ROOM_RADIUS])  # a point on the wall
    d = p - o
    rgb = syn.backdrop_colour(o, d, "room")
    np.testing.assert_allclose(rgb[0], rgb[1], rtol=1e-5)
    np.testing.assert_allclose(rgb[0], syn.environment(p[None])[0], rtol=1e-5)
    # the environment backdrop, by contrast, depends on the direction only
    env = syn.backdrop_colour(o, d, "environment")
    assert np.abs(env[0] - env[1]).max() > 0.01
    np.testing.assert_array_equal(syn.backdrop_colour(o, d, "black"), 0.0)
    with pytest.raises(UserInputError, match="inside the room"):
        syn.make_synthetic_scene(tmp_path / "a", n_views=2, width=16, height=16, camera_radius=2.7, backdrop="room")
    with pytest.raises(UserInputError, match="unknown backdrop"):
        syn.make_synthetic_scene(tmp_path / "b", n_views=2, width=16, height=16, backdrop="sky")
    root = syn.make_synthetic_scene(tmp_path / "room", n_views=2, width=32, height=32, camera_radius=0.9,
                                    object_scale=0.375, backdrop="room")
    s = load_dtu(root, holdout_every=0)
    assert (s.images[s.masks == 0].max(axis=-1) > 20).mean() > 0.95  # the wall fills the background
