"""Spectral relevance analysis (SpRAy) of an output folder: each class's rank-0 maps of one layer,
clustered by the method in spectral.py, written beside cams/ as strategies.parquet (a row per
map) and strategies_classes.parquet (a row per class).

Scale: one pass over the part files (the needed columns; rank-0 rows of the layer kept as float32
on the grid: 4 x grid^2 bytes a map, 200 MB for a million 7x7 maps), then the classes in a pool
of spawned processes (one BLAS/OpenMP thread each, about 230 MB each, a few chunks of classes in
flight). A class of more than max_exact usable maps is clustered on a seeded uniform sample of
max_exact of them; every other map takes the majority cluster of its `neighbors` nearest sampled
maps (KNeighborsClassifier's vote, uniform weights, ties to the larger cluster) and the mean of
their 2-D embeddings.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import uuid
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gradcam_batch.report.source import (ReportError, Source, _batches, _column, _first_line, _layer_mask, _numpy,
                                         map_sizes, open_output, run_layer)
from gradcam_batch.report.spectral import (LEFT_OUT, UNREADABLE, ClassStrategies, Clustering, StrategyError,
                                           StrategyOptions, _cluster, _one_thread, _require_libraries, _resize,
                                           cluster_maps)

__all__ = ["CLASSES_NAME", "CLASSES_SCHEMA", "STRATEGIES_NAME", "STRATEGIES_SCHEMA", "ClassStrategies", "Clustering",
           "StrategyError", "StrategyOptions", "cluster_maps", "find_strategies"]

STRATEGIES_NAME = "strategies.parquet"
CLASSES_NAME = "strategies_classes.parquet"
METADATA_KEY = b"gradcam_batch_strategies"
READ_BATCH_ROWS = 8192
"""Rows per record batch of the pass: 1.6 MB of 7x7 maps, 100 MB of 56x56 ones."""
IN_FLIGHT_PER_WORKER = 2
"""Chunks handed to the pool per worker at a time: each is a copy of its classes' maps."""
CHUNKS_PER_WORKER = 8
DEFAULT_MAX_WORKERS = 4
"""workers=0 uses one process a core, up to this many."""
STRATEGIES_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("shard", pa.string()), ("target_class", pa.int64()), ("layer", pa.string()),
    ("cluster", pa.int32()), ("embedding_x", pa.float32()), ("embedding_y", pa.float32()), ("left_out", pa.string()),
])
"""strategies.parquet: one row per rank-0 map of the layer; cluster -1 and null embedding where left out."""
CLASS_OPTIONS = ("neighbors", "max_clusters", "min_maps", "max_exact", "seed")
"""The options that shape the result, a column each in strategies_classes.parquet."""
CLASSES_SCHEMA = pa.schema([
    ("target_class", pa.int64()), ("maps", pa.int64()), ("clusters", pa.int32()),
    ("eigenvalues", pa.list_(pa.float64())), ("eigengap", pa.float64()), ("reason", pa.string()),
    ("sizes", pa.list_(pa.int64())), ("approximate", pa.bool_()), ("zero_maps", pa.int64()),
    ("nonfinite_maps", pa.int64()), ("malformed_maps", pa.int64()), ("layer", pa.string()),
    ("grid_height", pa.int32()), ("grid_width", pa.int32()),
    *((name, pa.int64()) for name in CLASS_OPTIONS),
])
"""strategies_classes.parquet: one row per class, the ClassStrategies fields, the grid, the options."""


@dataclass
class _Rows:
    """The rank-0 rows of the layer, in reading order, and their maps on the grid."""
    sample_id: pa.Array
    shard: pa.Array
    target_class: np.ndarray
    readable: np.ndarray
    """Rows whose cam holds cam_height x cam_width values; the maps below are theirs, in order."""
    pieces: list[np.ndarray]
    """The maps as read, a piece per record batch and size, each on the grid. Never joined into one
    array: that copy would double the pass's peak memory (the allocator keeps what the pieces free)."""
    piece_of: np.ndarray
    offset_of: np.ndarray
    """Readable map i is pieces[piece_of[i]][offset_of[i]]."""
    grid: tuple[int, int]

    def take(self, index: np.ndarray) -> np.ndarray:
        """The readable maps `index` (in that order), (len(index), grid area) float32."""
        out = np.empty((len(index), self.grid[0] * self.grid[1]), np.float32)
        which = self.piece_of[index]
        order = np.argsort(which, kind="stable")
        pieces, starts = np.unique(which[order], return_index=True)
        for piece, part in zip(pieces.tolist(), np.split(order, starts[1:])):
            out[part] = self.pieces[piece][self.offset_of[index[part]]]
        return out


