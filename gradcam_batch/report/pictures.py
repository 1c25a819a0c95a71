"""Pictures: the colour scale, bilinear upsampling, a map over its image, stored PNGs read back,
and data: URIs, so that the page carries every picture inline."""

from __future__ import annotations

import base64
import io
from typing import Optional

import numpy as np

CARD_SIZE = 224
"""Gallery pictures are drawn at the crop size, scaled down to at most this many pixels."""
MEAN_SIZE = 96
"""Class-mean maps are drawn at this many pixels a side."""
OVERLAY_ALPHA = 0.5
STORED_MAX_SIDE = 4096
"""A stored heatmap_png larger than this a side is not decoded (the run writes crop-sized ones)."""


def colormap(values: np.ndarray) -> np.ndarray:
    """The run's jet colours (audit.jet, which colours the stored heatmap_png too) of values in
    [0, 1]: uint8 (..., 3), dark blue -> cyan -> yellow -> dark red."""
    import torch

    from gradcam_batch.audit import jet

    x = torch.from_numpy(np.nan_to_num(np.asarray(values, dtype=np.float64)))
    return np.round(jet(x).numpy() * 255).astype(np.uint8)


def scaled(values: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] (a flat map becomes 0)."""
    values = np.nan_to_num(values.astype(np.float64))
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def upsample(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of a (h, w) map to (height, width), as the run upsamples its maps
    (statistics.upsample), in float64."""
    import torch

    from gradcam_batch.statistics import upsample as upsample_maps

    maps = torch.from_numpy(np.nan_to_num(np.asarray(values, dtype=np.float64)))[None, None]
    return upsample_maps(maps, (height, width), dtype=torch.float64)[0, 0].numpy()


def heatmap(values: np.ndarray, size: int) -> np.ndarray:
    return colormap(scaled(upsample(values, size, size)))


def overlay(picture: np.ndarray, values: np.ndarray, box: Optional[list] = None) -> np.ndarray:
    """The picture with the map upsampled over it, and the object box (in [0, 1] of the picture)
    outlined in white."""
    height, width = picture.shape[:2]
    colours = colormap(scaled(upsample(values, height, width))).astype(np.float64)
    blended = np.round((1 - OVERLAY_ALPHA) * picture + OVERLAY_ALPHA * colours).astype(np.uint8)
    if box is not None:
        line = max(1, round(max(height, width) / 112))
        x0, x1 = (int(np.clip(round(v * width), 0, width - 1)) for v in (box[0], box[2]))
        y0, y1 = (int(np.clip(round(v * height), 0, height - 1)) for v in (box[1], box[3]))
        for top, bottom, left, right in ((y0, y0 + line, x0, x1 + 1), (y1 - line + 1, y1 + 1, x0, x1 + 1),
                                         (y0, y1 + 1, x0, x0 + line), (y0, y1 + 1, x1 - line + 1, x1 + 1)):
            blended[max(top, 0):bottom, max(left, 0):right] = 255
    return blended


def stored_picture(data: bytes) -> Optional[np.ndarray]:
    """A PNG the run stored (heatmap_png) as uint8 (h, w, 3), or None where it is no readable
    PNG of a sensible size: that card then draws the map itself."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG" or max(image.size) > STORED_MAX_SIDE:
                return None
            return np.asarray(image.convert("RGB"))
    except Exception:  # noqa: BLE001 -- stored bytes are data; a bad one costs its card the stored picture
        return None


def data_uri(pixels: np.ndarray, fmt: str = "PNG", size: Optional[int] = None) -> str:
    from PIL import Image

    image = Image.fromarray(pixels)
    if size and max(image.size) > size:
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=88)
    else:
        image.save(buffer, format="PNG", optimize=True)
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"
