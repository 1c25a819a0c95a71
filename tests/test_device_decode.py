"""data.decode=device: workers ship plain JPEG bytes, the device decodes them in a batch and
resizes in groups; on CPU the same code runs with torchvision's CPU decoder, so the results
must equal the worker path's exactly."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from cli_helpers import TINY_RESNET, read_cams, run_composed
from gradcam_batch.config import DataConfig
from gradcam_batch.data.device_decode import DeviceDecoder, nvimgcodec_available, resize_crop_rounded
from gradcam_batch.data.loader import ShardBatches
from gradcam_batch.data.shards import list_shards
from gradcam_batch.data.transforms import decode_rgb, device_jpeg_size, resize_crop, resized_size
from sample_data import add_member


def jpeg(height, width, seed=0, mode="RGB", exif_orientation=None) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    if exif_orientation:
        exif = image.getexif()
        exif[0x0112] = exif_orientation
        image.save(buffer, format="JPEG", exif=exif)
    else:
        image.save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("height, width", [(375, 500), (500, 375), (64, 64), (31, 97), (97, 31), (10, 1000)])
def test_resized_size_is_torchvisions(height, width):
    assert resized_size(height, width, 72) == tuple(TF.resize(torch.zeros(1, height, width), [72]).shape[-2:])


def test_which_payloads_go_to_the_device():
    assert device_jpeg_size(jpeg(30, 40)) == (30, 40)
    assert device_jpeg_size(jpeg(30, 40, mode="L")) == (30, 40)
    assert device_jpeg_size(jpeg(30, 40, mode="CMYK")) is None  # CPU path converts CMYK
    assert device_jpeg_size(jpeg(30, 40, exif_orientation=6)) is None  # CPU path rotates
    whole = jpeg(30, 40)
    assert device_jpeg_size(whole[: len(whole) // 2]) is None  # truncated: the CPU path raises
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    assert device_jpeg_size(png.getvalue()) is None


def test_device_decoder_equals_the_worker_path():
    payloads = [jpeg(60, 80, seed=1), jpeg(80, 60, seed=2), jpeg(60, 80, seed=3), jpeg(50, 50, seed=4, mode="L")]
    broken = jpeg(60, 80, seed=5)
    broken = broken[:200] + bytes(len(broken) - 202) + b"\xff\xd9"  # valid header, zeroed scan data
    decoder = DeviceDecoder(resize=40, crop=32, device=torch.device("cpu"))
    images, failed = decoder(payloads + [broken])
    want = torch.stack([resize_crop(decode_rgb(p), 40, 32)[0] for p in payloads])
    assert images.dtype == torch.uint8 and images.shape == (len(images), 3, 32, 32)
    assert len(images) + len(failed) == 5  # nothing lost
    if failed:  # libjpeg may or may not reject zeroed scan data
        assert list(failed) == [4]
    torch.testing.assert_close(images[:4], want, atol=0, rtol=0)


def test_device_decoder_groups_interleaved_sizes_in_payload_order():
    # sizes A B A C B A: groups whose rows are not one run, a single-image group, a failure in between
    sizes = [(60, 80), (80, 60), (60, 80), (45, 45), (80, 60), (60, 80)]
    payloads = [jpeg(h, w, seed=10 + i) for i, (h, w) in enumerate(sizes)]
    payloads.insert(3, b"\xff\xd8 not a jpeg \xff\xd9")
    payloads.insert(5, b"")
    decoder = DeviceDecoder(resize=40, crop=32, device=torch.device("cpu"))
    images, failed = decoder(payloads)
    assert sorted(failed) == [3, 5]
    good = [p for i, p in enumerate(payloads) if i not in failed]
    want = torch.stack([resize_crop(decode_rgb(p), 40, 32)[0] for p in good])
    torch.testing.assert_close(images, want, atol=0, rtol=0)
    assert decoder.backend == "torchvision"


def test_device_decoder_without_payloads():
    images, failed = DeviceDecoder(resize=40, crop=32, device=torch.device("cpu"))([])
    assert images.shape == (0, 3, 32, 32) and failed == {}


def torchvision_float_path(images, resize, crop):
    """What torchvision does for uint8 where it has no native uint8 resize (CUDA)."""
    resized = TF.resize(images.float(), [resize], antialias=True)
    if resized.shape[-2:] != images.shape[-2:]:
        resized = resized.round()
    return TF.center_crop(resized, [crop, crop]).to(torch.uint8)


@pytest.mark.parametrize("height, width, resize, crop", [
    (375, 500, 64, 56),  # landscape, the benchmark's shape, downscaled
    (500, 375, 64, 64),  # portrait, crop = resize
    (31, 97, 40, 33),  # upscaled, odd sizes: the crop offsets round
    (40, 64, 40, 40),  # already at size: no resize at all
    (20, 30, 16, 24),  # crop larger than the resized image: torchvision pads
])
def test_resize_crop_rounded_is_torchvisions_float_path(height, width, resize, crop):
    images = torch.randint(0, 256, (3, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    want = torchvision_float_path(images, resize, crop)
    torch.testing.assert_close(resize_crop_rounded(images, resize, crop), want, atol=0, rtol=0)
    out = torch.zeros(5, 3, crop, crop, dtype=torch.uint8)
    resize_crop_rounded(images, resize, crop, out[1:4])  # straight into rows of a larger output
    torch.testing.assert_close(out[1:4], want, atol=0, rtol=0)
    assert not out[0].any() and not out[4].any()


def test_decoder_backend_choice():
    assert isinstance(nvimgcodec_available(), bool)  # imports cleanly whether or not it is installed
    assert DeviceDecoder(8, 8, torch.device("cpu"), backend="auto").backend == "torchvision"
    with pytest.raises(ValueError, match="backend='pillow'"):
        DeviceDecoder(8, 8, torch.device("cpu"), backend="pillow")


@pytest.mark.gpu
@pytest.mark.parametrize("height, width", [(375, 500), (500, 375), (31, 97), (224, 224), (20, 30)])
def test_resize_crop_rounded_equals_torchvision_on_cuda(height, width):
    images = torch.randint(0, 256, (4, 3, height, width), dtype=torch.uint8, device="cuda")
    torch.testing.assert_close(resize_crop_rounded(images, 64, 56), resize_crop(images, 64, 56)[0], atol=0, rtol=0)
    single = images[1:2].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last strides, as nvImageCodec's
    torch.testing.assert_close(resize_crop_rounded(single, 64, 56), resize_crop(images[1:2], 64, 56)[0], atol=0, rtol=0)


@pytest.mark.gpu
def test_cuda_decoder_equals_per_image_nvjpeg():
    sizes = [(60, 80), (80, 60), (60, 80), (45, 45), (80, 60), (375, 500)]
    payloads = [jpeg(h, w, seed=20 + i, mode="L" if i == 4 else "RGB") for i, (h, w) in enumerate(sizes)]
    payloads.insert(2, b"\xff\xd8 not a jpeg \xff\xd9")
    decoder = DeviceDecoder(resize=40, crop=32, device=torch.device("cuda"), backend="torchvision")
    images, failed = decoder(payloads)
    assert list(failed) == [2]
    want = torch.stack([resize_crop(decode_jpeg(torch.frombuffer(bytearray(p), dtype=torch.uint8),
                                                mode=ImageReadMode.RGB, device="cuda"), 40, 32)[0]
                        for i, p in enumerate(payloads) if i != 2])
    torch.testing.assert_close(images, want, atol=0, rtol=0)


@pytest.mark.gpu
def test_nvimgcodec_decoder_agrees_with_nvjpeg():
    pytest.importorskip("nvidia.nvimgcodec")
    sizes = [(60, 80), (80, 60), (60, 80), (375, 500)]
    payloads = [jpeg(h, w, seed=30 + i, mode="L" if i == 1 else "RGB") for i, (h, w) in enumerate(sizes)]
    payloads.insert(1, b"\xff\xd8 not a jpeg \xff\xd9")
    nvimgcodec = DeviceDecoder(resize=40, crop=32, device=torch.device("cuda"), backend="nvimgcodec")
    nvjpeg = DeviceDecoder(resize=40, crop=32, device=torch.device("cuda"), backend="torchvision")
    assert nvimgcodec.backend == "nvimgcodec"
    (images, failed), (want, want_failed) = nvimgcodec(payloads), nvjpeg(payloads)
    assert list(failed) == list(want_failed) == [1]
    assert images.shape == want.shape
    assert (images.int() - want.int()).abs().float().mean() < 2


def test_shard_batches_split_payloads_and_decoded_images(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (30, 30), (255, 0, 0)).save(png, format="PNG")
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        add_member(tar, "a.jpg", jpeg(40, 50))
        add_member(tar, "b.png", png.getvalue())
        add_member(tar, "c.jpg", jpeg(40, 50, mode="CMYK"))
        add_member(tar, "d.jpg", jpeg(40, 50)[:300])
        add_member(tar, "e.jpg", jpeg(50, 40, seed=7))
    cfg = DataConfig(format="webdataset", shards=str(tmp_path / "s.tar"), resize=32, crop=32)
    (batch,) = list(ShardBatches(list_shards(cfg), cfg, device_decode=True))
    assert batch.sample_ids == ["b", "c", "a", "e"]  # worker-decoded first, then device payloads
    assert len(batch.images) == 2 and len(batch.payloads) == 2
    assert [e[0] for e in batch.errors] == ["d"]


def test_pipeline_device_decode_matches_worker_decode(tmp_path):
    rng = np.random.default_rng(0)
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for index in range(7):
            height, width = [(60, 80), (80, 60), (60, 80)][index % 3]
            add_member(tar, f"k{index}.jpg", jpeg(height, width, seed=index, mode="L" if index == 4 else "RGB"))
            add_member(tar, f"k{index}.json", json.dumps({"box": [10, 10, 30, 40]}).encode())
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (70, 70, 3), dtype=np.uint8)).save(png, format="PNG")
        add_member(tar, "k7.png", png.getvalue())
    tables = {}
    for mode in ("workers", "device"):
        summary = run_composed(*TINY_RESNET, "data=webdataset", f"data.shards={tmp_path}/s.tar", "data.batch_size=3",
                               f"data.decode={mode}", "cam.targets=topk", "cam.topk=2", f"output.dir={tmp_path / mode}",
                               "runtime.device=cpu")  # nvJPEG rounds differently from libjpeg
        assert (summary.images, summary.errors) == (8, 0)
        rows = read_cams(tmp_path / mode).to_pylist()
        tables[mode] = {(r["sample_id"], r["target_rank"]): r for r in rows}
    assert tables["workers"].keys() == tables["device"].keys()
    for key, row in tables["workers"].items():
        other = tables["device"][key]
        assert (row["target_class"], row["label"]) == (other["target_class"], other["label"])
        np.testing.assert_allclose(row["cam"], other["cam"], atol=1e-5)
