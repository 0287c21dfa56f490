"""Rasterise a triangle mesh into a camera (numpy only): depth, coverage and a flat-shaded preview.

Triangles are splatted at a grid of barycentric points into a z-buffer. That is exact enough when
triangles cover about a pixel or less (marching-cubes meshes seen near training resolution); larger
triangles can leave pinholes, so coverage figures are for meshes of that kind.
"""

from __future__ import annotations

import numpy as np

from taichi_neus.export.mesh import Mesh


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
    pix = y[inside] * W + x[inside]
    zz, ff = z[ok][inside], fid[ok][inside]
    order = np.lexsort((zz, pix))  # per pixel, nearest first
    pix, zz, ff = pix[order], zz[order], ff[order]
    first = np.ones(len(pix), bool)
    first[1:] = pix[1:] != pix[:-1]
    depth = np.full(H * W, np.inf)
    shade = np.zeros(H * W)
    depth[pix[first]] = zz[first]
    shade[pix[first]] = face_shade[ff[first]]
    return depth.reshape(H, W), shade.reshape(H, W)


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
        depth, _ = rasterize(mesh, scene.K[v].astype(np.float64), scene.c2w[v].astype(np.float64),
                             scene.scale_mat, scene.H, scene.W)
        ious.append(mask_iou(np.isfinite(depth).astype(np.float32), scene.masks[v]))
    return float(np.mean(ious))
