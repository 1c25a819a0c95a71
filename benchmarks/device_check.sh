#!/usr/bin/env bash
# The whole GPU check in one prepared script, for a machine with one CUDA GPU. Writes logs and
# markdown tables under $OUT (default /tmp/gradcam-device). Stages (default: all):
#   tests    the gpu-marked tests (the kernel's full grid, autotuned path)        ~3-4 min
#   kernel   benchmarks/bench_kernel.py, gradcam, the four issue shapes           ~3-5 min
#   pipeline benchmarks/bench_pipeline.py, 10k JPEGs, ResNet-50/152, peers         ~4-6 min
# With the device tool (after benchmarks/fetch_device_wheels.sh here):
#   run(command="bash benchmarks/device_check.sh tests kernel", carry=[".whl"], timeout_s=560)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gradcam-device}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests kernel pipeline)
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch, triton, torchvision; print(torch.__version__, torchvision.__version__, triton.__version__)"; } \
  | tee "$OUT/env.txt"
for stage in "${stages[@]}"; do
  case "$stage" in
    tests)
      timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -15 ;;
    kernel)
      timeout 330 python3 benchmarks/bench_kernel.py --out "$OUT/kernel.md" 2>&1 | tee "$OUT/kernel.log" | tail -40 ;;
    pipeline)
      timeout 500 python3 benchmarks/bench_pipeline.py --device cuda --images 10000 --out "$OUT/pipeline.md" \
        2>&1 | tee "$OUT/pipeline.log" | tail -40 ;;
    *) echo "unknown stage $stage (tests, kernel, pipeline)" >&2; exit 2 ;;
  esac
done
