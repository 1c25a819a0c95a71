"""Reading Parquet row groups in bounded memory: batches sized from a row group's metadata and its
page headers, read before any page is (pyarrow exposes no page headers: they are read here, with
the few Thrift compact-protocol rules they need), so a small file that decodes to gigabytes is read
a bounded batch at a time, and a page no batch can bound becomes its rows' own error."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

READ_BUDGET = 128 << 20
"""parquet: about the most decoded column data one reader holds at once. Bytes on disk say little:
a dictionary repeats one value in every row that names it, run-length encoding turns a few bytes
into millions of list elements, a compressed page of kilobytes may hold gigabytes. Batches are
sized from the row group's metadata and its page headers, read before any page is."""
MAX_BATCH_ROWS = 256
PARQUET_BUFFER = 1 << 20
"""Column chunks are read through a buffer of this size, page by page, never whole (pyarrow's
default pre-buffering reads every chunk of a row group at once, gigabytes in a large one)."""
_VALUE_WIDTHS = {"BOOLEAN": 1, "INT32": 4, "FLOAT": 4, "INT64": 8, "DOUBLE": 8, "INT96": 12}
_PER_VALUE = 16  # the levels, offset and validity bit that come with each decoded value
_DENSE_COPIES = 4  # measured: decoding binary values into one array takes about 4x their bytes at its peak
_DICTIONARY_COPIES = 6  # measured: pyarrow's dictionary reader holds about 6x a row group's chunk, pages included
_MAX_PAGE_HEADER = 1 << 20
_MAX_PAGES = 1 << 20  # per column chunk: a gigabyte of 1 KiB pages; pyarrow's writer makes 1 MiB ones
_DICTIONARY_ENCODINGS = (2, 8)  # PLAIN_DICTIONARY, RLE_DICTIONARY


@dataclass
class RowGroupPlan:
    rows: int
    """Rows per batch: as many (up to MAX_BATCH_ROWS) as keep the batch under the budget, at
    least one (one value of up to data.max_bytes is read alone)."""
    readable: int
    """The row group's first rows that are read; the rest lie in or past a page too large to
    hold (a page is decompressed whole, and one that is skipped is still decompressed)."""
    stop_reason: Optional[str]
    """Why the rows from `readable` on are not read; None when all are."""
    unread: dict[str, tuple[str, str]]
    """Columns not read at all in this row group, and why (error type, message): list columns
    where one row might decode past the budget (it may hold every value of the row group, for
    all the metadata can tell), dictionary-typed columns that pyarrow would decode whole past
    it, a page over the limit in a column that cannot stop before it, headers that do not parse."""


