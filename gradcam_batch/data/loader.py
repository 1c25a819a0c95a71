"""DataLoader assembly: the run's work units (shards, or slices of them) are dealt round-robin to
the workers, so every worker stays busy whatever the shard count. Batches never span units and
a unit's last batch is flagged, so the writer knows when the unit's part file is complete."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gradcam_batch.config import DataConfig
from gradcam_batch.data.readers import iter_samples
from gradcam_batch.data.shards import Shard
from gradcam_batch.data.units import Unit, as_unit
from gradcam_batch.data.transforms import boxes_from_meta, decode_resize_crop, device_jpeg_size, map_box

log = logging.getLogger("gradcam_batch")


def image_digest(payload: bytes) -> str:
    """The `image_digest` column: the first 16 hex digits of the SHA-256 of a sample's encoded
    image, its bytes exactly as read from the shard or file. The report hashes what it reads back
    the same way, so a file changed since the run (even to the same size, its mtime restored) is
    not shown under a map of other pixels."""
    return hashlib.sha256(payload).hexdigest()[:16]


@dataclass
class Batch:
    """Samples of one unit. The first len(images) were decoded by the worker; the rest arrive
    as `payloads`, JPEG bytes for the device decoder (data.decode=device)."""
    shard_id: str
    images: torch.Tensor  # uint8 (N_decoded, 3, crop, crop)
    labels: torch.Tensor  # int64 (N,), -1 unknown
    boxes: torch.Tensor  # float32 (N, M, 4) in [0, 1] of the crop, M the most boxes of a sample, NaN rows: none
    sample_ids: list[str]
    errors: list[tuple[str, str, str, str]] = field(default_factory=list)  # (sample_id, stage, type, message)
    last: bool = False  # the unit's final batch
    payloads: list[bytes] = field(default_factory=list)
    unit_id: str = ""  # the unit the samples belong to (its part file's name); "" means the whole shard
    worker: int = -1  # the DataLoader worker that read it (-1: the main process), to see the load spread
    # image_digest(payload) of each sample, aligned with sample_ids (whoever drops a sample drops
    # its digest); None: not recorded (the column is then null)
    image_digests: list[str] | None = None

    def pin_memory(self) -> "Batch":
        self.images = self.images.pin_memory()
        return self


class _Pending:
    """Samples of the batch being filled: worker-decoded first, device payloads after."""

    def __init__(self):
        self.images, self.payloads = [], []
        self.decoded_rows, self.payload_rows = [], []  # (sample_id, label, boxes, image digest) each
        self.errors = []

    def __len__(self) -> int:
        return len(self.images) + len(self.payloads)

    def batch(self, unit: Unit, crop: int, last: bool, worker: int) -> Batch:
        rows = self.decoded_rows + self.payload_rows
        return Batch(
            shard_id=unit.shard_id,
            unit_id=unit.unit_id,
            worker=worker,
            images=torch.stack(self.images) if self.images else torch.empty(0, 3, crop, crop, dtype=torch.uint8),
            labels=torch.tensor([label for _, label, _, _ in rows], dtype=torch.int64),
            boxes=_box_tensor([boxes for _, _, boxes, _ in rows]),
            sample_ids=[sample_id for sample_id, _, _, _ in rows],
            errors=self.errors,
            last=last,
            payloads=self.payloads,
            image_digests=[digest for _, _, _, digest in rows],
        )


class ShardBatches(IterableDataset):
    """Batches of decoded uint8 images (data.decode=workers), or, with device_decode, the JPEG
    bytes a device decoder can take as they are plus worker-decoded images for the rest.
    Takes work units; a shard given instead is one unit."""

    def __init__(self, units: list[Unit | Shard], cfg: DataConfig, device_decode: bool = False, balance=None):
        self.units = [as_unit(unit) for unit in units]
        # resize, crop, ... left null: torchvision's recipe (the pipeline has filled in the model's)
        self.cfg = cfg.resolved()
        self.device_decode = device_decode
        # data.decode=mixed: a DecodeBalance whose shared share says, sample by sample, whether
        # this worker ships the JPEG to the device or decodes it itself
        self.balance = balance
        self._samples_seen = 0  # per worker process: each holds its own copy of this object

    def _add(self, pending: _Pending, sample) -> None:
        cfg = self.cfg
        box = boxes_from_meta(sample.meta)  # a list of boxes, or None
        to_device = self.device_decode and (self.balance is None or self.balance.take_device(self._samples_seen))
        self._samples_seen += 1
        size = device_jpeg_size(sample.payload, cfg.max_pixels) if to_device else None
        if size is not None:
            box = map_box(box, *size, cfg.resize, cfg.crop)
            pending.payloads.append(sample.payload)
            pending.payload_rows.append((sample.sample_id, sample.label, box, image_digest(sample.payload)))
            return
        image, box = decode_resize_crop(sample.payload, cfg.resize, cfg.crop, cfg.max_pixels, box,
                                        interpolation=cfg.interpolation)
        pending.images.append(image)
        pending.decoded_rows.append((sample.sample_id, sample.label, box, image_digest(sample.payload)))

    def _unit_batches(self, unit: Unit, worker: int) -> Iterator[Batch]:
        cfg = self.cfg
        pending = _Pending()
        for sample in iter_samples(unit, cfg):
            if sample.error is not None:
                pending.errors.append((sample.sample_id, *sample.error))
                continue
            try:
                self._add(pending, sample)
            except Exception as error:  # any decoder failure is this image's error, not the run's
                pending.errors.append((sample.sample_id, "decode", type(error).__name__, str(error)[:500]))
                continue
            if len(pending) == cfg.batch_size:
                yield pending.batch(unit, cfg.crop, last=False, worker=worker)
                pending = _Pending()
        yield pending.batch(unit, cfg.crop, last=True, worker=worker)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        # Round-robin over units in listing order: the slices of one large shard land on
        # different workers, and near-equal units keep the workers' loads near-equal.
        units = self.units if info is None else self.units[info.id::info.num_workers]
        if info is not None:
            torch.set_num_threads(1)  # workers are processes already; avoid oversubscription
        for unit in units:
            yield from self._unit_batches(unit, -1 if info is None else info.id)


def _box_tensor(per_sample: list) -> torch.Tensor:
    """(N, M, 4) float32 of each sample's boxes (a list, or None), padded with NaN rows."""
    most = max([len(boxes) for boxes in per_sample if boxes] + [1])
    out = torch.full((len(per_sample), most, 4), float("nan"))
    for index, boxes in enumerate(per_sample):
        if boxes:
            out[index, :len(boxes)] = torch.tensor(boxes, dtype=torch.float32)
    return out


def build_loader(units: list[Unit | Shard], cfg: DataConfig, pin_memory: bool,
                 device_decode: bool = False, balance=None) -> DataLoader:
    workers = min(cfg.num_workers, len(units))
    return DataLoader(
        ShardBatches(units, cfg, device_decode, balance),
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        # mixed decoding: each batch waiting in the queue was split by an older share, so a short
        # queue lets the balance's corrections take effect sooner
        prefetch_factor=(2 if balance is not None else 4) if workers else None,
        persistent_workers=False,
        worker_init_fn=functools.partial(die_with_parent, os.getpid()) if workers else None,
    )


def die_with_parent(parent_pid: int, worker_id: int | None = None) -> None:
    """A worker whose main process is killed (kill -9) may sit on its queues for good, holding
    hundreds of MB and its shared-memory segments: on Linux the kernel ends it with the parent.
    If the parent died before this ran, the worker ends here."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
        log.warning("DataLoader worker %s: prctl(PR_SET_PDEATHSIG) failed (errno %d); it may outlive a killed run",
                    worker_id, ctypes.get_errno())
    if os.getppid() != parent_pid:
        os._exit(1)
