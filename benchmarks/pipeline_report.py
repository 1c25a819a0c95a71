"""Rows of the pipeline benchmark and their reports: the markdown file for benchmarks/results/
and a short fixed-width summary meant to be read from the last lines of a log."""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

STAGE = "stage"  # one stage alone, in the benchmark's own process
RUN = "run"  # a whole job in its own process: gradcam-batch or a peer
SUMMARY_STAGES = ("forward", "forward-big", "forward-vit", "engine", "decode", "decode-1shard")  # with device-decode*: the bounds


# --- the machine and the code measured ---------------------------------------------------------

def versions() -> dict:
    """Python, torch and peer versions, the optional nvImageCodec wheel where installed, and the commit."""
    import torch
    import torchvision

    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__}
    for name in ("triton", "grad-cam", "captum", "nvidia-nvimgcodec-cu13", "nvidia-nvimgcodec-cu12"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            if not name.startswith("nvidia-"):
                found[name] = "not installed"
    repo_root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo_root, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit:  # other changes are in flight: say which code was measured
            found["gradcam-batch commit"] = commit + (" with uncommitted changes" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):  # no git on the machine: the versions above still hold
        pass
    return found


def device_name(device_type: str) -> str:
    """The card, or the CPU with the cores this process may use (nproc, not the host's count)."""
    import torch

    if device_type == "cuda":
        return f"{torch.cuda.get_device_name()} ({os.cpu_count()} CPU cores)"
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), name)
    except OSError:  # no /proc: keep platform.processor()'s name
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU {name or platform.machine()}, {usable} usable cores (nproc), torch threads {torch.get_num_threads()}"


@dataclass
class Row:
    key: str  # unique per row: the provider id, plus a suffix for variants
    provider: str  # the label in the tables
    kind: str  # STAGE or RUN
    model: str = ""
    batch: str = ""
    decode: str = ""  # RUN rows: where JPEGs are decoded (data.decode)
    shards: int | None = None
    images: int | None = None
    in_loop: float | None = None  # img/s inside the process's own clock (after its imports)
    steady: float | None = None  # img/s after the first batches
    whole: float | None = None  # img/s over the process wall time, start-up included
    first_batch: float | None = None  # seconds from process start to the first finished batch
    first_batch_after_imports: float | None = None
    ms_per_batch: float | None = None  # STAGE rows
    reference: str = ""  # key of the bare-forward row of this row's model
    ran: str = ""  # what ran: the row's own overrides or call
    notes: list[str] = field(default_factory=list)
    status: str | None = None  # "failed: ..." / "skipped: ..." / "stopped: ..."
    extra: dict = field(default_factory=dict)


def count_of(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def one_line(error: BaseException | str) -> str:
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:300]


def median_runs(values: list[float]) -> tuple[float | None, str]:
    """The median of per-run values and, for several runs, the list for the notes."""
    values = [v for v in values if v is not None]
    if not values:
        return None, ""
    if len(values) == 1:
        return values[0], ""
    return statistics.median(values), ", ".join(f"{v:.1f}" for v in values)


