"""The bare command is the offline demo: it must localise the objects it classifies."""

import os
import re
import subprocess
import sys
from pathlib import Path

from cli_helpers import read_cams


def test_bare_command_runs_demo_with_pointing_game(tmp_path):
    script = Path(sys.executable).with_name("gradcam-batch")
    result = subprocess.run([str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-2].startswith("pointing") and lines[-1].startswith("box energy")
    pointing = float(re.search(r"pointing\s+([0-9.]+)", result.stdout).group(1))
    assert pointing >= 0.9
    # the demo's maps put most of their energy on the object, and overlap its box
    energy, iou = map(float, re.search(r"box energy\s+([0-9.]+) .* IoU ([0-9.]+)", result.stdout).groups())
    assert energy > 0.4 and iou > 0.4
    assert re.search(r"images\s+1200", result.stdout) and re.search(r"img/s", result.stdout)
    table = read_cams(tmp_path / "gradcam-out")
    assert table.num_rows == 1200
    assert set(table["cam_height"].to_pylist()) == {16}
    # the model is right about the shape, not just the place
    correct = sum(r["label"] == r["target_class"] for r in table.select(["label", "target_class"]).to_pylist())
    assert correct / table.num_rows > 0.95
    # every demo image carries its box: every row has its localization metrics, and they agree
    # with the summary's means
    rows = table.select(["pointing_hit", "box_energy", "box_iou", "pred_class", "target_class"]).to_pylist()
    assert all(r["pointing_hit"] is not None and 0 <= r["box_energy"] <= 1 and 0 <= r["box_iou"] <= 1 for r in rows)
    assert abs(sum(r["pointing_hit"] for r in rows) / len(rows) - pointing) < 1e-3
    assert abs(sum(r["box_energy"] for r in rows) / len(rows) - energy) < 1e-3
    assert all(r["pred_class"] == r["target_class"] for r in rows)  # cam.targets=pred
