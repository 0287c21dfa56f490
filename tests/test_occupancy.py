"""Occupancy grid: marks the cells near an analytic sphere's surface and not the far ones."""

import numpy as np
import pytest
import taichi as ti

from taichi_neus import buffers
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
