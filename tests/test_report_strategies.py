"""The report's Strategies section (issue 19): spectral relevance analysis per class, found by
gradcam-batch-report by default. A synthetic output with a planted small tight group of maps in
one class (they peak in the bottom-left corner; the rest of every class is spread out) must come
out with that class ranked first and the group as its own tight cluster; the scatter, the mean
maps, the tightness, the exemplars and the differences table are checked against numpy/pandas
computations from the cams columns."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gradcam_batch import report
from gradcam_batch.report.pictures import MEAN_SIZE, data_uri, heatmap
from gradcam_batch.report.strategies import StrategyOptions
from gradcam_batch.report.strategies_page import EXEMPLARS, MAX_TOP, PALETTE, TIGHT, TIGHT_RELATIVE
from gradcam_batch.statistics import map_statistics
from gradcam_batch.writer import CAM_SCHEMA
from sample_data import make_imagefolder
from test_report import (Page, browse, check_self_contained, chromium, decode_data_uri, images_loaded,  # noqa: F401
                         imagefolder_listing, one_line_error, run_report)

REPO = Path(__file__).resolve().parents[1]
PROG = "gradcam-batch-report"
LAYER, SIDE = "layer4", 8
PLANTED = 2
"""The class whose maps hold the planted group: PLANTED_COUNT images of folder c3, predicted as 2
(mispredicted), whose maps peak in the bottom-left corner."""
PLANTED_COUNT = 12
FOLDERS = (60, 60, 48, 72, 10)
"""Images per class folder; class 4 has too few maps to cluster (min_maps 30)."""
STATISTICS = ["border_mass", "com_y", "com_x", "entropy"]
STRATEGY_FILES = ("strategies.parquet", "strategies_classes.parquet")


# --- a synthetic output with a planted tight group ------------------------------------------------------


def blob(rng: np.random.Generator, cy: float, cx: float, width: float, noise: float, side: int = SIDE) -> np.ndarray:
    """A min-max normalized Gaussian blob at (cy, cx) cells with uniform noise, (side * side,) float32."""
    ys, xs = np.mgrid[0:side, 0:side] + 0.5
    values = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * width ** 2)) + noise * rng.random((side, side))
    return ((values - values.min()) / (values.max() - values.min())).astype(np.float32).ravel()


def write_planted(out: Path, root: Path) -> list[str]:
    """The output folder of a run over the ImageFolder at `root` (FOLDERS), in the writer's schema:
    rank-0 and rank-1 rows of LAYER (8x8) and of layer3 (4x4), statistics computed as the run
    computes them. Returns the planted sample ids."""
    samples = make_imagefolder(root, per_class=FOLDERS)
    rng = np.random.default_rng(3)
    planted = [path for path, label in samples if label == 3][:PLANTED_COUNT]
    rows = []
    for path, label in samples:
        is_planted = path in planted
        target = PLANTED if is_planted else label
        for layer, side in ((LAYER, SIDE), ("layer3", 4)):
            if is_planted and layer == LAYER:
                cam = blob(rng, side - 1 + rng.normal(0, 0.1), 1 + rng.normal(0, 0.1), 0.8, 0.05, side)
            else:
                cam = blob(rng, rng.uniform(1.5, side - 1.5), rng.uniform(1.5, side - 1.5), side / 5, 0.3, side)
            other = blob(rng, rng.uniform(0, side), rng.uniform(0, side), 1.0, 0.5, side)
            for rank, (target_class, values) in enumerate(((target, cam), ((target + 1) % len(FOLDERS), other))):
                statistics = {name: float(value[0, 0]) for name, value in map_statistics(
                    torch.from_numpy(values.reshape(1, 1, side, side))).items()}
                rows.append(dict(sample_id=path, shard="imagefolder-00000", label=label, target_class=target_class,
                                 target_rank=rank, score=1.0, prob=round(float(rng.uniform(0.5, 1.0)), 3),
                                 cam=values.tolist(), cam_height=side, cam_width=side, cam_mean=float(values.mean()),
                                 peak_y=0, peak_x=0, layer=layer, pred_class=target, cam_max_raw=1.0, **statistics))
    (out / "cams").mkdir(parents=True)
    (out / "errors").mkdir()
    schema = CAM_SCHEMA.with_metadata({b"gradcam_batch": json.dumps({"model": "planted-net"}).encode()})
    shard, units = "imagefolder-00000", []
    for chunk in np.array_split(np.arange(len(samples)), 3):
        names = {samples[i][0] for i in chunk}
        unit = f"{shard}@{chunk[0]:08d}-{chunk[-1] + 1:08d}"
        units.append(unit)
        pq.write_table(pa.Table.from_pylist([row for row in rows if row["sample_id"] in names], schema=schema),
                       out / "cams" / f"part-{unit}.parquet", row_group_size=50)
    data = {"format": "imagefolder", "root": str(root), "resize": None, "crop": None, "shard_size": 1000}
    manifest = {"status": "complete", "model": "planted-net", "method": "gradcam", "target_layer": f"layer3,{LAYER}",
                "config": {"data": data, "model": {"source": "torchvision", "name": "resnet18"},
                           "cam": {"method": "gradcam", "targets": "topk", "topk": 2, "normalize": True}},
                "preprocessing": {"resize": 32, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3,
                                  "interpolation": "bilinear"},
                "listing": {"shards": imagefolder_listing(root), "units": {unit: {"shard": shard} for unit in units}}}
    (out / "_manifest.json").write_text(json.dumps(manifest))
    return planted


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(output folder, planted ids) of the synthetic run, untouched (copy it to write into it)."""
    base = tmp_path_factory.mktemp("planted")
    out = base / "out"
    ids = write_planted(out, base / "data")
    return out, ids


