"""decode_rgb on every kind of file a real dataset holds: bad data raises a one-line error, bombs
are refused before decoding, odd but valid images decode to RGB with one meaning."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from gradcam_batch.config import DataConfig
from gradcam_batch.data import transforms
from gradcam_batch.data.loader import ShardBatches
from gradcam_batch.data.shards import list_shards
from gradcam_batch.data.transforms import CorruptImage, ImageTooLarge, decode_rgb, resize_crop


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def smooth_rgb(height=120, width=160, seed=0) -> np.ndarray:
    """Photo-like content: random colours upsampled, so JPEG sizes and artefacts are realistic."""
    coarse = np.random.default_rng(seed).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return np.array(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    """A PNG written by hand: lets a test declare any size, or store 16-bit RGB (Pillow can't)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def rgba_rows() -> np.ndarray:
    """Rows of alpha 0, 255, 128, 64 over the colour (200, 100, 50)."""
    pixels = np.zeros((4, 3, 4), np.uint8)
    pixels[..., :3] = (200, 100, 50)
    pixels[..., 3] = np.array([0, 255, 128, 64], np.uint8)[:, None]
    return pixels


def assert_composited_on_black(image: torch.Tensor):
    assert image.shape == (3, 4, 3) and image.dtype == torch.uint8
    colour = torch.tensor([200, 100, 50])
    assert torch.equal(image[:, 0], torch.zeros(3, 3, dtype=torch.uint8))  # alpha 0: black
    assert torch.equal(image[:, 1].int(), colour[:, None].expand(3, 3).int())  # alpha 255: unchanged
    half = (colour * 128 / 255)[:, None]
    assert (image[:, 2].float() - half).abs().max() <= 1  # alpha 128: about half
    assert (image[:, 3].float() - colour[:, None] * 64 / 255).abs().max() <= 1


# --- bad data: one clear error each ---------------------------------------------------------

def test_empty_file_raises():
    with pytest.raises(CorruptImage, match="empty file"):
        decode_rgb(b"")


@pytest.mark.parametrize("payload", [b"hello, this is a text file\n" * 20,
                                     np.random.default_rng(0).bytes(4000),
                                     b"\xff\xd8\xff"],  # a JPEG signature and nothing else
                         ids=["text", "random", "jpeg-magic-only"])
def test_not_an_image_raises(payload):
    with pytest.raises(CorruptImage) as caught:
        decode_rgb(payload)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 200
    assert isinstance(caught.value, ValueError)  # callers may catch ValueError


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_truncated_file_raises_instead_of_grey_fill(fmt):
    payload = encode(Image.fromarray(smooth_rgb()), fmt)
    decode_rgb(payload)  # the whole file is fine
    with pytest.raises(CorruptImage) as caught:
        decode_rgb(payload[:len(payload) // 2])
    message = str(caught.value)
    assert ".cpp" not in message and "\n" not in message  # no C++ source paths in the error rows
    if fmt != "WEBP":  # Pillow can't even read a cut WEBP's header, so the message is generic
        assert "truncated" in message and fmt in message


@pytest.mark.parametrize("damage", ["flipped byte", "garbage pixel data", "cut pixel stream"])
def test_corrupt_png_raises_instead_of_crashing(damage):
    """torchvision 0.29's decode_png dies with SIGSEGV on each of these: a crash here would take
    down a DataLoader worker and the whole run. (If this test segfaults, PNGs reach it again.)"""
    rows = b"".join(b"\x00" + bytes(range(i, i + 30)) for i in range(20))  # 30x20 grey, filter 0
    if damage == "flipped byte":
        payload = bytearray(png_bytes(30, 20, 8, 0, zlib.compress(rows)))
        payload[45] ^= 0xFF  # inside IDAT: its CRC no longer matches
        payload = bytes(payload)
    elif damage == "garbage pixel data":
        payload = png_bytes(30, 20, 8, 0, b"this is not a zlib stream")
    else:  # a writer that died mid-stream, then closed the file properly
        payload = png_bytes(30, 20, 8, 0, zlib.compress(rows)[:40])
    assert decode_rgb(png_bytes(30, 20, 8, 0, zlib.compress(rows)))[0, 19, 29] == 48  # intact: fine
    with pytest.raises(CorruptImage, match="PNG"):
        decode_rgb(payload)


def test_jpeg_missing_its_end_marker_raises():
    payload = encode(Image.fromarray(smooth_rgb()), "JPEG", quality=90)
    assert payload.endswith(b"\xff\xd9")
    with pytest.raises(CorruptImage, match="truncated"):
        decode_rgb(payload[:-2])


def test_trailing_bytes_after_a_complete_jpeg_are_fine():
    """Some cameras and uploaders append padding or metadata after the end marker."""
    pixels = smooth_rgb()
    payload = encode(Image.fromarray(pixels), "JPEG", quality=95)
    for tail in (bytes(100), b"garbage" * 10):
        image = decode_rgb(payload + tail)
        assert image.shape == (3, 120, 160)
        assert (image.permute(1, 2, 0).float() - torch.from_numpy(pixels).float()).abs().mean() < 3


# --- decompression bombs: refused from the header, before any pixel is decoded -----------------

def test_image_over_max_pixels_raises_and_names_the_limit():
    payload = encode(Image.fromarray(smooth_rgb(300, 300)), "PNG")
    with pytest.raises(ImageTooLarge) as caught:
        decode_rgb(payload, max_pixels=10_000)
    message = str(caught.value)
    assert "300x300" in message and "90,000 pixels" in message and "data.max_pixels=10,000" in message
    assert decode_rgb(payload, max_pixels=90_000).shape == (3, 300, 300)  # the limit itself is allowed


@pytest.mark.parametrize("width, height, max_pixels, size_text", [
    (5000, 5000, 1_000_000, "5000x5000"),  # under Pillow's own limit: our check refuses it
    (100_000, 100_000, 89_478_485, "10,000,000,000 pixels"),  # Pillow refuses while opening
])
def test_crafted_png_header_is_refused_without_decoding(width, height, max_pixels, size_text):
    # The pixel data is garbage: decoding it would raise CorruptImage, so ImageTooLarge proves
    # the refusal came from the header alone.
    payload = png_bytes(width, height, 8, 0, idat=b"not zlib data")
    with pytest.raises(ImageTooLarge) as caught:
        decode_rgb(payload, max_pixels=max_pixels)
    assert size_text in str(caught.value) and f"data.max_pixels={max_pixels:,}" in str(caught.value)


# --- odd but valid images ------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_grayscale_gives_three_equal_channels(fmt):
    gray = smooth_rgb()[..., 0]
    image = decode_rgb(encode(Image.fromarray(gray), fmt, **({"quality": 95} if fmt == "JPEG" else {})))
    assert image.shape == (3, 120, 160) and image.dtype == torch.uint8
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    error = (image[0].float() - torch.from_numpy(gray).float()).abs().mean()
    assert error == 0 if fmt == "PNG" else error < 3


@pytest.mark.parametrize("fmt, options", [("PNG", {}), ("WEBP", {"lossless": True}), ("TIFF", {})])
def test_rgba_is_composited_on_black(fmt, options):
    """torchvision's RGB mode drops alpha (alpha 128 would keep full colour): such files must
    take the compositing path."""
    assert_composited_on_black(decode_rgb(encode(Image.fromarray(rgba_rows(), "RGBA"), fmt, **options)))


def test_la_is_composited_on_black():
    pixels = rgba_rows()[..., [0, 3]]  # grey level 200 with the same alphas
    image = decode_rgb(encode(Image.fromarray(pixels, "LA"), "PNG"))
    assert image.shape == (3, 4, 3)
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    assert image[0, 0].max() == 0 and image[0, 1].min() == 200
    assert abs(int(image[0, 2, 0]) - 100) <= 1 and abs(int(image[0, 3, 0]) - 50) <= 1


def test_palette_without_transparency():
    palette_image = Image.fromarray(smooth_rgb(30, 40)).convert("P")
    expected = torch.from_numpy(np.asarray(palette_image.convert("RGB")).copy()).permute(2, 0, 1)
    image = decode_rgb(encode(palette_image, "PNG"))
    assert torch.equal(image, expected)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_is_composited_on_black(fmt):
    palette_image = Image.new("P", (4, 2))
    palette_image.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    palette_image.putdata([1, 1, 2, 2,
                           1, 2, 1, 2])
    image = decode_rgb(encode(palette_image, fmt, transparency=2))  # blue is the transparent index
    assert image.shape == (3, 2, 4)
    red = torch.tensor([255, 0, 0], dtype=torch.uint8)
    black = torch.zeros(3, dtype=torch.uint8)
    for (row, column), index in zip([(r, c) for r in range(2) for c in range(4)], [1, 1, 2, 2, 1, 2, 1, 2]):
        assert torch.equal(image[:, row, column], red if index == 1 else black), (row, column)


def test_cmyk_jpeg_converts_to_rgb():
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    red, green, blue = decode_rgb(encode(cmyk, "JPEG", quality=95)).float().mean(dim=(1, 2)).tolist()
    assert red > 220 and green < 40 and blue < 40


SIXTEEN_BIT = np.array([[0, 256, 32768, 65535]], np.uint16)
EIGHT_BIT = torch.tensor([[0, 1, 128, 255]], dtype=torch.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grayscale_is_scaled_to_8_bits(fmt):
    payload = encode(Image.fromarray(SIXTEEN_BIT), fmt)
    assert Image.open(io.BytesIO(payload)).mode.startswith("I;16")
    image = decode_rgb(payload)
    assert image.dtype == torch.uint8 and image.shape == (3, 1, 4)
    assert torch.equal(image, EIGHT_BIT.expand(3, -1, -1))


def test_16_bit_rgb_png_is_scaled_to_8_bits():
    """Pillow can't write one; torchvision would return uint16 for it, the batch needs uint8."""
    samples = np.stack([SIXTEEN_BIT[0], SIXTEEN_BIT[0][::-1], np.full(4, 32768, np.uint16)], axis=-1)
    row = b"\x00" + samples.astype(">u2").tobytes()
    image = decode_rgb(png_bytes(4, 1, 16, 2, zlib.compress(row)))
    assert image.dtype == torch.uint8 and image.shape == (3, 1, 4)
    assert image[:, 0].tolist() == [[0, 1, 128, 255], [255, 128, 1, 0], [128, 128, 128, 128]]


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_one_bit_images(fmt):
    bits = np.array([[0, 255, 0], [255, 255, 0]], np.uint8)
    image = decode_rgb(encode(Image.fromarray(bits).convert("1"), fmt))
    assert image.shape == (3, 2, 3)
    assert torch.equal(image, torch.from_numpy(bits).expand(3, -1, -1))


@pytest.mark.parametrize("height, width, fmt", [(1, 1, "JPEG"), (1, 1, "PNG"), (2, 3, "PNG"), (3, 2, "GIF")])
def test_tiny_images_decode_and_upscale(height, width, fmt):
    pixels = np.full((height, width, 3), (10, 120, 240), np.uint8)
    image = decode_rgb(encode(Image.fromarray(pixels), fmt))
    assert image.shape == (3, height, width)
    cropped, _ = resize_crop(image, 32, 16)
    assert cropped.shape == (3, 16, 16) and cropped.dtype == torch.uint8
    assert (cropped.float().mean(dim=(1, 2)) - torch.tensor([10.0, 120.0, 240.0])).abs().max() < 12


# A 20 wide, 10 high picture, white in its top-left 5x5 corner, stored with an EXIF orientation:
# 6 means "rotate 90 degrees clockwise to display", 8 counter-clockwise.
@pytest.mark.parametrize("orientation, white_corner", [(6, "top-right"), (8, "bottom-left")])
@pytest.mark.parametrize("fmt, mode", [("JPEG", "RGB"), ("PNG", "RGB"), ("PNG", "RGBA")])
def test_exif_orientation_is_applied(orientation, white_corner, fmt, mode):
    pixels = np.zeros((10, 20, 4), np.uint8)
    pixels[..., 3] = 255
    pixels[:5, :5, :3] = 255
    stored = Image.fromarray(pixels, "RGBA").convert(mode)
    exif = stored.getexif()
    exif[0x0112] = orientation
    image = decode_rgb(encode(stored, fmt, exif=exif))
    assert image.shape == (3, 20, 10)
    corners = {"top-left": image[:, :5, :5], "top-right": image[:, :5, -5:],
               "bottom-left": image[:, -5:, :5], "bottom-right": image[:, -5:, -5:]}
    for name, corner in corners.items():
        mean = corner[:, 1:-1, 1:-1].float().mean()  # away from JPEG ringing at the block edge
        assert (mean > 200) if name == white_corner else (mean < 50), (name, mean)


@pytest.mark.parametrize("fmt, options, tolerance", [
    ("WEBP", {"lossless": True}, 0), ("WEBP", {"quality": 90}, 8), ("BMP", {}, 0),
    ("TIFF", {}, 0), ("TIFF", {"compression": "tiff_deflate"}, 0), ("PNG", {}, 0),
    ("JPEG", {"quality": 95}, 4), ("JPEG", {"quality": 95, "progressive": True}, 4),
])
def test_other_formats_decode_to_the_same_pixels(fmt, options, tolerance):
    pixels = smooth_rgb(48, 64)
    image = decode_rgb(encode(Image.fromarray(pixels), fmt, **options))
    assert image.shape == (3, 48, 64) and image.dtype == torch.uint8
    error = (image.permute(1, 2, 0).float() - torch.from_numpy(pixels).float()).abs().mean()
    assert error <= tolerance


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])  # torchvision: all frames / refuses / first
def test_animated_image_gives_its_first_frame(fmt):
    frames = [Image.fromarray(np.full((6, 8, 3), value, np.uint8)) for value in (40, 200, 120)]
    payload = encode(frames[0], fmt, save_all=True, append_images=frames[1:])
    image = decode_rgb(payload)
    assert image.shape == (3, 6, 8)  # torchvision alone returns (3 frames, 3, 6, 8) for the GIF
    assert abs(float(image.float().mean()) - 40) < 3


# --- the fast path stays fast and the slow path stays correct --------------------------------

def test_opaque_jpeg_and_webp_take_one_torchvision_decode(monkeypatch):
    def no_pillow_decode(image):
        raise AssertionError("an opaque JPEG/WEBP must not be decoded by Pillow")
    monkeypatch.setattr(transforms, "_decode_pillow", no_pillow_decode)
    rgb = Image.fromarray(smooth_rgb())
    for payload in (encode(rgb, "JPEG"), encode(rgb.convert("L"), "JPEG"), encode(rgb.convert("CMYK"), "JPEG"),
                    encode(rgb, "WEBP")):
        assert decode_rgb(payload).shape == (3, 120, 160)


def test_images_with_alpha_never_reach_torchvision(monkeypatch):
    def no_torchvision(*args, **kwargs):
        raise AssertionError("torchvision would drop the alpha channel")
    monkeypatch.setattr(transforms, "decode_image", no_torchvision)
    rgba = Image.fromarray(rgba_rows(), "RGBA")
    for payload in (encode(rgba, "PNG"), encode(rgba, "WEBP", lossless=True)):
        assert_composited_on_black(decode_rgb(payload))


# --- through the loader: nothing is lost -----------------------------------------------------

def test_loader_turns_good_and_odd_images_into_rows_and_bad_ones_into_errors(tmp_path):
    rgb = Image.fromarray(smooth_rgb(40, 52))
    good = {
        "a/photo.jpg": encode(rgb, "JPEG"),
        "a/photo.png": encode(rgb, "PNG"),
        "a/gray.jpg": encode(rgb.convert("L"), "JPEG"),
        "a/cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "a/rgba.png": encode(Image.fromarray(rgba_rows(), "RGBA"), "PNG"),
        "b/sixteen.png": encode(Image.fromarray(SIXTEEN_BIT), "PNG"),
        "b/tiny.gif": encode(Image.new("RGB", (1, 1), (9, 9, 9)), "GIF"),
        "b/picture.bmp": encode(rgb, "BMP"),
        "b/picture.tiff": encode(rgb, "TIFF"),
        "b/picture.webp": encode(rgb, "WEBP"),
    }
    bad = {
        "a/empty.jpg": (b"", "CorruptImage"),
        "a/notes.png": (b"not an image at all\n" * 10, "CorruptImage"),
        "b/cut.jpg": (good["a/photo.jpg"][:len(good["a/photo.jpg"]) // 2], "CorruptImage"),
        "b/cut.png": (good["a/photo.png"][:len(good["a/photo.png"]) // 2], "CorruptImage"),
        "b/bomb.png": (png_bytes(3000, 3000, 8, 0, idat=b"never decoded"), "ImageTooLarge"),
    }
    for name, payload in list(good.items()) + [(name, payload) for name, (payload, _) in bad.items()]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(payload)
    cfg = DataConfig(format="imagefolder", root=str(tmp_path), resize=32, crop=32, batch_size=4,
                     shard_size=8, max_pixels=1_000_000)
    batches = list(ShardBatches(list_shards(cfg), cfg))

    rows = [sample_id for batch in batches for sample_id in batch.sample_ids]
    errors = {error[0]: error[1:] for batch in batches for error in batch.errors}
    assert sorted(rows) == sorted(good)
    assert sorted(errors) == sorted(bad)
    assert len(rows) + len(errors) == len(good) + len(bad)  # nothing lost, nothing twice
    for sample_id, (stage, type_name, message) in errors.items():
        assert stage == "decode" and type_name == bad[sample_id][1] and message, sample_id
    assert "data.max_pixels=1,000,000" in errors["b/bomb.png"][2]
    assert all(batch.images.dtype == torch.uint8 and batch.images.shape[1:] == (3, 32, 32) for batch in batches)
    assert [batch.last for batch in batches].count(True) == len(list_shards(cfg))
