"""Small files that would make a reader allocate gigabytes (issue 18): Parquet cells whose encoding
multiplies their bytes (a dictionary value repeated in every row, a page of kilobytes holding
gigabytes, run-length encoded lists of a hundred thousand boxes), WebDataset samples with an
image member of every kind, and metadata numbers too long for a float. Each reader is measured in
a child process (VmHWM, as in test_poison_records), and every row is asserted: each record comes
out once, as a row or as its own error row."""

import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradcam_batch.config import DataConfig
from gradcam_batch.data import transforms
from gradcam_batch.data.loader import ShardBatches
from gradcam_batch.data.readers import iter_samples
from gradcam_batch.data.records import BOXES_READ
from gradcam_batch.data.shards import list_shards
from gradcam_batch.data.parquet_plan import READ_BUDGET
from gradcam_batch.data.units import list_units
from sample_data import add_member, encode, write_tar

MIB = 1 << 20
TWO_GB = 2 * 10**9
# What one reader may add to its process while it reads a shard: a batch under READ_BUDGET, the
# page it comes from and the one cell handed on. Two workers and the main process must stay
# under the README's 2 GB.
READER_GROWTH_LIMIT = 3 * READ_BUDGET

CHILD = """
import json, logging, resource, sys
def peak_rss():
    # VmHWM: this process's own peak; ru_maxrss would also count the forking parent's RSS
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
def virtual_size():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
from gradcam_batch.config import DataConfig
from gradcam_batch.data.readers import iter_samples
from gradcam_batch.data.shards import list_shards
from gradcam_batch.data.units import list_units

logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="WARNING %(message)s")
# a reader that held the bomb would fail here in a second, not take the test machine with it
limit = virtual_size() + 3 * 2**30
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
cfg = DataConfig(**json.loads(sys.argv[1]))
before = peak_rss()
samples = []
for unit in list_units(list_shards(cfg), cfg.unit_size):
    for s in iter_samples(unit, cfg):
        boxes = (s.meta or {}).get("boxes")
        samples.append([s.sample_id, s.label, s.error[1] if s.error else None,
                        None if s.payload is None else len(s.payload), None if boxes is None else len(boxes)])
print(json.dumps({"samples": samples, "before": before, "peak": peak_rss()}))
"""


def read_in_child(**config) -> tuple[list[tuple], int, int, str]:
    """(samples as (id, label, error type, payload length, box count), peak RSS, growth while
    reading, stderr) of reading the shards in a fresh interpreter."""
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config)], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return [tuple(sample) for sample in report["samples"]], report["peak"], report["peak"] - report["before"], \
        result.stderr


def assert_bounded(peak: int, growth: int) -> None:
    assert peak < TWO_GB, f"{peak / 2**30:.2f} GiB"
    assert growth < READER_GROWTH_LIMIT, f"reading took {growth / MIB:.0f} MiB"


def shared(value: bytes, rows: int) -> pa.ChunkedArray:
    """`rows` cells of one value whose bytes are held once (the writer flushes a page per chunk)."""
    cell = pa.array([value], pa.binary())
    return pa.chunked_array([cell] * rows)


# --- Parquet boxes -----------------------------------------------------------------------------

def test_boxes_read_are_the_same_as_the_loader_keeps():
    assert BOXES_READ == transforms.MAX_BOXES


