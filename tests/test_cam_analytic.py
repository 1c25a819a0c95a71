"""cam.analytic and cam.method=cam (issue 20): where the head after the target layer is global
average pooling then one linear layer, the gradients are that layer's weights / HW; with a layer
norm over the channels between them (ConvNeXt), the layer norm's backward of those weights at the
image's pooled activations. The analytic path must equal the autograd path on every head it
accepts, refuse (fall back, logged) on heads it cannot prove, run no backward, and `cam` must equal
Zhou et al.'s formula in float64 (and be refused where a layer norm makes the weights per image)."""

import logging

import pytest
import torch
import torchvision
from torch import nn

from gradcam_batch import UserError
from gradcam_batch.config import CamConfig, ModelConfig
from gradcam_batch.engine import CamEngine
from gradcam_batch.head import linear_head, split_at
from gradcam_batch.layers import MapView, TargetLayer
from gradcam_batch.models import build_model

SIZE = 64


class MeanHead(nn.Module):
    """A hand-written head: x.mean((2, 3)), eval-mode dropout, an identity, then a linear layer."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, stride=2))
        self.drop = nn.Dropout(0.3)
        self.keep = nn.Identity()
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.features(x).mean((2, 3))
        return self.fc(self.keep(self.drop(x)))


class NormHead(MeanHead):
    """Pooling, flatten, nn.LayerNorm over the channels, then the linear layer."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(24)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.fc(self.norm(torch.flatten(self.features(x).mean((2, 3), keepdim=True), 1)))


class SizeOneNormHead(MeanHead):
    """A layer norm over the singleton axis left by the pooling, not over the channels."""

    def forward(self, x):
        pooled = self.features(x).mean((2, 3), keepdim=True)
        return self.fc(torch.flatten(nn.functional.layer_norm(pooled, (1,)), 1))


class MlpHead(MeanHead):
    def forward(self, x):
        x = self.features(x).mean((2, 3))
        return self.fc(torch.relu(self.keep(x)))


def torchvision_model(name):
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=10).eval()


LINEAR = [("resnet18", "layer4"), ("efficientnet_b0", "features"), ("regnet_y_400mf", "trunk_output"),
          ("mean-head", "features")]
NORMED = [("convnext_tiny", "features"), ("timm-convnext", "stages"), ("norm-head", "features")]
"""Heads with a layer norm over the channels between the pooling and the linear layer."""
ACCEPTED = LINEAR + NORMED
REFUSED = [("mobilenet_v3_small", "features", "the pooling is followed by classifier.0"),
           ("size-one-norm", "features", "not a layer norm over the channels"),
           ("mlp-head", "features", "the pooling is followed by relu"),
           ("dropout-train", "features", "drop is a dropout in training mode"),
           ("resnet18", "layer3", "feeds 2 steps")]


def model_for(name):
    if name == "mean-head":
        torch.manual_seed(0)
        return MeanHead().eval()
    if name in ("mlp-head", "norm-head", "size-one-norm"):
        torch.manual_seed(0)
        return {"mlp-head": MlpHead, "norm-head": NormHead, "size-one-norm": SizeOneNormHead}[name]().eval()
    if name == "timm-convnext":
        timm = pytest.importorskip("timm")
        torch.manual_seed(0)
        return timm.create_model("convnext_atto", num_classes=10).eval()
    if name == "dropout-train":
        torch.manual_seed(0)
        model = MeanHead().eval()
        model.drop.train()
        return model
    return torchvision_model(name)


def engine_for(model, layer, **cam):
    target = TargetLayer(layer, model.get_submodule(layer), MapView("nchw"))
    return CamEngine(model, [target], CamConfig(**cam), torch.device("cpu"), num_classes=10)


@pytest.mark.parametrize("name,layer", ACCEPTED)
@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "layercam", "eigengradcam", "finercam"])
def test_analytic_equals_autograd(name, layer, method, caplog):
    model = model_for(name)
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(len(name)))
    with caplog.at_level(logging.INFO, logger="gradcam_batch"):
        fast = engine_for(model, layer, method=method, targets="topk", topk=2)
    assert fast.head is not None and "no backward" in caplog.text
    slow = engine_for(model, layer, method=method, targets="topk", topk=2, analytic="off")
    assert slow.head is None
    got, want = fast(images, torch.full((3,), -1)), slow(images, torch.full((3,), -1))
    torch.testing.assert_close(got.target_classes, want.target_classes)
    torch.testing.assert_close(got.cams, want.cams, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.layers[0].raw_max, want.layers[0].raw_max, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,layer,reason", REFUSED)
def test_unprovable_heads_fall_back_logged(name, layer, reason, caplog):
    model = model_for(name)
    with caplog.at_level(logging.INFO, logger="gradcam_batch"):
        engine = engine_for(model, layer)
    assert engine.head is None
    assert "cam.analytic=auto: running the backward" in caplog.text and reason in caplog.text
    with pytest.raises(UserError, match="cam.analytic=on: no analytic gradients") as error:
        engine_for(model, layer, analytic="on")
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="cam.method=cam needs a head of global average pooling") as error:
        engine_for(model, layer, method="cam")
    assert "\n" not in str(error.value)


