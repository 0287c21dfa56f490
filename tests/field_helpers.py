"""Small field configurations shared by the core tests (kept tiny: 2 shared CPU cores, lavapipe)."""

import numpy as np
import torch

from taichi_neus import buffers
from taichi_neus.field.hash_grid import HashGridConfig
from taichi_neus.field.params import ParamLayout
from taichi_neus.field.sdf_field import FieldConfig, SDFField


def small_field(normal_mode="tetrahedral", seed=0, perturb=True, include_xyz=True, view_degree=3,
                color_encoding=False):
    """A field with 2 dense and 2 hashed levels and random (not sphere-initialised) encoding weights; with
    ``color_encoding`` the colour network's own grid (1 dense and 2 hashed levels, init U(±0.2))."""
    grid = HashGridConfig(n_levels=4, n_features=2, log2_table=10, base_resolution=4, per_level_scale=2.7,
                          init_scale=0.2)
    cfg = FieldConfig(grid=grid, normal_mode=normal_mode, sdf_hidden=16, feature_dim=7, color_hidden=16,
                      include_xyz=include_xyz, fd_eps=1e-2, view_degree=view_degree, color_encoding=color_encoding,
                      color_grid=HashGridConfig(n_levels=3, n_features=2, log2_table=10, base_resolution=4,
                                                per_level_scale=3.0, init_scale=0.2))
    layout = ParamLayout()
    field = SDFField(cfg, layout)
    params = layout.allocate()
    field.init_params(params, seed)
    if perturb:
        # geometric init zeroes the encoding's weights; give them values so gradients reach the table
        host = buffers.to_numpy(params).copy()
        w = field.sdf_layers[0].W
        rng = np.random.default_rng(seed + 1)
        host[w.offset:w.offset + w.size] += rng.normal(0, 0.3, w.size).astype(np.float32)
        buffers.from_numpy(params, host)
    return field, layout, params


def random_batch(n, seed=0, lo=-0.9, hi=0.9):
    rng = np.random.default_rng(seed)
    pts = rng.uniform(lo, hi, (n, 3)).astype(np.float32)
    d = rng.normal(size=(n, 3))
    d = (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)
    return pts, d


def t64(a):
    return torch.tensor(np.asarray(a), dtype=torch.float64)
