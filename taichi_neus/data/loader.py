"""One entry point for every supported scene layout: :func:`load_scene` looks at the folder and calls
the matching loader.

=============  ======================================================  ==================================
format         recognised by                                           loader
=============  ======================================================  ==================================
NeuS / DTU     ``cameras_sphere.npz``                                  :func:`taichi_neus.data.dtu.load_dtu`
NeRF-synthetic ``transforms_train.json`` or ``transforms.json``        :func:`taichi_neus.data.blender.load_blender`
COLMAP         ``sparse/0/cameras.{bin,txt}`` (or ``sparse/``, or the   :func:`taichi_neus.data.colmap.load_colmap`
               folder itself)
=============  ======================================================  ==================================

The checks run in this order, so a folder holding several (a DTU conversion of a COLMAP scene, say)
loads as the first. Every loader returns the same :class:`Scene`: uint8 images, masks or None,
K and camera-to-world in unit-sphere coordinates, ``scale_mat`` (unit sphere -> world).
"""

import pathlib

from taichi_neus.data.blender import is_blender, load_blender
from taichi_neus.data.colmap import find_model, load_colmap
from taichi_neus.data.depths import load_depths
from taichi_neus.data.dtu import CAMERA_FILE, load_dtu
from taichi_neus.data.scene import Scene
from taichi_neus.data.sfm import list_photos
from taichi_neus.errors import UserInputError

FORMATS = ("dtu", "blender", "colmap")


def detect_format(path) -> str:
    """``"dtu"``, ``"blender"`` or ``"colmap"`` for a scene folder; UserInputError if it is none of them."""
    p = pathlib.Path(path).expanduser()
    if not p.is_dir():
        raise UserInputError(f"scene folder {p} does not exist; pass --data with a folder of photographs.")
    if (p / CAMERA_FILE).exists():
        return "dtu"
    if is_blender(p):
        return "blender"
    if find_model(p) is not None:
        return "colmap"
    photos = next((d for d in (p, p / "images", p / "image") if d.is_dir() and list_photos(d)), None)
    if photos is not None:  # photographs without cameras: the poses step computes them
        raise UserInputError(
            f"{p} holds photographs but no cameras ({CAMERA_FILE}, transforms.json or sparse/0); compute them "
            f"first with: taichi-neus poses --images {photos} --out SCENE, then train with --data SCENE.")
    raise UserInputError(
        f"{p} holds no cameras this tool reads: expected {CAMERA_FILE} (NeuS/DTU), transforms_train.json "
        "(NeRF-synthetic) or sparse/0/cameras.bin (COLMAP) next to the images.")


def load_scene(path, downscale: int = 1, holdout_every: int = 8, use_masks: bool = True,
               background: str = "white", roi=None, log=print) -> Scene:
    """Load the scene in ``path`` whatever its layout (see :func:`detect_format`).

    ``background`` (NeRF-synthetic only: the colour RGBA images are composited on) and ``roi``
    (``(cx, cy, cz, radius)`` world units; NeRF-synthetic and COLMAP, whose cameras carry no unit
    sphere) are ignored by the DTU loader, whose ``scale_mat`` is given. ``log`` receives the
    one-line summary of the region of interest the NeRF-synthetic and COLMAP loaders choose.
    """
    fmt = detect_format(path)
    if fmt == "dtu":
        scene = load_dtu(path, downscale=downscale, holdout_every=holdout_every, use_masks=use_masks)
    elif fmt == "blender":
        scene = load_blender(path, downscale=downscale, holdout_every=holdout_every, use_masks=use_masks,
                             background=background, roi=roi, log=log)
    else:
        scene = load_colmap(path, downscale=downscale, holdout_every=holdout_every, use_masks=use_masks, roi=roi,
                            log=log)
    scene.depths = load_depths(scene)  # depths/<stem>.npy, any format (data/depths.py)
    return scene
