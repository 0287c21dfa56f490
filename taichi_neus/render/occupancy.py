"""Occupancy grid: which cells of the cube [−radius, radius]³ may hold visible surface.

One bit per cell in a ``u32`` ndarray (flat cell index ``(ix·res + iy)·res + iz``, word
``index >> 5``, bit ``index & 31``). Cells that do not meet the unit sphere (the scene's
bounding sphere) are never occupied. The grid starts dense (every cell meeting the sphere is
occupied) and :meth:`OccupancyGrid.update` recomputes it from the SDF, the idea of NerfAcc's
occupancy grid (Li et al. 2023) and Instant-NGP's density bitfield (Müller et al. 2022) applied to
NeuS.

A cell is marked occupied when, for the SDF ``f`` at a point drawn uniformly inside the cell,
either

* ``|f| <= cell diagonal`` — for a true SDF (1-Lipschitz) any cell the zero level set passes
  through satisfies this wherever the point falls; or
* the NeuS α (Wang et al. 2021, eq. 13, with cosine −1: a ray meeting the surface head-on, the
  largest α) of a ray crossing the cell, ``α = 1 − Φ(s·(|f| − δ/2)) / Φ(s·(|f| + δ/2))`` with δ the cell diagonal and
  s = inv_s, exceeds ``alpha_threshold`` — while s is small (early training) the density is
  spread in a band around the surface and that band must be sampled.

``|f|`` is used on both sides of the surface: the interior has a high NeuS density too, but rays
stop at the surface, so sampling it would only cost time.

Each update evaluates ``sdf_fn`` once per cell meeting the sphere, in chunks of at most
``chunk_size`` points; each chunk writes whole 32-cell words, so no atomics are needed. With a sweep
(``update(..., sweep=k)``) an update evaluates only the occupied cells, their neighbours and a rotating
1/k of the rest, and sets their bits on the host.
"""

import numpy as np
import taichi as ti

from taichi_neus import buffers, runtime
from taichi_neus.errors import UserInputError
from taichi_neus.render.compositing import neus_alpha

F1 = ti.types.ndarray(dtype=ti.f32, ndim=1)
F2 = ti.types.ndarray(dtype=ti.f32, ndim=2)
I1 = ti.types.ndarray(dtype=ti.i32, ndim=1)
U1 = ti.types.ndarray(dtype=ti.u32, ndim=1)

SPHERE_RADIUS = 1.0


# ----------------------------------------------------------------------------------------------
# Counter-based random numbers (PCG hash, O'Neill 2014 / Jarzynski & Olano 2020): reproducible
# from a seed on every backend, unlike ti.random().
# ----------------------------------------------------------------------------------------------
@ti.func
def pcg_hash(v):
    state = ti.cast(v, ti.u32) * ti.u32(747796405) + ti.u32(2891336453)
    word = ((state >> ((state >> ti.u32(28)) + ti.u32(4))) ^ state) * ti.u32(277803737)
    return (word >> ti.u32(22)) ^ word


@ti.func
def uniform01(a, b, c):
    """A float in [0, 1) from three integer keys (e.g. item index, stream, seed)."""
    h = pcg_hash(ti.cast(a, ti.u32) ^ pcg_hash(ti.cast(b, ti.u32) ^ pcg_hash(ti.cast(c, ti.u32))))
    return ti.cast(h >> ti.u32(8), ti.f32) * (1.0 / 16777216.0)


# ----------------------------------------------------------------------------------------------
# Grid lookups, used by the sampler's kernels
# ----------------------------------------------------------------------------------------------
@ti.func
def is_occupied(bits: ti.template(), res, radius, p):
    """True when point ``p`` (unit-sphere coordinates) lies in an occupied cell."""
    u = (p + radius) * (res / (2.0 * radius))
    occ = False
    if u.x >= 0.0 and u.y >= 0.0 and u.z >= 0.0 and u.x < res and u.y < res and u.z < res:
        ix = ti.min(ti.cast(u.x, ti.i32), res - 1)
        iy = ti.min(ti.cast(u.y, ti.i32), res - 1)
        iz = ti.min(ti.cast(u.z, ti.i32), res - 1)
        idx = (ix * res + iy) * res + iz
        occ = ((bits[idx >> 5] >> ti.cast(idx & 31, ti.u32)) & ti.u32(1)) != ti.u32(0)
    return occ


