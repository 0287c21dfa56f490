"""Backend runtime: the one place that calls ``ti.init``.

Nothing in the package initialises Taichi at import time. Entry points call
:func:`init` with the arch the user asked for; an explicitly requested arch that is
not available is an error (Taichi on its own silently falls back to the CPU).
"""

from __future__ import annotations

import os
import sys

import taichi as ti

ARCHS = ("auto", "cpu", "cuda", "vulkan", "metal")


class BackendError(RuntimeError):
    """The requested Taichi backend cannot be used on this machine."""


_state: dict = {"arch": None}


def _ti_arch(name: str):
    return {"cpu": ti.cpu, "cuda": ti.cuda, "vulkan": ti.vulkan, "metal": ti.metal}[name]


def _arch_name(arch) -> str:
    if arch in (ti.x64, ti.arm64):
        return "cpu"
    return {ti.cuda: "cuda", ti.vulkan: "vulkan", ti.metal: "metal"}.get(arch, str(arch))


def _arch_available(name: str) -> bool:
    """Whether Taichi was built with ``name`` and its driver library loads. Taichi logs a warning
    ("libcuda.so lib not found") when it probes for CUDA on a machine without it; that is the expected
    answer here, not news for the user, so the probe runs with Taichi's log level at ERROR (``init`` sets
    the level again right after)."""
    from taichi._lib import core as _ti_core

    if name == "cpu":
        return True
    if name == "metal" and sys.platform != "darwin":
        return False
    ti.set_logging_level(ti.ERROR)
    checks = {
        "cuda": "with_cuda",
        "vulkan": "with_vulkan",
        "metal": "with_metal",
    }
    fn = getattr(_ti_core, checks[name], None)
    return bool(fn and fn())


def check_arch(arch: str) -> None:
    """Refuse, without starting Taichi, an arch that cannot work on this kind of machine: an unknown
    name, or Metal outside macOS. (Whether a driver and device exist is found out by :func:`init`.)"""
    if arch not in ARCHS:
        raise BackendError(f"unknown arch '{arch}': choose one of {', '.join(ARCHS)}.")
    if arch == "metal" and sys.platform != "darwin":
        raise BackendError("Metal is macOS only; on this machine use --arch cpu, vulkan, cuda or auto.")


def _only_software_vulkan() -> bool:
    """True on Linux when no GPU render node exists: a Vulkan driver there can only be a software
    rasteriser (lavapipe/llvmpipe), far slower than Taichi's own CPU backend."""
    import glob
    return sys.platform.startswith("linux") and not glob.glob("/dev/dri/renderD*")


def _arch_kwargs(name: str, kwargs: dict, simd: bool = True) -> dict:
    """Per-backend options. On the CPU with ``simd``, Taichi vectors become LLVM vectors
    (``real_matrix_scalarize=False``), so the MLP kernels' 16-float operands are SIMD loads and
    multiply-adds (DESIGN §3c). The SPIR-V backends (Vulkan, Metal) cannot take the flag, and on
    CUDA it has not been checked on a GPU yet: those keep Taichi's default."""
    if name == "cpu" and simd:
        return {"real_matrix_scalarize": False, **kwargs}
    return dict(kwargs)


def _simd_default(simd: bool | None) -> bool:
    if simd is not None:
        return bool(simd)
    return os.environ.get("TAICHI_NEUS_SIMD", "1").strip().lower() not in ("0", "false", "no", "off")


def simd_enabled() -> bool:
    """Whether the running Taichi compiles CPU vectors as SIMD vectors (``real_matrix_scalarize=False``).

    Taichi 1.7.4 then aborts the whole process (an LLVM assertion) when it compiles a kernel that does
    arithmetic on whole vectors read from a ``ti.Vector.field``, e.g. ``out[i] = o[i] * t[i] + d[i]``; our
    kernels never do, but a Taichi user's own kernels may: initialise with ``simd=False`` for those."""
    return _state["arch"] == "cpu" and bool(_state.get("simd"))


