"""Shard listing: turn the data config into a sorted list of shards with safe ids."""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from gradcam_batch import UserError
from gradcam_batch.config import DataConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_shard_id(name: str) -> str:
    """Shard ids become file names: keep a safe character set and never a leading dot."""
    cleaned = _UNSAFE.sub("_", name).lstrip(".") or "shard"
    return cleaned[:200]


@dataclass
class Shard:
    shard_id: str
    format: str
    path: str = ""
    """webdataset / parquet: the shard file."""
    files: list[tuple[str, int]] = field(default_factory=list)
    """imagefolder: (path relative to root, label) of every image in the shard."""
    root: str = ""


def _expand_globs(pattern: str, what: str) -> list[str]:
    paths: list[str] = []
    for part in (p.strip() for p in pattern.split(",")):
        if part:
            paths.extend(p for p in glob.glob(os.path.expanduser(part)) if os.path.isfile(p))
    if not paths:
        raise UserError(f"data.shards={pattern!r} matches no file; check the path and quote the glob "
                        f"(e.g. data.shards='DIR/*.{what}')")
    return sorted(set(paths))


def _unique_ids(paths: list[str]) -> list[str]:
    """Shard ids from file stems; parent folders are added when stems collide."""
    stems = [safe_shard_id(Path(p).stem) for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    common = os.path.commonpath([os.path.abspath(p) for p in paths])
    return [safe_shard_id(os.path.splitext(os.path.relpath(os.path.abspath(p), common))[0]) for p in paths]


def _imagefolder_shards(cfg: DataConfig) -> list[Shard]:
    root = Path(os.path.expanduser(cfg.root))
    if not root.is_dir():
        raise UserError(f"data.root={cfg.root!r} is not a directory; pass a folder of class sub-folders")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise UserError(f"data.root={cfg.root!r} has no class sub-folders (expected ROOT/<class>/<image>)")
    files: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames.sort()
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    files.append((os.path.relpath(os.path.join(dirpath, filename), root).replace(os.sep, "/"), label))
    if not files:
        raise UserError(f"data.root={cfg.root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return [
        Shard(shard_id=f"imagefolder-{index:05d}", format="imagefolder", root=str(root),
              files=files[start:start + cfg.shard_size])
        for index, start in enumerate(range(0, len(files), cfg.shard_size))
    ]


def _check_parquet_columns(paths: list[str], cfg: DataConfig) -> None:
    """Column names checked on the first readable shard; unreadable shards become error rows
    when they are read, so one bad file does not stop the job."""
    import pyarrow.parquet as pq

    for path in paths:
        try:
            names = pq.read_schema(path).names
            break
        except (OSError, ValueError):
            continue
    else:
        raise UserError(f"data.shards={cfg.shards!r}: none of the {len(paths)} files is a readable Parquet file")
    if cfg.image_column not in names:
        raise UserError(f"data.image_column={cfg.image_column!r} is not a column of {path} "
                        f"(columns: {', '.join(names)})")
    if cfg.id_column and cfg.id_column not in names:
        raise UserError(f"data.id_column={cfg.id_column!r} is not a column of {path} (columns: {', '.join(names)})")


def list_shards(cfg: DataConfig) -> list[Shard]:
    """All shards of the dataset, sorted, so every rank and every rerun sees the same list."""
    if cfg.format == "imagefolder":
        return _imagefolder_shards(cfg)
    extension = "tar" if cfg.format in ("webdataset", "demo") else "parquet"
    paths = _expand_globs(cfg.shards, extension)
    if cfg.format == "parquet":
        _check_parquet_columns(paths, cfg)
    fmt = "webdataset" if cfg.format == "demo" else cfg.format
    return [Shard(shard_id=shard_id, format=fmt, path=path) for shard_id, path in zip(_unique_ids(paths), paths)]
