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
import fcntl
import json
import logging
import os
import queue
import socket
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
    its rerun) never write into the same file."""
    return output_dir / TMP_DIR / f"{final.parent.name}.{final.name}.{uuid.uuid4().hex[:12]}.tmp"

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
            with _writing(folder, "create"):
                folder.mkdir(parents=True, exist_ok=True)
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
        if out.last:
            with _writing(unit.tmp):
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


# --- run manifest: what the output directory holds and how it was made ----------------------
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
    output_dir = Path(output_dir)
    final = output_dir / MANIFEST_NAME
    with _writing(output_dir / TMP_DIR, "create"):
        (output_dir / TMP_DIR).mkdir(parents=True, exist_ok=True)
    tmp = _temporary(output_dir, final)
    try:
        with _writing(tmp):
            tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        _fsync_rename(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)  # only still there if the write or the rename failed


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


# --- what in an output folder is ours ------------------------------------------------------------

def _ours(output_dir: Path) -> list[Path]:
    """Every file this tool writes in an output folder, and nothing else: part files, the
    temporaries (under .tmp/, and where earlier versions kept them) and the manifest. Not the
    lock file, which stays for the next run to lock (deleting a lock file lets two runs hold
    two different files of one name)."""
    files = [*(output_dir / TMP_DIR).glob("*"), output_dir / f".{MANIFEST_NAME}.tmp", output_dir / MANIFEST_NAME]
    for folder in ("cams", "errors"):
        files += [*(output_dir / folder).glob("part-*.parquet"), *(output_dir / folder).glob(".part-*.parquet.tmp")]
    return [path for path in files if path.is_file() and not path.is_symlink()]


def _delete(paths: list[Path]) -> None:
    for path in paths:
        with _writing(path, "delete"):
            path.unlink(missing_ok=True)


def clean_temporaries(output_dir: str | Path) -> None:
    """Remove the temporaries a killed run left. Only while holding the folder's lock, before
    any rank writes: then every temporary is stale."""
    output_dir = Path(output_dir)
    _delete([path for path in _ours(output_dir) if path.name.endswith(".tmp")])


def clear_output(output_dir: str | Path) -> None:
    """Remove what an earlier run wrote (output.overwrite=true): only this tool's files; the
    user's own files, in the output folder or in cams/ and errors/, stay."""
    _delete(_ours(Path(output_dir)))


def foreign_entry(output_dir: str | Path) -> str | None:
    """The first entry (relative path) of `output_dir` that this tool would not have written,
    or None: says whether a folder without a manifest was ever an output folder."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    # demo-data/ is where the bare demo generates its shards when data.root is unset
    known = {"cams", "errors", TMP_DIR, LOCK_NAME, MANIFEST_NAME, f".{MANIFEST_NAME}.tmp", "demo-data"}
    ours = set(_ours(output_dir))
    for entry in sorted(output_dir.iterdir()):
        if entry.name not in known or (entry.name in ("cams", "errors") and not entry.is_dir()):
            return entry.name
        if entry.name in ("cams", "errors"):
            for inner in sorted(entry.iterdir()):
                if inner not in ours:
                    return f"{entry.name}/{inner.name}"
    return None


def _part_counts(part: Path, errors: Path, recorded: dict | None) -> tuple[dict[str, int] | None, str]:
    """A complete unit's rows and errors if its files hold up, else None and why (naming the file)."""
    def footer(path: Path, schema: pa.Schema) -> tuple[int | None, str]:
        where = f"{path.parent.name}/{path.name}"
        try:
            metadata = pq.read_metadata(path)
        except (OSError, ValueError, pa.ArrowException) as error:
            reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
            return None, f"{where} is unreadable ({reason})"
        if not metadata.schema.to_arrow_schema().remove_metadata().equals(schema):
            return None, f"{where} does not have the columns this version writes"
        if sum(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)) != metadata.num_rows:
            return None, f"{where} has a footer whose row groups do not add up"
        return metadata.num_rows, ""

    recorded = recorded or {}
    rows, problem = footer(part, CAM_SCHEMA)
    if rows is None:
        return None, problem
    if recorded.get("rows") is not None and rows != recorded["rows"]:
        return None, f"cams/{part.name} holds {rows} rows where the manifest recorded {recorded['rows']}"
    error_rows = 0
    if errors.is_file():
        error_rows, problem = footer(errors, ERROR_SCHEMA)
        if error_rows is None:
            return None, problem
    if recorded.get("errors") is not None and error_rows != recorded["errors"]:
        return None, (f"errors/{errors.name} holds {error_rows} error rows where the manifest recorded "
                      f"{recorded['errors']}")
    return {"rows": rows, "errors": error_rows}, ""


