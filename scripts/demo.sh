#!/usr/bin/env bash
# Set up .venv (once) and run the offline demo: synthetic shapes, the built-in CNN, CAMs to
# Parquet under ./gradcam-out (relative to where you call it from). Extra arguments are Hydra
# overrides; relative paths in them are relative to your current directory too.
CALLER="$PWD"
source "$(dirname "$0")/_bootstrap.sh"  # works in the checkout (sets ROOT)
cd "$CALLER"
# Not exec: the tool runs as a process of its own, so its "first batch ... after process start"
# counts its own start-up, not the set-up above (the first pip install takes minutes).
"$ROOT/.venv/bin/gradcam-batch" "$@"
