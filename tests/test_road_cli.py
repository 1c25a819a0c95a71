"""ROAD from the command line (issue 20): `metrics.road=true` writes road_morf, road_lerf and
road_combined per row, equal to road() on the same decoded images, maps and targets (road() itself
equals pytorch-grad-cam's ROAD metrics in test_road); without it the columns are null; changing
the percentiles makes a different output folder identity."""

import pytest
import torch

from cli_helpers import TINY_RESNET, read_cams, run_composed
from gradcam_batch import UserError
from gradcam_batch.config import MetricsConfig, ModelConfig
from gradcam_batch.models import build_model
from gradcam_batch.road import road
from sample_data import make_imagefolder
from test_cam_family_cli import decoded_images


def test_rows_hold_the_road_scores(tmp_path):
    make_imagefolder(tmp_path / "data", per_class=(2, 1))
    common = [*TINY_RESNET, "data=imagefolder", f"data.root={tmp_path / 'data'}", "cam.targets=topk", "cam.topk=2"]
    run_composed(*common, f"output.dir={tmp_path / 'out'}", "metrics.road=true", "metrics.road_percentiles=[25,75]",
                 "metrics.road_noise=0.02")
    rows = sorted(read_cams(tmp_path / "out").to_pylist(), key=lambda r: (r["sample_id"], r["target_rank"]))
    assert len(rows) == 6
    model = build_model(ModelConfig(source="torchvision", name="resnet18"))
    cams = torch.tensor([r["cam"] for r in rows]).view(3, 2, 2, 2)
    targets = torch.tensor([r["target_class"] for r in rows]).view(3, 2)
    want = road(model, decoded_images(tmp_path / "data"), cams, targets, (25.0, 75.0), noise=0.02,
                generator=torch.Generator().manual_seed(0))
    got_morf = torch.tensor([r["road_morf"] for r in rows]).view(3, 2, 2)
    got_lerf = torch.tensor([r["road_lerf"] for r in rows]).view(3, 2, 2)
    torch.testing.assert_close(got_morf, want.morf, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_lerf, want.lerf, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor([r["road_combined"] for r in rows]).view(3, 2), want.combined,
                               atol=1e-5, rtol=0)
    with pytest.raises(UserError):
        run_composed(*common, f"output.dir={tmp_path / 'out'}", "metrics.road=true",
                     "metrics.road_percentiles=[25,70]", "metrics.road_noise=0.02")
    run_composed(*common, f"output.dir={tmp_path / 'plain'}")
    assert all(r["road_morf"] is None and r["road_combined"] is None for r in read_cams(tmp_path / "plain").to_pylist())


@pytest.mark.parametrize("settings,match", [
    (dict(road_percentiles=[0, 50]), "metrics.road_percentiles"),
    (dict(road_percentiles=[]), "metrics.road_percentiles"),
    (dict(road_noise=-1), "metrics.road_noise"),
])
def test_bad_road_settings_are_one_line(settings, match):
    with pytest.raises(UserError, match=match) as error:
        MetricsConfig(**settings)
    assert "\n" not in str(error.value)
