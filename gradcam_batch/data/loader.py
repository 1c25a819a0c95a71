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
from gradcam_batch.data.transforms import box_from_meta, decode_rgb, resize_crop


@dataclass
class Batch:
    shard_id: str
    images: torch.Tensor  # uint8 (N, 3, crop, crop)
    labels: torch.Tensor  # int64 (N,), -1 unknown
    boxes: torch.Tensor  # float32 (N, 4) in [0, 1] of the crop, NaN where unknown
    sample_ids: list[str]
    errors: list[tuple[str, str, str, str]] = field(default_factory=list)  # (sample_id, stage, type, message)
    last: bool = False  # the shard's final batch

    def pin_memory(self) -> "Batch":
        self.images = self.images.pin_memory()
        return self


class ShardBatches(IterableDataset):
    def __init__(self, shards: list[Shard], cfg: DataConfig):
        self.shards = shards
        self.cfg = cfg

    def _batch(self, shard_id, images, labels, boxes, ids, errors, last) -> Batch:
        crop = self.cfg.crop
        return Batch(
            shard_id=shard_id,
            images=torch.stack(images) if images else torch.empty(0, 3, crop, crop, dtype=torch.uint8),
            labels=torch.tensor(labels, dtype=torch.int64),
            boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            sample_ids=ids,
            errors=errors,
            last=last,
        )

    def _shard_batches(self, shard: Shard) -> Iterator[Batch]:
        cfg = self.cfg
        images, labels, boxes, ids, errors = [], [], [], [], []
        for sample in iter_samples(shard, cfg):
            if sample.error is not None:
                errors.append((sample.sample_id, *sample.error))
                continue
            try:
                image, box = resize_crop(decode_rgb(sample.payload, cfg.max_pixels), cfg.resize, cfg.crop,
                                         box_from_meta(sample.meta))
            except Exception as error:  # any decoder failure is this image's error, not the run's
                errors.append((sample.sample_id, "decode", type(error).__name__, str(error)[:500]))
                continue
            images.append(image)
            labels.append(sample.label)
            boxes.append(box if box is not None else [float("nan")] * 4)
            ids.append(sample.sample_id)
            if len(images) == cfg.batch_size:
                yield self._batch(shard.shard_id, images, labels, boxes, ids, errors, last=False)
                images, labels, boxes, ids, errors = [], [], [], [], []
        yield self._batch(shard.shard_id, images, labels, boxes, ids, errors, last=True)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        shards = self.shards if info is None else self.shards[info.id::info.num_workers]
        if info is not None:
            torch.set_num_threads(1)  # workers are processes already; avoid oversubscription
        for shard in shards:
            yield from self._shard_batches(shard)


def build_loader(shards: list[Shard], cfg: DataConfig, pin_memory: bool) -> DataLoader:
    workers = min(cfg.num_workers, len(shards))
    return DataLoader(
        ShardBatches(shards, cfg),
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
