"""cam.targets=all (issue 20): every class's map for each image as one matrix product with the final
linear layer's weights, ranked by logit; statistics for every (image, class), maps only for
cam.keep_maps; the same numbers as asking for those classes one by one; refusals in one line."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from cli_helpers import TINY_RESNET, read_cams, run_composed
from gradcam_batch import UserError
from gradcam_batch.config import CamConfig, ModelConfig
from gradcam_batch.engine import CamEngine
from gradcam_batch.methods import compute_cam
from gradcam_batch.models import build_model
from sample_data import make_imagefolder

SIZE = 64


@pytest.fixture(scope="module")
def resnet18():
    return build_model(ModelConfig(source="torchvision", name="resnet18", seed=0))


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "cam"])
def test_every_class_equals_the_formula_and_the_per_class_run(resnet18, method):
    images = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64).float()
    engine = CamEngine(resnet18, resnet18.layer4, CamConfig(method=method, targets="all"), torch.device("cpu"),
                       num_classes=1000)
    result = engine(images, torch.full((2,), -1))
    raw = CamEngine(resnet18, resnet18.layer4, CamConfig(method=method, targets="all", normalize=False),
                    torch.device("cpu"), num_classes=1000)(images, torch.full((2,), -1))
    assert result.cams.shape == (2, 1000, 2, 2)
    logits = resnet18(images).detach()
    assert (logits.gather(1, result.target_classes).diff(dim=1) <= 0).all()  # ranked by logit
    assert sorted(result.target_classes[0].tolist()) == list(range(1000))
    # float64: Grad-CAM's weights of a pooling-then-linear head are W[t] / HW (CAM: W[t])
    captured = {}
    handle = resnet18.layer4.register_forward_hook(lambda m, i, o: captured.__setitem__("a", o.detach()))
    resnet18(images)
    handle.remove()
    a = captured["a"].double()
    weights = resnet18.fc.weight.detach().double()[result.target_classes] / (1 if method == "cam" else 4)
    want = compute_cam(a, weights[..., None, None].expand(*weights.shape, 2, 2), "gradcam", normalize=False,
                       dtype=torch.float64)
    # raw maps, relative to the largest of the batch: after min-max, a map whose values barely
    # differ magnifies float32 rounding (the normalized maps are compared per class below)
    scale = want.abs().amax()
    torch.testing.assert_close(raw.cams.double() / scale, want / scale, atol=1e-6, rtol=0)
    # the same maps and statistics as asking for some classes through the backward
    picked = [int(result.target_classes[0, 0]), 5, 999]
    if method != "cam":
        one = CamEngine(resnet18, resnet18.layer4, CamConfig(method=method, targets="classes", classes=picked,
                                                             analytic="off"), torch.device("cpu"))(images, torch.full((2,), -1))
        for k, cls in enumerate(picked):
            for b in range(2):
                at = int((result.target_classes[b] == cls).nonzero())
                torch.testing.assert_close(result.cams[b, at], one.cams[b, k], atol=1e-5, rtol=0)
                for name, values in result.layers[0].statistics.items():
                    torch.testing.assert_close(values[b, at], one.layers[0].statistics[name][b, k], atol=1e-5, rtol=1e-4)


def test_rows_keep_maps_only_for_the_kept_classes(tmp_path):
    make_imagefolder(tmp_path / "data", per_class=(2, 1))
    common = [*TINY_RESNET, "data=imagefolder", f"data.root={tmp_path / 'data'}"]
    summary = run_composed(*common, "cam.targets=all", "cam.keep_maps=[3,7]", f"output.dir={tmp_path / 'all'}")
    table = read_cams(tmp_path / "all")
    assert table.num_rows == 3 * 1000 and summary.rows == 3000
    rows = table.to_pylist()
    for row in rows:
        assert (row["cam"] is not None) == (row["target_class"] in (3, 7))
        assert row["cam_height"] == 2 and row["cam_max_raw"] is not None
        assert (row["entropy"] is not None) == (row["cam_max_raw"] > 0)  # all-zero maps: null statistics
    # the rows of one class equal a run that asks for that class alone
    run_composed(*common, "cam.targets=classes", "cam.classes=[7,500]", f"output.dir={tmp_path / 'two'}")
    alone = {(r["sample_id"], r["target_class"]): r for r in read_cams(tmp_path / "two").to_pylist()}
    for row in rows:
        other = alone.get((row["sample_id"], row["target_class"]))
        if other is None:
            continue
        for name in ("prob", "score", "entropy", "com_y", "com_x", "cam_max_raw", "center_mass"):
            assert (row[name] is None) == (other[name] is None), name
            if row[name] is not None:
                assert row[name] == pytest.approx(other[name], abs=1e-5, rel=1e-4), name
        if row["cam"] is not None:
            np.testing.assert_allclose(row["cam"], other["cam"], atol=1e-5)
    ranks = [r for r in rows if r["target_rank"] == 0]
    assert len(ranks) == 3 and all(r["target_class"] == r["pred_class"] for r in ranks)
    assert summary.maps_checked == 3  # the zero-map count speaks of the top-ranked maps
    # the report reads such a folder (rows without maps are not damaged rows)
    report = subprocess.run([sys.executable, "-m", "gradcam_batch.report", str(tmp_path / "all"), "--no-strategies",
                             "--out", str(tmp_path / "report.html")], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report.html").stat().st_size > 0


def test_refusals_are_one_line(tmp_path):
    for cam, match in [(dict(targets="all", method="gradcampp"), "cam.targets=all computes every class's map"),
                       (dict(targets="all", analytic="off"), "needs the analytic head"),
                       (dict(targets="pred", keep_maps=[1]), "cam.keep_maps=\\[1\\] applies to cam.targets=all")]:
        with pytest.raises(UserError, match=match) as error:
            CamConfig(**cam)
        assert "\n" not in str(error.value)
    mobilenet = build_model(ModelConfig(source="torchvision", name="mobilenet_v3_small", seed=0))
    with pytest.raises(UserError, match="cam.targets=all needs a head of global average pooling"):
        CamEngine(mobilenet, mobilenet.features, CamConfig(targets="all"), torch.device("cpu"))
    model = build_model(ModelConfig(source="torchvision", name="resnet18", seed=0))
    with pytest.raises(UserError, match="cam.keep_maps=\\[1000\\] out of range"):
        CamEngine(model, model.layer4, CamConfig(targets="all", keep_maps=[1000]), torch.device("cpu"), num_classes=1000)
    make_imagefolder(tmp_path / "data", per_class=(1, 1))
    for extra in ("metrics.faithfulness=true", "metrics.road=true", "output.heatmap_png=true", "output.cam_size=input"):
        with pytest.raises(UserError, match="cam.targets=all writes a row per class per image") as error:
            run_composed(*TINY_RESNET, "data=imagefolder", f"data.root={tmp_path / 'data'}", "cam.targets=all",
                         extra, f"output.dir={tmp_path / 'out'}")
        assert "\n" not in str(error.value)
