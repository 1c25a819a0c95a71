"""Shard listing: ids that are unique and stable, each file read once, ImageFolder reading only
regular files inside data.root, output.dir kept apart from the data, and a resume refused when
the files under data.root changed."""

import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cli_helpers import TINY_RESNET, read_cams, run_cli, run_composed
from gradcam_batch import UserError
from gradcam_batch.config import DataConfig
from gradcam_batch.data.readers import iter_samples
from gradcam_batch.data.shards import list_shards
from gradcam_batch.data.units import list_units, listing_record
from sample_data import encode, make_imagefolder, make_parquet, make_tar

SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def read_all(cfg):
    return [sample for shard in list_shards(cfg) for sample in iter_samples(shard, cfg)]


def errors_by_id(samples):
    return {sample.sample_id: sample.error for sample in samples if sample.error is not None}


def errors_of(out: Path):
    return pq.read_table(out / "errors").to_pylist() if (out / "errors").exists() else []


# --- shard ids and duplicates ---------------------------------------------------------------


def test_names_that_clean_to_one_id_get_distinct_safe_ids(tmp_path):
    for index, name in enumerate(["a b", "a_b", "a+b"]):
        make_tar(tmp_path / f"{name}.tar", [f"s{index}-{k}" for k in range(2)], seed=index)
    cfg = DataConfig(format="webdataset", shards=str(tmp_path / "*.tar"))
    ids = {Path(shard.path).name: shard.shard_id for shard in list_shards(cfg)}
    assert len(set(ids.values())) == 3
    assert ids["a_b.tar"] == "a_b"  # a clean name that nothing else claims keeps its stem
    for name in ("a b.tar", "a+b.tar"):
        assert re.fullmatch(r"a_b-[0-9a-f]{8}", ids[name]), ids
    # the same file gets the same id however the shards are given
    listed_apart = ",".join(str(tmp_path / name) for name in ("a+b.tar", "a b.tar", "a_b.tar"))
    again = list_shards(DataConfig(format="webdataset", shards=listed_apart))
    assert {Path(shard.path).name: shard.shard_id for shard in again} == ids


def test_ids_stay_distinct_on_case_insensitive_disks_and_for_long_names(tmp_path):
    make_tar(tmp_path / "x" / "Shard.tar", ["a"])
    make_tar(tmp_path / "x" / "shard.tar", ["b"])  # one file with Shard.tar on macOS or Windows disks
    make_tar(tmp_path / "y" / "shard.tar", ["c"])  # the same name in another folder
    long = "n" * 230  # ids are cut to 200 characters, so these two meet there
    make_tar(tmp_path / "x" / f"{long}1.tar", ["d"])
    make_tar(tmp_path / "x" / f"{long}2.tar", ["e"])
    ids = [shard.shard_id for shard in list_shards(DataConfig(format="webdataset", shards=f"{tmp_path}/*/*.tar"))]
    assert len({shard_id.casefold() for shard_id in ids}) == 5, ids
    assert all(SAFE_ID.fullmatch(shard_id) and len(shard_id) <= 200 for shard_id in ids), ids


def test_the_same_file_under_several_paths_is_listed_once(tmp_path, monkeypatch):
    make_tar(tmp_path / "x.tar", ["a", "b"])
    os.symlink("x.tar", tmp_path / "link.tar")
    os.link(tmp_path / "x.tar", tmp_path / "hard.tar")
    monkeypatch.chdir(tmp_path)
    (shard,) = list_shards(DataConfig(format="webdataset", shards=f"x.tar,./x.tar,{tmp_path}/*.tar"))
    assert shard.shard_id == "x" and not os.path.islink(shard.path)  # the file itself, not the link


def test_colliding_and_repeated_shards_end_to_end_every_sample_once(tmp_path):
    expected = {}
    for index, name in enumerate(["a b", "a_b", "a+b"]):
        expected.update(make_tar(tmp_path / "wds" / f"{name}.tar", [f"s{index}-{k}" for k in range(4)], seed=index))
    os.symlink("a_b.tar", tmp_path / "wds" / "again.tar")
    out = tmp_path / "out"
    args = [*TINY_RESNET, "data=webdataset", f"data.shards='{tmp_path}/wds/*.tar,{tmp_path}/wds/a*.tar'",
            f"output.dir={out}"]
    summary = run_composed(*args)
    assert sorted(read_cams(out)["sample_id"].to_pylist()) == sorted(expected)
    assert (summary.images, summary.rows, summary.errors, summary.shards_written) == (12, 12, 0, 3)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows"] == 12 and len(manifest["shards"]) == 3
    again = run_composed(*args)
    assert (again.images, again.shards_written, again.shards_skipped) == (0, 0, 3)


