"""Decode and geometric transforms on the CPU: bytes -> uint8 (3, crop, crop).

Normalization to float happens on the device (pipeline), so workers ship uint8: four times
less to copy than float32.

Every image of a real dataset either decodes to RGB with one meaning (EXIF orientation applied,
transparency composited on black, 16-bit scaled to 8-bit, first frame of an animation) or raises
`CorruptImage` / `ImageTooLarge` with a one-line message, which the loader records as an error row.
"""

from __future__ import annotations

import io
import math
import re
import struct
import warnings
import zlib
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

# torchvision >= 0.29 announces that its decoders will move to torchcodec; they still work and
# are the fastest CPU path here, so the per-call notice is kept out of the user's log.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities", category=DeprecationWarning)

DEFAULT_MAX_PIXELS = 89_478_485  # DataConfig.max_pixels' default, Pillow's own warning limit

# What torchvision decodes with the same meaning as the Pillow path: no alpha to composite, no
# animation to pick a frame from (it returns every GIF frame). MPO is a camera JPEG with extra
# images appended. Not PNG: torchvision 0.29's decode_png crashes the process (SIGSEGV) on any
# PNG that makes libpng report an error (bad CRC, bad zlib data, too little image data), and
# one such file would kill a DataLoader worker and the run; Pillow raises instead (except for a
# complete zlib stream that holds too few rows: Pillow leaves the missing rows black).
_FAST_FORMATS = frozenset({"JPEG", "MPO", "WEBP"})
_FAST_MODES = frozenset({"RGB", "L", "CMYK"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
# Errors Pillow's decoders raise for bad data (struct/zlib/EOF come from plugins reading short data).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, zlib.error)
_TORCHVISION_PREFIX = re.compile(r"^.*?\.cpp:\d+,\s*")


class CorruptImage(ValueError):
    """Empty, not an image, truncated, or rejected by the decoders."""


class ImageTooLarge(ValueError):
    """The header declares more pixels than data.max_pixels (decompression-bomb guard)."""


def decode_rgb(payload: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """uint8 (3, H, W) RGB, or CorruptImage / ImageTooLarge.

    Pillow reads the header only (size, mode, format: no pixels), so bombs are refused before
    any pixel is decoded. Opaque JPEG/WEBP then go to torchvision's decoder (fast, EXIF-aware)
    in one decode; everything else (PNG, alpha, palettes, GIF, BMP, TIFF, what torchvision
    rejects) is decoded by Pillow. Both raise on truncated data: a truncated file is an error
    row, never a half-grey image. Pillow's hard limit (twice PIL.Image.MAX_IMAGE_PIXELS) applies
    even when max_pixels is larger."""
    with open_header(payload, max_pixels) as header:
        if (header.format in _FAST_FORMATS and header.mode in _FAST_MODES
                and "transparency" not in header.info):
            image = _decode_torchvision(payload, header.format)
            if image is not None:
                return image
        return _decode_pillow(header)


def open_header(payload: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Pillow's lazily opened image (header only, no pixels), after the empty-file, format and
    decompression-bomb checks; raises CorruptImage / ImageTooLarge."""
    if not payload:
        raise CorruptImage("empty file (0 bytes)")
    try:
        header = Image.open(io.BytesIO(payload))
    except Image.DecompressionBombError as error:
        raise _too_large_from_pillow(error, max_pixels) from error
    except UnidentifiedImageError as error:
        raise CorruptImage(f"not an image: no decoder recognises these {len(payload)} bytes "
                           f"(they start {payload[:8]!r})") from error
    except _DECODE_ERRORS as error:
        raise CorruptImage(f"unreadable image header: {error}") from error
    width, height = header.size
    if width * height > max_pixels:
        header.close()
        raise ImageTooLarge(f"image is {width}x{height} = {width * height:,} pixels, more than "
                            f"data.max_pixels={max_pixels:,} (decompression-bomb guard; raise "
                            "data.max_pixels to accept it)")
    return header


_EXIF_ORIENTATION = 0x0112


def device_jpeg_size(payload: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Optional[tuple[int, int]]:
    """(height, width) when a batched device JPEG decoder gives this payload the same meaning as
    decode_rgb: an RGB or grayscale JPEG, upright (no EXIF rotation), ending with its EOI
    marker (a truncated file goes to the CPU path, which raises). None: decode on the CPU.
    Raises what open_header raises."""
    with open_header(payload, max_pixels) as header:
        if header.format != "JPEG" or header.mode not in ("RGB", "L"):
            return None
        if header.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            return None
        if not payload.rstrip(b"\x00").endswith(b"\xff\xd9"):
            return None
        return header.height, header.width


def _decode_torchvision(payload: bytes, image_format: str) -> Optional[torch.Tensor]:
    """The fast path; None when torchvision cannot read this file but Pillow might."""
    try:
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        image = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError as error:
        message = _TORCHVISION_PREFIX.sub("", str(error)).splitlines()[0]
        if "truncated" in message or "corrupt" in message:
            # Pillow would raise too (unless a user set ImageFile.LOAD_TRUNCATED_IMAGES, which
            # turns truncation into grey fill); no second decode to learn the same thing.
            raise CorruptImage(f"truncated or corrupt {image_format} ({len(payload)} bytes): "
                               f"{message}") from error
        return None
    return image


def _decode_pillow(image: Image.Image) -> torch.Tensor:
    """Pillow decode of an opened image: first frame, EXIF orientation, alpha on black."""
    described = f"{image.format or 'image'} ({image.mode}, {image.width}x{image.height})"
    try:
        image.load()  # raises on truncated data (Pillow's default LOAD_TRUNCATED_IMAGES=False)
        ImageOps.exif_transpose(image, in_place=True)
        if image.mode in _ALPHA_MODES or "transparency" in image.info:
            rgba = np.asarray(image.convert("RGBA"))
            alpha = rgba[..., 3:].astype(np.uint16)
            # composite on opaque black: colour * alpha / 255, rounded
            pixels = ((rgba[..., :3] * alpha + 127) // 255).astype(np.uint8)
        elif image.mode.startswith("I;16") or image.mode == "I":
            # "I" (32-bit) holds 16-bit data in practice (old Pillow opened 16-bit PNGs so)
            gray = _scale_16_to_8_bits(torch.from_numpy(np.asarray(image).astype(np.int32)))
            return gray.unsqueeze(0).expand(3, -1, -1).contiguous()
        else:
            pixels = np.array(image if image.mode == "RGB" else image.convert("RGB"))
    except _DECODE_ERRORS as error:
        raise CorruptImage(f"cannot decode {described}: {error}") from error
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _scale_16_to_8_bits(image: torch.Tensor) -> torch.Tensor:
    """0..65535 -> 0..255, rounded (65535 -> 255, 32768 -> 128)."""
    wide = image.to(torch.int32).clamp_(0, 65535)
    return torch.div(wide * 255 + 32767, 65535, rounding_mode="floor").to(torch.uint8)


def _too_large_from_pillow(error: Exception, max_pixels: int) -> ImageTooLarge:
    """Pillow refuses images over twice its MAX_IMAGE_PIXELS while opening, before our check."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    pixels = int(found.group(1)) if found else None
    if pixels is not None and pixels > max_pixels:
        return ImageTooLarge(f"image is {pixels:,} pixels, more than data.max_pixels={max_pixels:,} "
                             "(decompression-bomb guard; raise data.max_pixels to accept it)")
    return ImageTooLarge(f"{error} data.max_pixels={max_pixels:,} cannot lift Pillow's limit; "
                         "raise PIL.Image.MAX_IMAGE_PIXELS as well")


def resized_size(height: int, width: int, resize: int) -> tuple[int, int]:
    """The size torchvision's resize(image, [resize]) gives: shorter side `resize`, the longer
    one scaled and truncated."""
    if height <= width:
        return resize, int(resize * width / height)
    return int(resize * height / width), resize


def map_box(box: Optional[list], height: int, width: int, resize: int, crop: int) -> Optional[list]:
    """A box in original pixels, after resize_crop: normalized to [0, 1] of the crop."""
    if box is None:
        return None
    new_height, new_width = resized_size(height, width, resize)
    scale_x, scale_y = new_width / width, new_height / height
    # center_crop's offsets, as torchvision computes them
    top = int(round((new_height - crop) / 2.0))
    left = int(round((new_width - crop) / 2.0))
    x0, y0, x1, y1 = (float(v) for v in box)
    mapped = [(x0 * scale_x - left) / crop, (y0 * scale_y - top) / crop,
              (x1 * scale_x - left) / crop, (y1 * scale_y - top) / crop]
    return [min(max(v, 0.0), 1.0) for v in mapped]


def resize_crop(image: torch.Tensor, resize: int, crop: int, box: Optional[list] = None):
    """Shorter side to `resize`, center crop `crop` (one image (3, H, W) or a batch of equal
    size); the box (pixels) follows the image and is returned normalized to [0, 1] of the crop,
    or None."""
    height, width = image.shape[-2:]
    image = TF.center_crop(TF.resize(image, [resize], antialias=True), [crop, crop])
    return image, map_box(box, height, width, resize, crop)


def box_from_meta(meta: Optional[dict]) -> Optional[list]:
    box = (meta or {}).get("box")
    if isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
        return list(box)
    return None
