"""What a row carries beyond its map, computed on the device in the map's batch: localization
metrics against the sample's boxes, the map at another size (output.cam_size), the heatmap
blended over the crop (output.heatmap_png; PNG-encoded later in the writer thread), the
faithfulness scores (metrics.faithfulness) and ROAD's (metrics.road). One `RowExtras` per layer's maps, copied to the host
with the batch's results.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from gradcam_batch.config import Config
from gradcam_batch.data.prefetch import Preprocess
from gradcam_batch.engine import CamEngine, CamResult
from gradcam_batch.statistics import box_metrics, empty_maps, upsample

# Rows of this many images at once through the crop-sized box masks: (chunk, K, S, S) floats
BOX_CHUNK = 64


@dataclass
class RowExtras:
    map_empty: torch.Tensor | None = None  # bool (B, K): the map is all zero (no box metrics, counted in the summary)
    map_kept: torch.Tensor | None = None  # bool (B, K), cam.targets=all: the map is stored (cam.keep_maps); None: all are
    box_known: torch.Tensor | None = None  # bool (B,): the sample has boxes with area in the crop
    box_outside_crop: torch.Tensor | None = None  # bool (B,): it had boxes, all outside the crop
    pointing_hit: torch.Tensor | None = None  # bool (B, K)
    box_energy: torch.Tensor | None = None  # float32 (B, K)
    box_iou: torch.Tensor | None = None  # float32 (B, K)
    cam_resized: torch.Tensor | None = None  # float16 (B, K, h, w)
    heatmaps: torch.Tensor | None = None  # uint8 (B, K, S, S, 3), PNG-encoded by the writer
    insertion: torch.Tensor | None = None  # float32 (B, K, F)
    deletion: torch.Tensor | None = None  # float32 (B, K, F)
    confidence_change: torch.Tensor | None = None  # float32 (B, K)
    drop_in_confidence: torch.Tensor | None = None  # float32 (B, K)
    increase_in_confidence: torch.Tensor | None = None  # bool (B, K)
    road_morf: torch.Tensor | None = None  # float32 (B, K, P)
    road_lerf: torch.Tensor | None = None  # float32 (B, K, P)
    road_combined: torch.Tensor | None = None  # float32 (B, K)

    def to_host(self) -> "RowExtras":
        """Non-blocking copies; the caller synchronises once for the whole batch."""
        return RowExtras(**{f.name: None if getattr(self, f.name) is None
                            else getattr(self, f.name).to("cpu", non_blocking=True) for f in fields(self)})

    def numpy(self) -> dict:
        return {f.name: getattr(self, f.name).numpy() for f in fields(self) if getattr(self, f.name) is not None}


def jet(values: torch.Tensor) -> torch.Tensor:
    """The jet colormap (blue, cyan, yellow, red) of values in [0, 1]: (..., 3) in [0, 1], in the
    values' dtype. The channel peaks are Python numbers: no tensor is copied to the device."""
    v = values.clamp(0, 1) * 4.0
    return torch.stack([(1.5 - (v - peak).abs()).clamp(0, 1) for peak in (3.0, 2.0, 1.0)], dim=-1)


def blend(images: torch.Tensor, cams: torch.Tensor, preprocess: Preprocess, weight: float = 0.5) -> torch.Tensor:
    """uint8 (B, K, S, S, 3): each map upsampled to the crop, coloured (jet) and blended half and
    half over the crop (pytorch-grad-cam's show_cam_on_image with image_weight=0.5). The crop is
    recovered from the normalized images with the preprocessing's own device tensors."""
    size = images.shape[-2:]
    pixels = ((images.float() - preprocess.shift) / (preprocess.scale * 255.0)).clamp(0, 1)
    pixels = pixels.permute(0, 2, 3, 1)[:, None]  # (B, 1, S, S, 3)
    colours = jet(upsample(cams, tuple(size)))  # (B, K, S, S, 3)
    return ((weight * pixels + (1 - weight) * colours) * 255).round().to(torch.uint8)


def resized_size(cam_size, crop: int, grid: tuple[int, int]) -> tuple[int, int] | None:
    if cam_size == "layer":
        return None
    if cam_size == "input":
        return (crop, crop)
    return (int(cam_size[0]), int(cam_size[1]))


