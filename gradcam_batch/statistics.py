"""Per-map statistics and localization metrics, computed on the device in the batch that made the
maps, one value per (image, target) map.

Map coordinates: a map of h x w cells covers the crop fed to the model, cell (i, j) centred at
((i + 0.5) / h, (j + 0.5) / w) in [0, 1] of the crop, the frame the boxes are mapped into.

- centre of mass (com_y, com_x): the map's mass-weighted mean cell centre; NaN for an all-zero map
  (every statistic is; the writer stores NaN as null).
- entropy: Shannon entropy of the map as a distribution over its cells, divided by log(h * w):
  0 when one cell holds all the mass, 1 when it is spread evenly; NaN for an all-zero map or a
  single cell.
- center_mass: the fraction of the mass in the central region, the cells whose centres lie in
  the middle half of both sides ([0.25, 0.75]).
- border_mass: the fraction in the border band, the cells whose centres lie within 1/8 of the
  side from an edge (at least the outermost ring): where watermarks, captions and frame
  artefacts sit, so a model that looks there is suspect.
- box metrics (samples with object boxes): pointing_hit (the map's peak cell, its centre with
  half a cell of slack, lies in a box), box_energy (the share of the map's energy inside the
  boxes, the energy-based pointing game of Score-CAM) and box_iou (IoU between the map
  thresholded at metrics.threshold and the union of the boxes). Energy and IoU are measured on
  the map upsampled bilinearly to the crop (as the reference implementations overlay it), the
  boxes rasterized at the crop's pixels. All three are undefined for an all-zero map, like the
  statistics: its argmax (cell 0) is no peak, it has no energy, and nothing of it is above the
  threshold, so a hit, a share or an IoU of 0 would read as a result about a map that holds none.
  A sample whose boxes all lie outside the crop (clamped to its edge, they keep no area) has no
  box metrics either; `outside_crop` tells it apart from a sample that never had a box.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CENTRAL = (0.25, 0.75)
BORDER = 0.125


def _centres(cells: int, device) -> torch.Tensor:
    return (torch.arange(cells, device=device, dtype=torch.float32) + 0.5) / cells


def _region_masks(height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(central, border) boolean (h, w) masks."""
    ys, xs = _centres(height, device), _centres(width, device)
    central = (((ys >= CENTRAL[0]) & (ys <= CENTRAL[1]))[:, None]
               & ((xs >= CENTRAL[0]) & (xs <= CENTRAL[1]))[None, :])

    def near_edge(centres: torch.Tensor) -> torch.Tensor:
        near = (centres <= BORDER) | (centres >= 1 - BORDER)
        near[0] = near[-1] = True
        return near
    border = near_edge(ys)[:, None] | near_edge(xs)[None, :]
    return central, border