def test_vit_class_token_head_is_refused(caplog):
    """timm's ViT: the final norm's output reaches the head through the class token (a getitem),
    the last block's tokens through attention; neither is pooling then a linear layer."""
    pytest.importorskip("timm")
    from gradcam_batch.models import load_model

    model = load_model(ModelConfig(source="timm", name="vit_tiny_patch16_224"))[0]
    for layer, reason in (("norm", "not global average pooling"), ("blocks.11.norm1", "reads values from before it")):
        split = split_at(model, layer)
        assert not isinstance(split, str)
        assert reason in linear_head(split)
    with caplog.at_level(logging.INFO, logger="gradcam_batch"):
        engine = CamEngine(model, [TargetLayer("norm", model.norm, MapView("tokens", 1, (14, 14)))],
                           CamConfig(), torch.device("cpu"))
    assert engine.head is None and "read as tokens" in caplog.text


def test_analytic_runs_no_backward(monkeypatch):
    model = build_model(ModelConfig(source="torchvision", name="resnet18", seed=0))
    engine = CamEngine(model, model.layer4, CamConfig(targets="topk", topk=3), torch.device("cpu"), num_classes=1000)

    def no_backward(*args, **kwargs):
        raise AssertionError("the analytic path ran a backward")
    monkeypatch.setattr(torch.autograd, "grad", no_backward)
    result = engine(torch.randn(2, 3, SIZE, SIZE), torch.full((2,), -1))
    assert result.cams.shape == (2, 3, 2, 2)


@pytest.mark.parametrize("name,layer", NORMED)
def test_a_layer_norm_head_every_class_at_once_equals_autograd_and_cam_is_refused(name, layer, caplog):
    """cam.targets=all through the layer norm: every class's map equals the backward's map of
    that class; cam (class weights) is refused in one line; shapleycam runs the backward (the
    layer norm's second derivative is not zero)."""
    model = model_for(name)
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    every = engine_for(model, layer, targets="all")(images, torch.full((2,), -1))
    each = engine_for(model, layer, targets="classes", classes=list(range(10)), analytic="off")(
        images, torch.full((2,), -1))
    order = every.target_classes[..., None, None].expand_as(each.cams)
    torch.testing.assert_close(every.cams, each.cams.gather(1, order), atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="the layer norm in .* makes the weights depend on the image") as error:
        engine_for(model, layer, method="cam")
    assert "\n" not in str(error.value)
    with caplog.at_level(logging.INFO, logger="gradcam_batch"):
        assert engine_for(model, layer, method="shapleycam").head is None
    assert "shapleycam's second-order term through the layer norm" in caplog.text


@pytest.mark.parametrize("name,layer", LINEAR)
def test_cam_equals_zhou_formula_in_float64(name, layer):
    """CAM (Zhou et al. 2016): M_t = sum_c W[t, c] A_c, ReLU, min-max; before normalization HW
    times Grad-CAM's map."""
    model = model_for(name)
    images = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64).float()
    result = engine_for(model, layer, method="cam", targets="topk", topk=3)(images, torch.full((2,), -1))
    captured = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: captured.__setitem__("a", o))
    with torch.no_grad():
        model(images)
    handle.remove()
    activations = captured["a"].double()
    weight = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].weight.double()
    raw = torch.relu(torch.einsum("bkc,bchw->bkhw", weight[result.target_classes], activations))
    flat = raw.flatten(2)
    low, high = flat.amin(2)[..., None, None], flat.amax(2)[..., None, None]
    torch.testing.assert_close(result.cams.double(), (raw - low) / (high - low + 1e-7), atol=1e-5, rtol=0)
    torch.testing.assert_close(result.layers[0].raw_max.double(), flat.amax(2), atol=1e-5, rtol=1e-5)
    gradcam = engine_for(model, layer, targets="topk", topk=3, analytic="off")(images, torch.full((2,), -1))
    spatial = activations.shape[-1] * activations.shape[-2]
    torch.testing.assert_close(result.layers[0].raw_max, gradcam.layers[0].raw_max * spatial, atol=1e-4, rtol=1e-4)


def test_config_rejects_unknown_analytic_mode():
    with pytest.raises(UserError, match="cam.analytic"):
        CamConfig(analytic="maybe")
