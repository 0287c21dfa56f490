"""Mesh rasterisation against analytic ray casting, and the background-coverage ("walls") measure."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from skimage.measure import marching_cubes

from taichi_neus.data import load_dtu
from taichi_neus.data import synthetic as syn
from taichi_neus.data.cameras import camera_to_world
from taichi_neus.data.rays import image_rays
from taichi_neus.export.evaluation import background_coverage
from taichi_neus.export.mesh import Mesh
from taichi_neus.export.mesh_raster import coverage, rasterize, shaded_image
from taichi_neus.export.ply import write_ply

ROOT = pathlib.Path(__file__).resolve().parents[1]


def sdf_mesh(sdf, scale_mat, res=96, bound=1.0) -> Mesh:
    """Marching-cubes mesh (world units through ``scale_mat``) of a unit-sphere SDF callable."""
    g = np.linspace(-bound, bound, res)
    pts = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    vol = sdf(pts).reshape(res, res, res)
    v, f, _, _ = marching_cubes(vol, 0.0, spacing=(g[1] - g[0],) * 3)
    v = v - bound
    world = v @ scale_mat[:3, :3].T + scale_mat[:3, 3]
    return Mesh(world.astype(np.float32), f[:, ::-1].astype(np.int32))


def look_at_origin(centre):
    return camera_to_world(*syn.look_at(np.asarray(centre, np.float64)))


def test_sphere_depth_and_silhouette_match_ray_casting():
    S = np.diag([2.0, 2.0, 2.0, 1.0])
    S[:3, 3] = [0.3, -0.2, 0.1]
    r = 0.5
    mesh = sdf_mesh(lambda p: np.linalg.norm(p, axis=1) - r, S, res=128, bound=0.6)
    H, W = 60, 80
    K = np.array([[70.0, 0, 40.3], [0, 72.0, 29.6], [0, 0, 1]])
    c2w = look_at_origin([0.4, -0.6, 2.2])
    depth, shade = rasterize(mesh, K, c2w, S, H, W)
    # analytic: pixel-centre rays against the sphere, depth as camera z
    o, d = image_rays(K, c2w, H, W)
    b = (o * d).sum(-1)
    disc = b**2 - ((o * o).sum(-1) - r * r)
    hit = disc > 0
    t = -b - np.sqrt(np.maximum(disc, 0))
    z = t * (d @ c2w[:3, 2])
    hit, z = hit.reshape(H, W), z.reshape(H, W)
    cov = np.isfinite(depth)
    # coverage is "the surface touches the pixel": every pixel whose centre ray hits is covered, and
    # covered pixels lie within one pixel of the analytic silhouette
    inner, grown = hit.copy(), hit.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            inner &= np.roll(np.roll(hit, dy, 0), dx, 1)
            grown |= np.roll(np.roll(hit, dy, 0), dx, 1)
    assert hit.sum() > 500
    assert cov[hit].all()
    assert not (cov & ~grown).any()
    # a pixel's depth is the nearest surface point within the pixel: not behind its centre's depth, and
    # not nearer than the nearest of its neighbours' centres (the pixel lies between them)
    zmin = z.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            zmin = np.minimum(zmin, np.roll(np.roll(z, dy, 0), dx, 1))
    assert (depth[inner] <= z[inner] + 0.003).all()
    assert (depth[inner] >= zmin[inner] - 0.003).all()
    assert (shade[cov] >= 0.2).all() and (shade[~cov] == 0).all()
    img = shaded_image(shade)
    assert img.shape == (H, W, 3) and img.dtype == np.uint8 and (img[~cov] == 0).all()


def test_geometry_behind_the_camera_is_not_drawn():
    S = np.eye(4)
    mesh = sdf_mesh(lambda p: np.linalg.norm(p, axis=1) - 0.3, S, res=48, bound=0.4)
    K = np.array([[50.0, 0, 32], [0, 50.0, 32], [0, 0, 1]])
    # camera at (0, 0, -2) looking *away* from the origin (+z forward points to -z world)
    c2w = np.diag([-1.0, 1.0, -1.0, 1.0])
    c2w[:3, 3] = [0, 0, -2.0]
    depth, _ = rasterize(mesh, K, c2w, S, 64, 64)
    assert not np.isfinite(depth).any()


def test_background_coverage_counts_regions():
    H, W = 40, 50
    mask = np.zeros((H, W), bool)
    mask[15:30, 20:35] = True
    image = np.full((H, W, 3), 200, np.uint8)
    image[:10] = 5  # dark backdrop: rows 0..9
    cov = mask.copy()
    cov[:5] = True  # a "wall" over the top half of the backdrop
    out = background_coverage(cov, mask, image, margin=0)
    assert out["object"] == 1.0
    assert out["backdrop"] == pytest.approx(0.5)
    assert out["other_background"] == 0.0
    assert out["n_backdrop"] == 10 * W
    assert out["iou"] == pytest.approx(mask.sum() / (mask.sum() + 5 * W))
    # the margin leaves out pixels next to the mask (edge splats)
    cov2 = mask.copy()
    cov2[14, 20:35] = True
    assert background_coverage(cov2, mask, image, margin=2)["other_background"] == 0.0
    assert background_coverage(cov2, mask, image, margin=0)["other_background"] > 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        background_coverage(cov[:-1], mask, image)


@pytest.fixture(scope="module")
def black_scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("walls_scene")
    syn.make_synthetic_scene(root, n_views=4, width=64, height=56, seed=2)
    return root


def test_true_surface_covers_the_object_and_no_backdrop(black_scene):
    s = load_dtu(black_scene, holdout_every=0)
    mesh = sdf_mesh(syn.synthetic_sdf_unit, s.scale_mat, res=96, bound=0.85)
    for v in range(s.n_views):
        depth, _ = rasterize(mesh, s.K[v].astype(np.float64), s.c2w[v].astype(np.float64), s.scale_mat, s.H, s.W)
        # the silhouette's coverage (no depth sort) is exactly the z-buffer's finite pixels
        np.testing.assert_array_equal(
            coverage(mesh, s.K[v].astype(np.float64), s.c2w[v].astype(np.float64), s.scale_mat, s.H, s.W),
            np.isfinite(depth))
        c = background_coverage(np.isfinite(depth), s.masks[v], s.images[v])
        # coverage is "touches the pixel", a one-pixel dilation: IoU is below 1 at this small size
        assert c["object"] > 0.99 and c["backdrop"] < 0.01 and c["iou"] > 0.85


def test_benchmark_reports_a_wall(black_scene, tmp_path):
    """The benchmark script on the true surface and on the true surface plus a shell at r = 0.97 (the
    "closed along the unit sphere" failure): the wall covers the backdrop and lies on the sphere."""
    s = load_dtu(black_scene, holdout_every=0)
    good = sdf_mesh(syn.synthetic_sdf_unit, s.scale_mat, res=64, bound=1.0)
    shell = sdf_mesh(lambda p: np.minimum(syn.synthetic_sdf_unit(p), 0.985 - np.linalg.norm(p, axis=1)),
                     s.scale_mat, res=96, bound=1.0)
    paths = {}
    for name, m in (("good", good), ("walls", shell)):
        paths[name] = tmp_path / f"{name}.ply"
        write_ply(paths[name], m.vertices, m.faces)
    out = tmp_path / "walls.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "background_walls.py"), "--data", str(black_scene),
           "--mesh", f"good={paths['good']}", "--mesh", f"walls={paths['walls']}", "--downscale", "1",
           "--view-every", "2", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    runs = {r["label"]: r for r in json.loads(out.read_text())["runs"]}
    assert runs["good"]["backdrop"] < 0.01 and runs["good"]["on_sphere"] < 0.01
    # the shell's silhouette covers all but the image corners (the unit sphere subtends ~21 degrees, the
    # image's diagonal half-angle is ~25)
    assert runs["walls"]["backdrop"] > 0.8 and runs["walls"]["on_sphere"] > 0.5
    # bad input: one sentence, exit 2
    res = subprocess.run(cmd[:4] + ["--mesh", f"x={tmp_path / 'missing.ply'}", "--out", str(tmp_path / "o.json")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
