"""Ray sampler: packed layout, sorted samples inside [near, far], inverse-CDF samples following the
coarse pdf, rays that miss get nothing."""

import numpy as np
import pytest
import taichi as ti

from taichi_neus import buffers
from taichi_neus.render.occupancy import OccupancyGrid
from taichi_neus.render.sampling import RaySampler, bucket_size

CENTRE = np.array([0.1, -0.05, 0.0])
RADIUS = 0.5


@ti.kernel
def _sphere_sdf(p: ti.types.ndarray(dtype=ti.f32, ndim=2), out: ti.types.ndarray(dtype=ti.f32, ndim=1),
                cx: ti.f32, cy: ti.f32, cz: ti.f32, r: ti.f32):
    for i in range(p.shape[0]):
        out[i] = ti.sqrt((p[i, 0] - cx) ** 2 + (p[i, 1] - cy) ** 2 + (p[i, 2] - cz) ** 2) - r


def sphere_sdf(points):
    out = buffers.f32(points.shape[0])
    _sphere_sdf(points, out, *CENTRE, RADIUS)
    return out


def make_rays(xy, z0=-2.5):
    """Rays along +z from (x, y, z0); near/far where they cross the unit sphere (0, 0 if they miss)."""
    xy = np.asarray(xy, np.float64)
    o = np.concatenate([xy, np.full((len(xy), 1), z0)], 1)
    d = np.tile([0.0, 0.0, 1.0], (len(xy), 1))
    b = (o * d).sum(1)
    disc = b**2 - ((o**2).sum(1) - 1.0)
    hit = disc > 0
    sq = np.sqrt(np.where(hit, disc, 0.0))
    near = np.where(hit, -b - sq, 0.0)
    far = np.where(hit, -b + sq, 0.0)
    return o, d, near, far


def first_hit(o, d):
    oc = o - CENTRE
    b = (oc * d).sum(1)
    disc = b**2 - ((oc**2).sum(1) - RADIUS**2)
    return np.where(disc > 0, -b - np.sqrt(np.maximum(disc, 0)), np.nan)


def run(sampler, rays, inv_s, seed=0, perturb=False):
    o, d, near, far = rays
    up = buffers.upload
    return sampler.sample(up(o), up(d), up(near), up(far), sphere_sdf, inv_s, rng_seed=seed, perturb=perturb)


def to_host(ps):
    n = ps.n_samples
    return dict(off=ps.ray_offsets.to_numpy(), cnt=ps.ray_counts.to_numpy(), t=ps.t.to_numpy()[:n],
                delta=ps.delta.to_numpy()[:n], pos=ps.positions.to_numpy()[:n], ids=ps.ray_ids.to_numpy()[:n])


def coarse_cdf(c):
    """Piecewise-linear CDF of the coarse pdf (host, float64)."""
    w = c["weight"].astype(np.float64)
    lo, hi = c["lo"].astype(np.float64), c["hi"].astype(np.float64)

    def cdf(t):
        t = np.asarray(t, np.float64)[..., None]
        frac = np.clip((t - lo) / (hi - lo), 0.0, 1.0)
        return (frac * (w / w.sum())).sum(-1)

    return cdf


