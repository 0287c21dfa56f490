#!/usr/bin/env bash
# The README's test command: install (CPU torch pin), run the CPU suite, then the
# portable kernel tests again on Vulkan (lavapipe without a GPU) in their own process.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" -e ".[test]"
python3 -m ruff check .
python3 -m pytest -q -p no:cacheprovider tests
TAICHI_NEUS_TEST_ARCH=vulkan python3 -m pytest -q -p no:cacheprovider -m portable tests
