"""Inputs and GPU timing shared by benchmarks/bench_kernel.py and its worker processes.

Every provider is timed the same way: back-to-back calls captured in one CUDA graph and
replayed, so the figure is GPU time, free of the Python and launch overhead that a plain loop
of 60-microsecond calls would measure instead. `launch_time` measures that plain loop on
purpose, to show the host overhead of a call.
"""

from __future__ import annotations

import statistics

import torch

# Case: (shape (B, C, H, W), layout, K, method), as strings and ints so it travels as JSON.


def case_id(case) -> str:
    shape, layout, targets, method = case
    return f"{'x'.join(map(str, shape))}/{layout}/K{targets}/{method}"


def make_inputs(shape, layout, targets, device, seed=0):
    """bf16 A (B, C, H, W) in NCHW or channels_last and G as a batched backward returns it:
    (K, B, C, H, W) transposed to a (B, K, C, H, W) view (per-image channels-last for nhwc)."""
    batch, channels, height, width = shape
    generator = torch.Generator(device=device).manual_seed(seed)
    activations = torch.randn(batch, channels, height, width, device=device, dtype=torch.bfloat16,
                              generator=generator).relu_()
    if layout == "nhwc":
        activations = activations.contiguous(memory_format=torch.channels_last)
        gradients = torch.randn(targets, batch, height, width, channels, device=device, dtype=torch.bfloat16,
                                generator=generator).permute(0, 1, 4, 2, 3)
    else:
        gradients = torch.randn(targets, batch, channels, height, width, device=device, dtype=torch.bfloat16,
                                generator=generator)
    gradients.mul_(1e-3)  # gradient-like magnitudes; irrelevant to timing, kept for realism
    return activations, gradients.transpose(0, 1)


def meta_inputs(shape, layout, targets):
    """Meta tensors with the dtypes and strides of make_inputs: for launch plans, no memory."""
    batch, channels, height, width = shape
    activations = torch.empty(batch, channels, height, width, device="meta", dtype=torch.bfloat16)
    if layout == "nhwc":
        activations = activations.contiguous(memory_format=torch.channels_last)
        gradients = torch.empty(targets, batch, height, width, channels, device="meta",
                                dtype=torch.bfloat16).permute(0, 1, 4, 2, 3)
    else:
        gradients = torch.empty(targets, batch, channels, height, width, device="meta", dtype=torch.bfloat16)
    return activations, gradients.transpose(0, 1)


def moved_bytes(shape, targets) -> int:
    """What any implementation must move: bf16 A and G read once, the fp32 CAMs written once."""
    batch, channels, height, width = shape
    elements = batch * channels * height * width
    return elements * 2 * (1 + targets) + batch * targets * height * width * 4


def _events():
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def _estimate(fn) -> float:
    """Milliseconds per call of a short plain loop (after one call that compiles and warms)."""
    fn()
    torch.cuda.synchronize()
    start, end = _events()
    start.record()
    for _ in range(3):
        fn()
    end.record()
    end.synchronize()
    return max(start.elapsed_time(end) / 3, 1e-3)


def graph_time(fn, target_ms: float = 3.0, replays: int = 5, max_calls: int = 400) -> float:
    """Median GPU milliseconds per call: `calls` back-to-back calls captured in one CUDA graph
    (about target_ms of work), replayed `replays` times."""
    calls = max(2, min(max_calls, int(target_ms / _estimate(fn))))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # a warm-up on a side stream, as graph capture expects
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = _events()
    timings = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        timings.append(start.elapsed_time(end) / calls)
    del graph
    return statistics.median(timings)


def launch_time(fn, target_ms: float = 2.0, repeats: int = 3, max_calls: int = 1000) -> float:
    """Median milliseconds per call of a plain loop of calls: the larger of GPU time and the
    host's time to check, allocate and launch."""
    calls = max(5, min(max_calls, int(target_ms / _estimate(fn))))
    start, end = _events()
    timings = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        timings.append(start.elapsed_time(end) / calls)
    return statistics.median(timings)


def copy_bandwidth(device) -> float:
    """Device-to-device copy of a 1 GiB tensor: (bytes read + bytes written) / time, in GB/s."""
    source = torch.empty(2**30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    milliseconds = graph_time(lambda: target.copy_(source), target_ms=20.0)
    del source, target
    torch.cuda.empty_cache()
    return 2 * 2**30 / (milliseconds * 1e-3) / 1e9
