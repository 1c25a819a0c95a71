"""Images that pass data.max_pixels but would still exhaust memory, error messages that must not
carry the bytes of the file they describe, and Pillow's bomb warning, which data.max_pixels
replaces."""

import io
import json
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from gradcam_batch.data import device_decode
from gradcam_batch.data.device_decode import DeviceDecoder
from gradcam_batch.data.transforms import (CorruptImage, ImageTooLarge, decode_resize_crop, decode_rgb,
                                           device_jpeg_size, map_box, resize_crop, resized_size)

REPO = Path(__file__).resolve().parents[1]
PEAK_RSS_LIMIT = 2 * 2**30


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def with_declared_size(payload: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF0) claiming another size; the data is left as it was."""
    marker = payload.index(b"\xff\xc0")
    header = bytearray(payload)
    header[marker + 5:marker + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(header)


def smooth_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """uint8 (3, H, W) of smooth photo-like content: a coarse random field, upsampled bicubically,
    so a shift by a fraction of a pixel changes values by a level or two, not by tens."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def whole_resize_crop(image: torch.Tensor, resize: int, crop: int) -> torch.Tensor:
    """What resize_crop computes for images of ordinary shape: the whole image resized, then cropped."""
    return TF.center_crop(TF.resize(image, [resize], antialias=True), [crop, crop])


# --- the bombs: tiny files whose resize would hold billions of pixels ---------------------------

def wide_grey_png() -> bytes:
    """300000x1, 370 bytes: resizing its one row to 256 rows makes 256 x 76,800,000 pixels."""
    return png_bytes(300_000, 1, 8, 0, zlib.compress(b"\x00" + bytes(300_000), 9))


def tall_ramp_png() -> bytes:
    """1x300000 with varying content, so a wrong window shows."""
    rows = b"".join(b"\x00" + bytes([index % 251]) for index in range(300_000))
    return png_bytes(1, 300_000, 8, 0, zlib.compress(rows, 9))


def wide_jpeg(width: int) -> bytes:
    """width x 2; libjpeg writes and reads at most 65500 columns, so 65535 is declared in the header
    of a 65500-wide file."""
    pixels = (np.arange(65_500 * 2 * 3) % 256).astype(np.uint8).reshape(2, 65_500, 3)
    payload = encode(Image.fromarray(pixels), "JPEG", quality=90)
    return payload if width == 65_500 else with_declared_size(payload, width, 2)


BOMBS = {
    "300000x1 png": wide_grey_png,
    "1x300000 png": tall_ramp_png,
    "65535x2 jpeg": lambda: wide_jpeg(65_535),
    "65500x2 jpeg": lambda: wide_jpeg(65_500),
}

# Runs in a fresh interpreter so that the peak RSS is this decode's and nothing else's. The
# address-space cap (far above the asserted peak) makes a regression fail in a second with an
# allocation error instead of driving the test machine into swap.
BOMB_CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    def peak_rss():
        # VmHWM: this process's own peak; ru_maxrss would also count the forking parent's RSS, which
        # Linux carries across exec
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    from gradcam_batch.data.device_decode import DeviceDecoder
    from gradcam_batch.data.transforms import decode_resize_crop, decode_rgb, device_jpeg_size, resize_crop

    pages = int(open("/proc/self/statm").read().split()[0])
    resource.setrlimit(resource.RLIMIT_AS, (pages * resource.getpagesize() + 6 * 2**30, resource.RLIM_INFINITY))
    payload = sys.stdin.buffer.read()
    paths = {
        "decode_resize_crop": lambda: decode_resize_crop(payload, 256, 224)[0],
        "resize_crop(decode_rgb)": lambda: resize_crop(decode_rgb(payload), 256, 224)[0],
    }
    if device_jpeg_size(payload) is not None:
        def device_path():
            images, failed = DeviceDecoder(256, 224, torch.device("cpu"))([payload])
            if failed:
                raise failed[0]
            return images[0]
        paths["DeviceDecoder"] = device_path
    report = {}
    for name, path in paths.items():
        try:
            outcome = list(path().shape)
        except Exception as error:
            outcome = [type(error).__name__, str(error)]
        report[name] = [outcome, peak_rss()]
    print(json.dumps(report))
