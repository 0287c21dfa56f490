"""Images of a trained model from any camera, and the colour maps that make them visible.

Rendering goes through :meth:`taichi_neus.train.trainer.Trainer.render_rays` (chunked on the device);
rays are generated here in blocks of ``block`` pixels, so host memory beyond the output images
stays bounded at any resolution.
"""

from __future__ import annotations

import numpy as np

from taichi_neus.data.rays import iter_image_rays

MODES = ("rgb", "normal", "depth")

__all__ = ["MODES", "render_image", "colorize", "depth_range"]


def render_image(trainer, K, c2w, H: int, W: int, chunk: int = 4096, block: int = 1 << 16) -> dict:
    """Render an ``H x W`` image from intrinsics ``K (3, 3)`` and camera-to-world ``c2w (4, 4)``
    (unit-sphere coordinates, OpenCV axes).

    Returns:
        dict of float32 images: ``rgb (H, W, 3)``, ``opacity (H, W)``, ``depth (H, W)`` (Σ w·t,
        unit-sphere units along the unit ray), ``normal (H, W, 3)`` (Σ w·n, world axes).
    """
    out = {"rgb": np.zeros((H * W, 3), np.float32), "opacity": np.zeros(H * W, np.float32),
           "depth": np.zeros(H * W, np.float32), "normal": np.zeros((H * W, 3), np.float32)}
    for s, e, o, d in iter_image_rays(np.asarray(K, np.float64), np.asarray(c2w, np.float64), H, W, chunk=block):
        r = trainer.render_rays(o, d, chunk=chunk)
        for k in out:
            out[k][s:e] = r[k]
    return {k: v.reshape(H, W, 3) if v.ndim == 2 else v.reshape(H, W) for k, v in out.items()}


def depth_range(img: dict, c2w, offsets: tuple[float, float] | None = None) -> tuple[tuple[float, float], tuple]:
    """Depth range for :func:`colorize` that frames of a camera path share.

    The range is ``(d + lo, d + hi)`` with ``d`` the camera's distance from the origin. Without
    ``offsets`` they are measured on ``img``: the 2nd and 98th percentiles of the expected depth of
    its opaque pixels (opacity > 0.5) minus ``d`` (the whole unit sphere, ``(-1, 1)``, if none is
    opaque); pass the returned offsets for the following frames.

    Returns:
        ``((near, far), offsets)``, unit-sphere units.
    """
    d = float(np.linalg.norm(np.asarray(c2w, np.float64)[:3, 3]))
    if offsets is None:
        op = img["opacity"]
        z = (img["depth"] / np.maximum(op, 1e-6))[op > 0.5]
        offsets = (float(np.percentile(z, 2)) - d, float(np.percentile(z, 98)) - d) if z.size else (-1.0, 1.0)
    lo, hi = offsets
    return (max(d + lo, 0.0), max(d + hi, d + lo + 1e-3)), offsets


def colorize(img: dict, mode: str, near_far: tuple[float, float] | None = None) -> np.ndarray:
    """``(H, W, 3) float32`` in [0, 1] for display.

    * ``rgb``: the rendered colour, clipped.
    * ``normal``: world normal ``n`` as ``(n + 1) / 2``, faded to black by the opacity.
    * ``depth``: expected depth ``Σ w t / Σ w`` mapped linearly from ``near_far`` to 1 (near, white)
      … 0.15 (far), times the opacity (background black). ``near_far`` defaults to the 2nd and 98th
      percentiles of the opaque pixels.
    """
    op = np.clip(img["opacity"], 0.0, 1.0).astype(np.float32)
    if mode == "rgb":
        return np.clip(img["rgb"], 0.0, 1.0).astype(np.float32)
    if mode == "normal":
        n = img["normal"] / np.maximum(op[..., None], 1e-6)
        n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-6)
        return np.clip((n * 0.5 + 0.5) * op[..., None], 0.0, 1.0).astype(np.float32)
    if mode == "depth":
        z = img["depth"] / np.maximum(op, 1e-6)
        if near_far is None:
            fg = z[op > 0.5]
            near_far = (float(np.percentile(fg, 2)), float(np.percentile(fg, 98))) if fg.size else (0.0, 1.0)
        lo, hi = near_far
        v = 1.0 - 0.85 * np.clip((z - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
        return np.repeat((v * op)[..., None], 3, axis=-1).astype(np.float32)
    raise ValueError(f"unknown display mode '{mode}'; choose one of {', '.join(MODES)}")
