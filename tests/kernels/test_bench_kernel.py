"""benchmarks/bench_kernel.py without a GPU: it prints what it would run and exits 0."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_kernel.py"


def run(*arguments):
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True,
                          env=environment, timeout=120, cwd=ROOT)


def test_dry_run_lists_every_case_with_its_config():
    result = run("--dry-run")
    assert result.returncode == 0, result.stderr
    assert "96 cases" in result.stdout  # 6 methods x 4 shapes x 2 layouts x K in {1, 5}
    assert "64x256x56x56/nhwc/K5/gradcampp: tiled" in result.stdout
    assert "distinct kernel variants to compile" in result.stdout


def test_sweep_dry_run_lists_buckets_and_candidates():
    result = run("--sweep", "--dry-run", "--shapes", "64x256x56x56", "--layouts", "nhwc", "--targets", "1")
    assert result.returncode == 0, result.stderr
    assert "sweep of 3 buckets" in result.stdout
    assert "weighted/nhwc/k1/hw4096/c256 (64x256x56x56 gradcampp)" in result.stdout


@pytest.mark.parametrize(
    "arguments, message",
    [(["--methods", "gradcam++"], "unknown gradcam++"), (["--shapes", "7x7"], "four positive sizes"),
     (["--sweep"], "--table-out"), (["--providers", "eager"], "must include fused")],
    ids=["method", "shape", "sweep-without-table", "providers"],
)
def test_bad_arguments_are_one_line_errors(arguments, message):
    result = run(*arguments)
    assert result.returncode == 2 and message in result.stderr
