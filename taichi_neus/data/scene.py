"""The :class:`Scene` every loader returns: images, masks and cameras in unit-sphere coordinates."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Scene:
    """A multi-view scene ready for training (host-side numpy).

    Training happens inside the unit sphere; ``scale_mat`` maps it back to world units.

    Attributes:
        images: (V, H, W, 3) uint8 RGB, kept uint8 until sampled.
        masks: (V, H, W) uint8, 0 (background) or 255 (object); None without masks.
        K: (V, 3, 3) float32 intrinsics at this (downscaled) resolution, pixels; pixel (i, j)
            has its centre at (i + 0.5, j + 0.5).
        c2w: (V, 4, 4) float32 camera-to-world, unit-sphere coordinates, OpenCV axes
            (x right, y down, z forward).
        scale_mat: (4, 4) float64 affine map unit sphere -> world (``x_world = scale_mat @ [x, 1]``).
        train_ids: (V_train,) int64 view indices used for training.
        test_ids: (V_test,) int64 held-out view indices.
        H, W: image height and width in pixels.
        name: short scene name (the folder name).
        path: the folder it was loaded from.
        downscale: the integer factor the images were reduced by.
        image_names: file name of each view's image.
        background: RGB in [0, 1] the images were composited onto (NeRF-synthetic RGBA), or None.
        points: (N, 3) float32 unit-sphere points on the surface (COLMAP's sparse points, see
            :mod:`taichi_neus.data.sparse_points`), or None.
        point_weights: (N,) float32 weight of each point (mean 1), or None.
        depths: (V, H, W) float32 target depth per pixel, distance along the unit ray direction in
            unit-sphere units, 0 where unknown (see :mod:`taichi_neus.data.depths`), or None.
    """

    images: np.ndarray
    masks: np.ndarray | None
    K: np.ndarray
    c2w: np.ndarray
    scale_mat: np.ndarray
    train_ids: np.ndarray
    test_ids: np.ndarray
    H: int
    W: int
    name: str
    path: pathlib.Path
    downscale: int = 1
    image_names: list[str] = field(default_factory=list)
    background: tuple | None = None
    points: np.ndarray | None = None
    point_weights: np.ndarray | None = None
    depths: np.ndarray | None = None

    @property
    def n_views(self) -> int:
        return int(self.images.shape[0])

    def camera_centres(self) -> np.ndarray:
        """(V, 3) float64 camera centres, unit-sphere coordinates."""
        return np.asarray(self.c2w[:, :3, 3], np.float64)

    def camera_sigma(self) -> float:
        """Median distance of the camera centres to the origin, unit-sphere units.

        The sigma of gradient scaling (Philip & Deschaintre 2023): the typical camera-to-content
        distance.
        """
        return float(np.median(np.linalg.norm(self.camera_centres(), axis=-1)))

    def pixel_footprint(self) -> float:
        """Size of one training pixel on the object, unit-sphere units: the median over the training
        views of (camera-centre distance to the origin) / (focal length in pixels). The object sits
        near the origin, so this is about the width a pixel covers there (at this downscale)."""
        ids = np.asarray(self.train_ids if len(self.train_ids) else np.arange(self.n_views), np.int64)
        dist = np.linalg.norm(self.camera_centres()[ids], axis=-1)
        K = np.asarray(self.K, np.float64)[ids]
        focal = 0.5 * (np.abs(K[:, 0, 0]) + np.abs(K[:, 1, 1]))
        return float(np.median(dist / focal))

    def unit_to_world(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) unit-sphere points -> (N, 3) float64 world points (through ``scale_mat``)."""
        p = np.asarray(points, np.float64).reshape(-1, 3)
        return p @ self.scale_mat[:3, :3].T + self.scale_mat[:3, 3]

    def world_to_unit(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) world points -> (N, 3) float64 unit-sphere points."""
        p = np.asarray(points, np.float64).reshape(-1, 3)
        return np.linalg.solve(self.scale_mat[:3, :3], (p - self.scale_mat[:3, 3]).T).T
