"""WebDataset tars: members `<key>.<ext>` grouped by key, read one work unit at a time.

Members that are not regular files, larger than data.max_bytes or repeating an earlier key are
their sample's error row; of a sample's images only the one used is read; compressed streams are
read through in bounded steps."""

from __future__ import annotations

import bz2
import contextlib
import gzip
import json
import lzma
import os
import tarfile
import zlib
from typing import Iterator, Optional

from gradcam_batch.config import DataConfig
from gradcam_batch.data.units import _MAX_EXTENDED_HEADER, WEBDATASET_IMAGE_EXTENSIONS, WEBDATASET_READ_EXTENSIONS, Unit, joins_sample, webdataset_key
from gradcam_batch.data.records import (MAX_SIDECAR_BYTES, RawSample, _describe_archive_error, label_from_text,
                                        printable)


# --- WebDataset tars --------------------------------------------------------------------------------


class _TarSample:
    """The members of one sample as they arrive, or why the sample is an error row."""

    def __init__(self, key: str):
        self.key = key
        self.members: dict[str, bytes] = {}  # .cls and .json
        self.image: Optional[bytes] = None
        self.image_rank: Optional[int] = None  # of the image kept, in WEBDATASET_IMAGE_EXTENSIONS' order
        self.image_member: Optional[tarfile.TarInfo] = None  # the image to read once the sample is complete
        self.extensions: set[str] = set()
        self.problem: Optional[tuple[str, str]] = None  # (error type, message)

    def refuse(self, error_type: str, message: str) -> None:
        if self.problem is None:  # the first problem names the sample's error
            self.problem = (error_type, message)


def _json_problem(error: Exception) -> str:
    if isinstance(error, json.JSONDecodeError):  # msg is the parser's words; what follows a colon quotes the data
        reason = error.msg.split(":")[0]
        return f"metadata (.json) is not valid JSON: {reason} at line {error.lineno} column {error.colno}"
    if isinstance(error, UnicodeDecodeError):
        return f"metadata (.json) is not valid {error.encoding} text at byte {error.start}"
    if isinstance(error, RecursionError):
        return "metadata (.json) nests arrays or objects too deeply to parse"
    return f"metadata (.json) cannot be parsed ({type(error).__name__})"


def _json_integer(digits: str):
    """An integer of the metadata. int() raises past 4300 digits (Python's limit on converting
    strings to integers), and a box coordinate past 308 digits fits no float, so that checking the
    box raised OverflowError: a number that long is no coordinate. It reads as the float it
    rounds to (inf past 308 digits), and the box holding it is skipped as any non-finite one."""
    return int(digits) if len(digits) <= 18 else float(digits)


def _wds_sample(sample: _TarSample) -> RawSample:
    sample_id = printable(sample.key)
    if sample.problem is not None:
        return RawSample(sample_id, -1, None, error=("read", *sample.problem))
    members = sample.members
    label, meta = -1, None
    if "cls" in members:
        try:
            label = label_from_text(members["cls"])
        except ValueError as error:
            return RawSample(sample_id, -1, None, error=("read", "ValueError", str(error)))
    if "json" in members:
        try:
            meta = json.loads(members["json"], parse_int=_json_integer)
        except (ValueError, RecursionError) as error:
            return RawSample(sample_id, -1, None, error=("read", type(error).__name__, _json_problem(error)))
    if sample.image is None:
        message = f"no image member ({'/'.join(WEBDATASET_IMAGE_EXTENSIONS)}) for key"
        return RawSample(sample_id, label, None, error=("read", "MissingImage", message))
    return RawSample(sample_id, label, sample.image, meta=meta if isinstance(meta, dict) else None)


def _member_kind(member: tarfile.TarInfo) -> str:
    for test, kind in ((member.issym, "symbolic link"), (member.islnk, "hard link"), (member.ischr, "character device"),
                       (member.isblk, "block device"), (member.isfifo, "FIFO"), (member.isdir, "directory")):
        if test():
            return kind
    return f"member of type {member.type!r}"


