"""One typed configuration shared by ``taichi-neus train``, ``taichi-neus mesh`` and
``examples/train_dtu.py``, and the single source of truth for the command line.

Each module gets its own sub-config. Every field is a command-line option (``--section.name value``,
or the short aliases in ``app/cli.py``) generated from these dataclasses: the option's help is the
comment after the field (:func:`field_comments`), its allowed values are in :data:`LIMITS`, and
:meth:`Config.validate` checks them, so the command line, the :class:`~taichi_neus.train.trainer.Trainer`
and library users are refused the same values with the same sentence.
"""

import ast
import dataclasses
import functools
import importlib.util
import inspect
import io
import json
import math
import numbers
import tokenize
from dataclasses import dataclass
from dataclasses import field as dc_field

from taichi_neus.errors import UserInputError
from taichi_neus.field.hash_grid import HashGridConfig
from taichi_neus.field.sdf_field import FieldConfig
from taichi_neus.render.background import BackgroundConfig
from taichi_neus.runtime import ARCHS


@dataclass
class DataConfig:
    path: str = ""  # scene folder (NeuS/DTU, NeRF-synthetic or COLMAP); empty = the built-in synthetic scene
    downscale: int = 1  # train on images shrunk by this factor (2: half width and height)
    holdout_every: int = 8  # every k-th view is held out for evaluation (0: none)
    use_masks: bool = True  # use the scene's object masks (mask loss, masked PSNR); off: a background model
    alpha_background: str = "white"  # NeRF-synthetic: colour RGBA images are composited on ("white" | "black")
    roi: tuple = ()  # cx,cy,cz,radius (world units): the unit sphere for NeRF-synthetic/COLMAP; () = automatic


@dataclass
class RenderConfig:
    occupancy_resolution: int = 64  # occupancy grid cells per axis over [-1, 1]^3
    occupancy_every: int = 16  # refresh the occupancy grid every k steps (after warm-up)
    occupancy_warmup: int = 64  # keep every cell occupied for the first steps
    occupancy_sweep: int = 1  # >1: an update re-evaluates occupied cells, their neighbours and 1/k of the rest
    coarse_step: float = 2.0 * 3**0.5 / 128  # coarse march step, unit-sphere units
    max_coarse: int = 128  # most coarse samples per ray
    n_fine: int = 32  # samples per ray that carry gradients
    # Renders (held-out scores, validation images, the preview, `taichi-neus render`) march with
    # coarse_step / render_refine, up to max_coarse · render_refine bins: at a trained run's sharpness
    # (s ≈ 600, a weight band ~3.5/s = 0.006 wide) a 0.027 training bin steps over thin parts of the surface
    # and spreads the fine samples over the whole bin; on scan 24, /8 adds ~0.5 dB held out
    # (benchmarks/results/render_refine_scan24.json)
    render_refine: int = 8  # renders without gradients march with coarse_step / this (and this many times the bins)
    # A scout march at coarse_step ends each render ray where NeuS's transmittance bound Φ_s(sdf) falls below this,
    # so what lies behind an opaque surface gets no SDF evaluations (render/sampling.py, (c)): 38% fewer on the
    # trained scan24 run, the same held-out figure (benchmarks/results/heldout_error_render_stop.json)
    render_stop: float = 1e-4  # renders end a ray where the transmittance behind a surface is below this (0: march on)
    background: tuple = (0.0, 0.0, 0.0)  # r,g,b in [0, 1] the foreground is composited on (with masks)
    near: float = 0.0  # rays start at least this far from the camera (0: at the camera or the unit sphere)


