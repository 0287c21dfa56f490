"""Load a scene in the DTU layout that NeuS (Wang et al., NeurIPS 2021) published.

Folder layout::

    scene/
      image/ or images/     RGB images, any names, taken in natural sort order (2.png before 10.png)
      mask/ or masks/       optional foreground masks, same count and size (1- or 3-channel, 0/255)
      cameras_sphere.npz    world_mat_i: K[R|t] (3x4, or padded to 4x4), world -> pixel
                            scale_mat_i: 4x4 affine, unit sphere -> world (one for all views)

Image i (in sorted order) goes with mask i and camera i. The projection into the unit sphere is
``P_i = (world_mat_i @ scale_mat_i)[:3, :4]``; it is split into K and the camera pose by an RQ
decomposition (:func:`taichi_neus.data.cameras.decompose_projection`), so training happens in
unit-sphere coordinates and ``Scene.scale_mat`` takes results back to world units.

Every problem a user can fix raises :class:`taichi_neus.errors.UserInputError` with one sentence
naming the file, the problem and what to do.
"""

from __future__ import annotations

import math
import os
import pathlib
import re
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from taichi_neus import memory
from taichi_neus.data.cameras import camera_to_world, decompose_projection, read_matrix, require_view_keys
from taichi_neus.data.scene import Scene
from taichi_neus.errors import UserInputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CAMERA_FILE = "cameras_sphere.npz"
MIN_SIZE = 8  # smallest image side (pixels) left after downscaling
# The projected unit-sphere centre may lie at most this fraction of the image size outside it.
CENTRE_MARGIN = 0.5
# 8-bit modes Pillow converts to RGB without loss of meaning; 16/32-bit modes are refused.
_IMAGE_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}


def natural_key(name: str):
    """Sort key that orders embedded numbers by value: ``2.png`` before ``10.png``."""
    return [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in re.split(r"(\d+)", name) if s]


def list_images(folder: pathlib.Path) -> list[pathlib.Path]:
    """Image files (png/jpg/jpeg, not hidden) of ``folder`` in natural sort order."""
    files = [
        p for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    ]
    return sorted(files, key=lambda p: natural_key(p.name))