@pytest.fixture(scope="module")
def reported(planted, tmp_path_factory):
    """The report of a copy of the planted output, by the command line's defaults:
    (output folder, page text, Page, stdout, stderr)."""
    out = tmp_path_factory.mktemp("reported") / "out"
    shutil.copytree(planted[0], out)
    capture = tmp_path_factory.mktemp("capture")
    with open(capture / "out", "w") as stdout, open(capture / "err", "w") as stderr:
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = stdout, stderr
        try:
            assert report.main([str(out)]) == 0
        finally:
            sys.stdout, sys.stderr = saved
    text = (out / "report.html").read_text()
    return out, text, Page(text), (capture / "out").read_text(), (capture / "err").read_text()


def joined(out: Path) -> pd.DataFrame:
    """strategies.parquet joined with the rank-0 rows of the cams (sample_id, shard, target_class, layer)."""
    strategies = pq.read_table(out / "strategies.parquet").to_pandas()
    cams = pq.read_table(out / "cams").to_pandas()
    cams = cams[cams.target_rank == 0]
    return strategies.merge(cams, on=["sample_id", "shard", "target_class", "layer"], how="left",
                            validate="one_to_one")


def section_html(text: str, section: str) -> str:
    start = text.index(f'<section id="{section}"')
    return text[start:text.index("</section>", start)]


def cluster_columns(text: str, section: str) -> dict[int, str]:
    """cluster -> the HTML of its column (header, mean map, exemplar cards) in a class's section."""
    parts = section_html(text, section).split('<div class="cluster" data-cluster="')[1:]
    return {int(part[:part.index('"')]): part for part in parts}


def number(cell: str) -> float:
    return float(re.match(r"[-+]?\d+(\.\d+)?", cell.replace(",", "")).group())


def unit_maps(frame: pd.DataFrame) -> np.ndarray:
    maps = np.stack(frame.cam.to_numpy()).astype(np.float64)
    return maps / maps.sum(axis=1, keepdims=True)


# --- the section ------------------------------------------------------------------------------------------


