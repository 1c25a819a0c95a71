"""No silent wrong results: maps without positive evidence (a model whose head gives every class
the same score), samples whose boxes the crop cuts away, and rows of fused maps. Each is null
where it has no value, counted in the summary and the manifest, and said out loud."""

import json
import tarfile

import numpy as np
import torch
import torchvision

from cli_helpers import TINY_RESNET, read_cams, run_cli, run_composed
from sample_data import add_member, encode

# 60 wide, 80 tall: resized to 64x85 and cropped to 64x64, the crop drops the top and bottom 10
# resized rows (about 9.4 rows of the original each)
KEPT = [5.0, 20.0, 40.0, 60.0]  # inside the crop
CUT_TOP = [5.0, 0.0, 40.0, 8.0]  # entirely above the crop
CUT_BOTTOM = [5.0, 76.0, 40.0, 80.0]  # entirely below it
BOXES = {"kept": [KEPT], "cut": [CUT_TOP], "none": [], "both-cut": [CUT_TOP, CUT_BOTTOM],
         "one-kept": [CUT_TOP, KEPT]}


def boxed_shard(path):
    """One sample per entry of BOXES, a 60x80 JPEG with those boxes (pixels) in its JSON."""
    rng = np.random.default_rng(7)
    with tarfile.open(path, "w") as tar:
        for key, boxes in BOXES.items():
            add_member(tar, f"{key}.jpg", encode(rng, "JPEG", size=(80, 60)))
            if boxes:
                add_member(tar, f"{key}.json", json.dumps({"boxes": boxes}).encode())
    return path


def zero_head_weights(path):
    """resnet18 (10 classes) whose last Linear is zero: every class scores 0 whatever the
    image, so no activation changes a score and every Grad-CAM map is all zero (as with
    torchvision's vit_b_16 built without weights, whose head starts at zero)."""
    model = torchvision.models.resnet18(num_classes=10)
    torch.nn.init.zeros_(model.fc.weight)
    torch.nn.init.zeros_(model.fc.bias)
    torch.save(model.state_dict(), path)
    return path


