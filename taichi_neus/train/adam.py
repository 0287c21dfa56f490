"""Adam (Kingma & Ba, 2015) over the flat parameter buffer, as one Taichi kernel per
parameter group, so an optimisation step never leaves the device.

Groups are contiguous runs of the flat buffer (see :class:`ParamLayout.groups`), each with
its own learning rate and (decoupled, AdamW-style) weight decay.

A group may be updated *sparsely*, as tiny-cuda-nn does for hash tables (Müller et al. 2022,
§4): an entry whose gradient is exactly zero this step (no sample touched its hash cell) is left
alone — no moment decay, no weight decay, no step — and each entry counts its own steps for the
bias correction, so an entry touched for the k-th time is corrected as Adam's k-th step.
"""

from dataclasses import dataclass

import numpy as np
import taichi as ti

from taichi_neus import buffers
from taichi_neus.field.params import ParamLayout


@ti.func
def _update(params: ti.template(), m: ti.template(), v: ti.template(), i, g, lr, beta1, beta2, eps, bc1, bc2, wd):
    """One entry's AdamW step: moments, bias-corrected update, decoupled weight decay."""
    mi = beta1 * m[i] + (1.0 - beta1) * g
    vi = beta2 * v[i] + (1.0 - beta2) * g * g
    m[i] = mi
    v[i] = vi
    p = params[i]
    params[i] = p - lr * ((mi / bc1) / (ti.sqrt(vi / bc2) + eps) + wd * p)


@ti.kernel
def _adam_run(params: ti.types.ndarray(dtype=ti.f32, ndim=1), grads: ti.types.ndarray(dtype=ti.f32, ndim=1),
              m: ti.types.ndarray(dtype=ti.f32, ndim=1), v: ti.types.ndarray(dtype=ti.f32, ndim=1),
              start: ti.i32, size: ti.i32, lr: ti.f32, beta1: ti.f32, beta2: ti.f32, eps: ti.f32,
              bc1: ti.f32, bc2: ti.f32, wd: ti.f32, grad_scale: ti.f32, zero: ti.i32):
    ti.loop_config(block_dim=1024)
    for k in range(size):
        i = start + k
        g = grads[i]
        if zero != 0:  # the next step's gradients start from zero: no separate pass over the buffer
            grads[i] = 0.0
        _update(params, m, v, i, g * grad_scale, lr, beta1, beta2, eps, bc1, bc2, wd)


_VEC1 = ti.types.ndarray(dtype=buffers.V16, ndim=1)


@ti.kernel
def _adam_run16(params: _VEC1, grads: _VEC1, m: _VEC1, v: _VEC1, lr: ti.f32, beta1: ti.f32, beta2: ti.f32,
                eps: ti.f32, bc1: ti.f32, bc2: ti.f32, wd: ti.f32, grad_scale: ti.f32, zero: ti.i32):
    """:func:`_adam_run` over 16-float vectors (views of the same flat buffers, :func:`buffers.vec16_view`).
    A CPU parallel loop calls its body once per index (DESIGN §3c): per float, that call and the scalar
    division and square root made the dense pass 3-4x slower than this one (45 against 14 ms over 13M
    floats, 2026-11-28)."""
    ti.loop_config(block_dim=64)
    for i in range(params.shape[0]):
        g = grads[i]
        if zero != 0:
            grads[i] = ti.Vector([0.0] * buffers.VW)
        _update(params, m, v, i, g * grad_scale, lr, beta1, beta2, eps, bc1, bc2, wd)


@ti.kernel
def _adam_sparse_run(params: ti.types.ndarray(dtype=ti.f32, ndim=1), grads: ti.types.ndarray(dtype=ti.f32, ndim=1),
                     m: ti.types.ndarray(dtype=ti.f32, ndim=1), v: ti.types.ndarray(dtype=ti.f32, ndim=1),
                     t: ti.types.ndarray(dtype=ti.i32, ndim=1), bc: ti.types.ndarray(dtype=ti.f32, ndim=1),
                     start: ti.i32, size: ti.i32, lr: ti.f32, beta1: ti.f32, beta2: ti.f32, eps: ti.f32, wd: ti.f32,
                     grad_scale: ti.f32, zero: ti.i32):
    ti.loop_config(block_dim=1024)
    for k in range(size):
        i = start + k
        raw = grads[i]
        if zero != 0 and raw != 0.0:  # only touched entries are non-zero: only they need clearing
            grads[i] = 0.0
        g = raw * grad_scale
        if g != 0.0:
            ti_ = t[i] + 1
            t[i] = ti_
            # bias corrections 1 − β^t from the host's table: two pow() per touched entry cost more than
            # the dense update of every entry (2026-11-28 profile: 83 against 41 ms a step on scan 24)
            _update(params, m, v, i, g, lr, beta1, beta2, eps, bc[2 * ti_], bc[2 * ti_ + 1], wd)


