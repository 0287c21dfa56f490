"""The same field forward+backward on CPU and on Vulkan (lavapipe in CI) agree to 1e-4 relative."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parent / "scripts" / "field_step.py"


def _vulkan_available() -> bool:
    probe = "from taichi_neus import runtime; runtime.init('vulkan', verbose=False)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


@pytest.mark.skipif(shutil.which("vulkaninfo") is None and not Path("/usr/share/vulkan/icd.d").exists(),
                    reason="no Vulkan ICD installed (CI installs mesa-vulkan-drivers)")
def test_field_vulkan_matches_cpu(tmp_path):
    if not _vulkan_available():
        pytest.fail("Vulkan ICD present but taichi cannot start on Vulkan")
    outs = {}
    for arch in ("cpu", "vulkan"):
        f = tmp_path / f"{arch}.npz"
        subprocess.run([sys.executable, str(SCRIPT), arch, str(f)], check=True, capture_output=True)
        outs[arch] = np.load(f)
    for key in ("sdf", "normal", "rgb", "grads"):
        a, b = outs["cpu"][key], outs["vulkan"][key]
        rel = np.abs(a - b).max() / np.abs(a).max()
        assert rel < 1e-4, (key, rel)
