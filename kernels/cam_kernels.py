"""The Triton kernels behind `gradcam_batch.kernels.cam.fused_cam`; twin of `gradcam_batch.methods.compute_cam`.

The work is memory bound: every byte of A and G should be read once, in pieces of at least
64-128 contiguous bytes, by enough programs to keep the memory system busy. Three kernels:

`_cam_map_kernel`, grid (B, channel groups, position blocks): a program owns C_ITERS blocks of
    BLOCK_C channels at BLOCK_HW positions and writes, per target, that group's fp32 map sum.
    With the whole map in the tile, gradcam / gradcampp / xgradcam reduce their channel weights
    from the tile itself (WEIGHTS_FROM_SUMS = False, A and G each read once); with position
    tiles they read channel sums written by `_cam_channel_sums_kernel`. Pixel-wise methods
    (hirescam, layercam, elementwise) need no weights at all. When one group holds every channel
    (DIRECT_OUT) the program applies ReLU (and, owning the whole map, the min-max) itself and
    writes the final maps; otherwise it writes one partial map per channel group (slot).
`_cam_channel_sums_kernel`, grid (B, channel blocks, position splits): per-channel sums over
    one span of positions, the inputs of the channel weights of position-tiled maps: sum of G
    (gradcam), sum of G * A and of A (xgradcam), sum of A, then of relu(G) * alpha (gradcampp,
    two launches because alpha needs the sum of A over the whole map).
`_cam_finish_kernel`, grid (B * K,): sums the partial maps in a fixed order (deterministic, no
    atomics), applies ReLU and, when normalizing, the per-map min-max.

Offsets inside one image use int32 (the launcher checks the extent); the batch and map indices
are int64 because batch * stride can pass 2^31.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from gradcam_batch.methods import GRADCAMPP_EPS, METHODS, NORMALIZE_EPS, XGRADCAM_EPS

# Read once, like triton.jit does when it decorates the kernels below: the two must agree.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

METHOD_CODES = {name: code for code, name in enumerate(METHODS)}
_GRADCAM = tl.constexpr(METHOD_CODES["gradcam"])
_GRADCAMPP = tl.constexpr(METHOD_CODES["gradcampp"])
_XGRADCAM = tl.constexpr(METHOD_CODES["xgradcam"])
_HIRESCAM = tl.constexpr(METHOD_CODES["hirescam"])
_LAYERCAM = tl.constexpr(METHOD_CODES["layercam"])
_GRADCAMPP_EPS = tl.constexpr(GRADCAMPP_EPS)
_XGRADCAM_EPS = tl.constexpr(XGRADCAM_EPS)
_NORMALIZE_EPS = tl.constexpr(NORMALIZE_EPS)

# Phases of _cam_channel_sums_kernel.
SUMS_OF_A = 0  # gradcampp's first launch: only the sum of A
SUMS_OF_TARGETS = 1  # the per-target sums (and, for xgradcam, the sum of A as well)
_SUMS_OF_A = tl.constexpr(SUMS_OF_A)
_SUMS_OF_TARGETS = tl.constexpr(SUMS_OF_TARGETS)


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
def _sum_over_splits(sums_row_ptr, channels, channel_mask, C, n_splits):
    """(BLOCK_C,) fp32 total of one (image, row) of the channel sums over its position splits."""
    total = tl.load(sums_row_ptr + channels, mask=channel_mask, other=0.0)
    for split in range(1, n_splits):
        total += tl.load(sums_row_ptr + split * C + channels, mask=channel_mask, other=0.0)
    return total


@triton.jit
def _block_map(
    a,  # (BLOCK_C, BLOCK_HW) fp32 activation tile, zeros outside the mask
    sum_a,  # (BLOCK_C,) fp32 sum of A over all positions (gradcampp, xgradcam)
    g_target_ptr,  # this image's and target's gradients (pointer to G[b, k, 0, 0, 0])
    sums_target_ptr,  # (n_splits, C) fp32 channel sums of this image and target (WEIGHTS_FROM_SUMS)
    channels, positions, mask,  # (BLOCK_C,), (BLOCK_HW,), (BLOCK_C, BLOCK_HW) of this tile
    C, W, HW, n_splits, stride_gc, stride_gh, stride_gw,
    METHOD: tl.constexpr, WEIGHTS_FROM_SUMS: tl.constexpr, G_FLAT_HW: tl.constexpr,
):
    """This channel block's contribution (BLOCK_HW,) fp32 to one target's map."""
    if WEIGHTS_FROM_SUMS:
        sums = _sum_over_splits(sums_target_ptr, channels, channels < C, C, n_splits)
        if METHOD == _GRADCAM:
            weights = sums / HW
        elif METHOD == _GRADCAMPP:
            weights = sums
        else:  # xgradcam
            weights = sums / (sum_a + _XGRADCAM_EPS)
        contribution = weights[:, None] * a
    else:
        g = _load_tile(g_target_ptr, channels, positions, mask, W, stride_gc, stride_gh, stride_gw, G_FLAT_HW)
        if METHOD == _GRADCAM:
            contribution = (tl.sum(g, axis=1) / HW)[:, None] * a
        elif METHOD == _GRADCAMPP:
            contribution = tl.sum(_gradcampp_terms(g, sum_a), axis=1)[:, None] * a
        elif METHOD == _XGRADCAM:
            contribution = (tl.sum(g * a, axis=1) / (sum_a + _XGRADCAM_EPS))[:, None] * a
        elif METHOD == _HIRESCAM:
            contribution = g * a
        elif METHOD == _LAYERCAM:
            contribution = tl.maximum(g, 0.0) * a
        else:  # elementwise
            contribution = tl.maximum(g * a, 0.0)
    return tl.sum(contribution, axis=0)


@triton.jit
def _store_maps(cam, out_target_ptr, positions, position_mask, DIRECT_OUT: tl.constexpr, NORMALIZE: tl.constexpr):
    """Store one target's map sum: as a partial map, or final (ReLU, min-max) when DIRECT_OUT."""
    if DIRECT_OUT:
        cam = tl.maximum(cam, 0.0)
        if NORMALIZE:  # the launcher only sets both when this tile holds the whole map
            low = tl.min(tl.where(position_mask, cam, float("inf")), axis=0)
            high = tl.max(tl.where(position_mask, cam, float("-inf")), axis=0)
            cam = (cam - low) / (high - low + _NORMALIZE_EPS)
    tl.store(out_target_ptr + positions, cam, mask=position_mask)


