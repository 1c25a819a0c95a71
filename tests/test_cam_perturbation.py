"""scorecam and ablationcam (issue 20): the engine on a random-init torchvision resnet18 (fixed
seed, CPU) against pytorch-grad-cam's ScoreCAM and AblationCAM, both against an independent
float64 loop over the channels (one perturbed forward at a time, through the whole model), the
channel subset, the chunking, AblationCAM's two routes (the network after the layer, or the
whole model with a hook), ViT token maps, and the one-line refusals."""

import copy
import logging

import numpy as np
import pytest
import torch
from torch import nn

from gradcam_batch import UserError
from gradcam_batch.config import CamConfig, ModelConfig
from gradcam_batch.engine import CamEngine
from gradcam_batch.methods import compute_cam
from gradcam_batch.models import build_model
from gradcam_batch.perturbation import chosen_channels, parse_channels
from reference import layer_output

SIZE = 64  # layer4 is 2x2


@pytest.fixture(scope="module")
def resnet18():
    return build_model(ModelConfig(source="torchvision", name="resnet18", seed=0))


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


def engine_for(model, method, layer=None, **cam):
    return CamEngine(model, model.layer4 if layer is None else layer, CamConfig(method=method, **cam),
                     torch.device("cpu"), num_classes=1000)


def float64_weights(model, layer, images, targets, method, channels=None):
    """The published weights by a plain loop: one perturbed input (scorecam) or one ablated
    channel (ablationcam, a hook replacing the layer's output) per forward, all in float64."""
    model = copy.deepcopy(model).double()
    layer = dict(model.named_modules())[layer]
    images = images.double()
    activations = layer_output(model, layer, images)
    batch, num_channels = activations.shape[:2]
    with torch.no_grad():
        logits = model(images)
    weights = torch.zeros(batch, targets.shape[1], num_channels, dtype=torch.float64)
    for b in range(batch):
        chosen = range(num_channels) if channels is None else channels[b].tolist()
        scores = torch.zeros(targets.shape[1], len(chosen), dtype=torch.float64)
        for n, c in enumerate(chosen):
            if method == "scorecam":
                mask = nn.functional.interpolate(activations[b:b + 1, c:c + 1], size=images.shape[-2:],
                                                 mode="bilinear", align_corners=True)
                mask = (mask - mask.min()) / (mask.max() - mask.min() + 1e-8)
                with torch.no_grad():
                    out = model(images[b:b + 1] * mask)
            else:
                ablated = activations[b:b + 1].clone()
                low = ablated.min()
                ablated[0, c] = 0.0 if low == 0 else low - 1e7
                handle = layer.register_forward_hook(lambda m, i, o: ablated)
                try:
                    with torch.no_grad():
                        out = model(images[b:b + 1])
                finally:
                    handle.remove()
            scores[:, n] = out[0, targets[b]]
        if method == "scorecam":
            measured = torch.softmax(scores, dim=1)
        else:
            original = logits[b, targets[b]].unsqueeze(1)
            measured = (original - scores) / original
        weights[b][:, list(chosen)] = measured
    return activations, weights


def maps_from_weights(activations, weights):
    gradients = weights[..., None, None].expand(*weights.shape, *activations.shape[-2:])
    return compute_cam(activations, gradients, "gradcam", normalize=False, dtype=torch.float64)


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_matches_pytorch_grad_cam(resnet18, images, method):
    cams = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    result = engine_for(resnet18, method)(images, torch.full((2,), -1))
    reference = copy.deepcopy(resnet18).requires_grad_(True)
    explainer_class = {"scorecam": cams.ScoreCAM, "ablationcam": cams.AblationCAM}[method]
    explainer = explainer_class(model=reference, target_layers=[reference.layer4])
    explainer.batch_size = 128
    explainer.get_target_width_height = lambda tensor: (2, 2)  # compare at the layer's resolution
    want = explainer(input_tensor=images, targets=[ClassifierOutputTarget(int(c)) for c in result.target_classes[:, 0]])
    np.testing.assert_allclose(result.cams[:, 0].numpy(), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_equal_a_float64_loop_over_channels(resnet18, images, method):
    """Two targets on fresh random images against the float64 loop, over a subset of the channels
    (the comparison with pytorch-grad-cam above covers all 512)."""
    fresh = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64).float()
    for channels in ("top:24", "top:5"):
        result = engine_for(resnet18, method, targets="topk", topk=2, channels=channels,
                            normalize=False)(fresh, torch.full((2,), -1))
        activations = layer_output(resnet18, resnet18.layer4, fresh)
        subset = chosen_channels(activations, parse_channels(channels))
        a64, weights = float64_weights(resnet18, "layer4", fresh, result.target_classes, method, subset)
        want = maps_from_weights(a64, weights)
        scale = want.abs().amax()
        torch.testing.assert_close(result.cams.double() / scale, want / scale, atol=1e-5, rtol=0)
        assert subset.shape == (2, parse_channels(channels))


