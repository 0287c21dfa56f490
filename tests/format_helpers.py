"""Write the built-in synthetic object as a NeRF-synthetic (Blender) scene or a COLMAP scene.

Both render the analytic object of :mod:`taichi_neus.data.synthetic` with its own sphere tracer, in
its WORLD frame (``x_world = 1.7 x_unit + (0.2, -0.1, 0.3)``), so a mesh reconstructed from either
can be compared with :func:`taichi_neus.data.synthetic.sample_surface` directly.
"""

import json
import pathlib
import struct

import numpy as np
from PIL import Image

from taichi_neus.data import synthetic as syn
from taichi_neus.data.cameras import camera_to_world
from taichi_neus.data.colmap import MODEL_IDS, rotation_to_qvec
from taichi_neus.data.rays import image_pixels, pixel_rays

OPENGL_FLIP = np.diag([1.0, -1.0, -1.0, 1.0])


def world_poses(n_views: int, seed: int = 0):
    """[(R, t)] world-to-camera poses (OpenCV axes, world units) of the synthetic scene's cameras."""
    out = []
    for c in syn.camera_centres(n_views, seed):
        R, t_unit = syn.look_at(c)
        out.append((R, syn.SCALE * t_unit - R @ syn.OFFSET))
    return out


def undistort_points(ud: np.ndarray, vd: np.ndarray, k1: float, k2: float):
    """Invert COLMAP's radial distortion ``u (1 + k1 r² + k2 r⁴)`` by fixed-point iteration (small k)."""
    u, v = ud.copy(), vd.copy()
    for _ in range(100):
        r2 = u * u + v * v
        f = 1 + k1 * r2 + k2 * r2 * r2
        u, v = ud / f, vd / f
    return u, v


def render_rgba(K: np.ndarray, R: np.ndarray, t: np.ndarray, W: int, H: int, dist=(0.0, 0.0)):
    """(H, W, 3) float RGB (straight, not premultiplied) and (H, W) float coverage of the object.

    2x2 supersampling: coverage is the fraction of sub-pixel rays that hit; RGB is the mean colour of
    the hitting rays (0 where none hit). Rays are traced in unit-sphere coordinates. ``dist`` = (k1, k2):
    the photograph of a camera with COLMAP's radial distortion (K then holds its f, cx, cy).
    """
    c2w = camera_to_world(R, t)  # world units
    c2w_unit = c2w.copy()
    c2w_unit[:3, 3] = (c2w[:3, 3] - syn.OFFSET) / syn.SCALE
    offsets = np.array([[-0.25, -0.25], [0.25, -0.25], [-0.25, 0.25], [0.25, 0.25]])
    pix = (image_pixels(H, W)[None] + offsets[:, None]).reshape(-1, 2)
    if tuple(dist) == (0.0, 0.0):
        o, d = pixel_rays(K, c2w_unit, pix)
    else:
        u, v = undistort_points((pix[:, 0] - K[0, 2]) / K[0, 0], (pix[:, 1] - K[1, 2]) / K[1, 1], *dist)
        d = np.stack([u, v, np.ones_like(u)], -1) @ c2w_unit[:3, :3].T
        d /= np.linalg.norm(d, axis=-1, keepdims=True)
        o = np.broadcast_to(c2w_unit[:3, 3], d.shape)
    hit, _, pts = syn.sphere_trace(o, d)
    rgb = np.zeros((len(o), 3))
    rgb[hit] = syn.shade(pts[hit])
    hit = hit.reshape(4, H * W)
    cov = hit.mean(axis=0)
    col = rgb.reshape(4, H * W, 3).sum(axis=0) / np.maximum(hit.sum(axis=0), 1)[:, None]
    return col.reshape(H, W, 3), cov.reshape(H, W)


def _u8(x):
    return np.clip(np.round(np.asarray(x) * 255.0), 0, 255).astype(np.uint8)


