"""Camera poses refined jointly with the field during training (``--train.refine_poses``).

Each camera ``v`` gets a twist ξ_v ∈ R⁶ (rotation vector, translation) with the parametrisation of
:mod:`taichi_neus.render.pose` (:func:`~taichi_neus.render.pose.apply_twist`: about the object's centre,
along the camera's own axes); each step's update is folded into the pose and the twist
starts again at zero, so the linearisation follows the pose (Adam's moments carry over). The twists follow Adam on the
training loss itself, as in BARF (Lin et al., ICCV 2021) and NeRF−− (Wang et al. 2021); the coarse-to-fine
hash levels of the default recipe play BARF's coarse-to-fine positional encoding.

The gradient reaches ξ through the rays: a sample ``x = o + t·d`` (t held fixed, as in
:class:`~taichi_neus.render.torch_ops.Renderer`) passes ∂L/∂x to the ray's origin and ``t·∂L/∂x`` to its
direction; the direction also takes the colour network's view-direction gradient and the compositing's
``cosθ = d·n`` gradient. Per camera these reduce to ``G_o = Σ_r ∂L/∂o_r`` (3) and
``M = Σ_r ∂L/∂d_r ⊗ d_r^cam`` (3×3), and ``L ≈ ⟨G_o, C_v(ξ)⟩ + ⟨M, R_v(ξ)⟩`` has the same gradient in ξ
as the loss: torch differentiates that through the twist.

The whole set of poses and the field can move together (a similarity of the world) without changing
any image, and nothing holds that freedom here: on the built-in scene with 2° / 0.03 of noise per camera
the trained cameras drifted together by ~0.5° and ~1% in scale. Compare refined poses with true ones after
a similarity fit (:func:`taichi_neus.data.sfm.compare_cameras`). Two ways of holding the frame were tried
and measured worse there: mapping the refined centres back onto the given ones after every step (the
cameras and the field then fight over the frame: 22.3 dB held out against 29.7), and moving the held-out
cameras with the similarity fitted to the trained ones (26.5 dB against 28.5 with their given poses).
Held-out views keep their given poses.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch

from taichi_neus.render.pose import apply_twist, pose_errors


class PoseRefiner:
    """Twists of ``V`` cameras and their Adam state.

    Args:
        c2w0: (V, 4, 4) the given camera-to-world poses, unit-sphere coordinates (copied; float64).
        view_ids: the views that are refined (the training views); the others keep their given poses.
        lr: Adam learning rate of ξ (radians and unit-sphere units per step, at ``lr_scale`` 1).
    """

    def __init__(self, c2w0: np.ndarray, view_ids, lr: float):
        self.c2w0 = np.asarray(c2w0, np.float64)[:, :4, :4].copy()
        self.base = self.c2w0.copy()  # the refined poses; each step's twists start at zero about them
        V = len(self.c2w0)
        self.xi = torch.zeros(V, 6, dtype=torch.float64, requires_grad=True)
        self.lr = float(lr)
        self.opt = torch.optim.Adam([self.xi], lr=self.lr, betas=(0.9, 0.99), eps=1e-15)
        self._G_o = np.zeros((V, 3))
        self._M = np.zeros((V, 3, 3))
        self.refined = np.zeros(V, bool)
        self.refined[np.asarray(view_ids, np.int64)] = True

    def _poses(self, xi: torch.Tensor) -> torch.Tensor:
        return apply_twist(xi, torch.from_numpy(self.base))

    def poses(self) -> np.ndarray:
        """(V, 4, 4) float64 current camera-to-world poses."""
        return self.base.copy()

    def accumulate(self, vids: np.ndarray, dirs: np.ndarray, g_o: np.ndarray, g_d: np.ndarray) -> None:
        """Add one batch's ray gradients: ``vids`` (B,) camera of each ray, ``dirs`` (B, 3) its world
        direction at the current pose, ``g_o``, ``g_d`` (B, 3) ∂L/∂origin and ∂L/∂direction."""
        R = self.base[vids, :3, :3]  # (B, 3, 3)
        d_cam = np.einsum("bji,bj->bi", R, np.asarray(dirs, np.float64))  # Rᵀ·d
        np.add.at(self._G_o, vids, g_o)
        np.add.at(self._M, vids, np.asarray(g_d, np.float64)[:, :, None] * d_cam[:, None, :])

    def twist_gradient(self, G_o: np.ndarray, M: np.ndarray) -> torch.Tensor:
        """(V, 6) ∂L/∂ξ at ξ = 0 from the per-camera reductions ``G_o`` (V, 3) and ``M`` (V, 3, 3)."""
        xi = torch.zeros_like(self.xi, requires_grad=True)
        P = self._poses(xi)
        surrogate = (P[:, :3, 3] * torch.from_numpy(G_o)).sum() + (P[:, :3, :3] * torch.from_numpy(M)).sum()
        (grad,) = torch.autograd.grad(surrogate, xi)
        return grad

    def clear(self) -> None:
        """Drop the accumulated gradients (a rejected step)."""
        self._G_o[:] = 0.0
        self._M[:] = 0.0

    def step(self, lr_scale: float) -> bool:
        """One Adam step of the twists on the accumulated gradients (then cleared), folded into the poses
        (the next step's twists start at zero about them). False, with nothing changed, when the gradients
        are not finite."""
        G_o, M = self._G_o, self._M
        self._G_o, self._M = np.zeros_like(G_o), np.zeros_like(M)
        if not (np.isfinite(G_o).all() and np.isfinite(M).all()):
            return False
        self.opt.zero_grad()
        self.xi.grad = self.twist_gradient(G_o, M)
        for g in self.opt.param_groups:
            g["lr"] = self.lr * lr_scale
        self.opt.step()
        with torch.no_grad():
            new = self._poses(self.xi).numpy()
            self.xi.zero_()
        ids = self.refined
        U, _, Vt = np.linalg.svd(new[ids, :3, :3])  # keep the rotations orthonormal to rounding
        new[ids, :3, :3] = U @ Vt
        self.base[ids] = new[ids]
        return True

    def changes(self) -> tuple[np.ndarray, np.ndarray]:
        """(V,) rotation (degrees) and (V,) camera-centre distance (unit-sphere units) of each refined
        pose from its given one."""
        P, P0 = self.base, self.c2w0
        errs = np.array([pose_errors(P[v], P0[v]) for v in range(len(P))])
        return errs[:, 0], errs[:, 1]

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        st = self.opt.state.get(self.xi, {})
        z = np.zeros(tuple(self.xi.shape))
        return {"c2w": self.base.copy(), "m": st["exp_avg"].numpy().copy() if st else z,
                "v": st["exp_avg_sq"].numpy().copy() if st else z.copy(),
                "step": np.float64(float(st["step"]) if st else 0.0)}

    def check_state_dict(self, st: dict) -> None:
        """Raise ValueError, changing nothing, when ``st`` is not a :meth:`state_dict` of these cameras."""
        missing = [k for k in ("c2w", "m", "v", "step") if k not in st]
        if missing:
            raise ValueError(f"pose state without {', '.join(missing)}")
        c2w = np.asarray(st["c2w"], np.float64)
        if c2w.shape != self.base.shape or not np.isfinite(c2w).all():
            raise ValueError(f"refined poses of shape {c2w.shape} (expected {self.base.shape}) or not finite")

    def load_state_dict(self, st: dict) -> None:
        self.check_state_dict(st)
        self.base = np.asarray(st["c2w"], np.float64).copy()
        if float(st["step"]) > 0:
            self.opt.state[self.xi] = {"step": torch.tensor(float(st["step"])),
                                       "exp_avg": torch.from_numpy(np.asarray(st["m"], np.float64).copy()),
                                       "exp_avg_sq": torch.from_numpy(np.asarray(st["v"], np.float64).copy())}

    def write(self, path, view_names=None) -> None:
        """JSON of every camera's given and refined camera-to-world and the change between them."""
        P, P0 = self.base, self.c2w0
        rot, trans = self.changes()
        cams = [{"view": int(v), **({"name": str(view_names[v])} if view_names is not None else {}),
                 "c2w_given": P0[v].tolist(), "c2w_refined": P[v].tolist(),
                 "rotation_change_deg": float(rot[v]), "translation_change": float(trans[v])}
                for v in range(len(P))]
        summary = {"mean_rotation_change_deg": float(rot.mean()), "max_rotation_change_deg": float(rot.max()),
                   "mean_translation_change": float(trans.mean()), "max_translation_change": float(trans.max())}
        pathlib.Path(path).write_text(json.dumps({**summary, "cameras": cams}, indent=1))
