"""Arrow/Parquet output per work unit, in a background thread behind a bounded queue.

Each unit's rows go to a temporary file under `<output.dir>/.tmp/` and become
`cams/part-<unit>.parquet` only when the unit is done: fsync, then an atomic rename (the same
filesystem, so the rename is atomic). Temporaries never sit in `cams/` or `errors/`, where any
reader's glob (DuckDB's `cams/*` included, which does not skip hidden files) would pick them up,
and their names end in `.tmp`, so not even a recursive `**/*.parquet` finds them. A complete part
file is the resume marker; a resume still checks it (footer, schema, counts against the
manifest) before trusting it, and redoes a unit whose files do not hold up. A unit is a whole
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

import contextlib
import errno
import json
import logging
import os
import queue
import stat
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gradcam_batch import UserError
from gradcam_batch.config import _parquet_codec

log = logging.getLogger("gradcam_batch")

TMP_DIR = ".tmp"
LOCK_NAME = ".gradcam-batch.lock"
MANIFEST_NAME = "_manifest.json"


class OutputWriteError(Exception):
    """Writing the output failed (a full disk, an I/O error, no permission): one line naming the
    path and the OS's reason. The run stops with nothing half-written under a final name, and a
    rerun once the cause is fixed resumes where it stopped."""


def _os_reason(error: OSError) -> str:
    # pyarrow's messages wrap the OS's reason in its own words ("Error writing bytes to file.
    # Detail: [errno 28] ..."); the errno says it plainly.
    if error.errno:
        return os.strerror(error.errno)
    return str(error).splitlines()[0] if str(error) else type(error).__name__


@contextlib.contextmanager
def _writing(path: Path, doing: str = "write"):
    """Turn an OSError into an OutputWriteError that names `path`."""
    try:
        yield
    except OSError as error:
        hint = ("free some space, then rerun: the run resumes where it stopped" if error.errno == errno.ENOSPC
                else "fix that, then rerun: the run resumes where it stopped")
        raise OutputWriteError(f"cannot {doing} {path}: {_os_reason(error)}; {hint}") from error


def _temporary(output_dir: Path, final: Path) -> Path:
    """Where `final` is written before its rename: under .tmp/, named for the folder and file it
    becomes, and unique, so that two writers of one unit (a straggling rank of a dead job and
    its rerun) never write into the same file. Created here, empty, as a new file: never an
    existing one, never through a link."""
    path = output_dir / TMP_DIR / f"{final.parent.name}.{final.name}.{uuid.uuid4().hex[:12]}.tmp"
    with _writing(path, "create"):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
    return path


def make_folder(folder: Path) -> Path:
    """`folder` created if missing. One that exists must be a folder of its own: a link there,
    even to a folder, would carry every write to where it leads (output_folder.check_entries
    refuses it up front, naming it; this is the last guard)."""
    with _writing(folder, "create"):
        try:
            folder.mkdir(parents=True)
        except FileExistsError:
            pass
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            raise UserError(f"{folder} is a link or not a folder; gradcam-batch never writes through a link in its "
                            "output folder: remove it, or use another output.dir")
    return folder


def is_regular(path: Path) -> bool:
    """A regular file, not a link to one."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def regular_files(folder: Path) -> list[Path]:
    """The regular files directly in `folder`, listed without following a link: none when the
    folder is itself a link, and no linked file among them."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return []
        with os.scandir(folder) as entries:
            return [Path(entry.path) for entry in entries if entry.is_file(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


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
    ("layer", pa.string()),
    ("pred_class", pa.int64()),
    ("cam_max_raw", pa.float32()),
    ("com_y", pa.float32()),
    ("com_x", pa.float32()),
    ("entropy", pa.float32()),
    ("center_mass", pa.float32()),
    ("border_mass", pa.float32()),
    ("pointing_hit", pa.bool_()),
    ("box_energy", pa.float32()),
    ("box_iou", pa.float32()),
    ("cam_resized", pa.list_(pa.float16())),
    ("cam_resized_height", pa.int32()),
    ("cam_resized_width", pa.int32()),
    ("heatmap_png", pa.binary()),
    ("insertion", pa.list_(pa.float32())),
    ("deletion", pa.list_(pa.float32())),
    ("confidence_change", pa.float32()),
    ("drop_in_confidence", pa.float32()),
    ("increase_in_confidence", pa.bool_()),
    ("road_morf", pa.list_(pa.float32())),
    ("road_lerf", pa.list_(pa.float32())),
    ("road_combined", pa.float32()),
    # the first 16 hex digits of the SHA-256 of the sample's encoded image as read (data.loader.image_digest),
    # on every row of the sample; the report checks an image read back against it
    ("image_digest", pa.string()),
])
# Columns a row may leave null: what was not asked for (cam_resized, heatmap_png, faithfulness, ROAD),
# what the sample has no data for (box metrics without boxes, or of an all-zero map), what is
# undefined (statistics of an all-zero map, cam_max_raw of fused maps) or what the producer did not give.
STATISTIC_COLUMNS = ("cam_max_raw", "com_y", "com_x", "entropy", "center_mass", "border_mass")

ERROR_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("shard", pa.string()),
    ("stage", pa.string()),
    ("error_type", pa.string()),
    ("message", pa.string()),
])

METADATA_KEY = b"gradcam_batch"
# A part file's footer also holds its unit's own totals (the pointing game's sums and the count
# of all-zero maps, as the pipeline hands them over per batch): the run's totals are the sums
# over the part files in cams/, so a unit finished by a killed run counts, and a redone one once.
UNIT_TOTALS_KEY = b"gradcam_batch.unit_totals"


def part_name(unit_id: str) -> str:
    return f"part-{unit_id}.parquet"


def completed_units(output_dir: str | Path) -> set[str]:
    """Unit ids whose part file exists (complete by construction): regular files only, never
    a link named like a part file."""
    return {p.name[len("part-"):-len(".parquet")] for p in regular_files(Path(output_dir) / "cams")
            if p.name.startswith("part-") and p.name.endswith(".parquet")}


@dataclass
class ShardOutput:
    """What the device loop hands the writer for one batch (host numpy arrays). cams, cam_mean
    and peak hold one array per layer (named in `layers`), or one array for a single layer."""
    shard_id: str  # the `shard` column
    sample_ids: list[str]
    labels: np.ndarray  # (N,) int64, -1 unknown
    target_classes: np.ndarray  # (N, K)
    scores: np.ndarray  # (N, K)
    probs: np.ndarray  # (N, K)
    cams: np.ndarray | list  # (N, K, H, W) float32 per layer
    cam_mean: np.ndarray | list  # (N, K) per layer
    peak: np.ndarray | list  # (N, K) flat index per layer
    errors: list[tuple[str, str, str, str]] = field(default_factory=list)
    last: bool = False  # the unit's final batch: its part file is complete after it
    unit_id: str = ""  # the part file's unit; "" means the whole shard
    layers: list[str] = field(default_factory=lambda: [""])  # the `layer` column, one name per entry
    predictions: np.ndarray | None = None  # (N,) the model's top-1 class
    # per layer: column name -> array, (N, K) for statistics, box metrics and map_empty (box_known (N,)),
    # cam_resized (N, K, h, w) float16, heatmaps (N, K, S, S, 3) uint8, insertion/deletion (N, K, F)
    layer_columns: list[dict] = field(default_factory=list)
    # what the batch adds to its unit's totals: {name: number, or a dict of them}, summed per unit
    # into the part file's footer (UNIT_TOTALS_KEY)
    totals: dict = field(default_factory=dict)
    image_digests: list[str] | None = None  # (N,) aligned with sample_ids; None: not recorded (null)

    @property
    def unit(self) -> str:
        return self.unit_id or self.shard_id


def _per_layer(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def cam_table(out: ShardOutput) -> pa.Table:
    """The batch's rows: for each layer, one row per (image, target), image-major."""
    columns = out.layer_columns or [{}] * len(out.layers)
    per_layer = list(zip(out.layers, _per_layer(out.cams), _per_layer(out.cam_mean), _per_layer(out.peak), columns))
    tables = [_layer_table(out, *entry) for entry in per_layer]
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def _list_column(values: np.ndarray | None, rows: int, value_type: pa.DataType) -> pa.Array:
    """(rows, ...) values flattened per row into a list column; all null when absent."""
    if values is None:
        return pa.nulls(rows, pa.list_(value_type))
    per_row = int(np.prod(values.shape[2:])) if values.ndim > 2 else 1
    offsets = np.arange(rows + 1, dtype=np.int32) * per_row
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.reshape(-1), value_type))


