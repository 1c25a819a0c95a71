"""Decode and geometric transforms on the CPU: bytes -> uint8 (3, crop, crop).

Normalization to float happens on the device (pipeline), so workers ship uint8: four times
less to copy than float32.

Every image of a real dataset either decodes to RGB with one meaning (EXIF orientation applied,
transparency composited on black, 16-bit scaled to 8-bit, first frame of an animation) or raises
`CorruptImage` / `ImageTooLarge` with a one-line message, which the loader records as an error row.
Messages give lengths, sizes and format guesses, never bytes of the file: a dataset may link to
any file on the machine.
"""

from __future__ import annotations

import codecs
import io
import math
import re
import struct
import warnings
import zlib
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

# torchvision >= 0.29 announces that its decoders will move to torchcodec; they still work and
# are the fastest CPU path here, so the per-call notice is kept out of the user's log.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities", category=DeprecationWarning)
# data.max_pixels, checked as soon as a header is read, is the user's limit; Pillow's warning at its
# own default limit (MAX_IMAGE_PIXELS) would otherwise print for every image between the two, and
# before each refusal of a larger one. A filter, not catch_warnings: images are also decoded in
# threads, and catch_warnings swaps the process-wide filters without a lock.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

DEFAULT_MAX_PIXELS = 89_478_485  # DataConfig.max_pixels' default, Pillow's own warning limit

# data.interpolation: the resize filter, antialiased either way (torchvision's recipes resize
# bilinearly, timm's and most Hugging Face processors bicubically). Support: how many source
# pixels the filter reaches on either side of a sample point when upscaling (divided by the
# scale when downscaling, where the antialiasing filter widens with it).
INTERPOLATIONS = ("bilinear", "bicubic")
_INTERPOLATION_MODES = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
_FILTER_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}

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
# What decoders quote of the data they choke on: Python literals (`b'\x01\x02Zq'`, `'Zq9x'`,
# optionally after a colon) and hexadecimal values (libjpeg's marker codes).
_QUOTED = re.compile(r"""(:\s*)?(?<!\w)b?('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")|\b0[xX][0-9a-fA-F]+\b""")
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "a PNG file"), (b"\xff\xd8\xff", "a JPEG file"), (b"GIF8", "a GIF file"),
               (b"II*\x00", "a TIFF file"), (b"MM\x00*", "a TIFF file"), (b"RIFF", "a RIFF file (WEBP, WAV, AVI)"),
               (b"BM", "a BMP file"))
_TEXT_SAMPLE_BYTES = 4096


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
        return _decode_opened(payload, header)


def _decode_opened(payload: bytes, header: Image.Image) -> torch.Tensor:
    """decode_rgb once the header is open and checked."""
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
        raise CorruptImage(f"not an image: no decoder recognises these {len(payload):,} bytes "
                           f"({_looks_like(payload)})") from error
    except NotImplementedError as error:  # its message quotes the field it does not know
        raise CorruptImage("unsupported image: a decoder recognises the format but not this variant "
                           f"of it ({len(payload):,} bytes)") from error
    except _DECODE_ERRORS as error:
        raise CorruptImage(f"unreadable image header: {_reason(error)}") from error
    width, height = header.size
    if width * height > max_pixels:
        header.close()
        raise ImageTooLarge(f"image is {width}x{height} = {width * height:,} pixels, more than "
                            f"data.max_pixels={max_pixels:,} (decompression-bomb guard; raise "
                            "data.max_pixels to accept it)")
    return header


def _looks_like(payload: bytes) -> str:
    """A guess at what a payload no decoder recognises is, for its error message, which must not
    quote the payload itself (it may be any file a dataset links to)."""
    for signature, name in _SIGNATURES:
        if payload.startswith(signature):
            return f"they start like {name}"
    try:  # final=False: a character cut at the end of the sample does not make text binary
        text = codecs.getincrementaldecoder("utf-8")().decode(payload[:_TEXT_SAMPLE_BYTES],
                                                              final=len(payload) <= _TEXT_SAMPLE_BYTES)
    except UnicodeDecodeError:
        return "binary data"
    if all(character.isprintable() or character in "\t\r\n\f" for character in text):
        return "they look like text"
    return "binary data"


def _reason(error: Exception) -> str:
    """A decoder's own words for what went wrong, on one line, without what it quotes of the file."""
    lines = str(error).splitlines()
    message = _TORCHVISION_PREFIX.sub("", lines[0]) if lines else ""
    message = _QUOTED.sub(lambda quoted: "" if quoted.group(1) else "...", message)
    message = "".join(character for character in message if character.isascii() and character.isprintable())
    return message.strip()[:200] or type(error).__name__


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
        message = _reason(error)
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
    except NotImplementedError as error:  # its message quotes the field it does not know
        raise CorruptImage(f"cannot decode {described}: a variant the decoder does not support") from error
    except _DECODE_ERRORS as error:
        raise CorruptImage(f"cannot decode {described}: {_reason(error)}") from error
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
    return ImageTooLarge(f"{_reason(error)} data.max_pixels={max_pixels:,} cannot lift Pillow's limit; "
                         "raise PIL.Image.MAX_IMAGE_PIXELS as well")


