"""Every torchvision classification model: auto layer choice and the capture work (random weights)."""

import math

import pytest
import torch
import torchvision

from gradcam_batch.config import CamConfig, ModelConfig
from gradcam_batch.engine import CamEngine
from gradcam_batch.models import build_model, resolve_target_layers

# The largest variants repeat a smaller sibling's code (vit_b_16, vit_b_32, regnet_y_16gf) and
# would take two of this suite's minutes just to initialise their weights on 2 cores.
LARGEST = {"vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_128gf", "regnet_y_32gf"}
CLASSIFIERS = sorted(set(torchvision.models.list_models(module=torchvision.models)) - LARGEST)
# Architectures that only take their training resolution (position embeddings, fixed windows).
FIXED_SIZE = ("vit_", "maxvit")


@pytest.mark.slow
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_auto_layer_and_capture(name):
    size = 224 if name.startswith(FIXED_SIZE) else 96
    model = build_model(ModelConfig(source="torchvision", name=name))
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    layers = resolve_target_layers(model, "auto", images[:1])
    layer_name = layers[0].name
    engine = CamEngine(model, layers, CamConfig(targets="topk", topk=2), torch.device("cpu"))
    result = engine(images, torch.full((2,), -1))
    height, width = result.cams.shape[2:]
    assert height * width > 1, f"{name}: {layer_name} gives {height}x{width} maps"
    assert torch.isfinite(result.cams).all() and result.cams.min() >= 0 and result.cams.max() <= 1
    assert torch.isfinite(result.scores).all() and not math.isnan(result.probs.sum().item())
