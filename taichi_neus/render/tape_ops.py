"""NeuS compositing inside Taichi's own autodiff (``ti.ad.Tape``), with the hand-written backward.

``TapeCompositor.forward(sdf, normal, rgb, delta, t, dirs, ray_offsets, ray_counts, colour, opacity,
depth)`` reads per-sample Taichi fields and writes per-ray ones; inside a Tape its adjoint is
:meth:`NeuSCompositor.backward` (``ti.ad.grad_replaced``/``grad_for``), adding into ``sdf.grad``,
``normal.grad``, ``rgb.grad``, ``t.grad``, ``dirs.grad`` (those that exist) and ``self.variance.grad``.
Together with :class:`~taichi_neus.field.tape_ops.TapeField` and the caller's own kernels (e.g.
``x = o + t·d``, a loss) a whole differentiable render runs on a Tape, on every backend (fields, not
ndarrays, carry the gradients: DESIGN §3). The backward recomputes the forward (cheap next to the field).
"""

import taichi as ti

from taichi_neus import buffers
from taichi_neus.field.tape_ops import (
    has_grad,
    nd_add_scalar,
    nd_to_scalar,
    nd_to_vec,
    require_scalarised_cpu,
    scalar_to_nd,
    vec_to_nd,
)
from taichi_neus.render.compositing import NeuSCompositor

F1 = ti.types.ndarray(dtype=ti.f32, ndim=1)
F2 = ti.types.ndarray(dtype=ti.f32, ndim=2)
I1 = ti.types.ndarray(dtype=ti.i32, ndim=1)


@ti.kernel
def _add_owned_scalar(src: F1, dst: ti.template(), offsets: I1, counts: I1):
    """dst[i] += src[i] for the samples some ray owns (the compositor writes no others)."""
    for r in range(counts.shape[0]):
        for k in range(counts[r]):
            dst[offsets[r] + k] += src[offsets[r] + k]


@ti.kernel
def _add_owned_vec(src: F2, dst: ti.template(), offsets: I1, counts: I1):
    for r in range(counts.shape[0]):
        for k in range(counts[r]):
            i = offsets[r] + k
            # one vector add (per-component `dst[i][c] +=` here trips an LLVM codegen bug in taichi 1.7.4)
            dst[i] += ti.Vector([src[i, 0], src[i, 1], src[i, 2]])


@ti.kernel
def _add_vec(src: F2, dst: ti.template(), n: ti.i32):
    for i in range(n):
        for c in ti.static(range(3)):
            dst[i][c] += src[i, c]


class TapeCompositor:
    """NeuS compositing on Taichi fields, differentiable inside ``ti.ad.Tape``.

    Args:
        variance: initial NeuS variance v (s = exp(10·v)); kept in ``self.variance``,
            ``ti.field(ti.f32, shape=(1,), needs_grad=True)``.
        cos_anneal_ratio: r of the annealed cosine (1 after training). background: RGB behind the surface.
    """

    def __init__(self, variance: float, cos_anneal_ratio: float = 1.0, background=(0.0, 0.0, 0.0)):
        require_scalarised_cpu()
        self.variance = ti.field(ti.f32, shape=(1,), needs_grad=True)
        self.variance[0] = float(variance)
        self.cos_anneal_ratio = float(cos_anneal_ratio)
        self.background = tuple(float(c) for c in background)
        self.comp = NeuSCompositor()
        self._io: dict = {}

    def _buf(self, name: str, *shape, dtype=ti.f32):
        b = self._io.get(name)
        if b is None or tuple(b.shape) != shape:
            b = self._io[name] = buffers.f32(*shape) if dtype == ti.f32 else buffers.i32(*shape)
        return b

    def _run_forward(self, sdf, normal, rgb, delta, t, dirs, ray_offsets, ray_counts):
        S, R = sdf.shape[0], ray_counts.shape[0]
        ins = [self._buf("sdf", S), self._buf("normal", S, 3), self._buf("rgb", S, 3), self._buf("delta", S),
               self._buf("t", S), self._buf("dirs", R, 3)]
        for src, dst in zip((sdf, normal, rgb, delta, t, dirs), ins, strict=True):
            (vec_to_nd if len(dst.shape) == 2 else scalar_to_nd)(src, dst, dst.shape[0])
        offs, cnts = self._buf("offsets", R, dtype=ti.i32), self._buf("counts", R, dtype=ti.i32)
        scalar_to_nd(ray_offsets, offs, R)
        scalar_to_nd(ray_counts, cnts, R)
        var = self._buf("variance", 1)
        scalar_to_nd(self.variance, var, 1)
        out = self.comp.forward(*ins, offs, cnts, var, self.cos_anneal_ratio, self.background)
        return out, offs, cnts

    @ti.ad.grad_replaced
    def forward(self, sdf, normal, rgb, delta, t, dirs, ray_offsets, ray_counts, colour, opacity, depth):
        """Per sample (S,): sdf, delta, t ``ti.field(ti.f32)``; normal, rgb ``ti.Vector.field(3, ti.f32)``.
        Per ray (R,): dirs (Vector field, unit), ray_offsets, ray_counts ``ti.field(ti.i32)``; writes colour
        (Vector field), opacity and depth (scalar fields). Shapes, units and maths as
        :meth:`NeuSCompositor.forward`; δ gets no gradient."""
        out, _, _ = self._run_forward(sdf, normal, rgb, delta, t, dirs, ray_offsets, ray_counts)
        R = ray_counts.shape[0]
        nd_to_vec(out.colour, colour, R)
        nd_to_scalar(out.opacity, opacity, R)
        nd_to_scalar(out.depth, depth, R)

    @ti.ad.grad_for(forward)
    def backward(self, sdf, normal, rgb, delta, t, dirs, ray_offsets, ray_counts, colour, opacity, depth):
        _, offs, cnts = self._run_forward(sdf, normal, rgb, delta, t, dirs, ray_offsets, ray_counts)
        R = ray_counts.shape[0]
        gc, go, gd = self._buf("g_colour", R, 3), self._buf("g_opacity", R), self._buf("g_depth", R)
        vec_to_nd(colour.grad, gc, R)
        scalar_to_nd(opacity.grad, go, R)
        scalar_to_nd(depth.grad, gd, R)
        g = self.comp.backward(gc, go, gd, ray_inputs=True)
        for src, dst in ((g.sdf, sdf), (g.t, t)):
            if has_grad(dst):
                _add_owned_scalar(src, dst.grad, offs, cnts)
        for src, dst in ((g.normal, normal), (g.rgb, rgb)):
            if has_grad(dst):
                _add_owned_vec(src, dst.grad, offs, cnts)
        if has_grad(dirs):
            _add_vec(g.dirs, dirs.grad, R)
        nd_add_scalar(g.variance, self.variance.grad, 1)  # add, as Taichi's own adjoints do
