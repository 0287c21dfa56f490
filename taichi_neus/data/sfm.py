"""Camera poses from a folder of photographs: structure from motion with COLMAP (Schönberger & Frahm,
CVPR 2016) through its official Python bindings, ``pycolmap`` (the ``[photos]`` extra).

:func:`poses_from_photos` runs, on the CPU:

1. **features**: SIFT on every photograph (one shared ``SIMPLE_RADIAL`` camera: one focal length,
   the principal point at the image centre, one radial coefficient), at most
   :data:`MAX_IMAGE_SIZE` pixels on the long side;
2. **matching**: every pair for up to :data:`EXHAUSTIVE_MAX` photographs, else each photograph with
   its neighbours in name order (sequential, with quadratically growing gaps; no vocabulary tree
   needed), each pair verified geometrically;
3. **mapping**: incremental reconstruction; when it yields several models the largest is kept and
   the photographs left out are named;
4. **undistortion** to a pinhole camera (COLMAP's undistorter; masks are warped the same way).

and writes a COLMAP-layout scene that :func:`taichi_neus.data.colmap.load_colmap` reads::

    SCENE/
      images/<name>          undistorted photographs (registered ones only)
      masks/<name>.png       undistorted masks, 0/255 (only with a mask folder)
      sparse/cameras.bin     one PINHOLE camera; images.bin; points3D.bin (the sparse points)
      poses.json             the summary printed at the end

Everything is written into a hidden temporary folder next to SCENE and moved into place at the end,
so a failure or an interrupt leaves nothing half-written. Bad input (too few photographs, unreadable
or differently sized ones, photographs that do not overlap, a SCENE that already holds files) raises
:class:`UserInputError` with one sentence.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from taichi_neus.data.colmap import _mask_file
from taichi_neus.data.dtu import _image_size, natural_key
from taichi_neus.errors import UserInputError

PHOTO_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MIN_IMAGES = 5  # fewer registered photographs than this cannot constrain a surface
# Long side fed to SIFT. COLMAP's own default (3200) keeps DTU's 1600x1200 photographs at full size; at
# 400x300 only 2 of 17 scan24 photographs registered (issue 12), at full size all of them.
MAX_IMAGE_SIZE = 3200
MAX_FEATURES = 4096  # SIFT keypoints per photograph (COLMAP: 8192; 4096 matched scan24 as accurately, 6.6x faster)
EXHAUSTIVE_MAX = 60  # up to this many photographs every pair is matched (1770 pairs); beyond, sequential
SEQUENTIAL_OVERLAP = 12  # neighbours matched on each side in sequential mode (plus quadratic gaps)
MIN_PAIR_INLIERS = 15  # COLMAP's minimum of verified matches for a usable pair


@dataclass
class PosesSummary:
    """What :func:`poses_from_photos` registered (also written to ``SCENE/poses.json``).

    photos: photographs found; registered: names of those with a pose; left_out: names without;
    models: number of separate models the mapper built (the largest is kept); points: sparse points
    of the kept model; reprojection_error: their mean, pixels; track_length: mean views per point;
    focal: pinhole focal length after undistortion, pixels; size: (W, H) of the undistorted photographs;
    matcher: ``"exhaustive"`` or ``"sequential"``; seconds: wall time of each stage.
    """

    photos: int
    registered: list[str]
    left_out: list[str]
    models: int
    points: int
    reprojection_error: float
    track_length: float
    focal: float
    size: tuple[int, int]
    matcher: str
    masks: bool
    seconds: dict = field(default_factory=dict)

    def lines(self) -> list[str]:
        """The human-readable summary, one line each."""
        out = [f"registered {len(self.registered)} of {self.photos} photographs "
               f"({self.points} sparse points, mean reprojection error {self.reprojection_error:.2f} px, "
               f"seen by {self.track_length:.1f} photographs on average)",
               f"pinhole camera {self.size[0]}x{self.size[1]}, focal length {self.focal:.1f} px"
               + (", masks undistorted with their photographs" if self.masks else "")]
        if self.models > 1:
            out.append(f"the photographs formed {self.models} separate models; kept the largest")
        if self.left_out:
            out.append(f"warning: {len(self.left_out)} photographs could not be given a pose and are left out of "
                       f"the scene: {', '.join(self.left_out)}")
        return out


def _pycolmap():
    try:
        import pycolmap
    except ImportError:
        raise UserInputError("computing poses needs pycolmap; install it with: pip install 'taichi_neus[photos]'.") \
            from None
    return pycolmap


def list_photos(folder: pathlib.Path) -> list[pathlib.Path]:
    """Photographs (png/jpg/jpeg/tif/bmp, not hidden) directly in ``folder``, in natural name order."""
    files = [p for p in folder.iterdir()
             if p.suffix.lower() in PHOTO_EXTENSIONS and not p.name.startswith(".") and p.is_file()]
    return sorted(files, key=lambda p: natural_key(p.name))


def _check_out(out: pathlib.Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserInputError(f"output folder {out} already exists; choose a new --out (nothing was overwritten).")


def _check_photos(images: pathlib.Path) -> tuple[list[pathlib.Path], tuple[int, int]]:
    if not images.is_dir():
        raise UserInputError(f"--images {images} is not a folder; give the folder that holds the photographs.")
    photos = list_photos(images)
    if len(photos) < MIN_IMAGES:
        raise UserInputError(f"{images} holds {len(photos)} photographs; at least {MIN_IMAGES} overlapping "
                             f"photographs of the object are needed ({', '.join(PHOTO_EXTENSIONS)}).")
    from PIL import Image
    sizes = {}
    for p in photos:
        try:
            with Image.open(p) as im:
                im.load()  # decode now: a truncated file fails here, not inside COLMAP
                sizes[p] = im.size
        except Exception as e:
            raise UserInputError(f"cannot read photograph {p} ({type(e).__name__}); replace or remove it.") \
                from None
    first = sizes[photos[0]]
    for p in photos:
        if sizes[p] != first:
            raise UserInputError(f"photograph {p.name} is {sizes[p][0]}x{sizes[p][1]} but {photos[0].name} is "
                                 f"{first[0]}x{first[1]}; all photographs must have one size (one camera).")
    return photos, first


def _check_masks(mask_dir: pathlib.Path, photos, size) -> dict[str, pathlib.Path]:
    if not mask_dir.is_dir():
        raise UserInputError(f"--masks {mask_dir} is not a folder; give the folder holding one mask per photograph.")
    masks = {}
    for p in photos:
        m = _mask_file(mask_dir, p.name)  # the COLMAP loader's lookup, so both find the same mask
        if m is None:
            raise UserInputError(f"{mask_dir} has no mask for {p.name} (looked for {p.name}.png, {p.name} and "
                                 f"{p.stem}.png); give one mask per photograph.")
        s = _image_size(m)
        if s != size:
            raise UserInputError(f"mask {m} is {s[0]}x{s[1]} but the photographs are {size[0]}x{size[1]}; "
                                 "masks must match their photographs.")
        masks[p.name] = m
    return masks


def _db_stats(db: pathlib.Path) -> tuple[list[int], int]:
    """(keypoints per image, number of image pairs with at least MIN_PAIR_INLIERS verified matches)."""
    con = sqlite3.connect(db)
    try:
        kp = [int(r[0]) for r in con.execute("SELECT rows FROM keypoints ORDER BY image_id")]
        pairs = con.execute("SELECT COUNT(*) FROM two_view_geometries WHERE rows >= ?",
                            (MIN_PAIR_INLIERS,)).fetchone()[0]
    finally:
        con.close()
    return kp, int(pairs)


def _undistort_masks(pc, masks: dict, names: list[str], camera, opts, out_dir: pathlib.Path, size) -> None:
    """Warp each mask exactly as its photograph (same camera, same options), threshold at 50%."""
    from PIL import Image
    out_dir.mkdir()
    for name in names:
        with Image.open(masks[name]) as im:
            a = np.asarray(im.convert("L"), np.uint8)
        bmp, _ = pc.undistort_image(opts, pc.Bitmap.from_array(np.ascontiguousarray(a)), camera)
        u = np.asarray(bmp.to_array()).reshape(bmp.height, bmp.width, -1)[..., 0]
        if (u.shape[1], u.shape[0]) != size:  # cannot happen with one camera; guards against a pycolmap change
            raise RuntimeError(f"undistorted mask {name} is {u.shape[1]}x{u.shape[0]}, photographs {size}")
        target = out_dir / f"{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.where(u > 127, 255, 0).astype(np.uint8)).save(target)


def poses_from_photos(images, out, masks=None, matcher: str = "auto", max_image_size: int = MAX_IMAGE_SIZE,
                      max_features: int = MAX_FEATURES, seed: int = 0, log=print,
                      verbose: bool = False) -> PosesSummary:
    """Photographs in ``images`` -> a COLMAP-layout scene in ``out`` (see the module docstring).

    Args:
        images: folder of photographs of one object, one camera, one size (at least :data:`MIN_IMAGES`).
        out: the scene folder to create (refused if it exists and is not empty).
        masks: optional folder with one mask per photograph (``<name>.png``, ``<name>`` or ``<stem>.png``).
        matcher: ``"auto"`` (exhaustive up to :data:`EXHAUSTIVE_MAX` photographs, else sequential),
            ``"exhaustive"`` or ``"sequential"`` (photographs taken in name order, e.g. video frames).
        max_image_size: long side SIFT sees, pixels (larger photographs are scaled down for features only).
        max_features: SIFT keypoints kept per photograph (fewer: faster matching, less accurate poses).
        seed: COLMAP's random seed (RANSAC, mapper), for repeatable results.
        log: receives one line per stage and the summary.
        verbose: let COLMAP print its own log.

    Returns:
        :class:`PosesSummary`.

    Raises:
        UserInputError: too few photographs, unreadable or mixed-size photographs, missing or
        mis-sized masks, nothing registered (no overlap), fewer than :data:`MIN_IMAGES` registered,
        ``out`` not empty, pycolmap missing. Nothing is left in ``out`` then.
    """
    images, out = pathlib.Path(images).expanduser(), pathlib.Path(out).expanduser()
    if matcher not in ("auto", "exhaustive", "sequential"):
        raise UserInputError(f"--matcher must be auto, exhaustive or sequential, not {matcher!r}.")
    if max_image_size < 100:
        raise UserInputError(f"--max-image-size {max_image_size} is too small for features; use at least 100 "
                             f"(default {MAX_IMAGE_SIZE}).")
    if max_features < 100:
        raise UserInputError(f"--max-features {max_features} is too few; use at least 100 (default {MAX_FEATURES}).")
    _check_out(out)
    photos, size = _check_photos(images)
    mask_files = _check_masks(pathlib.Path(masks).expanduser(), photos, size) if masks else None
    pc = _pycolmap()
    pc.logging.minloglevel = 0 if verbose else 2  # COLMAP's INFO/WARNING lines only on request
    pc.set_random_seed(seed)
    n = len(photos)
    mode = matcher if matcher != "auto" else ("exhaustive" if n <= EXHAUSTIVE_MAX else "sequential")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.poses-", dir=out.parent))
    seconds = {}
    try:
        db = tmp / "database.db"
        names = [p.name for p in photos]
        # 1. features
        t0 = time.time()
        log(f"[poses] 1/4 features: SIFT on {n} photographs {size[0]}x{size[1]} "
            f"(long side at most {max_image_size} px) ...")
        ro = pc.ImageReaderOptions()
        ro.camera_model = "SIMPLE_RADIAL"
        eo = pc.FeatureExtractionOptions()
        eo.max_image_size = int(max_image_size)
        eo.sift.max_num_features = int(max_features)
        pc.extract_features(db, images, image_names=names, camera_mode=pc.CameraMode.SINGLE, reader_options=ro,
                            extraction_options=eo, device=pc.Device.cpu)
        kp, _ = _db_stats(db)
        seconds["features"] = time.time() - t0
        log(f"[poses]     {int(np.median(kp)) if kp else 0} features per photograph (median), "
            f"{seconds['features']:.1f} s")
        # 2. matching
        t0 = time.time()
        log(f"[poses] 2/4 matching: {mode} "
            f"({n * (n - 1) // 2 if mode == 'exhaustive' else 'neighbouring'} pairs) ...")
        if mode == "exhaustive":
            pc.match_exhaustive(db, device=pc.Device.cpu)
        else:
            so = pc.SequentialPairingOptions()
            so.overlap = SEQUENTIAL_OVERLAP
            so.quadratic_overlap = True
            pc.match_sequential(db, pairing_options=so, device=pc.Device.cpu)
        _, pairs = _db_stats(db)
        seconds["matching"] = time.time() - t0
        log(f"[poses]     {pairs} overlapping pairs, {seconds['matching']:.1f} s")
        if pairs == 0:
            raise UserInputError(f"no two photographs in {images} overlap (no pair shares {MIN_PAIR_INLIERS} "
                                 "matching features); take photographs that overlap by more than half, with texture.")
        # 3. mapping
        t0 = time.time()
        log("[poses] 3/4 mapping (incremental) ...")
        count = [0]

        def first_pair():
            count[0] = 2
            log(f"[poses]     initial pair, {count[0]}/{n} registered")

        def next_image():
            count[0] += 1
            log(f"[poses]     {count[0]}/{n} registered")

        po = pc.IncrementalPipelineOptions()
        po.random_seed = seed
        po.num_threads = -1
        sparse = tmp / "sparse_raw"
        sparse.mkdir()
        recs = pc.incremental_mapping(db, images, sparse, options=po, initial_image_pair_callback=first_pair,
                                      next_image_callback=next_image)
        seconds["mapping"] = time.time() - t0
        if not recs:
            raise UserInputError(f"COLMAP could not reconstruct any two photographs of {images} together; "
                                 "they do not overlap enough: take more photographs, closer together, with texture.")
        key = max(recs, key=lambda k: recs[k].num_reg_images())
        rec = recs[key]
        reg = sorted((rec.images[i].name for i in rec.reg_image_ids()), key=natural_key)
        left = [nm for nm in names if nm not in set(reg)]
        log(f"[poses]     {len(reg)}/{n} registered in {seconds['mapping']:.1f} s")
        if len(reg) < MIN_IMAGES:
            raise UserInputError(f"only {len(reg)} of {n} photographs could be given a pose ({', '.join(reg)}), "
                                 f"fewer than {MIN_IMAGES}; take more photographs that overlap, with texture.")
        # 4. undistortion
        t0 = time.time()
        log("[poses] 4/4 undistorting to a pinhole camera ...")
        model_dir = sparse / str(key)
        rec.write(model_dir)  # the kept model, as the mapper refined it
        scene = tmp / "scene"
        uo = pc.UndistortCameraOptions()
        pc.undistort_images(scene, model_dir, images, image_names=reg, undistort_options=uo)
        shutil.rmtree(scene / "stereo", ignore_errors=True)
        for f in scene.glob("run-colmap-*.sh"):
            f.unlink()
        und = pc.Reconstruction(scene / "sparse")
        cam = next(iter(und.cameras.values()))
        if mask_files is not None:
            _undistort_masks(pc, mask_files, reg, next(iter(rec.cameras.values())), uo, scene / "masks",
                             (cam.width, cam.height))
        seconds["undistortion"] = time.time() - t0
        summary = PosesSummary(
            photos=n, registered=reg, left_out=left, models=len(recs), points=int(und.num_points3D()),
            reprojection_error=float(rec.compute_mean_reprojection_error()),
            track_length=float(rec.compute_mean_track_length()), focal=float(cam.mean_focal_length()),
            size=(int(cam.width), int(cam.height)), matcher=mode, masks=mask_files is not None, seconds=seconds)
        (scene / "poses.json").write_text(json.dumps({**summary.__dict__, "images": str(images.resolve()),
                                                      "max_image_size": max_image_size,
                                                      "max_features": max_features, "seed": seed,
                                                      "pycolmap": pc.__version__}, indent=1))
        if out.exists():  # an empty folder the user made: replaced by the finished scene
            out.rmdir()
        os.replace(scene, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for line in summary.lines():
        log(f"[poses] {line}")
    return summary


# ------------------------------------------------------------------------ comparing camera sets
def similarity_align(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity ``dst ≈ s R src + t`` between (N, 3) point sets (Umeyama, PAMI 1991).

    Returns ``(s, R (3, 3), t (3,))`` float64; N >= 3 points not all on a line.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    ms, md = src.mean(0), dst.mean(0)
    a, b = src - ms, dst - md
    U, D, Vt = np.linalg.svd(b.T @ a / len(src))
    S = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        S[2, 2] = -1.0
    R = U @ S @ Vt
    s = float(np.trace(np.diag(D) @ S) / (a**2).sum(1).mean())
    return s, R, md - s * R @ ms


def rotation_angle_deg(R: np.ndarray) -> np.ndarray:
    """Angle in degrees of (..., 3, 3) rotations."""
    c = (np.trace(R, axis1=-2, axis2=-1) - 1.0) / 2.0
    return np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))


def compare_cameras(w2c_est: np.ndarray, w2c_ref: np.ndarray, centre=None) -> dict:
    """Estimated against reference world-to-camera poses (V, 4, 4) of the same views, after a similarity.

    The estimated camera centres are aligned to the reference ones (:func:`similarity_align`); per view
    the rotation error is ``E_i = R_ref,i (R_est,i R_alignᵀ)ᵀ``, a rotation in the camera frame. A camera
    model difference (e.g. a principal point held at the image centre when the true one is not) shows as
    one rotation shared by all views: ``offset`` is their mean (chordal L2 mean) and ``spread`` each
    view's angle from it. Centre errors are relative to the mean distance of the reference cameras to
    ``centre`` (default: the centroid of the reference centres).

    Returns a dict of per-view arrays (``rotation_deg``, ``spread_deg``, ``centre_rel``) and
    ``offset_deg``, and the alignment ``scale``, ``rotation`` (3, 3), ``translation`` (3,) with
    ``x_ref = scale · rotation · x_est + translation``.
    """
    def centres(w2c):
        return -np.einsum("vji,vj->vi", w2c[:, :3, :3], w2c[:, :3, 3])
    c_est, c_ref = centres(w2c_est), centres(w2c_ref)
    s, R, t = similarity_align(c_est, c_ref)
    E = w2c_ref[:, :3, :3] @ np.transpose(w2c_est[:, :3, :3] @ R.T, (0, 2, 1))
    U, _, Vt = np.linalg.svd(E.sum(0))
    mean = U @ np.diag([1.0, 1.0, np.linalg.det(U @ Vt)]) @ Vt
    spread = rotation_angle_deg(E @ mean.T)
    centre = c_ref.mean(0) if centre is None else np.asarray(centre, np.float64)
    dist = np.linalg.norm(c_ref - centre, axis=1).mean()
    err = np.linalg.norm((s * c_est @ R.T + t) - c_ref, axis=1) / dist
    return {"rotation_deg": rotation_angle_deg(E), "spread_deg": spread, "offset_deg": float(rotation_angle_deg(mean)),
            "centre_rel": err, "scale": s, "rotation": R, "translation": t}


__all__ = ["EXHAUSTIVE_MAX", "MAX_FEATURES", "MAX_IMAGE_SIZE", "MIN_IMAGES", "PosesSummary", "compare_cameras",
           "list_photos", "poses_from_photos", "rotation_angle_deg", "similarity_align"]
