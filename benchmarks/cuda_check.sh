#!/usr/bin/env bash
# One prepared pass on a machine with an NVIDIA GPU (CI never has one): the portable kernel tests and
# the torch / Tape adapters on Taichi's CUDA backend, the field and step benchmarks on CUDA, and the
# quick start's training with --arch cuda; then the portable tests on the GPU's Vulkan driver when a
# Vulkan loader is there. Each part has its own time limit so a slow one cannot starve the rest.
#
#     bash benchmarks/cuda_check.sh OUTDIR [PART ...]     # PART: tests torch field compile step quickstart vulkan
#
# Writes OUTDIR/{cuda_check.log (every part's whole output), field_throughput_cuda.json,
# step_throughput_cuda.json, quickstart_cuda_metrics.json}. Taichi must be importable (e.g. wheels on PYTHONPATH).
set -u
out=${1:?usage: bash benchmarks/cuda_check.sh OUTDIR [PART ...]}
shift
parts=" ${*:-tests torch field step quickstart vulkan} "
want() { [[ $parts == *" $1 "* ]]; }
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log="$out/cuda_check.log"
part() {  # part NAME SECONDS CMD...: run CMD with a limit, append its output to the log, report rc and time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name" >>"$log"
  timeout "$limit" "$@" >"$out/part.tmp" 2>&1
  local rc=$?
  cat "$out/part.tmp" >>"$log"
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"
  tail -n 25 "$out/part.tmp"
  rm -f "$out/part.tmp"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import taichi, torch, numpy; print('taichi', taichi.__version__, 'torch', torch.__version__, 'numpy', numpy.__version__, 'torch.cuda', torch.cuda.is_available())"
want tests && part tests_cuda 210 env TAICHI_NEUS_TEST_ARCH=cuda python3 -m pytest -q -p no:cacheprovider -m portable tests
# the torch adapters (CUDA tensors into the kernels without a copy) and the pose tests that run on CUDA
want torch && part torch_cuda 150 env TAICHI_NEUS_TEST_ARCH=cuda python3 -m pytest -q -p no:cacheprovider -rs \
  tests/test_torch_ops.py tests/test_pose.py
want torch && part tape_cuda 60 env TAICHI_NEUS_TEST_ARCH=cuda TAICHI_NEUS_SIMD=0 python3 -m pytest -q \
  -p no:cacheprovider tests/test_tape_ops.py
want field && part field_cuda 100 python3 benchmarks/field_throughput.py --arch cuda --no-compile \
  --json "$out/field_throughput_cuda.json"
want compile && part field_cuda_compile 200 python3 benchmarks/field_throughput.py --arch cuda \
  --json "$out/field_throughput_cuda_compile.json"
want step && part step_cuda 70 python3 benchmarks/step_throughput.py --arch cuda --scan24 '' \
  --json "$out/step_throughput_cuda.json"
if want quickstart; then
  part quickstart_cuda 120 python3 -c "import sys; from taichi_neus.app.cli import main; \
sys.exit(main(['train', '--out', '/tmp/demo_cuda', '--iters', '1000', '--arch', 'cuda']))"
  cp /tmp/demo_cuda/metrics.json "$out/quickstart_cuda_metrics.json" 2>/dev/null
fi
if want vulkan; then
  if python3 -c "from taichi_neus import runtime; runtime.init('vulkan', verbose=False)" >/dev/null 2>&1; then
    part tests_vulkan_gpu 90 env TAICHI_NEUS_TEST_ARCH=vulkan python3 -m pytest -q -p no:cacheprovider -m portable tests
  else
    echo "== no Vulkan driver on this machine: the Vulkan tests on the GPU did not run"
  fi
fi
