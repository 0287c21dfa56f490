"""Rasterise a triangle mesh into a camera (numpy only): depth, coverage and a flat-shaded preview.

Triangles are splatted at a grid of barycentric points into a z-buffer. That is exact enough when
triangles cover about a pixel or less (marching-cubes meshes seen near training resolution); larger
triangles can leave pinholes, so coverage figures are for meshes of that kind.
"""

from __future__ import annotations

import numpy as np

from taichi_neus.export.mesh import Mesh


def _splats(mesh: Mesh, K: np.ndarray, c2w: np.ndarray, scale_mat: np.ndarray, H: int, W: int,
            splats: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The barycentric-grid points of every face that land in the image: flat pixel index (P,) int64,
    camera-space depth (P,) float64, face id (P,) int64, and each face's shade (F,) float64 (see
    :func:`rasterize`)."""
    inv = np.linalg.inv(np.asarray(scale_mat, np.float64))
    v = np.asarray(mesh.vertices, np.float64) @ inv[:3, :3].T + inv[:3, 3]  # world -> unit sphere
    w2c = np.linalg.inv(np.asarray(c2w, np.float64))
    vc = v @ w2c[:3, :3].T + w2c[:3, 3]
    tri = vc[np.asarray(mesh.faces)]  # (F, 3, 3) camera coordinates
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    centre = tri.mean(1)
    view = -centre / np.maximum(np.linalg.norm(centre, axis=1, keepdims=True), 1e-12)
    face_shade = np.abs((n * view).sum(1)) * 0.8 + 0.2
    g = np.linspace(0.0, 1.0, splats)
    a, b = np.meshgrid(g, g, indexing="ij")
    keep = (a + b) <= 1.0
    bary = np.stack([1 - a[keep] - b[keep], a[keep], b[keep]], 1)  # (P, 3)
    pts = np.einsum("pk,fkc->fpc", bary, tri).reshape(-1, 3)
    fid = np.repeat(np.arange(len(tri)), bary.shape[0])
    z = pts[:, 2]
    ok = z > 1e-6  # in front of the camera
    uv = pts[ok] @ np.asarray(K, np.float64).T
    # floor, not truncation: a point at x = -0.3 lies outside the image, not in column 0
    x = np.floor(uv[:, 0] / uv[:, 2]).astype(np.int64)
    y = np.floor(uv[:, 1] / uv[:, 2]).astype(np.int64)
    inside = (x >= 0) & (x < W) & (y >= 0) & (y < H)
    return y[inside] * W + x[inside], z[ok][inside], fid[ok][inside], face_shade


def rasterize(mesh: Mesh, K: np.ndarray, c2w: np.ndarray, scale_mat: np.ndarray, H: int, W: int,
              splats: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Nearest surface per pixel of a WORLD-space mesh seen by a unit-sphere camera.

    Args:
        mesh: vertices (V, 3) in world units (as written by the trainer), faces (F, 3).
        K: (3, 3) intrinsics in pixels; c2w: (4, 4) camera-to-world in unit-sphere coordinates
            (OpenCV: +z forward); scale_mat: (4, 4) unit sphere -> world.
        H, W: image size in pixels. splats: barycentric grid points per triangle edge.
    Returns:
        depth (H, W) float64, camera-space z in unit-sphere units (inf where no triangle lands), and
        shade (H, W) float64 in [0.2, 1]: |cos| between face normal and view ray (0 where empty).
    """
    pix, zz, ff, face_shade = _splats(mesh, K, c2w, scale_mat, H, W, splats)
    order = np.lexsort((zz, pix))  # per pixel, nearest first
    pix, zz, ff = pix[order], zz[order], ff[order]
    first = np.ones(len(pix), bool)
    first[1:] = pix[1:] != pix[:-1]
    depth = np.full(H * W, np.inf)
    shade = np.zeros(H * W)
    depth[pix[first]] = zz[first]
    shade[pix[first]] = face_shade[ff[first]]
    return depth.reshape(H, W), shade.reshape(H, W)


def coverage(mesh: Mesh, K: np.ndarray, c2w: np.ndarray, scale_mat: np.ndarray, H: int, W: int,
             splats: int = 6) -> np.ndarray:
    """(H, W) bool: the pixels where any triangle lands, i.e. ``isfinite(rasterize(...)[0])`` without
    the depth sort (what a silhouette needs; several times faster on a 256³ marching-cubes mesh).
    Arguments as in :func:`rasterize`."""
    covered = np.zeros(H * W, bool)
    covered[_splats(mesh, K, c2w, scale_mat, H, W, splats)[0]] = True
    return covered.reshape(H, W)


