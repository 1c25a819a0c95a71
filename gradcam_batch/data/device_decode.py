"""Batched JPEG decoding on the device (data.decode=device or mixed): workers ship the bytes of
the JPEGs that `transforms.device_jpeg_size` accepted, the device decodes them in one call, then
resizes (data.interpolation: antialiased bilinear or bicubic, as the workers do) and crops each
size group straight into its rows of the output, before any float conversion. Everything else was
decoded by the workers already.

Decoders, best first: nvImageCodec (`nvidia.nvimgcodec`, the A100/H100 hardware JPEG engines plus
its CUDA and CPU backends) when it is installed, else torchvision's batched nvJPEG; on a CPU
device torchvision's CPU decoder, so tests run the same code."""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from gradcam_batch.data.transforms import (DEFAULT_MAX_PIXELS, decode_rgb, interpolation_mode, resize_crop,
                                           resized_size)

log = logging.getLogger("gradcam_batch")

DECODER_BACKENDS = ("auto", "nvimgcodec", "torchvision")


def nvimgcodec_available() -> bool:
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError:
        return False
    return True


class _NvImageCodec:
    """nvImageCodec's batched decoder on one CUDA device; decodes on the caller's current
    stream, so the images are ready for whatever that stream runs next."""

    def __init__(self, device: torch.device):
        from nvidia import nvimgcodec

        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        self.decoder = nvimgcodec.Decoder(device_id=index)
        # Device-eligible payloads carry no EXIF rotation (device_jpeg_size checks), so skipping
        # the orientation step changes nothing and saves reading the metadata again.
        self.params = nvimgcodec.DecodeParams(color_spec=nvimgcodec.ColorSpec.RGB, apply_exif_orientation=False)

    def __call__(self, payloads: list[bytes]) -> list[torch.Tensor | None]:
        """uint8 (3, H, W) per payload, None where nvImageCodec could not decode it."""
        stream = torch.cuda.current_stream(self.device)
        images = self.decoder.decode(payloads, params=self.params, cuda_stream=stream.cuda_stream)
        # nvImageCodec hands out interleaved (H, W, 3) buffers; a channel-first view of them
        # costs nothing and the resize reads any strides.
        return [None if image is None else torch.as_tensor(image, device=self.device).permute(2, 0, 1)
                for image in images]


