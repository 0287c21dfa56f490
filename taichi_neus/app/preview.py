"""Live preview while training: a ``ti.GUI`` window (or headless PNG frames) showing the current model.

:class:`LivePreview` is a ``Trainer.fit(callback=...)`` callback. After each training step it renders
a bounded number of rays into a low-resolution :class:`ProgressiveImage` (coarse pixels first, so a
blocky image appears at once and sharpens), with a time budget: the preview's own time (rendering,
drawing, event handling, saving frames) stays at most ``share`` of the wall time, measured, not
assumed. When a pass over all pixels finishes, the next one starts from the newer model.

:class:`ViewController` holds everything that does not need a window (camera, display mode, pause,
requests), driven by window-independent events, so it is tested without a display:

========================  ====================================================
mouse drag (left button)  orbit around the unit sphere's centre
wheel                     zoom (camera distance)
1 / 2 / 3, Tab            RGB / normals / depth, cycle
space                     pause / resume training (the preview keeps refining)
v                         snap to the nearest training view; again: next view
o                         back to the orbit camera
m                         export a mesh now (``mesh_<step>.ply`` in the run folder)
Esc / closing the window  close the preview (training continues)
========================  ====================================================
"""

from __future__ import annotations

import math
import os
import pathlib
import sys
import time
from dataclasses import dataclass

import numpy as np

from taichi_neus.data.rays import pixel_rays
from taichi_neus.errors import UserInputError
from taichi_neus.export.mesh import mesh_from_run
from taichi_neus.render.camera_paths import OrbitRig, mean_intrinsics, scale_intrinsics
from taichi_neus.render.images import MODES, colorize

__all__ = ["PreviewSettings", "ViewController", "ProgressiveImage", "LivePreview", "display_available",
           "write_result_image"]

HELP = "drag orbit | wheel zoom | 1/2/3 rgb/normal/depth | space pause | v view | o orbit | m mesh | esc close"
BAND = 52  # pixels of text band under the image
MIN_WINDOW_WIDTH = 640


@dataclass
class PreviewSettings:
    """Options of the live preview.

    Attributes:
        width: render width in pixels (height follows the dataset's aspect ratio).
        scale: window pixels per render pixel (raised so the window is at least 640 pixels wide).
        share: largest fraction of wall time the preview may take (0 < share < 1).
        chunk: rays per render call.
        frames_dir: folder for PNG frames (one per finished pass); empty: no frames.
        show: open a window (False: headless, ``ti.GUI(show_gui=False)``).
    """

    width: int = 160
    scale: int = 4
    share: float = 0.2
    chunk: int = 1024
    frames_dir: str = ""
    show: bool = True

    def check(self) -> None:
        if not 0.0 < self.share < 1.0:
            raise UserInputError(f"--gui-share must be between 0 and 1 (exclusive), got {self.share}.")
        if not 8 <= self.width <= 2048:
            raise UserInputError(f"--gui-width must be between 8 and 2048 pixels, got {self.width}.")


def display_available() -> bool:
    """Whether a window can be opened: on Linux/BSD an X11 ``DISPLAY`` must be set (ti.GUI uses X11)."""
    if sys.platform.startswith(("linux", "freebsd")):
        return bool(os.environ.get("DISPLAY"))
    return True


def _present(gui, canvas: np.ndarray, texts, path=None) -> None:
    """Show ``canvas`` ``(H, W, 3)`` float RGB in [0, 1] (rows from the top) with ``texts``, a list of
    ``(text, x, y, font_size, colour)`` (x, y: the text's top-left in [0, 1]², origin bottom-left, as
    ``ti.GUI`` places text), in ``gui``; also saved as a PNG at ``path`` when given."""
    gui.set_image(np.ascontiguousarray(canvas[::-1].transpose(1, 0, 2)))
    for text, x, y, size, colour in texts:
        gui.text(text, pos=(x, y), font_size=size, color=colour)
    gui.show(str(path) if path is not None else None)


def _ema(old: float, new: float) -> float:
    """Running estimate of a cost: the first measurement, then an exponential average."""
    return new if old == 0.0 else 0.7 * old + 0.3 * new


