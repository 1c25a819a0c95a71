"""data.interpolation: the resize filter, bilinear (torchvision's recipe, the default) or bicubic
(timm's and most Hugging Face processors'), antialiased either way, on every path that resizes:
the workers' decode_resize_crop and resize_crop (whole and window), the device decoder (its CPU
fallback and its float path), and the loader."""

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from sample_data import make_webdataset
from test_image_bombs import smooth_image
from test_decode_resize import (TOLERANCE_DCT_SCALED, TOLERANCE_REGION_ONLY, draft_scales, encode,  # noqa: F401
                                mean_difference, photo_jpeg)
from gradcam_batch.config import DataConfig
from gradcam_batch.data.device_decode import DeviceDecoder, resize_crop_rounded
from gradcam_batch.data.loader import ShardBatches, build_loader
from gradcam_batch.data.readers import iter_samples
from gradcam_batch.data.shards import list_shards
from gradcam_batch.data.transforms import _window_span, decode_resize_crop, decode_rgb, resize_crop, resized_size

BICUBIC = InterpolationMode.BICUBIC


def reference(payload: bytes, resize: int, crop: int, mode: InterpolationMode = BICUBIC) -> torch.Tensor:
    """What a torchvision / timm recipe computes: the whole decoded image resized, then cropped."""
    return TF.center_crop(TF.resize(decode_rgb(payload), [resize], mode, antialias=True), [crop, crop])


