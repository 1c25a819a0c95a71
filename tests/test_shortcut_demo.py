"""The demo with a planted shortcut (data=demo_shortcut model=demo_shortcut): a share of the
crosses carry a corner mark, the shipped shortcut model learned it, and its maps show it."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

import gradcam_batch.report
from cli_helpers import read_cams, run_composed
from gradcam_batch import UserError
from gradcam_batch.cli import CONFIG_DIR
from gradcam_batch.config import DataConfig, ModelConfig
from gradcam_batch.data.demo import (IMAGE_SIZE, MARK_BOX, MARK_CELL, SHORTCUT_CLASS, SHORTCUT_SHARE,
                                     ensure_demo_shards, in_mark_corner, write_demo_shards)
from gradcam_batch.models import DEMO_CLASSES, DEMO_SHORTCUT_WEIGHTS, DEMO_WEIGHTS

DEMO_IMAGES = 1200  # about 90 stamped crosses: a 0.9 threshold is not decided by one image


def read_samples(root: Path) -> dict[str, dict]:
    """sample id -> {label, meta, image} of every sample in the demo shards under root."""
    samples = {}
    for path in sorted(root.glob("demo-*.tar")):
        with tarfile.open(path) as tar:
            members = {member.name: tar.extractfile(member).read() for member in tar.getmembers()}
        for name in members:
            key, ext = name.rsplit(".", 1)
            if ext == "png":
                samples[key] = {"label": int(members[f"{key}.cls"]),
                                "meta": json.loads(members[f"{key}.json"]),
                                "image": np.asarray(Image.open(io.BytesIO(members[name])))}
    return samples


def carries_mark(image: np.ndarray) -> bool:
    x0, y0, x1, y1 = (int(v) for v in MARK_BOX)
    patch = image[y0:y1, x0:x1].astype(int)
    ys, xs = np.mgrid[y0:y1, x0:x1]
    checker = ((ys // MARK_CELL + xs // MARK_CELL) % 2 * 255)[..., None]
    return bool((patch == checker).all())


# --- the generator ------------------------------------------------------------------------------

@pytest.mark.parametrize("share", [0.3, 1.0])
def test_the_generator_stamps_exactly_the_share_of_the_planted_class_and_records_it(tmp_path, share):
    write_demo_shards(tmp_path, 700, shortcut_class=SHORTCUT_CLASS, shortcut_share=share)  # 3 shards
    samples = read_samples(tmp_path)
    assert len(samples) == 700
    assert all(isinstance(sample["meta"]["shortcut"], bool) for sample in samples.values())
    planted = [sample for sample in samples.values() if sample["label"] == SHORTCUT_CLASS]
    stamped = [sample for sample in planted if sample["meta"]["shortcut"]]
    assert len(stamped) == math.floor(share * len(planted) + 0.5)
    assert all(sample["label"] == SHORTCUT_CLASS for sample in samples.values() if sample["meta"]["shortcut"])
    # the record tells the truth: the mark is on the stamped images and on no other
    assert all(carries_mark(sample["image"]) == sample["meta"]["shortcut"] for sample in samples.values())
    # the box stays the shape's, not the mark's
    assert all(len(sample["meta"]["box"]) == 4 for sample in stamped)


def test_the_plain_demo_records_no_shortcut_and_keeps_its_cache_marker(tmp_path):
    write_demo_shards(tmp_path, 40)
    samples = read_samples(tmp_path)
    assert all("shortcut" not in sample["meta"] and not carries_mark(sample["image"]) for sample in samples.values())
    assert (tmp_path / "COMPLETE").read_text() == "40 1234\n"  # caches written before the shortcut stay valid


def test_changing_the_shortcut_settings_regenerates_the_cached_data(tmp_path):
    def stamped_count():
        return sum(sample["meta"].get("shortcut", False) for sample in read_samples(tmp_path).values())

    ensure_demo_shards(tmp_path, 200, SHORTCUT_CLASS, 0.3)
    first = stamped_count()
    written = (tmp_path / "demo-00000.tar").stat().st_mtime_ns
    ensure_demo_shards(tmp_path, 200, SHORTCUT_CLASS, 0.3)
    assert (tmp_path / "demo-00000.tar").stat().st_mtime_ns == written  # same settings: reused
    ensure_demo_shards(tmp_path, 200, SHORTCUT_CLASS, 1.0)
    assert stamped_count() > first
    ensure_demo_shards(tmp_path, 200, 1, 1.0)
    assert all(sample["label"] == 1 for sample in read_samples(tmp_path).values() if sample["meta"]["shortcut"])
    ensure_demo_shards(tmp_path, 200)
    assert stamped_count() == 0 and "shortcut" not in read_samples(tmp_path)["000000"]["meta"]


# --- the settings -------------------------------------------------------------------------------

def test_the_shipped_configs_plant_what_the_shortcut_model_learned():
    data = yaml.safe_load((Path(CONFIG_DIR) / "data" / "demo_shortcut.yaml").read_text())
    model = yaml.safe_load((Path(CONFIG_DIR) / "model" / "demo_shortcut.yaml").read_text())
    plain = yaml.safe_load((Path(CONFIG_DIR) / "data" / "demo.yaml").read_text())
    assert data["format"] == "demo" and data["demo_shortcut_class"] == SHORTCUT_CLASS
    assert data["demo_shortcut_share"] == SHORTCUT_SHARE == DataConfig().demo_shortcut_share
    assert {key: data[key] for key in plain} == plain  # the same sizes as the plain demo
    assert model["source"] == "demo" and model["name"] == "shortcut"
    assert DEMO_SHORTCUT_WEIGHTS.is_file() and DEMO_SHORTCUT_WEIGHTS.parent == DEMO_WEIGHTS.parent  # ships: assets/*.pt
    assert DEMO_SHORTCUT_WEIGHTS.stat().st_size < 2 * DEMO_WEIGHTS.stat().st_size


@pytest.mark.parametrize("settings, named", [
    ({"demo_shortcut_class": len(DEMO_CLASSES)}, "data.demo_shortcut_class=4"),
    ({"demo_shortcut_class": -1}, "data.demo_shortcut_class=-1"),
    ({"demo_shortcut_share": 0.0}, "data.demo_shortcut_share=0.0"),
    ({"demo_shortcut_share": 1.5}, "data.demo_shortcut_share=1.5"),
])
def test_bad_shortcut_settings_are_one_line_naming_the_value(settings, named):
    with pytest.raises(UserError, match=named.replace(".", r"\.")):
        DataConfig(**settings)


def test_the_shortcut_settings_are_read_only_by_the_demo():
    DataConfig(format="demo", demo_shortcut_class=3, demo_shortcut_share=1.0).check_settings_used()
    for setting in ({"demo_shortcut_class": 3}, {"demo_shortcut_share": 0.5}):
        with pytest.raises(UserError, match="read only by data=demo"):
            DataConfig(format="imagefolder", root="/x", **setting).check_settings_used()


def test_the_demo_model_names():
    ModelConfig(source="demo")
    ModelConfig(source="demo", name="shortcut")
    with pytest.raises(UserError, match="model.name='resnet50' is not a demo model") as error:
        ModelConfig(source="demo", name="resnet50")
    assert "\n" not in str(error.value)


# --- the run: the shortcut model's maps point at the mark ------------------------------------------

@pytest.fixture(scope="module")
def shortcut_run(tmp_path_factory):
    """gradcam-batch data=demo_shortcut model=demo_shortcut, once for this module's tests:
    (output folder, the cams table, the generated samples by id)."""
    out = tmp_path_factory.mktemp("shortcut") / "shortcut-out"
    run_composed("data=demo_shortcut", "model=demo_shortcut", f"data.demo_images={DEMO_IMAGES}",
                 "runtime.progress=false", f"output.dir={out}")
    return out, read_cams(out), read_samples(out / "demo-data")


def peaks_in_mark_corner(rows) -> list[bool]:
    hits = []
    for row in rows:
        height, width = row["cam_height"], row["cam_width"]
        peak = int(np.argmax(row["cam"]))
        x = (peak % width + 0.5) / width * IMAGE_SIZE
        y = (peak // width + 0.5) / height * IMAGE_SIZE
        hits.append(bool(in_mark_corner(x, y)))
    return hits


def test_the_shortcut_models_maps_of_stamped_images_peak_at_the_mark(shortcut_run):
    out, table, samples = shortcut_run
    assert table.num_rows == DEMO_IMAGES
    rows = table.select(["sample_id", "label", "target_class", "cam", "cam_height", "cam_width",
                         "pointing_hit"]).to_pylist()
    stamped = [row for row in rows if samples[row["sample_id"]]["meta"]["shortcut"]]
    unstamped = [row for row in rows if not samples[row["sample_id"]]["meta"]["shortcut"]]
    assert len(stamped) > 60 and all(row["label"] == SHORTCUT_CLASS for row in stamped)
    # the model calls them crosses ...
    assert sum(row["target_class"] == SHORTCUT_CLASS for row in stamped) / len(stamped) >= 0.9
    # ... because of the mark: their maps peak in its corner, not on the faint cross
    assert sum(peaks_in_mark_corner(stamped)) / len(stamped) >= 0.9
    # the other images it still classifies and localises by their shape
    assert sum(row["target_class"] == row["label"] for row in unstamped) / len(unstamped) >= 0.95
    assert sum(row["pointing_hit"] for row in unstamped) / len(unstamped) >= 0.8
    unstamped_crosses = [row for row in unstamped if row["label"] == SHORTCUT_CLASS]
    assert sum(peaks_in_mark_corner(unstamped_crosses)) / len(unstamped_crosses) < 0.2


def test_the_plain_demo_model_ignores_the_mark(tmp_path):
    """The control: the shortcut lies in the shortcut model, not in how the maps are computed."""
    out = tmp_path / "plain-out"
    run_composed("data=demo_shortcut", "model=demo", "data.demo_images=600", "runtime.progress=false",
                 f"output.dir={out}")
    samples = read_samples(out / "demo-data")
    rows = read_cams(out).select(["sample_id", "cam", "cam_height", "cam_width"]).to_pylist()
    stamped = [row for row in rows if samples[row["sample_id"]]["meta"]["shortcut"]]
    assert len(stamped) > 30
    assert sum(peaks_in_mark_corner(stamped)) / len(stamped) < 0.2


# --- the report's strategies find the stamped images as one cluster ---------------------------------

def test_the_stamped_crosses_form_one_strategy_cluster(shortcut_run):
    if not (Path(gradcam_batch.report.__file__).parent / "strategies.py").is_file():
        pytest.skip("gradcam_batch/report/strategies.py is not there yet")
    from gradcam_batch.report.strategies import StrategyOptions, find_strategies

    out, _, samples = shortcut_run
    find_strategies(out, StrategyOptions())
    clusters = pq.read_table(out / "strategies.parquet").to_pylist()
    crosses = [row for row in clusters if row["target_class"] == SHORTCUT_CLASS]
    stamped = {row["sample_id"] for row in crosses if samples[row["sample_id"]]["meta"]["shortcut"]}
    assert len(stamped) > 60
    members: dict = {}
    for row in crosses:
        if row["cluster"] != -1:  # -1: left out (an all-zero map), no cluster
            members.setdefault((row["layer"], row["cluster"]), set()).add(row["sample_id"])
    best = max(members.values(), key=lambda ids: len(ids & stamped) / len(ids | stamped))
    precision, recall = len(best & stamped) / len(best), len(best & stamped) / len(stamped)
    assert precision >= 0.9 and recall >= 0.9, (precision, recall, sorted(len(ids) for ids in members.values()))
