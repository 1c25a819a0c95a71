# Sourced by demo.sh and test.sh: create .venv once and (re)install the project when
# pyproject.toml changed. Idempotent: a second call with nothing changed installs nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "gradcam-batch: creating .venv with $($PYTHON --version 2>&1)" >&2
  "$PYTHON" -m venv .venv
fi
STAMP=.venv/.gradcam-batch-installed
WANT="$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "gradcam-batch: installing the project and its dependencies into .venv (first run takes a while)" >&2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
  echo "$WANT" > "$STAMP"
fi
