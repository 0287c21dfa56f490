"""Tiny fully connected layers as Taichi kernels, forward and hand-written backward.

Activations are row-major ``(M, D)`` matrices stored as rows of 16-float vectors
(:func:`taichi_neus.buffers.rows16`); a layer reads its input from a column range of one
buffer and writes its output to another, so an encoding and the first layer's input can
share one buffer. Weights ``W`` ``(out, in)`` and bias ``b`` ``(out,)`` are slices of the
model's flat parameter buffer, copied into zero-padded vector form at each call (once per
:func:`packed_weights_reused` block, where the caller vouches that no parameter changes).

Every operand of the inner loops is a 16-float vector (activations, weights, bias,
accumulators), so with ``real_matrix_scalarize=False`` (CPU, DESIGN §3c) each load and
multiply-add is one SIMD instruction; Vulkan/Metal run the same source scalarised.

Backward passes use the layer's *output* to get the activation derivative (ReLU: y>0;
sigmoid: y(1−y); softplus with β: 1 − exp(−β·y)), so no pre-activation is stored.
The weight gradient ``dW = dZᵀ·X`` is a reduction over all samples: it is computed in
per-chunk partial sums and then summed, never with per-sample atomics into the weights.
"""

import contextlib
import math

import numpy as np
import taichi as ti

from taichi_neus import buffers
from taichi_neus.field.params import ParamLayout

ACT_NONE, ACT_RELU, ACT_SOFTPLUS, ACT_SIGMOID = 0, 1, 2, 3
VW = buffers.VW
_ACTS = {"none": ACT_NONE, "relu": ACT_RELU, "softplus": ACT_SOFTPLUS, "sigmoid": ACT_SIGMOID}


# Inside packed_weights_reused(): a counter that changes at every entry and exit, so a packed copy made in one
# block is never taken for another
_REUSE = {"depth": 0, "epoch": 0}


@contextlib.contextmanager
def packed_weights_reused():
    """Within this block each :class:`Linear` packs its weights once per parameter buffer and reuses that copy
    (a training step packed them 19 times, 5-6 ms of its ~300 on scan 24 on a slow machine). The caller vouches
    that no parameter changes inside the block: the trainer wraps one step's evaluations and gradients, and
    leaves it before the optimiser writes."""
    _REUSE["epoch"] += 1
    _REUSE["depth"] += 1
    try:
        yield
    finally:
        _REUSE["depth"] -= 1
        _REUSE["epoch"] += 1


@ti.func
def _exp_neg(a: ti.f32) -> ti.f32:
    """e^{−a} for a ≥ 0 (a is clamped to [0, 87]), to ~1 ulp: e^{−a} = 2^{−k}·e^{−r} with
    k = round(a/ln 2), |r| ≤ ln2/2 (Cody–Waite split of ln 2), e^{−r} by its degree-7 Taylor
    polynomial (error < 6e-9), 2^{−k} built in the exponent bits. Plain arithmetic instead of libm's
    expf, so the 16 lanes of a vector are computed side by side rather than by 16 calls."""
    x = ti.min(ti.max(a, 0.0), 87.0)
    k = ti.floor(x * 1.4426950408889634 + 0.5)
    r = (x - k * 0.693145751953125) - k * 1.4286068203094172e-06
    p = 1.0 + (-r) * (1.0 + (-r) * (0.5 + (-r) * (1.0 / 6.0 + (-r) * (1.0 / 24.0 + (-r) * (
        1.0 / 120.0 + (-r) * (1.0 / 720.0 + (-r) * (1.0 / 5040.0)))))))
    return p * ti.bit_cast((127 - ti.cast(k, ti.i32)) << 23, ti.f32)


@ti.func
def _log1p01(t: ti.f32) -> ti.f32:
    """log(1 + t) for t in [0, 1]: 2·atanh(s), s = t/(2 + t) ≤ 1/3, by its series to s¹⁷ (error < 1e-9)."""
    s = t / (2.0 + t)
    z = s * s
    q = 1.0 / 17.0
    for i in ti.static(range(7, -1, -1)):
        q = 1.0 / (2 * i + 1) + z * q
    return 2.0 * s * q


