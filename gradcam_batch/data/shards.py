"""Shard listing: turn the data config into a sorted list of shards with safe ids, then into
work units, the slices that DataLoader workers and torchrun ranks share out.

A shard may hold far more samples than one worker should decode alone (1 tar of 50k images,
4 Parquet files of a Hugging Face dataset), so a shard with more than `data.unit_size` samples is
split into near-equal units where its format can be entered in the middle: uncompressed tars at
the header of a sample's first member (found by reading headers only), Parquet files at row
group boundaries, ImageFolder shards anywhere. A compressed tar cannot seek and stays one unit.
Units cut only between samples, so a sample never spans two units.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import math
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from gradcam_batch import UserError
from gradcam_batch.config import DataConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_shard_id(name: str) -> str:
    """Shard ids become file names: keep a safe character set and never a leading dot."""
    cleaned = _UNSAFE.sub("_", name).lstrip(".") or "shard"
    return cleaned[:200]


@dataclass
class Shard:
    shard_id: str
    format: str
    path: str = ""
    """webdataset / parquet: the shard file."""
    files: list[tuple[str, int]] = field(default_factory=list)
    """imagefolder: (path relative to root, label) of every image in the shard."""
    root: str = ""
    size: int = 0
    """webdataset / parquet: the file's size in bytes when it was listed."""
    mtime_ns: int = 0
    """webdataset / parquet: the file's modification time when it was listed."""

    def source(self) -> dict:
        """What the shard held when it was listed, enough for a resume to tell that it changed."""
        if self.format == "imagefolder":
            digest = hashlib.sha256("\n".join(f"{path}\t{label}" for path, label in self.files).encode())
            return {"files": len(self.files), "first": self.files[0][0] if self.files else None,
                    "last": self.files[-1][0] if self.files else None, "digest": digest.hexdigest()[:16]}
        return {"path": self.path, "size": self.size, "mtime_ns": self.mtime_ns}


def _expand_globs(pattern: str, what: str) -> list[str]:
    paths: list[str] = []
    for part in (p.strip() for p in pattern.split(",")):
        if part:
            paths.extend(p for p in glob.glob(os.path.expanduser(part)) if os.path.isfile(p))
    if not paths:
        raise UserError(f"data.shards={pattern!r} matches no file; check the path and quote the glob "
                        f"(e.g. data.shards='DIR/*.{what}')")
    return sorted(set(paths))


