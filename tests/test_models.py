"""Model building from every source and target-layer resolution."""

import pytest
import torch
import torchvision

from gradcam_batch import UserError
from gradcam_batch.config import ModelConfig
from gradcam_batch.models import DemoCNN, build_model, resolve_target_layer

SAMPLE = torch.zeros(1, 3, 64, 64)


def test_state_dict_file_and_frozen_eval(tmp_path):
    source = torchvision.models.resnet18(num_classes=10)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    model = build_model(ModelConfig(source="torchvision", name="resnet18", num_classes=10,
                                    weights=str(tmp_path / "r18.pth")))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    torch.testing.assert_close(model.fc.weight, source.fc.weight)


def test_weights_enum_from_hub_cache_only(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    cfg = ModelConfig(source="torchvision", name="resnet18", weights="IMAGENET1K_V1")
    with pytest.raises(UserError, match="not in the torch hub cache"):
        build_model(cfg)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    (tmp_path / "checkpoints").mkdir()
    source = torchvision.models.resnet18()
    torch.save(source.state_dict(), tmp_path / "checkpoints" / url.rsplit("/", 1)[-1])
    model = build_model(cfg)
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight)
    with pytest.raises(UserError, match="is not one of IMAGENET1K_V1"):
        build_model(ModelConfig(source="torchvision", name="resnet18", weights="IMAGENET9K"))


def test_mismatched_state_dict(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "w.pt")
    with pytest.raises(UserError, match="does not fit resnet18") as error:
        build_model(ModelConfig(source="torchvision", name="resnet18", weights=str(tmp_path / "w.pt")))
    # the message names the keys that differ, on one line
    assert "2 wrong shape: fc.weight (3, 512) vs (1000, 512), fc.bias" in str(error.value)
    assert "\n" not in str(error.value)


def test_state_dict_of_a_wrapped_model_names_missing_and_unexpected_keys(tmp_path):
    state = {f"module.{key}": value for key, value in torchvision.models.resnet18().state_dict().items()}
    torch.save(state, tmp_path / "ddp.pt")
    with pytest.raises(UserError) as error:
        build_model(ModelConfig(source="torchvision", name="resnet18", weights=str(tmp_path / "ddp.pt")))
    message = str(error.value)
    assert "missing: conv1.weight, bn1.weight, bn1.bias and" in message
    assert "unexpected: module.conv1.weight" in message and "strip the 'module.' prefix" in message
    assert "\n" not in message


def test_layer_with_one_cell_maps_is_refused():
    model = build_model(ModelConfig(source="torchvision", name="resnet18"))
    with pytest.raises(UserError, match="model.target_layer='avgpool' outputs 1x1 maps"):
        resolve_target_layer(model, "avgpool", SAMPLE)
    assert resolve_target_layer(model, "layer3", SAMPLE)[0] == "layer3"


def test_checkpoint_needs_trust(tmp_path):
    torch.save(DemoCNN(), tmp_path / "whole.pt")
    with pytest.raises(UserError, match="trust_checkpoint=true"):
        build_model(ModelConfig(source="checkpoint", weights=str(tmp_path / "whole.pt")))
    model = build_model(ModelConfig(source="checkpoint", weights=str(tmp_path / "whole.pt"), trust_checkpoint=True))
    assert isinstance(model, DemoCNN)


@pytest.mark.parametrize("name, layer", [("resnet18", "layer4"), ("mobilenet_v3_small", "features"),
                                         ("densenet121", "features")])
def test_auto_layer_is_last_spatial_module(name, layer):
    model = build_model(ModelConfig(source="torchvision", name=name))
    assert resolve_target_layer(model, "auto", SAMPLE)[0] == layer


def test_demo_auto_layer_and_named_layer():
    model = build_model(ModelConfig())
    assert resolve_target_layer(model, "auto", SAMPLE)[0] == "features"
    assert resolve_target_layer(model, "features.6", SAMPLE)[0] == "features.6"
