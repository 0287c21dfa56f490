"""Does a mesh hold "background walls"? Coverage of the photos' background by meshes, per run.

    python benchmarks/background_walls.py --data ../shared/data/dtu_scan24 \
        --mesh masked=runs/scan24/mesh_003632.ply --mesh unmasked=runs/scan24_nomask/mesh_002000.ply

Each mesh is rasterised (:mod:`taichi_neus.export.mesh_raster`) into the scene's cameras (every
``--view-every``-th view, at ``--downscale``) and compared with the dataset's object masks, which
exist for DTU even when a run trained without them. Per mesh, averaged over the views:

- object: share of the mask's pixels the mesh covers (should be ~1);
- backdrop: share of the dark background pixels (DTU's black backdrop, far beyond the unit sphere)
  the mesh covers. A wall built inside the unit sphere to explain the backdrop raises it; an
  honest mesh leaves it near 0;
- other background: share of the remaining background (DTU: the white table, a real surface
  that reaches into the unit sphere, which an unmasked run may rightly reconstruct);
- IoU of coverage and mask;
- on-sphere area: share of the mesh's area within 3% of the unit sphere's surface, where the
  trainer's "SDF ∩ unit sphere" closes surfaces that leave it (large when walls or a closed
  shell along the boundary exist).

Prints a table and writes JSON (``--out``, default ``benchmarks/results/background_walls.json``).
"""

import argparse
import json
import pathlib
import sys
import time

import numpy as np


def on_sphere_share(mesh, scene, shell: float = 0.03) -> float:
    """Share of the mesh's area whose triangles' centres lie at |x| > 1 - shell (unit sphere)."""
    if len(mesh.faces) == 0:
        return float("nan")
    t = scene.world_to_unit(mesh.vertices)[mesh.faces]
    area = 0.5 * np.linalg.norm(np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]), axis=1)
    r = np.linalg.norm(t.mean(1), axis=1)
    return float(area[r > 1.0 - shell].sum() / max(area.sum(), 1e-30))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/dtu_scan24")
    ap.add_argument("--mesh", action="append", required=True, metavar="LABEL=PLY")
    ap.add_argument("--downscale", type=int, default=4)
    ap.add_argument("--view-every", type=int, default=4)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results" / "background_walls.json"))
    args = ap.parse_args(argv)

    from taichi_neus.data import load_dtu
    from taichi_neus.errors import UserInputError
    from taichi_neus.export.evaluation import background_coverage
    from taichi_neus.export.mesh import Mesh
    from taichi_neus.export.mesh_raster import rasterize

    try:
        meshes = {}
        for item in args.mesh:
            label, sep, path = item.partition("=")
            if not sep or not label or not path:
                raise UserInputError(f"--mesh {item!r}: give LABEL=PATH, e.g. --mesh masked=runs/a/mesh.ply.")
            if not pathlib.Path(path).is_file():
                raise UserInputError(f"--mesh {item!r}: {path} does not exist.")
            meshes[label] = Mesh.load(path)
        scene = load_dtu(args.data, downscale=args.downscale, holdout_every=0, use_masks=True)
        if scene.masks is None:
            raise UserInputError(f"{args.data} has no masks; background coverage needs the object masks.")
    except UserInputError as exc:
        print(f"background_walls: error: {exc}", file=sys.stderr)
        return 2

    views = list(range(0, scene.n_views, args.view_every))
    rows, runs = [], []
    for label, mesh in meshes.items():
        per_view = []
        for v in views:
            depth, _ = rasterize(mesh, scene.K[v].astype(np.float64), scene.c2w[v].astype(np.float64),
                                 scene.scale_mat, scene.H, scene.W)
            per_view.append(background_coverage(np.isfinite(depth), scene.masks[v], scene.images[v]))
        keys = ("object", "backdrop", "other_background", "iou")
        mean = {k: float(np.nanmean([p[k] for p in per_view])) for k in keys}
        run = {"label": label, "faces": int(len(mesh.faces)), "on_sphere": on_sphere_share(mesh, scene),
               **mean, "per_view": dict(zip(map(str, views), per_view, strict=True))}
        runs.append(run)
        rows.append(f"| {label} | {run['faces']} | {mean['object']:.3f} | {mean['backdrop']:.3f} | "
                    f"{mean['other_background']:.3f} | {mean['iou']:.3f} | {run['on_sphere']:.3f} |")
        print(f"{label}: done ({len(views)} views)", flush=True)
    text = "\n".join(["| mesh | faces | object covered | backdrop covered | other background covered | "
                      "IoU with masks | on-sphere area |", "|---|---:|---:|---:|---:|---:|---:|", *rows])
    print(f"\n{scene.path}: views {views} at {scene.W}x{scene.H}\n\n{text}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]), "views": views,
            "meshes": dict(m.partition("=")[::2] for m in args.mesh),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.write_text(json.dumps({"meta": meta, "runs": runs, "table": text}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
