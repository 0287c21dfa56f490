"""A built-in synthetic scene: an analytic SDF object rendered by numpy sphere tracing.

The default scene of the quick start (no download). The object lives in the unit sphere: a
sphere (radius 0.42) blended with a tilted torus and a small rounded box by a smooth union, all
within radius 0.8. Its colour is a smooth procedural texture (stripes and a soft checker, a
function of position) times Lambertian shading from a fixed light, so both texture and geometry
show. The background is black and the masks are exact: a pixel is foreground when the ray
through its centre hits the surface. Colours are anti-aliased with 2x2 supersampling.

The folder written by :func:`make_synthetic_scene` has exactly the NeuS layout read by
:func:`taichi_neus.data.dtu.load_dtu` (``image/000.png``, ``mask/000.png``,
``cameras_sphere.npz``), with a non-identity ``scale_mat`` (world = 1.7 * unit + (0.2, -0.1, 0.3))
so the world transform is exercised. Cameras sit on a sphere of radius ~2.7 (unit units)
looking at the origin. Optional parameters of :func:`make_synthetic_scene` (defaults: the scene
above) move the cameras to another radius and shrink the object by ``object_scale``
(``f_s(p) = s · f(p / s)``, texture scaled with it), e.g. cameras at radius 0.9 *inside* the unit
sphere around an object of radius 0.3, for experiments where rays start inside the modelled region.

Sphere tracing: Hart, "Sphere tracing: a geometric method for the antialiased ray tracing of
implicit surfaces", The Visual Computer 1996. Smooth union: the polynomial smooth minimum
(Quilez), whose gradient is a convex combination of its arguments' gradients, so the result is
1-Lipschitz and a lower bound of the distance to its zero set (exact away from the blends).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import numpy as np
from PIL import Image

from taichi_neus.data.cameras import camera_to_world, projection_matrix
from taichi_neus.data.rays import image_pixels, pixel_rays, unit_sphere_near_far
from taichi_neus.errors import UserInputError

VERSION = "synthetic_v1"
# unit sphere -> world: x_world = SCALE * x_unit + OFFSET
SCALE = 1.7
OFFSET = np.array([0.2, -0.1, 0.3])
BOUND_RADIUS = 0.8  # the whole object lies inside this sphere (unit-sphere units)
CAMERA_RADIUS = 2.7
# "up" in the unit-sphere frame is -y (cameras' image y axis points down, along +y).
UP = np.array([0.0, -1.0, 0.0])
LIGHT = np.array([0.35, -0.8, -0.45]) / np.linalg.norm([0.35, -0.8, -0.45])  # towards the light

# Shape parameters (unit-sphere units).
_SPHERE_C = np.array([0.0, 0.03, 0.0])
_SPHERE_R = 0.42
_TORUS_C = np.array([0.0, 0.05, 0.0])
_TORUS_MAJOR, _TORUS_MINOR = 0.55, 0.11
_TORUS_TILT = np.deg2rad(25.0)  # about the x axis
_BOX_C = np.array([0.22, -0.38, 0.18])
_BOX_HALF = np.array([0.14, 0.09, 0.11])
_BOX_ROUND = 0.03
_BLEND = 0.08


def scale_mat() -> np.ndarray:
    """(4, 4) float64 unit sphere -> world of the synthetic scene."""
    S = np.eye(4)
    S[:3, :3] *= SCALE
    S[:3, 3] = OFFSET
    return S


def _rot_x(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


_TORUS_R = _rot_x(_TORUS_TILT)  # torus frame -> unit frame
_BOX_R = np.array([[np.cos(0.5), 0.0, np.sin(0.5)], [0.0, 1.0, 0.0], [-np.sin(0.5), 0.0, np.cos(0.5)]])


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    h = np.maximum(k - np.abs(a - b), 0.0) / k
    return np.minimum(a, b) - h * h * k * 0.25


def synthetic_sdf_unit(points: np.ndarray) -> np.ndarray:
    """Signed distance (lower bound, 1-Lipschitz, exact away from the blends) of the object.

    Args:
        points: (N, 3) float, unit-sphere coordinates.
    Returns:
        (N,) float64, negative inside, unit-sphere units.
    """
    p = np.asarray(points, np.float64).reshape(-1, 3)
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    # Written out per coordinate: ~5x faster than (N, 3) matrix products and norms in numpy.
    c = _SPHERE_C
    d_sphere = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) - _SPHERE_R
    R, c = _TORUS_R, _TORUS_C  # q = R^T (p - c): the torus frame, torus in its x-z plane
    px, py, pz = x - c[0], y - c[1], z - c[2]
    qx = px * R[0, 0] + py * R[1, 0] + pz * R[2, 0]
    qy = px * R[0, 1] + py * R[1, 1] + pz * R[2, 1]
    qz = px * R[0, 2] + py * R[1, 2] + pz * R[2, 2]
    ring = np.sqrt(qx * qx + qz * qz) - _TORUS_MAJOR
    d_torus = np.sqrt(ring * ring + qy * qy) - _TORUS_MINOR
    R, c, e = _BOX_R, _BOX_C, _BOX_HALF - _BOX_ROUND  # rounded box in its own frame
    px, py, pz = x - c[0], y - c[1], z - c[2]
    bx = np.abs(px * R[0, 0] + py * R[1, 0] + pz * R[2, 0]) - e[0]
    by = np.abs(px * R[0, 1] + py * R[1, 1] + pz * R[2, 1]) - e[1]
    bz = np.abs(px * R[0, 2] + py * R[1, 2] + pz * R[2, 2]) - e[2]
    mx, my, mz = np.maximum(bx, 0.0), np.maximum(by, 0.0), np.maximum(bz, 0.0)
    inner = np.minimum(np.maximum(np.maximum(bx, by), bz), 0.0)
    d_box = np.sqrt(mx * mx + my * my + mz * mz) + inner - _BOX_ROUND
    return _smin(_smin(d_sphere, d_torus, _BLEND), d_box, _BLEND)


def scaled_sdf_unit(points: np.ndarray, object_scale: float = 1.0) -> np.ndarray:
    """The object shrunk (or grown) by ``object_scale`` about the origin: ``s · f(p / s)``, still a
    1-Lipschitz lower bound of the distance. (N,) float64, unit-sphere units; ``object_scale`` 1 is
    exactly :func:`synthetic_sdf_unit`."""
    if object_scale == 1.0:
        return synthetic_sdf_unit(points)
    return object_scale * synthetic_sdf_unit(np.asarray(points, np.float64) / object_scale)


def sdf_normal(points: np.ndarray, eps: float = 1e-5, object_scale: float = 1.0) -> np.ndarray:
    """(N, 3) float64 unit normals (central differences of the SDF), unit-sphere coordinates."""
    p = np.asarray(points, np.float64).reshape(-1, 3) / object_scale  # the normal is scale invariant
    g = np.empty_like(p)
    for i in range(3):
        e = np.zeros(3)
        e[i] = eps
        g[:, i] = synthetic_sdf_unit(p + e) - synthetic_sdf_unit(p - e)
    return g / np.maximum(np.linalg.norm(g, axis=-1, keepdims=True), 1e-30)


_NOISE_PERM = np.random.default_rng(12345).permutation(256)
_NOISE_VALUES = np.random.default_rng(54321).uniform(0.0, 1.0, 256)


def value_noise(points: np.ndarray, cell: float) -> np.ndarray:
    """(N,) float64 in [0, 1]: 3D value noise (random values on a lattice of spacing ``cell``, smoothstep-
    interpolated; Perlin's permutation hash), a solid texture with blobs and corners at that scale."""
    q = np.asarray(points, np.float64).reshape(-1, 3) / cell
    i0 = np.floor(q).astype(np.int64)
    f = q - i0
    f = f * f * (3.0 - 2.0 * f)
    out = np.zeros(len(q))
    P = _NOISE_PERM
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                h = P[(P[(P[(i0[:, 0] + dx) & 255] + i0[:, 1] + dy) & 255] + i0[:, 2] + dz) & 255]
                wx, wy, wz = (f[:, a] if b else 1 - f[:, a] for a, b in enumerate((dx, dy, dz)))
                w = wx * wy * wz
                out += w * _NOISE_VALUES[h]
    return out


TEXTURES = ("smooth", "speckled")


def albedo(points: np.ndarray, texture: str = "smooth") -> np.ndarray:
    """(N, 3) float64 RGB in [0, 1] of the procedural texture at unit-sphere points.

    ``"smooth"`` (the built-in scene); ``"speckled"``: the same colours times value noise at two scales
    (0.06 and 0.03 unit-sphere units), the detail SIFT needs to match photographs (the smooth texture
    gives ~20 features per 320x240 view, the speckled one hundreds)."""
    p = np.asarray(points, np.float64).reshape(-1, 3)
    if texture == "speckled":
        n = 0.6 * value_noise(p, 0.06) + 0.4 * value_noise(p + 7.3, 0.03)
        return albedo(p) * np.clip(1.6 * n - 0.3, 0.05, 1.0)[:, None]
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (2.2 * x + 1.3 * y + 0.6 * np.sin(2 * np.pi * z)))
    checker = np.sin(9.0 * x) * np.sin(9.0 * y) * np.sin(9.0 * z)
    soft = 0.5 + 0.5 * np.tanh(4.0 * checker)
    warm = np.array([0.90, 0.45, 0.20])
    cool = np.array([0.20, 0.55, 0.85])
    base = warm * stripes[:, None] + cool * (1.0 - stripes[:, None])
    return np.clip(base * (0.65 + 0.35 * soft[:, None]), 0.0, 1.0)


