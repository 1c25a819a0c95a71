"""Per-map statistics and box metrics against float64 references written out cell by cell, and
the columns a run writes with them (boxes from WebDataset JSON and Parquet, resized maps,
heatmap PNGs, faithfulness)."""

import io
import json
import math
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cli_helpers import TINY_RESNET, read_cams, run_composed
from gradcam_batch.statistics import box_metrics, map_statistics
from sample_data import add_member, encode

GENERATOR = torch.Generator().manual_seed(11)


def reference_statistics(cam: np.ndarray) -> dict:
    """One map's statistics, cell by cell in float64."""
    height, width = cam.shape
    cam = np.maximum(cam.astype(np.float64), 0)
    mass = cam.sum()
    if mass <= 0:
        return {key: math.nan for key in ("com_y", "com_x", "entropy", "center_mass", "border_mass")}
    com_y = com_x = entropy = central = border = 0.0
    for i in range(height):
        for j in range(width):
            p = cam[i, j] / mass
            cy, cx = (i + 0.5) / height, (j + 0.5) / width
            com_y += p * cy
            com_x += p * cx
            if p > 0:
                entropy -= p * math.log(p)
            if 0.25 <= cy <= 0.75 and 0.25 <= cx <= 0.75:
                central += p
            edge_y = cy <= 0.125 or cy >= 0.875 or i in (0, height - 1)
            edge_x = cx <= 0.125 or cx >= 0.875 or j in (0, width - 1)
            if edge_y or edge_x:
                border += p
    cells = height * width
    return {"com_y": com_y, "com_x": com_x, "entropy": entropy / math.log(cells) if cells > 1 else math.nan,
            "center_mass": central, "border_mass": border}


