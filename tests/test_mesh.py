"""Mesh extraction on analytic SDFs, mask-based cleaning, connected components."""

import numpy as np
import pytest

from taichi_neus.errors import UserInputError
from taichi_neus.export.mesh import Mesh, _vertex_components, clean_mesh_with_masks, extract_mesh, largest_component

R = 0.5
SCALE = 2.0
SHIFT = np.array([10.0, -3.0, 4.0])
SCALE_MAT = np.eye(4)
SCALE_MAT[:3, :3] *= SCALE
SCALE_MAT[:3, 3] = SHIFT


def sphere_sdf(points):
    return (np.linalg.norm(points.astype(np.float64), axis=1) - R).astype(np.float32)


def two_spheres_sdf(points):
    """A bigger sphere at -x (the largest component) and a smaller one at +x."""
    p = points.astype(np.float64)
    a = np.linalg.norm(p - [-0.45, 0, 0], axis=1) - 0.3
    b = np.linalg.norm(p - [0.45, 0, 0], axis=1) - 0.25
    return np.minimum(a, b).astype(np.float32)


def edge_use_counts(faces):
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e = np.sort(e, axis=1)
    _, counts = np.unique(e, axis=0, return_counts=True)
    return counts


@pytest.fixture(scope="module")
def sphere_mesh():
    def color_fn(points, normals):
        assert points.shape == normals.shape and points.dtype == np.float32
        return 0.5 * (normals + 1.0)  # colour = normal, so we can check both

    return extract_mesh(
        sphere_sdf, resolution=48, chunk=5000, coarse_resolution=12, color_fn=color_fn, scale_mat=SCALE_MAT
    )


def test_sphere_vertices_at_world_radius(sphere_mesh):
    m = sphere_mesh
    assert m.vertices.dtype == np.float32 and m.faces.dtype == np.int32 and m.colors.dtype == np.uint8
    assert m.vertices.shape[0] > 500
    r = np.linalg.norm(m.vertices.astype(np.float64) - SHIFT, axis=1)
    h_world = SCALE * 2.0 / 47
    # marching cubes interpolates linearly along grid edges: error well below a grid spacing
    assert np.abs(r - SCALE * R).max() < 0.25 * h_world
    assert abs(r.mean() - SCALE * R) < 0.05 * h_world


def test_sphere_normals_point_outward_and_mesh_is_watertight(sphere_mesh):
    m = sphere_mesh
    n = m.face_normals()
    centroid = m.vertices[m.faces].mean(axis=1).astype(np.float64) - SHIFT
    cosines = np.einsum("ij,ij->i", n, centroid / np.linalg.norm(centroid, axis=1, keepdims=True))
    assert cosines.min() > 0.5
    assert set(edge_use_counts(m.faces)) == {2}
    # closed surface: Euler characteristic of a sphere
    n_edges = edge_use_counts(m.faces).shape[0]
    assert m.vertices.shape[0] - n_edges + m.faces.shape[0] == 2


def test_sphere_colors_come_from_color_fn_with_sdf_normals(sphere_mesh):
    m = sphere_mesh
    radial = (m.vertices.astype(np.float64) - SHIFT) / (SCALE * R)
    expected = np.round(np.clip(0.5 * (radial + 1.0), 0, 1) * 255)
    assert np.abs(m.colors.astype(np.float64) - expected).max() <= 3  # ~1% normal error


def test_coarse_to_fine_equals_single_fine_pass():
    def sdf(p):  # an off-centre sphere, so the coarse box is a strict sub-box
        return (np.linalg.norm(p.astype(np.float64) - [0.3, -0.2, 0.1], axis=1) - 0.3).astype(np.float32)

    calls = []

    def counting_sdf(p):
        calls.append(p.shape[0])
        return sdf(p)

    fine = extract_mesh(sdf, resolution=40, coarse_resolution=None)
    boxed = extract_mesh(counting_sdf, resolution=40, coarse_resolution=10, chunk=4096)
    assert max(calls) <= 4096
    assert sum(calls) < 0.5 * 40**3  # the fine pass covered only the box
    assert boxed.vertices.shape == fine.vertices.shape and boxed.faces.shape == fine.faces.shape
    from scipy.spatial import cKDTree

    d, _ = cKDTree(fine.vertices).query(boxed.vertices)
    assert d.max() < 1e-5

    # same triangles, same winding: compare faces as rows of 9 rounded corner coordinates
    def rows(m):
        r = np.round(m.vertices[m.faces].astype(np.float64) * 1e4).astype(np.int64).reshape(-1, 9)
        return r[np.lexsort(r.T[::-1])]

    np.testing.assert_array_equal(rows(boxed), rows(fine))


