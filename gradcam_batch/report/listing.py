"""Which data the report may read back: only the shards that the output folder's own listing names
(the manifest's `listing`, as data.units.listing_record wrote it when the run started), and each
only once the files as they are now match that record: a tar or Parquet shard's path, size and
modification time; an ImageFolder shard's file names, labels, sizes and modification times, read
again from its class folders. A folder sent by someone else then cannot make the report read the
reporting user's own files into the page: a data.root or path in a crafted manifest is read only
where the listing also gives the exact size and nanosecond modification time of every file.
Size and time do not prove content (a file rewritten to the same size, its time restored, passes
here): images.py then checks every image it reads against the digest its rows record."""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from gradcam_batch.report.source import _first_line


@dataclass
class Checked:
    shards: dict = field(default_factory=dict)
    """shard id -> data.shards.Shard, as the run listed it and as it still is."""
    problems: dict[str, str] = field(default_factory=dict)
    """shard id -> why none of its samples is read (one line)."""
    root: Optional[str] = None
    """imagefolder: the data.root whose files matched the listing."""


def listed_shards(manifest: dict) -> Optional[dict]:
    """The listing's record of every shard (shard id -> what it held), None where there is none."""
    shards = (manifest.get("listing") or {}).get("shards")
    return shards if isinstance(shards, dict) and shards else None


def _changed(path, what: str) -> str:
    return f"{path} {what} since the run; its images are not read"


def _file_shard(shard_id: str, record: dict, fmt: str, demo_dir: Optional[Path]):
    """The tar or Parquet shard the listing records, if the file still is what it recorded; else why not."""
    from gradcam_batch.data.shards import Shard

    path, size, mtime_ns = record.get("path"), record.get("size"), record.get("mtime_ns")
    if not isinstance(path, str) or not path or type(size) is not int or type(mtime_ns) is not int:
        return f"the run's listing does not record shard {shard_id}'s path, size and modification time"
    if demo_dir is not None:  # the demo's shards live in the output folder: read them only there
        path = str(demo_dir / os.path.basename(path))
    try:
        status = os.stat(path)
    except OSError as error:
        return f"{path} cannot be read any more ({error.strerror or _first_line(error)})"
    if not stat.S_ISREG(status.st_mode):
        return f"{path} is not a regular file"
    if status.st_size != size:
        return _changed(path, "changed size")
    if status.st_mtime_ns != mtime_ns:
        return _changed(path, "was modified")
    return Shard(shard_id=shard_id, format=fmt, path=path, size=size, mtime_ns=mtime_ns)


def _stats_digest(stats: list[tuple[int, int]]) -> str:
    """data.shards' digest of an ImageFolder shard's file sizes and modification times."""
    digest = hashlib.sha256()
    for size, mtime_ns in stats:
        digest.update(f"{size} {mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _folder_shard(shard_id: str, record: dict, root: str, classes: list[str], follow_links: bool):
    """The ImageFolder shard the listing records, its files listed again from the class folders
    (from its first file on, as many as it held), if names, labels, sizes and times all match."""
    from gradcam_batch.data.shards import Shard, _walk_images

    count, first = record.get("files"), record.get("first")
    if type(count) is not int or count < 1 or not isinstance(first, str) or not isinstance(record.get("stats"), str) \
            or not isinstance(record.get("digest"), str):
        return f"the run's listing does not record shard {shard_id}'s files, sizes and modification times"
    top = first.split("/", 1)[0]
    if top not in classes:
        return _changed(f"{root}/{top}", "is gone or was renamed")
    files: list[tuple[str, int]] = []
    stats: list[tuple[int, int]] = []
    root_real = os.path.realpath(root)
    try:
        for label in range(classes.index(top), len(classes)):
            for relative, size, mtime_ns in _walk_images(root, root_real, classes[label], follow_links):
                if not files and relative != first:
                    continue
                files.append((relative, label))
                stats.append((size, mtime_ns))
                if len(files) == count:
                    break
            if len(files) == count or not files:  # not even its first file in its class folder: stop looking
                break
    except Exception as error:  # noqa: BLE001 -- a folder that cannot be listed now: no images from it
        return f"data.root {root} cannot be listed any more: {_first_line(error)}"
    listed = Shard(shard_id=shard_id, format="imagefolder", root=root, files=files, stats_digest=_stats_digest(stats))
    source = listed.source()
    if any(source[key] != record.get(key) for key in ("files", "first", "last", "digest")):
        return (f"shard {shard_id} under {root} does not match the run's listing (files added, removed or renamed "
                "since the run); its images are not read")
    if source["stats"] != record["stats"]:
        return (f"shard {shard_id} under {root} does not match the run's listing (a file's size or modification "
                "time changed since the run); its images are not read")
    return listed


def check_shards(cfg, manifest: dict, output_dir: Path, shard_ids: set[str]) -> Checked:
    """The wanted shards that the listing names and that still match it; the others with why."""
    checked = Checked()
    records = listed_shards(manifest) or {}
    folder_root, classes = None, []
    if cfg.format == "imagefolder":
        folder_root = os.path.expanduser(cfg.root or "")
        if not cfg.root or not os.path.isdir(folder_root):
            for shard_id in shard_ids:
                checked.problems[shard_id] = (f"the dataset cannot be read any more: data.root {cfg.root} is not "
                                              "a folder")
            return checked
        classes = sorted(entry.name for entry in os.scandir(folder_root)
                         if entry.is_dir() and not entry.name.startswith("."))
    demo_dir = output_dir / "demo-data" if cfg.format == "demo" else None
    if demo_dir is not None and demo_dir.is_symlink():  # the demo's data is the folder's own, never a link's
        for shard_id in shard_ids:
            checked.problems[shard_id] = f"{demo_dir} is a link, not the folder a run writes; it is not read"
        return checked
    fmt = "webdataset" if cfg.format in ("webdataset", "demo") else cfg.format
    for shard_id in sorted(shard_ids):
        record = records.get(shard_id)
        if not isinstance(record, dict):
            checked.problems[shard_id] = f"shard {shard_id} is not in the run's listing; its images are not read"
            continue
        if folder_root is not None:
            shard = _folder_shard(shard_id, record, folder_root, classes, cfg.follow_links)
        else:
            shard = _file_shard(shard_id, record, fmt, demo_dir)
        if isinstance(shard, str):
            checked.problems[shard_id] = shard
        else:
            checked.shards[shard_id] = shard
            checked.root = folder_root
    return checked


def described(shards: list) -> str:
    """The data a report read, for stderr and the page: the root, or the shard files."""
    if not shards:
        return ""
    if shards[0].format == "imagefolder":
        ids = ", ".join(shard.shard_id for shard in shards[:3]) + (", ..." if len(shards) > 3 else "")
        return f"data.root {shards[0].root} (listed shard{'s' if len(shards) > 1 else ''} {ids})"
    paths = ", ".join(shard.path for shard in shards[:3]) + (f" and {len(shards) - 3} more" if len(shards) > 3 else "")
    return f"{len(shards)} shard file{'s' if len(shards) > 1 else ''} of the run's listing ({paths})"
