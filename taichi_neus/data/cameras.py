"""Pinhole cameras: split a projection matrix into intrinsics and pose, and check matrices.

Conventions (OpenCV, as in DTU and NeuS): the camera looks along its +z axis, +x points right
in the image and +y points down. A projection matrix ``P = K [R | t]`` (3, 4) maps a homogeneous
point ``X`` to a homogeneous pixel ``P X``; ``x_cam = R X + t``. Pixel coordinates are continuous
with pixel ``(i, j)`` (column i, row j) covering ``[i, i+1) x [j, j+1)``, so its centre is
``(i + 0.5, j + 0.5)``.

Everything here is host-side float64 numpy. Problems a user can fix (NaN in a matrix, a singular
projection, a missing key) raise :class:`taichi_neus.errors.UserInputError` with one sentence
that names the file and the camera.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from taichi_neus.errors import UserInputError

# A projection's 3x3 part with a condition number above this is treated as singular.
MAX_CONDITION = 1e12


def _rq(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RQ decomposition ``M = U Q`` (U upper triangular, Q orthogonal) of a (3, 3) float64 matrix.

    Built from numpy's QR: with ``J`` the row-reversing permutation, ``(J M)^T = Q' U'`` gives
    ``M = (J U'^T J) (J Q'^T)``, and ``J U'^T J`` is upper triangular.
    """
    J = np.eye(3)[::-1]
    Qp, Up = np.linalg.qr((J @ M).T)
    U = J @ Up.T @ J
    Q = J @ Qp.T
    return U, Q


