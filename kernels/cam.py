"""Fused class-activation maps: channel weights, weighted channel sum, ReLU, min-max, in Triton.

`fused_cam` is the public launcher of the kernels in `gradcam_batch.kernels.cam_kernels` (their docstring
explains the passes). It checks the inputs, picks a tiling from `gradcam_batch.kernels.cam_configs` (the
committed table, a heuristic for other buckets, or an opt-in autotune cached on disk) and
launches 1-4 kernels. Everything that depends only on shapes, strides, dtypes, device, method
and normalize (the checks, the config, grids, scratch sizes) is a launch plan built once per
call signature, so a repeated call costs two allocations and the launches.

Under TRITON_INTERPRET=1 (set before importing this module) the kernels run on CPU tensors.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, NamedTuple

import torch
import triton

from gradcam_batch.methods import METHODS, check_cam_inputs
from gradcam_batch.kernels import cam_configs
from gradcam_batch.kernels.cam_configs import CamConfig, Problem
from gradcam_batch.kernels.cam_kernels import (
    INTERPRETED,
    METHOD_CODES,
    SUMS_OF_A,
    SUMS_OF_TARGETS,
    _cam_channel_sums_kernel,
    _cam_finish_kernel,
    _cam_map_kernel,
)

log = logging.getLogger(__name__)

__all__ = ["INTERPRETED", "SUPPORTED_DTYPES", "fused_cam", "plan_config", "reset_caches", "warmup_specs"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT32_MAX = 2**31 - 1
_GRID_AXIS_MAX = 65535  # CUDA's limit on grid axes 1 and 2
# Tests set this: scratch buffers start as NaN, so a slot read before it is written shows.
POISON_SCRATCH = False
# Plans kept at most; a workload with more distinct shapes just rebuilds them.
MAX_PLANS = 512
# Finishing pass: partial-map slots per load, fp32 elements per tile.
_FINISH_MAX_SLOTS = 64
_FINISH_TILE = 8192

_PLANS: dict = {}
_TABLE: dict | None = None
_AUTOTUNED: dict = {}  # autotune cache file -> {bucket: config}


def reset_caches() -> None:
    """Forget plans, the loaded table and autotune results (after changing the env vars)."""
    global _TABLE
    _PLANS.clear()
    _AUTOTUNED.clear()
    _TABLE = None


# Input checks ---------------------------------------------------------------------------------

def _flat_spatial_stride(tensor: torch.Tensor, h_dim: int, w_dim: int) -> int | None:
    """The one stride s with offset(h, w) == (h * W + w) * s, or None if (H, W) do not collapse."""
    height, width = tensor.shape[h_dim], tensor.shape[w_dim]
    stride_h, stride_w = tensor.stride(h_dim), tensor.stride(w_dim)
    if width == 1:
        return stride_h if height > 1 else 1
    if height == 1 or stride_h == width * stride_w:
        return stride_w
    return None


def _check_int32_extent(name: str, tensor: torch.Tensor, dims: tuple) -> None:
    extent = sum((tensor.shape[d] - 1) * abs(tensor.stride(d)) for d in dims if tensor.shape[d] > 0)
    if extent > _INT32_MAX:
        raise ValueError(
            f"{name} per-image strides {tuple(tensor.stride())} span {extent} elements, more than "
            "the kernel's int32 in-image offsets allow; pass a contiguous tensor"
        )


def _check_inputs(activations, gradients, method, out) -> torch.Tensor:
    """Validate everything a caller can get wrong; return gradients as (B, K, C, H, W)."""
    gradients = check_cam_inputs(activations, gradients, method)
    for name, value in (("activations", activations), ("gradients", gradients)):
        if value.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} dtype {value.dtype} is not supported; use float32, bfloat16 or float16")
    if activations.device != gradients.device:
        raise ValueError(
            f"activations are on {activations.device} but gradients on {gradients.device}; "
            "move both to the same device"
        )
    device = activations.device
    if device.type != "cuda" and not (device.type == "cpu" and INTERPRETED):
        raise ValueError(
            f"fused_cam needs CUDA tensors or TRITON_INTERPRET=1 (set before importing kernels); "
            f"got tensors on {device}. On CPU use gradcam_batch.methods.compute_cam"
        )
    if out is not None:
        batch, targets, _, height, width = gradients.shape
        expected = (batch, targets, height, width)
        if tuple(out.shape) != expected or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(
                f"out must be a contiguous float32 tensor of shape {expected}, got "
                f"{tuple(out.shape)} {out.dtype} contiguous={out.is_contiguous()}"
            )
        if out.device != device:
            raise ValueError(f"out is on {out.device} but the inputs on {device}")
    _check_int32_extent("activations", activations, (1, 2, 3))
    _check_int32_extent("gradients", gradients, (2, 3, 4))
    return gradients


# Launch plans ---------------------------------------------------------------------------------

class _Launch(NamedTuple):
    kernel: Any  # a @triton.jit function of kernels.cam_kernels
    grid: tuple
    buffers: tuple  # roles of the pointer arguments: "a", "g", "sums", "partials", "out"
    scalars: tuple  # the integer arguments, in order
    constants: dict  # constexpr arguments
    options: dict  # num_warps (left out under the interpreter, which has no warps)


@dataclasses.dataclass(frozen=True)
class _Plan:
    out_shape: tuple
    device: torch.device
    launches: tuple = ()
    zero_fill: bool = False  # no channels: every map is zero
    scratch_numel: int = 0  # fp32 partial maps first, then the channel sums at sums_offset
    sums_offset: int = 0
    config: CamConfig | None = None


def _cdiv(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def _fits_grid(name: str, value: int) -> int:
    if value > _GRID_AXIS_MAX:
        raise ValueError(f"{name} = {value} exceeds the {_GRID_AXIS_MAX} programs of a CUDA grid axis; "
                         "use a smaller map or fewer channels per call")
    return value


def _problem(activations: torch.Tensor, gradients: torch.Tensor, method: str):
    """(Problem, A strides, G strides, A flat, G flat); strides in elements, W's replaced by the
    flat spatial stride where (H, W) collapse."""
    _, targets, channels, height, width = gradients.shape
    a_flat = _flat_spatial_stride(activations, 2, 3)
    g_flat = _flat_spatial_stride(gradients, 3, 4)
    a_strides = activations.stride()[:3] + (activations.stride(3) if a_flat is None else a_flat,)
    g_strides = gradients.stride()[:4] + (gradients.stride(4) if g_flat is None else g_flat,)
    layout = cam_configs.layout_of(a_strides[1], g_strides[2], a_flat, g_flat)
    problem = Problem.for_method(channels, height * width, targets, layout, method)
    return problem, a_strides, g_strides, a_flat is not None, g_flat is not None


def _build_plan(activations, gradients, method: str, normalize: bool, config: CamConfig | None) -> _Plan:
    """Grids, scratch sizes and arguments of every launch; gradients are (B, K, C, H, W)."""
    batch, targets, channels, height, width = gradients.shape
    positions = height * width
    out_shape = (batch, targets, height, width)
    device = activations.device
    if batch * targets * positions == 0:
        return _Plan(out_shape, device)
    if channels == 0:  # an empty channel sum is a zero map, and a zero map normalizes to zeros
        return _Plan(out_shape, device, zero_fill=True)
    problem, a_strides, g_strides, a_flat, g_flat = _problem(activations, gradients, method)
    if config is None:
        config = _choose_config(problem, activations, gradients, method, normalize)
    errors = config.problems(problem)
    if errors:
        raise ValueError(f"config {config} cannot run {problem}: {'; '.join(errors)}")

    from_sums = config.path == "tiled" and problem.family != "pixel"
    n_groups = _fits_grid("channel groups", _cdiv(channels, config.block_c * config.c_iters))
    n_position_blocks = _fits_grid("position blocks", _cdiv(positions, config.block_hw))
    # One group holds every channel: the map kernel writes final maps, unless it must normalize
    # a map that is spread over several position blocks.
    direct_out = n_groups == 1 and (n_position_blocks == 1 or not normalize)
    n_slots = 0 if direct_out else n_groups
    n_splits = _fits_grid("position splits", _cdiv(positions, config.sums_block_hw * config.sums_iters)) \
        if from_sums else 1
    partials_numel = batch * targets * n_slots * positions
    sums_offset = _cdiv(partials_numel, 32) * 32  # 128-byte aligned, as the kernels are specialized
    sums_numel = batch * (targets + 1) * n_splits * channels if from_sums else 0
    if max(n_slots * positions, (targets + 1) * n_splits * channels) > _INT32_MAX:
        raise ValueError(f"{targets} targets x {channels} channels x {positions} positions overflow the "
                         "kernels' int32 per-image offsets; split the call")

    def options(num_warps):
        return {} if INTERPRETED else {"num_warps": num_warps}

    common = {"METHOD": METHOD_CODES[method], "A_FLAT_HW": a_flat, "G_FLAT_HW": g_flat}
    strides = tuple(a_strides) + tuple(g_strides)
    launches = []
    if from_sums:
        phases = (SUMS_OF_A, SUMS_OF_TARGETS) if method == "gradcampp" else (SUMS_OF_TARGETS,)
        sums_grid = (batch, _fits_grid("channel blocks", _cdiv(channels, config.sums_block_c)), n_splits)
        for phase in phases:
            launches.append(_Launch(
                _cam_channel_sums_kernel, sums_grid, ("a", "g", "sums"),
                (channels, width, positions, targets, n_splits) + strides,
                {**common, "PHASE": phase, "BLOCK_C": config.sums_block_c, "BLOCK_HW": config.sums_block_hw,
                 "SPLIT_ITERS": config.sums_iters},
                options(config.sums_warps),
            ))
    launches.append(_Launch(
        _cam_map_kernel, (batch, n_groups, n_position_blocks), ("a", "g", "sums", "out" if direct_out else "partials"),
        (channels, width, positions, targets, max(n_slots, 1), n_splits) + strides,
        {**common, "WEIGHTS_FROM_SUMS": from_sums, "BLOCK_C": config.block_c, "C_ITERS": config.c_iters,
         "BLOCK_HW": config.block_hw, "DIRECT_OUT": direct_out, "NORMALIZE": bool(normalize) and direct_out},
        options(config.num_warps),
    ))
    if not direct_out:
        slots_block = min(triton.next_power_of_2(n_slots), _FINISH_MAX_SLOTS)
        finish_block_hw = min(triton.next_power_of_2(positions), cam_configs.MAX_WHOLE_BLOCK_HW,
                              _FINISH_TILE // slots_block)
        launches.append(_Launch(
            _cam_finish_kernel, (batch * targets, 1, 1), ("partials", "out"), (positions, n_slots),
            {"NORMALIZE": bool(normalize), "SINGLE_BLOCK": finish_block_hw >= positions,
             "SLOTS_BLOCK": slots_block, "BLOCK_HW": finish_block_hw},
            options(4 if slots_block * finish_block_hw <= 2048 else 8),
        ))
    scratch_numel = sums_offset + sums_numel if from_sums else partials_numel
    return _Plan(out_shape, device, tuple(launches), scratch_numel=scratch_numel,
                 sums_offset=sums_offset if from_sums else 0, config=config)


def _run(plan: _Plan, activations, gradients, out):
    if out is None:
        out = torch.empty(plan.out_shape, dtype=torch.float32, device=plan.device)
    if plan.zero_fill:
        return out.zero_()
    if not plan.launches:
        return out
    buffers = {"a": activations, "g": gradients, "out": out, "partials": out, "sums": out}  # placeholders
    if plan.scratch_numel:
        if POISON_SCRATCH:
            scratch = torch.full((plan.scratch_numel,), float("nan"), device=plan.device)
        else:
            scratch = torch.empty((plan.scratch_numel,), dtype=torch.float32, device=plan.device)
        buffers["partials"] = scratch
        buffers["sums"] = scratch[plan.sums_offset:] if plan.sums_offset else scratch
    if plan.device.type == "cuda" and plan.device.index != torch.cuda.current_device():
        with torch.cuda.device(plan.device):  # Triton launches on the current device
            _launch_all(plan, buffers)
    else:
        _launch_all(plan, buffers)
    return out


def _launch_all(plan: _Plan, buffers: dict) -> None:
    for launch in plan.launches:
        launch.kernel[launch.grid](
            *[buffers[role] for role in launch.buffers], *launch.scalars, **launch.constants, **launch.options
        )


# Config choice --------------------------------------------------------------------------------

def _table() -> dict:
    global _TABLE
    if _TABLE is None:
        path = cam_configs.table_path()
        if path == cam_configs.TABLE_PATH and not path.exists():
            # An install without the data file still works, on the heuristic configs.
            log.warning("fused_cam: %s is missing; using heuristic tile configs", path)
            _TABLE = {}
        else:
            _TABLE = cam_configs.load_table(path)
    return _TABLE


def _can_autotune(device: torch.device) -> bool:
    return device.type == "cuda"  # tuning times kernels with CUDA events


def _tuning_device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def _measure_config(config: CamConfig, activations, gradients, method, normalize) -> float:
    """Median milliseconds of one call with `config` (compiles it first)."""
    plan = _build_plan(activations, gradients, method, normalize, config)
    out = torch.empty(plan.out_shape, dtype=torch.float32, device=plan.device)
    for _ in range(2):
        _run(plan, activations, gradients, out)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    timings = []
    for _ in range(5):
        start.record()
        for _ in range(10):
            _run(plan, activations, gradients, out)
        end.record()
        end.synchronize()
        timings.append(start.elapsed_time(end) / 10)
    return sorted(timings)[len(timings) // 2]


def _choose_config(problem: Problem, activations, gradients, method, normalize) -> CamConfig:
    """Autotune cache (opt-in), else the table, else the heuristic."""
    key = problem.bucket
    device = activations.device
    if cam_configs.autotune_enabled() and _can_autotune(device):
        path = cam_configs.autotune_cache_path(_tuning_device_name(device), triton.__version__)
        if path not in _AUTOTUNED:
            _AUTOTUNED[path] = cam_configs.read_autotune_cache(path)
        tuned = _AUTOTUNED[path]
        if key not in tuned:
            timings = []
            for config in cam_configs.candidate_configs(problem):
                try:
                    timings.append((_measure_config(config, activations, gradients, method, normalize), config))
                except Exception as error:  # one candidate failing to compile must not stop the call
                    log.warning("fused_cam autotune: %s failed for %s: %r", config, key, error)
            if not timings:
                raise RuntimeError(f"fused_cam autotune: every candidate config failed for {key}")
            milliseconds, best = min(timings, key=lambda pair: pair[0])
            log.info("fused_cam autotune: %s -> %s (%.4f ms), cached in %s", key, best, milliseconds, path)
            cam_configs.write_autotune_result(path, key, best, milliseconds)
            tuned[key] = best
        return tuned[key]
    return _table().get(key) or cam_configs.heuristic_config(problem)


# Public launcher ------------------------------------------------------------------------------

def fused_cam(
    activations: torch.Tensor,
    gradients: torch.Tensor,
    method: str = "gradcam",
    normalize: bool = True,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """CAMs (B, K, H, W) fp32 from activations (B, C, H, W) and gradients (B, K, C, H, W).

    Gradients may also be (B, C, H, W) for K = 1. Any strides (NCHW, channels_last, a
    transposed (K, B, ...) gradient view) are read in place, without a copy; fp32, bf16 and
    fp16 inputs (A and G may differ) accumulate in fp32. `method` is one of
    `gradcam_batch.methods.METHODS`; ReLU always, then per-map min-max when `normalize`.
    `out`, if given, must be a contiguous fp32 (B, K, H, W) tensor and is filled and returned.
    """
    return _fused_cam(activations, gradients, method, normalize, out=out)


def _fused_cam(
    activations: torch.Tensor,
    gradients: torch.Tensor,
    method: str,
    normalize: bool,
    *,
    out: torch.Tensor | None = None,
    config: CamConfig | None = None,
) -> torch.Tensor:
    """fused_cam with the tiling exposed: `config` replaces the table's choice (tests, sweeps)."""
    for name, value in (("activations", activations), ("gradients", gradients)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, one of {', '.join(METHODS)}; got {method!r}")
    if out is not None and not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    # Everything the plan depends on; a hit means these exact inputs were checked before.
    key = (
        activations.shape, activations.stride(), activations.dtype, activations.device,
        gradients.shape, gradients.stride(), gradients.dtype, gradients.device,
        method, bool(normalize), config,
        None if out is None else (out.shape, out.stride(), out.dtype, out.device),
    )
    plan = _PLANS.get(key)
    if plan is None:
        gradients5 = _check_inputs(activations, gradients, method, out)
        plan = _build_plan(activations, gradients5, method, bool(normalize), config)
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    # A (B, C, H, W) gradient passes as is: the plan holds its strides, the kernels its pointer.
    return _run(plan, activations, gradients, out)


def plan_config(activations, gradients, method: str = "gradcam", normalize: bool = True) -> CamConfig | None:
    """The config fused_cam would use for these inputs (None where nothing is launched)."""
    gradients = check_cam_inputs(activations, gradients, method)
    return _build_plan(activations, gradients, method, normalize, None).config


def warmup_specs(activations, gradients, method: str, normalize: bool = True,
                 config: CamConfig | None = None) -> list[tuple[str, tuple, tuple, dict]]:
    """(kernel name, grid, arguments, keyword arguments) of every launch of such a call, with the
    tensors replaced by their dtypes: `getattr(gradcam_batch.kernels.cam_kernels, name).warmup(*arguments,
    grid=grid, **keywords)` compiles it without running it. Inputs may be meta tensors."""
    gradients = check_cam_inputs(activations, gradients, method)
    plan = _build_plan(activations, gradients, method, normalize, config)
    dtypes = {"a": activations.dtype, "g": gradients.dtype}
    specs = []
    for launch in plan.launches:
        arguments = tuple(dtypes.get(role, torch.float32) for role in launch.buffers) + launch.scalars
        specs.append((launch.kernel.__name__, launch.grid, arguments, {**launch.constants, **launch.options}))
    return specs