class ViewController:
    """Camera, display mode and requests of the preview, without a window.

    The orbit camera looks at the origin from spherical coordinates of an :class:`OrbitRig` fitted to
    the training cameras; after :meth:`snap` the camera is exactly a training view (its pose and
    intrinsics) until the next orbit or zoom.

    Attributes:
        H, W: render resolution, pixels.
        mode: one of :data:`taichi_neus.render.images.MODES`.
        paused, closed, want_mesh: flags the preview acts on.
        view: the training view snapped to, or -1 (orbit camera).
        version: increases whenever the camera changes (the image must be re-rendered).
    """

    ORBIT_PER_WIDTH = math.pi  # a drag across the whole window turns half a circle
    ZOOM_PER_NOTCH = 0.9  # camera distance factor per wheel notch (120 units)
    MAX_ELEVATION = math.radians(85.0)

    def __init__(self, scene, width: int = 160):
        self.scene = scene
        train = np.asarray(scene.train_ids if len(scene.train_ids) else np.arange(scene.n_views))
        self.train_ids = train
        self.rig = OrbitRig.from_cameras(scene.c2w[train])
        self.W = int(width)
        self.H = max(1, int(round(width * scene.H / scene.W)))
        self.sx, self.sy = self.W / scene.W, self.H / scene.H
        self.K_orbit = scale_intrinsics(mean_intrinsics(scene.K[train]), self.sx, self.sy)
        self.min_radius, self.max_radius = 0.3 * self.rig.radius, 4.0 * self.rig.radius
        self.reset_camera()
        self.mode = "rgb"
        self.paused = False
        self.closed = False
        self.want_mesh = False
        self._drag = None

    # -------------------------------------------------------------- camera
    def reset_camera(self) -> None:
        """Back to the default orbit camera (azimuth 0, the cameras' mean elevation and distance)."""
        self.azimuth, self.elevation, self.radius = 0.0, self.rig.elevation, self.rig.radius
        self.view = -1
        self.version = getattr(self, "version", -1) + 1

    def camera(self) -> tuple[np.ndarray, np.ndarray]:
        """``(K (3, 3), c2w (4, 4))`` float64 of the current camera at the render resolution."""
        if self.view >= 0:
            v = self.view
            return (scale_intrinsics(self.scene.K[v], self.sx, self.sy),
                    np.asarray(self.scene.c2w[v], np.float64))
        return self.K_orbit.copy(), self.rig.pose(self.azimuth, self.elevation, self.radius)

    def _leave_view(self) -> None:
        self.view = -1

    def orbit(self, dx: float, dy: float) -> None:
        """Turn by a drag of ``(dx, dy)`` window widths/heights (right and up positive): the object
        turns with the mouse."""
        if dx == 0 and dy == 0:
            return
        self._leave_view()
        self.azimuth -= dx * self.ORBIT_PER_WIDTH
        self.elevation = float(np.clip(self.elevation - dy * self.ORBIT_PER_WIDTH,
                                       -self.MAX_ELEVATION, self.MAX_ELEVATION))
        self.version += 1

    def zoom(self, notches: float) -> None:
        """Move the camera ``0.9^notches`` times its distance (positive: closer)."""
        if notches == 0:
            return
        self._leave_view()
        self.radius = float(np.clip(self.radius * self.ZOOM_PER_NOTCH ** notches, self.min_radius, self.max_radius))
        self.version += 1

    def snap(self) -> int:
        """Snap to the training view nearest the camera, or, when already on one, to the next; its index."""
        if self.view >= 0:
            k = int(np.nonzero(self.train_ids == self.view)[0][0])
            v = int(self.train_ids[(k + 1) % len(self.train_ids)])
        else:
            eye = self.camera()[1][:3, 3]
            d = np.linalg.norm(self.scene.c2w[self.train_ids, :3, 3] - eye, axis=1)
            v = int(self.train_ids[int(np.argmin(d))])
        self.view = v
        self.azimuth, self.elevation, self.radius = self.rig.spherical(self.scene.c2w[v][:3, 3])
        self.elevation = float(np.clip(self.elevation, -self.MAX_ELEVATION, self.MAX_ELEVATION))
        self.version += 1
        return v

    # --------------------------------------------------------------- events
    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode}")
        self.mode = mode

    def key(self, key: str) -> None:
        """A key press, by ``ti.GUI`` key name (``' '``, ``'Tab'``, ``'Escape'``, ``'v'``, …)."""
        if key in ("1", "2", "3"):
            self.set_mode(MODES[int(key) - 1])
        elif key == "Tab":
            self.set_mode(MODES[(MODES.index(self.mode) + 1) % len(MODES)])
        elif key == " ":
            self.paused = not self.paused
        elif key == "v":
            self.snap()
        elif key == "o":
            self.reset_camera()
        elif key == "m":
            self.want_mesh = True
        elif key in ("Escape", "WMClose"):
            self.closed = True

    def event(self, kind: str, key: str, pos=(0.0, 0.0), delta=(0.0, 0.0)) -> None:
        """One window event: ``kind`` ``'press' | 'release' | 'motion'``, ``key`` a ``ti.GUI`` key name
        (``'LMB'``, ``'Wheel'``, ``'Motion'``, or a keyboard key), ``pos`` the cursor in [0, 1]²
        (origin bottom-left), ``delta`` the wheel turn (120 per notch, vertical second)."""
        if key == "Wheel":
            self.zoom(float(delta[1]) / 120.0)
        elif key == "LMB" and kind == "press":
            self._drag = tuple(pos)
        elif key == "LMB" and kind == "release":
            self._drag = None
        elif kind == "motion":
            if self._drag is not None:
                self.orbit(pos[0] - self._drag[0], pos[1] - self._drag[1])
                self._drag = tuple(pos)
        elif kind == "press":
            self.key(key)