def shade(points: np.ndarray, object_scale: float = 1.0, texture: str = "smooth") -> np.ndarray:
    """(N, 3) float64 RGB in [0, 1]: albedo (``texture``) times ambient plus Lambertian light (view
    independent). With ``object_scale`` the texture is scaled with the object (evaluated at ``p / s``)."""
    n = sdf_normal(points, object_scale=object_scale)
    lam = np.maximum(n @ LIGHT, 0.0)
    p = points if object_scale == 1.0 else np.asarray(points, np.float64) / object_scale
    return albedo(p, texture) * (0.35 + 0.65 * lam)[:, None]


def environment(dirs: np.ndarray) -> np.ndarray:
    """(N, 3) float64 RGB in [0.1, 0.9] of a distant environment seen along unit directions ``dirs``
    (N, 3): a function of direction only (at infinity), smooth but with structure at several
    scales (a vertical gradient, bands and blobs), so a field cannot explain it by one flat colour."""
    d = np.asarray(dirs, np.float64).reshape(-1, 3)
    d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    x, y, z = d[:, 0], d[:, 1], d[:, 2]
    up = -y  # "up" is -y in the unit-sphere frame
    bands = np.sin(5.0 * np.arctan2(z, x) + 2.0 * up)
    blobs = np.sin(7.0 * x + 1.0) * np.sin(6.0 * z - 0.5) * np.sin(5.0 * up + 0.3)
    sky = np.array([0.35, 0.55, 0.80])
    ground = np.array([0.55, 0.45, 0.30])
    t = 0.5 + 0.5 * np.tanh(3.0 * up)
    base = sky * t[:, None] + ground * (1.0 - t[:, None])
    return np.clip(base + 0.15 * bands[:, None] * np.array([1.0, 0.6, 0.2]) + 0.15 * blobs[:, None], 0.1, 0.9)


