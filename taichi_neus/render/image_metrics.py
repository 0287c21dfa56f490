"""Image metrics: PSNR, SSIM and mask IoU of a rendered image against a photograph.

Host-side numpy (and scikit-image for SSIM). The trainer's validation and the ``eval`` command
score renders with these.
"""

from __future__ import annotations

import numpy as np

__all__ = ["psnr", "ssim", "mask_iou"]


def _as_unit_float(img) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    return a.astype(np.float64)


def psnr(pred, gt, mask=None) -> float:
    """Peak signal-to-noise ratio in dB, peak value 1: ``-10 log10(MSE)``.

    Args:
        pred, gt: ``(H, W, C)`` or ``(H, W)`` images, float in [0, 1] or uint8 (divided by 255).
        mask: optional ``(H, W)`` bool or 0/255 mask; the MSE is taken over masked pixels only
            (all channels).

    Returns:
        PSNR in dB (``inf`` for identical images).
    """
    p, g = _as_unit_float(pred), _as_unit_float(gt)
    if p.shape != g.shape:
        raise ValueError(f"psnr: shapes differ, {p.shape} vs {g.shape}")
    sq = (p - g) ** 2
    if mask is not None:
        m = np.asarray(mask) > (127 if np.asarray(mask).dtype == np.uint8 else 0.5)
        if m.shape != p.shape[:2]:
            raise ValueError(f"psnr: mask shape {m.shape} does not match image {p.shape[:2]}")
        if not m.any():
            return float("nan")
        sq = sq[m]
    mse = float(sq.mean())
    return float("inf") if mse == 0.0 else float(-10.0 * np.log10(mse))


def ssim(pred, gt) -> float:
    """Structural similarity (Wang et al. 2004) via ``skimage.metrics.structural_similarity``.

    Args:
        pred, gt: ``(H, W, C)`` or ``(H, W)`` images, float in [0, 1] or uint8; data range 1.

    Returns:
        Mean SSIM (7x7 uniform window, skimage's defaults).
    """
    from skimage.metrics import structural_similarity

    p, g = _as_unit_float(pred), _as_unit_float(gt)
    if p.shape != g.shape:
        raise ValueError(f"ssim: shapes differ, {p.shape} vs {g.shape}")
    return float(structural_similarity(p, g, data_range=1.0, channel_axis=-1 if p.ndim == 3 else None))


def mask_iou(opacity, mask, thresh: float = 0.5) -> float:
    """Intersection over union of ``opacity > thresh`` and the object mask.

    Args:
        opacity: ``(H, W)`` rendered opacity (sum of weights), float in [0, 1].
        mask: ``(H, W)`` bool, uint8 0/255, or float in [0, 1].
        thresh: opacity threshold.

    Returns:
        IoU in [0, 1]; 1.0 when both are empty.
    """
    a = np.asarray(opacity) > thresh
    m = np.asarray(mask)
    b = m > (127 if m.dtype == np.uint8 else 0.5)
    if a.shape != b.shape:
        raise ValueError(f"mask_iou: shapes differ, {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