class ProgressiveImage:
    """A low-resolution image filled a few pixels at a time, coarse to fine.

    After a camera change (:meth:`restart` with ``keep=False``) pixels are visited by levels: those
    on a stride-8 grid, then stride 4, 2, 1 (row-major within a level), and :meth:`image` shows each
    pixel not yet rendered with the value of the nearest rendered pixel of a coarser grid (blocks), so
    the first few hundred rays already show the whole view. A refresh with the same camera and a newer
    model (``keep=True``) goes row by row over the old image: a pass spans several training steps,
    and a scan leaves one seam between older and newer pixels where the level order would leave a
    dot pattern of older pixels.
    """

    def __init__(self, H: int, W: int, levels: int = 4):
        self.H, self.W = H, W
        y, x = np.divmod(np.arange(H * W), W)
        self.strides = [2 ** k for k in range(levels - 1, -1, -1)]
        coarsest = np.ones(H * W, np.int64)
        for s in reversed(self.strides):  # 1, 2, 4, 8: the largest stride dividing both wins
            coarsest[(x % s == 0) & (y % s == 0)] = s
        self.coarse_order = np.lexsort((np.arange(H * W), -coarsest))
        self.order = self.coarse_order
        self.parents = [(y - y % s) * W + (x - x % s) for s in self.strides]
        self.data = {"rgb": np.zeros((H * W, 3), np.float32), "normal": np.zeros((H * W, 3), np.float32),
                     "depth": np.zeros(H * W, np.float32), "opacity": np.zeros(H * W, np.float32)}
        self.filled = np.zeros(H * W, bool)
        self.cursor = 0

    @property
    def done(self) -> bool:
        return self.cursor >= self.H * self.W

    def restart(self, keep: bool) -> None:
        """Start a new pass; ``keep=False`` forgets the old pixels (the camera moved)."""
        self.cursor = 0
        self.order = np.arange(self.H * self.W) if keep else self.coarse_order
        if not keep:
            self.filled[:] = False

    def next_pixels(self, n: int) -> np.ndarray:
        """Flat indices (row-major) of the next ``n`` pixels to render (fewer at the end of a pass)."""
        return self.order[self.cursor:self.cursor + n]

    def put(self, idx: np.ndarray, result: dict) -> None:
        """Store ``render_rays`` output for the pixels ``idx`` (from :meth:`next_pixels`)."""
        for k, v in self.data.items():
            v[idx] = result[k][: len(idx)]
        self.filled[idx] = True
        self.cursor += len(idx)

    def image(self) -> dict:
        """The current images ``(H, W, ·)`` with unrendered pixels shown as blocks of coarser ones."""
        src = np.where(self.filled, np.arange(self.H * self.W), -1)
        for parent in self.parents:  # coarse to fine: finer parents overwrite
            use = ~self.filled & self.filled[parent]
            src[use] = parent[use]
        ok = src >= 0
        out = {}
        for k, v in self.data.items():
            a = np.zeros_like(v)
            a[ok] = v[src[ok]]
            out[k] = a.reshape((self.H, self.W) + v.shape[1:])
        return out