def _add_member(tar: tarfile.TarFile, member: tarfile.TarInfo, extension: str, sample: _TarSample,
                max_bytes: int, seekable: bool) -> None:
    """Reads a member into its sample, or records why the sample is an error row; sizes come
    from the header, so a refused member is never read. Of a sample's images only the one used
    is read, the first in WEBDATASET_IMAGE_EXTENSIONS' order: in an uncompressed tar it is read
    once the sample is complete (`_read_image`), and the others are seeked past; a compressed
    stream cannot go back, so an image that beats the one held replaces it, which is dropped
    first. Either way a sample holds one image at a time."""
    if sample.problem is not None:
        return  # an error row already: the rest of its members are not read
    name = printable(member.name)
    if not member.isfile():
        sample.refuse("NotRegularFile", f"member {name} is a {_member_kind(member)}, not a regular file; "
                                        "only regular files are read")
        return
    if extension not in WEBDATASET_READ_EXTENSIONS:
        return  # nothing the reader uses: passed over unread
    if extension in WEBDATASET_IMAGE_EXTENSIONS:
        limit, limit_name = max_bytes, f"data.max_bytes={max_bytes}"
    else:
        limit = min(max_bytes, MAX_SIDECAR_BYTES)
        limit_name = f"the {limit} bytes a .cls or .json member may hold"
    if member.size > limit:
        sample.refuse("TooLarge", f"member {name} holds {member.size} bytes, more than {limit_name}")
        return
    if extension in sample.extensions:
        sample.refuse("DuplicateMember", f"member {name} is the second .{extension} member of its sample")
        return
    sample.extensions.add(extension)
    if extension not in WEBDATASET_IMAGE_EXTENSIONS:
        sample.members[extension] = tar.extractfile(member).read()
        return
    rank = WEBDATASET_IMAGE_EXTENSIONS.index(extension)
    if sample.image_rank is not None and sample.image_rank < rank:
        return  # a preferred image is already there: this one is passed over unread
    sample.image_rank, sample.image = rank, None
    if seekable:
        sample.image_member = member
    else:
        sample.image = tar.extractfile(member).read()


def _read_image(tar: tarfile.TarFile, sample: _TarSample) -> None:
    """Reads the image an uncompressed sample kept for last (tarfile seeks back to it, and then
    on to where it was)."""
    if sample.image_member is not None and sample.problem is None:
        sample.image = tar.extractfile(sample.image_member).read()
    sample.image_member = None


