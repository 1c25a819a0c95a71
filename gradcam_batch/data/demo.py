"""The offline demo dataset: one shape (the class) at a random position on a textured
background, with its bounding box, so a map's peak can be checked against the object."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from gradcam_batch.models import DEMO_CLASSES

IMAGE_SIZE = 64
SHARD_SIZE = 300


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-frequency colour blobs plus pixel noise, so the background is never flat."""
    coarse = rng.uniform(0, 255, size=(8, 8, 3))
    smooth = np.kron(coarse, np.ones((size // 8, size // 8, 1)))
    stripes = 25 * np.sin(np.arange(size) * rng.uniform(0.2, 0.9) + rng.uniform(0, 6))[None, :, None]
    return smooth * 0.6 + stripes + rng.normal(0, 18, size=(size, size, 3))


def _shape_mask(kind: int, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = xs - cx, ys - cy
    if kind == 0:  # circle
        return dx * dx + dy * dy <= radius * radius
    if kind == 1:  # square
        return (np.abs(dx) <= radius * 0.85) & (np.abs(dy) <= radius * 0.85)
    if kind == 2:  # triangle, apex up
        inside_y = (dy >= -radius) & (dy <= radius)
        half_width = (dy + radius) / 2
        return inside_y & (np.abs(dx) <= half_width)
    arm = radius * 0.32  # cross
    return ((np.abs(dx) <= arm) & (np.abs(dy) <= radius)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= radius))


def make_image(rng: np.random.Generator, label: int, size: int = IMAGE_SIZE):
    """(uint8 HxWx3 image, [x0, y0, x1, y1] box in pixels) for class `label`."""
    radius = rng.uniform(7, 11)
    cx = rng.uniform(radius + 1, size - radius - 1)
    cy = rng.uniform(radius + 1, size - radius - 1)
    mask = _shape_mask(label, size, cx, cy, radius)
    image = _texture(rng, size)
    colour = rng.uniform(0, 255, size=3)
    image[mask] = colour + rng.normal(0, 6, size=(int(mask.sum()), 3))
    ys, xs = np.nonzero(mask)
    box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    return np.clip(image, 0, 255).astype(np.uint8), box


def make_arrays(count: int, seed: int):
    """In-memory images (N, H, W, 3) uint8, labels (N,), boxes (N, 4); used for training."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(DEMO_CLASSES), size=count)
    images, boxes = zip(*(make_image(rng, int(label)) for label in labels))
    return np.stack(images), labels, np.array(boxes, dtype=np.float32)


def write_demo_shards(root: str | Path, count: int, seed: int = 1234) -> list[Path]:
    """Write `count` images as WebDataset tar shards (`<key>.png`, `.cls`, `.json` with the box).

    Written to temporary names and renamed, so an interrupted generation is redone, not reused.
    """
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob("demo-*.tar"), root / "COMPLETE"]:
        stale.unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for shard_index, start in enumerate(range(0, count, SHARD_SIZE)):
        path = root / f"demo-{shard_index:05d}.tar"
        paths.append(path)
        tmp = path.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w") as tar:
            for index in range(start, min(count, start + SHARD_SIZE)):
                label = int(rng.integers(0, len(DEMO_CLASSES)))
                image, box = make_image(rng, label)
                png = io.BytesIO()
                Image.fromarray(image).save(png, format="PNG")
                key = f"{index:06d}"
                meta = json.dumps({"class_name": DEMO_CLASSES[label], "box": box}).encode()
                for ext, payload in (("png", png.getvalue()), ("cls", str(label).encode()), ("json", meta)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        os.replace(tmp, path)
    (root / "COMPLETE").write_text(f"{count} {seed}\n")
    return paths


def ensure_demo_shards(root: str | Path, count: int) -> list[str]:
    """Generate the demo dataset once; return its shard files. Paths, not a glob: output.dir may
    hold `[`, `*` or braces, which a glob or brace expansion would read as patterns."""
    root = Path(root)
    marker = root / "COMPLETE"
    if not (marker.is_file() and marker.read_text().split()[0] == str(count)):
        write_demo_shards(root, count)
    return sorted(str(path) for path in root.iterdir() if path.name.startswith("demo-") and path.suffix == ".tar")
