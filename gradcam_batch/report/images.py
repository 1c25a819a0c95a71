"""Gallery images read back from the dataset the run read (the manifest's `data` config, with the
preprocessing it recorded), only from the shards that hold the wanted samples, and decoded with
the run's own resize and crop, so that each map lies over exactly the pixels it explains. Only
shards that the folder's own listing names, and whose files still match it, are read (listing);
so are the class names of an ImageFolder. Each image read is then hashed as the run hashed it
(data.loader.image_digest) and shown only if that matches its rows' `image_digest`: a file
replaced since the run by one of the same size, its modification time restored, passes the
listing but not this. Rows without a digest (an older version's output) fall back to the
listing's checks, and the page says that their content could not be verified."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gradcam_batch.report.listing import check_shards, described, listed_shards
from gradcam_batch.report.pictures import CARD_SIZE
from gradcam_batch.report.source import (PART_FILE, REQUIRED_COLUMNS, ReportError, _batches, _first_line, _run_units,
                                         _whose)

DIGEST_COLUMN = "image_digest"
CONTENT_CHANGED = "the file's content changed since the run"


@dataclass
class Images:
    pictures: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    """(shard, sample_id) -> uint8 (crop, crop, 3), decoded as the run decoded it."""
    problems: dict[tuple[str, str], str] = field(default_factory=dict)
    """(shard, sample_id) -> why that sample's image is not shown."""
    note: Optional[str] = None
    """Why no image is shown at all (one line), or a warning about them."""
    boxes: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    """(shard, sample_id) -> the object box, x0 y0 x1 y1 in [0, 1] of the crop, where the sample has one."""
    heatmaps: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    """(shard, sample_id) -> uint8 (h, w, 3): the run's own heatmap_png (its map blended over the
    crop), decoded; such a card shows it as it is, and its sample is not read from the dataset."""
    class_names: dict[int, str] = field(default_factory=dict)
    crop: int = CARD_SIZE
    """The run's crop: the size of a map drawn alone."""
    read_from: Optional[str] = None
    """The data the images were read from (data.root, or the shard files), checked against the listing."""


def data_config(manifest: dict, output_dir: Path):
    """The run's DataConfig, with the preprocessing the run resolved; raises on a config that
    cannot be rebuilt."""
    from gradcam_batch.config import DataConfig

    data = dict((manifest.get("config") or {}).get("data") or {})
    if not data:
        raise ReportError("the manifest holds no data config")
    preprocessing = manifest.get("preprocessing") or {}
    for key in ("resize", "crop", "mean", "std", "interpolation"):
        if data.get(key) is None and preprocessing.get(key) is not None:
            data[key] = preprocessing[key]
    if data.get("format") == "demo":  # the demo's shards live in <output.dir>/demo-data unless data.root says
        root = Path(data["root"]) if data.get("root") else output_dir / "demo-data"
        data["shards"] = str(root / "demo-*.tar")
    known = {item.name for item in dataclasses.fields(DataConfig)}
    return DataConfig(**{key: value for key, value in data.items() if key in known})


def _class_names(cfg, root: Optional[str]) -> dict[int, str]:
    """The demo's classes; an ImageFolder's sorted class folders, only of a root whose files matched
    the run's listing (`root`): a crafted data.root would put the names of any folder in the page."""
    if cfg.format == "demo":
        from gradcam_batch.models import DEMO_CLASSES

        return dict(enumerate(DEMO_CLASSES))
    if cfg.format == "imagefolder" and root:
        return dict(enumerate(sorted(entry.name for entry in os.scandir(root)
                                     if entry.is_dir() and not entry.name.startswith("."))))
    return {}


def run_class_names(manifest: dict, output_dir: Path, read: bool = True) -> dict[int, str]:
    """The class names, where the run's data config says them; {} where it cannot be rebuilt. An
    ImageFolder's only when `read` (the dataset may be read) and a shard of the listing matches."""
    try:
        cfg = data_config(manifest, output_dir)
        root = None
        if read and cfg.format == "imagefolder":
            records = listed_shards(manifest) or {}
            root = check_shards(cfg, manifest, output_dir, set(sorted(records)[:1])).root
        return _class_names(cfg, root)
    except Exception:  # noqa: BLE001 -- names are a nicety
        return {}