def test_the_planted_class_ranks_first_with_the_group_as_a_tight_cluster(reported, planted):
    out, text, page, stdout, stderr = reported
    assert "Strategies" in page.headings and '<a href="#strategies">Strategies</a>' in text
    check_self_contained(text, page)
    assert all((out / name).is_file() for name in STRATEGY_FILES)
    assert f"ranked first: class {PLANTED}" in stdout and "strategies.parquet" in stdout
    assert not [line for line in stderr.splitlines() if "strateg" in line]
    ranking = page.table("strategies")
    assert number(ranking[0][1]) == PLANTED, ranking
    assert [number(row[0]) for row in ranking] == list(range(1, len(ranking) + 1))
    assert {number(row[1]) for row in ranking} == {0, 1, 2, 3}  # class 4 has too few maps
    # the planted group is its own cluster, the class's smallest tight one
    frame = joined(out)
    mine = frame[(frame.target_class == PLANTED) & (frame.layer == LAYER)]
    groups = {cluster: set(rows.sample_id) for cluster, rows in mine[mine.cluster >= 0].groupby("cluster")}
    group = next(cluster for cluster, ids in groups.items() if ids == set(planted[1]))
    assert f"(cluster {group}, tightness" in ranking[0][5]
    assert number(ranking[0][5]) == pytest.approx(PLANTED_COUNT / len(mine[mine.cluster >= 0]), abs=5e-4)
    # every other class has no tight cluster
    assert all(row[5] == "-" for row in ranking[1:]), ranking
    # its mean map peaks in the bottom-left corner
    mean = np.stack(mine[mine.cluster == group].cam.to_numpy()).mean(axis=0).reshape(SIDE, SIDE)
    peak_y, peak_x = np.unravel_index(np.argmax(mean), mean.shape)
    assert peak_y >= SIDE - 2 and peak_x <= 1
    # classes not clustered: listed with their reason
    unclustered = page.text("strategies-unclustered")
    assert "4 (c4): 10 usable maps, fewer than min_maps=30: not clustered" in unclustered
    # the options and the cost
    lead = page.text("strategies")
    assert "neighbors 10, max_clusters 8, min_maps 30, grid 8x8" in lead and re.search(r"Cost: \d+\.\d s", lead)
    assert f"tight</em> at a tightness of {TIGHT:g} or less" in text


def test_the_scatter_has_a_point_per_clustered_map_coloured_by_cluster(reported):
    out, text, page, *_ = reported
    frame = pq.read_table(out / "strategies.parquet").to_pandas()
    for row in page.table("strategies")[:4]:
        target = int(number(row[1]))
        section = section_html(text, f"strategies-class-{target}")
        svgs = re.findall(r"<svg\b.*?</svg>", section, re.S)
        assert len(svgs) == 1
        points = re.findall(r'<circle cx="([-\d.]+)" cy="([-\d.]+)" r="[\d.]+" fill="(#[0-9a-f]{6})" '
                            r'data-cluster="(\d+)"/>', svgs[0])
        mine = frame[(frame.target_class == target) & (frame.cluster >= 0)]
        assert len(points) == len(mine)
        assert all(fill == PALETTE[int(cluster) % len(PALETTE)] for *_, fill, cluster in points)
        drawn = pd.DataFrame(points, columns=["x", "y", "fill", "cluster"]).astype({"x": float, "y": float,
                                                                                     "cluster": int})
        assert drawn.cluster.value_counts().sort_index().tolist() == mine.cluster.value_counts().sort_index().tolist()
        # the embedding drawn to scale: x to the right, y upwards
        for cluster, rows in mine.groupby("cluster"):
            points_x = np.sort(drawn[drawn.cluster == cluster].x.to_numpy())
            points_y = np.sort(drawn[drawn.cluster == cluster].y.to_numpy())
            expected_x, expected_y = np.sort(rows.embedding_x.to_numpy()), np.sort(rows.embedding_y.to_numpy())
            span_x = (frame[frame.target_class == target].embedding_x.max()
                      - frame[frame.target_class == target].embedding_x.min())
            scale = 300 / span_x
            assert np.allclose(np.diff(points_x), np.diff(expected_x) * scale, atol=0.11)
            span_y = (frame[frame.target_class == target].embedding_y.max()
                      - frame[frame.target_class == target].embedding_y.min())
            assert np.allclose(np.diff(points_y)[::-1], np.diff(expected_y) * 240 / span_y, atol=0.11)
        assert "<script" not in section


