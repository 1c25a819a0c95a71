"""Work units: a shard, or a slice of one that a reader can enter in the middle (an uncompressed
tar at a sample's first header, found by reading headers only; Parquet at a row group; an
ImageFolder file range). Units are the unit of output, of resume and of sharing out the work;
the listing record kept in the manifest lets a resume tell whether the data changed. How a
reader sizes its batches within a Parquet row group: parquet_plan.py."""

from __future__ import annotations

import itertools
import math
import os
import tarfile
from dataclasses import dataclass
from typing import Optional


from gradcam_batch.data.parquet_plan import PARQUET_BUFFER, plan_row_group, row_group_batches
from gradcam_batch.data.records import id_digest, parquet_sample_id, printable
from gradcam_batch.data.shards import Shard

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
    duplicate_samples: tuple[int, ...] = ()
    """Shard-order indices of the slice's samples whose key (webdataset) or id (parquet with
    data.id_column) an earlier sample of the shard already has. The reader makes each a
    duplicate-key error row, also when the earlier sample lies in another unit, which that
    reader never sees."""

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


WEBDATASET_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
WEBDATASET_READ_EXTENSIONS = (*WEBDATASET_IMAGE_EXTENSIONS, "cls", "json")
"""Members the reader reads; any other member is passed over unread."""


def joins_sample(extension: str, is_file: bool) -> bool:
    """Whether a member counts in grouping members into samples. Regular files always do; a link,
    device, FIFO or directory does when its extension is one the reader reads, so that its sample
    becomes an error row instead of a silent gap. Others (a directory entry `train/`, a link
    without an extension) hold nothing the reader would read and are passed over without ending
    the sample around them. The reader and the tar index both decide by this."""
    return is_file or extension.lower() in WEBDATASET_READ_EXTENSIONS


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
    index = tar_sample_index(path)
    return None if index is None else index[0]


def tar_sample_index(path: str) -> tuple[list[int], list[int]] | None:
    """tar_sample_offsets, and the indices of the samples whose key an earlier sample has."""
    offsets: list[int] = []
    duplicates: list[int] = []
    keys: set[str] = set()
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
            member_key, extension = webdataset_key(name)
            if not joins_sample(extension, is_file):
                continue  # the reader passes it over without ending the sample
            if member_key != key:
                if member_key in keys:
                    duplicates.append(len(offsets))
                keys.add(member_key)
                offsets.append(member_offset)
                key = member_key
    return offsets, duplicates


def _webdataset_units(shard: Shard, unit_size: int | None) -> list[Unit]:
    try:
        index = tar_sample_index(shard.path)
    except OSError:
        index = None  # unreadable now: the reader reports it as the shard's error row
    if index is None:
        return [Unit(shard)]
    offsets, duplicates = index
    cuts = _even_cuts(len(offsets), unit_size)
    if len(cuts) == 1:
        return [Unit(shard, samples=len(offsets), duplicate_samples=tuple(duplicates))]
    bounds = [*cuts, len(offsets)]
    return [Unit(shard, start, end, samples=end - start, byte_start=offsets[start] if position else 0,
                 byte_end=offsets[end] if end < len(offsets) else None,
                 duplicate_samples=tuple(sample for sample in duplicates if start <= sample < end))
            for position, (start, end) in enumerate(zip(bounds, bounds[1:]))]


def _parquet_units(shard: Shard, unit_size: int | None, id_column: str | None = None) -> list[Unit]:
    """Row-group boundaries only: a row range inside a row group would make every unit that
    shares it read and decompress the whole group. With an id column, a shard cut into several
    units has its ids read here once, so that a unit knows which of its rows repeat an id of an
    earlier unit."""
    import pyarrow as pa
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
    duplicates: list[int] = []
    if id_column:
        try:
            duplicates = parquet_repeated_ids(shard.path, id_column)
        except (OSError, ValueError, pa.ArrowException):
            pass  # the reader meets the same damage and reports it as the unit's error row
    bounds = [*cuts, total]
    return [Unit(shard, start, end, samples=end - start,
                 row_groups=[group for group, first in enumerate(starts) if start <= first < end],
                 duplicate_samples=tuple(row for row in duplicates if start <= row < end))
            for start, end in zip(bounds, bounds[1:])]


