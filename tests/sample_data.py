"""Tiny datasets in every supported format, written with fresh random images."""

from __future__ import annotations

import io
import json
import tarfile
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
