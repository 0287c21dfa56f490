"""``taichi-neus``: ``train`` (photographs → mesh), and ``mesh``, ``render``, ``eval`` on a run folder.

Every field of :class:`taichi_neus.train.config.Config` is an option of ``train``, generated from the
dataclasses (``--train.iters 2000``, ``--render.n_fine=48``, booleans as ``--data.use_masks`` /
``--no-data.use_masks``), grouped by section in ``--help`` with the field's comment, default and allowed
values; common ones have short aliases (``--iters``, ``--downscale``, ``--seed``, ``--data``). Values are
checked by :meth:`Config.validate`. Bad input is reported as one sentence and exit status 2 — never a
traceback — before anything is written.

The parser is plain argparse: it already gives ``--key=value``, ``--x/--no-x`` flags, argument groups
and subcommands; what a library would add (options from dataclasses) is the 30 lines of :func:`_add_config_options`,
and the refusals keep this project's one-sentence form (``taichi-neus: error: ...``).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import pathlib
import re
import sys
import time

# Taichi prints a version banner on stdout when imported; the command's stdout is the user's (e.g.
# ``--print-config > cfg.json``), and the version is in ``--version`` and the package metadata.
os.environ.setdefault("ENABLE_TAICHI_HEADER_PRINT", "False")

from taichi_neus.errors import UserInputError  # noqa: E402
from taichi_neus.train.config import SECTIONS, Config, options, set_value  # noqa: E402

PROG = "taichi-neus"
# short forms of common config options: config key -> extra option strings
ALIASES = {"data.path": ("--data",), "train.iters": ("--iters",), "data.downscale": ("--downscale",),
           "train.seed": ("--seed",), "mesh.resolution": ("--mesh-resolution",)}
_METAVARS = {int: "N", float: "X", str: "TEXT", tuple: "X,Y,...", "data.path": "DIR", "data.roi": "CX,CY,CZ,R",
             "render.background": "R,G,B"}


class _Parser(argparse.ArgumentParser):
    """argparse with this project's refusals: one sentence (a UserInputError), a close match for a typo."""

    def error(self, message: str):
        m = re.match(r"argument ([^:]+): (.*)", message)
        if m:
            opt, rest = m.group(1).split("/")[0], m.group(2)
            if (opt == "cmd" or opt.startswith("{")) and rest.startswith("invalid choice"):
                raise UserInputError(_unknown_command(rest))
            if rest == "expected one argument":
                raise UserInputError(f"{opt} needs a value; see '{self.prog} --help'.")
            if rest.startswith("ignored explicit argument"):
                raise UserInputError(f"{opt} is a flag and takes no value (use --no-{opt[2:]} for off).")
            raise UserInputError(f"{opt} {rest}".rstrip(".") + ".")
        if message.startswith("the following arguments are required: cmd"):
            raise UserInputError(f"choose a command: train, mesh, render or eval (see '{PROG} --help').")
        raise UserInputError(message.rstrip(".") + f"; see '{self.prog} --help'.")