def parquet_repeated_ids(path: str, id_column: str) -> list[int]:
    """Shard-order indices of the rows whose sample id (records.parquet_sample_id) an earlier row
    of the file already has, reading only the id column, in bounded batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stem = printable(os.path.splitext(os.path.basename(path))[0])
    seen: set[bytes] = set()
    repeated: list[int] = []
    row = 0
    with pa.OSFile(os.fsencode(path)) as source_file:
        file = pq.ParquetFile(source_file, pre_buffer=False, buffer_size=PARQUET_BUFFER)
        columns = [id_column] if len(file.schema_arrow.get_all_field_indices(id_column)) == 1 else []
        for group in range(file.metadata.num_row_groups):
            # the same plan as the reader's for this column: rows it cannot read get default ids
            plan = plan_row_group(file, source_file, group, columns)
            read = [name for name in columns if name not in plan.unread]
            batches = row_group_batches(file, group, read, plan.rows, plan.readable)
            unread_rows = file.metadata.row_group(group).num_rows - plan.readable
            for count, batch in itertools.chain(batches, [(unread_rows, None)]):
                values = batch.column(0).to_pylist() if batch is not None else [None] * count
                for value in values:
                    digest = id_digest(parquet_sample_id(value, stem, row))
                    if digest in seen:
                        repeated.append(row)
                    seen.add(digest)
                    row += 1
    return repeated


def _imagefolder_units(shard: Shard, unit_size: int | None) -> list[Unit]:
    cuts = _even_cuts(len(shard.files), unit_size)
    if len(cuts) == 1:
        return [Unit(shard, samples=len(shard.files))]
    bounds = [*cuts, len(shard.files)]
    return [Unit(shard, start, end, samples=end - start) for start, end in zip(bounds, bounds[1:])]


def list_units(shards: list[Shard], unit_size: int | None, id_column: str | None = None) -> list[Unit]:
    """Every shard's units in shard order; unit_size None keeps every shard whole. id_column
    (data.id_column) lets a Parquet shard's units know the ids an earlier unit repeats."""
    split = {"webdataset": _webdataset_units, "parquet": lambda shard, size: _parquet_units(shard, size, id_column),
             "imagefolder": _imagefolder_units}
    return [unit for shard in shards for unit in split[shard.format](shard, unit_size)]


def listing_record(units: list[Unit]) -> dict:
    """The manifest's record of what the run reads: every shard's source and every unit."""
    return {"shards": {unit.shard_id: unit.shard.source() for unit in units},
            "units": {unit.unit_id: unit.record() for unit in units}}


def _source_differs(old: dict | None, new: dict | None) -> bool:
    """A key that an older manifest did not record is not compared."""
    if old is None or new is None:
        return old is not new
    return any(old[key] != value for key, value in new.items() if key in old)


def _imagefolder_change(shards_before: dict, shards_now: dict) -> str | None:
    """ImageFolder shards are runs of the sorted file list, so one file added or removed moves
    every later shard: the change is told in files, with the first shard that differs."""
    differ = [shard_id for shard_id in sorted(set(shards_before) | set(shards_now))
              if _source_differs(shards_before.get(shard_id), shards_now.get(shard_id))]
    if not differ:
        return None
    first = differ[0]
    files_before = sum(source.get("files", 0) for source in shards_before.values())
    files_now = sum(source.get("files", 0) for source in shards_now.values())
    if files_before != files_now:
        return (f"{files_before} -> {files_now} files under data.root (added or removed; "
                f"the first difference is in shard {first})")
    old, new = shards_before.get(first, {}), shards_now.get(first, {})
    if any(old.get(key) != new.get(key) for key in ("files", "first", "last", "digest")):
        return f"files were renamed, replaced or moved between class folders (the first difference is in shard {first})"
    return f"a file was modified (its size or modification time changed) in shard {first}"


def listing_change(before: dict, now: dict) -> str | None:
    """The first difference between two listing records, in words; None when they agree."""
    shards_before, shards_now = before.get("shards", {}), now["shards"]
    if any("digest" in source for source in (*shards_before.values(), *shards_now.values())):
        change = _imagefolder_change(shards_before, shards_now)
        if change:
            return change
    gone = [shard_id for shard_id in shards_before if shard_id not in shards_now]
    new = [shard_id for shard_id in shards_now if shard_id not in shards_before]
    if gone:
        return f"shard {gone[0]} is no longer listed{_and_more(gone)}"
    if new:
        return f"shard {new[0]} is new{_and_more(new)}"
    for shard_id, source in shards_now.items():
        old = shards_before[shard_id]
        changed = [f"{key} {old[key]!r} -> {value!r}" for key, value in source.items()
                   if key in old and old[key] != value]
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