@dataclass
class GroupSettings:
    lr: float
    weight_decay: float = 0.0
    sparse: bool = False  # skip entries whose gradient is exactly zero (hash tables); per-entry step counts


class Adam:
    """Adam over ``params``/``grads`` (flat float32 ndarrays of ``layout.total`` elements)."""

    def __init__(self, layout: ParamLayout, settings: dict, betas=(0.9, 0.99), eps: float = 1e-15):
        self.layout = layout
        self.runs = layout.groups()
        missing = set(self.runs) - set(settings)
        if missing:
            raise KeyError(f"no optimizer settings for parameter groups {sorted(missing)}")
        self.settings = {k: (v if isinstance(v, GroupSettings) else GroupSettings(*v)) for k, v in settings.items()}
        self.betas, self.eps = betas, eps
        self.m = buffers.f32(layout.total)
        self.v = buffers.f32(layout.total)
        # Per-entry step counts exist only when some group is sparse (dense groups use step_count).
        self.t = buffers.i32(layout.total) if any(s.sparse for s in self.settings.values()) else None
        self.step_count = 0
        self._bc = None  # (1 − β1^t, 1 − β2^t) interleaved for t = 0 … capacity − 1 (sparse groups)

    def _bias_corrections(self):
        """The sparse kernels' table of bias corrections, long enough for this step (an entry has been
        touched at most ``step_count`` times). Computed in float64 and rounded once."""
        need = self.step_count + 1
        if self._bc is None or self._bc.shape[0] < 2 * need:
            cap = max(need, 2 * (0 if self._bc is None else self._bc.shape[0] // 2), 1024)
            b1, b2 = self.betas
            steps = np.arange(cap, dtype=np.float64)
            table = np.stack([1.0 - b1 ** steps, 1.0 - b2 ** steps], axis=1).reshape(-1).astype(np.float32)
            self._bc = buffers.f32(2 * cap)
            buffers.from_numpy(self._bc, table)
        return self._bc

    def step(self, params, grads, lr_scale: float = 1.0, grad_scale: float = 1.0, zero_grads: bool = False,
             limits: dict | None = None) -> None:
        """One update; every group's learning rate is multiplied by ``lr_scale`` (the schedule). With
        ``zero_grads`` the kernels clear ``grads`` as they read it, so the caller's next backward starts
        from zeros without a pass of its own over the buffer.

        ``limits`` maps a group to how many of its leading entries to update; the rest are skipped. The
        caller vouches that they are out of use (e.g. hash-grid levels not yet switched on: zero gradients,
        zero moments, so Adam would leave them unchanged anyway) — a pass over millions of floats saved.
        """
        self.step_count += 1
        b1, b2 = self.betas
        bc1 = 1.0 - b1 ** self.step_count
        bc2 = 1.0 - b2 ** self.step_count
        for group, runs in self.runs.items():
            s = self.settings[group]
            left = None if limits is None or group not in limits else int(limits[group])
            for start, size in runs:
                if left is not None:
                    size, left = min(size, left), max(left - size, 0)
                    if size <= 0:
                        continue
                if s.sparse:
                    _adam_sparse_run(params, grads, self.m, self.v, self.t, self._bias_corrections(), start, size,
                                     s.lr * lr_scale, b1, b2, self.eps, s.weight_decay, grad_scale, int(zero_grads))
                else:
                    self._dense(params, grads, start, size, (s.lr * lr_scale, b1, b2, self.eps, bc1, bc2,
                                                              s.weight_decay, grad_scale, int(zero_grads)))

    def _dense(self, params, grads, start: int, size: int, args: tuple) -> None:
        """The dense update of entries [start, start + size): the 16-aligned middle through the vector kernel
        where the backend gives host views (CPU), the ends and every other backend through the scalar one."""
        stop = start + size
        a, b = -(-start // buffers.VW) * buffers.VW, stop // buffers.VW * buffers.VW
        views = [buffers.vec16_view(x, a, b) for x in (params, grads, self.m, self.v)] if b > a else [None]
        if any(x is None for x in views):
            _adam_run(params, grads, self.m, self.v, start, size, *args)
            return
        _adam_run16(*views, *args)
        for lo, hi in ((start, a), (b, stop)):
            if hi > lo:
                _adam_run(params, grads, self.m, self.v, lo, hi - lo, *args)

    def state_dict(self) -> dict:
        st = {"m": buffers.to_numpy(self.m), "v": buffers.to_numpy(self.v), "step": np.int64(self.step_count)}
        if self.t is not None:
            st["t"] = buffers.to_numpy(self.t)
        return st

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`. Per-entry counts missing (a dense run resumed sparsely) start at
        the global step count, which is what a dense run's entries have seen."""
        buffers.from_numpy(self.m, state["m"])
        buffers.from_numpy(self.v, state["v"])
        self.step_count = int(state["step"])
        if self.t is not None:
            t = state.get("t")
            if t is None:
                t = np.full(self.layout.total, self.step_count, np.int32)
            buffers.from_numpy(self.t, np.asarray(t, np.int32))
