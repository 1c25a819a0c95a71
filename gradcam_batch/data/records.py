"""What a reader yields for each record, and the rules every reader applies to names, labels
and error messages: sample ids are valid UTF-8 whatever bytes the names hold, labels are plain
non-negative integers or an error, and no error message quotes what a file holds."""

from __future__ import annotations

import hashlib
import math
import re
import tarfile
from dataclasses import dataclass
from decimal import Decimal
from typing import Optional


MAX_LABEL = 2**63 - 1
"""Labels travel as int64 tensors."""
LABEL_RULE = "labels are plain non-negative integers below 2**63"
MAX_SIDECAR_BYTES = 1 << 20
"""Largest .cls or .json member read: a label or a few boxes take a few bytes, and a parsed JSON
document can take tens of times its size in memory."""
BOXES_READ = 64
"""The most boxes of one record that a reader hands on (transforms.MAX_BOXES, which reads no
more; a test holds the two equal): a Parquet cell's list is cut to these in Arrow, before
anything becomes a Python object."""


@dataclass
class RawSample:
    sample_id: str
    label: int  # -1 when unknown
    payload: Optional[bytes]  # encoded image; None when the sample failed before decoding
    meta: Optional[dict] = None  # e.g. {"box": [x0, y0, x1, y1]} in pixels
    error: Optional[tuple[str, str, str]] = None  # (stage, error type, message)


# --- names and labels ---------------------------------------------------------------------------

_NEEDS_ESCAPE = re.compile("[\\\\\ud800-\udfff]")


def printable(name: str) -> str:
    """A name from a tar header, a file system or a Parquet cell as valid UTF-8 text. Bytes that
    are not UTF-8 reach Python as lone surrogates (surrogateescape), which no Parquet writer
    accepts: each becomes the text `\\xNN`, and a backslash becomes `\\\\`, so the escaped form of
    one name is never another name as it stands."""
    return _NEEDS_ESCAPE.sub(_escape, name)


def _escape(match: re.Match) -> str:
    character = match.group()
    if character == "\\":
        return "\\\\"
    code = ord(character)
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


_ASCII_DIGITS = re.compile(rb"[0-9]+")


def label_from_text(text: bytes) -> int:
    """The label a .cls member or a Parquet text cell holds: ASCII digits, with surrounding
    whitespace allowed (files written by `echo` end in a newline). int() would also take signs,
    underscores and other scripts' digits. Raises ValueError, never quoting the text."""
    digits = text.strip(b" \t\r\n")
    if not _ASCII_DIGITS.fullmatch(digits):
        raise ValueError(f"the label is not a plain integer in ASCII digits ({len(text)} bytes); {LABEL_RULE}")
    significant = digits.lstrip(b"0") or b"0"
    if len(significant) > len(str(MAX_LABEL)) or int(significant) > MAX_LABEL:  # int() of a megabyte of digits is slow
        raise ValueError(f"the label does not fit in 64 bits; {LABEL_RULE}")
    return int(significant)


def _label_from_number(value) -> tuple[int, Optional[str]]:
    """(label, problem) of a numeric Parquet cell. A float column holds whole numbers where
    pandas wrote an integer column with a gap; those are labels, anything else is a problem."""
    if isinstance(value, (float, Decimal)):
        if not (value.is_finite() if isinstance(value, Decimal) else math.isfinite(value)):
            return -1, f"the label is NaN or infinite; {LABEL_RULE}"
        if value != int(value):
            return -1, f"the label is not a whole number; {LABEL_RULE}"
        value = int(value)
    if value < 0:
        return -1, f"the label is negative; {LABEL_RULE}"
    if value > MAX_LABEL:
        return -1, f"the label does not fit in 64 bits; {LABEL_RULE}"
    return value, None


def _label_from_string(value: str) -> tuple[int, Optional[str]]:
    try:
        return label_from_text(value.encode("utf-8", "surrogateescape")), None
    except ValueError as error:
        return -1, str(error)


# --- sample ids -----------------------------------------------------------------------------------


def parquet_sample_id(value, stem: str, row: int) -> str:
    """The sample id of a Parquet row: its id cell (data.id_column), or `<file stem>/<row>` where
    there is none, counting rows from the file's start whichever unit reads them."""
    if value is None:
        return f"{stem}/{row}"
    if isinstance(value, bytes):
        return printable(value.decode("utf-8", "surrogateescape"))
    return printable(str(value))


def id_digest(sample_id: str) -> bytes:
    """What a reader keeps of each id to find repeated ones: 16 bytes, however long the id."""
    return hashlib.blake2b(sample_id.encode("utf-8"), digest_size=16).digest()


def _file_system_words(error: OSError) -> str:
    where = f": {error.filename}" if error.filename is not None else ""
    return printable(f"{error.strerror or type(error).__name__}{where}")


def _describe_archive_error(error: BaseException) -> str:
    """A tar shard's error message: the file system's and tarfile's own words (names, sizes,
    offsets), and otherwise only the kind of damage, because codecs quote the bytes they stumble
    on (`Not a gzipped file (b'QZ')`) and int() the header field it cannot convert."""
    if isinstance(error, OSError) and error.errno is not None:
        return _file_system_words(error)
    if isinstance(error, tarfile.TarError):
        return printable(str(error).strip().split("\n")[0])[:500]
    if isinstance(error, EOFError):
        return "the compressed data ends before its end-of-stream marker: the shard is truncated"
    return f"damaged compressed data or a malformed header ({type(error).__name__})"


def _describe_parquet_error(error: BaseException) -> str:
    """A Parquet shard's error message: pyarrow's first line, which names the structure that
    failed (footer, thrift header, page), not the values in it."""
    if isinstance(error, OSError) and error.errno is not None:
        return _file_system_words(error)
    return printable(str(error).strip().split("\n")[0])[:300] or type(error).__name__



# --- refusals ---------------------------------------------------------------------------------------


class NotRegularFile(OSError):
    """A link, device, FIFO, socket or directory where a file was expected."""


class LinkOutsideRoot(OSError):
    """A link that leads out of data.root while data.follow_links is false."""


class PathOutsideRoot(OSError):
    """An image path in a Parquet cell that leads out of the Parquet file's folder (`..`, an
    absolute path elsewhere, a link) while data.follow_links is false."""


class TooLarge(OSError):
    """A file larger than data.max_bytes."""


