"""PLY files: a binary writer for our meshes and point clouds, a reader for binary and ASCII PLY.

The writer produces binary little-endian PLY with

* ``element vertex``: ``float x, y, z`` and, optionally, ``uchar red, green, blue``;
* ``element face`` (omitted for point clouds): ``property list uchar int vertex_indices``.

It writes to a temporary file next to the target and renames it into place, so a reader never
sees a half-written file, and it refuses to replace an existing file unless ``overwrite=True``.

The reader understands ``ascii``, ``binary_little_endian`` and ``binary_big_endian`` files with
any scalar property types and list properties (enough for DTU's ``stlXXX_total.ply`` point clouds
and for meshes written by us, MeshLab, Open3D or trimesh). Polygons with more than three corners
are split into triangle fans.
"""

from __future__ import annotations

import os
import pathlib
import uuid
from dataclasses import dataclass

import numpy as np

from taichi_neus.errors import UserInputError

__all__ = ["PlyData", "read_ply", "write_ply"]

# PLY scalar type names (both spellings of the spec) -> numpy type codes (without byte order).
_PLY_TYPES = {
    "char": "i1", "int8": "i1",
    "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4",
    "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4",
    "double": "f8", "float64": "f8",
}  # fmt: skip


@dataclass
class PlyData:
    """What :func:`read_ply` found.

    Attributes:
        vertices: ``(N, 3) float64`` vertex positions, in the file's units.
        faces: ``(F, 3) int32`` triangle corner indices, or ``None`` when the file has no faces.
        colors: ``(N, 3) uint8`` vertex colours, or ``None`` when there are none.
        normals: ``(N, 3) float32`` vertex normals (``nx, ny, nz``), or ``None``.
    """

    vertices: np.ndarray
    faces: np.ndarray | None = None
    colors: np.ndarray | None = None
    normals: np.ndarray | None = None


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def write_ply(
    path: str | os.PathLike,
    vertices: np.ndarray,
    faces: np.ndarray | None = None,
    colors: np.ndarray | None = None,
    *,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write a binary little-endian PLY file atomically.

    Args:
        path: target file; its parent folders are created.
        vertices: ``(N, 3)`` positions, stored as float32.
        faces: ``(F, 3)`` integer corner indices (stored as int32), or ``None`` for a point cloud.
        colors: ``(N, 3)`` uint8 colours, or ``None``.
        overwrite: replace ``path`` if it exists; otherwise an existing file is an error.

    Returns:
        The path written.

    Raises:
        UserInputError: ``path`` exists and ``overwrite`` is False, or the arrays have wrong shapes.
    """
    path = pathlib.Path(path)
    vertices = np.asarray(vertices)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise UserInputError(f"Cannot write {path}: vertices must have shape (N, 3), got {vertices.shape}.")
    n = vertices.shape[0]
    if colors is not None:
        colors = np.asarray(colors)
        if colors.shape != (n, 3):
            raise UserInputError(f"Cannot write {path}: colors must have shape ({n}, 3), got {colors.shape}.")
        if colors.dtype != np.uint8:
            raise UserInputError(f"Cannot write {path}: colors must be uint8, got {colors.dtype}.")
    if faces is not None:
        faces = np.asarray(faces)
        if faces.ndim != 2 or faces.shape[1] != 3:
            raise UserInputError(f"Cannot write {path}: faces must have shape (F, 3), got {faces.shape}.")
        if faces.size and (faces.min() < 0 or faces.max() >= n):
            raise UserInputError(f"Cannot write {path}: a face index is outside [0, {n}).")
    if path.exists() and not overwrite:
        raise UserInputError(_exists_message(path))

    vdtype = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if colors is not None:
        vdtype += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    vrec = np.empty(n, dtype=vdtype)
    vrec["x"], vrec["y"], vrec["z"] = (vertices[:, i].astype(np.float32) for i in range(3))
    if colors is not None:
        vrec["red"], vrec["green"], vrec["blue"] = colors[:, 0], colors[:, 1], colors[:, 2]

    header = [
        "ply",
        "format binary_little_endian 1.0",
        "comment written by taichi_neus",
        f"element vertex {n}",
    ]
    header += ["property float x", "property float y", "property float z"]
    if colors is not None:
        header += ["property uchar red", "property uchar green", "property uchar blue"]
    frec = None
    if faces is not None:
        frec = np.empty(faces.shape[0], dtype=[("n", "u1"), ("idx", "<i4", (3,))])
        frec["n"] = 3
        frec["idx"] = faces.astype(np.int32)
        header += [f"element face {faces.shape[0]}", "property list uchar int vertex_indices"]
    header += ["end_header"]

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(("\n".join(header) + "\n").encode("ascii"))
            f.write(vrec.tobytes())
            if frec is not None:
                f.write(frec.tobytes())
            f.flush()
            os.fsync(f.fileno())
        _move_into_place(tmp, path, overwrite)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _exists_message(path: pathlib.Path) -> str:
    return f"{path} already exists; choose another path or pass overwrite=True."


def _move_into_place(tmp: pathlib.Path, path: pathlib.Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``path``; without ``overwrite`` never replace a file that appeared meanwhile."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path exists: no race between the check and the rename
    except FileExistsError:
        raise UserInputError(_exists_message(path)) from None
    except OSError:  # file system without hard links
        if path.exists():
            raise UserInputError(_exists_message(path)) from None
        os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


@dataclass
class _Element:
    name: str
    count: int
    # (name, type code) for scalars, (name, count type code, item type code) for lists
    props: list[tuple]


def read_ply(path: str | os.PathLike) -> PlyData:
    """Read vertices, faces, colours and normals from an ASCII or binary PLY file.

    Args:
        path: the PLY file.

    Returns:
        :class:`PlyData`.

    Raises:
        UserInputError: the file is missing or is not a PLY file this reader understands.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserInputError(f"PLY file {path} does not exist; check the path.")
    data = path.read_bytes()
    fmt, elements, body_start = _parse_header(data, path)
    if fmt == "ascii":
        values = _read_ascii(data[body_start:], elements, path)
    else:
        order = "<" if fmt == "binary_little_endian" else ">"
        values = _read_binary(data, body_start, elements, order, path)
    return _to_plydata(values, path)


def _parse_header(data: bytes, path: pathlib.Path) -> tuple[str, list[_Element], int]:
    if not data.startswith(b"ply"):
        raise UserInputError(f"{path} is not a PLY file (it does not start with 'ply').")
    end = data.find(b"end_header")
    if end < 0:
        raise UserInputError(f"{path} is not a valid PLY file: no 'end_header' line.")
    body_start = data.find(b"\n", end) + 1
    if body_start == 0:
        body_start = len(data)
    lines = data[:end].decode("ascii", errors="replace").splitlines()
    fmt = None
    elements: list[_Element] = []
    for line in lines[1:]:
        tok = line.split()
        if not tok or tok[0] in ("comment", "obj_info"):
            continue
        if tok[0] == "format":
            fmt = tok[1]
        elif tok[0] == "element":
            elements.append(_Element(tok[1], int(tok[2]), []))
        elif tok[0] == "property":
            if not elements:
                raise UserInputError(f"{path} is not a valid PLY file: a property before any element.")
            try:
                if tok[1] == "list":
                    elements[-1].props.append((tok[4], _PLY_TYPES[tok[2]], _PLY_TYPES[tok[3]]))
                else:
                    elements[-1].props.append((tok[2], _PLY_TYPES[tok[1]]))
            except (KeyError, IndexError):
                raise UserInputError(f"{path}: cannot read the PLY header line '{line}'.") from None
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise UserInputError(f"{path}: unknown PLY format {fmt!r}.")
    return fmt, elements, body_start


def _read_binary(data, pos, elements, order, path) -> dict[str, dict[str, np.ndarray | list]]:
    out = {}
    for el in elements:
        has_list = any(len(p) == 3 for p in el.props)
        if not has_list:
            dt = np.dtype([(p[0], order + p[1]) for p in el.props])
            if pos + el.count * dt.itemsize > len(data):
                raise UserInputError(f"{path} is truncated: element '{el.name}' does not fit in the file.")
            rec = np.frombuffer(data, dtype=dt, count=el.count, offset=pos)
            pos += el.count * dt.itemsize
            out[el.name] = {p[0]: rec[p[0]] for p in el.props}
            continue
        rec, pos = _read_binary_lists(data, pos, el, order, path)
        out[el.name] = rec
    return out


def _read_binary_lists(data, pos, el, order, path):
    """An element with list properties. Fast path: every list has the length of the first one."""
    if el.count == 0:
        return {p[0]: (np.zeros((0, 0), np.int64) if len(p) == 3 else np.zeros(0)) for p in el.props}, pos
    # Find the length of every list in the first row, then try a fixed-size record dtype.
    fields, q = [], pos
    try:
        for p in el.props:
            if len(p) == 3:
                cdt = np.dtype(order + p[1])
                k = int(np.frombuffer(data, dtype=cdt, count=1, offset=q)[0])
                fields.append((p[0] + "__n", order + p[1]))
                fields.append((p[0], order + p[2], (k,)))
                q += cdt.itemsize + k * np.dtype(p[2]).itemsize
            else:
                fields.append((p[0], order + p[1]))
                q += np.dtype(p[1]).itemsize
    except ValueError:
        raise UserInputError(f"{path} is truncated inside element '{el.name}'.") from None
    dt = np.dtype(fields)
    if pos + el.count * dt.itemsize <= len(data):
        rec = np.frombuffer(data, dtype=dt, count=el.count, offset=pos)
        ok = all((rec[p[0] + "__n"] == rec.dtype[p[0]].shape[0]).all() for p in el.props if len(p) == 3)
        if ok:
            res = {}
            for p in el.props:
                res[p[0]] = rec[p[0]].reshape(el.count, -1) if len(p) == 3 else rec[p[0]]
            return res, pos + el.count * dt.itemsize
    # Slow path: lists of varying length (e.g. quads mixed with triangles).
    res = {p[0]: [] for p in el.props}
    try:
        for _ in range(el.count):
            for p in el.props:
                if len(p) == 3:
                    cdt = np.dtype(order + p[1])
                    k = int(np.frombuffer(data, dtype=cdt, count=1, offset=pos)[0])
                    pos += cdt.itemsize
                    idt = np.dtype(order + p[2])
                    res[p[0]].append(np.frombuffer(data, dtype=idt, count=k, offset=pos))
                    pos += k * idt.itemsize
                else:
                    sdt = np.dtype(order + p[1])
                    res[p[0]].append(np.frombuffer(data, dtype=sdt, count=1, offset=pos)[0])
                    pos += sdt.itemsize
    except ValueError:
        raise UserInputError(f"{path} is truncated inside element '{el.name}'.") from None
    for p in el.props:
        if len(p) == 2:
            res[p[0]] = np.asarray(res[p[0]])
    return res, pos


def _read_ascii(body: bytes, elements, path) -> dict[str, dict[str, np.ndarray | list]]:
    lines = [ln for ln in body.decode("ascii", errors="replace").splitlines() if ln.strip()]
    out, row = {}, 0
    for el in elements:
        chunk = lines[row : row + el.count]
        row += el.count
        if len(chunk) < el.count:
            raise UserInputError(f"{path} is truncated: element '{el.name}' has fewer rows than declared.")
        has_list = any(len(p) == 3 for p in el.props)
        if not has_list:
            try:
                arr = np.array(" ".join(chunk).split(), dtype=np.float64).reshape(el.count, len(el.props))
            except ValueError:
                raise UserInputError(f"{path}: element '{el.name}' has malformed rows.") from None
            out[el.name] = {p[0]: arr[:, i].astype(p[1]) for i, p in enumerate(el.props)}
            continue
        res = {p[0]: [] for p in el.props}
        for line in chunk:
            tok = line.split()
            i = 0
            try:
                for p in el.props:
                    if len(p) == 3:
                        k = int(tok[i])
                        res[p[0]].append(np.array(tok[i + 1 : i + 1 + k], dtype=np.float64).astype(p[2]))
                        i += 1 + k
                    else:
                        res[p[0]].append(float(tok[i]))
                        i += 1
            except (ValueError, IndexError):
                raise UserInputError(f"{path}: malformed row '{line}' in element '{el.name}'.") from None
        for p in el.props:
            if len(p) == 2:
                res[p[0]] = np.asarray(res[p[0]], dtype=p[1])
        out[el.name] = res
    return out


def _triangulate(lists) -> np.ndarray:
    """Face index lists -> (F, 3) int32 triangles (polygons split into fans)."""
    if isinstance(lists, np.ndarray):  # fixed-size lists
        k = lists.shape[1] if lists.ndim == 2 else 0
        if k == 3 or lists.shape[0] == 0:
            return lists.reshape(-1, 3).astype(np.int32)
        lists = list(lists)
    tris = []
    for poly in lists:
        for j in range(1, len(poly) - 1):
            tris.append((poly[0], poly[j], poly[j + 1]))
    return np.asarray(tris, dtype=np.int32).reshape(-1, 3)


def _to_plydata(values, path) -> PlyData:
    v = values.get("vertex")
    if v is None or not all(c in v for c in "xyz"):
        raise UserInputError(f"{path} has no 'vertex' element with x, y, z properties.")
    vertices = np.stack([np.asarray(v[c], dtype=np.float64) for c in "xyz"], axis=1)
    colors = None
    if all(c in v for c in ("red", "green", "blue")):
        cols = np.stack([np.asarray(v[c]) for c in ("red", "green", "blue")], axis=1)
        if np.issubdtype(cols.dtype, np.floating):  # float colours are in [0, 1]
            cols = np.clip(np.round(cols * 255.0), 0, 255)
        colors = cols.astype(np.uint8)
    normals = None
    if all(c in v for c in ("nx", "ny", "nz")):
        normals = np.stack([np.asarray(v[c], dtype=np.float32) for c in ("nx", "ny", "nz")], axis=1)
    faces = None
    f = values.get("face")
    if f is not None:
        key = "vertex_indices" if "vertex_indices" in f else "vertex_index" if "vertex_index" in f else None
        if key is None:
            raise UserInputError(f"{path}: the 'face' element has no vertex_indices list.")
        faces = _triangulate(f[key])
        if faces.size and (faces.min() < 0 or faces.max() >= len(vertices)):
            raise UserInputError(f"{path}: a face refers to a vertex that does not exist.")
    return PlyData(vertices=vertices, faces=faces, colors=colors, normals=normals)
