"""One typed configuration shared by ``taichi-neus train``, ``taichi-neus mesh`` and
``examples/train_dtu.py``. Each module gets its own sub-config; every field is a
command-line option (``--section.name value``, or the short aliases in cli.py)."""

import dataclasses
import json
from dataclasses import dataclass
from dataclasses import field as dc_field

from taichi_neus.field.hash_grid import HashGridConfig
from taichi_neus.field.sdf_field import FieldConfig
from taichi_neus.render.background import BackgroundConfig


@dataclass
class DataConfig:
    path: str = ""  # scene folder (NeuS/DTU, NeRF-synthetic or COLMAP); empty = the built-in synthetic scene
    downscale: int = 1
    holdout_every: int = 8  # every k-th view is held out for evaluation (0: none)
    use_masks: bool = True
    alpha_background: str = "white"  # NeRF-synthetic: colour RGBA images are composited on ("white" | "black")
    roi: tuple = ()  # cx,cy,cz,radius (world units): the unit sphere for NeRF-synthetic/COLMAP; () = automatic


@dataclass
class RenderConfig:
    occupancy_resolution: int = 64  # cells per axis over [-1, 1]^3
    occupancy_every: int = 16  # refresh the occupancy grid every k steps (after warm-up)
    occupancy_warmup: int = 64  # keep every cell occupied for the first steps
    coarse_step: float = 2.0 * 3**0.5 / 128  # coarse march step, unit-sphere units
    max_coarse: int = 128
    n_fine: int = 32  # samples per ray that carry gradients
    background: tuple = (0.0, 0.0, 0.0)
    near: float = 0.0  # rays start at least this far from the camera (0: at the camera or the unit sphere)


@dataclass
class TrainConfig:
    iters: int = 3000
    time_budget: float = 0.0  # seconds of training (0: none); schedules then follow the elapsed share
    sample_budget: int = 16384  # target samples per step; the ray count adapts to it
    min_rays: int = 128
    max_rays: int = 4096
    lr: float = 1e-2  # hash grid and MLPs
    lr_variance: float = 3e-3  # NeuS used 1e-3 over 300k steps; short CPU runs need s to sharpen faster
    warmup: int = 200  # linear learning-rate warm-up steps
    lr_final: float = 0.1  # final learning rate as a fraction (cosine decay)
    init_variance: float = 0.3  # NeuS s = exp(10·v) starts at e^3 ≈ 20
    anneal_end: float = 0.2  # cos-anneal ratio reaches 1 at this fraction of training
    eikonal_weight: float = 0.1
    mask_weight: float = 0.1
    eps_start: float = 1.0 / 64  # finite-difference ε, coarse …
    eps_end: float = 1.0 / 1024  # … to fine (unit-sphere units), log-linear
    eps_anneal: float = 0.5  # reached at this fraction of training
    grad_scaling: str = "paper"  # "paper" | "none"
    grad_scaling_sigma: float = 0.0  # 0: estimate from the cameras
    pixel_sampler: str = "uniform"  # "uniform" | "quadtree" | "soft_mining"
    s3im_weight: float = 0.0  # λ of the S3IM loss (Xie et al. 2023); 0 = off
    s3im_kernel: int = 4
    s3im_repeats: int = 10
    s3im_patch: int = 64  # virtual patch height; with S3IM on, rays per batch = s3im_batch
    s3im_batch: int = 4096
    # Geometric supervision (off by default: the equal-time comparison that would justify a default is not done)
    sparse_weight: float = 0.0  # λ of |SDF| at COLMAP's sparse points (Geo-NeuS; Scene.points); 0 = off
    sparse_batch: int = 1024  # sparse points drawn per step
    depth_weight: float = 0.0  # λ of the L1 between rendered and given depth (scene depths/); 0 = off
    max_bad_steps: int = 5  # consecutive non-finite steps (each rolled back, lr halved) before giving up
    seed: int = 0
    val_every: int = 500
    val_downscale: int = 2  # validation renders at 1/k of the training resolution
    ckpt_every: int = 500
    log_every: int = 10


@dataclass
class MeshConfig:
    resolution: int = 256
    clean_with_masks: bool = False


@dataclass
class Config:
    data: DataConfig = dc_field(default_factory=DataConfig)
    field: FieldConfig = dc_field(default_factory=FieldConfig)
    render: RenderConfig = dc_field(default_factory=RenderConfig)
    train: TrainConfig = dc_field(default_factory=TrainConfig)
    mesh: MeshConfig = dc_field(default_factory=MeshConfig)
    background: BackgroundConfig = dc_field(default_factory=BackgroundConfig)
    arch: str = "auto"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        def build(tp, values):
            kwargs = {}
            for f in dataclasses.fields(tp):
                if f.name not in values:
                    continue
                v = values[f.name]
                if dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING
                                            else None):
                    v = build(type(f.default_factory()), v)
                elif isinstance(v, list):
                    v = tuple(v)
                kwargs[f.name] = v
            return tp(**kwargs)
        return build(cls, d)


def field_config_cpu() -> FieldConfig:
    """The default field (instant-nsr-pl's NeuS sizes: 16 levels × 2 features, 2^19 table)."""
    return FieldConfig(grid=HashGridConfig())