@pytest.mark.parametrize("height, width", [(7, 7), (14, 14), (4, 4), (5, 9), (16, 16), (1, 1)])
def test_map_statistics_equal_the_cell_by_cell_reference(height, width):
    maps = torch.rand(3, 2, height, width, generator=GENERATOR)
    maps[0, 1] = 0  # all zero: no distribution
    maps[1, 0] = 0
    maps[1, 0, height // 2, width // 2] = 0.7  # one cell: entropy 0, centre of mass on it
    maps[2, 1] = 0.25  # uniform: entropy 1
    got = map_statistics(maps)
    for b in range(3):
        for k in range(2):
            want = reference_statistics(maps[b, k].numpy())
            for key, value in want.items():
                assert got[key].shape == (3, 2) and got[key].dtype == torch.float32
                np.testing.assert_allclose(got[key][b, k].item(), value, atol=1e-6, equal_nan=True,
                                           err_msg=f"{key} of map {b},{k} ({height}x{width})")
    if height * width > 1:
        assert got["entropy"][1, 0].item() == 0 and abs(got["entropy"][2, 1].item() - 1) < 1e-6


def test_border_band_and_central_region_on_a_7x7_map():
    central = torch.zeros(1, 1, 7, 7)
    central[..., 2:5, 2:5] = 1  # cells 2..4 have centres in [0.25, 0.75]
    frame = torch.zeros(1, 1, 7, 7)
    frame[..., 0, :] = frame[..., -1, :] = frame[..., :, 0] = frame[..., :, -1] = 1  # a watermark-like frame
    assert map_statistics(central)["center_mass"].item() == pytest.approx(1.0)
    assert map_statistics(central)["border_mass"].item() == 0
    assert map_statistics(frame)["border_mass"].item() == pytest.approx(1.0)
    assert map_statistics(frame)["center_mass"].item() == 0


def reference_box_metrics(cam: np.ndarray, boxes: list, crop: int, threshold: float) -> tuple:
    """(hit, energy, iou) of one map, in float64, boxes in [0, 1] of the crop."""
    height, width = cam.shape
    peak = int(np.argmax(cam))
    y, x = (peak // width + 0.5) / height, (peak % width + 0.5) / width
    hit = any(x0 - 0.5 / width <= x <= x1 + 0.5 / width and y0 - 0.5 / height <= y <= y1 + 0.5 / height
              for x0, y0, x1, y1 in boxes)
    up = F.interpolate(torch.from_numpy(cam).double()[None, None], size=(crop, crop), mode="bilinear",
                       align_corners=False)[0, 0].numpy().clip(0)
    inside = np.zeros((crop, crop), bool)
    for row in range(crop):
        for column in range(crop):
            cy, cx = (row + 0.5) / crop, (column + 0.5) / crop
            inside[row, column] = any(x0 <= cx <= x1 and y0 <= cy <= y1 for x0, y0, x1, y1 in boxes)
    energy = (up * inside).sum() / up.sum() if up.sum() > 0 else 0.0
    on = up >= threshold
    union = (on | inside).sum()
    return hit, energy, (on & inside).sum() / union if union else 0.0


def test_box_metrics_equal_the_reference():
    crop, threshold = 32, 0.5
    maps = torch.rand(3, 2, 7, 7, generator=GENERATOR)
    boxes = torch.full((3, 3, 4), float("nan"))
    boxes[0, 0] = torch.tensor([0.1, 0.2, 0.6, 0.7])
    boxes[0, 1] = torch.tensor([0.5, 0.5, 0.95, 0.9])  # two boxes: their union counts
    boxes[1, 0] = torch.tensor([0.0, 0.0, 0.3, 0.3])  # sample 2 has none
    peak = maps.flatten(2).argmax(dim=2)
    got = box_metrics(maps, peak, boxes, crop, threshold)
    assert got["known"].tolist() == [True, True, False]
    for b in range(2):
        listed = [box.tolist() for box in boxes[b] if not torch.isnan(box).any()]
        for k in range(2):
            hit, energy, iou = reference_box_metrics(maps[b, k].numpy(), listed, crop, threshold)
            assert bool(got["pointing_hit"][b, k]) == hit
            assert got["box_energy"][b, k].item() == pytest.approx(energy, abs=1e-5)
            assert got["box_iou"][b, k].item() == pytest.approx(iou, abs=1e-6)


def test_pointing_hit_with_a_peak_in_either_box():
    maps = torch.zeros(2, 1, 4, 4)
    maps[0, 0, 0, 0] = 1  # top-left cell: in the first box
    maps[1, 0, 3, 3] = 1  # bottom-right cell: in the second box only
    boxes = torch.tensor([[[0.0, 0.0, 0.25, 0.25], [0.75, 0.75, 1.0, 1.0]]] * 2)
    got = box_metrics(maps, maps.flatten(2).argmax(dim=2), boxes, 16, 0.5)
    assert got["pointing_hit"][:, 0].tolist() == [True, True]
    far = torch.tensor([[[0.5, 0.0, 0.7, 0.2]]] * 2)  # neither peak (with half a cell of slack)
    assert box_metrics(maps, maps.flatten(2).argmax(dim=2), far, 16, 0.5)["pointing_hit"][:, 0].tolist() == [False, False]



def test_box_metrics_of_an_all_zero_map_are_undefined_and_written_as_null():
    from gradcam_batch.writer import ShardOutput, cam_table

    crop, threshold = 16, 0.5
    maps = torch.rand(2, 2, 4, 4, generator=GENERATOR)
    maps[0, 1] = 0  # no positive evidence: its argmax (cell 0) is no peak, and it has no energy
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5]], [[0.25, 0.25, 1.0, 1.0]]])
    peak = maps.flatten(2).argmax(dim=2)
    got = box_metrics(maps, peak, boxes, crop, threshold)
    assert got["empty"].tolist() == [[False, True], [False, False]]
    assert math.isnan(got["box_energy"][0, 1]) and math.isnan(got["box_iou"][0, 1])
    for b, k in ((0, 0), (1, 0), (1, 1)):
        hit, energy, iou = reference_box_metrics(maps[b, k].numpy(), [boxes[b, 0].tolist()], crop, threshold)
        assert bool(got["pointing_hit"][b, k]) == hit and got["box_iou"][b, k].item() == pytest.approx(iou, abs=1e-6)
        assert got["box_energy"][b, k].item() == pytest.approx(energy, abs=1e-5)
    columns = {"box_known": got["known"].numpy(), "map_empty": got["empty"].numpy(),
               **{key: got[key].numpy() for key in ("pointing_hit", "box_energy", "box_iou")}}
    out = ShardOutput("s", ["a", "b"], np.array([-1, -1]), np.array([[1, 2], [1, 2]]), np.ones((2, 2)),
                      np.ones((2, 2)), maps.numpy(), maps.flatten(2).mean(2).numpy(), peak.numpy(),
                      layer_columns=[columns])
    table = cam_table(out)
    for key in ("pointing_hit", "box_energy", "box_iou"):
        assert [value is None for value in table[key].to_pylist()] == [False, True, False, False], key


