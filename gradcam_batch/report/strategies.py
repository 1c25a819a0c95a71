"""Spectral relevance analysis (SpRAy; Lapuschkin et al. 2019, "Unmasking Clever Hans predictors
and assessing what machines really learn") per class: each class's rank-0 maps of one layer are
clustered, so that a small tight cluster of maps alike and unlike the rest of their class (a
watermark, a frame, a background learned instead of the object) stands out.

The method is CoRelAy's SpectralClustering pipeline, its parameters meaning the same, per class:
each map brought to a common grid (bilinear with half-pixel centres, torch's interpolate with
align_corners=False, by scipy.ndimage.zoom) and scaled to sum 1 (all-zero maps and maps with NaN
or infinite values are left out, cluster -1, and counted); a k-nearest-neighbour graph on
Euclidean distances (kneighbors_graph, connectivity, self excluded) made symmetric as
(A + A^T) / 2 (SparseKNN); the normalized Laplacian I - D^-1/2 A D^-1/2 (csgraph.laplacian,
normed) and its smallest eigenvalues (scipy.linalg.eigh up to DENSE_LIMIT maps, else eigsh on
D^-1/2 A D^-1/2, as EigenDecomposition does); k where the largest gap among the first
max_clusters + 1 eigenvalues lies (k = 1: no separate strategies); KMeans (n_init=10, seeded) on
the first k eigenvectors with rows scaled to unit length (Ng, Jordan and Weiss), cluster ids by
size, 0 the largest. The 2-D embedding for plotting is the 2nd and 3rd eigenvectors, each times
sqrt(n) (values do not shrink with the class) with its largest entry positive; t-SNE, the paper's
picture, costs seconds a class and is left to the reader of strategies.parquet.
Where CoRelAy's defaults differ: EigenDecomposition asks ARPACK for which='LM' (which may return
eigenvalues near -1 of D^-1/2 A D^-1/2) and scales rows over all 32 eigenvectors, and its KMeans
takes k as given; here the smallest of the Laplacian are taken (which='LA'), k is the eigengap's,
and rows are scaled over the k eigenvectors KMeans sees. CoRelAy builds the full n x n distance
matrix; a neighbour search gives the same graph.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gradcam_batch.report.source import (ReportError, Source, _batches, _column, _first_line, _layer_mask, _numpy,
                                         open_output, run_layer)

__all__ = ["CLASSES_NAME", "CLASSES_SCHEMA", "STRATEGIES_NAME", "STRATEGIES_SCHEMA", "ClassStrategies", "Clustering",
           "StrategyError", "StrategyOptions", "cluster_maps", "find_strategies"]

STRATEGIES_NAME = "strategies.parquet"
CLASSES_NAME = "strategies_classes.parquet"
METADATA_KEY = b"gradcam_batch_strategies"
READ_BATCH_ROWS = 8192
"""Rows per record batch of the pass: 1.6 MB of 7x7 maps, 100 MB of 56x56 ones."""
DENSE_LIMIT = 500
"""Classes up to this many maps get all eigenpairs from LAPACK (milliseconds); above, ARPACK."""
KMEANS_INITS = 10
MAX_CLUSTERS_CEILING = 64
MAX_GRID = 128
IN_FLIGHT_PER_WORKER = 2
"""Chunks handed to the pool per worker at a time: each is a copy of its classes' maps."""
CHUNKS_PER_WORKER = 8
PROPAGATE_ROWS = 65536
LEFT_OUT = (None, "all zero", "not finite", "unreadable size", "class too small")
"""strategies.parquet's left_out per code (0: clustered)."""
CLUSTERED, ALL_ZERO, NOT_FINITE, UNREADABLE, TOO_SMALL = range(5)
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


class StrategyError(ReportError):
    """A problem the user can fix (an option, a folder without maps of the layer): one line, exit 2."""


