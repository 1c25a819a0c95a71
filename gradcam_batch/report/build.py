"""One report, from the output folder to the written page: the statistics, the strategies (SpRAy,
where asked for), the map scan, the pictures for the gallery and exemplar cards (the run's stored
heatmaps, else images read back from the dataset), then the page, written atomically."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from gradcam_batch.report.crosscheck import CrossCheck, add_clusters, cross_check
from gradcam_batch.report.crosscheck_page import crosscheck_section
from gradcam_batch.report.images import Images, _run_crop, read_images, run_class_names
from gradcam_batch.report.maps import scan_maps
from gradcam_batch.report.page import render
from gradcam_batch.report.pictures import stored_picture
from gradcam_batch.report.queries import (_duckdb_importable, _duckdb_usable, overview_arrow, overview_duckdb,
                                          read_errors, targets_are_predictions)
from gradcam_batch.report.source import ReportError, Source, _choose_layer, _first_line, open_output, run_layer
from gradcam_batch.report.strategies import (CLASSES_NAME, STRATEGIES_NAME, StrategyError, StrategyOptions,
                                             find_strategies)
from gradcam_batch.report.strategies_page import (DEFAULT_TOP, MAX_TOP, StrategyView, _members, read_strategies,
                                                  strategies_section)


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
    strategies: Optional[StrategyView] = None
    """The strategies shown (None: not asked for); its note says why there are none."""
    crosscheck: Optional[CrossCheck] = None
    """The agreement with another output's maps (None: no --compare)."""


MAX_PER_GALLERY = 100
"""Cards per gallery at most: each inlines a picture of 10-20 kB, four galleries of 100 make a
page of a few MB (20,000 made one of 1 GB)."""
MAX_CLASSES = 1000
"""Classes in the table and the class means at most: every ImageNet class, each mean a small PNG."""


IN_PROCESS_MAPS = 20_000
"""With workers 0 (automatic: a process a core, up to a cap), a layer of this many rank-0 maps or
fewer is clustered in this process: a pool's start (its processes import SciPy and scikit-learn)
costs seconds, more than clustering that many maps (about 45 ms a class of 1,000). The results do
not depend on workers."""
LIBRARIES = (("scikit-learn", "sklearn"), ("SciPy", "scipy"))


def check_bounds(per_gallery: int, max_classes: int, strategies_top: int = DEFAULT_TOP) -> None:
    """--per-gallery, --max-classes and --strategies-top within what a page can hold, or a one-line
    ReportError."""
    if not 0 <= strategies_top <= MAX_TOP:
        raise ReportError(f"--strategies-top {strategies_top}: give 0 to {MAX_TOP} classes (each shows its "
                          "clusters' mean maps and exemplar cards in the page)")
    if not 0 <= per_gallery <= MAX_PER_GALLERY:
        raise ReportError(f"--per-gallery {per_gallery}: give 0 to {MAX_PER_GALLERY} cards per gallery (each card "
                          "inlines a picture; the page must stay small enough to open and share)")
    if not 1 <= max_classes <= MAX_CLASSES:
        raise ReportError(f"--max-classes {max_classes}: give 1 to {MAX_CLASSES} classes (each adds a table row and a "
                          "class-mean picture to the page)")


def missing_libraries() -> list[str]:
    """The libraries finding strategies needs that are not installed (looked up, not imported)."""
    from importlib.util import find_spec

    missing = []
    for name, module in LIBRARIES:
        try:
            found = find_spec(module) is not None
        except (ImportError, ValueError):  # a module without a spec, a broken package
            found = False
        if not found:
            missing.append(name)
    return missing


