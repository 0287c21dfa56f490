"""Camera poses from DTU scan 24's photographs alone, against DTU's calibrated cameras.

    python benchmarks/poses_dtu.py [--data ../shared/data/dtu_scan24] [--max-image-size 3200]

Runs the poses pipeline (:func:`taichi_neus.data.sfm.poses_from_photos`, the command
``taichi-neus poses``) on the 49 photographs in ``DATA/images`` (1600x1200), then compares the
registered cameras with ``cameras_sphere.npz`` after a similarity transform fitted to the camera
centres (:func:`taichi_neus.data.sfm.compare_cameras`):

- registered photographs;
- rotation error per view (median, max), raw;
- shared offset and spread: COLMAP holds the principal point at the image centre and DTU's is not
  there, which shows as one rotation in the camera frame common to all views; the spread is each
  view's error around that shared rotation (what pose accuracy the training sees, up to that offset);
- camera-centre error as a fraction of the mean camera distance to the object centre (DTU's
  ``scale_mat`` centre);
- focal length error: COLMAP's (one f) against DTU's mean of fx and fy;
- wall time of each stage.

Targets (issue 12): 49 registered, spread median <= 0.1°, centre error median <= 0.3%, focal <= 1%.
Prints a table and writes JSON (``--json``, default ``benchmarks/results/poses_dtu.json``). Skips
cleanly (exit 0) when the data is absent or pycolmap is not installed.
"""

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
# ../shared/data next to the repository (a git worktree may sit one level deeper)
DEFAULT_DATA = next((d for d in (ROOT.parent / "shared" / "data" / "dtu_scan24",
                                 ROOT.parent.parent / "shared" / "data" / "dtu_scan24") if d.is_dir()),
                    ROOT.parent / "shared" / "data" / "dtu_scan24")


def paired_poses(cams, index: dict, recs):
    """World-to-camera poses of the registered photographs, COLMAP's (V, 4, 4) and DTU's (V, 4, 4), and
    DTU's focal lengths (V,) pixels (mean of fx, fy). ``cams``: the loaded ``cameras_sphere.npz``;
    ``index``: photograph name -> DTU view; ``recs``: COLMAP's image records."""
    from taichi_neus.data.cameras import decompose_projection
    from taichi_neus.data.colmap import qvec_to_rotation

    est, ref, f_ref = np.tile(np.eye(4), (len(recs), 1, 1)), np.tile(np.eye(4), (len(recs), 1, 1)), []
    for v, r in enumerate(recs):
        i = index[r.name]
        K, ref[v, :3, :3], ref[v, :3, 3] = decompose_projection(cams[f"world_mat_{i}"][:3], f"world_mat_{i}")
        est[v, :3, :3], est[v, :3, 3] = qvec_to_rotation(r.qvec), r.tvec
        f_ref.append(0.5 * (K[0, 0] + K[1, 1]))
    return est, ref, np.array(f_ref)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--max-image-size", type=int, default=0, help="long side for SIFT (0: the package default)")
    ap.add_argument("--max-features", type=int, default=0, help="SIFT keypoints per photo (0: the package default)")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N photographs (0: all)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "poses_dtu.json"))
    args = ap.parse_args(argv)
    data = pathlib.Path(args.data)
    if not (data / "cameras_sphere.npz").is_file() or not (data / "images").is_dir():
        print(f"[poses_dtu] skipped: {data} (DTU layout with images/ and cameras_sphere.npz) is absent")
        return 0
    try:
        import pycolmap  # noqa: F401
    except ImportError:
        print("[poses_dtu] skipped: pycolmap is not installed (pip install 'taichi_neus[photos]')")
        return 0
    from taichi_neus.data.colmap import intrinsics, read_model
    from taichi_neus.data.dtu import list_images
    from taichi_neus.data.sfm import MAX_FEATURES, MAX_IMAGE_SIZE, compare_cameras, poses_from_photos

    photos = list_images(data / "images")
    if args.limit:
        photos = photos[:args.limit]
    cams = np.load(data / "cameras_sphere.npz")
    with tempfile.TemporaryDirectory() as td:
        src = pathlib.Path(td) / "photos"
        src.mkdir()
        for p in photos:  # links: the pipeline reads one folder; DTU's is read-only and may hold more
            (src / p.name).symlink_to(p.resolve())
        t0 = time.time()
        size = args.max_image_size or MAX_IMAGE_SIZE
        features = args.max_features or MAX_FEATURES
        summary = poses_from_photos(src, pathlib.Path(td) / "scene", max_image_size=size, max_features=features)
        wall = time.time() - t0
        cams_c, recs, _, _ = read_model(pathlib.Path(td) / "scene" / "sparse")
    w2c_est, w2c_ref, f_ref = paired_poses(cams, {p.name: i for i, p in enumerate(photos)}, recs)
    K_est, _ = intrinsics(cams_c[recs[0].camera_id])
    f_est = 0.5 * (K_est[0, 0] + K_est[1, 1])
    centre = cams["scale_mat_0"][:3, 3]
    cmp = compare_cameras(w2c_est, w2c_ref, centre=centre)
    res = {
        "data": str(data), "photos": len(photos), "registered": len(recs), "left_out": summary.left_out,
        "max_image_size": size, "max_features": features,
        "sparse_points": summary.points, "reprojection_error_px": summary.reprojection_error,
        "rotation_deg": {"median": float(np.median(cmp["rotation_deg"])), "max": float(cmp["rotation_deg"].max())},
        "shared_offset_deg": cmp["offset_deg"],
        "spread_deg": {"median": float(np.median(cmp["spread_deg"])), "max": float(cmp["spread_deg"].max())},
        "centre_error_rel": {"median": float(np.median(cmp["centre_rel"])), "max": float(cmp["centre_rel"].max())},
        "focal_px": {"colmap": float(f_est), "dtu": float(np.mean(f_ref)),
                     "error_rel": float(abs(f_est - np.mean(f_ref)) / np.mean(f_ref))},
        "wall_time_s": wall, "stage_seconds": summary.seconds,
        "note": "shared 2-core machine: the wall time is an upper bound",
    }
    rows = [
        ("registered", f"{res['registered']} / {res['photos']}", "49 / 49"),
        ("rotation error median / max (deg)", f"{res['rotation_deg']['median']:.3f} / {res['rotation_deg']['max']:.3f}",
         ""),
        ("shared offset (deg)", f"{res['shared_offset_deg']:.3f}", "~0.65"),
        ("spread median / max (deg)", f"{res['spread_deg']['median']:.3f} / {res['spread_deg']['max']:.3f}",
         "<= 0.1 median"),
        ("centre error median / max (% of distance)",
         f"{100 * res['centre_error_rel']['median']:.3f} / {100 * res['centre_error_rel']['max']:.3f}", "<= 0.3"),
        ("focal COLMAP / DTU (px), error", f"{f_est:.1f} / {np.mean(f_ref):.1f}, "
         f"{100 * res['focal_px']['error_rel']:.2f}%", "<= 1%"),
        ("wall time (s)", f"{wall:.0f} (" + ", ".join(f"{k} {v:.0f}" for k, v in summary.seconds.items()) + ")",
         "<= 600"),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"\n{'quantity':<{w}} | {'measured':<40} | target")
    for a, b, c in rows:
        print(f"{a:<{w}} | {b:<40} | {c}")
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"[poses_dtu] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
