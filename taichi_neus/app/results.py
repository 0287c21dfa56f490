"""Working with a finished (or running) run folder: load its latest checkpoint, render camera paths
(``taichi-neus render``) and evaluate it (``taichi-neus eval``).

Units: images in [0, 1]; Chamfer distances in world units (the dataset's units after ``scale_mat``;
millimetres for DTU); depth in unit-sphere units.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re

import numpy as np

from taichi_neus.errors import UserInputError
from taichi_neus.render.camera_paths import camera_path, scale_intrinsics
from taichi_neus.render.images import MODES, colorize, depth_range, render_image
from taichi_neus.train.config import Config

__all__ = ["check_run_folder", "latest_checkpoint_step", "load_run", "parse_modes", "mp4_backend", "require_mp4",
           "render_run", "run_mesh", "evaluate_images", "evaluate_geometry", "format_table", "format_train_summary"]


def check_run_folder(out) -> Config:
    """The config of the run in ``out``, checked cheaply (no Taichi, no checkpoint read): the folder
    exists, holds a valid ``config.json`` and at least one checkpoint file.

    Raises:
        UserInputError: one sentence saying which of these is missing.
    """
    out = pathlib.Path(out)
    if not out.is_dir():
        raise UserInputError(f"run folder {out} does not exist; give a folder 'taichi-neus train --out' wrote.")
    if not (out / "config.json").is_file():
        raise UserInputError(f"{out} holds no run (no config.json); train first or give a run folder.")
    try:
        cfg = Config.from_dict(json.loads((out / "config.json").read_text()))
    except (json.JSONDecodeError, TypeError, UserInputError) as exc:
        raise UserInputError(f"{out / 'config.json'} is not a valid taichi_neus config ({exc}).") from None
    if not sorted((out / "checkpoints").glob("ckpt_*.npz")):
        raise UserInputError(f"{out}/checkpoints holds no checkpoint; train longer (checkpoints are written every "
                             "--train.ckpt_every steps and at the end).")
    return cfg


def latest_checkpoint_step(out) -> int:
    """Step of the newest checkpoint file in ``out/checkpoints`` (from its name ``ckpt_<step>.npz``; not read)."""
    names = sorted(pathlib.Path(out, "checkpoints").glob("ckpt_*.npz"))
    return int(names[-1].stem.split("_")[1]) if names else 0


def load_run(out, arch: str = "auto", log=print):
    """``(cfg, scene, trainer)`` of the run in ``out`` with its newest readable checkpoint loaded.

    Raises:
        UserInputError: no folder, no ``config.json``, or no readable checkpoint.
    """
    from taichi_neus import runtime

    out = pathlib.Path(out)
    cfg = check_run_folder(out)
    runtime.init(arch, verbose=False)
    from taichi_neus.data import default_scene_path
    from taichi_neus.data.loader import load_scene
    from taichi_neus.train.trainer import Trainer

    scene = load_scene(cfg.data.path or str(default_scene_path()), downscale=cfg.data.downscale,
                       holdout_every=cfg.data.holdout_every, use_masks=cfg.data.use_masks)
    tr = Trainer(scene, cfg, out, log=log)
    if tr.resume_latest() is None:
        raise UserInputError(f"{out}/checkpoints holds no readable checkpoint.")
    return cfg, scene, tr


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UserInputError(f"--modes takes a comma-separated list of {', '.join(MODES)}; got '{text}'.")
    return modes


def mp4_backend() -> str | None:
    """``'pyav'`` or ``'ffmpeg'`` when imageio can encode MP4 here, else None.

    Checked explicitly: without either package imageio would silently write a TIFF named ``.mp4``.
    """
    if importlib.util.find_spec("av") is not None:
        return "pyav"
    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        return "ffmpeg"
    return None


def require_mp4() -> str:
    """The MP4 backend, or a UserInputError saying that none is installed."""
    backend = mp4_backend()
    if backend is None:
        raise UserInputError("--mp4 needs imageio's ffmpeg or PyAV backend (the imageio-ffmpeg or av package), "
                             "which is not installed; use --gif instead.")
    return backend


def _downscaled_size(scene, downscale: int) -> tuple[int, int]:
    if downscale < 1:
        raise UserInputError(f"--downscale must be a positive integer, got {downscale}.")
    H, W = scene.H // downscale, scene.W // downscale
    if H < 1 or W < 1:
        raise UserInputError(f"--downscale {downscale} leaves no pixels of the {scene.W}x{scene.H} images.")
    return H, W


def _u8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render_run(tr, path: str, frames: int = 0, downscale: int = 1, modes=("rgb",), gif: bool = False,
               mp4: bool = False, fps: int = 12, log=print, name: str = "", overwrite: bool = False) -> dict:
    """Render a camera path of the trainer's scene into ``<run>/renders/<name or path>/``.

    Writes ``<mode>_<frame:03d>.png`` for every frame and mode, ``cameras.json`` (per frame: dataset view
    or -1, ``K``, ``c2w``), and with ``gif``/``mp4`` one ``<mode>.gif`` / ``<mode>.mp4`` per mode.
    Images are ``1/downscale`` of the training resolution; rendering is chunked by
    :func:`taichi_neus.render.images.render_image`.

    A folder that already holds renders is refused unless ``overwrite``; then its earlier frames,
    animations and ``cameras.json`` are removed first, so the folder holds one consistent set.

    Returns:
        dict with ``dir``, ``frames`` (count), ``size`` ``(W, H)``, ``files`` (paths written).
    """
    backend = require_mp4() if mp4 else None
    scene = tr.scene
    H, W = _downscaled_size(scene, downscale)
    cams = camera_path(scene, path, frames)
    out_dir = tr.out / "renders" / (name or path)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise UserInputError(f"{out_dir} already exists; pass --overwrite to replace it, or --name NAME.")
        for old in (*out_dir.glob("*_[0-9][0-9][0-9].png"), *out_dir.glob("*.gif"), *out_dir.glob("*.mp4"),
                    out_dir / "cameras.json"):
            old.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    files, stacks, meta = [], {m: [] for m in modes}, []
    offsets = None  # depth colours: the first frame's range, relative to the camera distance, for all frames
    for i, cam in enumerate(cams):
        K = scale_intrinsics(cam.K, W / scene.W, H / scene.H)
        img = render_image(tr, K, cam.c2w, H, W)
        near_far, offsets = depth_range(img, cam.c2w, offsets)
        for m in modes:
            a = _u8(colorize(img, m, near_far))
            p = out_dir / f"{m}_{i:03d}.png"
            _imwrite(p, a)
            files.append(p)
            if gif or mp4:
                stacks[m].append(a)
        meta.append({"frame": i, "view": cam.view, "K": K.tolist(), "c2w": np.asarray(cam.c2w).tolist()})
        log(f"[taichi_neus] render {path}: frame {i + 1}/{len(cams)}")
    (out_dir / "cameras.json").write_text(json.dumps({"step": tr.step, "width": W, "height": H, "frames": meta}))
    files.append(out_dir / "cameras.json")
    for m in modes:
        if gif:
            import imageio.v2 as imageio

            p = out_dir / f"{m}.gif"
            imageio.mimwrite(p, stacks[m], duration=1000.0 / fps, loop=0)
            files.append(p)
        if mp4:  # not exercised in the tests: neither backend is installed there
            p = out_dir / f"{m}.mp4"
            if backend == "pyav":
                import imageio.v3 as iio3

                iio3.imwrite(p, np.stack(stacks[m]), plugin="pyav", codec="libx264", fps=fps)
            else:
                import imageio.v2 as imageio

                imageio.mimwrite(p, stacks[m], format="FFMPEG", fps=fps)
            files.append(p)
    return {"dir": out_dir, "frames": len(cams), "size": (W, H), "files": files}


def _imwrite(path, a) -> None:
    import imageio.v2 as imageio

    imageio.imwrite(path, a)


# ----------------------------------------------------------------------------------- evaluation
def _block_mean(a: np.ndarray, k: int) -> np.ndarray:
    if k == 1:
        return a
    h, w = a.shape[0] // k, a.shape[1] // k
    return a[: h * k, : w * k].reshape(h, k, w, k, *a.shape[2:]).mean(axis=(1, 3))


def evaluate_images(tr, downscale: int = 1, log=print, keep: tuple = ()) -> dict:
    """Image metrics on the held-out views, rendered at ``1/downscale`` of the training resolution.

    Per view: ``psnr`` and ``ssim`` over the whole image, against the photograph whose background
    is replaced by the render background when the run trained with masks (the model is never asked
    for the background then); ``psnr_masked`` (pixels inside the mask) and ``ssim_masked`` (the SSIM
    map averaged inside the mask) against the photograph; ``mask_iou`` of ``opacity > 0.5`` against
    the mask. Returns ``{"views": [...], "mean": {...}}``, with ``"renders": {view: render}`` when
    ``keep`` names views (their renders as :func:`~taichi_neus.render.images.render_image` returns them, so a
    caller that shows one of them does not render it again); empty without held-out views.
    """
    from skimage.metrics import structural_similarity

    from taichi_neus.render.image_metrics import mask_iou, psnr, ssim

    scene = tr.scene
    H, W = _downscaled_size(scene, downscale)
    bg = np.asarray(tr.cfg.render.background, np.float64).reshape(1, 1, 3)
    views, renders = [], {}
    for v in np.asarray(scene.test_ids, np.int64):
        K = scale_intrinsics(scene.K[v], W / scene.W, H / scene.H)
        r = render_image(tr, K, scene.c2w[v], H, W)
        if int(v) in keep:
            renders[int(v)] = r
        pred = np.clip(r["rgb"], 0, 1).astype(np.float64)
        photo = _block_mean(scene.images[v].astype(np.float64) / 255.0, downscale)[:H, :W]
        row = {"view": int(v)}
        if scene.masks is not None:
            mask = _block_mean(scene.masks[v].astype(np.float64) / 255.0, downscale)[:H, :W] > 0.5
            full = np.where(mask[..., None], photo, bg) if tr.use_masks else photo
            s_map = structural_similarity(pred, photo, data_range=1.0, channel_axis=-1, full=True)[1]
            row.update(psnr=psnr(pred, full), ssim=ssim(pred, full), psnr_masked=psnr(pred, photo, mask),
                       ssim_masked=float(s_map.mean(axis=-1)[mask].mean()) if mask.any() else float("nan"),
                       mask_iou=mask_iou(r["opacity"], mask))
        else:
            row.update(psnr=psnr(pred, photo), ssim=ssim(pred, photo))
        views.append(row)
        log(f"[taichi_neus] eval: view {int(v)} PSNR {row['psnr']:.2f} dB")
    keys = [k for k in (views[0] if views else {}) if k != "view"]
    mean = {k: float(np.mean([row[k] for row in views])) for k in keys}
    out = {"views": views, "mean": mean, "downscale": downscale, "size": [W, H]}
    return {**out, "renders": renders} if keep else out


def run_mesh(tr, clean: bool = False, mesh_path: str = "", log=print):
    """The mesh to score: ``mesh_path`` if given, else the run's ``mesh_<step>.ply`` of the loaded
    checkpoint, extracted (and saved there) when missing; optionally culled with the masks
    (:func:`taichi_neus.export.mesh.clean_mesh_with_masks`). Returns ``(mesh, path)``."""
    from taichi_neus.export.mesh import Mesh, clean_mesh_with_masks, mesh_from_run

    if mesh_path:
        p = pathlib.Path(mesh_path)
        if not p.is_file():
            raise UserInputError(f"mesh file {p} does not exist.")
        mesh = Mesh.load(p)
    else:
        p = tr.out / f"mesh_{tr.step:06d}.ply"
        if p.is_file():
            mesh = Mesh.load(p)
        else:
            log(f"[taichi_neus] eval: extracting a mesh at step {tr.step} (resolution {tr.cfg.mesh.resolution})")
            mesh = mesh_from_run(tr, clean=False)
            if not mesh.is_empty:
                mesh.save(p)
    if clean:
        sc = tr.scene
        if sc.masks is None:
            raise UserInputError("--clean culls the mesh with the object masks, and this run's scene has none.")
        mesh = clean_mesh_with_masks(mesh, sc.K, sc.c2w, sc.masks, sc.scale_mat)
    return mesh, p


def _read_points(path, what: str) -> np.ndarray:
    from taichi_neus.export.ply import read_ply

    p = pathlib.Path(path)
    if not p.is_file():
        raise UserInputError(f"{what} file {p} does not exist.")
    return read_ply(p)


def evaluate_geometry(tr, mesh, gt_points: str = "", gt_mesh: str = "", dtu_dir: str = "", scan: int = 0,
                      n_points: int = 100_000) -> dict | None:
    """Chamfer distances of ``mesh`` (world units) against, in this order of preference: DTU's files
    (``dtu_dir`` and ``scan``; the official protocol, mm), a ground-truth point cloud or mesh (PLY,
    world units; a mesh is sampled with ``n_points`` points), or, on the built-in synthetic scene,
    its exact surface. None when there is no ground truth."""
    from taichi_neus.export.evaluation import chamfer, dtu_chamfer, sample_mesh_points

    if dtu_dir:
        if not scan:
            m = re.search(r"scan(\d+)", tr.scene.name)
            if not m:
                raise UserInputError(f"--dtu-dir needs --scan N: the scene name '{tr.scene.name}' has no scan number.")
            scan = int(m.group(1))
        if mesh.is_empty:
            raise UserInputError("the mesh is empty (no zero level set); there is no surface to score.")
        r = dtu_chamfer(mesh.vertices, mesh.faces, scan, dtu_dir)
        return {"protocol": "dtu", "scan": scan, "units": "mm", "accuracy": r["accuracy"],
                "completeness": r["completeness"], "chamfer": r["overall"], **{k: v for k, v in r.items()
                                                                                if k.startswith("n_")}}
    if gt_points or gt_mesh:
        d = _read_points(gt_points or gt_mesh, "ground-truth " + ("point cloud" if gt_points else "mesh"))
        if gt_mesh:
            if d.faces is None or len(d.faces) == 0:
                raise UserInputError(f"--gt-mesh {gt_mesh} has no faces; pass it as --gt-points instead.")
            ref = sample_mesh_points(d.vertices, d.faces, n=n_points, seed=1)
        else:
            ref = np.asarray(d.vertices, np.float64)
        source = str(gt_points or gt_mesh)
    elif not tr.cfg.data.path:
        from taichi_neus.data import sample_surface

        ref, source = sample_surface(n_points, seed=1), "built-in synthetic scene (exact surface)"
    else:
        return None
    if mesh.is_empty:
        raise UserInputError("the mesh is empty (no zero level set); there is no surface to score.")
    pts = sample_mesh_points(mesh.vertices, mesh.faces, n=n_points, seed=0)
    c = chamfer(pts, ref)
    return {"protocol": "points", "ground_truth": source, "units": "world", "accuracy": c["accuracy"],
            "completeness": c["completeness"], "chamfer": c["chamfer"], "n_mesh_points": c["n_a"],
            "n_gt_points": c["n_b"]}


def format_table(result: dict) -> str:
    """The printed summary of ``taichi-neus eval``: one metric per line."""
    rows = [("run", str(result.get("run", ""))), ("checkpoint step", str(result.get("step", "")))]
    img = result.get("images") or {}
    mean = img.get("mean", {})
    if mean:
        rows.append((f"held-out views ({len(img['views'])}, {img['size'][0]}x{img['size'][1]})", ""))
        names = {"psnr": "  PSNR, full image (dB)", "psnr_masked": "  PSNR, inside mask (dB)",
                 "ssim": "  SSIM, full image", "ssim_masked": "  SSIM, inside mask",
                 "mask_iou": "  mask IoU (opacity > 0.5)"}
        for k, label in names.items():
            if k in mean:
                rows.append((label, f"{mean[k]:.4f}" if "ssim" in k or "iou" in k else f"{mean[k]:.2f}"))
    else:
        rows.append(("held-out views", "none"))
    geo = result.get("geometry")
    if "mesh" in result:
        rows.append((f"mesh {result['mesh']}" + (" (cleaned with masks)" if result.get("clean") else ""),
                     f"{result.get('mesh_faces', 0)} faces"))
    if geo:
        u = geo["units"]
        rows.append(("  vs " + (f"DTU scan {geo['scan']} (official protocol)" if geo["protocol"] == "dtu"
                                else geo["ground_truth"]), ""))
        for k in ("accuracy", "completeness", "chamfer"):
            rows.append((f"  Chamfer {k if k != 'chamfer' else 'mean'} ({u})", f"{geo[k]:.4f}"))
    else:
        rows.append(("geometry", "no ground truth given (--gt-points, --gt-mesh or --dtu-dir)"))
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}".rstrip() for a, b in rows)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def format_train_summary(metrics: dict, out) -> str:
    """The few lines ``taichi-neus train`` ends with: what was made, how good it is, where it is, what next.
    (Everything, with more decimals, is in ``<run>/metrics.json``.)"""
    out = pathlib.Path(out)
    rows = [("run folder", str(out))]
    wall = metrics.get("wall_time_s", 0.0)
    rows.append(("steps", f"{metrics.get('steps', 0)} ({_duration(metrics.get('train_time_s', 0.0))} of training, "
                          f"{_duration(wall)} in all)"))
    if metrics.get("heldout_psnr") is not None:
        w, h = metrics.get("heldout_size", (0, 0))
        txt = f"{metrics['heldout_psnr']:.2f} dB over {len(metrics.get('heldout_views', []))} views at {w}x{h}"
        if metrics.get("heldout_psnr_masked") is not None:
            txt += f" (inside the masks: {metrics['heldout_psnr_masked']:.2f} dB)"
        rows.append(("held-out PSNR", txt))
        if metrics.get("heldout_mesh_mask_iou") is not None:
            rows.append(("mesh silhouette IoU", f"{metrics['heldout_mesh_mask_iou']:.4f} against the held-out "
                                                "views' masks"))
    else:
        rows.append(("held-out PSNR", "no held-out views (--data.holdout_every 0)"))
    if metrics.get("chamfer_to_true_surface") is not None:
        rows.append(("Chamfer to the true surface", f"{metrics['chamfer_to_true_surface']:.4f} world units "
                     f"(accuracy {metrics['accuracy']:.4f}, completeness {metrics['completeness']:.4f})"))
    if metrics.get("mesh"):
        rows.append(("mesh", f"{metrics['mesh']} ({metrics['mesh_vertices']:,} vertices, "
                             f"{metrics['mesh_faces']:,} faces)"))
    else:
        rows.append(("mesh", "none: no surface inside the unit sphere (see 'When results are poor' in the README)"))
    if metrics.get("result_image"):
        rows.append(("picture", f"{metrics['result_image']} (photo | render | normals | depth)"))
    rows.append(("all numbers", str(out / "metrics.json")))
    if sorted((out / "checkpoints").glob("ckpt_*.npz")):  # render and eval load the latest checkpoint
        rows.append(("next", f"taichi-neus render {out} --gif   |   taichi-neus eval {out}"))
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)
