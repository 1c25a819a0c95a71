#!/usr/bin/env bash
# The whole GPU check in one prepared script, for a machine with one CUDA GPU and 16 cores: the
# kernel's tile sweep and benchmark, the pipeline benchmark and the GPU tests, in at most 8
# minutes. Writes under $OUT (default /tmp/gradcam-device) no more than 8 files:
#   summary.txt     card, versions, the GPU tests' tail and every table's headline
#   cam_table.json  the kernel tile table measured by the sweep (copy it to kernels/ to commit it)
#   kernel.md       bench_kernel.py: all six methods, four shapes, two layouts, K 1 and 5
#   pipeline.md     bench_pipeline.py: decode modes, 1 vs 20 shards, ResNet-50/152, ViT-B/16, peers, stages
#   methods.md      bench_methods.py (stage `methods`, not in the default list: ~60 s): every CAM
#                   method's engine step on resnet18, batch 64, bf16, all channels for scorecam/ablationcam
#   logs.tar.gz     every log
# Stages (default: kernel, pipeline, tests, in this order; also: methods). With the device tool, after running
# benchmarks/fetch_device_wheels.sh here:
#   run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=520)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gradcam-device}"
LOGS="$(mktemp -d /tmp/gradcam-device-logs.XXXXXX)"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
SUMMARY="$OUT/summary.txt"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(kernel pipeline tests)
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv;
  echo "cores: $(nproc)"; python3 -c "import torch, triton, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'triton', triton.__version__)"; } \
  2>&1 | tee "$SUMMARY"
started=$SECONDS
table=()
for stage in "${stages[@]}"; do
  echo "== $stage (at $((SECONDS - started)) s)" | tee -a "$SUMMARY"
  case "$stage" in
    kernel)
      # the sweep measures the candidate tiles of every bucket; the benchmark then runs on that table
      timeout 75 python3 benchmarks/bench_kernel.py --sweep --table-out "$OUT/cam_table.json" \
        --budget-seconds 60 --out "$LOGS/kernel-sweep.md" 2>&1 | tee "$LOGS/kernel-sweep.log" | tail -5 | tee -a "$SUMMARY"
      [ -s "$OUT/cam_table.json" ] && table=(env GRADCAM_BATCH_KERNEL_TABLE="$OUT/cam_table.json")
      timeout 135 "${table[@]}" python3 benchmarks/bench_kernel.py --budget-seconds 120 --out "$OUT/kernel.md" \
        2>&1 | tee "$LOGS/kernel.log" | tail -70 | tee -a "$SUMMARY" ;;
    pipeline)
      timeout 190 "${table[@]}" python3 benchmarks/bench_pipeline.py --device cuda --images 10000 --peer-images 2000 \
        --budget-seconds 170 --out "$OUT/pipeline.md" 2>&1 | tee "$LOGS/pipeline.log" | tail -50 | tee -a "$SUMMARY" ;;
    methods)
      timeout 90 python3 benchmarks/bench_methods.py --device cuda --batch 64 --channels all --amp bf16 \
        --repeats 3 --out "$OUT/methods.md" 2>&1 | tee "$LOGS/methods.log" | tail -30 | tee -a "$SUMMARY" ;;
    tests)
      timeout 75 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$LOGS/gpu-tests.log" \
        | tail -15 | tee -a "$SUMMARY" ;;
    *) echo "unknown stage $stage (kernel, pipeline, methods, tests)" >&2; exit 2 ;;
  esac
done
echo "== done in $((SECONDS - started)) s" | tee -a "$SUMMARY"
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" .
