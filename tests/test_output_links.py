"""Hostile output folders: a link planted among an output folder's own entries, or an entry of
the wrong kind, is refused in one line before anything is written or deleted, and nothing is
ever created, truncated, listed or deleted through a link (output.dir itself may be one). And
the pointing and zero-map totals are sums over exactly the units in cams/, however the runs
that wrote them were interrupted or redone."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cli_helpers import TINY_RESNET, merged, read_cams, run_cli, run_composed
from gradcam_batch import UserError
from gradcam_batch.writer import LOCK_NAME, MANIFEST_NAME, UNIT_TOTALS_KEY
from test_output_safety import assert_one_line_error, assert_whole_and_exactly_once, imagefolder_args
from test_statistics import make_boxed_webdataset

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def snapshot(root: Path) -> dict:
    """Every entry under root, never through a link: relative path -> its kind and contents."""
    state = {}
    for folder, folders, files in os.walk(root):  # os.walk does not descend into linked folders
        for name in folders + files:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                state[key] = ("link", os.readlink(path))
            elif path.is_dir():
                state[key] = ("folder",)
            elif path.is_file():
                state[key] = ("file", path.read_bytes())
            else:
                state[key] = ("special",)  # a FIFO: opening it to read would wait for a writer
    return state


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished output folder of a tiny ImageFolder run (4 units), and its arguments."""
    base = tmp_path_factory.mktemp("finished")
    args, expected = imagefolder_args(base)
    run_composed(*args)
    return base / "out", args, expected