def _read_rows(source: Source, layer: str, grid: Optional[int]) -> Optional[_Rows]:
    """One pass over the part files (only the needed columns); None where no row is of the layer."""
    columns = ["sample_id", "shard", "target_class", "target_rank", "layer", "cam", "cam_height", "cam_width"]
    fixed = (grid, grid) if grid else None
    pieces, sizes_of, where, ids, shards, classes, readable, sizes, offset = [], [], [], [], [], [], [], Counter(), 0
    for path in source.cam_files:
        try:
            for batch in _batches(path, columns, READ_BATCH_ROWS):
                batch = batch.filter(pa.array(_layer_mask(batch, layer)))
                if not batch.num_rows:
                    continue
                height, width, whole = map_sizes(batch)
                cams = batch.column("cam")
                pairs, counts = (np.unique(np.stack([height[whole], width[whole]]), axis=1, return_counts=True)
                                 if whole.any() else (np.zeros((2, 0), np.int64), np.zeros(0, np.int64)))
                for (h, w), number in zip(pairs.T.tolist(), counts.tolist()):
                    rows = whole & (height == h) & (width == w)
                    # a numpy copy, not a view: the batch's Arrow buffers go back at once
                    flat = np.array(pc.list_flatten(cams.filter(pa.array(rows))).to_numpy(zero_copy_only=False),
                                    dtype=np.float32).reshape(-1, h * w)
                    # with a grid given, resize now: the pass then holds maps of the grid's size only
                    pieces.append(flat if fixed is None else _resize(flat, (h, w), fixed))
                    sizes_of.append((h, w) if fixed is None else fixed)
                    where.append(np.nonzero(rows)[0] + offset)
                    sizes[(h, w)] += number
                ids.append(batch.column("sample_id"))
                shards.append(batch.column("shard"))
                classes.append(_numpy(batch.column("target_class"), 0, np.int64)[0])
                readable.append(whole)
                offset += batch.num_rows
        except (OSError, pa.ArrowException) as error:
            raise StrategyError(f"cannot read {path}: {_first_line(error)}") from error
    if not offset:
        return None
    readable_rows = np.concatenate(readable)
    # the most common size (ties: the larger map); no readable map at all: any grid, nothing is placed on it
    common = max(sizes.items(), key=lambda item: (item[1], item[0][0] * item[0][1], item[0]))[0] if sizes else (1, 1)
    target = fixed or common
    position = np.cumsum(readable_rows) - 1  # row -> its readable map's index
    piece_of = np.empty(int(readable_rows.sum()), np.int32)
    offset_of = np.empty(len(piece_of), np.int32)
    for number, (size, rows) in enumerate(zip(sizes_of, where)):
        piece_of[position[rows]], offset_of[position[rows]] = number, np.arange(len(rows))
        pieces[number] = _resize(pieces[number], size, target)  # the piece of another size is freed
    return _Rows(pa.concat_arrays(ids), pa.concat_arrays(shards), np.concatenate(classes), readable_rows, pieces,
                 piece_of, offset_of, target)


def _rank0_layers(source: Source) -> dict[str, int]:
    """Rank-0 rows per layer, from the small columns only."""
    counts: Counter = Counter()
    for path in source.cam_files:
        try:
            for batch in _batches(path, ["layer", "target_rank", "target_class"], 65536):
                rank0 = pc.and_(pc.equal(_column(batch, "target_rank", pa.int32()), 0).fill_null(False),
                                _column(batch, "target_class", pa.int64()).is_valid())
                layers = _column(batch, "layer", pa.string()).filter(rank0).fill_null("")
                counts.update({item["values"]: item["counts"] for item in pc.value_counts(layers).to_pylist()})
        except (OSError, pa.ArrowException) as error:
            raise StrategyError(f"cannot read {path}: {_first_line(error)}") from error
    return dict(sorted(counts.items()))


