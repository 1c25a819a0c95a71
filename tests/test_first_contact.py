"""Mistakes a new user makes: one line, the right exit code, and nothing that blocks the fix."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli_helpers import TINY_RESNET, read_cams, run_cli
from gradcam_batch import UserError
from gradcam_batch.pipeline import check_output_dir
from sample_data import make_parquet, make_webdataset


def test_a_layer_without_maps_is_refused_before_anything_is_written_and_the_fix_runs(tmp_path):
    out = tmp_path / "out"
    wrong = run_cli(*TINY_RESNET, "model.target_layer=fc", f"output.dir={out}", "data.demo_images=20")
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines()[-1].startswith("gradcam-batch: error: model.target_layer='fc' outputs")
    assert not (out / "_manifest.json").exists()
    fixed = run_cli(*TINY_RESNET, "model.target_layer=layer4", f"output.dir={out}", "data.demo_images=20")
    assert fixed.returncode == 0, fixed.stderr


def test_a_manifest_of_a_run_that_completed_nothing_does_not_block_a_different_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "_manifest.json").write_text(json.dumps({"status": "running", "config_hash": "something else",
                                                    "identity": {"model": {"target_layer": "fc"}}}))
    result = run_cli(*TINY_RESNET, f"output.dir={out}", "data.demo_images=20")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "_manifest.json").read_text())["status"] == "complete"


def test_output_dir_that_is_a_file_or_not_writable_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    result = run_cli(*TINY_RESNET, f"output.dir={tmp_path / 'a-file'}")
    assert result.returncode == 2 and "is a file, not a folder" in result.stderr
    assert "Traceback" not in result.stderr
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as for a user without write permission
    with pytest.raises(UserError, match="cannot be written by this user"):
        check_output_dir(tmp_path / "new" / "out")


def test_misspelled_label_column_is_refused_with_a_suggestion(tmp_path):
    make_parquet(tmp_path / "data")
    result = run_cli(*TINY_RESNET, "data=parquet", f"data.shards='{tmp_path / 'data'}/*.parquet'",
                     "data.label_column=lable", f"output.dir={tmp_path / 'out'}")
    assert result.returncode == 2 and "data.label_column='lable' is not a column" in result.stderr
    assert "did you mean label?" in result.stderr


def test_wrong_format_says_nothing_could_be_read_and_exits_non_zero(tmp_path):
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"image": [b"x", b"y"]}), tmp_path / "data" / "a.parquet")
    result = run_cli(*TINY_RESNET, "data=webdataset", f"data.shards='{tmp_path / 'data'}/*.parquet'",
                     f"output.dir={tmp_path / 'out'}")
    assert result.returncode == 1
    assert "nothing could be read from a" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("gradcam-batch: error: none of the")


def test_a_second_run_says_everything_was_complete_and_shows_the_stored_results(tmp_path):
    args = ["runtime.progress=false", f"output.dir={tmp_path / 'out'}", "data.demo_images=120"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    pointing = [line for line in first.stdout.splitlines() if line.startswith("pointing")][0].split()[1]
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    assert "nothing to do: the only unit was already complete" in second.stdout and "stored      120 rows, 0 errors" in second.stdout
    assert f"pointing    {pointing}" in second.stdout and "img/s" not in second.stdout


@pytest.mark.slow
def test_multirun_gives_every_job_its_own_folder(tmp_path):
    result = run_cli("-m", *TINY_RESNET, "cam.method=gradcam,layercam", f"output.dir={tmp_path / 'sweep'}",
                     "data.demo_images=20", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for job, method in ((0, "gradcam"), (1, "layercam")):
        manifest = json.loads((tmp_path / "sweep" / str(job) / "_manifest.json").read_text())
        assert manifest["method"] == method and manifest["status"] == "complete"
        assert read_cams(tmp_path / "sweep" / str(job)).num_rows == 20


@pytest.mark.slow
def test_ctrl_c_is_one_line_exit_130_and_the_rerun_completes_exactly_once(tmp_path):
    make_webdataset(tmp_path / "data", shards=6, per_shard=40)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "gradcam_batch", *TINY_RESNET, "data=webdataset", "data.batch_size=8",
            f"data.shards='{tmp_path / 'data'}/*.tar'", f"output.dir={out}", "data.unit_size=20"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.monotonic() + 120
    while not list((out / "cams").glob("part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "gradcam-batch: interrupted; rerun the same command to resume"
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    ids = read_cams(out)["sample_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 240
