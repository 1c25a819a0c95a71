"""Batched, device-side faithfulness scores of CAM maps: insertion, deletion and the
confidence change of the CAM-multiplied image.

For each image b, target k (class targets[b, k], map cams[b, k]) and fraction p:

    insertion[b, k, i]    softmax prob of the target on the image that keeps only the top p fraction of
                          pixels of the upsampled map, every other pixel set to the baseline
    deletion[b, k, i]     the same with the top p fraction set to the baseline and the rest kept
    confidence_change     prob(image * upsampled map) - prob(image): pytorch-grad-cam's
                          CamMultImageConfidenceChange with ClassifierOutputSoftmaxTarget
    base_confidence       prob(image), the unmodified image

The baseline is 0 in normalized space, i.e. the dataset mean colour. "Top p fraction" is exactly
round(p * H * W) pixels of the map upsampled (bilinear, align_corners=False) to the image size,
the highest values first; ties go to the lower row-major pixel index (a stable descending sort),
the same on every device.

Every perturbed image is the input times a per-pixel multiplier (a 0/1 mask or the map itself),
built chunk by chunk on the device from one sort per map, so the B * K * (2F + 1) perturbed
images never exist at once and nothing loops over the images in Python.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from gradcam_batch.statistics import upsample as upsample_maps  # (B, K, h, w) -> float32 (B, K, H, W)


@dataclass
class FaithfulnessResult:
    insertion: torch.Tensor  # float32 (B, K, F)
    deletion: torch.Tensor  # float32 (B, K, F)
    confidence_change: torch.Tensor  # float32 (B, K)
    base_confidence: torch.Tensor  # float32 (B, K)
    fractions: tuple[float, ...] = ()  # the F fractions, in the order of the last axis

    @property
    def drop_in_confidence(self) -> torch.Tensor:
        """pytorch-grad-cam's DropInConfidence: max(-confidence_change, 0), float32 (B, K)."""
        return (-self.confidence_change).clamp_min(0)

    @property
    def increase_in_confidence(self) -> torch.Tensor:
        """pytorch-grad-cam's IncreaseInConfidence: confidence_change > 0, bool (B, K)."""
        return self.confidence_change > 0