def test_mean_maps_tightness_and_differences_equal_a_pandas_computation(reported):
    out, text, page, *_ = reported
    frame = joined(out)
    frame = frame[(frame.layer == LAYER) & (frame.cluster >= 0)]
    assert frame.cam.notna().all()
    for row in page.table("strategies")[:4]:
        target = int(number(row[1]))
        mine = frame[frame.target_class == target]
        units = unit_maps(mine)
        spread = np.sqrt(((units - units.mean(axis=0)) ** 2).sum(axis=1).mean())
        means = mine.groupby("cluster")[STATISTICS].mean()
        table = page.table(f"strategies-class-{target}")
        assert [int(number(cells[0])) for cells in table] == sorted(mine.cluster.unique())
        main = means.loc[0]
        columns = cluster_columns(text, f"strategies-class-{target}")
        tightness = {}
        for cluster, members in mine.groupby("cluster"):
            cluster_units = unit_maps(members)
            within = np.sqrt(((cluster_units - cluster_units.mean(axis=0)) ** 2).sum(axis=1).mean())
            tightness[cluster] = within / spread
        median = np.median(list(tightness.values()))
        for cells in table:
            cluster = int(number(cells[0]))
            members = mine[mine.cluster == cluster]
            assert number(cells[1]) == len(members)
            assert number(cells[2]) == pytest.approx(len(members) / len(mine), abs=5e-4)
            assert number(cells[3]) == pytest.approx(tightness[cluster], abs=5e-4)
            tight = tightness[cluster] <= TIGHT and tightness[cluster] <= TIGHT_RELATIVE * median
            assert ("tight" in cells[3]) == tight
            values = {name: cells[4 + index + (index >= 3)] for index, name in enumerate(STATISTICS)}
            for name, cell in values.items():
                assert number(cell) == pytest.approx(means.loc[cluster, name], abs=5e-4), (target, cluster, name)
                difference = re.search(r"\(([-+]\d+\.\d+)\)", cell)
                if cluster == 0:
                    assert difference is None
                else:
                    assert float(difference.group(1)) == pytest.approx(means.loc[cluster, name] - main[name],
                                                                       abs=5e-4)
            shift = cells[7]
            if cluster:
                assert number(shift) == pytest.approx(np.hypot(means.loc[cluster, "com_y"] - main.com_y,
                                                               means.loc[cluster, "com_x"] - main.com_x), abs=5e-4)
            # the mean map: the cluster's maps as stored, averaged, drawn as the class means are
            mean = np.stack(members.cam.to_numpy()).astype(np.float64).mean(axis=0).reshape(SIDE, SIDE)
            source = re.search(r'<img class="cluster-mean" data-cluster="\d+" alt="[^"]*" src="([^"]+)"',
                               columns[cluster]).group(1)
            drawn = np.asarray(decode_data_uri(source).convert("RGB"), dtype=int)
            expected = np.asarray(decode_data_uri(data_uri(heatmap(mean, MEAN_SIZE))).convert("RGB"), dtype=int)
            assert np.abs(drawn - expected).max() <= 2


