"""The command line: gradcam-batch-report OUTPUT_DIR [options]; a mistake or an unreadable folder
is one line on stderr (exit code 2, or 1 for a file that cannot be read). The strategies (SpRAy)
are found by default; --no-strategies leaves them out."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import pyarrow as pa

from gradcam_batch.report.build import MAX_CLASSES, MAX_PER_GALLERY, build_report
from gradcam_batch.report.crosscheck import AGREE
from gradcam_batch.report.source import PROG, ReportError, _first_line, _skipped_text
from gradcam_batch.report.strategies import StrategyError, StrategyOptions
from gradcam_batch.report.strategies_page import DEFAULT_TOP, MAX_TOP

STRATEGY_FLAGS = {
    "neighbors": "k of the symmetric k-nearest-neighbour graph of each class's maps",
    "max_clusters": "the most clusters the eigengap may choose per class",
    "min_maps": "classes with fewer usable rank-0 maps are not clustered",
    "grid": "maps are resized to GRID x GRID before clustering (default: the layer's most common map size)",
    "max_exact": "classes with more usable maps are clustered on a seeded sample of this many, the rest by their "
                 "nearest sampled neighbours",
    "workers": "processes clustering classes in parallel (0: automatic, one per core up to a cap; a layer of "
               "20,000 maps or fewer is then clustered in this process)",
}
"""--strategies-<field> -> StrategyOptions field, with its help (the default is StrategyOptions's)."""


def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading files can raise that is no bug of this module: one line, exit code 1."""
    kinds: tuple[type[BaseException], ...] = (OSError, pa.ArrowException)
    try:
        import duckdb
    except ImportError:
        return kinds
    return (*kinds, duckdb.Error)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like gradcam-batch's own mistakes
        self.exit(2, f"{self.prog}: error: {message}\n")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _within(minimum: int, maximum: int, why: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"{value} is over the ceiling of {maximum} ({why})")
        return value
    return parse


def parser() -> argparse.ArgumentParser:
    parse = _Parser(prog=PROG, description="Write one self-contained HTML report (summary, per-class table, "
                                           "class-mean maps, strategies, galleries, errors) about a gradcam-batch "
                                           "output folder.")
    parse.add_argument("output_dir", help="the output.dir of a gradcam-batch run")
    parse.add_argument("--out", metavar="FILE.html", help="the HTML file to write (default: OUTPUT_DIR/report.html)")
    parse.add_argument("--per-gallery", type=_within(0, MAX_PER_GALLERY, "each card inlines a picture in the page"),
                       default=8, metavar="N", help=f"cards per gallery (default 8; 0: no galleries; at most "
                                                    f"{MAX_PER_GALLERY})")
    parse.add_argument("--max-classes", type=_within(1, MAX_CLASSES, "each class adds a row and a picture"),
                       default=50, metavar="N", help=f"classes in the table and the class means: the N most "
                                                     f"frequent (default 50; at most {MAX_CLASSES})")
    parse.add_argument("--layer", metavar="NAME",
                       help="the layer to report on when the output has several (default: the one the run summary "
                            "speaks of: the fused maps, else the last target layer; the first name in sorted order "
                            "where the output does not record its target layers)")
    parse.add_argument("--engine", choices=("auto", "duckdb", "pyarrow"), default="auto",
                       help="what computes the statistics: DuckDB where installed (auto), or pyarrow")
    parse.add_argument("--no-images", action="store_true",
                       help="do not read the dataset at all: gallery cards show the maps alone (or the heatmap_png "
                            "the run stored). Without it, images are read only from the shards the output's "
                            "listing names, once their files match it (path, size, modification time), and "
                            "stderr names what was read")
    parse.add_argument("--no-strategies", action="store_true",
                       help="do not find the strategies (spectral relevance analysis of each class's maps): no "
                            "Strategies section, no strategies.parquet or strategies_classes.parquet written in "
                            "OUTPUT_DIR. Without it they are found, for the layer of the report")
    parse.add_argument("--compare", metavar="OTHER_DIR",
                       help="another gradcam-batch output over the same data, made with another cam.method (e.g. "
                            "eigencam, fem or scorecam against gradcam): each rank-0 map is paired with its map of "
                            "the same image and class, rated by correlation, per class and per strategy; the page "
                            "gets a Cross-check section and OUTPUT_DIR a crosscheck.parquet")
    parse.add_argument("--strategies-top", type=_within(0, MAX_TOP, "each class shows its clusters' mean maps and "
                                                                   "exemplar cards"),
                       default=None, metavar="N", help=f"classes shown cluster by cluster: the first N of the "
                                                       f"ranking that split (default {DEFAULT_TOP}; 0: the ranking "
                                                       f"alone; at most {MAX_TOP})")
    defaults = StrategyOptions()
    for name, what in STRATEGY_FLAGS.items():
        default = getattr(defaults, name)
        parse.add_argument(f"--strategies-{name.replace('_', '-')}", type=_integer, default=None,
                           metavar="GRID" if name == "grid" else "N",
                           help=what + ("" if default is None else f" (default {default})"))
    return parse


def strategy_options(args: argparse.Namespace) -> Optional[StrategyOptions]:
    """The StrategyOptions the flags give (None with --no-strategies), or a one-line StrategyError
    naming the flag."""
    given = {name: getattr(args, f"strategies_{name}") for name in STRATEGY_FLAGS}
    given = {name: value for name, value in given.items() if value is not None}
    if args.no_strategies:
        extra = [f"--strategies-{name.replace('_', '-')}" for name in given]
        if args.strategies_top is not None:
            extra.append("--strategies-top")
        if extra:
            raise StrategyError(f"{', '.join(extra)} with --no-strategies: give one or the other")
        return None
    try:
        return StrategyOptions(**given)
    except StrategyError as error:
        name, _, rest = str(error).partition("=")
        if name in STRATEGY_FLAGS and rest:  # "neighbors=0: give ..." -> "--strategies-neighbors 0: give ..."
            raise StrategyError(f"--strategies-{name.replace('_', '-')} {rest}") from None
        raise


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        strategies = strategy_options(args)
        top = DEFAULT_TOP if args.strategies_top is None else args.strategies_top
        report = build_report(args.output_dir, args.out, args.per_gallery, args.max_classes, args.layer,
                              args.engine, images=not args.no_images, strategies=strategies, strategies_top=top,
                              compare=args.compare)
    except ReportError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except _read_errors() as error:
        print(f"{PROG}: error: {_first_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    stored = f", {report.heatmaps_shown} stored heatmaps" if report.heatmaps_shown else ""
    print(f"wrote {report.path} (layer {report.layer or '(unnamed)'}: {report.classes} classes, "
          f"{report.gallery_cards} gallery cards, {report.images_shown} images from the dataset{stored})")
    view = report.strategies
    if view is not None and view.note:
        print(f"{PROG}: warning: strategies not found: {view.note}; the rest of the report is written "
              "(--no-strategies leaves them out)", file=sys.stderr)
    elif view is not None:
        split = sum(1 for result in view.results if result.clusters > 1)
        clustered = sum(1 for result in view.results if result.clusters > 0)
        first = view.split[0].result.target_class if view.split else None
        print(f"strategies of layer {report.layer or '(unnamed)'}: {clustered} of {len(view.results)} classes "
              f"clustered, {split} split into 2 or more clusters"
              + (f", ranked first: class {first}" if first is not None else "")
              + f" ({view.seconds:.1f} s); wrote {', '.join(str(path) for path in view.files)}")
    check = report.crosscheck
    if check is not None:
        print(f"cross-check against {check.other_dir} ({check.other_method}): {check.pairs:,} of {check.maps:,} maps "
              f"paired, median r {'-' if check.overall.median is None else f'{check.overall.median:+.2f}'}, "
              f"{0 if check.overall.agreeing is None else round(100 * check.overall.agreeing)}% of "
              f"{check.overall.rated:,} rated pairs agree (r >= {AGREE}); wrote {check.path}")
        if check.same_kind:
            print(f"{PROG}: note: {check.method} and {check.other_method} rest on the same kind of evidence "
                  f"({check.kind(check.method)}); a method of another kind checks more", file=sys.stderr)
    if report.zero_maps * 2 > report.maps:  # the page warns too; a scripted run should not miss it
        print(f"{PROG}: warning: {report.zero_maps:,} of {report.maps:,} rank-0 maps of layer "
              f"{report.layer or '(unnamed)'} are all zero (no positive evidence; see the page)", file=sys.stderr)
    if report.skipped:
        print(f"{PROG}: note: not read: {len(report.skipped)} file(s) that are not this tool's part files of this "
              f"output ({_skipped_text(list(report.skipped))})", file=sys.stderr)
    if report.images_from:
        print(f"{PROG}: note: images: {report.images_shown} gallery images read from {report.images_from} into "
              "the page; --no-images leaves the dataset out", file=sys.stderr)
    if report.note and not args.no_images:
        print(f"{PROG}: note: images: {report.note}", file=sys.stderr)
    return 0
