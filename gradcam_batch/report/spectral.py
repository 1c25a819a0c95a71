"""The method of spectral relevance analysis (SpRAy; Lapuschkin et al. 2019, "Unmasking Clever Hans predictors
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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from gradcam_batch.report.source import ReportError

DENSE_LIMIT = 500
"""Classes up to this many maps get all eigenpairs from LAPACK (milliseconds); above, ARPACK."""
KMEANS_INITS = 10
MAX_CLUSTERS_CEILING = 64
MAX_GRID = 128
PROPAGATE_ROWS = 65536
LEFT_OUT = (None, "all zero", "not finite", "unreadable size", "class too small")
"""strategies.parquet's left_out per code (0: clustered)."""
CLUSTERED, ALL_ZERO, NOT_FINITE, UNREADABLE, TOO_SMALL = range(5)


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
    """Processes clustering classes in parallel; 0: one a core, at most 4 (about 230 MB each); 1: in this process."""
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