# --- ImageFolder: only regular files inside data.root ---------------------------------------


def release_fifo_after(path: Path, seconds: float) -> None:
    """Opens the FIFO for writing after `seconds` if a reader is blocked in open() on it, so a
    reader that waits for a writer ends instead of hanging the test run."""
    def open_and_close():
        time.sleep(seconds)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO when nobody reads: nothing to release
        except OSError:
            pass  # ENXIO: no reader was waiting, so nothing is blocked

    threading.Thread(target=open_and_close, daemon=True).start()


def test_imagefolder_reads_only_regular_files(tmp_path):
    root = tmp_path / "data"
    expected = make_imagefolder(root, per_class=(2, 2))
    os.mkfifo(root / "c0" / "pipe.jpg")
    os.symlink("/dev/null", root / "c1" / "null.jpg")
    release_fifo_after(root / "c0" / "pipe.jpg", 5)
    started = time.monotonic()
    samples = read_all(DataConfig(format="imagefolder", root=str(root), follow_links=True))
    assert time.monotonic() - started < 4  # nothing waited for a writer
    errors = errors_by_id(samples)
    assert {sample_id: error[1] for sample_id, error in errors.items()} == {
        "c0/pipe.jpg": "NotRegularFile", "c1/null.jpg": "NotRegularFile"}
    assert "FIFO" in errors["c0/pipe.jpg"][2] and "character device" in errors["c1/null.jpg"][2]
    assert sorted(s.sample_id for s in samples if s.error is None) == sorted(path for path, _ in expected)


def test_a_link_to_dev_zero_is_an_error_row_in_bounded_memory(tmp_path):
    """Run in a process capped at 6 GiB of address space (torch's libraries take most of it):
    reading /dev/zero there ends in MemoryError instead of taking the machine's memory."""
    root = tmp_path / "data"
    make_imagefolder(root, per_class=(1,))
    os.symlink("/dev/zero", root / "c0" / "zero.jpg")
    script = (
        "import sys\n"
        "from gradcam_batch.config import DataConfig\n"
        "from gradcam_batch.data.readers import iter_samples\n"
        "from gradcam_batch.data.shards import list_shards\n"
        "for follow in (False, True):\n"
        "    cfg = DataConfig(format='imagefolder', root=sys.argv[1], follow_links=follow)\n"
        "    samples = [s for shard in list_shards(cfg) for s in iter_samples(shard, cfg)]\n"
        "    print({s.sample_id: s.error[1] for s in samples if s.error})\n")

    def cap_memory():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-c", script, str(root)], preexec_fn=cap_memory, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["{'c0/zero.jpg': 'LinkOutsideRoot'}", "{'c0/zero.jpg': 'NotRegularFile'}"]


def test_links_that_leave_the_root_are_error_rows_unless_follow_links(tmp_path):
    root = tmp_path / "data"
    make_imagefolder(root, per_class=(2, 1))
    secret = tmp_path / "outside" / "secret.jpg"
    secret.parent.mkdir()
    secret.write_bytes(b"TOPSECRET-CONTENTS")
    os.symlink(secret, root / "c0" / "shadow.jpg")
    os.symlink("../c0/000.jpg", root / "c1" / "alias.jpg")  # stays inside the root: followed
    os.symlink("../c0", root / "c1" / "more")  # a folder inside the root: followed
    samples = read_all(DataConfig(format="imagefolder", root=str(root)))
    errors = errors_by_id(samples)
    assert {sample_id: error[1] for sample_id, error in errors.items()} == {
        "c0/shadow.jpg": "LinkOutsideRoot", "c1/more/shadow.jpg": "LinkOutsideRoot"}
    assert "data.follow_links=true" in errors["c0/shadow.jpg"][2] and "TOPSECRET" not in repr(errors)
    payloads = {s.sample_id: s.payload for s in samples}
    assert payloads["c1/alias.jpg"] == payloads["c1/more/000.jpg"] == (root / "c0" / "000.jpg").read_bytes()
    assert [s.label for s in samples if s.sample_id.startswith("c1/more/")] == [1, 1, 1]
    followed = read_all(DataConfig(format="imagefolder", root=str(root), follow_links=True))
    assert errors_by_id(followed) == {}
    assert {s.sample_id: s.payload for s in followed}["c0/shadow.jpg"] == b"TOPSECRET-CONTENTS"
    os.symlink(root, tmp_path / "root-link")  # data.root itself may be a link
    assert errors_by_id(read_all(DataConfig(format="imagefolder", root=str(tmp_path / "root-link")))) == errors