def textured(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """uint8 (3, H, W) of random texture with a period of about 3 pixels: detail near the
    resolution, where the two filters' responses differ most."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(height // 3, 1), max(width // 3, 1), 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def hard_edges(count: int, height: int, width: int) -> torch.Tensor:
    """uint8 (count, 3, H, W) of black and white blocks of a few pixels: bicubic's negative lobes
    overshoot below 0 and above 255 at every edge."""
    rows = (torch.arange(height) // 3)[:, None]
    columns = (torch.arange(width) // 4)[None, :]
    blocks = ((rows + columns) % 2 * 255).to(torch.uint8)
    images = blocks.expand(count, 3, height, width).clone()
    images[1::2] = 255 - images[1::2]  # every other image in the opposite phase
    return images


# --- the worker path: decode_resize_crop and resize_crop -----------------------------------------

@pytest.mark.parametrize("width, height, resize, crop, scale", [
    (200, 150, 128, 112, 1),  # short side in [resize, 2 resize): full-size decode, region resize
    (150, 200, 128, 112, 1),
    (300, 260, 128, 112, 2),
    (641, 519, 128, 112, 4),  # more than 2x the resize: DCT scaling
    (1100, 1030, 128, 112, 8),  # more than 8x the resize
    (700, 100, 64, 56, 1),  # 7:1: most of the width is never resized
])
@pytest.mark.parametrize("seed", [0, 1])
def test_bicubic_agrees_with_the_whole_bicubic_resize(width, height, resize, crop, scale, seed, draft_scales):
    """The shortcuts (DCT scaling, resizing the kept region only) stay within the bilinear path's
    bounds against the whole resize, for bicubic too (measured: up to 1.4 at full size, 2.1 at
    1/2, 2.8 at 1/4, 4.3 at 1/8, each 0.1-0.7 more than bilinear's)."""
    payload = photo_jpeg(np.random.default_rng([seed, width, height]), width, height)
    image, _ = decode_resize_crop(payload, resize, crop, interpolation="bicubic")
    assert image.shape == (3, crop, crop) and image.dtype == torch.uint8
    assert draft_scales == ([scale] if scale > 1 else [])
    tolerance = TOLERANCE_DCT_SCALED if scale > 1 else TOLERANCE_REGION_ONLY
    assert mean_difference(image, reference(payload, resize, crop)) <= tolerance


@pytest.mark.parametrize("width, height", [(100, 90), (90, 100), (300, 60), (1, 1)])
def test_bicubic_of_images_smaller_than_the_resize_is_exactly_the_whole_resize(width, height, draft_scales):
    """Upscaled images take no shortcut: exactly torchvision's bicubic, which a bilinear resize is not."""
    payload = photo_jpeg(np.random.default_rng(width * height), width, height)
    box = [0, 0, width / 2, height / 2]
    image, got_box = decode_resize_crop(payload, 128, 112, box=box, interpolation="bicubic")
    want = reference(payload, 128, 112)
    assert torch.equal(image, want)
    assert got_box == resize_crop(decode_rgb(payload), 128, 112, box)[1]  # the box is the filter's business
    if (width, height) != (1, 1):  # a single pixel upscales to one colour with any filter
        assert not torch.equal(image, reference(payload, 128, 112, InterpolationMode.BILINEAR))
    assert draft_scales == []


@pytest.fixture
def resize_calls(monkeypatch) -> list:
    """(output pixels, interpolation) of every torchvision resize during the test."""
    calls = []
    original = TF.resize

    def recording_resize(image, size, *args, **options):
        resized = original(image, size, *args, **options)
        calls.append((resized.shape[-2] * resized.shape[-1], options.get("interpolation", args[0] if args else None)))
        return resized
    monkeypatch.setattr(TF, "resize", recording_resize)
    return calls


@pytest.mark.parametrize("width, height", [(1000, 20), (20, 1000)])
def test_bicubic_window_path_of_a_long_thin_jpeg(width, height, resize_calls):
    """A strip whose whole resize holds more than max_pixels resizes only the crop's window, on
    the whole resize's grid: the same pixels as the whole bicubic resize up to rounding steps.
    (The uint8 bicubic kernel's fixed-point weights differ between the window's resize and the
    whole one: a level or two where bilinear's differ by one.)"""
    payload = encode(Image.fromarray(np.asarray(textured(height, width, seed=width).permute(1, 2, 0))), "JPEG",
                     quality=95)
    whole = int(np.prod(resized_size(height, width, 64)))  # 64 x 3200
    image, _ = decode_resize_crop(payload, 64, 56, max_pixels=whole // 4, interpolation="bicubic")
    assert max(pixels for pixels, _ in resize_calls) <= whole // 4  # the window path ran
    assert {mode for _, mode in resize_calls} == {BICUBIC}
    want = reference(payload, 64, 56)
    difference = (image.float() - want.float()).abs()
    assert difference.mean() <= 0.05 and difference.max() <= 2, (float(difference.mean()), float(difference.max()))
    assert mean_difference(image, want) <= TOLERANCE_REGION_ONLY
    assert mean_difference(image, reference(payload, 64, 56, InterpolationMode.BILINEAR)) > 1.0


@pytest.mark.parametrize("height, width, resize, crop", [
    (1, 600, 64, 56),  # one-pixel strip upscaled 64 times
    (2, 700, 64, 64),  # crop == resize
    (7, 5003, 256, 224),
    (37, 1001, 40, 33),
    (90, 4000, 64, 56),  # downscaled along both axes
    (1203, 899, 256, 224),
])
def test_bicubic_window_agrees_with_the_whole_resize_in_float(height, width, resize, crop):
    """On float64 pixels (no uint8 rounding) the window path differs from the whole bicubic
    resize only by the sub-pixel shift of its grid-snapped ends (0.02 resized pixels for
    37x1001): a fraction of a level on smooth content, about a level on texture of a 3-pixel
    period (measured 0.18 and 1.0; bilinear's ends, snapped elsewhere, 0.04 and 0.15)."""
    for content, bound in ((smooth_image(height, width, seed=height * width), 0.5),
                           (textured(height, width, seed=height + width), 1.5)):
        image = content.double()
        want = TF.center_crop(TF.resize(image, [resize], BICUBIC, antialias=True), [crop, crop])
        got, _ = resize_crop(image, resize, crop, max_pixels=1, interpolation="bicubic")
        assert got.shape == want.shape
        difference = (got - want).abs()
        assert float(difference.max()) <= bound and float(difference.mean()) <= 0.25 * bound


def test_window_span_covers_bicubics_reach():
    """Every source pixel the bicubic filter weighs for the crop's resized pixels lies in the span
    that the window path resizes: 2 source pixels either side of a sample point when upscaling,
    2 / scale when downscaling (bilinear: 1 and 1 / scale)."""
    rng = random.Random(0)
    for _ in range(3000):
        size, resized = rng.randint(2, 5000), rng.randint(4, 600)
        crop = rng.randint(1, resized)
        first, stop, _, _ = _window_span(size, resized, crop, support=2.0)
        scale = resized / size
        reach = 2.0 * max(1.0, 1.0 / scale)
        start = int(round((resized - crop) / 2.0))
        # pixel j (centre j + 0.5) is weighed by the sample at centre c when |j + 0.5 - c| < reach
        lowest = max(0, math.floor((start + 0.5) / scale - reach - 0.5) + 1)
        highest = min(size, math.ceil((start + crop - 0.5) / scale + reach - 0.5))
        assert first <= lowest and stop >= highest, (size, resized, crop)


def test_bicubic_changes_the_pixels_of_textured_images():
    image = textured(300, 400)
    bilinear, _ = resize_crop(image, 128, 112)
    bicubic, _ = resize_crop(image, 128, 112, interpolation="bicubic")
    assert mean_difference(bicubic, bilinear) > 1.0
    # bicubic is the sharper filter: more contrast survives the downscale
    assert bicubic.float().std() > bilinear.float().std()
    payload = photo_jpeg(np.random.default_rng(21), 500, 375)  # a photo-like JPEG, through the shortcut
    assert mean_difference(decode_resize_crop(payload, 256, 224, interpolation="bicubic")[0],
                           decode_resize_crop(payload, 256, 224)[0]) > 0.5


def test_bilinear_is_the_default_and_other_filters_are_refused():
    payload = photo_jpeg(np.random.default_rng(22), 300, 260)
    assert torch.equal(decode_resize_crop(payload, 128, 112)[0],
                       decode_resize_crop(payload, 128, 112, interpolation="bilinear")[0])
    image = textured(40, 60)
    assert torch.equal(resize_crop(image, 32, 28)[0], resize_crop(image, 32, 28, interpolation="bilinear")[0])
    for call in (lambda: resize_crop(image, 32, 28, interpolation="lanczos"),
                 lambda: decode_resize_crop(payload, 128, 112, interpolation="nearest"),
                 lambda: resize_crop_rounded(image[None], 32, 28, interpolation="BICUBIC"),
                 lambda: DeviceDecoder(32, 28, torch.device("cpu"), interpolation="area")):
        with pytest.raises(ValueError, match="expected one of bilinear, bicubic"):
            call()


# --- the device decoder's float path -------------------------------------------------------------

def float64_reference(images: torch.Tensor, resize: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the float64 bicubic resize, cropped, before clamping; the same clamped to 0..255 and rounded)."""
    new_size = resized_size(*images.shape[-2:], resize)
    resized = F.interpolate(images.double(), size=list(new_size), mode="bicubic", align_corners=False,
                            antialias=True)
    window = TF.center_crop(resized, [crop, crop])
    return window, window.clamp(0, 255).round()


@pytest.mark.parametrize("height, width, resize, crop", [
    (30, 40, 64, 56),  # upscaled: bicubic overshoots most
    (90, 120, 40, 36),  # downscaled
    (31, 97, 40, 33),  # odd sizes: the crop offsets round
    (20, 30, 16, 24),  # crop larger than the resized image: padded with zeros
])
def test_resize_crop_rounded_bicubic_clamps_instead_of_wrapping(height, width, resize, crop):
    images = hard_edges(3, height, width)
    unclamped, want = float64_reference(images, resize, crop)
    assert unclamped.min() < -5 and unclamped.max() > 260  # the overshoot a plain cast would wrap
    got = resize_crop_rounded(images, resize, crop, interpolation="bicubic")
    assert got.shape == (3, 3, crop, crop) and got.dtype == torch.uint8
    assert int((got.int() - want.int()).abs().max()) <= 1
    assert bool((got[unclamped > 256] == 255).all()) and bool((got[unclamped < -1] == 0).all())
    out = torch.zeros(5, 3, crop, crop, dtype=torch.uint8)
    resize_crop_rounded(images, resize, crop, out[1:4], interpolation="bicubic")  # into rows of a larger output
    assert torch.equal(out[1:4], got) and not out[0].any() and not out[4].any()
    bilinear = resize_crop_rounded(images, resize, crop)
    assert mean_difference(got, bilinear) > 1.0


def test_resize_crop_rounded_bicubic_is_torchvisions_float_path():
    """What torchvision does for uint8 bicubic where it has no native uint8 resize (CUDA): float32,
    clamped, rounded; the device decoder must give the same numbers."""
    images = torch.randint(0, 256, (3, 3, 75, 100), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    resized = TF.resize(images.float(), [64], BICUBIC, antialias=True).clamp(0, 255).round()
    want = TF.center_crop(resized, [56, 56]).to(torch.uint8)
    assert torch.equal(resize_crop_rounded(images, 64, 56, interpolation="bicubic"), want)
    unclamped, reference_rounded = float64_reference(images, 64, 56)
    assert int((want.int() - reference_rounded.int()).abs().max()) <= 1


@pytest.mark.gpu
@pytest.mark.parametrize("height, width", [(375, 500), (31, 97), (20, 30)])
def test_resize_crop_rounded_bicubic_equals_torchvision_on_cuda(height, width):
    images = hard_edges(4, height, width).cuda()
    images[2:] = torch.randint(0, 256, images[2:].shape, dtype=torch.uint8, device="cuda")
    torch.testing.assert_close(resize_crop_rounded(images, 64, 56, interpolation="bicubic"),
                               resize_crop(images, 64, 56, interpolation="bicubic")[0], atol=0, rtol=0)


# --- the device decoder on the CPU: the worker path's pixels -----------------------------------------

def test_device_decoder_bicubic_equals_the_worker_path():
    sizes = [(30, 36), (36, 30), (30, 36), (120, 160), (10, 900)]  # upscaled ones, a downscaled one, a strip
    payloads = [encode(Image.fromarray(np.asarray(textured(h, w, seed=i).permute(1, 2, 0))), "JPEG", quality=95)
                if min(h, w) < 40 else photo_jpeg(np.random.default_rng(i), w, h)  # the tolerance's content
                for i, (h, w) in enumerate(sizes)]
    decoder = DeviceDecoder(resize=40, crop=32, device=torch.device("cpu"), interpolation="bicubic",
                            max_pixels=20_000)  # the strip's whole resize (40 x 3600) takes the window path
    assert decoder.interpolation == "bicubic"
    images, failed = decoder(payloads)
    assert failed == {} and images.shape == (5, 3, 32, 32)
    for image, payload, (height, width) in zip(images, payloads, sizes):
        worker, _ = decode_resize_crop(payload, 40, 32, max_pixels=20_000, interpolation="bicubic")
        if min(height, width) < 40:  # no shortcut on the worker path: the same pixels exactly
            assert torch.equal(image, worker)
        else:  # the worker resizes the kept region only (a DCT-free shortcut)
            assert mean_difference(image, worker) <= TOLERANCE_REGION_ONLY
        assert torch.equal(image, resize_crop(decode_rgb(payload), 40, 32, max_pixels=20_000,
                                              interpolation="bicubic")[0])
    bilinear, _ = DeviceDecoder(resize=40, crop=32, device=torch.device("cpu"), max_pixels=20_000)(payloads)
    assert mean_difference(images, bilinear) > 1.0


# --- the loader ----------------------------------------------------------------------------------

def loaded_images(cfg: DataConfig) -> dict[str, torch.Tensor]:
    batches = list(build_loader(list_shards(cfg), cfg, pin_memory=False))
    return {sample_id: image for batch in batches for sample_id, image in zip(batch.sample_ids, batch.images)}


def test_loader_resizes_with_the_configured_filter(tmp_path):
    make_webdataset(tmp_path, shards=1, per_shard=4)  # random-pixel 52x40 JPEGs, upscaled to 48
    common = dict(format="webdataset", shards=str(tmp_path / "*.tar"), resize=48, crop=40, num_workers=0,
                  batch_size=3)
    bicubic = loaded_images(DataConfig(**common, interpolation="bicubic"))
    bilinear = loaded_images(DataConfig(**common, interpolation="bilinear"))
    default = loaded_images(DataConfig(**common))  # null: torchvision's recipe, bilinear
    assert len(bicubic) == len(bilinear) == 4 and bicubic.keys() == bilinear.keys() == default.keys()
    cfg = DataConfig(**common)
    samples = {sample.sample_id: sample.payload for shard in list_shards(cfg) for sample in iter_samples(shard, cfg)}
    for sample_id, payload in samples.items():
        assert torch.equal(bicubic[sample_id], reference(payload, 48, 40))
        assert torch.equal(bilinear[sample_id], reference(payload, 48, 40, InterpolationMode.BILINEAR))
        assert torch.equal(default[sample_id], bilinear[sample_id])
        assert mean_difference(bicubic[sample_id], bilinear[sample_id]) > 1.0


def test_shard_batches_from_an_unresolved_config_resize_bilinearly(tmp_path):
    make_webdataset(tmp_path, shards=1, per_shard=2)
    cfg = DataConfig(format="webdataset", shards=str(tmp_path / "*.tar"), resize=48, crop=40)
    assert cfg.interpolation is None
    (batch,) = list(ShardBatches(list_shards(cfg), cfg))
    resolved = cfg.resolved()
    (want,) = list(ShardBatches(list_shards(resolved), resolved))
    assert batch.errors == [] and len(batch.images) == 2 and torch.equal(batch.images, want.images)
