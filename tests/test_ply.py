"""PLY writer/reader: binary round trip, hand-written ASCII and binary files, refusal to overwrite."""

import numpy as np
import pytest

from taichi_neus.errors import UserInputError
from taichi_neus.export.ply import read_ply, write_ply


def test_binary_round_trip_mesh_with_colors(tmp_path):
    rng = np.random.default_rng(0)
    v = rng.normal(size=(50, 3)).astype(np.float32)
    f = rng.integers(0, 50, size=(70, 3)).astype(np.int32)
    c = rng.integers(0, 256, size=(50, 3)).astype(np.uint8)
    p = write_ply(tmp_path / "sub" / "m.ply", v, f, c)
    d = read_ply(p)
    np.testing.assert_array_equal(d.vertices.astype(np.float32), v)
    np.testing.assert_array_equal(d.faces, f)
    np.testing.assert_array_equal(d.colors, c)
    assert d.faces.dtype == np.int32 and d.colors.dtype == np.uint8
    assert d.normals is None
    # the header says what the brief asks for
    head = p.read_bytes().split(b"end_header")[0].decode()
    assert "binary_little_endian" in head and "property list uchar int vertex_indices" in head
    # exact size: header + 50 * (12 + 3) + 70 * (1 + 12)
    assert p.stat().st_size == len(head) + len("end_header\n") + 50 * 15 + 70 * 13


def test_point_cloud_round_trip_has_no_faces(tmp_path):
    v = np.arange(12, dtype=np.float32).reshape(4, 3)
    d = read_ply(write_ply(tmp_path / "pc.ply", v))
    assert d.faces is None and d.colors is None
    np.testing.assert_array_equal(d.vertices, v)


def test_empty_mesh_round_trip(tmp_path):
    d = read_ply(write_ply(tmp_path / "e.ply", np.zeros((0, 3)), np.zeros((0, 3), np.int32)))
    assert d.vertices.shape == (0, 3) and d.faces.shape == (0, 3)


def test_never_overwrites_without_flag_and_leaves_no_temp_files(tmp_path):
    p = tmp_path / "m.ply"
    write_ply(p, np.zeros((1, 3)))
    before = p.read_bytes()
    with pytest.raises(UserInputError, match="already exists"):
        write_ply(p, np.ones((2, 3)))
    assert p.read_bytes() == before
    write_ply(p, np.ones((2, 3)), overwrite=True)
    assert read_ply(p).vertices.shape == (2, 3)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.ply"]


def test_read_hand_written_ascii(tmp_path):
    text = """ply
format ascii 1.0
comment a unit square as one quad and one triangle
element vertex 5
property float x
property float y
property float z
property float nx
property float ny
property float nz
property uchar red
property uchar green
property uchar blue
element face 2
property list uchar int vertex_indices
end_header
0 0 0 0 0 1 255 0 0
1 0 0 0 0 1 0 255 0
1 1 0 0 0 1 0 0 255
0 1 0 0 0 1 10 20 30
0.5 0.5 1.5 0 0 1 1 2 3
4 0 1 2 3
3 0 1 4
"""
    p = tmp_path / "a.ply"
    p.write_text(text)
    d = read_ply(p)
    np.testing.assert_allclose(d.vertices[4], [0.5, 0.5, 1.5])
    np.testing.assert_array_equal(d.colors[3], [10, 20, 30])
    np.testing.assert_array_equal(d.normals[:, 2], 1.0)
    # the quad becomes a fan of two triangles, then the triangle
    np.testing.assert_array_equal(d.faces, [[0, 1, 2], [0, 2, 3], [0, 1, 4]])


def test_read_hand_written_big_endian_point_cloud_with_extra_properties(tmp_path):
    """Like DTU's STL files: a point cloud whose vertices carry more than x, y, z."""
    pts = np.array([[1.5, -2.0, 3.25], [4.0, 5.0, -6.5]])
    rec = np.zeros(2, dtype=[("x", ">f4"), ("y", ">f4"), ("z", ">f4"), ("conf", ">f8"), ("k", "u1")])
    rec["x"], rec["y"], rec["z"] = pts.T
    rec["conf"] = [0.5, 0.25]
    header = (
        "ply\nformat binary_big_endian 1.0\nelement vertex 2\nproperty float x\nproperty float y\n"
        "property float z\nproperty double conf\nproperty uchar k\nend_header\n"
    )
    p = tmp_path / "stl000_total.ply"
    p.write_bytes(header.encode() + rec.tobytes())
    d = read_ply(p)
    np.testing.assert_array_equal(d.vertices, pts)
    assert d.faces is None


def test_binary_faces_of_mixed_sizes(tmp_path):
    """Varying list lengths take the slow path and are triangulated."""
    v = np.zeros(5, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
    faces = (
        np.array([4], "u1").tobytes() + np.array([0, 1, 2, 3], "<i4").tobytes()
        + np.array([3], "u1").tobytes() + np.array([1, 2, 4], "<i4").tobytes()
    )  # fmt: skip
    header = (
        "ply\nformat binary_little_endian 1.0\nelement vertex 5\nproperty float x\nproperty float y\n"
        "property float z\nelement face 2\nproperty list uchar int vertex_indices\nend_header\n"
    )
    p = tmp_path / "q.ply"
    p.write_bytes(header.encode() + v.tobytes() + faces)
    np.testing.assert_array_equal(read_ply(p).faces, [[0, 1, 2], [0, 2, 3], [1, 2, 4]])


def test_bad_files_raise_user_input_error(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        read_ply(tmp_path / "missing.ply")
    (tmp_path / "x.ply").write_text("hello")
    with pytest.raises(UserInputError, match="not a PLY"):
        read_ply(tmp_path / "x.ply")
    header = "ply\nformat binary_little_endian 1.0\nelement vertex 10\nproperty float x\nproperty float y\n"
    header += "property float z\nend_header\n"
    (tmp_path / "t.ply").write_bytes(header.encode() + b"\0" * 12)
    with pytest.raises(UserInputError, match="truncated"):
        read_ply(tmp_path / "t.ply")
