#!/usr/bin/env bash
# Run HERE (a machine with PyPI access) before a device run: collects into .whl/ the pure-Python
# packages the GPU machine lacks (it has torch, triton, pyarrow, tqdm, numpy, pillow, opencv,
# pytest, but no hydra/omegaconf, and no peers to compare against). .whl/ is git-ignored;
# carry it with the device command (carry: [".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
pip() { python3 -m pip "$@"; }
# pure-Python wheels: any platform
pip download --quiet --no-deps --only-binary=:all: -d .whl \
  "hydra-core==1.3.2" "omegaconf==2.3.0" "captum==0.9.0" "ttach==0.0.3"
# source-only packages: build their wheels here
pip wheel --quiet --no-deps -w .whl "antlr4-python3-runtime==4.9.3" "grad-cam==1.5.7"
ls -la .whl
