"""Poison records: a bad value in one record is that record's error row, never the shard's, and
never a crash, a giant allocation or a row lost or duplicated. Readers are checked directly
(every sample once, the same whether a shard is read whole or in units), the bombs in a child
process whose peak memory is measured, and whole runs end to end with a rerun."""

import gzip
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from cli_helpers import TINY_RESNET, merged, read_cams, run_composed
from gradcam_batch.config import DataConfig
from gradcam_batch.data.readers import iter_samples
from gradcam_batch.data.shards import list_shards
from gradcam_batch.data.units import list_units
from sample_data import (add_member, add_special, big_member_tar, big_member_tar_gz, encode, tar_blocks,
                         write_parquet_columns, write_tar)

SECRET = "SECRET-CONTENT"  # planted in poison values: no error message may repeat it
GIB = 1 << 30
TWO_GB = 2 * 10**9


def view(sample):
    """(sample id, label, error type or None) of a sample; the payload must exist exactly when
    there is no error."""
    assert (sample.payload is not None) == (sample.error is None), sample
    return sample.sample_id, sample.label, sample.error[1] if sample.error else None


def read(cfg: DataConfig):
    return [view(s) for shard in list_shards(cfg) for s in iter_samples(shard, cfg)]


def read_in_units(cfg: DataConfig):
    return [view(s) for unit in list_units(list_shards(cfg), cfg.unit_size) for s in iter_samples(unit, cfg)]


def errors_of(out: Path) -> list[dict]:
    return ds.dataset(out / "errors", format="parquet").to_table().to_pylist() if (out / "errors").exists() else []


def assert_clean_messages(samples):
    for sample in samples:
        if sample.error is not None:
            assert SECRET not in sample.error[2], sample.error
            sample.error[2].encode("utf-8")  # writable as Parquet strings


# --- Parquet --------------------------------------------------------------------------------

LABEL_CASES = {
    # name: (label column type, the value at row 2, the other rows' value for row i or None)
    "nan": (pa.float64(), float("nan"), float),  # an int column with a gap, as pandas writes it
    "string": (pa.string(), SECRET, str),
    "list": (pa.list_(pa.int64()), [1, 2], None),
    "1e30": (pa.float64(), 1e30, float),
    "negative": (pa.int64(), -3, int),
    "bool": (pa.bool_(), True, None),
    "past int64": (pa.uint64(), 2**63, int),
    "fraction": (pa.float64(), 2.5, float),
}


@pytest.mark.parametrize("case", LABEL_CASES)
def test_parquet_bad_label_is_that_rows_error_row(tmp_path, case):
    column_type, poison, other = LABEL_CASES[case]
    rng = np.random.default_rng(0)
    labels = [poison if row == 2 else (other(row) if other else None) for row in range(10)]
    write_parquet_columns(tmp_path / "p.parquet", {"image": [encode(rng) for _ in range(10)],
                                                   "label": pa.array(labels, column_type)})
    cfg = DataConfig(format="parquet", shards=str(tmp_path / "p.parquet"))
    samples = [s for shard in list_shards(cfg) for s in iter_samples(shard, cfg)]
    assert [view(s) for s in samples] == [
        (f"p/{row}", -1, "ValueError") if row == 2 else (f"p/{row}", row if other else -1, None) for row in range(10)]
    assert_clean_messages(samples)


IMAGE_CASES = {
    "string": pa.array([SECRET] * 3, pa.string()),
    "struct of strings": pa.array([{"bytes": SECRET}] * 3, pa.struct([("bytes", pa.string())])),
    "int64": pa.array([5, 10**12, 7], pa.int64()),  # bytes(10**12) would allocate a terabyte
    "list": pa.array([[SECRET.encode()]] * 3, pa.list_(pa.binary())),
    "null": pa.array([None] * 3, pa.null()),
}


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_parquet_image_column_of_another_type_gives_an_error_row_per_row(tmp_path, case):
    write_parquet_columns(tmp_path / "p.parquet", {"image": IMAGE_CASES[case], "label": [1, 2, 3]})
    cfg = DataConfig(format="parquet", shards=str(tmp_path / "p.parquet"))
    samples = [s for shard in list_shards(cfg) for s in iter_samples(shard, cfg)]
    expected_type = "MissingImage" if case == "null" else "UnsupportedImageColumn"
    assert [view(s) for s in samples] == [(f"p/{row}", row + 1, expected_type) for row in range(3)]
    assert_clean_messages(samples)