@triton.jit
def _cam_map_kernel(
    a_ptr,  # (B, C, H, W) activations, any strides; fp32 / bf16 / fp16
    g_ptr,  # (B, K, C, H, W) gradients, any strides; fp32 / bf16 / fp16; unread if WEIGHTS_FROM_SUMS
    sums_ptr,  # (B, K + 1, n_splits, C) fp32 contiguous channel sums; read only if WEIGHTS_FROM_SUMS
    out_ptr,  # (B, K, n_slots, HW) fp32 contiguous partial maps, or (B, K, HW) maps if DIRECT_OUT
    C, W, HW, K, n_slots, n_splits,  # sizes (HW = H * W), partial slots, position splits of sums_ptr
    stride_ab, stride_ac, stride_ah, stride_aw,  # A strides in elements; see _spatial_offsets
    stride_gb, stride_gk, stride_gc, stride_gh, stride_gw,  # G strides in elements
    METHOD: tl.constexpr, WEIGHTS_FROM_SUMS: tl.constexpr,
    A_FLAT_HW: tl.constexpr, G_FLAT_HW: tl.constexpr,
    BLOCK_C: tl.constexpr, C_ITERS: tl.constexpr, BLOCK_HW: tl.constexpr,
    DIRECT_OUT: tl.constexpr, NORMALIZE: tl.constexpr,
):
    """One program: channels [group * C_ITERS * BLOCK_C, +C_ITERS * BLOCK_C) x one position block.

    C_ITERS == 1: the A tile is loaded once and reused for all K targets.
    C_ITERS > 1: fewer partial maps (less partial traffic, a smaller finishing pass); the targets
    loop outside the channel blocks, so for K > 1 the A tiles are read again per target, from
    cache (a program's tiles are a few tens of kB).
    """
    batch = tl.program_id(0).to(tl.int64)  # int64: batch * stride_ab can pass 2^31
    group = tl.program_id(1)
    positions = tl.program_id(2) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    position_mask = positions < HW
    a_image_ptr = a_ptr + batch * stride_ab
    sums_image_ptr = sums_ptr + batch * (K + 1) * n_splits * C
    # Scalar base pointers advance by one target per iteration (64-bit pointer arithmetic).
    g_target_ptr = g_ptr + batch * stride_gb
    sums_target_ptr = sums_image_ptr
    if DIRECT_OUT:
        out_target_ptr = out_ptr + batch * K * HW
        out_step = HW
    else:
        out_target_ptr = out_ptr + (batch * K * n_slots + group) * HW
        out_step = n_slots * HW
    if C_ITERS == 1:
        channels = group * BLOCK_C + tl.arange(0, BLOCK_C)
        channel_mask = channels < C
        mask = channel_mask[:, None] & position_mask[None, :]
        a = _load_tile(a_image_ptr, channels, positions, mask, W, stride_ac, stride_ah, stride_aw, A_FLAT_HW)
        if WEIGHTS_FROM_SUMS and METHOD == _XGRADCAM:
            sum_a = _sum_over_splits(sums_image_ptr + K * n_splits * C, channels, channel_mask, C, n_splits)
        else:  # read only by gradcampp / xgradcam, whose tile then holds the whole map
            sum_a = tl.sum(a, axis=1)
        for _k in range(K):
            cam = _block_map(
                a, sum_a, g_target_ptr, sums_target_ptr, channels, positions, mask, C, W, HW, n_splits,
                stride_gc, stride_gh, stride_gw, METHOD, WEIGHTS_FROM_SUMS, G_FLAT_HW,
            )
            _store_maps(cam, out_target_ptr, positions, position_mask, DIRECT_OUT, NORMALIZE)
            g_target_ptr += stride_gk
            sums_target_ptr += n_splits * C
            out_target_ptr += out_step
    else:
        for _k in range(K):
            cam = tl.zeros([BLOCK_HW], dtype=tl.float32)
            for block in range(C_ITERS):
                channels = (group * C_ITERS + block) * BLOCK_C + tl.arange(0, BLOCK_C)
                channel_mask = channels < C
                mask = channel_mask[:, None] & position_mask[None, :]
                a = _load_tile(
                    a_image_ptr, channels, positions, mask, W, stride_ac, stride_ah, stride_aw, A_FLAT_HW
                )
                if WEIGHTS_FROM_SUMS and METHOD == _XGRADCAM:
                    sum_a = _sum_over_splits(sums_image_ptr + K * n_splits * C, channels, channel_mask, C, n_splits)
                else:
                    sum_a = tl.sum(a, axis=1)
                cam += _block_map(
                    a, sum_a, g_target_ptr, sums_target_ptr, channels, positions, mask, C, W, HW, n_splits,
                    stride_gc, stride_gh, stride_gw, METHOD, WEIGHTS_FROM_SUMS, G_FLAT_HW,
                )
            _store_maps(cam, out_target_ptr, positions, position_mask, DIRECT_OUT, NORMALIZE)
            g_target_ptr += stride_gk
            sums_target_ptr += n_splits * C
            out_target_ptr += out_step