def _first_box(meta) -> Optional[list]:
    """The sample's first object box (pixels), as the run read it for the pointing game."""
    try:
        from gradcam_batch.data.transforms import box_from_meta
    except ImportError:
        return None
    try:
        return box_from_meta(meta)
    except Exception:  # noqa: BLE001 -- metadata is data; a card without its box is fine
        return None


def recorded_digests(manifest: dict, output_dir: Path, wanted: set[tuple[str, str]]
                     ) -> dict[tuple[str, str], set[str]]:
    """(shard, sample_id) -> the image_digest values of the wanted samples' rows (one, written by
    the run), read from the part files of their shards that the report reads (source's checks);
    a sample absent here has no digest recorded (an older version's output)."""
    cams = output_dir / "cams"
    if cams.is_symlink():  # the report reads nothing through a link planted in the folder
        return {}
    by_shard: dict[str, set[str]] = {}
    for shard_id, sample_id in wanted:
        by_shard.setdefault(shard_id, set()).add(sample_id)
    units = _run_units(manifest)
    digests: dict[tuple[str, str], set[str]] = {}
    for path in sorted(cams.glob("*.parquet")):
        name = PART_FILE.fullmatch(path.name)
        if name is None or name.group("shard") not in by_shard:
            continue
        footer = _whose(path, REQUIRED_COLUMNS, units)
        if isinstance(footer, str) or DIGEST_COLUMN not in footer.schema.to_arrow_schema().names:
            continue
        shard_id = name.group("shard")
        ids = pa.array(sorted(by_shard[shard_id]), pa.string())
        for batch in _batches(path, ["shard", "sample_id", DIGEST_COLUMN], 65_536):
            mine = pc.and_(pc.equal(batch.column("shard"), shard_id), pc.is_in(batch.column("sample_id"), ids))
            mine = pc.and_(mine, batch.column(DIGEST_COLUMN).is_valid()).fill_null(False)
            rows = batch.filter(mine)
            for sample_id, digest in zip(rows.column("sample_id").to_pylist(), rows.column(DIGEST_COLUMN).to_pylist()):
                digests.setdefault((shard_id, sample_id), set()).add(digest)
    return digests


def _content_problem(payload: bytes, recorded: set[str]) -> Optional[str]:
    """Why the image read back is not the one the run read (its rows' digests), or None."""
    from gradcam_batch.data.loader import image_digest

    if len(recorded) > 1:
        return "its rows record different image digests, so which image they explain is unknown; not shown"
    if image_digest(payload) not in recorded:
        return f"{CONTENT_CHANGED} (its SHA-256 is not the image_digest the run recorded); not shown"
    return None