def test_parquet_cell_larger_than_max_bytes_is_an_error_row(tmp_path):
    rng = np.random.default_rng(1)
    images = [encode(rng), SECRET.encode() * 2000, encode(rng)]
    structs = pa.array([{"bytes": image, "path": None} for image in images],
                       pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    write_parquet_columns(tmp_path / "plain.parquet", {"image": images, "label": [0, 1, 2]})
    write_parquet_columns(tmp_path / "struct.parquet", {"image": structs, "label": [0, 1, 2]})
    cfg = DataConfig(format="parquet", shards=str(tmp_path / "*.parquet"), max_bytes=10_000)
    samples = [s for shard in list_shards(cfg) for s in iter_samples(shard, cfg)]
    assert [view(s) for s in samples] == [
        (f"{stem}/{row}", row, "TooLarge" if row == 1 else None) for stem in ("plain", "struct") for row in range(3)]
    assert_clean_messages(samples)


def test_parquet_names_and_ids_with_undecodable_bytes_give_distinct_utf8_ids(tmp_path):
    rng = np.random.default_rng(2)
    write_parquet_columns(tmp_path / "p.parquet", {"image": [encode(rng)], "label": [0]})
    os.rename(tmp_path / "p.parquet", tmp_path / "p\udcff.parquet")  # the file name holds the byte 0xff
    write_parquet_columns(tmp_path / "o.parquet", {"image": [encode(rng)], "label": [0]})  # listing checks this one
    write_parquet_columns(tmp_path / "q.parquet", {"image": [encode(rng)] * 3, "label": [0, 1, 2],
                                                   "key": pa.array([b"id\xff", b"id\\xff", b"plain"], pa.binary())})
    samples = read(DataConfig(format="parquet", shards=f"{tmp_path}/o.parquet,{tmp_path}/p*.parquet"))
    samples += read(DataConfig(format="parquet", shards=str(tmp_path / "q.parquet"), id_column="key"))
    ids = [sample_id for sample_id, _, _ in samples]
    assert ids == ["o/0", "p\\xff/0", "id\\xff", "id\\\\xff", "plain"]
    for sample_id in ids:
        sample_id.encode("utf-8")


def test_parquet_poison_rows_end_to_end_and_rerun(tmp_path):
    rng = np.random.default_rng(3)
    data = tmp_path / "pq"
    data.mkdir()
    labels = [float(row) for row in range(10)]
    labels[2] = float("nan")
    write_parquet_columns(data / "a-nan.parquet", {"image": [encode(rng) for _ in range(10)], "label": labels})
    write_parquet_columns(data / "b-ints.parquet", {"image": pa.array([5, 10**12], pa.int64()), "label": [0, 1]})
    write_parquet_columns(data / "c-list.parquet", {"image": [encode(rng) for _ in range(4)],
                                                    "label": pa.array([None, [1], None, None], pa.list_(pa.int64()))})
    write_parquet_columns(data / "d.parquet", {"image": [encode(rng)], "label": [4]})
    os.rename(data / "d.parquet", data / "d\udcff.parquet")  # the file name holds the byte 0xff
    out = tmp_path / "out"
    args = [*TINY_RESNET, "data=parquet", f"data.shards={data}/*.parquet", f"output.dir={out}"]
    summary = run_composed(*args)
    assert (summary.images, summary.errors) == (9 + 3 + 1, 1 + 2 + 1)
    errors = sorted((e["sample_id"], e["error_type"]) for e in errors_of(out))
    assert errors == [("a-nan/2", "ValueError"), ("b-ints/0", "UnsupportedImageColumn"),
                      ("b-ints/1", "UnsupportedImageColumn"), ("c-list/1", "ValueError")]
    ids = read_cams(out)["sample_id"].to_pylist()
    assert sorted(ids) == sorted([f"a-nan/{r}" for r in range(10) if r != 2] + ["c-list/0", "c-list/2", "c-list/3",
                                                                                  "d\\xff/0"])
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert sum(c["rows"] + c["errors"] for c in manifest["units"].values()) == 10 + 2 + 4 + 1
    again = run_composed(*args)  # the rerun finds every unit done and reads nothing again
    assert (again.images, again.errors, again.shards_written) == (0, 0, 0)
    assert sorted(read_cams(out)["sample_id"].to_pylist()) == sorted(ids)


# --- WebDataset tars: labels, metadata, names --------------------------------------------------

GOOD_CLS = {b"12": 12, b" 12 ": 12, b"12\n": 12, b"007": 7, b"0": 0, b"9223372036854775807": 2**63 - 1}
BAD_CLS = [b"99999999999999999999", b"9223372036854775808", b"-3", b"+5", b"1_0", "\u0661\u0662".encode(),
           "\uff11\uff12".encode(), b"1.5", b"1e3", b"0x10", b"1 2", b"", SECRET.encode(), b"\xff"]


@pytest.mark.parametrize("text", [*GOOD_CLS, *BAD_CLS], ids=repr)
def test_cls_is_a_label_only_as_plain_ascii_digits_within_int64(tmp_path, text):
    rng = np.random.default_rng(4)
    write_tar(tmp_path / "a.tar", [("a.jpg", encode(rng)), ("a.cls", text), ("b.jpg", encode(rng)), ("b.cls", b"3")])
    cfg = DataConfig(format="webdataset", shards=str(tmp_path / "a.tar"))
    samples = [s for shard in list_shards(cfg) for s in iter_samples(shard, cfg)]
    first = ("a", GOOD_CLS[text], None) if text in GOOD_CLS else ("a", -1, "ValueError")
    assert [view(s) for s in samples] == [first, ("b", 3, None)]
    assert_clean_messages(samples)


def test_deeply_nested_or_oversized_json_is_that_samples_error_row(tmp_path):
    rng = np.random.default_rng(5)
    write_tar(tmp_path / "a.tar", [
        ("deep.jpg", encode(rng)), ("deep.json", b"[" * 200_000 + b"]" * 200_000),
        ("big.jpg", encode(rng)), ("big.json", json.dumps({"pad": SECRET * 100_000}).encode()),  # > 1 MiB
        ("bad.jpg", encode(rng)), ("bad.json", b'{"box": ' + SECRET.encode()),
        ("ok.jpg", encode(rng)), ("ok.json", b'{"index": 1}')])
    cfg = DataConfig(format="webdataset", shards=str(tmp_path / "a.tar"))
    samples = [s for shard in list_shards(cfg) for s in iter_samples(shard, cfg)]
    assert [view(s) for s in samples] == [("deep", -1, "RecursionError"), ("big", -1, "TooLarge"),
                                          ("bad", -1, "JSONDecodeError"), ("ok", -1, None)]
    assert samples[-1].meta == {"index": 1}
    assert_clean_messages(samples)


def test_member_names_with_undecodable_bytes_give_distinct_utf8_ids(tmp_path):
    rng = np.random.default_rng(6)
    names = ["a\udcff", "a\\xff", "\udcfe\udcff", "caf\udcc3\udca9", "dir\udc80/k"]  # \udcXX: the raw byte XX
    write_tar(tmp_path / "gnu.tar", [(f"{name}.jpg", encode(rng)) for name in names],
              format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape")
    write_tar(tmp_path / "pax.tar", [("p\udcff" + "x" * 120 + ".jpg", encode(rng))],  # binary pax path record
              format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")
    ids = [sample_id for sample_id, _, error in read(DataConfig(format="webdataset", shards=str(tmp_path / "*.tar")))
           if error is None]
    assert ids == ["a\\xff", "a\\\\xff", "\\xfe\\xff", "caf\u00e9", "dir\\x80/k", "p\\xff" + "x" * 120]
    for sample_id in ids:
        sample_id.encode("utf-8")


# --- WebDataset tars: keys, member types, sizes ----------------------------------------------

@pytest.mark.parametrize("unit_size", [1, 2, 3, 100])
def test_repeated_key_is_a_duplicate_error_row_in_whole_and_split_reads(tmp_path, unit_size):
    rng = np.random.default_rng(7)
    write_tar(tmp_path / "a.tar", [("a.jpg", encode(rng)), ("a.cls", b"1"), ("b.jpg", encode(rng)),
                                   ("a.jpg", encode(rng)), ("a.cls", b"2"), ("c.jpg", encode(rng)),
                                   ("b.jpg", encode(rng)), ("a.jpg", encode(rng))])
    cfg = DataConfig(format="webdataset", shards=str(tmp_path / "a.tar"), unit_size=unit_size)
    expected = [("a", 1, None), ("b", -1, None), ("a", -1, "DuplicateKey"), ("c", -1, None),
                ("b", -1, "DuplicateKey"), ("a", -1, "DuplicateKey")]
    assert read_in_units(cfg) == read(cfg) == expected


def non_regular_tar(path: Path, rng) -> list[tuple[str, int, str | None]]:
    """Every member type tarfile knows besides regular files; returns the expected samples."""
    with tarfile.open(path, "w") as tar:
        add_member(tar, "k0.jpg", encode(rng))
        add_special(tar, "dirs", tarfile.DIRTYPE)  # no extension the reader reads: skipped
        add_member(tar, "k0.cls", b"0")
        add_special(tar, "s.jpg", tarfile.SYMTYPE, "/etc/shadow")
        add_member(tar, "k1.jpg", encode(rng))
        add_special(tar, "k1.cls", tarfile.SYMTYPE, "k0.cls")
        add_special(tar, "h.jpg", tarfile.LNKTYPE, "k0.jpg")
        add_special(tar, "f.png", tarfile.FIFOTYPE)
        add_special(tar, "c.webp", tarfile.CHRTYPE)
        add_special(tar, "b.jpeg", tarfile.BLKTYPE)
        add_special(tar, "links/x", tarfile.SYMTYPE, "/")  # no extension the reader reads: skipped
        add_member(tar, "k2.jpg", encode(rng))
        add_special(tar, "d.jpg", tarfile.DIRTYPE)
        add_member(tar, "k3.jpg", encode(rng))
    return [("k0", 0, None), ("s", -1, "NotRegularFile"), ("k1", -1, "NotRegularFile"), ("h", -1, "NotRegularFile"),
            ("f", -1, "NotRegularFile"), ("c", -1, "NotRegularFile"), ("b", -1, "NotRegularFile"), ("k2", -1, None),
            ("d", -1, "NotRegularFile"), ("k3", -1, None)]


@pytest.mark.parametrize("unit_size", [1, 2, 3, 100])
def test_members_that_are_not_regular_files_are_error_rows(tmp_path, unit_size):
    expected = non_regular_tar(tmp_path / "a.tar", np.random.default_rng(8))
    cfg = DataConfig(format="webdataset", shards=str(tmp_path / "a.tar"), unit_size=unit_size)
    assert read_in_units(cfg) == read(cfg) == expected
    assert len(list_units(list_shards(cfg), cfg.unit_size)) == -(-len(expected) // unit_size)  # the index agrees
    samples = [s for shard in list_shards(cfg) for s in iter_samples(shard, cfg)]
    assert all("not a regular file" in s.error[2] for s in samples if s.error)


def test_member_larger_than_max_bytes_is_refused(tmp_path):
    rng = np.random.default_rng(9)
    write_tar(tmp_path / "a.tar", [("a.jpg", encode(rng)), ("b.jpg", SECRET.encode() * 2000), ("b.cls", b"1"),
                                   ("c.jpg", encode(rng)), ("c.json", b" " * 20_000 + b"{}")])
    cfg = DataConfig(format="webdataset", shards=str(tmp_path / "a.tar"), max_bytes=10_000)
    samples = [s for shard in list_shards(cfg) for s in iter_samples(shard, cfg)]
    assert [view(s) for s in samples] == [("a", -1, None), ("b", -1, "TooLarge"), ("c", -1, "TooLarge")]
    assert_clean_messages(samples)


CHILD_READER = """
import json, resource, sys
def peak_rss():
    # VmHWM: this process's own peak; ru_maxrss would also count the forking parent's RSS, which
    # Linux carries across exec
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
from gradcam_batch.config import DataConfig
from gradcam_batch.data.readers import iter_samples
from gradcam_batch.data.shards import list_shards
from gradcam_batch.data.units import list_units

def virtual_size():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))

# a reader that still held the bomb in memory would fail here, not take the test machine with it
limit = virtual_size() + 5 * 2**29
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
cfg = DataConfig(format="webdataset", shards=sys.argv[1], unit_size=int(sys.argv[2]))
samples = [(s.sample_id, s.label, s.error[1] if s.error else None)
           for unit in list_units(list_shards(cfg), cfg.unit_size) for s in iter_samples(unit, cfg)]
print(json.dumps({"samples": samples, "peak_rss": peak_rss()}))
"""


def read_in_child(shards: Path, unit_size: int) -> tuple[list, int]:
    result = subprocess.run([sys.executable, "-c", CHILD_READER, str(shards), str(unit_size)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return [tuple(sample) for sample in report["samples"]], report["peak_rss"]


def bomb_members(rng):
    return [("a.jpg", encode(rng)), ("a.cls", b"1")], [("c.jpg", encode(rng)), ("c.cls", b"2")]


@pytest.mark.parametrize("unit_size", [1, 100])
def test_sparse_3_gib_member_is_refused_from_its_header_in_bounded_memory(tmp_path, unit_size):
    before, after = bomb_members(np.random.default_rng(10))
    big_member_tar(tmp_path / "sparse.tar", 3 * GIB, before, after, name="b.jpg")
    assert os.stat(tmp_path / "sparse.tar").st_blocks * 512 < 10 << 20  # a hole on disk, 3 GiB to read
    samples, peak = read_in_child(tmp_path / "sparse.tar", unit_size)
    assert samples == [("a", 1, None), ("b", -1, "TooLarge"), ("c", 2, None)]
    assert peak < TWO_GB, peak


@pytest.mark.slow  # inflating 3 GiB takes about 10 s
def test_gzip_tar_with_a_3_gib_member_is_read_through_in_bounded_memory(tmp_path):
    before, after = bomb_members(np.random.default_rng(11))
    big_member_tar_gz(tmp_path / "bomb.tar.gz", 3 * GIB, before, after, name="b.jpg")
    assert os.path.getsize(tmp_path / "bomb.tar.gz") < 4 << 20
    samples, peak = read_in_child(tmp_path / "bomb.tar.gz", 1)
    assert samples == [("a", 1, None), ("b", -1, "TooLarge"), ("c", 2, None)]
    assert peak < TWO_GB, peak


@pytest.mark.parametrize("codec", ["gz", "bz2", "xz"])
def test_compressed_tars_read_as_the_plain_tar(tmp_path, codec):
    """Compressed shards go through the codecs' own bounded readers, not tarfile's stream mode."""
    import bz2
    import lzma

    rng = np.random.default_rng(16)
    write_tar(tmp_path / "a.tar", [("a.jpg", encode(rng)), ("a.cls", b"4"), ("b.jpg", encode(rng)),
                                   ("b.json", b'{"box": [1, 2, 3, 4]}')])
    compress = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[codec]
    (tmp_path / f"z.tar.{codec}").write_bytes(compress((tmp_path / "a.tar").read_bytes()))
    plain = read(DataConfig(format="webdataset", shards=str(tmp_path / "a.tar")))
    assert read(DataConfig(format="webdataset", shards=str(tmp_path / f"z.tar.{codec}"))) == plain
    assert plain == [("a", 4, None), ("b", -1, None)]


def test_extended_header_claiming_gigabytes_in_a_compressed_tar_is_refused(tmp_path):
    bomb = tarfile.TarInfo("././@PaxHeader")
    bomb.type, bomb.size = tarfile.XHDTYPE, 3 * GIB  # tarfile reads an extended header whole
    opening = tar_blocks([("a.jpg", encode(np.random.default_rng(12)))])
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress(opening + bomb.tobuf(tarfile.GNU_FORMAT) + bytes(1 << 20)))
    samples, peak = read_in_child(tmp_path / "a.tar.gz", 100)
    # the sample before the break may lack members behind it: an error row too, never a guess
    assert samples == [("a", -1, "ReadError"), ("a.tar/<tar>", -1, "ReadError")]
    assert peak < TWO_GB, peak


def test_damaged_compressed_stream_is_an_error_row_without_contents(tmp_path):
    rng = np.random.default_rng(13)
    whole = tar_blocks([("a.jpg", encode(rng)), ("b.jpg", encode(rng))])
    cut = len(whole) - 512  # inside b.jpg's data
    (tmp_path / "b.tar.gz").write_bytes(gzip.compress(whole[:cut]) + b"QZ" + SECRET.encode())  # not a gzip member
    cfg = DataConfig(format="webdataset", shards=str(tmp_path / "b.tar.gz"))
    samples = [s for shard in list_shards(cfg) for s in iter_samples(shard, cfg)]
    assert [view(s) for s in samples] == [("a", -1, None), ("b", -1, "BadGzipFile"), ("b.tar/<tar>", -1, "BadGzipFile")]
    for sample in samples[1:]:
        assert "QZ" not in sample.error[2] and SECRET not in sample.error[2], sample.error


# --- whole runs -------------------------------------------------------------------------------

def poison_tar(path: Path, rng) -> tuple[list[str], dict[str, str]]:
    """One tar with every poison record; returns (sample ids that become rows, {error id: type})."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for name, payload in [("ok0.jpg", encode(rng)), ("ok0.cls", b"1"),
                              ("overflow.jpg", encode(rng)), ("overflow.cls", b"99999999999999999999"),
                              ("negative.jpg", encode(rng)), ("negative.cls", b"-1"),
                              ("underscore.jpg", encode(rng)), ("underscore.cls", b"1_0"),
                              ("arabic.jpg", encode(rng)), ("arabic.cls", "\u0661\u0662".encode()),
                              ("nested.jpg", encode(rng)), ("nested.json", b"[" * 200_000 + b"]" * 200_000),
                              ("bad\udcff.jpg", encode(rng)), ("bad\udcff.cls", b"2"),
                              ("huge.jpg", bytes(600_000)),
                              ("ok1.jpg", encode(rng)),
                              ("ok0.jpg", encode(rng))]:  # ok0 again, after other samples
            add_member(tar, name, payload)
        add_special(tar, "link.jpg", tarfile.SYMTYPE, "/etc/shadow")
        add_special(tar, "fifo.jpg", tarfile.FIFOTYPE)
        add_special(tar, "folder", tarfile.DIRTYPE)
        add_member(tar, "ok2.jpg", encode(rng))
    rows = ["ok0", "bad\\xff", "ok1", "ok2"]
    errors = {"overflow": "ValueError", "negative": "ValueError", "underscore": "ValueError", "arabic": "ValueError",
              "nested": "RecursionError", "huge": "TooLarge", "ok0": "DuplicateKey", "link": "NotRegularFile",
              "fifo": "NotRegularFile"}
    return rows, errors


@pytest.mark.parametrize("unit_size", [3, 1000])
def test_poison_tar_end_to_end_every_sample_once_and_rerun(tmp_path, unit_size):
    data = tmp_path / "wds"
    data.mkdir()
    rows, errors = poison_tar(data / "poison.tar", np.random.default_rng(14))
    out = tmp_path / "out"
    args = [*TINY_RESNET, "data=webdataset", f"data.shards={data}/*.tar", f"data.unit_size={unit_size}",
            "data.max_bytes=500000", f"output.dir={out}"]
    summary = run_composed(*args)
    assert (summary.images, summary.errors) == (len(rows), len(errors))
    ids = read_cams(out)["sample_id"].to_pylist()
    assert sorted(ids) == sorted(rows) and len(ids) == len(set(ids))
    written = errors_of(out)
    assert sorted((e["sample_id"], e["error_type"]) for e in written) == sorted(errors.items())
    assert all(SECRET not in e["message"] for e in written)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert sum(c["rows"] + c["errors"] for c in manifest["units"].values()) == len(rows) + len(errors)
    again = run_composed(*args)
    assert (again.images, again.errors, again.shards_written) == (0, 0, 0)


CHILD_RUN = """
import resource, subprocess, sys
result = subprocess.run([sys.executable, "-m", "gradcam_batch", *sys.argv[1:]])
print(result.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


@pytest.mark.slow  # two runs of the command line, one inflating 3 GiB
def test_bombs_end_to_end_under_2_gb_and_rerun(tmp_path):
    data = tmp_path / "wds"
    data.mkdir()
    before, after = bomb_members(np.random.default_rng(15))
    big_member_tar(data / "sparse.tar", 3 * GIB, before, after, name="b.jpg")
    big_member_tar_gz(data / "zipped.tar.gz", 3 * GIB, before, after, name="b.jpg")
    out = tmp_path / "out"
    args = merged(*TINY_RESNET, "data=webdataset", f"data.shards={data}/*.tar*", "data.num_workers=2",
                  "data.unit_size=1", f"output.dir={out}")
    for attempt in ("first", "rerun"):
        result = subprocess.run([sys.executable, "-c", CHILD_RUN, *args], capture_output=True, text=True,
                                timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        code, peak = map(int, result.stdout.strip().splitlines()[-1].split())
        assert code == 0, (attempt, result.stderr[-3000:])
        assert peak < TWO_GB, (attempt, peak)
    assert sorted(read_cams(out)["sample_id"].to_pylist()) == ["a", "a", "c", "c"]
    assert sorted((e["shard"], e["sample_id"], e["error_type"]) for e in errors_of(out)) == [
        ("sparse", "b", "TooLarge"), ("zipped.tar", "b", "TooLarge")]
