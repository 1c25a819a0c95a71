"""Tile configurations of `gradcam_batch.kernels.cam.fused_cam`: which tiling each problem gets, decided
without tuning at run time and the same in every process.

A problem is bucketed by channel count, map size, target count, memory layout and method
family (`Problem.bucket`). The committed table `cam_table.json` (or the file named by
GRADCAM_BATCH_KERNEL_TABLE) maps buckets to configs measured on a GPU by
`benchmarks/bench_kernel.py --sweep`; buckets not in it get `heuristic_config`. With
GRADCAM_BATCH_AUTOTUNE=1 the launcher times `candidate_configs` on the first call of a bucket
and keeps the winner on disk per (GPU, Triton version) under $XDG_CACHE_HOME/gradcam-batch/
(default ~/.cache/gradcam-batch/), so later processes read it back instead of tuning again.

Two tilings (`CamConfig.path`):
- "whole": the whole map in one tile (BLOCK_HW = next power of two of H * W, maps up to
  16x16 by default), channel blocks of up to 64-128 channels; gradcam / gradcampp / xgradcam
  reduce their channel weights from the tile, so A and G are each read once.
- "tiled": tiles of BLOCK_HW positions with wide channel blocks, C_ITERS channel blocks per
  program so a map has only a few partial sums; the weighted methods first get per-channel
  sums from a separate pass (gradcam reads G there and only A in the map pass).
Channels-last data is read along the channel axis, so NHWC wants wide channel blocks (64
bf16 channels = 128 bytes); NCHW reads rows of positions and wants wide position blocks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("cam_table.json")
TABLE_ENV = "GRADCAM_BATCH_KERNEL_TABLE"
AUTOTUNE_ENV = "GRADCAM_BATCH_AUTOTUNE"
TABLE_FORMAT = 1

FAMILIES = ("gradcam", "weighted", "pixel")
METHOD_FAMILIES = {
    "gradcam": "gradcam",  # weights from G alone: the map pass reads only A
    "gradcampp": "weighted",  # weights from G and the sum of A
    "xgradcam": "weighted",
    "hirescam": "pixel",  # no channel weights: a per-position product of G and A
    "layercam": "pixel",
    "elementwise": "pixel",
}
LAYOUTS = ("nchw", "nhwc", "other")
PATHS = ("whole", "tiled")

# Bucket bounds: powers of two, the last bucket of each holds everything above it.
MAX_CHANNEL_BUCKET = 4096
MAX_POSITION_BUCKET = 16384
MAX_TARGET_BUCKET = 16
# Largest map the "whole" path may hold in one tile.
MAX_WHOLE_BLOCK_HW = 4096
# Maps up to this many positions (16x16) default to the "whole" path.
HEURISTIC_WHOLE_MAX = 256
# The largest tile a config may use, in fp32 elements per warp (32 per thread and tensor). Up to
# here ptxas (sm_90, Triton 3.6 and 3.8) keeps gradcam and the pixel-wise methods in registers;
# gradcampp's extra temporaries spill a little at this size, which the sweep measures, not forbids.
ELEMENTS_PER_WARP = 1024
# Warps the heuristic gives a tile: 16 fp32 elements per thread and tensor keep every method
# within about 160 registers per thread, without spills, so programs share an SM.
HEURISTIC_ELEMENTS_PER_WARP = 512
# More channel blocks per program (or positions per channel-sums program) would leave too few
# programs to keep the memory system busy.
MAX_C_ITERS = 8
MAX_SPLIT_ITERS = 8
CANDIDATES_PER_BUCKET = 6
_POWERS_OF_TWO = tuple(2**n for n in range(15))


def next_power_of_2(value: int) -> int:
    return 1 if value <= 1 else 1 << (value - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class Problem:
    """What a config depends on. Batch size is left out on purpose: one config per bucket."""

    channels: int
    positions: int  # H * W
    targets: int
    layout: str  # "nchw", "nhwc" or "other"
    family: str  # "gradcam", "weighted" or "pixel"

    @classmethod
    def for_method(cls, channels: int, positions: int, targets: int, layout: str, method: str) -> Problem:
        return cls(channels, positions, targets, layout, METHOD_FAMILIES[method])

    @property
    def bucket(self) -> str:
        """"family/layout/kK/hwP/cC" with K, P, C the bucket's upper bounds (powers of two)."""
        return bucket_key(
            self.family, self.layout,
            min(next_power_of_2(self.targets), MAX_TARGET_BUCKET),
            min(next_power_of_2(self.positions), MAX_POSITION_BUCKET),
            min(next_power_of_2(self.channels), MAX_CHANNEL_BUCKET),
        )

    @classmethod
    def from_bucket(cls, key: str) -> Problem:
        """The largest problem of a bucket (every problem of it shares the config)."""
        match = re.fullmatch(r"(\w+)/(\w+)/k(\d+)/hw(\d+)/c(\d+)", key)
        if match is None:
            raise ValueError(f"bucket key {key!r} is not of the form family/layout/kK/hwP/cC")
        family, layout, targets, positions, channels = match.groups()
        problem = cls(int(channels), int(positions), int(targets), layout, family)
        if problem.bucket != key:
            raise ValueError(f"bucket key {key!r} is not canonical (expected {problem.bucket!r})")
        return problem


