"""Render PLY meshes to a PNG from one of the scene's cameras (flat shading, numpy only).

    python examples/render_mesh.py --mesh runs/scan24/mesh_002800.ply --data ../shared/data/dtu_scan24 \
        --view 0 --downscale 4 --out mesh.png

The photograph, then each ``--mesh`` (several may be given, e.g. a masked and an unmasked run),
side by side. Rasterisation: :mod:`taichi_neus.export.mesh_raster`.
"""

import argparse
import sys

import imageio.v2 as imageio
import numpy as np

from taichi_neus.data import load_dtu
from taichi_neus.errors import UserInputError
from taichi_neus.export.mesh import Mesh
from taichi_neus.export.mesh_raster import rasterize, shaded_image


def render(mesh: Mesh, K: np.ndarray, c2w: np.ndarray, scale_mat: np.ndarray, H: int, W: int, splats: int = 6):
    """Flat-shaded render (H, W, 3) uint8 of a world-space mesh seen by a unit-sphere camera."""
    _, shade = rasterize(mesh, K, c2w, scale_mat, H, W, splats)
    return shaded_image(shade)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mesh", required=True, nargs="+", help="one or more PLY meshes, drawn left to right")
    ap.add_argument("--data", default="")
    ap.add_argument("--view", type=int, default=0)
    ap.add_argument("--downscale", type=int, default=4)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        from taichi_neus.data import default_scene_path
        scene = load_dtu(args.data or default_scene_path(), downscale=args.downscale, holdout_every=0)
        if not 0 <= args.view < scene.n_views:
            raise UserInputError(f"--view {args.view} is not a view of {scene.path} (0..{scene.n_views - 1}).")
        imgs = [scene.images[args.view]]
        for path in args.mesh:
            imgs.append(render(Mesh.load(path), scene.K[args.view].astype(np.float64),
                               scene.c2w[args.view].astype(np.float64), scene.scale_mat, scene.H, scene.W))
        imageio.imwrite(args.out, np.concatenate(imgs, axis=1))
        print(f"wrote {args.out}")
        return 0
    except UserInputError as exc:
        print(f"render_mesh: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
