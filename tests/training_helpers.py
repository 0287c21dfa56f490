"""A small, fast configuration for training tests on the built-in synthetic scene."""

from taichi_neus.field.hash_grid import HashGridConfig
from taichi_neus.field.sdf_field import FieldConfig
from taichi_neus.train.config import Config


def small_config(iters: int = 300, seed: int = 0) -> Config:
    cfg = Config()
    cfg.field = FieldConfig(grid=HashGridConfig(n_levels=8, n_features=2, log2_table=15, base_resolution=16,
                                                per_level_scale=1.45), sdf_hidden=32, color_hidden=32,
                            feature_dim=7, color_encoding=False)  # the colour grid: tests of their own
    cfg.train.iters = iters
    cfg.train.seed = seed
    cfg.train.sample_budget = 4096
    cfg.train.warmup = 50
    cfg.train.val_every = 0
    cfg.train.ckpt_every = 0
    cfg.train.eps_start, cfg.train.eps_end = 1 / 32, 1 / 256
    cfg.render.occupancy_resolution = 32
    cfg.render.occupancy_warmup = 32
    cfg.render.occupancy_every = 8
    cfg.render.n_fine = 24
    cfg.render.coarse_step = 2 * 3**0.5 / 96
    return cfg