def read_images(manifest: dict, output_dir: Path, wanted: set[tuple[str, str]]) -> Images:
    """Decode the wanted samples as the run did, reading only the shards that hold them, of those
    only the ones the run's listing names and that still match it."""
    images = Images()
    try:
        cfg = data_config(manifest, output_dir)
    except Exception as error:  # noqa: BLE001 -- any reason becomes the page's one line
        images.note = f"the run's data config cannot be rebuilt ({_first_line(error)})"
        return images
    if listed_shards(manifest) is None:
        images.class_names = _class_names(cfg, None)
        if wanted:
            images.note = ("the manifest holds no listing of the run's data (shards, sizes, modification times) "
                           "to check the dataset against: it is not read")
        return images
    if not wanted:
        images.class_names = run_class_names(manifest, output_dir)
        return images
    if not cfg.resize or not cfg.crop:
        images.class_names = run_class_names(manifest, output_dir)
        images.note = "the manifest does not record the run's resize and crop"
        return images
    try:
        from gradcam_batch.data.readers import iter_samples
        from gradcam_batch.data.records import printable
        from gradcam_batch.data.transforms import decode_resize_crop

        checked = check_shards(cfg, manifest, output_dir, {shard_id for shard_id, _ in wanted})
    except Exception as error:  # noqa: BLE001 -- an unreadable folder, ...
        images.note = f"the dataset cannot be read any more: {_first_line(error)}"
        return images
    try:
        digests = recorded_digests(manifest, output_dir, wanted)
    except Exception as error:  # noqa: BLE001 -- no image is shown unchecked when the record cannot be read
        images.class_names = _class_names(cfg, checked.root)
        images.note = f"the run's image digests cannot be read ({_first_line(error)}); no image is shown"
        return images
    unverified = 0
    images.class_names = _class_names(cfg, checked.root)
    by_shard: dict[str, set[str]] = {}
    for shard_id, sample_id in wanted:
        by_shard.setdefault(shard_id, set()).add(sample_id)
    read = []
    for shard_id, sample_ids in sorted(by_shard.items()):
        shard = checked.shards.get(shard_id)
        if shard is None:
            for sample_id in sample_ids:
                images.problems[(shard_id, sample_id)] = checked.problems[shard_id]
            continue
        if shard.format == "imagefolder":  # read only the wanted files the listing names, not the whole shard
            named = {printable(path) for path, _ in shard.files}
            for sample_id in sample_ids - named:
                images.problems[(shard_id, sample_id)] = f"not a file of shard {shard_id} in the run's listing"
            shard = dataclasses.replace(shard, files=[(path, label) for path, label in shard.files
                                                      if printable(path) in sample_ids])
            sample_ids = sample_ids & named
            if not sample_ids:
                continue
        read.append(shard)
        left = set(sample_ids)
        try:
            for sample in iter_samples(shard, cfg):
                if sample.sample_id not in left:
                    continue
                left.discard(sample.sample_id)
                key = (shard_id, sample.sample_id)
                recorded = digests.get(key)  # None: an older version's output, no digest to check
                if sample.payload is None:
                    images.problems[key] = f"not readable: {sample.error[2] if sample.error else 'no image'}"
                elif recorded is not None and (changed := _content_problem(sample.payload, recorded)):
                    images.problems[key] = changed  # not even decoded: these bytes are not the run's
                else:
                    try:
                        picture, box = decode_resize_crop(sample.payload, cfg.resize, cfg.crop, cfg.max_pixels,
                                                          box=_first_box(sample.meta),
                                                          interpolation=cfg.interpolation or "bilinear")
                        images.pictures[key] = picture.permute(1, 2, 0).contiguous().numpy()
                        unverified += recorded is None
                        if box is not None:
                            images.boxes[key] = [float(value) for value in box]
                    except Exception as error:  # noqa: BLE001 -- that card shows its map alone
                        images.problems[key] = f"not decodable: {_first_line(error)}"
                if not left:
                    break
        except Exception as error:  # noqa: BLE001 -- a shard that broke since the run
            for sample_id in left:
                images.problems[(shard_id, sample_id)] = f"shard {shard_id} cannot be read: {_first_line(error)}"
            left = set()
        for sample_id in left:
            images.problems[(shard_id, sample_id)] = f"no longer in shard {shard_id}"
    images.read_from = described(read) or None
    refused = sorted(shard_id for shard_id in by_shard if shard_id in checked.problems)
    if wanted and not images.pictures:
        reasons = sorted(set(images.problems.values()))
        images.note = f"none of the gallery images could be read ({reasons[0] if reasons else 'unknown'})"
    elif refused:
        named = ", ".join(refused[:3]) + (", ..." if len(refused) > 3 else "")
        images.note = f"{len(refused)} shard(s) not read ({named}): {checked.problems[refused[0]]}"
    if unverified:
        noun, files = ("images", "their files'") if unverified > 1 else ("image", "its file's")
        fallback = (f"the content of {unverified} {noun} shown could not be verified (this output records no "
                    f"{DIGEST_COLUMN}: an older version wrote it); only {files} path, size and modification time "
                    "were checked")
        images.note = f"{images.note}; {fallback}" if images.note else fallback
    return images


def _run_crop(manifest: dict) -> int:
    crop = (manifest.get("preprocessing") or {}).get("crop") or \
        ((manifest.get("config") or {}).get("data") or {}).get("crop")
    return crop if isinstance(crop, int) and crop > 0 else CARD_SIZE
