#!/usr/bin/env bash
# Set up .venv (once) and run the offline demo: synthetic shapes, the built-in CNN, CAMs to
# Parquet under ./gradcam-out. Extra arguments are Hydra overrides.
source "$(dirname "$0")/_bootstrap.sh"
exec .venv/bin/gradcam-batch "$@"
