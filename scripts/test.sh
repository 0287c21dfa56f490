#!/usr/bin/env bash
# The README's test command: install (CPU torch pin), lint, run the CPU suite, then the portable
# kernel tests again on Vulkan (lavapipe without a GPU) in their own process.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" -e ".[test]"
python3 -m ruff check .
# Two worker processes of one thread each (Taichi's CPU threads, torch's and BLAS's): most of a test's time is
# single-threaded (kernel compilation, Python, numpy), so one process leaves a core idle, and two processes of
# two threads each oversubscribe the cores (measured: 19.2 min against 22.8 min in one process; one thread
# each: 15.9 min).
TI_CPU_MAX_NUM_THREADS=1 OMP_NUM_THREADS=1 python3 -m pytest -q -p no:cacheprovider -n 2 --dist loadfile tests
# The Tape operations next to a caller's own vector kernels need Taichi's default vectors on the CPU
# (runtime.simd_enabled): their own process with SIMD off, beside the Vulkan job (which keeps ~1.4 cores
# busy: the two together took 154 s against 192 s one after the other).
tape_log=$(mktemp)
TAICHI_NEUS_SIMD=0 python3 -m pytest -q -p no:cacheprovider tests/test_tape_ops.py >"$tape_log" 2>&1 &
tape_pid=$!
vulkan_rc=0
if python3 -c "from taichi_neus import runtime; runtime.init('vulkan', verbose=False)" >/dev/null 2>&1; then
  TAICHI_NEUS_TEST_ARCH=vulkan python3 -m pytest -q -p no:cacheprovider -m portable tests || vulkan_rc=$?
elif [ "${CI:-}" = "true" ]; then
  echo "Vulkan is not available: the Vulkan test job cannot run (install mesa-vulkan-drivers libvulkan1)." >&2
  vulkan_rc=1
else
  echo "note: no Vulkan driver here, the Vulkan job was skipped (Debian: apt-get install mesa-vulkan-drivers libvulkan1)." >&2
fi
tape_rc=0
wait "$tape_pid" || tape_rc=$?
echo "--- Tape tests (SIMD off, their own process):"
cat "$tape_log"
rm -f "$tape_log"
[ "$tape_rc" -eq 0 ] && [ "$vulkan_rc" -eq 0 ]
