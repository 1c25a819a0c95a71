"""decode_resize_crop against the path it replaces, resize_crop(decode_rgb(...)): the same pixels
up to stated tolerances, exactly the same where no shortcut applies, the same errors, and a box
that follows the geometry actually used."""

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin

from gradcam_batch.data.transforms import (CorruptImage, ImageTooLarge, decode_resize_crop, decode_rgb,
                                           map_box, resize_crop)

# Mean absolute difference (0-255 scale) allowed against the old path on photo-like images.
# Without DCT scaling only the geometry differs: the kept region is rounded to whole source pixels,
# a shift of at most half a source pixel, which moves textured content by ~1 level (measured
# 0.6-1.6 on these images). With DCT scaling the low-pass filter differs as well: libjpeg-turbo
# averages within 8x8 blocks where the old path applies a triangle filter as wide as the scale
# factor; measured 1.5-2.5 at 1/2 and 1/4 and up to 3.7 at 1/8, whose blocks collapse texture of
# exactly this images' 8-pixel period. A wrong orientation, channel order or crop costs tens.
TOLERANCE_REGION_ONLY = 2.0
TOLERANCE_DCT_SCALED = 4.5


def photo_jpeg(rng: np.random.Generator, width: int, height: int, grain: float = 9.0, mode: str = "RGB",
               quality: int = 90, **options) -> bytes:
    """Photo-like content as the benchmarks make it: a smooth colour field, texture at 1/8 of the
    resolution and per-pixel grain."""
    coarse = (rng.random((int(rng.integers(4, 9)), int(rng.integers(5, 11)), 3)) * 255).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    texture = (rng.standard_normal((max(height // 8, 1), max(width // 8, 1), 3)) * 26 + 128).clip(0, 255)
    texture = np.asarray(Image.fromarray(texture.astype(np.uint8)).resize((width, height), Image.BILINEAR))
    pixels = field + texture.astype(np.float32) - 128 + rng.standard_normal((height, width, 3)) * grain
    return encode(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).convert(mode), "JPEG",
                  quality=quality, **options)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def old_path(payload: bytes, resize: int, crop: int, max_pixels: int = 89_478_485, box=None):
    return resize_crop(decode_rgb(payload, max_pixels), resize, crop, box)


def mean_difference(first: torch.Tensor, second: torch.Tensor) -> float:
    return float((first.float() - second.float()).abs().mean())


@pytest.fixture
def draft_scales(monkeypatch) -> list:
    """The DCT scale of every JPEG decoded at reduced size during the test."""
    scales = []
    original = JpegImagePlugin.JpegImageFile.draft

    def recording_draft(image, mode, size):
        width = image.size[0]
        result = original(image, mode, size)
        if result is not None:
            scales.append(round(width / result[1][2]))
        return result
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording_draft)
    return scales


# --- the same pixels as the old path ----------------------------------------------------------

@pytest.mark.parametrize("width, height, resize, crop, scale", [
    (200, 150, 128, 112, 1),  # short side in [resize, 2 resize): full-size decode, region resize
    (150, 200, 128, 112, 1),  # portrait: the region is cut across rows, not columns
    (300, 260, 128, 112, 2),
    (641, 519, 128, 112, 4),  # sizes no multiple of 8: the reduced image's last pixel is partial
    (1100, 1030, 128, 112, 8),
    (500, 375, 256, 224, 1),  # the pipeline benchmark's images and sizes
    (1200, 900, 256, 224, 2),
    (700, 100, 64, 56, 1),  # 7:1: most of the width is never resized
])
@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_the_old_path_on_photo_like_jpegs(width, height, resize, crop, scale, seed, draft_scales):
    payload = photo_jpeg(np.random.default_rng([seed, width, height]), width, height)
    want, _ = old_path(payload, resize, crop)
    image, _ = decode_resize_crop(payload, resize, crop)
    assert image.shape == (3, crop, crop) and image.dtype == torch.uint8
    assert draft_scales == ([scale] if scale > 1 else [])
    tolerance = TOLERANCE_DCT_SCALED if scale > 1 else TOLERANCE_REGION_ONLY
    assert mean_difference(image, want) <= tolerance


def test_scale_is_the_largest_that_keeps_the_shorter_side_at_least_resize(draft_scales):
    rng = np.random.default_rng(3)
    for short_side, scale in [(255, None), (256, 1), (511, 1), (512, 2), (1023, 2), (1024, 4), (2048, 8),
                              (5000, 8)]:
        payload = photo_jpeg(rng, short_side + 40, short_side, grain=0)
        if scale is None:  # smaller than the resize: the old path exactly, upscaling included
            assert torch.equal(decode_resize_crop(payload, 256, 224)[0], old_path(payload, 256, 224)[0])
        else:
            decode_resize_crop(payload, 256, 224)
        assert draft_scales == ([scale] if scale and scale > 1 else []), short_side
        draft_scales.clear()


@pytest.mark.parametrize("options", [{"progressive": True}, {"subsampling": 0}, {"subsampling": 1}],
                         ids=["progressive", "4:4:4", "4:2:2"])
def test_jpeg_variants_agree(options, draft_scales):
    payload = photo_jpeg(np.random.default_rng(4), 600, 520, **options)
    want, _ = old_path(payload, 128, 112)
    image, _ = decode_resize_crop(payload, 128, 112)
    assert draft_scales == [4]
    assert mean_difference(image, want) <= TOLERANCE_DCT_SCALED


def test_grayscale_jpeg_gives_three_equal_channels(draft_scales):
    for width, height, scale in [(600, 520, 4), (150, 140, 1)]:
        payload = photo_jpeg(np.random.default_rng(width), width, height, mode="L")
        want, _ = old_path(payload, 128, 112)
        image, _ = decode_resize_crop(payload, 128, 112)
        assert image.shape == (3, 112, 112)
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
        assert mean_difference(image, want) <= (TOLERANCE_DCT_SCALED if scale > 1 else TOLERANCE_REGION_ONLY)
    assert draft_scales == [4]


def test_cmyk_jpeg_agrees_without_dct_scaling(draft_scales):
    """Pillow and torchvision convert CMYK differently; the full-size torchvision decode keeps the
    old colours."""
    payload = photo_jpeg(np.random.default_rng(5), 600, 520, mode="CMYK")
    want, _ = old_path(payload, 128, 112)
    image, _ = decode_resize_crop(payload, 128, 112)
    assert draft_scales == []
    assert mean_difference(image, want) <= TOLERANCE_REGION_ONLY


def test_mpo_camera_file_agrees(draft_scales):
    """A camera JPEG with a second image appended (MPO): its first image, at reduced size."""
    first = Image.open(io.BytesIO(photo_jpeg(np.random.default_rng(6), 600, 520)))
    second = Image.new("RGB", (600, 520), (255, 0, 0))
    payload = encode(first, "MPO", save_all=True, append_images=[second], quality=90)
    assert Image.open(io.BytesIO(payload)).format == "MPO"
    want, _ = old_path(payload, 128, 112)
    image, _ = decode_resize_crop(payload, 128, 112)
    assert draft_scales == [4]
    assert mean_difference(image, want) <= TOLERANCE_DCT_SCALED


@pytest.mark.parametrize("fmt, options", [
    ("PNG", {}), ("WEBP", {"quality": 90}), ("GIF", {}), ("BMP", {}), ("TIFF", {}),
    ("PNG-RGBA", {}),
])
def test_other_formats_take_the_old_path_exactly(fmt, options, draft_scales):
    rng = np.random.default_rng(7)
    image = Image.open(io.BytesIO(photo_jpeg(rng, 300, 260)))
    if fmt == "PNG-RGBA":
        image.putalpha(Image.linear_gradient("L").resize(image.size))
        fmt = "PNG"
    payload = encode(image, fmt, **options)
    box = [30, 40, 250, 200]
    want, want_box = old_path(payload, 128, 112, box=box)
    got, got_box = decode_resize_crop(payload, 128, 112, box=box)
    assert torch.equal(got, want) and got_box == want_box
    assert draft_scales == []


def test_jpeg_smaller_than_the_resize_takes_the_old_path_exactly(draft_scales):
    for width, height in [(100, 90), (1, 1), (300, 60)]:  # upscaled: no DCT scaling, no region
        payload = photo_jpeg(np.random.default_rng(width), width, height)
        box = [0, 0, width / 2, height / 2]
        want, want_box = old_path(payload, 128, 112, box=box)
        got, got_box = decode_resize_crop(payload, 128, 112, box=box)
        assert torch.equal(got, want) and got_box == want_box
    assert draft_scales == []


@pytest.mark.parametrize("width, height, resize, crop", [
    (3000, 130, 128, 112),  # 23:1 landscape, no DCT scaling
    (140, 2600, 128, 112),  # 19:1 portrait
    (4100, 260, 128, 112),  # 16:1 at 1/2
    (260, 4100, 64, 64),  # crop == resize: only the long side is cut, at 1/4
])
def test_very_elongated_images(width, height, resize, crop):
    payload = photo_jpeg(np.random.default_rng(width * height), width, height, grain=3)
    want, _ = old_path(payload, resize, crop)
    image, box = decode_resize_crop(payload, resize, crop, box=[0, 0, width, height])
    assert image.shape == (3, crop, crop)
    tolerance = TOLERANCE_DCT_SCALED if min(width, height) >= 2 * resize else TOLERANCE_REGION_ONLY
    assert mean_difference(image, want) <= tolerance
    assert box == [0.0, 0.0, 1.0, 1.0]  # the whole image covers the whole crop


# --- EXIF orientation --------------------------------------------------------------------------

# Inverse of each orientation's display transform, so that the stored pixels display as `upright`.
STORE_FOR_DISPLAY = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def marked_picture(width: int, height: int, box: list, mark: list = None) -> Image.Image:
    """Dark, smooth background with a bright rectangle at `box` (x0, y0, x1, y1) and, if given, a
    grey square at `mark`, so that any flip or rotation shows."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = np.linspace(20, 60, width, dtype=np.uint8)[None, :]
    pixels[..., 1] = np.linspace(30, 50, height, dtype=np.uint8)[:, None]
    pixels[..., 2] = 40
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = (235, 225, 215)
    if mark is not None:
        x0, y0, x1, y1 = mark
        pixels[y0:y1, x0:x1] = (120, 120, 120)
    return Image.fromarray(pixels)


def kept_square(width: int, height: int, resize: int, crop: int) -> tuple[float, float, float]:
    """(left, top, side) in original pixels of the square the center crop keeps."""
    side = crop * min(width, height) / resize
    return (width - side) / 2, (height - side) / 2, side


def bright_extent(image: torch.Tensor) -> list:
    """(x0, y0, x1, y1) of the bright rectangle in crop pixels, edges at the half-way level."""
    bright = image.float().mean(0) > 160
    columns = bright.float().mean(0) > 0.5 * bright.float().mean(0).max()
    rows = bright.float().mean(1) > 0.5 * bright.float().mean(1).max()
    column_index, row_index = columns.nonzero().flatten(), rows.nonzero().flatten()
    return [float(column_index[0]), float(row_index[0]), float(column_index[-1] + 1), float(row_index[-1] + 1)]


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("width, height, scale", [(600, 440, 2), (250, 180, 1)])
def test_exif_orientation_matches_the_old_path(orientation, width, height, scale, draft_scales):
    box = [width // 3, height // 3, width // 2, height * 2 // 3]
    left, top, side = kept_square(width, height, 200, 160)
    mark = [round(left + side * 0.03), round(top + side * 0.03), round(left + side * 0.12), round(top + side * 0.12)]
    upright = marked_picture(width, height, box, mark)
    stored = upright if orientation == 1 else upright.transpose(STORE_FOR_DISPLAY[orientation])
    exif = stored.getexif()
    exif[0x0112] = orientation
    payload = encode(stored, "JPEG", quality=95, exif=exif)
    assert ImageOps.exif_transpose(Image.open(io.BytesIO(payload))).size == (width, height)

    want, want_box = old_path(payload, 200, 160, box=box)
    image, got_box = decode_resize_crop(payload, 200, 160, box=box)
    assert draft_scales == ([scale] if scale > 1 else [])
    assert mean_difference(image, want) <= TOLERANCE_DCT_SCALED
    dim_corner = image[:, 8:16, 8:16].float().mean()  # the grey mark stays top-left
    assert 90 < dim_corner < 150, dim_corner
    assert all(abs(a - b) <= 1.5 / 160 for a, b in zip(got_box, want_box))
    assert all(abs(a - b * 160) <= 1.5 for a, b in zip(bright_extent(image), got_box))


# --- the box follows the geometry used -----------------------------------------------------------

@pytest.mark.parametrize("width, height, resize, crop", [
    (500, 375, 256, 224),  # region only
    (375, 500, 256, 224),
    (1203, 899, 256, 224),  # 1/2, odd sizes
    (1100, 1030, 128, 112),  # 1/8
    (2000, 300, 128, 96),  # elongated: the box's x is far from the original's
])
def test_box_lands_on_the_marked_rectangle(width, height, resize, crop):
    x_margin, y_margin, kept = kept_square(width, height, resize, crop)
    box = [round(x_margin + kept * 0.2), round(y_margin + kept * 0.35),
           round(x_margin + kept * 0.7), round(y_margin + kept * 0.9)]
    payload = encode(marked_picture(width, height, box), "JPEG", quality=95)
    image, got_box = decode_resize_crop(payload, resize, crop, box=box)
    extent = bright_extent(image)
    assert all(abs(a - b * crop) <= 1.0 for a, b in zip(extent, got_box)), (extent, got_box)
    want_box = map_box(box, height, width, resize, crop)  # the old geometry, within a pixel
    assert all(abs(a - b) <= 1.0 / crop for a, b in zip(got_box, want_box))


def test_box_outside_the_crop_clamps_like_map_box():
    payload = photo_jpeg(np.random.default_rng(8), 1200, 600, grain=0)
    for box in ([0, 0, 100, 100], [1150, 0, 1200, 30], [-50, -50, 5000, 5000]):
        _, got_box = decode_resize_crop(payload, 256, 224, box=box)
        want_box = map_box(box, 600, 1200, 256, 224)
        assert all(abs(a - b) <= 1 / 224 for a, b in zip(got_box, want_box)), (got_box, want_box)
        assert [v for v in got_box if v in (0.0, 1.0)] == [v for v in want_box if v in (0.0, 1.0)]
    assert decode_resize_crop(payload, 256, 224, box=[-50, -50, 5000, 5000])[1] == [0.0, 0.0, 1.0, 1.0]
    assert decode_resize_crop(payload, 256, 224)[1] is None


# --- the same errors ---------------------------------------------------------------------------

def with_declared_size(payload: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF0) claiming another size; the data is left as it was."""
    marker = payload.index(b"\xff\xc0")
    header = bytearray(payload)
    header[marker + 5:marker + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(header)


def bad_payloads() -> dict:
    big = photo_jpeg(np.random.default_rng(9), 600, 520)  # decoded at 1/4 when whole
    small = photo_jpeg(np.random.default_rng(10), 200, 150)
    png = encode(Image.open(io.BytesIO(small)), "PNG")
    return {
        "empty": (b"", 89_478_485),
        "text": (b"not an image at all\n" * 20, 89_478_485),
        "random bytes": (np.random.default_rng(11).bytes(5000), 89_478_485),
        "jpeg magic only": (b"\xff\xd8\xff", 89_478_485),
        "scaled jpeg cut in half": (big[:len(big) // 2], 89_478_485),
        "scaled jpeg cut at 99%": (big[:len(big) * 99 // 100], 89_478_485),
        "scaled jpeg missing its end marker": (big[:-2], 89_478_485),
        "scaled jpeg header only": (big[:big.index(b"\xff\xda") + 20], 89_478_485),
        "full-size jpeg cut in half": (small[:len(small) // 2], 89_478_485),
        "png cut in half": (png[:len(png) // 2], 89_478_485),
        "jpeg over max_pixels": (big, 100_000),
        "jpeg declaring 30000x30000": (with_declared_size(big, 30000, 30000), 89_478_485),
        "jpeg declaring 5000x5000": (with_declared_size(big, 5000, 5000), 1_000_000),
    }


@pytest.mark.parametrize("name", list(bad_payloads()))
def test_errors_are_the_old_paths(name):
    payload, max_pixels = bad_payloads()[name]
    with pytest.raises((CorruptImage, ImageTooLarge)) as old_error:
        old_path(payload, 128, 112, max_pixels)
    with pytest.raises(type(old_error.value), match=f"^{re.escape(str(old_error.value))}$"):
        decode_resize_crop(payload, 128, 112, max_pixels)
    assert "\n" not in str(old_error.value)


def test_bombs_are_refused_from_the_header(draft_scales):
    """The declared size is refused before any pixel is read: the data behind it is garbage, so
    decoding would have raised CorruptImage instead."""
    payload = with_declared_size(photo_jpeg(np.random.default_rng(12), 600, 520), 4000, 4000)
    with pytest.raises(ImageTooLarge, match="4000x4000"):
        decode_resize_crop(payload, 128, 112, max_pixels=10_000_000)
    assert draft_scales == []


def test_truncated_jpeg_is_an_error_even_when_pillow_is_told_to_fill_it(monkeypatch):
    payload = photo_jpeg(np.random.default_rng(13), 600, 520)
    cut = payload[:len(payload) * 3 // 4]
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # Pillow would grey-fill the rest
    with pytest.raises(CorruptImage, match="truncated"):
        decode_resize_crop(cut, 128, 112)
    assert mean_difference(decode_resize_crop(payload, 128, 112)[0], old_path(payload, 128, 112)[0]) \
        <= TOLERANCE_DCT_SCALED


def test_corrupt_but_complete_jpeg_decodes_as_the_old_path_does():
    """Flipped bytes inside the entropy-coded data: libjpeg warns and both decoders carry on."""
    payload = bytearray(photo_jpeg(np.random.default_rng(14), 600, 520))
    payload[len(payload) // 2] ^= 0x5A
    want, _ = old_path(bytes(payload), 128, 112)
    image, _ = decode_resize_crop(bytes(payload), 128, 112)
    assert image.shape == want.shape
    assert mean_difference(image, want) <= 3 * TOLERANCE_DCT_SCALED  # both show the same damage