def _strategies(source: Source, layer: str, classes: list[int], options: StrategyOptions, top: int,
                maps: int) -> StrategyView:
    """find_strategies over the layer (it writes strategies.parquet and strategies_classes.parquet
    beside cams/), then the view of the report's classes; a view with a note where the libraries
    are missing. Any other StrategyError is one line, exit code 2."""
    options = dataclasses.replace(options, layer=layer)
    missing = missing_libraries()
    if missing:
        return StrategyView(options=options, top=top,
                            note=f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed "
                                 "(pip install 'gradcam-batch[strategies]')")
    in_process = options.workers == 0 and maps <= IN_PROCESS_MAPS
    started = time.perf_counter()
    try:
        results = find_strategies(source.output_dir,
                                  dataclasses.replace(options, workers=1) if in_process else options)
    except StrategyError as error:
        raise StrategyError(f"strategies: {error} (--no-strategies writes the report without them)") from None
    except ImportError as error:  # installed, yet not importable
        return StrategyView(options=options, top=top, note=f"scikit-learn or SciPy cannot be imported "
                                                           f"({_first_line(error)})")
    seconds = time.perf_counter() - started
    view = read_strategies(source, layer, classes, results, options, top)
    view.seconds, view.in_process = seconds, in_process
    view.files = (source.output_dir / STRATEGIES_NAME, source.output_dir / CLASSES_NAME)
    return view


def build_report(output_dir: str | Path, out: Optional[str | Path] = None, per_gallery: int = 8,
                 max_classes: int = 50, layer: Optional[str] = None, engine: str = "auto",
                 images: bool = True, strategies: Optional[StrategyOptions] = None,
                 strategies_top: int = DEFAULT_TOP, compare: Optional[str | Path] = None) -> Report:
    """Write the report of `output_dir` (to `out`, else OUTPUT_DIR/report.html). `strategies`:
    the options of the SpRAy clustering to run and show (the command line's default; None here:
    no Strategies section, no strategies files); `strategies_top`: classes shown cluster by cluster;
    `compare`: another output over the same data, whose maps this output's are checked against
    (crosscheck.py)."""
    check_bounds(per_gallery, max_classes, strategies_top)
    source = open_output(output_dir)
    target = Path(out) if out else source.output_dir / "report.html"
    if not target.parent.is_dir():  # before any work, and before the strategies files are written
        raise ReportError(f"--out {out}: the folder {target.parent} does not exist")
    use_duckdb = engine == "duckdb" or (engine == "auto" and _duckdb_importable() and _duckdb_usable(source))
    if engine == "duckdb" and not _duckdb_importable():
        raise ReportError("--engine duckdb: DuckDB is not installed (pip install duckdb)")
    overview = (overview_duckdb if use_duckdb else overview_arrow)(source, layer, per_gallery)
    layer = _choose_layer(overview.layer_rows, layer, run_layer(source))
    shown = sorted(overview.classes.values(), key=lambda s: (-s.count, s.target_class))[:max_classes]
    view = None
    if strategies is not None:
        view = _strategies(source, layer, [s.target_class for s in shown], strategies, strategies_top,
                           overview.maps)
    check = None
    if compare is not None:
        check = cross_check(source, layer, compare, overview.maps)
        if view is not None and view.detailed:
            add_clusters(check, _members(source.output_dir, layer, [v.result.target_class for v in view.detailed]))
    wanted = {(row["shard"], row["sample_id"]) for rows in overview.galleries.values() for row in rows}
    if view is not None:
        wanted |= view.exemplar_slots()
    if check is not None:
        wanted |= {(row["shard"], row["sample_id"]) for row in check.disputed}
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
    section = "" if view is None else strategies_section(view, scan, pictures, targets_are_predictions(source), layer)
    crosscheck = "" if check is None else crosscheck_section(check, [s.target_class for s in shown], view, pictures)
    page = render(source, overview, layer, shown, scan, pictures, errors_total, errors, per_gallery, section,
                  crosscheck)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(page, encoding="utf-8")
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    cards = sum(len(rows) for rows in overview.galleries.values())
    return Report(target, len(shown), cards, len(pictures.pictures), pictures.note, len(stored), layer,
                  overview.maps, overview.zero_maps, pictures.read_from, tuple(source.skipped), view, check)