@pytest.mark.portable
@pytest.mark.parametrize("perturb", [False, True])
def test_packed_layout_sorted_in_range_and_misses_empty(perturb):
    grid = OccupancyGrid(resolution=32)
    grid.update(sphere_sdf, inv_s=64.0, step=0)
    xs = np.array([0.1, 0.3, 0.45, -0.2, 0.9, -0.75, 1.2, 0.05])
    ys = np.array([-0.05, 0.0, 0.1, -0.3, 0.0, 0.6, 0.0, 0.95])
    rays = make_rays(np.stack([xs, ys], 1))
    o, d, near, far = rays
    n_fine = 24
    sampler = RaySampler(grid, step=0.01, max_coarse=128, n_fine=n_fine)
    ps = run(sampler, rays, inv_s=200.0, seed=5, perturb=perturb)
    h = to_host(ps)
    dist_xy = np.hypot(xs - CENTRE[0], ys - CENTRE[1])
    hits = dist_xy < RADIUS - 0.05
    far_miss = dist_xy > RADIUS + 0.3  # passes no occupied cell
    assert hits.sum() == 4 and far_miss.sum() == 4
    assert np.all(h["cnt"][hits] == n_fine)
    assert np.all(h["cnt"][far_miss] == 0)
    assert np.all((h["cnt"] == 0) | (h["cnt"] == n_fine))
    assert ps.n_samples == h["cnt"].sum() and ps.n_rays == len(xs)
    np.testing.assert_array_equal(h["off"], np.concatenate([[0], np.cumsum(h["cnt"])[:-1]]))
    t_hit = first_hit(o, d)
    for r in range(len(xs)):
        sl = slice(h["off"][r], h["off"][r] + h["cnt"][r])
        t, delta = h["t"][sl], h["delta"][sl]
        assert np.all(h["ids"][sl] == r)
        assert np.all(np.diff(t) > 0)
        assert np.all(delta >= 0)
        assert np.all(t - delta / 2 >= near[r] - 1e-5) and np.all(t + delta / 2 <= far[r] + 1e-5)
        assert np.all(t[1:] - delta[1:] / 2 >= t[:-1] + delta[:-1] / 2 - 1e-5)  # intervals do not overlap
        np.testing.assert_allclose(h["pos"][sl], o[r] + t[:, None] * d[r], atol=1e-5)
        if hits[r]:
            # the weights, hence the samples, sit at the first surface crossing
            assert abs(np.median(t) - t_hit[r]) < 0.03
    assert ps.n_coarse > 0


@pytest.mark.portable
def test_fine_intervals_carry_equal_coarse_mass():
    """Deterministic u = k/n: each fine interval holds exactly 1/n of the coarse pdf, and the
    intervals tile [F⁻¹(0), F⁻¹(1)] (one segment: fresh dense grid)."""
    grid = OccupancyGrid(resolution=32)
    rays = make_rays([[0.1, -0.05], [0.35, 0.2]])
    n_fine = 16
    sampler = RaySampler(grid, step=0.02, max_coarse=256, n_fine=n_fine, max_interval_bins=None)
    ps = run(sampler, rays, inv_s=30.0)
    h = to_host(ps)
    coarse = sampler.coarse_numpy()
    for r in range(2):
        c = coarse[r]
        assert len(c["lo"]) > 20 and np.all(c["seg_lo"] == c["lo"][0]) and np.all(c["seg_hi"] == c["hi"][-1])
        sl = slice(h["off"][r], h["off"][r] + n_fine)
        t, delta = h["t"][sl].astype(np.float64), h["delta"][sl].astype(np.float64)
        cdf = coarse_cdf(c)
        mass = cdf(t + delta / 2) - cdf(t - delta / 2)
        np.testing.assert_allclose(mass, 1.0 / n_fine, atol=2e-4)
        np.testing.assert_allclose((t + delta / 2)[:-1], (t - delta / 2)[1:], atol=2e-5)


@pytest.mark.portable
def test_random_samples_follow_coarse_pdf():
    """Stratified random u: mapped through its ray's coarse CDF, each fine sample is ~ uniform on
    [0, 1] (probability integral transform): over many seeds the Kolmogorov-Smirnov distance to
    the uniform distribution stays within the stratification bound."""
    grid = OccupancyGrid(resolution=32)
    grid.update(sphere_sdf, inv_s=20.0, step=1)  # wide band: a non-trivial pdf, possibly several segments
    rays = make_rays([[0.3, 0.1]])
    n_fine = 32
    sampler = RaySampler(grid, step=0.01, max_coarse=256, n_fine=n_fine)
    us, ts = [], []
    for seed in range(12):
        ps = run(sampler, rays, inv_s=40.0, seed=seed, perturb=True)
        h = to_host(ps)
        assert h["cnt"][0] == n_fine
        t = h["t"].astype(np.float64)
        ts.append(t)
        us.append(coarse_cdf(sampler.coarse_numpy()[0])(t))
    u = np.sort(np.concatenate(us))
    ks = np.max(np.abs(u - (np.arange(u.size) + 0.5) / u.size))
    assert ks < 1.0 / n_fine
    assert not np.allclose(ts[0], ts[1])  # different seeds, different samples