def _unknown_command(rest: str) -> str:
    got = re.search(r"invalid choice: '([^']*)'", rest)
    word = got.group(1) if got else "?"
    near = difflib.get_close_matches(word, ["train", "mesh", "render", "eval"], n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return f"unknown command '{word}'{hint}; the commands are train, mesh, render and eval."


def _typed(tp):
    """argparse ``type=`` for a config field of python type ``tp`` (the range is checked by validate)."""
    def parse(raw: str):
        try:
            if tp is int:
                return int(raw)
            if tp is float:
                return float(raw)
            if tp is tuple:
                return tuple(float(x) for x in raw.split(",")) if raw.strip() else ()
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects {_WORDS[tp]}, got '{raw}'") from None
        return raw
    parse.__name__ = tp.__name__
    return parse


_WORDS = {int: "an integer", float: "a number", tuple: "comma-separated numbers"}


def _shown(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, tuple):
        return ",".join(f"{x:g}" for x in v) if v else "(none)"
    if isinstance(v, float):
        return f"{v:.6g}"
    if v == "":
        return "(none)"
    return str(v)


def _add_config_options(ap: argparse.ArgumentParser, only: str | None = None) -> None:
    """One option per leaf field of Config (of the section ``only`` if given), in a group per section;
    defaults are SUPPRESSed, so the namespace holds exactly the options the user gave."""
    groups = {}
    for opt in options():
        if only is not None and not opt.key.startswith(only + "."):
            continue
        section = opt.key.split(".")[0] if "." in opt.key else ""
        if section not in groups:
            title = f"--{section}.* options: {SECTIONS.get(section, section)}" if section else "backend"
            groups[section] = ap.add_argument_group(title)
        g = groups[section]
        names = (f"--{opt.key}", *ALIASES.get(opt.key, ()))
        extra = f"; {opt.limits.describe()}" if opt.limits is not None and opt.limits.describe() \
            and not opt.limits.choices else ""
        text = f"{opt.help} [default: {_shown(opt.default)}{extra}]".replace("%", "%%")
        if opt.type is bool:
            g.add_argument(*names, dest=opt.key, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=text)
            continue
        metavar = "{" + ",".join(opt.limits.choices) + "}" if opt.limits is not None and opt.limits.choices \
            else _METAVARS.get(opt.key, _METAVARS[opt.type])
        g.add_argument(*names, dest=opt.key, type=_typed(opt.type), default=argparse.SUPPRESS, metavar=metavar,
                       help=text)


def _add_run_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", metavar="RUN", help="the run folder ('taichi-neus train --out' wrote it)")
    p.add_argument("--out", metavar="RUN", help="the run folder, as an option (same as RUN)")
    p.add_argument("--arch", default="auto", metavar="{auto,cpu,cuda,vulkan,metal}",
                   help="Taichi backend [default: auto]")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output instead of refusing")


def build_parser() -> argparse.ArgumentParser:
    from taichi_neus import __version__

    ap = _Parser(prog=PROG, description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{train,poses,mesh,render,eval}", parser_class=_Parser)
    kw = {"allow_abbrev": False, "formatter_class": argparse.RawDescriptionHelpFormatter}
    tr = sub.add_parser("train", help="train on a scene folder and write a mesh", **kw,
                        usage=f"{PROG} train [--data DIR] [--out DIR] [--iters N] [--arch ARCH] [--resume] "
                              "[--print-config] [--SECTION.FIELD VALUE ...]",
                        description="Train on a scene folder (default: the built-in synthetic scene) and write a "
                                    "run folder: checkpoints, a mesh, a labelled result picture and metrics.",
                        epilog="Aliases: " + ", ".join(f"{a} = --{k}" for k, al in ALIASES.items() for a in al)
                               + ", --no-mask = --no-data.use_masks.\nValues: --key value or --key=value; "
                               "later options win over --config, which wins over the defaults.")
    run = tr.add_argument_group("run")
    run.add_argument("--out", default=None, metavar="DIR",
                     help="output folder, refused if it holds another run [default: runs/<scene>-<date>-<time>, "
                          "numbered if taken]")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument("--config", default="", metavar="JSON", help="a config file, e.g. a run's config.json")
    run.add_argument("--print-config", action="store_true",
                     help="print the resolved configuration as JSON and exit (nothing is written)")
    run.add_argument("--no-mask", dest="data.use_masks", action="store_false", default=argparse.SUPPRESS,
                     help="ignore the masks (same as --no-data.use_masks)")
    gui = tr.add_argument_group("live preview")
    gui.add_argument("--gui", action="store_true", help="live preview window while training (ti.GUI)")
    gui.add_argument("--gui-frames", default="", metavar="DIR",
                     help="save preview frames as PNGs into DIR (headless unless --gui has a display)")
    gui.add_argument("--gui-share", type=_typed(float), default=0.2, metavar="X",
                     help="largest share of time the preview may take [default: 0.2]")
    gui.add_argument("--gui-width", type=_typed(int), default=160, metavar="N",
                     help="preview render width in pixels [default: 160]")
    _add_config_options(tr)

    me = sub.add_parser("mesh", help="extract a mesh from a run's latest checkpoint", **kw,
                        description="Extract a mesh from the run's latest checkpoint into RUN/mesh_<step>.ply.")
    _add_run_argument(me)
    me.add_argument("--resolution", type=_typed(int), default=0, metavar="N",
                    help="marching-cubes cells per axis [default: the run's --mesh.resolution]")
    me.add_argument("--clean", action="store_true", help="cull with the masks as NeuS's DTU evaluation does")
    me.add_argument("--name", default="", metavar="FILE", help="output file in RUN [default: mesh_<step>.ply]")
    _add_config_options(me, "mesh")  # --mesh.* as train has them; the defaults are the run's config

    re_ = sub.add_parser("render", help="render a camera path of a run into RUN/renders/<path>/", **kw,
                         description="Render a camera path of the run's latest checkpoint into RUN/renders/<path>/.")
    _add_run_argument(re_)
    re_.add_argument("--path", default="orbit", choices=("train", "test", "orbit"), help="camera path [default: orbit]")
    re_.add_argument("--name", default="", metavar="NAME", help="write into RUN/renders/NAME/ [default: the path]")
    re_.add_argument("--frames", type=_typed(int), default=0, metavar="N",
                     help="frames (orbit: default 36; views: default all)")
    re_.add_argument("--downscale", type=_typed(int), default=1, metavar="K",
                     help="image size 1/K of the training resolution [default: 1]")
    re_.add_argument("--modes", default="rgb,normal,depth", help="comma-separated: rgb, normal, depth [default: all]")
    re_.add_argument("--gif", action="store_true", help="also write <mode>.gif")
    re_.add_argument("--mp4", action="store_true", help="also write <mode>.mp4 (needs imageio-ffmpeg or av)")
    re_.add_argument("--fps", type=_typed(int), default=12, metavar="N", help="frames per second [default: 12]")

    ev = sub.add_parser("eval", help="score a run: held-out PSNR/SSIM/mask IoU, Chamfer; writes RUN/eval.json", **kw,
                        description="Score the run's latest checkpoint: held-out PSNR, SSIM, mask IoU and the "
                                    "mesh's Chamfer distance; writes RUN/eval.json and prints a table.")
    _add_run_argument(ev)
    ev.add_argument("--name", default="", metavar="FILE", help="write the scores to RUN/FILE [default: eval.json]")
    gt = ev.add_mutually_exclusive_group()
    gt.add_argument("--gt-points", default="", metavar="PLY", help="ground-truth point cloud, world units")
    gt.add_argument("--gt-mesh", default="", metavar="PLY", help="ground-truth mesh, world units")
    ev.add_argument("--dtu-dir", default="", help="folder with DTU's Points/stl and ObsMask (official protocol)")
    ev.add_argument("--scan", type=_typed(int), default=0, help="DTU scan number (default: from the scene name)")
    ev.add_argument("--clean", action="store_true", help="cull the mesh with the masks first (NeuS's DTU step)")
    ev.add_argument("--mesh", default="", metavar="PLY", help="score this mesh instead of the run's")
    ev.add_argument("--downscale", type=_typed(int), default=1, metavar="K",
                    help="render held-out views at 1/K resolution [default: 1]")
    ev.add_argument("--points", type=_typed(int), default=100000, metavar="N",
                    help="points sampled per surface for Chamfer [default: 100000]")
    from taichi_neus.app import poses_cmd
    poses_cmd.add_parser(sub)
    return ap


def _option_strings(ap: argparse.ArgumentParser, cmd: str) -> list[str]:
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction)).choices[cmd]
    return sorted({s for a in sub._actions for s in a.option_strings if s.startswith("--")})


