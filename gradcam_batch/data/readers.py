"""Readers per shard format. Each reads one work unit (a shard, or a slice of one) and yields
RawSample records in shard order; nothing here decodes images, so the same readers feed CPU
workers and device decoders.

Input is hostile until read. Every record leaves a reader as exactly one RawSample, a payload or
an error, and a bad record is its own error row, never its shard's (the rules are in
`records`); files that are not regular files, or that are larger than data.max_bytes, are
refused before their data is read. ImageFolder files and the image files that Parquet cells
name by path (`datasets` writes struct<bytes: null, path>) follow one set of rules: only
regular files, only inside their root (data.root; the Parquet file's folder) unless
data.follow_links=true. The tar reader lives in `webdataset`."""

from __future__ import annotations

import itertools
import logging
import os
import stat
from typing import Iterator, Optional

from gradcam_batch.config import DataConfig
from gradcam_batch.data.shards import Shard, _inside
from gradcam_batch.data.parquet_plan import PARQUET_BUFFER, READ_BUDGET, plan_row_group, row_group_batches
from gradcam_batch.data.units import Unit, as_unit
from gradcam_batch.data.records import (BOXES_READ, LABEL_RULE, LinkOutsideRoot, NotRegularFile, PathOutsideRoot,
                                        RawSample, TooLarge, _describe_parquet_error, _file_system_words,
                                        _label_from_number, _label_from_string, id_digest, parquet_sample_id,
                                        printable)
from gradcam_batch.data.webdataset import _webdataset

log = logging.getLogger("gradcam_batch")


# --- ImageFolder ------------------------------------------------------------------------------------


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return kind
    return "special file"


def _read_regular_file(path: str, root_real: str, cfg: DataConfig) -> bytes:
    """The bytes of an ImageFolder file: inside data.root unless data.follow_links, then as
    `_read_file` reads it."""
    if not cfg.follow_links and not _inside(os.path.realpath(path), root_real):
        raise LinkOutsideRoot("the file is a link that leads outside data.root; set data.follow_links=true "
                              "to read such files")
    return _read_file(path, cfg.max_bytes)


