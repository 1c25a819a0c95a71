"""Shard listing: turn the data config into a sorted list of shards with safe ids, then into
work units, the slices that DataLoader workers and torchrun ranks share out.

A shard may hold far more samples than one worker should decode alone (1 tar of 50k images,
4 Parquet files of a Hugging Face dataset), so a shard with more than `data.unit_size` samples is
split into near-equal units where its format can be entered in the middle: uncompressed tars at
the header of a sample's first member (found by reading headers only), Parquet files at row
group boundaries, ImageFolder shards anywhere. A compressed tar cannot seek and stays one unit.
Units cut only between samples, so a sample never spans two units.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from gradcam_batch import UserError
from gradcam_batch.config import DataConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_OUTPUT_FOLDERS = ("cams", "errors")
"""Folders under output.dir that hold what the tool writes (hidden names are its temporaries)."""

log = logging.getLogger("gradcam_batch")


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
    size: int = 0
    """webdataset / parquet: the file's size in bytes when it was listed."""
    mtime_ns: int = 0
    """webdataset / parquet: the file's modification time when it was listed."""
    stats_digest: str = ""
    """imagefolder: digest of every file's size and modification time when it was listed, so a
    resume also sees a file that was rewritten under its old name."""

    def source(self) -> dict:
        """What the shard held when it was listed, enough for a resume to tell that it changed."""
        if self.format == "imagefolder":
            # file names are bytes on POSIX: one that is not UTF-8 is hashed as the bytes it is
            names = "\n".join(f"{path}\t{label}" for path, label in self.files).encode("utf-8", "surrogateescape")
            return {"files": len(self.files), "first": self.files[0][0] if self.files else None,
                    "last": self.files[-1][0] if self.files else None,
                    "digest": hashlib.sha256(names).hexdigest()[:16], "stats": self.stats_digest}
        return {"path": self.path, "size": self.size, "mtime_ns": self.mtime_ns}


def _inside(path: str, folder: str) -> bool:
    """Whether a resolved path is the resolved folder or lies below it."""
    return os.path.commonpath([path, folder]) == folder


def _split_top_level(text: str, separator: str = ",") -> list[str]:
    """`text` cut at each separator that is outside braces."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char == "{":
            depth += 1
        elif char == "}" and depth:
            depth -= 1
        elif char == separator and not depth:
            parts.append(text[start:index])
            start = index + 1
    return parts + [text[start:]]


_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard notation, as the shell and the `braceexpand` package read it:
    `shard-{0000..0003}.tar` (a range, zero-padded to its endpoints' width) and `{train,val}-*.tar`
    (alternatives), nested and repeated. Unbalanced braces are left as they are."""
    opening = pattern.find("{")
    while opening >= 0:
        depth = 0
        for closing in range(opening, len(pattern)):
            depth += {"{": 1, "}": -1}.get(pattern[closing], 0)
            if depth == 0:
                break
        else:
            return [pattern]  # unbalanced: a literal brace
        body, head, tail = pattern[opening + 1:closing], pattern[:opening], pattern[closing + 1:]
        numbers = _RANGE.fullmatch(body)
        if numbers:
            first, last = numbers.groups()
            width = max(len(first), len(last)) if first.lstrip("-").startswith("0") or last.lstrip("-").startswith("0") else 0
            low, high = int(first), int(last)
            step = 1 if high >= low else -1
            choices = [str(value).zfill(width) for value in range(low, high + step, step)]
        else:
            choices = _split_top_level(body)
            if len(choices) < 2:  # `{x}` is no alternative: keep it and look further on
                opening = pattern.find("{", opening + 1)
                continue
        return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]
    return [pattern]


def _expand_globs(pattern: str, what: str) -> list[str]:
    """The files the globs match, sorted, each file once: a file matched twice (two globs, a
    link and its target, `./x.tar` and `x.tar`, hard links) would be read twice and its rows
    written twice or over each other. The path kept for a file is its first that is not a link.
    Braces expand first (`shard-{0000..0099}.tar`), then each path is a glob."""
    paths: list[str] = []
    for part in (p.strip() for p in _split_top_level(pattern)):
        for expanded in expand_braces(part) if part else []:
            paths.extend(p for p in glob.glob(os.path.expanduser(expanded)) if os.path.isfile(p))
    if not paths:
        raise UserError(f"data.shards={pattern!r} matches no file; check the path and quote the glob "
                        f"(e.g. data.shards='DIR/*.{what}')")
    unique = sorted(set(paths))
    kept: dict[tuple[int, int], str] = {}
    for path in sorted(unique, key=lambda p: (os.path.islink(p), p)):
        status = os.stat(path)
        kept.setdefault((status.st_dev, status.st_ino), path)
    if len(kept) < len(unique):
        log.warning("data.shards=%r names %d of its files more than once (links or several globs); each is read once",
                    pattern, len(unique) - len(kept))
    return sorted(kept.values())


