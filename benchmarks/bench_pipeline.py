"""End-to-end throughput of gradcam-batch against its peers, on the same images and device.

    python benchmarks/bench_pipeline.py [--device cpu|cuda] [--images N] [--model NAME]
        [--batch-size B] [--peer-batch-size B] [--workers W] [--repeats R] [--providers ...]
        [--out FILE] [--quick]

One run generates (or reuses) JPEG WebDataset shards of N smooth random 500x375 images (about
70 kB each at quality 90, a random label 0..999 per image), then measures, in img/s:

    forward             the bare model forward on device tensors already preprocessed (no_grad;
                        channels_last + bf16 autocast on CUDA): the upper bound for layer Grad-CAM
    gradcam-batch       `python -m gradcam_batch data=webdataset ...` in a subprocess, shards to
                        Parquet on disk: top-1, top-5 and (CUDA) a compute-bound resnet152
    pytorch-grad-cam    a subprocess (`bench_pipeline.py --peer-pytorch-grad-cam`) reading the same
                        shards (tarfile + PIL + torchvision transforms in a DataLoader with the same
                        workers) and computing pytorch_grad_cam.GradCAM maps of the predicted class
    captum              the same with captum.attr.LayerGradCam (+ LayerAttribution.interpolate)
    stages              decode-only (gradcam_batch's loader), engine-only (CamEngine on random
                        device tensors), writer-only (ParquetShardWriter fed synthetic maps)

"in-loop" is the rate a process reports for its own work after its imports (gradcam-batch: its
summary line, i.e. pipeline.run's clock, which includes building the model and starting the
workers; peers: from building the model to the last map). "whole process" is the images over
the subprocess's wall time, Python and torch start-up included. Every provider runs in this
one invocation; one that fails prints its error and its row says so. --repeats R runs the
subprocess providers R times, interleaved, and reports the median (the list is in the notes).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULT_PREFIX = "BENCH_RESULT "
DATA_FORMAT_VERSION = 1  # bump when the generated images change, so old caches are not reused
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PROVIDERS = ("forward", "engine", "decode", "writer", "top1", "topk", "big", "pytorch-grad-cam", "captum")
SUBPROCESS_PROVIDERS = ("top1", "topk", "big", "pytorch-grad-cam", "captum")


# --- arguments -----------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    parser.add_argument("--images", type=int, help="images in the dataset (default 20000 on cuda, 256 on cpu)")
    parser.add_argument("--width", type=int, default=500, help="generated image width (default 500)")
    parser.add_argument("--height", type=int, default=375, help="generated image height (default 375)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per tar shard (default 1000)")
    parser.add_argument("--data-dir", default="/tmp/gradcam-bench-data",
                        help="cache of generated shards; one sub-folder per count/size (default %(default)s)")
    parser.add_argument("--model", help="torchvision model (default resnet50 on cuda, resnet18 on cpu)")
    parser.add_argument("--big-model", default="resnet152", help="compute-bound model, cuda only (default resnet152)")
    parser.add_argument("--target-layer", default="layer4", help="dotted module name (default layer4)")
    parser.add_argument("--resize", type=int, help="shorter side before the crop (default 256; --quick 72)")
    parser.add_argument("--crop", type=int, help="center crop (default 224; --quick 64)")
    parser.add_argument("--batch-size", type=int, help="gradcam-batch / forward batch (default 256 cuda, 32 cpu)")
    parser.add_argument("--peer-batch-size", type=int, help="peer batch (default 64 cuda, 32 cpu)")
    parser.add_argument("--workers", type=int, help="DataLoader workers everywhere (default 15 cuda, 1 cpu)")
    parser.add_argument("--topk", type=int, default=5, help="targets per image of the top-k run (default 5)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each subprocess provider, interleaved; the median is reported")
    parser.add_argument("--min-seconds", type=float, help="timed duration of each in-process stage "
                        "(default 5 cuda, 3 cpu)")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset of: "
                        + ", ".join(PROVIDERS))
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per subprocess (default 3600)")
    parser.add_argument("--note", action="append", default=[],
                        help="free-text line for the results header (repeatable), e.g. what else ran")
    parser.add_argument("--out", help="also write the markdown here (a bare name goes to benchmarks/results/)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: 32 images, short timings")
    # peer mode: this file runs as the peer's own process, so its start-up is measured as well
    parser.add_argument("--peer-pytorch-grad-cam", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peer-captum", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    defaults = dict(images=20000 if cuda else 256, model="resnet50" if cuda else "resnet18",
                    batch_size=256 if cuda else 32, peer_batch_size=64 if cuda else 32,
                    workers=15 if cuda else 1, min_seconds=5.0 if cuda else 3.0, resize=256, crop=224)
    if args.quick:
        defaults.update(images=32, batch_size=16, peer_batch_size=16, min_seconds=0.3, resize=72, crop=64)
        if args.shard_size == parser.get_default("shard_size"):
            args.shard_size = 16  # two shards, so a second worker and the shard boundary are exercised
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in args.providers if p not in PROVIDERS]
    if unknown:
        parser.error(f"--providers: unknown {', '.join(unknown)}; choose from {', '.join(PROVIDERS)}")
    for name in ("images", "width", "height", "shard_size", "resize", "crop", "batch_size", "peer_batch_size",
                 "topk", "repeats", "timeout"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.workers < 0:
        parser.error(f"--workers={args.workers} must be >= 0")
    if args.crop > args.resize:
        parser.error(f"--crop={args.crop} is larger than --resize={args.resize}")
    return args


# --- dataset ---------------------------------------------------------------------------------------

def _make_jpeg(rng, width: int, height: int) -> bytes:
    """Smooth random content: upsampled low-resolution colour noise, mid-frequency texture, a few
    filled shapes and fine grain, so a quality-90 JPEG is about 70 kB at 500x375."""
    import numpy as np
    from PIL import Image, ImageDraw

    low = (rng.random((int(rng.integers(4, 10)), int(rng.integers(5, 12)), 3)) * 255).astype(np.uint8)
    base = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), dtype=np.float32)
    texture = rng.standard_normal((max(height // 8, 1), max(width // 8, 1), 3)) * 40 + 128
    texture = Image.fromarray(texture.clip(0, 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    pixels = base + (np.asarray(texture, dtype=np.float32) - 128) * (26 / 40)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = int(rng.integers(0, max(width - 40, 1))), int(rng.integers(0, max(height - 40, 1)))
        x1, y1 = x0 + int(rng.integers(30, max(width // 2, 31))), y0 + int(rng.integers(30, max(height // 2, 31)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=color)
        else:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=color)
    pixels = np.asarray(image, dtype=np.float32) + rng.standard_normal((height, width, 3)) * 9
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def _write_shard(job: tuple) -> int:
    """One tar of `<key>.jpg` + `<key>.cls` members; written under a temporary name, then renamed."""
    import numpy as np

    path, first, count, width, height = job
    rng = np.random.default_rng(first)
    tmp = f"{path}.tmp"
    total = 0
    with tarfile.open(tmp, "w") as tar:
        for index in range(first, first + count):
            key = f"{index:08d}"
            jpeg = _make_jpeg(rng, width, height)
            total += len(jpeg)
            for name, data in ((f"{key}.jpg", jpeg), (f"{key}.cls", str(int(rng.integers(0, 1000))).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
    return total


def ensure_dataset(args) -> tuple[Path, dict]:
    """Shards under <data-dir>/<N>x<W>x<H>-shard<S>/, reused when its meta.json matches."""
    from multiprocessing import Pool

    folder = Path(args.data_dir) / f"{args.images}x{args.width}x{args.height}-shard{args.shard_size}"
    meta = {"images": args.images, "width": args.width, "height": args.height, "shard_size": args.shard_size,
            "version": DATA_FORMAT_VERSION}
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        stored = json.loads(meta_path.read_text())
        if {k: stored.get(k) for k in meta} == meta:
            print(f"dataset: reusing {folder} ({stored['images']} images, {stored['mean_jpeg_kb']:.0f} kB each)",
                  flush=True)
            return folder, stored
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    jobs = [(str(folder / f"shard-{index:05d}.tar"), first, min(args.shard_size, args.images - first),
             args.width, args.height)
            for index, first in enumerate(range(0, args.images, args.shard_size))]
    start = time.perf_counter()
    with Pool(min(os.cpu_count() or 1, len(jobs))) as pool:
        sizes = pool.map(_write_shard, jobs, chunksize=1)
    meta["mean_jpeg_kb"] = sum(sizes) / args.images / 1e3
    meta["shards"] = len(jobs)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")  # written last: the completion marker
    print(f"dataset: wrote {args.images} images in {len(jobs)} shards to {folder} in "
          f"{time.perf_counter() - start:.1f} s ({meta['mean_jpeg_kb']:.0f} kB each)", flush=True)
    return folder, meta


# --- results -----------------------------------------------------------------------------------------

@dataclass
class Row:
    key: str  # provider id (PROVIDERS) plus a suffix for variants
    provider: str
    model: str = ""
    batch: str = ""
    in_loop: float | None = None  # img/s
    whole: float | None = None  # img/s over the process wall time
    notes: list[str] = field(default_factory=list)
    status: str | None = None  # "failed: ..." / "skipped: ..."
    extra: dict = field(default_factory=dict)


def _one_line(error: BaseException | str) -> str:
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:300]


def _median_runs(values: list[float]) -> tuple[float, str]:
    if len(values) == 1:
        return values[0], ""
    return statistics.median(values), "runs " + ", ".join(f"{v:.1f}" for v in values)


# --- in-process providers ------------------------------------------------------------------------------

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
        if device.type == "cuda" and iterations % 8 == 0:
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


def bench_forward(args, device, model_name: str) -> Row:
    import torch
    import torchvision

    cuda = device.type == "cuda"
    row = Row("forward" if model_name == args.model else "forward-big",
              f"forward-{'bf16' if cuda else 'fp32'}" + ("" if model_name == args.model else f" {model_name}"),
              model_name, str(args.batch_size))
    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None).eval().requires_grad_(False).to(device)
    model = model.to(memory_format=torch.channels_last)
    images = _random_input(args, device, args.batch_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step():
        with torch.no_grad(), autocast:
            model(images)

    seconds, iterations = _timed_from_clean_peak(step, device, args.min_seconds)
    row.in_loop = args.batch_size / seconds
    row.notes.append(f"{iterations} batches of random tensors")
    if cuda:
        row.extra["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        row.notes.append(f"peak {row.extra['peak_bytes'] / 2**30:.2f} GiB")
    del model, images
    if cuda:
        torch.cuda.empty_cache()
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
    row = Row(key, provider, args.model, str(args.batch_size))
    model = build_model(ModelConfig(source="torchvision", name=args.model, target_layer=args.target_layer)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    _, layer = resolve_target_layer(model, args.target_layer, _random_input(args, device, 1))
    cam_cfg = CamConfig(targets="pred") if num_targets == 1 else CamConfig(targets="topk", topk=num_targets)
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
    row.in_loop = args.batch_size / seconds
    height, width = shapes["cams"][2:]
    row.notes.append(f"{iterations} batches, backend {engine.backend}, maps {height}x{width}")
    if cuda:
        row.extra["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        row.notes.append(f"peak {row.extra['peak_bytes'] / 2**30:.2f} GiB")
    del engine, model, images
    if cuda:
        torch.cuda.empty_cache()
    return row, (height, width)


def _data_config(args, shards_glob: str, batch_size: int):
    from gradcam_batch.config import DataConfig

    return DataConfig(format="webdataset", shards=shards_glob, batch_size=batch_size, num_workers=args.workers,
                      resize=args.resize, crop=args.crop)


def bench_decode(args, device, shards_glob: str) -> Row:
    from gradcam_batch.data.loader import build_loader
    from gradcam_batch.data.shards import list_shards

    row = Row("decode", "decode-only (gradcam_batch loader)", "", str(args.batch_size))
    cfg = _data_config(args, shards_glob, args.batch_size)
    shards = list_shards(cfg)
    images = errors = 0
    start = time.perf_counter()
    for batch in build_loader(shards, cfg, pin_memory=device.type == "cuda"):
        images += len(batch.sample_ids)
        errors += len(batch.errors)
    seconds = time.perf_counter() - start
    row.in_loop = images / seconds
    used = min(args.workers, len(shards))
    row.notes.append(f"{images} images, {used} worker(s) over {len(shards)} shard(s), worker start included")
    if errors:
        row.notes.append(f"{errors} decode errors")
    return row


def bench_writer(args, num_targets: int, cam_shape: tuple[int, int]) -> Row:
    import numpy as np

    from gradcam_batch.writer import ParquetShardWriter, ShardOutput

    label = "top-1" if num_targets == 1 else f"top-{num_targets}"
    height, width = cam_shape
    row = Row("writer" if num_targets == 1 else "writer-topk", f"writer-only {label}", "", str(args.batch_size))
    rng = np.random.default_rng(0)
    batch = args.batch_size
    arrays = dict(labels=rng.integers(0, 1000, batch), target_classes=rng.integers(0, 1000, (batch, num_targets)),
                  scores=rng.standard_normal((batch, num_targets)).astype(np.float32),
                  probs=rng.random((batch, num_targets)).astype(np.float32),
                  cams=rng.random((batch, num_targets, height, width)).astype(np.float32),
                  cam_mean=rng.random((batch, num_targets)).astype(np.float32),
                  peak=rng.integers(0, height * width, (batch, num_targets)))
    outputs = []
    for shard_index, first in enumerate(range(0, args.images, args.shard_size)):
        count = min(args.shard_size, args.images - first)
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
    row.in_loop = args.images / seconds
    row.notes.append(f"{args.images * num_targets} rows of {height}x{width} maps, zstd, fsync+rename per shard")
    return row


# --- subprocess providers -------------------------------------------------------------------------------

def _run_timed(command: list[str], timeout: int, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return completed, time.perf_counter() - start


def _failure(completed: subprocess.CompletedProcess) -> str:
    lines = [line for line in (completed.stderr or "").splitlines() if line.strip()]
    return f"exit {completed.returncode}: {lines[-1] if lines else 'no stderr'}"[:300]


def run_gradcam_batch(args, shards_glob: str, model_name: str, topk: int | None, device) -> dict:
    """One `python -m gradcam_batch` run; returns images, rows, in-loop and whole-process seconds."""
    quoted = f"'{shards_glob}'" if "'" not in shards_glob else shards_glob  # a Hydra quoted string
    with tempfile.TemporaryDirectory(prefix="bench-gradcam-batch-") as output_dir:
        command = [sys.executable, "-m", "gradcam_batch", "data=webdataset", f"data.shards={quoted}",
                   "model=torchvision", f"model.name={model_name}", f"model.target_layer={args.target_layer}",
                   f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}",
                   f"data.resize={args.resize}", f"data.crop={args.crop}", f"runtime.device={device.type}",
                   "runtime.progress=false", f"output.dir={output_dir}", "output.overwrite=true"]
        if topk is not None:
            command += ["cam.targets=topk", f"cam.topk={topk}"]
        completed, wall = _run_timed(command, args.timeout, REPO_ROOT)
        if completed.returncode != 0:
            raise RuntimeError(_failure(completed))
        summary = completed.stdout
        found = re.search(r"throughput\s+([\d.]+) img/s \(([\d.]+) s\)", summary)
        images = re.search(r"^images\s+(\d+)", summary, re.M)
        rows = re.search(r"^rows\s+(\d+)", summary, re.M)
        errors = re.search(r"^errors\s+(\d+)", summary, re.M)
        if not (found and images and rows):
            raise RuntimeError(f"no summary line in the output: {summary[-300:]!r}")
        seconds = float(found.group(2))
        manifest = Path(output_dir) / "_manifest.json"
        if manifest.is_file():  # the manifest keeps the run's seconds to the millisecond
            seconds = json.loads(manifest.read_text()).get("this_run", {}).get("seconds", seconds)
        return {"images": int(images.group(1)), "rows": int(rows.group(1)),
                "errors": int(errors.group(1)) if errors else 0, "loop_seconds": seconds, "wall_seconds": wall,
                "command": " ".join(command[1:])}


def run_peer(args, shards_glob: str, peer: str, device) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), f"--peer-{peer}", "--shards", shards_glob,
               "--device", device.type, "--model", args.model, "--target-layer", args.target_layer,
               "--peer-batch-size", str(args.peer_batch_size), "--workers", str(args.workers),
               "--resize", str(args.resize), "--crop", str(args.crop)]
    completed, wall = _run_timed(command, args.timeout, REPO_ROOT)
    if completed.returncode != 0:
        raise RuntimeError(_failure(completed))
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        raise RuntimeError(f"no result line in the output: {completed.stdout[-300:]!r}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["wall_seconds"] = wall
    return result


# --- peer processes (run as `bench_pipeline.py --peer-...`) ------------------------------------------------

def _peer_loader(args):
    """What a peer user writes: tarfile + PIL decode + torchvision transforms in a DataLoader."""
    import glob

    from PIL import Image
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info
    from torchvision import transforms

    shard_paths = sorted(glob.glob(args.shards))
    transform = transforms.Compose([transforms.Resize(args.resize), transforms.CenterCrop(args.crop),
                                    transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    class TarImages(IterableDataset):
        def __iter__(self):
            info = get_worker_info()
            paths = shard_paths if info is None else shard_paths[info.id::info.num_workers]
            for path in paths:
                with tarfile.open(path) as tar:
                    pending = {}
                    for member in tar:
                        stem, _, extension = member.name.partition(".")
                        pending.setdefault(stem, {})[extension] = tar.extractfile(member).read()
                        if {"jpg", "cls"} <= pending[stem].keys():
                            sample = pending.pop(stem)
                            image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
                            yield transform(image), int(sample["cls"]), stem

    workers = min(args.workers, len(shard_paths))
    return DataLoader(TarImages(), batch_size=args.peer_batch_size, num_workers=workers,
                      pin_memory=args.device == "cuda")


def _peer_model(args, device):
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval().to(device)
    layer = model
    for part in args.target_layer.split("."):
        layer = getattr(layer, part)
    return model, layer


def peer_pytorch_grad_cam(args) -> None:
    import numpy as np
    import torch
    from pytorch_grad_cam import GradCAM

    start = time.perf_counter()
    device = torch.device(args.device)
    model, layer = _peer_model(args, device)
    maps, images = [], 0
    with GradCAM(model=model, target_layers=[layer]) as cam:
        for batch, _labels, _keys in _peer_loader(args):
            grayscale = cam(input_tensor=batch.to(device, non_blocking=True), targets=None)  # predicted class
            maps.append(grayscale)
            images += len(grayscale)
    seconds = time.perf_counter() - start
    stacked = np.concatenate(maps)
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as directory:
        np.savez(os.path.join(directory, "maps.npz"), mean=stacked.mean(axis=(1, 2)))
    print(RESULT_PREFIX + json.dumps({"images": images, "loop_seconds": seconds,
                                      "map_shape": list(stacked.shape[1:])}), flush=True)


def peer_captum(args) -> None:
    import numpy as np
    import torch
    from captum.attr import LayerAttribution, LayerGradCam

    start = time.perf_counter()
    device = torch.device(args.device)
    model, layer = _peer_model(args, device)
    gradcam = LayerGradCam(model, layer)
    maps, images = [], 0
    for batch, _labels, _keys in _peer_loader(args):
        batch = batch.to(device, non_blocking=True)
        with torch.no_grad():
            predicted = model(batch).argmax(dim=1)
        attributions = gradcam.attribute(batch, target=predicted, relu_attributions=True)
        upsampled = LayerAttribution.interpolate(attributions, (args.crop, args.crop))
        maps.append(upsampled.detach().cpu().numpy())
        images += len(batch)
    seconds = time.perf_counter() - start
    stacked = np.concatenate(maps)
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as directory:
        np.savez(os.path.join(directory, "maps.npz"), mean=stacked.mean(axis=(1, 2, 3)))
    print(RESULT_PREFIX + json.dumps({"images": images, "loop_seconds": seconds,
                                      "map_shape": list(stacked.shape[2:])}), flush=True)


# --- the run ------------------------------------------------------------------------------------------------

def _versions() -> dict:
    import torch
    import torchvision

    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__}
    for name in ("triton", "grad-cam", "captum"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({os.cpu_count()} CPU cores)"
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), name)
    except OSError:  # no /proc: keep platform.processor()'s name
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU {name or platform.machine()}, {usable} usable cores (nproc), torch threads {torch.get_num_threads()}"


def _guarded(rows: list[Row], key: str, provider: str, model: str, batch: str, work):
    """Run one provider; an error becomes that row's status and the run goes on."""
    try:
        result = work()
    except Exception as error:  # noqa: BLE001 -- reported in the table and on stderr
        traceback.print_exc()
        print(f"{provider}: failed: {_one_line(error)}", file=sys.stderr, flush=True)
        rows.append(Row(key, provider, model, batch, status=f"failed: {_one_line(error)}"))
        return None
    return result


