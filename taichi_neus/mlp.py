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

from . import buffers
from .params import ParamLayout

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


@ti.kernel
def linear_forward(
    X: ti.types.ndarray(dtype=ti.f32, ndim=2), xcol: ti.i32, n_in: ti.i32,
    Y: ti.types.ndarray(dtype=ti.f32, ndim=2), NO: ti.template(), n: ti.i32,
    params: ti.types.ndarray(dtype=ti.f32, ndim=1), w_off: ti.i32, b_off: ti.i32,
    act: ti.template(), beta: ti.f32,
):
    """Y[m, j] = act(b[j] + Σ_i X[m, xcol + i] · Wt[i, j]) for m < n.

    Per point, the NO outputs accumulate in registers and each input scales one contiguous
    row of the transposed weights, which LLVM turns into vector FMAs on the CPU."""
    for m in range(n):
        acc = ti.Vector([0.0] * NO)
        for j in ti.static(range(NO)):
            acc[j] = params[b_off + j]
        for i in range(n_in):
            x = X[m, xcol + i]
            row = w_off + i * NO
            for j in ti.static(range(NO)):
                acc[j] += params[row + j] * x
        for j in ti.static(range(NO)):
            Y[m, j] = _act(acc[j], act, beta)


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
    """dX[m, xcol + i] = Σ_j dZ[m, j] · Wt[i, j] for i in [i_lo, i_hi) (overwrites)."""
    for m in range(n):
        dz = ti.Vector([0.0] * NO)
        for j in ti.static(range(NO)):
            dz[j] = dZ[m, j]
        for i in range(i_lo, i_hi):
            row = w_off + i * NO
            acc = 0.0
            for j in ti.static(range(NO)):
                acc += params[row + j] * dz[j]
            dX[m, xcol + i] = acc


@ti.kernel
def linear_backward_weight_partial(
    X: ti.types.ndarray(dtype=ti.f32, ndim=2), xcol: ti.i32, n_in: ti.i32,
    dZ: ti.types.ndarray(dtype=ti.f32, ndim=2), NO: ti.template(), n: ti.i32,
    partial: ti.types.ndarray(dtype=ti.f32, ndim=2), n_chunks: ti.i32,
):
    """partial[c, i*NO + j] = Σ_{m in chunk c} X[m, i]·dZ[m, j]; row n_in holds Σ dZ (bias).

    One chunk per parallel task: the chunk's (n_in+1)×NO partial stays in L1 while its rows stream by."""
    for c in range(n_chunks):
        for k in range((n_in + 1) * NO):
            partial[c, k] = 0.0
        lo = c * n // n_chunks
        hi = (c + 1) * n // n_chunks
        for m in range(lo, hi):
            dz = ti.Vector([0.0] * NO)
            for j in ti.static(range(NO)):
                dz[j] = dZ[m, j]
            for i in range(n_in):
                x = X[m, xcol + i]
                row = i * NO
                for j in ti.static(range(NO)):
                    partial[c, row + j] += dz[j] * x
            for j in ti.static(range(NO)):
                partial[c, n_in * NO + j] += dz[j]


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


class Linear:
    """One dense layer ``y = act(W x + b)``. The weight is stored transposed, ``Wt = Wᵀ`` of shape
    ``(in, out)``, and the bias ``(out,)``, both in the flat parameter buffer."""

    def __init__(self, layout: ParamLayout, name: str, n_in: int, n_out: int, act: str = "none",
                 beta: float = 100.0, group: str = "mlp"):
        self.n_in, self.n_out = n_in, n_out
        self.act = _ACTS[act]
        self.beta = float(beta)
        self.W = layout.add(f"{name}.weight_t", (n_in, n_out), group)
        self.b = layout.add(f"{name}.bias", (n_out,), group)

    def forward(self, X, xcol: int, Y, n: int, params) -> None:
        linear_forward(X, xcol, self.n_in, Y, self.n_out, n, params, self.W.offset, self.b.offset,
                       self.act, self.beta)

    def backward(self, X, xcol: int, Y, dY, n: int, params, grads, partial, dX=None, dxcol: int = 0,
                 dx_range=None) -> None:
        """Backward through act and the affine map.

        ``dY`` (n, out) holds dL/dY on entry and dL/dZ (pre-activation) on exit. Weight and bias
        gradients are added into ``grads``; if ``dX`` is given, dL/dX is written into its columns
        ``dxcol + [i_lo, i_hi)`` (``dx_range``, default all inputs).
        """
        if self.act != ACT_NONE:
            act_backward(Y, dY, self.n_out, n, self.act, self.beta)
        n_chunks = partial.shape[0]
        linear_backward_weight_partial(X, xcol, self.n_in, dY, self.n_out, n, partial, n_chunks)
        linear_backward_weight_reduce(partial, n_chunks, self.n_in, self.n_out, grads,
                                      self.W.offset, self.b.offset)
        if dX is not None:
            lo, hi = dx_range if dx_range is not None else (0, self.n_in)
            linear_backward_input(dY, self.n_out, dX, dxcol, n, params, self.W.offset, lo, hi)


def kaiming_uniform(rng: np.random.Generator, n_out: int, n_in: int) -> np.ndarray:
    """torch.nn.Linear's default init (uniform ±1/sqrt(in)), as float32."""
    bound = 1.0 / math.sqrt(n_in)
    return rng.uniform(-bound, bound, size=(n_out, n_in)).astype(np.float32)


def partial_buffer(max_in: int, max_out: int, n_chunks: int = 64):
    """Scratch for weight-gradient partial sums: (n_chunks, max_out * (max_in + 1))."""
    return buffers.f32(n_chunks, max_out * (max_in + 1))


def set_weight(host: np.ndarray, lin: "Linear", W: np.ndarray) -> None:
    """Write a weight given in the usual ``(out, in)`` orientation into a host copy of the flat buffer."""
    host[lin.W.offset:lin.W.offset + lin.W.size] = np.ascontiguousarray(W.T, dtype=np.float32).reshape(-1)