def _suggest(token: str, known: list[str]) -> str:
    """`` (did you mean --x?)`` for an unknown option, or ``''``."""
    name = token.split("=", 1)[0]
    bare = name.lstrip("-")
    tails = {s: s[2:].rsplit(".", 1)[-1] for s in known}
    exact = [s for s, t in tails.items() if t == bare or t == bare.replace("-", "_")]
    near = exact[:1] or difflib.get_close_matches(name, known, n=1, cutoff=0.6) \
        or [s for s in known if tails[s] in difflib.get_close_matches(bare, list(tails.values()), n=1, cutoff=0.7)][:1]
    return f" (did you mean {near[0]}?)" if near else ""


def parse_args(argv) -> tuple[argparse.Namespace, Config | None, dict]:
    """Parse a command line.

    Returns:
        ``(args, cfg, overrides)``: for ``train``, ``cfg`` is the resolved and validated Config
        (defaults < ``--config`` file < options) and ``overrides`` maps each config key the user gave
        on the command line (aliases resolved: ``--iters`` → ``'train.iters'``, ``--data`` →
        ``'data.path'``, ``--no-mask`` → ``'data.use_masks'``) to its typed value; for the other
        commands ``cfg`` is None and ``overrides`` empty, except ``mesh``, whose ``overrides`` are the
        ``--mesh.*`` options given (checked like train's, to be applied to the run's config).

    Raises:
        UserInputError: one sentence for any bad option or value (typos get a close match).
    """
    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    if rest:
        tok = rest[0]
        if tok.startswith("-"):
            hint = _suggest(tok, _option_strings(ap, args.cmd))
            raise UserInputError(f"unknown option {tok.split('=', 1)[0]}{hint}; "
                                 f"'{PROG} {args.cmd} --help' lists every option.")
        raise UserInputError(f"unexpected argument '{tok}' for '{args.cmd}'; see '{PROG} {args.cmd} --help'.")
    keys = [o.key for o in options()]
    overrides = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    if args.cmd == "mesh":
        overrides = {k: v for k, v in overrides.items() if k.startswith("mesh.")}  # not its own --arch
        _make_config("", overrides)  # refuse a bad value now, before the run is loaded
        return args, None, overrides
    if args.cmd != "train":
        return args, None, {}
    cfg = _make_config(args.config, overrides)
    return args, cfg, overrides


