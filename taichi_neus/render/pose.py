"""Camera pose refinement through the differentiable renderer (iNeRF, Yen-Chen et al., IROS 2021).

A camera-to-world pose ``c2w = [R | C]`` (unit-sphere coordinates, OpenCV axes) is updated on the
se(3) manifold, as iNeRF does: ``c2w(ξ) = A·exp(ξ^)·A⁻¹·c2w₀`` with ξ = (ω, ν) ∈ R⁶ (rotation vector,
translation) starting at zero and ``A = [R₀ | 0]``: the twist acts about the world origin (the centre of
the unit sphere, i.e. of the object), expressed along the initial camera's axes. ξ follows Adam on the
photometric loss ``mean |render(rays(c2w(ξ))) − photo|²`` over random pixel batches; the gradient reaches
ξ through the rays' origins and directions (:meth:`~taichi_neus.render.torch_ops.Renderer.render_rays`;
sample distances held fixed).

Why these coordinates: a photo constrains some motions far less than others — orbiting the object
(it turns by a fraction of a pixel) and moving along the optical axis (it grows by ~1 %) — and with ξ
about the object's centre along the camera's axes each of them is one coordinate (ω_x, ω_y; ν_z), so
Adam's per-coordinate step sizes reach them. About the camera's centre, an orbit mixes ω and ν in the
ratio of the object's distance (a diagonal valley for per-coordinate steps); along world axes the depth
direction mixes all three ν. How close a photo brings the pose is bounded by the field's own errors: the
photometric loss has its minimum where the field's image best matches the photo, not necessarily at the
true pose (``examples/refine_pose.py --target render`` measures the optimisation alone).

The loss is robust by default: the Cauchy (Lorentzian) ``ρ(r) = log(1 + r²/c²)`` per colour channel,
``c`` = :data:`ROBUST_SCALE` (Barron, "A General and Adaptive Robust Loss Function", CVPR 2019: α = 0).
A well-trained field's errors against a photo are heavy-tailed (texture it has not learnt, silhouette
pixels), and under a squared loss those few large residuals pull the pose to where they shrink. On the
quick start's run, 5° / 0.1 came back to 0.30–0.32° / 0.017–0.019 under the squared loss and
0.19–0.20° / 0.0085–0.0105 under this one (three perturbations; ``benchmarks/results/refine_pose_demo.json``).
On a weak field (~18 dB) every residual is large and the robust loss ignores the ones the misalignment
causes: use ``loss="l2"`` there (5° came back to 2.0° under l2, 3.2° under Cauchy; annealing ``c`` from
1 down to 0.03 did no better there, nor on the quick start's run).
"""

from __future__ import annotations

import math

import numpy as np
import torch

ROBUST_SCALE = 0.03  # colour units (0..1): about a trained field's RMS error against its photos (~30 dB)
LOSSES = ("cauchy", "l1", "l2")


def photometric_loss(residual: torch.Tensor, kind: str = "cauchy", scale: float = ROBUST_SCALE) -> torch.Tensor:
    """Mean over the (B, 3) colour residuals of ``kind``: ``"cauchy"`` log(1 + (r/scale)²), ``"l1"`` |r|,
    ``"l2"`` r² (iNeRF's). A scalar tensor, differentiable in ``residual``."""
    if kind == "cauchy":
        return torch.log1p((residual / scale).square()).mean()
    if kind == "l1":
        return residual.abs().mean()
    if kind == "l2":
        return residual.square().mean()
    raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")


def _hat(w: torch.Tensor) -> torch.Tensor:
    """(..., 3) → (..., 3, 3) cross-product matrices."""
    z = torch.zeros_like(w[..., 0])
    x, y, c = w[..., 0], w[..., 1], w[..., 2]
    return torch.stack([torch.stack([z, -c, y], -1), torch.stack([c, z, -x], -1),
                        torch.stack([-y, x, z], -1)], -2)


def se3_exp(xi: torch.Tensor) -> torch.Tensor:
    """(..., 6) ξ = (ω, ν) → (..., 4, 4) rigid transforms exp(ξ^) (Rodrigues; V-matrix for the translation).

    Differentiable at ξ = 0: the series are used below θ = 1e-4 rad."""
    w, v = xi[..., :3], xi[..., 3:]
    th2 = (w * w).sum(-1)[..., None, None]
    th = torch.sqrt(th2 + 1e-30)
    W = _hat(w)
    W2 = W @ W
    small = th < 1e-4
    a = torch.where(small, 1 - th2 / 6, torch.sin(th) / th)
    b = torch.where(small, 0.5 - th2 / 24, (1 - torch.cos(th)) / (th2 + 1e-30))
    c = torch.where(small, 1.0 / 6 - th2 / 120, (th - torch.sin(th)) / (th2 * th + 1e-30))
    eye = torch.eye(3, dtype=xi.dtype, device=xi.device).expand(W.shape)
    R = eye + a * W + b * W2
    t = ((eye + b * W + c * W2) @ v[..., None])
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=xi.dtype, device=xi.device).expand(*W.shape[:-2], 1, 4)
    return torch.cat([torch.cat([R, t], -1), bottom], -2)