def plan_row_group(file, source, group: int, columns: list[str], page_limits: Optional[dict] = None,
                   budget: int = READ_BUDGET) -> RowGroupPlan:
    """How to read `columns` of row group `group` of a pyarrow ParquetFile (opened on the
    NativeFile `source`) in bounded memory, from the column chunks' metadata and page headers.
    A page larger than its column's limit (page_limits, else the budget) is never decompressed."""
    metadata, schema = file.metadata.row_group(group), file.schema
    dictionary_typed = {name for name in columns if _holds_dictionary(file.schema_arrow.field(name).type)}
    costs: dict[str, list] = {name: [] for name in columns}  # per leaf: (fixed bytes, bytes of a batch of n rows)
    unread: dict[str, tuple[str, str]] = {}
    readable, stop_reason = metadata.num_rows, None
    for index in range(metadata.num_columns):
        chunk = metadata.column(index)
        path = chunk.path_in_schema
        name = next((name for name in columns if path == name or path.startswith(name + ".")), None)
        if name is None or name in unread:
            continue
        where = f"row group {group}'s {name} column"
        limit = (page_limits or {}).get(name, budget)
        try:
            dictionary, pages = _scan_pages(source, chunk)
        except (ValueError, IndexError, RecursionError, OSError):
            unread[name] = ("ValueError", f"{where} has page headers that cannot be read before its pages")
            continue
        leaf = schema.column(index)
        nested, typed = leaf.max_repetition_level > 0, name in dictionary_typed
        too_large = next((page for page in pages if page.size > limit), None)
        if dictionary > limit or (too_large is not None and (nested or typed or too_large.first_row == 0)):
            largest = dictionary if dictionary > limit else too_large.size
            unread[name] = ("TooLarge", f"{where} has a page of {largest} bytes, more than the {limit} a reader "
                                        "decompresses at once; write smaller pages or row groups")
            continue
        if too_large is not None:
            pages = pages[:pages.index(too_large)]
            if too_large.first_row < readable:
                readable, stop_reason = too_large.first_row, (
                    f"{where} has a page of {too_large.size} bytes from its row {too_large.first_row} on, more than "
                    f"the {limit} a reader decompresses at once; write smaller pages (pyarrow: data_page_size, "
                    "write_batch_size) or row groups")
        page_bytes = dictionary + 2 * max([dictionary, *(page.size for page in pages)])  # decoded, compressed + not
        values = max(chunk.num_values, 0)
        binary = chunk.physical_type == "BYTE_ARRAY"
        if binary:
            entry = dictionary if any(page.dictionary_encoded for page in pages) else 0
            per_row = entry + _PER_VALUE
        else:
            width = (max(leaf.length or 0, 0) if chunk.physical_type == "FIXED_LEN_BYTE_ARRAY"
                     else _VALUE_WIDTHS.get(chunk.physical_type, 16))
            per_row = width + _PER_VALUE
        if nested:  # a list: one row may hold every value of the row group
            cost = page_bytes + (_DENSE_COPIES * (values * per_row + sum(page.size for page in pages)) if binary
                                 else values * per_row)  # measured: 24.6 bytes per double of list<list<double>>
            if cost > budget:
                unread[name] = ("TooLarge", f"{where} holds {values} list elements, about {cost} bytes decoded, and "
                                            f"one row may hold them all: more than the {budget} a reader holds")
            else:
                costs[name].append((cost, lambda rows: 0))
            continue
        if typed:
            page_bytes = _DICTIONARY_COPIES * max(chunk.total_uncompressed_size, 0)
            if page_bytes > budget:
                unread[name] = ("TooLarge", f"{where} is dictionary-typed, which pyarrow decodes a row group at a "
                                            f"time: about {page_bytes} bytes, more than the {budget} a reader holds; "
                                            "write a plain column")
                continue
        if binary:
            costs[name].append((page_bytes, _batch_bound([page for page in pages if not page.dictionary_encoded],
                                                         per_row)))
        else:
            costs[name].append((page_bytes, lambda rows, per_row=per_row: 2 * rows * per_row))
    kept = [name for name in columns if name not in unread]

    def batch_cost(rows: int) -> int:
        return sum(fixed + bound(rows) for name in kept for fixed, bound in costs[name])

    low, high = 1, MAX_BATCH_ROWS
    while low < high:  # the most rows whose batch stays under the budget
        middle = (low + high + 1) // 2
        if batch_cost(middle) <= budget:
            low = middle
        else:
            high = middle - 1
    if 0 < readable < metadata.num_rows:  # no batch may reach into the page that is not read
        low = next(rows for rows in range(low, 0, -1) if readable % rows == 0)
    return RowGroupPlan(low, readable, stop_reason, unread)


def _batch_bound(plain_pages: list, per_row: int):
    """bytes(rows): the most a batch of `rows` rows of a binary column can hold at once, decoded:
    every plain page it touches whole (a value lies within its page, and any one may be the large
    one), and per row a dictionary entry and the row's own overhead."""
    prefix = [0, *itertools.accumulate(page.size for page in plain_pages)]

    def bound(rows: int) -> int:
        most, last = 0, 0
        for first, page in enumerate(plain_pages):  # a batch whose first plain page is `page`
            reach = page.first_row + page.rows + rows - 1
            last = max(last, first + 1)
            while last < len(plain_pages) and plain_pages[last].first_row < reach:
                last += 1
            most = max(most, prefix[last] - prefix[first])
        return _DENSE_COPIES * (most + rows * per_row)
    return bound


@dataclass
class _Page:
    first_row: int
    rows: int
    size: int  # uncompressed bytes
    dictionary_encoded: bool


