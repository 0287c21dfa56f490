"""The field inside Taichi's own autodiff (``ti.ad.Tape``), with its hand-written backward plugged in.

``TapeField.forward(points, dirs, sdf, normal, rgb)`` reads and writes Taichi fields, so a Taichi
user composes it with their own differentiable kernels: kernels before it write ``points``/``dirs``,
kernels after it read ``sdf``/``normal``/``rgb`` into a loss; ``ti.ad.Tape(loss)`` runs their adjoints
and, for this call, :meth:`SDFField.backward` (registered with ``ti.ad.grad_replaced``/``grad_for``),
which adds into ``points.grad``, ``dirs.grad`` and ``self.params.grad``.

Why fields: on Vulkan and Metal Taichi's reverse mode leaves ndarray gradients at zero (DESIGN §3);
fields with ``needs_grad=True`` work on every backend, and the field's own kernels are not
differentiated by Taichi at all (they run forward and hand-written backward), so this adapter gives the
same gradients on CPU, CUDA, Vulkan and Metal. Inputs and outputs are copied between the caller's
fields and the field's device buffers (a kernel launch each, on the device, no host round trip).

The backward recomputes the forward from ``points``/``dirs`` (which the global data access rule keeps
unchanged until the Tape ends), so any number of calls may sit on one Tape.
"""

import numpy as np
import taichi as ti

from taichi_neus import buffers, runtime
from taichi_neus.field.sdf_field import SDFField

F1 = ti.types.ndarray(dtype=ti.f32, ndim=1)
F2 = ti.types.ndarray(dtype=ti.f32, ndim=2)


@ti.kernel
def vec_to_nd(src: ti.template(), dst: F2, n: ti.i32):
    for i in range(n):
        for c in ti.static(range(3)):
            dst[i, c] = src[i][c]


@ti.kernel
def nd_to_vec(src: F2, dst: ti.template(), n: ti.i32):
    for i in range(n):
        for c in ti.static(range(3)):
            dst[i][c] = src[i, c]


@ti.kernel
def nd_add_vec(src: F2, dst: ti.template(), n: ti.i32):
    for i in range(n):
        for c in ti.static(range(3)):
            dst[i][c] += src[i, c]


@ti.kernel
def scalar_to_nd(src: ti.template(), dst: ti.types.ndarray(ndim=1), n: ti.i32):
    ti.loop_config(block_dim=1024)  # parameter vectors pass 2^23 entries: lavapipe's workgroup limit (DESIGN §3b)
    for i in range(n):
        dst[i] = src[i]


@ti.kernel
def nd_to_scalar(src: F1, dst: ti.template(), n: ti.i32):
    ti.loop_config(block_dim=1024)
    for i in range(n):
        dst[i] = src[i]


@ti.kernel
def nd_add_scalar(src: F1, dst: ti.template(), n: ti.i32):
    ti.loop_config(block_dim=1024)
    for i in range(n):
        dst[i] += src[i]


def require_scalarised_cpu() -> None:
    """Refuse the Tape operations when the CPU compiles vectors as SIMD vectors: the Taichi kernels a
    user writes around them (``x = o + t * d`` on Vector fields) would abort the process in Taichi
    1.7.4's compiler instead of raising (see :func:`taichi_neus.runtime.simd_enabled`)."""
    if runtime.simd_enabled():
        raise runtime.BackendError(
            "the Tape operations need Taichi's default vector handling on the CPU: call "
            "taichi_neus.runtime.init('cpu', simd=False) (or set TAICHI_NEUS_SIMD=0) before creating them, "
            "because Taichi 1.7.4 cannot compile whole-vector arithmetic on Vector fields with SIMD on.")


def has_grad(f) -> bool:
    """Whether the Taichi field ``f`` was made with ``needs_grad=True`` (``f.grad`` exists either way)."""
    return f.grad is not None and bool(f.snode.ptr.has_adjoint())


class TapeField:
    """An :class:`SDFField` whose forward is a ``ti.ad.grad_replaced`` call on Taichi fields.

    Args:
        field: the :class:`SDFField`.
        params: (P,) initial flat parameters (Taichi ndarray or numpy). They are copied into
            ``self.params``, a ``ti.field(ti.f32, shape=(P,), needs_grad=True)``: the trainable state a
            Taichi optimiser updates; ``self.params.grad`` receives dL/dθ (cleared by ``ti.ad.Tape`` on entry).
        eps: finite-difference step of the normals, unit-sphere units (default ``field.cfg.fd_eps``).
    """

    def __init__(self, field: SDFField, params, eps: float | None = None):
        require_scalarised_cpu()
        self.field = field
        host = params if isinstance(params, np.ndarray) else buffers.to_numpy(params)
        host = np.ascontiguousarray(host, np.float32).reshape(-1)
        self.n_params = host.size
        self.params = ti.field(ti.f32, shape=(self.n_params,), needs_grad=True)
        self._p = buffers.f32(self.n_params)
        self._g = buffers.f32(self.n_params)
        buffers.from_numpy(self._p, host)
        nd_to_scalar(self._p, self.params, self.n_params)
        self.eps = field.cfg.fd_eps if eps is None else float(eps)
        self._io: dict = {}

    def _buf(self, name: str, n: int):
        b = self._io.get(name)
        if b is None or b.shape[0] != n:
            b = self._io[name] = buffers.f32(n, 3)
        return b

    def _run_forward(self, points, dirs, n: int):
        scalar_to_nd(self.params, self._p, self.n_params)
        x, d = self._buf("x", n), self._buf("d", n)
        vec_to_nd(points, x, n)
        vec_to_nd(dirs, d, n)
        return self.field.forward(x, d, n, self._p, eps=self.eps)

    @ti.ad.grad_replaced
    def forward(self, points, dirs, sdf, normal, rgb):
        """points, dirs: ``ti.Vector.field(3, ti.f32, shape=(N,))`` (unit-sphere coordinates; unit view
        directions); writes sdf ``ti.field(ti.f32, shape=(N,))``, normal and rgb (Vector fields (N,)).
        Gradients (inside a Tape): to ``points``, ``dirs`` (when they have ``needs_grad``) and ``self.params``."""
        n = points.shape[0]
        out = self._run_forward(points, dirs, n)
        nd_to_scalar(out.sdf, sdf, n)
        nd_to_vec(out.normal, normal, n)
        nd_to_vec(out.rgb, rgb, n)

    @ti.ad.grad_for(forward)
    def backward(self, points, dirs, sdf, normal, rgb):
        n = points.shape[0]
        self._run_forward(points, dirs, n)  # the Tape may have run other forwards since: recompute
        gs = buffers.f32(n)
        scalar_to_nd(sdf.grad, gs, n)
        gn, gr = self._buf("gn", n), self._buf("gr", n)
        vec_to_nd(normal.grad, gn, n)
        vec_to_nd(rgb.grad, gr, n)
        gx, gd = self._buf("gx", n), self._buf("gd", n)
        buffers.zero_(self._g)
        self.field.backward(gs, gn, gr, self._p, self._g, dpoints=gx, ddirs=gd)
        nd_add_scalar(self._g, self.params.grad, self.n_params)
        if has_grad(points):
            nd_add_vec(gx, points.grad, n)
        if has_grad(dirs):
            nd_add_vec(gd, dirs.grad, n)
