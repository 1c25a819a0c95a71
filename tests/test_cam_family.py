"""eigencam, eigengradcam, kpcacam and fem (issue 20): methods.py against an independent float64 NumPy
transcription of the published formulas (numpy.linalg.svd for the principal component), the
engine on a random-init torchvision resnet18 (fixed seed, CPU, eval mode) against
pytorch-grad-cam's EigenCAM, EigenGradCAM, KPCA_CAM and FEM, the gradient-free path (no backward, one map
for the K targets), ViT token maps, and the one-line refusals."""

import copy

import numpy as np
import pytest
import torch

from gradcam_batch import UserError
from gradcam_batch.config import CamConfig, ModelConfig
from gradcam_batch.engine import CamEngine
from gradcam_batch.methods import (ALL_METHODS, EXTRA_METHODS, compute_cam, first_component_maps,
                                   kernel_component_maps)
from gradcam_batch.models import build_model
from reference import full_backward_reference, layer_output

SIZE = 128  # layer4 is 4x4, as in test_engine


def numpy_projection(x: np.ndarray) -> np.ndarray:
    """The EigenCAM paper's map of one (C, H, W): centred (HW, C) projected on the first right
    singular vector, sign as NumPy's SVD returns it (arbitrary)."""
    matrix = x.reshape(x.shape[0], -1).T
    matrix = matrix - matrix.mean(axis=0)
    _, _, vt = np.linalg.svd(matrix, full_matrices=False)
    return (matrix @ vt[0]).reshape(x.shape[1:])


def numpy_kpca(x: np.ndarray) -> np.ndarray:
    """Kernel PCA's first component of one (C, H, W) over its positions: sigmoid kernel
    tanh(<x, y> / C + 1) on the centred (HW, C) matrix, centred in feature space, the top
    eigenvector times the square root of its eigenvalue (sign arbitrary)."""
    matrix = x.reshape(x.shape[0], -1).T
    matrix = matrix - matrix.mean(axis=0)
    kernel = np.tanh(matrix @ matrix.T / x.shape[0] + 1)
    ones = np.full_like(kernel, 1 / len(kernel))
    kernel = kernel - ones @ kernel - kernel @ ones + ones @ kernel @ ones
    values, vectors = np.linalg.eigh(kernel)
    return (vectors[:, -1] * np.sqrt(max(values[-1], 0))).reshape(x.shape[1:])


def numpy_fem(a: np.ndarray, k: float = 2.0) -> np.ndarray:
    means = a.mean(axis=(1, 2))
    stds = a.std(axis=(1, 2))  # population std, as pytorch-grad-cam's np.std
    weights = (a > (means + k * stds)[:, None, None]).mean(axis=(1, 2))
    return (weights[:, None, None] * a).sum(0)