class LivePreview:
    """``Trainer.fit`` callback that shows (or saves) the current model while it trains.

    Args:
        trainer: the :class:`~taichi_neus.train.trainer.Trainer` being trained.
        settings: :class:`PreviewSettings`.
        log: print-like function for messages.
        clock: ``() -> float`` seconds (default ``time.perf_counter``).

    Attributes after use: ``train_time`` and ``preview_time`` (seconds; the measured share is
    ``preview_time / (train_time + preview_time)``, time spent paused or exporting meshes excluded),
    ``frames`` (paths of saved PNGs), ``passes`` (finished passes), ``rays`` (rays rendered).
    """

    def __init__(self, trainer, settings: PreviewSettings | None = None, log=print, clock=time.perf_counter):
        import taichi as ti

        self.clock = clock  # seconds, monotonic; every time the share is measured with (tests pass a fake one)
        self.trainer = trainer
        self.settings = settings or PreviewSettings()
        self.settings.check()
        self.log = log
        st = self.settings
        self.ctrl = ViewController(trainer.scene, st.width)
        self.prog = ProgressiveImage(self.ctrl.H, self.ctrl.W)
        self.frames_dir = pathlib.Path(st.frames_dir) if st.frames_dir else None
        self._frame0 = 0  # frame numbers continue after the frames already there (a resumed run)
        if self.frames_dir is not None:
            self.frames_dir.mkdir(parents=True, exist_ok=True)
            self._frame0 = len(list(self.frames_dir.glob("frame_*.png")))
        self.scale = max(st.scale, -(-MIN_WINDOW_WIDTH // self.ctrl.W))  # room for the text
        self.res = (self.ctrl.W * self.scale, self.ctrl.H * self.scale + BAND)
        try:
            self.gui = ti.GUI("taichi_neus preview", res=self.res, show_gui=st.show, background_color=0x000000)
        except RuntimeError as exc:
            raise UserInputError(f"the preview window could not be opened ({str(exc).splitlines()[0]}); "
                                 "run with --gui-frames DIR to save preview frames without a window.") from None
        self.train_time = 0.0
        self.preview_time = 0.0
        self.frames: list[pathlib.Path] = []
        self.passes = 0
        self.rays = 0
        self.stats: dict = {}
        self.message = ""
        self._t_last = None
        self._chunk_s = 0.0  # running estimates of the cost of one render call and of one draw
        self._draw_s = 0.0
        self._cam_version = None
        self._pass_step = None
        self._pass_saved = True
        self._active = True

    # ---------------------------------------------------------- measurement
    @property
    def share(self) -> float:
        """Measured fraction of wall time spent in the preview (excluding pauses and mesh exports)."""
        total = self.train_time + self.preview_time
        return self.preview_time / total if total > 0 else 0.0

    def _budget(self) -> float:
        s = self.settings.share
        return s / (1.0 - s) * self.train_time - self.preview_time

    # ------------------------------------------------------------ callback
    def __call__(self, trainer, stats: dict):
        t0 = self.clock()
        if self._t_last is not None:
            self.train_time += t0 - self._t_last
        self.stats = stats
        if self._active:
            self._step(t0, budgeted=True)
            self.preview_time += self.clock() - t0
            while self._active and (self.ctrl.paused or self.ctrl.want_mesh):  # user time: not counted
                if self.ctrl.want_mesh:
                    self._export_mesh()
                    continue
                worked = self._step(self.clock(), budgeted=False)
                if not worked:
                    time.sleep(0.02)
        self._t_last = self.clock()
        return None

    def _step(self, t0: float, budgeted: bool) -> bool:
        """Handle events, render within the budget, draw. Returns whether anything was rendered."""
        self._poll_events()
        if self.ctrl.closed:
            self.close()
            return False
        rendered = self._render(t0, budgeted)
        if self.prog.done and not self._pass_saved:
            self._pass_saved = True
            self.passes += 1
            self._draw(save=self.frames_dir is not None)
        elif rendered and self.settings.show:
            self._draw(save=False)
        elif self.settings.show and not budgeted:
            self._draw(save=False)  # paused: keep the window responsive
        return rendered

    def _render(self, t0: float, budgeted: bool) -> bool:
        tr, ctrl, prog = self.trainer, self.ctrl, self.prog
        rendered = False
        budget = self._budget() if budgeted else math.inf
        while True:
            if ctrl.version != self._cam_version:
                prog.restart(keep=False)
                self._cam_version, self._pass_step, self._pass_saved = ctrl.version, tr.step, False
            elif prog.done:
                if not self._pass_saved or tr.step == self._pass_step:
                    break  # save the finished pass first / nothing new to show
                prog.restart(keep=True)
                self._pass_step, self._pass_saved = tr.step, False
            if budgeted and self.clock() - t0 + self._chunk_s + self._draw_s > budget:
                break  # the next call would not fit in the budget
            t1 = self.clock()
            idx = prog.next_pixels(self.settings.chunk)
            K, c2w = ctrl.camera()
            pix = np.stack([idx % prog.W + 0.5, idx // prog.W + 0.5], axis=1)
            o, d = pixel_rays(K, c2w, pix)
            prog.put(idx, tr.render_rays(o, d, chunk=self.settings.chunk))
            self._chunk_s = _ema(self._chunk_s, self.clock() - t1)
            self.rays += len(idx)
            rendered = True
        return rendered

    def _poll_events(self) -> None:
        if not self.settings.show:
            return
        import taichi as ti

        kinds = {ti.GUI.PRESS: "press", ti.GUI.RELEASE: "release", ti.GUI.MOTION: "motion"}
        for e in self.gui.get_events():
            self.ctrl.event(kinds.get(e.type, "motion"), e.key, e.pos, getattr(e, "delta", (0, 0)))

    # ------------------------------------------------------------- drawing
    def frame(self) -> np.ndarray:
        """The displayed image ``(H, W, 3) float32`` (render resolution, current mode)."""
        img = self.prog.image()
        return colorize(img, self.ctrl.mode)  # depth: this frame's own range

    def _draw(self, save: bool) -> None:
        t0 = self.clock()
        gui = self.gui
        rgb = np.repeat(np.repeat(self.frame(), self.scale, axis=0), self.scale, axis=1)
        canvas = np.zeros((self.res[1], self.res[0], 3), np.float32)  # rows from the top
        canvas[: rgb.shape[0]] = rgb
        s = self.stats
        tc = self.trainer.cfg.train
        line1 = (f"step {self.trainer.step}/{tc.iters}  loss {s.get('loss', float('nan')):.4f}  "
                 f"PSNR {s.get('psnr', float('nan')):.2f} dB  s {s.get('s', float('nan')):.0f}")
        cam = f"view {self.ctrl.view}" if self.ctrl.view >= 0 else "orbit"
        line2 = (f"[{self.ctrl.mode}] {cam}  preview {100 * self.share:.0f}% of time"
                 f"{'  PAUSED' if self.ctrl.paused else ''}  {self.message}")
        h = self.res[1]
        texts = [(line1, 0.01, (BAND - 2) / h, 15, 0xFFFFFF), (line2, 0.01, (BAND - 19) / h, 13, 0xC8C8C8),
                 (HELP, 0.01, (BAND - 35) / h, 11, 0x8C8C8C)]
        path = None
        if save:
            path = self.frames_dir / f"frame_{self._frame0 + len(self.frames):04d}_step{self.trainer.step:06d}.png"
            self.frames.append(path)
        _present(gui, canvas, texts, path)
        self._draw_s = _ema(self._draw_s, self.clock() - t0)

    def render_full(self) -> np.ndarray:
        """Finish the current view now, without a budget, and return :meth:`frame` (for tests and scripts)."""
        self._render(self.clock(), budgeted=False)
        return self.frame()

    # --------------------------------------------------------------- actions
    def _export_mesh(self) -> None:
        self.ctrl.want_mesh = False
        tr = self.trainer
        mesh = mesh_from_run(tr)
        if mesh.is_empty:
            self.message = "no surface yet"
        else:
            path = tr.out / f"mesh_{tr.step:06d}.ply"
            mesh.save(path, overwrite=True)
            self.message = f"wrote {path.name}"
        self.log(f"[taichi_neus] preview: {self.message}")
        if self.settings.show:
            self._draw(save=False)

    def close(self, finish: bool = True) -> None:
        """Stop the preview (training goes on). With ``finish`` and a frame folder, a last frame of the
        current model is rendered and saved first (not after an interruption: ``finish=False``)."""
        if not self._active:
            return
        if finish and self.frames_dir is not None and not self.ctrl.closed and (
                not self._pass_saved or self.trainer.step != self._pass_step):
            self._render(self.clock(), budgeted=False)  # finish the pass, or one of the final model
            self._pass_saved = True
            self.passes += 1
            self._draw(save=True)
        self._active = False
        if self.settings.show:
            self.gui.close()
        self.log(f"[taichi_neus] preview: {self.passes} passes, {self.rays} rays, "
                 f"{100 * self.share:.1f}% of training time")


RESULT_MIN_HEIGHT = 320  # pixels: small views are enlarged (nearest neighbour) to at least this height
RESULT_BAND = 46
RESULT_GAP = 4


def write_result_image(trainer, view: int, ev: dict, held_out: bool = True, name: str = "result.png"):
    """A labelled picture of the result in the run folder: photo | render | normals | depth of ``view``,
    side by side, each enlarged by a whole factor to at least :data:`RESULT_MIN_HEIGHT` pixels, with a
    label under each panel and a line naming the scene, the view and the step (drawn by ``ti.GUI``'s text,
    as the live preview's frames are, and saved without a window).

    Args:
        trainer: the trained :class:`~taichi_neus.train.trainer.Trainer` (Taichi initialised).
        view: dataset view index.
        ev: :meth:`Trainer.evaluate_view` of that view (``render``, ``gt``, ``psnr``).
        held_out: whether ``view`` was held out from training (named so in the picture).

    Returns:
        the path written, ``<run>/<name>``.
    """
    import taichi as ti

    r = ev["render"]
    masked = trainer.use_masks and trainer.scene.masks is not None
    panels = [("photo" + (" (background masked)" if masked else ""), np.clip(ev["gt"], 0.0, 1.0)),
              (f"render ({ev['psnr']:.1f} dB PSNR)", colorize(r, "rgb")),
              ("normals", colorize(r, "normal")), ("depth (near = bright)", colorize(r, "depth"))]
    h, w = panels[0][1].shape[:2]
    k = max(1, math.ceil(RESULT_MIN_HEIGHT / h))
    pw = w * k + RESULT_GAP  # panel pitch: a grey gap separates panels with black backgrounds
    H, W = h * k + RESULT_BAND, pw * len(panels) - RESULT_GAP
    canvas = np.zeros((H, W, 3), np.float32)
    canvas[: h * k] = 0.35
    for i, (_, img) in enumerate(panels):
        canvas[: h * k, i * pw: i * pw + w * k] = np.repeat(np.repeat(img, k, axis=0), k, axis=1)
    title = (f"{trainer.scene.name}: {'held-out' if held_out else 'training'} view {view}, step {trainer.step}, "
             f"{w}x{h} pixels" + (f", shown {k}x enlarged" if k > 1 else ""))
    texts = [(label, i * pw / W + 0.004, (RESULT_BAND - 3) / H, 15, 0xFFFFFF) for i, (label, _) in enumerate(panels)]
    texts.append((title, 0.004, (RESULT_BAND - 24) / H, 13, 0xC8C8C8))
    path = trainer.out / name
    gui = ti.GUI("taichi_neus result", res=(W, H), show_gui=False, background_color=0x000000)
    try:
        _present(gui, canvas, texts, path)
    finally:
        gui.close()
    return path
