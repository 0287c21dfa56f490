"""Mesh export: marching cubes on the zero level of the SDF, and the DTU mask-based clean-up.

Host-side only (numpy + scikit-image; ``scipy.ndimage`` for the mask dilation, which is fine
because scipy is a hard dependency of scikit-image). The model is reached only through callbacks:

* ``sdf_fn(points) -> sdf``: ``(N, 3) float32`` unit-sphere coordinates -> ``(N,) float32``,
  positive outside the surface;
* ``color_fn(points, normals) -> rgb``: ``(N, 3)`` unit-sphere points and unit normals ->
  ``(N, 3) float32`` in [0, 1].

Meshes come out in world units: unit-sphere vertices are mapped by the scene's ``scale_mat``
(unit sphere -> world, NeuS's ``cameras_sphere.npz`` convention).
"""

from __future__ import annotations

import os
import pathlib
import warnings
from dataclasses import dataclass

import numpy as np

from taichi_neus.errors import UserInputError

__all__ = ["Mesh", "extract_mesh", "mesh_from_run", "clean_mesh_with_masks", "largest_component",
           "drop_small_components", "cull_unseen_faces"]


@dataclass
class Mesh:
    """A triangle mesh.

    Attributes:
        vertices: ``(V, 3) float32``, world units.
        faces: ``(F, 3) int32`` vertex indices, counter-clockwise seen from outside (normals out).
        colors: ``(V, 3) uint8`` vertex colours, or ``None``.
    """

    vertices: np.ndarray
    faces: np.ndarray
    colors: np.ndarray | None = None

    @classmethod
    def empty(cls) -> Mesh:
        return cls(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32), None)

    @property
    def is_empty(self) -> bool:
        return self.faces.shape[0] == 0

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> pathlib.Path:
        """Write a binary PLY (see :func:`taichi_neus.export.ply.write_ply`); never overwrites unless asked."""
        from taichi_neus.export.ply import write_ply

        return write_ply(path, self.vertices, self.faces, self.colors, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Mesh:
        """Read a PLY mesh (ASCII or binary)."""
        from taichi_neus.export.ply import read_ply

        d = read_ply(path)
        faces = d.faces if d.faces is not None else np.zeros((0, 3), np.int32)
        return cls(d.vertices.astype(np.float32), faces.astype(np.int32), d.colors)

    def face_normals(self) -> np.ndarray:
        """``(F, 3) float64`` unit face normals (zero for degenerate faces)."""
        v = self.vertices.astype(np.float64)
        n = np.cross(v[self.faces[:, 1]] - v[self.faces[:, 0]], v[self.faces[:, 2]] - v[self.faces[:, 0]])
        length = np.linalg.norm(n, axis=1, keepdims=True)
        return n / np.maximum(length, 1e-30)


# --------------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------------


def _eval_grid(sdf_fn, origin: np.ndarray, h: float, shape: tuple[int, int, int], chunk: int) -> np.ndarray:
    """SDF at the grid points ``origin + (i, j, k) * h``, evaluated ``chunk`` points at a time.

    Returns a ``shape`` float32 volume indexed ``[i, j, k]`` = ``(x, y, z)``. Only the volume
    itself and one chunk of points are in memory at once.
    """
    n = int(np.prod(shape))
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, chunk):
        idx = np.arange(start, min(start + chunk, n))
        ijk = np.stack(np.unravel_index(idx, shape), axis=1)
        pts = (origin[None, :] + ijk * h).astype(np.float32)
        val = np.asarray(sdf_fn(pts), dtype=np.float32).reshape(-1)
        if val.shape[0] != idx.shape[0]:
            raise ValueError(f"sdf_fn returned {val.shape[0]} values for {idx.shape[0]} points")
        out[start : start + idx.shape[0]] = val
    return out.reshape(shape)


def _sign_change_cells(vol: np.ndarray, level: float) -> np.ndarray:
    """Boolean ``(n0-1, n1-1, n2-1)``: grid cells whose 8 corners are not all on one side of ``level``."""
    inside = vol <= level
    any_in = np.zeros(tuple(s - 1 for s in vol.shape), dtype=bool)
    all_in = np.ones_like(any_in)
    for di in (0, 1):
        for dj in (0, 1):
            for dk in (0, 1):
                c = inside[di : di + any_in.shape[0], dj : dj + any_in.shape[1], dk : dk + any_in.shape[2]]
                any_in |= c
                all_in &= c
    return any_in & ~all_in