def block_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Area downscale of (H, W) or (H, W, C) uint8 by an integer ``k`` dividing H and W.

    Each output pixel is the mean of a ``k x k`` block, rounded half up; uint8 out. Pixel edges
    align: output pixel (i, j) covers input ``[k i, k i + k) x [k j, k j + k)``.
    """
    if k == 1:
        return a
    H, W = a.shape[:2]
    rest = a.shape[2:]
    s = a.reshape(H // k, k, W, *rest).sum(axis=1, dtype=np.uint32)
    s = s.reshape(H // k, W // k, k, *rest).sum(axis=2, dtype=np.uint32)
    return ((s + (k * k) // 2) // (k * k)).astype(np.uint8)


def _find_dir(root: pathlib.Path, names: tuple[str, ...], what: str) -> pathlib.Path | None:
    found = [root / n for n in names if (root / n).is_dir()]
    if len(found) > 1:
        raise UserInputError(
            f"{root} has both {found[0].name}/ and {found[1].name}/ {what} folders; keep only one."
        )
    return found[0] if found else None


def _image_size(file: pathlib.Path) -> tuple[int, int]:
    """(W, H) from the file header, without decoding the pixels."""
    try:
        with Image.open(file) as im:
            return im.size
    except Exception as e:
        raise UserInputError(
            f"cannot read image {file} ({type(e).__name__}: {e}); replace it with a valid PNG or JPEG."
        ) from None


def _decode(file: pathlib.Path) -> Image.Image:
    try:
        with Image.open(file) as im:
            im.load()  # pixels now in memory; the file is closed on leaving the block
    except Exception as e:
        raise UserInputError(
            f"cannot read image {file} ({type(e).__name__}: {e}); it is corrupt or truncated, "
            "replace it with a valid PNG or JPEG."
        ) from None
    if im.mode not in _IMAGE_MODES:
        raise UserInputError(
            f"image {file} has pixel mode {im.mode!r}; convert it to 8-bit RGB (or grey) PNG or JPEG."
        )
    return im


def read_rgb(file: pathlib.Path, k: int = 1) -> np.ndarray:
    """(H/k, W/k, 3) uint8 RGB of an image file, area-downscaled by ``k`` (see :func:`block_mean`)."""
    im = _decode(file)
    try:
        if im.mode != "RGB":
            im = im.convert("RGB")
        if k > 1:
            im = im.reduce(k)  # Pillow's box reduce: the same numbers as block_mean (tested)
        return np.asarray(im)
    except Exception as e:
        raise UserInputError(f"cannot convert image {file} to RGB ({e}); re-save it as 8-bit RGB.") from None


def read_mask(file: pathlib.Path, k: int = 1) -> np.ndarray:
    """(H/k, W/k) uint8 mask, 0 or 255, of a 1- or 3-channel mask file.

    The channels are combined to one grey level (Pillow's "L" conversion; the same value for a
    0/255 mask with equal channels), area-downscaled by ``k`` (see :func:`block_mean`) and
    thresholded: > 127 is foreground (255).
    """
    im = _decode(file)
    try:
        if im.mode != "L":
            im = im.convert("L")
        if k > 1:
            im = im.reduce(k)
        a = np.asarray(im)
    except Exception as e:
        raise UserInputError(f"cannot convert mask {file} ({e}); re-save it as an 8-bit PNG.") from None
    return np.where(a > 127, 255, 0).astype(np.uint8)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_downscale(downscale, W: int, H: int, image_dir: pathlib.Path, crop: bool = False) -> int:
    """The integer downscale factor, refused (UserInputError) when it is not a positive integer, leaves
    fewer than MIN_SIZE pixels a side or, unless ``crop`` (the caller drops the right and bottom
    ``W mod k``, ``H mod k`` pixels), does not divide W and H."""
    if isinstance(downscale, bool) or not isinstance(downscale, (int, np.integer)) or downscale < 1:
        raise UserInputError(f"downscale must be a positive integer, got {downscale!r}.")
    k = int(downscale)
    if (W % k or H % k) and not crop:
        good = [d for d in _divisors(math.gcd(W, H)) if min(W, H) // d >= MIN_SIZE]
        raise UserInputError(
            f"downscale {k} does not divide the {W}x{H} images in {image_dir}; "
            f"use one of {good[:12]}."
        )
    if W // k < MIN_SIZE or H // k < MIN_SIZE:
        raise UserInputError(
            f"downscale {k} leaves {W // k}x{H // k} pixels of the {W}x{H} images in {image_dir}; "
            f"keep at least {MIN_SIZE} pixels a side."
        )
    return k


def _split(n_views: int, holdout_every, cam_file: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(holdout_every, bool) or not isinstance(holdout_every, (int, np.integer)) \
            or holdout_every < 0:
        raise UserInputError(
            f"holdout_every must be an integer >= 0 (0: no held-out views), got {holdout_every!r}."
        )
    ids = np.arange(n_views)
    if holdout_every == 0:
        return ids, ids[:0]
    test = ids[::holdout_every]
    train = np.setdiff1d(ids, test)
    if train.size == 0:
        raise UserInputError(
            f"holdout_every={holdout_every} holds out all {n_views} views of {cam_file.parent}; "
            "use holdout_every=0 or a larger value."
        )
    return train, test


def read_cameras(cam_file: pathlib.Path, n_views: int, W: int, H: int):
    """Cameras of a NeuS ``cameras_sphere.npz`` for ``n_views`` images of ``W x H`` pixels.

    Returns:
        K: (V, 3, 3) float64 at full resolution; c2w: (V, 4, 4) float64 camera-to-world in
        unit-sphere coordinates; scale_mat: (4, 4) float64 unit sphere -> world.

    Raises UserInputError if the file is unreadable, keys are missing or extra, a matrix holds
    NaN/Inf or is singular, the views disagree on scale_mat, or a camera does not see the
    unit sphere's centre (behind it, or projected more than half an image outside the frame).
    """
    try:
        data = np.load(cam_file, allow_pickle=False)
        keys = list(data.keys())
    except Exception as e:
        raise UserInputError(
            f"cannot read {cam_file} ({type(e).__name__}: {e}); it must be a numpy .npz archive."
        ) from None
    with data:
        require_view_keys(keys, n_views, ("world_mat_", "scale_mat_"), str(cam_file))
        n_cams = sum(1 for key in keys if re.fullmatch(r"world_mat_\d+", key))
        if n_cams > n_views:
            raise UserInputError(
                f"{cam_file} has {n_cams} cameras (world_mat_*) but there are {n_views} images; "
                "every image needs exactly one camera, add the missing images or remove the extra cameras."
            )
        Ks, c2ws = [], []
        scale_mat = None
        for i in range(n_views):
            world = read_matrix(data, f"world_mat_{i}", [(3, 4), (4, 4)], str(cam_file))
            scale = read_matrix(data, f"scale_mat_{i}", [(4, 4)], str(cam_file))
            where = f"scale_mat_{i} in {cam_file}"
            if np.abs(scale[3] - np.array([0.0, 0.0, 0.0, 1.0])).max() > 1e-6:
                raise UserInputError(
                    f"{where} is not affine (last row {scale[3].tolist()}, expected [0, 0, 0, 1])."
                )
            with np.errstate(all="ignore"):
                cond = np.linalg.cond(scale[:3, :3])
            if not np.isfinite(cond) or cond > 1e12:
                raise UserInputError(
                    f"{where} is singular; it must map the unit sphere onto the object's bounds."
                )
            if scale_mat is None:
                scale_mat = scale
            elif not np.allclose(scale, scale_mat, rtol=1e-6, atol=1e-9 * np.abs(scale_mat).max()):
                raise UserInputError(
                    f"{where} differs from scale_mat_0; all views must share one unit sphere."
                )
            with np.errstate(all="ignore"):
                P = (world @ scale)[:3, :4]
            K, R, t = decompose_projection(P, f"camera {i} (world_mat_{i} @ scale_mat_{i}) in {cam_file}")
            # Does the camera see the unit sphere's centre? x_cam = R 0 + t = t.
            depth = t[2]
            u, v = (K @ t)[:2] / depth if depth > 0 else (np.nan, np.nan)
            mx, my = CENTRE_MARGIN * W, CENTRE_MARGIN * H
            if not (depth > 0 and -mx <= u <= W + mx and -my <= v <= H + my):
                seen = "behind the camera" if not depth > 0 else f"at pixel ({u:.0f}, {v:.0f})"
                raise UserInputError(
                    f"camera {i} in {cam_file} does not look at the unit sphere's centre (it is {seen}, "
                    f"image {W}x{H}); check world_mat_{i} and scale_mat_{i}."
                )
            Ks.append(K)
            c2ws.append(camera_to_world(R, t))
    return np.stack(Ks), np.stack(c2ws), scale_mat


def _read_all(fn, files, k, out: np.ndarray) -> None:
    """Decode ``files`` with ``fn(file, k)`` into ``out[i]`` using a few threads (Pillow drops the GIL)."""
    def one(i):
        a = fn(files[i], k)
        if a.shape != out.shape[1:]:
            raise UserInputError(
                f"{files[i]} decodes to shape {a.shape}, expected {out.shape[1:]}; re-save it."
            )
        out[i] = a

    workers = max(1, min(8, os.cpu_count() or 1, len(files)))
    with ThreadPoolExecutor(max_workers=workers) as ex:
        for _ in ex.map(one, range(len(files))):
            pass


def load_dtu(path, downscale: int = 1, holdout_every: int = 8, use_masks: bool = True) -> Scene:
    """Load a NeuS/DTU-layout folder (see the module docstring) into a :class:`Scene`.

    Args:
        path: the scene folder.
        downscale: integer factor; images are area-averaged over ``downscale x downscale`` blocks,
            K scaled by ``1 / downscale`` (pixel edges align), masks averaged then thresholded at 127.
        holdout_every: views 0, n, 2n, ... are held out as ``test_ids``; 0 holds out none.
        use_masks: load ``mask/`` (or ``masks/``); without that folder masks are None (warning).

    Returns:
        Scene with uint8 images (V, H, W, 3), masks (V, H, W) 0/255 or None, float32 K (V, 3, 3)
        and c2w (V, 4, 4) in unit-sphere coordinates, float64 scale_mat (4, 4) unit -> world.

    Raises:
        UserInputError: naming the file at fault (missing folder, images, camera file or keys;
            NaN/Inf or singular matrices; mask count or size mismatch; image sizes that differ;
            corrupt images; cameras not looking at the unit sphere; a bad downscale).
    """
    root = pathlib.Path(path).expanduser()
    if not root.is_dir():
        raise UserInputError(
            f"scene folder {root} does not exist; give the folder holding image/ and {CAMERA_FILE}."
        )
    image_dir = _find_dir(root, ("image", "images"), "image")
    if image_dir is None:
        raise UserInputError(f"{root} has no image/ or images/ folder; put the scene's images there.")
    image_files = list_images(image_dir)
    if not image_files:
        raise UserInputError(f"{image_dir} holds no .png or .jpg images; put the scene's images there.")
    cam_file = root / CAMERA_FILE
    if not cam_file.is_file():
        raise UserInputError(
            f"{root} has no {CAMERA_FILE}; it needs world_mat_i and scale_mat_i for every image."
        )

    sizes = [_image_size(f) for f in image_files]
    W0, H0 = sizes[0]
    for f, s in zip(image_files, sizes, strict=True):
        if s != (W0, H0):
            raise UserInputError(
                f"image {f} is {s[0]}x{s[1]} but {image_files[0].name} is {W0}x{H0}; "
                "all images must have one size."
            )
    k = _check_downscale(downscale, W0, H0, image_dir)
    V = len(image_files)
    train_ids, test_ids = _split(V, holdout_every, cam_file)

    mask_files = None
    if use_masks:
        mask_dir = _find_dir(root, ("mask", "masks"), "mask")
        if mask_dir is None:
            warnings.warn(f"{root} has no mask/ folder; loading without masks.", stacklevel=2)
        else:
            mask_files = list_images(mask_dir)
            if len(mask_files) != V:
                raise UserInputError(
                    f"{mask_dir} holds {len(mask_files)} masks but {image_dir} holds {V} images; "
                    "give one mask per image or load with use_masks=False."
                )
            for f in mask_files:
                s = _image_size(f)
                if s != (W0, H0):
                    raise UserInputError(
                        f"mask {f} is {s[0]}x{s[1]} but the images are {W0}x{H0}; "
                        "masks must match their images."
                    )

    K, c2w, scale_mat = read_cameras(cam_file, V, W0, H0)
    K[:, :2, :] /= k

    H, W = H0 // k, W0 // k
    memory.check_images(V, H, W, str(image_dir), with_masks=mask_files is not None)
    images = np.empty((V, H, W, 3), np.uint8)
    _read_all(read_rgb, image_files, k, images)
    masks = None
    if mask_files is not None:
        masks = np.empty((V, H, W), np.uint8)
        _read_all(read_mask, mask_files, k, masks)

    return Scene(
        images=images,
        masks=masks,
        K=K.astype(np.float32),
        c2w=c2w.astype(np.float32),
        scale_mat=scale_mat,
        train_ids=train_ids,
        test_ids=test_ids,
        H=H,
        W=W,
        name=root.resolve().name,
        path=root,
        downscale=k,
        image_names=[f.name for f in image_files],
    )