def _path_digest(path: str, length: int) -> str:
    return hashlib.sha256(os.path.realpath(path).encode("utf-8", "surrogateescape")).hexdigest()[:length]


def _unique_ids(paths: list[str]) -> list[str]:
    """Shard ids from file stems, distinct even on a disk that ignores case (they name part files).

    A stem that is already a safe id keeps it unless another file has the same stem; any other
    shard keeps its cleaned stem only while no other shard cleans to the same id. The rest get a
    short digest of their resolved path, so a file's id depends on the file, not on the order in
    which the globs list it: `a_b.tar` stays `a_b` while `a b.tar` beside it becomes `a_b-1f3c9a0e`.
    """
    stems = [Path(p).stem for p in paths]
    cleaned = [safe_shard_id(stem) for stem in stems]
    clean = [safe == stem for safe, stem in zip(cleaned, stems)]
    claimed_by_clean = Counter(safe.casefold() for safe, is_clean in zip(cleaned, clean) if is_clean)
    claimed = Counter(safe.casefold() for safe in cleaned)
    ids = [safe if (claimed_by_clean[safe.casefold()] == 1 if is_clean else claimed[safe.casefold()] == 1)
           else f"{safe[:190]}-{_path_digest(path, 8)}"
           for safe, is_clean, path in zip(cleaned, clean, paths)]
    # a stem may itself look like `<id>-<digest>`, and 8 hex digits can meet: longer digests for those
    for _ in range(2):
        counts = Counter(shard_id.casefold() for shard_id in ids)
        clashing = [index for index, shard_id in enumerate(ids) if counts[shard_id.casefold()] > 1]
        if not clashing:
            return ids
        for index in clashing:
            ids[index] = f"{ids[index][:160]}-{_path_digest(paths[index], 32)}"
    counts = Counter(shard_id.casefold() for shard_id in ids)
    first, second = [path for path, shard_id in zip(paths, ids) if counts[shard_id.casefold()] > 1][:2]
    raise UserError(f"data.shards lists {first!r} and {second!r}, whose names give the same shard id; rename one")


def check_output_apart(cfg: DataConfig, output_dir: str | os.PathLike) -> None:
    """Refuse data that would take in what the tool writes: output.dir inside an ImageFolder
    root makes its folders classes on the next run, and a shard glob that reaches the output's
    part files reads them as data. Cheap (no listing), so it runs before anything else."""
    output = os.path.realpath(os.path.expanduser(output_dir))
    if cfg.format == "imagefolder" and cfg.root and os.path.isdir(os.path.expanduser(cfg.root)):
        if _inside(output, os.path.realpath(os.path.expanduser(cfg.root))):
            raise UserError(f"output.dir={str(output_dir)!r} is inside data.root={cfg.root!r}; the next run would "
                            "list its folders as classes: put output.dir outside data.root")
    elif cfg.format in ("webdataset", "parquet") and cfg.shards:
        real_folders: dict[str, str] = {}  # thousands of shards share a few folders: resolve each once
        for part in (p.strip() for p in cfg.shards.split(",")):
            for path in glob.glob(os.path.expanduser(part)) if part else ():
                folder, name = os.path.split(os.path.abspath(path))
                if folder not in real_folders:
                    real_folders[folder] = os.path.realpath(folder)
                real = os.path.realpath(path) if os.path.islink(path) else os.path.join(real_folders[folder], name)
                if real == output or not _inside(real, output):
                    continue
                top = os.path.relpath(real, output).split(os.sep)[0]
                if top in _OUTPUT_FOLDERS or top.startswith("."):
                    raise UserError(f"data.shards={cfg.shards!r} matches {path!r}, which is inside "
                                    f"output.dir={str(output_dir)!r} where this tool writes; narrow the glob or "
                                    "move output.dir")


def _directory_key(path: str) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_dev, status.st_ino


