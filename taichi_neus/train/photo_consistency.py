"""Multi-view photometric consistency of the rendered surface, a patch NCC loss.

Geo-NeuS (Fu et al., "Geo-Neus: Geometry-Consistent Neural Implicit Surfaces Learning for Multi-view
Reconstruction", NeurIPS 2022, §3.3) supervises the surface itself with the photos: a small patch
around a training pixel is assumed to lie on the plane through the surface point with the surface's
normal; that plane maps the patch into nearby views (a plane-induced homography, Hartley & Zisserman
§13.1), and where the surface is right the warped patches look alike. Normalised cross-correlation
(NCC) makes the comparison blind to gain and offset between views. The colour loss learns the same
geometry only through the colour network, which can also explain an image by painting a wrong surface;
this term pulls the surface to where the views agree, which is what texture-rich concave regions
(DTU's courtyards and roofs) need early in a short run.

For a ray ``r`` from camera centre ``o`` along the unit direction ``d`` with rendered depth ``D = Σ w·t`` and
opacity ``O = Σ w`` (NeuS compositing), the surface point is ``x = o + (D / O)·d`` and the plane normal ``n``
is the weight-composited SDF gradient, normalised. By default it is held fixed: the gradient flows through the
depth only, moving the surface along the ray. With ``normal_grad`` it flows into the normal too, turning the
surface's plane toward the one on which the views agree (what a lumpy surface gets wrong is its orientation).
Each pixel ``q`` of the ``(2ρ+1)²`` patch centred on the ray's pixel is cast from the same camera (``d_q ∝
R·K⁻¹·[q, 1]``), meets the plane at ``X_q = o + d_q·n·(x − o) / n·d_q`` and is projected into each source view
``s`` (``K_s·(R_s·X_q + t_s)``, bilinear lookup in the source's grey image). Per source, ``c_s = (1 − NCC(a,
b_s)) / 2 ∈ [0, 1]`` compares the reference patch ``a`` with the warped one ``b_s``; per ray the ``n_best``
lowest costs are averaged (sources that see the point occluded or at a grazing angle rarely agree, so the best
ones are the visible ones; Geo-NeuS and classical MVS, e.g. Schönberger et al. 2016, do the same). The loss is
``weight`` × the mean of that over the rays it applies to. A ray counts when its patch has texture (grey-level
standard deviation ≥ ``min_std``; NCC is noise on a flat patch), its opacity is at least ½, its surface faces
its camera (``n·d ≤ −min_cos``) and at least ``n_best`` sources see the whole warped patch in front of them.

The sources of a view are the ``n_sources`` other training views whose optical axes are closest in
angle to its own (held-out views are never used, so no held-out photo reaches training).

Two entry points, as :mod:`taichi_neus.train.s3im`: :meth:`PhotoConsistency.loss` (torch in, a
differentiable scalar out) and :meth:`PhotoConsistency.loss_and_grad` (numpy in, the loss and its
gradients with respect to the rendered depth and opacity out, for the Taichi trainer, which adds
them to the compositor's ∂L/∂depth and ∂L/∂opacity).
"""

from __future__ import annotations

import numpy as np
import torch

from taichi_neus.errors import UserInputError

__all__ = ["PhotoConsistency", "check_views", "nearest_views"]

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # Rec. 601 grey levels


def check_views(n_train: int, n_sources: int) -> None:
    """Refuse (UserInputError) a scene with fewer than ``n_sources + 1`` training views."""
    if n_train < n_sources + 1:
        raise UserInputError(f"photo consistency needs at least {n_sources + 1} training views "
                             f"(--train.photo_sources {n_sources} plus the reference) and this scene has {n_train}; "
                             "lower --train.photo_sources or leave --train.photo_weight at 0.")


def nearest_views(c2w: np.ndarray, candidates: np.ndarray, n: int) -> np.ndarray:
    """(V, n) int64: for every view, the ``n`` views among ``candidates`` (itself excluded) whose
    optical axes (camera +z in world coordinates) make the smallest angle with its own, nearest first.

    c2w: (V, 4, 4) camera-to-world, OpenCV axes. candidates: (C,) view indices, C > n."""
    axes = np.asarray(c2w, np.float64)[:, :3, 2]
    axes = axes / np.linalg.norm(axes, axis=1, keepdims=True)
    cand = np.asarray(candidates, np.int64)
    cos = axes @ axes[cand].T  # (V, C)
    cos[cand[None, :] == np.arange(len(axes))[:, None]] = -np.inf  # never a view's own source
    order = np.argsort(-cos, axis=1, kind="stable")[:, :n]
    return cand[order]