BACKDROPS = ("black", "environment", "room")
ROOM_RADIUS = 0.97  # unit-sphere units: the "room" backdrop is the inside of this sphere


def backdrop_colour(origins: np.ndarray, dirs: np.ndarray, backdrop: str) -> np.ndarray:
    """(N, 3) float64 RGB seen along rays (origins, dirs: (N, 3), unit-sphere units) that miss the object.

    ``"black"``: zeros. ``"environment"``: :func:`environment` of the direction (infinitely far).
    ``"room"``: the same texture painted on the inside of the sphere of radius :data:`ROOM_RADIUS`
    centred at the origin, looked up by the direction of the point where the ray meets it (so it has
    parallax, like a real wall); rays from outside the room see black.
    """
    o = np.asarray(origins, np.float64).reshape(-1, 3)
    d = np.asarray(dirs, np.float64).reshape(-1, 3)
    d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    if backdrop == "black":
        return np.zeros((len(d), 3))
    if backdrop == "environment":
        return environment(d)
    if backdrop != "room":
        raise ValueError(f"unknown backdrop {backdrop!r}")
    inside = (o * o).sum(1) < ROOM_RADIUS**2
    _, t, _ = unit_sphere_near_far(o, d, radius=ROOM_RADIUS)  # exit: the wall ahead of a ray from inside
    rgb = np.zeros((len(d), 3))
    rgb[inside] = environment(o[inside] + t[inside, None] * d[inside])
    return rgb


