"""Load a COLMAP sparse reconstruction (Schönberger & Frahm, CVPR 2016) into a :class:`Scene`.

Folder layout::

    scene/
      images/ (or image/)       the photographs, named as in images.txt / images.bin (sub-folders allowed)
      sparse/0/ (or sparse/)    cameras.{bin,txt}, images.{bin,txt}, optional points3D.{bin,txt}
      masks/ (or mask/)         optional: <image name>.png, <image name> or <image stem>.png per image
      depths/                   optional: <image stem>.npy depth maps (see :mod:`taichi_neus.data.depths`)

The sparse points inside the region (on the masks, if any) come with the scene as ``Scene.points``
and ``Scene.point_weights`` (:mod:`taichi_neus.data.sparse_points`) for the sparse-point loss.

Binary files are preferred when both kinds are there. Camera models: ``SIMPLE_PINHOLE``,
``PINHOLE``, and ``SIMPLE_RADIAL`` / ``RADIAL``, whose images are undistorted on load (see
:func:`undistort`); any other model is refused (run ``colmap image_undistorter`` first).

Conventions: COLMAP's camera frame is OpenCV's (x right, y down, z forward), ``x_cam = R(q) X + t``
with the quaternion ``q = (w, x, y, z)``, and the centre of the top-left pixel is (0.5, 0.5), the
convention used everywhere in this package, so K is taken as given.

The region of interest becomes the unit sphere (:mod:`taichi_neus.data.roi`): from the masks'
visual hull if there are masks, else from the sparse points (median centre, 99th-percentile
radius × 1.1), else from the camera frusta; ``--data.roi cx,cy,cz,radius`` overrides it. One line
says what was chosen. Images are taken in natural order of their names; every ``holdout_every``-th
is held out.
"""

from __future__ import annotations

import os
import pathlib
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from taichi_neus import memory
from taichi_neus.data import roi as roi_mod
from taichi_neus.data.dtu import _check_downscale, _decode, _find_dir, _image_size, _split, block_mean, natural_key
from taichi_neus.data.scene import Scene
from taichi_neus.data.sparse_points import supervision_points
from taichi_neus.errors import UserInputError

# id -> (name, number of parameters), as in COLMAP's src/colmap/sensor/models.h
CAMERA_MODELS = {
    0: ("SIMPLE_PINHOLE", 3), 1: ("PINHOLE", 4), 2: ("SIMPLE_RADIAL", 4), 3: ("RADIAL", 5),
    4: ("OPENCV", 8), 5: ("OPENCV_FISHEYE", 8), 6: ("FULL_OPENCV", 12), 7: ("FOV", 5),
    8: ("SIMPLE_RADIAL_FISHEYE", 4), 9: ("RADIAL_FISHEYE", 5), 10: ("THIN_PRISM_FISHEYE", 12),
    11: ("RAD_TAN_THIN_PRISM_FISHEYE", 16),
}
MODEL_IDS = {name: (i, n) for i, (name, n) in CAMERA_MODELS.items()}
SUPPORTED = ("SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL")
MIN_POINTS = 20  # fewer sparse points than this: the ROI comes from the cameras instead


@dataclass
class Camera:
    id: int
    model: str
    width: int
    height: int
    params: np.ndarray  # float64, as in COLMAP


@dataclass
class ImageRecord:
    id: int
    qvec: np.ndarray  # (4,) w, x, y, z: world -> camera rotation
    tvec: np.ndarray  # (3,)
    camera_id: int
    name: str