def run_row(plan: dict, results: list[dict], stopped: str | None, dataset_images: int) -> Row:
    """A whole-run row from its plan and the results of its runs (medians over --repeats); its
    status where it has no result: the plan's own skip reason, why it stopped, or not reached."""
    row = Row(plan["key"], plan["provider"], RUN, plan.get("model", ""), plan.get("batch", ""),
              decode=plan.get("decode", ""), shards=plan.get("shards"), reference=plan.get("reference", ""),
              ran=plan.get("ran", ""))
    if "status" in plan or not results:
        row.status = plan.get("status") or stopped or "not reached: the benchmark stopped before this run"
        return row
    last = results[-1]
    if plan.get("cost"):
        row.notes.append(plan["cost"])
    row.images = last["images"]
    loop_runs = [r["images"] / r["loop_seconds"] for r in results]
    whole_runs = [r["images"] / r["wall_seconds"] for r in results]
    row.in_loop, loop_note = median_runs(loop_runs)
    row.whole, whole_note = median_runs(whole_runs)
    row.steady, steady_note = median_runs([r.get("steady_images_per_second") for r in results])
    row.first_batch, _ = median_runs([r.get("seconds_to_first_batch") for r in results])
    row.first_batch_after_imports, _ = median_runs([r.get("seconds_to_first_batch_after_imports") for r in results])
    row.extra.update(loop_runs=loop_runs, whole_runs=whole_runs,
                     wall_seconds=statistics.median(r["wall_seconds"] for r in results),
                     loop_seconds=statistics.median(r["loop_seconds"] for r in results))
    row.notes.append(f"wall {row.extra['wall_seconds']:.1f} s, in-loop {row.extra['loop_seconds']:.1f} s")
    if "rows" in last:
        row.notes.append(f"{last['rows']} rows to Parquet")
    if plan.get("peer"):
        if last["images"] != dataset_images:
            row.notes.append(f"peer on {last['images']:,} of the {dataset_images:,} images (--peer-images)")
    elif last["images"] != dataset_images:
        row.notes.append(f"WARNING: {last['images']} of {dataset_images} images processed")
    if last.get("errors"):
        row.notes.append(f"{last['errors']} errors")
    if "map_shape" in last:
        row.notes.append("maps " + "x".join(str(v) for v in last["map_shape"]) + " in memory")
    if loop_note:
        row.notes.append(f"runs: in-loop {loop_note}; steady {steady_note or '-'}; whole {whole_note}")
    if stopped:
        row.notes.append(f"a later run {stopped}")
    return row


def rate(value: float | None) -> str:
    return f"{value:,.1f}" if value else "-"


def seconds(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "-"


def ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}x" if value and reference else "-"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _first_batch(row: Row) -> str:
    if row.first_batch is None and row.first_batch_after_imports is None:
        return "-"
    return f"{seconds(row.first_batch)} / {seconds(row.first_batch_after_imports)}"


