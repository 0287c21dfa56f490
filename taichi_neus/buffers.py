"""Device-resident buffers (``ti.ndarray``) and the few kernels that fill and copy them.

Large arrays are kept 1-D and touched with range-for loops of ``block_dim=1024``:
lavapipe (software Vulkan) launches at most 65,535 workgroups, so a default-sized
loop over >= 2^23 elements fails there (DESIGN §3b). ``to_numpy``/``from_numpy`` of
such arrays go through chunked kernels for the same reason.
"""


import ctypes

import numpy as np
import taichi as ti

from taichi_neus import runtime

_CHUNK = 1 << 21


def f32(*shape: int):
    """A zero-filled float32 ndarray of ``shape`` on the current backend."""
    runtime.require_init()
    a = ti.ndarray(ti.f32, shape=tuple(int(s) for s in shape))
    zero_(a)
    return a


def i32(*shape: int):
    """A zero-filled int32 ndarray of ``shape`` on the current backend."""
    runtime.require_init()
    a = ti.ndarray(ti.i32, shape=tuple(int(s) for s in shape))
    zero_(a)
    return a


@ti.kernel
def _fill1_f32(a: ti.types.ndarray(dtype=ti.f32, ndim=1), v: ti.f32):
    ti.loop_config(block_dim=1024)
    for i in range(a.shape[0]):
        a[i] = v


@ti.kernel
def _fill1_i32(a: ti.types.ndarray(dtype=ti.i32, ndim=1), v: ti.i32):
    ti.loop_config(block_dim=1024)
    for i in range(a.shape[0]):
        a[i] = v


def fill_(a, value) -> None:
    """Set every element of ``a`` to ``value`` (any shape; works past 2^23 elements on lavapipe)."""
    if len(a.shape) == 1 and a.dtype == ti.f32:
        _fill1_f32(a, float(value))
    elif len(a.shape) == 1 and a.dtype == ti.i32:
        _fill1_i32(a, int(value))
    else:
        a.fill(value)


def zero_(a) -> None:
    fill_(a, 0)


@ti.kernel
def _add_rows3(dst: ti.types.ndarray(dtype=ti.f32, ndim=2), src: ti.types.ndarray(dtype=ti.f32, ndim=2), n: ti.i32):
    for m in range(n):
        for c in ti.static(range(3)):
            dst[m, c] += src[m, c]


def add_rows3_(dst, src, n: int | None = None) -> None:
    """``dst[:n] += src[:n]`` for (N, 3) float32 ndarrays (gradients of points, directions or normals);
    ``n`` defaults to all of ``dst``'s rows."""
    _add_rows3(dst, src, dst.shape[0] if n is None else int(n))


@ti.kernel
def _copy_out(src: ti.types.ndarray(ndim=1), dst: ti.types.ndarray(ndim=1), start: ti.i32):
    ti.loop_config(block_dim=1024)
    for i in range(dst.shape[0]):
        dst[i] = src[start + i]


@ti.kernel
def _copy_in(src: ti.types.ndarray(ndim=1), dst: ti.types.ndarray(ndim=1), start: ti.i32):
    ti.loop_config(block_dim=1024)
    for i in range(src.shape[0]):
        dst[start + i] = src[i]


def _host_dtype(a):
    """(Taichi dtype, numpy dtype) of a float32 or int32 ndarray (the Adam step counts are int32)."""
    return (ti.i32, np.int32) if a.dtype == ti.i32 else (ti.f32, np.float32)