def _sdf_normals(sdf_fn, points: np.ndarray, eps: float, chunk: int) -> np.ndarray:
    """Unit normals ``(N, 3) float32`` as the normalised central-difference SDF gradient."""
    out = np.empty_like(points, dtype=np.float32)
    offsets = np.eye(3, dtype=np.float32) * eps
    step = max(1, chunk // 6)
    for s in range(0, points.shape[0], step):
        p = points[s : s + step].astype(np.float32)
        m = p.shape[0]
        q = np.concatenate([p + offsets[a] for a in range(3)] + [p - offsets[a] for a in range(3)])
        f = np.asarray(sdf_fn(q), dtype=np.float32).reshape(6, m)
        g = (f[:3] - f[3:]).T / (2 * eps)
        out[s : s + m] = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    return out


def _to_world(points_unit: np.ndarray, scale_mat: np.ndarray | None) -> np.ndarray:
    if scale_mat is None:
        return points_unit.astype(np.float32)
    s = np.asarray(scale_mat, dtype=np.float64)
    return (points_unit.astype(np.float64) @ s[:3, :3].T + s[:3, 3]).astype(np.float32)


def extract_mesh(
    sdf_fn,
    resolution: int = 512,
    bound: float = 1.0,
    chunk: int = 2**18,
    coarse_resolution: int | None = 64,
    level: float = 0.0,
    color_fn=None,
    scale_mat: np.ndarray | None = None,
) -> Mesh:
    """Triangle mesh of the ``level`` set of ``sdf_fn`` (marching cubes, Lorensen & Cline 1987).

    The fine grid has ``resolution`` points per axis over ``[-bound, bound]^3`` (spacing
    ``h = 2 bound / (resolution - 1)``). A coarse pass (``coarse_resolution`` points per axis,
    ``None`` or 0 to skip it) finds the cells whose corners straddle the level, and only the
    bounding box of those cells, padded by one coarse cell, is evaluated on the fine grid. The box
    is aligned to the fine grid, so the result equals a single fine pass whenever the coarse grid
    sees every part of the surface (parts thinner than a coarse cell that lie outside the box of
    the rest can be missed).

    Args:
        sdf_fn: ``(N, 3) float32`` unit-sphere points -> ``(N,) float32`` SDF, positive outside.
        resolution: fine grid points per axis.
        bound: half-size of the cube evaluated, unit-sphere units.
        chunk: points per ``sdf_fn`` call (bounds memory).
        coarse_resolution: coarse grid points per axis, or ``None``/0 for one fine pass.
        level: iso-level.
        color_fn: optional ``(points (N, 3), unit normals (N, 3)) -> (N, 3) float32 in [0, 1]``,
            both in unit-sphere coordinates; normals are the central-difference SDF gradient
            with step ``h / 2``.
        scale_mat: optional ``(4, 4)`` unit sphere -> world transform applied to the vertices.

    Returns:
        :class:`Mesh` in world units with outward normals (faces are flipped when ``scale_mat``
        mirrors space). When the level set is empty the mesh is empty and a ``UserWarning`` says so.
    """
    from skimage import measure

    if resolution < 2:
        raise UserInputError(f"Mesh resolution must be at least 2, got {resolution}.")
    h = 2.0 * bound / (resolution - 1)
    lo_idx = np.zeros(3, dtype=np.int64)
    hi_idx = np.full(3, resolution - 1, dtype=np.int64)

    if coarse_resolution:
        if coarse_resolution < 2:
            raise UserInputError(
                f"coarse_resolution must be at least 2 (or 0 to skip), got {coarse_resolution}."
            )
        hc = 2.0 * bound / (coarse_resolution - 1)
        coarse = _eval_grid(sdf_fn, np.full(3, -bound), hc, (coarse_resolution,) * 3, chunk)
        cells = _sign_change_cells(coarse, level)
        if not cells.any():
            return _no_surface(level, float(coarse.min()), float(coarse.max()))
        nz = np.nonzero(cells)
        c_lo = np.array([a.min() for a in nz]) - 1  # one coarse cell of padding
        c_hi = np.array([a.max() for a in nz]) + 2  # a cell spans corners idx .. idx + 1
        c_lo = np.clip(c_lo, 0, coarse_resolution - 1)
        c_hi = np.clip(c_hi, 0, coarse_resolution - 1)
        box_lo = c_lo * hc  # offsets from -bound
        box_hi = c_hi * hc
        lo_idx = np.clip(np.floor(box_lo / h - 1e-6).astype(np.int64), 0, resolution - 1)
        hi_idx = np.clip(np.ceil(box_hi / h + 1e-6).astype(np.int64), 0, resolution - 1)
        lo_idx = np.minimum(lo_idx, resolution - 2)  # at least two points per axis
        hi_idx = np.maximum(hi_idx, lo_idx + 1)

    origin = -bound + lo_idx * h
    shape = tuple(int(x) for x in hi_idx - lo_idx + 1)
    vol = _eval_grid(sdf_fn, origin, h, shape, chunk)
    vmin, vmax = float(vol.min()), float(vol.max())
    if not (vmin <= level <= vmax) or vmin == vmax:
        return _no_surface(level, vmin, vmax)
    # A value exactly on the level makes marching cubes emit zero-area triangles that break
    # watertightness; move such values one float32 step outward.
    lvl = np.float32(level)
    vol[vol == lvl] = np.nextafter(lvl, np.float32(np.inf))

    # 'descent': values decrease into the object (sdf < 0 inside), which orients faces outward.
    verts, faces, _, _ = measure.marching_cubes(vol, level=float(lvl), gradient_direction="descent")
    if faces.shape[0] == 0:
        return _no_surface(level, vmin, vmax)
    pts_unit = origin[None, :] + verts.astype(np.float64) * h  # (V, 3) unit-sphere coordinates

    colors = None
    if color_fn is not None:
        colors = np.empty((pts_unit.shape[0], 3), dtype=np.uint8)
        p32 = pts_unit.astype(np.float32)
        normals = _sdf_normals(sdf_fn, p32, eps=0.5 * h, chunk=chunk)
        for s in range(0, p32.shape[0], chunk):
            rgb = np.asarray(color_fn(p32[s : s + chunk], normals[s : s + chunk]), dtype=np.float32)
            colors[s : s + chunk] = np.clip(np.round(rgb.reshape(-1, 3) * 255.0), 0, 255).astype(np.uint8)

    faces = faces.astype(np.int32)
    if scale_mat is not None and np.linalg.det(np.asarray(scale_mat, dtype=np.float64)[:3, :3]) < 0:
        faces = faces[:, ::-1].copy()  # a mirroring transform flips orientation; undo it
    return Mesh(_to_world(pts_unit, scale_mat), faces, colors)


def _no_surface(level: float, vmin: float, vmax: float) -> Mesh:
    warnings.warn(
        f"No surface found: the SDF ranges over [{vmin:.4g}, {vmax:.4g}] on the grid and never crosses "
        f"level {level}; returning an empty mesh.",
        stacklevel=3,
    )
    return Mesh.empty()


# --------------------------------------------------------------------------------------------
# cleaning
# --------------------------------------------------------------------------------------------


def _vertex_components(n_vertices: int, faces: np.ndarray) -> np.ndarray:
    """Connected-component label per vertex (the smallest vertex index in the component).

    Vectorised union-find: hook every edge's larger root onto the smaller one, then compress
    paths by pointer jumping, until every edge joins two vertices with the same root.
    """
    parent = np.arange(n_vertices, dtype=np.int64)
    if faces.shape[0] == 0:
        return parent
    a = np.concatenate([faces[:, 0], faces[:, 1]]).astype(np.int64)
    b = np.concatenate([faces[:, 1], faces[:, 2]]).astype(np.int64)
    while True:
        ra, rb = parent[a], parent[b]
        diff = ra != rb
        if not diff.any():
            return parent
        lo = np.minimum(ra[diff], rb[diff])
        hi = np.maximum(ra[diff], rb[diff])
        np.minimum.at(parent, hi, lo)  # hi is a root: parent[hi] == hi before this
        while True:  # path compression until every vertex points at a root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


def largest_component(mesh: Mesh) -> Mesh:
    """Keep the connected component (faces joined through shared vertices) with the most faces."""
    if mesh.is_empty:
        return mesh
    labels = _vertex_components(mesh.vertices.shape[0], mesh.faces)
    face_label = labels[mesh.faces[:, 0]]
    counts = np.bincount(face_label, minlength=mesh.vertices.shape[0])
    keep = face_label == np.argmax(counts)
    return _subset_faces(mesh, keep)


def drop_small_components(mesh: Mesh, min_share: float) -> Mesh:
    """Drop the connected components whose surface area is below ``min_share`` of the largest one's.

    Components as in :func:`largest_component` (faces joined through shared vertices), measured by
    area; ``min_share`` 0 keeps everything, 1 keeps the largest component (and any of equal area).
    """
    if mesh.is_empty or min_share <= 0:
        return mesh
    labels = _vertex_components(mesh.vertices.shape[0], mesh.faces)
    face_label = labels[mesh.faces[:, 0]]
    v = mesh.vertices.astype(np.float64)
    f = mesh.faces
    area = 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1)
    comp_area = np.bincount(face_label, weights=area, minlength=mesh.vertices.shape[0])
    keep = comp_area[face_label] >= min_share * comp_area.max()
    return _subset_faces(mesh, keep)


