"""The small columns: per-class statistics, the gallery rows and the error rows. In DuckDB's SQL
when DuckDB is importable, else in pyarrow record batches; neither reads a map."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gradcam_batch.report.maps import SCAN_BATCH_ROWS
from gradcam_batch.report.source import (ERROR_COLUMNS, OPTIONAL_COLUMNS, Source, _batches, _choose_layer,
                                         _column, _layer_mask, _numpy, _readable_schema, run_layer, zero_maps)

MAX_ERRORS_SHOWN = 50
STATS_BATCH_ROWS = 65536
"""Rows per record batch for the small columns (pyarrow engine)."""

GALLERIES = (
    # (key, heading, what the cards show, column needed)
    ("high", "Highest confidence", "the rank-0 maps with the highest probability", None),
    ("low", "Lowest confidence", "the rank-0 maps with the lowest probability", None),
    ("border", "Most border-focused", "the maps with the largest share of their mass in the border band "
                                      "(border_mass): often a sign of a shortcut or of padding artefacts",
     "border_mass"),
    ("misses", "Pointing-game misses", "maps whose peak lies outside the object's box (pointing_hit = false), "
                                       "most confident first", "pointing_hit"),
)

GALLERY_STATISTIC = {"high": "prob", "low": "prob", "border": "border_mass", "misses": "prob"}
"""The value each gallery is ranked by."""

UNDEFINED_FOR_ZERO_MAPS = ("pointing_hit", "border_mass", "entropy", "box_energy", "box_iou")
"""Statistics an all-zero map has no value of (no peak, no mass to place). Newer writers store
them as null; older ones wrote the value of an arbitrary peak, so the report leaves them out."""

MEAN_COLUMNS = (
    # (column, ClassStats prefix): the per-class table shows the mean where rows hold values
    ("border_mass", "border"),
    ("entropy", "entropy"),
    ("box_energy", "energy"),
    ("box_iou", "iou"),
    ("confidence_change", "change"),
)


@dataclass
class ClassStats:
    target_class: int
    count: int = 0
    labeled: int = 0
    correct: int = 0
    prob_sum: float = 0.0
    hit_known: int = 0
    hits: int = 0
    border_n: int = 0
    border_sum: float = 0.0
    entropy_n: int = 0
    entropy_sum: float = 0.0
    energy_n: int = 0
    energy_sum: float = 0.0
    iou_n: int = 0
    iou_sum: float = 0.0
    change_n: int = 0
    change_sum: float = 0.0
    pred_n: int = 0
    """Rows with a pred_class."""
    zero: int = 0
    """All-zero maps (no positive evidence: cam_max_raw = 0, else every value 0)."""

    def add(self, other: "ClassStats") -> None:
        for item in dataclasses.fields(self):
            if item.name != "target_class":
                setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))


@dataclass
class Overview:
    layer_rows: dict[str, int]
    classes: dict[int, ClassStats]
    galleries: dict[str, list[dict]]
    engine: str
    tied_beyond: dict[str, bool] = field(default_factory=dict)
    """Gallery key -> a map left out of the gallery has the same value as its last card: the cut
    falls inside a run of equal values, and which of them are shown is no ranking."""

    @property
    def maps(self) -> int:
        """The rank-0 maps of the reported layer."""
        return sum(stats.count for stats in self.classes.values())

    @property
    def zero_maps(self) -> int:
        return sum(stats.zero for stats in self.classes.values())

    def filled(self, column: str) -> int:
        """How many of the report's rows hold a value of an optional column."""
        counter = {"pred_class": "pred_n", "pointing_hit": "hit_known",
                   **{name: f"{prefix}_n" for name, prefix in MEAN_COLUMNS}}[column]
        return sum(getattr(stats, counter) for stats in self.classes.values())


