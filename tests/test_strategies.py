"""Spectral relevance analysis per class (gradcam_batch.report.strategies): planted groups are found,
CoRelAy's pipeline agrees, the approximation agrees with the exact result, the output folder's
two files join back to the maps, and bad input is one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("scipy")
from sklearn.metrics import adjusted_rand_score  # noqa: E402

from cli_helpers import run_composed  # noqa: E402
from gradcam_batch.report import strategies  # noqa: E402
from gradcam_batch.report.strategies import (  # noqa: E402
    CLASSES_NAME, STRATEGIES_NAME, StrategyError, StrategyOptions, cluster_maps, find_strategies)

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:  # the benchmark writes the synthetic part files
    sys.path.insert(0, str(BENCHMARKS))

import bench_strategies  # noqa: E402
from bench_strategies import synthetic_maps, write_part  # noqa: E402

KEYS = ["sample_id", "shard", "target_class", "layer"]
STRATEGIES_JOIN = """
select s.layer, s.target_class, s.cluster, count(*) as maps, avg(c.prob) as prob,
       avg(c.border_mass) as border_mass, avg(c.com_y) as com_y, avg(c.com_x) as com_x
from 'gradcam-out/strategies.parquet' s
join 'gradcam-out/cams/*.parquet' c using (sample_id, shard, target_class, layer)
where c.target_rank = 0 and s.cluster >= 0
group by all
order by s.layer, s.target_class, maps;
"""
"""README's query (Strategies): each class's clusters, smallest first, beside the maps' own columns."""