def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def _extra_columns(out: ShardOutput, extras: dict, rows: int, num_targets: int) -> list[pa.Array]:
    def per_row(name: str, dtype, arrow_type) -> pa.Array:
        values = extras.get(name)
        if values is None:
            return pa.nulls(rows, arrow_type)
        flat = values.reshape(-1).astype(dtype, copy=False)
        known = extras.get("box_known")
        if name in ("pointing_hit", "box_energy", "box_iou") and known is not None:
            unknown = ~np.repeat(known, num_targets)
            empty = extras.get("map_empty")
            if empty is not None:
                # an all-zero map has no peak, energy or region to compare: null, as its statistics
                unknown |= empty.reshape(-1)
            return pa.array(flat, arrow_type, mask=unknown)
        if flat.dtype.kind == "f":
            # undefined (an all-zero map's centre of mass or entropy) is null, never NaN: readers
            # skip nulls, while NaN poisons averages (and DuckDB's Parquet statistics ignore it)
            return pa.array(flat, arrow_type, mask=np.isnan(flat))
        return pa.array(flat, arrow_type)

    predictions = (pa.array(np.repeat(out.predictions, num_targets).astype(np.int64)) if out.predictions is not None
                   else pa.nulls(rows, pa.int64()))
    resized = extras.get("cam_resized")
    heatmaps = extras.get("heatmaps")
    size = resized.shape[2:] if resized is not None else None
    return [
        predictions,
        *(per_row(name, np.float32, pa.float32()) for name in STATISTIC_COLUMNS),
        per_row("pointing_hit", np.bool_, pa.bool_()),
        per_row("box_energy", np.float32, pa.float32()),
        per_row("box_iou", np.float32, pa.float32()),
        _list_column(resized, rows, pa.float16()),
        pa.array(np.full(rows, size[0], np.int32)) if size else pa.nulls(rows, pa.int32()),
        pa.array(np.full(rows, size[1], np.int32)) if size else pa.nulls(rows, pa.int32()),
        (pa.array([_png(image) for image in heatmaps.reshape(-1, *heatmaps.shape[2:])], pa.binary())
         if heatmaps is not None else pa.nulls(rows, pa.binary())),
        _list_column(extras.get("insertion"), rows, pa.float32()),
        _list_column(extras.get("deletion"), rows, pa.float32()),
        per_row("confidence_change", np.float32, pa.float32()),
        per_row("drop_in_confidence", np.float32, pa.float32()),
        per_row("increase_in_confidence", np.bool_, pa.bool_()),
        _list_column(extras.get("road_morf"), rows, pa.float32()),
        _list_column(extras.get("road_lerf"), rows, pa.float32()),
        per_row("road_combined", np.float32, pa.float32()),
    ]