def _unique_ids(paths: list[str]) -> list[str]:
    """Shard ids from file stems; parent folders are added when stems collide."""
    stems = [safe_shard_id(Path(p).stem) for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    common = os.path.commonpath([os.path.abspath(p) for p in paths])
    return [safe_shard_id(os.path.splitext(os.path.relpath(os.path.abspath(p), common))[0]) for p in paths]


def _imagefolder_shards(cfg: DataConfig) -> list[Shard]:
    root = Path(os.path.expanduser(cfg.root))
    if not root.is_dir():
        raise UserError(f"data.root={cfg.root!r} is not a directory; pass a folder of class sub-folders")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise UserError(f"data.root={cfg.root!r} has no class sub-folders (expected ROOT/<class>/<image>)")
    files: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames.sort()
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    files.append((os.path.relpath(os.path.join(dirpath, filename), root).replace(os.sep, "/"), label))
    if not files:
        raise UserError(f"data.root={cfg.root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return [
        Shard(shard_id=f"imagefolder-{index:05d}", format="imagefolder", root=str(root),
              files=files[start:start + cfg.shard_size])
        for index, start in enumerate(range(0, len(files), cfg.shard_size))
    ]


def _check_parquet_columns(paths: list[str], cfg: DataConfig) -> None:
    """Column names checked on the first readable shard; unreadable shards become error rows
    when they are read, so one bad file does not stop the job."""
    import pyarrow.parquet as pq

    for path in paths:
        try:
            names = pq.read_schema(path).names
            break
        except (OSError, ValueError):
            continue
    else:
        raise UserError(f"data.shards={cfg.shards!r}: none of the {len(paths)} files is a readable Parquet file")
    if cfg.image_column not in names:
        raise UserError(f"data.image_column={cfg.image_column!r} is not a column of {path} "
                        f"(columns: {', '.join(names)})")
    if cfg.id_column and cfg.id_column not in names:
        raise UserError(f"data.id_column={cfg.id_column!r} is not a column of {path} (columns: {', '.join(names)})")


def list_shards(cfg: DataConfig) -> list[Shard]:
    """All shards of the dataset, sorted, so every rank and every rerun sees the same list."""
    if cfg.format == "imagefolder":
        return _imagefolder_shards(cfg)
    extension = "tar" if cfg.format in ("webdataset", "demo") else "parquet"
    paths = _expand_globs(cfg.shards, extension)
    if cfg.format == "parquet":
        _check_parquet_columns(paths, cfg)
    fmt = "webdataset" if cfg.format == "demo" else cfg.format
    shards = []
    for shard_id, path in zip(_unique_ids(paths), paths):
        stat = os.stat(path)
        shards.append(Shard(shard_id=shard_id, format=fmt, path=path, size=stat.st_size, mtime_ns=stat.st_mtime_ns))
    return shards


# --- work units -----------------------------------------------------------------------------


@dataclass
class Unit:
    """A shard, or a contiguous slice of its samples: the unit of work, of output files and of
    resume. Samples are counted in the shard's own order (tar samples, Parquet rows, ImageFolder
    files), `start` inclusive, `end` exclusive."""
    shard: Shard
    start: int = 0
    end: Optional[int] = None
    """One past the slice's last sample; None for a shard that is one unit."""
    samples: Optional[int] = None
    """Samples the listing found in the slice; None where it cannot tell without decompressing."""
    byte_start: int = 0
    """webdataset: offset of the header (extended headers included) of the slice's first member."""
    byte_end: Optional[int] = None
    """webdataset: offset where the next slice begins; None reads on to the end of the archive,
    so the last slice of a truncated tar still reports the truncation."""
    row_groups: Optional[list[int]] = None
    """parquet: the row groups that make up the slice; None reads them all."""

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.end is None

    @property
    def shard_id(self) -> str:
        return self.shard.shard_id

    @property
    def unit_id(self) -> str:
        """The shard id for a shard that is one unit; `<shard id>@<start>-<end>` for a slice.
        `@` never occurs in a shard id, so a slice's name cannot be another shard's."""
        if self.whole:
            return self.shard.shard_id
        return f"{self.shard.shard_id}@{self.start:08d}-{self.end:08d}"

    def files(self) -> list[tuple[str, int]]:
        """imagefolder: the slice's (path relative to root, label) pairs."""
        return self.shard.files[self.start:self.end]

    def record(self) -> dict:
        record = {"shard": self.shard.shard_id, "start": self.start, "end": self.end, "samples": self.samples}
        if self.shard.format == "webdataset" and not self.whole:
            record["bytes"] = [self.byte_start, self.byte_end]
        if self.row_groups is not None:
            record["row_groups"] = [self.row_groups[0], self.row_groups[-1] + 1]
        return record


def as_unit(item: Shard | Unit) -> Unit:
    """A shard given where units are expected is read whole."""
    return item if isinstance(item, Unit) else Unit(item)


def _even_cuts(total: int, unit_size: int | None, allowed: list[int] | None = None) -> list[int]:
    """Sample indices where units begin: ceil(total / unit_size) near-equal units, each cut moved to
    the nearest allowed position (row-group starts) where the format cannot cut anywhere."""
    if not unit_size or total <= unit_size:
        return [0]
    count = math.ceil(total / unit_size)
    ideal = [round(j * total / count) for j in range(1, count)]
    if allowed is None:
        return [0, *ideal]
    inner = [position for position in allowed if 0 < position < total]
    if not inner:
        return [0]
    return [0, *sorted({min(inner, key=lambda position: (abs(position - target), position)) for target in ideal})]


def webdataset_key(name: str) -> tuple[str, str]:
    """(sample key, extension) of a member: the extension starts at the first dot of the base
    name. The reader and the tar index both group by this, so a unit boundary always falls
    between two samples."""
    directory, base = os.path.split(name)
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension


_BLOCK = 512
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZ", b"\xfd7", b"\x28\xb5")  # gzip, bzip2, xz, zstd: no seeking
_PLAIN_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


def _until_nul(field_bytes: bytes) -> bytes:
    return field_bytes.split(b"\0", 1)[0]


def _plain_file_header(block: bytes) -> tuple[str, int] | None:
    """(name, data size) of a plain regular-file header, read as tarfile.TarInfo.frombuf reads it,
    at a fraction of its cost (headers are most of the listing time of a large tar). Anything else
    (extended headers, links, directories, base-256 numbers, a checksum only the signed sum
    matches, end of archive) gives None and is left to tarfile itself."""
    if len(block) != _BLOCK or block[156:157] not in _PLAIN_FILE_TYPES or block[124] & 0x80 or block[148] & 0x80:
        return None
    try:
        checksum = int(_until_nul(block[148:156]).strip() or b"0", 8)
        size = int(_until_nul(block[124:136]).strip() or b"0", 8)
    except ValueError:
        return None
    if checksum != sum(block) - sum(block[148:156]) + 256:
        return None
    name = _until_nul(block[:100])
    if block[156:157] == tarfile.AREGTYPE and name.endswith(b"/"):
        return None  # the old format's directory
    prefix = _until_nul(block[345:500])
    if prefix:
        name = prefix + b"/" + name
    return name.decode(tarfile.ENCODING, "surrogateescape"), size


_EXTENDED_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                   tarfile.GNUTYPE_LONGLINK)
_MAX_EXTENDED_HEADER = 16 << 20


