"""One run per output folder, part files checked before a resume trusts them, overwrite that
deletes only what this tool wrote, temporaries outside the folders readers glob, one-line
errors for a full disk and for a stalled rank."""

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from cli_helpers import TINY_RESNET, finish_ranks, read_cams, run_cli, run_composed, start_ranks
from gradcam_batch import UserError, dist, output_folder, writer
from gradcam_batch.writer import MANIFEST_NAME
from sample_data import make_imagefolder

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def imagefolder_args(tmp_path: Path, per_class=(4, 4), shard_size=2) -> tuple[list[str], list[str]]:
    """CLI overrides for a tiny ImageFolder run into tmp_path/out, and the sample ids it holds."""
    expected = make_imagefolder(tmp_path / "data", per_class=per_class)
    args = [*TINY_RESNET, "data=imagefolder", f"data.root={tmp_path / 'data'}", f"data.shard_size={shard_size}",
            "data.batch_size=2", f"output.dir={tmp_path / 'out'}"]
    return args, sorted(path for path, _ in expected)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("gradcam-batch: error:")]


def assert_one_line_error(result_stderr: str, message: str):
    assert "Traceback" not in result_stderr, result_stderr[-3000:]
    lines = error_lines(result_stderr)
    assert len(lines) == 1 and message in lines[0], result_stderr[-3000:]
    assert result_stderr.rstrip().splitlines()[-1] == lines[0], result_stderr[-3000:]


def assert_whole_and_exactly_once(out: Path, expected: list[str]):
    for folder in ("cams", "errors"):
        for path in (out / folder).iterdir() if (out / folder).is_dir() else ():
            pq.read_table(path)  # what a glob of cams/* or errors/* reads: every entry a whole Parquet file
    assert sorted(read_cams(out)["sample_id"].to_pylist()) == expected


# --- one run per output folder ----------------------------------------------------------------

