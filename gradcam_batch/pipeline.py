"""Wire the stages together: shards -> loader -> device preprocessing -> engine -> writer.

The loop makes one host copy per batch (finished maps and scores) and hands it to the writer
thread; nothing flows back to an earlier stage.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import gradcam_batch
from gradcam_batch import UserError, dist
from gradcam_batch.config import Config
from gradcam_batch.data.demo import ensure_demo_shards
from gradcam_batch.data.device_decode import DeviceDecoder
from gradcam_batch.data.loader import Batch, build_loader
from gradcam_batch.data.shards import list_shards
from gradcam_batch.engine import CamEngine, CamResult
from gradcam_batch.models import build_model, resolve_target_layer
from gradcam_batch.writer import (MANIFEST_NAME, ParquetShardWriter, ShardOutput, clear_output, completed_shards,
                                  config_hash, config_identity, counts_on_disk, read_manifest, write_manifest)

log = logging.getLogger("gradcam_batch")


@dataclass
class Summary:
    images: int
    rows: int
    errors: int
    shards_written: int
    shards_skipped: int
    seconds: float
    images_per_second: float
    output_dir: str
    target_layer: str
    pointing_hits: int
    pointing_total: int

    @property
    def pointing_game(self) -> float | None:
        return self.pointing_hits / self.pointing_total if self.pointing_total else None

    def lines(self) -> list[str]:
        lines = [
            f"images      {self.images}",
            f"rows        {self.rows}",
            f"errors      {self.errors}",
            f"shards      {self.shards_written} written, {self.shards_skipped} already complete",
            f"throughput  {self.images_per_second:.1f} img/s ({self.seconds:.1f} s)",
            f"layer       {self.target_layer}",
            f"output      {Path(self.output_dir).resolve() / 'cams'}",
        ]
        if self.pointing_game is not None:
            lines.append(f"pointing    {self.pointing_game:.3f} ({self.pointing_hits}/{self.pointing_total} "
                         "maps peak inside the object box)")
        return lines


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("runtime.device=cuda but no CUDA device is available; use runtime.device=auto or cpu")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", dist.local_rank() % torch.cuda.device_count())


def resolve_amp(requested: str, device: torch.device) -> torch.dtype | None:
    if requested == "off" or (requested == "auto" and device.type != "cuda"):
        return None
    if requested == "fp16" and device.type != "cuda":
        raise UserError("runtime.amp=fp16 needs CUDA; use runtime.amp=bf16 or off on CPU")
    return torch.float16 if requested == "fp16" else torch.bfloat16


def pointing_hits(result: CamResult, boxes: np.ndarray) -> tuple[int, int]:
    """Rank-0 maps whose peak cell (its centre, with half a cell of slack) lies in the box."""
    known = ~np.isnan(boxes).any(axis=1)
    if not known.any():
        return 0, 0
    height, width = result.cams.shape[2:]
    peak = result.peak[:, 0].numpy()[known]
    x = ((peak % width) + 0.5) / width
    y = ((peak // width) + 0.5) / height
    box = boxes[known]
    slack_x, slack_y = 0.5 / width, 0.5 / height
    hit = ((x >= box[:, 0] - slack_x) & (x <= box[:, 2] + slack_x)
           & (y >= box[:, 1] - slack_y) & (y <= box[:, 3] + slack_y))
    return int(hit.sum()), int(known.sum())


def _metadata(cfg: Config, resolved: dict, layer: str) -> dict:
    import pyarrow
    import torchvision

    return {
        "config": resolved,
        "model": cfg.model.name or cfg.model.source,
        "target_layer": layer,
        "method": cfg.cam.method,
        "versions": {"gradcam_batch": gradcam_batch.__version__, "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "pyarrow": pyarrow.__version__,
                     "python": platform.python_version()},
    }


class Preprocess:
    """uint8 (B, 3, H, W) on the host -> normalized float on the device, in one fused op."""

    def __init__(self, mean, std, device: torch.device, channels_last: bool):
        std_tensor = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std_tensor)
        self.shift = -torch.tensor(mean, device=device).view(1, 3, 1, 1) / std_tensor
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True).to(memory_format=self.memory_format)
        return torch.addcmul(self.shift, images.float(), self.scale)


def device_images(batch: Batch, decoder: DeviceDecoder | None, device: torch.device) -> torch.Tensor:
    """uint8 images of the batch on the device: the workers' ones, then the device-decoded
    payloads. Payloads that fail to decode leave the batch and join its error rows."""
    images = batch.images.to(device, non_blocking=True)
    if not batch.payloads:
        return images
    decoded, failed = decoder(batch.payloads)
    if failed:
        offset = len(batch.images)
        drop = {offset + index for index in failed}
        keep = [i for i in range(len(batch.sample_ids)) if i not in drop]
        batch.errors.extend((batch.sample_ids[offset + index], "decode", type(error).__name__, str(error)[:500])
                            for index, error in failed.items())
        batch.sample_ids = [batch.sample_ids[i] for i in keep]
        batch.labels, batch.boxes = batch.labels[keep], batch.boxes[keep]
    return torch.cat([images, decoded])


def check_resume(output_dir: Path, resolved: dict, overwrite: bool) -> None:
    """Refuse to mix rows of different runs in one output directory."""
    if overwrite:
        return
    manifest = read_manifest(output_dir)
    if manifest is None:
        if any((output_dir / "cams").glob("part-*.parquet")):
            raise UserError(f"output.dir={str(output_dir)!r} holds part files but no {MANIFEST_NAME}; "
                            "use another output.dir or output.overwrite=true")
        return
    if manifest.get("config_hash") != config_hash(resolved):
        before, now = manifest.get("identity", {}), config_identity(resolved)
        changed = [f"{group}.{key}" for group in now for key in now[group]
                   if before.get(group, {}).get(key) != now[group][key]]
        raise UserError(f"output.dir={str(output_dir)!r} holds results of a different run "
                        f"({', '.join(changed) or 'config'} changed); use another output.dir "
                        "or output.overwrite=true to replace them")


def _manifest(cfg: Config, resolved: dict, layer: str, shard_ids: list[str], status: str, **extra) -> dict:
    return {"status": status, "config_hash": config_hash(resolved), "identity": config_identity(resolved),
            "shard_ids": shard_ids, **_metadata(cfg, resolved, layer), "world_size": dist.world_size(), **extra}


def _prepare(cfg: Config, device: torch.device):
    """Everything that can fail on user input, before anything is written."""
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    amp_dtype = resolve_amp(cfg.runtime.amp, device)
    channels_last = cfg.runtime.channels_last  # NHWC convolutions are faster on CPU too (1.2-1.4x measured)
    model = build_model(cfg.model).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    sample = torch.zeros(1, 3, cfg.data.crop, cfg.data.crop, device=device)
    layer_name, layer = resolve_target_layer(model, cfg.model.target_layer, sample)
    with torch.no_grad():
        num_classes = model(sample).shape[1]
    engine = CamEngine(model, layer, cfg.cam, device, amp_dtype, num_classes=num_classes)
    if cfg.data.format == "demo":
        root = cfg.data.root or Path(cfg.output.dir) / "demo-data"
        if dist.is_main():
            ensure_demo_shards(root, cfg.data.demo_images)
        dist.barrier()
        cfg.data.shards = ensure_demo_shards(root, cfg.data.demo_images)
    shards = list_shards(cfg.data)
    return channels_last, engine, layer_name, shards


def run(cfg: Config, resolved: dict | None = None) -> Summary:
    start = time.perf_counter()
    resolved = resolved or {}
    output_dir = Path(cfg.output.dir)
    device = resolve_device(cfg.runtime.device)
    dist.init(device)
    try:
        channels_last, engine, layer_name, shards = _prepare(cfg, device)
        check_resume(output_dir, resolved, cfg.output.overwrite)
        all_ids = [shard.shard_id for shard in shards]
        dist.barrier()  # every rank has checked the old manifest before rank 0 replaces it
        if dist.is_main():
            if cfg.output.overwrite:
                clear_output(output_dir)
            write_manifest(output_dir, _manifest(cfg, resolved, layer_name, all_ids, "running"))
        dist.barrier()
        mine = dist.assign(shards, dist.rank(), dist.world_size())
        done = completed_shards(output_dir)
        todo = [shard for shard in mine if shard.shard_id not in done]
        if len(todo) < len(mine):
            log.info("resuming: %d of %d shards already complete", len(mine) - len(todo), len(mine))
        if cfg.model.source == "torchvision" and cfg.model.weights is None:
            log.warning("model.weights=null: %s has random weights (seed %d); its maps explain nothing real",
                        cfg.model.name, cfg.model.seed)
        local = _process(cfg, resolved, device, channels_last, engine, layer_name, todo)
        local["shards_skipped"] = len(mine) - len(todo)
        local["seconds"] = time.perf_counter() - start
        ranks = dist.gather(local)
        summary = Summary(
            images=sum(r["images"] for r in ranks), rows=sum(r["rows"] for r in ranks),
            errors=sum(r["errors"] for r in ranks), shards_written=sum(r["shards_written"] for r in ranks),
            shards_skipped=sum(r["shards_skipped"] for r in ranks), seconds=max(r["seconds"] for r in ranks),
            images_per_second=0.0, output_dir=str(output_dir), target_layer=layer_name,
            pointing_hits=sum(r["pointing_hits"] for r in ranks),
            pointing_total=sum(r["pointing_total"] for r in ranks))
        summary.images_per_second = summary.images / summary.seconds if summary.seconds else 0.0
        if dist.is_main():
            counts = counts_on_disk(output_dir, all_ids)
            missing = [shard_id for shard_id in all_ids if shard_id not in counts]
            write_manifest(output_dir, _manifest(
                cfg, resolved, layer_name, all_ids, "complete" if not missing else "incomplete",
                shards=counts, rows=sum(c["rows"] for c in counts.values()),
                errors=sum(c["errors"] for c in counts.values()),
                this_run={"images": summary.images, "rows": summary.rows, "errors": summary.errors,
                          "seconds": round(summary.seconds, 3),
                          "images_per_second": round(summary.images_per_second, 2),
                          "ranks": [{k: r[k] for k in ("images", "errors", "seconds")} for r in ranks]}))
        dist.barrier()
        return summary
    finally:
        dist.shutdown()


def _process(cfg: Config, resolved: dict, device, channels_last, engine: CamEngine, layer_name: str, todo) -> dict:
    """This rank's shards through the device and into the writer; returns its counts."""
    from tqdm import tqdm

    total = sum(len(s.files) for s in todo) if all(s.format == "imagefolder" for s in todo) else None
    preprocess = Preprocess(cfg.data.mean, cfg.data.std, device, channels_last)
    device_decode = cfg.data.decode == "device" or (cfg.data.decode == "auto" and device.type == "cuda")
    decoder = DeviceDecoder(cfg.data.resize, cfg.data.crop, device) if device_decode else None
    images = rows = errors = hits = pointed = 0
    with ParquetShardWriter(cfg.output.dir, _metadata(cfg, resolved, layer_name),
                            cfg.output.compression, cfg.output.queue_size) as writer, \
            tqdm(total=total, unit="img", disable=not cfg.runtime.progress or not dist.is_main(),
                 dynamic_ncols=True, leave=False) as bar:
        batch: Batch
        for batch in build_loader(todo, cfg.data, pin_memory=device.type == "cuda", device_decode=device_decode):
            uint8_images = device_images(batch, decoder, device)
            count = len(batch.sample_ids)
            errors += len(batch.errors)
            if count:
                result = engine.explain(preprocess(uint8_images), batch.labels.to(device, non_blocking=True)).to_host()
                h, p = pointing_hits(result, batch.boxes.numpy())
                hits, pointed = hits + h, pointed + p
                rows += result.target_classes.numel()
                images += count
                out = ShardOutput(batch.shard_id, batch.sample_ids, batch.labels.numpy(),
                                  result.target_classes.numpy(), result.scores.numpy(), result.probs.numpy(),
                                  result.cams.numpy(), result.cam_mean.numpy(), result.peak.numpy(),
                                  batch.errors, batch.last)
            else:
                empty = np.empty((0, 1))
                out = ShardOutput(batch.shard_id, [], np.empty(0, np.int64), empty, empty, empty,
                                  np.empty((0, 1, 1, 1), np.float32), empty, empty, batch.errors, batch.last)
            writer.submit(out)
            bar.update(count + len(batch.errors))
    return {"images": images, "rows": rows, "errors": errors, "shards_written": len(todo),
            "pointing_hits": hits, "pointing_total": pointed}