def groups(rng: np.random.Generator, sizes: tuple[int, ...], side: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Maps of len(sizes) planted groups (a jittered Gaussian blob at a different place per group,
    plus uniform noise), shuffled and scaled to sum 1; and the group of each."""
    truth = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    maps = synthetic_maps(truth, side, rng).astype(np.float64)
    return maps / maps.sum(axis=1, keepdims=True), truth


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert text and "\n" not in text and "Traceback" not in text
    return text


# --- the method ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [
    (300, 200),  # two groups, the dense eigensolver (500 maps)
    (600, 300, 60),  # three with a small "shortcut" group, ARPACK (960 maps)
    (400, 150, 150, 40),  # four, the shortcut smallest
])
@pytest.mark.parametrize("seed", [1, 2])
def test_planted_groups_are_found(sizes, seed):
    maps, truth = groups(np.random.default_rng(seed), sizes)
    labels, embedding, found = cluster_maps(maps, StrategyOptions(seed=seed))
    assert found.clusters == len(sizes), found.reason
    assert adjusted_rand_score(truth, labels) >= 0.9
    assert sorted(found.sizes, reverse=True) == found.sizes  # ids by size: the shortcut is the last id
    assert found.sizes[-1] == pytest.approx(min(sizes), abs=3)
    assert found.eigengap == pytest.approx(found.eigenvalues[found.clusters] - found.eigenvalues[found.clusters - 1])
    assert found.eigengap == max(np.diff(found.eigenvalues))
    assert f"{len(sizes)} clusters" in found.reason and not found.approximate
    assert embedding.shape == (len(maps), 2) and np.isfinite(embedding).all()
    # the 2-D embedding separates the groups too: each group's centroid closer to its own maps
    centroids = np.array([embedding[truth == g].mean(axis=0) for g in range(len(sizes))])
    nearest = np.argmin(((embedding[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == truth).mean() >= 0.8


def test_eigenvalues_of_one_group():
    maps, _ = groups(np.random.default_rng(3), (400,))
    labels, _, found = cluster_maps(maps)
    assert found.clusters == len(found.sizes) == labels.max() + 1
    assert found.eigenvalues == sorted(found.eigenvalues) and len(found.eigenvalues) == 9
    assert abs(found.eigenvalues[0]) < 1e-8  # a connected graph's first eigenvalue


def test_same_maps_same_result():
    maps, _ = groups(np.random.default_rng(4), (500, 300, 80))
    first = cluster_maps(maps, StrategyOptions(seed=5), target_class=7)
    again = cluster_maps(maps.copy(), StrategyOptions(seed=5, workers=3), target_class=7)
    np.testing.assert_array_equal(first.labels, again.labels)
    np.testing.assert_array_equal(first.embedding, again.embedding)


@pytest.mark.parametrize("sizes", [(250, 150, 40), (600, 300, 100)])  # the dense solver, then ARPACK
def test_corelay_agrees(sizes):
    pytest.importorskip("corelay")
    from corelay.processor.affinity import SparseKNN
    from corelay.processor.clustering import KMeans
    from corelay.processor.distance import SciPyPDist
    from corelay.processor.embedding import EigenDecomposition
    from corelay.processor.laplacian import SymmetricNormalLaplacian

    maps, truth = groups(np.random.default_rng(6), sizes)
    options = StrategyOptions(neighbors=10, max_clusters=8)
    labels, _, found = cluster_maps(maps, options)
    affinity = SparseKNN(n_neighbors=options.neighbors, symmetric=True)(SciPyPDist(metric="euclidean")(maps))
    normal = SymmetricNormalLaplacian()(affinity)  # CoRelAy's "Laplacian" is D^-1/2 A D^-1/2; 1 - its eigenvalues
    values, _ = EigenDecomposition(n_eigval=options.max_clusters + 1, which="LA", normalize=False)(normal)
    np.testing.assert_allclose(found.eigenvalues, np.sort(values), atol=1e-6)
    _, vectors = EigenDecomposition(n_eigval=found.clusters, which="LA", normalize=True)(normal)
    theirs = KMeans(n_clusters=found.clusters, kwargs={"n_init": 10, "random_state": 0})(vectors)
    assert adjusted_rand_score(theirs, labels) >= 0.9
    assert adjusted_rand_score(truth, theirs) >= 0.9


def test_approximation_agrees_with_the_exact_result():
    maps, truth = groups(np.random.default_rng(7), (1800, 900, 300))
    exact = cluster_maps(maps, StrategyOptions(max_exact=10000))
    approximate = cluster_maps(maps, StrategyOptions(max_exact=1000))
    assert not exact.strategies.approximate and approximate.strategies.approximate
    assert "sample of 1000 of the 3000" in approximate.strategies.reason
    assert approximate.strategies.clusters == exact.strategies.clusters == 3
    assert adjusted_rand_score(exact.labels, approximate.labels) >= 0.9
    assert adjusted_rand_score(truth, approximate.labels) >= 0.9
    assert np.isfinite(approximate.embedding).all() and sum(approximate.strategies.sizes) == 3000


def test_left_out_maps_are_counted():
    maps, truth = groups(np.random.default_rng(8), (60, 40))
    maps[:3] = 0.0
    maps[3, 5] = np.nan
    maps[4, 0] = np.inf
    labels, embedding, found = cluster_maps(maps, malformed=2)
    assert (found.zero_maps, found.nonfinite_maps, found.malformed_maps, found.maps) == (3, 2, 2, 102)
    assert (labels[:5] == -1).all() and np.isnan(embedding[:5]).all() and (labels[5:] >= 0).all()
    assert "3 all-zero and 2 non-finite and 2 unreadable maps left out" in found.reason
    assert sum(found.sizes) == 95 and adjusted_rand_score(truth[5:], labels[5:]) >= 0.9


def test_too_few_maps_are_not_clustered():
    maps, _ = groups(np.random.default_rng(9), (20, 9))
    labels, embedding, found = cluster_maps(maps)
    assert (found.clusters, found.sizes, found.eigengap, found.eigenvalues) == (0, [], 0.0, [])
    assert (labels == -1).all() and np.isnan(embedding).all()
    assert "29 usable maps, fewer than min_maps=30: not clustered" in found.reason


@pytest.mark.parametrize("bad", [dict(neighbors=0), dict(max_clusters=0), dict(max_clusters=1000), dict(min_maps=2),
                                 dict(grid=0), dict(grid=10_000), dict(max_exact=5), dict(workers=-1), dict(seed=-1),
                                 dict(neighbors=2.5), dict(neighbors=True), dict(layer="")])
def test_bad_options_are_one_line(bad):
    with pytest.raises(StrategyError) as error:
        StrategyOptions(**bad)
    assert next(iter(bad)) in one_line(error)


def test_resize_is_torchs_bilinear():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(10)
    for size, grid in [((14, 14), (7, 7)), ((5, 9), (7, 7)), ((7, 7), (16, 16)), ((10, 3), (4, 8))]:
        flat = rng.random((6, size[0] * size[1])).astype(np.float32)
        expected = torch.nn.functional.interpolate(torch.from_numpy(flat.reshape(6, 1, *size)), size=grid,
                                                   mode="bilinear", align_corners=False).reshape(6, -1).numpy()
        np.testing.assert_allclose(strategies._resize(flat, size, grid), expected, atol=1e-6)
    flat = rng.random((2, 100)).astype(np.float32)
    flat[0, 55] = np.nan  # a cell that the 10x10 -> 3x3 sampling may skip: the map stays marked
    resized = strategies._resize(flat, (10, 10), (3, 3))
    assert np.isnan(resized[0]).all() and np.isfinite(resized[1]).all()


# --- the output folder ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("strategies-demo") / "out"
    run_composed("data.demo_images=200", "runtime.progress=false", f"output.dir={out}")
    return out


def _rank0(out: Path, layer: str) -> pa.Table:
    cams = pq.ParquetDataset(out / "cams").read(columns=KEYS + ["target_rank"])
    return cams.filter(pc.and_(pc.equal(cams["target_rank"], 0), pc.equal(cams["layer"], layer))).select(KEYS)


def test_demo_output_end_to_end(demo_output):
    results = find_strategies(demo_output, StrategyOptions(workers=1))
    maps, classes = pq.read_table(demo_output / STRATEGIES_NAME), pq.read_table(demo_output / CLASSES_NAME)
    layer = classes["layer"][0].as_py()
    rank0 = _rank0(demo_output, layer)
    assert maps.num_rows == rank0.num_rows == 200
    assert maps.schema.field("cluster").type == pa.int32() and maps.schema.field("embedding_x").type == pa.float32()
    joined = rank0.join(maps, KEYS, join_type="inner")
    assert joined.num_rows == rank0.num_rows  # every rank-0 map once
    assert maps.group_by(KEYS).aggregate([([], "count_all")])["count_all"].to_pylist() == [1] * maps.num_rows
    counts = dict(zip(*np.unique(rank0["target_class"].to_numpy(), return_counts=True)))
    assert classes["target_class"].to_pylist() == sorted(counts) == [r.target_class for r in results]
    assert classes["maps"].to_pylist() == [int(counts[c]) for c in sorted(counts)]
    for result, row in zip(results, classes.to_pylist()):
        assert row["clusters"] == result.clusters and row["sizes"] == result.sizes and row["reason"] == result.reason
        assert (row["grid_height"], row["grid_width"], row["neighbors"]) == (16, 16, 10)
        of_class = maps.filter(pc.equal(maps["target_class"], result.target_class))
        assert sorted(cluster_counts(of_class["cluster"])) == list(range(result.clusters))
        assert [cluster_counts(of_class["cluster"])[k] for k in range(result.clusters)] == result.sizes
    recorded = json.loads(maps.schema.metadata[strategies.METADATA_KEY])
    assert recorded["layer"] == layer and recorded["options"]["neighbors"] == 10
    assert not [path for path in demo_output.iterdir() if path.name.startswith(".strategies")]  # no temporaries


def cluster_counts(column: pa.ChunkedArray) -> dict:
    values, counts = np.unique(column.to_numpy(), return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


def test_pool_gives_the_same_result(demo_output):
    """Two spawned workers, classes in chunks, against one process: the same file."""
    find_strategies(demo_output, StrategyOptions(workers=1))
    alone = pq.read_table(demo_output / STRATEGIES_NAME)
    find_strategies(demo_output, StrategyOptions(workers=2))
    pooled = pq.read_table(demo_output / STRATEGIES_NAME)
    assert pooled.equals(alone)


def test_readme_query_joins(demo_output):
    duckdb = pytest.importorskip("duckdb")
    find_strategies(demo_output, StrategyOptions(workers=1))
    rows = duckdb.sql(STRATEGIES_JOIN.replace("gradcam-out", str(demo_output))).fetchall()
    assert sum(row[3] for row in rows) == 200
    classes = pq.read_table(demo_output / CLASSES_NAME).to_pylist()
    assert len(rows) == sum(c["clusters"] for c in classes)


def test_a_layer_without_maps_is_one_line(demo_output):
    with pytest.raises(StrategyError) as error:
        find_strategies(demo_output, StrategyOptions(layer="layer9", workers=1))
    text = one_line(error)
    assert "'layer9'" in text and "'features'" in text and "--layer" in text


def test_not_an_output_folder_is_one_line(tmp_path):
    with pytest.raises(StrategyError) as error:
        find_strategies(tmp_path / "missing")
    assert "does not exist" in one_line(error)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StrategyError) as error:
        find_strategies(tmp_path / "empty")
    one_line(error)


def _class_rows(rng, target_class: int, sizes: tuple[int, ...], side: int, start: int):
    truth = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    cams = list(synthetic_maps(truth, side, rng))
    ids = [f"{start + i:06d}" for i in range(len(cams))]
    return ids, np.full(len(cams), target_class), cams, truth


def test_small_classes_sizes_zero_and_nan_maps(tmp_path):
    """One folder: a class of 7x7 and 14x14 maps, a class of a handful, a class with all-zero,
    NaN and unreadable maps, rows of another layer and of rank 1."""
    rng = np.random.default_rng(11)
    out = tmp_path / "out"
    ids0, cls0, cams0, truth0 = _class_rows(rng, 0, (70, 40), 7, 0)
    ids0b, cls0b, cams0b, truth0b = _class_rows(rng, 0, (30, 20), 14, 1000)  # the same groups, 14x14
    ids1, cls1, cams1, _ = _class_rows(rng, 1, (5,), 7, 2000)
    ids2, cls2, cams2, truth2 = _class_rows(rng, 2, (60, 40), 7, 3000)
    cams2[0][:] = 0.0
    cams2[1][:] = 0.0
    cams2[2][10] = np.nan
    cams2[3] = cams2[3][:40]  # cam_height x cam_width says 49
    sizes = [7] * len(cams0) + [14] * len(cams0b) + [7] * (len(cams1) + len(cams2))
    write_part(out, "a", ids0 + ids0b + ids1 + ids2, np.concatenate([cls0, cls0b, cls1, cls2]),
               cams0 + cams0b + cams1 + cams2, np.array(sizes), np.array(sizes))
    # noise that must not be read: another layer, rank 1
    write_part(out, "b", ["x1", "x2"], np.array([0, 2]), [np.ones(49), np.ones(49)], np.array([7, 7]),
               np.array([7, 7]), ranks=np.array([1, 0]), layers=["layer4", "layer3"])
    results = {r.target_class: r for r in find_strategies(out, StrategyOptions(workers=1))}
    maps = pq.read_table(out / STRATEGIES_NAME).to_pandas().set_index("sample_id")
    assert len(maps) == 110 + 50 + 5 + 100 and "x1" not in maps.index and "x2" not in maps.index
    classes = pq.read_table(out / CLASSES_NAME)
    assert (classes["grid_height"][0].as_py(), classes["grid_width"][0].as_py()) == (7, 7)  # the most common
    # 14x14 maps brought to 7x7 fall in their group's cluster
    assert results[0].clusters == 2 and results[0].maps == 160
    assert adjusted_rand_score(np.concatenate([truth0, truth0b]), maps.loc[ids0 + ids0b, "cluster"]) >= 0.9
    # a handful of maps: not clustered, and said why
    assert results[1].clusters == 0 and "5 usable maps, fewer than min_maps=30" in results[1].reason
    assert (maps.loc[ids1, "cluster"] == -1).all() and (maps.loc[ids1, "left_out"] == "class too small").all()
    assert maps.loc[ids1, "embedding_x"].isna().all()
    # zero, NaN and unreadable maps: left out and counted
    found = results[2]
    assert (found.zero_maps, found.nonfinite_maps, found.malformed_maps, found.maps) == (2, 1, 1, 100)
    assert "2 all-zero and 1 non-finite and 1 unreadable maps left out" in found.reason
    assert maps.loc[ids2[:4], "left_out"].tolist() == ["all zero", "all zero", "not finite", "unreadable size"]
    assert (maps.loc[ids2[:4], "cluster"] == -1).all() and (maps.loc[ids2[4:], "cluster"] >= 0).all()
    assert found.clusters == 2 and adjusted_rand_score(truth2[4:], maps.loc[ids2[4:], "cluster"]) >= 0.9
    # a grid given: every map resized to it
    find_strategies(out, StrategyOptions(workers=1, grid=14))
    classes = pq.read_table(out / CLASSES_NAME)
    assert (classes["grid_height"][0].as_py(), classes["grid_width"][0].as_py()) == (14, 14)
    assert pq.read_table(out / CLASSES_NAME)["clusters"].to_pylist() == [2, 0, 2]


def test_a_folder_mid_run_reads_complete_part_files_only(tmp_path):
    rng = np.random.default_rng(12)
    out = tmp_path / "out"
    ids, classes, cams, _ = _class_rows(rng, 0, (40, 30), 7, 0)
    write_part(out, "done", ids, classes, cams, np.full(70, 7), np.full(70, 7))
    # a unit still being written: its temporary lies under .tmp/ (and, as older versions kept them, hidden in cams/)
    (out / ".tmp").mkdir()
    pending = write_part(tmp_path / "elsewhere", "pending", ["p1", "p2"], np.array([5, 5]),
                         [np.ones(49), np.ones(49)], np.array([7, 7]), np.array([7, 7]))
    (out / ".tmp" / "cams.part-pending.parquet.0123456789ab.tmp").write_bytes(pending.read_bytes())
    (out / "cams" / ".part-pending.parquet.tmp").write_bytes(pending.read_bytes()[:100])
    results = find_strategies(out, StrategyOptions(workers=1))
    assert [r.target_class for r in results] == [0]
    assert pq.read_table(out / STRATEGIES_NAME)["sample_id"].to_pylist() == sorted(ids)


def test_writing_is_atomic(tmp_path, monkeypatch):
    rng = np.random.default_rng(13)
    out = tmp_path / "out"
    ids, classes, cams, _ = _class_rows(rng, 0, (40, 30), 7, 0)
    write_part(out, "a", ids, classes, cams, np.full(70, 7), np.full(70, 7))
    find_strategies(out, StrategyOptions(workers=1))
    before = [(out / name).read_bytes() for name in (STRATEGIES_NAME, CLASSES_NAME)]
    written = []

    def full_disk(table, where, **kwargs):
        if written:
            raise OSError(28, "No space left on device")
        written.append(where)
        return real(table, where, **kwargs)

    real = pq.write_table
    monkeypatch.setattr(strategies.pq, "write_table", full_disk)
    with pytest.raises(StrategyError) as error:
        find_strategies(out, StrategyOptions(workers=1, seed=3))
    assert "No space left on device" in one_line(error) and CLASSES_NAME in str(error.value)
    assert [(out / name).read_bytes() for name in (STRATEGIES_NAME, CLASSES_NAME)] == before
    assert sorted(path.name for path in out.iterdir()) == sorted(["cams", STRATEGIES_NAME, CLASSES_NAME])


# --- the benchmark, at a small size -----------------------------------------------------------------------


def test_benchmark_small(tmp_path, capsys):
    table = tmp_path / "bench.md"
    assert bench_strategies.main(["--maps", "3000", "--classes", "6", "--shards", "2", "--workers", "1",
                                  "--data-dir", str(tmp_path / "data"), "--out", str(table)]) == 0
    row = next(line for line in table.read_text().splitlines() if line.startswith("| 3,000 "))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert len(cells) == 13 and cells[1] == "7x7" and cells[2] == "6"
    assert float(cells[5]) > 0 and float(cells[7]) > 50  # wall seconds; the process's peak MB
    assert float(cells[11]) >= 0.9 and cells[12] == "6 of 6"  # planted groups found, k right in every class
    assert "usable cores" in table.read_text() and "scikit-learn" in table.read_text()


def test_the_readme_shows_the_query_this_file_runs():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert STRATEGIES_JOIN.strip() in readme
    for name in ("`embedding_x`, `embedding_y`", "`left_out`", "`eigenvalues`", "`eigengap`", "`approximate`"):
        assert name in readme, name