def test_channel_subset_keeps_each_ablated_channels_weight(resnet18, images):
    """AblationCAM measures each channel alone: the top:N run's weights are the full run's on
    those channels and 0 elsewhere; ScoreCAM's softmax runs over the N measured channels."""
    full = engine_for(resnet18, "ablationcam")
    subset = engine_for(resnet18, "ablationcam", channels="top:7")
    targets = torch.tensor([[3], [9]])
    logits = resnet18(images).detach()
    output = layer_output(resnet18, resnet18.layer4, images)
    w_full = full.perturber.weights(images, output, targets, logits)
    w_sub = subset.perturber.weights(images, output, targets, logits)
    chosen = output.mean(dim=(2, 3)).topk(7, dim=1).indices
    for b in range(2):
        torch.testing.assert_close(w_sub[b, 0, chosen[b]], w_full[b, 0, chosen[b]], atol=1e-5, rtol=1e-4)
        others = torch.ones(512, dtype=torch.bool)
        others[chosen[b]] = False
        assert (w_sub[b, 0, others] == 0).all()
    score = engine_for(resnet18, "scorecam", channels="top:7").perturber.weights(images, output, targets, logits)
    torch.testing.assert_close(score.sum(dim=2), torch.ones(2, 1))
    assert ((score > 0).sum(dim=2) == 7).all()


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_chunk_size_does_not_change_the_maps(resnet18, images, method):
    runs = [engine_for(resnet18, method, channels="top:9", perturbation_batch=size)(images, torch.full((2,), -1))
            for size in (1, 7, 0)]
    for other in runs[1:]:
        torch.testing.assert_close(other.cams, runs[0].cams, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_out_of_memory_halves_the_sized_batch(resnet18, images, method, caplog):
    """cam.perturbation_batch=0 starts at the device's size and halves on out-of-memory until a
    chunk fits, with the same maps; a batch the user set is not changed (the error goes up)."""
    want = engine_for(resnet18, method, channels="top:9", perturbation_batch=1)(images, torch.full((2,), -1))
    engine = engine_for(resnet18, method, channels="top:9", perturbation_batch=0)
    perturber = engine.perturber
    route = perturber.split.tail if method == "ablationcam" else perturber.model
    sizes = []

    def limited(*inputs):
        sizes.append(inputs[0].shape[0])
        if inputs[0].shape[0] > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return route(*inputs)

    if method == "ablationcam":
        perturber.split = type(perturber.split)(perturber.split.prefix, limited, perturber.split.num_extras,
                                                perturber.split.from_images)
        perturber._checked = True
    else:
        perturber.model = limited
    with caplog.at_level(logging.WARNING, logger="gradcam_batch"):
        got = engine(images, torch.full((2,), -1))
    torch.testing.assert_close(got.cams, want.cams, atol=1e-5, rtol=0)
    # 18 perturbed items (2 images x 9 channels) at 64, 32, 16 and 8 fail; then chunks of 4
    assert perturber.batch == 4 and sizes[:4] == [18, 18, 16, 8] and sizes[4:] == [4, 4, 4, 4, 2]
    assert [f"cam.perturbation_batch now {n}" in caplog.text for n in (32, 16, 8, 4)] == [True] * 4
    fixed = engine_for(resnet18, method, channels="top:9", perturbation_batch=8)
    if method == "ablationcam":
        fixed.perturber.split = perturber.split
        fixed.perturber._checked = True
    else:
        fixed.perturber.model = limited
    with pytest.raises(torch.cuda.OutOfMemoryError):
        fixed(images, torch.full((2,), -1))


class Untraceable(nn.Module):
    """resnet18 behind a data-dependent branch, which torch.fx cannot trace."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        if x.sum() > 1e12:
            x = x * 0
        return self.model(x)


def test_ablation_falls_back_to_the_whole_model_with_the_same_maps(resnet18, images, caplog):
    wrapped = Untraceable(resnet18).eval()
    with caplog.at_level(logging.WARNING, logger="gradcam_batch"):
        fallback = CamEngine(wrapped, wrapped.model.layer4, CamConfig(method="ablationcam", channels="top:6"),
                             torch.device("cpu"))
    assert fallback.perturber.split is None
    assert "runs the whole model per ablated channel: torch.fx cannot trace" in caplog.text
    split = engine_for(resnet18, "ablationcam", channels="top:6")
    assert split.perturber.split is not None
    torch.testing.assert_close(fallback(images, torch.full((2,), -1)).cams,
                               split(images, torch.full((2,), -1)).cams, atol=1e-5, rtol=0)


def token_model(family):
    """A timm ViT (tokens read as (B, D, 14, 14)) or a small random Swin (channels-last 7x7 maps),
    and the size of its maps."""
    timm = pytest.importorskip("timm")
    from gradcam_batch.models import load_model

    if family == "vit":
        return load_model(ModelConfig(source="timm", name="vit_tiny_patch16_224"))[0], 14
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16,
                              depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), num_classes=10)
    return model.eval().requires_grad_(False), 7


@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_token_maps(method, family, caplog):
    """A timm ViT's tokens and a Swin's channels-last maps: ablation through the network after the
    layer (which also reads the residual stream from before it, and for Swin a relative position
    bias made from the parameters and the shapes of the residual stream) equals the float64 loop
    through the whole model; scorecam masks with the token maps."""
    from gradcam_batch.layers import resolve_target_layers

    model, grid = token_model(family)
    fresh = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(9))
    layers = resolve_target_layers(model, "auto", fresh)
    engine = CamEngine(model, layers, CamConfig(method=method, channels="top:3", normalize=False), torch.device("cpu"))
    if method == "ablationcam":
        split = engine.perturber.split
        assert split is not None and split.num_extras >= 1
        assert all(split.from_images) if family == "vit" else not all(split.from_images)
    with caplog.at_level(logging.INFO, logger="gradcam_batch"):
        result = engine(fresh, torch.full((1,), -1))
    assert "whole model" not in caplog.text
    assert result.cams.shape == (1, 1, grid, grid)
    # the reference: the same channels, one whole-model float64 forward each
    view = layers[0].view
    tokens = layer_output(model, layers[0].module, fresh)
    chosen = chosen_channels(view(tokens), 3)
    reference = copy.deepcopy(model).double()
    module = reference.get_submodule(layers[0].name)
    with torch.no_grad():
        original = reference(fresh.double())[0, result.target_classes[0, 0]]
    tokens64 = layer_output(reference, module, fresh.double())
    maps64 = view(tokens64)
    weights = torch.zeros(1, 1, maps64.shape[1], dtype=torch.float64)
    scores = []
    for c in chosen[0].tolist():
        if method == "ablationcam":
            ablated = tokens64.clone()
            low = ablated.min()
            ablated[..., c] = 0.0 if low == 0 else low - 1e7
            handle = module.register_forward_hook(lambda m, i, o: ablated)
            try:
                with torch.no_grad():
                    scores.append(reference(fresh.double())[0, result.target_classes[0, 0]])
            finally:
                handle.remove()
        else:
            mask = nn.functional.interpolate(maps64[:, c:c + 1], size=(224, 224), mode="bilinear", align_corners=True)
            mask = (mask - mask.min()) / (mask.max() - mask.min() + 1e-8)
            with torch.no_grad():
                scores.append(reference(fresh.double() * mask)[0, result.target_classes[0, 0]])
    scores = torch.stack(scores)
    weights[0, 0, chosen[0]] = torch.softmax(scores, 0) if method == "scorecam" else (original - scores) / original
    want = maps_from_weights(maps64, weights)
    scale = want.abs().amax()
    torch.testing.assert_close(result.cams.double() / scale, want / scale, atol=1e-4, rtol=0)


def test_refusals_are_one_line(resnet18):
    for cam, match in [(dict(method="scorecam", channels="top:0"), "cam.channels='top:0' is not valid"),
                       (dict(method="ablationcam", channels="best:3"), "cam.channels='best:3' is not valid"),
                       (dict(method="scorecam", perturbation_batch=-1), "cam.perturbation_batch")]:
        with pytest.raises(UserError, match=match) as error:
            CamConfig(**cam)
        assert "\n" not in str(error.value)
    for method in ("scorecam", "ablationcam"):
        with pytest.raises(UserError, match=f"cam.method={method} has no Triton kernel"):
            engine_for(resnet18, method, backend="triton")
        with pytest.raises(UserError, match="measures one layer's channels"):
            from gradcam_batch.layers import MapView, TargetLayer
            layers = [TargetLayer(name, resnet18.get_submodule(name), MapView("nchw")) for name in ("layer3", "layer4")]
            CamEngine(resnet18, layers, CamConfig(method=method), torch.device("cpu"))
