"""DataLoader assembly: workers read whole shards and emit batches that never span shards, the
last one flagged, so the writer knows when a shard's part file is complete."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gradcam_batch.config import DataConfig
from gradcam_batch.data.readers import iter_samples
from gradcam_batch.data.shards import Shard
from gradcam_batch.data.transforms import box_from_meta, decode_rgb, device_jpeg_size, map_box, resize_crop


@dataclass
class Batch:
    """One shard's samples. The first len(images) were decoded by the worker; the rest arrive
    as `payloads`, JPEG bytes for the device decoder (data.decode=device)."""
    shard_id: str
    images: torch.Tensor  # uint8 (N_decoded, 3, crop, crop)
    labels: torch.Tensor  # int64 (N,), -1 unknown
    boxes: torch.Tensor  # float32 (N, 4) in [0, 1] of the crop, NaN where unknown
    sample_ids: list[str]
    errors: list[tuple[str, str, str, str]] = field(default_factory=list)  # (sample_id, stage, type, message)
    last: bool = False  # the shard's final batch
    payloads: list[bytes] = field(default_factory=list)

    def pin_memory(self) -> "Batch":
        self.images = self.images.pin_memory()
        return self


class _Pending:
    """Samples of the batch being filled: worker-decoded first, device payloads after."""

    def __init__(self):
        self.images, self.payloads = [], []
        self.decoded_rows, self.payload_rows = [], []  # (sample_id, label, box) each
        self.errors = []

    def __len__(self) -> int:
        return len(self.images) + len(self.payloads)

    def batch(self, shard_id: str, crop: int, last: bool) -> Batch:
        rows = self.decoded_rows + self.payload_rows
        return Batch(
            shard_id=shard_id,
            images=torch.stack(self.images) if self.images else torch.empty(0, 3, crop, crop, dtype=torch.uint8),
            labels=torch.tensor([label for _, label, _ in rows], dtype=torch.int64),
            boxes=torch.tensor([box for _, _, box in rows], dtype=torch.float32).reshape(-1, 4),
            sample_ids=[sample_id for sample_id, _, _ in rows],
            errors=self.errors,
            last=last,
            payloads=self.payloads,
        )


class ShardBatches(IterableDataset):
    """Batches of decoded uint8 images (data.decode=workers), or, with device_decode, the JPEG
    bytes a device decoder can take as they are plus worker-decoded images for the rest."""

    def __init__(self, shards: list[Shard], cfg: DataConfig, device_decode: bool = False):
        self.shards = shards
        self.cfg = cfg
        self.device_decode = device_decode

    def _add(self, pending: _Pending, sample) -> None:
        cfg = self.cfg
        box = box_from_meta(sample.meta)
        size = device_jpeg_size(sample.payload, cfg.max_pixels) if self.device_decode else None
        if size is not None:
            pending.payloads.append(sample.payload)
            pending.payload_rows.append((sample.sample_id, sample.label, _or_nan(map_box(box, *size, cfg.resize, cfg.crop))))
            return
        image, box = resize_crop(decode_rgb(sample.payload, cfg.max_pixels), cfg.resize, cfg.crop, box)
        pending.images.append(image)
        pending.decoded_rows.append((sample.sample_id, sample.label, _or_nan(box)))

    def _shard_batches(self, shard: Shard) -> Iterator[Batch]:
        cfg = self.cfg
        pending = _Pending()
        for sample in iter_samples(shard, cfg):
            if sample.error is not None:
                pending.errors.append((sample.sample_id, *sample.error))
                continue
            try:
                self._add(pending, sample)
            except Exception as error:  # any decoder failure is this image's error, not the run's
                pending.errors.append((sample.sample_id, "decode", type(error).__name__, str(error)[:500]))
                continue
            if len(pending) == cfg.batch_size:
                yield pending.batch(shard.shard_id, cfg.crop, last=False)
                pending = _Pending()
        yield pending.batch(shard.shard_id, cfg.crop, last=True)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        shards = self.shards if info is None else self.shards[info.id::info.num_workers]
        if info is not None:
            torch.set_num_threads(1)  # workers are processes already; avoid oversubscription
        for shard in shards:
            yield from self._shard_batches(shard)


def _or_nan(box):
    return box if box is not None else [float("nan")] * 4


def build_loader(shards: list[Shard], cfg: DataConfig, pin_memory: bool, device_decode: bool = False) -> DataLoader:
    workers = min(cfg.num_workers, len(shards))
    return DataLoader(
        ShardBatches(shards, cfg, device_decode),
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