def test_boxes_the_crop_cut_away_are_told_apart_from_no_boxes():
    maps = torch.rand(3, 1, 4, 4, generator=GENERATOR)
    boxes = torch.full((3, 2, 4), float("nan"))
    boxes[0, 0] = torch.tensor([0.0, 0.0, 1.0, 0.0])  # clamped to the crop's top edge: no area left
    boxes[1, 0] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    boxes[1, 1] = torch.tensor([0.2, 0.2, 0.6, 0.6])  # one box survives
    got = box_metrics(maps, maps.flatten(2).argmax(dim=2), boxes, 16, 0.5)
    assert got["known"].tolist() == [False, True, False]
    assert got["outside_crop"].tolist() == [True, False, False]  # sample 2 never had a box

# --- whole runs ------------------------------------------------------------------------------

def make_boxed_webdataset(path, count=4, seed=0):
    """`count` 80x60 JPEGs; sample i has i boxes (as `boxes`) in its JSON, sample 0 none."""
    rng = np.random.default_rng(seed)
    expected = {}
    with tarfile.open(path, "w") as tar:
        for index in range(count):
            key = f"s{index:03d}"
            add_member(tar, f"{key}.jpg", encode(rng, "JPEG", size=(80, 60)))
            boxes = [[5.0 + 10 * j, 4.0, 40.0 + 10 * j, 50.0] for j in range(index)]
            if boxes:
                add_member(tar, f"{key}.json", json.dumps({"boxes": boxes}).encode())
            expected[key] = boxes
    return expected


def test_rows_carry_statistics_and_box_metrics(tmp_path):
    expected = make_boxed_webdataset(tmp_path / "shard.tar")
    summary = run_composed(*TINY_RESNET, "data=webdataset", f"data.shards={tmp_path / 'shard.tar'}",
                           "cam.targets=topk", "cam.topk=2", f"output.dir={tmp_path / 'out'}")
    rows = {(r["sample_id"], r["target_rank"]): r for r in read_cams(tmp_path / "out").to_pylist()}
    assert len(rows) == 2 * len(expected)
    for (sample_id, rank), row in rows.items():
        cam = np.asarray(row["cam"], np.float32).reshape(row["cam_height"], row["cam_width"])
        want = reference_statistics(cam)
        for key, value in want.items():
            if math.isnan(value):  # undefined: stored as null, never NaN
                assert row[key] is None, key
            else:
                np.testing.assert_allclose(row[key], value, atol=1e-5, err_msg=key)
        assert row["cam_max_raw"] > 0 and row["pred_class"] == rows[(sample_id, 0)]["target_class"]
        has_boxes = bool(expected[sample_id.split("/")[-1]])
        for key in ("pointing_hit", "box_energy", "box_iou"):
            assert (row[key] is not None) == has_boxes, (sample_id, key)
        assert row["cam_resized"] is None and row["heatmap_png"] is None and row["insertion"] is None
    boxed = [r for (s, k), r in rows.items() if k == 0 and r["pointing_hit"] is not None]
    assert summary.pointing_total == len(boxed) == 3
    assert summary.pointing_hits == sum(r["pointing_hit"] for r in boxed)
    assert summary.box_energy_sum == pytest.approx(sum(r["box_energy"] for r in boxed), abs=1e-4)


def test_parquet_boxes_column(tmp_path):
    rng = np.random.default_rng(3)
    images = [encode(rng, "JPEG", size=(64, 64)) for _ in range(3)]
    boxes = [[[0.0, 0.0, 32.0, 32.0]], None, [[10.0, 10.0, 60.0, 60.0], [0.0, 0.0, 8.0, 8.0]]]
    pq.write_table(pa.table({"image": images, "label": [0, 1, 2], "boxes": boxes}), tmp_path / "data.parquet")
    run_composed(*TINY_RESNET, "data=parquet", f"data.shards={tmp_path / 'data.parquet'}",
                 f"output.dir={tmp_path / 'out'}")
    rows = sorted(read_cams(tmp_path / "out").to_pylist(), key=lambda r: r["sample_id"])
    assert [r["box_energy"] is not None for r in rows] == [True, False, True]
    # the whole crop of a 64x64 image resized to 64: a box covering the top-left quarter holds
    # exactly that quarter's share of the map's energy
    cam = torch.tensor(rows[0]["cam"]).view(1, 1, rows[0]["cam_height"], rows[0]["cam_width"])
    up = F.interpolate(cam.double(), size=(64, 64), mode="bilinear", align_corners=False).clamp_min(0)[0, 0]
    assert rows[0]["box_energy"] == pytest.approx((up[:32, :32].sum() / up.sum()).item(), abs=1e-5)


