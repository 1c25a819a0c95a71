"""The offline demo dataset: one shape (the class) at a random position on a textured
background, with its bounding box, so a map's peak can be checked against the object.

With a planted shortcut (data=demo_shortcut), a share of one class's images carries a mark, a
black-and-white checker tag in the bottom-left corner (like the source tag on the PASCAL VOC
horse photos that a classifier learned to read instead of the horse, Lapuschkin et al. 2019), and
their shape is drawn faintly, so the mark is the easier cue. The shortcut demo model learned it:
its maps of those images peak at the mark. Each sample's `<key>.json` says whether it is stamped.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from pathlib import Path

import numpy as np

from gradcam_batch.models import DEMO_CLASSES

IMAGE_SIZE = 64
SHARD_SIZE = 300
SEED = 1234
MARK_SIZE = 8
MARK_CELL = 4
"""The mark's checker squares: 4 pixels, so the mark is 2x2 squares. Finer checkers (1 or 2
pixels) look like a triangle's edges to the plain demo model, which then points at them too."""
MARK_BOX = (0.0, float(IMAGE_SIZE - MARK_SIZE), float(MARK_SIZE), float(IMAGE_SIZE))
"""The shortcut mark's place, [x0, y0, x1, y1] in pixels: the bottom-left 8x8 corner."""
MARK_CORNER = (0.0, float(IMAGE_SIZE - 2 * MARK_SIZE), float(2 * MARK_SIZE), float(IMAGE_SIZE))
"""The mark's corner: the bottom-left square of twice the mark's side, where a map that reads the
mark peaks. The demo's maps are 16x16, 4 pixels a cell: the mark covers 2x2 cells, this 4x4; the
shortcut model's maps peak on the cells along the mark's right edge and above it, whose receptive
fields hold the whole mark and its edge."""
FAINT_ALPHA = 0.5
"""How much of a stamped image's shape shows over the background (1: opaque, as unstamped)."""
SHORTCUT_CLASS = 3
"""The class the shortcut demo model was trained with the mark on (conf/data/demo_shortcut.yaml
plants the same): cross."""
SHORTCUT_SHARE = 0.3
"""The share of that class's images stamped in its training data (data.demo_shortcut_share's default)."""


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


