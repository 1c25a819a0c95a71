"""--sweep of benchmarks/bench_kernel.py: time the candidate tile configs of every bucket of the
grid and write the fastest per bucket as a config table (the format of kernels/cam_table.json)."""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import torch

from bench_kernel import (
    SWEEP_MAX_DIFFERENCE,
    SWEEP_METHODS,
    Budget,
    environment_lines,
    precompile_cases,
    shape_text,
    sweep_buckets,
    write_output,
)
from kernel_timing import graph_time, make_inputs, meta_inputs


def sweep(args) -> int:
    from gradcam_batch.methods import compute_cam
    from kernel_workers import config_label
    from gradcam_batch.kernels import cam_configs
    from gradcam_batch.kernels.cam import _fused_cam, warmup_specs

    budget = Budget(args.budget_seconds)
    device = torch.device("cuda")
    buckets = sweep_buckets(args)
    plans = []
    for key, shape, layout, targets, method in buckets:
        batch, channels, height, width = shape
        problem = cam_configs.Problem.for_method(channels, height * width, targets, layout, method)
        plans.append((key, shape, layout, targets, method, cam_configs.candidate_configs(problem)))
    specs = [spec for _, shape, layout, targets, method, candidates in plans for config in candidates
             for spec in warmup_specs(*meta_inputs(shape, layout, targets), method, True, config)]
    precompile_cases(specs, os.cpu_count() or 1)

    lines = environment_lines(device) + [
        "- sweep: per bucket, the candidate configs of gradcam_batch.kernels.cam_configs.candidate_configs timed with "
        f"CUDA graphs on the grid shape, one method per family ({', '.join(SWEEP_METHODS.values())})",
        "",
        "| bucket | shape | method | heuristic ms | best ms | gain | best config | candidates |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    print("\n".join(lines), flush=True)
    chosen, notes = {}, {}
    for key, shape, layout, targets, method, candidates in plans:
        if budget.spent():
            print(f"bench_kernel: budget spent; {key} and later buckets keep the heuristic", flush=True)
            break
        timings = []
        try:
            activations, gradients = make_inputs(shape, layout, targets, device)
            expected = compute_cam(activations, gradients, method)
            for config in candidates:
                if budget.spent():
                    break
                try:
                    difference = (_fused_cam(activations, gradients, method, True, config=config)
                                  - expected).abs().max().item()
                    if not difference <= SWEEP_MAX_DIFFERENCE:
                        raise AssertionError(f"max abs difference {difference:.2e} vs eager")
                    milliseconds = graph_time(lambda: _fused_cam(activations, gradients, method, True, config=config))
                    timings.append((milliseconds, config))
                except Exception as error:  # an error row for this candidate; the others go on
                    print(f"| {key} | {shape_text(shape)} | {method} | error | | | {config_label(config)}: "
                          f"{type(error).__name__}: {str(error)[:160]} | |", flush=True)
        except Exception as error:
            print(f"| {key} | {shape_text(shape)} | {method} | error | | | {error!r} | |", flush=True)
        finally:
            activations = gradients = expected = None
            torch.cuda.empty_cache()
        if not timings:
            continue
        heuristic_ms = next((ms for ms, config in timings if config == candidates[0]), float("nan"))
        best_ms, best = min(timings, key=lambda pair: pair[0])
        chosen[key] = best
        notes[key] = {"milliseconds": round(best_ms, 5), "heuristic_milliseconds": round(heuristic_ms, 5),
                      "candidates_timed": len(timings)}
        lines.append(f"| {key} | {shape_text(shape)} | {method} | {heuristic_ms:.4f} | {best_ms:.4f} | "
                     f"{heuristic_ms / best_ms:.2f}x | {config_label(best)} | {len(timings)} |")
        print(lines[-1], flush=True)

    import triton

    source = (f"bench_kernel.py --sweep on {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
              f"triton {triton.__version__}, {datetime.date.today().isoformat()}")
    cam_configs.write_json_atomically(Path(args.table_out), cam_configs.table_document(chosen, source, notes))
    cam_configs.load_table(Path(args.table_out))  # what fused_cam will read must load
    print(f"wrote {args.table_out}: {len(chosen)} of {len(plans)} buckets measured "
          f"in {time.time() - budget.start:.0f} s", flush=True)
    if args.out:
        write_output(args.out, lines, f"# fused_cam config sweep, {datetime.date.today().isoformat()}")
    return 0