@dataclass
class TrainConfig:
    # 6000: with the colour grid (~30% more time per step) scan 24 at ¼ reaches 25.5 dB held out in the masks; on
    # the 2-core CPU of the earlier sessions that is ~14-18 min with its mesh and scores (scaled from a 32.1-min
    # run on a machine 1.8-2.3x slower, README "Measurements"; not timed on the faster machine itself)
    iters: int = 6000  # training steps
    time_budget: float = 0.0  # seconds of training (0: none); schedules then follow the elapsed share
    sample_budget: int = 16384  # target samples per step; the ray count adapts to it
    min_rays: int = 128  # fewest rays per step
    max_rays: int = 4096  # most rays per step
    lr: float = 1e-2  # learning rate of the hash grid and MLPs
    lr_variance: float = 3e-3  # learning rate of NeuS's v (NeuS: 1e-3 over 300k steps; short runs sharpen faster)
    warmup: int = 200  # linear learning-rate warm-up steps
    lr_final: float = 0.1  # final learning rate as a fraction (cosine decay)
    sparse_adam: bool = False  # hash-table entries no sample touched keep their Adam moments (tiny-cuda-nn)
    init_variance: float = 0.3  # NeuS's sharpness s = exp(10·v) starts at e^3 ≈ 20
    s_floor: float = 0.0  # floor under NeuS's s from --train.s_floor_anneal on (0: off; 1000 cost 6 dB on scan24)
    s_floor_anneal: float = 0.75  # share of training over which the floor on s rises log-linearly from its start
    anneal_end: float = 0.2  # cos-anneal ratio reaches 1 at this fraction of training
    eikonal_weight: float = 0.1  # weight of the eikonal loss (|∇f| = 1)
    curvature_weight: float = 0.0  # weight of the curvature loss, mean |ΔSDF| on the samples (Neuralangelo); 0 = off
    eikonal_points: int = 4096  # also hold |∇f| = 1 at this many points drawn uniformly in the unit sphere per step
    mask_weight: float = 0.1  # weight of the mask loss (binary cross-entropy of the opacity)
    eps_start: float = 1.0 / 64  # finite-difference ε, coarse …
    eps_end: float = 1.0 / 1024  # … to fine (unit-sphere units), log-linear
    eps_anneal: float = 0.5  # ε reaches eps_end at this fraction of training
    # Coarse-to-fine hash grid (Neuralangelo, Li et al. 2023; NeuS2): finer levels switch on as training goes
    level_start: int = 4  # hash-grid levels on at the start (0: all levels from the start)
    level_anneal: float = 0.5  # all levels are on at this fraction of training (linear in between)
    level_footprint: float = 1.0  # levels with cells under this many training-pixel footprints stay off (0: none)
    eps_from_level: bool = True  # ε = cell width of the finest level on, ≥ eps_end (not the eps schedule)
    grad_scaling: str = "auto"  # near-camera gradient scaling (Philip & Deschaintre 2023): "paper" | "none" | "auto"
    grad_scaling_sigma: float = 0.0  # distance scale of the gradient scaling (0: from the cameras)
    pixel_sampler: str = "uniform"  # how a batch picks its pixels: "uniform" | "quadtree" | "soft_mining"
    s3im_weight: float = 0.0  # λ of the S3IM loss (Xie et al. 2023); 0 = off
    s3im_kernel: int = 4  # S3IM's SSIM window side (and stride), virtual pixels
    s3im_repeats: int = 10  # S3IM: repeats of the batch in the virtual image
    s3im_patch: int = 64  # virtual patch height; with S3IM on, rays per batch = s3im_batch
    s3im_batch: int = 4096  # rays per step with S3IM on (a multiple of s3im_patch)
    # Geometric supervision, off by default: at equal time the sparse points tightened the surface with exact
    # points but lowered held-out PSNR on scan 24's COLMAP points (benchmarks/results/recipe_*_sparse.json)
    sparse_weight: float = 0.0  # λ of |SDF| at COLMAP's sparse points (Geo-NeuS; Scene.points); 0 = off
    sparse_batch: int = 1024  # sparse points drawn per step
    depth_weight: float = 0.0  # λ of the L1 between rendered and given depth (scene depths/); 0 = off
    # Multi-view photo consistency (Geo-NeuS, Fu et al. 2022; train/photo_consistency.py): a patch around each
    # ray's pixel, warped by the plane of its rendered surface into nearby training views, should look alike
    # on by default: +0.9 dB held out on scan 24 at equal time (benchmarks/results/recipe_scan24_photo_seeds.json)
    photo_weight: float = 0.1  # λ of the patch NCC cost (1 − NCC) / 2 against nearby views; 0 = off
    photo_radius: int = 3  # the NCC patch is (2r + 1)² training pixels
    photo_sources: int = 4  # nearby training views (closest optical axes) each ray's patch is compared with
    photo_best: int = 2  # per ray, the mean cost of this many best-agreeing sources (occluded ones disagree)
    photo_start: float = 0.1  # share of training after which the term is on (a surface forms first)
    photo_normal: bool = False  # the term's gradient also turns the surface's normal (else it moves the depth only)
    refine_poses: bool = False  # refine every training camera's pose jointly with the field (BARF-style)
    lr_pose: float = 1e-3  # learning rate of the pose twists (radians, unit-sphere units), on the main schedule
    pose_start: float = 0.2  # poses are refined from this fraction of training on (the field forms first)
    pose_background: bool = False  # without masks, the background model's ray gradients move the cameras too
    max_bad_steps: int = 5  # consecutive non-finite steps (each rolled back, lr halved) before giving up
    seed: int = 0  # random seed (initialisation, pixel batches, samples)
    val_every: int = 500  # write a validation image every k steps (0: never)
    val_downscale: int = 2  # validation renders at 1/k of the training resolution
    ckpt_every: int = 500  # write a checkpoint every k steps and at the end (0: never)
    log_every: int = 10  # write a line to metrics.jsonl every k steps