def targets_are_predictions(source: Source) -> bool:
    """Whether a rank-0 target is the model's top-1 (cam.targets = pred or topk): then it stands
    for the prediction where there is no pred_class. Correctness: pred_class = label, else (with
    such targets) target_class = label, over the rows with a label."""
    targets = ((source.manifest.get("config") or {}).get("cam") or {}).get("targets")
    return targets in ("pred", "topk")


def available(source: Source, overview: Overview, column: str) -> bool:
    return source.has(column) and overview.filled(column) > 0


def _gallery_columns(source: Source) -> list[str]:
    base = ["sample_id", "shard", "target_class", "label", "prob"]
    return base + [name for name in OPTIONAL_COLUMNS if source.has(name)]


def _cut(galleries: dict[str, list[dict]], count: int) -> dict[str, bool]:
    """Trim each gallery, fetched one row longer, to `count`; say where that extra row ties with
    the last card kept."""
    tied = {}
    for key, rows in galleries.items():
        statistic = GALLERY_STATISTIC[key]
        tied[key] = len(rows) > count > 0 and rows[count][statistic] == rows[count - 1][statistic]
        del rows[count:]
    return tied


def _zero_sql(source: Source) -> str:
    raw = "cam_max_raw = 0" if source.has("cam_max_raw") else "null"
    if source.raw_max_known:
        return f"coalesce({raw}, false)"
    # only where a row lacks cam_max_raw: this reads the maps
    return f"coalesce({raw}, list_max(cam) = 0 and list_min(cam) = 0, false)"


def _gallery_order(key: str, row: dict):
    value = row["prob"] if key in ("high", "misses") else -row["prob"] if key == "low" else row["border_mass"]
    return (-value, row["shard"], row["sample_id"])


def _duckdb_importable() -> bool:
    try:
        import duckdb
    except ImportError:
        return False
    return duckdb is not None


def _duckdb_usable(source: Source) -> bool:
    """DuckDB globs its file names: paths holding glob characters go to the pyarrow engine."""
    return not any(char in str(path) for path in source.cam_files for char in "*?[{")