def decompose_projection(P: np.ndarray, where: str = "the projection matrix"):
    """Split ``P = s K [R | t]`` into intrinsics and pose (inverse of ``K @ [R | t]`` up to scale s).

    Args:
        P: (3, 4) float (a (4, 4) matrix is accepted; its last row is ignored). Any non-zero
            scale, either sign.
        where: words naming the matrix for error messages, e.g.
            ``"camera 3 (world_mat_3 @ scale_mat_3) in /data/scan/cameras_sphere.npz"``.

    Returns:
        K: (3, 3) float64 upper triangular, ``K[2, 2] == 1``, positive focal lengths
           ``K[0, 0], K[1, 1]`` (pixels). ``K[0, 1]`` is the skew.
        R: (3, 3) float64 rotation world -> camera, ``det(R) = +1``.
        t: (3,) float64 translation, ``x_cam = R @ x + t`` in the units of ``P``'s input points.

    Raises:
        UserInputError: ``P`` has the wrong shape, holds NaN/Inf or its 3x3 part is singular.
    """
    try:
        P = np.array(P, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise UserInputError(f"{where} is not a numeric matrix ({e}); store it as a float array.") from None
    if P.shape == (4, 4):
        P = P[:3]
    if P.shape != (3, 4):
        raise UserInputError(f"{where} has shape {P.shape}, expected (3, 4) or (4, 4); store K[R|t] there.")
    check_finite(P, where)
    # P is homogeneous: normalise its size first so nothing below overflows or underflows.
    scale = np.abs(P).max()
    if scale == 0.0:
        raise UserInputError(f"{where} is all zeros; it must be a camera projection K[R|t].")
    P = P / scale
    M = P[:, :3]
    with np.errstate(all="ignore"):
        cond = np.linalg.cond(M)
    if not np.isfinite(cond) or cond > MAX_CONDITION:
        raise UserInputError(
            f"{where} is singular (its 3x3 part has condition number {cond:.3g}); "
            "it is not a pinhole camera projection K[R|t], check how it was made."
        )
    if np.linalg.det(M) < 0:  # P is defined up to scale; pick the sign that gives det(R) = +1
        P = -P
        M = -M
    U, Q = _rq(M)
    D = np.diag(np.sign(np.diag(U)))  # make the diagonal of K positive: U Q = (U D)(D Q)
    K = U @ D
    R = D @ Q
    t = np.linalg.solve(K, P[:, 3])
    K = K / K[2, 2]
    K[1, 0] = K[2, 0] = K[2, 1] = 0.0  # exact zeros below the diagonal
    if not (np.isfinite(K).all() and np.isfinite(t).all() and K[0, 0] > 0 and K[1, 1] > 0):
        raise UserInputError(f"{where} gives invalid intrinsics {K.tolist()}; check how it was made.")
    return K, R, t


def camera_to_world(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(4, 4) float64 camera-to-world matrix from a world-to-camera pose ``x_cam = R x + t``.

    Columns 0..2 are the camera's x (right), y (down) and z (forward) axes in world coordinates;
    column 3 is the camera centre ``-R^T t``.
    """
    R = np.asarray(R, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64).reshape(3)
    c2w = np.eye(4)
    c2w[:3, :3] = R.T
    c2w[:3, 3] = -R.T @ t
    return c2w


def projection_matrix(K: np.ndarray, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(3, 4) float64 ``K [R | t]``."""
    return np.asarray(K, np.float64) @ np.concatenate(
        [np.asarray(R, np.float64), np.asarray(t, np.float64).reshape(3, 1)], axis=1
    )


def project(P: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project (N, 3) points with a (3, 4) matrix; returns (N, 2) pixel coordinates and (N,) depth.

    Depth is the third homogeneous coordinate; for ``P = K [R | t]`` with ``K[2, 2] = 1`` it is
    the z of the point in the camera frame (positive in front of the camera).
    """
    P = np.asarray(P, np.float64)[:3]
    X = np.asarray(points, np.float64).reshape(-1, 3)
    h = X @ P[:, :3].T + P[:, 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = h[:, :2] / h[:, 2:3]
    return uv, h[:, 2]


def check_finite(M: np.ndarray, where: str) -> None:
    """Raise UserInputError if ``M`` holds NaN or Inf; ``where`` names the file and camera."""
    M = np.asarray(M)
    if not np.isfinite(M).all():
        raise UserInputError(f"{where} contains NaN or Inf values; re-create the camera file.")


def read_matrix(data, key: str, shapes: Iterable[tuple[int, ...]], file: str) -> np.ndarray:
    """Read ``data[key]`` (an opened npz or a dict) as a finite float64 matrix of one of ``shapes``.

    Raises UserInputError naming ``file`` and ``key`` if the key is missing, the array is not
    numeric, has another shape, or holds NaN/Inf.
    """
    shapes = tuple(shapes)
    if key not in data:
        raise UserInputError(f"{file} has no '{key}'; every view needs one.")
    try:
        M = np.array(data[key], dtype=np.float64)
    except Exception as e:  # object arrays (pickle refused), strings, ...
        raise UserInputError(f"'{key}' in {file} is not a numeric matrix ({e}); store it as a float array.") \
            from None
    if M.shape not in shapes:
        want = " or ".join(str(s) for s in shapes)
        raise UserInputError(f"'{key}' in {file} has shape {M.shape}, expected {want}.")
    check_finite(M, f"'{key}' in {file}")
    return M


def missing_view_keys(keys: Iterable[str], n_views: int, prefixes: Iterable[str]) -> list[str]:
    """The keys ``f"{prefix}{i}"`` for ``i < n_views`` that are not in ``keys`` (sorted by view)."""
    keys = set(keys)
    return [f"{p}{i}" for i in range(n_views) for p in prefixes if f"{p}{i}" not in keys]


def require_view_keys(keys: Iterable[str], n_views: int, prefixes: Iterable[str], file: str) -> None:
    """Raise UserInputError naming ``file`` and the first views whose keys are missing."""
    missing = missing_view_keys(keys, n_views, prefixes)
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise UserInputError(
            f"{file} lacks {shown} ({n_views} images need one camera each); "
            "add the missing cameras or remove the extra images."
        )
