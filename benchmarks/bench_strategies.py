"""Spectral relevance analysis at scale: synthetic part files of N maps (default 1,000,000 7x7 maps
in 1,000 classes, each class a few planted groups of Gaussian blobs, one of them small, plus
noise), then gradcam_batch.report.strategies.find_strategies in a fresh process, timed, with the
peak memory (VmHWM) of that process and of each of its children (the pool workers, the resource
tracker) summed, and the clusters checked against the planted groups. Writes a markdown table.

    python benchmarks/bench_strategies.py                       # 1M maps, 1,000 classes
    python benchmarks/bench_strategies.py --maps 20000 --classes 20 --out /tmp/small.md

The part files follow the tool's layout and schema (writer.CAM_SCHEMA, writer.part_name, the
gradcam_batch metadata key), one shard per file, every class spread over every shard, as a run
over shuffled data writes them: rank-0 rows of one layer, 7x7 like ResNet's layer4.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere: this checkout's gradcam_batch
    sys.path.insert(0, str(REPO))

LAYER = "layer4"
CENTERS = ((0.2, 0.2), (0.75, 0.7), (0.2, 0.8), (0.8, 0.15))
"""Blob centres of the planted groups, as fractions of the map's side."""
GROUP_SHARES = ((0.7, 0.3), (0.6, 0.3, 0.1), (0.5, 0.25, 0.15, 0.1))
"""Group sizes by the number of groups a class has: the last, small group is the 'shortcut'."""


# --- the synthetic output folder ---------------------------------------------------------------------

