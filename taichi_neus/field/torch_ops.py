"""The field as a differentiable torch function over its Taichi kernels.

``field_forward(field, params, points, dirs)`` → ``(sdf, normal, rgb)`` composes with any torch
code; its backward runs the field's hand-written backward passes (:meth:`SDFField.backward`), so
gradients reach the flat parameter vector, the points and the view directions.

Backends: on CPU and CUDA torch tensors go into the kernels without a copy; on Vulkan and Metal
Taichi copies every torch tensor both ways on every launch, so this adapter works there but slowly
(use the Taichi-autodiff adapter, :mod:`taichi_neus.field.tape_ops`, to stay on the device).

Every call gets fresh output and gradient tensors; the parameter gradient is a new tensor, never
the leaf's own ``.grad`` (torch adds it there), so nothing is doubled and nothing carries over
between calls. The field's activations live in its workspace: when another forward of the same
field ran between this call's forward and backward, the backward first recomputes its forward.
"""


import taichi as ti
import torch

from taichi_neus.field.sdf_field import SDFField


@ti.kernel
def _copy1(src: ti.types.ndarray(dtype=ti.f32, ndim=1), dst: ti.types.ndarray(dtype=ti.f32, ndim=1), n: ti.i32):
    for i in range(n):
        dst[i] = src[i]


@ti.kernel
def _copy2(src: ti.types.ndarray(dtype=ti.f32, ndim=2), dst: ti.types.ndarray(dtype=ti.f32, ndim=2), n: ti.i32):
    for i, c in ti.ndrange(n, dst.shape[1]):
        dst[i, c] = src[i, c]


def f32(t: torch.Tensor) -> torch.Tensor:
    """A contiguous float32 copy-free view of ``t`` when possible (detached: the kernels read it)."""
    return t.detach().to(torch.float32).contiguous()


def to_torch(src, n: int, device, cols: int | None = None) -> torch.Tensor:
    """Rows ``[0, n)`` of a Taichi float32 buffer as a new torch tensor on ``device`` (a kernel copy)."""
    shape = (n,) if cols is None else (n, cols)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    if n > 0:
        (_copy1 if cols is None else _copy2)(src, out, n)
    return out


def grad_or_zeros(g: torch.Tensor | None, shape, device) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float32, device=device) if g is None else f32(g)


class FieldFunction(torch.autograd.Function):
    """autograd.Function over :meth:`SDFField.forward` / :meth:`SDFField.backward`; use :func:`field_forward`."""

    @staticmethod
    def forward(ctx, params, points, dirs, field: SDFField, eps: float):
        n = points.shape[0]
        th, p, d = f32(params), f32(points), f32(dirs)
        dev = points.device
        if n == 0:  # Taichi buffers cannot be empty: nothing to evaluate
            sdf, normal, rgb = (torch.zeros(s, dtype=torch.float32, device=dev) for s in ((0,), (0, 3), (0, 3)))
        else:
            out = field.forward(p, d, n, th, eps=eps)
            sdf = to_torch(out.sdf, n, dev)
            normal = to_torch(out.normal, n, dev, 3)
            rgb = to_torch(out.rgb, n, dev, 3)
        ctx.save_for_backward(th, p, d)
        ctx.field, ctx.eps, ctx.token = field, eps, field.forward_count
        ctx.dtypes = (params.dtype, points.dtype, dirs.dtype)
        return sdf, normal, rgb

    @staticmethod
    def backward(ctx, g_sdf, g_normal, g_rgb):
        th, p, d = ctx.saved_tensors
        field, n, dev = ctx.field, p.shape[0], p.device
        # a fixed field (e.g. pose refinement): skip the weight reductions and the hash table's scatter
        g_params = torch.zeros_like(th) if ctx.needs_input_grad[0] else None
        # point and direction gradients only when asked for (they cost a pass over the table)
        want_inputs = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        g_points = torch.zeros((n, 3), dtype=torch.float32, device=dev) if want_inputs else None
        g_dirs = torch.zeros((n, 3), dtype=torch.float32, device=dev) if want_inputs else None
        if n > 0:
            if field.forward_count != ctx.token:  # another forward overwrote the activations
                field.forward(p, d, n, th, eps=ctx.eps)
            field.backward(grad_or_zeros(g_sdf, (n,), dev), grad_or_zeros(g_normal, (n, 3), dev),
                           None if g_rgb is None else f32(g_rgb), th, g_params, dpoints=g_points, ddirs=g_dirs)
            ctx.token = field.forward_count
        tp, tx, td = ctx.dtypes
        return (None if g_params is None else g_params.to(tp), None if g_points is None else g_points.to(tx),
                None if g_dirs is None else g_dirs.to(td), None, None)


def field_forward(field: SDFField, params: torch.Tensor, points: torch.Tensor, dirs: torch.Tensor,
                  eps: float | None = None):
    """Evaluate the SDF field, differentiably.

    Args:
        field: the :class:`SDFField` (its configuration and parameter layout).
        params: (P,) float tensor, the flat parameter vector (``P = layout.total``). Carries a gradient.
        points: (N, 3) float tensor, unit-sphere coordinates. Carries a gradient (through the hash
            encoding's trilinear weights, the MLPs' xyz inputs and every finite-difference stencil point;
            piecewise smooth: the trilinear weights' slope jumps across grid cell faces).
        dirs: (N, 3) float tensor, unit view directions (the direction the ray travels). Carries a
            gradient (through the SH encoding, as the polynomials are written: no renormalisation).
        eps: finite-difference step of the normal, unit-sphere units (default ``field.cfg.fd_eps``;
            unused with ``normal_mode='analytic'``, whose normal is the exact gradient; the points'
            gradient then goes through the trilinear weights' second derivatives).

    Returns:
        sdf (N,), normal (N, 3) (the SDF gradient, not normalised), rgb (N, 3) in
        [0, 1]: float32 tensors on ``points.device``. Computed in float32 whatever the input dtype;
        the gradients come back in the inputs' dtypes.
    """
    eps = field.cfg.fd_eps if eps is None else float(eps)
    return FieldFunction.apply(params, points, dirs, field, eps)
