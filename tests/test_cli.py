"""The command line end to end on tiny datasets in every format: rows, ids, labels, resume,
and one-line errors for what a user can get wrong."""

import json
import os

import pyarrow.parquet as pq
import pytest
import torch

from cli_helpers import TINY_RESNET, read_cams, run_cli, run_composed
from gradcam_batch.config import ModelConfig
from gradcam_batch.methods import METHODS
from gradcam_batch.models import build_model
from reference import full_backward_reference
from sample_data import make_imagefolder, make_parquet, make_webdataset


def test_imagefolder_rows_ids_labels_and_resume(tmp_path):
    expected = make_imagefolder(tmp_path / "data", per_class=(3, 2, 4))
    out = tmp_path / "out"
    args = [*TINY_RESNET, "data=imagefolder", f"data.root={tmp_path / 'data'}", "data.shard_size=4",
            "data.batch_size=3", f"output.dir={out}"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    table = read_cams(out)
    assert sorted(zip(table["sample_id"].to_pylist(), table["label"].to_pylist())) == sorted(expected)
    assert set(table["shard"].to_pylist()) == {"imagefolder-00000", "imagefolder-00001", "imagefolder-00002"}
    assert "images      9" in first.stdout and "rows        9" in first.stdout
    metadata = json.loads(pq.ParquetFile(out / "cams" / "part-imagefolder-00000.parquet").schema_arrow.metadata[b"gradcam_batch"])
    assert metadata["target_layer"] == "layer4" and metadata["config"]["model"]["name"] == "resnet18"

    parts = sorted((out / "cams").glob("part-*.parquet"))
    stamps = {p: p.stat().st_mtime_ns for p in parts}
    second = run_cli(*args)
    assert second.returncode == 0 and "nothing to do: all 3 units were already complete" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in parts} == stamps  # nothing rewritten

    parts[1].unlink()  # as if the run had stopped before that shard finished
    third = run_cli(*args)
    assert "1 written, 2 already complete" in third.stdout
    ids = read_cams(out)["sample_id"].to_pylist()
    assert sorted(ids) == sorted(path for path, _ in expected)  # every image exactly once


def test_webdataset_topk(tmp_path):
    expected = make_webdataset(tmp_path / "wds", shards=2, per_shard=3)
    summary = run_composed(*TINY_RESNET, "data=webdataset", f"data.shards={tmp_path / 'wds'}/*.tar",
                           "cam.targets=topk", "cam.topk=2", f"output.dir={tmp_path / 'out'}")
    assert (summary.images, summary.rows, summary.errors) == (6, 12, 0)
    table = read_cams(tmp_path / "out")
    rows = table.to_pylist()
    assert {r["sample_id"]: r["label"] for r in rows} == expected
    assert sorted(r["target_rank"] for r in rows) == [0] * 6 + [1] * 6
    assert all(len(r["cam"]) == r["cam_height"] * r["cam_width"] == 4 for r in rows)
    for sample in expected:
        ranked = sorted((r for r in rows if r["sample_id"] == sample), key=lambda r: r["target_rank"])
        assert ranked[0]["score"] >= ranked[1]["score"]


def test_parquet_struct_images_and_label_targets(tmp_path):
    expected = make_parquet(tmp_path / "pq", shards=2, rows=3, struct=True)
    summary = run_composed(*TINY_RESNET, "data=parquet", f"data.shards={tmp_path / 'pq'}/*.parquet",
                           "cam.targets=label", f"output.dir={tmp_path / 'out'}")
    assert summary.images == 6
    rows = read_cams(tmp_path / "out").to_pylist()
    assert {r["sample_id"]: r["label"] for r in rows} == expected
    assert all(r["target_class"] == r["label"] for r in rows)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_against_float64_formula(tmp_path, method):
    """The CAM column for every method equals the formula in float64 on activations and
    gradients from an ordinary full backward pass of the same model and images."""
    make_imagefolder(tmp_path / "data", per_class=(2, 1))
    run_composed(*TINY_RESNET, "data=imagefolder", f"data.root={tmp_path / 'data'}", f"cam.method={method}",
                 "cam.targets=topk", "cam.topk=2", f"output.dir={tmp_path / 'out'}", "data.crop=64",
                 "data.resize=96")
    rows = sorted(read_cams(tmp_path / "out").to_pylist(), key=lambda r: (r["sample_id"], r["target_rank"]))
    from gradcam_batch.config import DataConfig
    from gradcam_batch.data.readers import iter_samples
    from gradcam_batch.data.shards import list_shards
    from gradcam_batch.data.transforms import decode_resize_crop

    cfg = DataConfig(format="imagefolder", root=str(tmp_path / "data"), resize=96, crop=64).resolved()
    samples = sorted((s for shard in list_shards(cfg) for s in iter_samples(shard, cfg)), key=lambda s: s.sample_id)
    images = torch.stack([decode_resize_crop(s.payload, 96, 64)[0] for s in samples]).float() / 255
    images = (images - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)
    model = build_model(ModelConfig(source="torchvision", name="resnet18"))
    classes = torch.tensor([r["target_class"] for r in rows]).view(-1, 2)
    want = full_backward_reference(model, images, classes, method)
    got = torch.tensor([r["cam"] for r in rows], dtype=torch.float64).view(-1, 2, 2, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides, message", [
    (["data=imagefolder", "data.root=/no/such/dir"], "data.root='/no/such/dir' is not a directory"),
    (["data=webdataset", "data.shards=/no/such/*.tar"], "matches no file"),
    (["model=torchvision", "model.name=resnet5O"], "did you mean resnet50"),
    (["model=torchvision", "model.name=resnet18", "model.target_layer=layer5"], "did you mean layer"),
    (["model=torchvision", "model.name=resnet18", "model.weights=/no/weights.pth"], "file not found"),
    (["data.batch_size=0"], "data.batch_size=0"),
    (["cam.targets=topk", "cam.topk=9"], "cam.topk=9 is larger than the model's 4 classes"),
    (["cam.targets=classes", "cam.classes=[1,4]"], "cam.classes=[4] out of range"),
    (["cam.method=randomcam"], "cam.method='randomcam' is not valid"),
    (["model=checkpoint", "model.weights=/no/model.pt"], "file not found"),
])
def test_user_errors_are_one_line_exit_2_nothing_written(tmp_path, overrides, message):
    out = tmp_path / "out"
    result = run_cli(*overrides, f"output.dir={out}", "runtime.progress=false")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("gradcam-batch: error:"), result.stderr
    assert not out.exists()


def test_undecodable_image_becomes_error_row_and_run_goes_on(tmp_path):
    expected = make_imagefolder(tmp_path / "data", per_class=(2, 2))
    (tmp_path / "data" / "c0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "data" / "c1" / "empty.png").write_bytes(b"")
    summary = run_composed(*TINY_RESNET, "data=imagefolder", f"data.root={tmp_path / 'data'}",
                           f"output.dir={tmp_path / 'out'}")
    assert (summary.images, summary.errors) == (4, 2)
    assert sorted(read_cams(tmp_path / "out")["sample_id"].to_pylist()) == sorted(p for p, _ in expected)
    errors = pq.read_table(tmp_path / "out" / "errors" / "part-imagefolder-00000.parquet").to_pylist()
    assert sorted(e["sample_id"] for e in errors) == ["c0/broken.jpg", "c1/empty.png"]
    assert all(e["stage"] == "decode" and e["message"] for e in errors)
