"""Occupancy grid: marks the cells near an analytic sphere's surface and not the far ones."""

import numpy as np
import pytest
import taichi as ti

from taichi_neus import buffers
from taichi_neus.errors import UserInputError
from taichi_neus.render.occupancy import OccupancyGrid

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


@pytest.mark.portable
def test_dense_at_start_and_nothing_outside_unit_sphere():
    grid = OccupancyGrid(resolution=16, radius=1.25)
    occ = grid.occupied_mask()
    centres = grid.cell_centres()
    half = grid.cell_size / 2
    nearest = np.maximum(np.abs(centres) - half, 0.0)
    meets_sphere = np.linalg.norm(nearest, axis=-1) < 1.0
    np.testing.assert_array_equal(occ, meets_sphere)
    assert grid.occupied_fraction() == pytest.approx(meets_sphere.mean())


@pytest.mark.portable
def test_update_marks_surface_cells_only():
    grid = OccupancyGrid(resolution=32, radius=1.0, chunk_size=4096)  # several chunks
    sizes = []

    def counting_sdf(points):
        sizes.append(points.shape[0])
        return sphere_sdf(points)

    grid.update(counting_sdf, inv_s=1000.0, step=3)
    assert max(sizes) <= 4096 and len(sizes) > 1
    occ = grid.occupied_mask()
    sdf_c = np.linalg.norm(grid.cell_centres() - CENTRE, axis=-1) - RADIUS
    diag = grid.cell_diagonal
    # every cell the surface can pass through is occupied
    near = np.abs(sdf_c) <= diag / 2
    assert near.sum() > 100
    assert occ[near].all()
    # cells well away from the surface (outside or inside) are not
    far = np.abs(sdf_c) > 1.5 * diag + 0.01
    assert not occ[far].any()
    frac = grid.occupied_fraction()
    assert frac == pytest.approx(occ.mean())
    assert 0.01 < frac < 0.2


@pytest.mark.portable
def test_small_inv_s_widens_the_band():
    grid = OccupancyGrid(resolution=32, radius=1.0)
    grid.update(sphere_sdf, inv_s=1000.0, step=0)
    sharp = grid.occupied_mask()
    grid.update(sphere_sdf, inv_s=20.0, step=0)
    wide = grid.occupied_mask()
    assert wide.sum() > 2 * sharp.sum()
    assert (wide | sharp == wide).all()  # same jitter (same step): the band only grows
    sdf_c = np.linalg.norm(grid.cell_centres() - CENTRE, axis=-1) - RADIUS
    # NeuS alpha over a cell diagonal with s = 20 falls below 1e-3 well before |sdf| = 0.45
    assert not wide[np.abs(sdf_c) > 0.45].any()


def _shifted_sphere(dx: float):
    """An SDF callable for the test sphere moved by ``dx`` along x, counting the points it is asked for."""
    asked = []

    def fn(points):
        asked.append(points.shape[0])
        out = buffers.f32(points.shape[0])
        _sphere_sdf(points, out, CENTRE[0] + dx, CENTRE[1], CENTRE[2], RADIUS)
        return out

    return fn, asked


@pytest.mark.portable
def test_sweep_updates_visit_every_cell_over_k_phases_and_equal_the_full_update():
    """With sweep k each update evaluates the occupied cells, their neighbours and one phase class of the rest
    (fewer points than a full update); the k phases together equal a full update with the same jitter, cell by
    cell, and the cells an update skips keep their bits."""
    full = OccupancyGrid(resolution=32, radius=1.0, chunk_size=4096)
    full.update(_shifted_sphere(0.0)[0], inv_s=1000.0, step=5)
    target = full.occupied_mask()

    grid = OccupancyGrid(resolution=32, radius=1.0, chunk_size=4096)
    grid.update(_shifted_sphere(0.3)[0], inv_s=1000.0, step=5)  # the surface somewhere else first
    before = grid.occupied_mask()
    k = 4
    visited = np.zeros(32**3, bool)
    for phase in range(k):
        cells = grid.cells_to_visit(k, phase)
        assert np.all(np.diff(cells) > 0)
        fn, asked = _shifted_sphere(0.0)
        prev = grid.occupied_mask().reshape(-1)
        grid.update(fn, inv_s=1000.0, step=5, sweep=k, phase=phase)
        now = grid.occupied_mask().reshape(-1)
        skipped = np.ones(32**3, bool)
        skipped[cells] = False
        np.testing.assert_array_equal(now[skipped], prev[skipped])  # what is not visited keeps its bit
        np.testing.assert_array_equal(now[cells], target.reshape(-1)[cells])  # what is, gets the full update's
        assert sum(asked) < cells.size + 4096 and cells.size < 0.6 * full.n_candidate_words * 32
        visited[cells] = True
    inside = OccupancyGrid(resolution=32, radius=1.0).occupied_mask().reshape(-1)
    assert visited[inside].all()
    np.testing.assert_array_equal(grid.occupied_mask(), target)
    assert (before != target).sum() > 100  # the sphere really moved


@pytest.mark.portable
def test_sweep_follows_a_surface_that_moves_by_a_cell_in_one_update():
    """A sphere moved by less than a cell is followed in a single sweep update, whatever the phase: its new
    surface cells lie next to the old occupied ones."""
    grid = OccupancyGrid(resolution=32, radius=1.0)
    grid.update(_shifted_sphere(0.0)[0], inv_s=1000.0, step=2)
    ref = OccupancyGrid(resolution=32, radius=1.0)
    ref.update(_shifted_sphere(0.04)[0], inv_s=1000.0, step=2)
    grid.update(_shifted_sphere(0.04)[0], inv_s=1000.0, step=2, sweep=8, phase=3)
    np.testing.assert_array_equal(grid.occupied_mask(), ref.occupied_mask())
    with pytest.raises(UserInputError, match="sweep"):
        grid.update(_shifted_sphere(0.0)[0], inv_s=1000.0, step=2, sweep=0)


def test_trainer_sweeps_the_grid_with_the_phase_of_its_step(tmp_path):
    """``render.occupancy_sweep`` reaches the grid: each refresh passes the sweep and the refresh count
    (step // occupancy_every, so a resumed run continues the rotation), and once the grid has thinned a
    refresh evaluates fewer points than a full one."""
    from training_helpers import small_config

    from taichi_neus.data import default_scene_path
    from taichi_neus.data.loader import load_scene
    from taichi_neus.train.trainer import Trainer

    cfg = small_config(iters=56)
    cfg.render.occupancy_sweep = 4
    tr = Trainer(load_scene(str(default_scene_path())), cfg, tmp_path / "run", log=lambda *a: None)
    calls, points = [], {}
    real_update = tr.occupancy.update

    def update(fn, inv_s, step, **k):
        calls.append((step, k))
        return real_update(lambda p: (points.update({step: points.get(step, 0) + p.shape[0]}), fn(p))[1],
                           inv_s, step, **k)

    tr.occupancy.update = update
    for _ in range(56):
        assert not tr.train_step().get("rejected")
    assert [s for s, _ in calls] == [32, 40, 48] and all(k == {"sweep": 4, "phase": s // 8} for s, k in calls)
    # fewer than a full refresh's points (0.75 of them here: on this 32³ grid the rounding of the listed
    # cells up to 4096 rows weighs; the tests above count the cells themselves)
    assert 0 < points[48] < tr.occupancy.n_candidate_words * 32
