"""The region of interest of a scene without a NeuS ``scale_mat``: which world sphere becomes the unit sphere.

NeuS trains inside the unit sphere, so a loader for photographs calibrated elsewhere (COLMAP,
NeRF-synthetic) must choose a sphere around the object, in world units, and map it onto the unit
sphere: ``x_world = radius * x_unit + centre``, i.e. ``scale_mat = [[radius I, centre], [0, 1]]``.
Three estimates, from the most to the least informed:

* :func:`from_masks` — the visual hull (Laurentini 1994) of the foreground masks, carved on a
  voxel grid: every point inside the object projects inside the mask of every view that sees it.
  Centre: the middle of the hull's bounding box; radius: the farthest hull voxel, plus half a
  voxel diagonal, times a margin.
* :func:`from_points` — a sparse point cloud (COLMAP's ``points3D``): centre at the per-axis
  median, radius the ``percentile``-th percentile of the distances to it times a margin, so a few
  stray points do not blow the sphere up.
* :func:`from_frusta` — the cameras only: the centre is the point closest (least squares) to all
  optical axes, the radius the median over cameras of the largest sphere around it that the camera
  sees whole (inscribed in its viewing frustum).

Every estimate caps the radius below the distance of the nearest camera (an object capture has the
cameras outside the object), and says so in :attr:`ROI.detail`. Host-side float64 numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from taichi_neus.errors import UserInputError

# The sphere never reaches closer to a camera than this fraction of the camera's distance.
CAMERA_CLEARANCE = 0.9
# A camera farther than this (unit-sphere radii) cannot see the region at any useful resolution.
MAX_CAMERA_DISTANCE = 1e4


@dataclass
class ROI:
    """A world-space sphere chosen as the unit sphere.

    Attributes:
        centre: (3,) float64, world units.
        radius: world units (> 0).
        method: "masks" | "sparse points" | "camera frusta" | "option --data.roi".
        detail: words for the one-line summary (how centre and radius were found).
    """

    centre: np.ndarray
    radius: float
    method: str
    detail: str = ""

    def scale_mat(self) -> np.ndarray:
        """(4, 4) float64 unit sphere -> world: ``x_world = radius * x_unit + centre``."""
        S = np.eye(4)
        S[:3, :3] *= self.radius
        S[:3, 3] = self.centre
        return S

    def summary(self, where: str) -> str:
        c = ", ".join(f"{x:.4g}" for x in self.centre)
        return (f"[taichi_neus] {where}: unit sphere = world sphere centre ({c}) radius {self.radius:.4g}, "
                f"from the {self.method}{' (' + self.detail + ')' if self.detail else ''}")


def camera_axes(c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(V, 3) camera centres and (V, 3) unit viewing directions (+z, OpenCV) of (V, 4, 4) camera-to-world."""
    c2w = np.asarray(c2w, np.float64)
    z = c2w[:, :3, 2]
    return c2w[:, :3, 3], z / np.linalg.norm(z, axis=-1, keepdims=True)


def _cap_by_cameras(centre, radius, c2w, detail: str) -> tuple[float, str]:
    d_min = float(np.min(np.linalg.norm(camera_axes(c2w)[0] - centre, axis=-1)))
    if radius > CAMERA_CLEARANCE * d_min:
        radius = CAMERA_CLEARANCE * d_min
        detail += f", capped at {CAMERA_CLEARANCE:g} x the nearest camera's distance {d_min:.4g}"
    return radius, detail


def _inscribed_radius(K: np.ndarray, c2w: np.ndarray, W: int, H: int, point: np.ndarray) -> np.ndarray:
    """(V,) radius of the largest sphere around ``point`` (world) inside each camera's frustum.

    The frustum's four side planes pass through the camera centre and two adjacent image corners
    (pixel edges: 0 and W, 0 and H); the radius is the smallest signed distance of the point to
    them (negative: the point is outside the frustum or behind the camera).
    """
    K = np.asarray(K, np.float64)
    c2w = np.asarray(c2w, np.float64)
    corners = np.array([[0.0, 0.0], [W, 0.0], [W, H], [0.0, H]])
    out = np.empty(len(c2w))
    for v in range(len(c2w)):
        Kinv = np.linalg.inv(K[v])
        rays = (np.c_[corners, np.ones(4)] @ Kinv.T)  # camera frame, clockwise in the image (y down)
        x = c2w[v, :3, :3].T @ (point - c2w[v, :3, 3])  # the point in the camera frame
        dist = []
        for a in range(4):
            n = np.cross(rays[a], rays[(a + 1) % 4])  # points into the frustum (corners clockwise, y down)
            n /= np.linalg.norm(n)
            dist.append(float(n @ x))
        out[v] = min(dist) if x[2] > 0 else -np.linalg.norm(x)
    return out


