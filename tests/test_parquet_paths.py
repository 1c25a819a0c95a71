"""Hugging Face Parquet whose image cells hold a path and no bytes (`datasets` writes images
from local files as struct<bytes: null, path: "img.jpg">). The path is read relative to the
Parquet file's folder, under ImageFolder's rules: only regular files, only inside that folder
unless data.follow_links=true, the size checked before reading, and a refused or missing file is
that row's own error row."""

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from cli_helpers import TINY_RESNET, read_cams, run_composed
from gradcam_batch.config import DataConfig
from gradcam_batch.data.loader import ShardBatches
from gradcam_batch.data.readers import iter_samples
from gradcam_batch.data.shards import list_shards
from gradcam_batch.data.units import list_units
from sample_data import encode

SECRET = "SECRET-CONTENT"  # planted in files outside the folder: no error message may repeat it
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # as `datasets` writes an Image column


def write_cells(path: Path, cells: list[tuple], labels: list[int] | None = None, **write_args) -> None:
    """A Parquet file whose image column holds (bytes, path) per row; None is a null field."""
    column = pa.array([{"bytes": data, "path": name} for data, name in cells], IMAGE)
    labels = list(range(len(cells))) if labels is None else labels
    pq.write_table(pa.table({"image": column, "label": pa.array(labels, pa.int64())}), path, **write_args)


def samples_of(cfg: DataConfig, in_units: bool = False):
    shards = list_shards(cfg)
    units = list_units(shards, cfg.unit_size) if in_units else shards
    return [sample for unit in units for sample in iter_samples(unit, cfg)]


def outcome(samples) -> list[tuple[str, str | None]]:
    """(sample id, error type or None) per sample; a payload exactly when there is no error."""
    for sample in samples:
        assert (sample.payload is not None) == (sample.error is None), sample
    return [(s.sample_id, s.error[1] if s.error else None) for s in samples]


def assert_clean(samples) -> None:
    for sample in samples:
        if sample.error is not None:
            assert SECRET not in sample.error[2] and "\n" not in sample.error[2], sample.error
            sample.error[2].encode("utf-8")


def errors_of(out: Path) -> dict[str, dict]:
    if not (out / "errors").exists():
        return {}
    return {row["sample_id"]: row for row in ds.dataset(out / "errors", format="parquet").to_table().to_pylist()}


def release_fifo_after(path: Path, seconds: float) -> None:
    """Opens the FIFO for writing after `seconds`, so a reader that waits for a writer ends
    instead of hanging the test run."""
    def open_and_close():
        time.sleep(seconds)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # ENXIO: no reader was waiting, so nothing is blocked

    threading.Thread(target=open_and_close, daemon=True).start()