def copy_of(finished, tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    source, args, expected = finished
    out = tmp_path / "out"
    shutil.copytree(source, out, symlinks=True)
    return out, [*args, f"output.dir={out}"], expected


def users_folder(path: Path, part_from: Path | None = None) -> Path:
    """A folder of the user's own: notes, a file ending in .tmp, a Parquet file named like a part."""
    path.mkdir()
    (path / "thesis.docx").write_text("three years of work")
    (path / "draft.tmp").write_text("unsaved draft")
    if part_from is not None:
        shutil.copy(part_from, path / "part-mine.parquet")
    return path


def plant(out: Path, entry: str, home: Path) -> Path:
    """Replace `entry` of the output folder by a link to something of the user's; returns its target."""
    any_part = next((out / "cams").glob("part-*.parquet"), None)
    if entry in ("cams", "errors", ".tmp", "demo-data"):
        target = users_folder(home / f"docs-{entry.strip('.')}", part_from=any_part)
    elif entry == MANIFEST_NAME:
        target = home / "config.json"
        shutil.copy(out / MANIFEST_NAME, target)  # a manifest a resume would trust
    else:
        target = home / "notes.txt"
        target.write_text("my notes\n")
    path = out / entry
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    path.symlink_to(target, target_is_directory=target.is_dir())
    return target


ENTRIES = [".tmp", "cams", "errors", LOCK_NAME, MANIFEST_NAME, "demo-data"]


# --- links planted among the output folder's own entries ----------------------------------------

@pytest.mark.parametrize("overwrite", [False, True], ids=["resume", "overwrite"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_a_link_planted_in_a_finished_output_folder_is_refused_and_its_target_untouched(
        finished, tmp_path, entry, overwrite):
    out, args, _ = copy_of(finished, tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    target = plant(out, entry, home)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=rf"holds {re.escape(entry)} as a link to '{re.escape(str(target))}'"):
        run_composed(*args, f"output.overwrite={str(overwrite).lower()}")
    assert snapshot(tmp_path) == before  # the link's target and the output folder, byte for byte


@pytest.mark.parametrize("entry", [".tmp", "cams", "errors"])
def test_a_link_in_a_folder_without_a_manifest_is_refused_with_overwrite(tmp_path, entry):
    """No manifest, only the link: overwrite used to take the folder for an output folder (its
    entries have the right names) and clear what the link leads to."""
    args, _ = imagefolder_args(tmp_path)
    out, home = tmp_path / "out", tmp_path / "home"
    out.mkdir()
    home.mkdir()
    target = users_folder(home / "docs")
    part = home / "docs" / "part-imagefolder-00000.parquet"
    shutil.copy(home / "docs" / "thesis.docx", part)
    (out / entry).symlink_to(target, target_is_directory=True)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=rf"holds {re.escape(entry)} as a link"):
        run_composed(*args, "output.overwrite=true")
    assert snapshot(tmp_path) == before


def test_a_planted_link_is_one_line_exit_2_naming_the_entry(finished, tmp_path):
    out, args, _ = copy_of(finished, tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    target = plant(out, ".tmp", home)
    before = snapshot(tmp_path)
    refused = run_cli(*args, "output.overwrite=true")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert_one_line_error(refused.stderr, f"holds .tmp as a link to '{target}'")
    assert "output.dir=" in refused.stderr and "remove the link" in refused.stderr
    assert snapshot(tmp_path) == before


def test_a_link_in_a_fresh_demo_folder_is_refused_before_the_demo_data_is_written(tmp_path):
    out, home = tmp_path / "out", tmp_path / "home"
    out.mkdir()
    home.mkdir()
    target = users_folder(home / "pictures")
    (out / "demo-data").symlink_to(target, target_is_directory=True)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=r"holds demo-data as a link"):
        run_composed(*TINY_RESNET, "data.demo_images=8", f"output.dir={out}")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("entry, kind", [
    ("cams", "file"), ("errors", "file"), (".tmp", "file"), ("demo-data", "file"),
    (LOCK_NAME, "folder"), (MANIFEST_NAME, "folder"), (LOCK_NAME, "fifo"),
])
def test_an_entry_of_the_wrong_kind_is_refused_naming_it(finished, tmp_path, entry, kind):
    out, args, _ = copy_of(finished, tmp_path)
    path = out / entry
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    if kind == "file":
        path.write_text("the user's own")
    elif kind == "folder":
        path.mkdir()
        (path / "inside.txt").write_text("the user's own")
    else:
        os.mkfifo(path)
    before = snapshot(tmp_path)
    expected = "folder" if kind == "file" else "file"
    with pytest.raises(UserError, match=rf"holds {re.escape(entry)} as a \w+ where gradcam-batch keeps a {expected}"):
        run_composed(*args)
    assert snapshot(tmp_path) == before


def test_a_lock_file_hard_linked_to_a_users_file_is_refused_and_not_truncated(finished, tmp_path):
    out, args, _ = copy_of(finished, tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    (out / LOCK_NAME).unlink()
    os.link(notes, out / LOCK_NAME)
    with pytest.raises(UserError, match=rf"holds {re.escape(LOCK_NAME)} with 2 names"):
        run_composed(*args)
    assert notes.read_text() == "my notes\n"


def test_a_part_file_that_is_a_link_is_not_trusted_and_its_unit_is_redone(finished, tmp_path, caplog):
    import logging

    out, args, expected = copy_of(finished, tmp_path)
    part = sorted((out / "cams").glob("part-*.parquet"))[0]
    elsewhere = tmp_path / "elsewhere.parquet"
    shutil.copy(part, elsewhere)
    part.unlink()
    part.symlink_to(elsewhere)
    kept = elsewhere.read_bytes()
    caplog.set_level(logging.WARNING, logger="gradcam_batch")
    summary = run_composed(*args)
    assert summary.shards_written == 1
    assert any(f"cams/{part.name} is a link" in r.getMessage() and "redoing" in r.getMessage() for r in caplog.records)
    assert not part.is_symlink() and part.is_file() and elsewhere.read_bytes() == kept
    assert_whole_and_exactly_once(out, expected)


def test_output_dir_itself_may_be_a_link(tmp_path):
    args, expected = imagefolder_args(tmp_path)
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.symlink_to(real, target_is_directory=True)
    first = run_composed(*args, f"output.dir={link}")
    assert first.shards_written == 4 and link.is_symlink()
    assert_whole_and_exactly_once(real, expected)
    again = run_composed(*args, f"output.dir={link}")
    assert again.shards_written == 0 and again.shards_skipped == 4


# --- pointing and zero-map totals: sums over exactly the units in cams/ ---------------------------

def totals_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith(("pointing", "box energy", "zero maps", "boxes"))]


def manifest_totals(out: Path) -> dict:
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    return {"pointing": manifest["pointing"], "zero_maps": manifest["zero_maps"]}


def assert_same_totals(got: dict, want: dict):
    assert got["zero_maps"] == want["zero_maps"]
    for key, value in want["pointing"].items():
        assert got["pointing"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def boxed_args(tmp_path: Path, count: int, out: Path, **settings) -> list[str]:
    make_boxed_webdataset(tmp_path / "shard.tar", count=count)
    return merged(*TINY_RESNET, "data=webdataset", f"data.shards={tmp_path / 'shard.tar'}", "data.unit_size=3",
                  "data.batch_size=3", f"output.dir={out}", *(f"{k}={v}" for k, v in settings.items()))


def test_a_unit_redone_after_damage_is_counted_once(tmp_path):
    out = tmp_path / "out"
    args = boxed_args(tmp_path, 12, out)
    first = run_composed(*args)
    assert first.shards_written == 4 and first.pointing_total > 0
    want_lines, want = totals_lines(first.lines()), manifest_totals(out)
    assert any(line.startswith("pointing") for line in want_lines)
    sorted((out / "cams").glob("part-*.parquet"))[-1].unlink()  # the unit with the most boxes
    again = run_composed(*args)
    assert again.shards_written == 1
    assert totals_lines(again.lines()) == want_lines
    assert_same_totals(manifest_totals(out), want)
    footers = [json.loads(pq.read_metadata(part).metadata[UNIT_TOTALS_KEY])
               for part in sorted((out / "cams").glob("part-*.parquet"))]
    assert sum(unit["pointing"]["total"] for unit in footers) == first.pointing_total  # each unit's own, once
    nothing = run_composed(*args)  # the no-op rerun shows the same stored totals
    assert [line.replace(", stored", "").replace(" stored", "") for line in totals_lines(nothing.lines())] == want_lines


@pytest.mark.slow
def test_kill_nine_then_resume_gives_the_totals_of_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    args = boxed_args(tmp_path, 60, reference, **{"data.num_workers": 2})
    uninterrupted = run_cli(*args)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    want_lines, want = totals_lines(uninterrupted.stdout.splitlines()), manifest_totals(reference)
    assert any(line.startswith("pointing") for line in want_lines)

    out = tmp_path / "out"
    command = [sys.executable, "-m", "gradcam_batch", *merged(*args, f"output.dir={out}")]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while (process.poll() is None and time.monotonic() < deadline
           and len(list((out / "cams").glob("part-*.parquet"))) < 4):
        time.sleep(0.02)
    time.sleep(random.Random(3).uniform(0.0, 0.1))
    os.killpg(process.pid, signal.SIGKILL)  # the main process and its DataLoader workers
    process.wait()
    done = len(list((out / "cams").glob("part-*.parquet")))
    assert 0 < done < 20, done  # the kill left finished units for the resume to keep

    resumed = run_cli(*args, f"output.dir={out}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{20 - done} written, {done} already complete" in resumed.stdout
    assert totals_lines(resumed.stdout.splitlines()) == want_lines
    assert_same_totals(manifest_totals(out), want)
    assert sorted(read_cams(out)["sample_id"].to_pylist()) == sorted(read_cams(reference)["sample_id"].to_pylist())
    for part in (out / "cams").glob("part-*.parquet"):
        pq.read_metadata(part)


def test_overwrite_removes_the_strategies_and_crosscheck_files_the_report_wrote(tmp_path):
    from cli_helpers import TINY_RESNET, run_cli
    from gradcam_batch.output_folder import REPORT_FILES as STRATEGIES_NAMES
    from gradcam_batch.report.crosscheck import CROSSCHECK_NAME
    from gradcam_batch.report.strategies import CLASSES_NAME, STRATEGIES_NAME

    assert set(STRATEGIES_NAMES) == {STRATEGIES_NAME, CLASSES_NAME, CROSSCHECK_NAME}
    out = tmp_path / "out"
    assert run_cli(*TINY_RESNET, "data.demo_images=4", f"output.dir={out}").returncode == 0
    for name in STRATEGIES_NAMES:
        (out / name).write_bytes(b"stale")
    (out / "mine.txt").write_text("the user's")
    again = run_cli(*TINY_RESNET, "data.demo_images=4", f"output.dir={out}", "output.overwrite=true")
    assert again.returncode == 0, again.stderr
    assert not any((out / name).exists() for name in STRATEGIES_NAMES)
    assert (out / "mine.txt").read_text() == "the user's"
