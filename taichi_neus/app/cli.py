"""``taichi-neus``: ``train`` (photographs → mesh) and ``mesh`` (checkpoint → mesh).

Every option of :class:`taichi_neus.train.config.Config` is a flag: ``--train.iters 2000``,
``--render.n_fine 48``; common ones have short aliases (``--iters``, ``--downscale``, ``--arch``).
Bad input is reported as one sentence and exit status 2 — never a traceback.
"""

import argparse
import dataclasses
import hashlib
import json
import pathlib
import sys
import time

from taichi_neus.errors import UserInputError
from taichi_neus.train.config import Config

ALIASES = {"iters": "train.iters", "downscale": "data.downscale", "seed": "train.seed",
           "mesh-resolution": "mesh.resolution"}


def _flatten(dc, prefix=""):
    for f in dataclasses.fields(dc):
        v = getattr(dc, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def _set(cfg, dotted: str, raw: str):
    obj = cfg
    *path, name = dotted.split(".")
    for p in path:
        obj = getattr(obj, p)
    cur = getattr(obj, name)
    try:
        if isinstance(cur, bool):
            low = raw.lower()
            if low not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            val = low in ("1", "true", "yes")
        elif isinstance(cur, int):
            val = int(raw)
        elif isinstance(cur, float):
            val = float(raw)
        elif isinstance(cur, tuple):
            val = tuple(float(x) for x in raw.split(","))
        else:
            val = raw
    except ValueError:
        raise UserInputError(f"option --{dotted} expects a {type(cur).__name__}, got '{raw}'.") from None
    setattr(obj, name, val)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="taichi-neus", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train on a scene folder and write a mesh")
    tr.add_argument("--data", default="",
                    help="scene folder: NeuS/DTU, NeRF-synthetic or COLMAP (default: built-in synthetic)")
    tr.add_argument("--out", default="runs/latest", help="output folder (refused if it holds another run)")
    tr.add_argument("--arch", default="auto", help="auto|cpu|cuda|vulkan|metal")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    tr.add_argument("--no-mask", action="store_true", help="ignore the masks")
    tr.add_argument("--config", default="", help="JSON file with a config (e.g. a run's config.json)")
    tr.add_argument("--gui", action="store_true", help="live preview window while training (ti.GUI)")
    tr.add_argument("--gui-frames", default="", metavar="DIR",
                    help="save preview frames as PNGs into DIR (headless unless --gui has a display)")
    tr.add_argument("--gui-share", type=float, default=0.2, help="largest share of time the preview may take")
    tr.add_argument("--gui-width", type=int, default=160, help="preview render width in pixels")
    me = sub.add_parser("mesh", help="extract a mesh from a run's latest checkpoint")
    me.add_argument("--out", required=True, help="the run folder")
    me.add_argument("--arch", default="auto")
    me.add_argument("--resolution", type=int, default=0)
    me.add_argument("--clean", action="store_true", help="cull with the masks as NeuS's DTU evaluation does")
    me.add_argument("--name", default="", help="output file name (default mesh_<step>.ply)")
    re_ = sub.add_parser("render", help="render a camera path of a run's latest checkpoint into RUN/renders/")
    re_.add_argument("--out", required=True, help="the run folder")
    re_.add_argument("--arch", default="auto")
    re_.add_argument("--path", default="orbit", choices=("train", "test", "orbit"), help="camera path")
    re_.add_argument("--frames", type=int, default=0, help="frames (orbit: default 36; views: default all)")
    re_.add_argument("--downscale", type=int, default=1, help="image size 1/K of the training resolution")
    re_.add_argument("--modes", default="rgb,normal,depth", help="comma-separated: rgb, normal, depth")
    re_.add_argument("--gif", action="store_true", help="also write <mode>.gif")
    re_.add_argument("--mp4", action="store_true", help="also write <mode>.mp4 (needs imageio-ffmpeg or av)")
    re_.add_argument("--fps", type=int, default=12)
    ev = sub.add_parser("eval", help="score a run: held-out PSNR/SSIM/mask IoU, Chamfer; writes RUN/eval.json")
    ev.add_argument("--out", required=True, help="the run folder")
    ev.add_argument("--arch", default="auto")
    gt = ev.add_mutually_exclusive_group()
    gt.add_argument("--gt-points", default="", metavar="PLY", help="ground-truth point cloud, world units")
    gt.add_argument("--gt-mesh", default="", metavar="PLY", help="ground-truth mesh, world units")
    ev.add_argument("--dtu-dir", default="", help="folder with DTU's Points/stl and ObsMask (official protocol)")
    ev.add_argument("--scan", type=int, default=0, help="DTU scan number (default: from the scene name)")
    ev.add_argument("--clean", action="store_true", help="cull the mesh with the masks first (NeuS's DTU step)")
    ev.add_argument("--mesh", default="", metavar="PLY", help="score this mesh instead of the run's")
    ev.add_argument("--downscale", type=int, default=1, help="render held-out views at 1/K resolution")
    ev.add_argument("--points", type=int, default=100000, help="points sampled per surface for Chamfer")
    from taichi_neus.app import poses_cmd
    poses_cmd.add_parser(sub)
    return ap


def _parse(argv):
    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    overrides = []
    i = 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--") or i + 1 >= len(rest):
            raise UserInputError(f"unrecognised argument '{tok}'; see 'taichi-neus {args.cmd} --help'.")
        key = ALIASES.get(tok[2:], tok[2:])
        overrides.append((key, rest[i + 1]))
        i += 2
    return args, overrides


def _make_config(args, overrides) -> Config:
    cfg = Config()
    if getattr(args, "config", ""):
        p = pathlib.Path(args.config)
        if not p.is_file():
            raise UserInputError(f"config file {p} does not exist.")
        try:
            cfg = Config.from_dict(json.loads(p.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise UserInputError(f"config file {p} is not a valid taichi_neus config ({exc}).") from None
    known = dict(_flatten(cfg))
    for key, raw in overrides:
        if key not in known:
            raise UserInputError(f"unknown option --{key}; see 'taichi-neus train --help' and config.py.")
        _set(cfg, key, raw)
    return cfg


def _load_scene(cfg: Config):
    from taichi_neus.data import default_scene_path
    from taichi_neus.data.loader import load_scene
    path = cfg.data.path or str(default_scene_path())
    return load_scene(path, downscale=cfg.data.downscale, holdout_every=cfg.data.holdout_every,
                      use_masks=cfg.data.use_masks, background=cfg.data.alpha_background, roi=cfg.data.roi)


def cmd_train(args, overrides) -> int:
    from taichi_neus import runtime
    cfg = _make_config(args, overrides)
    cfg.arch = args.arch
    if args.data:
        cfg.data.path = args.data
    if args.no_mask:
        cfg.data.use_masks = False
    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} is a file, not a folder; choose another --out.")
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise UserInputError(f"output folder {out} already holds files; choose another --out, or pass --resume "
                             "to continue the run in it.")
    if args.resume and not (out / "config.json").is_file():
        raise UserInputError(f"--resume: {out} holds no run (no config.json); start it without --resume.")
    if args.resume:
        saved = Config.from_dict(json.loads((out / "config.json").read_text()))
        saved.train.iters = cfg.train.iters if any(k == "train.iters" for k, _ in overrides) else saved.train.iters
        cfg = saved
    preview_settings = _preview_settings(args)
    from taichi_neus.memory import check_step
    check_step(cfg)  # an impossible batch is refused before anything is allocated or written
    runtime.init(cfg.arch)
    scene = _load_scene(cfg)
    if scene.background is not None and not args.resume and not any(k == "render.background" for k, _ in overrides):
        cfg.render.background = tuple(scene.background)  # RGBA composited on this colour: render onto it too
    if not cfg.data.roi and not (scene.path / "cameras_sphere.npz").is_file():
        # NeRF-synthetic / COLMAP: keep the chosen unit sphere in config.json, so --resume and mesh reuse it
        cfg.data.roi = (*(float(x) for x in scene.scale_mat[:3, 3]), float(scene.scale_mat[0, 0]))
    masks = "yes" if scene.masks is not None and cfg.data.use_masks else "no"
    print(f"[taichi_neus] scene {scene.name}: {scene.n_views} views {scene.W}x{scene.H}, "
          f"{len(scene.train_ids)} train / {len(scene.test_ids)} held out, masks={masks}")
    from taichi_neus.train.trainer import Trainer
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.to_json())
    tr = Trainer(scene, cfg, out)
    if args.resume:
        step = tr.resume_latest()
        if step is None:
            print("[taichi_neus] no checkpoint: fresh start")
        else:
            digest = hashlib.sha1(tr.state()["params"].tobytes()).hexdigest()[:16]
            print(f"[taichi_neus] resumed at step {step} from checkpoints/ckpt_{step:07d}.npz "
                  f"(parameters sha1 {digest})")
    t0 = time.time()
    preview = None
    if preview_settings is not None:
        from taichi_neus.app.preview import LivePreview
        preview = LivePreview(tr, preview_settings)
    from taichi_neus.app.progress import Progress
    bar = Progress(cfg.train.iters, start=tr.step, every=cfg.train.log_every)

    def on_step(step: int, st: dict) -> None:
        bar.update(step, loss=st["loss"], psnr=st["psnr"], s=st["s"], spr=st["samples_per_ray"])

    try:
        summary = tr.fit(callback=preview, on_step=on_step)
    except BaseException:
        bar.close()
        if preview is not None:
            preview.close(finish=False)
        raise
    bar.close()
    if preview is not None:
        preview.close()
        summary["preview_share"] = preview.share
    t_mesh = time.time()
    from taichi_neus.export.mesh import mesh_from_run
    mesh = mesh_from_run(tr)
    mesh_path = out / f"mesh_{tr.step:06d}.ply"
    if not mesh.is_empty:
        mesh.save(mesh_path, overwrite=True)
    evals = [tr.evaluate_view(int(v), cfg.train.val_downscale) for v in scene.test_ids]
    metrics = {**summary, "wall_time_s": time.time() - t0, "mesh_time_s": time.time() - t_mesh,
               "mesh": str(mesh_path) if not mesh.is_empty else None,
               "mesh_vertices": int(len(mesh.vertices)), "mesh_faces": int(len(mesh.faces)),
               "heldout_views": [int(v) for v in scene.test_ids],
               "heldout_psnr": float(sum(e["psnr"] for e in evals) / max(len(evals), 1)) if evals else None}
    if evals and "psnr_masked" in evals[0]:
        metrics["heldout_psnr_masked"] = float(sum(e["psnr_masked"] for e in evals) / len(evals))
    if not cfg.data.path:
        metrics.update(_synthetic_mesh_error(mesh))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    return 0


def _preview_settings(args):
    """The live preview's settings from ``--gui``/``--gui-frames``, or None; refuses ``--gui`` without a display
    (checked before anything is written)."""
    if not (args.gui or args.gui_frames):
        return None
    from taichi_neus.app.preview import PreviewSettings, display_available
    show = bool(args.gui) and display_available()
    if args.gui and not show and not args.gui_frames:
        raise UserInputError("--gui needs a display and none was found (DISPLAY is not set); run with "
                             "--gui-frames DIR to save the preview as PNG frames instead.")
    st = PreviewSettings(width=args.gui_width, share=args.gui_share, frames_dir=args.gui_frames, show=show)
    st.check()
    return st


def _synthetic_mesh_error(mesh) -> dict:
    """Chamfer distance of the mesh to the built-in scene's exact surface (world units)."""
    if mesh.is_empty:
        return {"chamfer_to_true_surface": None}
    from taichi_neus.data import sample_surface
    from taichi_neus.export.evaluation import chamfer, sample_mesh_points
    pts = sample_mesh_points(mesh.vertices, mesh.faces, n=20000, seed=0)
    c = chamfer(pts, sample_surface(20000, seed=1))
    return {"chamfer_to_true_surface": float(c["chamfer"]), "accuracy": float(c["accuracy"]),
            "completeness": float(c["completeness"])}


def cmd_mesh(args) -> int:
    from taichi_neus import runtime
    out = pathlib.Path(args.out)
    if not (out / "config.json").is_file():
        raise UserInputError(f"{out} holds no run (no config.json); train first or point --out at a run folder.")
    cfg = Config.from_dict(json.loads((out / "config.json").read_text()))
    runtime.init(args.arch)
    scene = _load_scene(cfg)
    from taichi_neus.train.trainer import Trainer
    tr = Trainer(scene, cfg, out)
    if tr.resume_latest() is None:
        raise UserInputError(f"{out}/checkpoints holds no readable checkpoint.")
    from taichi_neus.export.mesh import mesh_from_run
    mesh = mesh_from_run(tr, args.resolution or None, clean=args.clean)
    path = out / (args.name or f"mesh_{tr.step:06d}{'_clean' if args.clean else ''}.ply")
    mesh.save(path, overwrite=False)
    print(f"[taichi_neus] wrote {path} ({len(mesh.vertices)} vertices, {len(mesh.faces)} faces)")
    return 0


def cmd_render(args) -> int:
    from taichi_neus.app.results import load_run, parse_modes, render_run
    modes = parse_modes(args.modes)
    if args.frames < 0:
        raise UserInputError(f"--frames must be 0 (default) or positive, got {args.frames}.")
    if args.mp4:
        from taichi_neus.app.results import require_mp4
        require_mp4()  # refuse before loading anything
    _, _, tr = load_run(args.out, args.arch)
    r = render_run(tr, args.path, args.frames, args.downscale, modes, gif=args.gif, mp4=args.mp4, fps=args.fps)
    print(f"[taichi_neus] wrote {r['frames']} frames ({r['size'][0]}x{r['size'][1]}, {', '.join(modes)}) "
          f"of step {tr.step} into {r['dir']}")
    return 0


def cmd_eval(args) -> int:
    from taichi_neus.app.results import evaluate_geometry, evaluate_images, format_table, load_run, run_mesh
    for flag, path in (("--gt-points", args.gt_points), ("--gt-mesh", args.gt_mesh), ("--mesh", args.mesh)):
        if path and not pathlib.Path(path).is_file():
            raise UserInputError(f"{flag} {path} does not exist.")
    if args.dtu_dir and not pathlib.Path(args.dtu_dir).is_dir():
        raise UserInputError(f"--dtu-dir {args.dtu_dir} is not a folder.")
    _, _, tr = load_run(args.out, args.arch)
    result = {"run": str(args.out), "step": tr.step, "images": evaluate_images(tr, args.downscale)}
    mesh, mesh_path = run_mesh(tr, clean=args.clean, mesh_path=args.mesh)
    result.update(mesh=str(mesh_path), clean=bool(args.clean), mesh_vertices=int(len(mesh.vertices)),
                  mesh_faces=int(len(mesh.faces)))
    result["geometry"] = evaluate_geometry(tr, mesh, args.gt_points, args.gt_mesh, args.dtu_dir, args.scan,
                                           n_points=args.points)
    path = pathlib.Path(args.out) / "eval.json"
    path.write_text(json.dumps(result, indent=2))
    print(format_table(result))
    print(f"[taichi_neus] wrote {path}")
    return 0


def main(argv=None) -> int:
    from taichi_neus.runtime import BackendError
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, overrides = _parse(argv)
        if args.cmd == "train":
            return cmd_train(args, overrides)
        if overrides:
            raise UserInputError(f"unrecognised argument '--{overrides[0][0]}' for '{args.cmd}'.")
        if args.cmd == "poses":
            from taichi_neus.app import poses_cmd
            return poses_cmd.run(args)
        if args.cmd == "render":
            return cmd_render(args)
        if args.cmd == "eval":
            return cmd_eval(args)
        return cmd_mesh(args)
    except (UserInputError, BackendError) as exc:
        print(f"taichi-neus: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("taichi-neus: interrupted; resume with --resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
