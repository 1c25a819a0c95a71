"""Tiny datasets in every supported format, written with fresh random images."""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def encode(rng: np.random.Generator, fmt: str = "JPEG", size=(40, 52)) -> bytes:
    pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def make_imagefolder(root: Path, per_class=(3, 2, 4), seed=0) -> list[tuple[str, int]]:
    """Class folders c0, c1, ...; returns (relative path, label) in listing order."""
    rng = np.random.default_rng(seed)
    samples = []
    for label, count in enumerate(per_class):
        folder = root / f"c{label}"
        folder.mkdir(parents=True)
        for index in range(count):
            name = f"{index:03d}.{'png' if index % 2 else 'jpg'}"
            (folder / name).write_bytes(encode(rng, "PNG" if index % 2 else "JPEG"))
            samples.append((f"c{label}/{name}", label))
    return samples


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def make_webdataset(root: Path, shards=2, per_shard=3, seed=0) -> dict[str, int]:
    """Shards shard-XXXX.tar with `<key>.jpg`, `<key>.cls`, `<key>.json`; returns {key: label}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    for shard in range(shards):
        with tarfile.open(root / f"shard-{shard:04d}.tar", "w") as tar:
            for index in range(per_shard):
                key = f"s{shard}/img{index:03d}"
                label = int(rng.integers(0, 10))
                add_member(tar, f"{key}.jpg", encode(rng))
                add_member(tar, f"{key}.cls", str(label).encode())
                add_member(tar, f"{key}.json", json.dumps({"index": index}).encode())
                expected[key] = label
    return expected


def make_parquet(root: Path, shards=2, rows=3, struct=False, with_ids=False, seed=0) -> dict[str, int]:
    """Hugging Face-like shards; returns {sample_id: label}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    for shard in range(shards):
        images = [encode(rng) for _ in range(rows)]
        labels = [int(v) for v in rng.integers(0, 10, size=rows)]
        ids = [f"id-{shard}-{i}" for i in range(rows)]
        column = (pa.array([{"bytes": b, "path": None} for b in images],
                           pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
                  if struct else pa.array(images, pa.binary()))
        table = {"image": column, "label": pa.array(labels, pa.int64())}
        if with_ids:
            table["key"] = pa.array(ids)
        pq.write_table(pa.table(table), root / f"part{shard}.parquet")
        for index in range(rows):
            expected[ids[index] if with_ids else f"part{shard}/{index}"] = labels[index]
    return expected


def make_tar(path: Path, keys, seed=0) -> dict[str, int]:
    """One webdataset shard at `path` holding `<key>.jpg` and `<key>.cls` for each key; returns {key: label}."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    expected = {}
    with tarfile.open(path, "w") as tar:
        for key in keys:
            label = int(rng.integers(0, 10))
            add_member(tar, f"{key}.jpg", encode(rng))
            add_member(tar, f"{key}.cls", str(label).encode())
            expected[key] = label
    return expected


def add_special(tar: tarfile.TarFile, name: str, member_type: bytes, linkname: str = "") -> None:
    """A member that is not a regular file: a link, device, FIFO or directory (no data)."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname = member_type, linkname
    tar.addfile(info)


def write_tar(path: Path, members: list[tuple[str, bytes]], **open_args) -> None:
    """A tar of regular members in the given order (names may hold surrogate-escaped bytes)."""
    with tarfile.open(path, "w", **open_args) as tar:
        for name, payload in members:
            add_member(tar, name, payload)


def big_member_tar(path: Path, size: int, before: list[tuple[str, bytes]], after: list[tuple[str, bytes]],
                   name: str = "big.jpg") -> None:
    """An uncompressed tar whose member `name` claims `size` bytes of zeros that are a hole in the
    file: a few kilobytes on disk that read as gigabytes."""
    with open(path, "wb") as handle:
        handle.write(tar_blocks(before) + _header(name, size))
        handle.seek(-(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE, os.SEEK_CUR)  # the hole
        handle.write(tar_blocks(after) + bytes(2 * tarfile.RECORDSIZE))


def big_member_tar_gz(path: Path, size: int, before: list[tuple[str, bytes]], after: list[tuple[str, bytes]],
                      name: str = "big.jpg") -> None:
    """A gzip-compressed tar whose member `name` holds `size` zero bytes, written in megabytes:
    one deflate block of 1 MiB of zeros, flushed so it stands alone, is repeated (about 1 kB per
    MiB, so 3 GiB compress to about 3 MB)."""
    chunk = 1 << 20
    assert size % chunk == 0
    head = tar_blocks(before) + _header(name, size)
    tail = tar_blocks(after) + bytes(2 * tarfile.RECORDSIZE)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(chunk)
    opening = compressor.compress(head) + compressor.flush(zlib.Z_FULL_FLUSH)
    zero_block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    ending = compressor.compress(tail) + compressor.flush()
    crc = zlib.crc32(head)
    for _ in range(size // chunk):
        crc = zlib.crc32(zeros, crc)
    crc = zlib.crc32(tail, crc)
    total = len(head) + size + len(tail)
    with open(path, "wb") as handle:
        handle.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")  # gzip header: deflate, no name, no mtime
        handle.write(opening)
        for _ in range(size // chunk):
            handle.write(zero_block)
        handle.write(ending)
        handle.write(struct.pack("<II", crc, total & 0xFFFFFFFF))


def tar_blocks(members: list[tuple[str, bytes]]) -> bytes:
    """The members' headers and padded data, without the end-of-archive blocks."""
    buffer = io.BytesIO()
    tar = tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT)
    for member, payload in members:
        add_member(tar, member, payload)
    return buffer.getvalue()[:tar.offset]


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(tarfile.GNU_FORMAT)


def write_parquet_columns(path: Path, columns: dict, **write_args) -> None:
    """A Parquet file of the given pyarrow arrays (or Python lists), for columns of odd types."""
    pq.write_table(pa.table(columns), path, **write_args)