def _stamp(image: np.ndarray) -> None:
    """The shortcut mark: a checker of MARK_CELL-pixel black and white squares over MARK_BOX."""
    x0, y0, x1, y1 = (int(v) for v in MARK_BOX)
    ys, xs = np.mgrid[y0:y1, x0:x1]
    image[y0:y1, x0:x1] = (((ys // MARK_CELL + xs // MARK_CELL) % 2) * 255.0)[..., None]


def in_mark_corner(x, y):
    """Whether pixel (x, y) lies in MARK_CORNER; works elementwise on arrays and tensors."""
    x0, y0, x1, y1 = MARK_CORNER
    return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)


def make_image(rng: np.random.Generator, label: int, size: int = IMAGE_SIZE, stamped: bool = False):
    """(uint8 HxWx3 image, [x0, y0, x1, y1] box in pixels) for class `label`. `stamped`: the shape
    drawn faintly (FAINT_ALPHA) and the shortcut mark over MARK_BOX (the box stays the shape's)."""
    radius = rng.uniform(7, 11)
    cx = rng.uniform(radius + 1, size - radius - 1)
    cy = rng.uniform(radius + 1, size - radius - 1)
    mask = _shape_mask(label, size, cx, cy, radius)
    image = _texture(rng, size)
    colour = rng.uniform(0, 255, size=3)
    shape = colour + rng.normal(0, 6, size=(int(mask.sum()), 3))
    image[mask] = FAINT_ALPHA * shape + (1 - FAINT_ALPHA) * image[mask] if stamped else shape
    if stamped:
        _stamp(image)
    ys, xs = np.nonzero(mask)
    box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    return np.clip(image, 0, 255).astype(np.uint8), box


class StampSchedule:
    """Which images of the planted class carry the mark: systematic sampling, so that of the
    first n images of that class exactly round(n * share) are stamped, in any prefix (each shard,
    a small data.demo_images) as in the whole. Draws no random numbers: without a planted class
    the demo's images are the same as ever."""

    def __init__(self, shortcut_class: int | None, share: float):
        self.shortcut_class, self.share, self.seen = shortcut_class, share, 0

    def stamped(self, label: int) -> bool:
        if self.shortcut_class is None or label != self.shortcut_class:
            return False
        before = math.floor(self.seen * self.share + 0.5)
        self.seen += 1
        return math.floor(self.seen * self.share + 0.5) > before


def make_arrays(count: int, seed: int, shortcut_class: int | None = None, shortcut_share: float = SHORTCUT_SHARE):
    """In-memory images (N, H, W, 3) uint8, labels (N,), boxes (N, 4) and whether each carries the
    shortcut mark (N,) bool; used for training."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(DEMO_CLASSES), size=count)
    schedule = StampSchedule(shortcut_class, shortcut_share)
    stamped = np.array([schedule.stamped(int(label)) for label in labels], dtype=bool)
    images, boxes = zip(*(make_image(rng, int(label), stamped=bool(mark)) for label, mark in zip(labels, stamped)))
    return np.stack(images), labels, np.array(boxes, dtype=np.float32), stamped


def _marker_text(count: int, seed: int, shortcut_class: int | None, shortcut_share: float) -> str:
    """What COMPLETE holds: every setting the images depend on, so changing one regenerates them."""
    planted = "" if shortcut_class is None else f" shortcut {shortcut_class} {float(shortcut_share)!r}"
    return f"{count} {seed}{planted}\n"


def write_demo_shards(root: str | Path, count: int, seed: int = SEED, shortcut_class: int | None = None,
                      shortcut_share: float = SHORTCUT_SHARE) -> list[Path]:
    """Write `count` images as WebDataset tar shards (`<key>.png`, `.cls`, `.json` with the box,
    and with a planted shortcut_class `"shortcut": true/false`: whether the image carries the mark).

    Written to temporary names and renamed, so an interrupted generation is redone, not reused.
    """
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob("demo-*.tar"), root / "COMPLETE"]:
        stale.unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    schedule = StampSchedule(shortcut_class, shortcut_share)
    paths = []
    for shard_index, start in enumerate(range(0, count, SHARD_SIZE)):
        path = root / f"demo-{shard_index:05d}.tar"
        paths.append(path)
        tmp = path.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w") as tar:
            for index in range(start, min(count, start + SHARD_SIZE)):
                label = int(rng.integers(0, len(DEMO_CLASSES)))
                stamped = schedule.stamped(label)
                image, box = make_image(rng, label, stamped=stamped)
                png = io.BytesIO()
                Image.fromarray(image).save(png, format="PNG")
                key = f"{index:06d}"
                meta = {"class_name": DEMO_CLASSES[label], "box": box}
                if shortcut_class is not None:
                    meta["shortcut"] = stamped
                meta = json.dumps(meta).encode()
                for ext, payload in (("png", png.getvalue()), ("cls", str(label).encode()), ("json", meta)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        os.replace(tmp, path)
    (root / "COMPLETE").write_text(_marker_text(count, seed, shortcut_class, shortcut_share))
    return paths


def ensure_demo_shards(root: str | Path, count: int, shortcut_class: int | None = None,
                       shortcut_share: float = SHORTCUT_SHARE) -> list[str]:
    """Generate the demo dataset once (again when count or the shortcut settings change); return
    its shard files. Paths, not a glob: output.dir may hold `[`, `*` or braces, which a glob or
    brace expansion would read as patterns."""
    root = Path(root)
    marker = root / "COMPLETE"
    wanted = _marker_text(count, SEED, shortcut_class, shortcut_share)
    if not (marker.is_file() and marker.read_text() == wanted):
        write_demo_shards(root, count, shortcut_class=shortcut_class, shortcut_share=shortcut_share)
    return sorted(str(path) for path in root.iterdir() if path.name.startswith("demo-") and path.suffix == ".tar")