def empty_maps(cams: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: the (B, K, h, w) maps with no cell above zero, which hold no evidence (the
    maps map_statistics gives NaN; a constant map, normalized, is one too)."""
    return cams.flatten(2).amax(dim=2) <= 0


def map_statistics(cams: torch.Tensor) -> dict[str, torch.Tensor]:
    """com_y, com_x, entropy, center_mass, border_mass, each (B, K) float32, of (B, K, h, w) maps
    (>= 0, normalized or raw: every statistic is scale-free)."""
    height, width = cams.shape[-2:]
    maps = cams.float().clamp_min(0)
    mass = maps.sum(dim=(-2, -1))
    empty = mass <= 0
    share = maps / torch.where(empty, torch.ones_like(mass), mass)[..., None, None]
    nan = torch.full_like(mass, float("nan"))
    com_y = (share.sum(dim=-1) * _centres(height, cams.device)).sum(dim=-1)
    com_x = (share.sum(dim=-2) * _centres(width, cams.device)).sum(dim=-1)
    cells = height * width
    if cells > 1:
        plogp = torch.where(share > 0, share * share.clamp_min(1e-30).log(), torch.zeros_like(share))
        entropy = -plogp.sum(dim=(-2, -1)) / math.log(cells)
    else:
        entropy = nan.clone()
    central, border = _region_masks(height, width, cams.device)
    return {
        "com_y": torch.where(empty, nan, com_y),
        "com_x": torch.where(empty, nan, com_x),
        "entropy": torch.where(empty, nan, entropy),
        "center_mass": torch.where(empty, nan, (share * central).sum(dim=(-2, -1))),
        "border_mass": torch.where(empty, nan, (share * border).sum(dim=(-2, -1))),
    }


def upsample(cams: torch.Tensor, size: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, K, h, w) maps bilinearly resized to `size` (align_corners=False), in `dtype`."""
    cams = cams.to(dtype)
    if tuple(cams.shape[-2:]) == tuple(size):
        return cams
    return F.interpolate(cams, size=tuple(size), mode="bilinear", align_corners=False)


def box_masks(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size, size) bool: the pixels of the crop whose centres lie in any of each sample's boxes
    (boxes (B, M, 4) x0, y0, x1, y1 in [0, 1] of the crop, NaN rows unused)."""
    centres = _centres(size, boxes.device)
    x0, y0, x1, y1 = (boxes[..., index, None] for index in range(4))  # (B, M, 1)
    inside_x = (centres >= x0) & (centres <= x1)  # (B, M, size); NaN compares False
    inside_y = (centres >= y0) & (centres <= y1)
    return (inside_y[:, :, :, None] & inside_x[:, :, None, :]).any(dim=1)


def box_metrics(cams: torch.Tensor, peak: torch.Tensor, boxes: torch.Tensor, crop: int,
                threshold: float) -> dict[str, torch.Tensor]:
    """pointing_hit (bool), box_energy and box_iou (float32), each (B, K), for (B, K, h, w) maps
    with their flat peak index (B, K) and boxes (B, M, 4) in [0, 1] of the crop (NaN: none).
    `known` (B,) says which samples have a box with area in the crop, `empty` (B, K) which maps
    are all zero: the values of the others are meaningless (box_energy and box_iou NaN, pointing_hit
    False for an empty map). `outside_crop` (B,): the sample had boxes, none with area in the crop."""
    height, width = cams.shape[-2:]
    given = ~torch.isnan(boxes).any(dim=-1)
    # the data side clamps a box to the crop: one the crop cut away is left with no width or height
    valid = given & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    boxes = torch.where(valid[..., None], boxes, torch.full_like(boxes, float("nan")))
    known = valid.any(dim=1)
    empty = empty_maps(cams)
    # pointing game: the peak cell's centre, half a cell of slack
    y = ((peak // width).float() + 0.5) / height
    x = ((peak % width).float() + 0.5) / width
    slack_x, slack_y = 0.5 / width, 0.5 / height
    b = boxes[:, None]  # (B, 1, M, 4)
    hit = ((x[..., None] >= b[..., 0] - slack_x) & (x[..., None] <= b[..., 2] + slack_x)
           & (y[..., None] >= b[..., 1] - slack_y) & (y[..., None] <= b[..., 3] + slack_y)).any(dim=-1)
    inside = box_masks(boxes, crop)[:, None].float()  # (B, 1, S, S)
    maps = upsample(cams, (crop, crop)).clamp_min(0)
    total = maps.sum(dim=(-2, -1))
    nan = torch.full_like(total, float("nan"))
    energy = (maps * inside).sum(dim=(-2, -1)) / total.clamp_min(1e-30)
    energy = torch.where(empty, nan, energy)
    on = (maps >= threshold).float()
    overlap = (on * inside).sum(dim=(-2, -1))
    union = on.sum(dim=(-2, -1)) + inside.sum(dim=(-2, -1)) - overlap
    iou = torch.where(empty, nan, overlap / union.clamp_min(1.0))
    return {"known": known, "empty": empty, "outside_crop": given.any(dim=1) & ~known,
            "pointing_hit": hit & ~empty, "box_energy": energy, "box_iou": iou}
