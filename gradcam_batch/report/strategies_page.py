"""The Strategies section: the spectral relevance analysis (SpRAy) of strategies.find_strategies,
read back for the report's classes (the --max-classes most frequent) and shown.

Tightness of a cluster: the root-mean-square distance of its maps to their mean, divided by the
root-mean-square distance of all the class's clustered maps to the class mean, the maps as the
clustering saw them (on its grid, each scaled to sum 1). Below 1 the cluster is more alike than
its class. Cutting a spread-out class into k pieces alone gives pieces of tightness about
k^(-1/2) for maps that vary in two directions (a blob's position), so a tight cluster must also
stand out among its siblings: tightness at most TIGHT and at most TIGHT_RELATIVE times the median
tightness of the class's clusters. Root-mean-square, not mean, distances: their
squares add up over the maps, so one streaming pass over the part files gives them, with the
cluster means, the mean statistics per cluster and, for the exemplars, a seeded sample of each
cluster's maps (all of them in a cluster of few maps; POOL_BYTES in all).

Ranking: the classes split into two or more clusters, those with a tight cluster first; then by
eigengap (how clearly the kNN graph falls apart), then by the share of the smallest tight
cluster (a small group of maps alike and unlike the rest of their class is the Clever-Hans
pattern); then the classes of one cluster, by eigengap."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gradcam_batch.report.images import Images
from gradcam_batch.report.maps import MapScan
from gradcam_batch.report.page import _card, _e, _gallery_notes, _layer, _legend, _class_label
from gradcam_batch.report.pictures import MEAN_SIZE, data_uri, heatmap
from gradcam_batch.report.source import Source, _batches, _column, _layer_mask, _numpy, map_sizes
from gradcam_batch.report.strategies import CLASSES_NAME, STRATEGIES_NAME, ClassStrategies, StrategyOptions

TIGHT = 0.5
"""A tight cluster's maps lie at most half as far from their mean as the class's maps from theirs
(root-mean-square distances) ..."""
TIGHT_RELATIVE = 0.7
"""... and its tightness is at most 0.7 times the median tightness of the class's clusters."""
DEFAULT_TOP = 5
MAX_TOP = 20
"""Classes shown cluster by cluster at most: each adds up to max_clusters mean maps and
EXEMPLARS cards a cluster to the page."""
EXEMPLARS = 4
POOL_MAPS = 256
"""Maps per cluster held for choosing its exemplars (a seeded sample; all of a smaller cluster)."""
POOL_BYTES = 32 << 20
"""The held maps in all; fewer a cluster where the classes and clusters are many (EXEMPLARS at least)."""
MAX_POINTS = 3000
"""Points per scatter at most (a seeded sample beyond): about 60 bytes of page each."""
LISTED = 100
"""Classes named at most in the lists of classes not clustered or not ranked."""
READ_BATCH_ROWS = 1024
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")
"""Cluster colours (Tableau 10), cluster id modulo 10."""
STATISTICS = ("border_mass", "com_y", "com_x", "entropy")
"""The cams columns compared between clusters (rank-0 rows of the layer, joined on sample_id,
shard, target_class and layer)."""


def colour(cluster: int) -> str:
    return PALETTE[cluster % len(PALETTE)]


@dataclass(eq=False)
class ClusterView:
    cluster: int
    size: int
    """Maps of the cluster read back (the class's rows of strategies.parquet with this cluster)."""
    share: float
    """size over the class's clustered maps."""
    tightness: float
    mean: Optional[np.ndarray]
    """The mean of the cluster's maps as stored (min-max normalized), on the clustering's grid."""
    statistics: dict[str, Optional[float]] = field(default_factory=dict)
    """STATISTICS column -> mean over the cluster's maps with a value (None: no value)."""
    exemplars: list[dict] = field(default_factory=list)
    """Rows of the maps closest to the cluster mean (the gallery cards' columns)."""
    tight: bool = False
    """Tightness at most TIGHT and at most TIGHT_RELATIVE times the median of the class's clusters'."""