def test_exact_zero_on_grid_points_still_watertight():
    """With 33 points over [-1, 1] the sphere of radius 0.5 passes exactly through grid points."""
    m = extract_mesh(sphere_sdf, resolution=33, coarse_resolution=None)
    assert set(edge_use_counts(m.faces)) == {2}
    # and no zero-area triangles
    assert (np.linalg.norm(Mesh(m.vertices.astype(np.float64), m.faces).face_normals(), axis=1) > 0.5).all()


def test_mirroring_scale_mat_keeps_normals_outward():
    s = np.diag([-1.0, 1.0, 1.0, 1.0])
    m = extract_mesh(sphere_sdf, resolution=24, coarse_resolution=None, scale_mat=s)
    n = m.face_normals()
    c = m.vertices[m.faces].mean(axis=1)
    assert (np.einsum("ij,ij->i", n, c) > 0).all()


def test_no_surface_returns_empty_mesh_with_warning():
    with pytest.warns(UserWarning, match="No surface"):
        m = extract_mesh(lambda p: np.ones(p.shape[0], np.float32), resolution=16, coarse_resolution=8)
    assert m.is_empty and m.vertices.shape == (0, 3) and m.faces.shape == (0, 3)
    with pytest.warns(UserWarning, match="No surface"):
        m = extract_mesh(lambda p: -np.ones(p.shape[0], np.float32), resolution=16, coarse_resolution=None)
    assert m.is_empty


def test_bad_resolution_is_user_error():
    with pytest.raises(UserInputError):
        extract_mesh(sphere_sdf, resolution=1)


def test_save_and_load_round_trip(tmp_path, sphere_mesh):
    p = sphere_mesh.save(tmp_path / "mesh.ply")
    m = Mesh.load(p)
    np.testing.assert_array_equal(m.vertices, sphere_mesh.vertices)
    np.testing.assert_array_equal(m.faces, sphere_mesh.faces)
    np.testing.assert_array_equal(m.colors, sphere_mesh.colors)
    with pytest.raises(UserInputError, match="already exists"):
        sphere_mesh.save(p)


def test_vertex_components_match_bfs_on_random_graph():
    rng = np.random.default_rng(1)
    n = 300
    faces = rng.integers(0, n, size=(120, 3))
    labels = _vertex_components(n, faces)
    # reference: BFS over the vertex adjacency
    adj = [set() for _ in range(n)]
    for f in faces:
        for a in f:
            adj[a].update(f)
    ref = -np.ones(n, dtype=np.int64)
    for s in range(n):
        if ref[s] >= 0:
            continue
        stack, ref[s] = [s], s
        while stack:
            v = stack.pop()
            for w in adj[v]:
                if ref[w] < 0:
                    ref[w] = s
                    stack.append(w)
    np.testing.assert_array_equal(labels, ref)  # both label by the smallest vertex index


def test_largest_component_keeps_biggest_sphere():
    def sdf(p):
        q = p.astype(np.float64)
        a = np.linalg.norm(q - [-0.4, 0, 0], axis=1) - 0.35
        b = np.linalg.norm(q - [0.5, 0, 0], axis=1) - 0.15
        return np.minimum(a, b).astype(np.float32)

    m = extract_mesh(sdf, resolution=40, coarse_resolution=None)
    big = largest_component(m)
    assert 0 < big.faces.shape[0] < m.faces.shape[0]
    assert (big.vertices[:, 0] < 0).all()
    assert set(edge_use_counts(big.faces)) == {2}


