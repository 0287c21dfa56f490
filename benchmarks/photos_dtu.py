"""DTU scan 24 from its photographs alone against the same training with DTU's calibrated cameras.

    python benchmarks/photos_dtu.py [--data ../shared/data/dtu_scan24] [--scene DIR] [--iters 5000]

1. ``taichi-neus poses`` on the 49 photographs and their masks (skipped when ``--scene`` already holds
   a scene it wrote), as a user would run it.
2. Two trainings with the same options and the same number of steps, one after the other, each the
   user's command (``examples/train_dtu.py --downscale 4``) in its own process: ``dtu`` on DTU's
   cameras, ``photos`` on the poses from step 1. Equal steps, not equal seconds, so the comparison
   does not depend on what else the machine runs; each run's training seconds are reported.
3. Both scored as each run scores itself (``metrics.json``: held-out PSNR inside the masks at the
   training resolution, views 0, 8, …, 48, the same photographs in both scenes), and both meshes
   judged in DTU's frame: the photos run's mesh is carried into DTU's world by the similarity that
   aligns its camera centres with DTU's (:func:`taichi_neus.data.sfm.similarity_align`), then
   rasterised with DTU's cameras into the held-out views and compared with DTU's masks
   (silhouette IoU at 400×300). The symmetric Chamfer distance between the two meshes (DTU
   unit-sphere units, 20k points each way; also its medians, and restricted to both meshes' parts
   within 0.95 of DTU's sphere, which leaves out where marching cubes closed unseen space at a run's
   own sphere) says how far apart the two surfaces are.
4. A picture: the held-out photograph of view 24 (``--view``), then the meshes of the runs in ``--runs``
   order, all rendered with DTU's camera (``--figure``, default ``docs/scan24_from_photos_view24.png``).

Targets (issue 12): held-out PSNR and mesh IoU of ``photos`` within 1 dB and 0.01 of ``dtu``.
Prints a table and writes JSON (``--json``, default ``benchmarks/results/photos_dtu.json``) after every
stage. Skips cleanly (exit 0) when the data or pycolmap is absent.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from poses_dtu import DEFAULT_DATA, paired_poses  # noqa: E402
from recipe import ROOT, _commit, launch  # noqa: E402


def link_photos(data: pathlib.Path, folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """``folder/images`` and ``folder/masks``: links to DTU's photographs and, under the photographs'
    names, their masks (DTU names them ``000.png`` against ``000000.png``; ``poses`` pairs by name)."""
    from taichi_neus.data.dtu import list_images

    photos = list_images(data / "images")
    masks = sorted((data / "mask").glob("*.png"))
    if len(masks) != len(photos):
        raise SystemExit(f"{data}: {len(photos)} photographs but {len(masks)} masks")
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for p, m in zip(photos, masks, strict=True):
        for link, target in ((folder / "images" / p.name, p), (folder / "masks" / f"{p.stem}.png", m)):
            if not link.is_symlink():
                link.symlink_to(target.resolve())
    return folder / "images", folder / "masks"


def alignment(data: pathlib.Path, scene: pathlib.Path) -> dict:
    """The scene's registered cameras against DTU's (:func:`taichi_neus.data.sfm.compare_cameras`): per-view
    errors and the similarity ``x_dtu_world = scale · rotation · x_colmap_world + translation`` that aligns
    the camera centres."""
    from taichi_neus.data.colmap import find_model, read_model
    from taichi_neus.data.dtu import list_images
    from taichi_neus.data.sfm import compare_cameras

    cams = np.load(data / "cameras_sphere.npz")
    _, recs, _, _ = read_model(find_model(scene))
    est, ref, _ = paired_poses(cams, {p.name: i for i, p in enumerate(list_images(data / "images"))}, recs)
    return compare_cameras(est, ref, cams["scale_mat_0"][:3, 3])


def judge(runs: dict, data: pathlib.Path, scene: pathlib.Path, figure: pathlib.Path | None, view: int = 24) -> dict:
    """Mesh IoU in DTU's frame for every run, the Chamfer between the meshes, and the picture."""
    from taichi_neus.data.loader import load_scene
    from taichi_neus.export.evaluation import chamfer, sample_mesh_points
    from taichi_neus.export.mesh import Mesh
    from taichi_neus.export.mesh_raster import silhouette_iou

    dtu = load_scene(data, downscale=4, log=lambda *_: None)
    cmp = alignment(data, scene)
    s, R, t = cmp["scale"], cmp["rotation"], cmp["translation"]
    meshes = {}
    for name, row in runs.items():
        mesh = Mesh.load(row["mesh"])
        if name.startswith("photos"):
            mesh = Mesh((s * np.asarray(mesh.vertices, np.float64) @ R.T + t).astype(np.float32), mesh.faces)
            row["mesh_dtu_frame"] = str(mesh.save(pathlib.Path(row["run_dir"]) / "mesh_dtu_frame.ply",
                                                  overwrite=True))
        meshes[name] = mesh
        row["mesh_iou_dtu"] = silhouette_iou(mesh, dtu, dtu.test_ids)
    unit = dtu.world_to_unit
    pts = {n: unit(sample_mesh_points(m.vertices, m.faces, n=20000, seed=i)) for i, (n, m) in enumerate(meshes.items())}
    for name, p in pts.items():
        # where marching cubes closed an unseen region at the run's own sphere (DTU's sphere, or beyond it)
        runs[name]["mesh_share_beyond_0.95_dtu_sphere"] = float(np.mean(np.linalg.norm(p, axis=1) > 0.95))
        if name != "dtu" and "dtu" in pts:
            c = chamfer(p, pts["dtu"])
            runs[name]["to_dtu_mesh"] = {k: float(c[k]) for k in ("chamfer", "accuracy_median", "completeness_median")}
            near = lambda q: q[np.linalg.norm(q, axis=1) < 0.95]  # noqa: E731
            c = chamfer(near(p), near(pts["dtu"]))
            runs[name]["to_dtu_mesh_inside_0.95"] = {k: float(c[k]) for k in ("chamfer", "accuracy_median",
                                                                              "completeness_median")}
    if figure is not None and len(meshes) > 1:
        files = [str(runs[n].get("mesh_dtu_frame", runs[n]["mesh"])) for n in meshes]
        cmd = [sys.executable, str(ROOT / "examples" / "render_mesh.py"), "--data", str(data), "--view", str(view),
               "--downscale", "4", "--out", str(figure), "--mesh", *files]
        subprocess.run(cmd, check=True)
    photos = load_scene(scene, downscale=4, log=lambda *_: None)
    return {"similarity_scale": float(s), "photos_sphere_radius_dtu_units": float(s * photos.scale_mat[0, 0]
                                                                                  / dtu.scale_mat[0, 0]),
            "rotation_spread_deg_median": float(np.median(cmp["spread_deg"])),
            "centre_error_rel_median": float(np.median(cmp["centre_rel"])), "shared_offset_deg": cmp["offset_deg"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--scene", default="", help="the poses output (made here when absent; default under --out-root)")
    ap.add_argument("--iters", type=int, default=5000, help="training steps of every run (the default recipe's)")
    ap.add_argument("--runs", nargs="+", default=["dtu", "photos"], choices=("dtu", "photos"))
    ap.add_argument("--out-root", default="/tmp/taichi_neus_photos")
    ap.add_argument("--figure", default=str(ROOT / "docs" / "scan24_from_photos_view24.png"))
    ap.add_argument("--view", type=int, default=24, help="the view the picture shows")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "photos_dtu.json"))
    ap.add_argument("--collect", action="store_true", help="no training: judge the runs' existing folders")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: options passed to every run")
    args = ap.parse_args(argv)
    data = pathlib.Path(args.data)
    if not (data / "cameras_sphere.npz").is_file():
        print(f"[photos_dtu] skipped: {data} (DTU layout with cameras_sphere.npz) is absent")
        return 0
    try:
        import pycolmap  # noqa: F401
    except ImportError:
        print("[photos_dtu] skipped: pycolmap is not installed (pip install 'taichi_neus[photos]')")
        return 0
    root = pathlib.Path(args.out_root)
    scene = pathlib.Path(args.scene) if args.scene else root / "scan24_photos"
    extra = [a for a in args.extra if a != "--"]
    res = {"data": str(data), "scene": str(scene), "iters": args.iters, "extra": extra, "commit": _commit(),
           "date": time.strftime("%Y-%m-%d %H:%M"), "runs": {}}
    out_json = pathlib.Path(args.json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    if not (scene / "sparse").is_dir():
        images, masks = link_photos(data, root / "photos_in")
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "taichi_neus.app.cli", "poses", "--images", str(images),
                        "--masks", str(masks), "--out", str(scene)],
                       check=True)
        res["poses_wall_s"] = time.time() - t0
    for name in args.runs:
        out = root / name
        if not args.collect:
            wall = launch(out, data if name == "dtu" else scene, 4, {}, extra, iters=args.iters, label=name)
        m = json.loads((out / "metrics.json").read_text())
        res["runs"][name] = {"run_dir": str(out), "wall_s": wall if not args.collect else m.get("wall_time_s"),
                             **{k: m.get(k) for k in ("steps", "train_time_s", "heldout_psnr_masked", "heldout_psnr",
                                                      "heldout_mesh_mask_iou", "heldout_views", "mesh")}}
        out_json.write_text(json.dumps(res, indent=1))
    res["alignment"] = judge(res["runs"], data, scene, pathlib.Path(args.figure) if args.figure else None,
                             args.view)
    out_json.write_text(json.dumps(res, indent=1))
    print(f"\n{'run':<8} {'steps':>6} {'train (s)':>9} {'PSNR mask (dB)':>14} {'mesh IoU (own)':>14} "
          f"{'mesh IoU (DTU)':>14} {'Chamfer to dtu (r<0.95)':>14}")
    for name, r in res["runs"].items():
        print(f"{name:<8} {r['steps']:>6} {r['train_time_s']:>9.0f} {r['heldout_psnr_masked']:>14.2f} "
              f"{r['heldout_mesh_mask_iou']:>14.4f} {r['mesh_iou_dtu']:>14.4f} "
              f"{r.get('to_dtu_mesh_inside_0.95', {}).get('chamfer', float('nan')):>14.4f}")
    print(f"[photos_dtu] wrote {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