def _memoise_source_positions() -> None:
    """Make Taichi's kernel compilation ~25% faster in every process, with identical results.

    Taichi 1.7 rebuilds each kernel's IR from its Python AST in every process (the offline cache is keyed
    on that IR, so a warm cache skips only LLVM), and for every AST node it visits it formats the node's
    source position with ``textwrap`` for its error messages: about half of the AST pass, since a
    ``ti.static`` loop visits the same nodes once per unrolled iteration. The text depends only on the
    node's position and its source lines, so it is computed once per distinct key here (measured:
    ``tests/scripts/field_step.py``, a warm cache, 11.2–11.7 s → 8.7–9.0 s). Error messages are unchanged."""
    from taichi.lang.ast import ast_transformer_utils as atu

    ctx_cls = getattr(atu, "ASTTransformerContext", None)
    original = getattr(ctx_cls, "get_pos_info", None)
    if original is None or getattr(original, "_taichi_neus_memo", False):
        return
    memo: dict = {}
    multi_line = ("For", "While", "FunctionDef", "If")  # Taichi cites these up to their first body line

    def get_pos_info(self, node):
        first, last = node.lineno, node.end_lineno
        if type(node).__name__ in multi_line and node.body:
            last = max(last, node.body[0].lineno)
        key = (self.file, self.lineno_offset, self.indent, self.func.func.__name__, type(node), first,
               node.col_offset, node.end_lineno, node.end_col_offset, tuple(self.src[first - 1:last]))
        text = memo.get(key)
        if text is None:
            if len(memo) > 1_000_000:  # bounded: a process that compiles endlessly many kernels
                memo.clear()
            text = memo[key] = original(self, node)
        return text

    get_pos_info._taichi_neus_memo = True
    get_pos_info.__wrapped__ = original
    ctx_cls.get_pos_info = get_pos_info


def init(arch: str = "auto", *, verbose: bool = True, debug: bool = False, offline_cache: bool = True,
         simd: bool | None = None, **kwargs) -> str:
    """Initialise Taichi on ``arch`` and return the name of the arch actually used.

    ``arch`` is one of ``auto|cpu|cuda|vulkan|metal``. ``auto`` tries CUDA, then
    Metal, then Vulkan (skipped when only a software Vulkan driver can exist), then the CPU.
    An explicit arch that is missing raises :class:`BackendError` with a sentence saying what to do. Taichi's offline
    kernel cache is on by default so a second process starts fast.
    Calling ``init`` again with a different arch resets Taichi (all fields and
    ndarrays made before become invalid).

    ``simd`` (CPU only; default on, or the ``TAICHI_NEUS_SIMD`` environment variable, ``0`` for off):
    compile Taichi vectors as SIMD vectors, which makes the MLP kernels several times faster. Turn it
    off when you write your own Taichi kernels with arithmetic on whole ``ti.Vector.field`` elements
    (see :func:`simd_enabled`: Taichi 1.7.4 cannot compile those with it on).
    """
    check_arch(arch)
    simd = _simd_default(simd)
    if _state["arch"] is not None and (arch == _state["arch"] or arch == "auto") and \
            (_state["arch"] != "cpu" or bool(_state.get("simd")) == simd):
        return _state["arch"]
    if arch != "auto" and arch != "cpu" and not _arch_available(arch):
        # refused before ti.reset(): a failed request leaves a running Taichi (and its fields) as it was
        ti.set_logging_level(kwargs.get("log_level", ti.WARN))
        raise BackendError(_unavailable(arch))
    if _state["arch"] is not None:
        ti.reset()
    _memoise_source_positions()
    kwargs.setdefault("default_fp", ti.f32)
    kwargs.setdefault("default_ip", ti.i32)
    kwargs.setdefault("log_level", ti.WARN)
    # MLP kernels unroll their output loop (≤ 64) on purpose: that is what vectorises them.
    kwargs.setdefault("unrolling_limit", 0)
    cache_dir = os.environ.get("TAICHI_NEUS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "taichi_neus"))
    if offline_cache:
        kwargs.setdefault("offline_cache_file_path", cache_dir)
    candidates = ["cuda", "metal", "vulkan", "cpu"] if arch == "auto" else [arch]
    if arch == "auto" and _only_software_vulkan():
        candidates.remove("vulkan")
    used = None
    available = [n for n in candidates if n == "cpu" or _arch_available(n)]
    ti.set_logging_level(kwargs["log_level"])
    for name in available:
        ti.init(arch=_ti_arch(name), debug=debug, offline_cache=offline_cache, **_arch_kwargs(name, kwargs, simd))
        used = _arch_name(ti.lang.impl.current_cfg().arch)
        if name != "cpu" and used != name:
            # Taichi fell back (driver present but no device): treat as unavailable.
            ti.reset()
            used = None
            continue
        break
    if used is None:
        raise BackendError(_unavailable(arch))
    _state["arch"] = used
    _state["simd"] = simd
    if verbose:
        print(f"[taichi_neus] using arch: {used}")
    return used


def _unavailable(arch: str) -> str:
    return (f"the '{arch}' backend is not available on this machine (no driver or device found); "
            "run with --arch cpu, or --arch auto to pick the best available backend.")


def current_arch() -> str | None:
    """Name of the arch :func:`init` set up, or None before it was called."""
    return _state["arch"]


def require_init() -> None:
    if _state["arch"] is None:
        raise BackendError("taichi_neus.runtime.init(arch) must be called before creating fields or kernels.")
