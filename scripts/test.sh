#!/usr/bin/env bash
# Set up .venv (once) and run the test suite on CPU; Triton kernels run in the interpreter.
# Extra arguments go to pytest (e.g. -k engine, -m "not slow").
source "$(dirname "$0")/_bootstrap.sh"
exec .venv/bin/python -m pytest -q "$@"
