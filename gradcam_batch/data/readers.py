"""Readers per shard format. Each reads one work unit (a shard, or a slice of one) and yields
RawSample records in shard order; nothing here decodes images, so the same readers feed CPU
workers and device decoders."""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from typing import Iterator, Optional

from gradcam_batch.config import DataConfig
from gradcam_batch.data.shards import Shard, Unit, as_unit, webdataset_key

WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class RawSample:
    sample_id: str
    label: int  # -1 when unknown
    payload: Optional[bytes]  # encoded image; None when the sample failed before decoding
    meta: Optional[dict] = None  # e.g. {"box": [x0, y0, x1, y1]} in pixels
    error: Optional[tuple[str, str, str]] = None  # (stage, error type, message)


def _imagefolder(unit: Unit) -> Iterator[RawSample]:
    for relative, label in unit.files():
        try:
            with open(os.path.join(unit.shard.root, relative), "rb") as handle:
                payload = handle.read()
        except OSError as error:
            yield RawSample(relative, label, None, error=("read", type(error).__name__, str(error)))
            continue
        yield RawSample(relative, label, payload)


def _wds_sample(key: str, members: dict[str, bytes]) -> RawSample:
    label, meta = -1, None
    try:
        if "cls" in members:
            label = int(members["cls"].decode().strip())
        if "json" in members:
            meta = json.loads(members["json"])
    except (ValueError, UnicodeDecodeError) as error:
        return RawSample(key, -1, None, error=("read", type(error).__name__, f"bad label or json: {error}"))
    image = next((members[ext] for ext in WDS_IMAGE_EXTENSIONS if ext in members), None)
    if image is None:
        return RawSample(key, label, None, error=("read", "MissingImage",
                                                  f"no image member ({'/'.join(WDS_IMAGE_EXTENSIONS)}) for key"))
    return RawSample(key, label, image, meta=meta if isinstance(meta, dict) else None)


def _check_end_of_archive(handle, offset: int) -> None:
    """tarfile treats a header cut short as the end of the archive; a complete uncompressed tar
    ends with two zero blocks, so anything else means the shard was truncated."""
    handle.seek(offset)
    tail = handle.read(1024)
    if len(tail) < 1024 or tail.count(0) != 1024:
        raise tarfile.ReadError(f"truncated tar: no end-of-archive marker after byte {offset}; "
                                "samples past that point are lost")


def _webdataset(unit: Unit) -> Iterator[RawSample]:
    """Members `<key>.<ext>` grouped by key (shards.webdataset_key); consecutive members with one
    key form a sample. A slice starts at its first member's header and ends where the next slice
    begins; the last one (or a whole shard) reads to the end and checks the end-of-archive marker."""
    key, members = None, {}
    try:
        with open(unit.shard.path, "rb") as handle:
            compressed = handle.read(2) in (b"\x1f\x8b", b"BZ", b"\xfd7")  # gzip, bzip2, xz: checked by their codecs
            handle.seek(unit.byte_start)
            # a slice is an uncompressed tar by construction; no compression sniffing mid-archive
            with tarfile.open(fileobj=handle, mode="r|*" if unit.whole else "r|") as tar:
                for member in tar:
                    if unit.byte_end is not None and unit.byte_start + member.offset >= unit.byte_end:
                        break  # the next slice's first sample
                    if not member.isfile():
                        continue
                    member_key, extension = webdataset_key(member.name)
                    if member_key != key:
                        if key is not None:
                            yield _wds_sample(key, members)
                        key, members = member_key, {}
                    members[extension.lower()] = tar.extractfile(member).read()
                else:
                    if unit.byte_end is not None:  # tarfile ends quietly at a bad header; a slice must not
                        raise tarfile.ReadError(f"the archive ends before byte {unit.byte_end}, where this unit "
                                                "ends; the shard changed after it was listed")
                end = unit.byte_start + tar.offset
            if not compressed and unit.byte_end is None:
                _check_end_of_archive(handle, end)
    except (tarfile.TarError, OSError, EOFError) as error:
        if key is not None:
            yield _wds_sample(key, members)
            key = None
        yield RawSample(f"{unit.unit_id}/<tar>", -1, None, error=("read", type(error).__name__, str(error)))
    if key is not None:
        yield _wds_sample(key, members)


def _parquet(unit: Unit, cfg: DataConfig) -> Iterator[RawSample]:
    import pyarrow.parquet as pq

    stem = os.path.splitext(os.path.basename(unit.shard.path))[0]
    try:
        file = pq.ParquetFile(unit.shard.path)
        names = file.schema_arrow.names
        columns = [cfg.image_column]
        label_column = cfg.label_column if cfg.label_column in names else None
        id_column = cfg.id_column if cfg.id_column in names else None
        columns += [c for c in (label_column, id_column) if c]
        row = unit.start  # default ids number rows from the file's start, whichever slice reads them
        for batch in file.iter_batches(batch_size=256, columns=columns, row_groups=unit.row_groups):
            images = batch.column(cfg.image_column).to_pylist()
            labels = batch.column(label_column).to_pylist() if label_column else [None] * len(images)
            ids = batch.column(id_column).to_pylist() if id_column else [None] * len(images)
            for image, label, sample_id in zip(images, labels, ids):
                sample_id = str(sample_id) if sample_id is not None else f"{stem}/{row}"
                row += 1
                if isinstance(image, dict):  # Hugging Face datasets: struct<bytes, path>
                    image = image.get("bytes")
                label = int(label) if label is not None else -1
                if not image:
                    yield RawSample(sample_id, label, None, error=("read", "MissingImage", "empty image cell"))
                else:
                    yield RawSample(sample_id, label, bytes(image))
    except (OSError, ValueError) as error:  # pyarrow raises ArrowInvalid (a ValueError) / OSError
        yield RawSample(f"{unit.unit_id}/<parquet>", -1, None, error=("read", type(error).__name__, str(error)))


def iter_samples(unit: Unit | Shard, cfg: DataConfig) -> Iterator[RawSample]:
    """The samples of a unit (a shard given here is read whole)."""
    unit = as_unit(unit)
    if unit.shard.format == "imagefolder":
        return _imagefolder(unit)
    if unit.shard.format == "webdataset":
        return _webdataset(unit)
    return _parquet(unit, cfg)
