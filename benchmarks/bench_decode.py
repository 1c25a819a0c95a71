"""Per-worker CPU decode + resize + center crop: `resize_crop(decode_rgb(...))` against
`decode_resize_crop`, one process with one torch thread, as a DataLoader worker runs them.

    python benchmarks/bench_decode.py                      # default image sets, prints markdown
    python benchmarks/bench_decode.py --out cpu-decode.md  # also writes it (bare name: benchmarks/results/)

Images are generated here with the pipeline benchmark's recipe (smooth colour fields, texture,
shapes and per-pixel grain, quality 90: ~70 kB at 500x375), at each set's size. The grain sets
how many bits each pixel costs, and that is what bounds JPEG decoding: entropy decoding reads
every coefficient whatever the output size, so the table reports bits per pixel and, for the old
path, where its time goes (entropy decoding measured as a decode at 1/8 scale, which skips almost
everything else).
"""

from __future__ import annotations

import argparse
import datetime
import io
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline_data import make_jpeg  # noqa: E402  (the pipeline benchmark's images; this folder is on sys.path)
from gradcam_batch.data.transforms import (decode_resize_crop, decode_rgb, open_header,  # noqa: E402
                                           resize_crop)

DEFAULT_SETS = "500x375,1000x750,4000x3000,4000x3000/3"
RESULTS = Path(__file__).resolve().parent / "results"
OLD = "old: resize_crop(decode_rgb(...))"
NEW = "new: decode_resize_crop(...)"


@dataclass
class ImageSet:
    width: int
    height: int
    grain: float
    payloads: list[bytes]

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}, grain {self.grain:g}"

    @property
    def mean_bytes(self) -> float:
        return statistics.fmean(len(p) for p in self.payloads)

    @property
    def bits_per_pixel(self) -> float:
        return self.mean_bytes * 8 / (self.width * self.height)


def parse_sets(text: str) -> list[tuple[int, int, float]]:
    """'500x375,4000x3000/3' -> [(500, 375, 9.0), (4000, 3000, 3.0)]; the grain defaults to 9."""
    sets = []
    for item in text.split(","):
        size, _, grain = item.strip().partition("/")
        width, height = (int(v) for v in size.lower().split("x"))
        sets.append((width, height, float(grain) if grain else 9.0))
    return sets


