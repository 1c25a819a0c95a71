"""Compile fused_cam's kernels ahead of time, in parallel processes.

A process compiles Triton kernels one after the other (about a second each); benchmarks and
GPU test sessions need a few hundred variants. Each worker process calls `JITFunction.warmup`
(compile without launching) on a share of the launch specs from `gradcam_batch.kernels.cam.warmup_specs`;
Triton's disk cache then holds the binaries, and the calling process loads them in
milliseconds on first launch, as long as it launches with the same specialization (same
integer arguments and dtypes, 16-byte aligned tensors: what torch allocates).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os


def _spec_key(spec) -> str:
    name, _grid, arguments, keywords = spec
    return repr((name, arguments, sorted(keywords.items())))


def _compile_share(specs: list) -> list[str]:
    """Worker: compile every spec, return one line per failure."""
    import gradcam_batch.kernels.cam_kernels as cam_kernels

    failures = []
    for name, grid, arguments, keywords in specs:
        try:
            getattr(cam_kernels, name).warmup(*arguments, grid=grid, **keywords)
        except Exception as error:  # reported to the caller, which launches (and fails) later
            failures.append(f"{name} {keywords}: {error!r}")
    return failures


def precompile(specs: list, workers: int | None = None) -> tuple[int, list[str]]:
    """Compile the distinct specs in `workers` spawned processes; returns (count, failures).

    Spawned, not forked: the caller may already hold a CUDA context, which a fork cannot use.
    """
    from gradcam_batch.kernels.cam_kernels import INTERPRETED

    unique = list({_spec_key(spec): spec for spec in specs}.values())
    if not unique or INTERPRETED:  # the interpreter compiles nothing
        return 0, []
    workers = max(1, min(workers or (os.cpu_count() or 1), len(unique)))
    shares = [unique[index::workers] for index in range(workers)]
    context = multiprocessing.get_context("spawn")
    failures = []
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        for share_failures in pool.map(_compile_share, shares):
            failures += share_failures
    return len(unique), failures
