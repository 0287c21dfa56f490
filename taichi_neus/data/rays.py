"""Camera rays on the host (numpy), one batch at a time.

Pixel coordinates are continuous ``(x, y)`` = (column, row) with pixel ``(i, j)`` covering
``[i, i+1) x [j, j+1)``; its centre is ``(i + 0.5, j + 0.5)``. Cameras follow OpenCV (x right,
y down, z forward); ``K`` maps camera coordinates to these pixel coordinates and ``c2w`` is
camera-to-world in unit-sphere coordinates (see :mod:`taichi_neus.data.cameras`).
Computation is float64; results are float32.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def pixel_rays(K: np.ndarray, c2w: np.ndarray, pix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rays through continuous pixel positions.

    Args:
        K: (3, 3) or (B, 3, 3) intrinsics, pixels.
        c2w: (4, 4) or (B, 4, 4) (a (3, 4) top part is accepted) camera-to-world.
        pix: (B, 2) float pixel coordinates (x, y); the centre of pixel (i, j) is (i+0.5, j+0.5).

    Returns:
        origins: (B, 3) float32 camera centres, world (unit-sphere) coordinates.
        dirs: (B, 3) float32 unit directions, world coordinates. The point
            ``origins + s * dirs`` projects back to ``pix`` for every ``s > 0``.
    """
    pix = np.asarray(pix, np.float64).reshape(-1, 2)
    K = np.asarray(K, np.float64)
    c2w = np.asarray(c2w, np.float64)
    B = pix.shape[0]
    # Camera-frame direction K^-1 [x, y, 1] for an upper-triangular K, written out (batched).
    fx, fy = K[..., 0, 0], K[..., 1, 1]
    skew, cx, cy = K[..., 0, 1], K[..., 0, 2], K[..., 1, 2]
    yc = (pix[:, 1] - cy) / fy
    xc = (pix[:, 0] - cx - skew * yc) / fx
    d_cam = np.stack([xc, yc, np.ones(B)], axis=-1)  # (B, 3)
    rot = c2w[..., :3, :3]
    if rot.ndim == 2:
        d = d_cam @ rot.T
        o = np.broadcast_to(c2w[:3, 3], (B, 3))
    else:
        d = np.einsum("bij,bj->bi", rot, d_cam)
        o = c2w[:, :3, 3]
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    return np.ascontiguousarray(o, dtype=np.float32), d.astype(np.float32)


def unit_sphere_near_far(origins: np.ndarray, dirs: np.ndarray, radius: float = 1.0, min_near: float = 0.0):
    """Where rays enter and leave the sphere of ``radius`` about the origin.

    Args:
        origins: (B, 3) float, unit-sphere coordinates.
        dirs: (B, 3) float directions (need not be unit; distances are in units of ``|dirs|``).
        radius: sphere radius, unit-sphere units.
        min_near: near is at least this (e.g. to start in front of a camera inside the sphere).

    Returns:
        near: (B,) float32 ray parameter where the segment inside the sphere starts,
            ``max(entry, min_near)``.
        far: (B,) float32 where it ends (exit).
        hit: (B,) bool, True when the segment ``[near, far]`` is not empty. For misses
            ``near = far = min_near``.
    """
    o = np.asarray(origins, np.float64).reshape(-1, 3)
    d = np.asarray(dirs, np.float64).reshape(-1, 3)
    a = np.einsum("ij,ij->i", d, d)
    b = np.einsum("ij,ij->i", o, d)
    c = np.einsum("ij,ij->i", o, o) - radius * radius
    disc = b * b - a * c
    hit = (disc > 0) & (a > 0)
    root = np.sqrt(np.where(hit, disc, 0.0))
    a_safe = np.where(hit, a, 1.0)
    # Stable roots of a s^2 + 2 b s + c = 0 (avoid cancellation in -b + root).
    q = -(b + np.copysign(root, b))
    with np.errstate(divide="ignore", invalid="ignore"):
        s1 = np.where(hit, q / a_safe, 0.0)
        s2 = np.where(hit & (q != 0), c / np.where(q != 0, q, 1.0), 0.0)
    entry = np.minimum(s1, s2)
    exit_ = np.maximum(s1, s2)
    near = np.maximum(entry, min_near)
    hit &= exit_ > near
    near = np.where(hit, near, min_near)
    far = np.where(hit, exit_, min_near)
    return near.astype(np.float32), far.astype(np.float32), hit


def sphere_exit_vjp(origins: np.ndarray, dirs: np.ndarray, far: np.ndarray, g_far: np.ndarray,
                    radius: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """∂L/∂origin and ∂L/∂direction, (B, 3) float64 each, of the sphere exit ``far`` (B,) that
    :func:`unit_sphere_near_far` returns, given ∂L/∂far (B,).

    The exit t solves F = |d|²t² + 2(o·d)t + |o|² − r² = 0, so ∂t/∂o = −(o + t·d)/(|d|²t + o·d) and
    ∂t/∂d = t·∂t/∂o (implicit differentiation; the denominator is the discriminant's root, > 0 on a
    hit). Rays that miss the sphere, or whose exit lies behind ``near``, get zero.
    """
    o = np.asarray(origins, np.float64).reshape(-1, 3)
    d = np.asarray(dirs, np.float64).reshape(-1, 3)
    t = np.asarray(far, np.float64).reshape(-1)
    g = np.asarray(g_far, np.float64).reshape(-1)
    x = o + t[:, None] * d  # the exit point
    den = np.einsum("ij,ij->i", d, d) * t + np.einsum("ij,ij->i", o, d)
    on = np.abs(np.einsum("ij,ij->i", x, x) - radius * radius) < 1e-3 * radius * radius  # a real exit
    scale = np.where(on & (den > 1e-12), -g / np.where(den > 1e-12, den, 1.0), 0.0)
    g_o = scale[:, None] * x
    return g_o, t[:, None] * g_o


def image_pixels(H: int, W: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """(N, 2) float64 pixel-centre coordinates (x, y) of the image in row-major order.

    Flat index ``k = row * W + col`` maps to ``(col + 0.5, row + 0.5)``; ``start:stop`` selects
    a range of flat indices (default: all ``H * W``).
    """
    stop = H * W if stop is None else min(stop, H * W)
    k = np.arange(start, stop)
    return np.stack([k % W + 0.5, k // W + 0.5], axis=-1).astype(np.float64)


def image_rays(K: np.ndarray, c2w: np.ndarray, H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    """All ``H * W`` rays of one view through pixel centres, row-major: (H*W, 3) float32 each."""
    return pixel_rays(K, c2w, image_pixels(H, W))


def iter_image_rays(K: np.ndarray, c2w: np.ndarray, H: int, W: int, chunk: int = 65536) -> Iterator[tuple]:
    """Yield ``(start, stop, origins, dirs)`` for consecutive chunks of one view's rays.

    Rays ``start:stop`` of the row-major image (see :func:`image_rays`); concatenating the chunks
    gives :func:`image_rays`. ``chunk`` must be positive.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    n = H * W
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        o, d = pixel_rays(K, c2w, image_pixels(H, W, start, stop))
        yield start, stop, o, d
