"""Structure-from-motion points as geometric supervision (Geo-NeuS, Fu et al., NeurIPS 2022, §3.2).

COLMAP's sparse points lie on the surface up to their triangulation error, so the SDF should vanish
there: the trainer adds ``λ Σ w_i |f(p_i)| / Σ w_i`` (:func:`taichi_neus.train.losses.sparse_sdf`).
This module chooses the points and their weights when a COLMAP scene is loaded:

- only points inside the unit sphere (the region the field models) seen by at least 2 views;
- with masks, only points that land on the object's mask in at least :data:`MASK_AGREEMENT` of the
  views whose image they fall in (the table and the backdrop have points too, and the mask loss
  empties them);
- weight ``w = min(track, TRACK_FULL) / TRACK_FULL · exp(−err² / (2 σ²))``, σ = :data:`ERROR_SIGMA`
  pixels: a point seen by more views and reprojecting better is trusted more (the weighting asked
  for in issue 12; Geo-NeuS weights all points alike), then scaled to mean 1.

Geo-NeuS supervises the points visible in the view being trained; here a random batch of all kept
points is drawn each step (every point is visible in at least two training views by construction).
"""

from __future__ import annotations

import numpy as np

MASK_AGREEMENT = 0.8
TRACK_FULL = 5
ERROR_SIGMA = 1.0  # pixels


def point_weights(errors: np.ndarray, tracks: np.ndarray) -> np.ndarray:
    """(N,) float64 unnormalised weights from reprojection errors (pixels) and track lengths (views)."""
    e = np.asarray(errors, np.float64)
    t = np.asarray(tracks, np.float64)
    return np.minimum(t, TRACK_FULL) / TRACK_FULL * np.exp(-0.5 * (e / ERROR_SIGMA) ** 2)


def on_masks(points_unit: np.ndarray, K: np.ndarray, c2w: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N,) bool: the point lands on the mask (> 127) in at least MASK_AGREEMENT of the views whose image
    it falls in. points_unit (N, 3), K (V, 3, 3), c2w (V, 4, 4) unit-sphere, masks (V, H, W) uint8."""
    V, H, W = masks.shape
    hits = np.zeros(len(points_unit))
    seen = np.zeros(len(points_unit))
    for v in range(V):
        R, c = c2w[v, :3, :3], c2w[v, :3, 3]
        pc = (points_unit - c) @ R  # camera frame: R^T (p - c)
        z = pc[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            uv = pc[:, :2] / z[:, None] * np.diag(K[v])[:2] + K[v, :2, 2]
        ok = (z > 1e-6) & (uv[:, 0] >= 0) & (uv[:, 0] < W) & (uv[:, 1] >= 0) & (uv[:, 1] < H)
        ix = np.clip(np.nan_to_num(uv[:, 0]).astype(np.int64), 0, W - 1)
        iy = np.clip(np.nan_to_num(uv[:, 1]).astype(np.int64), 0, H - 1)
        seen += ok
        hits += ok & (masks[v, iy, ix] > 127)
    return (seen > 0) & (hits >= MASK_AGREEMENT * seen)


def supervision_points(xyz_world: np.ndarray, errors: np.ndarray, tracks: np.ndarray, scale_mat: np.ndarray,
                       K: np.ndarray, c2w: np.ndarray, masks: np.ndarray | None):
    """The points the SDF is pulled to zero at, and their weights.

    Args:
        xyz_world: (N, 3) world points; errors: (N,) reprojection errors, pixels; tracks: (N,) views per point;
        scale_mat: (4, 4) unit sphere -> world; K (V, 3, 3), c2w (V, 4, 4) unit-sphere cameras; masks:
        (V, H, W) uint8 or None.

    Returns:
        (M, 3) float32 unit-sphere points and (M,) float32 weights with mean 1, or (None, None) if none is kept.
    """
    p = np.asarray(xyz_world, np.float64).reshape(-1, 3)
    unit = np.linalg.solve(scale_mat[:3, :3], (p - scale_mat[:3, 3]).T).T
    keep = np.isfinite(unit).all(1) & (np.linalg.norm(unit, axis=1) < 1.0) & (np.asarray(tracks) >= 2) \
        & np.isfinite(errors)
    if masks is not None and keep.any():
        keep[keep] = on_masks(unit[keep], K, c2w, masks)
    if not keep.any():
        return None, None
    w = point_weights(np.asarray(errors)[keep], np.asarray(tracks)[keep])
    w = w / max(float(w.mean()), 1e-12)
    return unit[keep].astype(np.float32), w.astype(np.float32)
