"""The maps: one streaming pass over the part files that adds up the class means and keeps the
few gallery rows' maps (and the heatmap PNGs the run stored for them, where it did). Peak memory
follows the size of a record batch, not of the output."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gradcam_batch.report.source import Source, _batches, _column, _layer_mask, _numpy, map_sizes, zero_maps

SCAN_BATCH_ROWS = 256
"""Rows per record batch when the maps are read: with 56x56 maps about 3 MB of floats."""


@dataclass
class MapScan:
    means: dict[int, np.ndarray] = field(default_factory=dict)
    """Class-mean map per class, for the classes whose maps all share one size, over the maps
    that are not all zero."""
    counts: dict[int, int] = field(default_factory=dict)
    """Class -> the maps its mean is of."""
    zero: dict[int, int] = field(default_factory=dict)
    """Class -> its all-zero maps, left out of its mean: averaging in maps with no evidence would
    dim the mean, and a class of only such maps would show a blank as if it were a finding."""
    mixed: list[int] = field(default_factory=list)
    """Classes skipped: their maps have several sizes."""
    maps: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    """(shard, sample_id) -> the gallery row's map."""
    heatmaps: dict[tuple[str, str], bytes] = field(default_factory=dict)
    """(shard, sample_id) -> the gallery row's heatmap_png (the run's map blended over the crop),
    where the row has one."""


def _stored_heatmaps(batch: pa.RecordBatch, named: np.ndarray, wanted: set[tuple[str, str]],
                     heatmaps: dict[tuple[str, str], bytes]) -> None:
    """Keep the heatmap_png of the batch's wanted rows; only those rows' bytes are copied."""
    index = pa.array(np.nonzero(named)[0])
    pngs = _column(batch, "heatmap_png", pa.binary()).take(index)
    if pngs.null_count == len(pngs):
        return
    shards = batch.column("shard").take(index).to_pylist()
    ids = batch.column("sample_id").take(index).to_pylist()
    for shard, sample_id, png in zip(shards, ids, pngs.to_pylist()):
        if png and (shard, sample_id) in wanted:
            heatmaps[(shard, sample_id)] = png


def scan_maps(source: Source, layer: str, classes: list[int], wanted: set[tuple[str, str]]) -> MapScan:
    """Add up the maps of `classes` (all-zero maps left out, and counted) and keep the maps (and
    stored heatmaps) of the `wanted` rows, reading the part files one record batch at a time
    (rank-0 rows of `layer` only)."""
    sums: dict[tuple[int, int, int], np.ndarray] = {}
    counts: dict[tuple[int, int, int], int] = {}
    zero_counts: dict[int, int] = {}
    maps: dict[tuple[str, str], np.ndarray] = {}
    heatmaps: dict[tuple[str, str], bytes] = {}
    class_set = np.array(sorted(set(classes)), dtype=np.int64)
    wanted_ids = pa.array(sorted({sample_id for _, sample_id in wanted}), pa.string())
    columns = ["sample_id", "shard", "target_class", "target_rank", "layer", "cam", "cam_height", "cam_width",
               "cam_max_raw"]
    stored = source.has("heatmap_png") and bool(wanted)
    for path in source.cam_files:
        for batch in _batches(path, columns + (["heatmap_png"] if stored else []), SCAN_BATCH_ROWS):
            batch = batch.filter(pa.array(_layer_mask(batch, layer)))
            if not batch.num_rows:
                continue
            target, _ = _numpy(batch.column("target_class"), -1, np.int64)
            of_class = np.isin(target, class_set)
            named = pc.is_in(batch.column("sample_id"), value_set=wanted_ids).fill_null(False).to_numpy(
                zero_copy_only=False)
            if stored and named.any():
                _stored_heatmaps(batch, named, wanted, heatmaps)
            keep = of_class | named
            if not keep.any():
                continue
            batch = batch.select([name for name in columns if name in batch.schema.names])
            batch, target, of_class, named = (batch.filter(pa.array(keep)), target[keep], of_class[keep],
                                              named[keep])
            zero = zero_maps(batch)
            for target_class, count in zip(*np.unique(target[of_class & zero], return_counts=True)):
                zero_counts[int(target_class)] = zero_counts.get(int(target_class), 0) + int(count)
            of_class &= ~zero
            height, width, whole = map_sizes(batch)
            for h, w in sorted({(int(a), int(b)) for a, b in zip(height[whole], width[whole])}):
                rows = whole & (height == h) & (width == w)
                part = batch.filter(pa.array(rows))
                flat = pc.list_flatten(part.column("cam")).to_numpy(zero_copy_only=False).reshape(-1, h * w)
                part_target, part_class, part_named = target[rows], of_class[rows], named[rows]
                if part_class.any():
                    chosen = part_target[part_class]
                    order = np.nonzero(part_class)[0][np.argsort(chosen, kind="stable")]
                    uniques, starts = np.unique(part_target[order], return_index=True)
                    totals = np.add.reduceat(flat[order], starts, axis=0, dtype=np.float64)
                    ends = np.append(starts[1:], len(order))
                    for target_class, total, start, end in zip(uniques.tolist(), totals, starts, ends):
                        slot = (target_class, h, w)
                        sums[slot] = sums.get(slot, 0.0) + total
                        counts[slot] = counts.get(slot, 0) + int(end - start)
                if part_named.any():
                    shards = part.column("shard").to_pylist()
                    ids = part.column("sample_id").to_pylist()
                    for index in np.nonzero(part_named)[0].tolist():
                        if (shards[index], ids[index]) in wanted:
                            maps[(shards[index], ids[index])] = flat[index].reshape(h, w).astype(np.float32)
    scan = MapScan(maps=maps, heatmaps=heatmaps, zero=zero_counts)
    sizes: dict[int, list[tuple[int, int, int]]] = {}
    for slot in sums:
        sizes.setdefault(slot[0], []).append(slot)
    for target_class, slots in sizes.items():
        if len(slots) > 1:
            scan.mixed.append(target_class)
        else:
            scan.means[target_class] = (sums[slots[0]] / counts[slots[0]]).reshape(slots[0][1:])
            scan.counts[target_class] = counts[slots[0]]
    return scan
