"""Decode and geometric transforms on the CPU: bytes -> uint8 (3, crop, crop).

Normalization to float happens on the device (pipeline), so workers ship uint8: four times
less to copy than float32.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Optional

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

# torchvision >= 0.29 announces that its decoders will move to torchcodec; they still work and
# are the fastest CPU path here, so the per-call notice is kept out of the user's log.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities", category=DeprecationWarning)


def decode_rgb(payload: bytes) -> torch.Tensor:
    """uint8 (3, H, W). torchvision's decoders first (fast, EXIF-aware); PIL for what they
    cannot read (CMYK JPEGs, BMP, TIFF, 16-bit PNGs, palette images)."""
    try:
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        return decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError:
        pass
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(payload)) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (0, 0, 0, 255))
            image = Image.alpha_composite(background, image)
        elif image.mode.startswith("I;16") or image.mode == "I":
            image = image.point(lambda value: value / 256).convert("L")
        image = image.convert("RGB")
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def resize_crop(image: torch.Tensor, resize: int, crop: int, box: Optional[list] = None):
    """Shorter side to `resize`, center crop `crop`; the box (pixels) follows the image and is
    returned normalized to [0, 1] of the crop, or None."""
    height, width = image.shape[-2:]
    image = TF.resize(image, [resize], antialias=True)
    new_height, new_width = image.shape[-2:]
    image = TF.center_crop(image, [crop, crop])
    if box is None:
        return image, None
    scale_x, scale_y = new_width / width, new_height / height
    # center_crop's offsets, as torchvision computes them
    top = int(round((new_height - crop) / 2.0))
    left = int(round((new_width - crop) / 2.0))
    x0, y0, x1, y1 = (float(v) for v in box)
    mapped = [(x0 * scale_x - left) / crop, (y0 * scale_y - top) / crop,
              (x1 * scale_x - left) / crop, (y1 * scale_y - top) / crop]
    return image, [min(max(v, 0.0), 1.0) for v in mapped]


def box_from_meta(meta: Optional[dict]) -> Optional[list]:
    box = (meta or {}).get("box")
    if isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
        return list(box)
    return None
