"""Gradient scaling against near-camera floaters (Philip & Deschaintre 2023, "Floaters No More:
Radiance Field Gradient Scaling for Improved Near-Camera Training", EGSR).

Why: a point close to a camera covers a large part of that camera's image, so many of its rays
sample it, each contributing a gradient; the sampling density along a ray is also highest near
its origin. Near-camera space therefore receives far more (and larger) gradient than distant
content and quickly grows density ("floaters") that explains individual training views but is
wrong in 3-D. The paper's fix is to multiply, in the backward pass only, the gradient of every
per-sample output (here the SDF, its gradient and the colour) by ``min(1, d²/σ²)``, ``d`` the
sample's distance from the ray origin and ``σ`` the typical camera-to-content distance: the
``d²`` compensates the ``1/d²`` growth of the per-point ray density, and content beyond ``σ`` is
left untouched. The forward pass (the rendered image) is unchanged.

Where it sits in a step: compositing backward → :meth:`GradScaling.apply` on the compositing
gradients → add the eikonal gradient (it is not a rendering gradient) → field backward.

Rules: ``"paper"`` (above), ``"none"`` (identity, no kernel is launched), a ``@ti.func`` taking
``(d, sigma)`` and returning the scale (compiled into the kernel), or any Python callable
``rule(d: np.ndarray) -> np.ndarray`` of per-sample scales (copies ``t`` to the host and the scales
back each call: slower, for experiments).
"""

import numpy as np
import taichi as ti

from taichi_neus import buffers
from taichi_neus.errors import UserInputError

F1 = ti.types.ndarray(dtype=ti.f32, ndim=1)
F2 = ti.types.ndarray(dtype=ti.f32, ndim=2)


@ti.func
def paper_rule(d, sigma):
    """min(1, d²/σ²) (Philip & Deschaintre 2023, eq. 4)."""
    return ti.min(1.0, d * d / (sigma * sigma))


def _make_kernel(rule_func):
    @ti.kernel
    def scale_kernel(g_sdf: F1, g_normal: F2, g_rgb: F2, t: F1, n: ti.i32, sigma: ti.f32):
        ti.loop_config(block_dim=1024)
        for i in range(n):
            k = rule_func(t[i], sigma)
            g_sdf[i] *= k
            for q in ti.static(range(3)):
                g_normal[i, q] *= k
                g_rgb[i, q] *= k

    return scale_kernel


@ti.kernel
def _scale_by_array(g_sdf: F1, g_normal: F2, g_rgb: F2, scale: F1, n: ti.i32):
    ti.loop_config(block_dim=1024)
    for i in range(n):
        k = scale[i]
        g_sdf[i] *= k
        for q in ti.static(range(3)):
            g_normal[i, q] *= k
            g_rgb[i, q] *= k


_KERNELS: dict = {}


def _kernel_for(rule_func):
    k = _KERNELS.get(rule_func)
    if k is None:
        k = _make_kernel(rule_func)
        _KERNELS[rule_func] = k
    return k


def _is_ti_func(f) -> bool:
    return bool(getattr(f, "_is_taichi_function", False))


class GradScaling:
    """Per-sample gradient scaling hook (see the module docstring).

    ``rule``: ``"paper"``, ``"none"``, a ``@ti.func`` ``(d, sigma) -> scale`` or a Python callable
    ``(d: np.ndarray (S,) float32) -> np.ndarray (S,)``. ``sigma``: typical camera-to-content
    distance in unit-sphere units (> 0; required by ``"paper"`` and ti.func rules).
    """

    def __init__(self, rule="paper", sigma: float = 1.0):
        if isinstance(rule, str) and rule not in ("paper", "none"):
            raise UserInputError(f"gradient scaling: unknown rule '{rule}'; use 'paper', 'none' or a callable.")
        if not isinstance(rule, str) and not callable(rule):
            raise UserInputError("gradient scaling: 'rule' must be 'paper', 'none' or a callable.")
        if not (np.isfinite(sigma) and sigma > 0):
            raise UserInputError(f"gradient scaling: sigma must be a positive distance, got {sigma}.")
        self.rule = rule
        self.sigma = float(sigma)
        self._scale_buf = None

    @property
    def is_identity(self) -> bool:
        return isinstance(self.rule, str) and self.rule == "none"

    def apply(self, grad_sdf, grad_normal, grad_rgb, t, n_samples: int) -> None:
        """Multiply, in place, the first ``n_samples`` entries of grad_sdf (S_cap,), grad_normal
        (S_cap, 3) and grad_rgb (S_cap, 3) by scale(t), t (S_cap,) the samples' distance from
        their ray origin (rays have unit directions). All float32 ndarrays."""
        n = int(n_samples)
        if self.is_identity or n == 0:
            return
        if isinstance(self.rule, str):
            _kernel_for(paper_rule)(grad_sdf, grad_normal, grad_rgb, t, n, self.sigma)
        elif _is_ti_func(self.rule):
            _kernel_for(self.rule)(grad_sdf, grad_normal, grad_rgb, t, n, self.sigma)
        else:
            d = t.to_numpy()[:n]
            scale = np.asarray(self.rule(d), dtype=np.float32)
            if scale.shape != (n,) or not np.all(np.isfinite(scale)):
                raise UserInputError(f"gradient scaling: the custom rule must return {n} finite scales "
                                     f"(one per sample), got shape {scale.shape}.")
            cap = t.shape[0]
            if self._scale_buf is None or self._scale_buf.shape[0] != cap:
                self._scale_buf = buffers.f32(cap)
            full = np.ones(cap, np.float32)
            full[:n] = scale
            self._scale_buf.from_numpy(full)
            _scale_by_array(grad_sdf, grad_normal, grad_rgb, self._scale_buf, n)

    __call__ = apply
