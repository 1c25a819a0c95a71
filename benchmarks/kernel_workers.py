"""The processes of benchmarks/bench_kernel.py besides the parent.

- `run_fused_process`: one fresh process that times fused_cam on every case (three of them
  run one after the other, so the spread between processes is measured, not assumed).
- `reference_worker`: one of several spawned processes that share the eager and
  torch.compile'd composites. Phase 1 compiles its cases (CPU work, all workers at once, while
  no timing runs); phase 2 times them holding a GPU lock, so only one process uses the GPU at
  a time and compile time never enters a measurement.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch

from kernel_timing import case_id, graph_time, launch_time, make_inputs


def _short_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]


def config_label(config) -> str:
    if config is None:
        return "-"
    label = f"{config.path} {config.block_c}x{config.block_hw}"
    label += f" i{config.c_iters} w{config.num_warps}"
    if config.needs_sums and config.path == "tiled":
        label += f"; sums {config.sums_block_c}x{config.sums_block_hw}x{config.sums_iters} w{config.sums_warps}"
    return label


def run_fused_process(cases_path: str, result_path: str, deadline: float, with_reference: bool) -> int:
    """Time fused_cam (CUDA graph and plain launches) on each case until `deadline`; write the
    results after every case, so a process stopped early still leaves what it measured."""
    from gradcam_batch.methods import compute_cam
    from gradcam_batch.kernels.cam import fused_cam, plan_config

    cases = [tuple(case) for case in json.loads(Path(cases_path).read_text())]
    device = torch.device("cuda")
    results = []
    for case in cases:
        if time.time() > deadline:
            print(f"bench_kernel: fused process out of time after {len(results)} of {len(cases)} cases", flush=True)
            break
        shape, layout, targets, method = case
        entry = {"case": case_id(case)}
        try:
            activations, gradients = make_inputs(tuple(shape), layout, targets, device)
            started = time.perf_counter()
            result = fused_cam(activations, gradients, method)
            torch.cuda.synchronize()
            entry["first_call_s"] = time.perf_counter() - started
            entry["config"] = config_label(plan_config(activations, gradients, method))
            if with_reference:
                entry["max_diff"] = (result - compute_cam(activations, gradients, method)).abs().max().item()
            del result

            def call():
                fused_cam(activations, gradients, method)

            entry["graph_ms"] = graph_time(call)
            entry["launch_ms"] = launch_time(call)
        except Exception as error:  # one failing case is an error row, the others still run
            entry["error"] = _short_error(error)
            traceback.print_exc()
        finally:
            activations = gradients = None
            torch.cuda.empty_cache()
        results.append(entry)
        if entry.get("first_call_s", 0) > 0.5:
            print(f"bench_kernel: {entry['case']}: first call took {entry['first_call_s']:.1f} s "
                  "(compiled here: the ahead-of-time compile missed it)", flush=True)
        with open(result_path, "w") as file:
            json.dump(results, file)
    return 0


def _set_dynamo_limits() -> None:
    """One process compiles several cases of one function: lift the recompile limit, whose
    fallback would silently time the eager composite instead."""
    import torch._dynamo

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 4096)


def reference_worker(index, cases, providers, gpu_lock, ready_queue, result_queue, compile_deadline, deadline):
    """Spawned: compile its cases, report ready, then time eager / compiled under the lock."""
    try:
        import torch._inductor.config

        from gradcam_batch.methods import compute_cam

        torch._inductor.config.compile_threads = 1  # the workers themselves are the parallelism
        _set_dynamo_limits()
        device = torch.device("cuda")
        compiled = torch.compile(compute_cam, dynamic=False)
        compile_seconds = {}
        if "compiled" in providers:
            for case in cases:
                if time.time() > compile_deadline:
                    break
                shape, layout, targets, method = case
                try:
                    activations, gradients = make_inputs(tuple(shape), layout, targets, device)
                    started = time.perf_counter()
                    compiled(activations, gradients, method)
                    torch.cuda.synchronize()
                    compile_seconds[case_id(case)] = time.perf_counter() - started
                except Exception as error:
                    result_queue.put({"case": case_id(case), "compiled_error": _short_error(error)})
                    traceback.print_exc()
                finally:
                    activations = gradients = None
                    torch.cuda.empty_cache()
    except Exception as error:
        print(f"bench_kernel: reference worker {index} failed to start: {error!r}", file=sys.stderr, flush=True)
        traceback.print_exc()
        ready_queue.put(index)
        result_queue.put({"worker_done": index})
        return
    ready_queue.put(index)

    for case in cases:
        if time.time() > deadline:
            break
        entry = {"case": case_id(case)}
        shape, layout, targets, method = case
        with gpu_lock:
            try:
                activations, gradients = make_inputs(tuple(shape), layout, targets, device)
                if "eager" in providers:
                    try:
                        entry["eager_ms"] = graph_time(lambda: compute_cam(activations, gradients, method))
                    except Exception as error:
                        entry["eager_error"] = _short_error(error)
                if entry["case"] in compile_seconds:
                    entry["compile_s"] = compile_seconds[entry["case"]]
                    try:
                        entry["compiled_ms"] = graph_time(lambda: compiled(activations, gradients, method))
                    except Exception as error:
                        entry["compiled_error"] = _short_error(error)
            except Exception as error:
                entry["eager_error"] = _short_error(error)
            finally:
                activations = gradients = None
                torch.cuda.empty_cache()
        result_queue.put(entry)
    result_queue.put({"worker_done": index})
