"""What an output folder holds and who may write it: the run manifest, which files are this
tool's, its own entries (never links: nothing is written or deleted through one), the checks a
resume makes before trusting a part file, and the lock that keeps one run per folder. The part
files themselves are written by `writer`."""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import json
import logging
import os
import socket
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gradcam_batch import UserError

from gradcam_batch.writer import (CAM_SCHEMA, ERROR_SCHEMA, LOCK_NAME, MANIFEST_NAME, TMP_DIR, UNIT_TOTALS_KEY,
                                  _fsync_rename, _temporary, _writing, is_regular, make_folder, part_name,
                                  regular_files)

log = logging.getLogger("gradcam_batch")


# --- run manifest: what the output directory holds and how it was made ----------------------
# Config keys that change what the rows mean; runtime, batch size, workers and the output
# location do not, so a resume may change them. Nor does data.unit_size: a resume keeps the
# split its manifest recorded.
REPORT_NAME = "report.html"  # where gradcam-batch-report writes by default
# what gradcam-batch-report writes beside cams/ (report/strategies.py), stale once the rows change
STRATEGIES_NAMES = ("strategies.parquet", "strategies_classes.parquet")
CROSSCHECK_NAME = "crosscheck.parquet"  # what the report's --compare writes (report/crosscheck.py), as stale
REPORT_FILES = (*STRATEGIES_NAMES, CROSSCHECK_NAME)

_IDENTITY_KEYS = {
    "data": ("format", "root", "shards", "shard_size", "image_column", "label_column", "id_column",
             "boxes_column", "resize", "crop", "mean", "std", "interpolation", "max_pixels", "demo_images"),
    "model": ("source", "name", "weights", "num_classes", "target_layer", "seed"),
    "cam": ("method", "targets", "topk", "classes", "normalize", "fuse"),
    "output": ("cam_size", "heatmap_png"),
    "metrics": ("threshold", "faithfulness", "fractions"),
}


# Keys that change the rows only away from their default: part of the identity then, so folders
# written before they existed keep their hash (cam.analytic changes how, not what: not listed).
_IDENTITY_UNLESS_DEFAULT = {
    "cam": {"finer_alpha": 1.0, "finer_comparison_categories": [1, 2, 3], "channels": "all"},
    "metrics": {"road": False, "road_percentiles": [20.0, 40.0, 60.0, 80.0], "road_noise": 0.01},
}


def config_identity(resolved: dict) -> dict:
    identity = {group: {key: resolved.get(group, {}).get(key) for key in keys}
                for group, keys in _IDENTITY_KEYS.items()}
    for group, defaults in _IDENTITY_UNLESS_DEFAULT.items():
        for key, default in defaults.items():
            value = resolved.get(group, {}).get(key, default)
            if value != default:
                identity[group][key] = value
    return identity


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
    make_folder(output_dir / TMP_DIR)
    tmp = _temporary(output_dir, final)
    try:
        with _writing(tmp):
            tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        _fsync_rename(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)  # only still there if the write or the rename failed


def _unit_totals(metadata: pq.FileMetaData) -> dict | None:
    """The unit's own totals from its part file's footer (see writer.UNIT_TOTALS_KEY); None if
    the file has none (an earlier version wrote it) or they do not parse."""
    raw = (metadata.metadata or {}).get(UNIT_TOTALS_KEY)
    try:
        totals = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return totals if isinstance(totals, dict) else None


def counts_on_disk(output_dir: str | Path, unit_ids: list[str]) -> dict[str, dict]:
    """Rows, errors and the unit's own totals (pointing sums, zero maps) of every complete
    unit, read from the part files' footers."""
    output_dir = Path(output_dir)
    counts = {}
    for unit_id in unit_ids:
        part = output_dir / "cams" / part_name(unit_id)
        if not is_regular(part):
            continue
        errors = output_dir / "errors" / part_name(unit_id)
        metadata = pq.read_metadata(part)
        counts[unit_id] = {"rows": metadata.num_rows,
                           "errors": pq.read_metadata(errors).num_rows if is_regular(errors) else 0,
                           **(_unit_totals(metadata) or {})}
    return counts


