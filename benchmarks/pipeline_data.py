"""The benchmark's images: JPEG WebDataset shards generated once per (count, size, shard size)
and cached, and a single-shard copy of the same members for the 1-shard vs many-shard rows."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

DATA_FORMAT_VERSION = 1  # bump when the generated images change, so old caches are not reused
SINGLE_SHARD_FOLDER = "single-shard"  # inside the dataset folder: `<folder>/*.tar` never matches it
TAR_BLOCK = 512


@dataclass
class Dataset:
    folder: Path
    meta: dict

    @property
    def shard_paths(self) -> list[Path]:
        return sorted(self.folder.glob("*.tar"))

    @property
    def shards_glob(self) -> str:
        return str(self.folder / "*.tar")


def make_jpeg(rng, width: int, height: int, grain: float = 9.0, quality: int = 90) -> bytes:
    """Smooth random content: upsampled low-resolution colour noise, mid-frequency texture, a few
    filled shapes and fine grain (Gaussian, std `grain`), so a quality-90 JPEG is about 70 kB at
    500x375."""
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
    pixels = np.asarray(image, dtype=np.float32)
    if grain:
        pixels = pixels + rng.standard_normal((height, width, 3)) * grain
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=quality)
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
            jpeg = make_jpeg(rng, width, height)
            total += len(jpeg)
            for name, data in ((f"{key}.jpg", jpeg), (f"{key}.cls", str(int(rng.integers(0, 1000))).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
    return total


def ensure_dataset(data_dir: str | Path, images: int, width: int, height: int, shard_size: int,
                   log=print) -> Dataset:
    """Shards under <data_dir>/<N>x<W>x<H>-shard<S>/, reused when its meta.json matches."""
    from multiprocessing import Pool

    folder = Path(data_dir) / f"{images}x{width}x{height}-shard{shard_size}"
    meta = {"images": images, "width": width, "height": height, "shard_size": shard_size,
            "version": DATA_FORMAT_VERSION}
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        stored = json.loads(meta_path.read_text())
        if {k: stored.get(k) for k in meta} == meta:
            log(f"dataset: reusing {folder} ({stored['images']} images, {stored['mean_jpeg_kb']:.0f} kB each)")
            return Dataset(folder, stored)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    jobs = [(str(folder / f"shard-{index:05d}.tar"), first, min(shard_size, images - first), width, height)
            for index, first in enumerate(range(0, images, shard_size))]
    start = time.perf_counter()
    with Pool(min(os.cpu_count() or 1, len(jobs))) as pool:
        sizes = pool.map(_write_shard, jobs, chunksize=1)
    meta["mean_jpeg_kb"] = sum(sizes) / images / 1e3
    meta["shards"] = len(jobs)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")  # written last: the completion marker
    log(f"dataset: wrote {images} images in {len(jobs)} shards to {folder} in "
        f"{time.perf_counter() - start:.1f} s ({meta['mean_jpeg_kb']:.0f} kB each)")
    return Dataset(folder, meta)


def _members_end(path: Path) -> int:
    """Byte offset just past the last member's data: where the end-of-archive blocks start.
    Reading the headers seeks over the member data, so this reads a few kB per shard."""
    with tarfile.open(path, "r:") as tar:
        for _ in tar:
            pass  # iterating reads every header; tar.offset then points past the last member
        return tar.offset


def ensure_single_shard(dataset: Dataset, log=print) -> Dataset:
    """All members of the dataset's shards, in order, in one tar (<folder>/single-shard/all.tar).

    An uncompressed tar is a sequence of 512-byte header+data blocks closed by two zero blocks,
    so the shards' bytes up to their end markers, concatenated and closed once, are a valid tar
    of the same members: a copy at disk speed, with no re-encoding or per-member Python."""
    folder = dataset.folder / SINGLE_SHARD_FOLDER
    meta = {**dataset.meta, "shards": 1, "shard_size": dataset.meta["images"], "source": str(dataset.folder)}
    meta_path = folder / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        log(f"dataset: reusing {folder} (1 shard of {meta['images']} images)")
        return Dataset(folder, meta)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    target = folder / "all.tar"
    tmp = folder / "all.tar.tmp"
    with open(tmp, "wb") as out:
        for path in dataset.shard_paths:
            remaining = _members_end(path)
            with open(path, "rb") as source:
                while remaining:
                    chunk = source.read(min(remaining, 16 << 20))
                    if not chunk:
                        raise OSError(f"{path} ended before its last member's data")
                    out.write(chunk)
                    remaining -= len(chunk)
        out.write(b"\0" * (2 * TAR_BLOCK))
    os.replace(tmp, target)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")  # written last: the completion marker
    log(f"dataset: joined {len(dataset.shard_paths)} shards into {target} in {time.perf_counter() - start:.1f} s")
    return Dataset(folder, meta)


def first_shards(dataset: Dataset, images: int) -> list[Path]:
    """The fewest leading shards that hold at least `images` images (all of them if fewer)."""
    shard_size = dataset.meta["shard_size"]
    count = max(1, -(-images // shard_size))
    return dataset.shard_paths[:count]
