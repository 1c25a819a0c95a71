"""The engine on a random-init torchvision resnet18 (fixed seed, CPU, fp32) against
(1) pytorch-grad-cam, the widely used reference implementation, one target per call, and
(2) a float64 evaluation of the formula on activations and gradients taken with a full,
ordinary backward pass per image and per target."""

import copy

import numpy as np
import pytest
import torch

from gradcam_batch.config import CamConfig, ModelConfig
from gradcam_batch.engine import CamEngine
from gradcam_batch.methods import METHODS, compute_cam, normalize_maps
from gradcam_batch.models import build_model
from reference import full_backward_reference

SIZE = 128  # layer4 is 4x4: small enough for CPU, large enough for non-trivial maps


@pytest.fixture(scope="module")
def resnet18():
    return build_model(ModelConfig(source="torchvision", name="resnet18", seed=0))


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))


def engine_for(model, method="gradcam", **cam):
    cfg = CamConfig(method=method, **cam)
    return CamEngine(model, model.layer4, cfg, torch.device("cpu"), num_classes=1000)


@pytest.mark.parametrize("method", METHODS)
def test_matches_pytorch_grad_cam(resnet18, images, method):
    cams = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    classes_by_method = {"gradcam": cams.GradCAM, "gradcampp": cams.GradCAMPlusPlus, "xgradcam": cams.XGradCAM,
                         "hirescam": cams.HiResCAM, "layercam": cams.LayerCAM,
                         "elementwise": cams.GradCAMElementWise}
    result = engine_for(resnet18, method, targets="topk", topk=3)(images, torch.full((4,), -1))
    reference_model = copy.deepcopy(resnet18).requires_grad_(True)
    explainer = classes_by_method[method](model=reference_model, target_layers=[reference_model.layer4])
    explainer.get_target_width_height = lambda tensor: (4, 4)  # compare at the layer's resolution
    for k in range(3):
        targets = [ClassifierOutputTarget(int(c)) for c in result.target_classes[:, k]]
        want = explainer(input_tensor=images, targets=targets)
        np.testing.assert_allclose(result.cams[:, k].numpy(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_batched_targets_match_float64_full_backward(resnet18, images, method):
    result = engine_for(resnet18, method, targets="topk", topk=3)(images, torch.full((4,), -1))
    want = full_backward_reference(resnet18, images, result.target_classes, method)
    assert result.cams.dtype == torch.float32 and result.cams.shape == (4, 3, 4, 4)
    torch.testing.assert_close(result.cams.double(), want, atol=1e-5, rtol=0)


def test_scores_probs_and_topk_order(resnet18, images):
    result = engine_for(resnet18, targets="topk", topk=5)(images, torch.full((4,), -1))
    with torch.no_grad():
        logits = resnet18(images)
    torch.testing.assert_close(result.target_classes, logits.topk(5, dim=1).indices)
    torch.testing.assert_close(result.scores, logits.gather(1, result.target_classes), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.probs, logits.softmax(1).gather(1, result.target_classes), atol=1e-6, rtol=1e-5)
    flat = result.cams.flatten(2)
    torch.testing.assert_close(result.peak, flat.argmax(2))
    torch.testing.assert_close(result.cam_mean, flat.mean(2))


def test_backward_stops_at_target_layer(resnet18, images):
    fired = []
    handle = resnet18.conv1.register_full_backward_hook(lambda *args: fired.append(True))
    try:
        engine_for(resnet18, targets="topk", topk=2)(images, torch.full((4,), -1))
    finally:
        handle.remove()
    assert not fired, "the backward ran below the target layer"
    assert all(p.grad is None for p in resnet18.parameters())


def test_samples_do_not_mix(resnet18, images):
    engine = engine_for(resnet18, "gradcampp", targets="topk", topk=2)
    together = engine(images, torch.full((4,), -1))
    alone = engine(images[2:3], torch.full((1,), -1))
    torch.testing.assert_close(together.cams[2:3], alone.cams, atol=1e-5, rtol=0)
    torch.testing.assert_close(together.target_classes[2:3], alone.target_classes)


def test_label_and_class_targets(resnet18, images):
    labels = torch.tensor([3, -1, 999, 5000])  # unknown and out-of-range labels fall back to pred
    result = engine_for(resnet18, targets="label")(images, labels)
    with torch.no_grad():
        pred = resnet18(images).argmax(1)
    assert result.target_classes[:, 0].tolist() == [3, int(pred[1]), 999, int(pred[3])]
    result = engine_for(resnet18, targets="classes", classes=[7, 1])(images, labels)
    assert result.target_classes.tolist() == [[7, 1]] * 4
    want = full_backward_reference(resnet18, images, result.target_classes, "gradcam")
    torch.testing.assert_close(result.cams.double(), want, atol=1e-5, rtol=0)


def test_unnormalized_keeps_raw_relu_values(resnet18, images):
    result = engine_for(resnet18, "layercam", normalize=False)(images, torch.full((4,), -1))
    raw = full_backward_reference(resnet18, images, result.target_classes, "layercam")  # normalized
    assert (result.cams >= 0).all() and result.cams.amax() > 1.0 + 1e-3  # not squashed to [0, 1]
    torch.testing.assert_close(normalize_maps(result.cams.double()), raw, atol=1e-5, rtol=0)


def test_out_of_memory_halves_the_batch_and_logs_once(resnet18, images, caplog):
    class TightMemory(CamEngine):
        calls = []

        def __call__(self, images, labels):
            self.calls.append(images.shape[0])
            if images.shape[0] > 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return super().__call__(images, labels)

    cfg = CamConfig(method="gradcam", targets="topk", topk=2)
    tight = TightMemory(resnet18, resnet18.layer4, cfg, torch.device("cpu"), num_classes=1000)
    with caplog.at_level("WARNING", logger="gradcam_batch"):
        result = tight.explain(images, torch.full((4,), -1))
        tight.explain(images[:2], torch.full((2,), -1))
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "out of memory at batch 4" in caplog.records[0].message
    assert tight.calls[:7] == [4, 2, 1, 1, 2, 1, 1]
    whole = engine_for(resnet18, targets="topk", topk=2)(images, torch.full((4,), -1))
    torch.testing.assert_close(result.cams, whole.cams, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.target_classes, whole.target_classes)


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "elementwise"])
def test_triton_backend_matches_torch_backend(resnet18, images, method):
    """The engine with the fused kernel (Triton's interpreter on CPU) against the PyTorch path."""
    pytest.importorskip("triton")
    cfg = dict(method=method, targets="topk", topk=3)
    kernel = CamEngine(resnet18, resnet18.layer4, CamConfig(backend="triton", **cfg), torch.device("cpu"))
    assert kernel.backend == "triton"
    got = kernel(images[:2], torch.full((2,), -1))
    want = engine_for(resnet18, **cfg)(images[:2], torch.full((2,), -1))
    torch.testing.assert_close(got.cams, want.cams, atol=1e-4, rtol=0)