@triton.jit
def _cam_channel_sums_kernel(
    a_ptr,  # (B, C, H, W) activations, any strides; fp32 / bf16 / fp16
    g_ptr,  # (B, K, C, H, W) gradients, any strides; fp32 / bf16 / fp16
    sums_ptr,  # (B, K + 1, n_splits, C) fp32 contiguous; rows k < K per target, row K the sum of A
    C, W, HW, K, n_splits,  # sizes (HW = H * W); n_splits = cdiv(HW, SPLIT_ITERS * BLOCK_HW)
    stride_ab, stride_ac, stride_ah, stride_aw,  # A strides in elements; see _spatial_offsets
    stride_gb, stride_gk, stride_gc, stride_gh, stride_gw,  # G strides in elements
    METHOD: tl.constexpr, PHASE: tl.constexpr, A_FLAT_HW: tl.constexpr, G_FLAT_HW: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, SPLIT_ITERS: tl.constexpr,
):
    """Sums over the SPLIT_ITERS * BLOCK_HW positions of one split, for BLOCK_C channels.

    PHASE _SUMS_OF_A writes row K only (gradcampp's first launch). PHASE _SUMS_OF_TARGETS
    writes rows k < K, and row K too for xgradcam; gradcampp then reads the completed row K.
    The split's position blocks are unrolled so their loads are in flight together.
    """
    batch = tl.program_id(0).to(tl.int64)  # int64: batch * stride_ab can pass 2^31
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    split = tl.program_id(2)
    first = split * (SPLIT_ITERS * BLOCK_HW)
    a_image_ptr = a_ptr + batch * stride_ab
    sums_image_ptr = sums_ptr + batch * (K + 1) * n_splits * C
    sum_a_row_ptr = sums_image_ptr + K * n_splits * C

    if PHASE == _SUMS_OF_A or METHOD == _XGRADCAM:
        partial_sum_a = tl.zeros([BLOCK_C], dtype=tl.float32)
        for block in tl.static_range(SPLIT_ITERS):
            positions = first + block * BLOCK_HW + tl.arange(0, BLOCK_HW)
            mask = channel_mask[:, None] & (positions < HW)[None, :]
            a = _load_tile(a_image_ptr, channels, positions, mask, W, stride_ac, stride_ah, stride_aw, A_FLAT_HW)
            partial_sum_a += tl.sum(a, axis=1)
        tl.store(sum_a_row_ptr + split * C + channels, partial_sum_a, mask=channel_mask)

    if PHASE == _SUMS_OF_TARGETS:
        if METHOD == _GRADCAMPP:
            sum_a = _sum_over_splits(sum_a_row_ptr, channels, channel_mask, C, n_splits)
        else:
            sum_a = tl.zeros([BLOCK_C], dtype=tl.float32)  # unused
        g_target_ptr = g_ptr + batch * stride_gb
        sums_target_ptr = sums_image_ptr + split * C
        for _k in range(K):
            accumulated = tl.zeros([BLOCK_C], dtype=tl.float32)
            for block in tl.static_range(SPLIT_ITERS):
                positions = first + block * BLOCK_HW + tl.arange(0, BLOCK_HW)
                mask = channel_mask[:, None] & (positions < HW)[None, :]
                g = _load_tile(g_target_ptr, channels, positions, mask, W, stride_gc, stride_gh, stride_gw, G_FLAT_HW)
                if METHOD == _GRADCAM:
                    accumulated += tl.sum(g, axis=1)
                elif METHOD == _GRADCAMPP:
                    accumulated += tl.sum(_gradcampp_terms(g, sum_a), axis=1)
                else:  # xgradcam: this span of A was just read, so it comes from cache
                    a = _load_tile(
                        a_image_ptr, channels, positions, mask, W, stride_ac, stride_ah, stride_aw, A_FLAT_HW
                    )
                    accumulated += tl.sum(g * a, axis=1)
            tl.store(sums_target_ptr + channels, accumulated, mask=channel_mask)
            g_target_ptr += stride_gk
            sums_target_ptr += n_splits * C


