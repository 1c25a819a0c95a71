#!/usr/bin/env bash
# Which data.decode (and data.device_share for mixed) feeds a model fastest on this machine: whole
# gradcam-batch runs over the pipeline benchmark's JPEGs, one process each, printing a markdown
# table of the steady rate, time to first batch and where each decoded image came from.
#   bash benchmarks/decode_modes.sh [IMAGES] [RUN ...]      RUN = model:decode[:device_share][:topk]
# Default: 20000 images; resnet50 and resnet152 with workers and mixed at two shares, resnet50 top-5.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gradcam-decode-modes}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
images="${1:-20000}"
shift || true
runs=("$@")
[ ${#runs[@]} -eq 0 ] && runs=(resnet50:workers resnet50:mixed:0.15 resnet50:mixed:0.3 resnet152:workers
                              resnet152:mixed:0.15 resnet50:workers::5)
folder=$("$PYTHON" -c "
import sys; sys.path.insert(0, 'benchmarks')
from pipeline_data import ensure_dataset
print(ensure_dataset('/tmp/gradcam-bench-data', $images, 500, 375, 1000, log=lambda *a, **k: None).folder)")
workers=$(( $(nproc) - 1 ))
table="$OUT/decode-modes.md"
{ echo "# decode modes, $(date -u +%F), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo cpu), $(nproc) cores"
  echo
  echo "$images JPEGs 500x375 in shards of 1000, batch 256, $workers workers, resize 256 crop 224, bf16"
  echo
  echo "| model | decode | device share (start -> end) | targets | img/s steady | img/s in-loop | first batch s (process / after imports) | device / worker decoded |"
  echo "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"; } > "$table"
for run in "${runs[@]}"; do
  IFS=: read -r model decode share topk <<< "$run"
  dir=$(mktemp -d /tmp/decode-modes.XXXXXX)
  args=(data=webdataset "data.shards='$folder/*.tar'" model=torchvision "model.name=$model" model.target_layer=layer4
        data.batch_size=256 "data.num_workers=$workers" "data.decode=$decode" runtime.progress=false "output.dir=$dir")
  [ -n "$share" ] && args+=("data.device_share=$share")
  [ -n "$topk" ] && args+=(cam.targets=topk "cam.topk=$topk")
  echo "== $run" >&2
  if timeout 120 "$PYTHON" -m gradcam_batch "${args[@]}" > "$dir/stdout" 2> "$dir/stderr"; then
    "$PYTHON" - "$dir/_manifest.json" "$model" "$decode" "${share:--}" "${topk:-1}" >> "$table" <<'EOF'
import json, sys
path, model, decode, share, topk = sys.argv[1:]
run = json.load(open(path))["this_run"]
source = run["ranks"][0].get("input") or {}
balance = source.get("balance") or {}
end = f" -> {balance['share']:.2f}" if balance else ""
print(f"| {model} | {decode} | {share}{end} | {topk} | {run['steady_images_per_second'] or 0:,.0f} | "
      f"{run['images_per_second']:,.0f} | {run['seconds_to_first_batch']} / {run['seconds_to_first_batch_after_imports']} | "
      f"{source.get('device_decoded')} / {source.get('worker_decoded')} |")
EOF
  else
    echo "| $model | $decode | ${share:--} | ${topk:-1} | failed: $(tail -1 "$dir/stderr" | cut -c1-150) | | | |" >> "$table"
  fi
  rm -rf "$dir"
done
cat "$table"