def to_numpy(a, rows: int | None = None) -> np.ndarray:
    """A host copy of a float32 (or int32) ndarray, or of its first ``rows`` rows. On the CPU a copy from
    :func:`host_view` (Taichi's own ``to_numpy`` launches a kernel: ~0.25 ms each, a dozen a training step);
    elsewhere 1-D arrays go in chunks (safe for any size on every backend)."""
    h = host_view(a)
    if h is not None:
        ti.sync()
        return (h if rows is None else h[:rows]).copy()
    if rows is not None:
        return to_numpy(a)[:rows]
    n = a.shape[0]
    if len(a.shape) != 1 or n <= _CHUNK:
        return a.to_numpy()
    tdt, ndt = _host_dtype(a)
    out = np.empty(n, ndt)
    stage = ti.ndarray(tdt, shape=(_CHUNK,))
    for s in range(0, n, _CHUNK):
        m = min(_CHUNK, n - s)
        if m != _CHUNK:
            stage = ti.ndarray(tdt, shape=(m,))
        _copy_out(a, stage, s)
        out[s:s + m] = stage.to_numpy()
    return out


def from_numpy(a, values: np.ndarray) -> None:
    """Copy host ``values`` (as many elements as ``a`` holds) into the float32 (or int32) ndarray ``a``: on the
    CPU straight into its :func:`host_view`, elsewhere (1-D) in chunks."""
    tdt, ndt = _host_dtype(a)
    values = np.ascontiguousarray(values, dtype=ndt).reshape(-1)
    n = int(np.prod(a.shape))
    if values.shape[0] != n:
        raise ValueError(f"size mismatch: buffer has {n} elements, values {values.shape[0]}")
    h = host_view(a)
    if h is not None:
        ti.sync()
        h.reshape(-1)[:] = values
        return
    if len(a.shape) != 1 or n <= _CHUNK:
        a.from_numpy(values.reshape(a.shape))
        return
    for s in range(0, n, _CHUNK):
        m = min(_CHUNK, n - s)
        stage = ti.ndarray(tdt, shape=(m,))
        stage.from_numpy(values[s:s + m])
        _copy_in(stage, a, s)


def upload(values: np.ndarray, dtype=ti.f32):
    """A new ndarray holding ``values`` (host → device)."""
    runtime.require_init()
    values = np.ascontiguousarray(values)
    a = ti.ndarray(dtype, shape=values.shape)
    h = host_view(a)
    if h is not None:
        h[...] = values
        return a
    a.from_numpy(values.astype(np.float32 if dtype == ti.f32 else np.int32, copy=False))
    return a


# ---------------------------------------------------------------------------------------------
# Rows of 16-float vectors: the activation layout of the MLP and hash-grid kernels.
#
# A ``(M, D)`` activation matrix is stored as an ndarray of shape ``(M, ceil(D/16))`` whose
# element is a 16-float vector, so column ``c`` of row ``m`` is ``X[m, c // 16][c % 16]``.
# With ``real_matrix_scalarize=False`` (CPU, see runtime.init) one element is one LLVM vector
# load; Vulkan/Metal scalarise the same source. LLVM assumes such loads are naturally aligned
# (64 bytes): a misaligned base segfaults instead of failing, so every vector buffer the kernels
# see goes through :func:`check_aligned` (DESIGN §3c). Padding columns are zero when allocated.

VW = 16
V16 = ti.types.vector(VW, ti.f32)
ROWS16 = ti.types.ndarray(dtype=V16, ndim=2)
_ALIGN = 64


class MisalignedBufferError(ValueError):
    """A buffer handed to the vector kernels does not start on a 64-byte boundary."""


def blocks(cols: int) -> int:
    """16-float blocks needed for ``cols`` columns."""
    return (int(cols) + VW - 1) // VW


def data_ptr(a) -> int | None:
    """Address of ``a``'s first element in host memory, or None where it has none (GPU/Vulkan ndarrays)."""
    if isinstance(a, np.ndarray):
        return int(a.ctypes.data)
    if hasattr(a, "data_ptr") and hasattr(a, "is_cuda"):  # torch tensor
        return None if a.is_cuda else int(a.data_ptr())
    if isinstance(a, ti.lang._ndarray.Ndarray):
        if runtime.current_arch() != "cpu":
            return None
        return int(ti.lang.impl.get_runtime().prog.get_ndarray_data_ptr_as_int(a.arr))
    raise TypeError(f"not a buffer: {type(a).__name__}")


