"""Built-in synthetic scene: NeuS layout round trip, cameras vs the analytic surface, samples, cache."""

import os
import pathlib

import numpy as np
import pytest
from skimage import measure

from taichi_neus.data import load_dtu
from taichi_neus.data import synthetic as syn
from taichi_neus.data.rays import image_rays
from taichi_neus.errors import UserInputError


@pytest.fixture(scope="module")
def small_scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    syn.make_synthetic_scene(root, n_views=5, width=64, height=48, seed=3)
    return root


def _neighbours_differ(mask):
    """(H, W) bool: pixels with a 4-neighbour of the other class (the silhouette)."""
    m = np.pad(mask, 1, mode="edge")
    c = m[1:-1, 1:-1]
    return (c != m[:-2, 1:-1]) | (c != m[2:, 1:-1]) | (c != m[1:-1, :-2]) | (c != m[1:-1, 2:])


def test_layout_and_world_transform(small_scene):
    names = sorted(p.name for p in (small_scene / "image").iterdir())
    assert names == [f"{i:03d}.png" for i in range(5)]
    assert sorted(p.name for p in (small_scene / "mask").iterdir()) == names
    with np.load(small_scene / "cameras_sphere.npz") as d:
        assert sorted(d.keys()) == sorted([f"world_mat_{i}" for i in range(5)] + [f"scale_mat_{i}" for i in range(5)])
        S = d["scale_mat_0"]
        np.testing.assert_allclose(S, syn.scale_mat())
        assert not np.allclose(S, np.eye(4))
        # world_mat projects WORLD points: the world image of the unit-sphere centre is the offset.
        P = d["world_mat_0"]
        assert P.shape == (4, 4) and np.allclose(P[3], [0, 0, 0, 1])
        h = P[:3] @ np.append(syn.OFFSET, 1.0)
        assert h[2] > 0 and 0 < h[0] / h[2] < 64 and 0 < h[1] / h[2] < 48
    s = load_dtu(small_scene, holdout_every=0)
    assert s.images.shape == (5, 48, 64, 3) and s.masks.shape == (5, 48, 64)
    np.testing.assert_allclose(np.linalg.norm(s.c2w[:, :3, 3], axis=-1), syn.CAMERA_RADIUS, rtol=1e-5)
    np.testing.assert_allclose(s.K[0], syn.intrinsics(64, 48), rtol=1e-5, atol=1e-5)
    # Each camera looks at the origin: its z axis points from its centre to the origin.
    z = s.c2w[:, :3, 2]
    np.testing.assert_allclose(z, -s.c2w[:, :3, 3] / syn.CAMERA_RADIUS, atol=1e-5)
    assert 0.1 < (s.masks > 0).mean() < 0.7


def test_loaded_cameras_see_the_analytic_surface(small_scene):
    s = load_dtu(small_scene, holdout_every=0)
    for v in range(s.n_views):
        o, d = image_rays(s.K[v], s.c2w[v], s.H, s.W)
        hit, t, pts = syn.sphere_trace(o, d)
        hit = hit.reshape(s.H, s.W)
        fg = s.masks[v] == 255
        assert fg.sum() > 200
        wrong = hit != fg
        # Every ray through a mask pixel hits, every background ray misses; a disagreement may
        # only be a grazing ray on the silhouette (decomposed cameras differ from the generator's
        # by ~1e-7).
        assert wrong.sum() <= 2, (v, wrong.sum())
        assert not (wrong & ~_neighbours_differ(fg)).any()
        np.testing.assert_allclose(syn.synthetic_sdf_unit(pts[hit.ravel()]), 0.0, atol=2e-6)
        # Background is black away from the silhouette (2x2 supersampling blurs it by half a pixel).
        far_bg = ~fg & ~_neighbours_differ(fg)
        assert (s.images[v][far_bg] == 0).all()
        assert (s.images[v][fg].max(axis=-1) > 0).mean() > 0.99


def test_sdf_properties():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(20000, 3))
    y = x + rng.normal(scale=0.05, size=x.shape)
    fx, fy = syn.synthetic_sdf_unit(x), syn.synthetic_sdf_unit(y)
    # 1-Lipschitz (so sphere tracing is safe) and the object is inside radius 0.8.
    assert (np.abs(fx - fy) <= np.linalg.norm(x - y, axis=-1) + 1e-12).all()
    r = np.linalg.norm(x, axis=-1)
    assert (fx[r > syn.BOUND_RADIUS] > 0).all() and (fx < 0).any()
    # Exact distance where only the big sphere is near: straight above it.
    p = np.array([[0.0, syn._SPHERE_C[1] - 0.42 - 0.01, 0.0], [0.0, 0.03, 0.0]])
    p[0, 1] = syn._SPHERE_C[1] + 0.42 + 0.01
    np.testing.assert_allclose(syn.synthetic_sdf_unit(p[:1]), [0.01], atol=1e-12)


def test_sample_surface_on_surface_and_uniform():
    pts_world = syn.sample_surface(20000, seed=1)
    assert pts_world.shape == (20000, 3)
    unit = (pts_world - syn.OFFSET) / syn.SCALE
    np.testing.assert_allclose(syn.synthetic_sdf_unit(unit), 0.0, atol=1e-9)
    np.testing.assert_array_equal(syn.sample_surface(10, seed=1), syn.sample_surface(10, seed=1))
    # Uniform by area: the share of samples in each octant matches the share of a fine
    # marching-cubes mesh's area there.
    n = 160
    g = np.linspace(-0.8, 0.8, n)
    grid = np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1).reshape(-1, 3)
    vol = syn.synthetic_sdf_unit(grid).reshape(n, n, n)
    verts, faces, _, _ = measure.marching_cubes(vol, 0.0, spacing=(g[1] - g[0],) * 3)
    verts += -0.8
    tri = verts[faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=-1)
    centre = tri.mean(axis=1)

    def octant(p):
        return (p[:, 0] > 0.05) * 4 + (p[:, 1] > -0.1) * 2 + (p[:, 2] > 0.1) * 1

    mesh_share = np.bincount(octant(centre), weights=area, minlength=8) / area.sum()
    sample_share = np.bincount(octant(unit), minlength=8) / len(unit)
    np.testing.assert_allclose(sample_share, mesh_share, atol=0.012)


def test_default_scene_path_generates_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TAICHI_NEUS_CACHE", str(tmp_path / "cache"))
    path = syn.default_scene_path()
    assert path == tmp_path / "cache" / "synthetic_v1"
    s = load_dtu(path)
    assert s.n_views == 32 and (s.H, s.W) == (96, 96) and s.masks is not None
    stamp = os.stat(path / "cameras_sphere.npz").st_mtime_ns
    assert syn.default_scene_path() == path
    assert os.stat(path / "cameras_sphere.npz").st_mtime_ns == stamp  # not regenerated
    assert [p.name for p in pathlib.Path(tmp_path / "cache").iterdir()] == ["synthetic_v1"]  # no temp left


def test_default_scene_path_refuses_a_broken_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TAICHI_NEUS_CACHE", str(tmp_path))
    (tmp_path / "synthetic_v1" / "image").mkdir(parents=True)
    with pytest.raises(UserInputError, match="synthetic_v1 exists but is not a complete synthetic scene"):
        syn.default_scene_path()