@pytest.mark.portable
def test_intervals_never_span_empty_space():
    """A sharp grid leaves the sphere's front and back shells as two segments; with a soft density
    and the fixed cosine (the slope estimate gives the exiting back shell no weight) the weights
    fall in both, so some fine interval would straddle the empty interior: it is clipped to one
    segment. Every other interval keeps its mass 1/n."""
    grid = OccupancyGrid(resolution=32)
    grid.update(sphere_sdf, inv_s=1000.0, step=0)
    rays = make_rays([[0.1, -0.05], [0.2, 0.1]])
    n_fine = 16
    sampler = RaySampler(grid, step=0.01, max_coarse=256, n_fine=n_fine, max_interval_bins=None,
                         cos_estimate="fixed")
    ps = run(sampler, rays, inv_s=3.0)
    h = to_host(ps)
    for r, c in enumerate(sampler.coarse_numpy()):
        segs = np.unique(np.stack([c["seg_lo"], c["seg_hi"]], 1), axis=0)
        assert len(segs) == 2
        sl = slice(h["off"][r], h["off"][r] + h["cnt"][r])
        t, delta = h["t"][sl].astype(np.float64), h["delta"][sl].astype(np.float64)
        a, b = t - delta / 2, t + delta / 2
        in_seg = [(a >= lo - 1e-6) & (b <= hi + 1e-6) for lo, hi in segs]
        assert np.all(in_seg[0] | in_seg[1])
        assert in_seg[0].sum() >= 2 and in_seg[1].sum() >= 2  # both shells are sampled
        mass = coarse_cdf(c)(b) - coarse_cdf(c)(a)
        assert np.sum(np.abs(mass - 1.0 / n_fine) > 1e-4) <= 1  # only the straddling one is clipped
        assert mass.sum() > 1.0 - 1.0 / n_fine


@pytest.mark.portable
def test_interval_length_cap():
    grid = OccupancyGrid(resolution=32)
    grid.update(sphere_sdf, inv_s=64.0, step=0)
    rays = make_rays([[0.1, -0.05], [0.3, 0.2], [-0.2, 0.3]])
    free = to_host(run(RaySampler(grid, step=0.01, n_fine=16, max_interval_bins=None), rays, inv_s=800.0))
    capped = to_host(run(RaySampler(grid, step=0.01, n_fine=16, max_interval_bins=3.0), rays, inv_s=800.0))
    assert free["delta"].max() > 0.05  # long tail intervals without the cap
    assert capped["delta"].max() <= 0.03 + 1e-6
    assert np.all(np.diff(capped["t"].reshape(3, 16), axis=1) > 0)