@dataclass(eq=False)
class ClassView:
    result: ClassStrategies
    clusters: list[ClusterView]
    points: tuple[np.ndarray, np.ndarray, np.ndarray] = (np.zeros(0), np.zeros(0), np.zeros(0, np.int64))
    """(embedding_x, embedding_y, cluster) of the clustered maps; a seeded sample of MAX_POINTS
    beyond that many."""
    clustered: int = 0

    @property
    def smallest_tight(self) -> Optional[ClusterView]:
        tight = [cluster for cluster in self.clusters if cluster.tight]
        return min(tight, key=lambda c: (c.share, c.tightness, c.cluster)) if tight else None

    def key(self) -> tuple:
        split = len(self.clusters) > 1
        smallest = self.smallest_tight
        group = 0 if split and smallest is not None else 1 if split else 2
        return (group, -self.result.eigengap, smallest.share if smallest else 1.0, self.result.target_class)


@dataclass
class StrategyView:
    options: Optional[StrategyOptions] = None
    top: int = DEFAULT_TOP
    note: Optional[str] = None
    """Why there are no strategies (one line), e.g. a library missing."""
    ranked: list[ClassView] = field(default_factory=list)
    """The report's classes with clustered maps, in rank order."""
    results: list[ClassStrategies] = field(default_factory=list)
    shown: list[int] = field(default_factory=list)
    grid: tuple[int, int] = (0, 0)
    seconds: float = 0.0
    """find_strategies' time."""
    pass_seconds: float = 0.0
    """This section's pass over the maps."""
    in_process: bool = False
    """workers 0 was run in this process (a small output: a pool's start costs more)."""
    files: tuple[Path, ...] = ()

    @property
    def split(self) -> list[ClassView]:
        """The ranked classes of two or more clusters, in rank order."""
        return [view for view in self.ranked if len(view.clusters) > 1]

    @property
    def detailed(self) -> list[ClassView]:
        """The top classes shown cluster by cluster: the first `top` of the ranking that split."""
        return self.split[:self.top]

    def exemplar_slots(self) -> set[tuple[str, str]]:
        return {(row["shard"], row["sample_id"]) for view in self.detailed for cluster in view.clusters
                for row in cluster.exemplars}


# --- the pass: cluster means, tightness, statistics and exemplars of the report's classes -----------


def _grid(output_dir: Path) -> tuple[int, int]:
    table = pq.read_table(output_dir / CLASSES_NAME, columns=["grid_height", "grid_width"])
    return (int(table["grid_height"][0].as_py()), int(table["grid_width"][0].as_py())) if table.num_rows else (1, 1)


