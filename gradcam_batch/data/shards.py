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

import difflib
import glob
import hashlib
import itertools
import logging
import math
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from gradcam_batch import UserError
from gradcam_batch.config import DataConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_OUTPUT_FOLDERS = ("cams", "errors")
"""Folders under output.dir that hold what the tool writes (hidden names are its temporaries)."""

log = logging.getLogger("gradcam_batch")


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
    stats_digest: str = ""
    """imagefolder: digest of every file's size and modification time when it was listed, so a
    resume also sees a file that was rewritten under its old name."""

    def source(self) -> dict:
        """What the shard held when it was listed, enough for a resume to tell that it changed."""
        if self.format == "imagefolder":
            # file names are bytes on POSIX: one that is not UTF-8 is hashed as the bytes it is
            names = "\n".join(f"{path}\t{label}" for path, label in self.files).encode("utf-8", "surrogateescape")
            return {"files": len(self.files), "first": self.files[0][0] if self.files else None,
                    "last": self.files[-1][0] if self.files else None,
                    "digest": hashlib.sha256(names).hexdigest()[:16], "stats": self.stats_digest}
        return {"path": self.path, "size": self.size, "mtime_ns": self.mtime_ns}


def _inside(path: str, folder: str) -> bool:
    """Whether a resolved path is the resolved folder or lies below it."""
    return os.path.commonpath([path, folder]) == folder


def _expand_globs(pattern: str, what: str) -> list[str]:
    """The files the globs match, sorted, each file once: a file matched twice (two globs, a
    link and its target, `./x.tar` and `x.tar`, hard links) would be read twice and its rows
    written twice or over each other. The path kept for a file is its first that is not a link."""
    paths: list[str] = []
    for part in (p.strip() for p in pattern.split(",")):
        if part:
            paths.extend(p for p in glob.glob(os.path.expanduser(part)) if os.path.isfile(p))
    if not paths:
        raise UserError(f"data.shards={pattern!r} matches no file; check the path and quote the glob "
                        f"(e.g. data.shards='DIR/*.{what}')")
    unique = sorted(set(paths))
    kept: dict[tuple[int, int], str] = {}
    for path in sorted(unique, key=lambda p: (os.path.islink(p), p)):
        status = os.stat(path)
        kept.setdefault((status.st_dev, status.st_ino), path)
    if len(kept) < len(unique):
        log.warning("data.shards=%r names %d of its files more than once (links or several globs); each is read once",
                    pattern, len(unique) - len(kept))
    return sorted(kept.values())


def _path_digest(path: str, length: int) -> str:
    return hashlib.sha256(os.path.realpath(path).encode("utf-8", "surrogateescape")).hexdigest()[:length]


def _unique_ids(paths: list[str]) -> list[str]:
    """Shard ids from file stems, distinct even on a disk that ignores case (they name part files).

    A stem that is already a safe id keeps it unless another file has the same stem; any other
    shard keeps its cleaned stem only while no other shard cleans to the same id. The rest get a
    short digest of their resolved path, so a file's id depends on the file, not on the order in
    which the globs list it: `a_b.tar` stays `a_b` while `a b.tar` beside it becomes `a_b-1f3c9a0e`.
    """
    stems = [Path(p).stem for p in paths]
    cleaned = [safe_shard_id(stem) for stem in stems]
    clean = [safe == stem for safe, stem in zip(cleaned, stems)]
    claimed_by_clean = Counter(safe.casefold() for safe, is_clean in zip(cleaned, clean) if is_clean)
    claimed = Counter(safe.casefold() for safe in cleaned)
    ids = [safe if (claimed_by_clean[safe.casefold()] == 1 if is_clean else claimed[safe.casefold()] == 1)
           else f"{safe[:190]}-{_path_digest(path, 8)}"
           for safe, is_clean, path in zip(cleaned, clean, paths)]
    # a stem may itself look like `<id>-<digest>`, and 8 hex digits can meet: longer digests for those
    for _ in range(2):
        counts = Counter(shard_id.casefold() for shard_id in ids)
        clashing = [index for index, shard_id in enumerate(ids) if counts[shard_id.casefold()] > 1]
        if not clashing:
            return ids
        for index in clashing:
            ids[index] = f"{ids[index][:160]}-{_path_digest(paths[index], 32)}"
    counts = Counter(shard_id.casefold() for shard_id in ids)
    first, second = [path for path, shard_id in zip(paths, ids) if counts[shard_id.casefold()] > 1][:2]
    raise UserError(f"data.shards lists {first!r} and {second!r}, whose names give the same shard id; rename one")