def run_benchmark(args) -> str:
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_pipeline: --device cuda but no CUDA device is available; use --device cpu")
    cuda = device.type == "cuda"
    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    folder, meta = ensure_dataset(args)
    shards_glob = str(folder / "*.tar")
    rows: list[Row] = []
    wanted = set(args.providers)
    cam_shape = None

    def log(row: Row | None):
        if row is not None:
            rate = f"{row.in_loop:.1f} img/s" if row.in_loop else row.status
            print(f"  {row.provider:<40} {rate}", flush=True)

    print(f"device: {_device_name(device)}", flush=True)
    if "forward" in wanted:
        row = _guarded(rows, "forward", "forward", args.model, str(args.batch_size),
                       lambda: bench_forward(args, device, args.model))
        if row:
            rows.append(row)
            log(row)
    if cuda and "big" in wanted:  # the compute-bound case: its forward is the bound for gradcam-batch big
        row = _guarded(rows, "forward-big", f"forward-bf16 {args.big_model}", args.big_model,
                       str(args.batch_size), lambda: bench_forward(args, device, args.big_model))
        if row:
            rows.append(row)
            log(row)
    if "engine" in wanted:
        for targets in (1, args.topk):
            result = _guarded(rows, "engine" if targets == 1 else "engine-topk", f"engine-only top-{targets}",
                              args.model, str(args.batch_size), lambda t=targets: bench_engine(args, device, t))
            if result:
                rows.append(result[0])
                cam_shape = cam_shape or result[1]
                log(result[0])
        if not cuda:  # what runtime.channels_last=false would give on CPU
            result = _guarded(rows, "engine-what-if", "engine-only top-1 NCHW (what-if)", args.model,
                              str(args.batch_size), lambda: bench_engine(args, device, 1, channels_last=False))
            if result:
                rows.append(result[0])
                log(result[0])
    if "decode" in wanted:
        row = _guarded(rows, "decode", "decode-only", "", str(args.batch_size),
                       lambda: bench_decode(args, device, shards_glob))
        if row:
            rows.append(row)
            log(row)
    if "writer" in wanted:
        if cam_shape is None:  # the layer's map size at this crop, from one forward
            cam_shape = _guarded(rows, "writer", "writer-only", "", str(args.batch_size),
                                 lambda: _cam_shape(args, device))
        if cam_shape:
            for targets in (1, args.topk):
                row = _guarded(rows, "writer", f"writer-only top-{targets}", "", str(args.batch_size),
                               lambda t=targets: bench_writer(args, t, cam_shape))
                if row:
                    rows.append(row)
                    log(row)
    if cuda:
        torch.cuda.empty_cache()

    # subprocess providers, interleaved over --repeats
    plans = []
    if "top1" in wanted:
        plans.append(("top1", "gradcam-batch top-1", args.model, str(args.batch_size),
                      lambda: run_gradcam_batch(args, shards_glob, args.model, None, device)))
    if "topk" in wanted:
        plans.append(("topk", f"gradcam-batch top-{args.topk}", args.model, str(args.batch_size),
                      lambda: run_gradcam_batch(args, shards_glob, args.model, args.topk, device)))
    if "big" in wanted and cuda:
        plans.append(("big", f"gradcam-batch {args.big_model}", args.big_model, str(args.batch_size),
                      lambda: run_gradcam_batch(args, shards_glob, args.big_model, None, device)))
    if "pytorch-grad-cam" in wanted:
        plans.append(("pytorch-grad-cam", "pytorch-grad-cam GradCAM", args.model, str(args.peer_batch_size),
                      lambda: run_peer(args, shards_glob, "pytorch-grad-cam", device)))
    if "captum" in wanted:
        try:
            import captum  # noqa: F401
        except ImportError:
            rows.append(Row("captum", "captum LayerGradCam", args.model, str(args.peer_batch_size),
                            status="skipped: captum not installed (pip install .[bench])"))
        else:
            plans.append(("captum", "captum LayerGradCam", args.model, str(args.peer_batch_size),
                          lambda: run_peer(args, shards_glob, "captum", device)))
    runs: dict[str, list[dict]] = {key: [] for key, *_ in plans}
    failed: dict[str, str] = {}
    for repeat in range(args.repeats):
        for key, provider, model, batch, work in plans:
            if key in failed:
                continue
            print(f"  {provider} (run {repeat + 1}/{args.repeats}) ...", flush=True)
            try:
                result = work()
            except Exception as error:  # noqa: BLE001 -- reported in the table and on stderr
                failed[key] = f"failed: {_one_line(error)}"
                print(f"{provider}: {failed[key]}", file=sys.stderr, flush=True)
                continue
            runs[key].append(result)
            print(f"    {result['images'] / result['loop_seconds']:.1f} img/s in-loop, "
                  f"{result['images'] / result['wall_seconds']:.1f} img/s whole process "
                  f"({result['wall_seconds']:.1f} s)", flush=True)
    for key, provider, model, batch, _ in plans:
        row = Row(key, provider, model, batch)
        if key in failed and not runs[key]:
            row.status = failed[key]
            rows.append(row)
            continue
        results = runs[key]
        row.in_loop, loop_note = _median_runs([r["images"] / r["loop_seconds"] for r in results])
        row.whole, whole_note = _median_runs([r["images"] / r["wall_seconds"] for r in results])
        last = results[-1]
        row.extra.update(loop_runs=[r["images"] / r["loop_seconds"] for r in results],
                         whole_runs=[r["images"] / r["wall_seconds"] for r in results],
                         wall_seconds=statistics.median(r["wall_seconds"] for r in results),
                         loop_seconds=statistics.median(r["loop_seconds"] for r in results))
        row.notes.append(f"{last['images']} images, wall {row.extra['wall_seconds']:.1f} s, "
                         f"in-loop {row.extra['loop_seconds']:.1f} s")
        if "rows" in last:
            row.notes.append(f"{last['rows']} rows to Parquet")
        if last.get("images") != args.images:
            row.notes.append(f"WARNING: {last.get('images')} of {args.images} images processed")
        if last.get("errors"):
            row.notes.append(f"{last['errors']} errors")
        if "map_shape" in last:
            row.notes.append("maps " + "x".join(str(v) for v in last["map_shape"]) + " in memory")
        if loop_note:
            row.notes.append(f"in-loop {loop_note}; whole {whole_note}")
        if key in failed:
            row.notes.append(f"a later run {failed[key]}")
        rows.append(row)

    load_after = os.getloadavg()
    header = {"started": started, "load_before": load_before, "load_after": load_after, "meta": meta,
              "folder": folder, "device_name": _device_name(device)}
    return render(args, rows, header)