def resized_size(height: int, width: int, resize: int) -> tuple[int, int]:
    """The size torchvision's resize(image, [resize]) gives: shorter side `resize`, the longer
    one scaled and truncated."""
    if height <= width:
        return resize, int(resize * width / height)
    return int(resize * height / width), resize


def _for_each_box(box, one):
    """`one` applied to a box [x0, y0, x1, y1], or to each box of a list of boxes."""
    if box is None:
        return None
    if len(box) and isinstance(box[0], (list, tuple)):
        return [one(each) for each in box]
    return one(box)


def map_box(box: Optional[list], height: int, width: int, resize: int, crop: int) -> Optional[list]:
    """A box in original pixels (or a list of boxes), after resize_crop: normalized to [0, 1]
    of the crop."""
    return _for_each_box(box, lambda one: _map_one_box(one, height, width, resize, crop))


def _map_one_box(box: list, height: int, width: int, resize: int, crop: int) -> list:
    new_height, new_width = resized_size(height, width, resize)
    scale_x, scale_y = new_width / width, new_height / height
    # center_crop's offsets, as torchvision computes them
    top = int(round((new_height - crop) / 2.0))
    left = int(round((new_width - crop) / 2.0))
    x0, y0, x1, y1 = (float(v) for v in box)
    mapped = [(x0 * scale_x - left) / crop, (y0 * scale_y - top) / crop,
              (x1 * scale_x - left) / crop, (y1 * scale_y - top) / crop]
    return [min(max(v, 0.0), 1.0) for v in mapped]


def interpolation_mode(interpolation: str) -> InterpolationMode:
    """torchvision's mode for a data.interpolation value; ValueError for anything else."""
    try:
        return _INTERPOLATION_MODES[interpolation]
    except (KeyError, TypeError):
        raise ValueError(f"interpolation={interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}") from None


def resize_crop(image: torch.Tensor, resize: int, crop: int, box: Optional[list] = None,
                max_pixels: int = DEFAULT_MAX_PIXELS, interpolation: str = "bilinear"):
    """Shorter side to `resize`, center crop `crop` (one image (3, H, W) or a batch of equal
    size); the box (pixels) follows the image and is returned normalized to [0, 1] of the crop,
    or None. `interpolation`: "bilinear" or "bicubic", antialiased either way (torchvision clamps
    bicubic's overshoot to 0..255 for uint8).

    The pixels after the resize are bounded like those before: when the resized image would hold
    more than `max_pixels` (only a long thin strip does: a 370-byte 300000x1 PNG resized to 256
    rows holds 19.7 billion), only the source pixels the crop depends on are resized, on the
    whole resize's sampling grid: the same pixels up to a rounding step (at worst shifted by half
    a resized pixel), in the memory of a few crops. Every other image is resized whole, exactly
    as before."""
    mode = interpolation_mode(interpolation)
    height, width = image.shape[-2:]
    resized_height, resized_width = resized_size(height, width, resize)
    if resized_height * resized_width > max_pixels:
        image = _resize_crop_window(image, resize, crop, interpolation)
    else:
        image = TF.center_crop(TF.resize(image, [resize], interpolation=mode, antialias=True), [crop, crop])
    return image, map_box(box, height, width, resize, crop)


def _resize_crop_window(image: torch.Tensor, resize: int, crop: int, interpolation: str = "bilinear") -> torch.Tensor:
    """center_crop(resize(image, [resize]), [crop, crop]) computed from the source pixels that the
    crop's window depends on, resized at the same scale. Refusing such images instead would lose
    them, and capping the aspect ratio would still let a large `resize` multiply the pixels."""
    mode = interpolation_mode(interpolation)
    support = _FILTER_SUPPORT[interpolation]
    height, width = image.shape[-2:]
    resized_height, resized_width = resized_size(height, width, resize)
    top, bottom, rows, row_offset = _window_span(height, resized_height, crop, support)
    left, right, columns, column_offset = _window_span(width, resized_width, crop, support)
    resized = TF.resize(image[..., top:bottom, left:right].contiguous(), [rows, columns], interpolation=mode,
                        antialias=True)
    if row_offset is not None:
        resized = resized[..., row_offset:row_offset + crop, :]
    if column_offset is not None:
        resized = resized[..., column_offset:column_offset + crop]
    # An axis resized whole is cropped (or padded, when crop > resize) as center_crop does.
    return TF.center_crop(resized, [crop, crop])


