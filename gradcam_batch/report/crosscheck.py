"""Cross-check: this output's maps against another output's maps of the same images, made by a
method of another kind (a gradient-free or perturbation map that agrees with Grad-CAM is stronger
evidence than Grad-CAM alone; where they disagree, the map's story depends on the method).

    gradcam-batch-report OUTPUT_DIR --compare OTHER_DIR

Rows pair up by (shard, sample_id, target_class) among the rank-0 maps of this report's layer
and of the other output's layer: the same layer where the other output holds it too, else the
one its run summary speaks of. A pair's agreement is the Pearson
correlation of the two maps on the finer of their two grids (the coarser one bilinearly resized,
align_corners=False, as the run resizes), in float64; it is null where either map is constant
(an all-zero map has no evidence to agree with). Correlation ignores each map's scale and offset,
so normalized and raw maps compare alike.

Written beside cams/ as crosscheck.parquet, one row per pair (sample_id, shard, target_class,
layer, other_layer, agreement; the file's metadata names both outputs and methods). The page
shows, per class, the pairs, the median agreement and the share of pairs at or above AGREE; per
strategy cluster of the classes the Strategies section shows (strategies.parquet), the same; and
the pairs that disagree most, both maps side by side. Both outputs are read part file by part
file, a shard's maps at a time from the other output, and the pairs are written a shard at a
time: memory follows the largest shard plus 16 bytes a pair (its class and r, for the medians).
"""

from __future__ import annotations

import heapq
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gradcam_batch.report.source import (PART_FILE, ReportError, Source, _batches, _column, _layer_mask, map_sizes,
                                         open_output, run_layer, run_method, run_target_layers)
from gradcam_batch.report.strategies_page import _on_grid

CROSSCHECK_NAME = "crosscheck.parquet"
AGREE = 0.5
"""A pair agrees when its maps correlate at least this much (Pearson r)."""
DISPUTED = 6
"""The pairs that disagree most, shown side by side."""
READ_BATCH_ROWS = 1024
KINDS = {
    **{name: "gradient" for name in ("gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "elementwise",
                                     "finercam", "shapleycam", "eigengradcam")},
    "cam": "gradient",  # the linear layer's row is the logit's gradient: Grad-CAM's maps on such heads
    **{name: "gradient-free" for name in ("eigencam", "kpcacam", "fem")},
    **{name: "perturbation" for name in ("scorecam", "ablationcam")},
}
"""What each cam.method's map rests on: a cross-check means most where the kinds differ."""
SCHEMA = pa.schema([("sample_id", pa.string()), ("shard", pa.string()), ("target_class", pa.int64()),
                    ("layer", pa.string()), ("other_layer", pa.string()), ("agreement", pa.float64())])


@dataclass
class Agreement:
    """Pairs of one group (a class, a cluster): how many, how many could be rated, their median
    agreement and the share that agree."""
    pairs: int
    rated: int
    median: Optional[float]
    agreeing: Optional[float]


@dataclass
class CrossCheck:
    other_dir: Path
    method: str
    other_method: str
    layer: str
    other_layer: str
    maps: int
    """This output's rank-0 maps of the layer."""
    pairs: int
    overall: Agreement
    classes: dict[int, Agreement] = field(default_factory=dict)
    clusters: dict[tuple[int, int], Agreement] = field(default_factory=dict)
    """(class, cluster) -> agreement, for the classes the Strategies section shows."""
    disputed: list[dict] = field(default_factory=list)
    """The pairs that disagree most: shard, sample_id, target_class, agreement, map, other_map."""
    path: Optional[Path] = None

    def kind(self, method: str) -> str:
        return KINDS.get(method, "unknown kind")

    @property
    def same_kind(self) -> bool:
        return self.kind(self.method) == self.kind(self.other_method)


def agreement(values: np.ndarray) -> Agreement:
    rated = values[~np.isnan(values)]
    if not len(rated):
        return Agreement(len(values), 0, None, None)
    return Agreement(len(values), len(rated), float(np.median(rated)), float(np.mean(rated >= AGREE)))


