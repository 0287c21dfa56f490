"""Tiny fully connected layers as Taichi kernels, forward and hand-written backward.

Activations are row-major ``(M, D)`` float32 ndarrays; a layer reads its input from a
column range of one buffer and writes its output to another, so an encoding and the
first layer's input can share one buffer. Weights ``W`` ``(out, in)`` and bias ``b``
``(out,)`` are slices of the model's flat parameter buffer.

Backward passes use the layer's *output* to get the activation derivative (ReLU: y>0;
sigmoid: y(1−y); softplus with β: 1 − exp(−β·y)), so no pre-activation is stored.
The weight gradient ``dW = dZᵀ·X`` is a reduction over all samples: it is computed in
per-chunk partial sums and then summed, never with per-sample atomics into the weights.
"""

import math

import numpy as np
import taichi as ti

from taichi_neus import buffers
from taichi_neus.field.params import ParamLayout

ACT_NONE, ACT_RELU, ACT_SOFTPLUS, ACT_SIGMOID = 0, 1, 2, 3
_ACTS = {"none": ACT_NONE, "relu": ACT_RELU, "softplus": ACT_SOFTPLUS, "sigmoid": ACT_SIGMOID}


@ti.func
def _act(z: ti.f32, act: ti.template(), beta: ti.f32) -> ti.f32:
    y = z
    if ti.static(act == ACT_RELU):
        y = ti.max(z, 0.0)
    elif ti.static(act == ACT_SOFTPLUS):
        bz = beta * z
        # log(1 + e^{βz}) / β, stable for large |βz| (torch uses a linear branch past βz = 20)
        y = z if bz > 20.0 else ti.log(1.0 + ti.exp(bz)) / beta
    elif ti.static(act == ACT_SIGMOID):
        y = 1.0 / (1.0 + ti.exp(-z))
    return y


@ti.func
def _dact(y: ti.f32, act: ti.template(), beta: ti.f32) -> ti.f32:
    d = 1.0
    if ti.static(act == ACT_RELU):
        d = 1.0 if y > 0.0 else 0.0
    elif ti.static(act == ACT_SOFTPLUS):
        d = 1.0 - ti.exp(-beta * y)
    elif ti.static(act == ACT_SIGMOID):
        d = y * (1.0 - y)
    return d


ROWS = 4  # points per register tile


def col_block(n: int) -> int:
    """Outputs per register tile: the largest divisor of n that is ≤ 16."""
    return max(d for d in range(1, 17) if n % d == 0)