# ----------------------------------------------------------------------------------------- reading
class _Reader:
    """Little-endian binary reader that refuses to read past the end (a truncated file)."""

    def __init__(self, data: bytes, file: pathlib.Path):
        self.data, self.pos, self.file = data, 0, file

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise UserInputError(f"{self.file} ends early (truncated or not a COLMAP binary file); "
                                 "re-export the model from COLMAP.")
        out = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return out

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise UserInputError(f"{self.file} ends early (truncated or not a COLMAP binary file); "
                                 "re-export the model from COLMAP.")
        self.pos += n

    def count(self, min_record: int) -> int:
        (n,) = self.take("Q")
        if n * min_record > len(self.data) - self.pos:
            raise UserInputError(f"{self.file} announces {n} records but is only {len(self.data)} bytes long "
                                 "(truncated or not a COLMAP binary file); re-export the model from COLMAP.")
        return n

    def string(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise UserInputError(f"{self.file} ends inside an image name (truncated); re-export the model.")
        raw = self.data[self.pos:end]
        self.pos = end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserInputError(f"{self.file} holds an image name that is not UTF-8 text; "
                                 "re-export the model from COLMAP.") from None


def _read_bytes(file: pathlib.Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as e:
        raise UserInputError(f"cannot read {file} ({e.strerror or e}); check the file's permissions.") from None


def _text_lines(file: pathlib.Path):
    """(line number, stripped text) of the non-comment lines; blank lines are kept (images.txt needs them)."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserInputError(f"{file} is not UTF-8 text; re-export the model with COLMAP's model_converter.") \
            from None
    except OSError as e:
        raise UserInputError(f"cannot read {file} ({e.strerror or e}); check the file's permissions.") from None
    return [(i + 1, ln.strip()) for i, ln in enumerate(text.splitlines()) if not ln.lstrip().startswith("#")]


def _numbers(tokens, file, lineno, kind=float):
    try:
        return [kind(t) for t in tokens]
    except ValueError:
        raise UserInputError(f"line {lineno} of {file} holds a non-number among {' '.join(tokens[:12])!r}; "
                             "re-export the model from COLMAP.") from None


def _check_camera(cam: Camera, file) -> Camera:
    if cam.model not in MODEL_IDS:
        raise UserInputError(f"camera {cam.id} in {file} has the unknown model {cam.model!r}.")
    n = MODEL_IDS[cam.model][1]
    if len(cam.params) != n:
        raise UserInputError(f"camera {cam.id} in {file} ({cam.model}) has {len(cam.params)} parameters, "
                             f"the model has {n}; re-export the model from COLMAP.")
    if not (0 < cam.width < 1 << 20 and 0 < cam.height < 1 << 20):
        raise UserInputError(f"camera {cam.id} in {file} has an impossible size {cam.width}x{cam.height}.")
    if not np.isfinite(cam.params).all():
        raise UserInputError(f"camera {cam.id} in {file} has NaN or infinite parameters; re-run COLMAP.")
    return cam


def read_cameras_text(file: pathlib.Path) -> dict[int, Camera]:
    """``cameras.txt``: ``CAMERA_ID MODEL WIDTH HEIGHT PARAMS...`` per line."""
    cams = {}
    for lineno, ln in _text_lines(file):
        if not ln:
            continue
        tok = ln.split()
        if len(tok) < 4:
            raise UserInputError(f"line {lineno} of {file} is not 'CAMERA_ID MODEL WIDTH HEIGHT PARAMS...'.")
        cid, w, h = _numbers([tok[0], tok[2], tok[3]], file, lineno, int)
        params = np.array(_numbers(tok[4:], file, lineno), np.float64)
        cams[cid] = _check_camera(Camera(cid, tok[1], w, h, params), file)
    return cams


def read_cameras_binary(file: pathlib.Path) -> dict[int, Camera]:
    """``cameras.bin``: uint64 count, then per camera int32 id, int32 model, uint64 w, h, float64 params."""
    r = _Reader(_read_bytes(file), file)
    cams = {}
    for _ in range(r.count(24)):
        cid, model_id, w, h = r.take("iiQQ")
        if model_id not in CAMERA_MODELS:
            raise UserInputError(f"camera {cid} in {file} has the unknown model id {model_id} "
                                 "(not a COLMAP cameras.bin?).")
        name, n = CAMERA_MODELS[model_id]
        params = np.array(r.take(f"{n}d"), np.float64)
        cams[cid] = _check_camera(Camera(cid, name, w, h, params), file)
    return cams


def read_images_text(file: pathlib.Path) -> list[ImageRecord]:
    """``images.txt``: per image a line ``IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME`` and a line of
    2D points (possibly empty), which is skipped."""
    lines = _text_lines(file)
    out = []
    i = 0
    while i < len(lines):
        lineno, ln = lines[i]
        i += 1
        if not ln:
            continue
        tok = ln.split(maxsplit=9)
        if len(tok) < 10:
            raise UserInputError(f"line {lineno} of {file} is not 'IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME'.")
        iid, cid = _numbers([tok[0], tok[8]], file, lineno, int)
        v = _numbers(tok[1:8], file, lineno)
        out.append(ImageRecord(iid, np.array(v[:4]), np.array(v[4:7]), cid, tok[9]))
        i += 1  # the POINTS2D line that follows every image line
    return out


def read_images_binary(file: pathlib.Path) -> list[ImageRecord]:
    """``images.bin``: uint64 count, then per image int32 id, 4+3 float64 pose, int32 camera id, a
    NUL-terminated name, uint64 number of 2D points and 24 bytes per point (skipped)."""
    r = _Reader(_read_bytes(file), file)
    out = []
    for _ in range(r.count(73)):
        vals = r.take("i7di")
        name = r.string()
        (n2d,) = r.take("Q")
        if n2d > (len(r.data) - r.pos) // 24:
            raise UserInputError(f"{file} ends early (truncated or not a COLMAP binary file); re-export the model.")
        r.skip(24 * n2d)
        out.append(ImageRecord(vals[0], np.array(vals[1:5]), np.array(vals[5:8]), vals[8], name))
    return out


def read_points_text(file: pathlib.Path, stats: bool = False):
    """(N, 3) float64 point positions of ``points3D.txt`` (``ID X Y Z R G B ERROR TRACK...``); with
    ``stats`` also (N,) float64 mean reprojection errors (pixels) and (N,) int64 track lengths (views)."""
    pts, err, track = [], [], []
    for lineno, ln in _text_lines(file):
        if not ln:
            continue
        tok = ln.split()
        if len(tok) < 4 or (stats and len(tok) < 8):
            raise UserInputError(f"line {lineno} of {file} is not 'POINT3D_ID X Y Z R G B ERROR TRACK...'.")
        pts.append(_numbers(tok[1:4], file, lineno))
        if stats:
            err.append(_numbers(tok[7:8], file, lineno)[0])
            track.append((len(tok) - 8) // 2)
    xyz = np.array(pts, np.float64).reshape(-1, 3)
    return (xyz, np.array(err, np.float64), np.array(track, np.int64)) if stats else xyz


def read_points_binary(file: pathlib.Path, stats: bool = False):
    """(N, 3) float64 positions of ``points3D.bin``: uint64 count, then per point uint64 id, 3 float64,
    3 uint8 colour, float64 error, uint64 track length and 8 bytes per track element. With ``stats``
    also (N,) float64 mean reprojection errors (pixels) and (N,) int64 track lengths (views)."""
    r = _Reader(_read_bytes(file), file)
    n = r.count(51)
    pts = np.empty((n, 3))
    err = np.empty(n)
    tracks = np.empty(n, np.int64)
    for i in range(n):
        vals = r.take("Q3d3BdQ")
        pts[i] = vals[1:4]
        err[i] = vals[7]
        track = vals[-1]
        if track > (len(r.data) - r.pos) // 8:
            raise UserInputError(f"{file} ends early (truncated or not a COLMAP binary file); re-export the model.")
        tracks[i] = track
        r.skip(8 * track)
    return (pts, err, tracks) if stats else pts


def find_model(root: pathlib.Path) -> pathlib.Path | None:
    """The folder holding ``cameras.{bin,txt}``: ``sparse/0``, ``sparse`` or the scene folder itself."""
    for d in (root / "sparse" / "0", root / "sparse", root):
        if (d / "cameras.bin").is_file() or (d / "cameras.txt").is_file():
            return d
    return None


def _model_file(model: pathlib.Path, stem: str, required: bool = True) -> pathlib.Path | None:
    for ext in (".bin", ".txt"):
        if (model / f"{stem}{ext}").is_file():
            return model / f"{stem}{ext}"
    if required:
        raise UserInputError(f"{model} has cameras but no {stem}.bin or {stem}.txt; copy the whole COLMAP model "
                             "folder (cameras, images, points3D).")
    return None


def read_model(model: pathlib.Path, point_stats: bool = False):
    """(cameras dict, image records, points (N, 3) or None, [files read]) of a COLMAP model folder;
    with ``point_stats`` the points are ``(xyz (N, 3), reprojection error (N,), track length (N,))``."""
    cf, imf = _model_file(model, "cameras"), _model_file(model, "images")
    pf = _model_file(model, "points3D", required=False)
    cams = (read_cameras_binary if cf.suffix == ".bin" else read_cameras_text)(cf)
    images = (read_images_binary if imf.suffix == ".bin" else read_images_text)(imf)
    points = None
    if pf is not None:
        points = (read_points_binary if pf.suffix == ".bin" else read_points_text)(pf, stats=point_stats)
    return cams, images, points, (cf, imf, pf)


# ------------------------------------------------------------------------------------- geometry
def qvec_to_rotation(q: np.ndarray) -> np.ndarray:
    """(3, 3) rotation of a unit quaternion ``(w, x, y, z)`` (normalised first)."""
    q = np.asarray(q, np.float64)
    q = q / np.abs(q).max()  # first to O(1): the norm of huge entries would overflow
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def rotation_to_qvec(R: np.ndarray) -> np.ndarray:
    """(4,) unit quaternion ``(w, x, y, z)``, w >= 0, of a (3, 3) rotation (inverse of :func:`qvec_to_rotation`)."""
    R = np.asarray(R, np.float64)
    K = np.array([
        [R[0, 0] - R[1, 1] - R[2, 2], 0, 0, 0],
        [R[0, 1] + R[1, 0], R[1, 1] - R[0, 0] - R[2, 2], 0, 0],
        [R[0, 2] + R[2, 0], R[1, 2] + R[2, 1], R[2, 2] - R[0, 0] - R[1, 1], 0],
        [R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1], R[0, 0] + R[1, 1] + R[2, 2]],
    ]) / 3.0
    vals, vecs = np.linalg.eigh(K)  # the largest eigenvector of Bar-Itzhack's symmetric matrix
    x, y, z, w = vecs[:, np.argmax(vals)]
    q = np.array([w, x, y, z])
    return q if w >= 0 else -q


def intrinsics(cam: Camera) -> tuple[np.ndarray, tuple[float, float]]:
    """(3, 3) K and radial coefficients (k1, k2) of a supported camera (zeros for pinholes)."""
    p = cam.params
    if cam.model == "SIMPLE_PINHOLE":
        f, cx, cy = p
        fx = fy = f
        k = (0.0, 0.0)
    elif cam.model == "PINHOLE":
        fx, fy, cx, cy = p
        k = (0.0, 0.0)
    elif cam.model == "SIMPLE_RADIAL":
        f, cx, cy, k1 = p
        fx = fy = f
        k = (k1, 0.0)
    else:  # RADIAL
        f, cx, cy, k1, k2 = p
        fx = fy = f
        k = (k1, k2)
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]]), (float(k[0]), float(k[1]))


def distort(u: np.ndarray, v: np.ndarray, k1: float, k2: float) -> tuple[np.ndarray, np.ndarray]:
    """COLMAP's radial distortion of normalised coordinates: ``u (1 + k1 r² + k2 r⁴)``."""
    r2 = u * u + v * v
    f = 1.0 + k1 * r2 + k2 * r2 * r2
    return u * f, v * f


def undistorted_camera(K: np.ndarray, k: tuple[float, float], W: int, H: int, file) -> np.ndarray:
    """(3, 3) pinhole K of the undistorted image (same size and principal point).

    The focal length is the distorted camera's times the smallest zoom s >= 1 for which every pixel of
    the undistorted image comes from inside the photograph (no invented border); refused if the radial
    map folds over (is not monotonic) within the image, since such images cannot be undistorted exactly.
    """
    k1, k2 = k
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    e = np.linspace(0.0, 1.0, 257)
    bx = np.concatenate([e * W, np.full_like(e, W), e * W, np.zeros_like(e)])
    by = np.concatenate([np.zeros_like(e), e * H, np.full_like(e, H), e * H])

    def fits(s):
        u, v = distort((bx - cx) / (fx * s), (by - cy) / (fy * s), k1, k2)
        x, y = u * fx + cx, v * fy + cy
        return bool((x >= -1e-6).all() and (x <= W + 1e-6).all() and (y >= -1e-6).all() and (y <= H + 1e-6).all())

    # monotonic radial map over the image: d/dr [r (1 + k1 r² + k2 r⁴)] > 0 up to the farthest corner
    r_max = max(np.hypot((bx - cx) / fx, (by - cy) / fy))
    r = np.linspace(0.0, r_max, 1001)
    if not (1 + 3 * k1 * r**2 + 5 * k2 * r**4 > 0).all():
        raise UserInputError(f"the radial distortion of {file} (k1={k1:g}, k2={k2:g}) folds the image over, "
                             "so it cannot be undistorted exactly; undistort with colmap image_undistorter.")
    s_lo, s_hi = 1.0, 1.0
    while not fits(s_hi):
        s_hi *= 1.25
        if s_hi > 8:
            raise UserInputError(f"the radial distortion of {file} (k1={k1:g}, k2={k2:g}) is too strong to "
                                 "undistort; undistort with colmap image_undistorter.")
    if s_hi > 1.0:
        s_lo = s_hi / 1.25
        for _ in range(40):
            mid = 0.5 * (s_lo + s_hi)
            s_lo, s_hi = (s_lo, mid) if fits(mid) else (mid, s_hi)
    Ku = K.copy()
    Ku[0, 0], Ku[1, 1] = fx * s_hi, fy * s_hi
    return Ku


def undistort(img: np.ndarray, K: np.ndarray, k: tuple[float, float], Ku: np.ndarray) -> np.ndarray:
    """Resample a distorted (H, W) or (H, W, C) uint8 image into the pinhole camera ``Ku``.

    Each output pixel centre is mapped to normalised coordinates with ``Ku``, distorted with COLMAP's
    radial model (exact: no inversion is needed in this direction), projected with ``K`` and read by
    bilinear interpolation between source pixel centres (edge pixels clamped). uint8 out.
    """
    H, W = img.shape[:2]
    ys, xs = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    u, v = distort((xs - Ku[0, 2]) / Ku[0, 0], (ys - Ku[1, 2]) / Ku[1, 1], *k)
    sx = np.clip(u * K[0, 0] + K[0, 2] - 0.5, 0.0, W - 1.0)
    sy = np.clip(v * K[1, 1] + K[1, 2] - 0.5, 0.0, H - 1.0)
    x0 = np.minimum(np.floor(sx).astype(np.int64), max(W - 2, 0))
    y0 = np.minimum(np.floor(sy).astype(np.int64), max(H - 2, 0))
    x1, y1 = np.minimum(x0 + 1, W - 1), np.minimum(y0 + 1, H - 1)
    fx, fy = sx - x0, sy - y0
    if img.ndim == 3:
        fx, fy = fx[..., None], fy[..., None]
    a = img.astype(np.float32)
    top = a[y0, x0] * (1 - fx) + a[y0, x1] * fx
    bot = a[y1, x0] * (1 - fx) + a[y1, x1] * fx
    return np.clip(np.rint(top * (1 - fy) + bot * fy), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------- loading
def _mask_file(mask_dir: pathlib.Path, name: str) -> pathlib.Path | None:
    p = pathlib.PurePosixPath(name)
    for cand in (mask_dir / f"{name}.png", mask_dir / name, mask_dir / p.with_suffix(".png")):
        if cand.is_file():
            return cand
    return None


def _load_one(file, k, K, dist, Ku, grey: bool) -> np.ndarray:
    im = _decode(file)
    try:
        a = np.asarray(im.convert("L" if grey else "RGB"))
    except Exception as e:
        raise UserInputError(f"cannot convert image {file} ({e}); re-save it as 8-bit RGB.") from None
    if dist != (0.0, 0.0):
        a = undistort(a, K, dist, Ku)
    H, W = a.shape[0] // k * k, a.shape[1] // k * k  # the right and bottom remainders are cropped
    a = block_mean(a[:H, :W], k)
    return np.where(a > 127, 255, 0).astype(np.uint8) if grey else a


def _parallel(fn, n: int) -> None:
    workers = max(1, min(8, os.cpu_count() or 1, n))
    with ThreadPoolExecutor(max_workers=workers) as ex:
        for _ in ex.map(fn, range(n)):
            pass


def load_colmap(path, downscale: int = 1, holdout_every: int = 8, use_masks: bool = True, roi=None,
                log=print) -> Scene:
    """Load a COLMAP scene folder (see the module docstring) into a :class:`Scene`.

    Args:
        path: the scene folder; downscale: integer area-downscale factor (after undistortion; the
        last W mod k columns and H mod k rows are dropped); holdout_every: every n-th view (in name
        order) is held out, 0: none; use_masks: read masks/ if present; roi: ``(cx, cy, cz, radius)``
        world units, or None/() for automatic; log: where the one-line summaries (region, cropping) go.

    Returns:
        Scene with uint8 images, masks or None, pinhole K (float32, downscaled), c2w in unit-sphere
        coordinates and ``scale_mat`` (unit sphere -> COLMAP world).

    Raises:
        UserInputError naming the file: no model, unreadable/truncated model files, an unsupported camera
        model, a registered image missing from images/, image sizes that differ from their camera's or
        from each other, masks missing or of the wrong size, cameras that do not see the region.
    """
    root = pathlib.Path(path).expanduser()
    if not root.is_dir():
        raise UserInputError(f"scene folder {root} does not exist; give the folder holding images/ and sparse/.")
    model = find_model(root)
    if model is None:
        raise UserInputError(f"{root} has no COLMAP model (sparse/0/cameras.bin or .txt); run COLMAP's mapper.")
    cams, records, point_data, files = read_model(model, point_stats=True)
    points = point_data[0] if point_data is not None else None
    cam_file, img_file, pts_file = files
    if not records:
        raise UserInputError(f"{img_file} registers no images; COLMAP could not reconstruct this scene.")
    records.sort(key=lambda r: natural_key(r.name))
    for rec in records:
        if rec.camera_id not in cams:
            raise UserInputError(f"image {rec.name} in {img_file} uses camera {rec.camera_id}, which {cam_file} "
                                 "does not define; re-export the model.")
        cam = cams[rec.camera_id]
        if cam.model not in SUPPORTED:
            raise UserInputError(
                f"camera {cam.id} in {cam_file} uses the {cam.model} model, which this tool does not read "
                f"({', '.join(SUPPORTED)} only); run 'colmap image_undistorter' and load its output.")
        if not (np.isfinite(rec.qvec).all() and np.isfinite(rec.tvec).all() and np.abs(rec.qvec).max() > 1e-9):
            raise UserInputError(f"the pose of image {rec.name} in {img_file} holds NaN, infinity or a zero "
                                 "quaternion; re-run COLMAP.")
    image_dir = _find_dir(root, ("images", "image"), "image")
    if image_dir is None:
        raise UserInputError(f"{root} has no images/ folder; put the photographs COLMAP used there.")
    image_files = []
    for rec in records:
        f = image_dir / rec.name
        if not f.is_file():
            raise UserInputError(f"image {rec.name} registered in {img_file} is not in {image_dir}; "
                                 "copy the photographs COLMAP used there.")
        image_files.append(f)
    W0, H0 = cams[records[0].camera_id].width, cams[records[0].camera_id].height
    for rec, f in zip(records, image_files, strict=True):
        cam = cams[rec.camera_id]
        if (cam.width, cam.height) != (W0, H0):
            raise UserInputError(f"camera {cam.id} in {cam_file} is {cam.width}x{cam.height} but camera "
                                 f"{records[0].camera_id} is {W0}x{H0}; all images must have one size.")
        s = _image_size(f)
        if s != (W0, H0):
            raise UserInputError(f"image {f} is {s[0]}x{s[1]} but its camera in {cam_file} is {W0}x{H0}; "
                                 "use the photographs COLMAP was run on.")
    # Undistorted photographs come in any size (COLMAP crops them to valid pixels, 1591x1193 for DTU's
    # 1600x1200), so a downscale that does not divide it drops the last W0 mod k columns and H0 mod k
    # rows: pixel (0, 0) stays put, hence K before the scaling is unchanged.
    k = _check_downscale(downscale, W0, H0, image_dir, crop=True)
    if W0 % k or H0 % k:
        log(f"[taichi_neus] {image_dir}: the {W0}x{H0} images lose their last {W0 % k} columns and {H0 % k} rows "
            f"so that downscale {k} divides them ({W0 // k * k}x{H0 // k * k})")
    V = len(records)
    train_ids, test_ids = _split(V, holdout_every, img_file)
    mask_files = None
    mask_dir = _find_dir(root, ("masks", "mask"), "mask") if use_masks else None
    if mask_dir is not None:
        mask_files = []
        for rec in records:
            m = _mask_file(mask_dir, rec.name)
            if m is None:
                raise UserInputError(f"{mask_dir} has no mask for image {rec.name} (looked for {rec.name}.png, "
                                     f"{rec.name} and the name with .png); give one mask per image.")
            s = _image_size(m)
            if s != (W0, H0):
                raise UserInputError(f"mask {m} is {s[0]}x{s[1]} but the images are {W0}x{H0}; "
                                     "masks must match their images.")
            mask_files.append(m)
    H, W = H0 // k, W0 // k
    memory.check_images(V, H, W, str(image_dir), with_masks=mask_files is not None)

    # cameras: pinhole K (undistorted) at the loaded resolution; world poses
    Ks, dists, Kus = [], [], {}
    c2w = np.zeros((V, 4, 4))
    for i, rec in enumerate(records):
        cam = cams[rec.camera_id]
        K, dist = intrinsics(cam)
        if not (K[0, 0] > 0 and K[1, 1] > 0):
            raise UserInputError(f"camera {cam.id} in {cam_file} has a focal length <= 0; re-run COLMAP.")
        if cam.id not in Kus:
            Kus[cam.id] = undistorted_camera(K, dist, W0, H0, f"camera {cam.id} in {cam_file}") \
                if dist != (0.0, 0.0) else K
        Ks.append(K)
        dists.append(dist)
        R = qvec_to_rotation(rec.qvec)
        c2w[i, :3, :3] = R.T
        c2w[i, :3, 3] = -R.T @ rec.tvec
        c2w[i, 3, 3] = 1.0
    K_out = np.stack([Kus[r.camera_id] for r in records]).copy()
    K_out[:, :2, :] /= k

    masks = None
    if mask_files is not None:
        masks = np.empty((V, H, W), np.uint8)

        def one_mask(i):
            masks[i] = _load_one(mask_files[i], k, Ks[i], dists[i], Kus[records[i].camera_id], grey=True)
        _parallel(one_mask, V)

    where = str(model)
    with np.errstate(over="ignore", invalid="ignore"):  # absurd poses are refused below, not warned
        if roi is not None and len(roi) > 0:
            chosen = roi_mod.given(roi, c2w, where)
        elif masks is not None:
            chosen = roi_mod.from_masks(K_out, c2w, masks, str(mask_dir))
        elif points is not None and len(points) >= MIN_POINTS:
            chosen = roi_mod.from_points(points, c2w, str(pts_file))
        else:
            chosen = roi_mod.from_frusta(K_out, c2w, W, H, where)
        log(chosen.summary(f"COLMAP {where}"))
        c2w_unit = roi_mod.to_unit(c2w, chosen)
        roi_mod.check_cameras_see_sphere(K_out, c2w_unit, W, H, str(img_file),
                                         names=[f"image {r.name}" for r in records])

    images = np.empty((V, H, W, 3), np.uint8)

    def one_image(i):
        images[i] = _load_one(image_files[i], k, Ks[i], dists[i], Kus[records[i].camera_id], grey=False)
    _parallel(one_image, V)

    sup_pts = sup_w = None
    if point_data is not None and len(points) > 0:  # the SDF is pulled to zero there (Geo-NeuS)
        sup_pts, sup_w = supervision_points(*point_data, chosen.scale_mat(), K_out, c2w_unit, masks)
    return Scene(images=images, masks=masks, K=K_out.astype(np.float32), c2w=c2w_unit.astype(np.float32),
                 scale_mat=chosen.scale_mat(), train_ids=train_ids, test_ids=test_ids, H=H, W=W,
                 name=root.resolve().name, path=root, downscale=k, image_names=[r.name for r in records],
                 points=sup_pts, point_weights=sup_w)


__all__ = ["Camera", "ImageRecord", "load_colmap", "read_model", "qvec_to_rotation", "rotation_to_qvec",
           "undistort", "undistorted_camera"]