def correlations(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Row-wise Pearson r of two (n, m) float64 arrays; NaN where a row of either is constant."""
    def flat(maps: np.ndarray) -> np.ndarray:
        # resizing a constant map can leave a spread of a few ulps: constant too, at any scale
        return np.ptp(maps, axis=1) <= 1e-9 * np.abs(maps).max(axis=1)

    constant = flat(first) | flat(second)
    first = first - first.mean(axis=1, keepdims=True)
    second = second - second.mean(axis=1, keepdims=True)
    norms = np.sqrt((first * first).sum(axis=1) * (second * second).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (first * second).sum(axis=1) / norms
    return np.where(constant | ~np.isfinite(r), np.nan, np.clip(r, -1.0, 1.0))


def _shard_of(path: Path) -> str:
    match = PART_FILE.fullmatch(path.name)
    return match.group("shard") if match else path.name


def _rank0_maps(paths: list[Path], layer: Optional[str], layers_seen: set[str]):
    """(shard, sample_id, target_class, map (h*w,) float32, (h, w)) of the rank-0 rows of `layer`
    (None: every layer, the names collected in layers_seen) with a whole map."""
    columns = ["sample_id", "shard", "target_class", "target_rank", "layer", "cam", "cam_height", "cam_width"]
    for path in paths:
        for batch in _batches(path, columns, READ_BATCH_ROWS):
            if layer is None:
                layers_seen.update(v for v in _column(batch, "layer", pa.string()).unique().to_pylist() if v)
            batch = batch.filter(pa.array(_layer_mask(batch, layer)))
            if not batch.num_rows:
                continue
            height, width, whole = map_sizes(batch)
            if not whole.any():
                continue
            batch = batch.filter(pa.array(whole))
            height, width = height[whole], width[whole]
            values = pc.list_flatten(batch.column("cam")).to_numpy(zero_copy_only=False).astype(np.float32)
            offsets = np.concatenate([[0], np.cumsum(height * width)])
            shards = batch.column("shard").to_pylist()
            ids = batch.column("sample_id").to_pylist()
            targets = batch.column("target_class").to_pylist()
            for index in range(batch.num_rows):
                yield (shards[index], ids[index], targets[index], values[offsets[index]:offsets[index + 1]],
                       (int(height[index]), int(width[index])))


def _other_layer(other: Source, layer: str) -> Optional[str]:
    """The other output's layer to pair with: this report's layer where the other output holds it
    too (both runs had several target layers, or fused the same ones), else the one its run
    summary speaks of."""
    summary_layer = run_layer(other)
    return layer if layer == summary_layer or layer in run_target_layers(other) else summary_layer


def cross_check(source: Source, layer: str, other_dir: str | Path, maps: int) -> CrossCheck:
    """Pair this output's rank-0 maps of `layer` with OTHER_DIR's, rate each pair, write
    crosscheck.parquet; a one-line ReportError where OTHER_DIR cannot be compared."""
    try:
        other = open_output(other_dir)
    except ReportError as error:
        raise ReportError(f"--compare {other_dir}: {error}") from None
    if other.output_dir.resolve() == source.output_dir.resolve():
        raise ReportError(f"--compare {other_dir}: that is this output; give the output of a run with another "
                          "cam.method over the same data")
    other_layer = _other_layer(other, layer)
    layers_seen: set[str] = set()
    mine_by_shard: dict[str, list[Path]] = {}
    for path in source.cam_files:
        mine_by_shard.setdefault(_shard_of(path), []).append(path)
    theirs_by_shard: dict[str, list[Path]] = {}
    for path in other.cam_files:
        theirs_by_shard.setdefault(_shard_of(path), []).append(path)
    method, other_method = run_method(source), run_method(other)
    schema = SCHEMA.with_metadata({b"gradcam_batch.crosscheck": json.dumps(
        {"other_output": str(other.output_dir), "method": method, "other_method": other_method,
         "agree_at": AGREE}).encode()})
    path = source.output_dir / CROSSCHECK_NAME
    temporary = path.with_name(f".{CROSSCHECK_NAME}.{os.getpid()}.tmp")
    rated_parts: list[np.ndarray] = []
    target_parts: list[np.ndarray] = []
    disputed: list[tuple[float, int, dict]] = []  # a heap of the lowest agreements, by -r
    pairs_seen = 0
    try:
        with pq.ParquetWriter(temporary, schema, compression="zstd") as writer:
            for shard in sorted(mine_by_shard):  # a shard's pairs at a time, written as they come
                theirs = {(s, i, t): (m, size) for s, i, t, m, size in
                          _rank0_maps(theirs_by_shard.get(shard, []), other_layer, layers_seen)}
                if other_layer is None and len(layers_seen) > 1:
                    raise ReportError(f"--compare {other_dir}: its maps are of several layers "
                                      f"({', '.join(sorted(layers_seen))}) and its manifest does not say which "
                                      "one its run summary speaks of")
                if not theirs:
                    continue
                pending: dict[tuple, list] = {}
                for s, i, t, mine, size in _rank0_maps(mine_by_shard[shard], layer, set()):
                    match = theirs.get((s, i, t))
                    if match is not None:
                        pending.setdefault((size, match[1]), []).append(((s, i, t), mine, match[0]))
                keys, values = [], []
                for (size, other_size), pairs in pending.items():
                    grid = max(size, other_size, key=lambda hw: hw[0] * hw[1])
                    first = _on_grid(np.stack([pair[1] for pair in pairs]), size, grid)
                    second = _on_grid(np.stack([pair[2] for pair in pairs]), other_size, grid)
                    for (key, mine, other_map), r in zip(pairs, correlations(first, second).tolist()):
                        keys.append(key)
                        values.append(r)
                        pairs_seen += 1
                        if np.isnan(r) or (len(disputed) == DISPUTED and -r <= disputed[0][0]):
                            continue
                        entry = (-r, pairs_seen, dict(shard=key[0], sample_id=key[1], target_class=key[2],
                                                      agreement=r, map=mine.reshape(size),
                                                      other_map=other_map.reshape(other_size)))
                        (heapq.heapreplace if len(disputed) == DISPUTED else heapq.heappush)(disputed, entry)
                if not keys:
                    continue
                rated_parts.append(np.array(values, dtype=np.float64))
                target_parts.append(np.array([key[2] for key in keys], dtype=np.int64))
                writer.write_table(pa.table({
                    "sample_id": [key[1] for key in keys], "shard": [key[0] for key in keys],
                    "target_class": target_parts[-1], "layer": [layer] * len(keys),
                    "other_layer": [other_layer or next(iter(layers_seen), "")] * len(keys),
                    "agreement": rated_parts[-1]}, schema=schema))
        if not pairs_seen:
            raise ReportError(f"--compare {other_dir}: none of its rank-0 maps is of an image and class that this "
                              f"output's layer {layer} has a map of; compare two runs over the same data with the "
                              "same targets")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    rated, targets = np.concatenate(rated_parts), np.concatenate(target_parts)
    check = CrossCheck(other.output_dir, method, other_method, layer, other_layer or next(iter(layers_seen), ""),
                       maps, pairs_seen, agreement(rated), path=path)
    order = np.argsort(targets, kind="stable")
    classes, starts = np.unique(targets[order], return_index=True)
    for target_class, group in zip(classes.tolist(), np.split(rated[order], starts[1:])):
        check.classes[target_class] = agreement(group)
    check.disputed = [entry[2] for entry in sorted(disputed, key=lambda entry: (-entry[0], entry[1]))]
    return check


def add_clusters(check: CrossCheck, members: pa.Table) -> None:
    """Agreement per (class, cluster) from strategies.parquet's rows (sample_id, shard,
    target_class, cluster) of the classes the Strategies section shows."""
    if not members.num_rows:
        return
    pairs = pq.read_table(check.path, columns=["sample_id", "shard", "target_class", "agreement"])
    joined = members.select(["sample_id", "shard", "target_class", "cluster"]).join(
        pairs, keys=["sample_id", "shard", "target_class"], join_type="inner")
    if not joined.num_rows:
        return
    classes = joined["target_class"].to_numpy()
    clusters = joined["cluster"].to_numpy()
    values = joined["agreement"].fill_null(np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
    for target_class, cluster in sorted({(int(a), int(b)) for a, b in zip(classes, clusters)}):
        check.clusters[(target_class, cluster)] = agreement(values[(classes == target_class) & (clusters == cluster)])