def test_resized_maps_and_heatmaps(tmp_path):
    from gradcam_batch.audit import jet

    make_boxed_webdataset(tmp_path / "shard.tar", count=2)
    run_composed(*TINY_RESNET, "data=webdataset", f"data.shards={tmp_path / 'shard.tar'}", "output.cam_size=input",
                 "output.heatmap_png=true", f"output.dir={tmp_path / 'out'}")
    table = read_cams(tmp_path / "out")
    assert table.schema.field("cam_resized").type == pa.list_(pa.float16())
    for row in table.to_pylist():
        assert (row["cam_resized_height"], row["cam_resized_width"]) == (64, 64)
        cam = torch.tensor(row["cam"]).view(1, 1, row["cam_height"], row["cam_width"])
        want = F.interpolate(cam.double(), size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
        got = torch.tensor(np.asarray(row["cam_resized"], np.float32)).view(64, 64)
        torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=0)  # float16: 11 bits
        heatmap = np.asarray(Image.open(io.BytesIO(row["heatmap_png"])))
        assert heatmap.shape == (64, 64, 3) and heatmap.dtype == np.uint8
        # the blend is half the jet colour of the map: where the map peaks, red dominates blue
        colour = (jet(want.float()) * 255).numpy()
        y, x = np.unravel_index(int(want.argmax()), want.shape)
        assert colour[y, x, 0] > colour[y, x, 2] and heatmap[y, x, 0] >= colour[y, x, 0] / 2 - 1
    run_composed(*TINY_RESNET, "data=webdataset", f"data.shards={tmp_path / 'shard.tar'}", "output.cam_size=[8,12]",
                 f"output.dir={tmp_path / 'other'}")
    row = read_cams(tmp_path / "other").to_pylist()[0]
    assert (row["cam_resized_height"], row["cam_resized_width"], len(row["cam_resized"])) == (8, 12, 96)


