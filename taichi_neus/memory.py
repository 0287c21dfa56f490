"""Memory checks made before anything big is allocated, so an impossible request is refused in one
sentence instead of ending in a MemoryError, an out-of-memory kill or an int32 index overflow.

* :func:`check_images` — the decoded images of a scene (uint8, ``V·H·W·(3 + 1 mask)`` bytes) must fit
  in the host's available memory; the loaders call it before decoding.
* :func:`step_bytes` / :func:`check_step` — the per-step buffers of training (sampler, field
  workspace, parameters with their gradient and two Adam moments) for the largest batch the
  configuration allows; ``taichi-neus train`` calls it before the run folder is written.

The per-sample figure is counted from the buffers the trainer allocates (``field._Workspace``,
``sampling.RaySampler``) and checked against them in ``tests/test_faults.py``.
"""

from __future__ import annotations

import os

from taichi_neus.errors import UserInputError

INT32_MAX = 2**31 - 1
GROWTH = 1.5  # field workspace buffers grow by 1.5x when a batch needs more


def available_bytes() -> int | None:
    """Host memory available to a new allocation (Linux ``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _fmt(n: float) -> str:
    for unit, k in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n / 1e3:.0f} kB"


def check_images(n_views: int, height: int, width: int, where: str, with_masks: bool = True,
                 available: int | None = None) -> None:
    """Refuse a scene whose decoded uint8 images (and masks) would not fit in host memory."""
    need = n_views * height * width * (4 if with_masks else 3)
    avail = available_bytes() if available is None else available
    if avail is not None and need > avail:
        raise UserInputError(
            f"the {n_views} images of {where} need {_fmt(need)} of memory at {width}x{height} but {_fmt(avail)} "
            "is available; pass a larger --downscale.")


def max_rays(cfg) -> int:
    """The largest ray count a step can use: the trainer keeps ``rays ≈ budget / samples-per-ray``
    with at least one sample per ray, clipped to ``[min_rays, max_rays]`` (S3IM: its fixed batch)."""
    tc = cfg.train
    if tc.s3im_weight > 0:
        return int(tc.s3im_batch)
    return int(max(tc.min_rays, min(tc.max_rays, tc.sample_budget)))


def _pad16(cols: int) -> int:
    return (int(cols) + 15) // 16 * 16


def step_bytes(cfg) -> dict:
    """Bytes of the training step's buffers at the largest batch (:func:`max_rays`), by part.

    Returns a dict with ``rays``, ``samples`` (capacity: rays × n_fine), ``coarse`` (rays ×
    max_coarse), ``largest_buffer`` (elements of the largest single array) and byte counts
    ``field``, ``sampler``, ``params`` and ``total``.
    """
    fc, rc = cfg.field, cfg.render
    g = fc.grid
    # rows of the SDF network per sample: the stencil's evaluations incl. the point, or the point and its
    # three tangents (analytic; plus one pre-activation buffer per hidden layer, counted as a fifth row)
    k = {"central": 7, "analytic": 5}.get(fc.normal_mode, 5)
    x0 = g.n_levels * g.n_features + (3 if fc.include_xyz else 0)
    sdf_out = 1 + fc.feature_dim
    cg = fc.color_grid if fc.color_encoding else None  # the colour network's own grid
    c_enc = cg.n_levels * cg.n_features if cg is not None else 0
    c_in = 3 + 3 + 16 + fc.feature_dim + c_enc  # xyz, normal, SH degree 4 of the view direction, feature[, grid]
    rays = max_rays(cfg)
    samples = rays * rc.n_fine
    coarse = rays * rc.max_coarse
    # activation rows are padded to whole 16-float vectors (buffers.rows16)
    x0p, sdf_outp, c_inp = _pad16(x0), _pad16(sdf_out), _pad16(c_in)
    sdf_hidden, color_hidden = _pad16(fc.sdf_hidden), _pad16(fc.color_hidden)
    # per stencil row: inputs, hidden layers, outputs, and their gradients
    row = 2 * x0p + 2 * sdf_hidden * fc.sdf_layers + 2 * sdf_outp
    colour = 2 * c_inp + 2 * color_hidden * fc.color_layers + 2 * _pad16(3)
    per_sample = GROWTH * (k * row + colour) + 10  # + sdf, normal, rgb, directions
    per_coarse = 6 + 1.25 * 3 + GROWTH * (x0p + sdf_hidden * fc.sdf_layers + sdf_outp)
    field = 4 * per_sample * samples
    sampler = 4 * (per_coarse * coarse + 6 * samples)
    n_params = g.n_levels * (2**g.log2_table) * g.n_features + (x0 + 1) * fc.sdf_hidden \
        + fc.sdf_hidden * fc.sdf_hidden * max(fc.sdf_layers - 1, 0) + (fc.sdf_hidden + 1) * sdf_out \
        + (c_in + 1) * fc.color_hidden + fc.color_hidden * fc.color_hidden * max(fc.color_layers - 1, 0) \
        + (fc.color_hidden + 1) * 3
    if cg is not None:
        n_params += cg.n_levels * (2**cg.log2_table) * cg.n_features
    # parameters, gradients, Adam m and v, and sparse Adam's per-entry step counts (int32)
    params = 4 * (5 if cfg.train.sparse_adam else 4) * n_params
    largest = int(max(GROWTH * k * samples * max(x0p, sdf_hidden), coarse * 3 * 1.25,
                      GROWTH * coarse * max(x0p, sdf_hidden)))
    return {"rays": rays, "samples": samples, "coarse": coarse, "largest_buffer": largest,
            "field": int(field), "sampler": int(sampler), "params": int(params),
            "total": int(field + sampler + params)}


def check_step(cfg, available: int | None = None) -> dict:
    """Refuse a configuration whose training step cannot be allocated; returns :func:`step_bytes`."""
    est = step_bytes(cfg)
    tc, rc = cfg.train, cfg.render
    what = (f"--train.sample_budget {tc.sample_budget} with --train.max_rays {tc.max_rays}, "
            f"--render.n_fine {rc.n_fine} and --render.max_coarse {rc.max_coarse}")
    fix = "lower --train.max_rays or --train.sample_budget"
    if est["largest_buffer"] > INT32_MAX:
        raise UserInputError(
            f"{what} make a batch of {est['rays']} rays whose buffers exceed 2^31 elements (32-bit indices); {fix}.")
    avail = available_bytes() if available is None else available
    if avail is not None and est["total"] > avail:
        raise UserInputError(
            f"{what} need about {_fmt(est['total'])} per training step but {_fmt(avail)} of memory is available; "
            f"{fix}.")
    return est
