"""NeuS training: one step reads top to bottom in :meth:`Trainer.train_step` (DESIGN §1).

pixels → rays → occupancy-guided samples → field → NeuS compositing → losses →
backward (compositing, gradient-scaling hook, eikonal, field) → Adam.
Everything per sample stays on the device; per step the host uploads the batch's rays and
target colours and reads back a few scalars and the batch's colours.
"""

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import time

import imageio.v2 as imageio
import numpy as np
import taichi as ti

from taichi_neus import buffers
from taichi_neus.data.rays import iter_image_rays, pixel_rays, sphere_exit_vjp, unit_sphere_near_far
from taichi_neus.errors import UserInputError
from taichi_neus.field.hash_grid import cell_widths, levels_for_footprint
from taichi_neus.field.mlp import packed_weights_reused
from taichi_neus.field.params import ParamLayout
from taichi_neus.field.sdf_field import SDFField
from taichi_neus.render.background import Background, blend, blend_backward
from taichi_neus.render.compositing import NeuSCompositor
from taichi_neus.render.grad_scaling import GradScaling
from taichi_neus.render.occupancy import OccupancyGrid
from taichi_neus.render.sampling import RaySampler
from taichi_neus.train import losses
from taichi_neus.train.adam import Adam, GroupSettings
from taichi_neus.train.config import Config, resolved_normal_mode
from taichi_neus.train.pixel_samplers import make_sampler

CKPT_KEEP = 2
CKPT_KEYS = ("params", "adam_m", "adam_v", "adam_step", "step", "occupancy", "n_rays", "samples_per_ray",
             "train_time", "rng", "layout_total")
# written since resume continues the interrupted run exactly; a checkpoint without them still loads (with a note)
CKPT_RUN_KEYS = ("lr_factor", "bad_steps", "pixel_sampler")
POSE_PREFIX = "pose."  # the pose refiner's state_dict() entries (runs with --train.refine_poses)
SAMPLER_PREFIX = "sampler."  # the pixel sampler's state_dict() entries


@ti.kernel
def _gather_dirs(dirs: ti.types.ndarray(dtype=ti.f32, ndim=2), ray_ids: ti.types.ndarray(dtype=ti.i32, ndim=1),
                 n: ti.i32, out: ti.types.ndarray(dtype=ti.f32, ndim=2)):
    for i in range(n):
        r = ray_ids[i]
        for c in ti.static(range(3)):
            out[i, c] = dirs[r, c]


@ti.kernel
def _raise_slot(params: ti.types.ndarray(dtype=ti.f32, ndim=1), off: ti.i32, lo: ti.f32):
    params[off] = ti.max(params[off], lo)


@ti.kernel
def _read_slot(params: ti.types.ndarray(dtype=ti.f32, ndim=1), off: ti.i32,
               out: ti.types.ndarray(dtype=ti.f32, ndim=1)):
    out[0] = params[off]


@ti.kernel
def _add_slot(g: ti.types.ndarray(dtype=ti.f32, ndim=1), grads: ti.types.ndarray(dtype=ti.f32, ndim=1),
              off: ti.i32):
    grads[off] += g[0]


# A gradient entry larger than this counts as bad, like NaN and Inf: the step is rejected. With every
# gradient finite and bounded, Adam's moments (g² < 1e36) and so the parameters stay finite. The hash
# tables' entries change only through such steps (or a checkpoint, checked when loaded), so the step
# checks every parameter but the tables' (~14M in the SDF's, ~6M in the colour grid's: a pass saved);
# a NaN elsewhere (the variance, an MLP weight, a bad --train.init_variance) is caught at once.
GRAD_BOUND = 1e18


