"""One entry point for every supported scene layout: :func:`load_scene` looks at the folder and
calls the matching loader. Supported now: NeuS/DTU (``cameras_sphere.npz``)."""

import pathlib

from ..errors import UserInputError
from .dtu import load_dtu
from .scene import Scene


def detect_format(path) -> str:
    p = pathlib.Path(path)
    if not p.is_dir():
        raise UserInputError(f"scene folder {p} does not exist; pass --data with a folder of photographs.")
    if (p / "cameras_sphere.npz").exists() or (p / "image").is_dir() or (p / "images").is_dir():
        return "dtu"
    raise UserInputError(f"{p} is not a scene folder this tool reads: expected the NeuS/DTU layout "
                         "(image/ or images/, mask/, cameras_sphere.npz).")


def load_scene(path, downscale: int = 1, holdout_every: int = 8, use_masks: bool = True) -> Scene:
    """Load the scene in ``path`` whatever its layout (see :func:`detect_format`)."""
    fmt = detect_format(path)
    if fmt == "dtu":
        return load_dtu(path, downscale=downscale, holdout_every=holdout_every, use_masks=use_masks)
    raise AssertionError(fmt)
