"""Pixel samplers: the context prior against an explicit double loop, the quadtree's splitting
rule on known error maps, the stated sampling distribution against an independent formula and
against empirical counts (chi-square), and the soft-mining dynamics and weights."""

import numpy as np
import pytest
import torch

from taichi_neus.errors import UserInputError
from taichi_neus.train.pixel_samplers import (
    PixelBatch,
    QuadtreeSampler,
    SoftMiningSampler,
    UniformSampler,
    context_prior,
    make_sampler,
)


# ---------------------------------------------------------------------------- helpers
def chi_square_p(counts, probs, min_expected=5.0):
    """Pearson chi-square goodness-of-fit p-value; bins expecting < min_expected are pooled."""
    counts = np.asarray(counts, np.float64).ravel()
    probs = np.asarray(probs, np.float64).ravel()
    assert abs(probs.sum() - 1) < 1e-9
    expected = probs * counts.sum()
    small = expected < min_expected
    obs = np.concatenate([counts[~small], [counts[small].sum()]])
    exp = np.concatenate([expected[~small], [expected[small].sum()]])
    keep = exp > 0
    assert obs[~keep].sum() == 0, "samples landed where the distribution has no mass"
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = obs.size - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


def prior_reference(image):
    """The context prior with explicit loops: 3x3 std per channel (reflect border), channel mean,
    clamp at 1% of the mean, normalise."""
    img = image.astype(np.float64)
    h, w = img.shape[:2]

    def reflect(i, n):
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    g = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            nb = [img[reflect(y + dy, h), reflect(x + dx, w)] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
            g[y, x] = np.std(np.array(nb), axis=0).mean()
    g = np.maximum(g, 0.01 * g.mean())
    return g / g.sum()


def counts_of(sampler, n_batches, batch, rng):
    """(V_train, H, W) histogram of sampled pixels (checks they are integer pixel centres)."""
    counts = np.zeros((sampler.train_views.size, sampler.height, sampler.width), np.int64)
    for _ in range(n_batches):
        views, pix, weights = sampler.sample(batch, rng)
        assert views.dtype == np.int32 and pix.dtype == np.float32 and weights.dtype == np.float32
        np.testing.assert_array_equal(pix % 1, 0.5)
        np.testing.assert_array_equal(weights, 1.0)
        x, y = pix[:, 0].astype(np.int64), pix[:, 1].astype(np.int64)
        local = np.searchsorted(sampler.train_views, views)
        np.add.at(counts, (local, y, x), 1)
    return counts


def all_pixel_rays(v, h, w, view=0):
    """Every pixel centre of one view, row-major."""
    y, x = np.mgrid[0:h, 0:w]
    pix = np.stack([x.ravel(), y.ravel()], axis=1).astype(np.float32) + 0.5
    return np.full(h * w, view, np.int32), pix


def structured_images(v, h, w, seed=0):
    """Left half flat grey, right half noise: a strongly non-uniform context prior."""
    rng = np.random.default_rng(seed)
    img = (rng.random((v, h, w, 3)) * 255).astype(np.uint8)
    img[:, :, : w // 2] = 90
    return img


# ---------------------------------------------------------------------------- base / uniform
def test_uniform_sampler_is_uniform_over_training_pixels():
    imgs = structured_images(3, 6, 5)
    s = UniformSampler(imgs, view_ids=[2, 0])
    rng = np.random.default_rng(0)
    counts = counts_of(s, 100, 600, rng)
    assert s.train_views.tolist() == [0, 2]
    uniform = np.full(counts.shape, 1.0 / counts.size)
    assert chi_square_p(counts, uniform) > 1e-3
    wrong = uniform.copy()
    wrong[0] *= 1.2
    assert chi_square_p(counts, wrong / wrong.sum()) < 1e-3


def test_colors_are_exact_at_centres_and_bilinear_between():
    imgs = structured_images(2, 4, 6, seed=3)
    s = UniformSampler(imgs, masks=imgs[..., 0] > 100)
    views, pix, _ = s.sample(50, np.random.default_rng(1))
    x, y = pix[:, 0].astype(int), pix[:, 1].astype(int)
    np.testing.assert_allclose(s.colors(views, pix), imgs[views, y, x] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(s.mask_values(views, pix), (imgs[views, y, x, 0] > 100).astype(np.float32))
    mid = np.array([[2.0, 1.5]], np.float32)  # halfway between pixels (1, 1) and (1, 2) of row 1
    np.testing.assert_allclose(s.colors(np.array([1]), mid)[0],
                               (imgs[1, 1, 1].astype(float) + imgs[1, 1, 2]) / 510.0, rtol=1e-6)


def test_bad_input_is_rejected_with_user_errors():
    imgs = structured_images(2, 4, 6)
    with pytest.raises(UserInputError):
        UniformSampler(imgs.astype(np.float32))
    with pytest.raises(UserInputError):
        UniformSampler(imgs, view_ids=[5])
    with pytest.raises(UserInputError):
        UniformSampler(imgs, masks=np.zeros((2, 3, 3)))
    with pytest.raises(UserInputError):
        make_sampler("importance", imgs)
    with pytest.raises(UserInputError):
        make_sampler("quadtree", imgs, min_leaf_size=6)
    assert isinstance(make_sampler("soft_mining", imgs, cell_size=2), SoftMiningSampler)


# ---------------------------------------------------------------------------- quadtree
def test_context_prior_matches_double_loop():
    rng = np.random.default_rng(0)
    img = (rng.random((9, 11, 3)) * 255).astype(np.uint8)
    img[:5, :6] = [10, 200, 30]  # a flat patch: its std is 0 and the 1% clamp decides
    ref = prior_reference(img)
    got = context_prior(img)
    assert got.shape == (9, 11) and got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-15)
    assert np.isclose(got[1, 1], got.min()) and (got == got.min()).sum() >= 12  # the clamped floor
    flat = np.full((4, 5, 3), 77, np.uint8)
    np.testing.assert_allclose(context_prior(flat), 1.0 / 20)


def test_leaves_partition_the_image_exactly():
    imgs = structured_images(2, 37, 53)
    for depth in (0, 2, 99):
        q = QuadtreeSampler(imgs, min_leaf_size=4, initial_depth=depth)
        leaves = q.leaves()
        cover = np.zeros((2, 37, 53), int)
        rects = list(zip(leaves["view"], leaves["x0"], leaves["y0"], leaves["x1"], leaves["y1"], strict=True))
        for v, x0, y0, x1, y1 in rects:
            cover[v, y0:y1, x0:x1] += 1
        np.testing.assert_array_equal(cover, 1)
        sides = (leaves["x1"] - leaves["x0"]) * (leaves["y1"] - leaves["y0"])
        np.testing.assert_array_equal(leaves["area"], sides)
        priors = [context_prior(im) for im in imgs]
        mass = [priors[v][y0:y1, x0:x1].sum() for v, x0, y0, x1, y1 in rects]
        np.testing.assert_allclose(leaves["prior_mass"], mass, rtol=1e-5)
    assert leaves["level"].max() == q.max_level and (leaves["x1"] - leaves["x0"]).min() >= 1


def _leaf_set(q):
    lv = q.leaves()
    return {(int(x0), int(y0), int(x1 - x0)): bool(c)
            for x0, y0, x1, c in zip(lv["x0"], lv["y0"], lv["x1"], lv["converged"], strict=True)}


def test_quadtree_splits_exactly_the_leaves_above_threshold():
    imgs = structured_images(1, 64, 64)
    q = QuadtreeSampler(imgs, threshold=0.1, min_leaf_size=8, min_rays=1, refine_every=1, ema_rate=0.5)
    views, pix = all_pixel_rays(1, 64, 64)

    def feed(errmap, step):
        q.update(views, pix, errmap.ravel().astype(np.float32), step)

    assert _leaf_set(q) == {(0, 0, 64): False}
    feed(np.full((64, 64), 0.2), 0)  # root above threshold -> 4 quadrants
    assert _leaf_set(q) == {(0, 0, 32): False, (32, 0, 32): False, (0, 32, 32): False, (32, 32, 32): False}
    assert np.all(q.leaves()["rays"] == 0)

    e = np.zeros((64, 64))
    e[:32, :32] = 0.3  # top-left: above -> split
    e[:32, 32:] = 0.05  # top-right: below on average despite a hot 8x8 spot -> converged
    e[8:16, 40:48] = 0.5  # mean over the quadrant = 0.05 * 15/16 + 0.5 / 16 = 0.078
    e[32:, :32] = 0.15  # bottom-left: above -> split
    e[32:, 32:] = 0.0  # bottom-right: converged
    feed(e, 1)
    expected = {(32, 0, 32): True, (32, 32, 32): True}
    for x0, y0 in ((0, 0), (0, 32)):
        for dx, dy in ((0, 0), (16, 0), (0, 16), (16, 16)):
            expected[(x0 + dx, y0 + dy, 16)] = False
    assert _leaf_set(q) == expected
    lv = q.leaves()
    big = (lv["x1"] - lv["x0"]) == 32
    np.testing.assert_allclose(lv["error"][big], [0.078125, 0.0])
    assert np.isnan(lv["error"][~big]).all()

    e = np.zeros((64, 64))
    e[0:16, 0:16] = 0.5  # top-left quadrant's children: two above, two below
    e[16:32, 16:32] = 0.5
    e[0:16, 16:32] = 0.01
    e[16:32, 0:16] = 0.09
    e[32:, :32] = 0.02  # bottom-left's children all converge
    e[:32, 32:] = 0.3  # top-right (converged, error history 0.078) gets worse: un-marked and split
    feed(e, 2)
    expected = {(32, 32, 32): True, (16, 0, 16): True, (0, 16, 16): True,
                (0, 32, 16): True, (16, 32, 16): True, (0, 48, 16): True, (16, 48, 16): True}
    for x0, y0 in ((0, 0), (16, 16)):  # -> min leaf size 8
        for dx, dy in ((0, 0), (8, 0), (0, 8), (8, 8)):
            expected[(x0 + dx, y0 + dy, 8)] = False
    for dx, dy in ((0, 0), (16, 0), (0, 16), (16, 16)):
        expected[(32 + dx, dy, 16)] = False
    assert _leaf_set(q) == expected
    tr = q.leaves()
    assert not tr["converged"][(tr["x0"] == 32) & (tr["y0"] == 0)].any()

    # min-size leaves above threshold stay (not split, not converged)
    e = np.zeros((64, 64))
    e[0:16, 0:16] = e[16:32, 16:32] = 0.9
    feed(e, 3)
    lv = q.leaves()
    small = (lv["x1"] - lv["x0"]) == 8
    assert small.sum() == 8 and not lv["converged"][small].any()
    assert lv["level"][small].max() == q.max_level == 3


def test_quadtree_waits_for_min_rays_and_refine_every():
    imgs = structured_images(1, 32, 32)
    views, pix = all_pixel_rays(1, 32, 32)
    q = QuadtreeSampler(imgs, threshold=0.1, min_leaf_size=8, min_rays=2000, refine_every=1)
    q.update(views, pix, np.full(1024, 0.5, np.float32), 0)  # 1024 rays < 2000
    assert len(q.leaves()["view"]) == 1
    q.update(views, pix, np.full(1024, 0.5, np.float32), 1)  # 2048 rays
    assert len(q.leaves()["view"]) == 4
    q = QuadtreeSampler(imgs, threshold=0.1, min_leaf_size=8, min_rays=1, refine_every=3)
    for step in range(2):
        q.update(views, pix, np.full(1024, 0.5, np.float32), step)
    assert len(q.leaves()["view"]) == 1
    q.update(views, pix, np.full(1024, 0.5, np.float32), 2)
    assert len(q.leaves()["view"]) == 4


def _driven_quadtree(**kw):
    """Two 22 x 38 views (partial 4x4 blocks at the border) with converged, unconverged and
    split leaves."""
    imgs = structured_images(3, 22, 38, seed=5)
    q = QuadtreeSampler(imgs, view_ids=[0, 2], threshold=0.1, min_leaf_size=4, min_rays=1,
                        refine_every=1, n0=10, **kw)
    e0 = np.where(np.arange(38)[None, :] >= 20, 0.4, 0.02) * np.ones((22, 1))
    e2 = np.full((22, 38), 0.03)
    e2[:9, :13] = 0.6
    for step in range(3):
        for view, e in ((0, e0), (2, e2)):
            views, pix = all_pixel_rays(1, 22, 38, view=view)
            q.update(views, pix, e.ravel().astype(np.float32), step)
    return imgs, q


def expected_quadtree_pdf(q, priors, prior_fraction=0.5, n0=10, ignore_converged=False):
    """The documented distribution, from the leaf list and independently computed priors."""
    lv = q.leaves()
    n_pix = sum(p.size for p in priors)
    local = {int(v): i for i, v in enumerate(q.train_views)}
    conv = lv["converged"] & (not ignore_converged)
    rects = list(zip(lv["view"], lv["x0"], lv["y0"], lv["x1"], lv["y1"], strict=True))
    m_conv = [min(n0, (x1 - x0) * (y1 - y0)) / n_pix if c else 0.0
              for c, (_, x0, y0, x1, y1) in zip(conv, rects, strict=True)]
    rest = 1.0 - sum(m_conv)
    in_u = [np.zeros(p.shape, bool) for p in priors]
    pdf = [np.zeros(p.shape) for p in priors]
    for c, m, (v, x0, y0, x1, y1) in zip(conv, m_conv, rects, strict=True):
        if c:
            pdf[local[v]][y0:y1, x0:x1] = m / ((x1 - x0) * (y1 - y0))
        else:
            in_u[local[v]][y0:y1, x0:x1] = True
    n_u = sum(u.sum() for u in in_u)
    g_u = sum(p[u].sum() for p, u in zip(priors, in_u, strict=True))
    for i, (p, u) in enumerate(zip(priors, in_u, strict=True)):
        pdf[i][u] = rest * ((1 - prior_fraction) / n_u + prior_fraction * p[u] / g_u)
    return np.stack(pdf)


def test_quadtree_distribution_matches_formula_and_samples():
    imgs, q = _driven_quadtree()
    lv = q.leaves()
    assert lv["converged"].any() and (~lv["converged"]).any() and len(set(lv["level"].tolist())) >= 3
    priors = [prior_reference(imgs[v]) for v in (0, 2)]
    stated = expected_quadtree_pdf(q, priors)
    np.testing.assert_allclose(q.pixel_distribution(), stated, rtol=1e-5, atol=1e-12)
    assert abs(stated.sum() - 1) < 1e-12

    rng = np.random.default_rng(123)
    counts = counts_of(q, 300, 1024, rng)
    assert chi_square_p(counts, stated) > 1e-3
    # the same samples reject wrong distributions: no prior half, or converged leaves not throttled
    assert chi_square_p(counts, expected_quadtree_pdf(q, priors, prior_fraction=0.0)) < 1e-3
    assert chi_square_p(counts, expected_quadtree_pdf(q, priors, ignore_converged=True)) < 1e-3
    assert chi_square_p(counts, expected_quadtree_pdf(q, priors, n0=14)) < 1e-3


def test_all_converged_tree_with_leaves_smaller_than_n0():
    """Leaves of 16, 8, 8 and 4 pixels, all converged: masses min(n0, area) = 10, 8, 8, 4,
    rescaled to sum to 1 because no leaf is left to take the rest."""
    imgs = structured_images(1, 6, 6)
    views, pix = all_pixel_rays(1, 6, 6)
    q = QuadtreeSampler(imgs, threshold=0.1, min_leaf_size=4, min_rays=1, refine_every=1, n0=10)
    q.update(views, pix, np.full(36, 0.5, np.float32), 0)
    q.update(views, pix, np.zeros(36, np.float32), 1)
    assert sorted(q.leaves()["area"].tolist()) == [4, 8, 8, 16] and q.leaves()["converged"].all()
    expected = np.zeros((6, 6))
    expected[:4, :4] = 10 / 30 / 16
    expected[:4, 4:] = 8 / 30 / 8
    expected[4:, :4] = 8 / 30 / 8
    expected[4:, 4:] = 4 / 30 / 4
    np.testing.assert_allclose(q.pixel_distribution()[0], expected, rtol=1e-12)
    counts = counts_of(q, 100, 300, np.random.default_rng(2))
    assert chi_square_p(counts, expected[None]) > 1e-3
    assert chi_square_p(counts, np.full((1, 6, 6), 1 / 36)) < 1e-3


def test_converged_leaves_get_their_n0_share_in_every_batch():
    _, q = _driven_quadtree()
    lv = q.leaves()
    conv = np.nonzero(lv["converged"])[0]
    n_pix = q.num_pixels
    rng = np.random.default_rng(7)
    b = 4096
    views, pix, _ = q.sample(b, rng)
    x, y = pix[:, 0], pix[:, 1]
    for i in conv:
        inside = ((views == lv["view"][i]) & (x >= lv["x0"][i]) & (x < lv["x1"][i])
                  & (y >= lv["y0"][i]) & (y < lv["y1"][i])).sum()
        share = b * min(10, lv["area"][i]) / n_pix
        assert np.floor(share) - 1 <= inside <= np.ceil(share) + 1  # systematic sampling: floor/ceil


def test_quadtree_all_pixel_phase():
    imgs = structured_images(1, 16, 24)
    views, pix = all_pixel_rays(1, 16, 24)
    q = QuadtreeSampler(imgs, threshold=0.1, min_leaf_size=4, min_rays=1, refine_every=1,
                        all_pixels_after=0.5, total_steps=10)
    errors = np.where(pix[:, 0] < 8, 0.5, 0.0).astype(np.float32)
    for step in range(5):
        q.update(views, pix, errors, step)
        assert not q.all_pixels
    assert q.leaves()["converged"].any() and not q.leaves()["converged"].all()
    assert q.pixel_distribution().max() > 5 * q.pixel_distribution().min()
    q.update(views, pix, errors, 5)
    assert q.all_pixels
    np.testing.assert_allclose(q.pixel_distribution(), 1.0 / 384)
    counts = counts_of(q, 50, 384, np.random.default_rng(0))
    assert chi_square_p(counts, np.full(counts.shape, 1 / 384)) > 1e-3
    q.set_all_pixels(False)
    assert q.pixel_distribution().max() > 5 * q.pixel_distribution().min()


# ---------------------------------------------------------------------------- soft mining
def _error_map_feed(s, errfun, step, view=0):
    views, pix = all_pixel_rays(1, s.height, s.width, view=view)
    s.update(views, pix, errfun(pix[:, 0], pix[:, 1]).astype(np.float32), step)


def test_soft_mining_concentrates_on_high_error_and_keeps_covering():
    imgs = structured_images(1, 64, 64)
    # a = b^2: the Langevin chain alone would settle at a density ~ Q^2; 10% fresh uniform
    # samples per step keep it from getting there (measured ~28% in the square at step 120)
    s = SoftMiningSampler(imgs, cell_size=4, noise_std=4.0, step_size=16.0, uniform_fraction=0.1,
                          warmup_steps=0)
    rng = np.random.default_rng(0)

    def err(x, y):
        return np.where((x >= 24) & (x < 40) & (y >= 24) & (y < 40), 1.0, 0.05)

    in_square = []
    for step in range(120):
        views, pix, weights = s.sample(1024, rng)
        assert (pix >= 0).all() and (pix[:, 0] < 64).all() and (pix[:, 1] < 64).all()
        e = err(pix[:, 0], pix[:, 1])
        s.update(views, pix, e, step)
        in_square.append((e == 1.0).mean())
    uniform_share = 16 * 16 / 64**2
    late = np.mean(in_square[-40:])
    assert late > 3 * uniform_share, late
    # still covers the rest: every 16 x 16 tile outside the square gets samples
    counts = np.zeros((4, 4), int)
    for _ in range(10):
        views, pix, _ = s.sample(1024, rng)
        np.add.at(counts, (pix[:, 1].astype(int) // 16, pix[:, 0].astype(int) // 16), 1)
        s.update(views, pix, err(pix[:, 0], pix[:, 1]), 200)
    assert (counts > 0).all() and 1 - late > 0.2
    # weights favour the low-error samples (alpha = alpha_max, warm-up 0)
    views, pix, weights = s.sample(1024, rng)
    hot = err(pix[:, 0], pix[:, 1]) == 1.0
    assert abs(weights.mean() - 1) < 1e-5 and weights[hot].mean() < weights[~hot].mean()


def test_soft_mining_weights_are_one_for_alpha_zero():
    imgs = structured_images(1, 16, 16)
    rng = np.random.default_rng(0)
    for kw, step in ((dict(alpha_max=0.0), 500), (dict(alpha_max=0.6, warmup_steps=100), 0)):
        s = SoftMiningSampler(imgs, cell_size=4, **kw)
        views, pix, weights = s.sample(64, rng)
        np.testing.assert_array_equal(weights, 1.0)
        _error_map_feed(s, lambda x, y: x / 16.0, step)
        views, pix, weights = s.sample(64, rng)
        assert s.alpha() == 0.0
        np.testing.assert_array_equal(weights, 1.0)


def bilinear_ref(q, x, y, cell):
    """Error map at one position; cell values at cell centres, clamped at the border."""
    hq, wq = q.shape
    u = min(max(x / cell - 0.5, 0.0), wq - 1)
    v = min(max(y / cell - 0.5, 0.0), hq - 1)
    i, j = min(int(np.floor(v)), hq - 2), min(int(np.floor(u)), wq - 2)
    fy, fx = v - i, u - j
    return ((1 - fy) * ((1 - fx) * q[i, j] + fx * q[i, j + 1])
            + fy * ((1 - fx) * q[i + 1, j] + fx * q[i + 1, j + 1]))


def test_soft_mining_weights_follow_formula_and_warmup():
    imgs = structured_images(1, 16, 20)
    s = SoftMiningSampler(imgs, cell_size=4, alpha_max=0.8, warmup_steps=100, ema_rate=1.0, eps=1e-3)
    rng = np.random.default_rng(3)
    s.sample(64, rng)
    cellval = np.random.default_rng(4).random((4, 5)) + 0.01

    def err(x, y):
        return cellval[(y // 4).astype(int), (x // 4).astype(int)]

    _error_map_feed(s, err, 50)  # alpha = 0.8 * 50 / 100
    np.testing.assert_allclose(s.error_map()[0], cellval, rtol=1e-6)
    views, pix, weights = s.sample(64, rng)
    assert s.alpha() == pytest.approx(0.4)
    q = np.array([bilinear_ref(s.error_map()[0], x, y, 4) for x, y in pix.astype(np.float64)])
    w = (q + 1e-3) ** -0.4
    np.testing.assert_allclose(weights, w / w.mean(), rtol=2e-5)


def test_soft_mining_langevin_drift_is_step_times_grad_log_q():
    imgs = structured_images(1, 64, 64)
    s = SoftMiningSampler(imgs, cell_size=4, noise_std=0.0, step_size=40.0, max_drift=100.0,
                          uniform_fraction=0.0, stall_distance=0.0, ema_rate=1.0, eps=1e-12)
    rng = np.random.default_rng(0)
    _, pos0, _ = s.sample(256, rng)

    def err(x, y):  # log Q = 0.1 * (cell column): d log Q / dx = 0.1 / 4 per pixel
        return np.exp(0.1 * (x // 4))

    _error_map_feed(s, err, 1)
    _, pos1, _ = s.sample(256, rng)
    interior = (pos0[:, 0] >= 6) & (pos0[:, 0] <= 57)
    assert interior.sum() > 100
    np.testing.assert_allclose(pos1[interior, 0], pos0[interior, 0] + 40.0 * 0.1 / 4, atol=1e-4)
    np.testing.assert_allclose(pos1[interior, 1], pos0[interior, 1], atol=1e-4)


def test_soft_mining_reseeds_samples_that_leave_or_stall():
    imgs = structured_images(2, 32, 32)
    rng = np.random.default_rng(0)
    # a drift of ~100 px to the right throws every sample out of the 32-px image: all re-seeded
    s = SoftMiningSampler(imgs, cell_size=4, noise_std=0.0, step_size=4000.0, max_drift=1000.0,
                          uniform_fraction=0.0, ema_rate=1.0, eps=1e-12)
    _, p0, _ = s.sample(500, rng)
    _error_map_feed(s, lambda x, y: np.exp(0.1 * (x // 4)), 1)
    v1, p1, _ = s.sample(500, rng)
    assert (p1[:, 0] < 32).all() and (p1 >= 0).all()
    assert not np.isclose(p1[:, 0], p0[:, 0] + 100.0, atol=1.0).any()
    assert set(v1.tolist()) == {0, 1}

    # no drift, no noise: positions freeze, and after stall_steps moves they are re-seeded
    s = SoftMiningSampler(imgs, cell_size=4, noise_std=0.0, uniform_fraction=0.0, stall_steps=3)
    _, p0, _ = s.sample(200, rng)
    for step in range(1, 4):
        _error_map_feed(s, lambda x, y: np.full_like(x, 0.2), step)
        _, p, _ = s.sample(200, rng)
        if step < 3:
            np.testing.assert_array_equal(p, p0)
        else:
            assert (np.abs(p - p0).sum(axis=1) > 0).all()

    # the uniform fraction: exactly 25% of the samples are fresh each step
    s = SoftMiningSampler(imgs, cell_size=4, noise_std=0.0, uniform_fraction=0.25, stall_steps=100)
    _, p0, _ = s.sample(200, rng)
    _error_map_feed(s, lambda x, y: np.full_like(x, 0.2), 1)
    _, p1, _ = s.sample(200, rng)
    assert (np.abs(p1 - p0).sum(axis=1) > 0).sum() == 50


def test_soft_mining_persistent_set_semantics():
    imgs = structured_images(1, 16, 16)
    s = SoftMiningSampler(imgs, cell_size=4)
    rng = np.random.default_rng(0)
    a = s.sample(32, rng)
    b = s.sample(32, rng)  # no update in between: the same set
    assert isinstance(a, PixelBatch)
    np.testing.assert_array_equal(a.pix, b.pix)
    c = s.sample(48, rng)  # another batch size: a fresh set
    assert c.pix.shape == (48, 2)
    s.set_all_pixels(True)
    np.testing.assert_array_equal(s.sample(48, rng).pix % 1, 0.5)