def _layer_table(out: ShardOutput, layer: str, layer_cams: np.ndarray, cam_mean: np.ndarray,
                 peak: np.ndarray, extras: dict) -> pa.Table:
    num_images, num_targets = out.target_classes.shape
    height, width = layer_cams.shape[2:]
    rows = num_images * num_targets
    labels = np.repeat(out.labels, num_targets)
    kept = extras.get("map_kept")  # cam.targets=all: only cam.keep_maps' maps are stored
    if kept is None:
        offsets = np.arange(rows + 1, dtype=np.int32) * (height * width)
        cams = pa.ListArray.from_arrays(pa.array(offsets), pa.array(layer_cams.reshape(-1).astype(np.float32, copy=False)))
    else:
        kept = kept.reshape(-1).astype(bool)
        offsets = np.concatenate([[0], np.cumsum(np.where(kept, height * width, 0))]).astype(np.int32)
        values = layer_cams.reshape(rows, -1)[kept].reshape(-1).astype(np.float32, copy=False)
        cams = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), mask=pa.array(~kept))
    peak = peak.reshape(-1)
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
        pa.array(cam_mean.reshape(-1).astype(np.float32)),
        pa.array((peak // width).astype(np.int32)),
        pa.array((peak % width).astype(np.int32)),
        pa.array([layer] * rows, pa.string()),
        *_extra_columns(out, extras, rows, num_targets),
        _digest_column(out, num_targets),
    ], schema=CAM_SCHEMA)


def _digest_column(out: ShardOutput, num_targets: int) -> pa.Array:
    """The image_digest column: each sample's digest on all its rows, like sample_id."""
    rows = len(out.sample_ids) * num_targets
    if out.image_digests is None:
        return pa.nulls(rows, pa.string())
    if len(out.image_digests) != len(out.sample_ids):  # a row would carry another sample's digest
        raise ValueError(f"shard {out.shard_id!r}: {len(out.image_digests)} image digests for "
                         f"{len(out.sample_ids)} samples")
    return pa.array(np.repeat(np.array(out.image_digests, dtype=object), num_targets), pa.string())