def _window_span(size: int, resized: int, crop: int, support: float = 1.0) -> tuple[int, int, int, Optional[int]]:
    """Along one axis of `size` source pixels that the whole resize makes `resized` long: the source
    pixels [first, stop) that center_crop's `crop` pixels depend on, the length to resize them to,
    and where the crop starts in that resize (None: the whole axis is resized, and center_crop
    finds the crop itself). `support`: the filter's reach in source pixels when upscaling
    (bilinear 1, bicubic 2), widened by 1/scale when downscaling.

    The resize of a span lands on the whole resize's sampling grid when both ends fall on whole
    resized pixels (edge * resized / size an integer); the ends are moved outwards, by at most
    one crop's worth of resized pixels, to where they come nearest, so the crop matches the whole
    resize's to a rounding step where such ends exist and is shifted by at most half a resized
    pixel where none do."""
    start = int(round((resized - crop) / 2.0))  # center_crop's offset in the whole resize
    scale = resized / size  # resized pixels per source pixel
    # The antialiasing filter reaches `support` source pixels when upscaling and support/scale when
    # downscaling (bilinear: 1 and 1/scale, bicubic: 2 and 2/scale); one more covers the rounding
    # of the span's ends.
    reach = math.ceil(support * max(1.0, 1.0 / scale)) + 1
    first = max(0, math.floor(start / scale) - reach)
    stop = min(size, math.ceil((start + crop) / scale) + reach)
    if crop >= resized or (first == 0 and stop == size):
        return 0, size, resized, None
    spare = math.ceil(crop / scale)

    def off_grid(edge: int) -> float:
        return abs(edge * scale - round(edge * scale))
    first = min(range(first, max(0, first - spare) - 1, -1), key=off_grid)
    stop = min(range(stop, min(size, stop + spare) + 1), key=off_grid)
    length = round((stop - first) * scale)
    offset = min(max(int(round(start - first * scale)), 0), length - crop)
    return first, stop, length, offset


# libjpeg-turbo's DCT scaling decodes straight to 1/2, 1/4 or 1/8 of the size (Pillow's draft),
# skipping most of the inverse DCT, upsampling and colour conversion. Entropy decoding still reads
# every coefficient, so a 1/8-scale decode still costs 40-80% of a full one: the more bits each
# pixel takes, the more.
_DCT_SCALES = (8, 4, 2)
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height


def decode_resize_crop(payload: bytes, resize: int, crop: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                       box: Optional[list] = None, interpolation: str = "bilinear") -> tuple[torch.Tensor, Optional[list]]:
    """`resize_crop(decode_rgb(payload, max_pixels), resize, crop, box, interpolation=...)` with the
    same meaning and the same errors, faster for JPEGs: uint8 (3, crop, crop) and the box
    normalized to [0, 1] of the crop (or None).

    A JPEG whose shorter side is at least `resize` is decoded at 1/2, 1/4 or 1/8 of its size when
    the reduced shorter side stays >= `resize` (no detail the resize keeps is lost), and only the
    part that the center crop keeps is resized, straight to (crop, crop). That part's edges are
    rounded to whole decoded pixels, so the result may be shifted by up to half a decoded pixel
    against resize_crop's, and DCT scaling filters differently from the antialiasing resize; the
    box follows this geometry. Everything else (other formats, images smaller than `resize`, JPEGs Pillow
    cannot decode at reduced size) takes exactly resize_crop(decode_rgb(...)). DCT scaling serves
    either filter: the reduced image keeps at least `resize` pixels on its shorter side, and the
    filter does the rest of the downscaling."""
    mode = interpolation_mode(interpolation)  # a bad value raises before any decoding
    with open_header(payload, max_pixels) as header:
        width, height = header.size
        if (header.format not in ("JPEG", "MPO") or header.mode not in _FAST_MODES
                or min(width, height) < resize):
            return resize_crop(_decode_opened(payload, header), resize, crop, box, max_pixels, interpolation)
        try:
            orientation = header.getexif().get(_EXIF_ORIENTATION, 1)
        except _DECODE_ERRORS:  # Pillow could not parse the EXIF block; torchvision reads its own
            return resize_crop(decode_rgb(payload, max_pixels), resize, crop, box, max_pixels, interpolation)
        if orientation in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
        scale = _dct_scale(min(width, height), resize) if header.mode in ("RGB", "L") else 1
        if scale > 1:
            image = _decode_jpeg_reduced(header, scale)
            if image is None:  # decode_rgb's decoder decides, and words the error as it always has
                return resize_crop(decode_rgb(payload, max_pixels), resize, crop, box, max_pixels, interpolation)
        else:
            image = _decode_opened(payload, header).permute(1, 2, 0)  # torchvision: (H, W, 3) memory
            height, width = image.shape[:2]
    region = _crop_region(height, width, image.shape[0], image.shape[1], resize, crop, scale)
    top, left, bottom, right = region
    # One copy of the kept part, channels last: the layout torch's uint8 antialiasing resize is
    # fast on (on a strided view it is ~1.4x slower, and resizing the whole image wastes the
    # margins). np.array's copy is also writable, unlike the buffer Pillow's pixels come in.
    kept = image[top:bottom, left:right]
    pixels = torch.from_numpy(np.array(kept)) if isinstance(kept, np.ndarray) else kept.contiguous()
    if pixels.dim() == 2:
        pixels = pixels.unsqueeze(-1)
    pixels = pixels.permute(2, 0, 1)
    if pixels.shape[1:] != (crop, crop):
        pixels = TF.resize(pixels, [crop, crop], interpolation=mode, antialias=True)
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1).contiguous()
    return pixels, _box_in_region(box, scale, region)