def test_a_class_folder_linked_outside_the_root_is_refused_in_one_line(tmp_path):
    root = tmp_path / "data"
    make_imagefolder(root, per_class=(2,))
    make_imagefolder(tmp_path / "elsewhere", per_class=(2,))
    os.symlink(tmp_path / "elsewhere" / "c0", root / "system")
    with pytest.raises(UserError) as refused:
        list_shards(DataConfig(format="imagefolder", root=str(root)))
    message = str(refused.value)
    assert "'system'" in message and "data.follow_links=true" in message and "\n" not in message
    (shard,) = list_shards(DataConfig(format="imagefolder", root=str(root), follow_links=True))
    assert shard.files == [("c0/000.jpg", 0), ("c0/001.png", 0), ("system/000.jpg", 1), ("system/001.png", 1)]


@pytest.mark.parametrize("link, target, message", [
    ("c0/sub", "{outside}", "'c0/sub' is a link to"),  # a folder below a class folder, outside the root
    ("c0/loop", "..", "'c0/loop' leads back to a folder above it"),  # would list the root forever
    ("c0/self", ".", "'c0/self' leads back to a folder above it"),
])
def test_nested_folder_links_outside_the_root_or_in_a_loop_are_refused(tmp_path, link, target, message):
    root = tmp_path / "data"
    make_imagefolder(root, per_class=(2, 1))
    make_imagefolder(tmp_path / "elsewhere", per_class=(1,))
    os.symlink(target.format(outside=tmp_path / "elsewhere"), root / link)
    with pytest.raises(UserError, match=re.escape(message)):
        list_shards(DataConfig(format="imagefolder", root=str(root)))


def test_files_over_max_bytes_are_error_rows_without_being_read(tmp_path):
    root = tmp_path / "data"
    make_imagefolder(root, per_class=(2,))
    small = encode(np.random.default_rng(0), "PNG", size=(2, 2))
    (root / "c0" / "small.png").write_bytes(small)
    with open(root / "c0" / "sparse.jpg", "wb") as handle:
        handle.truncate(1 << 40)  # a terabyte that occupies no disk; reading it cannot succeed
    samples = read_all(DataConfig(format="imagefolder", root=str(root)))
    errors = errors_by_id(samples)
    assert list(errors) == ["c0/sparse.jpg"] and errors["c0/sparse.jpg"][1] == "TooLarge"
    assert f"{1 << 40} bytes" in errors["c0/sparse.jpg"][2] and "data.max_bytes=268435456" in errors["c0/sparse.jpg"][2]
    samples = read_all(DataConfig(format="imagefolder", root=str(root), max_bytes=len(small)))
    assert sorted(errors_by_id(samples)) == ["c0/000.jpg", "c0/001.png", "c0/sparse.jpg"]
    assert next(s for s in samples if s.sample_id == "c0/small.png").payload == small  # exactly the limit: read


def test_file_names_that_are_not_utf8_are_listed_and_recorded(tmp_path):
    root = tmp_path / "data"
    make_imagefolder(root, per_class=(1,))
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes on a disk that keeps bytes as they are
    (root / "c0" / name).write_bytes(encode(np.random.default_rng(0)))
    cfg = DataConfig(format="imagefolder", root=str(root))
    json.dumps(listing_record(list_units(list_shards(cfg), cfg.unit_size)))
    samples = read_all(cfg)
    assert len(samples) == 2 and errors_by_id(samples) == {}


def test_imagefolder_run_with_hostile_files_accounts_for_every_file_once(tmp_path):
    root = tmp_path / "data"
    expected = make_imagefolder(root, per_class=(3, 2))
    (tmp_path / "secret.txt").write_bytes(b"root:TOPSECRET-HASH:19000:0:99999:7:::")
    os.symlink(tmp_path / "secret.txt", root / "c0" / "shadow.jpg")
    os.symlink("/dev/zero", root / "c0" / "zero.jpg")
    os.mkfifo(root / "c1" / "pipe.jpg")
    (root / "c1" / "big.jpg").write_bytes(bytes(200_000))
    out = tmp_path / "out"
    args = [*TINY_RESNET, "data=imagefolder", f"data.root={root}", "data.max_bytes=100000", "data.unit_size=3",
            f"output.dir={out}"]
    summary = run_composed(*args)
    errors = {e["sample_id"]: e for e in errors_of(out)}
    assert sorted(errors) == ["c0/shadow.jpg", "c0/zero.jpg", "c1/big.jpg", "c1/pipe.jpg"]
    assert "TOPSECRET" not in json.dumps(list(errors.values()), default=str)
    assert sorted(read_cams(out)["sample_id"].to_pylist()) == sorted(path for path, _ in expected)
    assert (summary.images, summary.errors) == (5, 4)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows"] + manifest["errors"] == 9
    again = run_composed(*args)
    assert (again.images, again.errors, again.shards_written) == (0, 0, 0)