""")


@pytest.mark.parametrize("name", list(BOMBS))
def test_bombs_decode_in_bounded_memory(name):
    payload = BOMBS[name]()
    assert len(payload) < 300_000  # a few hundred bytes to a few hundred kB on disk
    child = subprocess.run([sys.executable, "-c", BOMB_CHILD], input=payload, capture_output=True, cwd=REPO,
                           timeout=120)
    assert child.returncode == 0, child.stderr.decode()[-2000:]
    report = json.loads(child.stdout.decode().splitlines()[-1])
    for path, (outcome, peak_rss) in report.items():
        # An image of the crop's size, or a one-line error row: never an allocation failure.
        if len(outcome) == 3:
            assert outcome == [3, 224, 224], (path, outcome)
        else:
            error_type, message = outcome
            assert error_type in ("CorruptImage", "ImageTooLarge") and "\n" not in message, (path, outcome)
        assert peak_rss < PEAK_RSS_LIMIT, (path, f"{peak_rss / 2**30:.2f} GiB")
    if name == "65500x2 jpeg":
        assert set(report) == {"decode_resize_crop", "resize_crop(decode_rgb)", "DeviceDecoder"}
        assert all(outcome == [3, 224, 224] for outcome, _ in report.values())
    if name.endswith("png"):
        assert all(outcome == [3, 224, 224] for outcome, _ in report.values())


def test_extreme_strip_keeps_the_centre_of_the_image():
    """A 1x300000 strip whose value is its row number mod 251, resized to 256 columns: its middle
    rows (around 150000, value 150000 % 251 = 153) fill the crop, each source row 256 crop rows
    tall, so the crop shows one or two neighbouring values."""
    image, box = decode_resize_crop(tall_ramp_png(), 256, 224, box=[0, 149_999, 1, 150_001])
    assert image.shape == (3, 224, 224)
    values = set(image[0, :, 100].tolist())
    assert values <= set(range(150_000 % 251 - 2, 150_000 % 251 + 3)), values
    assert box == map_box([0, 149_999, 1, 150_001], 300_000, 1, 256, 224)


# --- only the window the crop keeps is resized, on the whole resize's grid -------------------------

@pytest.fixture
def resized_pixel_counts(monkeypatch) -> list:
    """The pixels of every image torchvision's resize returns during the test."""
    counts = []
    original = TF.resize

    def recording_resize(image, size, **options):
        resized = original(image, size, **options)
        counts.append(resized.shape[-2] * resized.shape[-1])
        return resized
    monkeypatch.setattr(TF, "resize", recording_resize)
    return counts


@pytest.mark.parametrize("height, width, resize, crop", [
    (1, 600, 64, 56),  # a one-pixel strip upscaled 64 times: the window spans a few source pixels
    (600, 1, 64, 56),  # the same, standing
    (2, 700, 64, 64),  # crop == resize: the short axis is resized whole
    (7, 5003, 256, 224),  # a scale with no whole-pixel grid points near the window's ends
    (37, 1001, 40, 33),  # odd sizes: the crop offsets round
    (90, 4000, 64, 56),  # downscaled along both axes
    (300, 260, 128, 112),  # an ordinary photo shape, forced through the window path
    (1203, 899, 256, 224),
])
def test_window_resize_agrees_with_the_whole_resize(height, width, resize, crop, resized_pixel_counts):
    """Forced with max_pixels=1 onto shapes whose whole resize is affordable, to compare. A window
    shifted by one resized pixel costs 5-15 levels on this content; the window path's ends fall on
    the whole resize's sampling grid, which leaves rounding steps of one level."""
    image = smooth_image(height, width, seed=height * width)
    want = whole_resize_crop(image, resize, crop)
    resized_pixel_counts.clear()
    got, box = resize_crop(image, resize, crop, box=[0, 0, width, height], max_pixels=1)
    assert got.shape == (3, crop, crop) and got.dtype == torch.uint8
    difference = (got.float() - want.float()).abs()
    assert difference.mean() <= 0.05 and difference.max() <= 1, (float(difference.mean()), float(difference.max()))
    assert box == map_box([0, 0, width, height], height, width, resize, crop)
    # Per axis at most the crop, plus each side one crop's worth of spare and the filter's reach
    # (three source pixels of `scale` resized pixels, scale <= resize): 3 crop + 8 scale.
    assert max(resized_pixel_counts) <= (3 * crop + 8 * resize) ** 2


