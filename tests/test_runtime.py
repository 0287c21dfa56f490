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


def test_source_positions_are_memoised_with_taichis_own_text(monkeypatch):
    """``init`` memoises Taichi's per-node source-position text (the AST pass's largest cost): every text
    equals Taichi's own, a ``ti.static`` loop's revisited nodes hit the memo, and a compile error still
    names the file, the line and the offending expression."""
    import numpy as np
    import pytest
    import taichi as ti
    from taichi.lang.ast import ast_transformer_utils as atu

    memo_fn = atu.ASTTransformerContext.get_pos_info
    assert getattr(memo_fn, "_taichi_neus_memo", False)
    original = memo_fn.__wrapped__
    texts = []

    def checked(self, node):
        text = memo_fn(self, node)
        assert text == original(self, node)
        texts.append(text)
        return text

    monkeypatch.setattr(atu.ASTTransformerContext, "get_pos_info", checked)

    @ti.kernel
    def scaled(a: ti.types.ndarray(dtype=ti.f32, ndim=1)):
        for i in a:
            s = 0.0
            for j in ti.static(range(4)):
                s += a[i] * (j + 1)
            if s > 0:
                a[i] = s

    a = np.ones(3, np.float32)
    scaled(a)
    assert np.allclose(a, 10.0)
    assert len(texts) > len(set(texts)) > 5  # the unrolled body's nodes were visited again

    @ti.kernel
    def broken(a: ti.types.ndarray(dtype=ti.f32, ndim=1)):
        for i in a:
            a[i] = no_such_name * 2.0  # noqa: F821

    with pytest.raises(ti.TaichiCompilationError) as err:
        broken(a)
    msg = str(err.value)
    assert "test_runtime.py" in msg and "no_such_name" in msg and "^" in msg, msg
