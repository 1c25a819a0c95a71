"""What an output folder holds: its manifest, its part files and their common schema (or a
one-line ReportError saying why the folder cannot be reported on), and the reading of the part
files one record batch at a time, restricted to the rows the report covers.

The folder may come from someone else, so nothing in it is trusted until checked: the manifest
is read only when small enough, and only as the JSON object of objects a run writes; of the
files in cams/ and errors/ only the tool's part files are read (named as writer.part_name names
them, for a unit the manifest's listing holds where it has one, with the tool's metadata and
columns, holding rows of their own unit's shard only). The others are skipped and named."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gradcam_batch.summary import default_layer

PROG = "gradcam-batch-report"
MANIFEST_NAME = "_manifest.json"
METADATA_KEY = b"gradcam_batch"
REQUIRED_COLUMNS = ("sample_id", "shard", "label", "target_class", "target_rank", "prob", "cam", "cam_height",
                    "cam_width", "layer")
"""Columns every gradcam-batch output has had; the report refuses a folder whose cams lack one."""
OPTIONAL_COLUMNS = ("pred_class", "pointing_hit", "border_mass", "entropy")
"""Columns the report uses where the part files have them (the gallery rows carry them)."""
ERROR_COLUMNS = ("sample_id", "shard", "stage", "error_type", "message")
MAX_MANIFEST_BYTES = 64 << 20
"""A manifest holds the config, the listing and a few counts: megabytes for millions of units."""
OBJECT_FIELDS = ("config", "config.data", "config.model", "config.cam", "config.output", "identity", "listing",
                 "listing.shards", "listing.units", "units", "shards", "preprocessing", "this_run", "last_run",
                 "pointing", "zero_maps", "versions")
"""Manifest fields the report reads as JSON objects (null or absent: not recorded)."""
PART_FILE = re.compile(r"part-(?P<unit>(?P<shard>[A-Za-z0-9_-][A-Za-z0-9._-]*)(?:@[0-9]+-[0-9]+)?)\.parquet")
"""writer.part_name: part-<unit id>.parquet, the unit id a shard id (shards.safe_shard_id) or
<shard id>@<start>-<end> for a slice of it."""


class ReportError(Exception):
    """The folder cannot be reported on: one line, exit code 2."""


@dataclass
class Source:
    output_dir: Path
    manifest: dict
    manifest_origin: str
    cam_files: list[Path]
    error_files: list[Path]
    schema: pa.Schema
    total_rows: int
    raw_max_known: bool = False
    """Every row of every part file holds a cam_max_raw (the files' statistics say so): whether a
    map is all zero can then be read from it, without reading the maps."""
    embedded: dict = field(default_factory=dict)
    """The part files' own metadata (the resolved config, target layers, ...), where they hold it."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(path relative to the folder, why) of the files in cams/ and errors/ that are not read:
    not this tool's part files of this output."""

    @property
    def columns(self) -> set[str]:
        return set(self.schema.names)

    def has(self, column: str) -> bool:
        return column in self.columns


def _footer(path: Path) -> pq.FileMetaData:
    try:
        return pq.read_metadata(path)
    except (OSError, ValueError, pa.ArrowException) as error:
        raise ReportError(f"cannot read {path}: {_first_line(error)}") from error


def _readable_schema(path: Path, metadata: Optional[pq.FileMetaData] = None
                     ) -> tuple[pa.Schema, int, Optional[bytes], bool]:
    """The file's schema, rows, embedded metadata, and whether its statistics show a cam_max_raw
    in every row (from `metadata`, its footer, where already read)."""
    metadata = metadata or _footer(path)
    schema = metadata.schema.to_arrow_schema()
    return (schema.remove_metadata(), metadata.num_rows, (schema.metadata or {}).get(METADATA_KEY),
            _raw_max_everywhere(metadata))


def _raw_max_everywhere(metadata: pq.FileMetaData) -> bool:
    names = [metadata.schema.column(index).path for index in range(metadata.num_columns)]
    if "cam_max_raw" not in names:
        return False
    column = names.index("cam_max_raw")
    for group in range(metadata.num_row_groups):
        statistics = metadata.row_group(group).column(column).statistics
        if statistics is None or not statistics.has_null_count or statistics.null_count:
            return False
    return True


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _json_type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _json_object(text: str, where: str) -> dict:
    """A JSON object of JSON objects where OBJECT_FIELDS says so, or ReportError naming the field."""
    if not text.strip():
        raise ReportError(f"{where} is empty; it is not a manifest gradcam-batch wrote (rerun into a new "
                          f"output.dir, or delete it to report from the part files' metadata)")
    try:
        value = json.loads(text)
    except RecursionError:
        raise ReportError(f"cannot read {where}: JSON nested too deeply") from None
    except ValueError as error:
        raise ReportError(f"cannot read {where}: {_first_line(error)}") from error
    if not isinstance(value, dict):
        raise ReportError(f"{where} is not a gradcam-batch manifest (it holds {_json_type(value)}, not a JSON "
                          "object)")
    for name in OBJECT_FIELDS:
        inner: object = value
        for key in name.split("."):
            inner = inner.get(key) if isinstance(inner, dict) else None
        if inner is not None and not isinstance(inner, dict):
            raise ReportError(f"{where} is not a gradcam-batch manifest ({name} is {_json_type(inner)}, not a "
                              "JSON object)")
    return value


def _read_manifest(manifest_path: Path) -> dict:
    try:
        size = manifest_path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ReportError(f"{manifest_path} holds {size:,} bytes, over the {MAX_MANIFEST_BYTES >> 20} MiB a "
                              "manifest can take; it is not one gradcam-batch wrote")
        text = manifest_path.read_bytes().decode("utf-8")
    except (OSError, ValueError) as error:
        raise ReportError(f"cannot read {manifest_path}: {_first_line(error)}") from error
    return _json_object(text, str(manifest_path))


def _run_units(manifest: dict) -> Optional[set[str]]:
    """The unit ids of the run (the manifest's listing, else its completed units); None where the
    folder records none (no manifest, or one written before units were recorded)."""
    listed = (manifest.get("listing") or {}).get("units") or manifest.get("units")
    return set(listed) if listed else None


def _shard_values(metadata: pq.FileMetaData) -> Optional[tuple[str, str]]:
    """(min, max) of the shard column over the file, from the footer's statistics; None where a
    row group lacks them."""
    names = [metadata.schema.column(index).path for index in range(metadata.num_columns)]
    if "shard" not in names:
        return None
    column, low, high = names.index("shard"), None, None
    for group in range(metadata.num_row_groups):
        if not metadata.row_group(group).num_rows:
            continue
        statistics = metadata.row_group(group).column(column).statistics
        if statistics is None or not statistics.has_min_max or statistics.null_count:
            return None
        low = statistics.min if low is None else min(low, statistics.min)
        high = statistics.max if high is None else max(high, statistics.max)
    return (low, high) if low is not None else None


def _whose(path: Path, columns: tuple[str, ...], units: Optional[set[str]]) -> pq.FileMetaData | str:
    """The footer of one of this tool's part files of this output, or why `path` is not one."""
    if path.is_symlink() or not path.is_file():
        return "a link or not a regular file"
    name = PART_FILE.fullmatch(path.name)
    if name is None:
        return "not a part file name (part-<unit>.parquet)"
    if units is not None and name.group("unit") not in units:
        return "not a unit of the run's listing"
    metadata = _footer(path)
    schema = metadata.schema.to_arrow_schema()
    if METADATA_KEY not in (schema.metadata or {}):
        return "no gradcam-batch metadata (not written by gradcam-batch: a copy or a merge?)"
    missing = [column for column in columns if column not in schema.names]
    if missing:
        return f"not this tool's columns (no {', '.join(missing)})"
    values = _shard_values(metadata)
    if values is not None and values != (name.group("shard"),) * 2:
        return f"holds rows of other shards than {name.group('shard')} (a copy or a merge?)"
    return metadata


def _part_files(output_dir: Path, folder: str, columns: tuple[str, ...], units: Optional[set[str]]
                ) -> tuple[dict[Path, pq.FileMetaData], list[tuple[str, str]]]:
    """This tool's part files in `folder` with their footers, and (name, why) of the others."""
    kept, skipped = {}, []
    if (output_dir / folder).is_symlink():  # nothing is listed or read through a link planted in the folder
        return kept, [(f"{folder}/", "a link, not the folder a run writes")]
    for path in sorted((output_dir / folder).glob("*.parquet")):
        footer = _whose(path, columns, units)
        if isinstance(footer, str):
            skipped.append((f"{folder}/{path.name}", footer))
        else:
            kept[path] = footer
    return kept, skipped


def _skipped_text(skipped: list[tuple[str, str]], shown: int = 3) -> str:
    named = "; ".join(f"{name}: {why}" for name, why in skipped[:shown])
    return named + (f"; and {len(skipped) - shown} more" if len(skipped) > shown else "")


def open_output(path: str | Path) -> Source:
    """The folder's manifest, part files and their common schema, or ReportError."""
    output_dir = Path(path).expanduser()
    if not output_dir.exists():
        raise ReportError(f"{path} does not exist; pass the output.dir of a gradcam-batch run")
    if not output_dir.is_dir():
        raise ReportError(f"{path} is not a directory; pass the output.dir of a gradcam-batch run")
    manifest_path = output_dir / MANIFEST_NAME
    cams = output_dir / "cams"
    if not (manifest_path.is_file() or manifest_path.is_symlink()) and not (
            cams.is_symlink() or any(cams.glob("*.parquet"))):
        jobs = sorted((entry.name for entry in output_dir.iterdir() if (entry / MANIFEST_NAME).is_file()),
                      key=lambda name: (len(name), name))
        if jobs:  # a sweep (-m) writes <output.dir>/<job number>
            raise ReportError(f"{path} holds the output folders of a sweep, not one output; pass one of them "
                              f"(e.g. {output_dir / jobs[0]})")
        raise ReportError(f"{path} is not a gradcam-batch output folder (no {MANIFEST_NAME}, no cams/*.parquet)")
    manifest, origin = {}, MANIFEST_NAME
    if manifest_path.is_symlink():
        raise ReportError(f"{manifest_path} is a link, not the file a run writes; the report does not read through "
                          "it (put the manifest itself there, or remove the link)")
    if manifest_path.is_file():
        manifest = _read_manifest(manifest_path)
    units = _run_units(manifest)
    cam_footers, skipped = _part_files(output_dir, "cams", REQUIRED_COLUMNS, units)
    error_footers, skipped_errors = _part_files(output_dir, "errors", ERROR_COLUMNS, units)
    cam_files, error_files = list(cam_footers), list(error_footers)
    skipped += skipped_errors
    schemas, total_rows, embedded, raw_max_known = [], 0, None, True
    for file, footer in cam_footers.items():
        schema, rows, metadata, raw_max = _readable_schema(file, footer)
        schemas.append(schema)
        total_rows += rows
        embedded = embedded or metadata
        raw_max_known = raw_max_known and raw_max
    embedded_dict = {}
    if embedded:
        try:
            embedded_dict = _json_object(embedded.decode("utf-8", "replace"), "the part files' metadata")
        except ReportError:
            if not manifest_path.is_file():  # the folder's only record of its run
                raise
    if not manifest_path.is_file():  # a folder without its manifest: the part files carry the same metadata
        manifest, origin = embedded_dict, "Parquet metadata"
    errors = sum(footer.num_rows for footer in error_footers.values())
    if not cam_files and skipped and any(name.startswith("cams/") for name, _ in skipped):
        raise ReportError(f"{output_dir / 'cams'} does not hold gradcam-batch maps (no part file of this tool; "
                          f"skipped {_skipped_text([s for s in skipped if s[0].startswith('cams/')])})")
    if not total_rows:
        held = f"{len(cam_files)} part files in cams/ hold 0 rows" if cam_files else "cams/ holds no part files"
        also = f"; errors/ holds {errors} error rows" if errors else ""
        raise ReportError(f"{path} holds no maps to report on ({held}{also})")
    try:
        schema = pa.unify_schemas(schemas)
    except (pa.ArrowException, ValueError) as error:
        raise ReportError(f"the part files in {output_dir / 'cams'} have conflicting schemas: "
                          f"{_first_line(error)}") from error
    return Source(output_dir, manifest, origin, cam_files, error_files, schema, total_rows, raw_max_known,
                  embedded_dict, skipped)


# --- the rows the report covers, record batch by record batch ------------------------------------


def _recorded_layers(source: Source) -> Optional[tuple[str, Optional[str]]]:
    """(the comma-joined target layers, cam.fuse) as the manifest, else the part files' metadata,
    records them; None where neither does."""
    for recorded in (source.manifest, source.embedded):
        target_layer = recorded.get("target_layer")
        if isinstance(target_layer, str) and target_layer:
            return target_layer, ((recorded.get("config") or {}).get("cam") or {}).get("fuse")
    return None


def run_layer(source: Source) -> Optional[str]:
    """The layer the run summary speaks of (summary.default_layer: the fused maps, else the last
    target layer listed), from the manifest, else the part files' metadata; None where neither
    records the target layers."""
    recorded = _recorded_layers(source)
    return (default_layer(*recorded) or None) if recorded else None


def run_target_layers(source: Source) -> list[str]:
    """The run's target layers as recorded (empty where nothing records them)."""
    recorded = _recorded_layers(source)
    return [name for name in recorded[0].split(",") if name] if recorded else []


def run_method(source: Source) -> str:
    """The run's cam.method, from the manifest, else the part files' metadata; "unknown" where
    neither records it."""
    for recorded in (source.manifest, source.embedded):
        method = recorded.get("method") or ((recorded.get("config") or {}).get("cam") or {}).get("method")
        if isinstance(method, str) and method:
            return method
    return "unknown"


def _choose_layer(layer_rows: dict[str, int], wanted: Optional[str], preferred: Optional[str] = None) -> str:
    """--layer, else the run summary's layer; the first in sorted order only where the output does
    not say which that is (or no row is of it)."""
    if wanted is None:
        return preferred if preferred in layer_rows else sorted(layer_rows)[0]
    if wanted not in layer_rows:
        raise ReportError(f"--layer {wanted!r} is not a layer of this output; it has: "
                          f"{', '.join(repr(name) for name in sorted(layer_rows))}")
    return wanted


def _column(batch: pa.RecordBatch, name: str, kind: pa.DataType) -> pa.Array:
    index = batch.schema.get_field_index(name)
    return batch.column(index) if index >= 0 else pa.nulls(batch.num_rows, kind)


def _numpy(array: pa.Array, fill, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(values with nulls filled, validity) as numpy arrays."""
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    values = array.fill_null(fill).to_numpy(zero_copy_only=False).astype(dtype, copy=False) \
        if array.null_count < len(array) else np.full(len(array), fill, dtype=dtype)
    return values, valid


def _layer_mask(batch: pa.RecordBatch, layer: Optional[str]) -> np.ndarray:
    """The rank-0 rows of a known class in `layer` (None: in any layer)."""
    rank0 = pc.equal(_column(batch, "target_rank", pa.int32()), 0).fill_null(False)
    known = pc.and_(rank0, _column(batch, "target_class", pa.int64()).is_valid())
    if layer is not None:
        known = pc.and_(pc.equal(_column(batch, "layer", pa.string()).fill_null(""), layer), known)
    return known.to_numpy(zero_copy_only=False)


def map_sizes(batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cam_height, cam_width, whole) of a batch's rows: whole where the cam holds exactly
    height * width values (a null map, or one of another length, is not)."""
    height, _ = _numpy(_column(batch, "cam_height", pa.int32()), 0, np.int64)
    width, _ = _numpy(_column(batch, "cam_width", pa.int32()), 0, np.int64)
    length, _ = _numpy(pc.list_value_length(batch.column("cam")), -1, np.int64)
    return height, width, (height > 0) & (width > 0) & (length == height * width)


def zero_maps(batch: pa.RecordBatch) -> np.ndarray:
    """Which rows hold an all-zero map, one with no positive evidence at all: cam_max_raw = 0 where
    the row has one, else (outputs written before that column) a cam whose values are all 0. The
    cam column is looked at only for rows without a cam_max_raw (it must then be in the batch)."""
    raw, known = _numpy(_column(batch, "cam_max_raw", pa.float32()), np.nan, np.float64)
    zero = known & (raw == 0)
    if known.all() or batch.schema.get_field_index("cam") < 0:
        return zero
    cams = batch.column("cam")
    values = pc.list_flatten(cams).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(cams).to_numpy(zero_copy_only=False)
    lengths, _ = _numpy(pc.list_value_length(cams), 0, np.int64)
    nonzero = np.bincount(parents[values != 0], minlength=len(cams))  # NaN counts as not zero
    return np.where(known, zero, (lengths > 0) & (nonzero == 0))


def _batches(path: Path, columns: list[str], batch_size: int):
    """Record batches of one part file, one at a time, with the wanted columns it has. Row group
    by row group: the reader then holds one row group's column chunks, never the file's."""
    file = pq.ParquetFile(path)
    present = [name for name in columns if name in file.schema_arrow.names]
    for group in range(file.num_row_groups):
        yield from file.iter_batches(batch_size=batch_size, row_groups=[group], columns=present, use_threads=False)
