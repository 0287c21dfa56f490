"""Load a NeRF-synthetic / Blender scene (Mildenhall et al., ECCV 2020) into a :class:`Scene`.

Folder layout::

    scene/
      transforms_train.json     {"camera_angle_x": ..., "frames": [{"file_path": "./train/r_0",
      transforms_val.json         "transform_matrix": 4x4 camera-to-world}, ...]}
      transforms_test.json      (val and test optional; or a single transforms.json)
      train/r_0.png ...         RGBA (or RGB) images; file_path may omit ".png"

Cameras: ``transform_matrix`` is camera-to-world in OpenGL axes (x right, y up, z backward); it is
converted to OpenCV axes (x right, y down, z forward) by flipping the camera's y and z axes. The
intrinsics are ``fx = W / (2 tan(camera_angle_x / 2))`` (``camera_angle_y`` for fy if given, else
fy = fx) with the principal point at the image centre; instant-ngp / nerfstudio keys ``fl_x``,
``fl_y``, ``cx``, ``cy`` are used when present (file-wide or per frame). Lens distortion
(non-zero ``k1 k2 k3 k4 p1 p2``) is refused.

Images: RGBA is composited onto a white or black ``background`` (NeRF's convention is white) and
the alpha channel, thresholded at 127 after downscaling, becomes the mask. Training views are the
frames of ``transforms_train.json``; held-out views are every ``holdout_every``-th frame of
``transforms_test.json`` (or of ``transforms_val.json`` when there is no test file); with a single
``transforms.json`` every ``holdout_every``-th frame is held out as for DTU.

The region of interest (:mod:`taichi_neus.data.roi`) comes from the alpha masks' visual hull, or from
the camera frusta for images without alpha, or from ``--data.roi``; one line says what was chosen.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from taichi_neus import memory
from taichi_neus.data import roi as roi_mod
from taichi_neus.data.dtu import _check_downscale, _decode, _image_size, block_mean
from taichi_neus.data.scene import Scene
from taichi_neus.errors import UserInputError

SPLIT_FILES = ("transforms_train.json", "transforms_val.json", "transforms_test.json")
SINGLE_FILE = "transforms.json"
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")
OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])


def is_blender(root: pathlib.Path) -> bool:
    return (root / SPLIT_FILES[0]).is_file() or (root / SINGLE_FILE).is_file()


def _read_json(file: pathlib.Path) -> dict:
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserInputError(f"{file} is not valid JSON ({e}); re-export it.") from None
    except OSError as e:
        raise UserInputError(f"cannot read {file} ({e.strerror or e}); check the file's permissions.") from None
    if not isinstance(d, dict) or not isinstance(d.get("frames"), list):
        raise UserInputError(f"{file} has no 'frames' list; it must be a NeRF-synthetic transforms file.")
    if not d["frames"]:
        raise UserInputError(f"{file} lists no frames; it needs at least one image with its transform_matrix.")
    return d


def _number(d: dict, key: str, where: str, positive: bool = False) -> float | None:
    if key not in d:
        return None
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
        raise UserInputError(f"'{key}' in {where} must be a finite{' positive' if positive else ''} number, "
                             f"got {v!r}.")
    return float(v)


def _pose(frame: dict, where: str) -> np.ndarray:
    """(4, 4) float64 camera-to-world, OpenCV axes, of a frame's OpenGL ``transform_matrix``."""
    try:
        M = np.array(frame["transform_matrix"], dtype=np.float64)
    except KeyError:
        raise UserInputError(f"{where} has no 'transform_matrix'; every frame needs its camera pose.") from None
    except (TypeError, ValueError):
        raise UserInputError(f"'transform_matrix' of {where} is not a 4x4 matrix of numbers.") from None
    if M.shape == (3, 4):
        M = np.vstack([M, [0.0, 0.0, 0.0, 1.0]])
    if M.shape != (4, 4):
        raise UserInputError(f"'transform_matrix' of {where} has shape {M.shape}, expected (4, 4).")
    if not np.isfinite(M).all():
        raise UserInputError(f"'transform_matrix' of {where} contains NaN or Inf values; re-export the cameras.")
    R = M[:3, :3]
    with np.errstate(all="ignore"):  # huge entries overflow to inf/NaN: "not <=" refuses those too
        rigid = np.abs(M[3] - [0, 0, 0, 1]).max() <= 1e-6 and np.abs(R.T @ R - np.eye(3)).max() <= 1e-3 \
            and np.linalg.det(R) > 0
    if not rigid:
        raise UserInputError(f"'transform_matrix' of {where} is not a rigid camera pose (rotation and "
                             "translation); re-export the cameras without scaling.")
    return M @ OPENGL_TO_OPENCV