def check_parts(output_dir: str | Path, unit_ids: list[str], recorded: dict[str, dict]) -> dict[str, dict[str, int]]:
    """Rows and errors of every complete unit whose files hold up: the footer parses, the
    columns are ours, and the counts match what the manifest recorded (where it did). A unit
    that fails is deleted, with one line saying why, and so redone; a damaged file never
    crashes a resume. Rank 0 only, under the lock, before any rank writes."""
    output_dir = Path(output_dir)
    counts = {}
    for unit_id in unit_ids:
        part, errors = output_dir / "cams" / part_name(unit_id), output_dir / "errors" / part_name(unit_id)
        if not part.is_file():
            continue
        unit_counts, problem = _part_counts(part, errors, recorded.get(unit_id))
        if unit_counts is not None:
            counts[unit_id] = unit_counts
            continue
        log.warning("%s; redoing that unit", problem)
        _delete([part, errors])  # the cams file first: it is the unit's completion marker
    return counts


# --- one run per output folder --------------------------------------------------------------------

class OutputLock:
    """An output folder is held by one run at a time: an OS lock on `<output.dir>/.gradcam-batch.lock`,
    which the kernel drops when the process ends, however it ends (kill -9 included), so no
    stale lock is ever left to clear by hand.

    Two bytes of the file are locked. Byte 0 is the run: rank 0 holds it exclusively. Byte 1 is
    its ranks: every rank holds it shared, and a new run's rank 0 needs it exclusively, briefly,
    so a new run is also refused while any rank of an old job (one that lost its rank 0 but
    goes on writing its units) is alive. Rank 0 takes the lock before any rank writes
    (`OutputLock(dir)`); the other ranks join once it holds (`OutputLock(dir, join=True)`).

    POSIX record locks (lockf), not flock: a flock belongs to the open file, which forked
    DataLoader workers share, so after a kill -9 of the run its orphaned workers would keep
    the folder locked until they noticed and exited; a record lock belongs to the process
    and is not inherited by fork. It also works on NFS. The price of record locks: closing any
    descriptor of the lock file drops the process's lock, so nothing else may open it while
    the lock is held (only this class does)."""

    _RUN, _RANKS = 0, 1

    def __init__(self, output_dir: str | Path, join: bool = False):
        output_dir = Path(output_dir)
        self.path = output_dir / LOCK_NAME
        with _writing(self.path, "create"):
            output_dir.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if join:
                if not self._lock(fcntl.LOCK_SH, self._RANKS):
                    raise UserError(f"output.dir={str(output_dir)!r} was taken by another run as this one started")
                return
            if not self._lock(fcntl.LOCK_EX, self._RUN):
                holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip()
                raise UserError(f"output.dir={str(output_dir)!r} is in use by another run"
                                f"{f' ({holder})' if holder else ''}; wait for it to finish or use another output.dir")
            if not self._lock(fcntl.LOCK_EX, self._RANKS):
                raise UserError(f"output.dir={str(output_dir)!r} is still held by a rank of another run whose rank 0 "
                                "has gone; wait for that rank to exit (or stop it), then rerun")
            self._lock(fcntl.LOCK_SH, self._RANKS)  # downgraded, so this run's other ranks can join
            self._note_holder()
        except BaseException:
            self.release()
            raise

    def _lock(self, kind: int, byte: int) -> bool:
        try:
            fcntl.lockf(self._fd, kind | fcntl.LOCK_NB, 1, byte)
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EAGAIN):
                return False
            with _writing(self.path, "lock"):
                raise
        return True

    def _note_holder(self) -> None:
        # Only for the message a refused run prints; a full disk must not stop the run here.
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError as error:
            log.debug("could not note the lock holder in %s: %r", self.path, error)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
