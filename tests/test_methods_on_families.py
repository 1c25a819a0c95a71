"""Every cam.method on the map kinds the model families give (issue 20): Swin's channels-last
maps (timm) and token maps with class and distillation tokens (Hugging Face DeiT) give finite,
normalized maps of the layer's grid for every method, or a one-line refusal naming why (`cam`
needs a pooling-then-linear head, which neither has)."""

import pytest
import torch

from gradcam_batch import UserError
from gradcam_batch.config import CamConfig, ModelConfig
from gradcam_batch.engine import CamEngine
from gradcam_batch.layers import MapView, resolve_target_layers
from gradcam_batch.methods import ALL_METHODS
from gradcam_batch.models import load_model


def timm_swin():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16,
                              depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), num_classes=10)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return model.eval().requires_grad_(False), images, MapView("nhwc"), 7


def hf_deit(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, image_size=32, patch_size=8, num_labels=5)
    transformers.DeiTForImageClassification(config).save_pretrained(tmp_path)
    model = load_model(ModelConfig(source="huggingface", name=str(tmp_path)))[0]
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, images, MapView("tokens", 2, (4, 4)), 4


@pytest.mark.parametrize("family", ["timm-swin", "huggingface-deit"])
def test_every_method_gives_maps_or_one_line(family, tmp_path):
    model, images, view, grid = timm_swin() if family == "timm-swin" else hf_deit(tmp_path)
    layers = resolve_target_layers(model, "auto", images[:1])
    assert layers[0].view == view
    for method in ALL_METHODS:
        config = CamConfig(method=method, channels="top:3" if method in ("scorecam", "ablationcam") else "all")
        if method == "cam":
            with pytest.raises(UserError, match="needs a head of global average pooling then one linear layer") as error:
                CamEngine(model, layers, config, torch.device("cpu"))
            assert "\n" not in str(error.value)
            continue
        result = CamEngine(model, layers, config, torch.device("cpu"))(images, torch.full((2,), -1))
        cams = result.cams
        assert cams.shape == (2, 1, grid, grid), method
        assert torch.isfinite(cams).all(), method
        peak = cams.amax(dim=(-2, -1))
        assert ((cams >= 0) & (cams <= 1 + 1e-6)).all(), method
        # each map is min-max normalized (peak max / (max + eps), eps 1e-7) or all zero
        assert ((peak > 0.99) | (peak == 0)).all() and (peak > 0.99).any(), method
