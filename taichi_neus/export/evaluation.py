"""Evaluation: background coverage of a mesh, point-cloud Chamfer distances and the DTU protocol.

Image metrics (PSNR, SSIM, mask IoU) are in :mod:`taichi_neus.render.image_metrics`.

Host-side only: numpy, scikit-image, and from scipy ``scipy.spatial.cKDTree`` (nearest
neighbours) and ``scipy.io.loadmat`` (DTU's MATLAB files). scipy is a hard dependency of
scikit-image, so it adds nothing to install.

The DTU protocol (:func:`dtu_chamfer`) follows the official MATLAB evaluation of the DTU MVS 2014
benchmark (Aanæs et al., IJCV 2016; ``BaseEvalMain.m``/``ComputeStat.m``) and its Python port
DTUeval-python (jzhangbs/DTUeval-python) that NeuS and later papers report numbers with.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from taichi_neus.errors import UserInputError

__all__ = [
    "background_coverage",
    "chamfer",
    "sample_mesh_points",
    "surface_shares",
    "downsample_points",
    "dtu_chamfer",
]


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


def background_coverage(covered, mask, image, dark: int = 40, margin: int = 2) -> dict:
    """How much of a photo's background a mesh covers: the test for "background walls".

    A surface that an unmasked run builds to explain what lies *beyond* the modelled region (a
    dark backdrop, the walls of a room) shows up, seen from a training camera, on pixels outside
    the object's mask. Such pixels are split into dark ones (the backdrop: max channel < ``dark``)
    and the rest (typically the table, a real surface a mesh may legitimately contain).

    Args:
        covered: (H, W) bool, the mesh covers the pixel (e.g. ``np.isfinite(depth)`` from
            :func:`taichi_neus.export.mesh_raster.rasterize`).
        mask: (H, W) object mask, bool or uint8 0/255.
        image: (H, W, 3) uint8 photograph.
        dark: max-channel threshold (0..255) below which a background pixel is backdrop.
        margin: pixels within this distance of the mask are left out of the background (edges).
    Returns:
        dict: ``object`` (covered share of mask pixels), ``backdrop`` (covered share of dark
        background pixels), ``other_background`` (covered share of the remaining background),
        ``iou`` (coverage vs mask) and the pixel counts ``n_backdrop``, ``n_other_background``.
    """
    from scipy.ndimage import binary_dilation

    cov = np.asarray(covered, bool)
    m = np.asarray(mask)
    m = m > (127 if m.dtype == np.uint8 else 0.5)
    img = np.asarray(image)
    if cov.shape != m.shape or img.shape[:2] != m.shape:
        raise ValueError(f"background_coverage: shapes differ, {cov.shape}, {m.shape}, {img.shape}")
    near = binary_dilation(m, iterations=margin) if margin > 0 else m
    bg = ~near
    is_dark = img.max(axis=-1) < dark
    backdrop, other = bg & is_dark, bg & ~is_dark

    def share(region):
        return float(cov[region].mean()) if region.any() else float("nan")

    union = (cov | m).sum()
    return {"object": share(m), "backdrop": share(backdrop), "other_background": share(other),
            "iou": 1.0 if union == 0 else float((cov & m).sum() / union),
            "n_backdrop": int(backdrop.sum()), "n_other_background": int(other.sum())}


# --------------------------------------------------------------------------------------------
# point clouds
# --------------------------------------------------------------------------------------------


def _nn_dist(query: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Distance from every query point to its nearest reference point (``inf`` if ref is empty)."""
    from scipy.spatial import cKDTree

    if ref.shape[0] == 0:
        return np.full(query.shape[0], np.inf)
    if query.shape[0] == 0:
        return np.zeros(0)
    d, _ = cKDTree(ref).query(query, k=1, workers=-1)
    return d


def _mean_median(d: np.ndarray) -> tuple[float, float]:
    if d.shape[0] == 0:
        return float("nan"), float("nan")
    return float(d.mean()), float(np.median(d))