def positive_sign(projection: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The projection whose covariance with x's mean over channels is positive."""
    covariance = ((projection - projection.mean()) * (x.mean(0) - x.mean(0).mean())).sum()
    return -projection if covariance < 0 else projection


def relu_min_max(cam: np.ndarray, normalize: bool) -> np.ndarray:
    cam = np.maximum(cam, 0)
    return (cam - cam.min()) / (cam.max() - cam.min() + 1e-7) if normalize else cam


# (B, C, H, W): HW < C takes the X X^T route, HW > C the X^T X route, HW == 1 a single position
SHAPES = [(3, 9, 2, 3), (3, 5, 4, 6), (2, 4, 1, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", EXTRA_METHODS)
@pytest.mark.parametrize("normalize", [True, False])
def test_formula_matches_float64_numpy(shape, method, normalize):
    generator = torch.Generator().manual_seed(11 + len(method))
    a = torch.relu(torch.randn(*shape, generator=generator, dtype=torch.float64))
    g = torch.randn(shape[0], 2, *shape[1:], generator=generator, dtype=torch.float64)
    got = compute_cam(a, g, method, normalize=normalize, dtype=torch.float64)
    assert got.shape == (shape[0], 2, *shape[2:])
    for b in range(shape[0]):
        for k in range(2):
            an, gn = a[b].numpy(), g[b, k].numpy()
            if method == "fem":
                cam = numpy_fem(an)
            elif method == "kpcacam":
                cam = positive_sign(numpy_kpca(an), an)
            else:
                x = an if method == "eigencam" else gn * an
                cam = positive_sign(numpy_projection(x), x)
            np.testing.assert_allclose(got[b, k].numpy(), relu_min_max(cam, normalize), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("method", ["eigencam", "kpcacam", "fem"])
def test_gradient_free_methods_need_no_gradients(method):
    a = torch.rand(2, 6, 3, 3, generator=torch.Generator().manual_seed(1))
    without = compute_cam(a, None, method)
    assert without.shape == (2, 1, 3, 3)
    torch.testing.assert_close(compute_cam(a, torch.randn(2, 3, 6, 3, 3), method), without.expand(2, 3, 3, 3))
    with pytest.raises(ValueError, match="'eigengradcam' needs gradients"):
        compute_cam(a, None, "eigengradcam")


def test_first_component_float32_sign_and_routes():
    """fp32 against float64 on the shapes the engine meets (ResNet layer4 at 224: 7x7x512; a
    ViT-B/16 token grid: 14x14x768), and the sign rule on both Gram routes."""
    generator = torch.Generator().manual_seed(5)
    for shape in [(4, 512, 7, 7), (2, 768, 14, 14), (3, 16, 8, 8)]:
        x = torch.relu(torch.randn(*shape, generator=generator)) * torch.rand(1, 1, *shape[2:], generator=generator)
        got = first_component_maps(x)
        want = first_component_maps(x.double())
        scale = want.flatten(1).abs().amax(1).view(-1, 1, 1)
        torch.testing.assert_close((got.double() / scale), want / scale, atol=1e-5, rtol=0)
        for b in range(shape[0]):
            projection = numpy_projection(x[b].double().numpy())
            np.testing.assert_allclose(want[b].numpy(), positive_sign(projection, x[b].double().numpy()),
                                       atol=1e-9 * float(scale[b]), rtol=0)
            centred_mean = x[b].mean(0) - x[b].mean()
            assert float((got[b] * centred_mean).sum()) > 0


@pytest.mark.parametrize("method", EXTRA_METHODS)
def test_constant_maps_are_zero_not_nan(method):
    cams = compute_cam(torch.ones(2, 4, 3, 3), torch.zeros(2, 4, 3, 3), method)
    assert torch.isfinite(cams).all() and (cams == 0).all()


# --- the engine against pytorch-grad-cam ---------------------------------------------------------

@pytest.fixture(scope="module")
def resnet18():
    return build_model(ModelConfig(source="torchvision", name="resnet18", seed=0))


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))


def engine_for(model, method, layer=None, **cam):
    return CamEngine(model, model.layer4 if layer is None else layer, CamConfig(method=method, **cam),
                     torch.device("cpu"), num_classes=1000)


def layer4_activations(model, images):
    return layer_output(model, model.layer4, images)


def min_max(maps: np.ndarray) -> np.ndarray:
    maps = np.maximum(maps, 0)
    flat = maps.reshape(len(maps), -1)
    low, high = flat.min(1)[:, None, None], flat.max(1)[:, None, None]
    return (maps - low) / (high - low + 1e-7)


@pytest.mark.parametrize("method", EXTRA_METHODS)
def test_matches_pytorch_grad_cam(resnet18, images, method):
    cams = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_kernel

    explainer_class = {"eigencam": cams.EigenCAM, "eigengradcam": cams.EigenGradCAM, "kpcacam": cams.KPCA_CAM,
                       "fem": cams.FEM}[method]
    result = engine_for(resnet18, method, targets="topk", topk=3)(images, torch.full((4,), -1))
    assert result.cams.shape == (4, 3, 4, 4)
    reference_model = copy.deepcopy(resnet18).requires_grad_(True)
    explainer = explainer_class(model=reference_model, target_layers=[reference_model.layer4])
    explainer.get_target_width_height = lambda tensor: (4, 4)  # compare at the layer's resolution
    if method in ("eigencam", "kpcacam"):  # the map before ReLU, to check the sign and build the negated map
        activations = layer4_activations(resnet18, images)
        if method == "eigencam":
            theirs_raw = get_2d_projection(activations.numpy())
            ours_raw = first_component_maps(activations).numpy()
        else:
            theirs_raw = get_2d_projection_kernel(activations.numpy())
            ours_raw = kernel_component_maps(activations).numpy()
        flipped = [np.allclose(ours_raw[b], -theirs_raw[b], atol=1e-4 * np.abs(ours_raw[b]).max()) for b in range(4)]
        for b in range(4):
            assert flipped[b] or np.allclose(ours_raw[b], theirs_raw[b], atol=1e-4 * np.abs(ours_raw[b]).max())
            assert (ours_raw[b] * (activations[b].mean(0) - activations[b].mean()).numpy()).sum() > 0
    for k in range(3):
        targets = [ClassifierOutputTarget(int(c)) for c in result.target_classes[:, k]]
        want = explainer(input_tensor=images, targets=targets)
        if method == "eigengradcam":
            # up to the sign: each map equals theirs, or the map of their negated projection
            theirs_negated = min_max(-explainer_raw(explainer, images, targets))
            for b in range(4):
                ours = result.cams[b, k].numpy()
                assert (np.allclose(ours, want[b], atol=1e-4, rtol=0)
                        or np.allclose(ours, theirs_negated[b], atol=1e-4, rtol=0)), (b, k)
        elif method in ("eigencam", "kpcacam"):
            negated = min_max(-theirs_raw)
            for b in range(4):
                np.testing.assert_allclose(result.cams[b, k].numpy(), negated[b] if flipped[b] else want[b],
                                           atol=1e-4, rtol=0)
        else:
            np.testing.assert_allclose(result.cams[:, k].numpy(), want, atol=1e-4, rtol=0)


def explainer_raw(explainer, images, targets):
    """EigenGradCAM's projection before ReLU: their get_2d_projection on their own A * G."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    explainer(input_tensor=images, targets=targets)
    holder = explainer.activations_and_grads
    return get_2d_projection(holder.gradients[0].numpy() * holder.activations[0].numpy())


def test_sign_differs_from_pytorch_grad_cam_only_where_theirs_is_inverted(resnet18, images):
    """pytorch-grad-cam's projection keeps LAPACK's sign: on -A it returns the same map as on A,
    so one of the two is inverted. Ours follows the data (negated on -A) and always correlates
    positively with the channel mean; it equals theirs on A here and their negation on -A."""
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    activations = layer4_activations(resnet18, images)
    for sign in (1, -1):
        x = sign * activations
        ours, theirs = first_component_maps(x).numpy(), get_2d_projection(x.numpy())
        np.testing.assert_allclose(ours, sign * theirs, atol=1e-4 * np.abs(ours).max(), rtol=0)
        centred_mean = (x.mean(1) - x.mean(dim=(1, 2, 3))[:, None, None]).numpy()
        assert ((ours * centred_mean).sum(axis=(1, 2)) > 0).all()


@pytest.mark.parametrize("method", EXTRA_METHODS)
def test_batched_targets_match_float64_full_backward(resnet18, images, method):
    """eigengradcam's K targets from the engine's one batched, truncated backward against an
    ordinary full backward per image and target, the formula in float64."""
    result = engine_for(resnet18, method, targets="topk", topk=3)(images, torch.full((4,), -1))
    want = full_backward_reference(resnet18, images, result.target_classes, method)
    assert result.cams.dtype == torch.float32 and result.cams.shape == (4, 3, 4, 4)
    torch.testing.assert_close(result.cams.double(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["eigencam", "kpcacam", "fem"])
def test_gradient_free_runs_no_backward_and_shares_the_map(resnet18, images, method, monkeypatch):
    def no_backward(*args, **kwargs):
        raise AssertionError("a gradient-free method ran a backward")
    monkeypatch.setattr(torch.autograd, "grad", no_backward)
    monkeypatch.setattr(torch.Tensor, "backward", no_backward)
    result = engine_for(resnet18, method, targets="topk", topk=3)(images, torch.full((4,), -1))
    assert result.cams.shape == (4, 3, 4, 4)
    torch.testing.assert_close(result.cams, result.cams[:, :1].expand(-1, 3, -1, -1))
    with torch.no_grad():
        logits = resnet18(images)
    torch.testing.assert_close(result.target_classes, logits.topk(3, dim=1).indices)
    torch.testing.assert_close(result.scores, logits.gather(1, result.target_classes), atol=1e-5, rtol=1e-5)
    alone = engine_for(resnet18, method)(images[1:2], torch.full((1,), -1))
    torch.testing.assert_close(alone.cams[:, 0], result.cams[1:2, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", EXTRA_METHODS)
def test_triton_backend_is_refused_in_one_line(resnet18, method):
    with pytest.raises(UserError, match=f"cam.method={method} has no Triton kernel") as error:
        engine_for(resnet18, method, backend="triton")
    assert "\n" not in str(error.value)
    assert engine_for(resnet18, method, backend="auto").backend == "torch"


def test_config_accepts_the_new_methods_and_lists_all():
    for method in EXTRA_METHODS:
        assert CamConfig(method=method).method == method
    with pytest.raises(UserError) as error:
        CamConfig(method="randomcam")
    assert all(method in str(error.value) for method in ALL_METHODS)


# --- token maps ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", EXTRA_METHODS)
def test_vit_token_maps(method):
    """A timm ViT's tokens read as (B, D, 14, 14) maps: the engine equals the formula in float64
    on that view (eigengradcam with the gradients of an ordinary full backward)."""
    pytest.importorskip("timm")
    from gradcam_batch.layers import resolve_target_layers
    from gradcam_batch.models import load_model
    model = load_model(ModelConfig(source="timm", name="vit_tiny_patch16_224"))[0]
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    layers = resolve_target_layers(model, "auto", images[:1])
    engine = CamEngine(model, layers, CamConfig(method=method, targets="topk", topk=2), torch.device("cpu"))
    result = engine(images, torch.full((2,), -1))
    assert result.cams.shape == (2, 2, 14, 14)
    reference = copy.deepcopy(model).requires_grad_(True)
    captured = {}
    handle = reference.get_submodule(layers[0].name).register_forward_hook(
        lambda m, i, o: captured.__setitem__("a", o))
    try:
        for b in range(2):
            for k in range(2):
                reference.zero_grad()
                logits = reference(images[b:b + 1])
                tokens = captured["a"]
                tokens.retain_grad()
                logits[0, result.target_classes[b, k]].backward()
                a = layers[0].view(tokens.detach()).double()
                g = layers[0].view(tokens.grad).double()
                want = compute_cam(a, g, method, dtype=torch.float64)[0, 0]
                torch.testing.assert_close(result.cams[b, k].double(), want, atol=1e-4, rtol=0)
    finally:
        handle.remove()


# --- end to end ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", EXTRA_METHODS)
def test_command_line_rows_equal_the_float64_formula(tmp_path, method):
    """`gradcam-batch cam.method=...` writes rows whose maps equal the formula in float64 on an
    ordinary full backward of the same model and images (as test_cli does for the kernel's)."""
    from cli_helpers import TINY_RESNET, read_cams, run_composed
    from gradcam_batch.config import DataConfig
    from gradcam_batch.data.readers import iter_samples
    from gradcam_batch.data.shards import list_shards
    from gradcam_batch.data.transforms import decode_resize_crop
    from sample_data import make_imagefolder

    make_imagefolder(tmp_path / "data", per_class=(2, 1))
    run_composed(*TINY_RESNET, "data=imagefolder", f"data.root={tmp_path / 'data'}", f"cam.method={method}",
                 "cam.targets=topk", "cam.topk=2", f"output.dir={tmp_path / 'out'}", "data.crop=64",
                 "data.resize=96")
    rows = sorted(read_cams(tmp_path / "out").to_pylist(), key=lambda r: (r["sample_id"], r["target_rank"]))
    cfg = DataConfig(format="imagefolder", root=str(tmp_path / "data"), resize=96, crop=64).resolved()
    samples = sorted((s for shard in list_shards(cfg) for s in iter_samples(shard, cfg)), key=lambda s: s.sample_id)
    images = torch.stack([decode_resize_crop(s.payload, 96, 64)[0] for s in samples]).float() / 255
    images = (images - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)
    model = build_model(ModelConfig(source="torchvision", name="resnet18"))
    classes = torch.tensor([r["target_class"] for r in rows]).view(-1, 2)
    want = full_backward_reference(model, images, classes, method)
    got = torch.tensor([r["cam"] for r in rows], dtype=torch.float64).view(-1, 2, 2, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
