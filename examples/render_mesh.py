"""Render a PLY mesh to a PNG from one of the scene's cameras (flat shading, numpy only).

    python examples/render_mesh.py --mesh runs/scan24/mesh_002800.ply --data ../shared/data/dtu_scan24 \
        --view 0 --downscale 4 --out mesh.png

Triangles are splatted at several barycentric points into a z-buffer, which is exact enough for a
preview when triangles cover about a pixel (marching-cubes meshes seen at training resolution).
"""

import argparse
import sys

import imageio.v2 as imageio
import numpy as np

from taichi_neus.data import load_dtu
from taichi_neus.errors import UserInputError
from taichi_neus.mesh import Mesh


def render(mesh: Mesh, K: np.ndarray, c2w: np.ndarray, scale_mat: np.ndarray, H: int, W: int, splats: int = 6):
    """Flat-shaded render (H, W, 3) uint8 of a world-space mesh seen by a unit-sphere camera."""
    inv = np.linalg.inv(scale_mat)
    v = mesh.vertices.astype(np.float64) @ inv[:3, :3].T + inv[:3, 3]  # world -> unit sphere
    w2c = np.linalg.inv(c2w)
    vc = v @ w2c[:3, :3].T + w2c[:3, 3]
    tri = vc[mesh.faces]  # (F, 3, 3) camera coordinates
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    centre = tri.mean(1)
    view = -centre / np.maximum(np.linalg.norm(centre, axis=1, keepdims=True), 1e-12)
    shade = np.abs((n * view).sum(1)) * 0.8 + 0.2
    g = np.linspace(0.0, 1.0, splats)
    a, b = np.meshgrid(g, g, indexing="ij")
    keep = (a + b) <= 1.0
    bary = np.stack([1 - a[keep] - b[keep], a[keep], b[keep]], 1)  # (P, 3)
    pts = np.einsum("pk,fkc->fpc", bary, tri).reshape(-1, 3)
    fid = np.repeat(np.arange(len(tri)), bary.shape[0])
    z = pts[:, 2]
    ok = z > 1e-6
    uv = pts[ok] @ K.T
    x = (uv[:, 0] / uv[:, 2]).astype(np.int64)
    y = (uv[:, 1] / uv[:, 2]).astype(np.int64)
    inside = (x >= 0) & (x < W) & (y >= 0) & (y < H)
    pix = y[inside] * W + x[inside]
    zz, ff = z[ok][inside], fid[ok][inside]
    order = np.lexsort((zz, pix))  # per pixel, nearest first
    pix, ff = pix[order], ff[order]
    first = np.ones(len(pix), bool)
    first[1:] = pix[1:] != pix[:-1]
    img = np.full(H * W, 0.0)
    img[pix[first]] = shade[ff[first]]
    rgb = np.stack([img * 0.85, img * 0.9, img], 1).reshape(H, W, 3)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mesh", required=True)
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
        mesh = Mesh.load(args.mesh)
        img = render(mesh, scene.K[args.view].astype(np.float64), scene.c2w[args.view].astype(np.float64),
                     scene.scale_mat, scene.H, scene.W)
        photo = scene.images[args.view]
        imageio.imwrite(args.out, np.concatenate([photo, img], axis=1))
        print(f"wrote {args.out}")
        return 0
    except UserInputError as exc:
        print(f"render_mesh: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