def row_extras(cfg: Config, result: CamResult, images: torch.Tensor, boxes: torch.Tensor, engine: CamEngine,
               preprocess: Preprocess) -> list[RowExtras]:
    """The extras of every layer's maps of a batch (result on the device; images the normalized
    batch, made by `preprocess`; boxes (B, M, 4) on the host, NaN rows: none)."""
    crop = images.shape[-1]
    has_boxes = bool((~torch.isnan(boxes)).all(dim=-1).any())
    boxes = boxes.to(images.device, non_blocking=True) if has_boxes else None
    extras = []
    kept = engine.kept_maps(result.target_classes)  # cam.targets=all; None otherwise
    for maps in result.layers:
        extra = RowExtras(map_empty=empty_maps(maps.cams), map_kept=kept)
        if boxes is not None and kept is None:  # box metrics: of the ranked maps, not of every class's
            parts = [box_metrics(maps.cams[start:start + BOX_CHUNK], maps.peak[start:start + BOX_CHUNK],
                                 boxes[start:start + BOX_CHUNK], crop, cfg.metrics.threshold)
                     for start in range(0, maps.cams.shape[0], BOX_CHUNK)]
            joined = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
            extra.box_known, extra.pointing_hit = joined["known"], joined["pointing_hit"]
            extra.box_outside_crop = joined["outside_crop"]
            extra.box_energy, extra.box_iou = joined["box_energy"], joined["box_iou"]
        size = resized_size(cfg.output.cam_size, crop, tuple(maps.cams.shape[-2:]))
        if size is not None:
            extra.cam_resized = upsample(maps.cams, size).to(torch.float16)
        if cfg.output.heatmap_png:
            extra.heatmaps = blend(images, maps.cams, preprocess)
        if cfg.metrics.faithfulness:
            from gradcam_batch.faithfulness import faithfulness

            scores = faithfulness(engine.model, images, maps.cams, result.target_classes, cfg.metrics.fractions,
                                  autocast=engine.autocast, base_confidence=result.probs)
            extra.insertion, extra.deletion = scores.insertion, scores.deletion
            extra.confidence_change = scores.confidence_change
            extra.drop_in_confidence = scores.drop_in_confidence
            extra.increase_in_confidence = scores.increase_in_confidence
        if cfg.metrics.road:
            from gradcam_batch.road import road

            generator = torch.Generator(images.device).manual_seed(0)
            scores = road(engine.model, images, maps.cams, result.target_classes, cfg.metrics.road_percentiles,
                          noise=cfg.metrics.road_noise, generator=generator, autocast=engine.autocast,
                          base_confidence=result.probs)
            extra.road_morf, extra.road_lerf, extra.road_combined = scores.morf, scores.lerf, scores.combined
        extras.append(extra)
    return extras


def localization_sums(extras: RowExtras) -> dict:
    """What the summary's pointing game adds up, from one layer's extras (host arrays), over the
    rank-0 map of each sample with boxes: `hits` and `total` (the pointing game), `energy_sum` and
    `iou_sum` over those maps, which all hold some evidence; `empty`, the boxed maps left out as
    all zero (a hit or miss of a map with no peak would be noise passed off as a result); and
    `outside_crop`, the samples whose boxes the crop cut away, left out too."""
    sums = {"hits": 0, "total": 0, "energy_sum": 0.0, "iou_sum": 0.0, "empty": 0, "outside_crop": 0}
    if extras.box_known is None:
        return sums
    boxed = extras.box_known.numpy()
    empty = extras.map_empty[:, 0].numpy() if extras.map_empty is not None else np.zeros_like(boxed)
    counted = boxed & ~empty
    sums["empty"] = int((boxed & empty).sum())
    if extras.box_outside_crop is not None:
        sums["outside_crop"] = int(extras.box_outside_crop.numpy().sum())
    if counted.any():
        sums["hits"] = int(extras.pointing_hit[:, 0].numpy()[counted].sum())
        sums["total"] = int(counted.sum())
        sums["energy_sum"] = float(extras.box_energy[:, 0].numpy()[counted].sum())
        sums["iou_sum"] = float(extras.box_iou[:, 0].numpy()[counted].sum())
    return sums