def blender_K(W: int, H: int, angle_x: float) -> np.ndarray:
    f = 0.5 * W / np.tan(0.5 * angle_x)
    return np.array([[f, 0.0, 0.5 * W], [0.0, f, 0.5 * H], [0.0, 0.0, 1.0]])


def write_blender(root, n_train: int = 24, n_test: int = 4, W: int = 96, H: int = 96, seed: int = 0,
                  angle_x: float = 0.62, with_val: bool = True) -> dict:
    """A NeRF-synthetic folder: transforms_{train,val,test}.json and RGBA PNGs under train/, val/, test/.

    ``file_path`` omits ``.png`` as in the original dataset. Returns {"K": (3, 3), "c2w_world": (V, 4, 4)
    OpenCV, "rgb": (V, H, W, 3) float, "alpha": (V, H, W) float} for the train then test frames.
    """
    root = pathlib.Path(root)
    K = blender_K(W, H, angle_x)
    poses = world_poses(n_train + n_test, seed)
    out = {"K": K, "c2w_world": [], "rgb": [], "alpha": []}
    splits = [("train", poses[:n_train]), ("test", poses[n_train:])]
    if with_val:
        splits.append(("val", poses[n_train:]))
    for split, ps in splits:
        (root / split).mkdir(parents=True, exist_ok=True)
        frames = []
        for i, (R, t) in enumerate(ps):
            rgb, cov = render_rgba(K, R, t, W, H)
            Image.fromarray(np.concatenate([_u8(rgb), _u8(cov)[..., None]], axis=-1), "RGBA").save(
                root / split / f"r_{i}.png")
            c2w = camera_to_world(R, t)
            frames.append({"file_path": f"./{split}/r_{i}", "rotation": 0.0,
                           "transform_matrix": (c2w @ OPENGL_FLIP).tolist()})
            if split != "val":
                out["c2w_world"].append(c2w)
                out["rgb"].append(rgb)
                out["alpha"].append(cov)
        (root / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": angle_x, "frames": frames}))
    return {k: np.stack(v) if isinstance(v, list) else v for k, v in out.items()}


def colmap_K(W: int, H: int) -> np.ndarray:
    """PINHOLE intrinsics with fx != fy and an off-centre principal point (as the synthetic scene's)."""
    return syn.intrinsics(W, H)


def write_colmap(root, n_views: int = 24, W: int = 96, H: int = 96, seed: int = 0, n_points: int = 3000,
                 n_outliers: int = 30, noise: float = 0.003, binary: bool = False, with_masks: bool = False,
                 with_points: bool = True, names=None, image_ext: str = ".png", model: str = "PINHOLE",
                 dist=(0.0, 0.0)) -> dict:
    """A COLMAP folder: images/, sparse/0/{cameras,images,points3D}.{txt|bin} (PINHOLE, one camera).

    Points: ``n_points`` samples of the true surface (world units) with Gaussian noise ``noise`` plus
    ``n_outliers`` uniform in a cube of side 20 around the object, as COLMAP's sparse clouds have.
    Images are RGB on black; masks/<name>.png when ``with_masks``. ``model`` SIMPLE_RADIAL or RADIAL
    (with ``dist`` = (k1, k2)) renders distorted photographs with square pixels. Returns {"K", "poses",
    "images", "masks", "points", "names"}.
    """
    root = pathlib.Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    model_dir = root / "sparse" / "0"
    model_dir.mkdir(parents=True, exist_ok=True)
    K = colmap_K(W, H)
    if model != "PINHOLE":
        K[1, 1] = K[0, 0]
    poses = world_poses(n_views, seed)
    names = names or [f"img_{i:03d}{image_ext}" for i in range(n_views)]
    imgs, masks = [], []
    for name, (R, t) in zip(names, poses, strict=True):
        rgb, cov = render_rgba(K, R, t, W, H, dist)
        img = _u8(rgb * cov[..., None])  # on black, anti-aliased
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "images" / name)
        imgs.append(img)
        m = np.where(cov >= 0.5, 255, 0).astype(np.uint8)
        masks.append(m)
        if with_masks:
            (root / "masks").mkdir(exist_ok=True)
            Image.fromarray(m).save(root / "masks" / f"{name}.png")
    rng = np.random.default_rng(seed)
    pts = np.zeros((0, 3))
    if with_points:
        pts = syn.sample_surface(n_points, seed=seed + 11) + rng.normal(0, noise, (n_points, 3))
        pts = np.concatenate([pts, syn.OFFSET + rng.uniform(-10, 10, (n_outliers, 3))])
    params = {"PINHOLE": [K[0, 0], K[1, 1], K[0, 2], K[1, 2]], "SIMPLE_PINHOLE": [K[0, 0], K[0, 2], K[1, 2]],
              "SIMPLE_RADIAL": [K[0, 0], K[0, 2], K[1, 2], dist[0]],
              "RADIAL": [K[0, 0], K[0, 2], K[1, 2], dist[0], dist[1]]}[model]
    cams = [(1, model, W, H, params)]
    recs = [(i + 1, rotation_to_qvec(R), t, 1, name) for i, (name, (R, t)) in enumerate(zip(names, poses, strict=True))]
    (write_model_binary if binary else write_model_text)(model_dir, cams, recs, pts if with_points else None)
    return {"K": K, "poses": poses, "images": np.stack(imgs), "masks": np.stack(masks), "points": pts,
            "names": names}