@pytest.mark.slow
def test_two_runs_started_at_once_one_is_refused_and_the_output_stays_whole(tmp_path):
    args, expected = imagefolder_args(tmp_path, per_class=(24, 24), shard_size=4)
    command = [sys.executable, "-m", "gradcam_batch", *args]
    runs = [subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = []
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        results.append((run.returncode, stderr))
    assert sorted(code for code, _ in results) == [0, 2], [err[-2000:] for _, err in results]
    refused = next(err for code, err in results if code == 2)
    assert_one_line_error(refused, "is in use by another run")
    assert_whole_and_exactly_once(tmp_path / "out", expected)
    rerun = run_cli(*args)
    assert rerun.returncode == 0 and "nothing to do: all 12 units were already complete" in rerun.stdout, rerun.stderr


def test_a_folder_held_by_another_run_is_refused_before_anything_is_written(tmp_path):
    args, _ = imagefolder_args(tmp_path)
    out = tmp_path / "out"
    with output_folder.OutputLock(out):
        refused = run_cli(*args)
    assert refused.returncode == 2
    assert_one_line_error(refused.stderr, f"output.dir='{out}' is in use by another run (pid {os.getpid()}")
    assert sorted(p.name for p in out.iterdir()) == [writer.LOCK_NAME]


def test_the_lock_dies_with_its_process_even_while_forked_children_live(tmp_path):
    """DataLoader workers are forked from the run; a kill -9 of the run must free the folder at
    once, not when the last orphaned worker notices and exits."""
    holder = subprocess.run(
        [sys.executable, "-c",
         "import os, sys, time\n"
         "from gradcam_batch.output_folder import OutputLock\n"
         "lock = OutputLock(sys.argv[1])\n"
         "child = os.fork()\n"
         "if child == 0:\n"
         "    quiet = os.open(os.devnull, os.O_WRONLY)\n"
         "    os.dup2(quiet, 1)\n"  # lets the test's read of stdout end when the parent dies
         "    os.dup2(quiet, 2)\n"
         "    time.sleep(60)\n"
         "    os._exit(0)\n"
         "print(child, flush=True)\n"
         "os.kill(os.getpid(), 9)\n", str(tmp_path / "out")],
        env=ENV, capture_output=True, text=True, timeout=60)
    child = int(holder.stdout)
    try:
        assert os.path.exists(f"/proc/{child}")  # the forked child still runs
        with output_folder.OutputLock(tmp_path / "out"):
            pass
    finally:
        os.kill(child, signal.SIGKILL)


@pytest.mark.slow
def test_ranks_of_one_job_share_the_folder_and_a_second_job_is_refused(tmp_path):
    args, expected = imagefolder_args(tmp_path, per_class=(3, 3, 2))
    with output_folder.OutputLock(tmp_path / "out"):
        refused = finish_ranks(tmp_path / "refused", start_ranks(tmp_path / "refused", *args))
    for code, _, stderr in refused:  # every rank stops, none waits for the others' timeout
        assert code == 2, stderr[-3000:]
        assert_one_line_error(stderr, "is in use by another run")
    assert not (tmp_path / "out" / "cams").exists()
    ran = finish_ranks(tmp_path / "ran", start_ranks(tmp_path / "ran", *args))
    assert [code for code, _, _ in ran] == [0, 0], [err[-3000:] for _, _, err in ran]
    assert_whole_and_exactly_once(tmp_path / "out", expected)


# --- a resume checks the part files it trusts ---------------------------------------------------

def test_resume_redoes_truncated_unreadable_and_miscounted_part_files(tmp_path, caplog):
    args, expected = imagefolder_args(tmp_path, per_class=(4, 4, 4), shard_size=3)
    broken = tmp_path / "data" / "c0" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    first = run_composed(*args)
    assert first.errors == 1 and first.shards_written == 5
    out = tmp_path / "out"
    parts = sorted((out / "cams").glob("part-*.parquet"))
    error_parts = list((out / "errors").glob("part-*.parquet"))
    assert len(parts) == 5 and [p.name for p in error_parts] == [parts[1].name]  # broken.jpg is in unit 1
    whole = parts[0].read_bytes()
    parts[0].write_bytes(whole[: len(whole) // 2])  # truncated: no footer
    parts[2].write_bytes(b"PAR1" + b"\x00" * 300 + b"PAR1")  # a footer that does not parse
    pq.write_table(pq.read_table(parts[3]).slice(0, 1), parts[3])  # whole, but fewer rows than recorded
    error_parts[0].write_bytes(b"garbage")  # the errors file of a unit whose cams file is fine
    damaged = [f"cams/{parts[0].name}", f"cams/{parts[2].name}", f"cams/{parts[3].name}",
               f"errors/{error_parts[0].name}"]
    caplog.set_level(logging.WARNING, logger="gradcam_batch")
    second = run_composed(*args)
    redone = [r.getMessage() for r in caplog.records if "redoing" in r.getMessage()]
    assert len(redone) == len(damaged) and all(any(name in line for line in redone) for name in damaged), redone
    assert second.shards_written == len(damaged) and second.errors == 1
    assert_whole_and_exactly_once(out, expected)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["status"] == "complete" and (manifest["rows"], manifest["errors"]) == (12, 1)


def test_an_interrupted_resume_keeps_the_recorded_counts(tmp_path, monkeypatch, caplog):
    from gradcam_batch import pipeline

    args, expected = imagefolder_args(tmp_path, per_class=(3, 3), shard_size=2)
    run_composed(*args)
    out = tmp_path / "out"
    recorded = json.loads((out / MANIFEST_NAME).read_text())["units"]

    def stopped(*_args, **_kwargs):
        raise RuntimeError("stopped mid-run")

    monkeypatch.setattr(pipeline, "_process", stopped)
    with pytest.raises(RuntimeError, match="stopped mid-run"):
        run_composed(*args)
    monkeypatch.undo()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["status"] == "running" and manifest["units"] == recorded
    part = sorted((out / "cams").glob("part-*.parquet"))[0]
    pq.write_table(pq.read_table(part).slice(0, 1), part)  # readable, but a row short of the record
    caplog.set_level(logging.WARNING, logger="gradcam_batch")
    assert run_composed(*args).shards_written == 1
    assert any(part.name in r.getMessage() and "redoing" in r.getMessage() for r in caplog.records)
    assert_whole_and_exactly_once(out, expected)


# --- overwrite deletes only what this tool wrote ------------------------------------------------

def test_overwrite_deletes_only_files_this_tool_wrote(tmp_path):
    args, expected = imagefolder_args(tmp_path)
    out = tmp_path / "out"
    run_composed(*args)
    mine = {out / "cams" / "notes.txt": "my notes", out / "errors" / "triage.csv": "a,b",
            out / "report.md": "# report", out / "analysis" / "plots.txt": "x"}
    for path, text in mine.items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    (out / ".tmp").mkdir(exist_ok=True)
    (out / ".tmp" / "cams.part-gone.parquet.tmp").write_bytes(b"stale")
    stale_part = out / "cams" / "part-gone.parquet"
    pq.write_table(pq.read_table(next((out / "cams").glob("part-*.parquet"))), stale_part)
    run_composed(*args, "output.overwrite=true", "cam.method=layercam")
    assert {path: path.read_text() for path in mine} == mine
    assert not stale_part.exists() and not list((out / ".tmp").iterdir())
    parts = sorted(str(p) for p in (out / "cams").glob("part-*.parquet"))
    assert sorted(pq.ParquetDataset(parts).read()["sample_id"].to_pylist()) == expected
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["method"] == "layercam" and manifest["status"] == "complete"


@pytest.mark.parametrize("foreign, named", [
    ("thesis.docx", "thesis.docx"),
    ("cams/my-own.parquet", "cams/my-own.parquet"),  # in cams/, but not named like a part file
    ("photos/cat.jpg", "photos"),
])
def test_overwrite_refuses_a_folder_that_was_never_an_output_folder(tmp_path, foreign, named):
    args, _ = imagefolder_args(tmp_path)
    out = tmp_path / "out"
    (out / foreign).parent.mkdir(parents=True, exist_ok=True)
    (out / foreign).write_text("the user's own")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with pytest.raises(UserError, match=rf"holds {named} and no {MANIFEST_NAME}: .*not an output folder"):
        run_composed(*args, "output.overwrite=true")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # not even a lock file
    assert (out / foreign).read_text() == "the user's own"


# --- temporaries live outside the folders readers glob -------------------------------------------

def test_stale_temporaries_are_removed_on_start(tmp_path):
    args, expected = imagefolder_args(tmp_path)
    out = tmp_path / "out"
    run_composed(*args)
    left = [out / ".tmp" / "cams.part-x.parquet.tmp", out / ".tmp" / "errors.part-x.parquet.tmp",
            out / "cams" / ".part-imagefolder-00000.parquet.tmp",  # where earlier versions kept them
            out / "errors" / ".part-imagefolder-00000.parquet.tmp", out / f".{MANIFEST_NAME}.tmp"]
    for path in left:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half a file")
    assert run_composed(*args).shards_skipped == 4
    assert [path for path in left if path.exists()] == []
    assert_whole_and_exactly_once(out, expected)


# --- a full disk ------------------------------------------------------------------------------

@pytest.fixture
def small_filesystem(tmp_path):
    """A 1 MiB tmpfs (needs root and mount rights; skipped where the sandbox has neither)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


@pytest.mark.slow
def test_a_full_disk_is_one_line_nothing_half_written_and_a_rerun_completes(tmp_path, small_filesystem):
    args, expected = imagefolder_args(tmp_path, per_class=(30, 30), shard_size=3)
    out = small_filesystem / "out"
    args = [*(a for a in args if not a.startswith("output.dir=")), f"output.dir={out}"]
    filler = small_filesystem / "filler"
    with open(filler, "wb") as handle:  # leave room for the manifest and a few part files, not 20
        handle.write(b"\0" * (1024 * 1024 - 96 * 1024))
    full = run_cli(*args)
    assert full.returncode == 1, full.stderr[-3000:]
    assert_one_line_error(full.stderr, "No space left on device")
    assert str(out) in error_lines(full.stderr)[0]
    for path in (out / "cams").glob("*"):
        pq.read_table(path)  # whatever made it under a final name is whole
    filler.unlink()
    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_whole_and_exactly_once(out, expected)
    assert not list((out / ".tmp").iterdir())


def test_an_io_error_while_writing_stops_the_run_cleanly_and_a_rerun_completes(tmp_path, monkeypatch):
    import pyarrow.parquet

    args, expected = imagefolder_args(tmp_path, per_class=(3, 3), shard_size=2)
    original = pyarrow.parquet.ParquetWriter.write_table
    written = []

    def fill_up(self, table, *more, **kwargs):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
        written.append(table.num_rows)
        return original(self, table, *more, **kwargs)

    monkeypatch.setattr(pyarrow.parquet.ParquetWriter, "write_table", fill_up)
    with pytest.raises(writer.OutputWriteError, match=rf"cannot write {tmp_path / 'out'}/.*: No space left on device"):
        run_composed(*args)
    monkeypatch.undo()
    out = tmp_path / "out"
    assert len(list((out / "cams").iterdir())) == 2 and not list((out / ".tmp").iterdir())
    assert run_composed(*args).shards_written == 1
    assert_whole_and_exactly_once(out, expected)


# --- a stalled rank -------------------------------------------------------------------------------

def test_the_collective_timeout_comes_from_runtime_dist_timeout_minutes(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kwargs: seen.update(kwargs))
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("GRADCAM_BATCH_DIST_TIMEOUT_SECONDS", raising=False)
    dist.init(torch.device("cpu"), timeout_minutes=7)
    assert seen["timeout"] == timedelta(minutes=7)


@pytest.mark.slow
def test_a_stalled_rank_is_named_within_the_timeout_and_a_rerun_completes(tmp_path):
    args, expected = imagefolder_args(tmp_path, per_class=(16, 16), shard_size=2)
    out = tmp_path / "out"
    ranks = start_ranks(tmp_path / "logs", *args, env={"GRADCAM_BATCH_DIST_TIMEOUT_SECONDS": "10"})
    try:
        deadline = time.monotonic() + 120
        while not (out / MANIFEST_NAME).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(ranks[1].pid, signal.SIGSTOP)  # both ranks are past the start; rank 1 still has units to do
        stopped_at = time.monotonic()
        ranks[0].wait(timeout=120)
        waited = time.monotonic() - stopped_at
    finally:
        os.kill(ranks[1].pid, signal.SIGCONT)
        results = finish_ranks(tmp_path / "logs", ranks, timeout=60)
    code, _, stderr = results[0]
    assert code == 1 and waited < 60, (waited, stderr[-3000:])
    assert_one_line_error(stderr, "rank 1 did not arrive")
    assert "runtime.dist_timeout_minutes" in error_lines(stderr)[0]
    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_whole_and_exactly_once(out, expected)


@pytest.mark.slow
def test_ranks_that_outlive_their_rank_0_still_hold_the_folder(tmp_path):
    """Launched without torchrun (srun without --kill-on-bad-exit), the other ranks of a job
    whose rank 0 died go on writing their units: no new run may start until they are gone."""
    args, expected = imagefolder_args(tmp_path, per_class=(16, 16), shard_size=2)
    out = tmp_path / "out"
    ranks = start_ranks(tmp_path / "logs", *args)
    try:
        deadline = time.monotonic() + 120
        while not (out / MANIFEST_NAME).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(ranks[1].pid, signal.SIGSTOP)  # keeps rank 1 alive, mid-run, for as long as the test needs
        ranks[0].kill()
        ranks[0].wait()
        refused = run_cli(*args)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert_one_line_error(refused.stderr, "is still held by a rank of another run")
    finally:
        ranks[1].kill()
        finish_ranks(tmp_path / "logs", ranks, timeout=60)
    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_whole_and_exactly_once(out, expected)