def _extended_header_too_large(block: bytes) -> bool:
    """tarfile reads a pax or GNU long-name header into memory whole, so a hostile size field
    would have the listing allocate terabytes; such a tar is not split (read whole, as a stream)."""
    if block[156:157] not in _EXTENDED_TYPES:
        return False
    try:
        return tarfile.nti(block[124:136]) > _MAX_EXTENDED_HEADER
    except (ValueError, tarfile.TarError):
        return False  # tarfile rejects the header itself


def tar_sample_offsets(path: str) -> list[int] | None:
    """Header offset of the first member of every sample of an uncompressed tar, reading headers
    only; None where the tar cannot be entered in the middle (compressed, a global pax header
    that applies to every later member, not a tar at all). The scan stops where tarfile would
    (a bad or truncated header): what lies beyond is read by the last unit, which reports it."""
    offsets: list[int] = []
    key = None
    with open(path, "rb", buffering=0) as handle:
        if handle.read(2) in _COMPRESSED_MAGIC:
            return None
        offset = 0
        while True:
            handle.seek(offset)
            block = handle.read(_BLOCK)
            plain = _plain_file_header(block)
            if plain is not None:
                name, size = plain
                member_offset, is_file = offset, True
                offset += _BLOCK + -(-size // _BLOCK) * _BLOCK
            else:
                if _extended_header_too_large(block):
                    return None
                handle.seek(offset)
                try:
                    archive = tarfile.TarFile(fileobj=handle)
                except Exception:  # noqa: BLE001 -- whatever tarfile raises here, the reader meets it
                    # too and makes it an error row; the index stops, and the last unit reads on
                    if offset == 0:
                        return None  # not a tar
                    break
                member = archive.firstmember
                if archive.pax_headers:
                    return None  # a global header changes the members after it
                if member is None:
                    break
                name, member_offset, is_file = member.name, member.offset, member.isfile()
                offset = archive.offset
            if not is_file:
                continue  # the reader skips it without ending the sample
            member_key = webdataset_key(name)[0]
            if member_key != key:
                offsets.append(member_offset)
                key = member_key
    return offsets


def _webdataset_units(shard: Shard, unit_size: int | None) -> list[Unit]:
    try:
        offsets = tar_sample_offsets(shard.path)
    except OSError:
        offsets = None  # unreadable now: the reader reports it as the shard's error row
    if offsets is None:
        return [Unit(shard)]
    cuts = _even_cuts(len(offsets), unit_size)
    if len(cuts) == 1:
        return [Unit(shard, samples=len(offsets))]
    bounds = [*cuts, len(offsets)]
    return [Unit(shard, start, end, samples=end - start, byte_start=offsets[start] if index else 0,
                 byte_end=offsets[end] if end < len(offsets) else None)
            for index, (start, end) in enumerate(zip(bounds, bounds[1:]))]


def _parquet_units(shard: Shard, unit_size: int | None) -> list[Unit]:
    """Row-group boundaries only: a row range inside a row group would make every unit that
    shares it read and decompress the whole group."""
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_metadata(shard.path)
    except (OSError, ValueError):
        return [Unit(shard)]  # unreadable: the reader reports it as the shard's error row
    sizes = [metadata.row_group(index).num_rows for index in range(metadata.num_row_groups)]
    starts = [0, *itertools.accumulate(sizes)][:-1]
    total = sum(sizes)
    cuts = _even_cuts(total, unit_size, allowed=starts)
    if len(cuts) == 1:
        return [Unit(shard, samples=total)]
    bounds = [*cuts, total]
    return [Unit(shard, start, end, samples=end - start,
                 row_groups=[group for group, first in enumerate(starts) if start <= first < end])
            for start, end in zip(bounds, bounds[1:])]


def _imagefolder_units(shard: Shard, unit_size: int | None) -> list[Unit]:
    cuts = _even_cuts(len(shard.files), unit_size)
    if len(cuts) == 1:
        return [Unit(shard, samples=len(shard.files))]
    bounds = [*cuts, len(shard.files)]
    return [Unit(shard, start, end, samples=end - start) for start, end in zip(bounds, bounds[1:])]


def list_units(shards: list[Shard], unit_size: int | None) -> list[Unit]:
    """Every shard's units in shard order; unit_size None keeps every shard whole."""
    split = {"webdataset": _webdataset_units, "parquet": _parquet_units, "imagefolder": _imagefolder_units}
    return [unit for shard in shards for unit in split[shard.format](shard, unit_size)]


def listing_record(units: list[Unit]) -> dict:
    """The manifest's record of what the run reads: every shard's source and every unit."""
    return {"shards": {unit.shard_id: unit.shard.source() for unit in units},
            "units": {unit.unit_id: unit.record() for unit in units}}


def listing_change(before: dict, now: dict) -> str | None:
    """The first difference between two listing records, in words; None when they agree."""
    shards_before, shards_now = before.get("shards", {}), now["shards"]
    gone = [shard_id for shard_id in shards_before if shard_id not in shards_now]
    new = [shard_id for shard_id in shards_now if shard_id not in shards_before]
    if gone:
        return f"shard {gone[0]} is no longer listed{_and_more(gone)}"
    if new:
        return f"shard {new[0]} is new{_and_more(new)}"
    for shard_id, source in shards_now.items():
        old = shards_before[shard_id]
        changed = [f"{key} {old.get(key)!r} -> {value!r}" for key, value in source.items() if old.get(key) != value]
        if changed:
            return f"shard {shard_id} changed ({', '.join(changed)})"
    units_before, units_now = before.get("units", {}), now["units"]
    if units_before != units_now:
        differ = sorted({units_before.get(k, {}).get("shard") or units_now[k]["shard"]
                         for k in set(units_before) | set(units_now) if units_before.get(k) != units_now.get(k)})
        return f"shard {differ[0]} splits into different units{_and_more(differ)}"
    return None


def _and_more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""
