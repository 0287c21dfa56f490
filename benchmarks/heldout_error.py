"""Where a run's held-out error comes from: the silhouette, the mask's edge, or the object's interior;
and how blurred the renders are against the photographs.

    python benchmarks/heldout_error.py RUN [--n-fine 32 64] [--render-refine 1 2 4 8 16] [--train-views 7]
                                       [--render-stop 0 1e-4 0 1e-4] [--json OUT.json] [--image OUT.png]

For each held-out view of a run trained with masks (``taichi-neus train``; its latest checkpoint),
rendered at the training resolution, the squared colour error inside the photo's mask is split into:

- ``miss``: mask pixels the render leaves mostly empty (opacity < 0.5);
- ``edge``: the rest of a 2-pixel band inside the mask's boundary;
- ``interior``: everything else inside the mask.

Blur: the mean |Laplacian| of the grey image inside the mask, render against photo (1 = as sharp), and
the masked PSNR a Gaussian blur of the photo (σ = 0.5, 1, 1.5, 2 pixels) scores against the photo itself,
to read a run's figure as an equivalent blur. ``--n-fine`` also renders with other fine-sample counts
(the held-out figure at the run's own count is the first); ``--render-refine`` renders again with the
renderer's coarse step at the training step divided by each factor (``render.render_refine``; the first
figure uses the run's own), timing each. ``--render-stop`` renders again with each transmittance at which a
render ray ends behind its first surface (``render.render_stop``; 0: marched to its far end), in the order
given (repeat values to alternate them on a machine whose speed drifts), timing each and counting the SDF
evaluations of the march. ``--train-views K`` also scores K training views, evenly spread, the
same way: a render that misses the training photos as much as the held-out ones is a fit that is not there
yet (capacity, steps, optimisation); one that fits them and misses the held-out ones is a surface that is
wrong between the views. ``--image`` writes, for the first held-out
view: photo | render | 4×|error| (inside the mask).

Prints a table and writes JSON. Reads the run; writes nothing into it unless ``--json`` points there.
"""

import argparse
import json
import pathlib
import sys
import time

import numpy as np

BLUR_SIGMAS = (0.5, 1.0, 1.5, 2.0)


def _psnr(err_sq: np.ndarray) -> float:
    return float(-10.0 * np.log10(max(float(err_sq.mean()), 1e-12)))


