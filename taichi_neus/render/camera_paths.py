"""Camera poses for viewing a trained model: an orbit rig around the unit sphere's centre, orbit
paths, and the dataset's own views (host-side numpy, float64).

Conventions as in :mod:`taichi_neus.data.rays`: OpenCV camera axes (x right, y down, z forward),
``c2w`` a ``(4, 4)`` camera-to-world matrix in unit-sphere coordinates, ``K`` ``(3, 3)`` pixel
intrinsics with pixel centres at +0.5.

The rig's "up" is the mean of the training cameras' up directions (``-y`` of each camera), its
radius and elevation the mean distance and elevation of the camera centres, and azimuth 0 the
direction of their mean centre (for cameras all around the object, the first camera's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from taichi_neus.errors import UserInputError

__all__ = ["OrbitRig", "look_at", "orbit_path", "dataset_path", "mean_intrinsics", "scale_intrinsics",
           "PathCamera", "camera_path"]


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, -1.0, 0.0)) -> np.ndarray:
    """``(4, 4) float64`` OpenCV camera-to-world of a camera at ``eye`` looking at ``target``.

    Args:
        eye, target: ``(3,)`` unit-sphere points.
        up: ``(3,)`` the direction that appears upwards in the image (image ``-y``); must not be
            parallel to the viewing direction.
    """
    eye, target, up = (np.asarray(a, np.float64).reshape(3) for a in (eye, target, up))
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)  # right = forward × up (OpenCV: x × y = z with y = down)
    n = np.linalg.norm(x)
    if n < 1e-9:
        raise ValueError("look_at: 'up' is parallel to the viewing direction")
    x /= n
    y = np.cross(z, x)  # down
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x, y, z, eye
    return c2w


@dataclass
class OrbitRig:
    """Spherical coordinates about the origin: ``eye = radius (cos el (cos az e1 + sin az e2) + sin el up)``.

    Attributes:
        up: ``(3,)`` unit vector, unit-sphere coordinates.
        e1, e2: ``(3,)`` unit vectors spanning the plane orthogonal to ``up`` (azimuth 0 and 90°).
        radius: default camera distance from the origin, unit-sphere units.
        elevation: default elevation, radians (positive: above the ``e1, e2`` plane).
    """

    up: np.ndarray
    e1: np.ndarray
    e2: np.ndarray
    radius: float
    elevation: float

    @classmethod
    def from_cameras(cls, c2w) -> OrbitRig:
        """Fit the rig to ``(V, 4, 4)`` training cameras (see the module docstring)."""
        c2w = np.asarray(c2w, np.float64).reshape(-1, 4, 4)
        if c2w.shape[0] == 0:
            raise UserInputError("camera_paths: no cameras to place an orbit around.")
        up = -c2w[:, :3, 1].mean(axis=0)
        if np.linalg.norm(up) < 1e-6:
            up = np.array([0.0, -1.0, 0.0])
        up /= np.linalg.norm(up)
        centres = c2w[:, :3, 3]
        dist = np.linalg.norm(centres, axis=1)
        radius = float(dist.mean())
        elevation = float(np.mean(np.arcsin(np.clip(centres @ up / np.maximum(dist, 1e-12), -1, 1))))
        ref = None
        for cand in (centres.mean(axis=0), centres[0], np.array([1.0, 0, 0]), np.array([0, 0, 1.0])):
            flat = cand - (cand @ up) * up
            if np.linalg.norm(flat) > 0.05 * max(radius, 1e-6):
                ref = flat / np.linalg.norm(flat)
                break
        e2 = np.cross(up, ref)
        return cls(up=up, e1=ref, e2=e2 / np.linalg.norm(e2), radius=radius, elevation=elevation)

    def eye(self, azimuth: float, elevation: float, radius: float) -> np.ndarray:
        """``(3,)`` camera centre at ``azimuth``, ``elevation`` (radians) and ``radius``."""
        horiz = np.cos(azimuth) * self.e1 + np.sin(azimuth) * self.e2
        return radius * (np.cos(elevation) * horiz + np.sin(elevation) * self.up)

    def pose(self, azimuth: float, elevation: float | None = None, radius: float | None = None) -> np.ndarray:
        """``(4, 4)`` c2w of the camera at these spherical coordinates looking at the origin."""
        el = self.elevation if elevation is None else elevation
        r = self.radius if radius is None else radius
        return look_at(self.eye(azimuth, el, r), (0.0, 0.0, 0.0), self.up)

    def spherical(self, eye) -> tuple[float, float, float]:
        """``(azimuth, elevation, radius)`` of a point (the inverse of :meth:`eye`)."""
        eye = np.asarray(eye, np.float64).reshape(3)
        r = float(np.linalg.norm(eye))
        if r < 1e-12:
            return 0.0, 0.0, 0.0
        el = float(np.arcsin(np.clip(eye @ self.up / r, -1.0, 1.0)))
        return float(np.arctan2(eye @ self.e2, eye @ self.e1)), el, r


def orbit_path(c2w, n_frames: int, elevation: float | None = None, radius: float | None = None) -> np.ndarray:
    """``(n_frames, 4, 4)`` poses on a full circle around the origin, fitted to training cameras.

    Args:
        c2w: ``(V, 4, 4)`` training cameras (they set up, radius, elevation, start azimuth).
        n_frames: number of poses; azimuths ``2π k / n_frames``.
        elevation: radians, default the cameras' mean elevation.
        radius: unit-sphere units, default the cameras' mean distance.
    """
    if n_frames < 1:
        raise UserInputError(f"an orbit needs at least one frame, got --frames {n_frames}.")
    rig = OrbitRig.from_cameras(c2w)
    return np.stack([rig.pose(2.0 * np.pi * k / n_frames, elevation, radius) for k in range(n_frames)])


def mean_intrinsics(K) -> np.ndarray:
    """``(3, 3) float64`` mean of ``(V, 3, 3)`` intrinsics (the orbit camera's lens)."""
    return np.asarray(K, np.float64).reshape(-1, 3, 3).mean(axis=0)


def scale_intrinsics(K, sx: float, sy: float | None = None) -> np.ndarray:
    """Intrinsics for an image resized by ``sx`` horizontally and ``sy`` (default ``sx``) vertically,
    e.g. 0.25 for a 4× smaller image. With pixel centres at +0.5, pixel coordinates scale exactly:
    row 0 of ``K`` scales by ``sx``, row 1 by ``sy``."""
    K = np.array(K, np.float64)
    K[..., 0, :] *= sx
    K[..., 1, :] *= sx if sy is None else sy
    return K


@dataclass
class PathCamera:
    """One frame of a camera path: ``K (3, 3)``, ``c2w (4, 4)``, and the dataset view or -1."""

    K: np.ndarray
    c2w: np.ndarray
    view: int = -1


def dataset_path(scene, which: str, n_frames: int = 0) -> list[PathCamera]:
    """The scene's training (``"train"``) or held-out (``"test"``) views, at most ``n_frames`` of them
    evenly spaced (0: all), with their own intrinsics at the scene's resolution."""
    ids = np.asarray(scene.train_ids if which == "train" else scene.test_ids, np.int64)
    if ids.size == 0:
        raise UserInputError(f"the scene {scene.name} has no {'training' if which == 'train' else 'held-out'} "
                             "views to render; choose another --path.")
    if 0 < n_frames < ids.size:
        ids = ids[np.round(np.linspace(0, ids.size - 1, n_frames)).astype(np.int64)]
    return [PathCamera(np.asarray(scene.K[v], np.float64), np.asarray(scene.c2w[v], np.float64), int(v))
            for v in ids]


def camera_path(scene, name: str, n_frames: int = 0) -> list[PathCamera]:
    """Named path: ``train`` / ``test`` (dataset views) or ``orbit`` (``n_frames``, default 36, with the
    mean intrinsics of the training views), at the scene's resolution."""
    if name in ("train", "test"):
        return dataset_path(scene, name, n_frames)
    if name == "orbit":
        K = mean_intrinsics(scene.K[scene.train_ids])
        poses = orbit_path(scene.c2w[scene.train_ids], n_frames or 36)
        return [PathCamera(K, p) for p in poses]
    raise UserInputError(f"unknown camera path '{name}'; choose train, test or orbit.")
