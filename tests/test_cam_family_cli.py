"""The new methods from the command line (issue 20): `gradcam-batch cam.method=...` writes rows whose
maps equal the engine's on the same decoded images (the engine is checked against pytorch-grad-cam
and float64 formulas in test_cam_perturbation, test_cam_analytic and test_cam_finer_shapley), and a
rerun that changes what the rows mean (cam.channels, cam.finer_alpha) is refused."""

import pytest
import torch

from cli_helpers import TINY_RESNET, read_cams, run_composed
from gradcam_batch import UserError
from gradcam_batch.config import CamConfig, DataConfig, ModelConfig
from gradcam_batch.data.readers import iter_samples
from gradcam_batch.data.shards import list_shards
from gradcam_batch.data.transforms import decode_resize_crop
from gradcam_batch.engine import CamEngine
from gradcam_batch.models import build_model
from sample_data import make_imagefolder

CASES = {
    "finercam": ["cam.finer_alpha=0.5"],
    "shapleycam": [],
    "cam": [],
    "scorecam": ["cam.channels=top:6", "cam.perturbation_batch=5"],
    "ablationcam": ["cam.channels=top:6"],
}


def decoded_images(root):
    cfg = DataConfig(format="imagefolder", root=str(root), resize=64, crop=64).resolved()
    samples = sorted((s for shard in list_shards(cfg) for s in iter_samples(shard, cfg)), key=lambda s: s.sample_id)
    images = torch.stack([decode_resize_crop(s.payload, 64, 64)[0] for s in samples]).float() / 255
    return (images - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)


@pytest.mark.parametrize("method", list(CASES))
def test_rows_equal_the_engine(tmp_path, method):
    make_imagefolder(tmp_path / "data", per_class=(2, 1))
    out = tmp_path / "out"
    run_composed(*TINY_RESNET, "data=imagefolder", f"data.root={tmp_path / 'data'}", f"cam.method={method}",
                 "cam.targets=topk", "cam.topk=2", f"output.dir={out}", *CASES[method])
    rows = sorted(read_cams(out).to_pylist(), key=lambda r: (r["sample_id"], r["target_rank"]))
    assert len(rows) == 6 and all(r["cam"] is not None for r in rows)
    options = dict(item.split("=", 1) for item in CASES[method])
    cam = CamConfig(method=method, targets="topk", topk=2,
                    finer_alpha=float(options.get("cam.finer_alpha", 1.0)),
                    channels=options.get("cam.channels", "all"))
    model = build_model(ModelConfig(source="torchvision", name="resnet18"))
    want = CamEngine(model, model.layer4, cam, torch.device("cpu"), num_classes=1000)(
        decoded_images(tmp_path / "data"), torch.full((3,), -1))
    assert [r["target_class"] for r in rows] == want.target_classes.flatten().tolist()
    got = torch.tensor([r["cam"] for r in rows]).view(3, 2, 2, 2)
    torch.testing.assert_close(got, want.cams, atol=1e-5, rtol=0)
    if method in ("scorecam", "finercam"):
        changed = "cam.channels=top:7" if method == "scorecam" else "cam.finer_alpha=0.7"
        with pytest.raises(UserError, match="refus|differ|another|different"):
            run_composed(*TINY_RESNET, "data=imagefolder", f"data.root={tmp_path / 'data'}", f"cam.method={method}",
                         "cam.targets=topk", "cam.topk=2", f"output.dir={out}", *CASES[method], changed)