def shaded_image(shade: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 bluish-grey preview of :func:`rasterize`'s shade (black where empty)."""
    rgb = np.stack([shade * 0.85, shade * 0.9, shade], -1)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def silhouette_iou(mesh: Mesh, scene, views) -> float:
    """Mean over ``views`` of the IoU between the mesh's silhouette and the scene's object mask.

    The WORLD-space mesh is rasterised into each view at the scene's (training) resolution; a pixel is
    covered where any triangle lands. ``scene``: a :class:`taichi_neus.data.scene.Scene` with masks.
    Returns NaN without views or masks."""
    from taichi_neus.render.image_metrics import mask_iou

    views = [int(v) for v in views]
    if not views or scene.masks is None or mesh.is_empty:
        return float("nan")
    ious = []
    for v in views:
        covered = coverage(mesh, scene.K[v].astype(np.float64), scene.c2w[v].astype(np.float64),
                           scene.scale_mat, scene.H, scene.W)
        ious.append(mask_iou(covered.astype(np.float32), scene.masks[v]))
    return float(np.mean(ious))


def face_view_counts(mesh: Mesh, K: np.ndarray, c2w: np.ndarray, scale_mat: np.ndarray | None, H: int, W: int,
                     spacing: float = 0.75, depth_tol: float = 2.0) -> np.ndarray:
    """In how many of the cameras each face of a mesh is visible (not hidden behind other faces).

    Per view, every face is sampled at its corners, its centroid and, when it spans more than
    ``spacing`` pixels, a barycentric lattice of step at most ``spacing`` pixels (so a watertight
    surface leaves no pixel without a sample); the nearest sample per pixel is the depth buffer. A
    face is visible in the view when one of its samples inside the image lies within its pixel's
    tolerance of that pixel's depth. The tolerance is that of the face the nearest sample belongs to:
    ``depth_tol`` pixel footprints widened by its slope, ``depth_tol · z / f · (1 + √2 tan θ)`` (θ
    between its normal and the view ray, tan θ capped at 10) -- about how far apart in depth two
    samples of one smooth surface in one pixel can be. A face hidden by a surface more than that in
    front of it is not visible.

    "Nearest along a pixel's ray" with a per-pixel face id would not do: a marching-cubes mesh at 256³
    seen at DTU's training resolution has several faces per pixel, so one ray per pixel misses most
    faces of the visible surface in every view.

    Args:
        mesh: vertices (V, 3) in world units (``scale_mat`` maps unit sphere -> world; ``None``: the
            mesh is in unit-sphere units), faces (F, 3).
        K: (N, 3, 3) intrinsics in pixels (pixel (r, c) covers u in [c, c + 1), v in [r, r + 1)).
        c2w: (N, 4, 4) camera-to-world in unit-sphere coordinates (OpenCV: +z forward).
        H, W: image size in pixels.
        spacing: largest step between a face's samples, pixels.
        depth_tol: depth tolerance in pixel footprints.
    Returns:
        (F,) int32: the number of views in which each face is visible.
    """
    K = np.asarray(K, np.float64).reshape(-1, 3, 3)
    c2w = np.asarray(c2w, np.float64).reshape(-1, 4, 4)
    faces = np.asarray(mesh.faces, np.int64)
    counts = np.zeros(faces.shape[0], np.int32)
    if faces.shape[0] == 0:
        return counts
    v = np.asarray(mesh.vertices, np.float64)
    if scale_mat is not None:
        inv = np.linalg.inv(np.asarray(scale_mat, np.float64))
        v = v @ inv[:3, :3].T + inv[:3, 3]  # world -> unit sphere
    tri = v[faces]  # (F, 3, 3)
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-30)
    geo = {"v": v, "faces": faces, "centroid": tri.mean(1), "normal": normal,
           "vertex_face": np.zeros(v.shape[0], np.int64)}
    geo["vertex_face"][faces.ravel()] = np.repeat(np.arange(faces.shape[0]), 3)  # one face using each vertex
    for k, pose in zip(K, c2w, strict=True):
        counts += _visible_in_view(geo, k, pose, H, W, spacing, depth_tol)
    return counts


def _cols(op, a: np.ndarray) -> np.ndarray:
    """``op`` reduced over the 3 columns of an (F, 3) array (much faster than ``op.reduce(a, axis=1)``)."""
    return op(op(a[:, 0], a[:, 1]), a[:, 2])