def _intrinsics(meta: dict, frame: dict, W: int, H: int, where: str) -> np.ndarray:
    """(3, 3) K for an image of W x H pixels from the frame's or the file's keys."""
    def get(key, positive=False):
        v = _number(frame, key, where, positive)
        return v if v is not None else _number(meta, key, where, positive)

    for key in DISTORTION_KEYS:
        v = get(key)
        if v not in (None, 0.0):
            raise UserInputError(f"{where} has lens distortion ({key}={v:g}); undistort the images first "
                                 "(e.g. colmap image_undistorter) and set the coefficients to 0.")
    model = frame.get("camera_model", meta.get("camera_model"))
    if model is not None and model not in ("PINHOLE", "OPENCV", "SIMPLE_PINHOLE"):
        raise UserInputError(f"{where} uses the camera model {model!r}; only pinhole cameras are read.")
    w, h = get("w", True), get("h", True)
    if (w is not None and int(w) != W) or (h is not None and int(h) != H):
        raise UserInputError(f"{where} says the images are {w}x{h} (w x h) but they are {W}x{H}; "
                             "fix w/h or use the original images.")
    fx, fy = get("fl_x", True), get("fl_y", True)
    if fx is None:
        ax = get("camera_angle_x", True)
        if ax is None:
            raise UserInputError(f"{where} has neither 'camera_angle_x' nor 'fl_x'; the focal length is needed.")
        if ax >= math.pi:
            raise UserInputError(f"'camera_angle_x' in {where} is {ax:g} radians; a field of view must be < pi.")
        fx = 0.5 * W / math.tan(0.5 * ax)
    if fy is None:
        ay = get("camera_angle_y", True)
        if ay is not None and ay >= math.pi:
            raise UserInputError(f"'camera_angle_y' in {where} is {ay:g} radians; a field of view must be < pi.")
        fy = 0.5 * H / math.tan(0.5 * ay) if ay is not None else fx
    cx, cy = get("cx"), get("cy")
    return np.array([[fx, 0.0, 0.5 * W if cx is None else cx], [0.0, fy, 0.5 * H if cy is None else cy],
                     [0.0, 0.0, 1.0]])


def _image_file(base: pathlib.Path, frame: dict, where: str) -> pathlib.Path:
    fp = frame.get("file_path")
    if not isinstance(fp, str) or not fp:
        raise UserInputError(f"{where} has no 'file_path' string; every frame needs its image.")
    p = base / fp
    for cand in (p, p.with_name(p.name + ".png")):
        if cand.is_file():
            return cand
    raise UserInputError(f"image {fp!r} of {where} is missing (looked for {p} and {p.name}.png); "
                         "copy the images next to the transforms file.")


def _frames(file: pathlib.Path):
    meta = _read_json(file)
    out = []
    for i, fr in enumerate(meta["frames"]):
        where = f"frame {i} of {file}"
        if not isinstance(fr, dict):
            raise UserInputError(f"{where} is not an object with file_path and transform_matrix.")
        out.append((fr, where, _image_file(file.parent, fr, where), _pose(fr, where)))
    return meta, out


def _has_alpha(file: pathlib.Path) -> bool:
    """Whether the image has an alpha channel (from the header; pixels are not decoded)."""
    try:
        with Image.open(file) as im:
            return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    except Exception as e:
        raise UserInputError(f"cannot read image {file} ({type(e).__name__}: {e}); replace it with a valid PNG.") \
            from None


def read_rgba(file: pathlib.Path, k: int, background: tuple[int, int, int], alpha: bool):
    """(H/k, W/k, 3) uint8 RGB composited on ``background`` and (H/k, W/k) uint8 0/255 mask (or None).

    ``rgb · a + background · (1 − a)`` at full resolution (rounded), then the area downscale; the
    mask is the area-downscaled alpha thresholded at 127.
    """
    im = _decode(file)
    try:
        a = np.asarray(im.convert("RGBA" if alpha else "RGB"))
    except Exception as e:
        raise UserInputError(f"cannot convert image {file} ({e}); re-save it as 8-bit RGBA PNG.") from None
    if not alpha:
        return block_mean(a, k), None
    al = a[..., 3:4].astype(np.uint32)
    rgb = (a[..., :3].astype(np.uint32) * al + np.asarray(background, np.uint32) * (255 - al) + 127) // 255
    mask = block_mean(a[..., 3], k)
    return block_mean(rgb.astype(np.uint8), k), np.where(mask > 127, 255, 0).astype(np.uint8)