def _chosen_layer(source: Source, options: StrategyOptions) -> str:
    """options.layer, else the run summary's layer; the first in sorted order where the output
    records no target layer."""
    if options.layer:
        return options.layer
    recorded = run_layer(source)
    if recorded:
        return recorded
    layers = _rank0_layers(source)
    if not layers:
        raise StrategyError(f"{source.output_dir} holds no rank-0 maps to cluster")
    return next(iter(layers))


def _no_maps(source: Source, layer: str, options: StrategyOptions) -> StrategyError:
    layers = _rank0_layers(source)
    if not layers:
        return StrategyError(f"{source.output_dir} holds no rank-0 maps to cluster")
    chosen = "" if options.layer else " (the run's layer)"
    return StrategyError(f"{source.output_dir} holds no rank-0 maps of layer {layer!r}{chosen}; layers with maps: "
                         f"{', '.join(repr(name) for name in layers)} (choose one with --layer)")


def _cluster_chunk(chunk: list[tuple[int, np.ndarray, int]], options: StrategyOptions) -> list[tuple[int, Clustering]]:
    """Cluster a chunk of classes with one BLAS/OpenMP thread (see cluster_maps), set once a chunk."""
    with _one_thread():
        return [(target_class, _cluster(maps, options, target_class, malformed))
                for target_class, maps, malformed in chunk]


