"""The scripts keep the caller's directory: relative output folders land where the user is."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("script, extra_env", [("demo.sh", {}), ("torchrun.sh", {"NGPU": "1", "MASTER_PORT": "29517"})])
def test_relative_output_dir_is_relative_to_the_caller(tmp_path, script, extra_env):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **extra_env}
    result = subprocess.run([str(REPO / "scripts" / script), "output.dir=relative-out", "data.demo_images=40",
                             "runtime.progress=false", "runtime.device=cpu"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert list((tmp_path / "relative-out" / "cams").glob("part-*.parquet"))
    assert not (REPO / "relative-out").exists()