def bucket_key(family: str, layout: str, targets: int, positions: int, channels: int) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown method family {family!r}; expected one of {', '.join(FAMILIES)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    return f"{family}/{layout}/k{targets}/hw{positions}/c{channels}"


def layout_of(a_channel_stride: int, g_channel_stride: int, a_flat_stride, g_flat_stride) -> str:
    """"nhwc" when A and G both hold channels contiguously, "nchw" when both hold positions
    contiguously, else "other". A flat stride is None where (H, W) do not collapse to one."""
    if a_channel_stride == 1 and g_channel_stride == 1:
        return "nhwc"
    if a_flat_stride == 1 and g_flat_stride == 1:
        return "nchw"
    return "other"


@dataclasses.dataclass(frozen=True)
class CamConfig:
    """Tiling of one problem; see the module docstring for the two paths.

    The `sums_*` fields tile `_cam_channel_sums_kernel` and matter only for the "tiled" path
    of the gradcam and weighted families; elsewhere they are 0.
    """

    path: str
    block_c: int  # channels per block of the map kernel
    c_iters: int  # channel blocks per map-kernel program
    block_hw: int  # positions per tile; "whole": the next power of two of H * W
    num_warps: int
    sums_block_c: int = 0
    sums_block_hw: int = 0
    sums_iters: int = 0  # position blocks per program: a split covers sums_block_hw * sums_iters
    sums_warps: int = 0

    @property
    def needs_sums(self) -> bool:
        return self.sums_block_c > 0

    def problems(self, problem: Problem) -> list[str]:
        """Why this config cannot run `problem` (empty when it can)."""
        errors = []

        def power_of_two(name, value, low, high):
            if value not in _POWERS_OF_TWO or not low <= value <= high:
                errors.append(f"{name}={value} must be a power of two in [{low}, {high}]")

        if self.path not in PATHS:
            errors.append(f"path={self.path!r} must be one of {', '.join(PATHS)}")
        power_of_two("block_c", self.block_c, 1, 256)
        power_of_two("block_hw", self.block_hw, 1, MAX_WHOLE_BLOCK_HW)
        power_of_two("num_warps", self.num_warps, 1, 16)
        if not 1 <= self.c_iters <= MAX_C_ITERS:
            errors.append(f"c_iters={self.c_iters} must be in [1, {MAX_C_ITERS}]")
        if self.block_c * self.block_hw > ELEMENTS_PER_WARP * self.num_warps:
            errors.append(f"a {self.block_c}x{self.block_hw} tile needs more than {self.num_warps} warps")
        full = next_power_of_2(problem.positions)
        if self.path == "whole" and self.block_hw != full:
            errors.append(f"path 'whole' needs block_hw={full} (the whole map), got {self.block_hw}")
        if self.path == "tiled" and self.block_hw > full:
            errors.append(f"block_hw={self.block_hw} is larger than the map ({problem.positions} positions)")
        wants_sums = self.path == "tiled" and problem.family != "pixel"
        if wants_sums or self.needs_sums:  # unused sums fields must still be valid or all 0
            power_of_two("sums_block_c", self.sums_block_c, 1, 256)
            power_of_two("sums_block_hw", self.sums_block_hw, 1, MAX_WHOLE_BLOCK_HW)
            power_of_two("sums_warps", self.sums_warps, 1, 16)
            if not 1 <= self.sums_iters <= MAX_SPLIT_ITERS:
                errors.append(f"sums_iters={self.sums_iters} must be in [1, {MAX_SPLIT_ITERS}]")
            if self.sums_block_c * self.sums_block_hw > ELEMENTS_PER_WARP * max(self.sums_warps, 1):
                errors.append(f"a {self.sums_block_c}x{self.sums_block_hw} sums tile needs more warps")
        elif (self.sums_block_hw, self.sums_iters, self.sums_warps) != (0, 0, 0):
            errors.append("sums_* must all be 0 or all set")
        return errors

    def to_json(self) -> dict:
        fields = dataclasses.asdict(self)
        if not self.needs_sums:
            fields = {k: v for k, v in fields.items() if not k.startswith("sums_")}
        return fields

    @classmethod
    def from_json(cls, fields: dict) -> CamConfig:
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; known: {sorted(names)}")
        try:
            return cls(**fields)
        except TypeError as error:  # a missing required field
            raise ValueError(f"incomplete config {fields}: {error}") from None


def _warps_for(elements: int, low: int = 1, high: int = 16) -> int:
    return max(low, min(high, elements // HEURISTIC_ELEMENTS_PER_WARP))


def _with_sums(problem: Problem, config: CamConfig) -> CamConfig:
    """Add the channel-sums tiling when the path and family need it (and drop it otherwise)."""
    if config.path != "tiled" or problem.family == "pixel":
        return dataclasses.replace(config, sums_block_c=0, sums_block_hw=0, sums_iters=0, sums_warps=0)
    if config.needs_sums:
        return config
    channel_cap = next_power_of_2(problem.channels)
    full = next_power_of_2(problem.positions)
    if problem.layout == "nhwc":
        block_c, block_hw = min(channel_cap, 64), 64  # 128 bytes of bf16 channels per position
    elif problem.layout == "nchw":
        block_c, block_hw = min(channel_cap, 8), 512  # rows of 1 kB
    else:
        block_c, block_hw = min(channel_cap, 32), 128
    # Few channels: longer position blocks keep the tile (and a program's work) the same size.
    block_hw = min(max(block_hw, 4096 // block_c), full)
    # Splits of about 512 positions: enough programs, few partial sums per channel.
    iters = max(1, min(MAX_SPLIT_ITERS, 512 // block_hw, -(-problem.positions // block_hw)))
    return dataclasses.replace(config, sums_block_c=block_c, sums_block_hw=block_hw, sums_iters=iters,
                               sums_warps=_warps_for(block_c * block_hw, 2, 8))


def heuristic_config(problem: Problem) -> CamConfig:
    """The config of a bucket without a table entry: deterministic, valid for every problem."""
    channel_cap = next_power_of_2(problem.channels)
    full = next_power_of_2(problem.positions)
    if full <= HEURISTIC_WHOLE_MAX:
        # Whole map per tile of about 8192 elements: 16 to 64 channels per block (at least 32
        # bytes of bf16, one memory sector). One block per program: A is loaded once for all
        # targets, and a small map's partial maps cost little (32 of 49 positions at 7x7, C 2048).
        block_c = min(channel_cap, 64, max(16, 8192 // full))
        return CamConfig("whole", block_c, 1, full, _warps_for(block_c * full))
    if problem.layout == "nhwc":
        block_c, block_hw = min(channel_cap, 64), 64  # 128 bytes of bf16 channels per position
    elif problem.layout == "nchw":
        block_c, block_hw = min(channel_cap, 16), 256  # rows of 512 contiguous bytes
    else:
        block_c, block_hw = min(channel_cap, 32), 128
    block_hw = min(max(block_hw, 4096 // block_c), full)  # few channels: longer position blocks
    # Up to 8 channel blocks per program: a map has one or a few partial sums.
    c_iters = min(MAX_C_ITERS, -(-problem.channels // block_c))
    config = CamConfig("tiled", block_c, c_iters, block_hw, _warps_for(block_c * block_hw))
    return _with_sums(problem, config)


def candidate_configs(problem: Problem) -> list[CamConfig]:
    """Up to CANDIDATES_PER_BUCKET valid configs around the heuristic one, the heuristic first:
    what the sweep and the opt-in autotune time. Deterministic."""
    base = heuristic_config(problem)
    channel_cap = next_power_of_2(problem.channels)
    full = next_power_of_2(problem.positions)
    variants = [base]

    def add(**changes):
        config = dataclasses.replace(base, **changes)
        if "num_warps" not in changes:  # a new tile gets the heuristic's warps for its size
            config = dataclasses.replace(config, num_warps=_warps_for(config.block_c * config.block_hw))
        variants.append(_with_sums(problem, config))

    groups = -(-problem.channels // base.block_c)
    if base.path == "whole":
        if base.block_c * 2 <= min(channel_cap, 128):
            add(block_c=base.block_c * 2)
        if base.block_c >= 32:
            add(block_c=base.block_c // 2)
        if groups >= 8:  # fewer, larger partial sums
            add(c_iters=4)
        add(num_warps=min(16, base.num_warps * 2))
        add(num_warps=max(1, base.num_warps // 2))
    else:
        if full <= 1024 and problem.family != "pixel":
            # The whole map in one narrow tile: no separate sums pass, A read once.
            whole_c = min(channel_cap, max(1, 16384 // full))
            add(path="whole", block_c=whole_c, c_iters=1, block_hw=full)
        if base.block_hw * 2 <= full:
            add(block_hw=base.block_hw * 2)
        if base.block_hw >= 64:
            add(block_hw=base.block_hw // 2)
        add(c_iters=1 if base.c_iters > 1 else min(MAX_C_ITERS, groups))
        if base.needs_sums:
            iters = base.sums_iters * 2 if base.sums_iters * 2 <= MAX_SPLIT_ITERS else base.sums_iters // 2
            add(sums_iters=max(1, iters))
        elif base.block_c >= 32 and base.block_hw * 2 <= full:  # same tile, other aspect
            add(block_c=base.block_c // 2, block_hw=base.block_hw * 2)
        add(num_warps=min(16, base.num_warps * 2))
    unique = []
    for config in variants:
        if config not in unique and not config.problems(problem):
            unique.append(config)
    return unique[:CANDIDATES_PER_BUCKET]


# The table -----------------------------------------------------------------------------------

def table_path() -> Path:
    override = os.environ.get(TABLE_ENV)
    return Path(override) if override else TABLE_PATH


def load_table(path: Path) -> dict[str, CamConfig]:
    """Read and check a table file: every entry must be a valid config for its bucket."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the fused_cam config table {path}: {error}; "
                         f"fix the file or unset {TABLE_ENV}") from None
    if not isinstance(document, dict) or document.get("format") != TABLE_FORMAT:
        raise ValueError(f"{path}: not a fused_cam config table of format {TABLE_FORMAT}")
    table = {}
    for key, fields in document.get("configs", {}).items():
        try:
            problem = Problem.from_bucket(key)
            config = CamConfig.from_json(fields)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path}: entry {key!r}: {error}") from None
        errors = config.problems(problem)
        if errors:
            raise ValueError(f"{path}: entry {key!r} is not valid for its bucket: {'; '.join(errors)}")
        table[key] = config
    return table


def table_document(configs: dict[str, CamConfig], source: str, notes: dict | None = None) -> dict:
    """The JSON document of a table (what load_table reads), keys sorted for stable diffs."""
    document = {"format": TABLE_FORMAT, "source": source}
    if notes:
        document["notes"] = notes
    document["configs"] = {key: configs[key].to_json() for key in sorted(configs)}
    return document


def write_json_atomically(path: Path, document: dict) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(document, file, indent=1)
            file.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# The opt-in autotune cache -------------------------------------------------------------------

def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "0") == "1"


def autotune_cache_path(device_name: str, triton_version: str) -> Path:
    """$XDG_CACHE_HOME/gradcam-batch/cam-autotune-<device>-triton-<version>.json."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{device_name}-triton-{triton_version}").strip("-").lower()
    return Path(base) / "gradcam-batch" / f"cam-autotune-{slug}.json"


def read_autotune_cache(path: Path) -> dict[str, CamConfig]:
    """The tuned configs of one (GPU, Triton version); entries that no longer validate (a file
    from another version of this package) are ignored and tuned again."""
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # a damaged cache only costs a new tuning, which rewrites it
    tuned = {}
    for key, entry in (document.get("configs", {}) if isinstance(document, dict) else {}).items():
        try:
            config = CamConfig.from_json(entry["config"])
            if not config.problems(Problem.from_bucket(key)):
                tuned[key] = config
        except (KeyError, TypeError, ValueError):
            continue
    return tuned


def write_autotune_result(path: Path, key: str, config: CamConfig, milliseconds: float) -> None:
    """Add one tuned bucket to the cache file, keeping what other processes wrote meanwhile."""
    try:
        document = json.loads(Path(path).read_text())
        if not isinstance(document, dict) or not isinstance(document.get("configs"), dict):
            document = {}
    except (OSError, ValueError):
        document = {}
    document.setdefault("format", TABLE_FORMAT)
    document.setdefault("configs", {})[key] = {"config": config.to_json(), "milliseconds": milliseconds}
    write_json_atomically(path, document)
