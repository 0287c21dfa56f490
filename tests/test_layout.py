"""The package tree reads as the pipeline: no stage imports a later one, and the short names resolve."""

import ast
import pathlib

import pytest

import taichi_neus

PKG = pathlib.Path(taichi_neus.__file__).parent
STAGES = ["data", "field", "render", "train", "export", "app"]
SHARED = {"runtime", "buffers", "memory", "errors"}


def _imports(path: pathlib.Path, root: pathlib.Path = PKG.parent) -> list[str]:
    """Dotted ``taichi_neus.…`` modules a file imports (anywhere in it, lazily or not)."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's own package
                base = list(path.relative_to(root).with_suffix("").parts[:-node.level])
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "taichi_neus":
                out += [f"taichi_neus.{a.name}" for a in node.names]
            elif mod.startswith("taichi_neus."):
                out.append(mod)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("taichi_neus.")]
    return out


def _stage(module: str) -> int | None:
    part = module.split(".")[1]
    return STAGES.index(part) if part in STAGES else None


def test_every_module_lives_in_a_stage_or_is_shared():
    top = {p.stem for p in PKG.glob("*.py")} - {"__init__"}
    assert top == SHARED, f"modules at the package root besides the shared ones: {sorted(top - SHARED)}"
    folders = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(STAGES)


def test_no_stage_imports_a_later_one():
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        own = STAGES.index(rel.parts[0]) if len(rel.parts) > 1 else -1  # shared modules: before every stage
        for mod in _imports(path):
            s = _stage(mod)
            if s is not None and s > own:
                bad.append(f"{rel} imports {mod}")
    assert not bad, "\n".join(bad)


def test_the_checker_catches_a_backward_import(tmp_path):
    fake = tmp_path / "taichi_neus" / "field"
    fake.mkdir(parents=True)
    (fake / "x.py").write_text("from taichi_neus.train.trainer import Trainer\nfrom ..app import cli\n")
    mods = _imports(fake / "x.py", root=tmp_path)
    assert mods == ["taichi_neus.train.trainer", "taichi_neus.app"]
    assert [_stage(m) for m in mods] == [3, 5]


@pytest.mark.parametrize("name", [n for n in taichi_neus.__all__ if n != "__version__"])
def test_short_names_resolve(name):
    assert getattr(taichi_neus, name) is not None


def test_unknown_short_name_is_an_attribute_error():
    with pytest.raises(AttributeError):
        taichi_neus.no_such_name  # noqa: B018
