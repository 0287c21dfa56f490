"""Pixel samplers: which training pixels the next batch of rays goes through.

Every sampler has the same three verbs, so the trainer never needs to know which one it holds:

``sample(batch_size, rng) -> PixelBatch(view_ids, pix, weights)``
    ``view_ids`` (B,) int32 indices into the ``images`` array the sampler was built from;
    ``pix`` (B, 2) float32 pixel coordinates (x, y) in pixels, the pixel with index (i, j) covering
    ``[j, j+1) x [i, i+1)``, so integer samples come back at pixel centres ``index + 0.5`` and
    soft mining returns continuous positions; ``weights`` (B,) float32 per-ray multipliers of the
    colour loss (1 for all samplers but soft mining). Use :meth:`PixelSampler.colors` to fetch
    the ground truth at ``pix`` (exact at pixel centres, bilinear in between).
``update(view_ids, pix, errors, step)``
    Called by the trainer after every step with the batch it rendered and the per-ray colour
    error it already computed for the loss (``errors`` (B,) float32, the L1 colour error of each
    ray, e.g. the mean absolute RGB difference in [0, 1]). Cheap: a few vectorised numpy ops.
``set_all_pixels(flag)``
    Switch to (or back from) plain uniform sampling over all training pixels, for the final
    all-pixel phase. :class:`QuadtreeSampler` also switches by itself after
    ``all_pixels_after * total_steps`` steps when built with ``total_steps``.
``state_dict() -> dict[str, np.ndarray]`` / ``load_state_dict(state)``
    Everything the sampler learnt while training (quadtree leaves, soft mining's error map and
    sample set, the all-pixel flag), as numpy arrays for a checkpoint: a sampler rebuilt from the
    same images and options and loaded with it draws the same next batches from the same RNG.

Samplers (pick one by name with :func:`make_sampler`):

- :class:`UniformSampler` ("uniform"): every training pixel equally likely.
- :class:`QuadtreeSampler` ("quadtree"): image-context prior plus per-image quadtrees that stop
  spending rays on converged regions (Zhang et al., "Fast Learning Radiance Fields by Shooting
  Much Fewer Rays", IEEE TIP 2023).
- :class:`SoftMiningSampler` ("soft_mining"): Langevin Monte Carlo over continuous pixel
  positions toward high error, with importance weights (Kheradmand et al., "Accelerating Neural
  Field Training via Soft Mining", CVPR 2024).

All host-side numpy; images stay uint8 on the host. ``masks`` are accepted and kept for
:meth:`PixelSampler.mask_values`, but no sampler uses them to choose pixels: background pixels
are needed by the mask loss.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from taichi_neus.errors import UserInputError

__all__ = [
    "PixelBatch",
    "PixelSampler",
    "UniformSampler",
    "QuadtreeSampler",
    "SoftMiningSampler",
    "SAMPLERS",
    "make_sampler",
    "context_prior",
    "gather_bilinear",
]


class PixelBatch(NamedTuple):
    """One batch of pixels; unpacks as ``view_ids, pix, weights``."""

    view_ids: np.ndarray  # (B,) int32, index into the sampler's images
    pix: np.ndarray  # (B, 2) float32, (x, y) in pixels, pixel centres at index + 0.5
    weights: np.ndarray  # (B,) float32, per-ray colour-loss weights (mean 1)


# ---------------------------------------------------------------------------- helpers
def context_prior(image: np.ndarray) -> np.ndarray:
    """Image-context prior of Zhang et al. 2023 (Sec. 3.2): where colours vary, sample more.

    g(p) = mean over the 3 channels of the standard deviation (population, ddof 0) of the colours
    in the 3x3 neighbourhood of pixel p, with reflect padding at the border (numpy ``"reflect"``:
    the row above row 0 is row 1). g is clamped below at ``0.01 * mean(g)`` so every pixel keeps
    some probability, then normalised to sum to 1. (The authors' code uses the channel-summed
    variance and no clamp; we follow the paper's text and this project's design.) A constant
    image gives the uniform pdf.

    Args:
        image: (H, W, 3) uint8 (or float) image.

    Returns:
        (H, W) float64 pdf over the pixels.
    """
    img = np.asarray(image, dtype=np.float64)  # the scale cancels in the clamp and the normalisation
    h, w = img.shape[:2]
    pad = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="reflect")

    def box3(a):  # 3x3 window sums of the padded array, separably: rows, then columns
        rows = a[:, :-2] + a[:, 1:-1] + a[:, 2:]
        return rows[:-2] + rows[1:-1] + rows[2:]

    mean = box3(pad) / 9.0
    var = box3(pad * pad) / 9.0
    var -= mean * mean
    g = np.sqrt(np.maximum(var, 0.0, out=var)).mean(axis=2)
    floor = 0.01 * g.mean()
    if floor <= 0.0:
        return np.full((h, w), 1.0 / (h * w))
    g = np.maximum(g, floor)
    return g / g.sum()


def gather_bilinear(array: np.ndarray, view_ids: np.ndarray, pix: np.ndarray) -> np.ndarray:
    """Bilinear lookup of ``array`` (V, H, W, C) at continuous pixel positions.

    ``pix`` (B, 2) is (x, y) with pixel centres at index + 0.5, so a sample exactly at a centre
    returns that pixel unchanged; positions are clamped to the centres of the border pixels.

    Returns:
        (B, C) float32 in the units of ``array`` (uint8 images: 0..255).
    """
    _, h, w = array.shape[:3]
    u = np.clip(np.asarray(pix[:, 0], np.float64) - 0.5, 0.0, w - 1)
    v = np.clip(np.asarray(pix[:, 1], np.float64) - 0.5, 0.0, h - 1)
    x0 = np.minimum(np.floor(u).astype(np.int64), max(w - 2, 0))
    y0 = np.minimum(np.floor(v).astype(np.int64), max(h - 2, 0))
    x1 = np.minimum(x0 + 1, w - 1)
    y1 = np.minimum(y0 + 1, h - 1)
    fx = (u - x0)[:, None]
    fy = (v - y0)[:, None]
    vid = np.asarray(view_ids, np.int64)
    a = array.reshape(array.shape[0], h, w, -1)
    top = a[vid, y0, x0].astype(np.float64) * (1 - fx) + a[vid, y0, x1] * fx
    bot = a[vid, y1, x0].astype(np.float64) * (1 - fx) + a[vid, y1, x1] * fx
    return (top * (1 - fy) + bot * fy).astype(np.float32)


def _spread_bits(v: np.ndarray) -> np.ndarray:
    """Insert a zero bit above every bit of v (< 2^16): the Morton half-interleave."""
    v = v.astype(np.int64) & 0xFFFF
    v = (v | (v << 8)) & 0x00FF00FF
    v = (v | (v << 4)) & 0x0F0F0F0F
    v = (v | (v << 2)) & 0x33333333
    v = (v | (v << 1)) & 0x55555555
    return v


def _gather_bits(v: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_spread_bits`: keep the even bits of v and pack them."""
    v = v.astype(np.int64) & 0x55555555
    v = (v | (v >> 1)) & 0x33333333
    v = (v | (v >> 2)) & 0x0F0F0F0F
    v = (v | (v >> 4)) & 0x00FF00FF
    v = (v | (v >> 8)) & 0x0000FFFF
    return v