def test_exemplars_are_the_maps_closest_to_their_cluster_mean(reported, planted):
    out, text, page, *_ = reported
    frame = joined(out)
    mine = frame[(frame.target_class == PLANTED) & (frame.cluster >= 0)]
    columns = cluster_columns(text, f"strategies-class-{PLANTED}")
    for cluster, members in mine.groupby("cluster"):
        units = unit_maps(members)
        distance = ((units - units.mean(axis=0)) ** 2).sum(axis=1)
        order = sorted(zip(distance, members.shard, members.sample_id))
        cards = re.findall(r'<img class="cam" alt="map of ([^"]+)"', columns[cluster])
        assert cards == [sample_id for *_, sample_id in order[:EXEMPLARS]]
    # the planted group's cards: images read back from the listing, marked mispredicted (label 3, predicted 2)
    group = next(cluster for cluster, members in mine.groupby("cluster") if set(members.sample_id) == set(planted[1]))
    column = columns[group]
    assert column.count("\u2717 mispredicted") == EXEMPLARS
    assert column.count('<figure class="wrong">') == EXEMPLARS
    sources = re.findall(r'<img class="cam" alt="[^"]*" src="([^"]+)"', column)
    assert all(decode_data_uri(source).size == (32, 32) for source in sources)  # the crop, the image under the map
    assert "read back from" in page.text("galleries")


def test_strategies_top_limits_the_classes_shown_cluster_by_cluster(planted, tmp_path, capsys):
    out = shutil.copytree(planted[0], tmp_path / "out")
    assert report.main([str(out), "--no-images", "--strategies-top", "1", "--out", str(tmp_path / "one.html")]) == 0
    page = Page((tmp_path / "one.html").read_text())
    assert [name for name in page.sections if name.startswith("strategies-class-")] == [
        f"strategies-class-{PLANTED}"]
    assert report.main([str(out), "--no-images", "--strategies-top", "0", "--out", str(tmp_path / "none.html")]) == 0
    page = Page((tmp_path / "none.html").read_text())
    assert not [name for name in page.sections if name.startswith("strategies-class-")]
    assert number(page.table("strategies")[0][1]) == PLANTED
    assert "--strategies-top 0" in page.text("strategies")


def test_the_layer_is_the_reports(planted, tmp_path):
    out = shutil.copytree(planted[0], tmp_path / "out")
    assert report.main([str(out), "--no-images", "--layer", "layer3", "--strategies-min-maps", "10"]) == 0
    strategies = pq.read_table(out / "strategies.parquet").to_pandas()
    assert set(strategies.layer) == {"layer3"}
    assert len(strategies) == sum(FOLDERS)
    classes = pq.read_table(out / "strategies_classes.parquet").to_pandas()
    assert set(classes.min_maps) == {10} and set(classes.grid_height) == {4}
    text = (out / "report.html").read_text()
    assert "min_maps 10" in text and "layer <code>layer3</code>, per class" in text


# --- turned off, bad options, missing libraries -------------------------------------------------------------


def test_no_strategies_leaves_the_section_out_and_writes_no_files(planted, tmp_path):
    out = shutil.copytree(planted[0], tmp_path / "out")
    assert report.main([str(out), "--no-images", "--no-strategies"]) == 0
    text = (out / "report.html").read_text()
    page = Page(text)
    assert 'id="strategies' not in text and "#strategies" not in text and "Strategies" not in page.headings
    assert not any((out / name).exists() for name in STRATEGY_FILES)
    assert "Class-mean maps" in page.headings and "Highest confidence" in page.headings
    # the Python API leaves them out unless asked for
    report.build_report(out, tmp_path / "api.html", images=False)
    assert not any((out / name).exists() for name in STRATEGY_FILES)
    built = report.build_report(out, tmp_path / "asked.html", images=False,
                                strategies=StrategyOptions(workers=1), strategies_top=2)
    assert all((out / name).is_file() for name in STRATEGY_FILES)
    assert built.strategies.detailed[0].result.target_class == PLANTED and len(built.strategies.detailed) == 2


def main_exit(argv: list[str]) -> int:
    try:
        return report.main(argv)
    except SystemExit as stop:  # argparse's errors
        return stop.code