def test_whole_resize_up_to_max_pixels_and_window_beyond(resized_pixel_counts):
    """Ordinary images keep exactly the old pixels; the window path starts where the resized image
    would hold more than max_pixels."""
    image = smooth_image(3, 200)
    whole = int(np.prod(resized_size(3, 200, 32)))  # 32 x 2133
    exact, _ = resize_crop(image, 32, 28, max_pixels=whole)
    assert resized_pixel_counts == [whole]
    assert torch.equal(exact, TF.center_crop(TF.resize(image, [32], antialias=True), [28, 28]))
    resized_pixel_counts.clear()
    window, _ = resize_crop(image, 32, 28, max_pixels=whole - 1)
    assert len(resized_pixel_counts) == 1 and resized_pixel_counts[0] <= 32 * (3 * 28 + 8 * 32 / 3)
    assert (window.int() - exact.int()).abs().max() <= 1


@pytest.mark.parametrize("height, width", [(375, 500), (500, 375), (1, 1), (31, 97), (64, 64), (10, 1000)])
def test_ordinary_images_keep_their_exact_pixels(height, width):
    image = smooth_image(height, width)
    assert torch.equal(resize_crop(image, 64, 56)[0], whole_resize_crop(image, 64, 56))


def test_decode_resize_crop_bounds_the_resize_with_data_max_pixels(resized_pixel_counts):
    """The worker path passes the user's limit down: a 4x400 PNG resized to 64 rows holds 409,600
    pixels, over a max_pixels of 100,000 though the image itself holds 1,600."""
    pixels = np.asarray(smooth_image(4, 400).permute(1, 2, 0))
    payload = encode(Image.fromarray(pixels), "PNG")
    image, _ = decode_resize_crop(payload, 64, 56, max_pixels=100_000)
    assert max(resized_pixel_counts) <= 100_000
    want = whole_resize_crop(torch.from_numpy(pixels.copy()).permute(2, 0, 1), 64, 56)
    assert (image.int() - want.int()).abs().max() <= 1


# --- the device decoder resizes with the same bound ----------------------------------------------

def jpeg(height: int, width: int, seed: int = 0) -> bytes:
    pixels = np.asarray(smooth_image(height, width, seed).permute(1, 2, 0))
    return encode(Image.fromarray(pixels), "JPEG", quality=95)


def test_device_decoder_resizes_extreme_images_like_the_worker_path(resized_pixel_counts):
    payloads = [jpeg(4, 900, seed=1), jpeg(900, 4, seed=2), jpeg(30, 40, seed=3)]
    assert all(device_jpeg_size(payload) is not None for payload in payloads)
    decoder = DeviceDecoder(resize=40, crop=32, device=torch.device("cpu"), max_pixels=20_000)
    images, failed = decoder(payloads)
    assert failed == {}
    assert max(resized_pixel_counts) <= 20_000  # the strips resize to 40 x 9000 whole
    want = torch.stack([resize_crop(decode_rgb(payload), 40, 32, max_pixels=20_000)[0] for payload in payloads])
    assert torch.equal(images, want)


@pytest.mark.gpu
def test_cuda_device_decoder_resizes_a_long_strip_in_bounded_memory():
    """On CUDA the whole resize of a 65500x2 JPEG would take 26 GB of float32."""
    payload = wide_jpeg(65_500)
    device = torch.device("cuda")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    images, failed = DeviceDecoder(256, 224, device, backend="torchvision")([payload])
    torch.cuda.synchronize(device)
    assert failed == {} and images.shape == (1, 3, 224, 224)
    assert torch.cuda.max_memory_allocated(device) - before < 256 * 2**20
    want, _ = resize_crop(decode_rgb(payload), 256, 224)
    assert (images[0].cpu().int() - want.int()).abs().float().mean() < 2  # nvJPEG and libjpeg round differently


def test_device_decoder_resizes_a_size_group_in_bounded_parts(monkeypatch):
    """Images of one size are resized together; the resized group must stay within max_pixels as
    one image must, or a batch of moderately long strips adds up to a bomb."""
    payloads = [jpeg(30, 40, seed=seed) for seed in range(5)]  # resized 40x53 = 2,120 pixels each
    batch_sizes = []
    original = device_decode.resize_crop

    def recording_resize_crop(images, *args, **options):
        batch_sizes.append(len(images))
        return original(images, *args, **options)
    monkeypatch.setattr(device_decode, "resize_crop", recording_resize_crop)
    decoder = DeviceDecoder(resize=40, crop=32, device=torch.device("cpu"), max_pixels=4_500)
    images, failed = decoder(payloads)
    assert failed == {} and max(batch_sizes) == 2 and sum(batch_sizes) == 5
    want = torch.stack([original(decode_rgb(payload), 40, 32)[0] for payload in payloads])
    assert torch.equal(images, want)