def write_model_text(model, cams, recs, pts=None):
    """cameras.txt, images.txt (with an empty POINTS2D line per image), points3D.txt (if ``pts``)."""
    model = pathlib.Path(model)
    lines = ["# Camera list with one line of data per camera:", "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]"]
    lines += [f"{cid} {m} {w} {h} " + " ".join(repr(float(p)) for p in params) for cid, m, w, h, params in cams]
    (model / "cameras.txt").write_text("\n".join(lines) + "\n")
    lines = ["# Image list with two lines of data per image:"]
    for iid, q, t, cid, name in recs:
        lines.append(f"{iid} " + " ".join(repr(float(x)) for x in (*q, *t)) + f" {cid} {name}")
        lines.append("")
    (model / "images.txt").write_text("\n".join(lines) + "\n")
    if pts is not None:
        lines = ["# 3D point list"]
        lines += [f"{i + 1} {float(p[0])!r} {float(p[1])!r} {float(p[2])!r} 128 128 128 0.5 1 0 2 0"
                  for i, p in enumerate(pts)]
        (model / "points3D.txt").write_text("\n".join(lines) + "\n")


def write_model_binary(model, cams, recs, pts=None):
    """cameras.bin, images.bin (one dummy 2D point per image), points3D.bin (if ``pts``), COLMAP layout."""
    model = pathlib.Path(model)
    b = struct.pack("<Q", len(cams))
    for cid, m, w, h, params in cams:
        b += struct.pack("<iiQQ", cid, MODEL_IDS[m][0], w, h) + struct.pack(f"<{len(params)}d", *params)
    (model / "cameras.bin").write_bytes(b)
    b = struct.pack("<Q", len(recs))
    for iid, q, t, cid, name in recs:
        b += struct.pack("<i7di", iid, *q, *t, cid) + name.encode() + b"\0"
        b += struct.pack("<Q", 1) + struct.pack("<ddq", 1.5, 2.5, -1)
    (model / "images.bin").write_bytes(b)
    if pts is not None:
        b = struct.pack("<Q", len(pts))
        for i, p in enumerate(pts):
            b += struct.pack("<Q3d3BdQ", i + 1, *p, 128, 128, 128, 0.5, 2) + struct.pack("<iiii", 1, 0, 2, 0)
        (model / "points3D.bin").write_bytes(b)