def cull_unseen_faces(mesh: Mesh, K: np.ndarray, c2w: np.ndarray, scale_mat: np.ndarray | None, H: int, W: int,
                      min_views: int = 1) -> Mesh:
    """Drop the faces that fewer than ``min_views`` cameras see (hidden behind other faces or out of view).

    Surfaces no camera can see are unconstrained by the photographs: the walls of closed bubbles inside
    the solid, the far side of an object filmed from one side. Visibility is
    :func:`taichi_neus.export.mesh_raster.face_view_counts` (a depth buffer per view).

    Args:
        mesh: world-unit mesh; ``scale_mat`` (4, 4) maps unit sphere -> world (``None``: unit-sphere mesh).
        K: (V, 3, 3) intrinsics, pixels; c2w: (V, 4, 4) camera-to-world, unit-sphere coordinates (OpenCV axes).
        H, W: image size in pixels.
        min_views: keep a face visible in at least this many views.
    """
    from taichi_neus.export.mesh_raster import face_view_counts

    if mesh.is_empty:
        return mesh
    counts = face_view_counts(mesh, K, c2w, scale_mat, H, W)
    return _subset_faces(mesh, counts >= min_views)


def _subset_faces(mesh: Mesh, keep: np.ndarray) -> Mesh:
    """The faces where ``keep`` is True, with unreferenced vertices removed and indices remapped."""
    faces = mesh.faces[keep]
    used = np.unique(faces)
    remap = np.full(mesh.vertices.shape[0], -1, dtype=np.int64)
    remap[used] = np.arange(used.shape[0])
    colors = mesh.colors[used] if mesh.colors is not None else None
    return Mesh(mesh.vertices[used], remap[faces].astype(np.int32), colors)