# --- no error message carries the bytes of the file -------------------------------------------------

SECRET = b"Zq9x"  # planted where decoders quote what they read; in no word an error message uses
SHADOW = b"root:$6$Zq9xKp2mWv$S3cr3tHashValueAbcdefghijklmnop:19000:0:99999:7:::\n"


def png_with_bad_second_idat() -> bytes:
    """Pillow reads the chunk type of the second IDAT and quotes it: broken PNG file (chunk b'..')."""
    rows = b"".join(b"\x00" + bytes(range(index, index + 30)) for index in range(20))
    compressed = zlib.compress(rows)
    header = struct.pack(">IIBBBBB", 30, 20, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", compressed[:20])
            + struct.pack(">I", len(compressed) - 20) + b"\x01\x02" + SECRET[:2] + compressed[20:] + b"\0\0\0\0"
            + png_chunk(b"IEND", b""))


def dds_with_unknown_fourcc() -> bytes:
    payload = bytearray(encode(Image.new("RGB", (16, 16)), "DDS"))
    payload[80:84] = struct.pack("<I", 4)  # pixel format flags: a FourCC code follows
    payload[84:88] = SECRET
    return bytes(payload)


def im_header(size: bytes) -> bytes:
    """The text header of an IM file (written by hand: Pillow deprecates writing the format)."""
    lines = b"Image type: RGB image\r\nImage size (x*y): " + size + b"\r\nFile size (no of images): 1\r\n"
    return lines + bytes(511 - len(lines)) + b"\x1a"