def _walk_images(root: str, root_real: str, class_name: str, follow_links: bool):
    """(path relative to root, size, mtime_ns) of every image file below a class folder, in
    os.walk's order with sorted names (a folder's files, then its sub-folders one by one).

    Links inside the root are followed; a folder link that leads outside it is refused unless
    data.follow_links=true (a class folder linked to / would list the whole system), and one that
    leads back to a folder it lies in is refused in any case (it would list forever). A file link
    that leaves the root is listed: the reader makes it an error row, one file cannot stop a run.
    Every entry that is not a folder is listed when its name looks like an image: FIFOs, devices
    and broken links too, so that each becomes an error row rather than a silent gap."""
    stack = [(class_name, (_directory_key(root_real),))]
    while stack:
        relative, above = stack.pop()
        folder = os.path.join(root, relative)
        if os.path.islink(folder):
            target = os.path.realpath(folder)
            if not follow_links and not _inside(target, root_real):
                what = "class folder" if relative == class_name else "folder"
                raise UserError(f"data.root={root!r}: {what} {relative!r} is a link to {target!r}, outside data.root; "
                                "copy the images into data.root or set data.follow_links=true")
        key = _directory_key(folder)
        if key in above:
            raise UserError(f"data.root={root!r}: folder {relative!r} leads back to a folder above it "
                            "(a loop of links); remove the link")
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as error:  # os.walk would skip the folder and every image in it without a word
            raise UserError(f"data.root={root!r}: cannot list folder {relative!r} ({error.strerror}); "
                            "fix its permissions or move it out of data.root") from None
        folders = []
        for entry in entries:
            if entry.is_dir():
                folders.append(f"{relative}/{entry.name}")
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                try:
                    status = entry.stat()
                    size, mtime_ns = status.st_size, status.st_mtime_ns
                except OSError:
                    size, mtime_ns = -1, -1  # a broken link: the reader reports it
                yield f"{relative}/{entry.name}", size, mtime_ns
        stack.extend((sub, (*above, key)) for sub in reversed(folders))


def _imagefolder_shards(cfg: DataConfig) -> list[Shard]:
    root = Path(os.path.expanduser(cfg.root))
    if not root.is_dir():
        raise UserError(f"data.root={cfg.root!r} is not a directory; pass a folder of class sub-folders")
    root_real = os.path.realpath(root)
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise UserError(f"data.root={cfg.root!r} has no class sub-folders (expected ROOT/<class>/<image>)")
    files: list[tuple[str, int]] = []
    stats_digests: list[str] = []
    stats = hashlib.sha256()
    for label, name in enumerate(classes):
        for relative, size, mtime_ns in _walk_images(str(root), root_real, name, cfg.follow_links):
            files.append((relative, label))
            stats.update(f"{size} {mtime_ns}\n".encode())
            if len(files) % cfg.shard_size == 0:  # shards are consecutive runs of shard_size files
                stats_digests.append(stats.hexdigest()[:16])
                stats = hashlib.sha256()
    if not files:
        raise UserError(f"data.root={cfg.root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    if len(files) % cfg.shard_size:
        stats_digests.append(stats.hexdigest()[:16])
    return [
        Shard(shard_id=f"imagefolder-{index:05d}", format="imagefolder", root=str(root),
              files=files[start:start + cfg.shard_size], stats_digest=stats_digests[index])
        for index, start in enumerate(range(0, len(files), cfg.shard_size))
    ]


DEFAULT_BOXES_COLUMN = "boxes"  # like the label column, the default may be absent
DEFAULT_LABEL_COLUMN = "label"


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
    # the default "label" may be absent (labels unknown); a column the user named must exist
    if cfg.label_column and cfg.label_column != DEFAULT_LABEL_COLUMN and cfg.label_column not in names:
        close = difflib.get_close_matches(cfg.label_column, names, n=1)
        hint = f"; did you mean {close[0]}?" if close else "; data.label_column=null reads no labels"
        raise UserError(f"data.label_column={cfg.label_column!r} is not a column of {path}{hint} "
                        f"(columns: {', '.join(names)})")
    if cfg.id_column and cfg.id_column not in names:
        raise UserError(f"data.id_column={cfg.id_column!r} is not a column of {path} (columns: {', '.join(names)})")
    if cfg.boxes_column and cfg.boxes_column != DEFAULT_BOXES_COLUMN and cfg.boxes_column not in names:
        raise UserError(f"data.boxes_column={cfg.boxes_column!r} is not a column of {path} "
                        f"(columns: {', '.join(names)}; data.boxes_column=null reads no boxes)")


def list_shards(cfg: DataConfig, files: list[str] | None = None) -> list[Shard]:
    """All shards of the dataset, sorted, so every rank and every rerun sees the same list.
    `files`: the shard files themselves (the demo's), instead of data.shards' globs."""
    if cfg.format == "imagefolder":
        return _imagefolder_shards(cfg)
    extension = "tar" if cfg.format in ("webdataset", "demo") else "parquet"
    paths = sorted(files) if files is not None else _expand_globs(cfg.shards, extension)
    if cfg.format == "parquet":
        _check_parquet_columns(paths, cfg)
    fmt = "webdataset" if cfg.format == "demo" else cfg.format
    shards = []
    for shard_id, path in zip(_unique_ids(paths), paths):
        stat = os.stat(path)
        shards.append(Shard(shard_id=shard_id, format=fmt, path=path, size=stat.st_size, mtime_ns=stat.st_mtime_ns))
    return shards