def _whole(value, name: str, low: int, high: Optional[int], why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or \
            (high is not None and value > high):
        span = f"{low} to {high}" if high is not None else f"{low} or more"
        raise StrategyError(f"{name}={value!r}: give a whole number {span} ({why})")


@dataclass
class StrategyOptions:
    layer: Optional[str] = None
    """The layer whose maps are clustered; None: the one the run summary speaks of
    (summary.default_layer of the manifest), as the report does."""
    neighbors: int = 10
    """k of the symmetric k-nearest-neighbour graph (CoRelAy's SparseKNN n_neighbors)."""
    max_clusters: int = 8
    """The most clusters the eigengap may choose: the gaps among the first max_clusters + 1 eigenvalues."""
    min_maps: int = 30
    """Classes with fewer usable rank-0 maps are not clustered (cluster -1)."""
    grid: Optional[int] = None
    """Maps are resized to grid x grid; None: the layer's most common map size (height x width)."""
    max_exact: int = 10000
    """Classes with more usable maps are clustered on a seeded sample of this many (see the module)."""
    workers: int = 0
    """Processes clustering classes in parallel; 0: os.cpu_count(); 1: in this process."""
    seed: int = 0
    """Seeds the sample, ARPACK's start vector and KMeans, per class: results do not depend on workers."""

    def __post_init__(self):
        if self.layer is not None and (not isinstance(self.layer, str) or not self.layer):
            raise StrategyError(f"layer={self.layer!r}: give a layer name of the output, or None for the run's")
        _whole(self.neighbors, "neighbors", 1, None, "the neighbours each map is linked to")
        _whole(self.max_clusters, "max_clusters", 1, MAX_CLUSTERS_CEILING, "the most clusters per class")
        _whole(self.min_maps, "min_maps", 3, None, "the 2-D embedding needs 3 eigenvectors")
        if self.grid is not None:
            _whole(self.grid, "grid", 1, MAX_GRID, "each map is held as grid x grid floats")
        _whole(self.max_exact, "max_exact", max(self.min_maps, 10), None, "at least min_maps")
        _whole(self.workers, "workers", 0, None, "0 for one per CPU core")
        _whole(self.seed, "seed", 0, None, "a non-negative integer")


@dataclass
class ClassStrategies:
    target_class: int
    maps: int
    """Rank-0 maps of the class in the layer, those left out included."""
    clusters: int
    """k chosen (0 when not clustered)."""
    eigenvalues: list[float]
    """The smallest eigenvalues of the normalized Laplacian (the first max_clusters + 1), ascending."""
    eigengap: float
    """The gap that chose k (0.0 when not clustered)."""
    reason: str
    """Why this k, or why not clustered, and what was left out (one sentence)."""
    sizes: list[int]
    """Maps per cluster, cluster ids 0..k-1 (0 the largest)."""
    approximate: bool
    """Clustered on a sample of max_exact maps, the rest by their nearest sampled neighbours."""
    zero_maps: int = 0
    """All-zero maps (no positive evidence), left out with cluster -1."""
    nonfinite_maps: int = 0
    """Maps holding NaN or infinite values, left out with cluster -1."""
    malformed_maps: int = 0
    """Rows whose cam does not hold cam_height x cam_width values, left out with cluster -1."""


@dataclass
class Clustering:
    """cluster_maps' result; unpacks as (labels, embedding, strategies)."""
    labels: np.ndarray
    """(n,) int32 cluster per map, -1 for maps left out (or all, for a class not clustered)."""
    embedding: np.ndarray
    """(n, 2) float32: the 2nd and 3rd eigenvectors; NaN where the label is -1."""
    strategies: ClassStrategies
    left_out: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    """(n,) int8: why a map has cluster -1, a LEFT_OUT code (0: clustered)."""

    def __iter__(self) -> Iterator:
        return iter((self.labels, self.embedding, self.strategies))


def _require_libraries() -> None:
    """scikit-learn and SciPy present, or a one-line StrategyError. Looked up, not imported: the
    process that reads the part files and hands classes to the pool never needs them itself."""
    from importlib.util import find_spec

    missing = [name for name, module in (("scikit-learn", "sklearn"), ("SciPy", "scipy")) if find_spec(module) is None]
    if missing:
        raise StrategyError(f"finding strategies needs {' and '.join(missing)}: "
                            "pip install 'gradcam-batch[strategies]'")


def _one_thread():
    """A context with one BLAS and one OpenMP thread. The libraries are imported first: threadpoolctl
    limits only those already loaded, and scikit-learn loads its OpenMP runtime on import."""
    import scipy.linalg  # noqa: F401
    import scipy.sparse.linalg  # noqa: F401
    import sklearn.cluster  # noqa: F401
    import sklearn.neighbors  # noqa: F401
    from threadpoolctl import threadpool_limits  # scikit-learn's own dependency

    return threadpool_limits(limits=1)


def _ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def _left_out_clause(zero: int, nonfinite: int, malformed: int) -> str:
    parts = [f"{count} {what}" for count, what in ((zero, "all-zero"), (nonfinite, "non-finite"),
                                                    (malformed, "unreadable")) if count]
    return f"; {' and '.join(parts)} maps left out (cluster -1)" if parts else ""


def _smallest_eigenpairs(laplacian, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The `count` smallest eigenvalues of the normalized Laplacian, ascending, and their vectors."""
    size = laplacian.shape[0]
    if size <= DENSE_LIMIT:
        from scipy.linalg import eigh
        return eigh(laplacian.toarray(), subset_by_index=[0, count - 1])
    import scipy.sparse
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    # The smallest of L are the largest of I - L: the end of the spectrum ARPACK converges on,
    # and what CoRelAy's EigenDecomposition decomposes. A seeded start vector: ARPACK's own is
    # random per call.
    affinity = (scipy.sparse.identity(size, format="csr") - laplacian).tocsr()
    start = rng.uniform(0.5, 1.5, size)
    try:
        values, vectors = eigsh(affinity, k=count, which="LA", v0=start)
    except ArpackNoConvergence:  # close eigenvalues: a wider Krylov space and more restarts
        values, vectors = eigsh(affinity, k=count, which="LA", v0=start, ncv=min(size - 1, max(4 * count + 1, 64)),
                                maxiter=100 * size)
    order = np.argsort(1.0 - values, kind="stable")
    return (1.0 - values)[order], vectors[:, order]


def _spectral(data: np.ndarray, options: StrategyOptions, rng: np.random.Generator):
    """(labels by size, 2-D embedding, eigenvalues looked at, k, gap) of maps already scaled to sum 1."""
    from scipy.sparse import csgraph
    from sklearn.cluster import KMeans
    from sklearn.neighbors import kneighbors_graph

    size = len(data)
    graph = kneighbors_graph(data, min(options.neighbors, size - 1), mode="connectivity", include_self=False)
    graph = (graph + graph.T) / 2.0  # CoRelAy's SparseKNN(symmetric=True): one-way links weigh 1/2
    laplacian = csgraph.laplacian(graph, normed=True)
    looked_at = min(options.max_clusters + 1, size)
    values, vectors = _smallest_eigenpairs(laplacian, min(max(looked_at, 3), size), rng)
    gaps = np.diff(values[:looked_at])
    clusters = int(np.argmax(gaps)) + 1  # ties: the fewest clusters
    if clusters == 1:
        labels = np.zeros(size, np.int64)
    else:
        rows = vectors[:, :clusters]
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        rows = rows / np.where(norms > 0, norms, 1.0)
        labels = KMeans(n_clusters=clusters, n_init=KMEANS_INITS,
                        random_state=int(rng.integers(2**31 - 1))).fit_predict(rows)
    # cluster ids by size, 0 the largest (ties by first appearance), so that ids say something
    sizes = np.bincount(labels, minlength=clusters)
    first = np.full(clusters, size)
    np.minimum.at(first, labels, np.arange(size))
    rename = np.empty(clusters, np.int64)
    rename[np.lexsort((first, -sizes))] = np.arange(clusters)
    plane = vectors[:, 1:3] * np.sqrt(size)
    plane *= np.where(plane[np.argmax(np.abs(plane), axis=0), [0, 1]] < 0, -1.0, 1.0)
    return rename[labels], plane, values[:looked_at], clusters, float(gaps[clusters - 1])


def _propagate(data: np.ndarray, sample: np.ndarray, labels: np.ndarray, plane: np.ndarray,
               neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and embedding of every map from the sampled maps': KNeighborsClassifier's vote
    (uniform weights, ties to the lowest id: the larger cluster) and the neighbours' mean."""
    from scipy.stats import mode
    from sklearn.neighbors import NearestNeighbors

    all_labels = np.empty(len(data), np.int64)
    all_plane = np.empty((len(data), 2))
    all_labels[sample], all_plane[sample] = labels, plane
    rest = np.ones(len(data), bool)
    rest[sample] = False
    rest = np.nonzero(rest)[0]
    index = NearestNeighbors(n_neighbors=min(neighbors, len(sample))).fit(data[sample])
    for start in range(0, len(rest), PROPAGATE_ROWS):
        part = rest[start:start + PROPAGATE_ROWS]
        nearest = index.kneighbors(data[part], return_distance=False)
        all_labels[part] = mode(labels[nearest], axis=1, keepdims=False).mode
        all_plane[part] = plane[nearest].mean(axis=1)
    return all_labels, all_plane


def cluster_maps(maps: np.ndarray, options: Optional[StrategyOptions] = None, *, target_class: int = 0,
                 malformed: int = 0) -> Clustering:
    """Cluster one class's maps: `maps` (n, d) on the common grid, each scaled to sum 1 (scaled
    again here, which changes nothing for such maps). Maps with NaN or infinite values and maps
    with no positive mass are left out (label -1) and counted; so is the whole class when fewer
    than options.min_maps maps remain. `target_class` seeds the class's randomness and names the
    result; `malformed` counts rows the caller could not read, for the result's counts and reason.
    Returns a Clustering: labels (n,) int32, embedding (n, 2) float32 and the ClassStrategies;
    `labels, embedding, strategies = cluster_maps(...)` unpacks it. Runs with one BLAS/OpenMP
    thread: the parallelism is across classes, and KMeans's OpenMP threads on a busy machine
    made it 30 times slower (1.4 s against 0.05 s for 540 maps on 2 shared cores)."""
    _require_libraries()
    with _one_thread():
        return _cluster(maps, options or StrategyOptions(), target_class, malformed)


def _cluster(maps: np.ndarray, options: StrategyOptions, target_class: int, malformed: int) -> Clustering:
    maps = np.asarray(maps)
    if maps.ndim != 2 or not maps.shape[1]:
        raise StrategyError(f"maps of shape {maps.shape}: give one row of height*width values per map")
    count = len(maps)
    finite = np.isfinite(maps).all(axis=1)
    totals = np.where(finite, maps.sum(axis=1, dtype=np.float64, where=finite[:, None]), 0.0)
    usable = finite & (totals > 0)
    left_out = np.where(usable, CLUSTERED, np.where(finite, ALL_ZERO, NOT_FINITE)).astype(np.int8)
    zero, nonfinite = int((left_out == ALL_ZERO).sum()), int((left_out == NOT_FINITE).sum())
    labels = np.full(count, -1, np.int32)
    embedding = np.full((count, 2), np.nan, np.float32)
    result = ClassStrategies(int(target_class), count + malformed, 0, [], 0.0, "", [], False, zero, nonfinite,
                             malformed)
    dropped = _left_out_clause(zero, nonfinite, malformed)
    usable_count = int(usable.sum())
    if usable_count < options.min_maps:
        result.reason = f"{usable_count} usable maps, fewer than min_maps={options.min_maps}: not clustered{dropped}"
        left_out[usable] = TOO_SMALL
        return Clustering(labels, embedding, result, left_out)
    data = maps[usable].astype(np.float64) / totals[usable, None]
    rng = np.random.default_rng([options.seed, int(target_class) % 2**63])
    if usable_count > options.max_exact:
        sample = np.sort(rng.choice(usable_count, options.max_exact, replace=False))
        sampled_labels, sampled_plane, values, clusters, gap = _spectral(data[sample], options, rng)
        found, plane = _propagate(data, sample, sampled_labels, sampled_plane, options.neighbors)
        how = (f"; clustered on a seeded sample of {options.max_exact} of the {usable_count} usable maps, each other "
               f"map taking the majority cluster of its {min(options.neighbors, options.max_exact)} nearest sampled "
               "maps")
    else:
        found, plane, values, clusters, gap = _spectral(data, options, rng)
        how = ""
    labels[usable], embedding[usable] = found, plane
    result.clusters, result.eigenvalues, result.eigengap = clusters, [float(v) for v in values], gap
    result.sizes = np.bincount(found, minlength=clusters).tolist()
    result.approximate = bool(how)
    what = "1 cluster (no separate strategies)" if clusters == 1 else f"{clusters} clusters"
    result.reason = (f"{what}: the largest gap among the first {len(values)} eigenvalues of the normalized Laplacian "
                     f"({gap:.3g}) follows the {_ordinal(clusters)}{how}{dropped}")
    return Clustering(labels, embedding, result, left_out)


# --- the output folder: one pass, classes in parallel, two files ------------------------------------


def _resize(flat: np.ndarray, size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """Maps (b, h*w) to (b, grid), bilinear with half-pixel centres: torch's interpolate(mode="bilinear",
    align_corners=False), the way the run resizes its maps. A map with a NaN anywhere stays NaN
    everywhere (interpolation could skip the cell that held it)."""
    if size == grid:
        return flat
    from scipy.ndimage import zoom

    stack = flat.reshape(-1, *size)
    resized = zoom(stack, (1, grid[0] / size[0], grid[1] / size[1]), order=1, grid_mode=True, mode="nearest")
    resized = resized.reshape(len(flat), -1)
    resized[~np.isfinite(flat).all(axis=1)] = np.nan
    return resized


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
                height, _ = _numpy(_column(batch, "cam_height", pa.int32()), 0, np.int64)
                width, _ = _numpy(_column(batch, "cam_width", pa.int32()), 0, np.int64)
                cams = batch.column("cam")
                length, _ = _numpy(pc.list_value_length(cams), -1, np.int64)
                whole = (height > 0) & (width > 0) & (length == height * width)
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
    workers = options.workers or os.cpu_count() or 1
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