def error_cases() -> dict:
    """name: (payload, max_pixels, the bytes that must not show). Each reaches a different raise."""
    photo = jpeg(120, 160)
    comment = b"\xff\xfe" + struct.pack(">H", len(SHADOW) + 2) + SHADOW
    return {
        "empty": (b"", 89_478_485, b""),
        "a password file": (SHADOW * 3, 89_478_485, SHADOW),
        "binary data": (SECRET * 8 + bytes(range(256)), 89_478_485, SECRET),
        "png signature then text": (b"\x89PNG\r\n\x1a\n" + SHADOW, 89_478_485, SHADOW),
        "jpeg signature then text": (b"\xff\xd8\xff\x01" + SHADOW, 89_478_485, SHADOW),
        "png with a bad chunk type": (png_with_bad_second_idat(), 89_478_485, SECRET[:2]),
        "png with garbage pixel data": (png_bytes(30, 20, 8, 0, SHADOW), 89_478_485, SHADOW),
        "ppm with a word for its width": (b"P6\n" + SECRET + b" 16\n255\n" + bytes(768), 89_478_485, SECRET),
        "im with a word for its size": (im_header(SECRET + b"*16") + bytes(768), 89_478_485, SECRET),
        "dds with an unknown pixel format": (dds_with_unknown_fourcc(), 89_478_485, SECRET),
        "jpeg cut after a comment": ((photo[:2] + comment + photo[2:])[:len(photo) // 2], 89_478_485, SHADOW),
        "bmp header only": (b"BM" + SHADOW, 89_478_485, SHADOW),
        "webp with garbage data": (b"RIFF" + struct.pack("<I", len(SHADOW) + 12) + b"WEBPVP8 "
                                   + struct.pack("<I", len(SHADOW)) + SHADOW, 89_478_485, SHADOW),
        "over data.max_pixels": (encode(Image.new("RGB", (300, 300)), "PNG"), 10_000, b""),
        "over Pillow's own limit": (png_bytes(100_000, 100_000, 8, 0, SHADOW), 89_478_485, SHADOW),
    }


def forms_of(data: bytes) -> list:
    """How bytes read from a file show up in a message: as text, escaped, in hex, or as the
    integer a 4-byte field makes."""
    forms = [data.decode("latin-1"), repr(data)[2:-1], data.hex(), data.hex().upper()]
    if len(data) == 4:
        forms += [str(int.from_bytes(data, "little")), str(int.from_bytes(data, "big"))]
    return forms


def assert_no_file_bytes(message: str, payload: bytes, planted: bytes):
    assert "\n" not in message and len(message) < 300, message
    for form in forms_of(planted) if planted else []:
        assert form not in message, (form, message)
    # Nothing quoted from the file, in any form: no literals, no escapes, no 8 bytes in a row.
    assert "b'" not in message and 'b"' not in message and "\\x" not in message, message
    text = payload.decode("latin-1")
    assert not any(text[start:start + 8] in message for start in range(len(text) - 7)), message


def raised_messages(payload: bytes, max_pixels: int) -> list:
    """The message of every path that decodes this payload and raised."""
    messages = []
    for path in (lambda: decode_rgb(payload, max_pixels),
                 lambda: decode_resize_crop(payload, 64, 56, max_pixels),
                 lambda: device_jpeg_size(payload, max_pixels)):
        try:
            path()
        except (CorruptImage, ImageTooLarge) as error:
            messages.append(str(error))
    _, failed = DeviceDecoder(resize=64, crop=56, device=torch.device("cpu"))([payload])
    messages += [str(error) for error in failed.values()]
    return messages


@pytest.mark.filterwarnings("ignore:IM image format is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", list(error_cases()))
def test_error_messages_carry_no_file_contents(name):
    payload, max_pixels, planted = error_cases()[name]
    with pytest.raises((CorruptImage, ImageTooLarge)):
        decode_rgb(payload, max_pixels)
    messages = raised_messages(payload, max_pixels)
    assert messages
    for message in messages:
        assert_no_file_bytes(message, payload, planted)


def test_not_an_image_names_its_length_and_a_format_guess():
    for payload, words in [(SHADOW * 3, [f"{len(SHADOW) * 3} bytes", "text"]),
                           (b"\x89PNG\r\n\x1a\n" + SHADOW, ["PNG"]),
                           (bytes(range(128, 256)) * 10, ["1,280 bytes", "binary"])]:
        with pytest.raises(CorruptImage) as caught:
            decode_rgb(payload)
        assert all(word in str(caught.value) for word in words), str(caught.value)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on the damaged TIFF tags it skips
def test_fuzzed_images_give_messages_without_file_contents():
    """Damaged files of many formats, each error checked: what no hand-made case foresaw."""
    rng = np.random.default_rng(0)
    seeds = [encode(Image.fromarray(np.asarray(smooth_image(16, 24).permute(1, 2, 0))), fmt)
             for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "DDS", "TGA", "PCX", "SGI", "ICO")]
    checked = 0
    for trial in range(1500):
        payload = bytearray(seeds[trial % len(seeds)])
        for position in rng.integers(0, len(payload), int(rng.integers(1, 6))):
            payload[position] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            payload = payload[:int(rng.integers(1, len(payload)))]
        payload = bytes(payload)
        try:
            decode_resize_crop(payload, 32, 28)
        except (CorruptImage, ImageTooLarge) as error:
            assert_no_file_bytes(str(error), payload, b"")
            checked += 1
    assert checked > 300


# --- Pillow's bomb warning: data.max_pixels is the limit ---------------------------------------------

WARNING_CHILD = textwrap.dedent("""
    import io
    import numpy as np
    from PIL import Image
    from gradcam_batch.data.transforms import ImageTooLarge, decode_resize_crop, decode_rgb, device_jpeg_size

    # Pillow's limit lowered so that small images stand for the 89.5M-179M-pixel ones it warns about
    # (twice the limit, it refuses); data.max_pixels is set above it.
    Image.MAX_IMAGE_PIXELS = 1_000
    def encode(size, fmt):
        buffer = io.BytesIO()
        pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format=fmt)
        return buffer.getvalue()
    for fmt in ("PNG", "JPEG", "GIF", "TIFF"):
        payload = encode((40, 40), fmt)
        assert decode_rgb(payload, max_pixels=1_600).shape == (3, 40, 40)
        assert decode_resize_crop(payload, 32, 28, max_pixels=1_600)[0].shape == (3, 28, 28)
        device_jpeg_size(payload, max_pixels=1_600)
        try:  # over data.max_pixels: refused, with no warning first
            decode_rgb(encode((45, 40), fmt), max_pixels=1_600)
        except ImageTooLarge:
            pass  # the refusal is expected; what is checked is that no warning came before it
        else:
            raise AssertionError("45x40 is over max_pixels=1600")
    print("decoded")
""")


@pytest.mark.parametrize("warning_option", ["default", "always"])
def test_images_under_max_pixels_decode_without_pillows_bomb_warning(warning_option):
    child = subprocess.run([sys.executable, "-W", warning_option, "-c", WARNING_CHILD], capture_output=True,
                           cwd=REPO, timeout=120, text=True)
    assert child.returncode == 0 and child.stdout.strip() == "decoded", child.stderr[-2000:]
    assert "DecompressionBomb" not in child.stderr and "decompression bomb" not in child.stderr, child.stderr