def clean_mesh_with_masks(
    mesh: Mesh,
    K: np.ndarray,
    c2w: np.ndarray,
    masks: np.ndarray,
    scale_mat: np.ndarray | None,
    dilation: int = 24,
    keep_largest: bool = True,
) -> Mesh:
    """Remove geometry outside the object masks, as the DTU evaluation of NeuS-style methods does.

    The culling used with NeuS on DTU (from UNISURF/VolSDF/2DGS, ``cull_scan``): dilate every mask
    by a disk of radius ``dilation`` pixels, project each vertex into each view, and keep a face
    only when all three vertices fall inside the dilated mask of every view. A vertex behind a
    camera (z <= 0) or projecting outside the image counts as inside that view. Then keep the
    largest connected component.

    Args:
        mesh: world-unit mesh (e.g. from :func:`extract_mesh`).
        K: ``(V, 3, 3)`` intrinsics, pixels; pixel centres at +0.5, so pixel ``(r, c)`` covers
            ``u in [c, c + 1)``, ``v in [r, r + 1)``.
        c2w: ``(V, 4, 4)`` camera-to-world in unit-sphere coordinates (OpenCV axes).
        masks: ``(V, H, W)`` uint8 0/255 (or bool) object masks.
        scale_mat: ``(4, 4)`` unit sphere -> world; ``None`` if the mesh is in unit-sphere units.
        dilation: disk radius in pixels (24 in the public DTU scripts).
        keep_largest: also keep only the largest connected component.

    Returns:
        The cleaned :class:`Mesh` (colours carried along).
    """
    from scipy import ndimage  # scipy is a hard dependency of scikit-image

    K = np.asarray(K, dtype=np.float64)
    c2w = np.asarray(c2w, dtype=np.float64)
    masks = np.asarray(masks)
    if masks.ndim != 3 or K.shape != (masks.shape[0], 3, 3) or c2w.shape != (masks.shape[0], 4, 4):
        raise UserInputError(
            f"clean_mesh_with_masks needs K (V, 3, 3), c2w (V, 4, 4) and masks (V, H, W) for the same V; "
            f"got {K.shape}, {c2w.shape}, {masks.shape}."
        )
    if mesh.is_empty:
        return mesh
    pts = mesh.vertices.astype(np.float64)
    if scale_mat is not None:
        pts = (pts - np.asarray(scale_mat, np.float64)[:3, 3]) @ np.linalg.inv(
            np.asarray(scale_mat, np.float64)[:3, :3]
        ).T
    H, W = masks.shape[1:]
    inside = np.ones(pts.shape[0], dtype=bool)
    for i in range(masks.shape[0]):
        m = masks[i] > 0
        if dilation > 0:  # disk of radius r: every pixel within Euclidean distance r of the mask
            m = ndimage.distance_transform_edt(~m) <= dilation
        w2c = np.linalg.inv(c2w[i])
        cam = pts @ w2c[:3, :3].T + w2c[:3, 3]
        z = cam[:, 2]
        front = z > 1e-9
        uv = cam[front] @ K[i].T
        col = np.floor(uv[:, 0] / uv[:, 2]).astype(np.int64)
        row = np.floor(uv[:, 1] / uv[:, 2]).astype(np.int64)
        in_img = (col >= 0) & (col < W) & (row >= 0) & (row < H)
        ok = np.ones(front.sum(), dtype=bool)
        ok[in_img] = m[row[in_img], col[in_img]]
        inside[np.nonzero(front)[0]] &= ok
    keep = inside[mesh.faces].all(axis=1)
    out = _subset_faces(mesh, keep)
    return largest_component(out) if keep_largest else out


