"""The README's dashboard queries run as they are, on a real output folder with boxes."""

import re
from pathlib import Path

import pytest

from cli_helpers import TINY_RESNET, run_composed
from test_statistics import make_boxed_webdataset

README = Path(__file__).resolve().parent.parent / "README.md"


def dashboard_blocks(language: str) -> list[str]:
    text = README.read_text()
    section = text[text.index("## Dashboards"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dashboards")
    make_boxed_webdataset(folder / "shard.tar", count=6)
    run_composed(*TINY_RESNET, "data=webdataset", f"data.shards={folder / 'shard.tar'}",
                 f"output.dir={folder / 'gradcam-out'}")
    return folder


def test_the_readme_has_the_queries():
    assert len(dashboard_blocks("sql")) >= 3 and len(dashboard_blocks("python")) == 1


@pytest.mark.parametrize("index", range(3))
def test_sql_queries_run(output, monkeypatch, index):
    duckdb = pytest.importorskip("duckdb")
    monkeypatch.chdir(output)
    query = dashboard_blocks("sql")[index]
    relation = duckdb.sql(query)
    assert relation.columns  # the query parsed and bound against the real columns
    rows = relation.fetchall()
    if index < 2:  # per class, and the boxed images: the run has both
        assert rows


def test_python_block_runs(output, monkeypatch):
    pytest.importorskip("duckdb")
    pytest.importorskip("pandas")
    monkeypatch.chdir(output)
    scope = {}
    exec(dashboard_blocks("python")[0], scope)
    assert scope["cam"].ndim == 2 and scope["same"].ndim == 2
    assert scope["cam"].shape == (scope["first"]["cam_height"], scope["first"]["cam_width"])


@pytest.fixture(scope="module")
def layered_output(tmp_path_factory):
    folder = tmp_path_factory.mktemp("layered")
    make_boxed_webdataset(folder / "shard.tar", count=6)
    run_composed(*TINY_RESNET, "data=webdataset", f"data.shards={folder / 'shard.tar'}",
                 "model.target_layer=[layer3,layer4]", "cam.fuse=mean", f"output.dir={folder / 'gradcam-out'}")
    return folder


def test_queries_keep_the_layers_of_a_several_layer_output_apart(layered_output, monkeypatch):
    duckdb = pytest.importorskip("duckdb")
    import pyarrow.dataset as ds

    monkeypatch.chdir(layered_output)
    table = ds.dataset("gradcam-out/cams", format="parquet").to_table().to_pylist()
    layers = {row["layer"] for row in table}
    assert layers == {"layer3", "layer4", "mean(layer3,layer4)"}
    per_class = duckdb.sql(dashboard_blocks("sql")[0]).fetchall()
    # one row per (layer, class), each counting that layer's rank-0 maps only
    want = {}
    for row in table:
        if row["target_rank"] == 0:
            key = (row["layer"], row["target_class"])
            want[key] = want.get(key, 0) + 1
    assert {(layer, target): maps for layer, target, maps, *_ in per_class} == want
    for index in (1, 2):
        listed = duckdb.sql(dashboard_blocks("sql")[index]).fetchall()
        by_layer = {}
        for layer, sample_id, *_ in listed:
            by_layer.setdefault(layer, []).append(sample_id)
        # within a layer no image is listed twice (the layers' rows are not mixed into one list)
        assert all(len(ids) == len(set(ids)) for ids in by_layer.values()), by_layer