def chamfer(points_a, points_b, max_dist: float | None = None, drop_far: bool = True) -> dict:
    """Two-sided nearest-neighbour distances between point sets.

    Args:
        points_a: ``(N, 3)`` e.g. the reconstruction (any units; results in the same units).
        points_b: ``(M, 3)`` e.g. the ground truth.
        max_dist: optional outlier distance. With ``drop_far`` (the DTU rule) distances
            ``>= max_dist`` are left out of the statistics; otherwise they are clipped to it.
        drop_far: see ``max_dist``.

    Returns:
        dict with ``accuracy`` (mean a->b), ``completeness`` (mean b->a), ``chamfer`` (their mean),
        ``accuracy_median``, ``completeness_median``, ``n_a``, ``n_b`` (distances used).
    """
    a = np.asarray(points_a, dtype=np.float64).reshape(-1, 3)
    b = np.asarray(points_b, dtype=np.float64).reshape(-1, 3)
    d_ab, d_ba = _nn_dist(a, b), _nn_dist(b, a)
    if max_dist is not None:
        if drop_far:
            d_ab, d_ba = d_ab[d_ab < max_dist], d_ba[d_ba < max_dist]
        else:
            d_ab, d_ba = np.minimum(d_ab, max_dist), np.minimum(d_ba, max_dist)
    return _stats(d_ab, d_ba)


def _stats(d_ab: np.ndarray, d_ba: np.ndarray) -> dict:
    acc, acc_med = _mean_median(d_ab)
    comp, comp_med = _mean_median(d_ba)
    return {
        "accuracy": acc,
        "completeness": comp,
        "chamfer": 0.5 * (acc + comp),
        "accuracy_median": acc_med,
        "completeness_median": comp_med,
        "n_a": int(d_ab.shape[0]),
        "n_b": int(d_ba.shape[0]),
    }