class DeviceDecoder:
    def __init__(self, resize: int, crop: int, device: torch.device, backend: str = "auto",
                 max_pixels: int = DEFAULT_MAX_PIXELS, interpolation: str = "bilinear"):
        if backend not in DECODER_BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {', '.join(DECODER_BACKENDS)}")
        interpolation_mode(interpolation)  # ValueError for anything but bilinear / bicubic
        self.resize = resize
        self.crop = crop
        self.interpolation = interpolation  # the resize filter, data.interpolation, as the workers use it
        # data.max_pixels bounds the pixels of each resize call, as it bounds the workers' resize
        # (transforms.resize_crop): a group of long strips of one size would otherwise add up.
        self.max_pixels = max_pixels
        self.device = torch.device(device)
        self.nvimgcodec = None
        if self.device.type == "cuda" and backend != "torchvision" and (backend == "nvimgcodec" or nvimgcodec_available()):
            try:
                self.nvimgcodec = _NvImageCodec(self.device)
            except Exception as error:  # a broken optional install must not stop the run: nvJPEG decodes too
                if backend == "nvimgcodec":
                    raise
                log.warning("nvImageCodec is installed but failed to start (%s: %s); decoding with "
                            "torchvision's nvJPEG", type(error).__name__, error)
        self.backend = "nvimgcodec" if self.nvimgcodec is not None else "torchvision"

    def _decode(self, payloads: list[bytes]) -> list[torch.Tensor | Exception]:
        if not payloads:
            return []
        if self.nvimgcodec is not None:
            try:
                decoded = self.nvimgcodec(payloads)
            except Exception as error:  # the whole call failed: the per-image path below sorts it out
                log.debug("nvImageCodec batch decode failed (%s); retrying image by image", error)
                decoded = [None] * len(payloads)
            return [image if image is not None else self._decode_one(payload, None)
                    for payload, image in zip(payloads, decoded)]
        if self.device.type == "cuda":
            # torchvision's nvJPEG writes its outputs on a stream of its own, into memory the
            # caching allocator hands out for the current stream; memory that still-queued work
            # on the current stream reads (the previous batch's resize, freed already on the
            # host) would be overwritten under it. Waiting for this stream (not the device)
            # leaves no such work.
            torch.cuda.current_stream(self.device).synchronize()
        # One copy of all payloads into one writable buffer, then views per payload: torch
        # needs a writable buffer, and one allocation beats one per image.
        buffer = torch.frombuffer(bytearray().join(payloads), dtype=torch.uint8) if any(payloads) else None
        data = (list(torch.split(buffer, [len(payload) for payload in payloads])) if buffer is not None
                else [torch.empty(0, dtype=torch.uint8) for _ in payloads])
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            pass  # one bad image fails the whole call: decode one by one to find it
        return [self._decode_one(payload, tensor) for payload, tensor in zip(payloads, data)]

    def _decode_one(self, payload: bytes, tensor: torch.Tensor | None) -> torch.Tensor | Exception:
        if tensor is not None:
            try:
                return decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:
                pass  # nvJPEG refuses some valid JPEGs: the CPU decoder below decides
        try:  # the CPU decoder, which reads more variants and raises a clear error
            return decode_rgb(payload).to(self.device)
        except Exception as error:  # this image's error row, not the run's
            return error

    def __call__(self, payloads: list[bytes]) -> tuple[torch.Tensor, dict[int, Exception]]:
        """uint8 (N_ok, 3, crop, crop) on the device in payload order, and {index: error} of
        the payloads that could not be decoded (left out of the tensor)."""
        decoded = self._decode(payloads)
        failed = {index: item for index, item in enumerate(decoded) if isinstance(item, Exception)}
        images = [item for item in decoded if not isinstance(item, Exception)]
        out = torch.empty((len(images), 3, self.crop, self.crop), dtype=torch.uint8, device=self.device)
        rows_by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for row, image in enumerate(images):
            rows_by_size[tuple(image.shape[-2:])].append(row)
        for (height, width), rows in rows_by_size.items():
            # One resize per distinct input size (datasets repeat sizes), of as many images as
            # max_pixels allows resized at once.
            resized_height, resized_width = resized_size(height, width, self.resize)
            per_call = max(1, self.max_pixels // (resized_height * resized_width))
            for start in range(0, len(rows), per_call):
                self._resize_rows(images, rows[start:start + per_call], out)
        return out, failed

    def _resize_rows(self, images: list[torch.Tensor], rows: list[int], out: torch.Tensor) -> None:
        """Resize and crop the images at `rows` (all of one size) into those rows of `out`; rows that
        are one run, a single image included, are written in place with no index and no stack."""
        first, last = rows[0], rows[-1]
        if last - first + 1 == len(rows):
            group = images[first].unsqueeze(0) if len(rows) == 1 else torch.stack(images[first:last + 1])
            self._resize_crop_into(group, out[first:last + 1])
        else:
            resized = torch.empty((len(rows), 3, self.crop, self.crop), dtype=torch.uint8, device=self.device)
            self._resize_crop_into(torch.stack([images[row] for row in rows]), resized)
            out.index_copy_(0, self._index(rows), resized)

    def _index(self, rows: list[int]) -> torch.Tensor:
        index = torch.tensor(rows, dtype=torch.int64)
        if self.device.type != "cuda":
            return index.to(self.device)
        # Pinned and non-blocking: a pageable copy would make the host wait for this stream.
        return index.pin_memory().to(self.device, non_blocking=True)

    def _resize_crop_into(self, images: torch.Tensor, out: torch.Tensor) -> None:
        resized_height, resized_width = resized_size(*images.shape[-2:], self.resize)
        if self.device.type == "cpu" or resized_height * resized_width > self.max_pixels:
            # torchvision resizes uint8 natively on the CPU; its own call keeps the worker path's
            # numbers, and resizes only the crop's window of an image too long to resize whole
            # (on CUDA too, where it rounds as resize_crop_rounded does).
            out.copy_(resize_crop(images, self.resize, self.crop, max_pixels=self.max_pixels,
                                  interpolation=self.interpolation)[0])
        else:
            resize_crop_rounded(images, self.resize, self.crop, out, interpolation=self.interpolation)


def resize_crop_rounded(images: torch.Tensor, resize: int, crop: int, out: torch.Tensor | None = None,
                        interpolation: str = "bilinear") -> torch.Tensor:
    """`transforms.resize_crop` of a uint8 batch (N, 3, H, W) as torchvision computes it where it
    has no native uint8 resize (CUDA): float32 antialiased bilinear or bicubic (`interpolation`)
    resize, clamped to 0..255 (bicubic), rounded, cropped. Only the crop window is clamped, rounded
    and converted, written into `out` (uint8 (N, 3, crop, crop), any view) when given; saves
    torchvision's per-call dispatch, which per-image groups pay in full."""
    interpolation_mode(interpolation)  # ValueError for anything but bilinear / bicubic
    height, width = images.shape[-2:]
    new_height, new_width = resized_size(height, width, resize)
    if (new_height, new_width) != (height, width):
        images = F.interpolate(images.float(), size=[new_height, new_width], mode=interpolation,
                               align_corners=False, antialias=True)
    # Antialiased bilinear weights are non-negative and sum to 1, so its rounded values stay in
    # 0..255 and the cast is exact, as in torchvision. Bicubic's negative lobes overshoot at hard
    # edges (below 0, above 255), where a plain cast would wrap around: clamped first, as
    # torchvision clamps.
    clamp = interpolation == "bicubic"
    if crop > new_height or crop > new_width:  # center_crop pads with zeros: rare, torchvision does it
        if images.is_floating_point():
            images = (images.clamp_(0, 255) if clamp else images).round_()
        window = TF.center_crop(images, [crop, crop])
    else:
        top = int(round((new_height - crop) / 2.0))
        left = int(round((new_width - crop) / 2.0))
        window = images[..., top:top + crop, left:left + crop]
        if window.is_floating_point():
            # the resized image is this function's own temporary: clamp and round the window in place
            window = (window.clamp_(0, 255) if clamp else window).round_()
    if out is None:
        return window.to(torch.uint8)
    return out.copy_(window)
