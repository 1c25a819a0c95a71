"""Stages of the pipeline measured alone, in the benchmark's own process: the bare forward (the
bound), the engine, the loader's CPU decode, the device decoder and the writer. Each returns a
Row with ms per batch and img/s."""

from __future__ import annotations

import itertools
import tarfile
import tempfile
import time

from pipeline_data import Dataset
from pipeline_report import STAGE, Row, count_of

WRITER_IMAGES = 10_000  # enough shards and batches for a stable rate, a few seconds at most


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, device, min_seconds: float, warmup: int = 2, min_iters: int = 3) -> tuple[float, int]:
    """Seconds per call of step() (mean of at least min_iters calls over at least min_seconds)."""
    for _ in range(warmup):
        step()
    _sync(device)
    iterations, start = 0, time.perf_counter()
    while iterations < min_iters or time.perf_counter() - start < min_seconds:
        step()
        iterations += 1
        if device.type == "cuda" and iterations % 8 == 0:  # bounds the queue without a sync per call
            _sync(device)
    _sync(device)
    return (time.perf_counter() - start) / iterations, iterations


def _timed_from_clean_peak(step, device, min_seconds: float) -> tuple[float, int]:
    """_timed, after one warm-up step on CUDA and a reset of the peak-memory counter, so the
    peak read afterwards is this step's own."""
    import torch

    if device.type == "cuda":
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    return _timed(step, device, min_seconds)


def _random_input(args, device, batch: int):
    import torch

    # channels_last on every device, as the pipeline runs (runtime.channels_last=true)
    return torch.randn(batch, 3, args.crop, args.crop, device=device).contiguous(memory_format=torch.channels_last)


