"""Test setup: Taichi is initialised once per process on the arch named by
``TAICHI_NEUS_TEST_ARCH`` (default ``cpu``). The Vulkan job runs the tests marked
``portable`` in its own process with ``TAICHI_NEUS_TEST_ARCH=vulkan``."""

import os
import pathlib

import pytest

from taichi_neus import runtime

TEST_ARCH = os.environ.get("TAICHI_NEUS_TEST_ARCH", "cpu")
DTU_SCAN24 = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dtu_scan24"


@pytest.fixture(scope="session", autouse=True)
def ti_arch():
    return runtime.init(TEST_ARCH, verbose=False)


@pytest.fixture(scope="session")
def dtu_scan24():
    if not (DTU_SCAN24 / "cameras_sphere.npz").exists():
        pytest.skip(f"DTU scan24 not found at {DTU_SCAN24}")
    return DTU_SCAN24


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (training runs of 15 s or more) first, the rest in file order: the CI job
    splits the suite by file over two worker processes (pytest-xdist, ``--dist loadfile``), and a long file
    handed out last would leave one worker running it alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
