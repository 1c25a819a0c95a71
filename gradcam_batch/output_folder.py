"""What an output folder holds and who may write it: the run manifest, which files are this
tool's, the checks a resume makes before trusting a part file, and the lock that keeps one run
per folder. The part files themselves are written by `writer`."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gradcam_batch import UserError

from gradcam_batch.writer import (CAM_SCHEMA, ERROR_SCHEMA, LOCK_NAME, MANIFEST_NAME, TMP_DIR, _fsync_rename,
                                  _temporary, _writing, part_name)

log = logging.getLogger("gradcam_batch")


# --- run manifest: what the output directory holds and how it was made ----------------------
# Config keys that change what the rows mean; runtime, batch size, workers and the output
# location do not, so a resume may change them. Nor does data.unit_size: a resume keeps the
# split its manifest recorded.
REPORT_NAME = "report.html"  # where gradcam-batch-report writes by default

_IDENTITY_KEYS = {
    "data": ("format", "root", "shards", "shard_size", "image_column", "label_column", "id_column",
             "boxes_column", "resize", "crop", "mean", "std", "interpolation", "max_pixels", "demo_images"),
    "model": ("source", "name", "weights", "num_classes", "target_layer", "seed"),
    "cam": ("method", "targets", "topk", "classes", "normalize", "fuse"),
    "output": ("cam_size", "heatmap_png"),
    "metrics": ("threshold", "faithfulness", "fractions"),
}


def config_identity(resolved: dict) -> dict:
    return {group: {key: resolved.get(group, {}).get(key) for key in keys} for group, keys in _IDENTITY_KEYS.items()}


def config_hash(resolved: dict) -> str:
    import hashlib

    canonical = json.dumps(config_identity(resolved), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def read_manifest(output_dir: str | Path) -> dict | None:
    """The folder's manifest, None where there is none; a damaged one (empty, not JSON, not an
    object) is one line naming the way out, on every rerun the same."""
    path = Path(output_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        problem = None if isinstance(manifest, dict) else f"it holds a JSON {type(manifest).__name__}, not an object"
    except (OSError, UnicodeDecodeError, ValueError) as error:
        problem = f"{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else 'unreadable'}"
    if problem:
        raise UserError(f"{path} is damaged ({problem}); it records how this folder's results were made: "
                        "use output.overwrite=true to start over, or another output.dir")
    return manifest


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
    temporaries (under .tmp/, and where earlier versions kept them), the manifest and the report
    of the folder (gradcam-batch-report's default file, stale once the rows change). Not the
    lock file, which stays for the next run to lock (deleting a lock file lets two runs hold
    two different files of one name)."""
    files = [*(output_dir / TMP_DIR).glob("*"), output_dir / f".{MANIFEST_NAME}.tmp", output_dir / MANIFEST_NAME,
             output_dir / REPORT_NAME]
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
    known = {"cams", "errors", TMP_DIR, LOCK_NAME, MANIFEST_NAME, f".{MANIFEST_NAME}.tmp", "demo-data", REPORT_NAME}
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