def _scan_pages(source, chunk) -> tuple[int, list[_Page]]:
    """(the dictionary page's uncompressed size or 0, the data pages) of a column chunk, read
    from the page headers alone (Thrift compact protocol), as pyarrow would walk them. Rows per
    page count values, which is rows for a column that is not a list. Raises ValueError or
    IndexError where the headers do not parse."""
    start = chunk.data_page_offset
    if chunk.has_dictionary_page and 0 < (chunk.dictionary_page_offset or 0) < start:
        start = chunk.dictionary_page_offset
    end = start + max(chunk.total_compressed_size, 0)
    dictionary, pages, row, at = 0, [], 0, start
    while at < end:
        if len(pages) >= _MAX_PAGES:
            raise ValueError(f"more than {_MAX_PAGES} pages in one column chunk")
        header, length = _page_header(source, at, end)
        kind, size, compressed = header.get(1), header.get(2, -1), header.get(3, -1)
        if size < 0 or compressed < 0:
            raise ValueError("a page header without sizes")
        if kind == 2:  # DICTIONARY_PAGE
            dictionary = max(dictionary, size)
        elif kind in (0, 3):  # DATA_PAGE, DATA_PAGE_V2
            data = header.get(5 if kind == 0 else 8)
            data = data if isinstance(data, dict) else {}
            rows = data.get(3 if kind == 3 else 1, -1)
            if rows < 0:
                raise ValueError("a data page header without its count")
            pages.append(_Page(row, rows, size, data.get(2 if kind == 0 else 4) in _DICTIONARY_ENCODINGS))
            row += rows
        at += length + compressed
    return dictionary, pages


def _page_header(source, at: int, end: int) -> tuple[dict, int]:
    """(the fields of the page header at `at`, its length in bytes)."""
    for size in (256, 1 << 16, _MAX_PAGE_HEADER):
        data = source.read_at(min(size, end - at), at)
        try:
            return _thrift_struct(data, 0, 0)
        except IndexError:
            if len(data) < size:
                raise
    raise ValueError(f"a page header longer than {_MAX_PAGE_HEADER} bytes")


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]  # IndexError: the header runs past what was read
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
        if shift > 70:
            raise ValueError("a varint longer than 10 bytes")


def _zigzag(value: int) -> int:
    return (value >> 1) ^ -(value & 1)


def _thrift_struct(data: bytes, at: int, depth: int) -> tuple[dict, int]:
    """A Thrift compact-protocol struct: {field id: integer or struct}; other fields are skipped."""
    if depth > 8:
        raise ValueError("Thrift structs nested too deeply")
    fields: dict = {}
    field_id = 0
    while True:
        byte = data[at]
        at += 1
        if byte == 0:
            return fields, at
        delta, kind = byte >> 4, byte & 0x0F
        if delta:
            field_id += delta
        else:
            value, at = _varint(data, at)
            field_id = _zigzag(value)
        if kind in (4, 5, 6):
            value, at = _varint(data, at)
            fields[field_id] = _zigzag(value)
        elif kind == 12:
            fields[field_id], at = _thrift_struct(data, at, depth + 1)
        else:
            at = _thrift_skip(data, at, kind, depth + 1)


def _thrift_skip(data: bytes, at: int, kind: int, depth: int, element: bool = False) -> int:
    if depth > 8:
        raise ValueError("Thrift values nested too deeply")
    if kind in (1, 2):
        return at + 1 if element else at  # a boolean field lives in its type; a list element takes a byte
    if kind == 3:
        at += 1
    elif kind in (4, 5, 6):
        at = _varint(data, at)[1]
    elif kind == 7:
        at += 8
    elif kind == 8:
        length, at = _varint(data, at)
        at += length
    elif kind in (9, 10):
        byte = data[at]
        count, inner = byte >> 4, byte & 0x0F
        at += 1
        if count == 15:
            count, at = _varint(data, at)
        for _ in range(count):
            at = _thrift_skip(data, at, inner, depth + 1, element=True)
    elif kind == 11:
        count, at = _varint(data, at)
        if count:
            byte = data[at]
            at += 1
            for _ in range(count):
                at = _thrift_skip(data, at, byte >> 4, depth + 1, element=True)
                at = _thrift_skip(data, at, byte & 0x0F, depth + 1, element=True)
    elif kind == 12:
        at = _thrift_struct(data, at, depth)[1]
    else:
        raise ValueError(f"unknown Thrift type {kind}")
    if at > len(data):
        raise IndexError("the header runs past what was read")
    return at


def _holds_dictionary(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_dictionary(kind) or any(_holds_dictionary(kind.field(index).type)
                                               for index in range(kind.num_fields))


def row_group_batches(file, group: int, columns: list[str], rows: int, readable: int):
    """(row count, record batch) of `rows` rows at a time over the row group's first `readable`
    rows; (row count, None) where no column is read, so that every row still gets its row. The
    batches stop at `readable` without asking for more: the next page is not decompressed."""
    if columns and readable:
        done = 0
        for batch in file.iter_batches(batch_size=rows, row_groups=[group], columns=columns, use_threads=False):
            yield batch.num_rows, batch
            done += batch.num_rows
            if done >= readable:
                return
        return
    remaining = readable
    while remaining > 0:
        yield min(rows, remaining), None
        remaining -= rows