def stage_table(rows: list[Row], by_key: dict[str, Row]) -> list[str]:
    lines = ["| stage | model | batch | ms per batch | img/s | vs bare forward | ran | notes |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for row in rows:
        if row.status:
            lines.append(f"| {row.provider} | {row.model} | {row.batch} | {row.status} | | | {_cell(row.ran)} | "
                         f"{_cell('; '.join(row.notes))} |")
            continue
        reference = by_key.get(row.reference)
        versus = ratio(row.in_loop, reference.in_loop) if reference and reference is not row else (
            "1.00x" if reference is row else "-")
        milliseconds = f"{row.ms_per_batch:,.1f}" if row.ms_per_batch else "-"
        lines.append(f"| {row.provider} | {row.model} | {row.batch} | {milliseconds} | {rate(row.in_loop)} "
                     f"| {versus} | {_cell(row.ran)} | {_cell('; '.join(row.notes))} |")
    return lines


def run_table(rows: list[Row], by_key: dict[str, Row]) -> list[str]:
    lines = ["| provider | model | decode | shards | images | img/s in-loop | img/s steady | img/s whole process "
             "| first batch s (process start / after imports) | in-loop / forward | steady / forward | ran | notes |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for row in rows:
        shards = "" if row.shards is None else str(row.shards)
        images = "" if row.images is None else f"{row.images:,}"
        if row.status:
            lines.append(f"| {row.provider} | {row.model} | {row.decode} | {shards} | {images} | {row.status} "
                         f"| | | | | | {_cell(row.ran)} | {_cell('; '.join(row.notes))} |")
            continue
        reference = by_key.get(row.reference)
        forward = reference.in_loop if reference else None
        lines.append(f"| {row.provider} | {row.model} | {row.decode} | {shards} | {images} | {rate(row.in_loop)} "
                     f"| {rate(row.steady)} | {rate(row.whole)} | {_first_batch(row)} | {ratio(row.in_loop, forward)} "
                     f"| {ratio(row.steady, forward)} | {_cell(row.ran)} | {_cell('; '.join(row.notes))} |")
    return lines


def _pair_line(by_key: dict[str, Row], numerator: str, denominator: str, label: str,
               fields: tuple[str, ...] = ("in_loop", "steady", "whole"), goal: str = "") -> str:
    a, b = by_key.get(numerator), by_key.get(denominator)
    names = {"in_loop": "in-loop", "steady": "steady state", "whole": "whole process"}
    parts = [f"{getattr(a, f) / getattr(b, f):.2f}x {names[f]}" for f in fields
             if a and b and getattr(a, f) and getattr(b, f)]
    if not parts:
        missing = [f"{r.provider} ({r.status})" for r in (a, b) if r and r.status]
        if a is None or b is None:
            missing.append("not run")
        return f"- {label}: n/a" + (f" ({'; '.join(missing)})" if missing else "")
    text = f"- {label}: {', '.join(parts)}"
    if "whole" in fields and a.whole and b.whole:
        runs_a, runs_b = a.extra.get("whole_runs", []), b.extra.get("whole_runs", [])
        if len(runs_a) > 1 and len(runs_a) == len(runs_b):  # interleaved rounds, paired
            text += " (ratio of medians; per round, whole process: " + ", ".join(
                f"{x / y:.2f}x" for x, y in zip(runs_a, runs_b)) + ")"
    return text + (f" {goal}" if goal else "")


def ratio_lines(args, by_key: dict[str, Row]) -> list[str]:
    cuda = args.device == "cuda"
    forward = "forward-bf16" if cuda else "forward-fp32"
    lines = [
        _pair_line(by_key, "top1", "forward", f"gradcam-batch top-1 / {forward} {args.model}",
                   ("in_loop", "steady"), "(goal on CUDA: >= 0.8x steady state)" if cuda else ""),
        _pair_line(by_key, "engine", "forward", f"engine-only top-1 / {forward} (Grad-CAM step vs bare forward)",
                   ("in_loop",)),
    ]
    if cuda:
        lines.append(_pair_line(by_key, "big", "forward-big", f"gradcam-batch {args.big_model} / {forward} "
                                f"{args.big_model}", ("in_loop", "steady"), "(goal: >= 0.9x steady state)"))
        engine, forward_row = by_key.get("engine"), by_key.get("forward")
        if engine and forward_row and "peak_bytes" in engine.extra and "peak_bytes" in forward_row.extra:
            lines.append(f"- peak GPU memory at batch {args.batch_size}: engine-only Grad-CAM step "
                         f"{engine.extra['peak_bytes'] / 2**30:.2f} GiB vs bare forward "
                         f"{forward_row.extra['peak_bytes'] / 2**30:.2f} GiB "
                         f"({engine.extra['peak_bytes'] / forward_row.extra['peak_bytes']:.2f}x)")
    else:
        lines.append(_pair_line(by_key, "engine", "engine-what-if", "engine-only top-1 channels_last / NCHW on CPU",
                                ("in_loop",)))
    shards = by_key.get("top1").shards if by_key.get("top1") else None
    lines += [
        _pair_line(by_key, "top1-1shard", "top1", f"gradcam-batch top-1, 1 shard / {shards or 'N'} shards "
                   "(same images)", goal="(goal: >= 0.9x)"),
        _pair_line(by_key, "decode-1shard", "decode", f"decode-only, 1 shard / {shards or 'N'} shards "
                   "(img/s of the stage table)", ("in_loop",)),
        _pair_line(by_key, "topk", "top1", f"gradcam-batch top-{args.topk} / top-1 (rate)"),
    ]
    for peer, label in (("pytorch-grad-cam", "pytorch-grad-cam"), ("captum", "captum LayerGradCam")):
        ours, theirs = by_key.get("top1"), by_key.get(peer)
        same_images = ours and theirs and ours.images == theirs.images
        goal = "(the CPU lead in whole process was 2.6x on 2026-11-26)" if peer == "pytorch-grad-cam" and not cuda \
            else ""
        line = _pair_line(by_key, "top1", peer, f"gradcam-batch top-1 / {label} (speed-up)",
                          ("in_loop", "steady", "whole") if same_images else ("in_loop", "steady"), goal)
        if ours and theirs and not ours.status and not theirs.status and not same_images:
            line += (f" (the peer ran {theirs.images or 0:,} images, gradcam-batch {ours.images or 0:,}: whole-process "
                     "rates would weigh start-up differently, so they are not compared)")
        lines.append(line)
    runs = [row for row in by_key.values() if row.kind == RUN and not row.status]
    timed = [row for row in runs if row.first_batch is not None or row.first_batch_after_imports is not None]
    if timed:
        lines.append("- time to first batch, s from process start / after the imports (goal on a rerun of one "
                     "command: <= 6 / <= 3): " + ", ".join(f"{row.provider} {_first_batch(row)}" for row in timed))
    outside = [row for row in runs if row.whole and "wall_seconds" in row.extra and "loop_seconds" in row.extra]
    if outside:
        lines.append("- s of the wall time outside the in-loop clock (interpreter, imports, config): " + ", ".join(
            f"{row.provider} {row.extra['wall_seconds'] - row.extra['loop_seconds']:.1f} of "
            f"{row.extra['wall_seconds']:.1f}" for row in outside))
    return lines


def render(args, rows: list[Row], header: dict) -> str:
    by_key = {row.key: row for row in rows}
    started = header["started"]
    meta = header["meta"]
    lines = [
        f"# gradcam-batch pipeline benchmark ({args.device})",
        "",
        f"- date: {started.isoformat(timespec='seconds')}; this run took {header['elapsed']:.0f} s"
        + (f" of its --budget-seconds {args.budget_seconds:g}" if args.budget_seconds else ""),
        f"- device: {header['device_name']}",
        "- versions: " + ", ".join(f"{name} {value}" for name, value in header["versions"].items()),
        f"- load average (1/5/15 min) before: {', '.join(f'{v:.2f}' for v in header['load_before'])}; "
        f"after: {', '.join(f'{v:.2f}' for v in header['load_after'])}",
        f"- data: {meta['images']} JPEGs {meta['width']}x{meta['height']} (quality 90, "
        f"{meta['mean_jpeg_kb']:.0f} kB mean) in {meta['shards']} WebDataset shard(s) of {meta['shard_size']}, "
        f"`<data>` = {header['folder']}; the 1-shard rows read the same members joined into "
        "`<data>/single-shard/all.tar`",
        f"- model: torchvision {args.model} (random init, seed 0), target layer {args.target_layer}, "
        f"resize {args.resize}, crop {args.crop}; workers {args.workers}; batch {args.batch_size}, "
        f"peer batch {args.peer_batch_size}, peer images {args.peer_images:,}; repeats {args.repeats}",
        *[f"- gradcam_batch defaults: {text}" for text in header.get("pipeline_defaults", [])],
        *[f"- note: {note}" for note in args.note],
        *([f"- WARNING: the 1-min load average was {header['load_before'][0]:.2f} on {os.cpu_count()} cores when "
           "this run started: other processes may have shared the CPU, so rates are noisy; compare rows of "
           "the same run and prefer --repeats medians"]
          if header["load_before"][0] > 0.5 * (os.cpu_count() or 1) else []),
        "- command: `python benchmarks/bench_pipeline.py " + shlex.join(header.get("argv", sys.argv[1:])) + "`",
        "- arguments: " + ", ".join(f"{k}={v}" for k, v in sorted(vars(args).items())
                                    if not k.startswith("peer_mode") and k not in ("shards", "launched_at")),
        "",
        "## Stages, each alone in the benchmark's process",
        "",
        "ms per batch and img/s of one stage fed in memory (decode-only: the project's loader over the shards, "
        "img/s after every worker delivered its first batch; the rate with worker start is in the notes). "
        "\"vs bare forward\" divides by the forward of the row's model.",
        "",
        *stage_table([row for row in rows if row.kind == STAGE], by_key),
        "",
        "## Whole runs, a process each",
        "",
        "in-loop: the images over the process's own clock (gradcam-batch: pipeline.run, which includes building "
        "the model and starting the workers; peers: from building the model to the last map). steady: after the "
        "first batches, from `_manifest.json` `this_run.steady_images_per_second` (peers: after their first "
        "batch). whole process: the images over the subprocess's wall time, interpreter and imports included. "
        "first batch: `this_run.seconds_to_first_batch` / `seconds_to_first_batch_after_imports`. '-' where the "
        "pipeline does not report a value.",
        "",
        *run_table([row for row in rows if row.kind == RUN], by_key),
        "",
        *([f"- every gradcam-batch row also ran: `python -m gradcam_batch {header['common_overrides']}` "
           "(the row's `ran` adds its own overrides)"] if header.get("common_overrides") else []),
        *([f"- every peer row also ran: `python benchmarks/bench_pipeline.py {header['peer_common']}`"]
          if header.get("peer_common") else []),
        *([f"- the runs went in this order (the on-disk kernel caches are warm after the engine stage and the "
           f"first run): {', '.join(header['run_order'])}"] if header.get("run_order") else []),
        "- peers: pytorch-grad-cam GradCAM(model, target_layers=[layer]) with targets=None (predicted class): "
        "full backward to the input with parameter gradients, maps upsampled to the crop by the library; captum "
        "LayerGradCam(relu_attributions=True) on the argmax of a separate no_grad forward, then "
        "LayerAttribution.interpolate to the crop; both fp32, maps kept in host memory; their DataLoader (tarfile "
        "+ PIL + torchvision transforms) spreads samples over all workers whatever the shard count. gradcam-batch "
        "writes layer-resolution maps with scores and statistics to zstd Parquet.",
        "",
        "## Ratios",
        "",
        *ratio_lines(args, by_key),
    ]
    return "\n".join(lines) + "\n"


def summary_lines(args, rows: list[Row], header: dict) -> list[str]:
    """Fixed-width lines for the end of a log: the forward bounds, every whole run, the key ratios."""
    by_key = {row.key: row for row in rows}
    lines = [f"== bench_pipeline summary: {args.device}, {header['device_name']}, {header['meta']['images']} images, "
             f"{header['elapsed']:.0f} s ==",
             "img/s; vs fwd: a run's steady rate (a stage's img/s) over the bare forward of its model",
             f"{'provider':<36} {'in-loop':>9} {'steady':>9} {'whole':>9} {'1st batch s':>12} {'vs fwd':>7}"]
    for row in rows:
        if not (row.kind == RUN or row.key in SUMMARY_STAGES or row.key.startswith("device-decode")):
            continue
        if row.status:
            lines.append(f"{row.provider[:36]:<36} {row.status[:80]}")
        else:
            reference = by_key.get(row.reference)
            versus = ratio(row.steady if row.kind == RUN else row.in_loop, reference.in_loop if reference else None)
            lines.append(f"{row.provider[:36]:<36} {rate(row.in_loop):>9} {rate(row.steady):>9} {rate(row.whole):>9} "
                         f"{_first_batch(row):>12} {versus:>7}")
    for numerator, denominator, label in (("top1-1shard", "top1", "1 shard / many shards"),
                                          ("top1", "pytorch-grad-cam", "top-1 / pytorch-grad-cam"),
                                          ("top1", "captum", "top-1 / captum")):
        a, b = by_key.get(numerator), by_key.get(denominator)
        if a and b and a.in_loop and b.in_loop:
            steady = f", {a.steady / b.steady:.2f}x steady" if a.steady and b.steady else ""
            lines.append(f"{label}: {a.in_loop / b.in_loop:.2f}x in-loop{steady}")
    return lines