def _visible_in_view(geo: dict, k: np.ndarray, pose: np.ndarray, H: int, W: int, spacing: float,
                     depth_tol: float) -> np.ndarray:
    """(F,) bool: the faces visible in one camera (see :func:`face_view_counts`)."""
    v, faces = geo["v"], geo["faces"]
    w2c = np.linalg.inv(pose)
    pc = v @ w2c[:3, :3].T + w2c[:3, 3]
    zv = pc[:, 2]
    front = zv > 1e-6
    zsafe = np.where(front, zv, 1.0)
    uv = pc @ k.T
    xv, yv = uv[:, 0] / zsafe, uv[:, 1] / zsafe
    face_front = _cols(np.logical_and, front[faces])
    xf, yf = xv[faces], yv[faces]
    ext = _cols(np.maximum, np.hypot(xf - xf[:, [1, 2, 0]], yf - yf[:, [1, 2, 0]]))  # longest edge, pixels
    # pixels coarser than the faces: the image is binned by the factor that brings the median face in view
    # down to ``spacing`` pixels (1 when the faces are that small already)
    shown = face_front & (_cols(np.minimum, xf) < W) & (_cols(np.maximum, xf) >= 0) \
        & (_cols(np.minimum, yf) < H) & (_cols(np.maximum, yf) >= 0)
    factor = max(1, int(np.ceil(np.median(ext[shown]) / spacing))) if shown.any() else 1
    if factor > 1:
        xv, yv, xf, yf, ext = xv / factor, yv / factor, xf / factor, yf / factor, ext / factor
        H, W = -(-H // factor), -(-W // factor)
    izf = (1.0 / zsafe)[faces]  # (F, 3)

    def pixel(x, y, ok):
        ok = ok & (x >= 0) & (x < W) & (y >= 0) & (y < H)
        return np.where(ok, np.floor(y) * W + np.floor(x), -1).astype(np.int64)

    def at(fids, bary):
        """depth and flat pixel index (-1: outside the image or behind the camera) of the barycentric points
        ``bary`` (P, 3) of faces ``fids``, placed in the image (1/z is affine there: perspective-correct)."""
        x, y = np.einsum("fk,pk->fp", xf[fids], bary), np.einsum("fk,pk->fp", yf[fids], bary)
        z = 1.0 / np.einsum("fk,pk->fp", izf[fids], bary)
        return z.ravel(), pixel(x, y, face_front[fids][:, None]).ravel()

    pv = pixel(xv, yv, front)
    zc, pcen = at(np.arange(faces.shape[0]), np.full((1, 3), 1.0 / 3.0))
    # the lattice: a face's step is its longest edge in the image over ceil(that / spacing)
    n_sub = np.where(face_front, np.clip(np.ceil(ext / spacing), 1, 64), 1).astype(np.int64)
    extra = [(np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64))]
    for n in np.unique(n_sub[n_sub > 1]):
        sel = np.nonzero(n_sub == n)[0]
        i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
        keep = (i + j <= n) & ~(((i == 0) | (i == n)) & ((j == 0) | (j == n)))  # corners are sampled already
        a, b = i[keep] / n, j[keep] / n
        bary = np.stack([1 - a - b, a, b], 1)  # (P, 3)
        step = max(1, 2**21 // bary.shape[0])  # bounded memory
        for s in range(0, sel.shape[0], step):
            m = sel[s: s + step]
            extra.append((*at(m, bary), np.repeat(m, bary.shape[0])))
    ez, ep, ef = (np.concatenate(parts) for parts in zip(*extra, strict=True))
    # each face's tolerance: its pixel footprint at its centroid, widened by its slope
    ray = geo["centroid"] - pose[:3, 3]
    nr = geo["normal"]
    cos = np.abs(nr[:, 0] * ray[:, 0] + nr[:, 1] * ray[:, 1] + nr[:, 2] * ray[:, 2]) \
        / np.maximum(np.sqrt(ray[:, 0] ** 2 + ray[:, 1] ** 2 + ray[:, 2] ** 2), 1e-30)
    tan = np.sqrt(np.maximum(1.0 - cos**2, 0.0)) / np.maximum(cos, 0.3)  # capped at 3.2
    tol_face = depth_tol * factor * zc / (0.5 * (k[0, 0] + k[1, 1])) * (1.0 + np.sqrt(2.0) * tan)
    # samples: the vertices (each with the tolerance of one face using it), centroids, lattice points
    samples = ((zv, pv, tol_face[geo["vertex_face"]]), (zc, pcen, tol_face), (ez, ep, tol_face[ef]))
    depth = np.full(H * W, np.inf)  # the nearest sample per pixel ...
    for z, pix, _ in samples:
        ok = pix >= 0
        np.minimum.at(depth, pix[ok], z[ok])
    tol_pix = np.zeros(H * W)  # ... and the tolerance of its face
    for z, pix, tol in samples:
        win = pix >= 0
        win[win] = z[win] == depth[pix[win]]
        tol_pix[pix[win]] = tol[win]
    # visible samples lie within their pixel's tolerance of its depth; a face is seen through any of its own
    vis = []
    for z, pix, _ in samples:
        ok = pix >= 0
        ok[ok] = z[ok] <= depth[pix[ok]] + tol_pix[pix[ok]]
        vis.append(ok)
    seen = _cols(np.logical_or, vis[0][faces]) | vis[1]
    seen[ef[vis[2]]] = True
    return seen