def host_view(a) -> np.ndarray | None:
    """A zero-copy numpy view of the float32 or int32 ndarray ``a`` (its shape) where its memory is the
    host's (the CPU backend), else None. Writes through the view change ``a``; the view is valid while ``a``
    lives, so the caller keeps ``a``. A Taichi launch with such a view costs no copy on the CPU."""
    if not isinstance(a, ti.lang._ndarray.ScalarNdarray) or a.dtype not in (ti.f32, ti.i32):  # not vector ones
        return None
    p = data_ptr(a)
    if p is None:
        return None
    ctype = ctypes.c_int32 if a.dtype == ti.i32 else ctypes.c_float
    return np.ctypeslib.as_array(ctypes.cast(p, ctypes.POINTER(ctype)), shape=tuple(a.shape))


def vec16_view(a, start: int, stop: int) -> np.ndarray | None:
    """``a[start:stop]`` of a flat float32 ndarray as a zero-copy ``((stop − start) / 16, 16)`` numpy array,
    for kernels that read 16-float vectors (one SIMD load each on the CPU, DESIGN §3c): on the CPU backend
    with SIMD vectors on, ``start`` and ``stop`` multiples of 16 and the address 64-byte aligned; else None
    (the caller then runs its scalar kernel)."""
    if start % VW or stop % VW or stop <= start or not runtime.simd_enabled():
        return None
    h = host_view(a)
    if h is None or h.ndim != 1 or h.dtype != np.float32 or stop > h.shape[0] or h.ctypes.data % _ALIGN:
        return None
    return h[start:stop].reshape(-1, VW)


def check_aligned(a, what: str = "buffer"):
    """Return ``a`` if its data starts on a 64-byte boundary (or lives off the host), else raise
    :class:`MisalignedBufferError`: a misaligned vector load would crash the process."""
    p = data_ptr(a)
    if p is not None and p % _ALIGN:
        raise MisalignedBufferError(
            f"{what} starts at address {p:#x}, not on a {_ALIGN}-byte boundary: the 16-float vector kernels "
            "would crash on it; allocate it with taichi_neus.buffers.rows16 (or pass an aligned copy).")
    return a


@ti.kernel
def _zero16(a: ROWS16):
    ti.loop_config(block_dim=1024)  # range-for, not fill(): lavapipe's 65,535-workgroup limit
    for i in range(a.shape[0] * a.shape[1]):
        a[i // a.shape[1], i % a.shape[1]] = ti.Vector([0.0] * VW)


def rows16(rows: int, cols: int):
    """A zero-filled ``(rows, blocks(cols))`` ndarray of 16-float vectors (row-major ``(rows, cols)``
    activations, columns padded to a multiple of 16 with zeros)."""
    runtime.require_init()
    a = ti.ndarray(V16, shape=(max(int(rows), 1), blocks(cols)))
    _zero16(a)
    return check_aligned(a, "a new vector buffer")


def rows16_to_numpy(a, cols: int | None = None) -> np.ndarray:
    """``(rows, cols)`` float32 host copy of a :func:`rows16` buffer (all padded columns if cols is None)."""
    h = a.to_numpy()
    h = h.reshape(h.shape[0], -1)
    return h if cols is None else h[:, :cols]


def rows16_upload(values: np.ndarray):
    """A new :func:`rows16` buffer holding the ``(rows, cols)`` host array ``values``."""
    values = np.asarray(values, np.float32)
    a = rows16(values.shape[0], values.shape[1])
    h = np.zeros((values.shape[0], a.shape[1] * VW), np.float32)
    h[:, :values.shape[1]] = values
    a.from_numpy(h.reshape(values.shape[0], a.shape[1], VW))
    return a


@ti.func
def get(X: ti.template(), m, c):
    """Column ``c`` of row ``m`` of a rows16 buffer."""
    return X[m, c // VW][c % VW]


@ti.func
def put(X: ti.template(), m, c, v):
    """Set column ``c`` of row ``m`` of a rows16 buffer."""
    X[m, c // VW][c % VW] = v
