"""Device-resident buffers (``ti.ndarray``) and the few kernels that fill and copy them.

Large arrays are kept 1-D and touched with range-for loops of ``block_dim=1024``:
lavapipe (software Vulkan) launches at most 65,535 workgroups, so a default-sized
loop over >= 2^23 elements fails there (DESIGN §3b). ``to_numpy``/``from_numpy`` of
such arrays go through chunked kernels for the same reason.
"""


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
def _copy_out(src: ti.types.ndarray(dtype=ti.f32, ndim=1), dst: ti.types.ndarray(dtype=ti.f32, ndim=1),
              start: ti.i32):
    ti.loop_config(block_dim=1024)
    for i in range(dst.shape[0]):
        dst[i] = src[start + i]


@ti.kernel
def _copy_in(src: ti.types.ndarray(dtype=ti.f32, ndim=1), dst: ti.types.ndarray(dtype=ti.f32, ndim=1),
             start: ti.i32):
    ti.loop_config(block_dim=1024)
    for i in range(src.shape[0]):
        dst[start + i] = src[i]


def to_numpy(a) -> np.ndarray:
    """Copy a 1-D float32 ndarray to the host in chunks (safe for any size on every backend)."""
    n = a.shape[0]
    if len(a.shape) != 1 or n <= _CHUNK:
        return a.to_numpy()
    out = np.empty(n, np.float32)
    stage = ti.ndarray(ti.f32, shape=(_CHUNK,))
    for s in range(0, n, _CHUNK):
        m = min(_CHUNK, n - s)
        if m != _CHUNK:
            stage = ti.ndarray(ti.f32, shape=(m,))
        _copy_out(a, stage, s)
        out[s:s + m] = stage.to_numpy()
    return out


def from_numpy(a, values: np.ndarray) -> None:
    """Copy host ``values`` into the 1-D float32 ndarray ``a`` in chunks."""
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    n = a.shape[0]
    if values.shape[0] != n:
        raise ValueError(f"size mismatch: buffer has {n} elements, values {values.shape[0]}")
    if len(a.shape) != 1 or n <= _CHUNK:
        a.from_numpy(values.reshape(a.shape))
        return
    for s in range(0, n, _CHUNK):
        m = min(_CHUNK, n - s)
        stage = ti.ndarray(ti.f32, shape=(m,))
        stage.from_numpy(values[s:s + m])
        _copy_in(stage, a, s)


def upload(values: np.ndarray, dtype=ti.f32):
    """A new ndarray holding ``values`` (host → device)."""
    runtime.require_init()
    values = np.ascontiguousarray(values)
    a = ti.ndarray(dtype, shape=values.shape)
    a.from_numpy(values.astype(np.float32 if dtype == ti.f32 else np.int32, copy=False))
    return a