def mesh_from_run(trainer, resolution: int | None = None, clean: bool | None = None,
                  min_component: float | None = None, cull_unseen: bool | None = None,
                  min_views: int | None = None, log=None) -> Mesh:
    """The zero level set of a trained field as a world-unit mesh with vertex colours.

    Clean-up, in this order: the mask culling (``clean``), the faces no training camera sees
    (``cull_unseen``), the small components (``min_component``).

    Args:
        trainer: a :class:`taichi_neus.train.trainer.Trainer` (anything with ``sdf_at``,
            ``colour_at``, ``cfg.mesh`` and ``scene``).
        resolution: marching-cubes grid size over [-1, 1]^3 (default ``cfg.mesh.resolution``).
        clean: cull faces outside the object masks as NeuS's DTU evaluation does (default
            ``cfg.mesh.clean_with_masks``; ignored when the scene has no masks).
        min_component: drop components with less than this share of the largest one's area
            (default ``cfg.mesh.min_component``; 0 keeps all), :func:`drop_small_components`.
        cull_unseen: drop faces that fewer than ``min_views`` training views see (default
            ``cfg.mesh.cull_unseen``), :func:`cull_unseen_faces` at the training resolution.
        min_views: see ``cull_unseen`` (default ``cfg.mesh.min_views``).
        log: optional ``log(str)`` told how many faces each step removed.
    """
    mc = trainer.cfg.mesh
    resolution = resolution or mc.resolution
    min_component = mc.min_component if min_component is None else min_component
    cull_unseen = mc.cull_unseen if cull_unseen is None else cull_unseen
    min_views = mc.min_views if min_views is None else min_views
    scene = trainer.scene
    # A vertex is coloured as seen head-on: the view direction is the inward normal.
    mesh = extract_mesh(trainer.sdf_at, resolution=resolution, bound=1.0,
                        color_fn=lambda p, n: trainer.colour_at(p, -n), scale_mat=scene.scale_mat)
    clean = mc.clean_with_masks if clean is None else clean
    if clean and scene.masks is not None and not mesh.is_empty:
        mesh = clean_mesh_with_masks(mesh, scene.K, scene.c2w, scene.masks, scene.scale_mat)
    if cull_unseen and not mesh.is_empty:
        ids = np.asarray(scene.train_ids)
        before = mesh.faces.shape[0]
        mesh = cull_unseen_faces(mesh, scene.K[ids], scene.c2w[ids], scene.scale_mat, scene.H, scene.W, min_views)
        if log is not None:
            log(f"mesh: dropped {before - mesh.faces.shape[0]:,} of {before:,} faces seen in fewer than "
                f"{min_views} of {len(ids)} training views")
    if min_component > 0 and not mesh.is_empty:
        before = mesh.faces.shape[0]
        mesh = drop_small_components(mesh, min_component)
        if log is not None:
            log(f"mesh: dropped {before - mesh.faces.shape[0]:,} of {before:,} faces in components under "
                f"{min_component:g} of the largest one's area")
    return mesh