def apply_twist(xi: torch.Tensor, c2w: torch.Tensor) -> torch.Tensor:
    """``A·exp(ξ^)·A⁻¹·c2w`` with ``A = [R | 0]`` (the module docstring's twist about the world origin along
    the camera's axes) for (..., 6) ξ and (..., 4, 4) float64 ``c2w``, multiplied out as
    ``[R·E | R·(E·Rᵀ·C + τ)]`` for ``exp(ξ^) = [E | τ]``: no ``Rᵀ·R`` product, whose rounding would compound
    when the result becomes the next ``c2w``. Differentiable in ξ."""
    R, C = c2w[..., :3, :3], c2w[..., :3, 3:]
    T = se3_exp(xi)
    E, tau = T[..., :3, :3], T[..., :3, 3:]
    top = torch.cat([R @ E, R @ (E @ (R.transpose(-1, -2) @ C) + tau)], -1)
    return torch.cat([top, c2w[..., 3:, :]], -2)


def camera_dirs(K: np.ndarray, pix: np.ndarray) -> torch.Tensor:
    """(B, 3) float64 unit directions in the camera frame through pixel positions ``pix`` (B, 2) (x, y)."""
    K = np.asarray(K, np.float64)
    fx, fy, skew, cx, cy = K[0, 0], K[1, 1], K[0, 1], K[0, 2], K[1, 2]
    yc = (pix[:, 1] - cy) / fy
    xc = (pix[:, 0] - cx - skew * yc) / fx
    d = np.stack([xc, yc, np.ones_like(xc)], -1)
    return torch.from_numpy(d / np.linalg.norm(d, axis=1, keepdims=True))


def pose_rays(c2w: torch.Tensor, d_cam: torch.Tensor):
    """World rays of camera ``c2w`` (4, 4): origins (B, 3) and unit directions (B, 3), differentiable in c2w."""
    d = d_cam @ c2w[:3, :3].T
    return c2w[:3, 3].expand(d.shape[0], 3), d


def pose_errors(c2w: np.ndarray, c2w_ref: np.ndarray) -> tuple[float, float]:
    """(rotation error in degrees, camera-centre distance in unit-sphere units) between two poses."""
    R = np.asarray(c2w, np.float64)[:3, :3].T @ np.asarray(c2w_ref, np.float64)[:3, :3]
    ang = math.degrees(math.acos(min(1.0, max(-1.0, (np.trace(R) - 1) / 2))))
    return ang, float(np.linalg.norm(np.asarray(c2w, np.float64)[:3, 3] - np.asarray(c2w_ref, np.float64)[:3, 3]))


def perturb_pose(c2w: np.ndarray, rot_deg: float, trans: float, rng: np.random.Generator) -> np.ndarray:
    """``c2w`` turned by ``rot_deg`` degrees about a random axis through its centre and moved by ``trans``
    in a random direction: pose_errors(result, c2w) == (rot_deg, trans)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    shift = rng.normal(size=3)
    shift /= np.linalg.norm(shift)
    w = torch.from_numpy(axis * math.radians(rot_deg))
    dR = se3_exp(torch.cat([w, torch.zeros(3, dtype=w.dtype)])).numpy()[:3, :3]
    out = np.asarray(c2w, np.float64).copy()
    out[:3, :3] = out[:3, :3] @ dR
    out[:3, 3] += trans * shift
    return out


def refine_pose(renderer, K: np.ndarray, c2w_init: np.ndarray, image: np.ndarray, iters: int = 200,
                batch: int = 2048, lr: float = 1e-2, lr_final: float = 1e-3, seed: int = 0, log=None,
                loss: str = "cauchy") -> dict:
    """Recover a camera pose by gradient descent on the photometric loss through ``renderer``.

    Args:
        renderer: :class:`~taichi_neus.render.torch_ops.Renderer` of a trained field (its parameters are
            not changed).
        K: (3, 3) intrinsics of ``image``, pixels. c2w_init: (4, 4) starting camera-to-world.
        image: (H, W, 3) float in [0, 1], the photo the pose should explain (what the renderer's field
            should show there: with a masked run, the object on the run's background colour).
        iters: Adam steps; batch: random pixels per step (all of them when the image has fewer);
        lr → lr_final: learning rate of ξ, log-linear decay; loss: :func:`photometric_loss`'s kind.

    Returns:
        ``{"c2w": (4, 4) float64, "loss": [per-step loss]}``.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    H, W = image.shape[:2]
    rng = np.random.default_rng(seed)
    target_all = torch.from_numpy(np.asarray(image, np.float32).reshape(-1, 3))
    c2w0 = torch.from_numpy(np.asarray(c2w_init, np.float64))

    def pose(x):
        return apply_twist(x, c2w0)

    xi = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([xi], lr=lr)
    losses = []
    for it in range(iters):
        for g in opt.param_groups:
            g["lr"] = lr * (lr_final / lr) ** (it / max(iters - 1, 1))
        k = rng.choice(H * W, size=min(batch, H * W), replace=False)
        pix = np.stack([k % W + 0.5, k // W + 0.5], -1)
        c2w = pose(xi)
        o, d = pose_rays(c2w, camera_dirs(K, pix))
        out = renderer.render_rays(o.float(), d.float())
        value = photometric_loss(out["colour"] - target_all[torch.from_numpy(k)], loss)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
        if log is not None and (it % 20 == 0 or it == iters - 1):
            log(it, losses[-1], pose(xi.detach()).numpy())
    with torch.no_grad():
        final = pose(xi).numpy()
    return {"c2w": final, "loss": losses}