@ti.kernel
def _count_bad_kernel(a: ti.types.ndarray(dtype=ti.f32, ndim=1), start: ti.i32, stop: ti.i32, bound: ti.f32,
                      chunk: ti.template()) -> ti.i32:
    bad = 0
    limit = ti.bit_cast(bound, ti.u32)
    ti.loop_config(block_dim=1024)
    for c in range((stop - start + chunk - 1) // chunk):
        lo = start + c * chunk
        hi = ti.min(lo + chunk, stop)
        n = 0
        for i in range(lo, hi):  # straight-line and branch-free: the CPU backend vectorises it
            n += ti.cast((ti.bit_cast(a[i], ti.u32) & ti.u32(0x7FFFFFFF)) > limit, ti.i32)
        bad += n
    return bad


def _count_bad(a, start: int, stop: int, bound: float) -> int:
    """Number of entries of a[start:stop] (a flat float32 ndarray) that are NaN, ±Inf or larger than
    ``bound`` (finite, ≥ 0) in magnitude.

    Tested on the bits, since the compilers' fast math folds ``x == x`` to true and may fold comparisons
    with NaN: with the sign bit cleared, a float's bits order as its magnitude does, and every NaN and
    ±Inf lies above every finite bound. On the CPU each parallel task counts a chunk of 4096 entries in
    a plain inner loop: a parallel loop there calls its body once per index (DESIGN §3c), which made
    the per-entry loop 4% of a training step."""
    from taichi_neus import runtime
    if not (math.isfinite(bound) and bound >= 0.0):
        raise ValueError(f"bound must be finite and >= 0, got {bound}")
    chunk = 4096 if runtime.current_arch() == "cpu" else 1
    return int(_count_bad_kernel(a, int(start), int(stop), float(bound), chunk))


def _outside(slices, total: int) -> list[tuple[int, int]]:
    """The [start, stop) ranges of [0, total) that none of ``slices`` (objects with ``offset`` and
    ``size``) covers, in order."""
    out, at = [], 0
    for sl in sorted(slices, key=lambda s: s.offset):
        if sl.offset > at:
            out.append((at, sl.offset))
        at = max(at, sl.offset + sl.size)
    if at < total:
        out.append((at, total))
    return out


def _log_lerp(a: float, b: float, t: float) -> float:
    t = min(max(t, 0.0), 1.0)
    return math.exp(math.log(a) + (math.log(b) - math.log(a)) * t)


@ti.kernel
def _scale_rows(g: ti.types.ndarray(dtype=ti.f32, ndim=2), w: ti.types.ndarray(dtype=ti.f32, ndim=1)):
    for r in range(g.shape[0]):
        for c in ti.static(range(3)):
            g[r, c] *= w[r]


def uniform_in_ball(n: int, rng: np.random.Generator, radius: float = 1.0) -> np.ndarray:
    """(n, 3) float32 points uniform in the ball of ``radius``: a direction uniform on the sphere
    (a normalised Gaussian) at a distance ``radius · u^(1/3)`` (the volume inside r grows as r³)."""
    v = rng.normal(size=(n, 3))
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return (v * radius * rng.random((n, 1)) ** (1.0 / 3.0)).astype(np.float32)


def ray_gradients(ray_ids: np.ndarray, t: np.ndarray, dpoints: np.ndarray, ddirs: np.ndarray,
                  g_dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-ray ∂L/∂origin and ∂L/∂direction, (R, 3) float64 each, of samples ``x = o + t·d`` (t held fixed)
    whose view direction is their ray's ``d``: ∂L/∂o = Σ ∂L/∂x, ∂L/∂d = Σ (t·∂L/∂x + ∂L/∂view-dir) plus
    the compositing's own ∂L/∂d (R, 3). ``ray_ids`` (S,) the owning ray of each sample, ``t`` (S,),
    ``dpoints``, ``ddirs`` (S, 3)."""
    R = len(g_dirs)
    dp = np.asarray(dpoints, np.float64)
    dd = np.asarray(ddirs, np.float64) + np.asarray(t, np.float64)[:, None] * dp
    g_o = np.stack([np.bincount(ray_ids, dp[:, c], R) for c in range(3)], -1)
    g_d = np.stack([np.bincount(ray_ids, dd[:, c], R) for c in range(3)], -1) + g_dirs
    return g_o, g_d


class TrainingDiverged(UserInputError):
    """Training produced non-finite values repeatedly, even after rolling back with lower learning rates."""


class Trainer:
    """Owns the model state (flat parameters, Adam moments, occupancy grid) and the output folder."""

    def __init__(self, scene, cfg: Config, out_dir: str | os.PathLike, log=print):
        cfg.validate()  # the command line's checks, for library users too
        self.scene, self.cfg = scene, cfg
        self.out = pathlib.Path(out_dir)
        self.log = log
        tc, rc = cfg.train, cfg.render
        self.layout = ParamLayout()
        # "auto" resolved here (analytic unless the curvature loss needs a stencil); cfg keeps what was asked
        self.field = SDFField(dataclasses.replace(cfg.field, normal_mode=resolved_normal_mode(cfg)), self.layout)
        self.var_slice = self.layout.add("variance", (1,), "variance")
        masks_used = cfg.data.use_masks and scene.masks is not None
        mode = cfg.background.mode
        # Without masks, whatever lies beyond the unit sphere needs a model of its own (background.py).
        self.bg = Background(cfg.background, self.layout) if (mode == "on" or (mode == "auto" and not masks_used)) \
            else None
        # what the foreground composites onto: black when the background model adds its colour after
        self._fg_background = rc.background if self.bg is None else (0.0, 0.0, 0.0)
        self.params = self.layout.allocate()
        self.grads = self.layout.allocate()
        # ``grads`` is zero when a step starts: the optimiser clears it as it reads it. Set ``keep_grads`` to
        # read a step's gradients after it (tests); the next step then clears them first.
        self.keep_grads = False
        self._grads_dirty = False
        self.field.init_params(self.params, tc.seed)
        if self.bg is not None:
            self.bg.init_params(self.params, tc.seed)
        host = buffers.to_numpy(self.params).copy()
        host[self.var_slice.offset] = tc.init_variance
        buffers.from_numpy(self.params, host)
        self.opt = Adam(self.layout, {
            "encoding": GroupSettings(tc.lr, sparse=tc.sparse_adam),
            "color_encoding": GroupSettings(tc.lr, sparse=tc.sparse_adam),
            "sdf_mlp": GroupSettings(tc.lr), "color_mlp": GroupSettings(tc.lr),
            "variance": GroupSettings(tc.lr_variance), "background": GroupSettings(tc.lr)},
            betas=(0.9, 0.99), eps=1e-15)
        self.occupancy = OccupancyGrid(rc.occupancy_resolution, 1.0)
        self.sampler = RaySampler(self.occupancy, step=rc.coarse_step, max_coarse=rc.max_coarse, n_fine=rc.n_fine)
        self.render_sampler = self.make_render_sampler(rc.n_fine)
        self.compositor = NeuSCompositor()
        self.render_compositor = NeuSCompositor()
        sigma = tc.grad_scaling_sigma if tc.grad_scaling_sigma > 0 else scene.camera_sigma()
        self.grad_scaling = GradScaling(self.grad_scaling_mode(scene, tc.grad_scaling), sigma=sigma)
        use_masks = cfg.data.use_masks and scene.masks is not None
        self.use_masks = use_masks
        # step-based schedules of the samplers follow the run's length: the quadtree's all-pixel phase,
        # soft mining's alpha warm-up over the first third (1000 of the default 3000 steps)
        sampler_opts = {"quadtree": {"total_steps": tc.iters},
                        "soft_mining": {"warmup_steps": max(1, tc.iters // 3)}}.get(tc.pixel_sampler, {})
        self.pixels = make_sampler(tc.pixel_sampler, scene.images, scene.masks if use_masks else None,
                                   view_ids=scene.train_ids, **sampler_opts)
        self.s3im = None
        if tc.s3im_weight > 0:
            from taichi_neus.train.s3im import S3IM
            self.s3im = S3IM(kernel=tc.s3im_kernel, stride=tc.s3im_kernel, repeats=tc.s3im_repeats,
                             patch_height=tc.s3im_patch, weight=tc.s3im_weight)
            self.s3im.check_batch(tc.s3im_batch)
        self.rng = np.random.default_rng(tc.seed)
        # geometric supervision: SDF at the sparse points (Geo-NeuS), rendered depth against given depth maps
        self.sparse_points = scene.points if tc.sparse_weight > 0 and scene.points is not None \
            and len(scene.points) > 0 else None
        if tc.sparse_weight > 0 and self.sparse_points is None:
            log("[taichi_neus] --train.sparse_weight: this scene carries no sparse points (COLMAP scenes do); "
                "the sparse-point loss is off")
        self.depths = scene.depths if tc.depth_weight > 0 and scene.depths is not None else None
        if tc.depth_weight > 0 and self.depths is None:
            log("[taichi_neus] --train.depth_weight: this scene has no depths/ folder; the depth loss is off")
        self.step = 0
        self.n_rays = int(np.clip(tc.sample_budget // max(rc.n_fine, 1), tc.min_rays, tc.max_rays))
        if self.s3im is not None:
            self.n_rays = tc.s3im_batch  # S3IM needs whole virtual patches: the ray count stays fixed
        self.lr_factor = 1.0  # halved at each rollback after a non-finite step
        self.bad_steps = 0
        self.samples_per_ray = float(rc.n_fine)
        # Coarse-to-fine hash grid: the schedule's level count is capped once for the run by the training
        # pixels' footprint (finer cells than the photos resolve only fit noise).
        grid = cfg.field.grid
        self.level_cap = grid.n_levels
        if tc.level_footprint > 0:
            fp = scene.pixel_footprint()
            self.level_cap = levels_for_footprint(grid, tc.level_footprint * fp)
            log(f"[taichi_neus] hash levels: a training pixel covers {fp:.3g} unit-sphere units; levels with "
                f"cells under {tc.level_footprint:g} of them stay off: {self.level_cap} of {grid.n_levels} on "
                f"(finest cell {cell_widths(grid)[self.level_cap - 1]:.3g})")
        self.photo = self._photo_term(scene, tc) if tc.photo_weight > 0 else None
        self.refiner = None
        if tc.refine_poses:
            from taichi_neus.train.pose_refiner import PoseRefiner  # torch: an optional dependency

            # the scene's poses are replaced by the refined ones as training goes (rays, renders, mesh culling)
            self.refiner = PoseRefiner(scene.c2w, scene.train_ids, tc.lr_pose)
        self._var_buf = buffers.f32(1)
        self._dev: dict = {}
        self.train_time = 0.0

    # ---------------------------------------------------------------- helpers
    AUTO_SCALING_RADIUS = 1.5  # "auto" gradient scaling: on when a camera is this close to the sphere's centre

    @classmethod
    def grad_scaling_mode(cls, scene, mode: str) -> str:
        """``"auto"`` → ``"paper"`` when a camera sits inside or near the unit sphere (closer than
        :data:`AUTO_SCALING_RADIUS` to its centre: room-scale and forward-facing captures, where floaters
        grow in front of the cameras), else ``"none"``. In object-centred captures every sample is far
        from every camera (≥ 1.8 of σ = 2.9 on DTU), so the scaling cannot reach a floater; it only
        scales the colour and mask gradients by 0.4–0.75 and slows the front surfaces down."""
        if mode != "auto":
            return mode
        centres = scene.camera_centres()
        near = len(centres) and float(np.min(np.linalg.norm(centres, axis=-1))) < cls.AUTO_SCALING_RADIUS
        return "paper" if near else "none"

    def variance(self) -> float:
        _read_slot(self.params, self.var_slice.offset, self._var_buf)
        return float(buffers.to_numpy(self._var_buf)[0])

    def inv_s(self) -> float:
        return float(np.clip(math.exp(10.0 * self.variance()), 1e-6, 1e6))

    def sdf_fn(self, points):
        return self.field.sdf(points, points.shape[0], self.params)

    def _upload(self, name: str, arr: np.ndarray):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        buf = self._dev.get(name)
        if buf is None or tuple(buf.shape) != arr.shape:
            buf = buffers.f32(*arr.shape)
            self._dev[name] = buf
        buffers.from_numpy(buf, arr)
        return buf

    def progress(self, step: int | None = None) -> float:
        """Share of training done, in [0, 1]: steps over ``iters``, or elapsed training time over
        ``time_budget`` if that is further along (so a time-budgeted run ends fully annealed)."""
        tc = self.cfg.train
        p = (self.step if step is None else step) / max(tc.iters, 1)
        if tc.time_budget > 0:
            p = max(p, self.train_time / tc.time_budget)
        return min(p, 1.0)

    def done(self) -> bool:
        tc = self.cfg.train
        return self.step >= tc.iters or (tc.time_budget > 0 and self.train_time >= tc.time_budget)

    def schedules(self, step: int) -> dict:
        tc = self.cfg.train
        p = self.progress(step)
        if step < tc.warmup:
            lr = (step + 1) / tc.warmup
        else:
            p_w = min(tc.warmup / max(tc.iters, 1), 0.5)
            q = (p - p_w) / (1.0 - p_w)
            lr = tc.lr_final + (1 - tc.lr_final) * 0.5 * (1 + math.cos(math.pi * min(max(q, 0.0), 1.0)))
        cos_r = min(1.0, p / tc.anneal_end) if tc.anneal_end > 0 else 1.0
        levels = self.active_levels(p)
        if tc.eps_from_level:  # Neuralangelo: ε follows the finest active level's cell width
            eps = max(float(cell_widths(self.cfg.field.grid)[levels - 1]), tc.eps_end)
        else:
            eps = _log_lerp(tc.eps_start, tc.eps_end, p / tc.eps_anneal if tc.eps_anneal > 0 else 1.0)
        return {"lr_scale": lr, "cos_anneal": cos_r, "eps": eps, "levels": levels}

    def active_levels(self, p: float) -> int:
        """Hash-grid levels on at training progress ``p`` (coarse to fine): ``level_start`` at 0, one more
        at each equal share of ``level_anneal``, all from ``level_anneal`` on (0 or ≥ n_levels: all from the
        start); never more than :attr:`level_cap`, never fewer than 1. A function of progress only, so a
        resumed run continues with the count it had."""
        tc = self.cfg.train
        L = self.cfg.field.grid.n_levels
        n = L
        if 0 < tc.level_start < L:
            t = min(max(p, 0.0) / tc.level_anneal, 1.0) if tc.level_anneal > 0 else 1.0
            n = tc.level_start + int(math.floor((L - tc.level_start) * t + 1e-9))
        return max(1, min(n, self.level_cap))

    def _batch(self, n_rays: int):
        """Rays, targets and per-ray loss weights of one batch (host → device)."""
        sc = self.scene
        vids, pix, weights = self.pixels.sample(n_rays, self.rng)
        o, d = pixel_rays(sc.K[vids], sc.c2w[vids], pix)
        near, far, _ = unit_sphere_near_far(o, d, min_near=self.cfg.render.near)
        # bilinear at the ray's pixel position: exact at pixel centres, and right for soft mining's
        # continuous positions (its rays do not go through centres)
        gt = self.pixels.colors(vids, pix)
        mask = (self.pixels.mask_values(vids, pix) > 0.5).astype(np.float32) if self.use_masks else None
        return vids, pix, o, d, near, far, gt, mask, np.asarray(weights, np.float32)

    def _depth_target(self, vids: np.ndarray, pix: np.ndarray) -> np.ndarray:
        """(B,) float32 given depth at the batch's pixels (nearest pixel; 0 where unknown), unit-sphere units."""
        sc = self.scene
        ix = np.clip(np.floor(pix[:, 0]).astype(np.int64), 0, sc.W - 1)
        iy = np.clip(np.floor(pix[:, 1]).astype(np.int64), 0, sc.H - 1)
        return self.depths[vids, iy, ix]

    def _sparse_point_step(self, eps: float) -> float:
        """Geo-NeuS's sparse-point term on a random batch of ``Scene.points``: adds its gradient into
        ``self.grads`` (after the main batch's field backward, whose saved activations it replaces)."""
        tc = self.cfg.train
        pts, w = self.sparse_points, self.scene.point_weights
        n = min(tc.sparse_batch, len(pts))
        idx = self.rng.choice(len(pts), n, replace=False) if n < len(pts) else np.arange(n)
        if "sp_zero" not in self._dev or self._dev["sp_zero"].shape[0] != n:
            self._dev["sp_zero"] = buffers.f32(n, 3)  # ∂L/∂normal = 0; also the (unused) view directions
            buffers.zero_(self._dev["sp_zero"])
            self._dev["sp_grad"] = buffers.f32(n)
        zero = self._dev["sp_zero"]
        out = self.field.forward(self._upload("sp_p", pts[idx]), zero, n, self.params, eps=eps, color=False)
        loss, g_sdf = losses.sparse_sdf(out.sdf, self._upload("sp_w", w[idx]), n, weight=tc.sparse_weight,
                                        grad_out=self._dev["sp_grad"])
        self.field.backward(g_sdf, zero, None, self.params, self.grads)
        return loss

    def _eikonal_points_step(self, eps: float) -> float:
        """The eikonal term on ``eikonal_points`` points drawn uniformly in the unit sphere (NeuS
        regularises uniform samples along every ray; Wang et al. 2021, eq. 8), so free space and the
        inside of the object are held to |∇f| = 1 too, not only the thin shell the fine samples cover.
        Adds its gradient into ``self.grads`` after the main batch's field backward."""
        tc = self.cfg.train
        n = tc.eikonal_points
        if "ek_zero" not in self._dev or self._dev["ek_zero"].shape[0] != n:
            self._dev["ek_zero"] = buffers.f32(n, 3)  # the (unused) view directions
            buffers.zero_(self._dev["ek_zero"])
            self._dev["ek_sdf0"] = buffers.f32(n)  # ∂L/∂sdf = 0
            buffers.zero_(self._dev["ek_sdf0"])
            self._dev["ek_gn"] = buffers.f32(n, 3)
        p_dev = self._upload("ek_p", uniform_in_ball(n, self.rng))
        zero = self._dev["ek_zero"]
        out = self.field.forward(p_dev, zero, n, self.params, eps=eps, color=False)  # the colour is never read
        loss, g_n = losses.eikonal(out.normal, p_dev, n, weight=tc.eikonal_weight, grad_out=self._dev["ek_gn"])
        self.field.backward(self._dev["ek_sdf0"], g_n, None, self.params, self.grads)
        return loss

    def _photo_term(self, scene, tc):
        """The photo-consistency term, or None (with a note) where it cannot run: without torch, or with a
        single training view; with fewer views than ``photo_sources`` + 1 it compares with those there are."""
        if importlib.util.find_spec("torch") is None:
            self.log("[taichi_neus] --train.photo_weight: the photo-consistency term needs torch, which is not "
                     "installed; it is off (pip install torch turns it on)")
            return None
        n_src = min(tc.photo_sources, len(scene.train_ids) - 1)
        if n_src < 1:
            self.log("[taichi_neus] --train.photo_weight: one training view has no other to compare with; the "
                     "photo-consistency term is off")
            return None
        if n_src < tc.photo_sources:
            self.log(f"[taichi_neus] --train.photo_sources: {len(scene.train_ids)} training views, so each is "
                     f"compared with {n_src}")
        from taichi_neus.train.photo_consistency import PhotoConsistency  # torch: an optional dependency
        return PhotoConsistency(scene.images, scene.K, scene.c2w, scene.train_ids, weight=tc.photo_weight,
                                radius=tc.photo_radius, n_sources=n_src, n_best=min(tc.photo_best, n_src),
                                normal_grad=tc.photo_normal)

    def _photo_step(self, vids, pix, o, d, mask, comp, out, smp, S: int, g_depth, g_opacity):
        """The photo-consistency term (:mod:`~taichi_neus.train.photo_consistency`) on this batch's rendered
        surfaces: its gradient is added to the compositor's ∂L/∂depth and ∂L/∂opacity (R,), which are
        returned (new device buffers when the term counted any ray) with the loss and the rays it counted.
        The plane normal of each ray is its weight-composited raw SDF gradient ``N = Σ wᵢ·∇fᵢ``; with
        ``photo_normal`` the term's ∂L/∂N reaches each sample's normal as ``wᵢ·∂L/∂N`` (the weights held
        fixed: they learn from the depth and opacity), kept in ``self._photo_dnormal`` (S_cap, 3) for
        :meth:`train_step` to add to the compositor's per-sample normal gradient (else None)."""
        self._photo_dnormal = None
        R = len(vids)
        w = buffers.to_numpy(self.compositor.weights, S).astype(np.float64)
        nrm = buffers.to_numpy(out.normal, S).astype(np.float64)
        rid = buffers.to_numpy(smp.ray_ids, S)
        normals = np.stack([np.bincount(rid, weights=w * nrm[:, k], minlength=R)[:R] for k in range(3)], axis=-1)
        valid = mask > 0.5 if mask is not None else None
        depth, opacity = buffers.to_numpy(comp.depth), buffers.to_numpy(comp.opacity)
        loss, g_d, g_o, g_n, n = self.photo.loss_and_grad(vids, pix, o, d, depth, opacity, normals, self.scene.c2w,
                                                          valid)
        if n == 0:
            return 0.0, 0, g_depth, g_opacity
        if g_n is not None:
            dn = np.zeros((out.normal.shape[0], 3), np.float32)
            dn[:S] = w[:, None] * g_n[rid]
            self._photo_dnormal = self._upload("g_photo_normal", dn)
        if g_depth is not None:
            g_d = g_d + buffers.to_numpy(g_depth)
        if g_opacity is not None:
            g_o = g_o + buffers.to_numpy(g_opacity)
        return loss, n, self._upload("g_photo_depth", g_d), self._upload("g_photo_opacity", g_o)

    def _pose_gradients(self, vids, o, d, far, smp, S: int, dpoints, ddirs, g_dirs, bg_rays=None) -> None:
        """The batch's per-ray gradients (:func:`ray_gradients`) into the pose refiner; with the background
        model, ``bg_rays`` = its ∂L/∂o, ∂L/∂d (R, 3) and ∂L/∂t0 (R,) buffers, t0 being the sphere exit
        (chained through :func:`sphere_exit_vjp`)."""
        R = len(vids)
        if S > 0:
            g_o, g_d = ray_gradients(buffers.to_numpy(smp.ray_ids, S), buffers.to_numpy(smp.t, S),
                                     buffers.to_numpy(dpoints, S), buffers.to_numpy(ddirs, S),
                                     buffers.to_numpy(g_dirs, R))
        else:
            g_o, g_d = np.zeros((R, 3)), np.zeros((R, 3))
        if bg_rays is not None:
            gbo, gbd, gbt = (buffers.to_numpy(b, R).astype(np.float64) for b in bg_rays)
            eo, ed = sphere_exit_vjp(o, d, far, gbt)
            g_o, g_d = g_o + gbo + eo, g_d + gbd + ed
        self.refiner.accumulate(vids, d, g_o, g_d)

    # ------------------------------------------------------------- one step
    def train_step(self) -> dict:
        # the MLP weights are packed once for the whole step: nothing below writes them until the optimiser
        with packed_weights_reused():
            tc, rc = self.cfg.train, self.cfg.render
            step = self.step
            sch = self.schedules(step)
            self.field.active_levels = sch["levels"]  # for every field evaluation of this step (occupancy too)
            inv_s = self.inv_s()
            if step >= rc.occupancy_warmup and step % rc.occupancy_every == 0:
                self.occupancy.update(self.sdf_fn, inv_s, step, sweep=rc.occupancy_sweep,
                                      phase=step // rc.occupancy_every)

            vids, pix, o, d, near, far, gt, mask, ray_w = self._batch(self.n_rays)
            o_dev, d_dev, far_dev = self._upload("o", o), self._upload("d", d), self._upload("far", far)
            smp = self.sampler.sample(o_dev, d_dev, self._upload("near", near), far_dev,
                                      self.sdf_fn, inv_s, rng_seed=tc.seed * 1000003 + step, perturb=True)
            S, S_cap = smp.n_samples, smp.t.shape[0]
            sdirs = self.field.ws.exact("sample_dirs", S_cap, 3)
            _gather_dirs(d_dev, smp.ray_ids, S, sdirs)

            curv_on = tc.curvature_weight > 0
            out = self.field.forward(smp.positions, sdirs, S, self.params, eps=sch["eps"], out_rows=S_cap,
                                     laplacian=curv_on)
            _read_slot(self.params, self.var_slice.offset, self._var_buf)
            comp = self.compositor.forward(out.sdf, out.normal, out.rgb, smp.delta, smp.t, d_dev, smp.ray_offsets,
                                           smp.ray_counts, self._var_buf, sch["cos_anneal"],
                                           self._fg_background)
            pred = comp.colour
            if self.bg is not None:  # C = C_fg + (1 − O)·C_bg, the background NeRF seen beyond the sphere
                bg_colour = self.bg.forward(o_dev, d_dev, far_dev, self.params, seed=step, perturb=True)
                pred = self.field.ws.exact("blended", self.n_rays, 3)
                blend(comp.colour, comp.opacity, bg_colour, pred)

            gt_dev = self._upload("gt", gt)
            mask_dev = self._upload("mask", mask) if mask is not None else None
            # gradient buffers from the workspace: a fresh (zero-filled) allocation per step costs a pass each
            l1, g_colour = losses.colour_l1(pred, gt_dev, mask_dev, weight=1.0,
                                            grad_out=self.field.ws.exact("g_colour", pred.shape[0], 3))
            weighted = not np.allclose(ray_w, 1.0)
            if weighted:  # importance weights of the pixel sampler (soft mining): per-ray L1 × w
                _scale_rows(g_colour, self._upload("ray_w", ray_w))
            colour = None
            s3im_loss = 0.0
            # With masks the model is asked to render the photo on the foreground and the background colour
            # elsewhere (the L1 sees foreground rays only, the mask loss the rest): S3IM and the samplers' error
            # compare with that image, not with the photo's real background.
            bg = np.asarray(rc.background, np.float32)
            target = gt if mask is None else gt * mask[:, None] + bg * (1 - mask[:, None])
            if self.s3im is not None:
                colour = buffers.to_numpy(pred)
                s3im_loss, g_s3im = self.s3im.loss_and_grad(colour, target, seed=tc.seed * 7919 + step)
                buffers.add_rows3_(g_colour, self._upload("g_s3im", g_s3im))
            bce, g_opacity = (losses.mask_bce(comp.opacity, mask_dev, weight=tc.mask_weight,
                                              grad_out=self.field.ws.exact("g_opacity", comp.opacity.shape[0]))
                              if mask_dev is not None else (0.0, None))
            if self.bg is not None:
                g_bg = self.field.ws.exact("g_bg", self.n_rays, 3)
                g_op = g_opacity if g_opacity is not None else self.field.ws.exact("g_op", self.n_rays)
                blend_backward(g_colour, comp.opacity, bg_colour, g_op, g_bg, accumulate=g_opacity is not None)
                g_opacity = g_op
            depth_loss, g_depth = 0.0, None
            if self.depths is not None:  # rendered depth Σ w·t against the given depth maps (data/depths.py)
                depth_t = self._upload("depth_t", self._depth_target(vids, pix))
                depth_loss, g_depth = losses.depth_l1(comp.depth, depth_t, weight=tc.depth_weight)
            photo_loss, photo_rays, self._photo_dnormal = 0.0, 0, None
            if self.photo is not None and S > 0 and self.progress(step) >= tc.photo_start:
                photo_loss, photo_rays, g_depth, g_opacity = self._photo_step(vids, pix, o, d, mask, comp, out, smp, S,
                                                                              g_depth, g_opacity)
            refine = self.refiner is not None and self.progress(step) >= tc.pose_start
            g = self.compositor.backward(g_colour, g_opacity, g_depth, ray_inputs=refine)
            if self._photo_dnormal is not None:
                buffers.add_rows3_(g.normal, self._photo_dnormal)
            self.grad_scaling.apply(g.sdf, g.normal, g.rgb, smp.t, S)
            eik, _ = losses.eikonal(out.normal, smp.positions, S, weight=tc.eikonal_weight, grad_out=g.normal,
                                    accumulate=True)
            curv, g_lap = 0.0, None
            if curv_on:  # Neuralangelo's mean |Δf| on the same samples, from the same stencil
                curv, g_lap = losses.curvature(out.laplacian, smp.positions, S, weight=tc.curvature_weight,
                                               grad_out=self.field.ws.exact("g_lap", S_cap))

            if self._grads_dirty:  # a rejected or interrupted step, or keep_grads, left gradients behind
                buffers.zero_(self.grads)
            self._grads_dirty = True  # until an optimiser step clears them
            if S > 0:
                dpts = self.field.ws.exact("dpoints", S, 3) if refine else None
                ddirs = self.field.ws.exact("ddirs", S, 3) if refine else None
                self.field.backward(g.sdf, g.normal, g.rgb, self.params, self.grads, dlaplacian=g_lap,
                                    dpoints=dpts, ddirs=ddirs)
            bg_rays = None
            if self.bg is not None:
                # off by default: the background's ray gradients made refinement worse in both scenes measured
                # (README, "Refining every camera while training"); the foreground's still see the background
                # through the blend's opacity gradient
                if refine and tc.pose_background:
                    R = len(vids)
                    bg_rays = (self.field.ws.exact("bg_g_o", R, 3), self.field.ws.exact("bg_g_d", R, 3),
                               self.field.ws.exact("bg_g_t0", R))
                self.bg.backward(g_bg, self.params, self.grads, *(bg_rays or ()))
            if refine:
                self._pose_gradients(vids, o, d, far, smp, S, dpts if S > 0 else None, ddirs if S > 0 else None,
                                     g.dirs, bg_rays)
            _add_slot(g.variance, self.grads, self.var_slice.offset)
            sparse_loss = self._sparse_point_step(sch["eps"]) if self.sparse_points is not None else 0.0
            eik_pts = self._eikonal_points_step(sch["eps"]) if tc.eikonal_points > 0 else 0.0
            loss = l1 + bce + eik + eik_pts + curv + s3im_loss + sparse_loss + depth_loss + photo_loss
        # hash-grid levels not yet on (coarse to fine) or capped at the pixel footprint: their gradients and
        # moments are zero, so neither the check nor the optimiser needs to read them
        enc, levels = self.field.encoding, sch["levels"]
        used = int(enc.loff_np[levels]) * enc.cfg.n_features if levels < len(enc.loff_np) else enc.slice.size
        lo, hi, total = enc.slice.offset, enc.slice.offset + enc.slice.size, self.layout.total
        tables = [enc.slice] + ([self.field.color_encoding.slice] if self.field.color_encoding is not None else [])
        if not math.isfinite(loss) or (_count_bad(self.grads, 0, lo + used, GRAD_BOUND)
                                       + _count_bad(self.grads, hi, total, GRAD_BOUND)
                                       + sum(_count_bad(self.params, a, b, GRAD_BOUND)
                                             for a, b in _outside(tables, total))) > 0:
            return self._reject_step(step, loss)
        self.bad_steps = 0
        # the optimiser clears the gradients as it reads them, unless a caller wants to read them after the step
        self.opt.step(self.params, self.grads, lr_scale=sch["lr_scale"] * self.lr_factor,
                      zero_grads=not self.keep_grads, limits={"encoding": used})
        self._grads_dirty = self.keep_grads
        if tc.s_floor > 0:  # a floor under NeuS's sharpness, rising log-linearly: the variance is projected up
            s0 = math.exp(10.0 * tc.init_variance)
            frac = self.progress(step) / tc.s_floor_anneal if tc.s_floor_anneal > 0 else 1.0
            floor = _log_lerp(s0, max(tc.s_floor, s0), frac)
            _raise_slot(self.params, self.var_slice.offset, math.log(floor) / 10.0)
        if refine and self.refiner.step(sch["lr_scale"] * self.lr_factor):
            self.scene.c2w[:] = self.refiner.poses()

        colour = buffers.to_numpy(pred) if colour is None else colour
        err = np.abs(colour - target).mean(axis=1)
        self.pixels.update(vids, pix, err, step)
        sel = mask > 0.5 if mask is not None else slice(None)
        mse = float(np.mean((colour[sel] - gt[sel]) ** 2)) if np.any(sel) else float("nan")
        # Keep the sample count near the budget: rays adapt to the measured samples per ray.
        spr = S / max(self.n_rays, 1)
        self.samples_per_ray = 0.9 * self.samples_per_ray + 0.1 * max(spr, 1.0)
        want = int(np.clip(tc.sample_budget / self.samples_per_ray, tc.min_rays, tc.max_rays)) // 64 * 64
        if self.s3im is None and abs(want - self.n_rays) > 0.1 * self.n_rays:
            self.n_rays = want
        self.step += 1
        return {"step": self.step, "loss": loss, "l1": l1, "eikonal": eik, "mask_bce": bce,
                "psnr": -10.0 * math.log10(max(mse, 1e-10)), "s": math.exp(10.0 * self.variance()),
                "rays": int(comp.opacity.shape[0]), "samples": S, "samples_per_ray": spr, "s3im": s3im_loss,
                "sparse": sparse_loss, "depth": depth_loss, "eikonal_points": eik_pts, "curvature": curv,
                "photo": photo_loss, "photo_rays": photo_rays,
                "lr_scale": sch["lr_scale"] * self.lr_factor, "eps": sch["eps"], "levels": sch["levels"]}

    def _reject_step(self, step: int, loss: float) -> dict:
        """A non-finite loss or gradient: the update is not applied (parameters stay the last good ones),
        the learning rate is halved, and after ``max_bad_steps`` in a row training stops with a message.
        Checkpoints are only written from good states, so none is ever poisoned."""
        self.bad_steps += 1
        self.lr_factor *= 0.5
        if self.refiner is not None:
            self.refiner.clear()
        self.log(f"[taichi_neus] step {step}: non-finite loss or gradient (loss={loss}); update skipped, "
                 f"learning rate x{self.lr_factor:g}")
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            raise TrainingDiverged(
                f"training diverged: {self.bad_steps} consecutive steps with non-finite values at step {step} "
                f"even after lowering the learning rate to x{self.lr_factor:g}; resume from the last checkpoint "
                "with a lower --train.lr, or check the input data.")
        self.step += 1
        return {"step": self.step, "loss": float("nan"), "psnr": float("nan"), "s": math.exp(10 * self.variance()),
                "samples_per_ray": 0.0, "rejected": True}

    # ------------------------------------------------------------- rendering
    def make_render_sampler(self, n_fine: int) -> RaySampler:
        """The sampler of renders without gradients: the training sampler's coarse step divided by
        ``render.render_refine`` (its bin cap multiplied by it), with ``n_fine`` fine samples per ray; with
        ``render.render_stop`` > 0 a scout march at the training step ends each ray behind its first opaque surface."""
        rc = self.cfg.render
        return RaySampler(self.occupancy, step=rc.coarse_step / rc.render_refine,
                          max_coarse=rc.max_coarse * rc.render_refine, n_fine=n_fine,
                          stop_transmittance=rc.render_stop, scout_step=rc.coarse_step, scout_max_coarse=rc.max_coarse)

    def render_rays(self, o: np.ndarray, d: np.ndarray, chunk: int = 4096, max_t: np.ndarray | None = None) -> dict:
        """Render rays (no gradient): rgb (N,3), opacity (N,), depth (N,), normal (N,3) world-aligned.

        ``max_t`` (N,) float, optional: end each ray at this distance from its origin (if before its exit
        from the unit sphere), e.g. to measure the opacity accumulated close to the camera."""
        n = o.shape[0]
        res = {"rgb": np.zeros((n, 3), np.float32), "opacity": np.zeros(n, np.float32),
               "depth": np.zeros(n, np.float32), "normal": np.zeros((n, 3), np.float32)}
        inv_s = self.inv_s()
        sch = self.schedules(self.step)
        eps, cos_r = sch["eps"], sch["cos_anneal"]
        self.field.active_levels = sch["levels"]
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            oo = np.zeros((chunk, 3), np.float32)
            dd = np.zeros((chunk, 3), np.float32)
            dd[:, 2] = 1.0
            oo[:e - s], dd[:e - s] = o[s:e], d[s:e]
            near, far, _ = unit_sphere_near_far(oo, dd, min_near=self.cfg.render.near)
            exit_t = far.copy()  # the background starts where the ray leaves the unit sphere
            if max_t is not None:
                far[:e - s] = np.maximum(near[:e - s], np.minimum(far[:e - s], max_t[s:e]))
            if e - s < chunk:
                near[e - s:] = far[e - s:] = 0.0
            d_dev = self._upload("r_d", dd)
            smp = self.render_sampler.sample(self._upload("r_o", oo), d_dev, self._upload("r_near", near),
                                             self._upload("r_far", far), self.sdf_fn, inv_s, perturb=False)
            S, S_cap = smp.n_samples, smp.t.shape[0]
            sdirs = self.field.ws.exact("r_sample_dirs", S_cap, 3)
            _gather_dirs(d_dev, smp.ray_ids, S, sdirs)
            out = self.field.forward(smp.positions, sdirs, S, self.params, eps=eps, out_rows=S_cap)
            _read_slot(self.params, self.var_slice.offset, self._var_buf)
            comp = self.render_compositor.forward(out.sdf, out.normal, out.rgb, smp.delta, smp.t, d_dev,
                                                  smp.ray_offsets, smp.ray_counts, self._var_buf, cos_r,
                                                  self._fg_background)
            m = e - s
            if self.bg is not None:
                bg_colour = self.bg.forward(self._upload("r_o", oo), d_dev, self._upload("r_exit", exit_t), self.params)
                pred = self.field.ws.exact("r_blended", chunk, 3)
                blend(comp.colour, comp.opacity, bg_colour, pred)
                res["rgb"][s:e] = buffers.to_numpy(pred, m)
            else:
                res["rgb"][s:e] = buffers.to_numpy(comp.colour, m)
            res["opacity"][s:e] = buffers.to_numpy(comp.opacity, m)
            res["depth"][s:e] = buffers.to_numpy(comp.depth, m)
            if S > 0:
                w = buffers.to_numpy(self.render_compositor.weights, S)
                nr = buffers.to_numpy(out.normal, S)
                nr = nr / np.maximum(np.linalg.norm(nr, axis=1, keepdims=True), 1e-8)
                rid = buffers.to_numpy(smp.ray_ids, S)
                acc = np.zeros((chunk, 3), np.float32)
                np.add.at(acc, rid, w[:, None] * nr)
                res["normal"][s:e] = acc[:m]
        return res

    def render_view(self, view: int, downscale: int = 1) -> dict:
        """Render a dataset view at 1/downscale resolution; returns images (h, w, ·) float32."""
        sc = self.scene
        K = sc.K[view].astype(np.float64).copy()
        K[:2] /= downscale
        h, w = sc.H // downscale, sc.W // downscale
        o_all, d_all = [], []
        for _, _, o, d in iter_image_rays(K, sc.c2w[view], h, w, chunk=1 << 16):
            o_all.append(o)
            d_all.append(d)
        r = self.render_rays(np.concatenate(o_all), np.concatenate(d_all))
        return {k: v.reshape(h, w, -1).squeeze(-1) if v.ndim == 1 else v.reshape(h, w, 3) for k, v in r.items()}

    def evaluate_view(self, view: int, downscale: int, render: dict | None = None) -> dict:
        """PSNR of ``view`` at ``1/downscale`` resolution (whole image and, with masks, inside them), with
        the render and the photo it is scored against. ``render``: that view's :meth:`render_view` at this
        resolution when the caller has it already (it is not rendered again)."""
        from taichi_neus.render.image_metrics import psnr
        r = self.render_view(view, downscale) if render is None else render
        sc = self.scene
        gt = sc.images[view].astype(np.float32) / 255.0
        if downscale > 1:
            h, w = sc.H // downscale, sc.W // downscale
            gt = gt[:h * downscale, :w * downscale].reshape(h, downscale, w, downscale, 3).mean((1, 3))
        mask = None
        if sc.masks is not None:
            m = sc.masks[view].astype(np.float32) / 255.0
            if downscale > 1:
                m = m[:h * downscale, :w * downscale].reshape(h, downscale, w, downscale).mean((1, 3))
            mask = m > 0.5
        gt_eval = gt
        if mask is not None and self.use_masks:  # masked training renders the object on the render background
            bg = np.asarray(self.cfg.render.background, np.float32)
            gt_eval = gt * mask[..., None] + bg * (1.0 - mask[..., None])
        out = {"psnr": float(psnr(np.clip(r["rgb"], 0, 1), gt_eval))}
        if mask is not None:
            out["psnr_masked"] = float(psnr(np.clip(r["rgb"], 0, 1), gt, mask=mask))
        return {**out, "render": r, "gt": gt_eval}

    def save_validation(self, view: int) -> dict:
        ev = self.evaluate_view(view, self.cfg.train.val_downscale)
        r = ev["render"]
        vdir = self.out / "val"
        vdir.mkdir(parents=True, exist_ok=True)
        depth = r["depth"] / max(float(r["depth"].max()), 1e-6)
        nrm = (r["normal"] * 0.5 + 0.5) * r["opacity"][..., None]
        row = np.concatenate([np.clip(ev["gt"], 0, 1), np.clip(r["rgb"], 0, 1), nrm,
                              np.repeat(depth[..., None], 3, -1)], axis=1)
        imageio.imwrite(vdir / f"step{self.step:06d}_view{view:03d}.png", (row * 255).astype(np.uint8))
        return {k: v for k, v in ev.items() if k.startswith("psnr")}

    # -------------------------------------------------------- field queries
    def sdf_at(self, points: np.ndarray) -> np.ndarray:
        """Signed distance of the trained field at ``(N, 3)`` float32 unit-sphere points; ``(N,)`` float32.

        Outside the unit sphere the field was never trained (rays are clipped to it), so the result is
        intersected with the sphere: ``max(sdf, |p| - 1)``. No surface comes from untrained space.
        """
        block = 1 << 18
        self.field.active_levels = self.schedules(self.step)["levels"]
        q = self._dev.get("q_sdf")
        if q is None:  # fixed-size block so the SDF kernel compiles once for every call
            q = self._dev["q_sdf"] = buffers.f32(block, 3)
        out = np.empty(points.shape[0], np.float32)
        for s in range(0, points.shape[0], block):
            m = min(block, points.shape[0] - s)
            blk = np.zeros((block, 3), np.float32)
            blk[:m] = points[s:s + m]
            buffers.from_numpy(q, blk)
            out[s:s + m] = buffers.to_numpy(self.field.sdf(q, m, self.params), m)
        return np.maximum(out, np.linalg.norm(points, axis=1).astype(np.float32) - 1.0)

    def colour_at(self, points: np.ndarray, view_dirs: np.ndarray) -> np.ndarray:
        """Colour of the field at ``(N, 3)`` unit-sphere points seen along ``(N, 3)`` unit directions; ``(N, 3)``."""
        out = np.empty((points.shape[0], 3), np.float32)
        self.field.active_levels = self.schedules(self.step)["levels"]
        for s in range(0, points.shape[0], 1 << 16):
            m = min(1 << 16, points.shape[0] - s)
            pts = self._upload("m_p", points[s:s + m])
            dirs = self._upload("m_d", view_dirs[s:s + m])
            out[s:s + m] = buffers.to_numpy(self.field.forward(pts, dirs, m, self.params).rgb, m)
        return out

    # ----------------------------------------------------------- checkpoints
    def state(self) -> dict:
        """Everything that shapes the next step, as numpy arrays: parameters, Adam moments, occupancy grid,
        step, ray count, the host RNG, the learning-rate factor and bad-step count of the divergence guard,
        and the pixel sampler's learnt state. (The device-side random numbers are counter-based hashes of the
        step and seed, so they need no state.)"""
        st = self.opt.state_dict()
        out = {"params": buffers.to_numpy(self.params), "adam_m": st["m"], "adam_v": st["v"],
               "adam_step": st["step"], **({"adam_t": st["t"]} if "t" in st else {}), "step": np.int64(self.step),
               "occupancy": self.occupancy.bits.to_numpy(), "n_rays": np.int64(self.n_rays),
               "samples_per_ray": np.float64(self.samples_per_ray), "train_time": np.float64(self.train_time),
               "rng": np.frombuffer(json.dumps(self.rng.bit_generator.state).encode(), np.uint8),
               "layout_total": np.int64(self.layout.total), "lr_factor": np.float64(self.lr_factor),
               "bad_steps": np.int64(self.bad_steps),
               "pixel_sampler": np.frombuffer(self.pixels.name.encode(), np.uint8)}
        out.update({SAMPLER_PREFIX + k: np.asarray(v) for k, v in self.pixels.state_dict().items()})
        if self.refiner is not None:
            out.update({POSE_PREFIX + k: np.asarray(v) for k, v in self.refiner.state_dict().items()})
        return out

    def save_checkpoint(self) -> pathlib.Path:
        ck = self.out / "checkpoints"
        ck.mkdir(parents=True, exist_ok=True)
        path = ck / f"ckpt_{self.step:07d}.npz"
        tmp = ck / f".tmp_{self.step:07d}.npz"
        st = self.state()
        bad = [k for k in ("params", "adam_m", "adam_v") if not np.isfinite(st[k]).all()]
        if bad:  # never write a poisoned checkpoint: the previous ones stay the newest
            raise TrainingDiverged(f"not writing checkpoint {path}: {' and '.join(bad)} hold NaN or Inf at step "
                                   f"{self.step}; resume from the last checkpoint with a lower --train.lr.")
        for stale in ck.glob(".tmp_*.npz"):  # left by a run killed while writing
            stale.unlink(missing_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **st)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        for old in sorted(ck.glob("ckpt_*.npz"))[:-CKPT_KEEP]:
            old.unlink()
        return path

    def load_checkpoint(self, path) -> None:
        with np.load(path) as z:
            st = {k: z[k] for k in z.files}
        # Everything is checked before any state changes, so a bad file leaves the trainer as it was.
        missing = [k for k in CKPT_KEYS if k not in st]
        if missing:
            raise ValueError(f"partial checkpoint, missing {', '.join(missing)}")
        if int(st["layout_total"]) != self.layout.total:
            raise UserInputError(f"checkpoint {path} was written by a model of another size; "
                                 "resume with the configuration it was trained with.")
        for k in ("params", "adam_m", "adam_v"):
            if st[k].shape != (self.layout.total,) or not np.isfinite(st[k]).all():
                raise ValueError(f"'{k}' has shape {st[k].shape} or holds NaN/Inf")
        if st["occupancy"].shape != tuple(self.occupancy.bits.shape):
            raise ValueError(f"occupancy grid of shape {st['occupancy'].shape}")
        json.loads(bytes(st["rng"]).decode())
        notes = []
        if any(k not in st for k in CKPT_RUN_KEYS):
            notes.append("it predates the learning-rate factor and sampler state in checkpoints: the learning-rate "
                         "factor restarts at 1 and the pixel sampler restarts fresh")
        sampler = {k[len(SAMPLER_PREFIX):]: v for k, v in st.items() if k.startswith(SAMPLER_PREFIX)}
        saved_sampler = bytes(st["pixel_sampler"]).decode() if "pixel_sampler" in st else None
        if saved_sampler is not None and saved_sampler != self.pixels.name:
            notes.append(f"it was trained with the {saved_sampler} pixel sampler: the {self.pixels.name} sampler "
                         "starts fresh")
            sampler = {}
        poses = {k[len(POSE_PREFIX):]: v for k, v in st.items() if k.startswith(POSE_PREFIX)}
        if self.refiner is not None and not poses:
            notes.append("it holds no refined poses (trained without --train.refine_poses): refinement starts from "
                         "the given poses")
        if self.refiner is not None and poses:
            self.refiner.check_state_dict(poses)  # before the sampler's state changes
        if sampler:  # the samplers read every entry before changing anything, so a bad one raises here
            self.pixels.load_state_dict(sampler)
        if self.refiner is not None and poses:
            self.refiner.load_state_dict(poses)
            self.scene.c2w[:] = self.refiner.poses()
        buffers.from_numpy(self.params, st["params"])
        self.opt.load_state_dict({"m": st["adam_m"], "v": st["adam_v"], "step": st["adam_step"],
                                  **({"t": st["adam_t"]} if "adam_t" in st else {})})
        self.occupancy.bits.from_numpy(st["occupancy"])
        self.step = int(st["step"])
        self.n_rays = int(st["n_rays"])
        self.samples_per_ray = float(st["samples_per_ray"])
        self.train_time = float(st["train_time"])
        self.rng.bit_generator.state = json.loads(bytes(st["rng"]).decode())
        self.lr_factor = float(st.get("lr_factor", 1.0))
        self.bad_steps = int(st.get("bad_steps", 0))
        for note in notes:
            self.log(f"[taichi_neus] note on checkpoint {pathlib.Path(path).name}: {note}.")

    def resume_latest(self) -> int | None:
        """Load the newest readable checkpoint (a corrupt or partial one is skipped); its step or None."""
        ck = self.out / "checkpoints"
        for path in sorted(ck.glob("ckpt_*.npz"), reverse=True):
            try:
                self.load_checkpoint(path)
                return self.step
            except UserInputError:
                raise
            except Exception as exc:  # truncated or corrupt file: fall back to the previous one
                self.log(f"[taichi_neus] skipping unreadable checkpoint {path.name}: {exc}")
        return None

    # ------------------------------------------------------------------- fit
    def fit(self, callback=None, on_step=None) -> dict:
        """Train to ``cfg.train.iters`` steps or ``cfg.train.time_budget`` seconds, whichever comes first.

        ``callback(trainer, stats)`` runs after every step (e.g. the live preview); returning False stops
        training early (a checkpoint is written). ``on_step(step, stats)`` reports progress (the app
        draws a progress bar from it; the trainer itself prints nothing per step)."""
        tc = self.cfg.train
        self.out.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out / "metrics.jsonl"
        val_view = int(self.scene.test_ids[0]) if len(self.scene.test_ids) else int(self.scene.train_ids[0])
        with open(metrics_path, "a") as mf:
            while not self.done():
                t0 = time.time()
                st = self.train_step()
                self.train_time += time.time() - t0
                st["time"] = self.train_time
                last = self.done()
                if self.step % tc.log_every == 0 or last:
                    mf.write(json.dumps(st) + "\n")
                    mf.flush()
                if on_step is not None:
                    on_step(self.step, st)
                if tc.val_every and (self.step % tc.val_every == 0 or last):
                    v = self.save_validation(val_view)
                    mf.write(json.dumps({"step": self.step, "val_view": val_view, **v}) + "\n")
                    mf.flush()
                if tc.ckpt_every and (self.step % tc.ckpt_every == 0 or last):
                    self.save_checkpoint()
                if callback is not None and callback(self, st) is False:
                    if tc.ckpt_every:
                        self.save_checkpoint()
                    break
        if self.refiner is not None:  # what the user looks at: each camera's given and refined pose
            self.refiner.write(self.out / "poses_refined.json", self.scene.image_names or None)
        return {"steps": self.step, "train_time_s": self.train_time}