def test_relative_and_absolute_paths_read_as_the_embedded_bytes_end_to_end(tmp_path):
    """One run over the same images twice, as paths and embedded: equal maps, and every row of
    the path file accounted for (good rows, the row with both bytes and a path, bad rows)."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    (data / "img" / "deep").mkdir(parents=True)
    images = [encode(rng, "PNG" if index == 1 else "JPEG", size=(48 + 4 * index, 56)) for index in range(5)]
    names = ["img/0.jpg", "img/1.png", "2.jpg", "img/deep/3.jpg", "img/4.jpg"]
    for name, image in zip(names, images):
        (data / name).write_bytes(image)
    cells = [(None, names[0]), (None, names[1]), (None, "./" + names[2]), (None, str(data / names[3])),
             (images[4], "img/missing.jpg"),  # both: the bytes are used, the path is not looked at
             (None, "img/missing.jpg"), (None, "../outside.jpg"), (None, "img"), (None, None)]
    (tmp_path / "outside.jpg").write_bytes(encode(rng))
    write_cells(data / "paths.parquet", cells, labels=[0, 1, 2, 3, 4, 5, 6, 7, 8], row_group_size=3)
    write_cells(data / "embedded.parquet", [(image, None) for image in images], labels=[0, 1, 2, 3, 4])
    out = tmp_path / "out"
    args = [*TINY_RESNET, "data=parquet", f"data.shards={data}/*.parquet", "data.unit_size=3", f"output.dir={out}"]
    summary = run_composed(*args)
    assert (summary.images, summary.errors) == (5 + 5, 4)
    cams = {row["sample_id"]: row for row in read_cams(out).to_pylist()}
    assert sorted(cams) == sorted([f"paths/{row}" for row in range(5)] + [f"embedded/{row}" for row in range(5)])
    for row in range(5):
        by_path, embedded = cams[f"paths/{row}"], cams[f"embedded/{row}"]
        assert (by_path["target_class"], by_path["label"]) == (embedded["target_class"], embedded["label"])
        np.testing.assert_allclose(by_path["cam"], embedded["cam"], atol=1e-6)  # the same bytes, other batches
    errors = errors_of(out)
    assert {sample_id: row["error_type"] for sample_id, row in errors.items()} == {
        "paths/5": "FileNotFoundError", "paths/6": "PathOutsideRoot", "paths/7": "NotRegularFile",
        "paths/8": "MissingImage"}
    assert "'img/missing.jpg'" in errors["paths/5"]["message"]
    assert "data.follow_links=true" in errors["paths/6"]["message"]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert sum(unit["rows"] + unit["errors"] for unit in manifest["units"].values()) == 9 + 5
    again = run_composed(*args)  # the rerun finds every unit done and reads nothing again
    assert (again.images, again.errors, again.shards_written) == (0, 0, 0)


def test_paths_that_leave_the_folder_are_error_rows_unless_follow_links(tmp_path):
    rng = np.random.default_rng(1)
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    inside, elsewhere = encode(rng), encode(rng)
    (data / "in.jpg").write_bytes(inside)
    (outside / "x.jpg").write_bytes(elsewhere)
    (outside / "secret.jpg").write_bytes(SECRET.encode())
    os.symlink(outside / "secret.jpg", data / "link.jpg")  # inside by name, outside by target
    os.symlink("in.jpg", data / "alias.jpg")  # a link that stays inside: followed
    cells = [(None, "in.jpg"), (None, "../outside/x.jpg"), (None, str(outside / "x.jpg")), (None, "link.jpg"),
             (None, "alias.jpg"), (None, "sub/../in.jpg"), (None, str(data / "in.jpg")), (None, "/etc/passwd")]
    write_cells(data / "p.parquet", cells)
    cfg = DataConfig(format="parquet", shards=str(data / "p.parquet"))
    samples = samples_of(cfg)
    assert outcome(samples) == [("p/0", None), ("p/1", "PathOutsideRoot"), ("p/2", "PathOutsideRoot"),
                                ("p/3", "PathOutsideRoot"), ("p/4", None), ("p/5", "FileNotFoundError"),
                                ("p/6", None), ("p/7", "PathOutsideRoot")]
    assert [samples[row].payload for row in (0, 4, 6)] == [inside] * 3
    for row, named in ((1, "'../outside/x.jpg'"), (2, repr(str(outside / "x.jpg"))), (3, "'link.jpg'")):
        message = samples[row].error[2]
        assert named in message and "data.follow_links=true" in message and "embed" in message, message
    assert_clean(samples)
    followed = samples_of(DataConfig(format="parquet", shards=str(data / "p.parquet"), follow_links=True))
    assert outcome(followed) == [("p/0", None), ("p/1", None), ("p/2", None), ("p/3", None), ("p/4", None),
                                 ("p/5", "FileNotFoundError"), ("p/6", None), ("p/7", None)]
    assert [followed[row].payload for row in (1, 2, 3)] == [elsewhere, elsewhere, SECRET.encode()]
    # the Parquet file reached through a linked folder: its paths are read from that folder
    os.symlink(data, tmp_path / "data-link")
    linked = samples_of(DataConfig(format="parquet", shards=str(tmp_path / "data-link" / "p.parquet")))
    assert outcome(linked) == outcome(samples)


def test_directories_fifos_devices_and_missing_files_are_error_rows(tmp_path):
    rng = np.random.default_rng(2)
    data = tmp_path / "data"
    (data / "folder.jpg").mkdir(parents=True)
    (data / "ok.jpg").write_bytes(encode(rng))
    os.mkfifo(data / "pipe.jpg")
    os.symlink("/dev/zero", data / "zero.jpg")
    os.symlink("gone.jpg", data / "broken.jpg")
    cells = [(None, "folder.jpg"), (None, "pipe.jpg"), (None, "zero.jpg"), (None, "missing.jpg"),
             (None, "broken.jpg"), (None, ""), (None, None), (b"", None), (None, "ok.jpg"), (None, "a\0b.jpg"),
             (None, "x" * 5000 + ".jpg")]
    write_cells(data / "p.parquet", cells)
    release_fifo_after(data / "pipe.jpg", 5)
    started = time.monotonic()
    samples = samples_of(DataConfig(format="parquet", shards=str(data / "p.parquet"), follow_links=True))
    assert time.monotonic() - started < 4  # nothing waited for a writer
    assert outcome(samples) == [
        ("p/0", "NotRegularFile"), ("p/1", "NotRegularFile"), ("p/2", "NotRegularFile"),
        ("p/3", "FileNotFoundError"), ("p/4", "FileNotFoundError"), ("p/5", "MissingImage"), ("p/6", "MissingImage"),
        ("p/7", "MissingImage"), ("p/8", None), ("p/9", "ValueError"), ("p/10", "ValueError")]
    messages = [sample.error[2] if sample.error else None for sample in samples]
    assert "'folder.jpg'" in messages[0] and "directory" in messages[0]
    assert "'pipe.jpg'" in messages[1] and "FIFO" in messages[1]
    assert "'zero.jpg'" in messages[2] and "character device" in messages[2]
    assert "'missing.jpg'" in messages[3] and str(data / "missing.jpg") in messages[3] and "embed" in messages[3]
    assert len(messages[10]) < 1000  # a hostile path is not repeated whole
    assert_clean(samples)
    # without follow_links the link to /dev/zero is refused before its type is even looked at
    refused = samples_of(DataConfig(format="parquet", shards=str(data / "p.parquet")))
    assert outcome(refused)[2] == ("p/2", "PathOutsideRoot")


def test_files_over_max_bytes_are_error_rows_without_being_read(tmp_path):
    rng = np.random.default_rng(3)
    data = tmp_path / "data"
    data.mkdir()
    small = encode(rng, "PNG", size=(2, 2))
    (data / "small.png").write_bytes(small)
    (data / "big.jpg").write_bytes(encode(rng, size=(64, 64)))
    with open(data / "sparse.jpg", "wb") as handle:
        handle.truncate(1 << 40)  # a terabyte that occupies no disk; reading it cannot succeed
    write_cells(data / "p.parquet", [(None, "sparse.jpg"), (None, "small.png"), (None, "big.jpg")])
    samples = samples_of(DataConfig(format="parquet", shards=str(data / "p.parquet")))
    assert outcome(samples) == [("p/0", "TooLarge"), ("p/1", None), ("p/2", None)]
    message = samples[0].error[2]
    assert "'sparse.jpg'" in message and f"{1 << 40} bytes" in message and "data.max_bytes=268435456" in message
    limited = samples_of(DataConfig(format="parquet", shards=str(data / "p.parquet"), max_bytes=len(small)))
    assert outcome(limited) == [("p/0", "TooLarge"), ("p/1", None), ("p/2", "TooLarge")]
    assert limited[1].payload == small  # exactly the limit: read


def test_split_reads_and_the_device_decode_path_see_the_same_samples(tmp_path):
    """Units cut at row groups read every row once; path-read JPEGs go to the device decoder like
    embedded ones (the loader ships the reader's payloads), bad rows stay error rows."""
    rng = np.random.default_rng(4)
    data = tmp_path / "data"
    data.mkdir()
    cells = []
    for row in range(7):
        (data / f"{row}.jpg").write_bytes(encode(rng, size=(40, 40)))
        cells.append((None, f"{row}.jpg" if row != 3 else "nope.jpg"))
    write_cells(data / "p.parquet", cells, row_group_size=2)
    cfg = DataConfig(format="parquet", shards=str(data / "p.parquet"), unit_size=2, resize=32, crop=32)
    whole, split = samples_of(cfg), samples_of(cfg, in_units=True)
    assert len(list_units(list_shards(cfg), cfg.unit_size)) > 1
    assert outcome(whole) == outcome(split) == [(f"p/{row}", "FileNotFoundError" if row == 3 else None)
                                                for row in range(7)]
    batches = list(ShardBatches(list_shards(cfg), cfg, device_decode=True))
    assert sum(len(batch.payloads) for batch in batches) == 6
    assert [error[0] for batch in batches for error in batch.errors] == ["p/3"]


def test_binary_paths_names_that_are_not_utf8_and_structs_without_bytes(tmp_path):
    """Paths as bytes reach the file system as they are; a struct with only a `path` field reads
    it too; messages stay one line of UTF-8 whatever bytes the path holds."""
    rng = np.random.default_rng(5)
    data = tmp_path / "data"
    data.mkdir()
    image = encode(rng)
    (data / os.fsdecode(b"caf\xe9.jpg")).write_bytes(image)  # Latin-1 bytes on a disk that keeps bytes
    binary_paths = pa.array([{"bytes": None, "path": b"caf\xe9.jpg"}, {"bytes": None, "path": b"gone\xff\n.jpg"}],
                            pa.struct([("bytes", pa.binary()), ("path", pa.binary())]))
    only_paths = pa.array([{"path": "caf\u00e9.jpg"}, {"path": "x.jpg"}],
                          pa.struct([("path", pa.string())]))
    pq.write_table(pa.table({"image": binary_paths, "label": [0, 1]}), data / "a.parquet")
    pq.write_table(pa.table({"image": only_paths, "label": [0, 1]}), data / "b.parquet")
    (data / "x.jpg").write_bytes(image)
    samples = samples_of(DataConfig(format="parquet", shards=str(data / "*.parquet")))
    assert outcome(samples) == [("a/0", None), ("a/1", "FileNotFoundError"), ("b/0", "FileNotFoundError"),
                                ("b/1", None)]  # b/0 names the UTF-8 spelling, which is another name
    assert samples[0].payload == samples[3].payload == image
    assert "'gone\\udcff\\n.jpg'" in samples[1].error[2]
    assert_clean(samples)