def test_an_all_zero_head_gives_null_box_metrics_a_zero_maps_line_and_a_warning(tmp_path):
    shard = boxed_shard(tmp_path / "shard.tar")
    weights = zero_head_weights(tmp_path / "zero-head.pt")
    args = [*TINY_RESNET, "model.num_classes=10", f"model.weights={weights}", "data=webdataset",
            f"data.shards={shard}", f"output.dir={tmp_path / 'out'}"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    rows = read_cams(tmp_path / "out").to_pylist()
    assert len(rows) == len(BOXES) and all(max(row["cam"]) == 0 for row in rows)
    for row in rows:
        # an empty map has no peak (argmax says cell 0), no energy and no region above the threshold
        assert row["pointing_hit"] is None and row["box_energy"] is None and row["box_iou"] is None, row["sample_id"]
        assert row["com_y"] is None and row["cam_max_raw"] == 0
    out = first.stdout.splitlines()
    assert "zero maps   5 of 5 maps have no positive evidence (all zero)" in out
    # two samples keep a box in the crop: their maps are left out of the pointing game, not
    # counted as misses; two more had boxes, all outside the crop
    assert "pointing    none on layer layer4 (all 2 boxed maps are all zero)" in out
    assert "boxes       2 samples' boxes lie outside the crop: left out of the box metrics" in out
    assert not any(line.startswith("box energy") for line in out)
    warnings = [line for line in first.stderr.splitlines() if "all zero" in line]
    assert len(warnings) == 1 and "5 of 5 maps" in warnings[0] and "model.weights" in warnings[0]
    assert "model.target_layer" in warnings[0]
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["zero_maps"] == {"zero": 5, "maps": 5}
    assert manifest["pointing"]["total"] == 0 and manifest["pointing"]["empty"] == 2

    second = run_cli(*args)  # nothing to do: the stored counts, and the same warning
    assert second.returncode == 0, second.stderr
    assert "nothing to do: the only unit was already complete" in second.stdout
    assert "zero maps   5 of 5 stored maps have no positive evidence (all zero)" in second.stdout.splitlines()
    assert "pointing    none on layer layer4 (all 2 boxed maps are all zero, stored)" in second.stdout.splitlines()
    assert any("5 of 5 maps" in line for line in second.stderr.splitlines())


def test_boxes_outside_the_crop_are_counted_and_fused_rows_carry_no_raw_maximum(tmp_path):
    shard = boxed_shard(tmp_path / "shard.tar")
    args = [*TINY_RESNET, "data=webdataset", f"data.shards={shard}", "model.target_layer=[layer3,layer4]",
            "cam.fuse=mean", f"output.dir={tmp_path / 'out'}"]
    summary = run_composed(*args)
    rows = read_cams(tmp_path / "out").to_pylist()
    fused = [row for row in rows if row["layer"] == "mean(layer3,layer4)"]
    assert len(fused) == len(BOXES) and len(rows) == 3 * len(BOXES)
    # a fused map combines normalized maps: its maximum is no raw evidence; each layer's row has its own
    assert all(row["cam_max_raw"] is None for row in fused)
    assert all(row["cam_max_raw"] > 0 for row in rows if row not in fused)
    for row in rows:
        has_box = row["sample_id"].split("/")[-1] in ("kept", "one-kept")
        assert (row["box_energy"] is not None) == has_box, row["sample_id"]
    # "cut" and "both-cut" had boxes, all outside the crop; "one-kept" keeps one
    assert summary.boxes_outside_crop == 2 and summary.pointing_total == 2
    assert summary.zero_maps == 0 and summary.maps_checked == 15
    lines = summary.lines()
    pointing = [line for line in lines if line.startswith("pointing")]
    assert len(pointing) == 1 and pointing[0].startswith(
        f"pointing    {summary.pointing_game:.3f} on layer mean(layer3,layer4) (")
    assert "boxes       2 samples' boxes lie outside the crop: left out of the box metrics" in lines
    assert "zero maps   0 of 15 maps have no positive evidence (all zero)" in lines
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["pointing"]["outside_crop"] == 2 and manifest["pointing"]["total"] == 2
    assert manifest["zero_maps"] == {"zero": 0, "maps": 15}
    again = run_composed(*args)  # the no-op rerun shows the stored counts
    assert "boxes       2 samples' boxes lie outside the crop: left out of the box metrics" in again.lines()
    assert [line for line in again.lines() if line.startswith("pointing")] == [pointing[0][:-1] + ", stored)"]


def test_the_pointing_line_names_the_layer_and_what_it_left_out():
    from gradcam_batch.summary import Summary

    summary = Summary(images=10, rows=20, errors=0, shards_written=1, shards_skipped=0, seconds=1.0,
                      images_per_second=10.0, output_dir="out", target_layer="layer3,layer4", pointing_hits=3,
                      pointing_total=4, box_energy_sum=2.0, box_iou_sum=1.0, pointing_empty=5,
                      boxes_outside_crop=1, zero_maps=12, maps_checked=20)
    lines = summary.lines()
    assert "zero maps   12 of 20 maps have no positive evidence (all zero)" in lines
    assert ("pointing    0.750 on layer layer4 (3/4 maps peak inside an object box; "
            "5 boxed maps left out: all zero)") in lines
    assert "box energy  0.500 of the map inside the boxes, IoU 0.250 (means over those maps)" in lines
    assert "boxes       1 sample's boxes lie outside the crop: left out of the box metrics" in lines
    summary.fuse = "max"
    assert any(line.startswith("pointing    0.750 on layer max(layer3,layer4) (") for line in summary.lines())
    assert summary.zero_maps_warning() is not None and "12 of 20 maps" in summary.zero_maps_warning()
    summary.zero_maps = 10  # half: not most
    assert summary.zero_maps_warning() is None