def _sdf_chunked(p: np.ndarray, chunk: int = 16384, object_scale: float = 1.0) -> np.ndarray:
    """:func:`scaled_sdf_unit` in cache-sized pieces (numpy temporaries stay in cache)."""
    if len(p) <= chunk:
        return scaled_sdf_unit(p, object_scale)
    out = np.empty(len(p))
    for s in range(0, len(p), chunk):
        out[s:s + chunk] = scaled_sdf_unit(p[s:s + chunk], object_scale)
    return out


def sphere_trace(origins: np.ndarray, dirs: np.ndarray, max_steps: int = 256, eps: float = 1e-6,
                 object_scale: float = 1.0):
    """Vectorised sphere tracing of :func:`synthetic_sdf_unit` (Hart 1996).

    Args:
        origins: (N, 3) float, unit-sphere coordinates; dirs: (N, 3) float unit directions.
        max_steps: iteration cap; a ray still marching after it counts as a miss.
        eps: a ray hits when the SDF falls below this (unit-sphere units).
        object_scale: trace :func:`scaled_sdf_unit` with this scale (1: the default object).
    Returns:
        hit: (N,) bool; t: (N,) float64 distance along the ray to the hit (inf for misses);
        points: (N, 3) float64 hit points (NaN for misses).
    """
    o = np.asarray(origins, np.float64).reshape(-1, 3)
    d = np.asarray(dirs, np.float64).reshape(-1, 3)
    near, far, inside = unit_sphere_near_far(o, d, radius=BOUND_RADIUS * object_scale)
    t = np.full(len(o), np.inf)
    # Marching rays only, compacted as they finish: index, position, direction, distance, exit.
    idx = np.flatnonzero(inside)
    at, afar = near[idx].astype(np.float64), far[idx].astype(np.float64) + 1e-9
    ad = d[idx]
    pos = o[idx] + at[:, None] * ad
    for _ in range(max_steps):
        if idx.size == 0:
            break
        f = _sdf_chunked(pos, object_scale=object_scale)
        done = f < eps
        t[idx[done]] = at[done]
        at += f
        pos += f[:, None] * ad
        keep = ~done & (at <= afar)
        idx, at, afar, pos, ad = idx[keep], at[keep], afar[keep], pos[keep], ad[keep]
    hit = np.isfinite(t)
    pts = np.where(hit[:, None], o + np.where(hit, t, 0.0)[:, None] * d, np.nan)
    return hit, t, pts


def look_at(centre: np.ndarray, target=(0.0, 0.0, 0.0), up=UP) -> tuple[np.ndarray, np.ndarray]:
    """World-to-camera ``(R, t)`` of an OpenCV camera at ``centre`` looking at ``target``."""
    centre = np.asarray(centre, np.float64)
    z = np.asarray(target, np.float64) - centre
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)  # image "down"
    R = np.stack([x, y, z])
    return R, -R @ centre


def camera_centres(n_views: int, seed: int = 0, radius: float = CAMERA_RADIUS) -> np.ndarray:
    """(n_views, 3) float64 camera positions on the sphere of ``radius`` (default 2.7), elevations
    -25..65 degrees.

    A golden-angle spiral in azimuth with elevations spread evenly (shuffled jitter by ``seed``).
    """
    rng = np.random.default_rng(seed)
    i = np.arange(n_views)
    az = i * np.pi * (3.0 - np.sqrt(5.0)) + rng.uniform(0, 2 * np.pi)
    el = np.deg2rad(-25.0 + 90.0 * (i + rng.uniform(0.2, 0.8, n_views)) / n_views)
    el = rng.permutation(el)
    horiz = np.stack([np.cos(az), np.zeros(n_views), np.sin(az)], axis=-1) * np.cos(el)[:, None]
    return radius * (horiz + np.sin(el)[:, None] * UP)


def intrinsics(width: int, height: int, camera_radius: float = CAMERA_RADIUS,
               bound_radius: float = BOUND_RADIUS) -> np.ndarray:
    """(3, 3) float64 K: the bounding sphere fills ~80% of the shorter side; fy != fx slightly,
    principal point off-centre by a pixel, no skew (so nothing relies on a centred, square K).
    ``camera_radius`` / ``bound_radius``: the cameras' distance and the object's bounding radius."""
    tan_half = 1.05 * bound_radius / np.sqrt(camera_radius**2 - bound_radius**2)
    f = 0.5 * min(width, height) / tan_half
    return np.array([[f, 0.0, 0.5 * width + 0.7], [0.0, 1.02 * f, 0.5 * height - 0.6], [0.0, 0.0, 1.0]])