def load_blender(path, downscale: int = 1, holdout_every: int = 8, use_masks: bool = True,
                 background: str = "white", roi=None, log=print) -> Scene:
    """Load a NeRF-synthetic folder (see the module docstring) into a :class:`Scene`.

    Args:
        path: the folder with transforms_*.json; downscale: integer area-downscale factor;
        holdout_every: the stride over the test (or val) frames kept as held-out views, 0: none;
        use_masks: the alpha channel becomes ``Scene.masks`` (else None); background: "white" or
        "black", the colour RGBA images are composited onto; roi: ``(cx, cy, cz, radius)`` world units,
        or None/() for automatic; log: where the one-line summary of the chosen region goes.

    Returns:
        Scene (uint8 images, masks or None, float32 K and unit-sphere c2w, scale_mat unit -> world),
        with ``Scene.background`` set to the compositing colour in [0, 1].

    Raises:
        UserInputError naming the file: invalid JSON, missing keys, non-rigid or non-finite poses,
        lens distortion, missing or unreadable images, sizes that differ, mixed alpha, bad options.
    """
    root = pathlib.Path(path).expanduser()
    if not root.is_dir():
        raise UserInputError(f"scene folder {root} does not exist; give the folder holding transforms_train.json.")
    if background not in BACKGROUNDS:
        raise UserInputError(f"--data.background must be one of {', '.join(BACKGROUNDS)}, got {background!r}.")
    if isinstance(holdout_every, bool) or not isinstance(holdout_every, (int, np.integer)) or holdout_every < 0:
        raise UserInputError(f"holdout_every must be an integer >= 0 (0: no held-out views), got {holdout_every!r}.")
    split = (root / SPLIT_FILES[0]).is_file()
    if split:
        meta, train = _frames(root / SPLIT_FILES[0])
        test, test_meta, test_file = [], None, None
        if holdout_every > 0:
            for name in (SPLIT_FILES[2], SPLIT_FILES[1]):
                if (root / name).is_file():
                    test_file = root / name
                    test_meta, test = _frames(test_file)
                    test = test[::holdout_every]
                    break
        frames = [(meta, f) for f in train] + [(test_meta, f) for f in test]
        train_ids = np.arange(len(train))
        test_ids = np.arange(len(train), len(frames))
    else:
        file = root / SINGLE_FILE
        meta, all_frames = _frames(file)
        frames = [(meta, f) for f in all_frames]
        ids = np.arange(len(frames))
        test_ids = ids[::holdout_every] if holdout_every > 0 else ids[:0]
        train_ids = np.setdiff1d(ids, test_ids)
        if train_ids.size == 0:
            raise UserInputError(f"holdout_every={holdout_every} holds out all {len(ids)} frames of {file}; "
                                 "use holdout_every=0 or a larger value.")

    files = [f[1][2] for f in frames]
    sizes = [_image_size(f) for f in files]
    W0, H0 = sizes[0]
    for f, s in zip(files, sizes, strict=True):
        if s != (W0, H0):
            raise UserInputError(f"image {f} is {s[0]}x{s[1]} but {files[0]} is {W0}x{H0}; "
                                 "all images must have one size.")
    k = _check_downscale(downscale, W0, H0, files[0].parent)
    V = len(frames)
    H, W = H0 // k, W0 // k
    alphas = [_has_alpha(f) for f in files]
    if any(alphas) and not all(alphas):
        i, j = alphas.index(True), alphas.index(False)
        raise UserInputError(f"image {files[j]} has no alpha channel but {files[i]} does; "
                             "give every image an alpha channel, or none.")
    alpha = all(alphas)
    memory.check_images(V, H, W, str(root), with_masks=alpha)

    K = np.stack([_intrinsics(m, fr, W0, H0, where) for m, (fr, where, _, _) in frames])
    K[:, :2, :] /= k
    c2w = np.stack([f[1][3] for f in frames])

    bg = BACKGROUNDS[background]
    images = np.empty((V, H, W, 3), np.uint8)
    masks = np.empty((V, H, W), np.uint8) if alpha else None

    def one(i):
        rgb, m = read_rgba(files[i], k, bg, alpha)
        if rgb.shape != (H, W, 3):
            raise UserInputError(f"{files[i]} decodes to shape {rgb.shape}, expected {(H, W, 3)}; re-save it.")
        images[i] = rgb
        if masks is not None:
            masks[i] = m

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, V))) as ex:
        for _ in ex.map(one, range(V)):
            pass

    first = root / (SPLIT_FILES[0] if split else SINGLE_FILE)
    with np.errstate(over="ignore", invalid="ignore"):  # absurd poses are refused below, not warned
        if roi is not None and len(roi) > 0:
            chosen = roi_mod.given(roi, c2w, str(first))
        elif masks is not None:
            chosen = roi_mod.from_masks(K, c2w, masks, f"{root} (alpha)")
        else:
            chosen = roi_mod.from_frusta(K, c2w, W, H, str(first))
        log(chosen.summary(f"NeRF-synthetic {root}"))
        c2w_unit = roi_mod.to_unit(c2w, chosen)
        roi_mod.check_cameras_see_sphere(K, c2w_unit, W, H, str(first), names=[f[1][1] for f in frames])

    return Scene(images=images, masks=masks if use_masks else None, K=K.astype(np.float32),
                 c2w=c2w_unit.astype(np.float32), scale_mat=chosen.scale_mat(), train_ids=train_ids,
                 test_ids=test_ids, H=H, W=W, name=root.resolve().name, path=root, downscale=k,
                 image_names=[str(f.relative_to(root)) if f.is_relative_to(root) else str(f) for f in files],
                 background=tuple(c / 255.0 for c in bg))