def _dct_scale(short_side: int, resize: int) -> int:
    """The largest DCT scaling denominator whose reduced shorter side is still >= resize."""
    for scale in _DCT_SCALES:
        if short_side >= resize * scale:
            return scale
    return 1


def _decode_jpeg_reduced(header: Image.Image, scale: int) -> Optional[np.ndarray]:
    """(H, W, 3) or (H, W) uint8 of an opened RGB or grayscale JPEG decoded at 1/scale of its size,
    EXIF orientation applied; None when Pillow cannot decode it so or the data is bad."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        return None  # Pillow would grey-fill a truncated file; decode_rgb's decoder raises instead
    width, height = header.size
    drafted = header.draft(header.mode, (width // scale, height // scale))
    if drafted is None or drafted[1][2] * scale != width:
        return None
    try:
        header.load()
        ImageOps.exif_transpose(header, in_place=True)
        return np.asarray(header)
    except _DECODE_ERRORS:
        return None


def _crop_region(height: int, width: int, decoded_height: int, decoded_width: int, resize: int, crop: int,
                 scale: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) in pixels of a (height, width) image decoded at 1/scale: the part
    that resize_crop's center crop keeps, its edges taken from resize_crop's own rounding and then
    rounded to whole decoded pixels."""
    resized_height, resized_width = resized_size(height, width, resize)
    crop_top = int(round((resized_height - crop) / 2.0))
    crop_left = int(round((resized_width - crop) / 2.0))
    per_row = height / resized_height / scale  # decoded pixels per resized pixel
    per_column = width / resized_width / scale
    top = min(round(crop_top * per_row), decoded_height - 1)
    left = min(round(crop_left * per_column), decoded_width - 1)
    bottom = min(max(round((crop_top + crop) * per_row), top + 1), decoded_height)
    right = min(max(round((crop_left + crop) * per_column), left + 1), decoded_width)
    return top, left, bottom, right


def _box_in_region(box: Optional[list], scale: int, region: tuple[int, int, int, int]) -> Optional[list]:
    """A box in original pixels (or a list of boxes), normalized to [0, 1] of the region that was
    resized to the crop; original pixel x lies at x / scale in the DCT-scaled image."""
    return _for_each_box(box, lambda one: _one_box_in_region(one, scale, region))


def _one_box_in_region(box: list, scale: int, region: tuple[int, int, int, int]) -> list:
    top, left, bottom, right = region
    x0, y0, x1, y1 = (float(v) for v in box)
    mapped = [(x0 / scale - left) / (right - left), (y0 / scale - top) / (bottom - top),
              (x1 / scale - left) / (right - left), (y1 / scale - top) / (bottom - top)]
    return [min(max(v, 0.0), 1.0) for v in mapped]


MAX_BOXES = 64  # per sample: more boxes than this in a record's metadata are not read


def _valid_box(box) -> bool:
    return (isinstance(box, (list, tuple)) and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
            and box[2] > box[0] and box[3] > box[1])


def box_from_meta(meta: Optional[dict]) -> Optional[list]:
    """The first valid object box of a record's metadata ({"box": [...]} or {"boxes": [[...], ...]},
    pixels x0, y0, x1, y1 of the original image), or None."""
    boxes = boxes_from_meta(meta)
    return boxes[0] if boxes else None


def boxes_from_meta(meta: Optional[dict]) -> Optional[list]:
    """Every valid box (up to MAX_BOXES) of a record's metadata, or None. Metadata is data: boxes
    that are not four finite numbers with x1 > x0 and y1 > y0 are skipped, never an error."""
    if not isinstance(meta, dict):
        return None
    found = meta.get("boxes")
    if _valid_box(found):  # one box given as `boxes`
        found = [found]
    if not isinstance(found, (list, tuple)):
        found = [meta.get("box")]
    boxes = [list(map(float, box)) for box in list(found)[:MAX_BOXES] if _valid_box(box)]
    return boxes or None