class PhotoConsistency:
    """Patch NCC between a training view and its nearest views, warped by the rendered surface's plane
    (Geo-NeuS, Fu et al. 2022).

    Args:
        images: (V, H, W, 3) uint8 RGB photos of the scene (all views; only sources in ``train_ids`` are read
            besides the reference views the batch comes from).
        K: (V, 3, 3) intrinsics, pixels (pixel (i, j) centred at (i + 0.5, j + 0.5)).
        c2w: (V, 4, 4) camera-to-world at construction, for choosing the sources; the poses used for the
            warp are passed with each call (they may be refined during training).
        train_ids: (V_train,) the views that may serve as sources.
        weight: λ of the loss.
        radius: ρ, the patch is (2ρ + 1)² training pixels.
        n_sources: nearby views each reference is compared with.
        n_best: per ray, the mean of this many lowest costs.
        min_std: least grey-level standard deviation (in [0, 1]) of a reference patch that counts.
        min_cos: a ray counts where its surface normal satisfies n·d ≤ −min_cos.
        normal_grad: whether the loss's gradient flows into the normals too (else they are held fixed).
    """

    def __init__(self, images: np.ndarray, K: np.ndarray, c2w: np.ndarray, train_ids: np.ndarray, *,
                 weight: float = 0.1, radius: int = 3, n_sources: int = 4, n_best: int = 2,
                 min_std: float = 0.02, min_cos: float = 0.1, normal_grad: bool = False):
        train_ids = np.asarray(train_ids, np.int64)
        if n_best > n_sources:
            raise UserInputError(f"photo consistency: --train.photo_best ({n_best}) must not exceed "
                                 f"--train.photo_sources ({n_sources}).")
        check_views(len(train_ids), n_sources)
        V, H, W, _ = images.shape
        self.H, self.W = int(H), int(W)
        self.weight, self.radius, self.n_best = float(weight), int(radius), int(n_best)
        self.min_std, self.min_cos = float(min_std), float(min_cos)
        self.normal_grad = bool(normal_grad)
        grey = (np.asarray(images, np.float32) @ _LUMA) / 255.0  # (V, H, W)
        self.grey = torch.from_numpy(np.ascontiguousarray(grey, np.float32)).reshape(-1)
        self.K = torch.from_numpy(np.asarray(K, np.float64))
        self.Kinv = torch.linalg.inv(self.K)  # (V, 3, 3): the intrinsics do not change while training
        self.sources = torch.from_numpy(nearest_views(c2w, train_ids, n_sources))
        r = torch.arange(-self.radius, self.radius + 1, dtype=torch.float64)
        oy, ox = torch.meshgrid(r, r, indexing="ij")
        self.offsets = torch.stack([ox.reshape(-1), oy.reshape(-1)], dim=-1)  # (P, 2) pixels (x, y)

    # --------------------------------------------------------------------------------- helpers
    def _bilinear(self, view: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
        """Grey levels of ``view`` (any shape, int64) at continuous pixel positions ``uv`` (same shape + (2,),
        pixel centres at i + 0.5), bilinear, clamped to the image; differentiable with respect to ``uv``."""
        x = uv[..., 0] - 0.5
        y = uv[..., 1] - 0.5
        x0 = torch.clamp(torch.floor(x.detach()), 0, self.W - 2)
        y0 = torch.clamp(torch.floor(y.detach()), 0, self.H - 2)
        fx = torch.clamp(x - x0, 0.0, 1.0)
        fy = torch.clamp(y - y0, 0.0, 1.0)
        base = view * (self.H * self.W) + y0.long() * self.W + x0.long()
        g = self.grey.to(uv.dtype)
        v00, v01 = g[base], g[base + 1]
        v10, v11 = g[base + self.W], g[base + self.W + 1]
        top = v00 + (v01 - v00) * fx
        bot = v10 + (v11 - v10) * fx
        return top + (bot - top) * fy

    def _in_image(self, uv: torch.Tensor) -> torch.Tensor:
        """Whether every pixel centre of a patch (``uv`` (..., P, 2)) lies in the image: (...,) bool."""
        x, y = uv[..., 0], uv[..., 1]
        return ((x >= 0.5) & (x <= self.W - 0.5) & (y >= 0.5) & (y <= self.H - 0.5)).all(-1)

    @staticmethod
    def _ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """NCC over the last axis of two equal-shaped patch stacks."""
        a = a - a.mean(dim=-1, keepdim=True)
        b = b - b.mean(dim=-1, keepdim=True)
        return (a * b).sum(-1) / torch.sqrt((a * a).sum(-1) * (b * b).sum(-1) + 1e-10)

    # ------------------------------------------------------------------------------------ loss
    def loss(self, vids, pix, origins, dirs, depth: torch.Tensor, opacity: torch.Tensor, normals,
             c2w, valid=None) -> tuple[torch.Tensor, int]:
        """The weighted loss over the rays it applies to, and how many rays that is.

        vids (R,) int view of each ray; pix (R, 2) its continuous pixel position; origins, dirs (R, 3) its
        camera centre and unit direction (unit-sphere units); depth (R,) rendered Σ w·t and opacity (R,)
        Σ w, float torch tensors that may carry gradients; normals (R, 3) composited SDF gradients (not
        necessarily unit; a tensor that carries gradients when ``normal_grad``, else held fixed); c2w
        (V, 4, 4) the current camera-to-world; valid (R,) bool, rays that may count (e.g. inside the mask),
        or None for all.
        Returns ``(loss, n_rays)`` with loss a 0-d tensor (0 when no ray counts)."""
        dt = depth.dtype
        as_t = lambda a: torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a)  # noqa: E731
        vids = as_t(vids).long()
        pix, o, d = as_t(pix).to(dt), as_t(origins).to(dt), as_t(dirs).to(dt)
        n = as_t(normals).to(dt)
        if not self.normal_grad:
            n = n.detach()
        n = n / torch.clamp(torch.linalg.norm(n, dim=-1, keepdim=True), min=1e-12)
        c2w = as_t(c2w).to(dt)
        keep = (n.detach() * d).sum(-1) <= -self.min_cos
        keep &= opacity.detach() >= 0.5  # a half-formed surface is not one yet
        if valid is not None:
            keep &= as_t(valid).bool()
        # reference patches, and only the textured ones
        q = pix[:, None, :] + self.offsets.to(dt)[None]  # (R, P, 2)
        a = self._bilinear(vids[:, None].expand(q.shape[:2]), q)  # (R, P)
        keep &= self._in_image(q) & (a.std(dim=-1, unbiased=False) >= self.min_std)
        idx = torch.nonzero(keep).reshape(-1)
        zero = depth.sum() * 0.0
        if len(idx) == 0:
            return zero, 0
        vids, q, a, o, d, n = vids[idx], q[idx], a[idx], o[idx], d[idx], n[idx]
        x = o + (depth[idx] / opacity[idx])[:, None] * d  # the surface point (R', 3)
        # every patch pixel's ray from the same camera, d ∝ R·K⁻¹·[q, 1] (as data/rays.pixel_rays, unnormalised
        # and in torch, which saves a round trip through numpy per step), to the plane (x, n)
        qh = torch.cat([q, torch.ones_like(q[..., :1])], dim=-1)  # (R', P, 3)
        cam = torch.einsum("rij,rpj->rpi", self.Kinv.to(dt)[vids], qh)
        dq = torch.einsum("rij,rpj->rpi", c2w[vids][:, :3, :3], cam)
        num = (n * (x - o)).sum(-1, keepdim=True)  # (R', 1)
        den = (dq * n[:, None, :]).sum(-1)  # (R', P)
        den = torch.where(den.abs() < 1e-6, torch.full_like(den, -1e-6), den)
        X = o[:, None, :] + dq * (num / den)[..., None]  # (R', P, 3)
        # into every source view
        src = self.sources[vids]  # (R', S)
        w2c = torch.linalg.inv(c2w)[src]  # (R', S, 4, 4)
        Xc = torch.einsum("rsij,rpj->rspi", w2c[..., :3, :3], X) + w2c[:, :, None, :3, 3]
        z = Xc[..., 2]
        ok = (z > 1e-6).all(-1)  # (R', S)
        uvw = torch.einsum("rsij,rspj->rspi", self.K.to(dt)[src], Xc)
        uv = uvw[..., :2] / torch.clamp(z, min=1e-6)[..., None]
        ok &= self._in_image(uv)
        b = self._bilinear(src[:, :, None].expand(uv.shape[:3]), uv)  # (R', S, P)
        cost = (1.0 - self._ncc(a[:, None, :].expand_as(b), b)) * 0.5  # (R', S)
        cost = torch.where(ok, cost, torch.full_like(cost, float("inf")))
        best = torch.topk(cost, self.n_best, dim=-1, largest=False).values  # (R', n_best)
        counted = torch.isfinite(best).all(-1)
        if not bool(counted.any()):
            return zero, 0
        per_ray = best[counted].mean(-1)
        return self.weight * per_ray.mean(), int(counted.sum())

    def loss_and_grad(self, vids: np.ndarray, pix: np.ndarray, origins: np.ndarray, dirs: np.ndarray,
                      depth: np.ndarray, opacity: np.ndarray, normals: np.ndarray, c2w: np.ndarray,
                      valid: np.ndarray | None = None
                      ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray | None, int]:
        """:meth:`loss` on host arrays: ``(loss, ∂loss/∂depth (R,), ∂loss/∂opacity (R,), ∂loss/∂normals
        (R, 3) or None, n_rays)``, the gradients float32 (zero for the rays that do not count; the normals'
        only with ``normal_grad``, with respect to the raw composited gradients passed in), computed in
        float32 (float64 cost a quarter more time per step for nothing the gradient needs)."""
        D = torch.tensor(np.asarray(depth, np.float32), requires_grad=True)
        O = torch.tensor(np.asarray(opacity, np.float32), requires_grad=True)
        N = torch.tensor(np.asarray(normals, np.float32), requires_grad=self.normal_grad)
        loss, n = self.loss(vids, pix, origins, dirs, D, O, N, c2w, valid)
        if n == 0:
            z = np.zeros(len(D), np.float32)
            return 0.0, z, z.copy(), (np.zeros((len(D), 3), np.float32) if self.normal_grad else None), 0
        grads = torch.autograd.grad(loss, (D, O, N) if self.normal_grad else (D, O))
        gD, gO = (g.numpy().astype(np.float32) for g in grads[:2])
        gN = grads[2].numpy().astype(np.float32) if self.normal_grad else None
        return float(loss.detach()), gD, gO, gN, n
