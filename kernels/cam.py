"""Fused class-activation maps: channel weights, weighted channel sum, ReLU, min-max, in Triton.

Twin of `gradcam_batch.methods.compute_cam` (same formulas and epsilons). The work is memory
bound, so the channel reduction is spread over many programs instead of one program per map:

1. `_cam_partial_kernel`, grid (B, channel groups, position blocks): a program loads its
   activation tile A[b, BLOCK_C channels, BLOCK_HW positions] once and, for each of the K
   targets, its gradient tile, and stores that channel group's fp32 partial map in `partials`
   (B, K, n_slots, HW), slot = channel group. With the whole map in one tile (HW <= 4096, up to
   64x64) gradcam / gradcampp / xgradcam reduce their channel weights over the tile's positions,
   so A and G are each read once. C_ITERS > 1 lets a program sum several channel blocks before
   storing (fewer partials on big maps, where registers cap BLOCK_C; A is then re-read per target).
2. Split path, weighted methods on maps over 4096 positions: `_cam_weights_kernel`, grid
   (B, cdiv(C, BLOCK_C)), loops over the positions to write fp32 channel weights (B, K, C); the
   partial kernel then tiles the positions and reads those weights instead of G. Pixel-wise
   methods (hirescam, layercam, elementwise) just tile the positions.
3. `_cam_finish_kernel`, grid (B * K,): sums the partial maps in slot order (deterministic, no
   atomics), applies ReLU and, when normalizing, the per-map min-max.

Under TRITON_INTERPRET=1 (set before importing this module) the kernels run on CPU tensors with
one small fixed config; on the GPU BLOCK_C, C_ITERS and num_warps are autotuned per
(C, HW, K, layout, method, dtypes).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from gradcam_batch.methods import GRADCAMPP_EPS, METHODS, NORMALIZE_EPS, XGRADCAM_EPS, check_cam_inputs

# Read once, like triton.jit does when it decorates the kernels below: the two must agree.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The largest position tile: 56x56 = 3136 and 64x64 = 4096 maps take the fused path.
MAX_FUSED_BLOCK_HW = 4096
# Position tile of the split path (maps larger than MAX_FUSED_BLOCK_HW).
SPLIT_BLOCK_HW = 1024
# Channel block used under the interpreter: small enough for several blocks on test sizes.
INTERPRETER_BLOCK_C = 16
_INT32_MAX = 2**31 - 1
# Tests set this: scratch buffers start as NaN, so a slot read before it is written shows.
POISON_SCRATCH = False

METHOD_CODES = {name: code for code, name in enumerate(METHODS)}
_GRADCAM = tl.constexpr(METHOD_CODES["gradcam"])
_GRADCAMPP = tl.constexpr(METHOD_CODES["gradcampp"])
_XGRADCAM = tl.constexpr(METHOD_CODES["xgradcam"])
_HIRESCAM = tl.constexpr(METHOD_CODES["hirescam"])
_LAYERCAM = tl.constexpr(METHOD_CODES["layercam"])
_WEIGHTED_METHODS = ("gradcam", "gradcampp", "xgradcam")
_GRADCAMPP_EPS = tl.constexpr(GRADCAMPP_EPS)
_XGRADCAM_EPS = tl.constexpr(XGRADCAM_EPS)
_NORMALIZE_EPS = tl.constexpr(NORMALIZE_EPS)


@triton.jit
def _gradcampp_terms(g, sum_a):
    """relu(G) * alpha per element; g: (BLOCK_C, BLOCK_HW) fp32, sum_a: (BLOCK_C,) fp32."""
    g2 = g * g
    denominator = 2.0 * g2 + sum_a[:, None] * (g2 * g) + _GRADCAMPP_EPS
    # relu(G) * alpha is zero wherever G <= 0 (alpha = 0 at G == 0, relu = 0 below); selecting
    # before dividing also keeps a zero denominator at G < 0 from turning 0 * inf into NaN.
    positive = g > 0.0
    return tl.where(positive, g * g2 / tl.where(positive, denominator, 1.0), 0.0)


@triton.jit
def _spatial_offsets(positions, W, stride_h, stride_w, FLAT_HW: tl.constexpr):
    """Element offsets of flat positions h * W + w; int32, the launcher checks they fit."""
    if FLAT_HW:
        # (H, W) collapse to one stride (NCHW, NHWC): contiguity stays visible to the compiler.
        return positions * stride_w
    else:
        return (positions // W) * stride_h + (positions % W) * stride_w


@triton.jit
def _load_tile(base_ptr, channels, positions, mask, W, stride_c, stride_h, stride_w, FLAT_HW: tl.constexpr):
    """(BLOCK_C, BLOCK_HW) tile of one image, zeros outside `mask`, upcast to fp32."""
    offsets = channels[:, None] * stride_c + _spatial_offsets(positions, W, stride_h, stride_w, FLAT_HW)[None, :]
    # fp32 upcast: every product and sum of the CAM accumulates in fp32 whatever the storage dtype.
    return tl.load(base_ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _block_map(
    a,  # (BLOCK_C, BLOCK_HW) fp32 activation tile, zeros outside the mask
    sum_a,  # (BLOCK_C,) fp32 sum of A over all positions (gradcampp, xgradcam)
    g_target_ptr,  # this image's and target's gradients (pointer to G[b, k, 0, 0, 0])
    weight_target_ptr,  # (C,) fp32 weights of this image and target (WEIGHTS_FROM_BUFFER)
    channels, positions, mask,  # (BLOCK_C,), (BLOCK_HW,), (BLOCK_C, BLOCK_HW) of this tile
    C, W, HW, stride_gc, stride_gh, stride_gw,
    METHOD: tl.constexpr, WEIGHTS_FROM_BUFFER: tl.constexpr, G_FLAT_HW: tl.constexpr,
):
    """This channel block's contribution (BLOCK_HW,) fp32 to one target's map."""
    if WEIGHTS_FROM_BUFFER:
        weights = tl.load(weight_target_ptr + channels, mask=channels < C, other=0.0)
        contribution = weights[:, None] * a
    else:
        g = _load_tile(g_target_ptr, channels, positions, mask, W, stride_gc, stride_gh, stride_gw, G_FLAT_HW)
        if METHOD == _GRADCAM:
            weights = tl.sum(g, axis=1) / HW
            contribution = weights[:, None] * a
        elif METHOD == _GRADCAMPP:
            weights = tl.sum(_gradcampp_terms(g, sum_a), axis=1)
            contribution = weights[:, None] * a
        elif METHOD == _XGRADCAM:
            weights = tl.sum(g * a, axis=1) / (sum_a + _XGRADCAM_EPS)
            contribution = weights[:, None] * a
        elif METHOD == _HIRESCAM:
            contribution = g * a
        elif METHOD == _LAYERCAM:
            contribution = tl.maximum(g, 0.0) * a
        else:  # elementwise
            contribution = tl.maximum(g * a, 0.0)
    return tl.sum(contribution, axis=0)


@triton.jit
def _cam_partial_kernel(
    a_ptr,  # (B, C, H, W) activations, any strides; fp32 / bf16 / fp16
    g_ptr,  # (B, K, C, H, W) gradients, any strides; fp32 / bf16 / fp16
    weight_ptr,  # (B, K, C) fp32 contiguous channel weights; read only if WEIGHTS_FROM_BUFFER
    partial_ptr,  # (B, K, n_slots, HW) fp32 contiguous; slot = channel group of this program
    C, W, HW, K, n_slots,  # sizes (HW = H * W) and the slot count of partial_ptr
    stride_ab, stride_ac, stride_ah, stride_aw,  # A strides in elements; see _spatial_offsets
    stride_gb, stride_gk, stride_gc, stride_gh, stride_gw,  # G strides in elements
    METHOD: tl.constexpr, WEIGHTS_FROM_BUFFER: tl.constexpr,
    A_FLAT_HW: tl.constexpr, G_FLAT_HW: tl.constexpr,
    BLOCK_C: tl.constexpr, C_ITERS: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """One program: channels [group * C_ITERS * BLOCK_C, +C_ITERS * BLOCK_C) x one position block.

    C_ITERS == 1: the A tile is loaded once and reused for all K targets.
    C_ITERS > 1: fewer, larger partial sums (less partial traffic on big maps, where registers
    cap BLOCK_C); the targets loop outside the channel blocks, so for K > 1 the A tiles are read
    again per target, mostly from cache.
    """
    batch = tl.program_id(0).to(tl.int64)  # int64: batch * stride_ab can pass 2^31
    group = tl.program_id(1)
    positions = tl.program_id(2) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    position_mask = positions < HW
    a_image_ptr = a_ptr + batch * stride_ab
    # Scalar base pointers advance by one target per iteration (64-bit pointer arithmetic).
    g_target_ptr = g_ptr + batch * stride_gb
    weight_target_ptr = weight_ptr + batch * K * C
    partial_target_ptr = partial_ptr + (batch * K * n_slots + group) * HW
    if C_ITERS == 1:
        channels = group * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (channels < C)[:, None] & position_mask[None, :]
        a = _load_tile(a_image_ptr, channels, positions, mask, W, stride_ac, stride_ah, stride_aw, A_FLAT_HW)
        # Only read by gradcampp / xgradcam, whose fused path has the whole map in this tile.
        sum_a = tl.sum(a, axis=1)
        for _k in range(K):
            cam = _block_map(
                a, sum_a, g_target_ptr, weight_target_ptr, channels, positions, mask, C, W, HW,
                stride_gc, stride_gh, stride_gw, METHOD, WEIGHTS_FROM_BUFFER, G_FLAT_HW,
            )
            tl.store(partial_target_ptr + positions, cam, mask=position_mask)
            g_target_ptr += stride_gk
            weight_target_ptr += C
            partial_target_ptr += n_slots * HW
    else:
        for _k in range(K):
            cam = tl.zeros([BLOCK_HW], dtype=tl.float32)
            for block in range(C_ITERS):
                channels = (group * C_ITERS + block) * BLOCK_C + tl.arange(0, BLOCK_C)
                mask = (channels < C)[:, None] & position_mask[None, :]
                a = _load_tile(
                    a_image_ptr, channels, positions, mask, W, stride_ac, stride_ah, stride_aw, A_FLAT_HW
                )
                sum_a = tl.sum(a, axis=1)
                cam += _block_map(
                    a, sum_a, g_target_ptr, weight_target_ptr, channels, positions, mask, C, W, HW,
                    stride_gc, stride_gh, stride_gw, METHOD, WEIGHTS_FROM_BUFFER, G_FLAT_HW,
                )
            tl.store(partial_target_ptr + positions, cam, mask=position_mask)
            g_target_ptr += stride_gk
            weight_target_ptr += C
            partial_target_ptr += n_slots * HW


@triton.jit
def _cam_weights_kernel(  # split path: fp32 channel weights of the weighted methods
    a_ptr,  # (B, C, H, W) activations, any strides; fp32 / bf16 / fp16
    g_ptr,  # (B, K, C, H, W) gradients, any strides; fp32 / bf16 / fp16
    weight_ptr,  # (B, K, C) fp32 contiguous; written
    C, W, HW, K,  # sizes (HW = H * W)
    stride_ab, stride_ac, stride_ah, stride_aw,  # A strides in elements; see _spatial_offsets
    stride_gb, stride_gk, stride_gc, stride_gh, stride_gw,  # G strides in elements
    METHOD: tl.constexpr, A_FLAT_HW: tl.constexpr, G_FLAT_HW: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)  # int64: batch * stride_ab can pass 2^31
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    a_image_ptr = a_ptr + batch * stride_ab
    if METHOD != _GRADCAM:
        sum_a = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, HW, BLOCK_HW):
            positions = start + tl.arange(0, BLOCK_HW)
            mask = channel_mask[:, None] & (positions < HW)[None, :]
            a = _load_tile(a_image_ptr, channels, positions, mask, W, stride_ac, stride_ah, stride_aw, A_FLAT_HW)
            sum_a += tl.sum(a, axis=1)

    g_target_ptr = g_ptr + batch * stride_gb
    weight_target_ptr = weight_ptr + batch * K * C
    for _k in range(K):
        accumulated = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, HW, BLOCK_HW):
            positions = start + tl.arange(0, BLOCK_HW)
            mask = channel_mask[:, None] & (positions < HW)[None, :]
            g = _load_tile(g_target_ptr, channels, positions, mask, W, stride_gc, stride_gh, stride_gw, G_FLAT_HW)
            if METHOD == _GRADCAM:
                accumulated += tl.sum(g, axis=1)
            elif METHOD == _GRADCAMPP:
                accumulated += tl.sum(_gradcampp_terms(g, sum_a), axis=1)
            else:  # xgradcam needs A again; this path is for maps too large to keep in a tile
                a = _load_tile(
                    a_image_ptr, channels, positions, mask, W, stride_ac, stride_ah, stride_aw, A_FLAT_HW
                )
                accumulated += tl.sum(g * a, axis=1)
        if METHOD == _GRADCAM:
            weights = accumulated / HW
        elif METHOD == _GRADCAMPP:
            weights = accumulated
        else:
            weights = accumulated / (sum_a + _XGRADCAM_EPS)
        tl.store(weight_target_ptr + channels, weights, mask=channel_mask)
        g_target_ptr += stride_gk
        weight_target_ptr += C


@triton.jit
def _sum_partials(partial_map_ptr, positions, mask, HW, n_used):
    """Sum of the n_used partial maps at `positions`, in slot order (deterministic)."""
    total = tl.load(partial_map_ptr + positions, mask=mask, other=0.0)
    for slot in range(1, n_used):
        total += tl.load(partial_map_ptr + slot * HW + positions, mask=mask, other=0.0)
    return total


@triton.jit
def _cam_finish_kernel(
    partial_ptr,  # (B * K, n_slots, HW) fp32 contiguous; slots [0, n_used) hold partial maps
    out_ptr,  # (B * K, HW) fp32 contiguous; written
    HW, n_slots, n_used,
    NORMALIZE: tl.constexpr, SINGLE_BLOCK: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    map_index = tl.program_id(0).to(tl.int64)  # int64: map_index * n_slots * HW can pass 2^31
    partial_map_ptr = partial_ptr + map_index * n_slots * HW
    out_map_ptr = out_ptr + map_index * HW
    if SINGLE_BLOCK:
        positions = tl.arange(0, BLOCK_HW)
        mask = positions < HW
        cam = tl.maximum(_sum_partials(partial_map_ptr, positions, mask, HW, n_used), 0.0)
        if NORMALIZE:
            low = tl.min(tl.where(mask, cam, float("inf")), axis=0)
            high = tl.max(tl.where(mask, cam, float("-inf")), axis=0)
            cam = (cam - low) / (high - low + _NORMALIZE_EPS)
        tl.store(out_map_ptr + positions, cam, mask=mask)
    elif NORMALIZE:
        # Two passes over the partials: min/max first, then the normalized map. Re-reading the
        # partials (not `out`) keeps every value in the thread that computed it.
        lows = tl.full([BLOCK_HW], float("inf"), dtype=tl.float32)
        highs = tl.full([BLOCK_HW], float("-inf"), dtype=tl.float32)
        for start in range(0, HW, BLOCK_HW):
            positions = start + tl.arange(0, BLOCK_HW)
            mask = positions < HW
            cam = tl.maximum(_sum_partials(partial_map_ptr, positions, mask, HW, n_used), 0.0)
            lows = tl.where(mask, tl.minimum(lows, cam), lows)
            highs = tl.where(mask, tl.maximum(highs, cam), highs)
        low = tl.min(lows, axis=0)
        high = tl.max(highs, axis=0)
        for start in range(0, HW, BLOCK_HW):
            positions = start + tl.arange(0, BLOCK_HW)
            mask = positions < HW
            cam = tl.maximum(_sum_partials(partial_map_ptr, positions, mask, HW, n_used), 0.0)
            tl.store(out_map_ptr + positions, (cam - low) / (high - low + _NORMALIZE_EPS), mask=mask)
    else:
        for start in range(0, HW, BLOCK_HW):
            positions = start + tl.arange(0, BLOCK_HW)
            mask = positions < HW
            cam = tl.maximum(_sum_partials(partial_map_ptr, positions, mask, HW, n_used), 0.0)
            tl.store(out_map_ptr + positions, cam, mask=mask)


# Tuning ---------------------------------------------------------------------------------------
_PARTIAL_KEY = ["C", "HW", "K", "stride_ac", "stride_gc", "METHOD", "WEIGHTS_FROM_BUFFER"]
_WEIGHTS_KEY = ["C", "HW", "K", "stride_ac", "stride_gc", "METHOD"]
_TUNERS: dict = {}
# Partial-kernel config per tuning key, once tuned: later calls launch it directly and size the
# partial buffer for it (the first call sizes it for the smallest channel group of any candidate).
_CHOSEN_CONFIGS: dict = {}


def _partial_configs(block_hw: int, channel_cap: int) -> list:
    """Candidates whose tiles fit in registers: checked with ptxas for sm_90 (no spills up to
    4096 fp32 elements at 4 warps, 8192 at 8, 16384 at 16 warps on maps of 32x32 and more).
    Each channel block comes with one block per program and with about 64 channels per program.
    """
    largest_tile = 16384 if block_hw >= 1024 else 8192
    fitting = [c for c in (2, 4, 8, 16, 32, 64, 128, 256) if c * block_hw <= largest_tile and c <= channel_cap]
    configs = []
    for block_c in (fitting or [2])[-2:]:
        tile = block_c * block_hw
        warps = (4, 8) if tile <= 4096 else (8,) if tile <= 8192 else (16,)
        for c_iters in sorted({1, max(1, min(64, channel_cap) // block_c)}):
            configs += [triton.Config({"BLOCK_C": block_c, "C_ITERS": c_iters}, num_warps=w) for w in warps]
    return configs


def _weights_configs(channel_cap: int) -> list:
    blocks = [c for c in (4, 8, 16) if c <= max(channel_cap, 4)]
    return [triton.Config({"BLOCK_C": c}, num_warps=w) for c in blocks for w in (4, 8)]


def _tuner(name: str, kernel, configs: list, key: list, cache_key: tuple):
    """One autotuner per (kernel, BLOCK_HW, channel cap): their config lists differ."""
    full_key = (name,) + cache_key
    if full_key not in _TUNERS:
        _TUNERS[full_key] = triton.autotune(configs=configs, key=key)(kernel)
    return _TUNERS[full_key]


# Launcher -------------------------------------------------------------------------------------

def _position_block(positions: int, max_fused_block_hw: int, split_block_hw: int) -> tuple[int, bool]:
    """(BLOCK_HW, split): the whole map in one tile when it fits, else split_block_hw tiles."""
    full_block_hw = triton.next_power_of_2(positions)
    if full_block_hw > max_fused_block_hw:
        return split_block_hw, True
    return full_block_hw, False


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
    for name, value in (("activations", activations), ("gradients", gradients)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, one of {', '.join(METHODS)}; got {method!r}")
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
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
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
    config: triton.Config | None = None,
    max_fused_block_hw: int = MAX_FUSED_BLOCK_HW,
    split_block_hw: int = SPLIT_BLOCK_HW,
) -> torch.Tensor:
    """fused_cam with the tile choices exposed, so tests can force the split path on small maps.

    `config` ({"BLOCK_C", "C_ITERS"}, num_warps) fixes the partial kernel's tiling instead of
    autotuning it; under the interpreter it defaults to INTERPRETER_BLOCK_C channels.
    """
    gradients = _check_inputs(activations, gradients, method, out)
    batch, targets, channels, height, width = gradients.shape
    positions = height * width
    device = activations.device
    if out is None:
        out = torch.empty((batch, targets, height, width), dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out
    if channels == 0:  # an empty channel sum is a zero map, and a zero map normalizes to zeros
        return out.zero_()
    if config is None and INTERPRETED and INTERPRETER_BLOCK_C:
        config = triton.Config({"BLOCK_C": INTERPRETER_BLOCK_C, "C_ITERS": 1})
    fixed = config is not None

    block_hw, split = _position_block(positions, max_fused_block_hw, split_block_hw)
    weights_from_buffer = split and method in _WEIGHTED_METHODS
    channel_cap = min(triton.next_power_of_2(channels), 256)

    a_flat = _flat_spatial_stride(activations, 2, 3)
    g_flat = _flat_spatial_stride(gradients, 3, 4)
    a_strides = activations.stride()[:3] + (activations.stride(3) if a_flat is None else a_flat,)
    g_strides = gradients.stride()[:4] + (gradients.stride(4) if g_flat is None else g_flat,)
    common = dict(METHOD=METHOD_CODES[method], A_FLAT_HW=a_flat is not None, G_FLAT_HW=g_flat is not None)
    shape_args = (channels, width, positions, targets)

    if not fixed:
        tune_key = (block_hw, channel_cap, channels, positions, targets, a_strides[1], g_strides[2],
                    method, weights_from_buffer, activations.dtype, gradients.dtype)
        config = _CHOSEN_CONFIGS.get(tune_key)
    # Before the first tuning of a key, slots for the smallest channel group of any candidate;
    # afterwards exactly the chosen config's.
    candidates = [config] if config is not None else _partial_configs(block_hw, channel_cap)
    n_slots = triton.cdiv(channels, min(c.kwargs["BLOCK_C"] * c.kwargs["C_ITERS"] for c in candidates))
    scratch = functools.partial(torch.full, fill_value=float("nan")) if POISON_SCRATCH else torch.empty
    partials = scratch((batch, targets, n_slots, positions), dtype=torch.float32, device=device)
    weights = partials  # placeholder pointer, never read unless weights_from_buffer
    n_position_blocks = triton.cdiv(positions, block_hw)

    def weights_grid(meta):
        return (batch, triton.cdiv(channels, meta["BLOCK_C"]))

    def partial_grid(meta):
        return (batch, triton.cdiv(channels, meta["BLOCK_C"] * meta["C_ITERS"]), n_position_blocks)

    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if weights_from_buffer:
            weights = scratch((batch, targets, channels), dtype=torch.float32, device=device)
            args = (activations, gradients, weights) + shape_args + a_strides + g_strides
            if fixed and INTERPRETED:  # no CUDA timer to tune with
                kernel, tile = _cam_weights_kernel, {"BLOCK_C": config.kwargs["BLOCK_C"]}
            else:
                kernel, tile = _tuner("weights", _cam_weights_kernel, _weights_configs(channel_cap),
                                      _WEIGHTS_KEY, (block_hw, channel_cap)), {}
            kernel[weights_grid](*args, **common, **tile, BLOCK_HW=block_hw)

        args = (activations, gradients, weights, partials) + shape_args + (n_slots,) + a_strides + g_strides
        common.update(WEIGHTS_FROM_BUFFER=weights_from_buffer, BLOCK_HW=block_hw)
        if config is None:
            tuner = _tuner("partial", _cam_partial_kernel, candidates, _PARTIAL_KEY, (block_hw, channel_cap))
            tuner[partial_grid](*args, **common)
            config = _CHOSEN_CONFIGS[tune_key] = tuner.best_config
        else:
            launch = {} if INTERPRETED else {"num_warps": config.num_warps, "num_stages": config.num_stages}
            _cam_partial_kernel[partial_grid](*args, **common, **config.kwargs, **launch)
        n_used = triton.cdiv(channels, config.kwargs["BLOCK_C"] * config.kwargs["C_ITERS"])

        finish_block_hw = min(triton.next_power_of_2(positions), max(max_fused_block_hw, split_block_hw))
        finish_kwargs = {} if INTERPRETED else {"num_warps": 4 if finish_block_hw <= 1024 else 8}
        _cam_finish_kernel[(batch * targets,)](
            partials, out, positions, n_slots, n_used,
            NORMALIZE=bool(normalize), SINGLE_BLOCK=finish_block_hw >= positions,
            BLOCK_HW=finish_block_hw, **finish_kwargs,
        )
    return out
