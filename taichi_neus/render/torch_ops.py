"""NeuS compositing and whole-ray rendering as differentiable torch functions over the Taichi kernels.

- :func:`composite`: packed per-sample sdf, normal, colour → per-ray colour, opacity, depth.
- :class:`Renderer`: a trained field, its occupancy grid and render settings;
  ``Renderer.render_rays(origins, directions)`` → colour, opacity, depth, differentiable with respect
  to the field's parameters and to the ray origins and directions (what a camera-pose gradient needs).

Samples along the rays are placed without gradient (occupancy march + inverse-CDF on the SDF,
:class:`~taichi_neus.render.sampling.RaySampler`); their distances ``t`` and lengths ``δ`` are then
held constant, as nerfacc does: positions ``x = o + t·d`` carry the gradient to ``o`` and ``d``,
``t`` itself does not move with the ray. The view direction of every sample is its ray's ``d``, and
``d`` also enters NeuS's α through ``cosθ = d·n``; all three paths are differentiated. Runs trained
without masks add their background model's colour behind the surface, differentiated through its
samples from the sphere exit outwards (:func:`background_colour`).

Backends: CPU and CUDA (torch tensors go into the kernels without a copy). On Vulkan/Metal Taichi
copies torch tensors on every launch: it works, slowly; the Taichi-autodiff adapters
(:mod:`taichi_neus.render.tape_ops`) stay on the device there. Fresh outputs and gradients per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from taichi_neus.data.rays import unit_sphere_near_far
from taichi_neus.errors import UserInputError
from taichi_neus.field.sdf_field import SDFField
from taichi_neus.field.torch_ops import f32, field_forward, grad_or_zeros, to_torch
from taichi_neus.render.compositing import S_MAX, S_MIN, NeuSCompositor
from taichi_neus.render.occupancy import OccupancyGrid
from taichi_neus.render.sampling import RaySampler


class CompositeFunction(torch.autograd.Function):
    """autograd.Function over :class:`NeuSCompositor`; use :func:`composite`."""

    @staticmethod
    def forward(ctx, sdf, normal, rgb, delta, t, dirs, variance, offsets, counts, cos_anneal_ratio, background):
        ins = [f32(a) for a in (sdf, normal, rgb, delta, t, dirs, variance)]
        offs, cnts = (a.detach().to(torch.int32).contiguous() for a in (offsets, counts))
        comp = NeuSCompositor()  # its own saved α, T, w: nothing shared with other calls
        out = comp.forward(*ins[:6], offs, cnts, ins[6], cos_anneal_ratio, background)
        R, dev = cnts.shape[0], sdf.device
        ctx.comp = comp
        ctx.save_for_backward(*ins, offs, cnts)
        ctx.dtypes = tuple(a.dtype for a in (sdf, normal, rgb, delta, t, dirs, variance))
        return to_torch(out.colour, R, dev, 3), to_torch(out.opacity, R, dev), to_torch(out.depth, R, dev)

    @staticmethod
    def backward(ctx, g_colour, g_opacity, g_depth):
        *ins, offs, cnts = ctx.saved_tensors
        R, S, dev = cnts.shape[0], ins[0].shape[0], ins[0].device
        g = ctx.comp.backward(grad_or_zeros(g_colour, (R, 3), dev), grad_or_zeros(g_opacity, (R,), dev),
                              grad_or_zeros(g_depth, (R,), dev), ray_inputs=True)
        # a new tensor per input: the compositor reuses its gradient buffers on its next backward
        out = [to_torch(g.sdf, S, dev), to_torch(g.normal, S, dev, 3), to_torch(g.rgb, S, dev, 3), None,
               to_torch(g.t, S, dev), to_torch(g.dirs, R, dev, 3), to_torch(g.variance, 1, dev)]
        out = [None if o is None else o.to(dt) for o, dt in zip(out, ctx.dtypes, strict=True)]
        return (*out, None, None, None, None)


class BackgroundFunction(torch.autograd.Function):
    """autograd.Function over :meth:`Background.forward` / :meth:`Background.backward`; use
    :func:`background_colour`."""

    @staticmethod
    def forward(ctx, params, origins, dirs, t0, bg):
        th, o, d, t = f32(params), f32(origins), f32(dirs), f32(t0)
        R, dev = o.shape[0], origins.device
        out = to_torch(bg.forward(o, d, t, th), R, dev, 3)
        ctx.save_for_backward(th, o, d, t)
        ctx.bg, ctx.token = bg, bg.forward_count
        ctx.dtypes = (params.dtype, origins.dtype, dirs.dtype, t0.dtype)
        return out

    @staticmethod
    def backward(ctx, g_out):
        th, o, d, t = ctx.saved_tensors
        bg, R, dev = ctx.bg, o.shape[0], o.device
        if bg.forward_count != ctx.token:  # another forward overwrote the background's activations
            bg.forward(o, d, t, th)
        g_params = torch.zeros_like(th) if ctx.needs_input_grad[0] else None
        g_o = torch.zeros((R, 3), dtype=torch.float32, device=dev)
        g_d = torch.zeros((R, 3), dtype=torch.float32, device=dev)
        g_t = torch.zeros((R,), dtype=torch.float32, device=dev)
        bg.backward(grad_or_zeros(g_out, (R, 3), dev), th, g_params, g_origins=g_o, g_dirs=g_d, g_t0=g_t)
        ctx.token = bg.forward_count
        tp, to_, td, tt = ctx.dtypes
        return None if g_params is None else g_params.to(tp), g_o.to(to_), g_d.to(td), g_t.to(tt), None


def sphere_exit(origins: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """(R,) distance along each ray to where it leaves the unit sphere, differentiable (0 for rays that miss
    it): the larger root of |d|²t² + 2(o·d)t + |o|² − 1 = 0, as :func:`unit_sphere_near_far`'s ``far``."""
    a = (directions * directions).sum(-1)
    b = (origins * directions).sum(-1)
    c = (origins * origins).sum(-1) - 1.0
    disc = b * b - a * c
    hit = disc > 0
    root = torch.sqrt(torch.where(hit, disc, torch.ones_like(disc)))
    return torch.where(hit, (root - b) / a, torch.zeros_like(disc))