def analyse_view(rgb: np.ndarray, opacity: np.ndarray, photo: np.ndarray, mask: np.ndarray) -> dict:
    """rgb, photo: (H, W, 3) float in [0, 1]; opacity (H, W); mask (H, W) bool. Figures of one view."""
    from scipy import ndimage

    err = ((rgb - photo) ** 2).mean(-1)
    edge = mask & ~ndimage.binary_erosion(mask, iterations=2)
    miss = mask & (opacity < 0.5)
    regions = {"miss": miss, "edge": edge & ~miss, "interior": mask & ~edge & ~miss}
    total = float(err[mask].sum())
    out = {"psnr_masked": _psnr(err[mask])}
    for name, reg in regions.items():
        out[f"{name}_pixel_share"] = float(reg.sum() / mask.sum())
        out[f"{name}_error_share"] = float(err[reg].sum() / total) if total > 0 else 0.0
    out["psnr_interior"] = _psnr(err[regions["interior"]])
    lap = lambda img: np.abs(ndimage.laplace(img.mean(-1)))[mask].mean()  # noqa: E731
    out["sharpness_ratio"] = float(lap(rgb) / max(lap(photo), 1e-12))
    for s in BLUR_SIGMAS:
        blurred = np.stack([ndimage.gaussian_filter(photo[..., c], s) for c in range(3)], -1)
        out[f"photo_blur_{s}_psnr"] = _psnr(((blurred - photo) ** 2).mean(-1)[mask])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run folder written by 'taichi-neus train' with masks")
    ap.add_argument("--n-fine", type=int, nargs="*", default=[], help="also render with these fine-sample counts")
    ap.add_argument("--render-refine", type=int, nargs="*", default=[],
                    help="also render with the coarse step divided by these factors (timed)")
    ap.add_argument("--render-stop", type=float, nargs="*", default=[],
                    help="also render with these render.render_stop values, in this order (timed)")
    ap.add_argument("--train-views", type=int, default=0,
                    help="also score this many training views, evenly spread (fit against generalisation)")
    ap.add_argument("--json", default="", help="default: benchmarks/results/heldout_error_<run name>.json")
    ap.add_argument("--image", default="", help="photo | render | error picture of the first held-out view")
    args = ap.parse_args(argv)
    if args.train_views < 0:
        print(f"error: --train-views takes a count >= 0, got {args.train_views}.", file=sys.stderr)
        return 2
    if any(f < 1 for f in args.render_refine):
        print(f"error: --render-refine takes factors >= 1, got {args.render_refine}.", file=sys.stderr)
        return 2
    if any(not 0 <= t <= 1 for t in args.render_stop):
        print(f"error: --render-stop takes transmittances in [0, 1], got {args.render_stop}.", file=sys.stderr)
        return 2

    from taichi_neus.app.results import load_run
    run = pathlib.Path(args.run)
    if not (run / "config.json").is_file():
        print(f"error: {run} is not a run folder (no config.json); pass a folder 'taichi-neus train --out' wrote.",
              file=sys.stderr)
        return 2
    _, scene, tr = load_run(str(run), arch="cpu", log=lambda *a: None)
    if scene.masks is None or not tr.use_masks or not len(scene.test_ids):
        print(f"error: {run} has no masked held-out views to analyse; train with masks and holdout_every > 0.",
              file=sys.stderr)
        return 2
    rc = tr.cfg.render
    res = {"command": "python benchmarks/heldout_error.py " + " ".join(argv or sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M"), "run": str(run), "n_fine": rc.n_fine,
           "render_refine": rc.render_refine, "views": [int(v) for v in scene.test_ids], "per_view": [],
           "other_n_fine": {}, "other_render_refine": {}, "other_render_stop": []}
    for i, v in enumerate(scene.test_ids):
        r = tr.render_view(int(v), 1)
        photo = scene.images[v].astype(np.float32) / 255.0
        mask = scene.masks[v] > 127
        res["per_view"].append({"view": int(v), **analyse_view(r["rgb"], r["opacity"], photo, mask)})
        if i == 0 and args.image:
            import imageio.v3 as iio
            m = mask[..., None]
            err = np.repeat(np.clip(np.abs(r["rgb"] - photo).mean(-1, keepdims=True) * 4, 0, 1), 3, -1)
            pic = np.concatenate([photo * m, r["rgb"] * m, err * m], 1)
            iio.imwrite(args.image, (pic * 255).astype(np.uint8))
    keys = [k for k in res["per_view"][0] if k != "view"]
    res["mean"] = {k: float(np.mean([p[k] for p in res["per_view"]])) for k in keys}
    if args.train_views:
        train = np.asarray(scene.train_ids)
        picks = train[np.linspace(0, len(train) - 1, min(args.train_views, len(train))).round().astype(int)]
        res["train_views"] = [int(v) for v in picks]
        res["per_train_view"] = []
        for v in picks:
            r = tr.render_view(int(v), 1)
            photo = scene.images[v].astype(np.float32) / 255.0
            res["per_train_view"].append({"view": int(v), **analyse_view(r["rgb"], r["opacity"], photo,
                                                                         scene.masks[v] > 127)})
        res["train_mean"] = {k: float(np.mean([p[k] for p in res["per_train_view"]])) for k in keys}
    def rescore() -> dict:
        """The held-out views rendered with the trainer's render sampler as it is now: mean PSNR inside the
        masks, mask pixels left empty (opacity < 0.5), seconds, SDF evaluations of the march."""
        t0, ps, miss, n0 = time.perf_counter(), [], 0, tr.render_sampler.evaluations
        for v in scene.test_ids:
            r = tr.render_view(int(v), 1)
            photo = scene.images[v].astype(np.float32) / 255.0
            mask = scene.masks[v] > 127
            ps.append(_psnr(((r["rgb"] - photo) ** 2).mean(-1)[mask]))
            miss += int((mask & (r["opacity"] < 0.5)).sum())
        return {"psnr_masked": float(np.mean(ps)), "miss_pixels": miss, "seconds": time.perf_counter() - t0,
                "sdf_evaluations": tr.render_sampler.evaluations - n0}

    for nf in args.n_fine:
        tr.render_sampler = tr.make_render_sampler(nf)
        res["other_n_fine"][str(nf)] = rescore()["psnr_masked"]
    refine0 = rc.render_refine
    for f in args.render_refine:
        rc.render_refine = f
        tr.render_sampler = tr.make_render_sampler(rc.n_fine)
        res["other_render_refine"][str(f)] = rescore()
    rc.render_refine = refine0
    stop0 = rc.render_stop
    for tau in args.render_stop:
        rc.render_stop = tau
        tr.render_sampler = tr.make_render_sampler(rc.n_fine)
        res["other_render_stop"].append({"render_stop": tau, **rescore()})
    rc.render_stop = stop0
    tr.render_sampler = tr.make_render_sampler(rc.n_fine)
    mean = res["mean"]
    print(f"{run}: {len(res['views'])} held-out views at {scene.W}x{scene.H}, n_fine {rc.n_fine}, "
          f"render_refine {rc.render_refine}")
    print(f"  PSNR inside the masks        {mean['psnr_masked']:.2f} dB (interior only {mean['psnr_interior']:.2f})")
    for name in ("miss", "edge", "interior"):
        print(f"  {name:9s} {100 * mean[name + '_pixel_share']:5.1f}% of mask pixels, "
              f"{100 * mean[name + '_error_share']:5.1f}% of the squared error")
    print(f"  sharpness (|Laplacian|, render / photo) {mean['sharpness_ratio']:.2f}")
    print("  the photo blurred, against itself: " + ", ".join(
        f"σ {s}: {mean[f'photo_blur_{s}_psnr']:.1f} dB" for s in BLUR_SIGMAS))
    if args.train_views:
        tm = res["train_mean"]
        print(f"  {len(res['train_views'])} training views: PSNR inside the masks {tm['psnr_masked']:.2f} dB "
              f"(interior {tm['psnr_interior']:.2f}), sharpness {tm['sharpness_ratio']:.2f}, "
              f"miss {100 * tm['miss_pixel_share']:.1f}% of mask pixels")
    for nf, p in res["other_n_fine"].items():
        print(f"  rendered with n_fine {nf}: {p:.2f} dB")
    for f, r in res["other_render_refine"].items():
        print(f"  rendered with the coarse step / {f}: {r['psnr_masked']:.2f} dB, {r['miss_pixels']} mask pixels "
              f"empty, {r['seconds']:.1f} s")
    for r in res["other_render_stop"]:
        print(f"  rendered with render_stop {r['render_stop']:g}: {r['psnr_masked']:.4f} dB, {r['miss_pixels']} mask "
              f"pixels empty, {r['sdf_evaluations']:,} SDF evaluations, {r['seconds']:.1f} s")
    here = pathlib.Path(__file__).resolve().parent
    path = pathlib.Path(args.json or here / "results" / f"heldout_error_{run.name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