def _make_config(config_file: str, overrides: dict) -> Config:
    cfg = Config()
    if config_file:
        p = pathlib.Path(config_file)
        if not p.is_file():
            raise UserInputError(f"config file {p} does not exist.")
        try:
            cfg = Config.from_dict(json.loads(p.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise UserInputError(f"config file {p} is not a valid taichi_neus config ({exc}).") from None
        except UserInputError as exc:
            raise UserInputError(f"config file {p}: {exc}") from None
    for key, value in overrides.items():
        set_value(cfg, key, value)
    return cfg.validate()


def default_out(cfg: Config, root: str | pathlib.Path = "runs", now: float | None = None) -> pathlib.Path:
    """``runs/<scene>-<YYYYmmdd-HHMMSS>``, with ``-2``, ``-3``, … appended if that folder exists, so a
    second run started in the same second never lands in the first one's folder."""
    scene = pathlib.Path(cfg.data.path).name if cfg.data.path else "synthetic"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    base = pathlib.Path(root) / f"{scene or 'scene'}-{stamp}"
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


def _given_options(cfg: Config, args, overrides: dict) -> dict:
    """{dotted key: typed value} of the options given explicitly, for ``--resume`` to apply or refuse:
    the command line's, and with ``--config FILE`` every field of the file."""
    given = {}
    if args.config:
        for key in (o.key for o in options()):
            obj = cfg
            for part in key.split("."):
                obj = getattr(obj, part)
            given[key] = obj
    given.update(overrides)
    return given


def _load_scene(cfg: Config):
    from taichi_neus.data import default_scene_path
    from taichi_neus.data.loader import load_scene
    path = cfg.data.path or str(default_scene_path())
    return load_scene(path, downscale=cfg.data.downscale, holdout_every=cfg.data.holdout_every,
                      use_masks=cfg.data.use_masks, background=cfg.data.alpha_background, roi=cfg.data.roi)


def say(msg: str) -> None:
    print(f"[taichi_neus] {msg}", flush=True)


def cmd_train(args, cfg: Config, overrides: dict) -> int:
    from taichi_neus import runtime
    if args.print_config:
        print(cfg.to_json())
        return 0
    runtime.check_arch(cfg.arch)
    if args.out is None:
        if args.resume:
            raise UserInputError("--resume needs --out RUN, the run folder to continue.")
        out = default_out(cfg)
    else:
        out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} is a file, not a folder; choose another --out.")
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise UserInputError(f"output folder {out} already holds files; choose another --out, or pass --resume "
                             "to continue the run in it.")
    if args.resume and not (out / "config.json").is_file():
        raise UserInputError(f"--resume: {out} holds no run (no config.json); start it without --resume.")
    resume_changes = []
    if args.resume:  # the saved configuration, with the options given again applied or refused
        from taichi_neus.app.resume import merge_resume_config
        saved = Config.from_dict(json.loads((out / "config.json").read_text()))
        cfg, resume_changes = merge_resume_config(saved, _given_options(cfg, args, overrides))
    preview_settings = _preview_settings(args)
    from taichi_neus.memory import check_step
    check_step(cfg)  # an impossible batch is refused before anything is allocated or written
    runtime.init(cfg.arch)
    scene = _load_scene(cfg)
    if scene.background is not None and not args.resume and "render.background" not in overrides:
        cfg.render.background = tuple(scene.background)  # RGBA composited on this colour: render onto it too
    if not cfg.data.roi and not (scene.path / "cameras_sphere.npz").is_file():
        # NeRF-synthetic / COLMAP: keep the chosen unit sphere in config.json, so --resume and mesh reuse it
        cfg.data.roi = (*(float(x) for x in scene.scale_mat[:3, 3]), float(scene.scale_mat[0, 0]))
    masks = "yes" if scene.masks is not None and cfg.data.use_masks else "no"
    say(f"scene {scene.name}: {scene.n_views} views {scene.W}x{scene.H}, "
        f"{len(scene.train_ids)} train / {len(scene.test_ids)} held out, masks={masks}")
    from taichi_neus.train.trainer import Trainer
    out.mkdir(parents=True, exist_ok=True)
    say(f"run folder: {out}")
    (out / "config.json").write_text(cfg.to_json())
    for change in resume_changes:
        print(f"[taichi_neus] resume with {change} (recorded in {out / 'config.json'})")
    tr = Trainer(scene, cfg, out)
    if args.resume:
        step = tr.resume_latest()
        if step is None:
            say("no checkpoint: fresh start")
        else:
            digest = hashlib.sha1(tr.state()["params"].tobytes()).hexdigest()[:16]
            say(f"resumed at step {step} from checkpoints/ckpt_{step:07d}.npz (parameters sha1 {digest})")
    t0 = time.time()
    preview = None
    if preview_settings is not None:
        from taichi_neus.app.preview import LivePreview
        preview = LivePreview(tr, preview_settings)
    from taichi_neus.app.progress import LEGEND, Progress, step_fields
    budget = cfg.train.time_budget
    say(f"training {cfg.train.iters} steps" + (f" or {budget:g} s, whichever comes first" if budget > 0 else "")
        + f"; {LEGEND}")
    bar = Progress(cfg.train.iters, start=tr.step, every=cfg.train.log_every, start_fraction=tr.progress())

    def on_step(step: int, st: dict) -> None:
        # with a time budget the run's share done is the trainer's (steps or time, whichever is further)
        bar.update(step, *step_fields(st), fraction=tr.progress() if budget > 0 else None)

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
    metrics = finish_run(tr, summary, t0)
    from taichi_neus.app.results import format_train_summary
    print(format_train_summary(metrics, out))
    return 0


def finish_run(tr, summary: dict, t0: float) -> dict:
    """After training: the mesh, the held-out evaluation, the labelled result picture and metrics.json,
    each stage announced and each file named as it is written. Returns the metrics."""
    cfg, scene, out = tr.cfg, tr.scene, tr.out
    t_mesh = time.time()
    say(f"mesh: marching cubes on {cfg.mesh.resolution}³ cells over the unit sphere …")
    from taichi_neus.export.mesh import mesh_from_run
    mesh = mesh_from_run(tr, log=say)
    mesh_path = out / f"mesh_{tr.step:06d}.ply"
    if mesh.is_empty:
        say("mesh: the field has no surface inside the unit sphere, so no mesh was written "
            "(see 'When results are poor' in the README)")
    else:
        mesh.save(mesh_path, overwrite=True)
        say(f"mesh: wrote {mesh_path} ({len(mesh.vertices):,} vertices, {len(mesh.faces):,} faces)")
    from taichi_neus.app.results import evaluate_images
    from taichi_neus.export.mesh_raster import silhouette_iou
    if len(scene.test_ids):
        say(f"evaluation: rendering {len(scene.test_ids)} held-out views at the training resolution, "
            f"{scene.W}x{scene.H} …")
    quiet = lambda *a: None  # noqa: E731
    view = int(scene.test_ids[0]) if len(scene.test_ids) else int(scene.train_ids[0])
    full = evaluate_images(tr, 1, log=quiet, keep=(view,))  # the picture below shows this render
    # the figure runs before 2026-11-27 reported: half the training resolution, one centre ray per pixel
    # against a box-averaged photo (kept under its own name so old and new runs compare)
    half = evaluate_images(tr, cfg.train.val_downscale, log=quiet) if len(scene.test_ids) else {}
    from taichi_neus.app.preview import write_result_image
    ev = tr.evaluate_view(view, 1, render=full.get("renders", {}).get(view))
    picture = write_result_image(tr, view, ev, held_out=bool(len(scene.test_ids)))
    say(f"picture: wrote {picture} (photo | render | normals | depth of view {view})")
    mean, half_mean = full.get("mean", {}), half.get("mean", {})
    metrics = {**summary, "wall_time_s": time.time() - t0, "mesh_time_s": time.time() - t_mesh,
               "mesh": str(mesh_path) if not mesh.is_empty else None,
               "mesh_vertices": int(len(mesh.vertices)), "mesh_faces": int(len(mesh.faces)),
               "heldout_views": [int(v) for v in scene.test_ids], "heldout_size": [scene.W, scene.H],
               "heldout_psnr": mean.get("psnr"), "heldout_ssim": mean.get("ssim"),
               "heldout_psnr_half_res": half_mean.get("psnr"),
               "heldout_half_res_size": half.get("size"), "result_image": str(picture)}
    if "psnr_masked" in mean:
        metrics.update(heldout_psnr_masked=mean["psnr_masked"], heldout_ssim_masked=mean["ssim_masked"],
                       heldout_render_mask_iou=mean["mask_iou"],
                       heldout_psnr_masked_half_res=half_mean.get("psnr_masked"))
        if not mesh.is_empty:
            metrics["heldout_mesh_mask_iou"] = silhouette_iou(mesh, scene, scene.test_ids)
    if not cfg.data.path:
        metrics.update(_synthetic_mesh_error(mesh))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    say(f"metrics: wrote {out / 'metrics.json'}")
    return metrics


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


SURFACE_TOL = 0.02  # half-width of the "near" band of surface_shares on the built-in scene, unit-sphere units


def _synthetic_mesh_error(mesh) -> dict:
    """Chamfer distance of the mesh to the built-in scene's exact surface (world units), and the shares of
    the mesh's area inside, outside and near it (``surface_*``; the SDF and its band of ±SURFACE_TOL in
    unit-sphere units: the mesh is mapped back through the scene's ``scale_mat``)."""
    if mesh.is_empty:
        return {"chamfer_to_true_surface": None, "surface_inside": None, "surface_outside": None,
                "surface_near": None}
    import numpy as np

    from taichi_neus.data import sample_surface
    from taichi_neus.data.synthetic import scale_mat, synthetic_sdf_unit
    from taichi_neus.export.evaluation import chamfer, sample_mesh_points, surface_shares
    pts = sample_mesh_points(mesh.vertices, mesh.faces, n=20000, seed=0)
    c = chamfer(pts, sample_surface(20000, seed=1))
    S = scale_mat()
    unit = (mesh.vertices.astype(np.float64) - S[:3, 3]) @ np.linalg.inv(S[:3, :3]).T
    sh = surface_shares(unit, mesh.faces, synthetic_sdf_unit, tol=SURFACE_TOL)
    return {"chamfer_to_true_surface": float(c["chamfer"]), "accuracy": float(c["accuracy"]),
            "completeness": float(c["completeness"]), "surface_inside": sh["inside"],
            "surface_outside": sh["outside"], "surface_near": sh["near"], "surface_tol_unit": SURFACE_TOL}


# ------------------------------------------------------------------ commands on a run folder
def _run_folder(args) -> pathlib.Path:
    """The run folder from ``RUN`` or ``--out`` (checked: exists, holds config.json and a checkpoint file;
    the checkpoint is not read yet), and the arch, checked without starting Taichi."""
    from taichi_neus import runtime
    from taichi_neus.app.results import check_run_folder
    if args.run and args.out and pathlib.Path(args.run) != pathlib.Path(args.out):
        raise UserInputError(f"give the run folder once, as RUN or as --out, not both ({args.run} and {args.out}).")
    folder = args.run or args.out
    if not folder:
        raise UserInputError(f"name the run folder: '{PROG} {args.cmd} RUN' (the folder 'taichi-neus train --out' "
                             "wrote).")
    runtime.check_arch(args.arch)
    check_run_folder(folder)
    return pathlib.Path(folder)


def _refuse_existing(path: pathlib.Path, overwrite: bool, other: str) -> None:
    if overwrite or not path.exists():
        return
    if path.is_dir() and not any(path.iterdir()):
        return
    raise UserInputError(f"{path} already exists; pass --overwrite to replace it, or {other}.")


def _positive(flag: str, value: int, zero_ok: bool = False) -> None:
    if value < (0 if zero_ok else 1):
        raise UserInputError(f"{flag} must be {'0 (default) or ' if zero_ok else ''}a positive integer, got {value}.")


def cmd_mesh(args, overrides: dict | None = None) -> int:
    """``taichi-neus mesh RUN``: ``--mesh.*`` options (``overrides``) replace the run's config values for this
    mesh; ``--resolution`` and ``--clean`` are the older spellings of ``--mesh.resolution`` and
    ``--mesh.clean_with_masks`` (mask culling stays off unless asked for, whatever the run used)."""
    from taichi_neus.app.results import latest_checkpoint_step, load_run
    overrides = overrides or {}
    run = _run_folder(args)
    if args.resolution != 0 and args.resolution < 2:
        raise UserInputError(f"--resolution must be at least 2 cells per axis (0: the run's), got {args.resolution}.")
    clean = bool(args.clean or overrides.get("mesh.clean_with_masks", False))
    suffix = "_clean" if clean else ""

    def target(step: int) -> pathlib.Path:
        return run / (args.name or f"mesh_{step:06d}{suffix}.ply")

    _refuse_existing(target(latest_checkpoint_step(run)), args.overwrite, "--name FILE to write another file")
    _, _, tr = load_run(run, args.arch)
    for key, value in overrides.items():
        set_value(tr.cfg, key, value)
    path = target(tr.step)  # an unreadable newest checkpoint falls back to an older step
    _refuse_existing(path, args.overwrite, "--name FILE to write another file")
    from taichi_neus.export.mesh import mesh_from_run
    res = args.resolution or tr.cfg.mesh.resolution
    say(f"mesh: marching cubes on {res}³ cells from step {tr.step}{' (culled with the masks)' if clean else ''} …")
    mesh = mesh_from_run(tr, args.resolution or None, clean=clean, log=say)
    if mesh.is_empty:
        raise UserInputError(f"the field of {run} at step {tr.step} has no surface inside the unit sphere; "
                             "there is no mesh to write.")
    mesh.save(path, overwrite=args.overwrite)
    say(f"mesh: wrote {path} ({len(mesh.vertices):,} vertices, {len(mesh.faces):,} faces)")
    return 0


def cmd_render(args) -> int:
    from taichi_neus.app.results import load_run, parse_modes, render_run
    run = _run_folder(args)
    modes = parse_modes(args.modes)
    _positive("--frames", args.frames, zero_ok=True)
    _positive("--downscale", args.downscale)
    _positive("--fps", args.fps)
    if args.mp4:
        from taichi_neus.app.results import require_mp4
        require_mp4()  # refuse before loading anything
    name = args.name or args.path
    _refuse_existing(run / "renders" / name, args.overwrite, "--name NAME to write into renders/NAME/")
    _, _, tr = load_run(run, args.arch)
    r = render_run(tr, args.path, args.frames, args.downscale, modes, gif=args.gif, mp4=args.mp4, fps=args.fps,
                   name=name, overwrite=args.overwrite)
    say(f"render: wrote {r['frames']} frames ({r['size'][0]}x{r['size'][1]}, {', '.join(modes)}) "
        f"of step {tr.step} into {r['dir']}")
    return 0


def cmd_eval(args) -> int:
    from taichi_neus.app.results import evaluate_geometry, evaluate_images, format_table, load_run, run_mesh
    run = _run_folder(args)
    for flag, path in (("--gt-points", args.gt_points), ("--gt-mesh", args.gt_mesh), ("--mesh", args.mesh)):
        if path and not pathlib.Path(path).is_file():
            raise UserInputError(f"{flag} {path} does not exist.")
    if args.dtu_dir and not pathlib.Path(args.dtu_dir).is_dir():
        raise UserInputError(f"--dtu-dir {args.dtu_dir} is not a folder.")
    _positive("--downscale", args.downscale)
    _positive("--points", args.points)
    _positive("--scan", args.scan, zero_ok=True)
    path = run / (args.name or "eval.json")
    _refuse_existing(path, args.overwrite, "--name FILE to write another file")
    _, _, tr = load_run(run, args.arch)
    say(f"eval: rendering {len(tr.scene.test_ids)} held-out views of step {tr.step} …")
    result = {"run": str(run), "step": tr.step, "images": evaluate_images(tr, args.downscale)}
    mesh, mesh_path = run_mesh(tr, clean=args.clean, mesh_path=args.mesh)
    result.update(mesh=str(mesh_path), clean=bool(args.clean), mesh_vertices=int(len(mesh.vertices)),
                  mesh_faces=int(len(mesh.faces)))
    say(f"eval: Chamfer distance of {mesh_path} …")
    result["geometry"] = evaluate_geometry(tr, mesh, args.gt_points, args.gt_mesh, args.dtu_dir, args.scan,
                                           n_points=args.points)
    path.write_text(json.dumps(result, indent=2))
    print(format_table(result))
    say(f"eval: wrote {path}")
    return 0


def main(argv=None) -> int:
    from taichi_neus.runtime import BackendError
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, cfg, overrides = parse_args(argv)
        if args.cmd == "train":
            return cmd_train(args, cfg, overrides)
        if args.cmd == "poses":
            from taichi_neus.app import poses_cmd
            return poses_cmd.run(args)
        if args.cmd == "render":
            return cmd_render(args)
        if args.cmd == "eval":
            return cmd_eval(args)
        return cmd_mesh(args, overrides)
    except (UserInputError, BackendError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; continue with '{PROG} train --out RUN --resume'.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