class _BoundedReads:
    """The file object tarfile reads through. tarfile reads a pax or GNU long-name header whole,
    in one read of the size its header claims, so a hostile header would have it allocate
    gigabytes; no read here may exceed the largest member or header the reader accepts."""

    def __init__(self, stream, limit: int):
        self.stream, self.limit = stream, limit

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > self.limit:
            raise tarfile.ReadError(f"a header asks to read {size} bytes at once, more than the {self.limit} "
                                    "this reader allows")
        return self.stream.read(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.stream.seek(offset, whence)

    def tell(self) -> int:
        return self.stream.tell()


def _decompressing(handle, magic: bytes):
    """The tar inside a compressed shard as a file object, or None for an uncompressed one. The
    codecs' own readers expand data in bounded steps, so skipping a member of gigabytes reads
    through it in constant memory; tarfile's stream mode would hand each compressed block to
    bzip2 whole, which may expand a few kilobytes into gigabytes at once."""
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=handle, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(handle)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(handle)
    return None


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The archive's members in order. TarFile keeps every member it has read in a list, which a
    tar of millions of empty members would grow without bound; the reader needs none of them
    once the next is read."""
    while True:
        member = tar.next()
        if member is None:
            return
        tar.members.clear()
        yield member


def _check_end_of_archive(handle, offset: int) -> None:
    """tarfile treats a header cut short as the end of the archive; a complete uncompressed tar
    ends with two zero blocks, so anything else means the shard was truncated."""
    handle.seek(offset)
    tail = handle.read(1024)
    if len(tail) < 1024 or tail.count(0) != 1024:
        raise tarfile.ReadError(f"truncated tar: no end-of-archive marker after byte {offset}; "
                                "samples past that point are lost")


# What a damaged or hostile archive makes tarfile and the codecs raise: a ValueError or an
# OverflowError comes from header fields tarfile converts without checking (a sparse map, a size
# past what a seek takes).
_ARCHIVE_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, OverflowError, zlib.error, lzma.LZMAError)


def _webdataset(unit: Unit, cfg: DataConfig) -> Iterator[RawSample]:
    """Members `<key>.<ext>` grouped by key (shards.webdataset_key); consecutive members with one
    key form a sample. A slice starts at its first member's header and ends where the next slice
    begins; the last one (or a whole shard) reads to the end and checks the end-of-archive marker.

    One RawSample per sample: a key seen before in the shard (here, or in an earlier unit as the
    tar index recorded) is a duplicate-key error row; a link, device, FIFO or directory member
    with an extension the reader reads makes its sample an error row, and one without such an
    extension (a directory entry, a link named without one) is passed over (shards.joins_sample);
    members over data.max_bytes are refused from their header and skipped unread."""
    sample: Optional[_TarSample] = None
    keys_seen: set[str] = set()
    duplicates = set(unit.duplicate_samples)
    position = unit.start  # the shard-order index of the next sample
    read_limit = -(-max(cfg.max_bytes, _MAX_EXTENDED_HEADER) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    try:
        with contextlib.ExitStack() as stack:
            handle = stack.enter_context(open(unit.shard.path, "rb"))
            # a slice is an uncompressed tar by construction; a compressed shard is one unit
            decompressed = _decompressing(handle, handle.read(6)) if unit.whole else None
            handle.seek(unit.byte_start)
            if decompressed is not None:
                stack.enter_context(decompressed)
            tar = stack.enter_context(tarfile.open(fileobj=_BoundedReads(decompressed or handle, read_limit),
                                                   mode="r:", encoding="utf-8", errors="surrogateescape"))
            for member in _members(tar):
                if unit.byte_end is not None and member.offset >= unit.byte_end:
                    break  # the next slice's first sample
                key, extension = webdataset_key(member.name)
                if not joins_sample(extension, member.isfile()):
                    continue
                if sample is None or key != sample.key:
                    if sample is not None:
                        _read_image(tar, sample)
                        yield _wds_sample(sample)
                    sample = _TarSample(key)
                    if key in keys_seen or position in duplicates:
                        sample.refuse("DuplicateKey", "an earlier sample of this shard has the same key; "
                                                      "only the first is read")
                    keys_seen.add(key)
                    position += 1
                _add_member(tar, member, extension.lower(), sample, cfg.max_bytes, seekable=decompressed is None)
            else:
                if unit.byte_end is not None:  # tarfile ends quietly at a bad header; a slice must not
                    raise tarfile.ReadError(f"the archive ends before byte {unit.byte_end}, where this unit "
                                            "ends; the shard changed after it was listed")
            if sample is not None:
                _read_image(tar, sample)  # the last sample, while the archive is open
            if decompressed is None and unit.byte_end is None:
                _check_end_of_archive(handle, tar.offset)
    except _ARCHIVE_ERRORS as error:
        if sample is not None:  # whatever it had read may be only part of it
            yield RawSample(printable(sample.key), -1, None, error=(
                "read", type(error).__name__, "the archive breaks inside or right after this sample, so its "
                "members may be incomplete (the shard's <tar> error row says where)"))
            sample = None
        yield RawSample(f"{unit.unit_id}/<tar>", -1, None,
                        error=("read", type(error).__name__, _describe_archive_error(error)))
    if sample is not None:
        yield _wds_sample(sample)