def _on_grid(flat: np.ndarray, size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """(n, h*w) maps bilinearly resized to the clustering's grid (align_corners=False, as the run and
    the clustering resize), float64."""
    if size == grid:
        return flat.astype(np.float64)
    import torch

    from gradcam_batch.statistics import upsample

    maps = torch.from_numpy(np.nan_to_num(flat.astype(np.float64)).reshape(-1, 1, *size))
    return upsample(maps, grid, dtype=torch.float64).reshape(len(flat), -1).numpy()


def _members(output_dir: Path, layer: str, classes: list[int]) -> pa.Table:
    """The clustered rows of strategies.parquet of `classes` in `layer`."""
    table = pq.read_table(output_dir / STRATEGIES_NAME,
                          columns=["sample_id", "shard", "target_class", "layer", "cluster", "embedding_x",
                                   "embedding_y"],
                          filters=[("target_class", "in", classes), ("cluster", ">=", 0)])
    return table.filter(pc.equal(table["layer"], layer))


def _add(sums: np.ndarray, slot: np.ndarray, values: np.ndarray) -> None:
    """sums[slot[i]] += values[i], a slot at a time (np.add.at is slow on rows)."""
    if not len(slot):
        return
    order = np.argsort(slot, kind="stable")
    uniques, starts = np.unique(slot[order], return_index=True)
    sums[uniques] += np.add.reduceat(values[order], starts, axis=0)


def read_strategies(source: Source, layer: str, shown: list[int], results: list[ClassStrategies],
                    options: StrategyOptions, top: int) -> StrategyView:
    """The view of the strategies of the `shown` classes: one pass over the part files (rank-0 rows
    of `layer`, the shown classes' clustered maps only), see the module."""
    started = time.perf_counter()
    view = StrategyView(options=options, top=top, results=results, shown=list(shown))
    view.grid = grid = _grid(source.output_dir)
    by_class = {result.target_class: result for result in results}
    classes = [c for c in shown if c in by_class and by_class[c].clusters > 0]
    members = _members(source.output_dir, layer, classes) if classes else None
    if members is None or not members.num_rows:
        view.ranked = [ClassView(by_class[c], []) for c in classes]
        view.pass_seconds = time.perf_counter() - started
        return view
    member_class = members["target_class"].to_numpy()
    member_cluster = members["cluster"].to_numpy().astype(np.int64)
    # a slot per (class, cluster)
    pairs, slot_of = np.unique(np.stack([member_class, member_cluster], axis=1), axis=0, return_inverse=True)
    slot_of = slot_of.reshape(-1)
    slots, area = len(pairs), grid[0] * grid[1]
    index = {key: i for i, key in enumerate(zip(members["shard"].to_pylist(), members["sample_id"].to_pylist()))}
    # the exemplar pools: a seeded sample of each cluster's maps, decided before the pass
    per_cluster = max(EXEMPLARS, min(POOL_MAPS, POOL_BYTES // max(1, slots * area * 8)))
    rng = np.random.default_rng(options.seed)
    pooled = np.zeros(len(slot_of), bool)
    order = np.argsort(slot_of, kind="stable")
    for rows in np.split(order, np.cumsum(np.bincount(slot_of, minlength=slots))[:-1]):
        pooled[rows if len(rows) <= per_cluster else rng.choice(rows, per_cluster, replace=False)] = True
    stored_sums, unit_sums = np.zeros((slots, area)), np.zeros((slots, area))
    squares, counts = np.zeros(slots), np.zeros(slots, np.int64)
    stat_sums, stat_counts = np.zeros((len(STATISTICS), slots)), np.zeros((len(STATISTICS), slots))
    pool: dict[int, list[tuple[np.ndarray, dict]]] = {}  # slot -> (map scaled to sum 1, its row), held
    small = ["label", "prob", "pred_class", *STATISTICS]
    columns = ["sample_id", "shard", "target_class", "target_rank", "layer", "cam", "cam_height", "cam_width", *small]
    wanted = np.array(sorted(classes), np.int64)
    for path in source.cam_files:
        for batch in _batches(path, columns, READ_BATCH_ROWS):
            target, _ = _numpy(_column(batch, "target_class", pa.int64()), -1, np.int64)
            keep = _layer_mask(batch, layer) & np.isin(target, wanted)
            if not keep.any():
                continue
            batch, target = batch.filter(pa.array(keep)), target[keep]
            # the join: (shard, sample_id) is one rank-0 row of the layer; its target_class must agree
            found = np.array([index.get(key, -1) for key in zip(batch.column("shard").to_pylist(),
                                                                 batch.column("sample_id").to_pylist())], np.int64)
            matched = found >= 0
            matched[matched] = member_class[found[matched]] == target[matched]
            found[~matched] = -1
            height, width, whole = map_sizes(batch)
            found[~whole] = -1
            if not (found >= 0).any():
                continue
            values = {name: _numpy(_column(batch, name, pa.float64()).cast(pa.float64()), np.nan, np.float64)
                      for name in STATISTICS}
            for h, w in sorted({(int(a), int(b)) for a, b in zip(height[found >= 0], width[found >= 0])}):
                rows = (found >= 0) & (height == h) & (width == w)
                flat = pc.list_flatten(batch.column("cam").filter(pa.array(rows))).to_numpy(zero_copy_only=False)
                stored = _on_grid(np.asarray(flat, np.float32).reshape(-1, h * w), (h, w), grid)
                totals = stored.sum(axis=1)
                usable = np.isfinite(totals) & (totals > 0)  # the clustering left the others out
                member = found[rows][usable]
                stored, slot = stored[usable], slot_of[found[rows][usable]]
                unit = stored / totals[usable, None]
                _add(stored_sums, slot, stored)
                _add(unit_sums, slot, unit)
                _add(squares, slot, (unit * unit).sum(axis=1))
                counts += np.bincount(slot, minlength=slots)
                positions = np.nonzero(rows)[0][usable]
                for number, name in enumerate(STATISTICS):
                    value, valid = values[name][0][positions], values[name][1][positions]
                    valid &= np.isfinite(value)
                    stat_sums[number] += np.bincount(slot[valid], value[valid], minlength=slots)
                    stat_counts[number] += np.bincount(slot[valid], minlength=slots)
                held = pooled[member]
                if held.any():
                    records = batch.select([name for name in ["sample_id", "shard", "target_class", *small]
                                            if name in batch.schema.names]).take(pa.array(positions[held]))
                    for map_, record, key in zip(unit[held], records.to_pylist(), member[held]):
                        pool.setdefault(int(slot_of[key]), []).append((map_.astype(np.float32), record))
    ranked = []
    for target_class in classes:
        result = by_class[target_class]
        mine = np.nonzero(pairs[:, 0] == target_class)[0]
        total = int(counts[mine].sum())
        if not total:
            ranked.append(ClassView(result, []))
            continue
        class_mean = unit_sums[mine].sum(axis=0) / total
        spread = np.sqrt(max(squares[mine].sum() / total - float(class_mean @ class_mean), 0.0))
        clusters = []
        for slot in mine:
            if not counts[slot]:
                continue
            mean_unit = unit_sums[slot] / counts[slot]
            within = np.sqrt(max(squares[slot] / counts[slot] - float(mean_unit @ mean_unit), 0.0))
            statistics = {name: (stat_sums[number, slot] / stat_counts[number, slot]
                                 if stat_counts[number, slot] else None) for number, name in enumerate(STATISTICS)}
            cluster = ClusterView(int(pairs[slot, 1]), int(counts[slot]), counts[slot] / total,
                                  within / spread if spread > 0 else float("nan"),
                                  (stored_sums[slot] / counts[slot]).reshape(grid), statistics)
            held = [(float(((pool_map - mean_unit) ** 2).sum()), record["shard"], record["sample_id"], record)
                    for pool_map, record in pool.get(int(slot), [])]
            cluster.exemplars = [record for *_, record in sorted(held, key=lambda item: item[:3])[:EXEMPLARS]]
            clusters.append(cluster)
        if len(clusters) > 1:
            median = float(np.median([cluster.tightness for cluster in clusters]))
            for cluster in clusters:
                cluster.tight = bool(cluster.tightness <= TIGHT and cluster.tightness <= TIGHT_RELATIVE * median)
        in_class = member_class == target_class
        points = (members["embedding_x"].to_numpy(zero_copy_only=False)[in_class],
                  members["embedding_y"].to_numpy(zero_copy_only=False)[in_class], member_cluster[in_class])
        if len(points[0]) > MAX_POINTS:
            chosen = np.sort(np.random.default_rng([options.seed, target_class]).choice(len(points[0]), MAX_POINTS,
                                                                                      replace=False))
            points = tuple(part[chosen] for part in points)
        ranked.append(ClassView(result, clusters, points, total))
    view.ranked = sorted(ranked, key=ClassView.key)
    detailed = {id(item) for item in view.detailed}
    for item in view.ranked:  # exemplars only where the page shows them
        if id(item) not in detailed:
            for cluster in item.clusters:
                cluster.exemplars = []
    view.pass_seconds = time.perf_counter() - started
    return view


# --- the HTML ------------------------------------------------------------------------------------------


def _number(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _signed(value: Optional[float], main: Optional[float]) -> str:
    if value is None or main is None:
        return ""
    return f" ({value - main:+.3f})"


def scatter(view: ClassView, width: int = 320, height: int = 260) -> str:
    """The 2-D spectral embedding of the class's clustered maps, a point per map coloured by
    cluster, as inline SVG (no script, no external resource)."""
    xs, ys, clusters = view.points
    pad = 10

    def scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
        lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
        return low + (values - lo) / (hi - lo) * (high - low) if hi > lo else np.full(len(values), (low + high) / 2)
    cx, cy = scale(xs, pad, width - pad), scale(ys, height - pad, pad)  # SVG's y grows downwards
    circles = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.6" fill="{colour(int(c))}" data-cluster="{int(c)}"/>'
                      for x, y, c in zip(cx, cy, clusters))
    label = _e(f"spectral embedding of class {view.result.target_class}, {len(xs)} maps coloured by cluster")
    return (f'<svg class="scatter" role="img" aria-label="{label}" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}"><rect x="0.5" y="0.5" width="{width - 1}" height="{height - 1}" fill="#fff" '
            f'stroke="#dde1e8"/>{circles}</svg>')


def _differences(view: ClassView) -> str:
    main = next(cluster for cluster in view.clusters if cluster.cluster == min(c.cluster for c in view.clusters))
    head = ("cluster", "maps", "share", "tightness", "mean border_mass", "mean com_y", "mean com_x",
            "com shift", "mean entropy")
    rows = []
    for cluster in view.clusters:
        stats, base = cluster.statistics, main.statistics
        shift = "-"
        if cluster is main:
            shift = "(main)"
        elif None not in (stats["com_y"], stats["com_x"], base["com_y"], base["com_x"]):
            shift = f"{np.hypot(stats['com_y'] - base['com_y'], stats['com_x'] - base['com_x']):.3f}"
        cells = [f'<span class="swatch" style="background:{colour(cluster.cluster)}"></span>{cluster.cluster}'
                 + (" (main)" if cluster is main else ""),
                 f"{cluster.size:,}", f"{cluster.share:.3f}",
                 _number(cluster.tightness) + (" tight" if cluster.tight else "")]
        for name in STATISTICS:
            cells.append(_number(stats[name]) + ("" if cluster is main else _signed(stats[name], base[name])))
            if name == "com_x":
                cells.append(shift)
        rows.append("<tr>" + "".join(f'<td{" class=num" if i else ""}>{cell}</td>' for i, cell in enumerate(cells))
                    + "</tr>")
    header = "".join(f'<th{" class=num" if i else ""}>{_e(name)}</th>' for i, name in enumerate(head))
    return (f'<table class="differences"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _class_section(rank: int, view: ClassView, scan: MapScan, images: Images, fallback: bool,
                   names: dict[int, str]) -> str:
    result = view.result
    label = _class_label(result.target_class, names)
    smallest = view.smallest_tight
    headline = (f"{len(view.clusters)} clusters of {view.clustered:,} maps, eigengap {result.eigengap:.4f}; "
                + (f"smallest tight cluster: {smallest.cluster} ({smallest.share:.1%} of the maps, tightness "
                   f"{smallest.tightness:.2f})" if smallest else "no tight cluster (the split is diffuse)"))
    legend = "".join(f'<span class="key"><span class="swatch" style="background:{colour(c.cluster)}"></span>'
                     f"{c.cluster}</span>" for c in view.clusters)
    sampled = (f" A seeded sample of {len(view.points[0]):,} of the {view.clustered:,} maps."
               if len(view.points[0]) < view.clustered else "")
    columns = []
    rows = []
    for cluster in view.clusters:
        rows += cluster.exemplars
        cards = "".join(_card(row, "strategy", scan, images, fallback) for row in cluster.exemplars)
        mean = (f'<figure><img class="cluster-mean" data-cluster="{cluster.cluster}" alt="mean map of cluster '
                f'{cluster.cluster} of class {_e(label)}" src="{data_uri(heatmap(cluster.mean, MEAN_SIZE))}">'
                f"<figcaption>mean of {cluster.size:,} map{'s' if cluster.size != 1 else ''}</figcaption></figure>"
                if cluster.mean is not None else "")
        columns.append(f'<div class="cluster" data-cluster="{cluster.cluster}"><h4><span class="swatch" '
                       f'style="background:{colour(cluster.cluster)}"></span>cluster {cluster.cluster}'
                       f'{" (main)" if cluster is view.clusters[0] else ""}</h4><p class="note">{cluster.size:,} '
                       f"maps, {cluster.share:.1%}; tightness {_number(cluster.tightness, 2)}"
                       f'{" (tight)" if cluster.tight else ""}</p>{mean}<div class="grid exemplars">{cards}</div>'
                       "</div>")
    return (f'<section id="strategies-class-{result.target_class}" class="strategy"><h3>{rank}. Class '
            f"{_e(label)}</h3><p class=\"lead\">{_e(headline)}. {_e(result.reason)}.</p>"
            f'<div class="strategy-top"><figure class="embedding">{scatter(view)}<figcaption>Spectral embedding '
            f"(2nd and 3rd eigenvectors), a point per clustered map.{_e(sampled)} {legend}</figcaption></figure>"
            f"{_differences(view)}</div>{_gallery_notes(rows, scan, images, fallback)}"
            f'<div class="clusters">{"".join(columns)}</div></section>')


def _listed(items: list[str]) -> str:
    more = f"; and {len(items) - LISTED:,} more" if len(items) > LISTED else ""
    return "; ".join(items[:LISTED]) + more


def strategies_section(view: StrategyView, scan: MapScan, images: Images, fallback: bool, layer: str) -> str:
    names = images.class_names
    if view.note:
        return (f'<section id="strategies"><h2>Strategies</h2><p class="warn">Not computed: {_e(view.note)}. The '
                "rest of the report is complete.</p></section>")
    options = view.options
    intro = (f"Spectral relevance analysis (SpRAy) of the rank-0 maps of layer {_layer(layer)}, per class: each "
             "class's maps, brought to one grid and scaled to sum 1, are linked to their nearest neighbours, and "
             "the eigengap of the graph's normalized Laplacian says into how many groups they fall (1: no "
             "separate strategies); KMeans on the eigenvectors gives the groups, cluster 0 the largest (the "
             "class's main cluster). A small group of maps alike and unlike the rest of their class (a watermark, "
             "a frame, a background learned instead of the object) shows as a separate tight cluster. "
             "<em>Tightness</em> of a cluster: the root-mean-square distance of its maps to their mean over that "
             "of all the class's clustered maps to the class mean. A cluster is <em>tight</em> at a tightness of "
             f"{TIGHT:g} or less that is also at most {TIGHT_RELATIVE:g} times the median tightness of its class's "
             "clusters: cutting a spread-out class into pieces alone makes pieces tighter than their class, but "
             "alike. Classes are ranked by how strongly their maps split: those with two or more "
             "clusters, a tight one among them, first; then by eigengap, then by the share of the smallest tight "
             "cluster (smaller first); the classes of one cluster last. Each class's clusters are compared with "
             "its main cluster by the cams columns border_mass, com_y, com_x (the centre of mass, in [0, 1] of "
             "the crop; com shift: its distance from the main cluster's) and entropy, means over the cluster's "
             "maps (differences from the main cluster in brackets). Exemplars: the maps closest to the cluster's "
             f"mean (among a seeded sample of up to {POOL_MAPS} of its maps), shown as the gallery cards are: "
             "images read back only from the run's checked listing, mispredicted samples marked.")
    grid = f"{view.grid[0]}x{view.grid[1]}" + ("" if options.grid else " (the layer's most common map size)")
    workers = (f"{options.workers}" if options.workers else "0 (automatic)") + (
        ": run in this process, the output being small (a pool's start costs more)" if view.in_process else "")
    used = (f"Options: neighbors {options.neighbors}, max_clusters {options.max_clusters}, min_maps "
            f"{options.min_maps}, grid {grid}, max_exact {options.max_exact}, seed {options.seed}, workers {workers}, "
            f"top {view.top}. Cost: {view.seconds:.1f} s clustering (find_strategies: a pass over the part files, "
            f"{len(view.results):,} classes), {view.pass_seconds:.1f} s this section's pass over the maps of the "
            f"report's classes. Written: {', '.join(path.name for path in view.files)} beside cams/.")
    ranked = view.ranked
    rows = []
    for rank, item in enumerate(ranked, 1):
        smallest = item.smallest_tight
        sizes = ", ".join(f"{c.size:,}" for c in item.clusters)
        cells = [str(rank), _e(_class_label(item.result.target_class, names)), f"{item.clustered:,}",
                 str(len(item.clusters)), f"{item.result.eigengap:.4f}",
                 f"{smallest.share:.3f} (cluster {smallest.cluster}, tightness {smallest.tightness:.2f})"
                 if smallest else "-",
                 _number(min((c.tightness for c in item.clusters), default=None), 2) if item.clusters else "-",
                 _e(sizes)]
        anchor = f"#strategies-class-{item.result.target_class}"
        if item in view.detailed:
            cells[1] = f'<a href="{anchor}">{cells[1]}</a>'
        rows.append("<tr>" + "".join(f'<td{" class=num" if i not in (1, 7) else ""}>{cell}</td>'
                                     for i, cell in enumerate(cells)) + "</tr>")
    head = ("rank", "class", "clustered maps", "clusters", "eigengap", "smallest tight cluster: share",
            "tightest cluster", "cluster sizes")
    header = "".join(f'<th{" class=num" if i not in (1, 7) else ""}>{_e(name)}</th>' for i, name in enumerate(head))
    table = (f'<table class="ranking"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
             if rows else '<p class="note">None of the report\'s classes has enough maps to cluster.</p>')
    clustered = {r.target_class for r in view.results if r.clusters > 0}
    beyond = len(clustered - set(view.shown))
    notes = []
    if beyond:
        notes.append(f"{beyond:,} clustered classes outside the report's {len(view.shown):,} (--max-classes) are not "
                     f"ranked here: {view.files[1].name if len(view.files) > 1 else 'strategies_classes.parquet'} "
                     "holds them all.")
    if not view.split and ranked:
        notes.append("No class splits into two or more clusters: no separate strategies.")
    elif view.top == 0:
        notes.append("Clusters are not shown class by class (--strategies-top 0).")
    parts = [f'<section id="strategies"><h2>Strategies</h2><p class="lead">{intro}</p>'
             f'<p class="note options">{_e(used)}</p>{_legend()}{table}'
             + "".join(f'<p class="note">{_e(note)}</p>' for note in notes) + "</section>"]
    parts += [_class_section(rank, item, scan, images, fallback, names)
              for rank, item in enumerate(ranked, 1) if item in view.detailed]
    not_clustered = [r for r in view.results if r.clusters == 0]
    if not_clustered:
        items = [f"{_class_label(r.target_class, names)}: {r.reason}" for r in not_clustered]
        parts.append(f'<section id="strategies-unclustered"><h3>Not clustered</h3><p class="note">'
                     f"{len(not_clustered):,} class{'es' if len(not_clustered) != 1 else ''} (of every class, not "
                     f"only the report's): {_e(_listed(items))}.</p></section>")
    return "".join(parts)