def test_faithfulness_columns_equal_the_module(tmp_path):
    from gradcam_batch.faithfulness import faithfulness
    from gradcam_batch.models import build_model
    from gradcam_batch.config import ModelConfig

    make_boxed_webdataset(tmp_path / "shard.tar", count=3)
    run_composed(*TINY_RESNET, "data=webdataset", f"data.shards={tmp_path / 'shard.tar'}",
                 "metrics.faithfulness=true", "metrics.fractions=[0.2,0.5]", f"output.dir={tmp_path / 'out'}")
    rows = sorted(read_cams(tmp_path / "out").to_pylist(), key=lambda r: r["sample_id"])
    assert all(len(r["insertion"]) == len(r["deletion"]) == 2 and r["confidence_change"] is not None for r in rows)
    # the same maps through the module directly: the images as the pipeline fed them
    from gradcam_batch.config import DataConfig
    from gradcam_batch.data.readers import iter_samples
    from gradcam_batch.data.shards import list_shards
    from gradcam_batch.data.transforms import decode_resize_crop

    cfg = DataConfig(format="webdataset", shards=str(tmp_path / "shard.tar"), resize=64, crop=64).resolved()
    samples = sorted((s for shard in list_shards(cfg) for s in iter_samples(shard, cfg)), key=lambda s: s.sample_id)
    images = torch.stack([decode_resize_crop(s.payload, 64, 64)[0] for s in samples]).float() / 255
    images = (images - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)
    model = build_model(ModelConfig(source="torchvision", name="resnet18"))
    cams = torch.stack([torch.tensor(r["cam"]).view(1, r["cam_height"], r["cam_width"]) for r in rows])
    targets = torch.tensor([[r["target_class"]] for r in rows])
    want = faithfulness(model, images, cams, targets, (0.2, 0.5))
    got = torch.tensor([r["insertion"] for r in rows])
    torch.testing.assert_close(got, want.insertion[:, 0], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(torch.tensor([r["deletion"] for r in rows]), want.deletion[:, 0], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(torch.tensor([r["confidence_change"] for r in rows]), want.confidence_change[:, 0],
                               atol=1e-4, rtol=1e-3)
    for row in rows:
        assert row["drop_in_confidence"] == pytest.approx(max(-row["confidence_change"], 0.0), abs=1e-7)
        assert row["increase_in_confidence"] == (row["confidence_change"] > 0)


def test_raw_max_is_the_unnormalized_maximum(tmp_path):
    make_boxed_webdataset(tmp_path / "shard.tar", count=3)
    for name, normalize in (("normalized", "true"), ("raw", "false")):
        run_composed(*TINY_RESNET, "data=webdataset", f"data.shards={tmp_path / 'shard.tar'}",
                     f"cam.normalize={normalize}", f"output.dir={tmp_path / name}")
    normalized = {r["sample_id"]: r for r in read_cams(tmp_path / "normalized").to_pylist()}
    for row in read_cams(tmp_path / "raw").to_pylist():
        assert max(row["cam"]) == pytest.approx(row["cam_max_raw"], rel=1e-6)
        assert normalized[row["sample_id"]]["cam_max_raw"] == pytest.approx(row["cam_max_raw"], rel=1e-4)
        assert max(normalized[row["sample_id"]]["cam"]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("override, message", [
    ("output.cam_size=[0,4]", "output.cam_size=[0, 4] is not valid"),
    ("output.cam_size=full", "output.cam_size='full' is not valid"),
    ("metrics.fractions=[0,0.5]", "metrics.fractions=[0.0, 0.5] is not valid"),
    ("metrics.threshold=2", "metrics.threshold=2.0 is not valid"),
])
def test_bad_audit_options_are_one_line(tmp_path, override, message):
    from cli_helpers import run_cli

    result = run_cli(*TINY_RESNET, override, f"output.dir={tmp_path / 'out'}")
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_several_boxes_follow_the_resize_and_crop_like_one():
    from gradcam_batch.data.transforms import decode_resize_crop, map_box

    payload = encode(np.random.default_rng(5), "JPEG", size=(500, 375))
    boxes = [[10.0, 20.0, 200.0, 300.0], [250.0, 30.0, 490.0, 370.0]]
    _, together = decode_resize_crop(payload, 256, 224, box=boxes)
    assert together == [decode_resize_crop(payload, 256, 224, box=box)[1] for box in boxes]
    big = encode(np.random.default_rng(5), "JPEG", size=(2000, 1500))  # DCT-scaled decode: its own geometry
    _, together = decode_resize_crop(big, 256, 224, box=[[b * 4 for b in box] for box in boxes])
    assert together == [decode_resize_crop(big, 256, 224, box=[b * 4 for b in box])[1] for box in boxes]
    assert map_box(boxes, 375, 500, 256, 224) == [map_box(box, 375, 500, 256, 224) for box in boxes]


@pytest.mark.parametrize("meta, want", [
    ({"box": [1, 2, 30, 40]}, [[1.0, 2.0, 30.0, 40.0]]),
    ({"boxes": [1, 2, 30, 40]}, [[1.0, 2.0, 30.0, 40.0]]),  # one box given as `boxes`
    ({"boxes": [[1, 2, 30, 40], [5, 5, 6, 6]]}, [[1.0, 2.0, 30.0, 40.0], [5.0, 5.0, 6.0, 6.0]]),
    ({"boxes": "everywhere"}, None),
    ({"boxes": [[1, 2, 3]], "box": None}, None),  # three numbers
    ({"boxes": [[30, 2, 1, 40]]}, None),  # x1 < x0
    ({"boxes": [[True, 0, 1, 1]]}, None),  # booleans are not coordinates
    ({"boxes": [[0, 0, float("inf"), 1]]}, None),
    ({"boxes": [[0, 0, 1, 1], "junk", [2, 2, 3, 3]]}, [[0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 3.0, 3.0]]),
    ({"boxes": [[[0, 0, 1, 1]]]}, None),  # nested one level too deep
    ("not a dict", None),
    (None, None),
])
def test_boxes_from_hostile_metadata(meta, want):
    from gradcam_batch.data.transforms import boxes_from_meta

    assert boxes_from_meta(meta) == want


def test_at_most_64_boxes_are_read():
    from gradcam_batch.data.transforms import MAX_BOXES, boxes_from_meta

    boxes = boxes_from_meta({"boxes": [[i, i, i + 1, i + 1] for i in range(10_000)]})
    assert len(boxes) == MAX_BOXES == 64


def test_undefined_statistics_are_stored_as_null_not_nan():
    from gradcam_batch.writer import ShardOutput, cam_table

    maps = torch.rand(2, 1, 3, 3, generator=GENERATOR)
    maps[0] = 0  # an all-zero map: no distribution
    statistics = {key: value.numpy() for key, value in map_statistics(maps).items()}
    out = ShardOutput("s", ["a", "b"], np.array([-1, -1]), np.array([[1], [2]]), np.ones((2, 1)), np.ones((2, 1)),
                      maps.numpy(), maps.flatten(2).mean(2).numpy(), maps.flatten(2).argmax(2).numpy(),
                      layer_columns=[statistics])
    table = cam_table(out)
    for key in statistics:
        assert table[key].null_count == 1 and table[key][0].as_py() is None, key
        assert table[key][1].as_py() == pytest.approx(float(statistics[key][1, 0]))
    assert not any(np.isnan(v) for v in table["entropy"].drop_null().to_pylist())
