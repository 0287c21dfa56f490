"""Live preview: headless frames during a short training run, the camera/mode controller driven by
events, the progressive image, and the time budget."""

import math
import types

import numpy as np
import pytest
from run_helpers import STEPS, frame_image, small_run

from taichi_neus.app import cli
from taichi_neus.app.preview import LivePreview, PreviewSettings, ProgressiveImage, ViewController
from taichi_neus.app.results import load_run
from taichi_neus.data import default_scene_path, load_dtu


@pytest.fixture(scope="module")
def scene():
    return load_dtu(default_scene_path())


@pytest.fixture(scope="module")
def run(tmp_path_factory, ti_arch):
    return small_run(tmp_path_factory, ti_arch)


@pytest.fixture(scope="module")
def preview(run, ti_arch):
    _, _, tr = load_run(run["run"], ti_arch, log=lambda *a: None)
    return LivePreview(tr, PreviewSettings(width=48, show=False), log=lambda *a: None)


def _eye(c2w):
    return c2w[:3, 3]


# ----------------------------------------------------------------------------- headless run
@pytest.mark.slow
def test_headless_preview_saves_frames_that_show_the_object(run):
    assert run["rc"] == 0
    frames = sorted(run["frames"].glob("frame_*.png"))
    assert len(frames) >= 2, frames
    steps = [int(f.stem.split("step")[1]) for f in frames]
    assert steps == sorted(steps) and steps[0] < STEPS and steps[-1] == STEPS
    last = frame_image(frames[-1])
    assert last.shape[1] >= 640  # the window is widened for the text
    grey = last.mean(axis=2)
    h, w = grey.shape
    centre = grey[h // 3: 2 * h // 3, w // 3: 2 * w // 3].mean()
    corners = np.mean([grey[:h // 8, :w // 8].mean(), grey[:h // 8, -w // 8:].mean(),
                       grey[-h // 8:, :w // 8].mean(), grey[-h // 8:, -w // 8:].mean()])
    # the object in the middle of a black background; measured after 60 steps: centre 0.23, corners 0.0
    assert centre > corners + 0.1, (centre, corners)
    assert grey.std() > 0.05
    # training changes what the preview shows (the first pass still shows the initial sphere)
    first = frame_image(frames[0])
    assert np.abs(first - last).mean() > 0.03  # measured 0.12
    assert 0 < run["metrics"]["preview_share"] < 1  # reported (its budget is tested with a fake clock below)


def test_gui_without_display_is_refused(tmp_path, monkeypatch, capsys, ti_arch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.setattr("sys.platform", "linux")
    out = tmp_path / "out"
    assert cli.main(["train", "--out", str(out), "--arch", ti_arch, "--gui"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "display" in err[0] and "--gui-frames" in err[0]
    assert not out.exists()
    assert cli.main(["train", "--out", str(out), "--arch", ti_arch, "--gui-frames", str(tmp_path / "f"),
                     "--gui-share", "1.5"]) == 2
    assert "--gui-share" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------ controller
def test_orbit_camera_looks_at_centre_from_mean_distance(scene):
    c = ViewController(scene, width=64)
    K, c2w = c.camera()
    centres = scene.c2w[scene.train_ids, :3, 3]
    assert np.linalg.norm(_eye(c2w)) == pytest.approx(np.linalg.norm(centres, axis=1).mean())
    np.testing.assert_allclose(c2w[:3, :3] @ c2w[:3, :3].T, np.eye(3), atol=1e-12)
    assert np.linalg.det(c2w[:3, :3]) == pytest.approx(1.0)
    # the origin projects to the principal point: the camera looks at the centre
    w2c = np.linalg.inv(c2w)
    p = K @ w2c[:3, 3]
    np.testing.assert_allclose(p[:2] / p[2], K[:2, 2], atol=1e-9)
    # up on screen (-y) is the rig's up, the synthetic scene's (0, -1, 0)
    assert -c2w[:3, 1] @ np.array([0, -1.0, 0]) > 0.8
    assert c.H == 64 and c.W == 64  # the scene's aspect ratio (96 x 96)
    assert K[0, 0] == pytest.approx(scene.K[scene.train_ids, 0, 0].mean() * 64 / 96)


def test_drag_orbits_and_wheel_zooms(scene):
    c = ViewController(scene, width=64)
    _, before = c.camera()
    v0 = c.version
    c.event("press", "LMB", (0.5, 0.5))
    c.event("motion", "Motion", (0.75, 0.5))  # a quarter window to the right: -45° of azimuth
    c.event("release", "LMB", (0.75, 0.5))
    _, after = c.camera()
    assert c.version > v0
    assert c.azimuth == pytest.approx(-math.pi / 4)
    up = c.rig.up
    e0, e1 = _eye(before), _eye(after)
    # a rotation about the up axis through the centre: same height and distance, 45° apart
    assert e1 @ up == pytest.approx(e0 @ up) and np.linalg.norm(e1) == pytest.approx(np.linalg.norm(e0))
    h0, h1 = e0 - (e0 @ up) * up, e1 - (e1 @ up) * up
    assert math.degrees(math.acos(h0 @ h1 / np.linalg.norm(h0) / np.linalg.norm(h1))) == pytest.approx(45.0)
    c.event("motion", "Motion", (0.1, 0.9))  # no button held: nothing moves
    np.testing.assert_array_equal(c.camera()[1], after)
    # vertical drags change the elevation, clamped short of the pole
    c.event("press", "LMB", (0.5, 0.0))
    c.event("motion", "Motion", (0.5, 1.0))
    c.event("release", "LMB", (0.5, 1.0))
    assert c.elevation == pytest.approx(-c.MAX_ELEVATION)
    r = c.radius
    c.event("motion", "Wheel", (0.5, 0.5), (0, 240))  # two notches in
    assert c.radius == pytest.approx(r * 0.81)
    assert np.linalg.norm(_eye(c.camera()[1])) == pytest.approx(r * 0.81)
    c.zoom(-100)
    assert c.radius == pytest.approx(c.max_radius)


def test_keys_switch_mode_pause_mesh_close_and_snap(scene):
    c = ViewController(scene, width=64)
    for key, mode in (("2", "normal"), ("3", "depth"), ("1", "rgb"), ("Tab", "normal"), ("Tab", "depth"),
                      ("Tab", "rgb")):
        c.event("press", key)
        assert c.mode == mode
    c.event("press", " ")
    assert c.paused
    c.event("press", " ")
    assert not c.paused
    c.event("press", "m")
    assert c.want_mesh
    # v: the training view nearest the camera, exactly (pose and scaled intrinsics) ...
    eye = _eye(c.camera()[1])
    dist = np.linalg.norm(scene.c2w[scene.train_ids, :3, 3] - eye, axis=1)
    nearest = int(scene.train_ids[np.argmin(dist)])
    c.event("press", "v")
    K, c2w = c.camera()
    assert c.view == nearest
    np.testing.assert_allclose(c2w, scene.c2w[nearest])
    np.testing.assert_allclose(K[:2], scene.K[nearest][:2] * 64 / 96)
    # ... v again: the next training view; an orbit leaves the view and continues from its position
    c.event("press", "v")
    k = list(scene.train_ids).index(nearest)
    nxt = int(scene.train_ids[(k + 1) % len(scene.train_ids)])
    assert c.view == nxt
    c.orbit(0.01, 0.0)
    assert c.view == -1
    assert np.linalg.norm(_eye(c.camera()[1]) - scene.c2w[nxt, :3, 3]) < 0.1
    c.event("press", "o")
    assert c.azimuth == 0 and c.view == -1
    c.event("press", "Escape")
    assert c.closed


def test_progressive_image_coarse_to_fine():
    p = ProgressiveImage(10, 12)
    p.restart(keep=False)
    first = p.next_pixels(4)
    y, x = np.divmod(first, 12)
    assert np.all(y % 8 == 0) and np.all(x % 8 == 0)  # the stride-8 grid comes first: (0,0) (0,8) (8,0) (8,8)
    p.put(first, {"rgb": np.ones((4, 3)) * np.arange(1, 5)[:, None], "normal": np.zeros((4, 3)),
                  "depth": np.zeros(4), "opacity": np.ones(4)})
    img = p.image()["rgb"][..., 0]
    # every pixel shows the coarse pixel of its 8x8 block
    assert img[0, 0] == 1 and img[7, 7] == 1 and img[0, 8] == 2 and img[9, 11] == 4 and img[8, 3] == 3
    while not p.done:
        idx = p.next_pixels(7)
        p.put(idx, {"rgb": np.full((len(idx), 3), 9.0), "normal": np.zeros((len(idx), 3)),
                    "depth": np.zeros(len(idx)), "opacity": np.ones(len(idx))})
    assert p.filled.all() and sorted(p.order) == list(range(120))
    p.restart(keep=True)  # same camera, newer model: row-major over the old image, which stays visible
    np.testing.assert_array_equal(p.next_pixels(5), np.arange(5))
    assert p.image()["rgb"][..., 0].min() >= 1


# ------------------------------------------------------------------- the image responds
@pytest.mark.slow
def test_image_responds_to_mode_zoom_orbit_and_snap(preview, scene):
    pv, c = preview, preview.ctrl
    c.reset_camera()
    c.set_mode("rgb")
    rgb = pv.render_full()
    c.set_mode("normal")
    normal = pv.frame()  # a mode switch re-colours without re-rendering
    c.set_mode("depth")
    depth = pv.frame()
    assert np.abs(rgb - normal).mean() > 0.05 and np.abs(rgb - depth).mean() > 0.05
    c.set_mode("rgb")
    area = (pv.prog.image()["opacity"] > 0.5).mean()
    assert 0.05 < area < 0.9
    c.zoom(3)  # closer by 0.9^3: the object covers more of the image
    pv.render_full()
    zoomed = (pv.prog.image()["opacity"] > 0.5).mean()
    assert zoomed > 1.4 * area, (area, zoomed)  # measured 0.30 -> 0.58
    c.zoom(-3)
    c.orbit(0.5, 0.0)  # half a turn: the object is asymmetric, the image changes
    assert np.abs(pv.render_full() - rgb).mean() > 0.03  # measured 0.065
    # snapped to a training view, the rendered silhouette matches that view's mask (pose conventions)
    c.snap()
    v = c.view
    pv.render_full()
    op = pv.prog.image()["opacity"]
    mask = scene.masks[v].astype(float) / 255.0
    mask = mask.reshape(48, 2, 48, 2).mean(axis=(1, 3)) > 0.5
    inter, union = np.logical_and(op > 0.5, mask).sum(), np.logical_or(op > 0.5, mask).sum()
    assert inter / union > 0.7, inter / union  # measured 0.80-0.90 after 60 steps


class _FakeClock:
    """The preview's clock: time moves only when a fake step or render says so."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class _FakeTrainer:
    """Training and rendering cost fake time: 20 ms per step (:meth:`train`), 3 ms per render call."""

    def __init__(self, scene, out):
        self.scene, self.out, self.step = scene, out, 0
        self.cfg = types.SimpleNamespace(train=types.SimpleNamespace(iters=80))
        self.clock = _FakeClock()
        self.render_calls = 0

    def train(self):
        self.clock.t += 0.020
        self.step += 1

    def render_rays(self, o, d, chunk):
        self.clock.t += 0.003
        self.render_calls += 1
        n = o.shape[0]
        return {"rgb": np.full((n, 3), 0.5, np.float32), "opacity": np.ones(n, np.float32),
                "depth": np.full(n, 2.0, np.float32), "normal": np.zeros((n, 3), np.float32)}


def test_preview_time_stays_within_its_share(scene, tmp_path):
    tr = _FakeTrainer(scene, tmp_path)
    pv = LivePreview(tr, PreviewSettings(width=64, share=0.2, chunk=256, show=False,
                                         frames_dir=str(tmp_path / "f")), log=lambda *a: None, clock=tr.clock)
    for _ in range(tr.cfg.train.iters):
        tr.train()
        pv(tr, {"loss": 0.1, "psnr": 20.0, "s": 50.0})
        # cumulative budget: preview ≤ share/(1 − share) · training, give or take the one render call made
        # before its cost was known (the first); never more
        assert pv.preview_time <= 0.25 * pv.train_time + 0.003 + 1e-9, (pv.preview_time, pv.train_time)
    assert pv.train_time == pytest.approx(0.020 * (tr.cfg.train.iters - 1))  # from the first call to the last
    assert pv.preview_time == pytest.approx(0.003 * tr.render_calls)
    # and it uses its budget: less than one render call short of it
    assert pv.preview_time > 0.25 * pv.train_time - 0.003 - 1e-9
    assert 0.19 < pv.share <= 0.2 + 1e-9, pv.share
    assert pv.passes >= 1 and pv.rays >= 4096  # at least one whole 64 x 64 view
    pv.close()
    assert len(pv.frames) == pv.passes and all(f.is_file() for f in pv.frames)


class _FakeGUI:
    """Stands in for ti.GUI: hands out scripted event batches, records what is drawn."""

    def __init__(self, batches):
        self.batches, self.shown, self.images = list(batches), 0, []

    def get_events(self):
        return self.batches.pop(0) if self.batches else []

    def set_image(self, img):
        self.images.append(np.array(img))

    def text(self, *a, **k):
        pass

    def show(self, file=None):
        self.shown += 1

    def close(self):
        pass


def _ev(kind, key, pos=(0.5, 0.5), delta=(0, 0)):
    import taichi as ti

    t = {"press": ti.GUI.PRESS, "release": ti.GUI.RELEASE, "motion": ti.GUI.MOTION}[kind]
    return types.SimpleNamespace(type=t, key=key, pos=pos, delta=delta)


def test_window_events_reach_the_controller_pause_and_export(scene, tmp_path, monkeypatch):
    from taichi_neus.app import preview as preview_mod
    from taichi_neus.export.mesh import Mesh

    tr = _FakeTrainer(scene, tmp_path)

    def slow_mesh(_tr):  # an export takes 10 s of the fake clock
        tr.clock.t += 10.0
        return Mesh(np.eye(3, dtype=np.float32), np.array([[0, 1, 2]], np.int32))

    monkeypatch.setattr(preview_mod, "mesh_from_run", slow_mesh)
    pv = LivePreview(tr, PreviewSettings(width=32, show=False), log=lambda *a: None, clock=tr.clock)
    pv.settings.show = True
    pv.gui = _FakeGUI([
        [_ev("press", "2"), _ev("press", "LMB", (0.5, 0.5)), _ev("motion", "Motion", (0.6, 0.5)),
         _ev("release", "LMB", (0.6, 0.5)), _ev("motion", "Wheel", delta=(0, 120))],
        [_ev("press", " ")],  # pause: the callback keeps the window alive until resumed
        [],
        [_ev("press", "m"), _ev("press", " ")],  # export a mesh while paused, then resume
    ])
    stats = {"loss": 0.1, "psnr": 20.0, "s": 50.0}
    tr.step = 1
    pv(tr, stats)  # events handled
    assert pv.ctrl.mode == "normal" and pv.ctrl.azimuth == pytest.approx(-0.1 * math.pi)
    assert pv.ctrl.radius == pytest.approx(0.9 * pv.ctrl.rig.radius)
    # no training time measured yet: at most the one render call whose cost is not yet known
    assert tr.render_calls <= 1 and pv.preview_time == pytest.approx(0.003 * tr.render_calls)
    tr.train()  # step 2
    pv(tr, stats)  # pauses, renders the whole view unbudgeted, exports, resumes
    assert not pv.ctrl.paused and not pv.ctrl.want_mesh
    assert (tmp_path / "mesh_000002.ply").is_file() and pv.message == "wrote mesh_000002.ply"
    assert pv.prog.done and pv.gui.shown >= 2
    assert pv.gui.images[-1].shape == (pv.res[0], pv.res[1], 3)  # ti.GUI's (x, y) layout
    # time spent paused (the whole view rendered meanwhile) or exporting is not charged to the preview's share:
    # only its budgeted work, 25% of the one 20 ms training step plus at most one render call
    assert tr.clock.t > 10.0 and tr.render_calls >= 1
    assert pv.train_time == pytest.approx(0.020)
    assert pv.preview_time <= 0.25 * 0.020 + 0.003 + 1e-9