@ti.kernel
def linear_forward(
    X: ti.types.ndarray(dtype=ti.f32, ndim=2), xcol: ti.i32, n_in: ti.i32,
    Y: ti.types.ndarray(dtype=ti.f32, ndim=2), NO: ti.template(), JB: ti.template(), n: ti.i32,
    params: ti.types.ndarray(dtype=ti.f32, ndim=1), w_off: ti.i32, b_off: ti.i32,
    act: ti.template(), beta: ti.f32,
):
    """Y[m, j] = act(b[j] + Σ_i X[m, xcol + i] · Wt[i, j]) for m < n.

    Register tiles of ROWS points × JB outputs: each weight load feeds ROWS multiply-adds and
    each input load JB; the tile's accumulators stay in registers for the whole input loop."""
    for mb, jb in ti.ndrange((n + ROWS - 1) // ROWS, NO // JB):
        acc = ti.Matrix([[0.0] * JB for _ in range(ROWS)])
        for r in ti.static(range(ROWS)):
            for j in ti.static(range(JB)):
                acc[r, j] = params[b_off + jb * JB + j]
        for i in range(n_in):
            xs = ti.Vector([X[ti.min(mb * ROWS + r, n - 1), xcol + i] for r in ti.static(range(ROWS))])
            row = w_off + i * NO + jb * JB
            for j in ti.static(range(JB)):
                w = params[row + j]
                for r in ti.static(range(ROWS)):
                    acc[r, j] += w * xs[r]
        for r in ti.static(range(ROWS)):
            m = mb * ROWS + r
            if m < n:
                for j in ti.static(range(JB)):
                    Y[m, jb * JB + j] = _act(acc[r, j], act, beta)


@ti.kernel
def act_backward(
    Y: ti.types.ndarray(dtype=ti.f32, ndim=2), dY: ti.types.ndarray(dtype=ti.f32, ndim=2),
    n_out: ti.i32, n: ti.i32, act: ti.template(), beta: ti.f32,
):
    """dY ← dY · act'(Y) in place (dL/d pre-activation)."""
    for m in range(n):
        for j in range(n_out):
            dY[m, j] *= _dact(Y[m, j], act, beta)


@ti.kernel
def linear_backward_input(
    dZ: ti.types.ndarray(dtype=ti.f32, ndim=2), NO: ti.template(),
    dX: ti.types.ndarray(dtype=ti.f32, ndim=2), xcol: ti.i32, n: ti.i32,
    params: ti.types.ndarray(dtype=ti.f32, ndim=1), w_off: ti.i32,
    i_lo: ti.i32, i_hi: ti.i32,
):
    """dX[m, xcol + i] = Σ_j dZ[m, j] · Wt[i, j] for i in [i_lo, i_hi) (overwrites).

    Tiles of ROWS points: the points' NO upstream gradients are held in registers and each
    weight row feeds ROWS dot products."""
    for mb, i in ti.ndrange((n + ROWS - 1) // ROWS, i_hi - i_lo):
        row = w_off + (i_lo + i) * NO
        acc = ti.Vector([0.0] * ROWS)
        for j in range(NO):
            w = params[row + j]
            for r in ti.static(range(ROWS)):
                acc[r] += w * dZ[ti.min(mb * ROWS + r, n - 1), j]
        for r in ti.static(range(ROWS)):
            m = mb * ROWS + r
            if m < n:
                dX[m, xcol + i_lo + i] = acc[r]


@ti.kernel
def linear_backward_weight_partial(
    X: ti.types.ndarray(dtype=ti.f32, ndim=2), xcol: ti.i32, n_in: ti.i32,
    dZ: ti.types.ndarray(dtype=ti.f32, ndim=2), NO: ti.template(), JB: ti.template(), n: ti.i32,
    partial: ti.types.ndarray(dtype=ti.f32, ndim=2), n_chunks: ti.i32,
):
    """partial[c, i*NO + j] = Σ_{m in chunk c} X[m, i]·dZ[m, j]; input row i = n_in is the bias (x = 1).

    One task per (chunk, input, output block): its JB sums stay in registers while the chunk's
    rows stream by, so nothing is written until the chunk is done (no atomics, no read-modify-write)."""
    for c, i, jb in ti.ndrange(n_chunks, n_in + 1, NO // JB):
        lo = c * n // n_chunks
        hi = (c + 1) * n // n_chunks
        acc = ti.Vector([0.0] * JB)
        if i < n_in:
            for m in range(lo, hi):
                x = X[m, xcol + i]
                for j in ti.static(range(JB)):
                    acc[j] += x * dZ[m, jb * JB + j]
        else:
            for m in range(lo, hi):
                for j in ti.static(range(JB)):
                    acc[j] += dZ[m, jb * JB + j]
        for j in ti.static(range(JB)):
            partial[c, i * NO + jb * JB + j] = acc[j]


@ti.kernel
def linear_backward_weight_reduce(
    partial: ti.types.ndarray(dtype=ti.f32, ndim=2), n_chunks: ti.i32, n_in: ti.i32, n_out: ti.i32,
    grads: ti.types.ndarray(dtype=ti.f32, ndim=1), w_off: ti.i32, b_off: ti.i32,
):
    """grads[Wt] += Σ_c partial[c, Wt]; grads[b] += Σ_c partial[c, bias row]."""
    for k in range((n_in + 1) * n_out):
        acc = 0.0
        for c in range(n_chunks):
            acc += partial[c, k]
        if k < n_in * n_out:
            grads[w_off + k] += acc
        else:
            grads[b_off + k - n_in * n_out] += acc


_scratch: dict = {}


def _partial_scratch(n_chunks: int, cols: int):
    from taichi_neus import runtime
    key = (runtime.current_arch(), cols)
    buf = _scratch.get(key)
    if buf is None or buf.shape[0] < n_chunks:
        buf = buffers.f32(max(n_chunks, 64), cols)
        _scratch[key] = buf
    return buf


def n_weight_chunks(n: int) -> int:
    """Row chunks of the weight-gradient reduction: ≥ 256 rows each, at most 512 chunks."""
    return max(1, min(512, n // 256))


class Linear:
    """One dense layer ``y = act(W x + b)``. The weight is stored transposed, ``Wt = Wᵀ`` of shape
    ``(in, out)``, and the bias ``(out,)``, both in the flat parameter buffer."""

    def __init__(self, layout: ParamLayout, name: str, n_in: int, n_out: int, act: str = "none",
                 beta: float = 100.0, group: str = "mlp"):
        self.n_in, self.n_out = n_in, n_out
        self.act = _ACTS[act]
        self.beta = float(beta)
        self.W = layout.add(f"{name}.weight_t", (n_in, n_out), group)
        self.JB = col_block(n_out)
        self.b = layout.add(f"{name}.bias", (n_out,), group)

    def forward(self, X, xcol: int, Y, n: int, params) -> None:
        linear_forward(X, xcol, self.n_in, Y, self.n_out, self.JB, n, params, self.W.offset, self.b.offset,
                       self.act, self.beta)

    def backward(self, X, xcol: int, Y, dY, n: int, params, grads, partial=None, dX=None, dxcol: int = 0,
                 dx_range=None) -> None:
        """Backward through act and the affine map.

        ``dY`` (n, out) holds dL/dY on entry and dL/dZ (pre-activation) on exit. Weight and bias
        gradients are added into ``grads`` (``partial``: optional (chunks, (in+1)·out) scratch, else
        an internal one; ``grads=None`` skips them, for input gradients alone); if ``dX`` is given,
        dL/dX is written into its columns ``dxcol + [i_lo, i_hi)`` (``dx_range``, default all inputs).
        """
        if self.act != ACT_NONE:
            act_backward(Y, dY, self.n_out, n, self.act, self.beta)
        if grads is not None:
            if partial is None:
                n_chunks = n_weight_chunks(n)
                partial = _partial_scratch(n_chunks, (self.n_in + 1) * self.n_out)
            else:
                n_chunks = partial.shape[0]
            linear_backward_weight_partial(X, xcol, self.n_in, dY, self.n_out, self.JB, n, partial, n_chunks)
            linear_backward_weight_reduce(partial, n_chunks, self.n_in, self.n_out, grads,
                                          self.W.offset, self.b.offset)
        if dX is not None:
            lo, hi = dx_range if dx_range is not None else (0, self.n_in)
            linear_backward_input(dY, self.n_out, dX, dxcol, n, params, self.W.offset, lo, hi)


def kaiming_uniform(rng: np.random.Generator, n_out: int, n_in: int) -> np.ndarray:
    """torch.nn.Linear's default init (uniform ±1/sqrt(in)), as float32."""
    bound = 1.0 / math.sqrt(n_in)
    return rng.uniform(-bound, bound, size=(n_out, n_in)).astype(np.float32)


def set_weight(host: np.ndarray, lin: "Linear", W: np.ndarray) -> None:
    """Write a weight given in the usual ``(out, in)`` orientation into a host copy of the flat buffer."""
    host[lin.W.offset:lin.W.offset + lin.W.size] = np.ascontiguousarray(W.T, dtype=np.float32).reshape(-1)
