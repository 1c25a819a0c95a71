"""What an output folder holds: its manifest, its part files and their common schema (or a
one-line ReportError saying why the folder cannot be reported on), and the reading of the part
files one record batch at a time, restricted to the rows the report covers."""

from __future__ import annotations

import json
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

    @property
    def columns(self) -> set[str]:
        return set(self.schema.names)

    def has(self, column: str) -> bool:
        return column in self.columns


def _readable_schema(path: Path) -> tuple[pa.Schema, int, Optional[bytes], bool]:
    """The file's schema, rows, embedded metadata, and whether its statistics show a cam_max_raw
    in every row."""
    try:
        metadata = pq.read_metadata(path)
    except (OSError, ValueError, pa.ArrowException) as error:
        raise ReportError(f"cannot read {path}: {_first_line(error)}") from error
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


def open_output(path: str | Path) -> Source:
    """The folder's manifest, part files and their common schema, or ReportError."""
    output_dir = Path(path).expanduser()
    if not output_dir.exists():
        raise ReportError(f"{path} does not exist; pass the output.dir of a gradcam-batch run")
    if not output_dir.is_dir():
        raise ReportError(f"{path} is not a directory; pass the output.dir of a gradcam-batch run")
    manifest_path = output_dir / MANIFEST_NAME
    cam_files = sorted(p for p in (output_dir / "cams").glob("*.parquet") if p.is_file())
    error_files = sorted(p for p in (output_dir / "errors").glob("*.parquet") if p.is_file())
    if not manifest_path.is_file() and not cam_files:
        jobs = sorted((entry.name for entry in output_dir.iterdir() if (entry / MANIFEST_NAME).is_file()),
                      key=lambda name: (len(name), name))
        if jobs:  # a sweep (-m) writes <output.dir>/<job number>
            raise ReportError(f"{path} holds the output folders of a sweep, not one output; pass one of them "
                              f"(e.g. {output_dir / jobs[0]})")
        raise ReportError(f"{path} is not a gradcam-batch output folder (no {MANIFEST_NAME}, no cams/*.parquet)")
    manifest, origin = {}, MANIFEST_NAME
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as error:
            raise ReportError(f"cannot read {manifest_path}: {_first_line(error)}") from error
        if not isinstance(manifest, dict):
            raise ReportError(f"{manifest_path} is not a gradcam-batch manifest (not a JSON object)")
    schemas, total_rows, embedded, raw_max_known = [], 0, None, True
    for file in cam_files:
        schema, rows, metadata, raw_max = _readable_schema(file)
        schemas.append(schema)
        total_rows += rows
        embedded = embedded or metadata
        raw_max_known = raw_max_known and raw_max
    try:
        embedded_dict = json.loads(embedded) if embedded else {}
    except ValueError:
        embedded_dict = {}
    if not isinstance(embedded_dict, dict):
        embedded_dict = {}
    if not manifest_path.is_file():  # a folder without its manifest: the part files carry the same metadata
        manifest, origin = embedded_dict, "Parquet metadata"
    errors = sum(_readable_schema(file)[1] for file in error_files)
    if not total_rows:
        held = f"{len(cam_files)} part files in cams/ hold 0 rows" if cam_files else "cams/ holds no part files"
        also = f"; errors/ holds {errors} error rows" if errors else ""
        raise ReportError(f"{path} holds no maps to report on ({held}{also})")
    try:
        schema = pa.unify_schemas(schemas)
    except (pa.ArrowException, ValueError) as error:
        raise ReportError(f"the part files in {output_dir / 'cams'} have conflicting schemas: "
                          f"{_first_line(error)}") from error
    missing = [name for name in REQUIRED_COLUMNS if name not in schema.names]
    if missing:
        raise ReportError(f"{output_dir / 'cams'} does not hold gradcam-batch maps (no column "
                          f"{', '.join(missing)})")
    return Source(output_dir, manifest, origin, cam_files, error_files, schema, total_rows, raw_max_known,
                  embedded_dict)


# --- the rows the report covers, record batch by record batch ------------------------------------


def run_layer(source: Source) -> Optional[str]:
    """The layer the run summary speaks of (summary.default_layer: the fused maps, else the last
    target layer listed), from the manifest, else the part files' metadata; None where neither
    records the target layers."""
    for recorded in (source.manifest, source.embedded):
        target_layer = recorded.get("target_layer")
        if isinstance(target_layer, str) and target_layer:
            fuse = ((recorded.get("config") or {}).get("cam") or {}).get("fuse")
            return default_layer(target_layer, fuse) or None
    return None


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


def _layer_mask(batch: pa.RecordBatch, layer: str) -> np.ndarray:
    layers = _column(batch, "layer", pa.string()).fill_null("")
    rank0 = pc.equal(_column(batch, "target_rank", pa.int32()), 0).fill_null(False)
    known = _column(batch, "target_class", pa.int64()).is_valid()
    return pc.and_(pc.and_(pc.equal(layers, layer), rank0), known).to_numpy(zero_copy_only=False)


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