@dataclass
class MeshConfig:
    resolution: int = 256  # marching-cubes grid cells per axis over the unit sphere's cube
    clean_with_masks: bool = False  # cull faces outside the masks (as NeuS's DTU evaluation does)
    min_component: float = 0.01  # drop components under this share of the largest one's area (0: keep all)
    cull_unseen: bool = False  # drop faces no training camera sees (e.g. closed bubbles inside the solid)
    min_views: int = 1  # with cull_unseen: keep faces visible in at least this many training views


@dataclass(frozen=True)
class Limits:
    """Allowed values of one option: a closed or half-open interval of numbers, or a set of choices.

    ``lo``/``hi`` None: unbounded; ``lo_open``: ``lo`` itself is excluded. An empty ``Limits()`` allows
    any number (NaN included: ``--train.init_variance nan`` is how the tests make a run diverge)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    choices: tuple = ()

    def allows(self, v) -> bool:
        if self.choices:
            return v in self.choices
        if self.lo is None and self.hi is None:
            return True
        if isinstance(v, float) and not math.isfinite(v):
            return False
        lo_ok = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        return lo_ok and (self.hi is None or v <= self.hi)

    def describe(self) -> str:
        """``'≥ 1'``, ``'in [0, 1]'``, ``'> 0'``, ``'one of a, b'``; ``''`` without limits."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '≥'} {self.lo:g}"
        if self.hi is not None:
            return f"≤ {self.hi:g}"
        return ""


COUNT = Limits(lo=1)  # a positive count
NONNEG = Limits(lo=0)  # a count or weight where 0 means none / off
POSITIVE = Limits(lo=0, lo_open=True)  # a positive real (a rate, a length)
FRACTION = Limits(lo=0, hi=1)  # a share of training, a factor in [0, 1]
ANY = Limits()


def one_of(*choices: str) -> Limits:
    return Limits(choices=choices)


_GRID = {"n_levels": COUNT, "n_features": COUNT, "log2_table": Limits(lo=1, hi=30), "base_resolution": COUNT,
         "per_level_scale": Limits(lo=1), "bound": POSITIVE, "init_scale": NONNEG}