@ti.func
def _act(z, act: ti.template(), beta: ti.f32):
    """Activation of a 16-float vector, element by element."""
    y = z
    if ti.static(act == ACT_RELU):
        y = ti.max(z, 0.0)
    elif ti.static(act == ACT_SOFTPLUS):
        # softplus_β(z) = [max(βz, 0) + log(1 + e^{−|βz|})] / β; torch returns z itself past βz = 20
        for k in ti.static(range(VW)):
            bz = beta * z[k]
            y[k] = ti.select(bz > 20.0, z[k], (ti.max(bz, 0.0) + _log1p01(_exp_neg(ti.abs(bz)))) / beta)
    elif ti.static(act == ACT_SIGMOID):
        for k in ti.static(range(VW)):
            t = _exp_neg(ti.abs(z[k]))
            y[k] = ti.select(z[k] >= 0.0, 1.0, t) / (1.0 + t)
    return y


@ti.func
def _dact(y, act: ti.template(), beta: ti.f32):
    """Derivative of the activation of a 16-float vector, from its output ``y``."""
    d = y * 0.0 + 1.0
    if ti.static(act == ACT_RELU):
        d = ti.select(y > 0.0, 1.0, 0.0)
    elif ti.static(act == ACT_SOFTPLUS):
        for k in ti.static(range(VW)):
            d[k] = 1.0 - _exp_neg(beta * y[k])  # softplus' = 1 − e^{−β·softplus}
    elif ti.static(act == ACT_SIGMOID):
        d = y * (1.0 - y)
    return d


@ti.func
def _ddact(y, d, act: ti.template(), beta: ti.f32):
    """Second derivative of the activation of a 16-float vector, from its output ``y`` and first
    derivative ``d`` (:func:`_dact`): softplus_β'' = β·s(1 − s) with s = softplus' = sigmoid(βz);
    sigmoid'' = d(1 − 2y); ReLU and none: 0."""
    dd = y * 0.0
    if ti.static(act == ACT_SOFTPLUS):
        dd = beta * d * (1.0 - d)
    elif ti.static(act == ACT_SIGMOID):
        dd = d * (1.0 - 2.0 * y)
    return dd


ROWS = 4  # points per register tile (tile: ROWS points × 16 outputs, ROWS vector accumulators)
V16 = buffers.V16
ROWS16 = buffers.ROWS16
VEC1 = ti.types.ndarray(dtype=V16, ndim=1)
VEC2 = ti.types.ndarray(dtype=V16, ndim=2)


@ti.kernel
def pack_weights(
    params: ti.types.ndarray(dtype=ti.f32, ndim=1), w_off: ti.i32, b_off: ti.i32, n_in: ti.i32, n_out: ti.i32,
    xoff: ti.i32, NIB: ti.i32, NOB: ti.i32, Wp: VEC1, WTp: VEC1, bp: VEC1,
):
    """Copy a layer's ``Wt`` (in, out) and ``b`` from the flat buffer into zero-padded vector form.

    ``Wp[r·NOB + ob][k] = Wt[r − xoff, 16·ob + k]``: rows of Wt as vectors over outputs (forward,
    weight gradient); storage row r is input column ``xoff + i`` of the layer's first input block.
    ``WTp[j·NIB + ib][k] = Wt[16·ib + k − xoff, j]``: columns of Wt as vectors over inputs (input
    gradient). Rows and columns outside the layer are zero, so padding adds nothing."""
    for r, ob in ti.ndrange(NIB * VW, NOB):
        v = ti.Vector([0.0] * VW)
        i = r - xoff
        for k in ti.static(range(VW)):
            j = ob * VW + k
            if i >= 0 and i < n_in and j < n_out:
                v[k] = params[w_off + i * n_out + j]
        Wp[r * NOB + ob] = v
    for j, ib in ti.ndrange(NOB * VW, NIB):
        v = ti.Vector([0.0] * VW)
        for k in ti.static(range(VW)):
            i = ib * VW + k - xoff
            if i >= 0 and i < n_in and j < n_out:
                v[k] = params[w_off + i * n_out + j]
        WTp[j * NIB + ib] = v
    for ob in range(NOB):
        v = ti.Vector([0.0] * VW)
        for k in ti.static(range(VW)):
            j = ob * VW + k
            if j < n_out:
                v[k] = params[b_off + j]
        bp[ob] = v