def from_frusta(K: np.ndarray, c2w: np.ndarray, W: int, H: int, where: str) -> ROI:
    """Sphere from the cameras alone (see the module docstring).

    Args:
        K: (V, 3, 3) intrinsics, pixels; c2w: (V, 4, 4) camera-to-world, OpenCV axes, world units;
        W, H: image size in pixels; where: the file or folder named in error messages.

    Raises UserInputError when the optical axes do not meet (parallel cameras: no common centre)
    or the point where they meet is not inside the view of most cameras.
    """
    o, d = camera_axes(c2w)
    A = np.zeros((3, 3))
    b = np.zeros(3)
    for oi, di in zip(o, d, strict=True):
        P = np.eye(3) - np.outer(di, di)  # projects onto the plane normal to the axis
        A += P
        b += P @ oi
    w = np.linalg.eigvalsh(A)
    if len(o) < 2 or w[0] < 1e-3 * w[-1]:
        raise UserInputError(
            f"the cameras of {where} look in parallel directions, so the object's position cannot be "
            "inferred from them; give the region of interest with --data.roi cx,cy,cz,radius (world units).")
    centre = np.linalg.solve(A, b)
    r = _inscribed_radius(K, c2w, W, H, centre)
    if np.mean(r > 0) < 0.5:
        raise UserInputError(
            f"the cameras of {where} do not look at a common region (the point nearest to their optical axes "
            f"is outside the view of {int(np.sum(r <= 0))} of {len(r)} cameras); check the camera poses, or give "
            "--data.roi cx,cy,cz,radius (world units).")
    radius = float(np.median(r[r > 0]))
    radius, detail = _cap_by_cameras(centre, radius, c2w,
                                     f"axes' closest point, median inscribed sphere of {len(r)} frusta")
    return ROI(centre, radius, "camera frusta", detail)


def from_points(points: np.ndarray, c2w: np.ndarray, where: str, percentile: float = 99.0,
                margin: float = 1.1) -> ROI:
    """Sphere from (N, 3) world points: median centre, ``margin`` x the ``percentile``-th distance."""
    p = np.asarray(points, np.float64).reshape(-1, 3)
    p = p[np.isfinite(p).all(axis=1)]
    if len(p) == 0:
        raise UserInputError(f"{where} holds no finite 3D points; give --data.roi cx,cy,cz,radius (world units).")
    centre = np.median(p, axis=0)
    dist = np.linalg.norm(p - centre, axis=-1)
    radius = margin * float(np.percentile(dist, percentile))
    if not radius > 0:
        raise UserInputError(f"the 3D points of {where} all coincide; give --data.roi cx,cy,cz,radius.")
    radius, detail = _cap_by_cameras(centre, radius, c2w, f"median of {len(p)} points, {margin:g} x "
                                     f"{percentile:g}th-percentile distance")
    return ROI(centre, radius, "sparse points", detail)