def _look_at_cameras(n_views, radius, H, W, f):
    """Cameras on a circle in the z = 0.3 plane, looking at the origin (OpenCV axes)."""
    K = np.tile(np.array([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1.0]]), (n_views, 1, 1))
    c2w = np.zeros((n_views, 4, 4))
    for i, t in enumerate(np.linspace(0, 2 * np.pi, n_views, endpoint=False)):
        eye = np.array([radius * np.cos(t), radius * np.sin(t), 0.3 * radius])
        fwd = -eye / np.linalg.norm(eye)
        right = np.cross(fwd, [0, 0, 1.0])
        right /= np.linalg.norm(right)
        down = np.cross(fwd, right)
        c2w[i, :3, 0], c2w[i, :3, 1], c2w[i, :3, 2], c2w[i, :3, 3], c2w[i, 3, 3] = right, down, fwd, eye, 1
    return K, c2w


def _project(points, K, c2w):
    w2c = np.linalg.inv(c2w)
    cam = points @ w2c[:3, :3].T + w2c[:3, 3]
    uv = cam @ K.T
    return uv[:, :2] / uv[:, 2:]


def test_clean_with_masks_keeps_the_masked_sphere():
    m = extract_mesh(two_spheres_sdf, resolution=40, coarse_resolution=None, scale_mat=SCALE_MAT)
    H, W, f = 48, 64, 60.0
    K, c2w = _look_at_cameras(6, 3.0, H, W, f)
    # mask of the sphere at +x only: disk around its projected centre, radius from its silhouette
    masks = np.zeros((6, H, W), np.uint8)
    rows, cols = np.mgrid[:H, :W]
    centre = np.array([0.45, 0, 0])
    for i in range(6):
        cu, cv = _project(centre[None], K[i], c2w[i])[0]
        dist = np.linalg.norm(centre - c2w[i, :3, 3])
        rad = f * 0.25 / np.sqrt(dist**2 - 0.25**2) + 1.0
        masks[i][(cols + 0.5 - cu) ** 2 + (rows + 0.5 - cv) ** 2 <= rad**2] = 255
    unit = (m.vertices.astype(np.float64) - SHIFT) / SCALE
    right = m.faces[(unit[m.faces][:, :, 0] > 0).all(axis=1)]
    assert 0 < right.shape[0] < m.faces.shape[0] / 2  # the -x sphere is the larger component
    for keep_largest in (False, True):  # the masks alone remove the -x sphere
        clean = clean_mesh_with_masks(m, K, c2w, masks, SCALE_MAT, dilation=2, keep_largest=keep_largest)
        cu = (clean.vertices.astype(np.float64) - SHIFT) / SCALE
        assert (cu[:, 0] > 0).all()
        # the whole +x sphere survives: same face count as that part of the raw mesh
        assert clean.faces.shape[0] == right.shape[0]
        assert set(edge_use_counts(clean.faces)) == {2}
    # without the masks' help (dilated to cover everything) the largest component is the -x sphere
    wide = clean_mesh_with_masks(m, K, c2w, masks, SCALE_MAT, dilation=200)
    assert ((wide.vertices.astype(np.float64) - SHIFT)[:, 0] < 0).all()


def test_clean_treats_behind_camera_and_outside_image_as_inside():
    m = extract_mesh(sphere_sdf, resolution=20, coarse_resolution=None)
    H, W = 16, 16
    K = np.array([[[10.0, 0, 8], [0, 10.0, 8], [0, 0, 1]]] * 2)
    c2w = np.tile(np.eye(4), (2, 1, 1))
    c2w[0, 2, 3] = 5.0  # camera 0 at z=5 looking along +z: the sphere is behind it
    c2w[1, 0, 3] = 50.0  # camera 1 far to the side: the sphere projects outside its image
    c2w[1, 2, 3] = -5.0
    masks = np.zeros((2, H, W), np.uint8)  # empty masks: only the exemptions can keep anything
    clean = clean_mesh_with_masks(m, K, c2w, masks, None, dilation=0)
    assert clean.faces.shape == m.faces.shape
    # a camera that sees the sphere with an empty mask removes everything
    c2w[1, 0, 3] = 0.0
    assert clean_mesh_with_masks(m, K, c2w, masks, None, dilation=0).is_empty