def _release(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()


def forward_key(args, model_name: str) -> str:
    """The stage row whose forward bounds a run of this model (the timm row has none)."""
    if model_name == args.model:
        return "forward"
    return "forward-vit" if model_name == getattr(args, "vit_model", None) else "forward-big"


def bench_forward(args, device, model_name: str) -> Row:
    import torch
    import torchvision

    cuda = device.type == "cuda"
    key = forward_key(args, model_name)
    row = Row(key, f"forward-{'bf16' if cuda else 'fp32'}" + ("" if model_name == args.model else f" {model_name}"),
              STAGE, model_name, str(args.batch_size), reference=key,
              ran=f"torchvision {model_name}(images), no_grad, channels_last"
                  + (", bf16 autocast" if cuda else ", fp32") + f", random ({args.batch_size}, 3, {args.crop}, "
                  f"{args.crop}) on the device")
    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None).eval().requires_grad_(False).to(device)
    model = model.to(memory_format=torch.channels_last)
    images = _random_input(args, device, args.batch_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step():
        with torch.no_grad(), autocast:
            model(images)

    seconds, iterations = _timed_from_clean_peak(step, device, args.min_seconds)
    row.in_loop, row.ms_per_batch = args.batch_size / seconds, seconds * 1e3
    row.notes.append(f"{iterations} batches")
    if cuda:
        row.extra["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        row.notes.append(f"peak {row.extra['peak_bytes'] / 2**30:.2f} GiB")
    del model, images
    _release(device)
    return row


def bench_engine(args, device, num_targets: int, channels_last: bool | None = None) -> tuple[Row, tuple[int, int]]:
    import torch

    from gradcam_batch.config import CamConfig, ModelConfig
    from gradcam_batch.engine import CamEngine
    from gradcam_batch.models import build_model, resolve_target_layer

    cuda = device.type == "cuda"
    what_if = channels_last is False  # the pipeline runs channels_last on every device
    channels_last = True if channels_last is None else channels_last
    label = "top-1" if num_targets == 1 else f"top-{num_targets}"
    key = "engine" if num_targets == 1 else "engine-topk"
    provider = f"engine-only {label}"
    if what_if:
        key += "-what-if"
        provider += f" {'channels_last' if channels_last else 'NCHW'} (what-if, not the pipeline's layout)"
    cam_cfg = CamConfig(targets="pred") if num_targets == 1 else CamConfig(targets="topk", topk=num_targets)
    row = Row(key, provider, STAGE, args.model, str(args.batch_size), reference="forward",
              ran=f"CamEngine.explain(images, labels), cam.targets={cam_cfg.targets}"
                  + (f" cam.topk={num_targets}" if num_targets > 1 else "")
                  + (", bf16 autocast" if cuda else "") + (", NCHW" if not channels_last else ", channels_last"))
    model = build_model(ModelConfig(source="torchvision", name=args.model, target_layer=args.target_layer)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    _, layer = resolve_target_layer(model, args.target_layer, _random_input(args, device, 1))
    engine = CamEngine(model, layer, cam_cfg, device, torch.bfloat16 if cuda else None)
    images = _random_input(args, device, args.batch_size)
    if not channels_last:
        images = images.contiguous()
    labels = torch.full((args.batch_size,), -1, dtype=torch.int64, device=device)
    shapes = {}

    def step():
        result = engine.explain(images, labels)
        shapes["cams"] = tuple(result.cams.shape)

    seconds, iterations = _timed_from_clean_peak(step, device, args.min_seconds)
    row.in_loop, row.ms_per_batch = args.batch_size / seconds, seconds * 1e3
    height, width = shapes["cams"][2:]
    row.notes.append(f"{iterations} batches, backend {engine.backend}, maps {height}x{width}")
    if cuda:
        row.extra["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        row.notes.append(f"peak {row.extra['peak_bytes'] / 2**30:.2f} GiB")
    del engine, model, images
    _release(device)
    return row, (height, width)


def data_config(args, shards_glob: str, batch_size: int, **overrides):
    from gradcam_batch.config import DataConfig

    return DataConfig(format="webdataset", shards=shards_glob, batch_size=batch_size, num_workers=args.workers,
                      resize=args.resize, crop=args.crop, **overrides)


def loader_inputs(cfg) -> tuple[list, int, str]:
    """What the pipeline hands its loader: the shards cut into work units where this
    gradcam_batch has them (data.unit_size), else whole shards; with the shard count and a note."""
    from gradcam_batch.data.shards import list_shards

    shards = list_shards(cfg)
    try:
        from gradcam_batch.data.units import list_units
    except ImportError:  # a loader that takes whole shards
        return shards, len(shards), "whole shards"
    unit_size = getattr(cfg, "unit_size", None)
    units = list_units(shards, unit_size, id_column=getattr(cfg, "id_column", None))
    return units, len(shards), f"{len(units)} unit(s), data.unit_size={unit_size}"


def bench_decode(args, device, dataset: Dataset, key: str, provider: str) -> Row:
    """The project's loader with data.decode=workers, iterated without a model until the data
    ends or the time cap. Workers start together and deliver their batches in rounds, one batch
    each, so the steady rate counts whole rounds: from the end of the first (the last worker's
    first batch) to the end of the round in which the cap falls."""
    from gradcam_batch.data.loader import build_loader

    cfg = data_config(args, dataset.shards_glob, args.batch_size, decode="workers")
    inputs, shard_count, split = loader_inputs(cfg)
    row = Row(key, provider, STAGE, "", str(args.batch_size), shards=shard_count, reference="forward",
              ran=f"build_loader(data.shards=<data>/{'single-shard/' if dataset.meta['shards'] == 1 else ''}*.tar "
                  f"as {split}, data.decode=workers data.num_workers={args.workers}) iterated")
    cap = args.decode_seconds
    start = time.perf_counter()
    loader = build_loader(inputs, cfg, pin_memory=device.type == "cuda")
    workers = getattr(loader, "num_workers", args.workers)
    images = errors = batches = round_images = 0
    first = round_end = None
    capped = False
    batches_iterator = iter(loader)
    for batch in batches_iterator:
        now = time.perf_counter()
        images += len(batch.sample_ids)
        errors += len(batch.errors)
        batches += 1
        if first is None:
            first = now - start
        if round_end is None and batches >= max(workers, 1):
            round_end, round_images = now, images
        if now - start > cap and batches % max(workers, 1) == 0:
            capped = True
            break
    end = time.perf_counter()
    del batches_iterator  # stops the workers of a capped pass now, before the next stage starts
    whole_rate = images / (end - start)
    steady = (images - round_images) / (end - round_end) if round_end and images > round_images else None
    row.in_loop = steady or whole_rate
    row.steady = steady
    row.ms_per_batch = args.batch_size / row.in_loop * 1e3
    stopped = f" (stopped after the round at the {cap:g} s cap)" if capped else ""
    row.notes.append(f"{images} images in {end - start:.1f} s{stopped}, {whole_rate:,.1f} img/s with worker start; "
                     f"{workers} worker(s) over {count_of(shard_count, 'shard')}, {split}")
    if steady:
        row.notes.append(f"img/s after the first round of {max(workers, 1)} batch(es); "
                         f"{steady / max(workers, 1):,.1f} img/s per worker")
    else:
        row.notes.append("too few batches for a steady rate: img/s includes worker start")
    row.notes.append(f"first batch after {first:.1f} s" if first is not None else "no batch")
    if errors:
        row.notes.append(f"{errors} decode errors")
    return row


def read_jpegs(paths, count: int) -> list[bytes]:
    """The first `count` JPEG members of the shards, as bytes in host memory."""
    payloads: list[bytes] = []
    for path in paths:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.isfile() and member.name.lower().endswith((".jpg", ".jpeg")):
                    payloads.append(tar.extractfile(member).read())
                    if len(payloads) == count:
                        return payloads
    return payloads


def device_decoder_backends() -> list[str | None]:
    """The DeviceDecoder backends to measure: each one installed where the decoder takes a
    backend (nvImageCodec only with its wheel), else its one default (None)."""
    try:
        from gradcam_batch.data.device_decode import DECODER_BACKENDS, nvimgcodec_available
    except ImportError:  # a decoder without a backend choice
        return [None]
    return [name for name in DECODER_BACKENDS if name == "torchvision"
            or (name == "nvimgcodec" and nvimgcodec_available())] or [None]


def bench_device_decode(args, device, dataset: Dataset, backend: str | None = None) -> Row:
    """DeviceDecoder on batches of JPEG bytes already in host memory: the host-to-device copy of
    the bytes, the batched decode and the resize + crop, as data.decode=device runs them."""
    from gradcam_batch.data.device_decode import DeviceDecoder

    payloads = read_jpegs(dataset.shard_paths, min(dataset.meta["images"], args.batch_size * 8))
    batch = min(args.batch_size, len(payloads))
    batches = [payloads[i:i + batch] for i in range(0, len(payloads) - batch + 1, batch)]
    choice = {} if backend is None else {"backend": backend}
    decoder = DeviceDecoder(resize=args.resize, crop=args.crop, device=device, **choice)
    used = getattr(decoder, "backend", "default")
    row = Row(f"device-decode-{backend}" if backend else "device-decode", f"device-decode-only, {used}", STAGE,
              "", str(batch), reference="forward",
              ran=f"DeviceDecoder(resize={args.resize}, crop={args.crop}, device={device.type}"
                  + (f", backend={backend}" if backend else "") + f")(jpeg_bytes), {len(batches)} batch(es) "
                  "of bytes in host memory, cycled")
    cycle = itertools.cycle(batches)
    failures = {}

    def step():
        _, failed = decoder(next(cycle))
        failures.update(failed)

    seconds, iterations = _timed(step, device, args.min_seconds)
    row.in_loop, row.ms_per_batch = batch / seconds, seconds * 1e3
    row.notes.append(f"{iterations} batches on the default stream, nothing else running")
    if failures:
        row.notes.append(f"{len(failures)} payloads failed to decode")
    del decoder
    _release(device)
    return row


def bench_writer(args, num_targets: int, cam_shape: tuple[int, int]) -> Row:
    import numpy as np

    from gradcam_batch.writer import ParquetShardWriter, ShardOutput

    label = "top-1" if num_targets == 1 else f"top-{num_targets}"
    height, width = cam_shape
    row = Row("writer" if num_targets == 1 else "writer-topk", f"writer-only {label}", STAGE, "",
              str(args.batch_size), reference="forward",
              ran=f"ParquetShardWriter(zstd, queue 8).submit(ShardOutput) of synthetic {height}x{width} maps")
    rng = np.random.default_rng(0)
    batch = args.batch_size
    arrays = dict(labels=rng.integers(0, 1000, batch), target_classes=rng.integers(0, 1000, (batch, num_targets)),
                  scores=rng.standard_normal((batch, num_targets)).astype(np.float32),
                  probs=rng.random((batch, num_targets)).astype(np.float32),
                  cams=rng.random((batch, num_targets, height, width)).astype(np.float32),
                  cam_mean=rng.random((batch, num_targets)).astype(np.float32),
                  peak=rng.integers(0, height * width, (batch, num_targets)))
    images = min(args.images, WRITER_IMAGES)
    outputs = []
    for shard_index, first in enumerate(range(0, images, args.shard_size)):
        count = min(args.shard_size, images - first)
        for offset in range(0, count, batch):
            size = min(batch, count - offset)
            ids = [f"{first + offset + i:08d}" for i in range(size)]
            outputs.append(ShardOutput(f"shard-{shard_index:05d}", ids,
                                       **{name: value[:size] for name, value in arrays.items()},
                                       last=offset + size == count))
    with tempfile.TemporaryDirectory(prefix="bench-writer-") as directory:
        start = time.perf_counter()
        with ParquetShardWriter(directory, {"benchmark": "writer-only"}, "zstd", 8) as writer:
            for out in outputs:
                writer.submit(out)
        seconds = time.perf_counter() - start
    row.in_loop = images / seconds
    row.ms_per_batch = seconds / len(outputs) * 1e3
    row.notes.append(f"{images * num_targets} rows in {len(outputs)} batches, fsync+rename per shard")
    return row


def cam_shape(args, device) -> tuple[int, int]:
    """The target layer's map size at this crop, from one forward."""
    import torch

    from gradcam_batch.config import ModelConfig
    from gradcam_batch.engine import ActivationCapture
    from gradcam_batch.models import build_model, resolve_target_layer

    model = build_model(ModelConfig(source="torchvision", name=args.model)).to(device)
    sample = _random_input(args, device, 1)
    _, layer = resolve_target_layer(model, args.target_layer, sample)
    with ActivationCapture(layer) as capture, torch.no_grad():
        model(sample)
    return tuple(capture.activation.shape[2:])