def kept_pixels(fraction: float, num_pixels: int) -> int:
    """The number of pixels a fraction selects: round(fraction * num_pixels) (Python's round)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fractions must lie in [0, 1], got {fraction}")
    return int(round(fraction * num_pixels))


def descending_ranks(flat: torch.Tensor) -> torch.Tensor:
    """int32 (..., P) for flattened maps (..., P): each pixel's position in its map's stable
    descending order (0 = the highest value; equal values ordered by their index)."""
    order = torch.sort(flat, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(flat.shape[-1], dtype=torch.int32, device=flat.device).expand_as(order)
    return torch.empty_like(order, dtype=torch.int32).scatter_(-1, order, positions)


def top_fraction_mask(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """bool (..., H, W): True on exactly round(fraction * H * W) pixels of each map, the
    highest values, ties to the lower row-major index."""
    count = kept_pixels(fraction, maps.shape[-2] * maps.shape[-1])
    return (descending_ranks(maps.flatten(-2)) < count).view(maps.shape)


def _check_inputs(images: torch.Tensor, cams: torch.Tensor, targets: torch.Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if cams.dim() != 4 or cams.shape[0] != images.shape[0]:
        raise ValueError(f"cams must be (B, K, h, w) with B = {images.shape[0]}, got shape {tuple(cams.shape)}")
    if tuple(targets.shape) != tuple(cams.shape[:2]):
        raise ValueError(f"targets must be (B, K) = {tuple(cams.shape[:2])}, got shape {tuple(targets.shape)}")


def _target_probs(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, autocast) -> torch.Tensor:
    """float32 softmax probabilities (N, K) of targets (N, K) on images (N, ...): the forward
    under autocast, the logits cast to fp32 and the softmax outside it (as the engine does)."""
    with autocast():
        logits = model(images)
    return torch.softmax(logits.float(), dim=1).gather(1, targets)


def faithfulness(model: nn.Module, images: torch.Tensor, cams: torch.Tensor, targets: torch.Tensor,
                 fractions: Sequence[float] = (0.1, 0.25, 0.5),
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 max_batch: int | None = None,
                 base_confidence: torch.Tensor | None = None) -> FaithfulnessResult:
    """Insertion, deletion and confidence-change scores of K maps per image, on the device.

    model: eval-mode classifier with frozen parameters. images: the normalized float
    (B, 3, H, W) input the model was fed. cams: (B, K, h, w) maps in [0, 1] at the target
    layer's resolution. targets: int64 (B, K) class indices. fractions: the F values of p.
    autocast: a callable returning the autocast context (the engine's, e.g. bf16 on CUDA).
    max_batch: at most this many perturbed images per forward (default B). base_confidence:
    float32 (B, K) probabilities of the targets on the unmodified images when the caller has
    them (CamResult.probs); computed here otherwise.

    Cost: one extra forward per fraction for insertion, one per fraction for deletion and one
    for the confidence change, per target: (2F + 1) * K forwards per image, in chunks of
    max_batch images under torch.no_grad() and `autocast`; plus one forward of each unmodified
    image unless base_confidence is given. Memory beyond the model's: one chunk of perturbed
    images and, per map, its upsampled float32 values and int32 ranks (8 bytes per pixel).
    """
    _check_inputs(images, cams, targets)
    fractions = tuple(float(p) for p in fractions)
    batch, num_targets = targets.shape
    height, width = images.shape[-2:]
    num_pixels = height * width
    counts = [kept_pixels(p, num_pixels) for p in fractions]
    num_fractions = len(fractions)
    per_map = 2 * num_fractions + 1  # insertions, deletions, the CAM-multiplied image
    max_batch = batch if max_batch is None else int(max_batch)
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    device = images.device
    targets = targets.to(device=device, dtype=torch.int64)

    with torch.no_grad():
        maps = upsample_maps(cams.to(device), (height, width)).flatten(2)  # (B, K, HW) float32
        ranks = descending_ranks(maps)  # (B, K, HW) int32
        # per perturbation slot: how many top pixels the mask holds, and which slots keep them
        # filled with Python numbers: a tensor built from a host list would be a copy (and a
        # stream synchronisation) per batch
        slot_count = torch.zeros(per_map, dtype=torch.int32, device=device)
        for slot, count in enumerate(counts * 2):
            slot_count[slot] = count
        slot_inserts = torch.arange(per_map, device=device) < num_fractions
        slot_is_cam = torch.arange(per_map, device=device) == per_map - 1

        if base_confidence is None:
            base = torch.empty(batch, num_targets, dtype=torch.float32, device=device)
            for start in range(0, batch, max_batch):
                end = min(start + max_batch, batch)
                base[start:end] = _target_probs(model, images[start:end], targets[start:end], autocast)
        else:
            if tuple(base_confidence.shape) != (batch, num_targets):
                raise ValueError(f"base_confidence must be (B, K) = {(batch, num_targets)}, "
                                 f"got shape {tuple(base_confidence.shape)}")
            base = base_confidence.to(device=device, dtype=torch.float32)

        total = batch * num_targets * per_map  # flat order (b, k, slot)
        probs = torch.empty(total, dtype=torch.float32, device=device)
        for start in range(0, total, max_batch):
            index = torch.arange(start, min(start + max_batch, total), device=device)
            image_index = index // (num_targets * per_map)
            map_index = (index // per_map) % num_targets
            slot = index % per_map
            top = ranks[image_index, map_index] < slot_count[slot].unsqueeze(1)  # (N, HW)
            keep = torch.where(slot_inserts[slot].unsqueeze(1), top, ~top)
            multiplier = torch.where(slot_is_cam[slot].unsqueeze(1), maps[image_index, map_index],
                                     keep.to(maps.dtype))
            perturbed = images[image_index] * multiplier.to(images.dtype).view(-1, 1, height, width)
            probs[start:start + index.shape[0]] = _target_probs(
                model, perturbed, targets[image_index, map_index].unsqueeze(1), autocast).squeeze(1)

    probs = probs.view(batch, num_targets, per_map)
    return FaithfulnessResult(
        insertion=probs[..., :num_fractions].contiguous(),
        deletion=probs[..., num_fractions:2 * num_fractions].contiguous(),
        confidence_change=probs[..., -1] - base,
        base_confidence=base,
        fractions=fractions,
    )
