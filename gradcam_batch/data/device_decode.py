"""Batched JPEG decoding on the device (data.decode=device): workers ship the bytes of the
JPEGs that `transforms.device_jpeg_size` accepted, the device decodes them in one call
(nvJPEG through torchvision on CUDA), then resizes in groups of equal size before any float
conversion. Everything else was decoded by the workers already."""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from gradcam_batch.data.transforms import decode_rgb, resize_crop

log = logging.getLogger("gradcam_batch")


class DeviceDecoder:
    def __init__(self, resize: int, crop: int, device: torch.device):
        self.resize = resize
        self.crop = crop
        self.device = device

    def _decode(self, payloads: list[bytes]) -> list[torch.Tensor | Exception]:
        data = [torch.frombuffer(bytearray(payload), dtype=torch.uint8) for payload in payloads]
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            pass  # one bad image fails the whole call: decode one by one to find it
        decoded: list[torch.Tensor | Exception] = []
        for payload, tensor in zip(payloads, data):
            try:
                decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                try:  # the CPU decoder, which reads more variants and raises a clear error
                    decoded.append(decode_rgb(payload).to(self.device))
                except Exception as error:  # this image's error row, not the run's
                    decoded.append(error)
        return decoded

    def __call__(self, payloads: list[bytes]) -> tuple[torch.Tensor, dict[int, Exception]]:
        """uint8 (N_ok, 3, crop, crop) on the device in payload order, and {index: error} of
        the payloads that could not be decoded (left out of the tensor)."""
        decoded = self._decode(payloads)
        failed = {index: item for index, item in enumerate(decoded) if isinstance(item, Exception)}
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, item in enumerate(decoded):
            if index not in failed:
                by_size[tuple(item.shape[-2:])].append(index)
        out = torch.empty((len(payloads) - len(failed), 3, self.crop, self.crop), dtype=torch.uint8,
                          device=self.device)
        position = {index: slot for slot, index in enumerate(i for i in range(len(payloads)) if i not in failed)}
        for indices in by_size.values():
            # one resize per distinct input size: datasets repeat sizes, per-image calls cost Python time
            group = torch.stack([decoded[i] for i in indices])
            resized, _ = resize_crop(group, self.resize, self.crop)
            out[torch.tensor([position[i] for i in indices], device=self.device)] = resized
        return out, failed
