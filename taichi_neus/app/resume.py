"""What ``taichi-neus train --resume`` does with options given again: apply, or refuse in one sentence.

A resumed run continues from its checkpoint with the configuration saved in ``RUN/config.json``. Options
given on the command line are compared with it, and each one that differs is either

- **applied** (and then written back to ``config.json`` by the caller, with one printed line per change):
  where the run goes and how (``arch``, a moved ``data.path``), the schedule, learning rates, loss weights,
  iterations and time budget, sampling of rays and points, logging, validation, checkpoints, meshing; or
- **refused** with a :class:`UserInputError` (exit 2): anything that defines the trained model or the data
  it was trained on — the field and background models (``field.*``, ``background.*``: sizes of the hash
  grids and MLPs, activation, normals), the occupancy grid's resolution (saved in the checkpoint), the
  images (``data.downscale``, ``data.holdout_every``, ``data.roi``, ``data.alpha_background``), whether masks
  are used (that decides whether a background model exists), and the two options used only at the start
  (``train.seed``, ``train.init_variance``), which would otherwise be silently ignored.
"""

from __future__ import annotations

import copy
import dataclasses

from taichi_neus.errors import UserInputError
from taichi_neus.train.config import Config, set_value

# dotted prefixes / keys whose change on resume is refused, with the reason given in the sentence
REFUSED = {
    "field.": "it defines the trained field (its parameters are in the checkpoint)",
    "background.": "it defines the trained background model (its parameters are in the checkpoint)",
    "render.occupancy_resolution": "the occupancy grid in the checkpoint has the saved resolution",
    "data.downscale": "the run was trained on images at the saved size",
    "data.holdout_every": "it changes which views are trained on",
    "data.roi": "it moves the unit sphere the field was trained in",
    "data.alpha_background": "it changes the training images' colours",
    "data.use_masks": "it decides whether the run has a background model (its parameters are in the checkpoint)",
    "train.seed": "the seed only shapes the start of a run",
    "train.init_variance": "it is only used at the start of a run",
}


def _flat(dc, prefix: str = "") -> dict:
    out = {}
    for f in dataclasses.fields(dc):
        v = getattr(dc, f.name)
        if dataclasses.is_dataclass(v):
            out.update(_flat(v, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = v
    return out


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return tuple(a) == tuple(b)
    return a == b


def _refusal(key: str) -> str | None:
    for k, why in REFUSED.items():
        if key == k or (k.endswith(".") and key.startswith(k)):
            return why
    return None


def merge_resume_config(saved: Config, overrides: dict) -> tuple[Config, list[str]]:
    """Apply ``overrides`` ({dotted key: typed value}, e.g. ``{"train.lr": 5e-3, "arch": "cpu"}``: the
    options the user gave explicitly) to the ``saved`` configuration of the run being resumed.

    Returns a new Config and one human-readable line per value that changed (``"train.lr: 0.01 -> 0.005"``);
    values equal to the saved ones are no change. Raises :class:`UserInputError` (one sentence) for an
    unknown key, or for a changed option that defines the trained model or its data (see :data:`REFUSED`).
    ``saved`` is not modified.
    """
    cfg = copy.deepcopy(saved)
    known = _flat(cfg)
    changes = []
    for key, value in overrides.items():
        if key not in known:
            raise UserInputError(f"unknown option --{key}; see 'taichi-neus train --help'.")
        old = known[key]
        if _same(old, value):
            continue
        why = _refusal(key)
        if why is not None:
            raise UserInputError(f"--{key} cannot change when resuming ({why}): the run has {old!r}; drop the "
                                 "option, or start a new run in another --out.")
        set_value(cfg, key, tuple(value) if isinstance(value, list) else value)
        changes.append(f"{key}: {old!r} -> {value!r}")
    return cfg.validate(), changes
