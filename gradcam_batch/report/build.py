"""One report, from the output folder to the written page: the statistics, the map scan, the
pictures for the gallery cards (the run's stored heatmaps, else images read back from the
dataset), then the page, written atomically."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from gradcam_batch.report.images import Images, _run_crop, read_images, run_class_names
from gradcam_batch.report.maps import scan_maps
from gradcam_batch.report.page import render
from gradcam_batch.report.pictures import stored_picture
from gradcam_batch.report.queries import (_duckdb_importable, _duckdb_usable, overview_arrow, overview_duckdb,
                                          read_errors)
from gradcam_batch.report.source import ReportError, _choose_layer, open_output, run_layer


@dataclass
class Report:
    path: Path
    classes: int
    gallery_cards: int
    images_shown: int
    note: Optional[str]
    heatmaps_shown: int = 0
    """Gallery cards showing the heatmap_png the run stored (no dataset read for them)."""
    layer: str = ""
    maps: int = 0
    """The rank-0 maps of the layer."""
    zero_maps: int = 0
    """Those of them that are all zero (no positive evidence)."""
    images_from: Optional[str] = None
    """The data the gallery images were read from (data.root, or the shard files), if any."""
    skipped: tuple[tuple[str, str], ...] = ()
    """(file, why) of the files in cams/ and errors/ left out: not this tool's part files of this output."""


MAX_PER_GALLERY = 100
"""Cards per gallery at most: each inlines a picture of 10-20 kB, four galleries of 100 make a
page of a few MB (20,000 made one of 1 GB)."""
MAX_CLASSES = 1000
"""Classes in the table and the class means at most: every ImageNet class, each mean a small PNG."""


def check_bounds(per_gallery: int, max_classes: int) -> None:
    """--per-gallery and --max-classes within what a page can hold, or a one-line ReportError."""
    if not 0 <= per_gallery <= MAX_PER_GALLERY:
        raise ReportError(f"--per-gallery {per_gallery}: give 0 to {MAX_PER_GALLERY} cards per gallery (each card "
                          "inlines a picture; the page must stay small enough to open and share)")
    if not 1 <= max_classes <= MAX_CLASSES:
        raise ReportError(f"--max-classes {max_classes}: give 1 to {MAX_CLASSES} classes (each adds a table row and a "
                          "class-mean picture to the page)")


def build_report(output_dir: str | Path, out: Optional[str | Path] = None, per_gallery: int = 8,
                 max_classes: int = 50, layer: Optional[str] = None, engine: str = "auto",
                 images: bool = True) -> Report:
    check_bounds(per_gallery, max_classes)
    source = open_output(output_dir)
    use_duckdb = engine == "duckdb" or (engine == "auto" and _duckdb_importable() and _duckdb_usable(source))
    if engine == "duckdb" and not _duckdb_importable():
        raise ReportError("--engine duckdb: DuckDB is not installed (pip install duckdb)")
    overview = (overview_duckdb if use_duckdb else overview_arrow)(source, layer, per_gallery)
    layer = _choose_layer(overview.layer_rows, layer, run_layer(source))
    shown = sorted(overview.classes.values(), key=lambda s: (-s.count, s.target_class))[:max_classes]
    wanted = {(row["shard"], row["sample_id"]) for rows in overview.galleries.values() for row in rows}
    scan = scan_maps(source, layer, [s.target_class for s in shown], wanted)
    stored = {slot: pixels for slot, data in scan.heatmaps.items() if (pixels := stored_picture(data)) is not None}
    to_read = wanted - set(stored)
    if images and (to_read or not stored):
        pictures = read_images(source.manifest, source.output_dir, to_read)
        pictures.crop = _run_crop(source.manifest)
    else:  # --no-images, or every card shows a stored heatmap: the dataset is not read
        pictures = Images(note=None if images else "not read (--no-images)", crop=_run_crop(source.manifest),
                          class_names=run_class_names(source.manifest, source.output_dir, read=images))
    pictures.heatmaps = stored
    errors_total, errors = read_errors(source)
    page = render(source, overview, layer, shown, scan, pictures, errors_total, errors, per_gallery)
    target = Path(out) if out else source.output_dir / "report.html"
    if not target.parent.is_dir():
        raise ReportError(f"--out {out}: the folder {target.parent} does not exist")
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(page, encoding="utf-8")
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    cards = sum(len(rows) for rows in overview.galleries.values())
    return Report(target, len(shown), cards, len(pictures.pictures), pictures.note, len(stored), layer,
                  overview.maps, overview.zero_maps, pictures.read_from, tuple(source.skipped))
