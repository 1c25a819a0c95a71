"""The report's Cross-check (--compare OTHER_DIR): this output's rank-0 maps paired with another
output's maps of the same images and classes, rated by Pearson correlation. The other output is
the planted synthetic run of test_report_strategies with its maps changed on purpose (class 0 on
other places, class 1 on a coarser 4x4 grid, some maps all zero, some rows missing, the part files
cut into other units); crosscheck.parquet, the per-class and per-cluster tables and the most
disputed pairs must equal a pandas/numpy computation in float64 from the two folders' cams."""

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
from gradcam_batch.report.crosscheck import AGREE, DISPUTED, correlations
from gradcam_batch.writer import CAM_SCHEMA
from test_report import one_line_error, run_report
from test_report_strategies import LAYER, blob, number, section_html, write_planted

KEYS = ["sample_id", "shard", "target_class"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(this output, other output) over the same ImageFolder."""
    base = tmp_path_factory.mktemp("crosscheck")
    this = base / "this"
    write_planted(this, base / "data")
    other = base / "other"
    shutil.copytree(this, other)
    cams = pq.read_table(other / "cams").to_pandas()
    shutil.rmtree(other / "cams")
    (other / "cams").mkdir()
    rng = np.random.default_rng(11)
    mine = (cams.layer == LAYER) & (cams.target_rank == 0)
    cams = cams.drop(index=cams.index[mine & (cams.target_class == 4)][:3])  # 3 maps the other lacks
    mine = (cams.layer == LAYER) & (cams.target_rank == 0)
    for index in cams.index[mine & (cams.target_class == 0)]:  # other places: low agreement
        cams.at[index, "cam"] = blob(rng, rng.uniform(0, 8), rng.uniform(0, 8), 1.0, 0.6).tolist()
    for index in cams.index[mine & (cams.target_class == 1)]:  # a 4x4 grid: paired on 8x8
        cams.at[index, "cam"] = blob(rng, rng.uniform(0, 4), rng.uniform(0, 4), 1.2, 0.2, 4).tolist()
        cams.at[index, "cam_height"] = cams.at[index, "cam_width"] = 4
    zero = cams.index[mine & (cams.target_class == 3)][:5]  # no evidence: not rated
    for index in zero:
        cams.at[index, "cam"] = [0.0] * 64
        cams.at[index, "cam_max_raw"] = 0.0
    for index in cams.index[mine & (cams.target_class == 3)][5:]:  # the same places, with noise
        values = np.asarray(cams.at[index, "cam"]) + rng.normal(0, 0.05, 64)
        cams.at[index, "cam"] = values.tolist()
    shard = "imagefolder-00000"
    schema = CAM_SCHEMA.with_metadata({b"gradcam_batch": json.dumps({"model": "planted-net"}).encode()})
    order = cams.sort_values("sample_id", kind="stable")
    units = {}
    for chunk in np.array_split(np.arange(len(order)), 2):  # 2 units, where this output has 3
        unit = f"{shard}@{chunk[0]:08d}-{chunk[-1] + 1:08d}"
        units[unit] = {"shard": shard}
        pq.write_table(pa.Table.from_pandas(order.iloc[chunk], schema=schema, preserve_index=False),
                       other / "cams" / f"part-{unit}.parquet")
    manifest = json.loads((other / "_manifest.json").read_text())
    manifest["method"] = manifest["config"]["cam"]["method"] = "scorecam"
    manifest["listing"]["units"] = units
    (other / "_manifest.json").write_text(json.dumps(manifest))
    return this, other


def run(argv: list[str], capsys) -> tuple[str, str]:
    assert report.main(argv) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def expected(this: Path, other: Path) -> pd.DataFrame:
    """The pairs and their r in float64, from both folders' cams (the coarser map upsampled to the
    finer grid with align_corners=False)."""
    def rank0(folder):
        cams = pq.read_table(folder / "cams").to_pandas()
        return cams[(cams.layer == LAYER) & (cams.target_rank == 0)]
    merged = rank0(this).merge(rank0(other), on=KEYS, suffixes=("", "_other"), validate="one_to_one")
    values = []
    for row in merged.itertuples():
        first = np.asarray(row.cam, dtype=np.float64).reshape(row.cam_height, row.cam_width)
        second = torch.tensor(np.asarray(row.cam_other, dtype=np.float64)).reshape(
            1, 1, row.cam_height_other, row.cam_width_other)
        second = torch.nn.functional.interpolate(second, size=first.shape, mode="bilinear",
                                                 align_corners=False)[0, 0].numpy()
        values.append(np.nan if first.std() == 0 or second.std() == 0
                      else np.corrcoef(first.ravel(), second.ravel())[0, 1])
    merged["want"] = values
    return merged


@pytest.fixture(scope="module")
def compared(pair, tmp_path_factory):
    this, other = pair
    out = tmp_path_factory.mktemp("compared") / "this"
    shutil.copytree(this, out)
    saved = sys.stdout, sys.stderr
    capture = tmp_path_factory.mktemp("capture")
    with open(capture / "out", "w") as stdout, open(capture / "err", "w") as stderr:
        sys.stdout, sys.stderr = stdout, stderr
        try:
            assert report.main([str(out), "--compare", str(other), "--no-images"]) == 0
        finally:
            sys.stdout, sys.stderr = saved
    return out, other, (out / "report.html").read_text(), (capture / "out").read_text(), (capture / "err").read_text()


def test_correlations_equal_numpy_on_fresh_random_maps():
    rng = np.random.default_rng()
    first, second = rng.random((50, 49)), rng.random((50, 49))
    first[3] = 0.0  # constant rows are not rated
    second[7] = 0.25
    got = correlations(first, second)
    with np.errstate(invalid="ignore", divide="ignore"):  # numpy's r of a constant row is NaN too
        want = np.array([np.corrcoef(a, b)[0, 1] for a, b in zip(first, second)])
    want[[3, 7]] = np.nan
    np.testing.assert_allclose(got, want, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(correlations(first[:2], 3 * first[:2] + 1)[1], 1.0, atol=1e-12)
    # raw maps of any scale are rated alike; a constant map resized with rounding is still constant
    np.testing.assert_allclose(correlations(1e-14 * first, 1e-14 * second), got, atol=1e-9, equal_nan=True)
    assert np.isnan(correlations(np.full((1, 49), 0.3) + 1e-16 * rng.random((1, 49)), second[:1])).all()


def test_every_pair_is_rated_as_numpy_rates_it(compared):
    out, other, *_ = compared
    want = expected(out, other)
    got = pq.read_table(out / "crosscheck.parquet").to_pandas()
    assert len(got) == len(want) == len(want.drop_duplicates(KEYS))
    both = got.merge(want[KEYS + ["want"]], on=KEYS, validate="one_to_one")
    assert len(both) == len(want)
    np.testing.assert_allclose(both.agreement.to_numpy(dtype=np.float64), both.want.to_numpy(), atol=1e-9,
                               equal_nan=True)
    assert both.agreement.isna().sum() == 5  # the all-zero maps
    assert (both.layer == LAYER).all() and (both.other_layer == LAYER).all()
    metadata = json.loads(pq.read_schema(out / "crosscheck.parquet").metadata[b"gradcam_batch.crosscheck"])
    assert metadata["method"] == "gradcam" and metadata["other_method"] == "scorecam"


def table_rows(html: str, heading: str) -> list[list[str]]:
    start = html.index(f"<h3>{heading}</h3>")
    body = html[html.index("<tbody>", start):html.index("</tbody>", start)]
    return [[re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row)]
            for row in body.split("</tr>") if "<td" in row]


def test_per_class_table_equals_pandas(compared):
    out, other, text, stdout, _ = compared
    want = expected(out, other)
    html = section_html(text, "crosscheck")
    rows = {int(row[0].split()[0]): row[1:] for row in table_rows(html, "Per class")}
    assert set(rows) == set(want.target_class)
    for target_class, group in want.groupby("target_class"):
        rated = group.want.dropna()
        pairs, counted, median, agreeing = rows[target_class]
        assert number(pairs) == len(group) and number(counted) == len(rated)
        assert number(median) == pytest.approx(rated.median(), abs=0.005)
        assert number(agreeing) == pytest.approx(100 * (rated >= AGREE).mean(), abs=0.5)
    assert number(rows[4][0]) == 7  # 10 maps, 3 missing from the other output
    assert number(rows[0][2]) < AGREE <= number(rows[2][2])  # moved maps disagree, copied ones agree
    assert "gradcam (gradient) against scorecam (perturbation)" in html
    assert re.search(rf"cross-check against {re.escape(str(other))} \(scorecam\): {len(want):,} of \d[\d,]* maps "
                     r"paired, median r [-+]\d\.\d\d", stdout)


def test_per_cluster_table_equals_a_join_with_the_strategies(compared):
    out, other, text, *_ = compared
    want = expected(out, other).merge(pq.read_table(out / "strategies.parquet").to_pandas(), on=KEYS)
    want = want[want.cluster >= 0]
    rows = table_rows(section_html(text, "crosscheck"), "Per strategy")
    assert rows
    seen = set()
    for row in rows:
        target_class, cluster = int(row[0].split()[0]), int(row[1].split()[0])
        group = want[(want.target_class == target_class) & (want.cluster == cluster)]
        rated = group.want.dropna()
        assert number(row[3]) == len(group) and number(row[4]) == len(rated)
        assert number(row[5]) == pytest.approx(rated.median(), abs=0.005)
        seen.add(target_class)
    assert 2 in seen  # the planted class is shown cluster by cluster


def test_most_disputed_pairs_are_the_lowest_r(compared):
    out, other, text, *_ = compared
    want = expected(out, other).dropna(subset=["want"]).sort_values("want").head(DISPUTED)
    html = section_html(text, "crosscheck")
    shown = re.findall(r'<figure class="pair">.*?<span class="id"[^>]*>([^<]+)</span>', html)
    assert shown == want.sample_id.tolist()
    assert html.count('<img class="cam"') == 2 * DISPUTED


def test_refusals_are_one_line(pair, tmp_path):
    this, other = pair
    out = tmp_path / "this"
    shutil.copytree(this, out)
    one_line_error(run_report(str(out), "--compare", str(out), "--no-strategies", "--no-images"), "that is this output")
    one_line_error(run_report(str(out), "--compare", str(tmp_path / "missing"), "--no-strategies"),
                   f"--compare {tmp_path / 'missing'}: ")
    stranger = tmp_path / "stranger"
    shutil.copytree(other, stranger)
    for part in (stranger / "cams").glob("*.parquet"):
        table = pq.read_table(part)
        ids = pa.array([f"x/{value}" for value in table["sample_id"].to_pylist()])
        pq.write_table(table.set_column(table.schema.get_field_index("sample_id"), "sample_id", ids), part)
    one_line_error(run_report(str(out), "--compare", str(stranger), "--no-strategies", "--no-images"),
                   "none of its rank-0 maps is of an image and class")
    assert not (out / "crosscheck.parquet").exists()


def test_the_same_kind_of_method_is_said(pair, tmp_path, capsys):
    this, other = pair
    same = tmp_path / "same"
    shutil.copytree(other, same)
    manifest = json.loads((same / "_manifest.json").read_text())
    manifest["method"] = manifest["config"]["cam"]["method"] = "gradcampp"
    (same / "_manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "this"
    shutil.copytree(this, out)
    _, stderr = run([str(out), "--compare", str(same), "--no-strategies", "--no-images"], capsys)
    assert "gradcam and gradcampp rest on the same kind of evidence (gradient)" in stderr
    assert "Both methods rest on the same kind of evidence" in (out / "report.html").read_text()


def test_the_other_outputs_same_layer_is_paired(pair, tmp_path, capsys):
    """--layer layer3 on two runs of target layers layer3 and layer4: layer3 pairs with layer3
    (there the other output's maps are this one's), not with the other run's summary layer."""
    this, other = pair
    out = tmp_path / "this"
    shutil.copytree(this, out)
    run([str(out), "--compare", str(other), "--layer", "layer3", "--no-strategies", "--no-images"], capsys)
    got = pq.read_table(out / "crosscheck.parquet").to_pandas()
    assert (got.layer == "layer3").all() and (got.other_layer == "layer3").all()
    np.testing.assert_allclose(got.agreement.to_numpy(dtype=np.float64), 1.0, atol=1e-6)


def test_benchmark_small(tmp_path):
    """benchmarks/bench_crosscheck.py on 2,000 maps: every map paired, and the pairs' median r is
    the one numpy computes from the two synthetic outputs it wrote."""
    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    import bench_crosscheck

    table = tmp_path / "bench.md"
    assert bench_crosscheck.main(["--maps", "2000", "--classes", "4", "--shards", "2", "--data-dir",
                                  str(tmp_path / "data"), "--out", str(table)]) == 0
    row = next(line for line in table.read_text().splitlines() if line.startswith("| 2,000 "))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "7x7" and cells[6] == "2,000" and float(cells[5]) > 0
    folders = sorted((tmp_path / "data").iterdir())
    first, second = (pq.read_table(folder / "cams").to_pandas().sort_values("sample_id") for folder in folders)
    r = correlations(np.stack(first.cam.to_numpy()).astype(np.float64), np.stack(second.cam.to_numpy()).astype(np.float64))
    assert float(cells[7]) == pytest.approx(np.median(r), abs=0.0005)
