"""Recover a perturbed camera pose by gradient descent through the differentiable renderer (iNeRF-style).

    taichi-neus train --out runs/demo --iters 1000      # the quick start's run
    python examples/refine_pose.py --run runs/demo      # view: the first held-out one

Loads the run's latest checkpoint, turns one camera by ``--rot`` degrees about a random axis through its
centre and moves it by ``--trans`` unit-sphere units, then recovers the pose with Adam on se(3)
(:mod:`taichi_neus.render.pose`; a robust Cauchy loss by default) against the view's photo
(``--target render``: against the field's own image at the true pose). Prints JSON: the initial and
final rotation error (degrees) and translation error (unit-sphere units).
"""

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from taichi_neus.errors import UserInputError


def render_at(ren, K, c2w, H: int, W: int) -> np.ndarray:
    """(H, W, 3) float32 image of the renderer's field seen by camera ``K``, ``c2w`` (no gradient)."""
    import torch

    from taichi_neus.render.pose import camera_dirs, pose_rays

    k = np.arange(H * W)
    o, d = pose_rays(torch.from_numpy(c2w), camera_dirs(K, np.stack([k % W + 0.5, k // W + 0.5], -1)))
    with torch.no_grad():
        return ren.render_rays(o.float(), d.float())["colour"].numpy().reshape(H, W, 3)


def run(args) -> dict:
    from taichi_neus.app.results import load_run
    from taichi_neus.render.pose import perturb_pose, pose_errors, refine_pose
    from taichi_neus.render.torch_ops import Renderer

    if not pathlib.Path(args.run).is_dir():
        raise UserInputError(f"run folder {args.run} does not exist; pass --run a folder that "
                             "'taichi-neus train --out' wrote.")
    _, scene, tr = load_run(args.run, arch=args.arch, log=lambda *a: None)
    view = int(scene.test_ids[0] if len(scene.test_ids) else scene.train_ids[0]) if args.view < 0 else args.view
    if not 0 <= view < scene.n_views:
        raise UserInputError(f"--view {view} is not a view of this run's scene (0..{scene.n_views - 1}).")
    ren = Renderer.from_trainer(tr)
    K = scene.K[view].astype(np.float64)
    c2w_true = scene.c2w[view].astype(np.float64)
    if args.target == "photo":
        img = scene.images[view].astype(np.float32) / 255.0
        if tr.use_masks:  # a masked run renders the object on its background colour (as the trainer's target)
            m = (scene.masks[view] > 127).astype(np.float32)[..., None]
            img = img * m + np.asarray(tr.cfg.render.background, np.float32) * (1 - m)
    else:  # the field's own image at the true pose: the pose that explains it exactly exists
        img = render_at(ren, K, c2w_true, scene.H, scene.W)
    c2w_init = perturb_pose(c2w_true, args.rot, args.trans, np.random.default_rng(args.seed))
    r0, t0 = pose_errors(c2w_init, c2w_true)
    start = time.time()
    res = refine_pose(ren, K, c2w_init, img, iters=args.iters, batch=args.batch, lr=args.lr, lr_final=args.lr_final,
                      seed=args.seed, loss=args.loss)
    r1, t1 = pose_errors(res["c2w"], c2w_true)
    # the part of the final centre error along the true optical axis (the direction a photo pins down least)
    axial = abs(float((res["c2w"][:3, 3] - c2w_true[:3, 3]) @ c2w_true[:3, 2]))
    return {"run": str(args.run), "view": view, "target": args.target, "image": [int(scene.H), int(scene.W)],
            "iters": args.iters, "batch": args.batch, "loss": args.loss, "seed": args.seed,
            "initial": {"rotation_deg": r0, "translation": t0},
            "final": {"rotation_deg": r1, "translation": t1, "translation_along_axis": axial},
            "loss_first": res["loss"][0], "loss_last": res["loss"][-1], "time_s": round(time.time() - start, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo", help="a run folder written by 'taichi-neus train'")
    ap.add_argument("--view", type=int, default=-1, help="view index (default: the first held-out view)")
    ap.add_argument("--rot", type=float, default=5.0, help="rotation perturbation, degrees")
    ap.add_argument("--trans", type=float, default=0.1, help="translation perturbation, unit-sphere units")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--batch", type=int, default=2048, help="random pixels per step")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--lr-final", type=float, default=5e-4)
    ap.add_argument("--target", choices=("photo", "render"), default="photo",
                    help="photo: the view's photograph; render: the field's own image at the true pose (separates "
                         "the optimisation from the field's errors)")
    ap.add_argument("--loss", choices=("cauchy", "l1", "l2"), default="cauchy",
                    help="photometric loss: robust Cauchy (default), l1, or l2 (iNeRF's squared error)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", default="cpu", help="cpu or cuda (torch tensors go to the kernels without copies)")
    args = ap.parse_args(argv)
    try:
        if args.iters < 1 or args.batch < 1:
            raise UserInputError("--iters and --batch must be positive.")
        print(json.dumps(run(args), indent=2))
        return 0
    except UserInputError as exc:
        print(f"refine_pose: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