# Allowed values of every number and every string choice of the configuration (tuples and booleans are
# checked in Config.validate). tests/test_config_cli.py checks that each such field has an entry.
LIMITS: dict[str, Limits] = {
    "data.downscale": COUNT, "data.holdout_every": NONNEG, "data.alpha_background": one_of("white", "black"),
    "render.occupancy_resolution": COUNT, "render.occupancy_every": COUNT, "render.occupancy_warmup": NONNEG,
    "render.occupancy_sweep": COUNT,
    "render.coarse_step": POSITIVE, "render.max_coarse": COUNT, "render.n_fine": COUNT, "render.near": NONNEG,
    "render.render_refine": COUNT, "render.render_stop": FRACTION,
    "train.iters": COUNT, "train.time_budget": NONNEG, "train.sample_budget": COUNT, "train.min_rays": COUNT,
    "train.max_rays": COUNT, "train.lr": POSITIVE, "train.lr_pose": POSITIVE, "train.pose_start": FRACTION,
    "train.lr_variance": NONNEG,
    "train.warmup": NONNEG, "train.lr_final": FRACTION, "train.init_variance": ANY, "train.s_floor": NONNEG,
    "train.s_floor_anneal": FRACTION, "train.anneal_end": FRACTION,
    "train.eikonal_weight": NONNEG, "train.eikonal_points": NONNEG, "train.curvature_weight": NONNEG,
    "train.mask_weight": NONNEG,
    "train.eps_start": POSITIVE, "train.eps_end": POSITIVE, "train.eps_anneal": FRACTION,
    "train.level_start": NONNEG, "train.level_anneal": FRACTION, "train.level_footprint": NONNEG,
    "train.grad_scaling": one_of("paper", "none", "auto"),
    "train.grad_scaling_sigma": NONNEG, "train.pixel_sampler": one_of("uniform", "quadtree", "soft_mining"),
    "train.s3im_weight": NONNEG, "train.s3im_kernel": COUNT, "train.s3im_repeats": COUNT,
    "train.s3im_patch": COUNT, "train.s3im_batch": COUNT, "train.sparse_weight": NONNEG,
    "train.sparse_batch": COUNT, "train.depth_weight": NONNEG, "train.photo_weight": NONNEG,
    "train.photo_radius": COUNT, "train.photo_sources": COUNT, "train.photo_best": COUNT, "train.photo_start": FRACTION,
    "train.max_bad_steps": COUNT, "train.seed": NONNEG,
    "train.val_every": NONNEG, "train.val_downscale": COUNT, "train.ckpt_every": NONNEG, "train.log_every": COUNT,
    "mesh.resolution": Limits(lo=2), "mesh.min_component": FRACTION, "mesh.min_views": COUNT,
    "field.sdf_hidden": COUNT, "field.sdf_layers": COUNT, "field.feature_dim": COUNT,
    "field.softplus_beta": POSITIVE, "field.sphere_init_radius": Limits(lo=0, hi=1, lo_open=True),
    "field.color_hidden": COUNT, "field.color_layers": COUNT,
    "field.normal_mode": one_of("auto", "analytic", "tetrahedral", "central"),
    "field.fd_eps": POSITIVE, "field.view_degree": Limits(lo=0, hi=3),
    "background.mode": one_of("auto", "on", "off"), "background.n_samples": Limits(lo=2),
    "background.hidden": COUNT, "background.feature_dim": COUNT,
    "background.far_disparity_ratio": Limits(lo=0, hi=1, lo_open=True),
    "arch": one_of(*ARCHS),
    **{f"field.grid.{k}": v for k, v in _GRID.items()},
    **{f"field.color_grid.{k}": v for k, v in _GRID.items()},
    **{f"background.grid.{k}": v for k, v in _GRID.items()},
}

# Titles of the sections in ``taichi-neus train --help``.
SECTIONS = {"data": "the photographs and cameras", "field": "the neural SDF (hash grid and MLPs)",
            "render": "sampling rays", "train": "training", "mesh": "the mesh written at the end",
            "background": "the background model beyond the unit sphere (used without masks)"}