def from_masks(K: np.ndarray, c2w: np.ndarray, masks: np.ndarray, where: str, resolution: int = 64,
               margin: float = 1.1) -> ROI:
    """Sphere around the visual hull of (V, H, W) uint8 masks (> 127: object), world units.

    The grid is a cube around :func:`from_frusta`'s sphere (twice its radius; grown up to twice if
    the hull touches the cube's side). A voxel survives when in every view it lands on the mask
    dilated by the voxel's projected half-diagonal (so thin parts are not carved away between voxel
    centres). A voxel outside a view's image is carved too, unless that view's mask touches the image
    border (the object may continue outside the frame); then that view has no say there.
    """
    from scipy import ndimage

    masks = np.asarray(masks)
    V, H, W = masks.shape
    K = np.asarray(K, np.float64)
    c2w = np.asarray(c2w, np.float64)
    init = from_frusta(K, c2w, W, H, where)
    # a view that does not see the cameras' common centre has no say (the loader refuses it afterwards,
    # naming it, when it does not see the chosen sphere either)
    views = np.flatnonzero(_inscribed_radius(K, c2w, W, H, init.centre) > 0)
    half = 2.0 * init.radius
    for _ in range(3):
        n = resolution
        step = 2 * half / n
        ax = (np.arange(n) + 0.5) * step - half
        X = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3) + init.centre
        keep = np.ones(len(X), bool)
        seen = np.zeros(len(X), bool)
        for v in views:
            R = c2w[v, :3, :3]
            xc = (X - c2w[v, :3, 3]) @ R  # camera frame
            z = xc[:, 2]
            front = z > 1e-9
            uv = np.full((len(X), 2), -1.0)
            uv[front] = (xc[front] @ K[v].T)[:, :2] / z[front, None]
            inside = front & (uv[:, 0] >= 0) & (uv[:, 0] < W) & (uv[:, 1] >= 0) & (uv[:, 1] < H)
            depth = float(np.linalg.norm(init.centre - c2w[v, :3, 3]))
            # the object lies about within the frusta's sphere: its nearest depth bounds a voxel's footprint
            r_px = int(np.ceil(0.87 * step * max(K[v, 0, 0], K[v, 1, 1]) / max(depth - init.radius, 1e-3 * depth)))
            m = masks[v] > 127
            cut = m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()
            if r_px > 0:
                m = ndimage.maximum_filter(m, size=2 * min(r_px, max(H, W)) + 1)
            idx = np.flatnonzero(inside)
            on = m[uv[idx, 1].astype(np.int64), uv[idx, 0].astype(np.int64)]
            keep[idx[~on]] = False
            if not cut:
                keep[~inside] = False
            seen[idx] = True
        keep &= seen
        if not keep.any():
            raise UserInputError(
                f"the masks of {where} have no common foreground: no point projects inside every mask; "
                "check that each mask belongs to its image and that the cameras are right.")
        occ = keep.reshape(n, n, n)
        touches = occ[0].any() or occ[-1].any() or occ[:, 0].any() or occ[:, -1].any() \
            or occ[:, :, 0].any() or occ[:, :, -1].any()
        if not touches:
            break
        half *= 1.41
    P = X[keep]
    centre = 0.5 * (P.min(axis=0) + P.max(axis=0))
    radius = margin * (float(np.linalg.norm(P - centre, axis=-1).max()) + 0.87 * step)
    radius, detail = _cap_by_cameras(centre, radius, c2w, f"visual hull of {len(views)} masks on a {n}^3 grid, "
                                     f"{margin:g} x its bounding radius")
    return ROI(centre, radius, "masks", detail)


def given(roi, c2w: np.ndarray, where: str) -> ROI:
    """The user's sphere ``(cx, cy, cz, radius)`` in world units (``--data.roi``)."""
    try:
        vals = np.asarray([float(x) for x in roi], np.float64)
    except (TypeError, ValueError):
        vals = np.zeros(0)
    if vals.shape != (4,) or not np.isfinite(vals).all() or not vals[3] > 0:
        raise UserInputError(f"--data.roi must be four numbers cx,cy,cz,radius with radius > 0, got {roi!r}.")
    d_min = float(np.min(np.linalg.norm(camera_axes(c2w)[0] - vals[:3], axis=-1)))
    if d_min <= vals[3]:
        raise UserInputError(
            f"--data.roi {tuple(vals.tolist())} contains a camera of {where} (the nearest is {d_min:.4g} from its "
            "centre); choose a sphere around the object only.")
    return ROI(vals[:3], float(vals[3]), "option --data.roi")


def to_unit(c2w: np.ndarray, roi: ROI) -> np.ndarray:
    """(V, 4, 4) float64 camera-to-world in unit-sphere coordinates from world ones (same axes)."""
    out = np.array(c2w, np.float64)
    out[:, :3, 3] = (out[:, :3, 3] - roi.centre) / roi.radius
    return out


def check_cameras_see_sphere(K: np.ndarray, c2w: np.ndarray, W: int, H: int, where: str, names=None) -> None:
    """Refuse a camera (in unit-sphere coordinates) that does not see the unit sphere's centre.

    The same rule as the DTU loader: the centre must be in front of the camera and project at most
    half an image outside the frame.
    """
    K = np.asarray(K, np.float64)
    c2w = np.asarray(c2w, np.float64)
    for v in range(len(c2w)):
        x = -c2w[v, :3, :3].T @ c2w[v, :3, 3]  # the origin in the camera frame
        name = names[v] if names is not None else f"camera {v}"
        dist = float(np.linalg.norm(c2w[v, :3, 3]))
        if not dist < MAX_CAMERA_DISTANCE:
            raise UserInputError(f"{name} in {where} is {dist:.3g} unit-sphere radii from the region of interest, "
                                 "too far to see it; check its pose or give --data.roi.")
        if not x[2] > 0:
            raise UserInputError(f"{name} in {where} faces away from the region of interest (it is behind the "
                                 "camera); check its pose or give --data.roi.")
        u, w = (K[v] @ x)[:2] / x[2]
        if not (-0.5 * W <= u <= 1.5 * W and -0.5 * H <= w <= 1.5 * H):
            raise UserInputError(f"{name} in {where} does not look at the region of interest (its centre projects "
                                 f"at pixel ({u:.0f}, {w:.0f}) of a {W}x{H} image); check its pose or give --data.roi.")
