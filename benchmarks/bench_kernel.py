"""Time gradcam_batch.kernels.fused_cam against the eager and torch.compile'd PyTorch composites, or sweep
its tile configs and write the table that fused_cam reads.

    python benchmarks/bench_kernel.py [--methods all|gradcam,layercam] [--shapes 256x2048x7x7,...]
        [--layouts nchw,nhwc] [--targets 1,5] [--providers fused,eager,compiled] [--repeats 3]
        [--budget-seconds N] [--out FILE] [--dry-run]
    python benchmarks/bench_kernel.py --sweep --table-out PATH [--budget-seconds N] [--out FILE]

Inputs are bf16, the way the engine hands them over: A (B, C, H, W) in NCHW or channels_last,
G from a batched backward, i.e. (K, B, C, H, W) transposed to (B, K, C, H, W) (per-image
channels_last for nhwc). Every provider is timed as back-to-back calls captured in a CUDA
graph (GPU time, median of several replays):

    fused     gradcam_batch.kernels.fused_cam with the config table (GRADCAM_BATCH_KERNEL_TABLE, if set), timed
              in --repeats fresh processes one after the other: the median and the spread
              (max - min) / median between processes. "launches" is the same call in a plain
              loop, without a graph: the larger of GPU time and host time per call.
    eager     gradcam_batch.methods.compute_cam(A, G, method): the composite with its default
              fp32 upcast of the bf16 inputs, as the CPU path and a careful user would write it
    compiled  torch.compile(compute_cam, dynamic=False): a static-shape compile per case. The
              compiles run in parallel worker processes before any timing; the workers then
              take turns on the GPU, so compile time never overlaps a measurement.

Kernels are compiled ahead of time in parallel processes (gradcam_batch.kernels.cam_warmup), so no timed
process compiles. GB/s counts the bytes any implementation must move: A and G read once, the
fp32 CAM written once. The device-to-device copy bandwidth (1 GiB, read + write) is measured in
the same run. --budget-seconds stops starting new work when the budget is spent; the table then
says what is missing. --out writes the markdown (card, versions, date) to benchmarks/results/
(a bare file name) or to the given path. Without CUDA (or with --dry-run) it prints the cases,
their configs and the compile specs, and exits 0.

--sweep: for every bucket of the grid (shape, layout, K, method family with one representative
method), time up to 6 candidate configs (gradcam_batch.kernels.cam_configs.candidate_configs), check each
against the eager result, and write the fastest per bucket as a table in the format of
kernels/cam_table.json. Evaluate it with GRADCAM_BATCH_KERNEL_TABLE=PATH, then commit it there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kernel_timing import case_id, copy_bandwidth, meta_inputs, moved_bytes

DEFAULT_SHAPES = "256x2048x7x7,256x1024x14x14,128x512x28x28,64x256x56x56"
PROVIDERS = ("fused", "eager", "compiled")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# One method times each family in the sweep; its config serves the whole family.
SWEEP_METHODS = {"gradcam": "gradcam", "weighted": "gradcampp", "pixel": "layercam"}
# A candidate whose normalized maps differ more than this from the eager fp32 composite is wrong.
SWEEP_MAX_DIFFERENCE = 1e-3


def parse_args(argv=None) -> argparse.Namespace:
    from gradcam_batch.methods import METHODS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="all", help="comma-separated CAM methods, or all (default)")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated BxCxHxW activation shapes")
    parser.add_argument("--layouts", default="nchw,nhwc", help="comma-separated: nchw, nhwc")
    parser.add_argument("--targets", default="1,5", help="comma-separated K values (targets per image)")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated: " + ", ".join(PROVIDERS))
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes that time fused (default 3)")
    parser.add_argument("--compile-workers", type=int, default=0,
                        help="processes for the eager/compiled composites (default: CPUs - 4, at most 12)")
    parser.add_argument("--budget-seconds", type=float, default=0.0,
                        help="stop starting new work after this many seconds (0: no limit)")
    parser.add_argument("--out", help="also write the markdown here (a bare name goes to benchmarks/results/)")
    parser.add_argument("--dry-run", action="store_true", help="print the cases and exit")
    parser.add_argument("--sweep", action="store_true", help="time candidate configs per bucket (needs --table-out)")
    parser.add_argument("--table-out", help="--sweep: write the fastest config per bucket to this JSON table")
    # Internal: one fresh process that times fused_cam (started by the benchmark itself).
    parser.add_argument("--fused-process", nargs=2, metavar=("CASES_JSON", "RESULT_JSON"), help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--with-reference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    args.methods = list(METHODS) if args.methods.strip() == "all" else split(args.methods)
    args.layouts = split(args.layouts)
    args.providers = split(args.providers)
    try:
        args.shapes = [tuple(int(n) for n in s.lower().split("x")) for s in split(args.shapes)]
        args.targets = [int(k) for k in split(args.targets)]
    except ValueError as error:
        parser.error(f"--shapes must look like 256x2048x7x7 and --targets like 1,5 ({error})")
    for values, allowed, flag in (
        (args.methods, METHODS, "--methods"),
        (args.layouts, ("nchw", "nhwc"), "--layouts"),
        (args.providers, PROVIDERS, "--providers"),
    ):
        unknown = [v for v in values if v not in allowed]
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
    if any(len(shape) != 4 or min(shape) < 1 for shape in args.shapes):
        parser.error(f"--shapes: each needs four positive sizes BxCxHxW, got {args.shapes}")
    if any(k < 1 for k in args.targets):
        parser.error(f"--targets: each K must be at least 1, got {args.targets}")
    if "fused" not in args.providers:
        parser.error("--providers must include fused (the table compares against it)")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.sweep and not args.table_out and not args.dry_run:
        parser.error("--sweep needs --table-out PATH (where the measured table goes)")
    return args


def split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def cases(args) -> list[tuple]:
    return [(shape, layout, targets, method)
            for shape in args.shapes for layout in args.layouts
            for targets in args.targets for method in args.methods]


def sweep_buckets(args) -> list[tuple]:
    """(bucket, shape, layout, K, representative method), one per bucket of the grid."""
    from gradcam_batch.kernels.cam_configs import FAMILIES, Problem

    buckets = {}
    for shape in args.shapes:
        for layout in args.layouts:
            for targets in args.targets:
                for family in FAMILIES:
                    batch, channels, height, width = shape
                    key = Problem(channels, height * width, targets, layout, family).bucket
                    buckets.setdefault(key, (key, shape, layout, targets, SWEEP_METHODS[family]))
    return list(buckets.values())


class Budget:
    def __init__(self, seconds: float):
        self.start = time.time()
        self.end = self.start + seconds if seconds > 0 else float("inf")

    def left(self) -> float:
        return self.end - time.time()

    def spent(self) -> bool:
        return time.time() >= self.end

    def at_fraction(self, fraction: float) -> float:
        """Absolute time at `fraction` of what is left now (infinite budget: far future)."""
        return time.time() + fraction * self.left() if self.end != float("inf") else time.time() + 1e9


def shape_text(shape) -> str:
    return "x".join(map(str, shape))


def write_output(path_text: str, lines: list[str], title: str) -> None:
    path = Path(path_text)
    path = RESULTS_DIR / path if path.parent == Path(".") else path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([title, ""] + lines) + "\n")
    print(f"wrote {path}", flush=True)


def environment_lines(device) -> list[str]:
    import triton

    from gradcam_batch.kernels.cam_configs import table_path

    return [
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- card: {torch.cuda.get_device_name(device)}",
        f"- torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
        f"Python {platform.python_version()}",
        f"- config table: {table_path()}",
    ]


def precompile_cases(specs: list, workers: int) -> None:
    from gradcam_batch.kernels.cam_warmup import precompile

    started = time.time()
    try:
        count, failures = precompile(specs, workers)
    except Exception as error:  # the timed processes then compile inline: slower, still correct
        print(f"bench_kernel: ahead-of-time compile failed ({error!r}); kernels compile on first use",
              file=sys.stderr, flush=True)
        return
    print(f"bench_kernel: compiled {count} kernel variants in {time.time() - started:.0f} s "
          f"with {workers} processes", flush=True)
    for failure in failures:
        print(f"bench_kernel: compile failed: {failure}", file=sys.stderr, flush=True)


# Dry run ---------------------------------------------------------------------------------------

def dry_run(args, reason: str) -> int:
    from gradcam_batch.kernels.cam import plan_config, warmup_specs
    from gradcam_batch.kernels.cam_configs import candidate_configs, Problem
    from kernel_workers import config_label

    specs = []
    if args.sweep:
        buckets = sweep_buckets(args)
        print(f"bench_kernel: {reason}; sweep of {len(buckets)} buckets:")
        for key, shape, layout, targets, method in buckets:
            batch, channels, height, width = shape
            candidates = candidate_configs(Problem.for_method(channels, height * width, targets, layout, method))
            print(f"  {key} ({shape_text(shape)} {method}): {len(candidates)} candidates")
            for config in candidates:
                print(f"    {config_label(config)}")
                specs += warmup_specs(*meta_inputs(shape, layout, targets), method, True, config)
    else:
        all_cases = cases(args)
        print(f"bench_kernel: {reason}; {len(all_cases)} cases, providers {', '.join(args.providers)}:")
        for case in all_cases:
            shape, layout, targets, method = case
            activations, gradients = meta_inputs(shape, layout, targets)
            print(f"  {case_id(case)}: {config_label(plan_config(activations, gradients, method))}")
            specs += warmup_specs(activations, gradients, method)
    distinct = {repr((name, arguments, sorted(keywords.items()))) for name, _, arguments, keywords in specs}
    print(f"bench_kernel: {len(specs)} launches, {len(distinct)} distinct kernel variants to compile")
    return 0


# Benchmark -------------------------------------------------------------------------------------

def start_reference_workers(args, all_cases, gpu_lock, compile_deadline, deadline):
    """Spawn the eager / compiled workers; cases dealt round-robin so heavy ones spread."""
    from kernel_workers import reference_worker

    count = args.compile_workers or max(1, min(12, (os.cpu_count() or 1) - 4))
    count = min(count, len(all_cases))
    context = multiprocessing.get_context("spawn")
    ready_queue, result_queue = context.Queue(), context.Queue()
    workers = []
    for index in range(count):
        share = [[list(shape), layout, targets, method] for shape, layout, targets, method in all_cases[index::count]]
        worker = context.Process(
            target=reference_worker,
            args=(index, share, args.providers, gpu_lock, ready_queue, result_queue, compile_deadline, deadline),
        )
        worker.start()
        workers.append(worker)
    return workers, ready_queue, result_queue


def run_fused_processes(args, all_cases, budget, directory) -> list[list[dict]]:
    """--repeats fresh processes, one after the other, each timing every case. They share 60% of
    the budget left now; the rest is for the eager / compiled timing that follows."""
    cases_path = Path(directory) / "cases.json"
    cases_path.write_text(json.dumps([[list(s), layout, k, m] for s, layout, k, m in all_cases]))
    limited = budget.end != float("inf")
    fused_end = budget.at_fraction(0.6)
    runs = []
    for repeat in range(args.repeats):
        if limited and fused_end - time.time() < 5:
            print(f"bench_kernel: budget spent; skipping fused process {repeat + 1}", flush=True)
            break
        deadline = time.time() + (fused_end - time.time()) / (args.repeats - repeat) if limited else 0.0
        result_path = Path(directory) / f"fused-{repeat}.json"
        command = [sys.executable, __file__, "--fused-process", str(cases_path), str(result_path),
                   "--deadline", str(deadline or time.time() + 1e9)]
        if repeat == 0:
            command.append("--with-reference")
        print(f"bench_kernel: fused process {repeat + 1} of {args.repeats}", flush=True)
        started = time.time()
        try:
            # The process stops starting cases at its deadline; the timeout only catches a hang.
            subprocess.run(command, check=False, timeout=max(60.0, deadline - time.time() + 60) if limited else None)
        except subprocess.TimeoutExpired:
            print(f"bench_kernel: fused process {repeat + 1} stopped after {time.time() - started:.0f} s",
                  file=sys.stderr, flush=True)
        try:
            runs.append(json.loads(result_path.read_text()))
        except (OSError, ValueError) as error:
            print(f"bench_kernel: fused process {repeat + 1} left no results ({error})", file=sys.stderr, flush=True)
            runs.append([])
    return runs


def collect_reference_results(workers, result_queue, budget) -> dict:
    results, done = {}, set()
    while len(done) < len(workers):
        if budget.spent() and budget.left() < -20:  # workers stop at the deadline; a grace period
            break
        try:
            entry = result_queue.get(timeout=1.0)
        except queue.Empty:
            if not any(worker.is_alive() for worker in workers):
                break
            continue
        if "worker_done" in entry:
            done.add(entry["worker_done"])
            continue
        results.setdefault(entry["case"], {}).update(entry)
        if "eager_ms" in entry or "compiled_ms" in entry or "eager_error" in entry:
            print(f"bench_kernel: {entry['case']}: eager {entry.get('eager_ms', float('nan')):.4f} ms, "
                  f"compiled {entry.get('compiled_ms', float('nan')):.4f} ms", flush=True)
    for worker in workers:
        worker.join(timeout=5)
        if worker.is_alive():
            worker.terminate()
    return results


def benchmark_rows(all_cases, fused_runs, references, copy_gbps, providers):
    """Markdown rows plus the figures the summary needs."""
    header = ["shape BxCxHxW", "layout", "K", "method", "config", "fused ms (graph)", "spread",
              "fused ms (launches)", "eager ms", "compiled ms", "fused GB/s", "fused / copy BW",
              "vs eager", "vs compiled", "max abs diff vs eager"]
    alignment = ["---" if index < 5 else "---:" for index in range(len(header))]
    rows = ["| " + " | ".join(header) + " |", "|" + "|".join(alignment) + "|"]
    summary = []
    by_case = [{entry["case"]: entry for entry in run} for run in fused_runs]
    for case in all_cases:
        shape, layout, targets, method = case
        key = case_id(case)
        entries = [run[key] for run in by_case if key in run]
        graphs = [e["graph_ms"] for e in entries if "graph_ms" in e]
        launches = [e["launch_ms"] for e in entries if "launch_ms" in e]
        reference = references.get(key, {})
        first = entries[0] if entries else {}
        cells = [shape_text(shape), layout, str(targets), method, first.get("config", "-")]
        if graphs:
            fused = statistics.median(graphs)
            spread = (max(graphs) - min(graphs)) / fused if len(graphs) > 1 else float("nan")
            rate = moved_bytes(shape, targets) / (fused * 1e-3) / 1e9
            eager, compiled = reference.get("eager_ms"), reference.get("compiled_ms")
            cells += [f"{fused:.4f}", f"{spread:.0%}" if len(graphs) > 1 else "-",
                      f"{statistics.median(launches):.4f}" if launches else "-",
                      f"{eager:.4f}" if eager else _missing(reference, "eager", providers),
                      f"{compiled:.4f}" if compiled else _missing(reference, "compiled", providers),
                      f"{rate:.0f}", f"{rate / copy_gbps:.0%}",
                      f"{eager / fused:.2f}x" if eager else "-", f"{compiled / fused:.2f}x" if compiled else "-",
                      f"{first['max_diff']:.1e}" if "max_diff" in first else "-"]
            summary.append((key, rate / copy_gbps, spread if len(graphs) > 1 else None,
                            compiled / fused if compiled else None, eager / fused if eager else None))
        else:
            errors = "; ".join(sorted({e["error"] for e in entries if "error" in e})) or "not measured (budget)"
            cells += [f"error: {errors}"] + ["-"] * 10
        rows.append("| " + " | ".join(cells) + " |")
    return rows, summary


def _missing(reference: dict, provider: str, providers) -> str:
    if provider not in providers:
        return "-"
    return "error" if f"{provider}_error" in reference else "not measured"


def summary_lines(summary, all_cases) -> list[str]:
    if not summary:
        return ["- no case measured"]
    fractions = [s[1] for s in summary]
    spreads = [s[2] for s in summary if s[2] is not None]
    versus_compiled = [s[3] for s in summary if s[3] is not None]
    worst = min(summary, key=lambda s: s[1])
    lines = [f"- measured {len(summary)} of {len(all_cases)} cases; fused / copy BW: min {min(fractions):.0%} "
             f"({worst[0]}), median {statistics.median(fractions):.0%}"]
    if spreads:
        lines.append(f"- spread between fused processes: max {max(spreads):.0%}, "
                     f"median {statistics.median(spreads):.0%}")
    if versus_compiled:
        lines.append(f"- fused vs torch.compile: min {min(versus_compiled):.2f}x over {len(versus_compiled)} cases")
    return lines


def benchmark(args) -> int:
    all_cases = cases(args)
    budget = Budget(args.budget_seconds)
    device = torch.device("cuda")
    from gradcam_batch.kernels.cam import warmup_specs

    context = multiprocessing.get_context("spawn")
    gpu_lock = context.Lock()
    gpu_lock.acquire()  # held until the fused processes are done: the workers only compile
    references_wanted = [p for p in ("eager", "compiled") if p in args.providers]
    workers, ready_queue, result_queue = [], None, None
    try:
        if references_wanted:
            workers, ready_queue, result_queue = start_reference_workers(
                args, all_cases, gpu_lock, compile_deadline=budget.at_fraction(0.35), deadline=budget.end)
        specs = [spec for shape, layout, targets, method in all_cases
                 for spec in warmup_specs(*meta_inputs(shape, layout, targets), method)]
        precompile_cases(specs, 4 if workers else (os.cpu_count() or 1))
        ready = set()
        while len(ready) < len(workers):  # the composites' compiles run alongside; timing waits for them
            try:
                ready.add(ready_queue.get(timeout=1.0))
            except queue.Empty:
                if not any(worker.is_alive() for worker in workers):
                    break
        print(f"bench_kernel: ahead-of-time work done after {time.time() - budget.start:.0f} s", flush=True)

        with tempfile.TemporaryDirectory(prefix="bench-kernel-") as directory:
            fused_runs = run_fused_processes(args, all_cases, budget, directory)
        copy_gbps = copy_bandwidth(device)
        print(f"bench_kernel: copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
        gpu_lock.release()  # now the workers time eager / compiled, one at a time
        references = collect_reference_results(workers, result_queue, budget) if workers else {}
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()

    rows, summary = benchmark_rows(all_cases, fused_runs, references, copy_gbps, args.providers)
    compile_times = [r["compile_s"] for r in references.values() if "compile_s" in r]
    lines = environment_lines(device) + [
        f"- copy bandwidth (1 GiB device-to-device, read + write, CUDA graph): {copy_gbps:.0f} GB/s",
        "- inputs bf16; G a transposed (K, B, ...) view as a batched backward returns it",
        "- every time is GPU time of back-to-back calls in a CUDA graph (median of 5 replays of about 3 ms each); "
        f"fused in {args.repeats} fresh processes (median, spread = (max - min) / median); "
        "\"launches\": the same fused call in a plain loop (host overhead shows where it exceeds GPU time)",
        "- eager = methods.compute_cam with its fp32 upcast; compiled = torch.compile(compute_cam, dynamic=False), "
        f"compiled per case ahead of timing ({len(compile_times)} cases"
        + (f", median compile {statistics.median(compile_times):.1f} s" if compile_times else "") + ")",
        "- GB/s = (bytes of A + bytes of G + fp32 CAM bytes) / fused time",
    ] + summary_lines(summary, all_cases) + [""] + rows
    print("\n".join(rows), flush=True)
    print("\n".join(summary_lines(summary, all_cases)), flush=True)
    if args.out:
        write_output(args.out, lines, f"# fused_cam benchmark, {datetime.date.today().isoformat()}")
    print(f"bench_kernel: done in {time.time() - budget.start:.0f} s", flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.fused_process:
        from kernel_workers import run_fused_process

        return run_fused_process(*args.fused_process, deadline=args.deadline, with_reference=args.with_reference)
    if args.dry_run or not torch.cuda.is_available():
        reason = "dry run" if args.dry_run else "no CUDA device: nothing timed (this benchmark needs a GPU)"
        return dry_run(args, reason)
    if args.sweep:
        from kernel_sweep import sweep

        return sweep(args)
    return benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
