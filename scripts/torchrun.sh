#!/usr/bin/env bash
# One process per GPU on this node (or a multi-node job): every argument is a Hydra override.
#   NGPU=8 ./scripts/torchrun.sh data=webdataset data.shards='/data/*.tar' model=torchvision ...
# Multi-node: set NNODES, NODE_RANK and MASTER_ADDR (MASTER_PORT) on every node.
# CPU-only machines: NGPU is the number of processes (gloo backend).
# Relative paths in the overrides are relative to the directory you call it from.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if command -v nvidia-smi >/dev/null 2>&1; then
  default_gpus=$(nvidia-smi --list-gpus | wc -l)
else
  default_gpus=1
fi
NGPU="${NGPU:-$default_gpus}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
PYTHON="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
exec "$PYTHON" -m torch.distributed.run \
  --nproc-per-node="$NGPU" --nnodes="$NNODES" --node-rank="$NODE_RANK" \
  --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
  -m gradcam_batch "$@"