def sample_mesh_points(vertices, faces, n: int | None = None, *, spacing: float | None = None, seed=0):
    """Points on the surface of a triangle mesh.

    Give exactly one of:

    * ``n``: ``n`` points, uniform by area (triangle chosen with probability proportional to its
      area, then uniform barycentric coordinates by the square-root-free reflection trick);
    * ``spacing``: the DTU evaluation's deterministic sampling: the mesh vertices plus, in each
      triangle with edges ``e1 = v1 - v0`` and ``e2 = v2 - v0``, the points
      ``v0 + (i + 1/2)/n1 e1 + (j + 1/2)/n2 e2`` with barycentric sum below 1, where
      ``n_k = floor(|e_k| / t)`` and ``t = spacing * sqrt(|e1| |e2| / |e1 x e2|)`` (so skinny
      triangles get proportionally finer steps). Triangles with zero area are skipped.

    Args:
        vertices: ``(V, 3)`` float, any units.
        faces: ``(F, 3)`` int.
        n: number of random points.
        spacing: sampling step, in the units of ``vertices`` (0.2 mm for DTU).
        seed: random seed for ``n``-sampling.

    Returns:
        ``(M, 3) float64`` points.
    """
    v = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    f = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if (n is None) == (spacing is None):
        raise ValueError("sample_mesh_points: give exactly one of n and spacing")
    tri = v[f]  # (F, 3 corners, 3)
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    area2 = np.linalg.norm(np.cross(e1, e2), axis=1)  # twice the area
    if n is not None:
        if f.shape[0] == 0 or area2.sum() == 0:
            return np.zeros((0, 3))
        rng = np.random.default_rng(seed)
        cdf = np.cumsum(area2)
        idx = np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right"), f.shape[0] - 1)
        u, w = rng.random(n), rng.random(n)
        flip = u + w > 1.0
        u[flip], w[flip] = 1.0 - u[flip], 1.0 - w[flip]
        return tri[idx, 0] + u[:, None] * e1[idx] + w[:, None] * e2[idx]

    ok = area2 > 0
    tri, e1, e2, area2 = tri[ok], e1[ok], e2[ok], area2[ok]
    l1, l2 = np.linalg.norm(e1, axis=1), np.linalg.norm(e2, axis=1)
    t = spacing * np.sqrt(l1 * l2 / area2)
    n1, n2 = np.floor(l1 / t).astype(np.int64), np.floor(l2 / t).astype(np.int64)
    out = [v]
    has = (n1 > 0) & (n2 > 0)  # with n_k = 0 the (i + 1/2)/n_k coordinate is past the triangle
    pairs, inverse = np.unique(np.stack([n1[has], n2[has]], axis=1), axis=0, return_inverse=True)
    sel = np.nonzero(has)[0]
    inverse = inverse.reshape(-1)
    for g, (a, b) in enumerate(pairs):
        ii, jj = np.meshgrid(np.arange(a + 1), np.arange(b + 1), indexing="ij")
        ka, kb = (ii.ravel() + 0.5) / a, (jj.ravel() + 0.5) / b
        keep = ka + kb < 1.0
        ka, kb = ka[keep], kb[keep]
        if ka.shape[0] == 0:
            continue
        members = sel[inverse == g]
        for s in range(0, members.shape[0], max(1, 2**22 // ka.shape[0])):  # bounded memory
            m = members[s : s + max(1, 2**22 // ka.shape[0])]
            pts = tri[m, 0][:, None] + ka[None, :, None] * e1[m][:, None] + kb[None, :, None] * e2[m][:, None]
            out.append(pts.reshape(-1, 3))
    return np.concatenate(out, axis=0)


def surface_shares(vertices, faces, sdf_fn, tol: float = 0.02, n: int = 50000, seed=0) -> dict:
    """Where a mesh's surface lies relative to a known true surface: the share of its area inside the
    object, outside it, and near its surface.

    ``n`` points are sampled uniformly by area (:func:`sample_mesh_points`) and the true SDF is
    evaluated at them. Closed bubbles in the solid show up as ``inside``, floaters as ``outside``.

    Args:
        vertices: ``(V, 3)`` float; faces: ``(F, 3)`` int.
        sdf_fn: ``(N, 3)`` points in the units of ``vertices`` -> ``(N,)`` true signed distance in
            the same units, negative inside.
        tol: half-width of the "near" band, same units.
        n: sample points; seed: their random seed.

    Returns:
        dict: ``inside`` (share with sdf < -tol), ``outside`` (sdf > tol), ``near`` (the rest);
        NaN each for a mesh without area.
    """
    pts = sample_mesh_points(vertices, faces, n=n, seed=seed)
    if pts.shape[0] == 0:
        return {"inside": float("nan"), "outside": float("nan"), "near": float("nan")}
    d = np.asarray(sdf_fn(pts), dtype=np.float64).reshape(-1)
    if d.shape[0] != pts.shape[0]:
        raise ValueError(f"sdf_fn returned {d.shape[0]} values for {pts.shape[0]} points")
    inside, outside = float((d < -tol).mean()), float((d > tol).mean())
    return {"inside": inside, "outside": outside, "near": 1.0 - inside - outside}


def downsample_points(points, radius: float, seed=0) -> np.ndarray:
    """Thin a point cloud so that no two kept points are within ``radius`` (the DTU downsampling).

    The DTU scripts visit the points in random order and keep a point unless an already kept
    point lies within ``radius`` (distance ``<= radius``). This computes exactly that result for
    the order ``np.random.default_rng(seed).permutation``, vectorised in rounds: an undecided
    point is kept once no undecided neighbour comes before it, and its neighbours are dropped
    (the lexicographically-first maximal independent set).

    Args:
        points: ``(N, 3)`` float.
        radius: minimum spacing, in the units of ``points``.
        seed: seed of the visiting order.

    Returns:
        ``(M, 3)`` the kept points, in their original order.
    """
    from scipy.spatial import cKDTree

    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    n = p.shape[0]
    if n == 0:
        return p
    rank = np.empty(n, dtype=np.int64)
    rank[np.random.default_rng(seed).permutation(n)] = np.arange(n)
    pairs = cKDTree(p).query_pairs(radius, output_type="ndarray")  # (K, 2), i < j, dist <= radius
    # orient every pair (earlier, later) in the visiting order
    swap = rank[pairs[:, 0]] > rank[pairs[:, 1]]
    first = np.where(swap, pairs[:, 1], pairs[:, 0])
    second = np.where(swap, pairs[:, 0], pairs[:, 1])
    state = np.zeros(n, dtype=np.int8)  # 0 undecided, 1 kept, 2 dropped
    while True:
        blocked = np.zeros(n, dtype=bool)
        blocked[second] = True  # has an undecided earlier neighbour
        newly = (state == 0) & ~blocked
        state[newly] = 1
        hit = newly[first]
        state[second[hit]] = 2
        live = (state[first] == 0) & (state[second] == 0)
        first, second = first[live], second[live]
        if first.shape[0] == 0:
            state[state == 0] = 1
            break
    return p[state == 1]


# --------------------------------------------------------------------------------------------
# DTU
# --------------------------------------------------------------------------------------------


def _require(path: pathlib.Path) -> pathlib.Path:
    if not path.is_file():
        raise UserInputError(
            f"DTU evaluation file {path} is missing; download the DTU MVS 2014 'SampleSet' (ObsMask) and "
            f"'Points' (stl) archives and pass their common folder as the DTU directory."
        )
    return path


def _loadmat(path: pathlib.Path, keys: tuple[str, ...]) -> dict:
    from scipy.io import loadmat  # scipy is a hard dependency of scikit-image

    try:
        d = loadmat(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise UserInputError(f"Cannot read the MATLAB file {path}: {e}.") from None
    missing = [k for k in keys if k not in d]
    if missing:
        raise UserInputError(f"{path} lacks the variable(s) {', '.join(missing)}; is it the right DTU file?")
    return d


def dtu_files(scan_id: int, dtu_dir: str | os.PathLike) -> dict[str, pathlib.Path]:
    """Paths of the DTU ground-truth files for ``scan_id`` (they need not exist)."""
    root = pathlib.Path(dtu_dir)
    return {
        "stl": root / "Points" / "stl" / f"stl{scan_id:03d}_total.ply",
        "obs_mask": root / "ObsMask" / f"ObsMask{scan_id}_10.mat",
        "plane": root / "ObsMask" / f"Plane{scan_id}.mat",
    }


def dtu_chamfer(
    mesh_vertices_world,
    mesh_faces,
    scan_id: int,
    dtu_dir: str | os.PathLike,
    *,
    density: float = 0.2,
    max_dist: float = 20.0,
    seed: int = 0,
) -> dict:
    """DTU accuracy / completeness / overall Chamfer distance of a mesh, in millimetres.

    The official protocol (DTU MVS 2014 MATLAB code, as ported by DTUeval-python):

    1. sample the mesh at ``density`` (0.2 mm) with :func:`sample_mesh_points` (``spacing``) and
       thin the samples to ``density`` with :func:`downsample_points`;
    2. ``ObsMask/ObsMask{scan}_10.mat`` (``ObsMask`` boolean volume, ``BB`` (2, 3) its corner
       box, ``Res`` its voxel size): a point is "in the mask" when its voxel
       ``round((x - BB[0]) / Res)`` lies in the volume and is set;
    3. accuracy: distances from the in-mask samples to the STL points
       (``Points/stl/stl{scan:03d}_total.ply``);
    4. completeness: distances from the STL points above the ground plane
       (``ObsMask/Plane{scan}.mat``, ``P`` homogeneous plane, kept where ``[x, 1] . P > 0``) to all
       the samples;
    5. distances ``>= max_dist`` (20 mm) are discarded as outliers ("discard outliers" in the
       official ``ComputeStat.m``; DTUeval-python does the same), the rest averaged;
       overall = (accuracy + completeness) / 2.

    DTUeval-python also drops samples more than 60 mm outside ``BB`` before step 4, only to save
    time; with ``max_dist`` < 60 mm and the STL inside ``BB`` that changes nothing, so all samples
    are used here. The visiting order of the downsampling is random in the original scripts and
    seeded here.

    Args:
        mesh_vertices_world: ``(V, 3)`` mesh vertices in DTU world units (mm), i.e. after
            ``scale_mat`` (what :func:`taichi_neus.export.mesh.extract_mesh` returns).
        mesh_faces: ``(F, 3)`` int.
        scan_id: DTU scan number, e.g. 24.
        dtu_dir: folder holding ``Points/stl/`` and ``ObsMask/``.
        density: sampling and thinning distance, mm.
        max_dist: outlier distance, mm.
        seed: seed of the downsampling order.

    Returns:
        dict with ``accuracy``, ``completeness``, ``overall`` (mm), ``accuracy_median``,
        ``completeness_median``, ``n_samples`` (after thinning), ``n_in_mask``, ``n_accuracy``
        and ``n_stl_above``, ``n_completeness`` (distances used after the outlier cut).

    Raises:
        UserInputError: a DTU file is missing or unreadable (the message names it).
    """
    from taichi_neus.export.ply import read_ply

    files = dtu_files(scan_id, dtu_dir)
    for p in files.values():
        _require(p)
    obs = _loadmat(files["obs_mask"], ("ObsMask", "BB", "Res"))
    plane = _loadmat(files["plane"], ("P",))["P"].astype(np.float64).reshape(4)
    stl = read_ply(files["stl"]).vertices
    obs_mask = np.asarray(obs["ObsMask"]).astype(bool)
    bb = np.asarray(obs["BB"], dtype=np.float64).reshape(2, 3)
    res = float(np.asarray(obs["Res"]).reshape(-1)[0])

    samples = sample_mesh_points(mesh_vertices_world, mesh_faces, spacing=density)
    data = downsample_points(samples, density, seed=seed)

    # 2. observation mask (MATLAB: round((x - BB(1,:)) / Res) + 1, one-based)
    vox = np.floor((data - bb[0]) / res + 0.5).astype(np.int64)
    in_vol = ((vox >= 0) & (vox < np.array(obs_mask.shape))).all(axis=1)
    in_mask = np.zeros(data.shape[0], dtype=bool)
    v = vox[in_vol]
    in_mask[np.nonzero(in_vol)[0]] = obs_mask[v[:, 0], v[:, 1], v[:, 2]]
    data_in_mask = data[in_mask]

    # 3. accuracy: data -> STL; 4. completeness: STL above the plane -> data
    d_acc = _nn_dist(data_in_mask, stl)
    above = np.concatenate([stl, np.ones((stl.shape[0], 1))], axis=1) @ plane > 0
    d_comp = _nn_dist(stl[above], data)

    # 5. discard outliers
    d_acc, d_comp = d_acc[d_acc < max_dist], d_comp[d_comp < max_dist]
    s = _stats(d_acc, d_comp)
    return {
        "accuracy": s["accuracy"],
        "completeness": s["completeness"],
        "overall": s["chamfer"],
        "accuracy_median": s["accuracy_median"],
        "completeness_median": s["completeness_median"],
        "n_samples": int(data.shape[0]),
        "n_in_mask": int(data_in_mask.shape[0]),
        "n_accuracy": s["n_a"],
        "n_stl_above": int(above.sum()),
        "n_completeness": s["n_b"],
    }