@dataclass(frozen=True)
class Option:
    """One leaf field of :class:`Config`: dotted ``key`` (``'train.iters'``), ``default`` value, python
    ``type`` (bool, int, float, str or tuple), ``help`` (the field's comment) and ``limits``."""

    key: str
    default: object
    type: type
    help: str
    limits: Limits | None


@functools.cache
def field_comments(cls) -> dict[str, str]:
    """``{field name: the comment after it}`` from a dataclass's source: the comments are the fields'
    documentation, written once, next to the field, and shown by ``taichi-neus train --help``.
    Empty when the source is not available (e.g. a frozen application)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    src = inspect.cleandoc("\n" + src) if src.startswith((" ", "\t")) else src
    node = ast.parse(src).body[0]
    lines = {st.lineno: st.target.id for st in node.body
             if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)}
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT and tok.start[0] in lines:
            out[lines[tok.start[0]]] = tok.string.lstrip("#").strip()
    return out


def options(cfg=None) -> list[Option]:
    """Every leaf field of ``cfg`` (default: ``Config()``), depth first in declaration order, with its
    current value as ``default`` and the type of the field's default value as ``type``."""
    out = []
    types = _default_types() if cfg is not None else {}

    def walk(obj, prefix):
        docs = field_comments(type(obj))
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            key = prefix + f.name
            if dataclasses.is_dataclass(v):
                walk(v, key + ".")
            else:
                out.append(Option(key, v, types.get(key, type(v)), docs.get(f.name, ""), LIMITS.get(key)))
    walk(Config() if cfg is None else cfg, "")
    return out


@functools.cache
def _default_types() -> dict:
    return {o.key: o.type for o in options()}


def get_value(cfg, key: str):
    """The value of the dotted ``key`` (``'train.iters'``) of ``cfg``."""
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def set_value(cfg, key: str, value) -> None:
    """Set the dotted ``key`` of ``cfg`` to ``value`` (not checked: call :meth:`Config.validate`)."""
    *path, name = key.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part)
    if not hasattr(obj, name):
        raise KeyError(key)
    setattr(obj, name, value)


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               tuple: "a comma-separated list of numbers"}


def _check(opt: Option, v) -> None:
    key, tp = opt.key, opt.type
    ok_type = (isinstance(v, bool) if tp is bool else
               isinstance(v, numbers.Integral) and not isinstance(v, bool) if tp is int else
               isinstance(v, numbers.Real) and not isinstance(v, bool) if tp is float else
               isinstance(v, tp))
    if not ok_type:
        raise UserInputError(f"--{key} must be {_TYPE_WORDS.get(tp, tp.__name__)}, got {v!r}.")
    lim = opt.limits
    if lim is not None and not lim.allows(v):
        what = lim.describe()
        shown = f"'{v}'" if isinstance(v, str) else f"{v:g}" if isinstance(v, float) else str(v)
        raise UserInputError(f"--{key} must be {what}, got {shown}.")
    if key == "data.roi" and v and (len(v) != 4 or not all(math.isfinite(x) for x in v) or v[3] <= 0):
        raise UserInputError(f"--data.roi takes cx,cy,cz,radius (world units, radius > 0), "
                             f"got {','.join(map(str, v))}.")
    if key == "render.background" and (len(v) != 3 or not all(0.0 <= x <= 1.0 for x in v)):
        raise UserInputError(f"--render.background takes r,g,b in [0, 1], got {','.join(map(str, v))}.")