def _morton(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Z-order code with y in the odd bits: children 0..3 = top-left, top-right, bottom-left,
    bottom-right."""
    return (_spread_bits(y) << 1) | _spread_bits(x)


def _ema_update(old: np.ndarray, seen: np.ndarray, count: np.ndarray, mean: np.ndarray,
                rate: float) -> np.ndarray:
    """Exponential moving average fed ``count`` rays of mean error ``mean`` at per-ray ``rate``.

    Equivalent to feeding the rays one by one with ``e <- e + rate * (err - e)``; an entry that has
    seen nothing yet (``seen`` False) takes the mean directly.
    """
    keep = (1.0 - rate) ** count
    return np.where(seen, old * keep + mean * (1.0 - keep), mean)


# ---------------------------------------------------------------------------- base class
class PixelSampler:
    """Common state and the uniform fallback of every pixel sampler.

    Args:
        images: (V, H, W, 3) uint8, all views of the scene (host memory, not copied).
        masks: optional (V, H, W) or (V, H, W, 1) bool/uint8 foreground masks; kept for
            :meth:`mask_values`, not used to choose pixels.
        view_ids: indices of the training views (default: all V). Samples only come from these;
            returned ``view_ids`` index the full ``images`` array.
    """

    name = "base"

    def __init__(self, images: np.ndarray, masks: np.ndarray | None = None,
                 view_ids=None):
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise UserInputError(
                f"pixel sampler: images must be a (V, H, W, 3) uint8 array, got shape "
                f"{images.shape} dtype {images.dtype}; load images as uint8 RGB.")
        self.images = images
        v, self.height, self.width = images.shape[:3]
        if masks is not None:
            masks = np.asarray(masks)
            if masks.ndim == 4 and masks.shape[-1] == 1:
                masks = masks[..., 0]
            if masks.shape != images.shape[:3]:
                raise UserInputError(
                    f"pixel sampler: masks must be (V, H, W) = {images.shape[:3]} like the images, "
                    f"got {masks.shape}.")
        self.masks = masks
        # uint8 masks may be 0/1 or 0/255: find out once, not on every lookup
        self._mask_scale = np.float32(
            255.0 if masks is not None and masks.dtype == np.uint8 and masks.max(initial=0) > 1 else 1.0)
        if view_ids is None:
            train = np.arange(v)
        else:
            train = np.unique(np.asarray(view_ids, dtype=np.int64).reshape(-1))
            if train.size == 0 or train[0] < 0 or train[-1] >= v:
                raise UserInputError(
                    f"pixel sampler: view_ids must be a non-empty list of view indices in [0, {v}), "
                    f"got {view_ids!r}.")
        self.train_views = train.astype(np.int32)  # (V_train,) global view indices
        self._local = np.full(v, -1, dtype=np.int64)  # global view -> training index
        self._local[train] = np.arange(train.size)
        self.num_pixels = int(train.size) * self.height * self.width
        self.all_pixels = False

    # -- the three verbs
    def sample(self, batch_size: int, rng: np.random.Generator) -> PixelBatch:
        """Draw ``batch_size`` pixels; see the module docstring for the returned arrays."""
        return self._sample_uniform(batch_size, rng)

    def update(self, view_ids: np.ndarray, pix: np.ndarray, errors: np.ndarray, step: int) -> None:
        """Feed back the per-ray L1 colour errors of the batch just trained on (no-op here)."""

    def set_all_pixels(self, flag: bool = True) -> None:
        """``True``: sample all training pixels uniformly from now on (weights 1)."""
        self.all_pixels = bool(flag)

    def state_dict(self) -> dict:
        """The learnt state as numpy arrays (keys are plain names; see the module docstring)."""
        return {"all_pixels": np.asarray(self.all_pixels)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (from a sampler built on the same images and options)."""
        self.all_pixels = bool(state["all_pixels"])

    # -- ground truth at sampled positions
    def colors(self, view_ids: np.ndarray, pix: np.ndarray) -> np.ndarray:
        """(B, 3) float32 ground-truth colours in [0, 1] at ``pix`` (bilinear, exact at centres)."""
        return gather_bilinear(self.images, view_ids, pix) / np.float32(255.0)

    def mask_values(self, view_ids: np.ndarray, pix: np.ndarray) -> np.ndarray | None:
        """(B,) float32 mask values in [0, 1] at ``pix``, or ``None`` without masks."""
        if self.masks is None:
            return None
        return gather_bilinear(self.masks[..., None], view_ids, pix)[:, 0] / self._mask_scale

    # -- shared pieces
    def _check_batch(self, batch_size: int) -> int:
        if int(batch_size) != batch_size or batch_size < 1:
            raise UserInputError(f"pixel sampler: batch_size must be a positive integer, got {batch_size!r}.")
        return int(batch_size)

    def _local_views(self, view_ids: np.ndarray) -> np.ndarray:
        local = self._local[np.asarray(view_ids, dtype=np.int64)]
        if (local < 0).any():
            raise ValueError("pixel sampler: update() got rays from views that are not training views.")
        return local

    def _sample_uniform(self, batch_size: int, rng: np.random.Generator) -> PixelBatch:
        b = self._check_batch(batch_size)
        views = self.train_views[rng.integers(0, self.train_views.size, b)]
        x = rng.integers(0, self.width, b)
        y = rng.integers(0, self.height, b)
        pix = np.stack([x, y], axis=1).astype(np.float32) + np.float32(0.5)
        return PixelBatch(views.astype(np.int32), pix, np.ones(b, np.float32))


class UniformSampler(PixelSampler):
    """Every training pixel equally likely, integer pixels (returned at centres), weights 1."""

    name = "uniform"


# ---------------------------------------------------------------------------- quadtree
class QuadtreeSampler(PixelSampler):
    """Context prior + error-driven quadtrees (Zhang et al., IEEE TIP 2023).

    **Tree.** Each training image has its own quadtree. The root is a square of side
    ``2^D * block`` pixels anchored at the top-left corner and covering the whole image
    (``block = min(8, min_leaf_size)``; parts outside the image hold no pixels and children that
    fall entirely outside are dropped), so every node is an aligned square clipped to the image.
    Every leaf keeps an exponential moving average ``e`` of the L1 error of the rays that landed
    in it (per-ray rate ``ema_rate``; the first rays a leaf sees set it), fed by :meth:`update`.
    Every ``refine_every`` updates, each leaf that has seen at least ``min_rays`` rays since it
    was created is judged: ``e > threshold`` -> not converged, and split into its 4 children if
    larger than ``min_leaf_size`` (children start with no error history);
    ``e <= threshold`` -> converged. A converged leaf whose error later rises above the threshold
    is un-marked (and split) the same way. Leaves never merge.

    **Distribution.** Every ray of a batch follows this pdf over training pixels (``N`` = number
    of training pixels, ``R`` = ``rays_per_round``, default N, i.e. one round = as many rays as one
    pass over all pixels; ``A_l`` = pixel count of leaf l; ``g`` = :func:`context_prior` of the
    pixel's image, summing to 1 per image; ``U`` = union of the unconverged leaves, ``|U|`` its
    pixel count, ``G_U`` the sum of g over it; ``f = prior_fraction``, 0.5 in the paper):

    - converged leaf l: total mass ``m_l = min(n0, A_l) / R`` (``n0`` rays per round, spread over
      the batches of the round), uniform over the leaf's pixels;
    - pixel p in U: ``P(p) = (1 - sum_l m_l) * ((1 - f) / |U| + f * g(p) / G_U)``, i.e. the rest
      of the batch goes to the unconverged leaves, a fraction (1 - f) uniformly and f from the
      prior: leaf l receives ``(1 - f) A_l / |U| + f G_l / G_U`` of it (a mixture of its area
      share and its prior-mass share, which keeps the paper's half-uniform, half-prior split
      exact; a product ``A_l * G_l`` would count the area twice).

    If the converged masses add up to more than 1 (only possible with a small ``rays_per_round``)
    or no leaf is unconverged, the converged masses are rescaled to sum to 1. The counts per leaf
    and component (uniform / prior) in a batch are drawn by systematic sampling (each gets the
    floor or the ceiling of ``B`` times its mass, which keeps the small converged shares steady
    from batch to batch), the pixels inside a leaf independently, and the batch is shuffled: so
    the rays of a batch are not independent, but each one follows the pdf exactly.
    :meth:`pixel_distribution` returns it as an array.

    **All-pixel phase.** After ``all_pixels_after * total_steps`` steps (if ``total_steps`` is
    given) or after ``set_all_pixels(True)``: uniform over all training pixels.

    Cost: ``sample`` is O(B log(leaves + blocks)); ``update`` O(B log B); refining is O(leaves)
    every ``refine_every`` steps. Memory: 4 bytes per training pixel (the prior's CDF in float32).

    Args:
        images, masks, view_ids: see :class:`PixelSampler`.
        threshold: per-ray L1 colour error (mean absolute RGB difference, colours in [0, 1])
            above which a leaf splits / is not converged.
        n0: rays per round for a converged leaf (paper: 10).
        min_leaf_size: side of the smallest leaf in pixels, a power of two.
        prior_fraction: share of the unconverged budget drawn from the context prior.
        ema_rate: per-ray rate of the leaf error average.
        min_rays: rays a leaf must have seen before it is judged.
        refine_every: judge the leaves every this many updates.
        rays_per_round: rays in one round for the n0 rule (default: number of training pixels).
        initial_depth: start with every root already split this many times.
        all_pixels_after, total_steps: switch to the all-pixel phase at step
            ``all_pixels_after * total_steps`` (never if ``total_steps`` is None).
    """

    name = "quadtree"

    def __init__(self, images, masks=None, view_ids=None, *, threshold: float = 0.03, n0: int = 10,
                 min_leaf_size: int = 16, prior_fraction: float = 0.5, ema_rate: float = 0.05,
                 min_rays: int = 64, refine_every: int = 50, rays_per_round: int | None = None,
                 initial_depth: int = 0, all_pixels_after: float = 0.9, total_steps: int | None = None):
        super().__init__(images, masks, view_ids)
        if min_leaf_size < 1 or (min_leaf_size & (min_leaf_size - 1)) != 0:
            raise UserInputError(
                f"quadtree sampler: min_leaf_size must be a power of two, got {min_leaf_size}.")
        if not 0.0 <= prior_fraction <= 1.0:
            raise UserInputError(f"quadtree sampler: prior_fraction must be in [0, 1], got {prior_fraction}.")
        if not 0.0 < ema_rate <= 1.0:
            raise UserInputError(f"quadtree sampler: ema_rate must be in (0, 1], got {ema_rate}.")
        self.threshold = float(threshold)
        self.n0 = int(n0)
        self.min_leaf_size = int(min_leaf_size)
        self.prior_fraction = float(prior_fraction)
        self.ema_rate = float(ema_rate)
        self.min_rays = int(min_rays)
        self.refine_every = max(1, int(refine_every))
        self.rays_per_round = float(rays_per_round) if rays_per_round else float(self.num_pixels)
        self.all_pixels_after = float(all_pixels_after)
        self.total_steps = total_steps
        self._updates_since_refine = 0

        h, w = self.height, self.width
        b = self.block = min(8, self.min_leaf_size)
        nby, nbx = -(-h // b), -(-w // b)
        self.depth = int(np.ceil(np.log2(max(nby, nbx)))) if max(nby, nbx) > 1 else 0
        self.max_level = max(0, self.depth - int(np.log2(self.min_leaf_size // b)))
        by, bx = np.meshgrid(np.arange(nby), np.arange(nbx), indexing="ij")
        codes = _morton(by.ravel(), bx.ravel())
        order = np.argsort(codes, kind="stable")  # blocks of one image in Z-order
        self._codes = codes[order]
        self._bly = by.ravel()[order]
        self._blx = bx.ravel()[order]
        self._blh = np.minimum(b, h - self._bly * b)
        self._blw = np.minimum(b, w - self._blx * b)
        self.blocks_per_image = nb = codes.size
        self._block_of = np.empty((nby, nbx), np.int64)  # block row/col -> Z-order index
        self._block_of.reshape(-1)[order] = np.arange(nb)

        # the prior as a running sum inside each block (row-major pixels of the b x b block,
        # pixels outside the image add 0): (V_train * nb, b*b) float32, blocks in Z-order;
        # _pcum is the running sum over whole blocks (float64), so together they are the CDF
        nv = self.train_views.size
        self._gcs = np.zeros((nv, nb, b * b), np.float32)
        for i, view in enumerate(self.train_views):
            g = np.zeros((nby * b, nbx * b))
            g[:h, :w] = context_prior(images[view])
            g = g.reshape(nby, b, nbx, b).transpose(0, 2, 1, 3).reshape(nb, b * b)[order]
            self._gcs[i] = np.cumsum(g, axis=1)
        self._gcs = self._gcs.reshape(nv * nb, b * b)
        self._pcum = np.concatenate([[0.0], np.cumsum(self._gcs[:, -1], dtype=np.float64)])
        area = np.tile(self._blh * self._blw, nv)
        self._acum = np.concatenate([[0], np.cumsum(area)])

        # leaves, kept sorted by their first block; the initial ones are the roots' descendants
        level = min(int(initial_depth), self.max_level)
        ncodes = 4**level
        self._leaf_view = np.repeat(np.arange(nv), ncodes)
        self._leaf_level = np.full(nv * ncodes, level)
        self._leaf_code = np.tile(np.arange(ncodes), nv)
        self._make_leaves(self._leaf_view, self._leaf_level, self._leaf_code, keep=None)
        self._dirty = True

    # -- tree bookkeeping
    def _make_leaves(self, views, levels, codes, keep):
        """Set the leaf arrays to ``keep`` (indices of old leaves) plus new leaves (views, levels,
        codes); new leaves start with no history. Empty leaves are dropped."""
        shift = 2 * (self.depth - levels)
        lo = np.searchsorted(self._codes, codes << shift)
        hi = np.searchsorted(self._codes, (codes + 1) << shift)
        ok = hi > lo
        nb = self.blocks_per_image
        new = dict(view=views[ok], level=levels[ok], code=codes[ok], kb0=views[ok] * nb + lo[ok],
                   kb1=views[ok] * nb + hi[ok], ema=np.zeros(ok.sum()), seen=np.zeros(ok.sum(), np.int64),
                   conv=np.zeros(ok.sum(), bool))
        if keep is not None:
            old = dict(view=self._leaf_view, level=self._leaf_level, code=self._leaf_code, kb0=self._kb0,
                       kb1=self._kb1, ema=self._leaf_ema, seen=self._leaf_seen, conv=self._leaf_conv)
            new = {k: np.concatenate([old[k][keep], new[k]]) for k in new}
        order = np.argsort(new["kb0"], kind="stable")
        self._leaf_view = new["view"][order]
        self._leaf_level = new["level"][order]
        self._leaf_code = new["code"][order]
        self._kb0 = new["kb0"][order]
        self._kb1 = new["kb1"][order]
        self._leaf_ema = new["ema"][order]
        self._leaf_seen = new["seen"][order]
        self._leaf_conv = new["conv"][order]
        counts = self._kb1 - self._kb0
        assert counts.sum() == self._gcs.shape[0], "quadtree leaves must cover every block once"
        self._block_leaf = np.repeat(np.arange(counts.size), counts)
        self._dirty = True

    def _refine(self) -> None:
        judged = self._leaf_seen >= self.min_rays
        high = judged & (self._leaf_ema > self.threshold)
        conv = np.where(judged, ~high, self._leaf_conv)
        if (conv != self._leaf_conv).any():
            self._leaf_conv = conv
            self._dirty = True
        split = high & (self._leaf_level < self.max_level)
        if split.any():
            idx = np.nonzero(split)[0]
            views = np.repeat(self._leaf_view[idx], 4)
            levels = np.repeat(self._leaf_level[idx] + 1, 4)
            codes = (np.repeat(self._leaf_code[idx], 4) << 2) + np.tile(np.arange(4), idx.size)
            self._make_leaves(views, levels, codes, keep=np.nonzero(~split)[0])

    def _rebuild(self) -> None:
        """Per-leaf masses of the uniform and prior components, as one cumulative array."""
        area = (self._acum[self._kb1] - self._acum[self._kb0]).astype(np.float64)
        prior = self._pcum[self._kb1] - self._pcum[self._kb0]
        conv = self._leaf_conv
        m_conv = np.where(conv, np.minimum(self.n0, area) / self.rays_per_round, 0.0)
        total_conv = m_conv.sum()
        unconv = ~conv
        uni = m_conv.copy()
        pri = np.zeros_like(uni)
        if unconv.any() and total_conv < 1.0:
            rest = 1.0 - total_conv
            uni[unconv] = rest * (1.0 - self.prior_fraction) * area[unconv] / area[unconv].sum()
            pri[unconv] = rest * self.prior_fraction * prior[unconv] / prior[unconv].sum()
        else:
            uni = m_conv / total_conv
        self._uni_mass, self._pri_mass = uni, pri
        self._area, self._prior_mass = area, prior
        cum = np.cumsum(np.concatenate([uni, pri]))
        self._cum = cum / cum[-1]
        self._dirty = False

    # -- the verbs
    def sample(self, batch_size: int, rng: np.random.Generator) -> PixelBatch:
        if self.all_pixels:
            return self._sample_uniform(batch_size, rng)
        b = self._check_batch(batch_size)
        if self._dirty:
            self._rebuild()
        nleaf = self._kb0.size
        comp = np.searchsorted(self._cum, (rng.random() + np.arange(b)) / b, side="right")
        comp = np.minimum(comp, 2 * nleaf - 1)
        is_pri = comp >= nleaf
        leaf = comp - nleaf * is_pri
        r = rng.random(b)
        kb0, kb1 = self._kb0[leaf], self._kb1[leaf]
        block = np.empty(b, np.int64)
        ly = np.empty(b, np.int64)
        lx = np.empty(b, np.int64)
        # uniform within the leaf: the t-th pixel of the leaf, counting block by block
        u = ~is_pri
        if u.any():
            first = self._acum[kb0[u]]
            n = self._acum[kb1[u]] - first
            t = first + np.minimum((r[u] * n).astype(np.int64), n - 1)
            k = np.searchsorted(self._acum, t, side="right") - 1
            off = t - self._acum[k]
            bw = self._blw[k % self.blocks_per_image]
            block[u], ly[u], lx[u] = k, off // bw, off % bw
        # prior within the leaf: inverse CDF over blocks, then over the block's pixels
        if is_pri.any():
            lo, hi = self._pcum[kb0[is_pri]], self._pcum[kb1[is_pri]]
            target = lo + r[is_pri] * (hi - lo)
            k = np.clip(np.searchsorted(self._pcum, target, side="right") - 1, kb0[is_pri], kb1[is_pri] - 1)
            cs = self._gcs[k]
            rest = np.minimum(np.maximum(target - self._pcum[k], 0.0), np.nextafter(cs[:, -1], 0))
            j = (cs <= rest[:, None]).sum(axis=1)
            block[is_pri], ly[is_pri], lx[is_pri] = k, j // self.block, j % self.block
        view, kl = np.divmod(block, self.blocks_per_image)
        x = self._blx[kl] * self.block + lx
        y = self._bly[kl] * self.block + ly
        perm = rng.permutation(b)
        pix = np.stack([x[perm], y[perm]], axis=1).astype(np.float32) + np.float32(0.5)
        return PixelBatch(self.train_views[view[perm]], pix, np.ones(b, np.float32))

    def update(self, view_ids, pix, errors, step) -> None:
        """Add the batch's per-ray errors to the leaves' averages; refine every ``refine_every``."""
        local = self._local_views(view_ids)
        pix = np.asarray(pix)
        x = np.clip(np.floor(pix[:, 0]).astype(np.int64), 0, self.width - 1)
        y = np.clip(np.floor(pix[:, 1]).astype(np.int64), 0, self.height - 1)
        block = local * self.blocks_per_image + self._block_of[y // self.block, x // self.block]
        leaves, inverse = np.unique(self._block_leaf[block], return_inverse=True)
        count = np.bincount(inverse)
        mean = np.bincount(inverse, weights=np.asarray(errors, np.float64)) / count
        self._leaf_ema[leaves] = _ema_update(self._leaf_ema[leaves], self._leaf_seen[leaves] > 0,
                                             count, mean, self.ema_rate)
        self._leaf_seen[leaves] += count
        if self.total_steps is not None and step >= self.all_pixels_after * self.total_steps:
            self.set_all_pixels(True)
        self._updates_since_refine += 1
        if self._updates_since_refine >= self.refine_every:
            self._updates_since_refine = 0
            self._refine()

    _LEAF_ARRAYS = ("_leaf_view", "_leaf_level", "_leaf_code", "_kb0", "_kb1", "_leaf_ema", "_leaf_seen",
                    "_leaf_conv")

    def state_dict(self) -> dict:
        st = super().state_dict()
        st.update({k.lstrip("_"): getattr(self, k).copy() for k in self._LEAF_ARRAYS})
        st["updates_since_refine"] = np.asarray(self._updates_since_refine)
        return st

    def load_state_dict(self, state: dict) -> None:
        leaves = {k: np.array(state[k.lstrip("_")]) for k in self._LEAF_ARRAYS}  # all read before any change
        updates, all_pixels = int(state["updates_since_refine"]), state["all_pixels"]
        kb0, kb1 = leaves["_kb0"], leaves["_kb1"]
        if kb0.shape != kb1.shape or (kb1 - kb0).sum() != self._gcs.shape[0]:
            raise ValueError("quadtree state does not cover this sampler's images")
        super().load_state_dict({"all_pixels": all_pixels})
        for k, v in leaves.items():
            setattr(self, k, v)
        self._updates_since_refine = updates
        self._block_leaf = np.repeat(np.arange(kb0.size), kb1 - kb0)
        self._dirty = True  # the leaf masses are a function of the leaves: rebuilt at the next sample

    # -- inspection
    def leaves(self) -> dict:
        """The current leaves as arrays (one entry per leaf, sorted by image then Z-order).

        Keys: ``view`` (global view index), ``x0, y0, x1, y1`` pixel bounds (half-open, clipped
        to the image), ``level`` (0 = root), ``area`` (pixels), ``prior_mass`` (sum of g),
        ``error`` (running L1 error, NaN before the first ray), ``rays`` (rays seen since the leaf
        was created), ``converged`` (bool).
        """
        side = self.block << (self.depth - self._leaf_level)
        y0 = _gather_bits(self._leaf_code >> 1) * side
        x0 = _gather_bits(self._leaf_code) * side
        return dict(view=self.train_views[self._leaf_view], x0=x0, y0=y0,
                    x1=np.minimum(x0 + side, self.width), y1=np.minimum(y0 + side, self.height),
                    level=self._leaf_level.copy(),
                    area=self._acum[self._kb1] - self._acum[self._kb0],
                    prior_mass=self._pcum[self._kb1] - self._pcum[self._kb0],
                    error=np.where(self._leaf_seen > 0, self._leaf_ema, np.nan),
                    rays=self._leaf_seen.copy(), converged=self._leaf_conv.copy())

    def pixel_distribution(self) -> np.ndarray:
        """(V_train, H, W) float64: probability that one ray of the next batch hits each pixel."""
        nv, h, w = self.train_views.size, self.height, self.width
        if self.all_pixels:
            return np.full((nv, h, w), 1.0 / self.num_pixels)
        if self._dirty:
            self._rebuild()
        b = self.block
        leaf = self._block_leaf
        g = np.diff(self._gcs, axis=1, prepend=0.0)  # exactly the steps of the CDF that is sampled
        valid = np.zeros_like(g, dtype=bool)  # pixels of the block that lie inside the image
        bh, bw = np.tile(self._blh, self.train_views.size), np.tile(self._blw, self.train_views.size)
        valid.reshape(-1, b, b)[:] = (np.arange(b)[None, :, None] < bh[:, None, None]) \
            & (np.arange(b)[None, None, :] < bw[:, None, None])
        dens = (self._uni_mass / self._area)[leaf][:, None] * valid \
            + (self._pri_mass / self._prior_mass)[leaf][:, None] * g
        nb = self.blocks_per_image
        nby, nbx = self._block_of.shape
        out = np.zeros((nv, nby * nbx, b * b))
        inv = self._block_of.reshape(-1)  # row-major block -> Z-order index
        out[:] = dens.reshape(nv, nb, b * b)[:, inv]
        out = out.reshape(nv, nby, nbx, b, b).transpose(0, 1, 3, 2, 4).reshape(nv, nby * b, nbx * b)
        return out[:, :h, :w]


# ---------------------------------------------------------------------------- soft mining
class SoftMiningSampler(PixelSampler):
    """Langevin Monte Carlo toward high error, with soft importance weights (Kheradmand et al. 2024).

    The sampler keeps a persistent set of B continuous pixel positions (one per ray of the
    batch). Between two batches (lazily, at the next :meth:`sample`, which owns the RNG) every
    position moves by one Langevin step (paper Eq. 6)::

        x <- x + a * grad log(Q(x) + eps) + b * eta,     eta ~ N(0, I)

    with Q the per-pixel L1 error, kept as a low-resolution map per training image: cells of
    ``cell_size`` pixels, each an exponential moving average (per-ray rate ``ema_rate``) of the
    errors of the rays that landed in it; every cell starts at the mean error of the first batch.
    Q(x) interpolates the cell centres bilinearly (clamped at the border) and the gradient is a
    central difference of log(Q + eps) over +-``cell_size`` pixels. The drift is clipped to
    ``max_drift`` pixels. With ``a = b^2 / 2`` (the default) this is the unadjusted Langevin
    algorithm whose stationary density is proportional to Q + eps.

    After the move, a sample is re-seeded uniformly (new random training view and position) when
    it left the image, or when it moved less than ``stall_distance`` pixels in ``stall_steps``
    consecutive moves; and a random ``uniform_fraction`` of all samples is re-seeded uniformly
    every step, so the set keeps exploring.

    ``weights`` are the importance weights ``1 / sg(Q(x) + eps)^alpha`` normalised to mean 1,
    Q read from the map at the returned positions; alpha rises linearly from 0 to ``alpha_max``
    over ``warmup_steps`` (step as given to the last :meth:`update`). alpha = 0 is pure hard
    mining (weights exactly 1), alpha = 1 unbiased importance sampling; the paper's soft mining
    uses about 0.6. The trainer multiplies each ray's colour loss by its weight.

    Calling :meth:`sample` twice without an :meth:`update` in between returns the same positions.
    A different ``batch_size`` starts a fresh uniform set.

    Args:
        images, masks, view_ids: see :class:`PixelSampler`.
        cell_size: error-map cell side in pixels.
        noise_std: b, in pixels (default ``max(1, 0.01 * max(H, W))``: 1% of the image, the
            authors' code uses 2% of the image in normalised coordinates).
        step_size: a, in squared pixels (default ``noise_std ** 2 / 2``).
        max_drift: largest drift ``|a grad log Q|`` in pixels per step (default ``4 * noise_std``).
        uniform_fraction: share of samples re-seeded uniformly every step.
        alpha_max, warmup_steps: the importance-weight exponent schedule.
        ema_rate: per-ray rate of the error map's moving average.
        eps: added to Q before the log and the weights (same units as the errors).
        stall_distance, stall_steps: the stall rule (pixels, moves).
    """

    name = "soft_mining"

    def __init__(self, images, masks=None, view_ids=None, *, cell_size: int = 16,
                 noise_std: float | None = None, step_size: float | None = None,
                 max_drift: float | None = None, uniform_fraction: float = 0.1, alpha_max: float = 0.6,
                 warmup_steps: int = 1000, ema_rate: float = 0.1, eps: float = 1e-3,
                 stall_distance: float = 0.01, stall_steps: int = 5):
        super().__init__(images, masks, view_ids)
        if not 0.0 <= uniform_fraction <= 1.0:
            raise UserInputError(
                f"soft mining sampler: uniform_fraction must be in [0, 1], got {uniform_fraction}.")
        if not 0.0 < ema_rate <= 1.0:
            raise UserInputError(f"soft mining sampler: ema_rate must be in (0, 1], got {ema_rate}.")
        if cell_size < 1:
            raise UserInputError(f"soft mining sampler: cell_size must be >= 1, got {cell_size}.")
        self.cell_size = int(cell_size)
        if noise_std is None:
            noise_std = max(1.0, 0.01 * max(self.height, self.width))
        self.noise_std = float(noise_std)
        self.step_size = float(self.noise_std**2 / 2 if step_size is None else step_size)
        self.max_drift = float(4 * self.noise_std if max_drift is None else max_drift)
        self.uniform_fraction = float(uniform_fraction)
        self.alpha_max = float(alpha_max)
        self.warmup_steps = int(warmup_steps)
        self.ema_rate = float(ema_rate)
        self.eps = float(eps)
        self.stall_distance = float(stall_distance)
        self.stall_steps = int(stall_steps)
        self.map_height = -(-self.height // self.cell_size)
        self.map_width = -(-self.width // self.cell_size)
        self._q = None  # (V_train, Hq, Wq) float64 error map, None before the first update
        self._q_seen = None
        self._pos = None  # (n, 2) float64 (x, y) pixels
        self._view = None  # (n,) int64 training-view index
        self._stall = None
        self._pending = False
        self._step = 0

    def alpha(self) -> float:
        """Current importance exponent: ``alpha_max * min(1, step / warmup_steps)``."""
        if self.warmup_steps <= 0:
            return self.alpha_max
        return self.alpha_max * min(1.0, max(self._step, 0) / self.warmup_steps)

    def error_map(self) -> np.ndarray | None:
        """(V_train, Hq, Wq) float64 copy of the error map (cell (i, j) covers pixels
        ``[j*cell, (j+1)*cell) x [i*cell, (i+1)*cell)``), or None before the first update."""
        return None if self._q is None else self._q.copy()

    # -- map lookups
    def _bilinear(self, field: np.ndarray, view: np.ndarray, x: np.ndarray, y: np.ndarray,
                  fn=None) -> np.ndarray:
        """``fn(field)`` (field (V_train, Hq, Wq)) at pixel positions, cell values at cell centres.

        ``fn`` is applied to the 4 gathered corner values only, not to the whole map."""
        hq, wq = field.shape[1:]
        u = np.clip(x / self.cell_size - 0.5, 0.0, wq - 1)
        v = np.clip(y / self.cell_size - 0.5, 0.0, hq - 1)
        x0 = np.minimum(np.floor(u).astype(np.int64), max(wq - 2, 0))
        y0 = np.minimum(np.floor(v).astype(np.int64), max(hq - 2, 0))
        x1, y1 = np.minimum(x0 + 1, wq - 1), np.minimum(y0 + 1, hq - 1)
        fx, fy = u - x0, v - y0
        flat, r0, r1 = field.reshape(-1), (view * hq + y0) * wq, (view * hq + y1) * wq
        corners = [flat[r0 + x0], flat[r0 + x1], flat[r1 + x0], flat[r1 + x1]]
        if fn is not None:
            corners = [fn(c) for c in corners]
        top = corners[0] * (1 - fx) + corners[1] * fx
        bot = corners[2] * (1 - fx) + corners[3] * fx
        return top * (1 - fy) + bot * fy

    def _grad_log_q(self, view, pos) -> np.ndarray:
        """(n, 2) central-difference gradient of log(Q + eps) per pixel, step = one cell."""
        def logq(q):
            return np.log(q + self.eps)

        h = float(self.cell_size)
        x, y, q = pos[:, 0], pos[:, 1], self._q
        gx = self._bilinear(q, view, x + h, y, logq) - self._bilinear(q, view, x - h, y, logq)
        gy = self._bilinear(q, view, x, y + h, logq) - self._bilinear(q, view, x, y - h, logq)
        return np.stack([gx, gy], axis=1) / (2 * h)

    # -- the verbs
    def _reseed(self, idx: np.ndarray, rng: np.random.Generator) -> None:
        n = idx.size
        self._view[idx] = rng.integers(0, self.train_views.size, n)
        self._pos[idx, 0] = rng.random(n) * self.width
        self._pos[idx, 1] = rng.random(n) * self.height
        self._stall[idx] = 0

    def _move(self, rng: np.random.Generator) -> None:
        n = self._pos.shape[0]
        drift = self.step_size * self._grad_log_q(self._view, self._pos)
        norm = np.linalg.norm(drift, axis=1, keepdims=True)
        drift *= np.minimum(1.0, self.max_drift / np.maximum(norm, 1e-30))
        new = self._pos + drift + self.noise_std * rng.standard_normal((n, 2))
        moved = np.linalg.norm(new - self._pos, axis=1)
        self._pos = new
        self._stall = np.where(moved < self.stall_distance, self._stall + 1, 0)
        out = (new[:, 0] < 0) | (new[:, 0] >= self.width) | (new[:, 1] < 0) | (new[:, 1] >= self.height)
        reseed = out | (self._stall >= self.stall_steps)
        k = int(round(self.uniform_fraction * n))
        if k:
            reseed[rng.choice(n, size=k, replace=False)] = True
        self._reseed(np.nonzero(reseed)[0], rng)

    def sample(self, batch_size: int, rng: np.random.Generator) -> PixelBatch:
        if self.all_pixels:
            return self._sample_uniform(batch_size, rng)
        b = self._check_batch(batch_size)
        if self._pos is None or self._pos.shape[0] != b:
            self._pos = np.zeros((b, 2))
            self._view = np.zeros(b, np.int64)
            self._stall = np.zeros(b, np.int64)
            self._reseed(np.arange(b), rng)
            self._pending = False
        elif self._pending:
            self._move(rng)
            self._pending = False
        alpha = self.alpha()
        if self._q is None or alpha == 0.0:
            weights = np.ones(b, np.float32)
        else:
            q = self._bilinear(self._q, self._view, self._pos[:, 0], self._pos[:, 1])
            w = (q + self.eps) ** (-alpha)
            weights = (w / w.mean()).astype(np.float32)
        pix = self._pos.astype(np.float32)
        # float32 rounding must not push a position onto the far edge
        pix[:, 0] = np.minimum(pix[:, 0], np.nextafter(np.float32(self.width), np.float32(0)))
        pix[:, 1] = np.minimum(pix[:, 1], np.nextafter(np.float32(self.height), np.float32(0)))
        return PixelBatch(self.train_views[self._view], pix, weights)

    def state_dict(self) -> dict:
        st = super().state_dict()
        st.update(pending=np.asarray(self._pending), step=np.asarray(self._step))
        for k in ("q", "pos", "view", "stall"):  # None (not yet drawn / updated) is stored as absent
            if getattr(self, "_" + k) is not None:
                st[k] = getattr(self, "_" + k).copy()
        return st

    def load_state_dict(self, state: dict) -> None:
        if "q" in state and state["q"].shape != (self.train_views.size, self.map_height, self.map_width):
            raise ValueError(f"soft mining error map of shape {state['q'].shape} does not fit these images")
        pending, step, all_pixels = bool(state["pending"]), int(state["step"]), state["all_pixels"]
        super().load_state_dict({"all_pixels": all_pixels})
        self._pending, self._step = pending, step
        for k in ("q", "pos", "view", "stall"):
            setattr(self, "_" + k, np.array(state[k]) if k in state else None)

    def update(self, view_ids, pix, errors, step) -> None:
        """Fold the batch's per-ray errors into the error map; the next ``sample`` moves the set."""
        local = self._local_views(view_ids)
        pix = np.asarray(pix, np.float64)
        errors = np.asarray(errors, np.float64)
        cx = np.clip((pix[:, 0] // self.cell_size).astype(np.int64), 0, self.map_width - 1)
        cy = np.clip((pix[:, 1] // self.cell_size).astype(np.int64), 0, self.map_height - 1)
        if self._q is None:
            shape = (self.train_views.size, self.map_height, self.map_width)
            self._q = np.full(shape, errors.mean() if errors.size else 0.0)
        flat = (local * self.map_height + cy) * self.map_width + cx
        cells, inverse = np.unique(flat, return_inverse=True)
        count = np.bincount(inverse)
        mean = np.bincount(inverse, weights=errors) / count
        q = self._q.reshape(-1)
        q[cells] = _ema_update(q[cells], np.ones(cells.size, bool), count, mean, self.ema_rate)
        self._step = int(step)
        self._pending = True


# ---------------------------------------------------------------------------- factory
SAMPLERS = {"uniform": UniformSampler, "quadtree": QuadtreeSampler, "soft_mining": SoftMiningSampler}


def make_sampler(name: str, images: np.ndarray, masks: np.ndarray | None = None, view_ids=None,
                 **options) -> PixelSampler:
    """Build the sampler called ``name`` ("uniform", "quadtree" or "soft_mining").

    ``options`` are the keyword arguments of that sampler's class.
    """
    if name not in SAMPLERS:
        raise UserInputError(f"unknown pixel sampler {name!r}; choose one of {sorted(SAMPLERS)}.")
    try:
        return SAMPLERS[name](images, masks, view_ids, **options)
    except TypeError as exc:
        raise UserInputError(f"pixel sampler {name!r}: {exc}; check the sampler options.") from exc