def _cam_shape(args, device) -> tuple[int, int]:
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


# --- report --------------------------------------------------------------------------------------------------

def _rate(value: float | None) -> str:
    return f"{value:,.1f}" if value else "-"


def _ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}x" if value and reference else "-"


def render(args, rows: list[Row], header: dict) -> str:
    by_key = {row.key: row for row in rows}
    top1 = by_key.get("top1")
    reference_loop = top1.in_loop if top1 else None
    reference_whole = top1.whole if top1 else None
    started = header["started"]
    meta = header["meta"]
    versions = _versions()
    lines = [
        f"# gradcam-batch pipeline benchmark ({args.device})",
        "",
        f"- date: {started.isoformat(timespec='seconds')}",
        f"- device: {header['device_name']}",
        "- versions: " + ", ".join(f"{name} {value}" for name, value in versions.items()),
        f"- load average (1/5/15 min) before: {', '.join(f'{v:.2f}' for v in header['load_before'])}; "
        f"after: {', '.join(f'{v:.2f}' for v in header['load_after'])}",
        f"- data: {meta['images']} JPEGs {meta['width']}x{meta['height']} (quality 90, "
        f"{meta['mean_jpeg_kb']:.0f} kB mean) in {meta['shards']} WebDataset shard(s) of {meta['shard_size']}, "
        f"{header['folder']}",
        f"- model: torchvision {args.model} (random init, seed 0), target layer {args.target_layer}, "
        f"resize {args.resize}, crop {args.crop}; workers {args.workers}; batch {args.batch_size}, "
        f"peer batch {args.peer_batch_size}; repeats {args.repeats}",
        *[f"- note: {note}" for note in args.note],
        *([f"- WARNING: the 1-min load average was {header['load_before'][0]:.2f} on {os.cpu_count()} cores when "
           "this run started: other processes may have shared the CPU, so rates are noisy; compare rows of "
           "the same run and prefer --repeats medians"]
          if header["load_before"][0] > 0.5 * (os.cpu_count() or 1) else []),
        "- command: `python benchmarks/bench_pipeline.py " + shlex.join(sys.argv[1:]) + "`",
        "- arguments: " + ", ".join(f"{k}={v}" for k, v in sorted(vars(args).items())
                                    if not k.startswith("peer_") or k == "peer_batch_size"),
        "",
        "- peers: pytorch-grad-cam GradCAM(model, target_layers=[layer]) with targets=None (predicted class): "
        "full backward to the input with parameter gradients, maps upsampled to the crop by the library; captum "
        "LayerGradCam(relu_attributions=True) on the argmax of a separate no_grad forward, then "
        "LayerAttribution.interpolate to the crop; both fp32, maps kept in host memory. gradcam-batch writes "
        "layer-resolution maps with scores and statistics to zstd Parquet.",
        "",
        "| provider | model | batch | img/s (in-loop) | img/s (whole process) | vs top-1 (in-loop) "
        "| vs top-1 (whole) | notes |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        if row.status:
            lines.append(f"| {row.provider} | {row.model} | {row.batch} | {row.status} | | | | |")
            continue
        lines.append(f"| {row.provider} | {row.model} | {row.batch} | {_rate(row.in_loop)} | {_rate(row.whole)} "
                     f"| {_ratio(row.in_loop, reference_loop)} | {_ratio(row.whole, reference_whole)} "
                     f"| {'; '.join(row.notes)} |")
    lines.append("")

    def pair(numerator: str, denominator: str, label: str, whole: bool = True):
        a, b = by_key.get(numerator), by_key.get(denominator)
        if not (a and b and a.in_loop and b.in_loop):
            missing = [r.provider + f" ({r.status})" for r in (a, b) if r and r.status]
            lines.append(f"- {label}: n/a" + (f" ({'; '.join(missing)})" if missing else ""))
            return
        text = f"- {label}: {a.in_loop / b.in_loop:.2f}x in-loop"
        if whole and a.whole and b.whole:
            text += f", {a.whole / b.whole:.2f}x whole process"
            runs_a, runs_b = a.extra.get("whole_runs", []), b.extra.get("whole_runs", [])
            if len(runs_a) > 1 and len(runs_a) == len(runs_b):  # interleaved rounds, paired
                text += " (ratio of medians; per round, whole process: " + ", ".join(
                    f"{x / y:.2f}x" for x, y in zip(runs_a, runs_b)) + ")"
        lines.append(text)

    forward = "forward-bf16" if args.device == "cuda" else "forward-fp32"
    pair("top1", "forward", f"gradcam-batch top-1 / {forward} (fraction of the forward-only upper bound)", whole=False)
    pair("engine", "forward", f"engine-only top-1 / {forward} (Grad-CAM step vs bare forward, same batch)",
         whole=False)
    if args.device == "cpu":
        pair("engine", "engine-what-if", "engine-only top-1 channels_last / NCHW on CPU", whole=False)
    pair("topk", "top1", f"gradcam-batch top-{args.topk} / top-1 (rate)")
    pair("top1", "pytorch-grad-cam", "gradcam-batch top-1 / pytorch-grad-cam (speed-up)")
    pair("top1", "captum", "gradcam-batch top-1 / captum LayerGradCam (speed-up)")
    if args.device == "cuda":
        pair("big", "forward-big", f"gradcam-batch {args.big_model} / forward-bf16 {args.big_model}", whole=False)
        engine, forward_row = by_key.get("engine"), by_key.get("forward")
        if engine and forward_row and "peak_bytes" in engine.extra and "peak_bytes" in forward_row.extra:
            lines.append(f"- peak GPU memory at batch {args.batch_size}: engine-only Grad-CAM step "
                         f"{engine.extra['peak_bytes'] / 2**30:.2f} GiB vs bare forward "
                         f"{forward_row.extra['peak_bytes'] / 2**30:.2f} GiB "
                         f"({engine.extra['peak_bytes'] / forward_row.extra['peak_bytes']:.2f}x)")
    for key in ("top1", "pytorch-grad-cam", "captum"):
        row = by_key.get(key)
        if row and row.whole:
            start_up = row.extra["wall_seconds"] - row.extra["loop_seconds"]
            lines.append(f"- {row.provider}: {start_up:.1f} s of its {row.extra['wall_seconds']:.1f} s wall time "
                         "is outside its in-loop clock (interpreter, imports, config)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.peer_pytorch_grad_cam or args.peer_captum:
        if not args.shards:
            raise SystemExit("bench_pipeline: peer mode needs --shards GLOB")
        (peer_pytorch_grad_cam if args.peer_pytorch_grad_cam else peer_captum)(args)
        return
    markdown = run_benchmark(args)
    print()
    print(markdown, end="", flush=True)
    if args.out:
        out = Path(args.out)
        if out.parent == Path("."):
            out = RESULTS_DIR / out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(markdown)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