def write_part(output_dir: Path, shard: str, sample_ids: list[str], classes: np.ndarray, cams: list[np.ndarray],
               heights: np.ndarray, widths: np.ndarray, layer: str = LAYER, ranks: np.ndarray | None = None,
               layers: list[str] | None = None) -> Path:
    """One part file in the tool's schema (the other columns null), as the writer names it."""
    # imported here: the writer's module imports torch, which the measured process must not carry
    from gradcam_batch.writer import CAM_SCHEMA, METADATA_KEY, part_name

    count = len(sample_ids)
    lengths = np.array([len(cam) for cam in cams], np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    values = pa.array(np.concatenate(cams).astype(np.float32) if count else np.zeros(0, np.float32))
    given = {
        "sample_id": pa.array(sample_ids, pa.string()), "shard": pa.array([shard] * count, pa.string()),
        "label": pa.array(classes, pa.int64()), "target_class": pa.array(classes, pa.int64()),
        "target_rank": pa.array(np.zeros(count, np.int32) if ranks is None else ranks, pa.int32()),
        "prob": pa.array(np.full(count, 0.5, np.float32)), "cam": pa.ListArray.from_arrays(offsets, values),
        "cam_height": pa.array(heights, pa.int32()), "cam_width": pa.array(widths, pa.int32()),
        "layer": pa.array(layers or [layer] * count, pa.string()),
    }
    metadata = {METADATA_KEY: json.dumps({"target_layer": layer, "written_by": "benchmarks/bench_strategies.py"})}
    table = pa.Table.from_arrays([given.get(f.name, pa.nulls(count, f.type)) for f in CAM_SCHEMA],
                                 schema=CAM_SCHEMA.with_metadata(metadata))
    path = output_dir / "cams" / part_name(shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def planted(maps: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(class, group, groups of its class) per map, in a shuffled order: maps // classes per class
    (the remainder to the first classes), 2 to 4 groups per class."""
    rng = np.random.default_rng(seed)
    per_class = np.full(classes, maps // classes)
    per_class[: maps % classes] += 1
    groups_of = rng.integers(2, 2 + len(GROUP_SHARES), classes)
    target, group = [], []
    for target_class, (count, groups) in enumerate(zip(per_class, groups_of)):
        shares = np.array(GROUP_SHARES[groups - 2])
        sizes = np.floor(shares * count).astype(int)
        sizes[0] += count - sizes.sum()
        target.append(np.full(count, target_class))
        group.append(np.repeat(np.arange(groups), sizes))
    order = rng.permutation(maps)
    target, group = np.concatenate(target)[order], np.concatenate(group)[order]
    return target, group, groups_of[target]


def synthetic_maps(group: np.ndarray, side: int, rng: np.random.Generator, jitter: float = 0.1,
                   noise: float = 0.25) -> np.ndarray:
    """(n, side*side) float32: a Gaussian blob at the group's centre (jittered) plus uniform noise,
    min-max normalized as the run's maps are."""
    centers = np.array(CENTERS)[group] * (side - 1) + rng.normal(0, jitter, (len(group), 2))
    axis = np.arange(side)
    blob = np.exp(-((axis[None, :, None] - centers[:, None, None, 0]) ** 2
                    + (axis[None, None, :] - centers[:, None, None, 1]) ** 2) / (2 * (side / 7) ** 2))
    cams = blob + noise * rng.random(blob.shape)
    low, high = cams.min(axis=(1, 2), keepdims=True), cams.max(axis=(1, 2), keepdims=True)
    return ((cams - low) / (high - low + 1e-7)).reshape(len(group), -1).astype(np.float32)


def write_output(output_dir: Path, maps: int, classes: int, side: int, shards: int, seed: int,
                 noise_seed: int | None = None) -> np.ndarray:
    """The synthetic output folder; returns the planted group per map (sample_id is its index).
    `noise_seed` (default seed + 1) draws the jitter and noise: another one gives other maps of
    the same images and groups, as another method would."""
    target, group, _ = planted(maps, classes, seed)
    rng = np.random.default_rng(seed + 1 if noise_seed is None else noise_seed)
    bounds = np.linspace(0, maps, shards + 1).astype(int)
    for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        cams = synthetic_maps(group[start:end], side, rng)
        write_part(output_dir, f"shard-{index:05d}", [f"{i:07d}" for i in range(start, end)], target[start:end],
                   list(cams), np.full(end - start, side), np.full(end - start, side))
    return group


# --- running and measuring -----------------------------------------------------------------------------

def _hwm_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):  # the process ended between listing and reading
        return None


def _descendants(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    children = [int(child) for child in handle.read().split()]
            except OSError:
                continue
            found += children
            stack += children
    return found


@dataclass
class Peak:
    """One process's peak resident memory as polled: since its last exec (its command line)."""
    kb: int
    command: str
    parent: int


def _process(pid: int) -> tuple[str, int] | None:
    """(command line, parent pid), or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
        with open(f"/proc/{pid}/stat") as handle:
            parent = int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return command, parent


def measure(command: list[str], interval: float = 0.05) -> tuple[subprocess.CompletedProcess, int, dict[int, Peak],
                                                                 float]:
    """Run `command`, polling the VmHWM (peak resident memory, kB) of it and of every descendant
    until it exits: (the completed process, its pid, the peak per pid, wall seconds). A
    descendant's last reading falls within `interval` of its exit; a high-water mark only grows,
    so at most that interval's growth is missed. A reading taken between a fork and its exec is
    the forking process's memory, shared: the peak restarts when the command line changes (exec)."""
    peaks: dict[int, Peak] = {}
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def poll():
        while not done.is_set():
            for pid in [process.pid, *_descendants(process.pid)]:
                value, seen = _hwm_kb(pid), _process(pid)
                if value is None or seen is None:
                    continue
                known = peaks.get(pid)
                if known is None or known.command != seen[0]:
                    peaks[pid] = Peak(value, *seen)
                else:
                    known.kb = max(known.kb, value)
            done.wait(interval)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - start
    done.set()
    poller.join()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), process.pid, peaks, wall


def _run_here(output_dir: str, workers: int) -> None:
    """The measured process: find_strategies, then one JSON line (its own clock and exact VmHWM)."""
    import resource

    start = time.perf_counter()
    from gradcam_batch.report.strategies import StrategyOptions, find_strategies

    imported = time.perf_counter()
    results = find_strategies(output_dir, StrategyOptions(workers=workers))
    finished = time.perf_counter()
    print(json.dumps({"imports_s": imported - start, "find_strategies_s": finished - imported,
                      "self_hwm_kb": _hwm_kb(os.getpid()),
                      "largest_child_maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                      "classes": len(results), "clustered": sum(1 for r in results if r.clusters),
                      "approximate": sum(1 for r in results if r.approximate)}))


def agreement(output_dir: Path, group: np.ndarray, groups_of_class: dict[int, int]) -> tuple[float, int, int]:
    """Mean adjusted Rand index of the clusters against the planted groups over the classes, and
    how many classes got k equal to their planted number of groups, of how many."""
    from sklearn.metrics import adjusted_rand_score

    table = pq.read_table(output_dir / "strategies.parquet", columns=["sample_id", "target_class", "cluster"])
    index = np.array(table.column("sample_id").to_pylist(), dtype=np.int64)
    target = table.column("target_class").to_numpy()
    cluster = table.column("cluster").to_numpy()
    classes = pq.read_table(output_dir / "strategies_classes.parquet", columns=["target_class", "clusters"])
    chosen = dict(zip(classes.column("target_class").to_pylist(), classes.column("clusters").to_pylist()))
    order = np.argsort(target, kind="stable")
    uniques, starts = np.unique(target[order], return_index=True)
    scores = [adjusted_rand_score(group[index[rows]], cluster[rows])
              for rows in np.split(order, starts[1:])]
    right = sum(1 for c in uniques.tolist() if chosen.get(c) == groups_of_class[c])
    return float(np.mean(scores)), right, len(uniques)


def versions() -> str:
    from importlib.metadata import version

    found = [f"python {platform.python_version()}"]
    for name in ("numpy", "scipy", "scikit-learn", "pyarrow"):
        found.append(f"{name} {version(name)}")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit:
            found.append(f"gradcam-batch commit {commit}" + (" (with uncommitted changes)" if dirty else ""))
    except (OSError, subprocess.TimeoutExpired):  # no git: the versions above still say what ran
        pass
    return ", ".join(found)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _without_notes(argv: list[str] | None) -> list[str]:
    given = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for token in given:
        if skip or token == "--note":
            skip = token == "--note"
            continue
        if not token.startswith("--note="):
            kept.append(token)
    return kept


def synthetic_arguments(parse: argparse.ArgumentParser, data_dir: str) -> None:
    """The options of a benchmark over synthetic outputs (write_output's) and of its table."""
    parse.add_argument("--maps", type=int, default=1_000_000)
    parse.add_argument("--classes", type=int, default=1000)
    parse.add_argument("--side", type=int, default=7)
    parse.add_argument("--shards", type=int, default=100)
    parse.add_argument("--seed", type=int, default=0)
    parse.add_argument("--data-dir", type=Path, default=Path(data_dir))
    parse.add_argument("--out", type=Path, help="markdown file to write (default: print only)")
    parse.add_argument("--note", action="append", default=[], help="a line to add under the table (repeatable)")


def main(argv: list[str] | None = None) -> int:
    parse = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    synthetic_arguments(parse, "/tmp/gradcam-bench-strategies")
    parse.add_argument("--workers", type=int, default=0, help="StrategyOptions.workers (0: one per core)")
    parse.add_argument("--run-here", metavar="OUTPUT_DIR", help=argparse.SUPPRESS)  # the measured process
    args = parse.parse_args(argv)
    if args.run_here:
        _run_here(args.run_here, args.workers)
        return 0
    output_dir = args.data_dir / f"{args.maps}x{args.side}x{args.side}-{args.classes}classes-{args.shards}shards"
    written, wrote = time.perf_counter(), not (output_dir / "cams").is_dir()
    if wrote:
        write_output(output_dir, args.maps, args.classes, args.side, args.shards, args.seed)
    written = time.perf_counter() - written
    target, group, groups = planted(args.maps, args.classes, args.seed)
    groups_of_class = {int(c): int(g) for c, g in zip(target, groups)}
    load_before = os.getloadavg()
    result, root, peaks, wall = measure([sys.executable, str(Path(__file__).resolve()), "--run-here", str(output_dir),
                                   "--workers", str(args.workers)])
    if result.returncode:
        print(result.stderr, file=sys.stderr)
        return result.returncode
    inner = json.loads(result.stdout.strip().splitlines()[-1])
    parent_kb = max(inner["self_hwm_kb"], peaks[root].kb if root in peaks else 0)
    # the pool's workers and the resource tracker; helpers they fork (loky's `lscpu` core count)
    # are named under the table, not added: what was read of them is mostly their parent's pages
    children = {pid: peak.kb for pid, peak in peaks.items() if peak.parent == root and pid != root and peak.kb}
    def helper(peak: Peak) -> str:
        forked = peak.parent in peaks and peaks[peak.parent].command == peak.command
        name = peak.command.split()[0].rsplit("/", 1)[-1] if peak.command else "?"
        return f"`{name}` ({peak.kb / 1024:.0f} MB{', read between its fork and its exec' if forked else ''})"
    helpers = sorted(helper(peak) for pid, peak in peaks.items() if pid != root and peak.parent != root)
    children_kb = sum(children.values())
    mean_ari, right, classes = agreement(output_dir, group, groups_of_class)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    row = (f"| {args.maps:,} | {args.side}x{args.side} | {args.classes:,} | {args.shards} | "
           f"{args.workers or cores} | {wall:.1f} | {inner['find_strategies_s']:.1f} | {parent_kb / 1024:.0f} | "
           f"{children_kb / 1024:.0f} ({len(children)}: {', '.join(f'{kb / 1024:.0f}' for kb in children.values())}) "
           f"| {(parent_kb + children_kb) / 1024:.0f} | {inner['clustered']:,} of {inner['classes']:,} "
           f"({inner['approximate']} approximate) | {mean_ari:.3f} | {right:,} of {classes:,} |")
    notes = args.note + ([f"processes forked by the children, their readings mostly the pages they share with "
                          f"their parent, not added to the sum: {', '.join(helpers)}"] if helpers else [])
    lines = [
        "# gradcam-batch strategies (SpRAy per class) benchmark (cpu)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {cpu_name()}, {cores} usable cores (sched_getaffinity), "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; load average before "
        f"{', '.join(f'{v:.2f}' for v in load_before)}, after {', '.join(f'{v:.2f}' for v in os.getloadavg())} "
        "(the machine is shared)",
        f"- versions: {versions()}",
        f"- command: `python benchmarks/bench_strategies.py {shlex.join(_without_notes(argv))}`"
        + (" (its --note lines are under the table)" if args.note else ""),
        f"- data: synthetic part files (writer.CAM_SCHEMA), rank-0 rows of one layer, every class in every shard; "
        f"each class 2-4 planted groups (shares {GROUP_SHARES}) of a jittered Gaussian blob plus uniform noise, "
        f"min-max normalized; {f'written in {written:.0f} s' if wrote else 'written by an earlier run'} under "
        f"{output_dir}",
        "- StrategyOptions defaults (neighbors 10, max_clusters 8, min_maps 30, grid: the most common size, "
        f"max_exact 10000, seed 0), workers {args.workers} (0: one per core)",
        "",
        "wall: the fresh process from start to exit (interpreter, imports, pool start, the pass, clustering, "
        "writing both files). find_strategies: the call alone. Peak memory: VmHWM of the process (read by itself at "
        "the end) and of each child (pool workers and multiprocessing's resource tracker, polled every 50 ms until "
        "each exits), summed: an upper bound of the memory held at any one time. ARI: adjusted Rand index of the "
        "clusters against the planted groups, mean over classes. k right: classes whose eigengap chose their "
        "planted number of groups.",
        "",
        "| maps | map | classes | shards | workers | wall s | find_strategies s | peak MB process | "
        "peak MB children (each) | peak MB sum | clustered | mean ARI | k right |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: | ---: |",
        row,
        *([""] + [f"- {note}" for note in notes] if notes else []),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