def test_parquet_boxes_are_cut_to_the_first_64_in_arrow(tmp_path):
    """A cell of 40,000 boxes keeps its first 64, exactly those the loader reads; a box of
    100,000 numbers is cut to 5 (still no box); nulls and small cells are as they were."""
    rng = np.random.default_rng(0)
    many = [[float(i), float(i), i + 1.0, i + 1.0] for i in range(40_000)]
    cells = [many, [[1.0, 2.0, 3.0, 4.0]] * 3, None, [[float(v) for v in range(100_000)], [5.0, 6.0, 7.0, 8.0]], []]
    pq.write_table(pa.table({"image": [encode(rng) for _ in cells], "label": list(range(len(cells))),
                             "boxes": pa.array(cells, pa.list_(pa.list_(pa.float64())))}), tmp_path / "b.parquet")
    one_box = [[1.0, 2.0, 3.0, 4.0], [float(v) for v in range(100_000)], None]
    pq.write_table(pa.table({"image": [encode(rng) for _ in one_box],
                             "boxes": pa.array(one_box, pa.list_(pa.float32()))}), tmp_path / "c.parquet")
    cfg = DataConfig(format="parquet", shards=str(tmp_path / "*.parquet"))
    samples = [s for shard in list_shards(cfg) for s in iter_samples(shard, cfg)]
    assert [(s.sample_id, s.error) for s in samples] == [(f"b/{row}", None) for row in range(5)] + [
        (f"c/{row}", None) for row in range(3)]
    metas = [s.meta for s in samples]
    assert metas[0] == {"boxes": many[:64]}
    assert metas[1] == {"boxes": [[1.0, 2.0, 3.0, 4.0]] * 3}
    assert metas[2] is None
    assert metas[3] == {"boxes": [[0.0, 1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]}
    assert metas[4] == {"boxes": []}
    assert metas[5:] == [{"boxes": [1.0, 2.0, 3.0, 4.0]}, {"boxes": [float(v) for v in range(64)]}, None]
    assert [transforms.boxes_from_meta(meta) for meta in metas] == [
        many[:64], [[1.0, 2.0, 3.0, 4.0]] * 3, None, [[5.0, 6.0, 7.0, 8.0]], None, [[1.0, 2.0, 3.0, 4.0]], None, None]


@pytest.mark.slow  # 10-15 s: writing and reading 40 or 100 million list elements
@pytest.mark.parametrize("boxes", [40_000, 100_000])
def test_parquet_cells_of_100000_boxes_read_in_bounded_memory(tmp_path, boxes):
    """The issue's files: 256 rows of 40,000 (0.14 MiB, 3.3 GB before) or 100,000 boxes
    (MemoryError before, on every rerun). Every row is read; a row group whose lists could hold
    more than a reader decodes at once (one row might hold every value) keeps its rows and
    leaves its boxes unread, with a warning naming the column and the fix."""
    rng = np.random.default_rng(1)
    image = encode(rng)
    cells = pa.array([[[0.0, 0.0, 1.0, 1.0]] * boxes] * 256, pa.list_(pa.list_(pa.float64())))
    # a second row group of ordinary boxes keeps them
    pq.write_table(pa.table({"image": shared(image, 256), "label": list(range(256)), "boxes": cells}),
                   tmp_path / "a.parquet", compression="zstd")
    with pq.ParquetWriter(tmp_path / "b.parquet", pq.read_schema(tmp_path / "a.parquet")) as writer:
        writer.write_table(pq.read_table(tmp_path / "a.parquet"))
        writer.write_table(pa.table({"image": shared(image, 3), "label": [7, 8, 9],
                                     "boxes": pa.array([[[0.0, 0.0, 1.0, 1.0]] * 70] * 3, cells.type)}))
    assert os.path.getsize(tmp_path / "a.parquet") < 400_000
    samples, peak, growth, stderr = read_in_child(format="parquet", shards=str(tmp_path / "b.parquet"))
    assert samples == [(f"b/{row}", row, None, len(image), None) for row in range(256)] + [
        (f"b/{256 + row}", 7 + row, None, len(image), 64) for row in range(3)]
    assert_bounded(peak, growth)
    warnings = [line for line in stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "row group 0's boxes column holds" in warnings[0], stderr[-2000:]
    assert "read without boxes" in warnings[0]


# --- Parquet image cells under data.max_bytes whose batch is gigabytes ----------------------------

CELL = 6 * MIB  # each cell is under data.max_bytes; 256 of them are 1.5 GiB


def parquet_bomb(path: Path, case: str) -> tuple[list[tuple], dict]:
    """Writes one of the cases; returns (the expected samples, the DataConfig overrides)."""
    rng = np.random.default_rng(2)
    stem = path.stem
    if case == "dictionary pages":  # one value in the dictionary page, 256 rows naming it
        pq.write_table(pa.table({"image": shared(bytes(CELL), 256)}), path, compression="zstd",
                       dictionary_pagesize_limit=1 << 30)
        return [(f"{stem}/{row}", -1, None, CELL, None) for row in range(256)], {}
    if case == "dictionary type":  # a pyarrow DictionaryArray: read back as one
        column = pa.DictionaryArray.from_arrays(pa.array([0] * 256, pa.int32()), pa.array([bytes(CELL)]))
        pq.write_table(pa.table({"image": column}), path, compression="zstd")
        return [(f"{stem}/{row}", -1, None, CELL, None) for row in range(256)], {}
    if case == "dictionary type, distinct values":  # pyarrow decodes the row group's values whole, several times
        values = pa.array([bytes([index + 1]) * CELL for index in range(24)])
        column = pa.DictionaryArray.from_arrays(pa.array(list(range(24)) * 2, pa.int32()), values)
        pq.write_table(pa.table({"image": column}), path, compression="zstd")
        return [(f"{stem}/{row}", -1, "TooLarge", None, None) for row in range(48)], {}
    if case == "plain, a page per cell":  # real images and 6 MiB cells, each its own row
        images = [encode(rng) for _ in range(8)]
        chunks = [pa.array([images[index // 32]]) if index % 32 == 0 else pa.array([bytes(CELL)])
                  for index in range(256)]
        chunks[100] = pa.array([bytes(3 * CELL)])  # over data.max_bytes: its own error row
        pq.write_table(pa.table({"image": pa.chunked_array(chunks)}), path, compression="zstd",
                       use_dictionary=False)
        expected = [(f"{stem}/{row}", -1, None, len(images[row // 32]) if row % 32 == 0 else CELL, None)
                    for row in range(256)]
        expected[100] = (f"{stem}/100", -1, "TooLarge", None, None)
        return expected, {"max_bytes": 2 * CELL}
    if case == "plain, one page of all cells":
        # pyarrow checks the page size every 1024 values: 256 cells of 1 MiB make one page of
        # 256 MiB, past what a reader decompresses at once (the budget, or data.max_bytes); the
        # other row group's images still come out
        images = [encode(rng) for _ in range(4)]
        with pq.ParquetWriter(path, pa.schema([("image", pa.binary())]), compression="zstd",
                              use_dictionary=False) as writer:
            writer.write_table(pa.table({"image": pa.array(images)}))
            writer.write_table(pa.table({"image": pa.array([bytes(MIB)] * 256)}))
        return ([(f"{stem}/{row}", -1, None, len(images[row]), None) for row in range(4)]
                + [(f"{stem}/{row}", -1, "TooLarge", None, None) for row in range(4, 260)]), {"max_bytes": 2 * MIB}
    raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "dictionary pages", "dictionary type", "plain, one page of all cells",
    pytest.param("dictionary type, distinct values", marks=pytest.mark.slow),  # 8 s
    pytest.param("plain, a page per cell", marks=pytest.mark.slow),  # 14 s: 1.5 GiB decompressed a cell at a time
])
def test_parquet_cells_under_max_bytes_read_in_bounded_memory(tmp_path, case):
    """Before: the dictionary-page file peaked at 5 GB, the dictionary-typed one was one error
    row for the whole unit (the batch overflowed a binary array), the plain ones held 1.5 GiB and
    more. Now a batch is sized by bytes, and a row that cannot be read in bounded memory is its
    own TooLarge error row."""
    expected, overrides = parquet_bomb(tmp_path / "p.parquet", case)
    assert os.path.getsize(tmp_path / "p.parquet") < 1 << 20  # a few kilobytes that decode to gigabytes
    samples, peak, growth, _ = read_in_child(format="parquet", shards=str(tmp_path / "p.parquet"), **overrides)
    assert samples == expected
    assert_bounded(peak, growth)


def test_rows_past_a_page_too_large_are_error_rows_and_earlier_rows_are_read(tmp_path):
    """A row group whose first pages are ordinary and whose last page is over the limit: the rows
    before it are read (the reader stops at the page without decompressing it), each later row
    is its own error row, and the next row group reads as usual."""
    rng = np.random.default_rng(3)
    images = [encode(rng) for _ in range(6)]
    path = tmp_path / "p.parquet"
    with pq.ParquetWriter(path, pa.schema([("image", pa.binary()), ("label", pa.int64())]), compression="zstd",
                          use_dictionary=False, data_page_size=1) as writer:
        writer.write_table(pa.table({"image": pa.chunked_array([pa.array(images[:3]), pa.array([bytes(MIB)] * 200)]),
                                     "label": list(range(203))}))
        writer.write_table(pa.table({"image": pa.array(images[3:]), "label": [1, 2, 3]}))
    samples, peak, growth, _ = read_in_child(format="parquet", shards=str(path), max_bytes=MIB)
    assert samples == ([(f"p/{row}", row, None, len(images[row]), None) for row in range(3)]
                       + [(f"p/{row}", -1, "TooLarge", None, None) for row in range(3, 203)]  # not read: nor its label
                       + [(f"p/{203 + row}", 1 + row, None, len(images[3 + row]), None) for row in range(3)])
    assert_bounded(peak, growth)


# --- Parquet ids --------------------------------------------------------------------------------

def view(sample):
    assert (sample.payload is not None) == (sample.error is None), sample
    return sample.sample_id, sample.label, sample.error[1] if sample.error else None


def test_parquet_repeated_ids_are_duplicate_key_error_rows_within_and_across_units(tmp_path):
    """As for repeated tar keys: the first row with an id is read, each later one is a
    DuplicateKey error row, whether the earlier row is in the same unit or (with the listing
    given data.id_column) an earlier one. A null id's default `<stem>/<row>` counts too."""
    rng = np.random.default_rng(4)
    ids = ["a", "b", "a", None, "p/3", "c", "b", "d"]
    pq.write_table(pa.table({"image": [encode(rng) for _ in ids], "label": list(range(8)), "key": ids}),
                   tmp_path / "p.parquet", row_group_size=2)
    expected = [("a", 0, None), ("b", 1, None), ("a", 2, "DuplicateKey"), ("p/3", 3, None),
                ("p/3", 4, "DuplicateKey"), ("c", 5, None), ("b", 6, "DuplicateKey"), ("d", 7, None)]
    whole = DataConfig(format="parquet", shards=str(tmp_path / "p.parquet"), id_column="key")
    assert [view(s) for shard in list_shards(whole) for s in iter_samples(shard, whole)] == expected
    for unit_size in (2, 4):
        cfg = DataConfig(format="parquet", shards=str(tmp_path / "p.parquet"), id_column="key", unit_size=unit_size)
        units = list_units(list_shards(cfg), cfg.unit_size, id_column=cfg.id_column)
        assert len(units) == 8 // unit_size
        assert [view(s) for unit in units for s in iter_samples(unit, cfg)] == expected
    # without an id column, default ids never repeat
    plain = DataConfig(format="parquet", shards=str(tmp_path / "p.parquet"))
    assert [view(s)[2] for shard in list_shards(plain) for s in iter_samples(shard, plain)] == [None] * 8


# --- WebDataset: one image read per sample ------------------------------------------------------

def zero_member_tar(path: Path, members: list[tuple[str, object]], compress: bool = False) -> None:
    """A tar whose members hold the given bytes, or that many zero bytes (whole MiB) written as a
    hole in the file, or in gzip as one flushed deflate block of a MiB of zeros repeated: a few
    kilobytes either way (as sample_data.big_member_tar and big_member_tar_gz, for several)."""
    pieces = []
    for name, content in members:
        info = tarfile.TarInfo(name)
        info.size = content if isinstance(content, int) else len(content)
        pieces.append(info.tobuf(tarfile.GNU_FORMAT))
        if isinstance(content, int):
            assert content % MIB == 0
            pieces.append(content // MIB)
        else:
            pieces.append(content + bytes(-len(content) % tarfile.BLOCKSIZE))
    pieces.append(bytes(2 * tarfile.RECORDSIZE))
    with open(path, "wb") as handle:
        if not compress:
            for piece in pieces:
                if isinstance(piece, int):
                    handle.seek(piece * MIB, os.SEEK_CUR)
                else:
                    handle.write(piece)
            return
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        zeros = bytes(MIB)
        zero_block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
        crc, total = 0, 0
        handle.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")  # gzip header: deflate, no name, no mtime
        for piece in pieces:
            if isinstance(piece, int):
                for _ in range(piece):
                    handle.write(zero_block)
                    crc = zlib.crc32(zeros, crc)
                total += piece * MIB
            else:
                handle.write(compressor.compress(piece) + compressor.flush(zlib.Z_FULL_FLUSH))
                crc, total = zlib.crc32(piece, crc), total + len(piece)
        handle.write(compressor.flush())
        handle.write(struct.pack("<II", crc, total & 0xFFFFFFFF))


IMAGE = 200  # MiB: under the default data.max_bytes (256 MiB); four of them were 800 MiB per worker


@pytest.mark.parametrize("order, compress", [
    (("jpg", "jpeg", "png", "webp"), False),
    (("webp", "png", "jpeg", "jpg"), False),  # the one used comes last: read by seeking back
    pytest.param(("webp", "png", "jpeg", "jpg"), True, marks=pytest.mark.slow),  # 12 s: inflates 800 MiB
    # a stream cannot seek back: each better image replaces the one held
])
def test_only_the_image_used_is_read(tmp_path, order, compress):
    """A sample with a .jpg, .jpeg, .png and .webp of about 200 MiB each: its payload is the
    .jpg, and the reader holds one image at a time (an uncompressed tar reads only that one and
    seeks past the rest; a compressed stream drops what it holds before reading a better one)."""
    sizes = {"jpg": IMAGE, "jpeg": IMAGE - 1, "png": IMAGE - 2, "webp": IMAGE - 3}  # MiB, to tell them apart
    zero_member_tar(tmp_path / "a.tar", [*((f"a.{extension}", sizes[extension] * MIB) for extension in order),
                                         ("z.jpg", b"after")], compress)
    assert os.stat(tmp_path / "a.tar").st_blocks * 512 < 2 * MIB
    samples, peak, growth, _ = read_in_child(format="webdataset", shards=str(tmp_path / "a.tar"))
    assert samples == [("a", -1, None, IMAGE * MIB, None), ("z", -1, None, 5, None)]
    assert peak < TWO_GB
    assert growth < 1.5 * IMAGE * MIB, f"reading took {growth / MIB:.0f} MiB"


def test_image_preference_duplicates_and_sizes_of_unread_members(tmp_path):
    """The image kept is the first of jpg, jpeg, png, webp whatever the member order, in plain
    and compressed tars; a second member of one kind and an image over data.max_bytes still make
    the sample an error row, though neither is read."""
    members = [("a.png", b"png-a"), ("a.jpeg", b"jpeg-a"), ("a.cls", b"1"), ("b.webp", b"webp-b"), ("b.png", b"png-b"),
               ("c.jpg", b"jpg-c"), ("c.webp", b"webp-c"), ("d.png", b"p"), ("d.png", b"p"),
               ("e.jpg", b"jpg-e"), ("e.webp", b"w" * 2000), ("f.jpeg", b"jpeg-f"), ("f.jpg", b"jpg-f")]
    write_tar(tmp_path / "a.tar", members)
    with tarfile.open(tmp_path / "b.tar.gz", "w:gz") as tar:
        for name, payload in members:
            add_member(tar, name, payload)
    expected = [("a", 1, None, b"jpeg-a"), ("b", -1, None, b"png-b"), ("c", -1, None, b"jpg-c"),
                ("d", -1, "DuplicateMember", None), ("e", -1, "TooLarge", None), ("f", -1, None, b"jpg-f")]
    for shards in ("a.tar", "b.tar.gz"):
        cfg = DataConfig(format="webdataset", shards=str(tmp_path / shards), max_bytes=1000)
        samples = [s for shard in list_shards(cfg) for s in iter_samples(shard, cfg)]
        assert [(*view(s), s.payload) for s in samples] == expected, shards


def test_split_tar_reads_the_preferred_image_of_each_unit(tmp_path):
    """Units of an uncompressed tar end where the next begins: the image read last, by seeking
    back, is still the unit's own."""
    members = []
    for index in range(5):
        members += [(f"k{index}.png", f"png-{index}".encode()), (f"k{index}.jpg", f"jpg-{index}".encode())]
    write_tar(tmp_path / "a.tar", members)
    cfg = DataConfig(format="webdataset", shards=str(tmp_path / "a.tar"), unit_size=2)
    units = list_units(list_shards(cfg), cfg.unit_size)
    assert len(units) == 3
    payloads = [s.payload for unit in units for s in iter_samples(unit, cfg)]
    assert payloads == [f"jpg-{index}".encode() for index in range(5)]


# --- WebDataset: numbers too long for a float --------------------------------------------------

@pytest.mark.parametrize("digits", [400, 5000])
def test_json_box_with_a_huge_integer_is_skipped_and_the_sample_kept(tmp_path, digits):
    """400 digits parse, then fit no float (OverflowError when the box was checked: the sample's
    error row); 5000 pass Python's int-string limit (ValueError in json.loads: the sample's error
    row). Either way that box is skipped, the sample's other boxes and its image are kept."""
    rng = np.random.default_rng(5)
    huge = "9" * digits
    write_tar(tmp_path / "a.tar", [
        ("a.jpg", encode(rng, size=(64, 64))),
        ("a.json", f'{{"boxes": [[1, 2, 3, {huge}], [4, 5, 30, 40], [-{huge}, 0, 1, 1]]}}'.encode()),
        ("b.jpg", encode(rng, size=(64, 64))), ("b.json", f'{{"box": [0, 0, {huge}, 10], "id": {huge}}}'.encode())])
    cfg = DataConfig(format="webdataset", shards=str(tmp_path / "a.tar"), resize=64, crop=64)
    samples = [s for shard in list_shards(cfg) for s in iter_samples(shard, cfg)]
    assert [view(s) for s in samples] == [("a", -1, None), ("b", -1, None)]
    assert transforms.boxes_from_meta(samples[0].meta) == [[4.0, 5.0, 30.0, 40.0]]
    assert transforms.boxes_from_meta(samples[1].meta) is None
    batches = list(ShardBatches(list_shards(cfg), cfg))
    assert [error for batch in batches for error in batch.errors] == []
    assert [sample_id for batch in batches for sample_id in batch.sample_ids] == ["a", "b"]
    boxes = batches[0].boxes
    assert boxes.shape == (2, 1, 4)
    assert boxes[0, 0].tolist() == pytest.approx([4 / 64, 5 / 64, 30 / 64, 40 / 64])
    assert bool(boxes[1].isnan().all())