# --- output.dir apart from the data ---------------------------------------------------------


@pytest.mark.parametrize("where", ["inside", "the same folder", "through a link"])
def test_output_dir_inside_data_root_is_refused(tmp_path, where):
    root = tmp_path / "data"
    make_imagefolder(root, per_class=(1, 1))
    os.symlink(root, tmp_path / "link")
    out = {"inside": root / "out", "the same folder": root, "through a link": tmp_path / "link" / "out"}[where]
    with pytest.raises(UserError, match=r"output\.dir=.* is inside data\.root="):
        run_composed(*TINY_RESNET, "data=imagefolder", f"data.root={root}", f"output.dir={out}")
    assert sorted(p.name for p in root.iterdir()) == ["c0", "c1"]  # nothing written


def test_output_dir_inside_data_root_is_one_line_exit_2(tmp_path):
    root = tmp_path / "data"
    make_imagefolder(root, per_class=(1, 1))
    result = run_cli(*TINY_RESNET, "data=imagefolder", f"data.root={root}", f"output.dir={root / 'out'}")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "is inside data.root" in lines[0], result.stderr
    assert sorted(p.name for p in root.iterdir()) == ["c0", "c1"]


def test_shards_inside_the_output_folders_are_refused(tmp_path):
    """A glob that also matches the part files of an earlier run would read the tool's own output."""
    data = tmp_path / "data"
    make_parquet(data / "pq", shards=1, rows=2)
    args = [*TINY_RESNET, "data=parquet", f"data.shards={data}/*/*.parquet", f"output.dir={data}"]
    assert run_composed(*args).images == 2  # the output folders do not exist yet
    with pytest.raises(UserError, match=r"data\.shards=.* matches .*cams.* inside output\.dir"):
        run_composed(*args, "output.overwrite=true")


# --- ImageFolder resume on changed files ----------------------------------------------------


def test_imagefolder_resume_on_changed_files_is_refused_naming_the_change(tmp_path):
    root = tmp_path / "data"
    expected = make_imagefolder(root, per_class=(3, 2, 4))  # c0/000.jpg c0/001.png c0/002.jpg | c1/... | c2/...
    out = tmp_path / "out"
    args = [*TINY_RESNET, "data=imagefolder", f"data.root={root}", "data.shard_size=4", "data.unit_size=2",
            f"output.dir={out}"]
    run_composed(*args)
    interrupted = out / "cams" / "part-imagefolder-00001@00000002-00000004.parquet"
    interrupted.unlink()  # as if the run had stopped before that unit finished
    parts = {p.name: p.stat().st_mtime_ns for p in (out / "cams").iterdir()}

    def refused(pattern):
        with pytest.raises(UserError, match=pattern) as error:
            run_composed(*args)
        assert "\n" not in str(error.value)
        assert {p.name: p.stat().st_mtime_ns for p in (out / "cams").iterdir()} == parts  # nothing written

    added = root / "c0" / "001a.jpg"  # sorts in the middle of c0: every later file moves by one
    added.write_bytes(encode(np.random.default_rng(7)))
    refused(r"9 -> 10 files under data\.root \(added or removed; the first difference is in shard imagefolder-00000\)")
    added.unlink()

    removed = root / "c2" / "003.png"
    kept, stat = removed.read_bytes(), removed.stat()
    removed.unlink()
    refused(r"9 -> 8 files under data\.root \(added or removed; the first difference is in shard imagefolder-00002\)")
    removed.write_bytes(kept)
    os.utime(removed, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # back as it was

    renamed = root / "c1" / "001.png"
    renamed.rename(root / "c1" / "001b.png")
    refused(r"files were renamed, replaced or moved between class folders "
            r"\(the first difference is in shard imagefolder-00001\)")
    (root / "c1" / "001b.png").rename(renamed)

    resumed = run_composed(*args)  # the data is as it was: the resume writes the missing unit only
    assert (resumed.images, resumed.shards_written, resumed.shards_skipped) == (2, 1, 4)
    assert sorted(read_cams(out)["sample_id"].to_pylist()) == sorted(path for path, _ in expected)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows"] == 9
    parts = {p.name: p.stat().st_mtime_ns for p in (out / "cams").iterdir()}

    (root / "c2" / "000.jpg").write_bytes(encode(np.random.default_rng(8)))  # same name, other pixels
    refused(r"a file was modified \(its size or modification time changed\) in shard imagefolder-00001")
    fresh = run_composed(*args, "output.overwrite=true")  # starting over reads the data as it is now
    assert fresh.images == 9 and sorted(read_cams(out)["sample_id"].to_pylist()) == sorted(p for p, _ in expected)