def overview_duckdb(source: Source, layer: Optional[str], per_gallery: int) -> Overview:
    import duckdb

    con = duckdb.connect()
    try:
        con.execute(f"set threads = {max(1, min(4, os.cpu_count() or 1))}")
        files = [str(path) for path in source.cam_files]
        src = "read_parquet(?, union_by_name = true)"
        layer_rows = {name: int(rows) for name, rows in con.execute(
            f"select coalesce(layer, '') as name, count(*) from {src} group by 1 order by 1", [files]).fetchall()}
        layer = _choose_layer(layer_rows, layer, run_layer(source))
        where = "coalesce(layer, '') = ? and target_rank = 0 and target_class is not null"
        # the rows the report covers, each with all_zero computed once; DuckDB reads only the columns used
        rows = f"(select *, {_zero_sql(source)} as all_zero from {src} where {where})"
        has = source.has

        def defined(name: str) -> str:  # an all-zero map has no such value
            return " filter (where not all_zero)" if name in UNDEFINED_FOR_ZERO_MAPS else ""
        best = (f"coalesce({'pred_class' if has('pred_class') else 'null::bigint'}, "
                f"{'target_class' if targets_are_predictions(source) else 'null::bigint'})")
        # The writer stores an undefined statistic (an all-zero map's entropy) as null, which count
        # and sum skip. NaN must not reach these columns: DuckDB 2.0 answers isnan() and nullif()
        # on a Parquet float column from the file's statistics, which leave NaN out.
        means = ", ".join(f"count({name}){defined(name)}, coalesce(sum({name}::double){defined(name)}, 0)"
                          if has(name) else "0, 0" for name, _ in MEAN_COLUMNS)
        pointing = ("count(pointing_hit) filter (where not all_zero), "
                    "count(*) filter (where pointing_hit and not all_zero)")
        query = f"""
            select target_class, count(*), count(*) filter (where label is not null and {best} is not null),
                   count(*) filter (where {best} = label),
                   coalesce(sum(prob::double) filter (where not isnan(prob::double)), 0),
                   {pointing if has("pointing_hit") else "0, 0"},
                   {means},
                   {"count(pred_class)" if has("pred_class") else "0"}, count(*) filter (where all_zero)
            from {rows} group by target_class"""
        classes = {}
        for values in con.execute(query, [files, layer]).fetchall():
            target_class, count, labeled, correct_count, prob_sum, hit_known, hits, *rest = values
            mean_values, pred_n, zero = rest[:-2], rest[-2], rest[-1]
            sums = {}
            for index, (_, prefix) in enumerate(MEAN_COLUMNS):
                sums[f"{prefix}_n"] = int(mean_values[2 * index])
                sums[f"{prefix}_sum"] = float(mean_values[2 * index + 1])
            classes[int(target_class)] = ClassStats(
                int(target_class), int(count), int(labeled), int(correct_count), float(prob_sum), int(hit_known),
                int(hits), pred_n=int(pred_n), zero=int(zero), **sums)
        galleries = {}
        columns = ", ".join(_gallery_columns(source))
        orders = {"high": ("not isnan(prob::double)", "prob desc"), "low": ("not isnan(prob::double)", "prob asc"),
                  "border": ("border_mass is not null and not isnan(border_mass::double)", "border_mass desc"),
                  "misses": ("pointing_hit = false and not isnan(prob::double)", "prob desc")}
        for key, _, _, needs in GALLERIES:
            if per_gallery == 0 or (needs and not has(needs)):
                galleries[key] = []
                continue
            condition, order = orders[key]
            # all-zero maps are no finding; one row more than shown tells whether the cut splits a tie
            cursor = con.execute(f"select {columns} from {rows} where not all_zero and {condition} "
                                 f"order by {order}, shard, sample_id limit {int(per_gallery) + 1}", [files, layer])
            names = [item[0] for item in cursor.description]
            galleries[key] = [dict(zip(names, values)) for values in cursor.fetchall()]
    finally:
        con.close()
    return Overview(layer_rows, classes, galleries, f"DuckDB {duckdb.__version__}", _cut(galleries, per_gallery))