# --- the folder's own entries: never links ------------------------------------------------------
# A link among them would carry a create, a truncate, a listing or a delete to wherever it points
# (`.tmp -> ~/docs` and an overwrite would empty ~/docs), so each must be what this tool makes
# there. output.dir itself may be a link: the pipeline resolves it once, at the start.
FOLDER_ENTRIES = ("cams", "errors", TMP_DIR, "demo-data")
FILE_ENTRIES = (LOCK_NAME, MANIFEST_NAME, f".{MANIFEST_NAME}.tmp")  # the last: where earlier versions wrote


def _kind(status: os.stat_result) -> str:
    for test, name in ((stat.S_ISLNK, "link"), (stat.S_ISDIR, "folder"), (stat.S_ISREG, "file"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket")):
        if test(status.st_mode):
            return name
    return "device"


def entry_refusal(output_dir: Path, name: str, status: os.stat_result) -> str | None:
    """Why the entry `name` of output_dir, as os.lstat (or os.fstat of what was opened) sees it,
    is not one this tool may use; None if it may."""
    where = f"output.dir={str(output_dir)!r} holds {name}"
    if stat.S_ISLNK(status.st_mode):
        try:
            target = os.readlink(output_dir / name)
        except OSError:
            target = "elsewhere"
        return (f"{where} as a link to {target!r}; gradcam-batch never follows a link inside its output folder "
                "(it would create or delete files where the link leads): remove the link, or use another output.dir")
    expected = "folder" if name in FOLDER_ENTRIES else "file"
    if _kind(status) != expected:
        return (f"{where} as a {_kind(status)} where gradcam-batch keeps a {expected}; move it away, "
                "or use another output.dir")
    if name == LOCK_NAME and status.st_nlink > 1:
        # the one file this tool writes in place (it notes the run holding it): through a hard
        # link that note would overwrite the other name's contents
        return (f"{where} with {status.st_nlink} names (hard-linked to another file, which taking the lock "
                "would overwrite); remove it, or use another output.dir")
    return None


def check_entry(output_dir: Path, name: str) -> None:
    """Refuse in one line an entry that is a link or of the wrong kind; an absent one is fine."""
    try:
        status = os.lstat(output_dir / name)
    except (FileNotFoundError, NotADirectoryError):
        return
    problem = entry_refusal(output_dir, name, status)
    if problem:
        raise UserError(problem)


def check_entries(output_dir: str | Path) -> None:
    """Refuse in one line an output folder whose own entries (cams, errors, .tmp, demo-data, the
    lock file, the manifest) are links or not of their kind (a file where a folder belongs):
    before anything is written or deleted, so what a planted link leads to is never touched."""
    output_dir = Path(output_dir)
    for name in (*FOLDER_ENTRIES, *FILE_ENTRIES):
        check_entry(output_dir, name)


# --- what in an output folder is ours ------------------------------------------------------------

def _ours(output_dir: Path) -> list[Path]:
    """Every file this tool writes in an output folder, and nothing else: part files, the
    temporaries (under .tmp/, and where earlier versions kept them), the manifest and the report
    of the folder (gradcam-batch-report's default file, its strategies and cross-check files, stale
    once the rows change). Not the
    lock file, which stays for the next run to lock (deleting a lock file lets two runs hold
    two different files of one name). Listed without following a link: a linked folder lists
    nothing and a linked file is not ours."""
    files = [*regular_files(output_dir / TMP_DIR),
             *(output_dir / name for name in (f".{MANIFEST_NAME}.tmp", MANIFEST_NAME, REPORT_NAME, *REPORT_FILES))]
    for folder in ("cams", "errors"):
        files += [path for path in regular_files(output_dir / folder)
                  if fnmatch.fnmatchcase(path.name, "part-*.parquet")
                  or fnmatch.fnmatchcase(path.name, ".part-*.parquet.tmp")]
    return [path for path in files if is_regular(path)]


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
    known = {"cams", "errors", TMP_DIR, LOCK_NAME, MANIFEST_NAME, f".{MANIFEST_NAME}.tmp", "demo-data", REPORT_NAME,
             *REPORT_FILES}
    ours = set(_ours(output_dir))
    with os.scandir(output_dir) as listing:
        entries = sorted(listing, key=lambda entry: entry.name)
    for entry in entries:
        if (entry.name not in known or entry.is_symlink()
                or (entry.name in ("cams", "errors") and not entry.is_dir(follow_symlinks=False))):
            return entry.name
        if entry.name in ("cams", "errors"):
            with os.scandir(entry.path) as listing:
                inner = sorted(listing, key=lambda item: item.name)
            for item in inner:
                if Path(item.path) not in ours:
                    return f"{entry.name}/{item.name}"
    return None


def _part_counts(part: Path, errors: Path, recorded: dict | None) -> tuple[dict | None, str]:
    """A complete unit's rows, errors and own totals if its files hold up, else None and why
    (naming the file)."""
    def footer(path: Path, schema: pa.Schema) -> tuple[pq.FileMetaData | None, str]:
        where = f"{path.parent.name}/{path.name}"
        if path.is_symlink():  # what it leads to is no file this tool wrote
            return None, f"{where} is a link, not a part file"
        try:
            metadata = pq.read_metadata(path)
        except (OSError, ValueError, pa.ArrowException) as error:
            reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
            return None, f"{where} is unreadable ({reason})"
        if not metadata.schema.to_arrow_schema().remove_metadata().equals(schema):
            return None, f"{where} does not have the columns this version writes"
        if sum(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)) != metadata.num_rows:
            return None, f"{where} has a footer whose row groups do not add up"
        return metadata, ""

    recorded = recorded or {}
    metadata, problem = footer(part, CAM_SCHEMA)
    if metadata is None:
        return None, problem
    rows = metadata.num_rows
    if recorded.get("rows") is not None and rows != recorded["rows"]:
        return None, f"cams/{part.name} holds {rows} rows where the manifest recorded {recorded['rows']}"
    totals = _unit_totals(metadata)
    if totals is None:
        # the run's pointing and zero-map totals add up the units' own: without them the unit
        # would count as nothing
        return None, f"cams/{part.name} carries no totals of its unit (an earlier version wrote it)"
    error_rows = 0
    if os.path.lexists(errors):
        error_metadata, problem = footer(errors, ERROR_SCHEMA)
        if error_metadata is None:
            return None, problem
        error_rows = error_metadata.num_rows
    if recorded.get("errors") is not None and error_rows != recorded["errors"]:
        return None, (f"errors/{errors.name} holds {error_rows} error rows where the manifest recorded "
                      f"{recorded['errors']}")
    return {"rows": rows, "errors": error_rows, **totals}, ""


def check_parts(output_dir: str | Path, unit_ids: list[str], recorded: dict[str, dict]) -> dict[str, dict]:
    """Rows, errors and own totals of every complete unit whose files hold up: no link, the
    footer parses, the columns are ours, it carries its unit's totals, and the counts match what
    the manifest recorded (where it did). A unit that fails is deleted (a link, not what it leads
    to), with one line saying why, and so redone; a damaged file never crashes a resume. Rank 0
    only, under the lock, before any rank writes."""
    output_dir = Path(output_dir)
    counts = {}
    for unit_id in unit_ids:
        part, errors = output_dir / "cams" / part_name(unit_id), output_dir / "errors" / part_name(unit_id)
        if not (is_regular(part) or part.is_symlink()):
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
        self._fd: int | None = None
        with _writing(self.path, "create"):
            output_dir.mkdir(parents=True, exist_ok=True)
            try:
                # never through a link (its target would be truncated); O_NONBLOCK: a FIFO planted
                # there is refused below rather than waited on
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK,
                                   0o644)
            except OSError:
                check_entry(output_dir, LOCK_NAME)  # a link or a folder there: one line naming it
                raise
        try:
            problem = entry_refusal(output_dir, LOCK_NAME, os.fstat(self._fd))  # what was opened, not the name
            if problem:
                raise UserError(problem)
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