def _read_file(path: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most max_bytes. The type and size are checked before
    the file is opened (opening a FIFO waits for a writer; /dev/zero never ends) and again on
    the open descriptor, in case the name was swapped in between."""
    _check_regular(os.stat(path), max_bytes)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
    with open(os.open(path, flags), "rb") as handle:
        size = os.fstat(handle.fileno())
        _check_regular(size, max_bytes)
        # read(max_bytes + 1) would allocate that whole buffer for every file: read what the
        # file holds, plus one byte to see it grew past the limit since fstat
        payload = handle.read(min(size.st_size, max_bytes) + 1)
        while len(payload) <= max_bytes and (more := handle.read(min(1 << 20, max_bytes + 1 - len(payload)))):
            payload += more
    if len(payload) > max_bytes:
        raise TooLarge(f"the file grew past data.max_bytes={max_bytes} while it was read")
    return payload


def _check_regular(status: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(status.st_mode):
        raise NotRegularFile(f"the file is a {_file_kind(status.st_mode)}, not a regular file; "
                             "only regular files are read")
    if status.st_size > max_bytes:
        raise TooLarge(f"the file holds {status.st_size} bytes, more than data.max_bytes={max_bytes}")


def _imagefolder(unit: Unit, cfg: DataConfig) -> Iterator[RawSample]:
    root_real = os.path.realpath(unit.shard.root)
    for relative, label in unit.files():
        sample_id = printable(relative)
        try:
            payload = _read_regular_file(os.path.join(unit.shard.root, relative), root_real, cfg)
        except OSError as error:
            refused = isinstance(error, (NotRegularFile, LinkOutsideRoot, TooLarge))
            message = str(error) if refused else _file_system_words(error)
            yield RawSample(sample_id, label, None, error=("read", type(error).__name__, message))
            continue
        yield RawSample(sample_id, label, payload)


# --- Parquet ----------------------------------------------------------------------------------------


def _is_binary(kind) -> bool:
    import pyarrow as pa

    return (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind)
            or pa.types.is_binary_view(kind))


def _is_text(kind) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
            or _is_binary(kind))


def _image_source(schema, name: str) -> tuple[Optional[str], bool, Optional[str]]:
    """(how the image column holds images: "binary", "struct" or "null"; whether its structs
    name image files in a `path` field, as `datasets` writes images it read from local files;
    or the problem that makes every row an error row). Strings, integers and lists hold no
    encoded image: bytes() of an integer n would allocate n zero bytes."""
    import pyarrow as pa

    found = schema.get_all_field_indices(name)
    if len(found) != 1:
        return None, False, f"this file has {len(found)} columns named {name!r} (data.image_column); expected one"
    kind = schema.field(found[0]).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if _is_binary(kind):
        return "binary", False, None
    if pa.types.is_null(kind):
        return "null", False, None
    if pa.types.is_struct(kind):
        bytes_index, path_index = kind.get_field_index("bytes"), kind.get_field_index("path")
        has_path = path_index >= 0 and _is_text(kind.field(path_index).type)
        if bytes_index >= 0:
            inner = kind.field(bytes_index).type
            if _is_binary(inner) or pa.types.is_null(inner):
                return "struct", has_path, None
        elif has_path:
            return "struct", True, None
    return None, False, (f"image column {name!r} has type {kind}; images are binary, struct<bytes: binary> or "
                         "struct<bytes, path: string> (data.image_column)")


def _image_cells(column, source: str):
    """The column's encoded images as a binary array (null where a row has none)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if source == "struct":
        if column.type.get_field_index("bytes") < 0:
            return None
        column = pc.struct_field(column, "bytes")  # null where the struct itself is null
    if pa.types.is_null(column.type):
        return None
    if pa.types.is_binary_view(column.type):
        column = column.cast(pa.large_binary())  # binary_length has no kernel for views
    return column


def _path_cells(column):
    """The struct column's image paths as a large_binary array (null where a row has none):
    bytes, so that a name that is not UTF-8 reaches the file system as it is."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    paths = pc.struct_field(column, "path")
    if pa.types.is_dictionary(paths.type):
        paths = paths.dictionary_decode()
    return paths.cast(pa.large_binary())


MAX_PATH_BYTES = 4096
"""Longest image path read from a Parquet cell (Linux's PATH_MAX); a longer cell is refused
before it is copied out of its batch."""
_EMBED_HINT = ("or embed the images in the Parquet file (datasets: apply datasets.table.embed_table_storage "
               "to the table before writing it)")


def _shown(path: str) -> str:
    """A path in a message: one line of valid UTF-8 (repr escapes control characters and the
    surrogates that stand for bytes that are not UTF-8), at most a few hundred characters."""
    return repr(path) if len(path) <= 300 else f"{path[:300]!r}..."


def _read_image_path(raw: bytes, folder: str, folder_real: str, cfg: DataConfig) -> tuple[Optional[bytes],
                                                                                          Optional[tuple[str, str]]]:
    """(the bytes of the image file a Parquet cell names, None), or (None, (error type, message)).
    A relative path is read from the Parquet file's folder. As for ImageFolder files, a path
    that resolves outside that folder (`..`, an absolute path elsewhere, a link) is refused
    unless data.follow_links=true, and only regular files of at most data.max_bytes are read."""
    name = os.fsdecode(raw)
    path = os.path.join(folder, name)
    where = _shown(os.path.normpath(path))
    try:
        if "\0" in name:
            raise ValueError("it holds a NUL byte, which no file name can")
        if not cfg.follow_links and not _inside(os.path.realpath(path), folder_real):
            raise PathOutsideRoot(f"it leads outside the Parquet file's folder {_shown(os.path.abspath(folder))}; "
                                  f"set data.follow_links=true to read images outside it, {_EMBED_HINT}")
        return _read_file(path, cfg.max_bytes), None
    except (ValueError, NotRegularFile, TooLarge, PathOutsideRoot) as error:
        kind, message = type(error).__name__, str(error)
    except (FileNotFoundError, NotADirectoryError) as error:
        kind = type(error).__name__
        message = (f"{error.strerror}: {where}; relative paths are read from the Parquet file's folder: "
                   f"put the image there, {_EMBED_HINT}")
    except OSError as error:  # permissions, a loop of links: the file system's words, never the file's
        kind = type(error).__name__
        message = f"{error.strerror or kind}: {where}"
    return None, (kind, f"image path {_shown(name)}: {message}")


def _parquet_labels(column) -> list[tuple[int, Optional[str]]]:
    """(label, problem) per cell of a label column; -1 where the cell is null."""
    import pyarrow as pa

    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.dictionary_decode(), kind.value_type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        convert = _label_from_number
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        convert = _label_from_string
    else:  # booleans, lists, structs, bytes, dates: no value of these types is a label
        problem = f"the label is a {kind} value; {LABEL_RULE}"
        return [(-1, problem) if valid else (-1, None) for valid in column.is_valid().to_pylist()]
    return [(-1, None) if value is None else convert(value) for value in column.to_pylist()]


def _is_list(kind) -> bool:
    import pyarrow as pa

    return (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
            or pa.types.is_list_view(kind) or pa.types.is_large_list_view(kind))


def _is_number(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def _holds_boxes(kind) -> bool:
    """Whether a column of this type can hold boxes: one box as a list of numbers, or a list of
    such lists. No value of another type is a box, so such a column is not read at all."""
    return _is_list(kind) and (_is_number(kind.value_type) or (_is_list(kind.value_type)
                                                               and _is_number(kind.value_type.value_type)))


def _parquet_boxes(column) -> list[Optional[list]]:
    """Each cell of a boxes column (of a type `_holds_boxes`) as Python lists, cut in Arrow to the
    first BOXES_READ boxes of five numbers at most (a box of more than four numbers is no box,
    cut or not), so that a cell of a million boxes never becomes a million Python lists."""
    import pyarrow.compute as pc

    kind = column.type
    cut = pc.list_slice(column, 0, BOXES_READ, return_fixed_size_list=False)
    if _is_number(kind.value_type):  # one box given as `boxes`: [x0, y0, x1, y1]
        return cut.to_pylist()
    lengths = pc.list_value_length(cut).to_pylist()  # null for a null cell
    boxes = pc.list_slice(cut.flatten(), 0, 5, return_fixed_size_list=False).to_pylist()
    cells, taken = [], 0
    for length in lengths:
        cells.append(None if length is None else boxes[taken:taken + length])
        taken += length or 0
    return cells


def _single_column(schema, name: Optional[str]) -> Optional[str]:
    return name if name and len(schema.get_all_field_indices(name)) == 1 else None


PAGE_SLACK = 1 << 16
"""A page holding one image of data.max_bytes also holds the value's length and levels."""


def _parquet(unit: Unit, cfg: DataConfig) -> Iterator[RawSample]:
    """One RawSample per row. A row whose label is no label, or whose image cell is empty or
    larger than data.max_bytes, or names an image file that is refused or cannot be read
    (`_read_image_path`), or whose id an earlier row of the shard has, is that row's error row;
    an image column of a type that holds no images makes every row an error row; only damage to
    the file itself ends it.

    Each row group is read in batches that `plan_row_group` sizes from its metadata and page
    headers so that the decoded columns stay under READ_BUDGET. Rows that cannot be read in
    bounded memory, even one at a time (their image, label or id lies in a page over the limit
    or in a column pyarrow would decode whole), are each their own TooLarge error row; boxes
    that cannot be are left unread, with a warning."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    stem = printable(os.path.splitext(os.path.basename(unit.shard.path))[0])
    try:
        # opened by its bytes: pyarrow encodes a str path as strict UTF-8, which fails for a file
        # name that is not UTF-8
        with pa.OSFile(os.fsencode(unit.shard.path)) as source_file:
            file = pq.ParquetFile(source_file, pre_buffer=False, buffer_size=PARQUET_BUFFER)
            schema = file.schema_arrow
            source, has_paths, image_problem = _image_source(schema, cfg.image_column)
            label_column = _single_column(schema, cfg.label_column)
            id_column = _single_column(schema, cfg.id_column)
            boxes_column = _single_column(schema, getattr(cfg, "boxes_column", None))
            if boxes_column and not _holds_boxes(schema.field(boxes_column).type):
                boxes_column = None
            image_column = cfg.image_column if source in ("binary", "struct") else None
            columns = [column for column in (image_column, label_column, id_column, boxes_column) if column]
            page_limits = {image_column: max(READ_BUDGET, cfg.max_bytes + PAGE_SLACK)}
            # image paths are read from the folder the file was listed in, as data.root is
            folder = os.path.dirname(unit.shard.path) or os.curdir
            folder_real = os.path.realpath(folder)
            # a repeated id is the later row's error row; the listing found those whose first
            # occurrence lies in an earlier unit
            seen_ids: set[bytes] = set()
            duplicates = set(unit.duplicate_samples)
            row = unit.start  # default ids number rows from the file's start, whichever slice reads them
            groups = unit.row_groups if unit.row_groups is not None else range(file.metadata.num_row_groups)
            for group in groups:
                plan = plan_row_group(file, source_file, group, columns, page_limits)
                if boxes_column in plan.unread:
                    log.warning("%s: %s; its rows are read without boxes", unit.unit_id, plan.unread[boxes_column][1])
                unread = [problem for column, problem in plan.unread.items() if column != boxes_column]
                read = [column for column in columns if column not in plan.unread]
                batches = row_group_batches(file, group, read, plan.rows, plan.readable)
                past = file.metadata.row_group(group).num_rows - plan.readable  # rows in or after a page too large
                stopped = [(past, None, ("TooLarge", plan.stop_reason))] if past > 0 else []
                for count, batch, refused in itertools.chain(((count, batch, None) for count, batch in batches),
                                                             stopped):
                    present = {name: batch.column(name) for name in read} if batch is not None else {}
                    refused = unread[0] if unread else refused
                    images = present.get(image_column)
                    image_cells = _image_cells(images, source) if images is not None else None
                    sizes = pc.binary_length(image_cells).to_pylist() if image_cells is not None else [None] * count
                    paths = _path_cells(images) if has_paths and images is not None else None
                    path_sizes = pc.binary_length(paths).to_pylist() if paths is not None else [None] * count
                    labels = (_parquet_labels(present[label_column]) if label_column in present
                              else [(-1, None)] * count)
                    ids = present[id_column].to_pylist() if id_column in present else [None] * count
                    boxes = _parquet_boxes(present[boxes_column]) if boxes_column in present else [None] * count
                    for index in range(count):
                        sample_id = parquet_sample_id(ids[index], stem, row)
                        repeated = False
                        if id_column:
                            digest = id_digest(sample_id)
                            repeated = digest in seen_ids or row in duplicates
                            seen_ids.add(digest)
                        row += 1
                        label, label_problem = labels[index]
                        size, path_size = sizes[index], path_sizes[index]
                        payload = None
                        if repeated:
                            error = ("DuplicateKey", "an earlier row of this shard has the same id (data.id_column); "
                                                     "only the first is read")
                        elif image_problem is not None:
                            error = ("UnsupportedImageColumn", image_problem)
                        elif refused is not None:
                            error = refused
                        elif label_problem is not None:
                            error = ("ValueError", label_problem)
                        elif size:  # a cell with both bytes and a path is read from its bytes
                            if size > cfg.max_bytes:
                                error = ("TooLarge", f"the image cell holds {size} bytes, more than "
                                                     f"data.max_bytes={cfg.max_bytes}")
                            else:
                                payload = image_cells[index].as_py()  # one cell at a time, not the batch
                        elif path_size and path_size > MAX_PATH_BYTES:
                            error = ("ValueError", f"the image path holds {path_size} bytes, more than a file path "
                                                   f"can ({MAX_PATH_BYTES})")
                        elif path_size:
                            payload, error = _read_image_path(paths[index].as_py(), folder, folder_real, cfg)
                        else:
                            error = ("MissingImage", "empty image cell (no bytes and no path)" if has_paths
                                     else "empty image cell")
                        if payload is not None:
                            meta = {"boxes": boxes[index]} if boxes[index] is not None else None
                            yield RawSample(sample_id, label, payload, meta=meta)
                        else:
                            yield RawSample(sample_id, label, None, error=("read", *error))
    except (OSError, ValueError, pa.ArrowException) as error:  # pyarrow: ArrowInvalid is a ValueError
        yield RawSample(f"{unit.unit_id}/<parquet>", -1, None,
                        error=("read", type(error).__name__, _describe_parquet_error(error)))


def iter_samples(unit: Unit | Shard, cfg: DataConfig) -> Iterator[RawSample]:
    """The samples of a unit (a shard given here is read whole)."""
    unit = as_unit(unit)
    if unit.shard.format == "imagefolder":
        return _imagefolder(unit, cfg)
    if unit.shard.format == "webdataset":
        return _webdataset(unit, cfg)
    return _parquet(unit, cfg)