def test_clean_dilation_is_a_disk_of_radius_r():
    """A single vertex triangle projecting r pixels from the mask survives dilation r, not r - 1."""
    H, W = 21, 21
    K = np.array([[[10.0, 0, 10.5], [0, 10.0, 10.5], [0, 0, 1]]])
    c2w = np.eye(4)[None]
    masks = np.zeros((1, H, W), np.uint8)
    masks[0, 10, 3] = 255  # mask pixel column 3; the mesh projects into pixel column 10 (7 px away)
    tri = Mesh(
        np.array([[0, 0, 1], [0.001, 0, 1], [0, 0.001, 1]], np.float32), np.array([[0, 1, 2]], np.int32)
    )
    assert clean_mesh_with_masks(tri, K, c2w, masks, None, dilation=7).faces.shape[0] == 1
    assert clean_mesh_with_masks(tri, K, c2w, masks, None, dilation=6).is_empty


# ------------------------------------------------- clean-up of unseen faces and small components
def bubble_and_speck_sdf(points):
    """A sphere (r 0.5) with a closed bubble (r 0.15) inside the solid and a small speck (r 0.06) outside."""
    p = points.astype(np.float64)
    outer = np.linalg.norm(p, axis=1) - 0.5
    bubble = 0.15 - np.linalg.norm(p - [0.1, 0, 0], axis=1)
    speck = np.linalg.norm(p - [0.75, 0, 0], axis=1) - 0.06
    return np.minimum(np.maximum(outer, bubble), speck).astype(np.float32)


def _cameras_around(n_views, radius, H, W, f):
    """Cameras on a sphere (Fibonacci directions) looking at the origin: every point of a convex object is seen."""
    K = np.tile(np.array([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1.0]]), (n_views, 1, 1))
    c2w = np.zeros((n_views, 4, 4))
    for i in range(n_views):
        zc = 1 - 2 * (i + 0.5) / n_views
        phi = i * np.pi * (3 - np.sqrt(5))
        eye = radius * np.array([np.sqrt(1 - zc * zc) * np.cos(phi), np.sqrt(1 - zc * zc) * np.sin(phi), zc])
        fwd = -eye / np.linalg.norm(eye)
        up = np.array([0, 0, 1.0]) if abs(fwd[2]) < 0.9 else np.array([1.0, 0, 0])
        right = np.cross(fwd, up)
        right /= np.linalg.norm(right)
        down = np.cross(fwd, right)
        c2w[i, :3, 0], c2w[i, :3, 1], c2w[i, :3, 2], c2w[i, :3, 3], c2w[i, 3, 3] = right, down, fwd, eye, 1
    return K, c2w


@pytest.fixture(scope="module")
def bubble_mesh():
    m = extract_mesh(bubble_and_speck_sdf, resolution=64, coarse_resolution=None, scale_mat=SCALE_MAT)
    centre = ((m.vertices.astype(np.float64) - SHIFT) / SCALE)[m.faces].mean(1)
    parts = {"bubble": np.linalg.norm(centre - [0.1, 0, 0], axis=1) < 0.2,
             "speck": np.linalg.norm(centre - [0.75, 0, 0], axis=1) < 0.1}
    parts["outer"] = ~parts["bubble"] & ~parts["speck"]
    assert all(v.sum() > 20 for v in parts.values())
    return m, parts


def _count(mesh, part_sdf_centre, radius):
    centre = ((mesh.vertices.astype(np.float64) - SHIFT) / SCALE)[mesh.faces].mean(1)
    return int((np.linalg.norm(centre - part_sdf_centre, axis=1) < radius).sum())


@pytest.mark.parametrize("H, W, f", [(48, 64, 60.0), (300, 400, 300.0)])  # faces over a pixel, and under
def test_cull_unseen_removes_the_bubble_and_keeps_the_outside(bubble_mesh, H, W, f):
    from taichi_neus.export.mesh import cull_unseen_faces
    from taichi_neus.export.mesh_raster import face_view_counts
    m, parts = bubble_mesh
    K, c2w = _cameras_around(12, 3.0, H, W, f)
    counts = face_view_counts(m, K, c2w, SCALE_MAT, H, W)
    assert (counts[parts["bubble"]] == 0).all()
    assert (counts[parts["outer"]] > 0).all() and (counts[parts["speck"]] > 0).all()
    out = cull_unseen_faces(m, K, c2w, SCALE_MAT, H, W)
    assert out.faces.shape[0] == parts["outer"].sum() + parts["speck"].sum()
    assert _count(out, [0.1, 0, 0], 0.2) == 0
    assert set(edge_use_counts(out.faces)) == {2}  # the outer sphere and the speck stay closed
    # min_views: a face needs that many views; more views than cameras keeps nothing
    assert cull_unseen_faces(m, K, c2w, SCALE_MAT, H, W, min_views=13).is_empty
    assert cull_unseen_faces(m, K, c2w, SCALE_MAT, H, W, min_views=2).faces.shape[0] \
        == int((counts >= 2).sum())