@ti.func
def _cell_point(idx, res, radius, seed):
    """A point drawn uniformly inside cell ``idx`` (flat index), the same on every backend for a seed."""
    h = 2.0 * radius / res
    ix = idx // (res * res)
    iy = (idx // res) % res
    iz = idx % res
    return ti.Vector([
        -radius + (ix + uniform01(idx, 0, seed)) * h,
        -radius + (iy + uniform01(idx, 1, seed)) * h,
        -radius + (iz + uniform01(idx, 2, seed)) * h,
    ])


@ti.func
def _cell_occupied(sdf, diag, inv_s, alpha_threshold):
    """The module docstring's test on the SDF ``sdf`` at a point of the cell (diagonal ``diag``)."""
    f = ti.abs(sdf)
    occ = f <= diag
    if not occ:
        occ = neus_alpha(f, -1.0, diag, inv_s) > alpha_threshold
    return occ


@ti.kernel
def _cell_points(words: I1, w0: ti.i32, nw: ti.i32, res: ti.i32, radius: ti.f32, seed: ti.i32, pts: F2):
    """Points for the cells of words[w0 : w0 + nw]: one uniform point inside each cell."""
    n_cells = res * res * res
    for k in range(nw * 32):
        idx = words[w0 + k // 32] * 32 + k % 32
        p = ti.Vector([0.0, 0.0, 0.0])
        if idx < n_cells:
            p = _cell_point(idx, res, radius, seed)
        for q in ti.static(range(3)):
            pts[k, q] = p[q]


@ti.kernel
def _mark(words: I1, w0: ti.i32, nw: ti.i32, sdf: F1, inside: U1, diag: ti.f32, inv_s: ti.f32,
          alpha_threshold: ti.f32, bits: U1):
    for j in range(nw):
        w = words[w0 + j]
        word = ti.u32(0)
        for b in range(32):
            if _cell_occupied(sdf[j * 32 + b], diag, inv_s, alpha_threshold):
                word |= ti.u32(1) << ti.cast(b, ti.u32)
        bits[w] = word & inside[w]


@ti.kernel
def _listed_cell_points(cells: I1, c0: ti.i32, n: ti.i32, res: ti.i32, radius: ti.f32, seed: ti.i32, pts: F2):
    """Points for the listed cells[c0 : c0 + n] (the same points :func:`_cell_points` draws for them); rows
    from n on repeat the first cell's (padding)."""
    for k in range(pts.shape[0]):
        p = _cell_point(cells[c0 + ti.select(k < n, k, 0)], res, radius, seed)
        for q in ti.static(range(3)):
            pts[k, q] = p[q]


@ti.kernel
def _mark_listed(n: ti.i32, sdf: F1, diag: ti.f32, inv_s: ti.f32, alpha_threshold: ti.f32, c0: ti.i32, occ: I1):
    """occ[c0 + k] = 1 where listed cell k's point (sdf[k], k < n) passes the occupancy test, else 0."""
    for k in range(n):
        occ[c0 + k] = ti.select(_cell_occupied(sdf[k], diag, inv_s, alpha_threshold), 1, 0)


@ti.kernel
def _copy_u32(src: U1, dst: U1):
    for i in range(src.shape[0]):
        dst[i] = src[i]


def _inside_sphere_bits(res: int, radius: float) -> np.ndarray:
    """u32 words with bit set for every cell that meets the sphere of radius SPHERE_RADIUS."""
    h = 2.0 * radius / res
    lo = -radius + np.arange(res) * h
    # distance from the origin to the nearest point of [lo, lo + h] along one axis
    d1 = np.where(lo > 0, lo, np.where(lo + h < 0, -(lo + h), 0.0)) ** 2
    d2 = d1[:, None, None] + d1[None, :, None] + d1[None, None, :]
    flat = (d2 < SPHERE_RADIUS**2).reshape(-1)
    n_words = (flat.size + 31) // 32
    pad = np.zeros(n_words * 32, bool)
    pad[:flat.size] = flat
    weights = (np.uint64(1) << np.arange(32, dtype=np.uint64)).astype(np.uint64)
    return (pad.reshape(n_words, 32).astype(np.uint64) * weights).sum(axis=1).astype(np.uint32)


class OccupancyGrid:
    """Bitfield occupancy grid over [−radius, radius]³ (unit-sphere coordinates).

    resolution: cells per axis; radius: half the cube's edge (≥ 1 to cover the unit sphere);
    alpha_threshold: NeuS α over one cell above which a cell counts as occupied;
    chunk_size: at most this many points per ``sdf_fn`` call.
    ``bits`` (ceil(res³ / 32),) u32 ndarray is what the sampler's kernels read.
    """

    def __init__(self, resolution: int = 128, radius: float = 1.0, *, alpha_threshold: float = 1e-3,
                 chunk_size: int = 1 << 18):
        runtime.require_init()
        if resolution < 2 or resolution > 1024:
            raise UserInputError(f"occupancy grid: resolution {resolution} must lie in [2, 1024].")
        if radius <= 0:
            raise UserInputError(f"occupancy grid: radius {radius} must be positive.")
        self.resolution = int(resolution)
        self.radius = float(radius)
        self.alpha_threshold = float(alpha_threshold)
        self.cell_size = 2.0 * self.radius / self.resolution
        self.cell_diagonal = self.cell_size * float(np.sqrt(3.0))
        inside = _inside_sphere_bits(self.resolution, self.radius)
        self.n_words = inside.size
        self._inside = ti.ndarray(ti.u32, shape=(self.n_words,))
        self._inside.from_numpy(inside)
        self.bits = ti.ndarray(ti.u32, shape=(self.n_words,))
        # words holding at least one cell inside the sphere: the only ones an update evaluates
        cand = np.nonzero(inside)[0].astype(np.int32)
        self.n_candidate_words = int(cand.size)
        self._cand = buffers.upload(cand, ti.i32)
        self._chunk_words = max(1, int(chunk_size) // 32)
        self._pts: dict = {}
        self._inside_cells = np.unpackbits(inside.view(np.uint8), bitorder="little").astype(bool)[:self.resolution**3]
        self._cell_list = self._cell_occ = None  # the listed update's cell indices and results, made on first use
        self.mark_all()

    def mark_all(self) -> None:
        """Make every cell meeting the unit sphere occupied (the state at construction)."""
        _copy_u32(self._inside, self.bits)

    def _points_buffer(self, nw: int):
        b = self._pts.pop(nw, None)
        if b is None:
            b = buffers.f32(nw * 32, 3)
            if len(self._pts) >= 4:  # the listed update's sizes drift over a run: keep the last few only
                self._pts.pop(next(iter(self._pts)))
        self._pts[nw] = b  # re-inserted last: dict order is the recency order
        return b

    def update(self, sdf_fn, inv_s: float, step: int, *, sweep: int = 1, phase: int = 0) -> None:
        """Recompute the grid from ``sdf_fn``.

        sdf_fn: ``points (M, 3) float32 ti.ndarray → sdf (M,) float32 ti.ndarray``, forward only,
        M ≤ chunk_size. inv_s: NeuS sharpness s (python float). step: seeds the in-cell jitter.
        sweep, phase: with ``sweep`` k > 1 the update re-evaluates only the occupied cells, their 26
        neighbours, and the cells whose flat index is ``phase`` mod k; the others keep their bits. Over k
        updates with phases 0 … k − 1 every cell is visited (Instant-NGP refreshes a share of its cells
        per update the same way, Müller et al. 2022, §4): the surface can move by a cell per update and
        be followed at once, while a surface appearing far from every occupied cell waits up to k updates.
        """
        if int(sweep) < 1:
            raise UserInputError(f"occupancy grid: sweep {sweep} must be at least 1.")
        if int(sweep) > 1:
            self._update_listed(sdf_fn, inv_s, step, int(sweep), int(phase))
            return
        nc = self.n_candidate_words
        for w0 in range(0, nc, self._chunk_words):
            nw = min(self._chunk_words, nc - w0)
            pts = self._points_buffer(nw)
            _cell_points(self._cand, w0, nw, self.resolution, self.radius, int(step) & 0x7FFFFFFF, pts)
            sdf = self._checked(sdf_fn(pts), nw * 32)
            _mark(self._cand, w0, nw, sdf, self._inside, self.cell_diagonal, float(inv_s),
                  self.alpha_threshold, self.bits)

    @staticmethod
    def _checked(sdf, m: int):
        if tuple(sdf.shape) != (m,):
            raise UserInputError(f"occupancy grid: sdf_fn returned shape {tuple(sdf.shape)} for "
                                 f"{m} points; it must return one float per point.")
        return sdf

    def cells_to_visit(self, sweep: int, phase: int) -> np.ndarray:
        """Flat indices (int32, increasing) of the cells a ``sweep``/``phase`` update evaluates: inside the
        sphere and occupied, next to an occupied cell (26-neighbourhood), or ≡ phase (mod sweep)."""
        near = self.occupied_mask()
        for ax in range(3):  # the 3×3×3 dilation, one axis at a time
            grown = near.copy()
            lo, hi = [slice(None)] * 3, [slice(None)] * 3
            lo[ax], hi[ax] = slice(None, -1), slice(1, None)
            grown[tuple(hi)] |= near[tuple(lo)]
            grown[tuple(lo)] |= near[tuple(hi)]
            near = grown
        flat = near.reshape(-1) | (np.arange(self.resolution**3) % sweep == phase % sweep)
        return np.flatnonzero(flat & self._inside_cells).astype(np.int32)

    def _update_listed(self, sdf_fn, inv_s: float, step: int, sweep: int, phase: int) -> None:
        cells = self.cells_to_visit(sweep, phase)
        n, res = int(cells.size), self.resolution
        if self._cell_list is None:
            self._cell_list, self._cell_occ = buffers.i32(res**3), buffers.i32(res**3)
        padded = np.zeros(res**3, np.int32)
        padded[:n] = cells
        buffers.from_numpy(self._cell_list, padded)
        chunk = self._chunk_words * 32
        for c0 in range(0, n, chunk):
            m = min(chunk, n - c0)
            rows = min(-(-m // 4096) * 4096, chunk)  # a few sizes only: the field's buffers are reused
            pts = self._points_buffer(rows // 32)
            _listed_cell_points(self._cell_list, c0, m, res, self.radius, int(step) & 0x7FFFFFFF, pts)
            sdf = self._checked(sdf_fn(pts), rows)
            _mark_listed(m, sdf, self.cell_diagonal, float(inv_s), self.alpha_threshold, c0, self._cell_occ)
        flat = np.unpackbits(self.bits.to_numpy().astype(np.uint32).view(np.uint8), bitorder="little").astype(bool)
        flat[cells] = buffers.to_numpy(self._cell_occ)[:n] != 0
        self.bits.from_numpy(np.packbits(flat, bitorder="little").view(np.uint32))

    def occupied_mask(self) -> np.ndarray:
        """(res, res, res) bool numpy array, indexed [ix, iy, iz] (x, y, z increasing)."""
        words = self.bits.to_numpy().astype(np.uint32)
        bits = np.unpackbits(words.view(np.uint8), bitorder="little").astype(bool)
        n = self.resolution**3
        return bits[:n].reshape(self.resolution, self.resolution, self.resolution)

    def occupied_fraction(self) -> float:
        """Fraction of all res³ cells of the cube that are occupied (≈ 0.52 when dense)."""
        words = self.bits.to_numpy().astype(np.uint32)
        return float(np.unpackbits(words.view(np.uint8)).sum()) / float(self.resolution**3)

    def cell_centres(self) -> np.ndarray:
        """(res, res, res, 3) float64 numpy array of cell centres, for tests and visualisation."""
        c = -self.radius + (np.arange(self.resolution) + 0.5) * self.cell_size
        return np.stack(np.meshgrid(c, c, c, indexing="ij"), axis=-1)
