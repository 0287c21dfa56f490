"""Depth maps that come with a scene, for the depth loss (:func:`taichi_neus.train.losses.depth_l1`).

Folder layout (any scene format)::

    scene/depths/<image stem>.npy    (H, W) float, z-depth along the camera's optical axis in WORLD
                                     units (the units of the scene's cameras: COLMAP's, DTU's world),
                                     at the photographs' full resolution; 0, negative, NaN or infinite
                                     where unknown. One file per image; a scene without depths/ has none.

Depths are given for the pinhole images the loader returns (DTU, NeRF-synthetic, a scene written by
``taichi-neus poses``; a COLMAP scene with a radially distorted camera is undistorted on load, its
depth maps are not). On load they are downscaled with the images (mean of the known values in each
block) and converted to what the renderer outputs: distance along the unit ray direction, unit-sphere
units (``t = z · ‖K⁻¹ [u, v, 1]‖ / s`` with the scene's scale ``s``).
"""

from __future__ import annotations

import pathlib

import numpy as np

from taichi_neus.errors import UserInputError


def _block_mean_valid(d: np.ndarray, k: int) -> np.ndarray:
    if k == 1:
        return d
    H, W = d.shape[0] // k, d.shape[1] // k
    b = d[:H * k, :W * k].reshape(H, k, W, k)
    valid = b > 0
    n = valid.sum((1, 3))
    s = np.where(valid, b, 0.0).sum((1, 3))
    return np.where(n > 0, s / np.maximum(n, 1), 0.0)


def ray_distance_factor(K: np.ndarray, H: int, W: int) -> np.ndarray:
    """(H, W) float64 ‖K⁻¹ [u, v, 1]‖ at pixel centres: z-depth times this is the distance along the ray."""
    ys, xs = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    y = (ys - K[1, 2]) / K[1, 1]
    x = (xs - K[0, 2] - K[0, 1] * y) / K[0, 0]
    return np.sqrt(x * x + y * y + 1.0)


def load_depths(scene) -> np.ndarray | None:
    """(V, H, W) float32 target ray distances in unit-sphere units (0: unknown) from ``scene.path/depths``,
    or None when the scene has no depths/ folder. Raises UserInputError naming the file at fault."""
    folder = pathlib.Path(scene.path) / "depths"
    if not folder.is_dir():
        return None
    S = np.asarray(scene.scale_mat, np.float64)
    s = S[0, 0]
    if not np.allclose(S[:3, :3], s * np.eye(3), rtol=1e-6, atol=1e-9 * abs(s)):
        raise UserInputError(f"{folder}: depth maps need a scene whose unit sphere is a scaled copy of the world "
                             "(scale_mat without rotation or unequal axes); remove depths/ to train without them.")
    k = int(scene.downscale)
    out = np.zeros((scene.n_views, scene.H, scene.W), np.float32)
    for v, name in enumerate(scene.image_names):
        f = folder / f"{pathlib.PurePosixPath(name).stem}.npy"
        if not f.is_file():
            raise UserInputError(f"{folder} has no depth map for image {name} (expected {f.name}); give one per "
                                 "image or remove depths/.")
        try:
            d = np.load(f, allow_pickle=False)
        except Exception as e:
            raise UserInputError(f"cannot read depth map {f} ({type(e).__name__}); save it with numpy.save.") \
                from None
        if d.ndim != 2 or d.shape[0] // k != scene.H or d.shape[1] // k != scene.W:
            raise UserInputError(f"depth map {f} has shape {d.shape}, expected ({scene.H * k}, {scene.W * k}) "
                                 "(the photograph's height and width).")
        d = np.asarray(d, np.float64)
        d = np.where(np.isfinite(d) & (d > 0), d, 0.0)
        d = _block_mean_valid(d, k)[:scene.H, :scene.W]
        out[v] = d * ray_distance_factor(np.asarray(scene.K[v], np.float64), scene.H, scene.W) / s
    return out
