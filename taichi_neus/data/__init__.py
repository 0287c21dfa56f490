"""Data layer (host-side numpy): scenes, cameras and rays.

- :func:`load_dtu` reads a NeuS/DTU-layout folder into a :class:`Scene` (unit-sphere cameras).
- :mod:`taichi_neus.data.cameras`: projection matrix <-> K, R, t (RQ decomposition), checks.
- :mod:`taichi_neus.data.rays`: pixel rays and their segment inside the unit sphere.
- :mod:`taichi_neus.data.synthetic`: the built-in analytic scene (default, no download).
"""

from taichi_neus.data.cameras import camera_to_world, decompose_projection
from taichi_neus.data.dtu import load_dtu
from taichi_neus.data.rays import image_rays, iter_image_rays, pixel_rays, unit_sphere_near_far
from taichi_neus.data.scene import Scene
from taichi_neus.data.synthetic import (
    default_scene_path,
    make_synthetic_scene,
    sample_surface,
    synthetic_sdf_unit,
)

__all__ = [
    "Scene",
    "camera_to_world",
    "decompose_projection",
    "default_scene_path",
    "image_rays",
    "iter_image_rays",
    "load_dtu",
    "make_synthetic_scene",
    "pixel_rays",
    "sample_surface",
    "synthetic_sdf_unit",
    "unit_sphere_near_far",
]
