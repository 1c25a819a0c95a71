"""Peers on the same images: pytorch-grad-cam and Captum, each in its own process started as
`bench_pipeline.py --peer-pytorch-grad-cam|--peer-captum`, so its start-up is measured too.
The parent side (run_peer) builds that command and reads the one result line it prints."""

from __future__ import annotations

import glob
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from pipeline_runs import failure_text, run_command

RESULT_PREFIX = "BENCH_RESULT "
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PEERS = {"pytorch-grad-cam": "pytorch-grad-cam GradCAM", "captum": "captum LayerGradCam"}
ENTRY_POINT = Path(__file__).resolve().parent / "bench_pipeline.py"


def peer_arguments(args, device_type: str) -> list[str]:
    """The peer command's arguments shared by both peers (the rest: --peer-NAME, --shards)."""
    return ["--device", device_type, "--model", args.model, "--target-layer", args.target_layer,
            "--peer-batch-size", str(args.peer_batch_size), "--workers", str(args.workers),
            "--resize", str(args.resize), "--crop", str(args.crop)]


def run_peer(args, peer: str, shard_paths: list[Path], device_type: str, timeout: float) -> dict:
    command = [sys.executable, str(ENTRY_POINT), f"--peer-{peer}", "--shards", ",".join(map(str, shard_paths)),
               *peer_arguments(args, device_type), "--launched-at", repr(time.time())]
    finished = run_command(command, timeout)
    if finished.returncode != 0:
        raise RuntimeError(failure_text(finished))
    lines = [line for line in finished.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        raise RuntimeError(f"no result line in the output: {finished.stdout[-300:]!r}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["wall_seconds"] = finished.wall_seconds
    return result


# --- the peer processes ---------------------------------------------------------------------------

def _peer_loader(args):
    """What a careful peer user writes: tarfile + PIL decode + torchvision transforms in a
    DataLoader whose workers take every n-th sample, so all of them stay busy however few
    shards the peer reads."""
    from PIL import Image
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info
    from torchvision import transforms

    shard_paths = sorted({path for part in args.shards.split(",") if part for path in glob.glob(part)})
    if not shard_paths:
        raise SystemExit(f"bench_pipeline: --shards {args.shards!r} matches no file")
    transform = transforms.Compose([transforms.Resize(args.resize), transforms.CenterCrop(args.crop),
                                    transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    class TarImages(IterableDataset):
        def __iter__(self):
            info = get_worker_info()
            worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
            index = 0
            for path in shard_paths:
                with tarfile.open(path) as tar:
                    pending = {}
                    for member in tar:
                        stem, _, extension = member.name.partition(".")
                        sample = pending.setdefault(stem, {})
                        sample[extension] = member
                        if {"jpg", "cls"} <= sample.keys():
                            del pending[stem]
                            index += 1
                            if (index - 1) % workers != worker:
                                continue  # another worker's sample: its bytes are never read here
                            jpeg, label = (tar.extractfile(sample[name]).read() for name in ("jpg", "cls"))
                            image = Image.open(io.BytesIO(jpeg)).convert("RGB")
                            yield transform(image), int(label), stem

    return DataLoader(TarImages(), batch_size=args.peer_batch_size, num_workers=args.workers,
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


class _Clock:
    """Time to the first finished batch (from the parent's launch and from the start of the
    peer's own clock) and the rate after it."""

    def __init__(self, launched_at: float | None):
        self.launched_at = launched_at
        self.start = time.perf_counter()
        self.first = None
        self.first_images = 0

    def batch_done(self, images: int) -> None:
        if self.first is None:
            self.first, self.first_images = time.perf_counter(), images
            self.first_wall = time.time()

    def result(self, images: int, map_shape) -> dict:
        end = time.perf_counter()
        result = {"images": images, "loop_seconds": end - self.start, "map_shape": list(map_shape)}
        if self.first is not None:
            result["seconds_to_first_batch_after_imports"] = self.first - self.start
            if self.launched_at is not None:
                result["seconds_to_first_batch"] = self.first_wall - self.launched_at
            if end > self.first and images > self.first_images:
                result["steady_images_per_second"] = (images - self.first_images) / (end - self.first)
        return result


def _report(result: dict, maps) -> None:
    """Print the result line after keeping the maps the way a user would: saved, not dropped."""
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="bench-peer-") as directory:
        np.savez(os.path.join(directory, "maps.npz"), mean=maps.reshape(len(maps), -1).mean(axis=1))
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def peer_pytorch_grad_cam(args) -> None:
    import numpy as np
    import torch
    from pytorch_grad_cam import GradCAM

    clock = _Clock(args.launched_at)
    device = torch.device(args.device)
    model, layer = _peer_model(args, device)
    maps, images = [], 0
    with GradCAM(model=model, target_layers=[layer]) as cam:
        for batch, _labels, _keys in _peer_loader(args):
            grayscale = cam(input_tensor=batch.to(device, non_blocking=True), targets=None)  # predicted class
            maps.append(grayscale)
            images += len(grayscale)
            clock.batch_done(images)
    stacked = np.concatenate(maps)
    _report(clock.result(images, stacked.shape[1:]), stacked)


def peer_captum(args) -> None:
    import numpy as np
    import torch
    from captum.attr import LayerAttribution, LayerGradCam

    clock = _Clock(args.launched_at)
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
        maps.append(upsampled.detach().cpu().numpy())  # the copy syncs, so the clock sees finished maps
        images += len(batch)
        clock.batch_done(images)
    stacked = np.concatenate(maps)
    _report(clock.result(images, stacked.shape[2:]), stacked)
