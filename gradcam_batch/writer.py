"""Arrow/Parquet output per work unit, in a background thread behind a bounded queue.

Each unit's rows go to `cams/.part-<unit>.parquet.tmp` (pyarrow.dataset and globs such as
`cams/*.parquet` skip it) and become `cams/part-<unit>.parquet` only when the unit is done:
fsync, then an atomic rename. A complete part file is the resume marker. A unit is a whole
shard (`part-<shard>.parquet`) or a slice of one (`part-<shard>@<start>-<end>.parquet`, holding
samples start..end-1 of the shard).

Why one part file per unit rather than per shard: the slices of one shard are read by different
workers at the same time and finish in any order. One file per shard would need its rows
buffered or stitched from per-slice pieces, and a resume would need to know which slices a
half-written file already holds. With one file per unit, "the file exists" still means "every
sample of this unit has its row or its error row", the rename stays the only commit, and a
resume redoes exactly the units without a file. The `shard` column keeps naming the shard.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger("gradcam_batch")

CAM_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("shard", pa.string()),
    ("label", pa.int64()),
    ("target_class", pa.int64()),
    ("target_rank", pa.int32()),
    ("score", pa.float32()),
    ("prob", pa.float32()),
    ("cam", pa.list_(pa.float32())),
    ("cam_height", pa.int32()),
    ("cam_width", pa.int32()),
    ("cam_mean", pa.float32()),
    ("peak_y", pa.int32()),
    ("peak_x", pa.int32()),
])

ERROR_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("shard", pa.string()),
    ("stage", pa.string()),
    ("error_type", pa.string()),
    ("message", pa.string()),
])

METADATA_KEY = b"gradcam_batch"


def part_name(unit_id: str) -> str:
    return f"part-{unit_id}.parquet"


def completed_units(output_dir: str | Path) -> set[str]:
    """Unit ids whose part file exists (complete by construction)."""
    cams = Path(output_dir) / "cams"
    if not cams.is_dir():
        return set()
    return {p.name[len("part-"):-len(".parquet")] for p in cams.glob("part-*.parquet")}


@dataclass
class ShardOutput:
    """What the device loop hands the writer for one batch (host numpy arrays)."""
    shard_id: str  # the `shard` column
    sample_ids: list[str]
    labels: np.ndarray  # (N,) int64, -1 unknown
    target_classes: np.ndarray  # (N, K)
    scores: np.ndarray  # (N, K)
    probs: np.ndarray  # (N, K)
    cams: np.ndarray  # (N, K, H, W) float32
    cam_mean: np.ndarray  # (N, K)
    peak: np.ndarray  # (N, K) flat index
    errors: list[tuple[str, str, str, str]] = field(default_factory=list)
    last: bool = False  # the unit's final batch: its part file is complete after it
    unit_id: str = ""  # the part file's unit; "" means the whole shard

    @property
    def unit(self) -> str:
        return self.unit_id or self.shard_id


def cam_table(out: ShardOutput) -> pa.Table:
    num_images, num_targets = out.target_classes.shape
    height, width = out.cams.shape[2:]
    rows = num_images * num_targets
    labels = np.repeat(out.labels, num_targets)
    offsets = np.arange(rows + 1, dtype=np.int32) * (height * width)
    cams = pa.ListArray.from_arrays(pa.array(offsets), pa.array(out.cams.reshape(-1).astype(np.float32, copy=False)))
    peak = out.peak.reshape(-1)
    return pa.Table.from_arrays([
        pa.array(np.repeat(np.array(out.sample_ids, dtype=object), num_targets), pa.string()),
        pa.array([out.shard_id] * rows, pa.string()),
        pa.array(labels, pa.int64(), mask=labels < 0),
        pa.array(out.target_classes.reshape(-1).astype(np.int64)),
        pa.array(np.tile(np.arange(num_targets, dtype=np.int32), num_images)),
        pa.array(out.scores.reshape(-1).astype(np.float32)),
        pa.array(out.probs.reshape(-1).astype(np.float32)),
        cams,
        pa.array(np.full(rows, height, dtype=np.int32)),
        pa.array(np.full(rows, width, dtype=np.int32)),
        pa.array(out.cam_mean.reshape(-1).astype(np.float32)),
        pa.array((peak // width).astype(np.int32)),
        pa.array((peak % width).astype(np.int32)),
    ], schema=CAM_SCHEMA)


def _error_table(shard_id: str, errors: list[tuple[str, str, str, str]], schema: pa.Schema) -> pa.Table:
    columns = list(zip(*errors)) if errors else [[], [], [], []]
    sample_ids, stages, types, messages = columns
    return pa.Table.from_arrays([
        pa.array(list(sample_ids), pa.string()), pa.array([shard_id] * len(errors), pa.string()),
        pa.array(list(stages), pa.string()), pa.array(list(types), pa.string()),
        pa.array(list(messages), pa.string()),
    ], schema=schema)


def _fsync_rename(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    directory = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class _OpenUnit:
    def __init__(self, directory: Path, unit_id: str, schema: pa.Schema, compression: str):
        self.final = directory / part_name(unit_id)
        self.tmp = directory / f".{part_name(unit_id)}.tmp"
        self.writer = pq.ParquetWriter(self.tmp, schema, compression=compression)
        self.errors: list[tuple[str, str, str, str]] = []
        self.rows = 0


class ParquetShardWriter:
    """Background writer. `submit` blocks when `queue_size` batches are waiting, which bounds
    host memory; an exception in the thread is re-raised in the caller at the next call."""

    def __init__(self, output_dir: str | Path, metadata: dict, compression: str = "zstd", queue_size: int = 8):
        self.output_dir = Path(output_dir)
        self.cam_dir = self.output_dir / "cams"
        self.error_dir = self.output_dir / "errors"
        self.cam_dir.mkdir(parents=True, exist_ok=True)
        self.error_dir.mkdir(parents=True, exist_ok=True)
        encoded = {METADATA_KEY: json.dumps(metadata, default=str).encode()}
        self.cam_schema = CAM_SCHEMA.with_metadata(encoded)
        self.error_schema = ERROR_SCHEMA.with_metadata(encoded)
        self.compression = compression
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.open: dict[str, _OpenUnit] = {}
        self.unit_counts: dict[str, dict[str, int]] = {}
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="parquet-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                if self._failure is None:  # once broken, drain without writing; the caller re-raises
                    self._write(item)
            except BaseException as error:  # noqa: BLE001 -- handed to the caller, not swallowed
                self._failure = error
            finally:
                self.queue.task_done()

    def _write(self, out: ShardOutput) -> None:
        unit = self.open.get(out.unit)
        if unit is None:
            unit = self.open[out.unit] = _OpenUnit(self.cam_dir, out.unit, self.cam_schema, self.compression)
        if len(out.sample_ids):
            table = cam_table(out)
            unit.writer.write_table(table)
            unit.rows += table.num_rows
        unit.errors.extend(out.errors)
        if out.last:
            unit.writer.close()
            # errors first: the cams part file is the unit's completion marker
            error_final = self.error_dir / part_name(out.unit)
            if unit.errors:
                error_tmp = self.error_dir / f".{part_name(out.unit)}.tmp"
                pq.write_table(_error_table(out.shard_id, unit.errors, self.error_schema), error_tmp,
                               compression=self.compression)
                _fsync_rename(error_tmp, error_final)
            else:
                error_final.unlink(missing_ok=True)  # left by an earlier, interrupted attempt
            _fsync_rename(unit.tmp, unit.final)
            self.unit_counts[out.unit] = {"rows": unit.rows, "errors": len(unit.errors)}
            del self.open[out.unit]

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"the Parquet writer failed: {self._failure!r}") from self._failure

    def submit(self, out: ShardOutput) -> None:
        self._raise_failure()
        self.queue.put(out)

    def flush(self) -> None:
        """Wait until everything submitted so far is written."""
        self.queue.join()
        self._raise_failure()

    def close(self) -> None:
        """Finish queued work; units still open (interrupted run) leave no file and are redone."""
        self.queue.put(None)
        self._thread.join()
        for unit in self.open.values():
            unit.writer.close()
            unit.tmp.unlink(missing_ok=True)
        self.open.clear()
        self._raise_failure()

    def __enter__(self) -> "ParquetShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- run manifest: what the output directory holds and how it was made ----------------------

MANIFEST_NAME = "_manifest.json"
# Config keys that change what the rows mean; runtime, batch size, workers and the output
# location do not, so a resume may change them. Nor does data.unit_size: a resume keeps the
# split its manifest recorded.
_IDENTITY_KEYS = {
    "data": ("format", "root", "shards", "shard_size", "image_column", "label_column", "id_column",
             "resize", "crop", "mean", "std", "max_pixels", "demo_images"),
    "model": ("source", "name", "weights", "num_classes", "target_layer", "seed"),
    "cam": ("method", "targets", "topk", "classes", "normalize"),
}


def config_identity(resolved: dict) -> dict:
    return {group: {key: resolved.get(group, {}).get(key) for key in keys} for group, keys in _IDENTITY_KEYS.items()}


def config_hash(resolved: dict) -> str:
    import hashlib

    canonical = json.dumps(config_identity(resolved), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def read_manifest(output_dir: str | Path) -> dict | None:
    path = Path(output_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def write_manifest(output_dir: str | Path, manifest: dict) -> None:
    final = Path(output_dir) / MANIFEST_NAME
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{MANIFEST_NAME}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    _fsync_rename(tmp, final)


def counts_on_disk(output_dir: str | Path, unit_ids: list[str]) -> dict[str, dict[str, int]]:
    """Rows and errors of every complete unit, read from the part files' footers."""
    output_dir = Path(output_dir)
    counts = {}
    for unit_id in unit_ids:
        part = output_dir / "cams" / part_name(unit_id)
        if not part.is_file():
            continue
        errors = output_dir / "errors" / part_name(unit_id)
        counts[unit_id] = {"rows": pq.read_metadata(part).num_rows,
                            "errors": pq.read_metadata(errors).num_rows if errors.is_file() else 0}
    return counts


def clear_output(output_dir: str | Path) -> None:
    """Remove what an earlier run wrote (output.overwrite=true); other files stay."""
    import shutil

    output_dir = Path(output_dir)
    for folder in ("cams", "errors"):
        shutil.rmtree(output_dir / folder, ignore_errors=True)
    (output_dir / MANIFEST_NAME).unlink(missing_ok=True)