def check_output_apart(cfg: DataConfig, output_dir: str | os.PathLike) -> None:
    """Refuse data that would take in what the tool writes: output.dir inside an ImageFolder
    root makes its folders classes on the next run, and a shard glob that reaches the output's
    part files reads them as data. Cheap (no listing), so it runs before anything else."""
    output = os.path.realpath(os.path.expanduser(output_dir))
    if cfg.format == "imagefolder" and cfg.root and os.path.isdir(os.path.expanduser(cfg.root)):
        if _inside(output, os.path.realpath(os.path.expanduser(cfg.root))):
            raise UserError(f"output.dir={str(output_dir)!r} is inside data.root={cfg.root!r}; the next run would "
                            "list its folders as classes: put output.dir outside data.root")
    elif cfg.format in ("webdataset", "parquet") and cfg.shards:
        real_folders: dict[str, str] = {}  # thousands of shards share a few folders: resolve each once
        for part in (p.strip() for p in cfg.shards.split(",")):
            for path in glob.glob(os.path.expanduser(part)) if part else ():
                folder, name = os.path.split(os.path.abspath(path))
                if folder not in real_folders:
                    real_folders[folder] = os.path.realpath(folder)
                real = os.path.realpath(path) if os.path.islink(path) else os.path.join(real_folders[folder], name)
                if real == output or not _inside(real, output):
                    continue
                top = os.path.relpath(real, output).split(os.sep)[0]
                if top in _OUTPUT_FOLDERS or top.startswith("."):
                    raise UserError(f"data.shards={cfg.shards!r} matches {path!r}, which is inside "
                                    f"output.dir={str(output_dir)!r} where this tool writes; narrow the glob or "
                                    "move output.dir")


def _directory_key(path: str) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_dev, status.st_ino


def _walk_images(root: str, root_real: str, class_name: str, follow_links: bool):
    """(path relative to root, size, mtime_ns) of every image file below a class folder, in
    os.walk's order with sorted names (a folder's files, then its sub-folders one by one).

    Links inside the root are followed; a folder link that leads outside it is refused unless
    data.follow_links=true (a class folder linked to / would list the whole system), and one that
    leads back to a folder it lies in is refused in any case (it would list forever). A file link
    that leaves the root is listed: the reader makes it an error row, one file cannot stop a run.
    Every entry that is not a folder is listed when its name looks like an image: FIFOs, devices
    and broken links too, so that each becomes an error row rather than a silent gap."""
    stack = [(class_name, (_directory_key(root_real),))]
    while stack:
        relative, above = stack.pop()
        folder = os.path.join(root, relative)
        if os.path.islink(folder):
            target = os.path.realpath(folder)
            if not follow_links and not _inside(target, root_real):
                what = "class folder" if relative == class_name else "folder"
                raise UserError(f"data.root={root!r}: {what} {relative!r} is a link to {target!r}, outside data.root; "
                                "copy the images into data.root or set data.follow_links=true")
        key = _directory_key(folder)
        if key in above:
            raise UserError(f"data.root={root!r}: folder {relative!r} leads back to a folder above it "
                            "(a loop of links); remove the link")
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as error:  # os.walk would skip the folder and every image in it without a word
            raise UserError(f"data.root={root!r}: cannot list folder {relative!r} ({error.strerror}); "
                            "fix its permissions or move it out of data.root") from None
        folders = []
        for entry in entries:
            if entry.is_dir():
                folders.append(f"{relative}/{entry.name}")
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                try:
                    status = entry.stat()
                    size, mtime_ns = status.st_size, status.st_mtime_ns
                except OSError:
                    size, mtime_ns = -1, -1  # a broken link: the reader reports it
                yield f"{relative}/{entry.name}", size, mtime_ns
        stack.extend((sub, (*above, key)) for sub in reversed(folders))


def _imagefolder_shards(cfg: DataConfig) -> list[Shard]:
    root = Path(os.path.expanduser(cfg.root))
    if not root.is_dir():
        raise UserError(f"data.root={cfg.root!r} is not a directory; pass a folder of class sub-folders")
    root_real = os.path.realpath(root)
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise UserError(f"data.root={cfg.root!r} has no class sub-folders (expected ROOT/<class>/<image>)")
    files: list[tuple[str, int]] = []
    stats_digests: list[str] = []
    stats = hashlib.sha256()
    for label, name in enumerate(classes):
        for relative, size, mtime_ns in _walk_images(str(root), root_real, name, cfg.follow_links):
            files.append((relative, label))
            stats.update(f"{size} {mtime_ns}\n".encode())
            if len(files) % cfg.shard_size == 0:  # shards are consecutive runs of shard_size files
                stats_digests.append(stats.hexdigest()[:16])
                stats = hashlib.sha256()
    if not files:
        raise UserError(f"data.root={cfg.root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    if len(files) % cfg.shard_size:
        stats_digests.append(stats.hexdigest()[:16])
    return [
        Shard(shard_id=f"imagefolder-{index:05d}", format="imagefolder", root=str(root),
              files=files[start:start + cfg.shard_size], stats_digest=stats_digests[index])
        for index, start in enumerate(range(0, len(files), cfg.shard_size))
    ]


DEFAULT_LABEL_COLUMN = "label"


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
    # the default "label" may be absent (labels unknown); a column the user named must exist
    if cfg.label_column and cfg.label_column != DEFAULT_LABEL_COLUMN and cfg.label_column not in names:
        close = difflib.get_close_matches(cfg.label_column, names, n=1)
        hint = f"; did you mean {close[0]}?" if close else "; data.label_column=null reads no labels"
        raise UserError(f"data.label_column={cfg.label_column!r} is not a column of {path}{hint} "
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
    duplicate_samples: tuple[int, ...] = ()
    """webdataset: shard-order indices of the slice's samples whose key an earlier sample of the
    shard already has. The reader makes each a duplicate-key error row, also when the earlier
    sample lies in another unit, which that reader never sees."""

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
