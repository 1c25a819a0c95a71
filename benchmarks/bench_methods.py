"""Every CAM method's engine step (forward, targets, gradients or perturbations, maps, statistics)
against the bare forward of the same model, on random images; writes a Markdown table.

    python benchmarks/bench_methods.py --device cpu --out benchmarks/results/cpu-methods-DATE.md
    python benchmarks/bench_methods.py --device cuda --batch 64 --channels all --out ...

The perturbation methods run `--channels` (top:N or all) channels per image: their cost is in
forwards per image, reported beside the rate.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gradcam_batch.config import CamConfig, ModelConfig  # noqa: E402
from gradcam_batch.engine import CamEngine  # noqa: E402
from gradcam_batch.methods import ALL_METHODS  # noqa: E402
from gradcam_batch.models import build_model  # noqa: E402


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(run, device, repeats: int) -> float:
    run()  # warm-up (kernels, caches, the fx trace)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--layer", default="layer4")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="all")
    parser.add_argument("--channels", default="top:64", help="scorecam, ablationcam: cam.channels")
    parser.add_argument("--amp", default="off", choices=["off", "bf16"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    amp = torch.bfloat16 if args.amp == "bf16" else None
    model = build_model(ModelConfig(source="torchvision", name=args.model, seed=0)).to(device)
    model = model.to(memory_format=torch.channels_last)
    layer = model.get_submodule(args.layer)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.full((args.batch,), -1, device=device)
    methods = list(ALL_METHODS) if args.methods == "all" else args.methods.split(",")

    def forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            model(images)

    base = timed(forward, device, args.repeats)
    rows = [("bare forward (no_grad)", base, "1", "")]
    for method in methods:
        for analytic in (("auto", "off") if method in ("gradcam", "finercam") else ("auto",)):
            cam = CamConfig(method=method, analytic=analytic, channels=args.channels)
            engine = CamEngine(model, layer, cam, device, amp, num_classes=1000)
            seconds = timed(lambda: engine(images, labels), device, args.repeats)
            path = ("analytic, no backward" if engine.head is not None else
                    "no backward" if not engine.needs_gradients else
                    "perturbation" if engine.perturber is not None else "backward")
            if engine.perturber is not None:
                measured = engine.perturber.count or "C"
                tail = method == "ablationcam" and engine.perturber.split is not None
                forwards = f"1 + {measured} {'after the layer' if tail else 'whole'}"
            else:
                forwards = "1"
            name = method if method not in ("gradcam", "finercam") else f"{method} (analytic={analytic})"
            rows.append((name, seconds, forwards, path))
            print(f"{name}: {args.batch / seconds:.1f} img/s", flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "?"
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    lines = [f"# gradcam-batch methods benchmark ({device.type})", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
             f"- device: {card}; torch threads {torch.get_num_threads()}; load average before: "
             f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}",
             f"- versions: python {platform.python_version()}, torch {torch.__version__}, commit {commit}",
             f"- model: torchvision {args.model} (random init, seed 0), layer {args.layer}, batch {args.batch} of "
             f"random {args.size}x{args.size} images, channels_last, amp {args.amp}; {args.repeats} timed batches "
             f"after one warm-up; scorecam/ablationcam with cam.channels={args.channels}",
             f"- command: `python benchmarks/bench_methods.py {' '.join(sys.argv[1:])}`", "",
             "| method | path | forwards per image | ms per batch | img/s | vs bare forward |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    for name, seconds, forwards, path in rows:
        lines.append(f"| {name} | {path} | {forwards} | {seconds * 1000:.1f} | {args.batch / seconds:.1f} | "
                     f"{base / seconds:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