@pytest.mark.portable
@pytest.mark.parametrize("tau", [1e-4, 1e-2])
def test_scout_pass_ends_rays_where_the_transmittance_bound_falls_below_tau(tau):
    """stop_transmittance τ (renders' ``render.render_stop``): a scout march at a coarser step cuts each ray's
    far at the end of its first bin with s·f < logit τ (host reference from the scout's own bins); the main
    march keeps exactly the bins before the cut, and the NeuS weight the uncut march puts behind the cut is
    below τ of the ray's opacity; rays that never go that deep keep their far."""
    grid = OccupancyGrid(resolution=32)  # fresh: every cell occupied, so each ray marches its whole chord
    rays = make_rays([[0.1, -0.05], [0.3, 0.2], [-0.15, 0.1], [0.58, -0.05], [0.9, 0.0]])
    o, d, near, far = rays
    inv_s = 200.0
    full = RaySampler(grid, step=0.005, max_coarse=1024, n_fine=32)
    cut = RaySampler(grid, step=0.005, max_coarse=1024, n_fine=32, stop_transmittance=tau, scout_step=0.02,
                     scout_max_coarse=256)
    ps_full = run(full, rays, inv_s)
    c_full = full.coarse_numpy()
    ps = run(cut, rays, inv_s)
    c_cut, scout = cut.coarse_numpy(), cut._scout.coarse_numpy()
    far_cut = cut.far_cut.to_numpy()
    logit = np.log(tau / (1.0 - tau))
    for r in range(len(near)):
        mid = o[r] + (0.5 * (scout[r]["lo"] + scout[r]["hi"]))[:, None].astype(np.float64) * d[r]
        deep = np.nonzero(inv_s * (np.linalg.norm(mid - CENTRE, axis=1) - RADIUS) < logit)[0]
        expect = scout[r]["hi"][deep[0]] if len(deep) else far[r]
        assert far_cut[r] == pytest.approx(expect, abs=1e-5)
        n = len(c_cut[r]["lo"])
        np.testing.assert_allclose(c_cut[r]["lo"], c_full[r]["lo"][:n], atol=1e-6)
        assert c_cut[r]["hi"][-1] <= far_cut[r] + 1e-6
        w = c_full[r]["weight"].astype(np.float64)
        behind = w[c_full[r]["lo"] >= far_cut[r] - 1e-6].sum()
        assert behind <= tau * w.sum() + 1e-7
    hits = np.hypot(o[:, 0] - CENTRE[0], o[:, 1] - CENTRE[1]) < RADIUS - 0.1
    assert hits.sum() == 3 and np.all(far_cut[hits] < far[hits] - 0.3)  # cut well before the sphere's back
    assert np.all(far_cut[~hits] == pytest.approx(far[~hits]))  # the grazing ray and the miss go on
    assert ps.n_coarse < ps_full.n_coarse  # the scout's evaluations included


def test_random_shift_and_seed_reproducible():
    grid = OccupancyGrid(resolution=16)
    rays = make_rays([[0.1, 0.0], [0.2, 0.2]])
    sampler = RaySampler(grid, step=0.05, max_coarse=64, n_fine=8)
    a = to_host(run(sampler, rays, 30.0, seed=3, perturb=True))
    b = to_host(run(sampler, rays, 30.0, seed=3, perturb=True))
    c = to_host(run(sampler, rays, 30.0, seed=4, perturb=True))
    np.testing.assert_array_equal(a["t"], b["t"])
    assert not np.array_equal(a["t"], c["t"])


@pytest.mark.portable
def test_too_many_occupied_bins_coarsens_the_step():
    grid = OccupancyGrid(resolution=16)  # dense: the whole chord is occupied
    rays = make_rays([[0.0, 0.0], [0.5, 0.5]])
    sampler = RaySampler(grid, step=0.005, max_coarse=32, n_fine=8)
    ps = run(sampler, rays, inv_s=20.0)
    coarse = sampler.coarse_numpy()
    o, d, near, far = rays
    for r, c in enumerate(coarse):
        assert 16 < len(c["lo"]) <= 32
        assert c["lo"][0] == pytest.approx(near[r], abs=1e-6)
        assert c["hi"][-1] > far[r] - 2 * (far[r] - near[r]) / 32
    h = to_host(ps)
    assert np.all(h["cnt"] == 8) and np.all(np.diff(h["t"][:8]) > 0)


def test_bucket_size():
    for n in [1, 1024, 1025, 3000, 4096, 4097, 100_000, 262_145]:
        b = bucket_size(n)
        assert n <= b < max(1024, 1.25 * n) + 1