def _chunks(classes: list[tuple[int, np.ndarray, int]], workers: int) -> list[list[tuple[int, np.ndarray, int]]]:
    """Classes (target_class, rows in maps, malformed) in chunks of similar size, largest first:
    big classes start early and small ones fill the gaps at the end."""
    total = sum(len(rows) for _, rows, _ in classes)
    target = max(1, -(-total // (workers * CHUNKS_PER_WORKER)))
    chunks, current, held = [], [], 0
    for item in sorted(classes, key=lambda item: (-len(item[1]), item[0])):
        current.append(item)
        held += len(item[1])
        if held >= target:
            chunks.append(current)
            current, held = [], 0
    return chunks + ([current] if current else [])


def _clustered(rows: _Rows, options: StrategyOptions) -> Iterator[tuple[int, np.ndarray, Clustering]]:
    """(target_class, its rows' indices, Clustering) per class, in any order."""
    readable_classes = rows.target_class[rows.readable]
    order = np.argsort(readable_classes, kind="stable")
    uniques, starts = np.unique(readable_classes[order], return_index=True)
    where = {int(c): order[s:e] for c, s, e in zip(uniques, starts, np.append(starts[1:], len(order)))}
    readable_index = np.nonzero(rows.readable)[0]
    unreadable = Counter(rows.target_class[~rows.readable].tolist())
    empty = np.zeros(0, np.int64)
    classes = [(c, where.get(c, empty), unreadable.get(c, 0)) for c in np.unique(rows.target_class).tolist()]
    # each worker holds about 230 MB of libraries: the default stays within the 2 GB a run promises
    workers = options.workers or min(os.cpu_count() or 1, DEFAULT_MAX_WORKERS)
    chunks = _chunks(classes, workers)
    workers = min(workers, len(chunks))

    def materialize(chunk):
        return [(c, rows.take(index), malformed) for c, index, malformed in chunk]

    def emit(results):
        for target_class, clustering in results:
            yield target_class, readable_index[where.get(target_class, empty)], clustering

    if workers <= 1:
        for chunk in chunks:
            yield from emit(_cluster_chunk(materialize(chunk), options))
        return
    # spawned, not forked: a fork would copy this process's maps into each worker's memory and
    # pyarrow's threads into a process that only has the one that forked
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending, waiting = set(), iter(chunks)
        while True:
            while len(pending) < IN_FLIGHT_PER_WORKER * workers and (chunk := next(waiting, None)) is not None:
                pending.add(pool.submit(_cluster_chunk, materialize(chunk), options))
            if not pending:
                return
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    results = future.result()
                except BrokenProcessPool as error:
                    raise StrategyError(f"a clustering process died ({_first_line(error)}); out of memory? rerun with "
                                        "fewer workers or a smaller max_exact") from error
                yield from emit(results)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:  # a checkout on sys.path, not installed: say so
            return "not installed"
    return {name: installed(name) for name in ("gradcam-batch", "scikit-learn", "scipy", "numpy", "pyarrow")}


def _write_both(tables: list[tuple[pa.Table, Path]]) -> None:
    """Each table to a temporary beside its target (hidden, ending .tmp, never in cams/), fsync'ed;
    then the renames: a failure leaves the earlier files as they were."""
    temporaries = [target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
                   for _, target in tables]
    target = tables[0][1]
    try:
        for (table, target), temporary in zip(tables, temporaries):
            pq.write_table(table, temporary, row_group_size=1 << 17)
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
        for (_, target), temporary in zip(tables, temporaries):
            os.replace(temporary, target)
    except OSError as error:  # a full disk, a read-only folder: the user's to fix
        raise StrategyError(f"cannot write {target}: {os.strerror(error.errno) if error.errno else error}") from error
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)


def find_strategies(output_dir: str | Path, options: Optional[StrategyOptions] = None) -> list[ClassStrategies]:
    """Cluster each class's rank-0 maps of one layer (see the module) and write beside cams/:
    strategies.parquet, one row per rank-0 map of the layer (sample_id, shard, target_class, layer,
    cluster int32 (-1: left out), embedding_x, embedding_y float32 (null where left out), left_out
    string (why, else null)), and strategies_classes.parquet, one row per class (the ClassStrategies
    fields, the layer, the grid and the options), each atomically. One pass over the part files,
    classes in parallel (options.workers), memory about 4 x grid^2 bytes per map. Returns the
    per-class results by class; a one-line StrategyError where the folder or an option is wrong.
    With workers > 1 the pool's processes are spawned: a script that calls this needs Python's
    usual `if __name__ == "__main__":` guard."""
    options = options or StrategyOptions()
    _require_libraries()
    try:
        source = open_output(output_dir)
    except ReportError as error:
        raise StrategyError(str(error)) from None
    layer = _chosen_layer(source, options)
    rows = _read_rows(source, layer, options.grid)
    if rows is None:
        raise _no_maps(source, layer, options)
    count = len(rows.target_class)
    cluster = np.full(count, -1, np.int32)
    plane = np.full((count, 2), np.nan, np.float32)
    left_out = np.full(count, UNREADABLE, np.int8)
    results = []
    for _, indices, clustering in _clustered(rows, options):
        cluster[indices], plane[indices], left_out[indices] = clustering.labels, clustering.embedding, \
            clustering.left_out
        results.append(clustering.strategies)
    results.sort(key=lambda result: result.target_class)
    order = np.argsort(rows.target_class, kind="stable")
    take = pa.array(order)
    reasons = pa.array(np.array(LEFT_OUT, dtype=object)[left_out[order]], pa.string())
    maps_table = pa.table({
        "sample_id": rows.sample_id.take(take), "shard": rows.shard.take(take),
        "target_class": pa.array(rows.target_class[order], pa.int64()),
        "layer": pa.repeat(pa.scalar(layer, pa.string()), count),
        "cluster": pa.array(cluster[order], pa.int32()),
        "embedding_x": pa.array(plane[order, 0], pa.float32(), mask=np.isnan(plane[order, 0])),
        "embedding_y": pa.array(plane[order, 1], pa.float32(), mask=np.isnan(plane[order, 1])),
        "left_out": reasons,
    }, schema=STRATEGIES_SCHEMA)
    class_columns = {name: [getattr(result, name) for result in results] for name in asdict(results[0])}
    classes_table = pa.table({
        **class_columns, "layer": [layer] * len(results), "grid_height": [rows.grid[0]] * len(results),
        "grid_width": [rows.grid[1]] * len(results),
        **{name: [getattr(options, name)] * len(results) for name in CLASS_OPTIONS},
    }, schema=CLASSES_SCHEMA)
    recorded = json.dumps({"layer": layer, "grid": list(rows.grid), "options": asdict(options),
                           "method": "SpRAy: symmetric kNN graph, normalized Laplacian, eigengap, KMeans",
                           "versions": _versions()}).encode()
    output = Path(source.output_dir)
    _write_both([(maps_table.replace_schema_metadata({METADATA_KEY: recorded}), output / STRATEGIES_NAME),
                 (classes_table.replace_schema_metadata({METADATA_KEY: recorded}), output / CLASSES_NAME)])
    return results

