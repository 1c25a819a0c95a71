"""The command line: gradcam-batch-report OUTPUT_DIR [options]; a mistake or an unreadable folder
is one line on stderr (exit code 2, or 1 for a file that cannot be read)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import pyarrow as pa

from gradcam_batch.report.build import MAX_CLASSES, MAX_PER_GALLERY, build_report
from gradcam_batch.report.source import PROG, ReportError, _first_line, _skipped_text


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
                                           "class-mean maps, galleries, errors) about a gradcam-batch output folder.")
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
    return parse


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        report = build_report(args.output_dir, args.out, args.per_gallery, args.max_classes, args.layer,
                              args.engine, images=not args.no_images)
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