def render_views(K: np.ndarray, c2ws: np.ndarray, width: int, height: int,
                 object_scale: float = 1.0, backdrop: str = "black",
                 texture: str = "smooth") -> tuple[np.ndarray, np.ndarray]:
    """Render views sharing intrinsics ``K`` (3, 3) from camera-to-world ``c2ws`` (V, 4, 4)
    (``object_scale``: see :func:`scaled_sdf_unit`; ``texture``: see :func:`albedo`).

    Returns (V, H, W, 3) uint8 colour, 2x2 supersampled, black background (or, with
    another ``backdrop``, see :func:`backdrop_colour`, wherever a ray misses), and (V, H, W) bool
    masks (the ray through the pixel centre hits the surface). Views are traced together, at
    most ~2^20 rays at a time, so numpy's per-call overhead is shared.
    """
    c2ws = np.asarray(c2ws, np.float64).reshape(-1, 4, 4)
    n = height * width
    centres = image_pixels(height, width)
    offsets = np.array([[-0.25, -0.25], [0.25, -0.25], [-0.25, 0.25], [0.25, 0.25], [0.0, 0.0]])
    pix = (centres[None] + offsets[:, None]).reshape(-1, 2)  # (5 n, 2): 4 sub-pixels, then centres
    images = np.zeros((len(c2ws), height, width, 3), np.uint8)
    masks = np.zeros((len(c2ws), height, width), bool)
    group = max(1, (1 << 20) // len(pix))
    for v0 in range(0, len(c2ws), group):
        vs = range(v0, min(v0 + group, len(c2ws)))
        rays = [pixel_rays(K, c2ws[v], pix) for v in vs]
        o = np.concatenate([r[0] for r in rays])
        d = np.concatenate([r[1] for r in rays])
        hit, _, pts = sphere_trace(o, d, object_scale=object_scale)
        rgb = np.zeros((len(o), 3))
        rgb[hit] = shade(pts[hit], object_scale, texture)
        if backdrop != "black":
            rgb[~hit] = backdrop_colour(o[~hit], d[~hit], backdrop)
        rgb = rgb.reshape(len(vs), 5, n, 3)
        colour = rgb[:, :4].mean(axis=1)
        images[v0:v0 + len(vs)] = np.clip(np.round(colour * 255.0), 0, 255).reshape(-1, height, width, 3)
        masks[v0:v0 + len(vs)] = hit.reshape(len(vs), 5, n)[:, 4].reshape(-1, height, width)
    return images, masks


def make_synthetic_scene(out_dir, n_views: int = 32, width: int = 96, height: int = 96, seed: int = 0,
                         camera_radius: float = CAMERA_RADIUS, object_scale: float = 1.0,
                         backdrop: str = "black"):
    """Render the synthetic scene into ``out_dir`` in the NeuS layout; returns the path.

    ``camera_radius`` (unit-sphere units; may be < 1, cameras inside the modelled region) and
    ``object_scale`` (the object's bounding radius is ``0.8 * object_scale``) change the scene; the
    defaults are the built-in scene. The intrinsics keep the object filling ~80% of the image.
    ``backdrop``: what pixels that miss the object show (:func:`backdrop_colour`; the masks stay
    exact): ``"black"``, ``"environment"`` (at infinity: nothing inside the unit sphere can hold it)
    or ``"room"`` (the same texture on a sphere of radius :data:`ROOM_RADIUS` around everything:
    real geometry inside the unit sphere; the cameras must then lie inside the room).

    Writes ``image/000.png`` .. (RGB), ``mask/000.png`` .. (3-channel 0/255),
    ``cameras_sphere.npz`` (float64 ``world_mat_i`` = K[R|t] padded to 4x4, projecting WORLD
    points, and ``scale_mat_i``, unit sphere -> world) and ``scene.json`` (parameters).
    """
    out = pathlib.Path(out_dir)
    (out / "image").mkdir(parents=True, exist_ok=True)
    (out / "mask").mkdir(parents=True, exist_ok=True)
    bound = BOUND_RADIUS * object_scale
    if not (object_scale > 0 and camera_radius > bound):
        raise UserInputError(f"synthetic scene: the cameras (radius {camera_radius}) must lie outside the object "
                             f"(bounding radius {bound:.3g}); increase camera_radius or decrease object_scale.")
    if backdrop not in BACKDROPS:
        raise UserInputError(f"synthetic scene: unknown backdrop {backdrop!r}; choose one of {', '.join(BACKDROPS)}.")
    if backdrop == "room" and not camera_radius < ROOM_RADIUS:
        raise UserInputError(f"synthetic scene: with the room backdrop the cameras (radius {camera_radius}) must lie "
                             f"inside the room (radius {ROOM_RADIUS}).")
    K = intrinsics(width, height, camera_radius, bound)
    S = scale_mat()
    poses = [look_at(c) for c in camera_centres(n_views, seed, camera_radius)]
    images, masks = render_views(K, np.stack([camera_to_world(R, t) for R, t in poses]), width, height,
                                 object_scale, backdrop)
    cams = {}
    for i, (R, t) in enumerate(poses):
        Image.fromarray(images[i]).save(out / "image" / f"{i:03d}.png")
        mask_rgb = np.repeat(masks[i][..., None] * np.uint8(255), 3, axis=-1)
        Image.fromarray(mask_rgb).save(out / "mask" / f"{i:03d}.png")
        # World camera: x_cam_world = SCALE * x_cam_unit = R x_world + (SCALE t - R OFFSET).
        world = np.eye(4)
        world[:3] = projection_matrix(K, R, SCALE * t - R @ OFFSET)
        cams[f"world_mat_{i}"] = world
        cams[f"scale_mat_{i}"] = S
    np.savez(out / "cameras_sphere.npz", **cams)
    meta = {"version": VERSION, "n_views": n_views, "width": width, "height": height, "seed": seed,
            "scale": SCALE, "offset": OFFSET.tolist(), "camera_radius": camera_radius}
    if object_scale != 1.0:
        meta["object_scale"] = object_scale
    if backdrop != "black":
        meta["backdrop"] = backdrop
    (out / "scene.json").write_text(json.dumps(meta, indent=1))
    return out


def sample_surface(n: int, seed: int = 0, object_scale: float = 1.0) -> np.ndarray:
    """(n, 3) float64 points on the object's surface, WORLD units, uniform by area
    (``object_scale``: of the scaled object of :func:`scaled_sdf_unit`).

    Uniform samples in a thin shell |f| < band are accepted with probability |grad f| (so the
    density is uniform in area, by the coarea formula), then projected onto f = 0 by Newton steps
    along the gradient; the rare point that has not converged to |f| < 1e-10 (a crease of a blend,
    where the gradient is small) is dropped.
    """
    rng = np.random.default_rng(seed)
    band = 0.01
    got = []
    count = 0
    while count < n:
        x = rng.uniform(-BOUND_RADIUS, BOUND_RADIUS, size=(400_000, 3))
        x = x[np.abs(synthetic_sdf_unit(x)) < band]
        gn = np.linalg.norm(_gradient(x), axis=-1)
        x = x[rng.uniform(size=len(x)) < gn]
        for _ in range(10):
            f = synthetic_sdf_unit(x)
            g = _gradient(x)
            x = x - (f / np.maximum((g * g).sum(-1), 1e-12))[:, None] * g
        x = x[np.abs(synthetic_sdf_unit(x)) < 1e-10]
        got.append(x)
        count += len(x)
    x = np.concatenate(got)[:n] * object_scale
    return x * SCALE + OFFSET


def _gradient(p: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    g = np.empty_like(p)
    for i in range(3):
        e = np.zeros(3)
        e[i] = eps
        g[:, i] = (synthetic_sdf_unit(p + e) - synthetic_sdf_unit(p - e)) / (2 * eps)
    return g


def cache_root() -> pathlib.Path:
    """``$TAICHI_NEUS_CACHE`` if set, else ``~/.cache/taichi_neus``."""
    env = os.environ.get("TAICHI_NEUS_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "taichi_neus"


def default_scene_path() -> pathlib.Path:
    """Path of the default synthetic scene, ``<cache_root()>/synthetic_v1``, generated on first use.

    Generation goes to a temporary folder beside it that is renamed into place, so a crash or a
    concurrent caller never sees a half-written scene.
    """
    root = cache_root()
    final = root / VERSION
    if (final / "scene.json").is_file():
        return final
    if final.exists():
        raise UserInputError(f"{final} exists but is not a complete synthetic scene; delete it to regenerate.")
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{VERSION}-", dir=root))
    try:
        make_synthetic_scene(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "scene.json").is_file():  # not a concurrent winner: a stale folder
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