def images_per_set(width: int, height: int, budget_pixels: int) -> int:
    """Enough distinct files that caches do not flatter the small sets; few of the big ones."""
    return int(min(32, max(4, budget_pixels // (width * height))))


def timed_rate(step, payloads: list[bytes], min_seconds: float) -> float:
    """Images per second of step(payload) cycling over the payloads for at least min_seconds,
    after one untimed cycle."""
    for payload in payloads:
        step(payload)
    done, start = 0, time.perf_counter()
    while True:
        for payload in payloads:
            step(payload)
        done += len(payloads)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


def entropy_bound_decode(payload: bytes) -> None:
    """A decode at 1/8 scale: every coefficient is still entropy-decoded, while the inverse DCT,
    upsampling and colour conversion shrink to almost nothing. Its time is the floor of any
    libjpeg-turbo decode of this file."""
    with Image.open(io.BytesIO(payload)) as image:
        image.draft(image.mode, (max(image.width // 8, 1), max(image.height // 8, 1)))
        image.load()


def providers(resize: int, crop: int) -> dict:
    old_decoded = {}

    def resize_only(payload):
        if payload not in old_decoded:  # decoded in timed_rate's untimed first cycle
            old_decoded[payload] = decode_rgb(payload)
        return resize_crop(old_decoded[payload], resize, crop)

    found = {
        OLD: lambda p: resize_crop(decode_rgb(p), resize, crop),
        NEW: lambda p: decode_resize_crop(p, resize, crop),
        "old, header only (open_header)": lambda p: open_header(p).close(),
        "old, decode only (decode_rgb)": decode_rgb,
        "old, of which entropy decoding (1/8-scale decode)": entropy_bound_decode,
        "old, resize + crop only": resize_only,
    }
    try:
        import simplejpeg
    except ImportError:
        return found

    def simplejpeg_like_new(payload):
        height, width, _, _ = simplejpeg.decode_jpeg_header(payload)
        scale = next((s for s in (8, 4, 2) if min(height, width) >= resize * s), 1)
        simplejpeg.decode_jpeg(payload, min_height=-(-height // scale), min_width=-(-width // scale),
                               min_factor=scale)

    found[f"simplejpeg {simplejpeg.__version__}, decode at the new path's scale (reference)"] = simplejpeg_like_new
    return found


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # no /proc (not Linux): the platform module's name below
    return platform.processor() or platform.machine()


def versions() -> str:
    import PIL
    import torchvision
    from PIL import features
    return (f"Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"Pillow {PIL.__version__} (libjpeg-turbo {features.version('libjpeg_turbo')}), numpy {np.__version__}")


def run(args) -> str:
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    sets = []
    for width, height, grain in parse_sets(args.sets):
        count = images_per_set(width, height, args.pixels_per_set)
        sets.append(ImageSet(width, height, grain, [make_jpeg(rng, width, height, grain) for _ in range(count)]))
        print(f"generated {count} images of {sets[-1].name}: {sets[-1].mean_bytes / 1e3:.0f} kB, "
              f"{sets[-1].bits_per_pixel:.2f} bits/pixel", file=sys.stderr, flush=True)
    steps = providers(args.resize, args.crop)
    lines = [
        f"# CPU decode + resize {args.resize} + center crop {args.crop}, per worker",
        "",
        f"{datetime.date.today().isoformat()}; {cpu_model()}, {torch.get_num_threads()} torch thread, "
        f"one process; {versions()}.",
        f"{args.repeats} interleaved runs of at least {args.min_seconds:g} s per provider; "
        "quality-90 JPEGs made with the pipeline benchmark's recipe.",
        "",
    ]
    speedups = []
    for image_set in sets:
        rates = {name: [] for name in steps}
        for _ in range(args.repeats):  # interleaved, so a busy neighbour slows every provider alike
            for name, step in steps.items():
                rates[name].append(timed_rate(step, image_set.payloads, args.min_seconds))
        old_runs, new_runs = rates[OLD], rates[NEW]
        # Contention only ever slows a run down: the best run is the rate; the ratio is taken
        # between runs made back to back, then the median of those.
        ratio = statistics.median(new / old for new, old in zip(new_runs, old_runs))
        speedups.append((image_set, max(old_runs), max(new_runs), ratio))
        lines += [f"## {image_set.name}: {len(image_set.payloads)} files of {image_set.mean_bytes / 1e3:,.0f} kB "
                  f"({image_set.bits_per_pixel:.2f} bits/pixel)", "",
                  "| what | img/s (best) | img/s (median) | µs/img (best) | vs old (median of paired runs) |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for name, runs in rates.items():
            paired = statistics.median(run / old for run, old in zip(runs, old_runs))
            lines.append(f"| {name} | {max(runs):,.1f} | {statistics.median(runs):,.1f} | {1e6 / max(runs):,.0f} "
                         f"| {paired:.2f}x |")
        lines.append("")
        print(f"{image_set.name}: old {max(old_runs):,.1f} img/s, new {max(new_runs):,.1f} img/s ({ratio:.2f}x)",
              file=sys.stderr, flush=True)
    lines += ["## Summary (best runs; ratio: median of back-to-back runs)", "",
              "| images | kB | bits/pixel | old img/s | new img/s | new / old |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for image_set, old, new, ratio in speedups:
        lines.append(f"| {image_set.name} | {image_set.mean_bytes / 1e3:,.0f} | {image_set.bits_per_pixel:.2f} | "
                     f"{old:,.1f} | {new:,.1f} | {ratio:.2f}x |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default=DEFAULT_SETS,
                        help=f"comma-separated WIDTHxHEIGHT[/GRAIN] image sets (default {DEFAULT_SETS})")
    parser.add_argument("--resize", type=int, default=256, help="shorter side before the crop (default 256)")
    parser.add_argument("--crop", type=int, default=224, help="center crop (default 224)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs per provider (default 5)")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="timed length of each run (default 1)")
    parser.add_argument("--pixels-per-set", type=int, default=6_000_000,
                        help="pixels to generate per set, 4 to 32 files (default 6e6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the markdown here (a bare name goes to benchmarks/results/)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    report = run(args)
    print(report)
    if args.out:
        out = Path(args.out)
        if out.parent == Path("."):
            out = RESULTS / out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