def overview_arrow(source: Source, layer: Optional[str], per_gallery: int) -> Overview:
    layer_rows: dict[str, int] = {}
    for path in source.cam_files:
        for batch in _batches(path, ["layer"], STATS_BATCH_ROWS):
            for item in pc.value_counts(_column(batch, "layer", pa.string()).fill_null("")).to_pylist():
                layer_rows[item["values"]] = layer_rows.get(item["values"], 0) + item["counts"]
    layer_rows = dict(sorted(layer_rows.items()))
    layer = _choose_layer(layer_rows, layer, run_layer(source))
    fallback = targets_are_predictions(source)
    gallery_columns = _gallery_columns(source)
    columns = ["layer", "target_rank", "cam_max_raw", *gallery_columns,
               *(name for name, _ in MEAN_COLUMNS if source.has(name) and name not in gallery_columns)]
    # where some row lacks cam_max_raw, whether its map is all zero needs the map: fewer rows a batch
    columns, batch_rows = (columns, STATS_BATCH_ROWS) if source.raw_max_known else (columns + ["cam"],
                                                                                    SCAN_BATCH_ROWS)
    classes: dict[int, ClassStats] = {}
    galleries: dict[str, list[dict]] = {key: [] for key, *_ in GALLERIES}
    for path in source.cam_files:
        for batch in _batches(path, columns, batch_rows):
            batch = batch.filter(pa.array(_layer_mask(batch, layer)))
            if not batch.num_rows:
                continue
            zero = zero_maps(batch)
            target, _ = _numpy(_column(batch, "target_class", pa.int64()), 0, np.int64)
            label, labeled = _numpy(_column(batch, "label", pa.int64()), -1, np.int64)
            prob, prob_valid = _numpy(_column(batch, "prob", pa.float32()), np.nan, np.float64)
            prob_valid &= ~np.isnan(prob)
            pred, pred_valid = _numpy(_column(batch, "pred_class", pa.int64()), -1, np.int64)
            judged = labeled & (pred_valid | fallback)  # a prediction to hold against the label
            correct = judged & (np.where(pred_valid, pred, target) == label)
            hit, hit_known = _numpy(_column(batch, "pointing_hit", pa.bool_()), False, bool)
            hit_known &= ~zero
            measured = {}
            for name, _ in MEAN_COLUMNS:
                values, valid = _numpy(_column(batch, name, pa.float32()), np.nan, np.float64)
                valid &= ~np.isnan(values)
                measured[name] = (values, valid & ~zero if name in UNDEFINED_FOR_ZERO_MAPS else valid)
            uniques, inverse = np.unique(target, return_inverse=True)

            def per_class(weights, kind=int):
                return np.bincount(inverse, weights=weights.astype(np.float64), minlength=len(uniques)).astype(kind)

            sums = dict(count=np.bincount(inverse, minlength=len(uniques)), labeled=per_class(judged),
                        correct=per_class(correct), prob_sum=per_class(np.where(prob_valid, prob, 0.0), float),
                        hit_known=per_class(hit_known), hits=per_class(hit_known & hit), pred_n=per_class(pred_valid),
                        zero=per_class(zero))
            for name, prefix in MEAN_COLUMNS:
                values, valid = measured[name]
                sums[f"{prefix}_n"] = per_class(valid)
                sums[f"{prefix}_sum"] = per_class(np.where(valid, values, 0.0), float)
            for position, target_class in enumerate(uniques.tolist()):
                stats = ClassStats(target_class, **{name: values[position].item() for name, values in sums.items()})
                classes.setdefault(target_class, ClassStats(target_class)).add(stats)
            if per_gallery:
                keys = {"high": (prob, prob_valid), "low": (-prob, prob_valid), "border": measured["border_mass"],
                        "misses": (prob, prob_valid & hit_known & ~hit)}
                rows = batch.select([name for name in gallery_columns if name in batch.schema.names])
                for key, _, _, needs in GALLERIES:
                    if needs and not source.has(needs):
                        continue
                    values, valid = keys[key]
                    # all-zero maps are no finding; one row more than shown tells whether the cut splits a tie
                    galleries[key] = _merge_top(key, galleries[key], rows, values, valid & ~zero, per_gallery + 1)
    return Overview(layer_rows, classes, galleries, f"pyarrow {pa.__version__}", _cut(galleries, per_gallery))


def _merge_top(key: str, kept: list[dict], batch: pa.RecordBatch, values: np.ndarray, valid: np.ndarray,
               count: int) -> list[dict]:
    """The `count` best rows of `kept` and the batch, best first (ties by shard, sample_id)."""
    candidates = np.nonzero(valid)[0]
    if len(candidates) > count:  # every row that ties with the count-th best stays a candidate
        threshold = np.partition(values[candidates], -count)[-count]
        candidates = candidates[values[candidates] >= threshold]
    if not len(candidates):
        return kept
    rows = batch.take(pa.array(candidates)).to_pylist()
    return sorted(kept + rows, key=lambda row: _gallery_order(key, row))[:count]


def read_errors(source: Source, limit: int = MAX_ERRORS_SHOWN) -> tuple[int, list[dict]]:
    total, shown = 0, []
    for path in source.error_files:
        total += _readable_schema(path)[1]
        if len(shown) < limit:
            for batch in _batches(path, list(ERROR_COLUMNS), 1024):
                for row in batch.to_pylist():
                    if len(shown) < limit:
                        shown.append({name: row.get(name) for name in ERROR_COLUMNS})
    return total, shown