def background_colour(bg, params: torch.Tensor, origins: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """(R, 3) colour of the background model ``bg`` (:class:`~taichi_neus.render.background.Background`) seen
    by rays leaving the unit sphere (NeRF++ / mip-NeRF 360 contraction, bin centres, no jitter).
    Differentiable in ``params`` (P,), ``origins`` and ``directions`` (R, 3): through the contracted sample
    positions, their spacings, the SH of the direction and the sphere exit where the samples start."""
    return BackgroundFunction.apply(params, origins, directions, sphere_exit(origins, directions), bg)


def composite(sdf, normal, rgb, delta, t, dirs, variance, ray_offsets, ray_counts, cos_anneal_ratio: float = 1.0,
              background=(0.0, 0.0, 0.0)):
    """NeuS compositing of packed samples (Wang et al. 2021; maths in :mod:`~taichi_neus.render.compositing`).

    Args:
        sdf: (S,) signed distance. Carries a gradient.
        normal: (S, 3) raw SDF gradient (not normalised). Carries a gradient.
        rgb: (S, 3) colour in [0, 1]. Carries a gradient.
        delta: (S,) interval length, unit-sphere units. No gradient.
        t: (S,) distance of the sample from the ray origin along ``dirs``. Carries a gradient (depth only).
        dirs: (R, 3) unit ray directions. Carries a gradient (through cosθ = d·n).
        variance: (1,) NeuS variance v, s = exp(10·v). Carries a gradient.
        ray_offsets, ray_counts: (R,) integer: ray r owns samples ``offsets[r] .. offsets[r]+counts[r]-1``.
        cos_anneal_ratio: r ∈ [0, 1] of the annealed cosine (1 after training).
        background: RGB blended behind each ray.

    Returns:
        colour (R, 3), opacity (R,) = Σw, depth (R,) = Σ w·t: float32 tensors. Samples no ray owns get
        zero gradient.
    """
    if sdf.shape[0] == 0:
        raise UserInputError("composite: no samples; pad with one sample that no ray owns (Taichi buffers "
                             "cannot be empty).")
    return CompositeFunction.apply(sdf, normal, rgb, delta, t, dirs, variance, ray_offsets, ray_counts,
                                   float(cos_anneal_ratio), tuple(float(c) for c in background))


@dataclass
class RaySamples:
    """Packed samples of a batch of rays (no gradient; torch tensors on the rays' device).

    ray_ids (S,) int64, t (S,) and delta (S,) float32 (unit-sphere units along the unit direction),
    ray_offsets, ray_counts (R,) int32. When no ray got a sample, S = 1: one sample no ray owns."""

    ray_ids: torch.Tensor
    t: torch.Tensor
    delta: torch.Tensor
    ray_offsets: torch.Tensor
    ray_counts: torch.Tensor


class Renderer:
    """A trained NeuS field ready for differentiable rendering of arbitrary rays.

    Args:
        field: the :class:`SDFField`.
        params: (P,) the flat parameter vector (a Taichi ndarray, a numpy array or a torch tensor); kept as
            ``self.params``, a float32 torch tensor on ``device`` (call ``requires_grad_()`` on it, or pass
            your own to :meth:`render_rays`).
        occupancy: the :class:`OccupancyGrid` of the trained run (where samples may go).
        variance_offset: index of the NeuS variance v in ``params``.
        coarse_step, max_coarse, n_fine: sampler settings (as in ``cfg.render``).
        eps: finite-difference step of the normals (the run's final ε).
        cos_anneal_ratio: 1 after training. background: RGB behind the surface. near: rays start at
        least this far from their origin.
        background_model: the run's :class:`~taichi_neus.render.background.Background` (trained without
            masks), or None; its colour is blended behind the surface, C = C_fg + (1 − O)·C_bg, and
            differentiated like the rest (:func:`background_colour`).
    """

    def __init__(self, field: SDFField, params, occupancy: OccupancyGrid, variance_offset: int, *,
                 coarse_step: float, max_coarse: int, n_fine: int, eps: float, cos_anneal_ratio: float = 1.0,
                 background=(0.0, 0.0, 0.0), near: float = 0.0, device="cpu", background_model=None):
        self.field = field
        self.bg = background_model
        if not isinstance(params, torch.Tensor):
            params = torch.from_numpy(np.asarray(params if isinstance(params, np.ndarray) else params.to_numpy(),
                                                 np.float32))
        self.params = params.detach().to(device=device, dtype=torch.float32).clone()
        self.sampler = RaySampler(occupancy, step=coarse_step, max_coarse=max_coarse, n_fine=n_fine)
        self.variance_offset = int(variance_offset)
        self.eps, self.cos_anneal_ratio = float(eps), float(cos_anneal_ratio)
        self.background = tuple(float(c) for c in background)
        self.near = float(near)

    @classmethod
    def from_trainer(cls, trainer, device="cpu") -> Renderer:
        """The renderer of a :class:`~taichi_neus.train.trainer.Trainer` (e.g. from ``app.results.load_run``):
        its parameters (copied), occupancy grid and render settings at its current step."""
        rc, sch = trainer.cfg.render, trainer.schedules(trainer.step)
        if "levels" in sch:  # coarse-to-fine hash grid: the levels on at this step (the field is shared)
            trainer.field.active_levels = sch["levels"]
        return cls(trainer.field, trainer.params, trainer.occupancy, trainer.var_slice.offset,
                   coarse_step=rc.coarse_step, max_coarse=rc.max_coarse, n_fine=rc.n_fine, eps=sch["eps"],
                   cos_anneal_ratio=sch["cos_anneal"], background=trainer._fg_background, near=rc.near,
                   device=device, background_model=getattr(trainer, "bg", None))

    def sample(self, origins: torch.Tensor, directions: torch.Tensor, params: torch.Tensor | None = None) -> RaySamples:
        """Place samples on rays ``origins``, ``directions`` (R, 3), unit-sphere coordinates, unit directions.
        No gradient: the sampler sees detached copies."""
        th = f32(self.params if params is None else params)
        o, d = f32(origins), f32(directions)
        dev = origins.device
        o_np, d_np = o.cpu().numpy(), d.cpu().numpy()
        near, far, _ = unit_sphere_near_far(o_np, d_np, min_near=self.near)
        v = float(th[self.variance_offset])
        inv_s = min(max(math.exp(10.0 * v), S_MIN), S_MAX)
        field = self.field
        smp = self.sampler.sample(o, d, torch.from_numpy(near).to(dev), torch.from_numpy(far).to(dev),
                                  lambda pts: field.sdf(pts, pts.shape[0], th), inv_s, perturb=False)
        S = smp.n_samples
        offs = torch.from_numpy(smp.ray_offsets.to_numpy()).to(dev)
        cnts = torch.from_numpy(smp.ray_counts.to_numpy()).to(dev)
        if S == 0:
            z = torch.zeros(1, dtype=torch.float32, device=dev)
            return RaySamples(torch.zeros(1, dtype=torch.int64, device=dev), z, z.clone(), offs, cnts)
        return RaySamples(torch.from_numpy(smp.ray_ids.to_numpy()[:S]).to(dev).long(),
                          torch.from_numpy(smp.t.to_numpy()[:S]).to(dev),
                          torch.from_numpy(smp.delta.to_numpy()[:S]).to(dev), offs, cnts)

    def render_samples(self, origins: torch.Tensor, directions: torch.Tensor, samples: RaySamples,
                       params: torch.Tensor | None = None) -> dict:
        """Render rays at given samples (``t``, ``δ`` held constant): differentiable in ``origins``,
        ``directions`` (R, 3) and ``params`` (P,) (default ``self.params``). Returns :meth:`render_rays`'s dict."""
        params = self.params if params is None else params
        rid = samples.ray_ids
        d_s = directions[rid]  # (S, 3) the view direction of every sample is its ray's
        pos = origins[rid] + samples.t[:, None].to(directions.dtype) * d_s  # (S, 3) x = o + t·d
        sdf, normal, rgb = field_forward(self.field, params, pos, d_s, eps=self.eps)
        var = params[self.variance_offset:self.variance_offset + 1]
        colour, opacity, depth = composite(sdf, normal, rgb, samples.delta, samples.t, directions, var,
                                           samples.ray_offsets, samples.ray_counts, self.cos_anneal_ratio,
                                           self.background)
        if self.bg is not None:  # C = C_fg + (1 − O)·C_bg: the background model beyond the unit sphere
            colour = colour + (1.0 - opacity)[:, None] * background_colour(self.bg, params, origins, directions)
        return {"colour": colour, "opacity": opacity, "depth": depth}

    def render_rays(self, origins: torch.Tensor, directions: torch.Tensor, params: torch.Tensor | None = None) -> dict:
        """Render rays differentiably.

        Args:
            origins: (R, 3) float tensor, ray origins, unit-sphere coordinates. Carries a gradient.
            directions: (R, 3) float tensor, unit directions. Carries a gradient.
            params: (P,) flat parameters (default ``self.params``). Carries a gradient.

        Returns:
            ``{"colour": (R, 3), "opacity": (R,), "depth": (R,)}`` float32 tensors; depth in unit-sphere
            units along the ray (Σ w·t). Samples are placed without gradient and held fixed (see the
            module docstring).
        """
        return self.render_samples(origins, directions, self.sample(origins, directions, params), params)