def _error_table(shard_id: str, errors: list[tuple[str, str, str, str]], schema: pa.Schema) -> pa.Table:
    columns = list(zip(*errors)) if errors else [[], [], [], []]
    sample_ids, stages, types, messages = columns
    return pa.Table.from_arrays([
        pa.array(list(sample_ids), pa.string()), pa.array([shard_id] * len(errors), pa.string()),
        pa.array(list(stages), pa.string()), pa.array(list(types), pa.string()),
        pa.array(list(messages), pa.string()),
    ], schema=schema)


def _fsync_rename(tmp: Path, final: Path) -> None:
    with _writing(final):
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        directory = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _write_table(table: pa.Table, final: Path, output_dir: Path, compression: str) -> None:
    """One whole file under `final`, or nothing: written aside, fsynced, renamed."""
    tmp = _temporary(output_dir, final)
    try:
        with _writing(tmp):
            pq.write_table(table, tmp, compression=compression)
        _fsync_rename(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)  # only still there if the write or the rename failed


def _add_totals(into: dict, more: dict) -> None:
    for key, value in more.items():
        if isinstance(value, dict):
            _add_totals(into.setdefault(key, {}), value)
        else:
            into[key] = into.get(key, 0) + value


class _OpenUnit:
    def __init__(self, output_dir: Path, directory: Path, unit_id: str, schema: pa.Schema, compression: str):
        self.final = directory / part_name(unit_id)
        self.tmp = _temporary(output_dir, self.final)
        with _writing(self.tmp):
            try:
                self.writer = pq.ParquetWriter(self.tmp, schema, compression=compression)
            except BaseException:
                self.tmp.unlink(missing_ok=True)  # pyarrow creates the file before it can fail
                raise
        self.errors: list[tuple[str, str, str, str]] = []
        self.rows = 0
        self.totals: dict = {}

    def discard(self) -> None:
        """Drop an unfinished unit: no file stays behind, not even under .tmp/."""
        try:
            self.writer.close()
        except Exception as error:  # noqa: BLE001 -- the file is deleted next; its write already failed
            log.debug("closing the unfinished %s failed: %r", self.tmp, error)
        self.tmp.unlink(missing_ok=True)


class ParquetShardWriter:
    """Background writer. `submit` blocks when `queue_size` batches are waiting, which bounds
    host memory; an exception in the thread is re-raised in the caller at the next call."""

    def __init__(self, output_dir: str | Path, metadata: dict, compression: str = "zstd", queue_size: int = 8):
        # OutputConfig already refuses a bad codec; checked again here because pyarrow only
        # notices it after creating the file, in the writer thread.
        if not _parquet_codec(compression):
            raise ValueError(f"output.compression={compression!r} is not a Parquet codec this pyarrow has")
        self.output_dir = Path(output_dir)
        self.cam_dir = self.output_dir / "cams"
        self.error_dir = self.output_dir / "errors"
        for folder in (self.cam_dir, self.error_dir, self.output_dir / TMP_DIR):
            make_folder(folder)
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
            unit = self.open[out.unit] = _OpenUnit(self.output_dir, self.cam_dir, out.unit, self.cam_schema,
                                                   self.compression)
        if len(out.sample_ids):
            table = cam_table(out)
            with _writing(unit.tmp):
                unit.writer.write_table(table)
            unit.rows += table.num_rows
        unit.errors.extend(out.errors)
        _add_totals(unit.totals, out.totals)
        if out.last:
            with _writing(unit.tmp):
                unit.writer.add_key_value_metadata({UNIT_TOTALS_KEY: json.dumps(unit.totals)})
                unit.writer.close()
            # errors first: the cams part file is the unit's completion marker
            error_final = self.error_dir / part_name(out.unit)
            if unit.errors:
                _write_table(_error_table(out.shard_id, unit.errors, self.error_schema), error_final,
                             self.output_dir, self.compression)
            else:
                with _writing(error_final, "delete"):
                    error_final.unlink(missing_ok=True)  # left by an earlier, interrupted attempt
            _fsync_rename(unit.tmp, unit.final)
            self.unit_counts[out.unit] = {"rows": unit.rows, "errors": len(unit.errors)}
            del self.open[out.unit]

    def _raise_failure(self) -> None:
        if isinstance(self._failure, OutputWriteError):
            raise OutputWriteError(str(self._failure)) from self._failure
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
            unit.discard()
        self.open.clear()
        self._raise_failure()

    def __enter__(self) -> "ParquetShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