@ti.kernel
def linear_forward(
    X: ROWS16, xb: ti.i32, NIB: ti.i32, Y: ROWS16, NOB: ti.i32, n: ti.i32,
    Wp: VEC1, bp: VEC1, act: ti.template(), beta: ti.f32, JB: ti.template(), KB: ti.template(),
    Z: ROWS16, TAN: ti.template(),
):
    """Y[m, ob] = act(b[ob] + Σ_r X[m, xb + r // 16][r % 16] · Wp[r, ob]) for m < n (16-output blocks).
    The bias is added to the rows m ≡ 0 (mod KB) only (KB divides ROWS): with KB = 4 the other rows are
    forward-mode tangents (:func:`tangent_act_forward`), which a linear map carries without its bias.
    ``TAN`` (with KB = ROWS = 4, so a tile is one point's rows): the pre-activations go to ``Z`` and ``Y``
    receives :func:`tangent_act_forward` of them, from the tile just written (one pass fewer over the rows;
    without TAN, ``Z`` is not touched).

    Register tiles of ROWS points × JB output blocks (JB·16 outputs; JB divides NOB): each input
    element, broadcast once, feeds JB vector multiply-adds and each weight vector ROWS, and the
    ROWS·JB accumulators stay in registers for the whole input loop (DESIGN §3c)."""
    for mb, og in ti.ndrange((n + ROWS - 1) // ROWS, NOB // JB):
        acc = [[bp[og * JB + j] if ti.static(t % KB == 0) else ti.Vector([0.0] * VW) for j in ti.static(range(JB))]
               for t in ti.static(range(ROWS))]
        for ib in range(NIB):
            xs = [X[ti.min(mb * ROWS + t, n - 1), xb + ib] for t in ti.static(range(ROWS))]
            for k in ti.static(range(VW)):
                ws = [Wp[(ib * VW + k) * NOB + og * JB + j] for j in ti.static(range(JB))]
                for t in ti.static(range(ROWS)):
                    xk = xs[t][k]
                    for j in ti.static(range(JB)):
                        acc[t][j] += xk * ws[j]
        for t in ti.static(range(ROWS)):
            m = mb * ROWS + t
            if m < n:
                for j in ti.static(range(JB)):
                    if ti.static(TAN):
                        Z[m, og * JB + j] = acc[t][j]
                    else:
                        Y[m, og * JB + j] = acc[t][j]
        if ti.static(TAN):
            ti.static_assert(KB == ROWS)
            m0 = mb * ROWS
            if m0 < n:  # n = ROWS · points: a tile is all or none of a point's rows
                for j in range(JB):  # a loop of its own, as below (compile time)
                    ob = og * JB + j
                    y = _act(Z[m0, ob], act, beta)
                    d = _dact(y, act, beta)
                    Y[m0, ob] = y
                    for t in ti.static(range(1, ROWS)):
                        Y[m0 + t, ob] = d * Z[m0 + t, ob]
        elif ti.static(act != ACT_NONE):
            # the activation in a loop of its own, from the tile just written (in L1): unrolled into
            # the ROWS·JB tile, softplus's 16-lane polynomial made the kernel take 30 s to compile
            for q in range(ROWS * JB):
                m = mb * ROWS + q // JB
                if m < n:
                    Y[m, og * JB + q % JB] = _act(Y[m, og * JB + q % JB], act, beta)


@ti.kernel
def act_backward(Y: ROWS16, dY: ROWS16, n: ti.i32, act: ti.template(), beta: ti.f32):
    """dY ← dY · act'(Y) in place (dL/d pre-activation), 16 columns at a time."""
    for m, ob in ti.ndrange(n, Y.shape[1]):
        dY[m, ob] = dY[m, ob] * _dact(Y[m, ob], act, beta)


@ti.kernel
def linear_backward_input(
    dZ: ROWS16, NOB: ti.i32, dX: ROWS16, dxb: ti.i32, ib_lo: ti.i32, ib_hi: ti.i32, NIB: ti.i32, n: ti.i32,
    WTp: VEC1, JB: ti.template(), X: ROWS16, xb: ti.i32, in_act: ti.template(), in_beta: ti.f32,
    XZ: ROWS16, TAN: ti.template(),
):
    """dX[m, dxb + ib] = Σ_j dZ[m, j] · WTp[j, ib] for input blocks ib in [ib_lo, ib_hi) (overwrites),
    times in_act'(X[m, xb + ib]) when the input X is the output of a layer with activation in_act
    (then dX is that layer's dL/d pre-activation, and no separate act_backward pass is needed).
    ``TAN``: X and its pre-activation ``XZ`` (same blocks) are rows of points and their three tangents, and
    dX becomes that layer's dL/d(z, ż) by :func:`tangent_act_backward`'s rule, on the tile just written
    (a tile is one point's four rows; without TAN, ``XZ`` is not touched).

    Tiles of ROWS points × JB input blocks (JB divides ib_hi − ib_lo), as in :func:`linear_forward`."""
    for mb, ig in ti.ndrange((n + ROWS - 1) // ROWS, (ib_hi - ib_lo) // JB):
        ib0 = ib_lo + ig * JB
        acc = [[ti.Vector([0.0] * VW) for _ in ti.static(range(JB))] for _ in ti.static(range(ROWS))]
        for ob in range(NOB):
            dz = [dZ[ti.min(mb * ROWS + t, n - 1), ob] for t in ti.static(range(ROWS))]
            for k in ti.static(range(VW)):
                ws = [WTp[(ob * VW + k) * NIB + ib0 + j] for j in ti.static(range(JB))]
                for t in ti.static(range(ROWS)):
                    dk = dz[t][k]
                    for j in ti.static(range(JB)):
                        acc[t][j] += dk * ws[j]
        for t in ti.static(range(ROWS)):
            m = mb * ROWS + t
            if m < n:
                for j in ti.static(range(JB)):
                    dX[m, dxb + ib0 + j] = acc[t][j]
        if ti.static(TAN):
            m0 = mb * ROWS
            if m0 < n:  # n = ROWS · points
                for j in range(JB):  # a loop of its own (compile time)
                    b = ib0 + j
                    y = X[m0, xb + b]
                    d = _dact(y, in_act, in_beta)
                    dd = _ddact(y, d, in_act, in_beta)
                    dz = d * dX[m0, dxb + b]
                    for t in ti.static(range(1, ROWS)):
                        g = dX[m0 + t, dxb + b]
                        dz += dd * XZ[m0 + t, xb + b] * g
                        dX[m0 + t, dxb + b] = d * g
                    dX[m0, dxb + b] = dz
        elif ti.static(in_act != ACT_NONE):
            for q in range(ROWS * JB):  # a loop of its own, as in linear_forward (compile time)
                m = mb * ROWS + q // JB
                if m < n:
                    b = ib0 + q % JB
                    dX[m, dxb + b] = dX[m, dxb + b] * _dact(X[m, xb + b], in_act, in_beta)


@ti.kernel
def tangent_act_forward(Z: ROWS16, Y: ROWS16, n: ti.i32, R: ti.template(), act: ti.template(), beta: ti.f32):
    """Forward-mode tangents through an activation, for ``n`` points of R rows each: row m·R holds the
    pre-activation z, rows m·R + t (t ≥ 1) its tangents ż_t; writes y = act(z) and ẏ_t = act'(z)·ż_t."""
    for m, ob in ti.ndrange(n, Z.shape[1]):
        y = _act(Z[m * R, ob], act, beta)
        d = _dact(y, act, beta)
        Y[m * R, ob] = y
        for t in ti.static(range(1, R)):
            Y[m * R + t, ob] = d * Z[m * R + t, ob]


@ti.kernel
def tangent_act_backward(Z: ROWS16, Y: ROWS16, dY: ROWS16, n: ti.i32, R: ti.template(), act: ti.template(),
                         beta: ti.f32):
    """The transpose of :func:`tangent_act_forward`, in place: dY's rows (dL/dy, dL/dẏ_t) become
    (dL/dz, dL/dż_t), with dL/dz = act'(z)·dL/dy + Σ_t act''(z)·ż_t·dL/dẏ_t and dL/dż_t = act'(z)·dL/dẏ_t."""
    for m, ob in ti.ndrange(n, dY.shape[1]):
        y = Y[m * R, ob]
        d = _dact(y, act, beta)
        dd = _ddact(y, d, act, beta)
        dz = d * dY[m * R, ob]
        for t in ti.static(range(1, R)):
            g = dY[m * R + t, ob]
            dz += dd * Z[m * R + t, ob] * g
            dY[m * R + t, ob] = d * g
        dY[m * R, ob] = dz


def block_group(n_blocks: int) -> int:
    """Vector blocks per register tile: the largest of 4, 3, 2, 1 that divides ``n_blocks``
    (4 points × 4 blocks = 16 accumulators, half the AVX-512 register file)."""
    return next(j for j in (4, 3, 2, 1) if n_blocks % j == 0)


@ti.kernel
def linear_backward_weight_partial(
    X: ROWS16, xb: ti.i32, NIB: ti.i32, dZ: ROWS16, NOB: ti.i32, n: ti.i32, partial: VEC2, n_chunks: ti.i32,
    IK: ti.template(), JB: ti.template(), KB: ti.template(),
):
    """partial[c, r·NOB + ob] = Σ_{m in chunk c} X[m, xb + r // 16][r % 16] · dZ[m, ob] (vectors over
    outputs); storage row r = 16·NIB is the bias (x = 1), summed over the rows m ≡ 0 (mod KB) only (the
    rows that received it in :func:`linear_forward`).

    One task per (chunk, IK inputs, JB output blocks): its IK·JB vector sums stay in registers while
    the chunk's rows stream by (no atomics, no read-modify-write); per row, IK broadcasts and JB
    vector loads feed IK·JB vector multiply-adds."""
    NKQ = ti.static(VW // IK)
    for c, q, og in ti.ndrange(n_chunks, NIB * NKQ + 1, NOB // JB):
        lo = c * n // n_chunks
        hi = (c + 1) * n // n_chunks
        if q < NIB * NKQ:
            ib = q // NKQ
            k0 = (q % NKQ) * IK
            acc = [[ti.Vector([0.0] * VW) for _ in ti.static(range(JB))] for _ in ti.static(range(IK))]
            for m in range(lo, hi):
                xv = X[m, xb + ib]
                dz = [dZ[m, og * JB + j] for j in ti.static(range(JB))]
                for k in ti.static(range(IK)):
                    xk = xv[k0 + k]
                    for j in ti.static(range(JB)):
                        acc[k][j] += xk * dz[j]
            for k in ti.static(range(IK)):
                for j in ti.static(range(JB)):
                    partial[c, (ib * VW + k0 + k) * NOB + og * JB + j] = acc[k][j]
        else:
            acc = [ti.Vector([0.0] * VW) for _ in ti.static(range(JB))]
            for mk in range((lo + KB - 1) // KB, (hi + KB - 1) // KB):
                for j in ti.static(range(JB)):
                    acc[j] += dZ[mk * KB, og * JB + j]
            for j in ti.static(range(JB)):
                partial[c, NIB * VW * NOB + og * JB + j] = acc[j]


@ti.kernel
def linear_backward_weight_reduce(
    partial: VEC2, n_chunks: ti.i32, xoff: ti.i32, NIB: ti.i32, NOB: ti.i32, n_in: ti.i32, n_out: ti.i32,
    grads: ti.types.ndarray(dtype=ti.f32, ndim=1), w_off: ti.i32, b_off: ti.i32,
):
    """grads[Wt] += Σ_c partial[c, Wt]; grads[b] += Σ_c partial[c, bias row]; padding is dropped."""
    for k in range((n_in + 1) * n_out):
        i = k // n_out
        j = k % n_out
        r = i + xoff if i < n_in else NIB * VW
        acc = 0.0
        for c in range(n_chunks):
            acc += partial[c, r * NOB + j // VW][j % VW]
        if i < n_in:
            grads[w_off + k] += acc
        else:
            grads[b_off + j] += acc


def n_weight_chunks(n: int) -> int:
    """Row chunks of the weight-gradient reduction: ≥ 256 rows each, at most 512 chunks."""
    return max(1, min(512, n // 256))


class Linear:
    """One dense layer ``y = act(W x + b)``. The weight is stored transposed, ``Wt = Wᵀ`` of shape
    ``(in, out)``, and the bias ``(out,)``, both in the flat parameter buffer (their layout does not
    depend on the kernels: checkpoints and the optimiser see plain slices).

    Activations are :func:`taichi_neus.buffers.rows16` buffers (rows of 16-float vectors). The
    kernels read the weights from a zero-padded vector copy made from the flat buffer at each call
    (:func:`pack_weights`, a few thousand floats), so input widths such as 3 + 32 and output widths
    such as 1 + 15 or 3 run through the same kernels as 64: the padding multiplies by zero."""

    def __init__(self, layout: ParamLayout, name: str, n_in: int, n_out: int, act: str = "none",
                 beta: float = 100.0, group: str = "mlp"):
        self.n_in, self.n_out = n_in, n_out
        self.act = _ACTS[act]
        self.beta = float(beta)
        self.W = layout.add(f"{name}.weight_t", (n_in, n_out), group)
        self.b = layout.add(f"{name}.bias", (n_out,), group)
        self.NOB = buffers.blocks(n_out)
        self._packed: dict = {}
        self._stamps: dict = {}  # key → the packed_weights_reused block and buffer the copy was made in
        self._scratch: dict = {}

    def _geometry(self, xcol: int):
        """(first input block, offset inside it, input blocks) for input columns [xcol, xcol + n_in)."""
        xoff = xcol % VW
        return xcol // VW, xoff, buffers.blocks(xoff + self.n_in)

    def _pack(self, params, xoff: int, NIB: int):
        from taichi_neus import runtime
        key = (runtime.current_arch(), xoff)
        bufs = self._packed.get(key)
        stamp = (_REUSE["epoch"], id(params)) if _REUSE["depth"] else None
        if bufs is not None and stamp is not None and self._stamps.get(key) == stamp:
            return bufs
        if bufs is None:
            mk = lambda k: buffers.check_aligned(ti.ndarray(V16, shape=(k,)), "packed weights")  # noqa: E731
            bufs = (mk(NIB * VW * self.NOB), mk(self.NOB * VW * NIB), mk(self.NOB))
            self._packed[key] = bufs
        pack_weights(params, self.W.offset, self.b.offset, self.n_in, self.n_out, xoff, NIB, self.NOB, *bufs)
        self._stamps[key] = stamp
        return bufs

    def _check(self, *named):
        for what, a in named:
            buffers.check_aligned(a, what)

    def _weight_grads(self, X, xb: int, xoff: int, NIB: int, dY, n: int, grads, n_chunks, bias_every: int = 1) -> None:
        """Add dL/dW and dL/db into ``grads``: per-chunk partial sums of Xᵀ·dY, then their reduction."""
        n_chunks = n_weight_chunks(n) if n_chunks is None else int(n_chunks)
        from taichi_neus import runtime
        key = (runtime.current_arch(), NIB)
        partial = self._scratch.get(key)
        if partial is None or partial.shape[0] < n_chunks:
            partial = ti.ndarray(V16, shape=(max(n_chunks, 64), (NIB * VW + 1) * self.NOB))
            self._scratch[key] = buffers.check_aligned(partial, "the weight-gradient scratch")
        jb = block_group(self.NOB)
        ik = {1: 16, 2: 8, 3: 4, 4: 4}[jb]  # inputs per tile: IK·JB ≤ 16 accumulators
        linear_backward_weight_partial(X, xb, NIB, dY, self.NOB, n, partial, n_chunks, ik, jb, int(bias_every))
        linear_backward_weight_reduce(partial, n_chunks, xoff, NIB, self.NOB, self.n_in, self.n_out, grads,
                                      self.W.offset, self.b.offset)

    def forward(self, X, xcol: int, Y, n: int, params, bias_every: int = 1, activate: bool = True,
                preact=None) -> None:
        """``Y[:n, 0:out] = act(X[:n, xcol:xcol + in] · Wt + b)``; X, Y rows16 buffers (Y's padding
        columns receive act(0)). ``bias_every`` (1 or 4): the bias goes to the rows m ≡ 0 (mod it) only;
        ``activate=False`` writes the pre-activation (both for forward-mode tangents, see
        :func:`tangent_act_forward`). ``preact`` (with ``bias_every=4``, rows of points and their three
        tangents): the pre-activations go there and ``Y`` receives their :func:`tangent_act_forward`, in
        the same kernel."""
        if ROWS % int(bias_every):
            raise ValueError(f"bias_every must divide {ROWS}, got {bias_every}")
        if preact is not None and (int(bias_every) != ROWS or n % ROWS or not activate):
            raise ValueError(f"preact takes bias_every={ROWS}, rows in whole points and an activation")
        self._check(("the layer input", X), ("the layer output", Y))
        if preact is not None:
            self._check(("the pre-activation buffer", preact),)
        xb, xoff, NIB = self._geometry(xcol)
        Wp, _, bp = self._pack(params, xoff, NIB)
        linear_forward(X, xb, NIB, Y, self.NOB, n, Wp, bp, self.act if activate else ACT_NONE, self.beta,
                       block_group(self.NOB), int(bias_every), Y if preact is None else preact, int(preact is not None))

    def backward(self, X, xcol: int, Y, dY, n: int, params, grads, n_chunks: int | None = None, dX=None,
                 dxcol: int = 0, dx_range=None, dy_preact: bool = False, dx_act: "Linear | None" = None,
                 bias_every: int = 1, dx_preact=None) -> None:
        """Backward through act and the affine map.

        ``dY`` (n, out) holds dL/dY on entry and dL/dZ (pre-activation) on exit (``dy_preact``: it
        holds dL/dZ already, see ``dx_act``). Weight and bias gradients are added into ``grads``
        (``n_chunks``: rows are summed in that many chunks first, default :func:`n_weight_chunks`;
        ``grads=None`` skips them, for input gradients alone).
        If ``dX`` is given, dL/dX is written into its columns ``dxcol + [i_lo, i_hi)`` (``dx_range``,
        default all inputs); ``dxcol ≡ xcol (mod 16)``, and the other columns of the 16-column blocks
        written receive their gradient too. ``dx_act``: the layer whose output ``X`` is; dX is then
        multiplied by its activation's derivative on the way out (its dL/dZ, for its backward with
        ``dy_preact=True``), which saves a pass over the hidden activations. ``bias_every``: as in
        :meth:`forward` (the bias gradient sums those rows only). ``dx_preact`` (with ``dx_act``; rows of
        points and their three tangents, as ``forward(preact=...)`` wrote them): ``dx_act``'s pre-activation
        buffer; dX then follows :func:`tangent_act_backward`'s rule instead of the plain derivative.
        """
        self._check(("the layer input", X), ("the layer output", Y), ("the output gradient", dY))
        xb, xoff, NIB = self._geometry(xcol)
        Wp, WTp, bp = self._pack(params, xoff, NIB)
        if self.act != ACT_NONE and not dy_preact:
            act_backward(Y, dY, n, self.act, self.beta)
        if grads is not None:
            self._weight_grads(X, xb, xoff, NIB, dY, n, grads, n_chunks, bias_every)
        if dX is not None:
            if dxcol % VW != xoff:
                raise ValueError(f"dxcol {dxcol} and xcol {xcol} must be equal modulo {VW} (same block layout)")
            self._check(("the input gradient", dX),)
            lo, hi = dx_range if dx_range is not None else (0, self.n_in)
            ib_lo, ib_hi = (xoff + lo) // VW, buffers.blocks(xoff + hi)
            in_act, in_beta = (dx_act.act, dx_act.beta) if dx_act is not None else (ACT_NONE, 0.0)
            if dx_act is not None and (xcol % VW, dx_act.n_out) != (0, self.n_in):
                raise ValueError("dx_act needs this layer's whole input to be that layer's output")
            if dx_preact is not None:
                if dx_act is None or n % ROWS:
                    raise ValueError(f"dx_preact takes dx_act and rows in whole points of {ROWS}")
                self._check(("the pre-activation buffer", dx_preact),)
            linear_backward_input(dY, self.NOB, dX, dxcol // VW, ib_lo, ib_hi, NIB, n, WTp, block_group(ib_hi - ib_lo),
                                  X, xb, in_act, in_beta, X if dx_preact is None else dx_preact,
                                  int(dx_preact is not None))


def kaiming_uniform(rng: np.random.Generator, n_out: int, n_in: int) -> np.ndarray:
    """torch.nn.Linear's default init (uniform ±1/sqrt(in)), as float32."""
    bound = 1.0 / math.sqrt(n_in)
    return rng.uniform(-bound, bound, size=(n_out, n_in)).astype(np.float32)


def set_weight(host: np.ndarray, lin: "Linear", W: np.ndarray) -> None:
    """Write a weight given in the usual ``(out, in)`` orientation into a host copy of the flat buffer."""
    host[lin.W.offset:lin.W.offset + lin.W.size] = np.ascontiguousarray(W.T, dtype=np.float32).reshape(-1)
