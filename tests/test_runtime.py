"""Runtime selection rules (no Taichi re-initialisation here: the session fixture owns it)."""

from taichi_neus import runtime


def test_unknown_arch_is_refused():
    import pytest
    with pytest.raises(runtime.BackendError, match="unknown arch"):
        runtime.init("tpu")


def test_auto_skips_software_vulkan(monkeypatch):
    import glob
    import sys
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(glob, "glob", lambda pattern: [])
    assert runtime._only_software_vulkan()
    monkeypatch.setattr(glob, "glob", lambda pattern: ["/dev/dri/renderD128"])
    assert not runtime._only_software_vulkan()