@pytest.mark.parametrize("arguments, words", [
    (["--strategies-neighbors", "0"], "--strategies-neighbors 0: give a whole number 1 or more"),
    (["--strategies-max-clusters", "65"], "--strategies-max-clusters 65: give a whole number 1 to 64"),
    (["--strategies-min-maps", "2"], "--strategies-min-maps 2: give a whole number 3 or more"),
    (["--strategies-grid", "0"], "--strategies-grid 0: give a whole number 1 to 128"),
    (["--strategies-grid", "129"], "--strategies-grid 129"),
    (["--strategies-max-exact", "20", "--strategies-min-maps", "30"], "--strategies-max-exact 20: give a whole "
                                                                       "number 30 or more"),
    (["--strategies-workers", "-1"], "--strategies-workers -1: give a whole number 0 or more"),
    (["--strategies-neighbors", "ten"], "'ten' is not an integer"),
    (["--strategies-top", "21"], f"over the ceiling of {MAX_TOP}"),
    (["--strategies-top", "-1"], "less than 0"),
    (["--no-strategies", "--strategies-neighbors", "5"], "--strategies-neighbors with --no-strategies"),
])
def test_bad_options_are_one_line_exit_2(planted, tmp_path, capsys, arguments, words):
    out = shutil.copytree(planted[0], tmp_path / "out")
    assert main_exit([str(out), "--no-images", *arguments]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PROG}: error: ") and words in lines[0], lines
    assert not any((out / name).exists() for name in (*STRATEGY_FILES, "report.html"))


def test_a_bad_option_from_the_command_line(planted, tmp_path):
    out = shutil.copytree(planted[0], tmp_path / "out")
    one_line_error(run_report(str(out), "--strategies-neighbors", "0"), "--strategies-neighbors 0")