@dataclass
class Config:
    data: DataConfig = dc_field(default_factory=DataConfig)
    field: FieldConfig = dc_field(default_factory=lambda: FieldConfig(normal_mode="auto"))
    render: RenderConfig = dc_field(default_factory=RenderConfig)
    train: TrainConfig = dc_field(default_factory=TrainConfig)
    mesh: MeshConfig = dc_field(default_factory=MeshConfig)
    background: BackgroundConfig = dc_field(default_factory=BackgroundConfig)
    arch: str = "auto"  # Taichi backend: auto picks CUDA, Metal, Vulkan (with a GPU), else the CPU

    def validate(self) -> "Config":
        """Check every value against its type and :data:`LIMITS` (and ``min_rays ≤ max_rays``); the
        first bad one raises :class:`UserInputError` naming the option, what it must be and what it is.
        Returns ``self``. The command line calls it before anything is written; the Trainer calls it too."""
        for opt in options(self):
            _check(opt, opt.default)
        tc = self.train
        if tc.min_rays > tc.max_rays:
            raise UserInputError(f"--train.min_rays ({tc.min_rays}) must not exceed --train.max_rays ({tc.max_rays}).")
        if tc.s3im_weight > 0 and importlib.util.find_spec("torch") is None:
            raise UserInputError("S3IM (--train.s3im_weight > 0) needs torch, which is not installed; install it "
                                 "(pip install torch, or the package's [torch] extra) or leave S3IM off.")
        # (without torch, or with fewer views than it asks for, the trainer turns the photo term off or down
        # and says so: it is on by default, and the defaults must run everywhere)
        if tc.photo_weight > 0 and tc.photo_best > tc.photo_sources:
            raise UserInputError(f"--train.photo_best ({tc.photo_best}) must not exceed --train.photo_sources "
                                 f"({tc.photo_sources}).")
        if tc.refine_poses:
            if importlib.util.find_spec("torch") is None:
                raise UserInputError("--train.refine_poses needs torch, which is not installed; install it (pip "
                                     "install torch, or the package's [torch] extra) or leave it off.")
        if tc.curvature_weight > 0 and self.field.normal_mode == "analytic":  # ("auto" picks a stencil then)
            raise UserInputError("the curvature loss (--train.curvature_weight > 0) is the Laplacian of a "
                                 "finite-difference stencil; use --field.normal_mode tetrahedral or central with it.")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        def build(tp, values, prefix=""):
            if not isinstance(values, dict):
                raise UserInputError(f"config entry '{prefix.rstrip('.') or 'the file'}' must be a JSON object, "
                                     f"got {values!r}.")
            names = {f.name for f in dataclasses.fields(tp)}
            unknown = sorted(set(values) - names)
            if unknown:
                import difflib
                near = difflib.get_close_matches(unknown[0], sorted(names), n=1)
                hint = f" (did you mean '{prefix}{near[0]}'?)" if near else ""
                raise UserInputError(f"the config has an unknown entry '{prefix}{unknown[0]}'{hint}.")
            kwargs = {}
            for f in dataclasses.fields(tp):
                if f.name not in values:
                    continue
                v = values[f.name]
                if dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING
                                            else None):
                    v = build(type(f.default_factory()), v, f"{prefix}{f.name}.")
                elif isinstance(v, list):
                    v = tuple(v)
                kwargs[f.name] = v
            return tp(**kwargs)
        field = d.get("field") if isinstance(d, dict) else None
        if isinstance(field, dict) and "color_encoding" not in field:
            # a run written before the colour grid existed had none: its checkpoint holds no table for it
            d = {**d, "field": {**field, "color_encoding": False}}
        return build(cls, d)


def resolved_normal_mode(cfg: "Config") -> str:
    """The normal the trainer builds its field with: ``field.normal_mode``, where ``"auto"`` is the
    analytic normal (one hash lookup per sample) unless the curvature loss is on, which needs the
    tetrahedral stencil's Laplacian, or the cameras are refined: their gradient through the analytic
    normal (the trilinear weights' second derivatives, constant in a cell and jumping at its faces) moved
    the centres away on the built-in scene (tests/test_pose_refiner.py: 0.027 → 0.038 against 0.031 with
    the stencil, whose ε smooths across cells)."""
    mode = cfg.field.normal_mode
    if mode != "auto":
        return mode
    return "tetrahedral" if cfg.train.curvature_weight > 0 or cfg.train.refine_poses else "analytic"


def field_config_cpu() -> FieldConfig:
    """The default field (instant-nsr-pl's NeuS sizes: 16 levels × 2 features, 2^19 table)."""
    return FieldConfig(grid=HashGridConfig())
