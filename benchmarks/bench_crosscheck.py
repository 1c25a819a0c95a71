"""The report's cross-check at scale: two synthetic outputs of the same N maps (default 1,000,000
7x7 maps in 1,000 classes and 100 shards, bench_strategies' planted groups), the second with
other jitter and noise as another method would give, then report.crosscheck.cross_check of the
first against the second in a fresh process, timed, with that process's peak memory (VmHWM).
Writes a markdown table.

    python benchmarks/bench_crosscheck.py                          # 1M maps
    python benchmarks/bench_crosscheck.py --maps 20000 --out /tmp/small.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path

from bench_strategies import _hwm_kb, _without_notes, cpu_name, measure, synthetic_arguments, versions, write_output


def _run_here(output_dir: str, other_dir: str) -> None:
    """The measured process: open the output, cross-check it, one JSON line."""
    start = time.perf_counter()
    from gradcam_batch.report.crosscheck import cross_check
    from gradcam_batch.report.source import open_output

    imported = time.perf_counter()
    source = open_output(output_dir)
    check = cross_check(source, "layer4", other_dir, source.total_rows)
    finished = time.perf_counter()
    print(json.dumps({"imports_s": imported - start, "cross_check_s": finished - imported,
                      "self_hwm_kb": _hwm_kb(os.getpid()), "pairs": check.pairs, "median": check.overall.median,
                      "agreeing": check.overall.agreeing}))


def main(argv: list[str] | None = None) -> int:
    parse = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    synthetic_arguments(parse, "/tmp/gradcam-bench-crosscheck")
    parse.add_argument("--run-here", nargs=2, metavar=("OUTPUT_DIR", "OTHER_DIR"), help=argparse.SUPPRESS)
    args = parse.parse_args(argv)
    if args.run_here:
        _run_here(*args.run_here)
        return 0
    name = f"{args.maps}x{args.side}x{args.side}-{args.classes}classes-{args.shards}shards"
    folders = [args.data_dir / f"{name}-a", args.data_dir / f"{name}-b"]
    for folder, noise_seed in zip(folders, (args.seed + 1, args.seed + 2)):
        if not (folder / "cams").is_dir():
            write_output(folder, args.maps, args.classes, args.side, args.shards, args.seed, noise_seed)
    load_before = os.getloadavg()
    result, root, peaks, wall = measure([sys.executable, str(Path(__file__).resolve()), "--run-here",
                                         *map(str, folders)])
    if result.returncode:
        print(result.stderr, file=sys.stderr)
        return result.returncode
    inner = json.loads(result.stdout.strip().splitlines()[-1])
    peak_kb = max(inner["self_hwm_kb"] or 0, peaks[root].kb if root in peaks else 0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        "# gradcam-batch report cross-check benchmark (cpu)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {cpu_name()}, {cores} usable cores; load average before "
        f"{', '.join(f'{v:.2f}' for v in load_before)}, after {', '.join(f'{v:.2f}' for v in os.getloadavg())}",
        f"- versions: {versions()}",
        f"- command: `python benchmarks/bench_crosscheck.py {shlex.join(_without_notes(argv))}`",
        f"- data: two synthetic outputs under {args.data_dir} (bench_strategies.write_output, noise seeds "
        f"{args.seed + 1} and {args.seed + 2}): the same images and planted groups, other jitter and noise",
        "",
        "| maps | map | shards | process wall s | cross_check s | peak MB (VmHWM) | pairs | median r | agreeing |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {args.maps:,} | {args.side}x{args.side} | {args.shards} | {wall:.1f} | {inner['cross_check_s']:.1f} | "
        f"{peak_kb / 1024:.0f} | {inner['pairs']:,} | {inner['median']:+.3f} | {100 * inner['agreeing']:.0f}% |",
        "",
        *(f"- {note}" for note in args.note),
    ]
    text = "\n".join(lines).rstrip() + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