def test_strategies_that_cannot_be_written_are_one_line(planted, tmp_path, capsys):
    out = shutil.copytree(planted[0], tmp_path / "out")
    (out / "strategies.parquet").mkdir()  # in the way of the file
    assert report.main([str(out), "--no-images"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "cannot write" in lines[0] and "--no-strategies" in lines[0], lines
    assert not (out / "report.html").exists()
    assert report.main([str(out), "--no-images", "--no-strategies"]) == 0


def test_without_scikit_learn_one_line_and_the_rest_of_the_report(planted, tmp_path, monkeypatch, capsys):
    out = shutil.copytree(planted[0], tmp_path / "out")
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn raises ImportError
    assert report.main([str(out), "--no-images"]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "strateg" in line or "scikit-learn" in line]
    assert lines == [f"{PROG}: warning: strategies not found: scikit-learn is not installed (pip install "
                     "'gradcam-batch[strategies]'); the rest of the report is written (--no-strategies leaves them "
                     "out)"], captured.err
    text = (out / "report.html").read_text()
    page = Page(text)
    assert "scikit-learn is not installed" in page.text("strategies")
    for heading in ("Run summary", "Per-class statistics", "Class-mean maps", "Highest confidence", "Errors"):
        assert heading in page.headings
    assert not any((out / name).exists() for name in STRATEGY_FILES)


# --- the page in a browser, and the planted-shortcut demo ---------------------------------------------------


@pytest.mark.slow
def test_the_page_renders_in_chromium_with_every_image(chromium, reported, tmp_path):  # noqa: F811
    out, text, page, *_ = reported
    copy = tmp_path / "report.html"
    copy.write_text(text)
    exemplars = sum(len(re.findall(r'<img class="cam"', section_html(text, name)))
                    for name in page.sections if name.startswith("strategies-class-"))
    assert exemplars >= EXEMPLARS * 2
    assert images_loaded(copy, tmp_path / "profile") == (len(page.images), 0)
    shot = tmp_path / "shot.png"
    browse(copy, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000")
    assert shot.is_file()


SHORTCUT_FILES = (REPO / "conf" / "data" / "demo_shortcut.yaml", REPO / "gradcam_batch" / "assets" /
                  "demo_cnn_shortcut.pt")


@pytest.mark.slow
@pytest.mark.skipif(not all(path.is_file() for path in SHORTCUT_FILES), reason="the planted-shortcut demo is not "
                                                                               "there yet")
def test_the_planted_shortcut_demo_ranks_its_class_first_with_the_mark_as_a_cluster(tmp_path):
    """gradcam-batch data=demo_shortcut model=demo_shortcut, then the report cross-checked with an
    EigenCAM run (no gradients): the planted class first, its smallest tight cluster the stamped
    crosses, its mean map peaking at the mark, and EigenCAM seeing that cluster too."""
    from cli_helpers import run_composed
    from gradcam_batch.data.demo import SHORTCUT_CLASS, in_mark_corner
    from gradcam_batch.report.crosscheck import AGREE
    from test_shortcut_demo import read_samples

    out, eigencam = tmp_path / "out", tmp_path / "eigencam"
    run_composed("data=demo_shortcut", "model=demo_shortcut", "runtime.progress=false", f"output.dir={out}")
    run_composed("data=demo_shortcut", "model=demo_shortcut", "runtime.progress=false", f"output.dir={eigencam}",
                 "cam.method=eigencam")
    assert report.main([str(out), "--out", str(tmp_path / "report.html"), "--compare", str(eigencam)]) == 0
    text = (tmp_path / "report.html").read_text()
    page = Page(text)
    first = page.table("strategies")[0]
    assert number(first[1]) == SHORTCUT_CLASS, page.table("strategies")
    cluster = int(re.search(r"\(cluster (\d+), tightness", first[5]).group(1))
    samples = read_samples(out / "demo-data")
    frame = joined(out)
    members = frame[(frame.target_class == SHORTCUT_CLASS) & (frame.cluster == cluster)]
    stamped = {sample_id for sample_id, sample in samples.items() if sample["meta"].get("shortcut")}
    found = set(members.sample_id)
    assert len(found & stamped) / len(found) >= 0.9 and len(found & stamped) / len(stamped) >= 0.9
    height, width = int(members.cam_height.iloc[0]), int(members.cam_width.iloc[0])
    mean = np.stack(members.cam.to_numpy()).mean(axis=0).reshape(height, width)
    peak_y, peak_x = np.unravel_index(np.argmax(mean), mean.shape)
    assert in_mark_corner((peak_x + 0.5) / width * 64, (peak_y + 0.5) / height * 64)
    # the page draws that mean map
    column = cluster_columns(text, f"strategies-class-{SHORTCUT_CLASS}")[cluster]
    source = re.search(r'<img class="cluster-mean" data-cluster="\d+" alt="[^"]*" src="([^"]+)"', column).group(1)
    drawn = np.asarray(decode_data_uri(source).convert("RGB"), dtype=int)
    expected = np.asarray(decode_data_uri(data_uri(heatmap(mean, MEAN_SIZE))).convert("RGB"), dtype=int)
    assert np.abs(drawn - expected).max() <= 2
    # a method of another kind sees the shortcut cluster too: the strategy is the model's
    pairs = pq.read_table(out / "crosscheck.parquet").to_pandas().merge(members[["sample_id", "shard", "target_class"]])
    assert len(pairs) == len(members) and pairs.agreement.median() >= AGREE
    html = section_html(text, "crosscheck")
    assert "gradcam (gradient) against eigencam (gradient-free)" in html
    row = next(cells for cells in re.findall(r"<tr>(.*?)</tr>", html) if re.search(
        rf"<td>{SHORTCUT_CLASS} \(cross\)</td><td><span[^>]*></span>{cluster} \(tight\)</td>", cells))
    assert number(re.sub(r"<[^>]+>", "", re.findall(r'<td class="num[^"]*">(.*?)</td>', row)[3])) == pytest.approx(
        pairs.agreement.median(), abs=0.005)