def test_cull_unseen_drops_what_the_cameras_cannot_see():
    """Cameras on one side: a face of a convex sphere is seen by a camera on the outer side of its plane.
    Faces just past the rim, within about a pixel of the silhouette, may count as seen."""
    from taichi_neus.export.mesh import cull_unseen_faces
    from taichi_neus.export.mesh_raster import face_view_counts
    m = extract_mesh(sphere_sdf, resolution=80, coarse_resolution=None)
    K, c2w = _cameras_around(12, 3.0, 96, 128, 120.0)
    up = c2w[:, 2, 3] > 1.0  # cameras well above the z = 0 plane
    centre = m.vertices[m.faces].mean(1).astype(np.float64)
    normal = centre / np.linalg.norm(centre, axis=1, keepdims=True)
    to_cam = c2w[up][:, :3, 3][None] - centre[:, None]  # (F, C, 3)
    facing = np.max((normal[:, None] * to_cam).sum(-1) / np.linalg.norm(to_cam, axis=-1), axis=1)
    counts = face_view_counts(m, K[up], c2w[up], None, 96, 128)
    assert (counts[facing > 0.05] > 0).all()  # in front of some camera: seen
    assert (counts[facing < -0.5] == 0).all() and (facing < -0.5).sum() > 100  # well behind all: not
    out = cull_unseen_faces(m, K[up], c2w[up], None, 96, 128)
    assert out.faces.shape[0] == (counts > 0).sum()


def test_min_component_removes_the_speck_by_area(bubble_mesh):
    from taichi_neus.export.mesh import drop_small_components
    m, parts = bubble_mesh
    assert drop_small_components(m, 0.0) is m
    out = drop_small_components(m, 0.05)  # speck: (0.06 / 0.5)^2 ~ 1.4% of the sphere's area; bubble 9%
    assert out.faces.shape[0] == parts["outer"].sum() + parts["bubble"].sum()
    assert _count(out, [0.75, 0, 0], 0.1) == 0
    np.testing.assert_array_equal(largest_component(m).faces.shape, drop_small_components(m, 1.0).faces.shape)
    assert drop_small_components(m, 0.01).faces.shape == m.faces.shape  # 1.4% > 1%: kept


def test_mesh_from_run_applies_the_options_after_the_mask_cleaning(bubble_mesh):
    """A stand-in trainer with the bubble-and-speck SDF: cull_unseen, then min_component, from cfg.mesh."""
    from types import SimpleNamespace

    from taichi_neus.export.mesh import mesh_from_run
    from taichi_neus.train.config import MeshConfig
    K, c2w = _cameras_around(12, 3.0, 48, 64, 60.0)
    scene = SimpleNamespace(K=K, c2w=c2w, H=48, W=64, masks=None, scale_mat=SCALE_MAT, train_ids=np.arange(12))
    cfg = SimpleNamespace(mesh=MeshConfig(resolution=64, min_component=0.05, cull_unseen=True))
    tr = SimpleNamespace(cfg=cfg, scene=scene, sdf_at=bubble_and_speck_sdf,
                         colour_at=lambda p, d: np.full((len(p), 3), 0.5, np.float32))
    said = []
    out = mesh_from_run(tr, log=said.append)
    _, parts = bubble_mesh
    assert out.faces.shape[0] == parts["outer"].sum()  # neither bubble nor speck
    assert any("training views" in s for s in said) and any("largest one's area" in s for s in said)
    assert mesh_from_run(tr, cull_unseen=False, min_component=0.0).faces.shape[0] == sum(
        v.sum() for k, v in parts.items() if k != "outer") + parts["outer"].sum()
