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
