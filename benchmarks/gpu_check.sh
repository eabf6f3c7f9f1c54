#!/usr/bin/env bash
# One call on a GPU machine: build from source for its GPU, benchmark the kernels, run the CUDA
# tests and compute-sanitizer. Usage: benchmarks/gpu_check.sh OUT_DIR   (logs and JSON land there)
# Each step has its own time limit so the whole script ends well under 10 minutes on an H100.
set -u
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
step() { echo "== $(date +%T) $*"; }

step environment
{ nvidia-smi; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; nvcc --version | tail -2; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | head -20

step build
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  has_gpu=1
else  # a dry run on a machine without a GPU: build for sm_90, skip what needs the device
  arch=9.0
  has_gpu=0
  echo "no GPU visible: dry run (build for sm_90, then stop before the GPU-only steps)"
fi
TORCH_CUDA_ARCH_LIST=$arch LORA_EXT_BUILD_CUDA=1 MAX_JOBS=16 timeout 240 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; tail -30 "$OUT/build.log"; exit 1; }
$PY -c "import lora_ext; print(lora_ext.build_info())" | tee -a "$OUT/build.log"
if [ "$has_gpu" = 0 ]; then
  $PY -c "import lora_ext; assert 'CUDA' in lora_ext.build_info()['backends']" && echo "dry run: CUDA kernels built and registered"
  exit $?
fi

step smoke test
timeout 60 $PY tests/cuda_sanitizer_cases.py 2>&1 | tail -5 || status=1

step kernel benchmark
timeout ${BENCH_TIMEOUT:-150} $PY benchmarks/bench_kernels.py --device cuda --out "$OUT/kernels_gpu.json" > "$OUT/bench.log" 2>&1 || { echo "bench failed or timed out"; status=1; }
grep -A200 "measured bandwidth" "$OUT/bench.log" || tail -20 "$OUT/bench.log"

step backward benchmark
timeout ${BACKWARD_TIMEOUT:-90} $PY benchmarks/bench_backward.py --device cuda --out "$OUT/backward_gpu.json" > "$OUT/backward.log" 2>&1 || { echo "backward bench failed or timed out"; status=1; }
tail -5 "$OUT/backward.log"

step compute-sanitizer memcheck and racecheck, in parallel
timeout ${SANITIZER_TIMEOUT:-120} compute-sanitizer --tool memcheck --error-exitcode 3 $PY tests/cuda_sanitizer_cases.py > "$OUT/memcheck.log" 2>&1 &
memcheck=$!
timeout ${SANITIZER_TIMEOUT:-120} compute-sanitizer --tool racecheck --error-exitcode 3 $PY tests/cuda_sanitizer_cases.py > "$OUT/racecheck.log" 2>&1 &
racecheck=$!

step CUDA tests
workers=$($PY -c "import xdist" 2>/dev/null && echo "-n 12")
timeout ${TEST_TIMEOUT:-150} $PY -m pytest -q --maxfail=20 $workers -p no:cacheprovider tests -k "(cuda or graph or opcheck or registration) and not compiled_training" > "$OUT/tests.log" 2>&1 || status=1
tail -15 "$OUT/tests.log"

wait $memcheck; rc=$?; echo "memcheck exit $rc"; tail -4 "$OUT/memcheck.log"; [ $rc = 0 ] || status=1
wait $racecheck; rc=$?; echo "racecheck exit $rc"; tail -4 "$OUT/racecheck.log"; [ $rc = 0 ] || status=1
step done, status $status
exit $status