@triton.jit
def _sum_partials(partial_map_ptr, positions, mask, HW, n_slots, SLOTS_BLOCK: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Sum of the n_slots partial maps at `positions`, SLOTS_BLOCK slots per load so the loads
    are in flight together; always the same order (deterministic)."""
    slots = tl.arange(0, SLOTS_BLOCK)
    total = tl.zeros([BLOCK_HW], dtype=tl.float32)
    for first_slot in range(0, n_slots, SLOTS_BLOCK):
        slot = first_slot + slots
        tile_mask = (slot < n_slots)[:, None] & mask[None, :]
        tile = tl.load(partial_map_ptr + slot[:, None] * HW + positions[None, :], mask=tile_mask, other=0.0)
        total += tl.sum(tile, axis=0)
    return total


@triton.jit
def _cam_finish_kernel(
    partial_ptr,  # (B * K, n_slots, HW) fp32 contiguous partial maps
    out_ptr,  # (B * K, HW) fp32 contiguous; written
    HW, n_slots,
    NORMALIZE: tl.constexpr, SINGLE_BLOCK: tl.constexpr, SLOTS_BLOCK: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    map_index = tl.program_id(0).to(tl.int64)  # int64: map_index * n_slots * HW can pass 2^31
    partial_map_ptr = partial_ptr + map_index * n_slots * HW
    out_map_ptr = out_ptr + map_index * HW
    if SINGLE_BLOCK:  # BLOCK_HW >= HW
        positions = tl.arange(0, BLOCK_HW)
        mask = positions < HW
        cam = tl.maximum(_sum_partials(partial_map_ptr, positions, mask, HW, n_slots, SLOTS_BLOCK, BLOCK_HW), 0.0)
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
            cam = tl.maximum(_sum_partials(partial_map_ptr, positions, mask, HW, n_slots, SLOTS_BLOCK, BLOCK_HW), 0.0)
            lows = tl.where(mask, tl.minimum(lows, cam), lows)
            highs = tl.where(mask, tl.maximum(highs, cam), highs)
        low = tl.min(lows, axis=0)
        high = tl.max(highs, axis=0)
        for start in range(0, HW, BLOCK_HW):
            positions = start + tl.arange(0, BLOCK_HW)
            mask = positions < HW
            cam = tl.maximum(_sum_partials(partial_map_ptr, positions, mask, HW, n_slots, SLOTS_BLOCK, BLOCK_HW), 0.0)
            tl.store(out_map_ptr + positions, (cam - low) / (high - low + _NORMALIZE_EPS), mask=mask)
    else:
        for start in range(0, HW, BLOCK_HW):
            positions = start + tl.arange(0, BLOCK_HW)
            mask = positions < HW
            cam = tl.maximum(_sum_partials(partial_map_ptr, positions, mask, HW, n_slots, SLOTS_BLOCK, BLOCK_HW), 0.0)
            tl.store(out_map_ptr + positions, cam, mask=mask)
