"""finercam and shapleycam (issue 20): the engine against pytorch-grad-cam's FinerCAM and ShapleyCAM
and against the published formulas evaluated in float64 with an ordinary full backward (and a
full double backward for ShapleyCAM's Hessian-vector product) per image and target."""

import copy

import numpy as np
import pytest
import torch

from gradcam_batch.config import CamConfig, ModelConfig
from gradcam_batch.engine import CamEngine
from gradcam_batch.layers import MapView, TargetLayer
from gradcam_batch.methods import compute_cam
from gradcam_batch.models import build_model
from gradcam_batch.scores import comparison_classes

SIZE = 64


@pytest.fixture(scope="module")
def resnet18():
    return build_model(ModelConfig(source="torchvision", name="resnet18", seed=0))


class SmoothNet(torch.nn.Module):
    """SiLU and a softplus after the target layer: a head with a non-zero Hessian (ResNet's ReLU
    head has none), as in EfficientNet's last blocks."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.SiLU(),
                                        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.SiLU())
        self.target = torch.nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.head = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Conv2d(32, 48, 3, stride=2, padding=1),
                                        torch.nn.Softplus(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                        torch.nn.Linear(48, 20))
        with torch.no_grad():  # raw maps of order 1, so the normalization's 1e-7 is negligible
            self.head[-1].weight.mul_(1000)

    def forward(self, x):
        return self.head(self.target(self.stem(x)))


@pytest.fixture(scope="module")
def efficientnet():
    torch.manual_seed(0)
    return SmoothNet().eval()


def engine_for(model, layer, **cam):
    target = TargetLayer(layer, model.get_submodule(layer), MapView("nchw"))
    return CamEngine(model, [target], CamConfig(**cam), torch.device("cpu"))


def float64_reference(model, layer, images, classes, method, alpha=1.0, ranks=(1, 2, 3)):
    """Per image and target: a float64 copy of the model, a full forward, the score (the logit, or
    Finer-CAM's comparison with the classes nearest in logit), its gradient with the graph kept,
    the Hessian-vector product for ShapleyCAM, then the Grad-CAM formula."""
    model = copy.deepcopy(model).double().requires_grad_(True)
    module = model.get_submodule(layer)
    captured = {}
    handle = module.register_forward_hook(lambda m, i, o: captured.__setitem__("a", o))
    maps = []
    try:
        for b in range(images.shape[0]):
            for k in range(classes.shape[1]):
                logits = model(images[b:b + 1].double())[0]
                activation = captured["a"]
                target = int(classes[b, k])
                if method == "finercam":
                    distance = (logits.detach() - logits[target].detach()).abs().numpy()
                    order = [c for c in np.argsort(distance, kind="stable") if c != target]
                    others = [order[rank - 1] for rank in ranks]
                    probs = torch.softmax(logits, 0)
                    score = sum(probs[j] * (logits[target] - alpha * logits[j]) for j in others)
                    score = score / (sum(probs[j] for j in others) + 1e-9)
                else:
                    score = logits[target]
                (grad,) = torch.autograd.grad(score, activation, create_graph=method == "shapleycam")
                if method == "shapleycam":
                    (hvp,) = torch.autograd.grad(grad, activation, grad_outputs=activation.detach(), allow_unused=True)
                    grad = grad - 0.5 * (0 if hvp is None else hvp)
                maps.append(compute_cam(activation.detach(), grad.detach(), "gradcam", dtype=torch.float64)[0, 0])
    finally:
        handle.remove()
    return torch.stack(maps).view(*classes.shape, *maps[0].shape)


def test_finercam_matches_pytorch_grad_cam(resnet18):
    cams = pytest.importorskip("pytorch_grad_cam")
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    reference = copy.deepcopy(resnet18).requires_grad_(True)
    for alpha, ranks in ((1.0, [1, 2, 3]), (0.6, [2, 5])):
        result = engine_for(resnet18, "layer4", method="finercam", finer_alpha=alpha,
                            finer_comparison_categories=ranks)(images, torch.full((3,), -1))
        explainer = cams.FinerCAM(model=reference, target_layers=[reference.layer4])
        explainer.base_cam.get_target_width_height = lambda tensor: (2, 2)
        want = explainer(input_tensor=images, alpha=alpha, comparison_categories=ranks)
        np.testing.assert_allclose(result.cams[:, 0].numpy(), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["finercam", "shapleycam"])
def test_batched_targets_equal_float64_full_backward(efficientnet, method):
    images = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64).float()
    for analytic in ("auto", "off"):
        engine = engine_for(efficientnet, "target", method=method, targets="topk", topk=3, analytic=analytic,
                            finer_alpha=0.8)
        assert engine.head is None  # SiLU, a convolution, softplus follow: no linear head to read
        result = engine(images, torch.full((2,), -1))
        want = float64_reference(efficientnet, "target", images, result.target_classes, method, alpha=0.8)
        torch.testing.assert_close(result.cams.double(), want, atol=1e-4, rtol=0)


def test_shapley_correction_is_not_zero_and_matches_pytorch_grad_cam(efficientnet):
    """The Hessian term changes the maps on a smooth head, and equals pytorch-grad-cam's ShapleyCAM."""
    cams = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    shapley = engine_for(efficientnet, "target", method="shapleycam", normalize=False)(images, torch.full((2,), -1))
    gradcam = engine_for(efficientnet, "target", normalize=False)(images, torch.full((2,), -1))
    assert (shapley.cams - gradcam.cams).abs().max() > 1e-3 * gradcam.cams.abs().max()
    normalized = engine_for(efficientnet, "target", method="shapleycam")(images, torch.full((2,), -1))
    reference = copy.deepcopy(efficientnet).requires_grad_(True)
    explainer = cams.ShapleyCAM(model=reference, target_layers=[reference.target])
    explainer.get_target_width_height = lambda tensor: (8, 8)
    want = explainer(input_tensor=images, targets=[ClassifierOutputTarget(int(c)) for c in normalized.target_classes[:, 0]])
    np.testing.assert_allclose(normalized.cams[:, 0].numpy(), want, atol=1e-4, rtol=0)


def test_shapley_on_a_resnet_head_equals_gradcam(resnet18):
    """ReLU heads are piecewise linear: no second-order term, ShapleyCAM is Grad-CAM."""
    images = torch.randn(2, 3, SIZE, SIZE)
    a = engine_for(resnet18, "layer4", method="shapleycam", analytic="off")(images, torch.full((2,), -1))
    b = engine_for(resnet18, "layer4", analytic="off")(images, torch.full((2,), -1))
    torch.testing.assert_close(a.cams, b.cams, atol=1e-6, rtol=0)


def test_comparison_classes_rank_by_logit_nearness():
    logits = torch.tensor([[0.0, 5.0, 4.5, 1.0, 5.2, -3.0]])
    targets = torch.tensor([[1, 5]])
    got = comparison_classes(logits, targets, [1, 2, 3])
    assert got.tolist() == [[[4, 2, 3], [0, 3, 2]]]
    assert comparison_classes(logits, targets, [1, 9]).shape == (1, 2, 1)  # ranks past the classes dropped


def test_vit_tokens_shapley_with_attention():
    """timm ViT: ShapleyCAM differentiates twice through attention (PyTorch's reference attention
    is selected for it); the maps equal the float64 double backward on the token view."""
    pytest.importorskip("timm")
    from gradcam_batch.layers import resolve_target_layers
    from gradcam_batch.models import load_model

    model = load_model(ModelConfig(source="timm", name="vit_tiny_patch16_224"))[0]
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(8))
    layers = resolve_target_layers(model, "auto", images)
    result = CamEngine(model, layers, CamConfig(method="shapleycam"), torch.device("cpu"))(images, torch.full((1,), -1))
    reference = copy.deepcopy(model).double().requires_grad_(True)
    captured = {}
    handle = reference.get_submodule(layers[0].name).register_forward_hook(lambda m, i, o: captured.__setitem__("a", o))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            logits = reference(images.double())
            tokens = captured["a"]
            (grad,) = torch.autograd.grad(logits[0, result.target_classes[0, 0]], tokens, create_graph=True)
            (hvp,) = torch.autograd.grad(grad, tokens, grad_outputs=tokens.detach())
    finally:
        handle.remove()
    view = layers[0].view
    want = compute_cam(view(tokens.detach()), view((grad - 0.5 * hvp).detach()), "gradcam", dtype=torch.float64)
    torch.testing.assert_close(result.cams.double(), want, atol=1e-4, rtol=0)
