"""Faithfulness scores (insertion, deletion, confidence change) on a random-init torchvision
resnet18 (fixed seed, CPU) against (1) a per-image, per-target, per-fraction float64 evaluation
with its own mask construction, (2) pytorch-grad-cam's CamMultImageConfidenceChange, and
(3) properties that do not depend on the model's numbers."""

import copy

import numpy as np
import pytest
import torch
import torchvision

from gradcam_batch.faithfulness import (FaithfulnessResult, faithfulness, kept_pixels, top_fraction_mask,
                                        upsample_maps)

SIZE = 64
MAP = 4  # the maps' grid (the target layer's resolution)
FRACTIONS = (0.1, 0.25, 0.5, 1.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def model64(model):
    return copy.deepcopy(model).double()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def logits(model, images):
    with torch.no_grad():
        return model(images)


def make_cams(num_targets, seed=1):
    """(2, K, MAP, MAP) maps: random ones, plus a constant map and a map of repeated values
    (ties in the upsampled map) when K = 2."""
    generator = torch.Generator().manual_seed(seed)
    cams = torch.rand(2, num_targets, MAP, MAP, generator=generator)
    if num_targets == 2:
        cams[0, 1] = 0.5
        cams[1, 1] = torch.randint(0, 3, (MAP, MAP), generator=generator).float() / 2
    return cams


def make_targets(logits, num_targets):
    """The prediction and, for K = 2, the fifth-ranked class."""
    ranked = logits.argsort(dim=1, descending=True)
    return ranked[:, [0, 4][:num_targets]]


@pytest.fixture(scope="module", params=[1, 2], ids=["K1", "K2"])
def case(request, model, images, logits):
    cams = make_cams(request.param)
    targets = make_targets(logits, request.param)
    result = faithfulness(model, images, cams, targets, fractions=FRACTIONS)
    return cams, targets, result


def bilinear_reference(grid: np.ndarray, size: int) -> np.ndarray:
    """float64 bilinear upsampling, align_corners=False (half-pixel centres, edges clamped)."""
    def axis(n_in):
        src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
        low = np.floor(src).astype(int)
        return low, np.minimum(low + 1, n_in - 1), src - low

    r0, r1, ry = axis(grid.shape[0])
    c0, c1, cx = axis(grid.shape[1])
    rows = grid[r0] * (1 - ry)[:, None] + grid[r1] * ry[:, None]
    return rows[:, c0] * (1 - cx)[None, :] + rows[:, c1] * cx[None, :]


def float64_reference(model64, images, cams, targets, fractions):
    """One image at a time through the float64 model; the top-p mask from numpy's stable
    argsort of the negated map (highest first, ties to the lower row-major index)."""
    maps = upsample_maps(cams, (SIZE, SIZE))  # the float32 maps the scores are defined on
    batch, num_targets = targets.shape

    def prob(image, target):
        with torch.no_grad():
            return torch.softmax(model64(image.unsqueeze(0)), dim=1)[0, target].item()

    insertion = np.zeros((batch, num_targets, len(fractions)))
    deletion = np.zeros_like(insertion)
    change = np.zeros((batch, num_targets))
    base = np.zeros((batch, num_targets))
    for b in range(batch):
        image = images[b].double()
        for k in range(num_targets):
            target = int(targets[b, k])
            values = maps[b, k].numpy().ravel()
            order = np.argsort(-values, kind="stable")
            for i, fraction in enumerate(fractions):
                mask = np.zeros(SIZE * SIZE)
                mask[order[:round(fraction * SIZE * SIZE)]] = 1.0
                mask = torch.from_numpy(mask.reshape(SIZE, SIZE))
                insertion[b, k, i] = prob(image * mask, target)
                deletion[b, k, i] = prob(image * (1 - mask), target)
            base[b, k] = prob(image, target)
            change[b, k] = prob(image * maps[b, k].double(), target) - base[b, k]
    return {name: torch.from_numpy(value) for name, value in
            dict(insertion=insertion, deletion=deletion, confidence_change=change, base_confidence=base).items()}


def test_upsampling_is_bilinear_half_pixel():
    cams = make_cams(2)
    got = upsample_maps(cams, (SIZE, SIZE))
    assert got.dtype == torch.float32 and got.shape == (2, 2, SIZE, SIZE)
    for b in range(2):
        for k in range(2):
            np.testing.assert_allclose(got[b, k].numpy(), bilinear_reference(cams[b, k].double().numpy(), SIZE),
                                       atol=1e-6, rtol=0)


def test_matches_float64_reference(case, model64, images):
    cams, targets, result = case
    num_targets = targets.shape[1]
    assert isinstance(result, FaithfulnessResult) and result.fractions == FRACTIONS
    for name, shape in dict(insertion=(2, num_targets, 4), deletion=(2, num_targets, 4),
                            confidence_change=(2, num_targets), base_confidence=(2, num_targets)).items():
        value = getattr(result, name)
        assert value.dtype == torch.float32 and value.shape == shape, name
    want = float64_reference(model64, images, cams, targets, FRACTIONS)
    for name, expected in want.items():
        # probabilities are ~1e-2 here: the relative bound is the binding one (fp32 vs fp64)
        torch.testing.assert_close(getattr(result, name).double(), expected, atol=1e-6, rtol=1e-4, msg=name)
    # the scores are not trivially alike: the fractions and the two styles differ
    assert (result.insertion.diff(dim=2).abs() > 1e-5).any()
    assert (result.insertion[..., :3] - result.deletion[..., :3]).abs().max() > 1e-4


def test_confidence_change_matches_pytorch_grad_cam(case, model, images):
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    cams, targets, result = case
    maps = upsample_maps(cams, (SIZE, SIZE)).numpy()  # it takes maps at the image size
    metric = CamMultImageConfidenceChange()
    for k in range(targets.shape[1]):
        want = metric(images, maps[:, k], [ClassifierOutputSoftmaxTarget(int(c)) for c in targets[:, k]], model)
        assert want.shape == (2,)
        np.testing.assert_allclose(result.confidence_change[:, k].numpy(), want, atol=1e-5, rtol=0)
        np.testing.assert_allclose(result.confidence_change[:, k].numpy(), want, atol=1e-8, rtol=1e-4)


def test_drop_and_increase_in_confidence_match_pytorch_grad_cam(case, model, images):
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.metrics.cam_mult_image import DropInConfidence, IncreaseInConfidence
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    cams, targets, result = case
    maps = upsample_maps(cams, (SIZE, SIZE)).numpy()
    for k in range(targets.shape[1]):
        wanted = [ClassifierOutputSoftmaxTarget(int(c)) for c in targets[:, k]]
        drop = DropInConfidence()(images, maps[:, k], wanted, model)
        increase = IncreaseInConfidence()(images, maps[:, k], wanted, model)
        np.testing.assert_allclose(result.drop_in_confidence[:, k].numpy(), drop, atol=1e-5, rtol=0)
        assert result.increase_in_confidence[:, k].numpy().tolist() == (increase > 0).tolist()
    assert result.increase_in_confidence.dtype == torch.bool


def test_full_fraction_insertion_is_base_and_deletion_is_baseline(case, model):
    cams, targets, result = case
    torch.testing.assert_close(result.insertion[..., -1], result.base_confidence, atol=1e-6, rtol=0)
    with torch.no_grad():
        baseline = torch.softmax(model(torch.zeros(1, 3, SIZE, SIZE)), dim=1)[0]
    torch.testing.assert_close(result.deletion[..., -1], baseline[targets], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["random", "constant", "repeated"])
@pytest.mark.parametrize("size", [SIZE, 7])
def test_top_fraction_mask_counts_and_order(kind, size):
    generator = torch.Generator().manual_seed(3)
    if kind == "random":
        maps = torch.rand(2, 3, size, size, generator=generator)
    elif kind == "constant":
        maps = torch.full((2, 3, size, size), 0.25)
    else:
        maps = torch.randint(0, 4, (2, 3, size, size), generator=generator).float() / 3
    for fraction in (0.0, 0.1, 0.25, 0.37, 0.5, 0.999, 1.0):
        count = round(fraction * size * size)
        assert kept_pixels(fraction, size * size) == count
        mask = top_fraction_mask(maps, fraction)
        assert mask.dtype == torch.bool and mask.shape == maps.shape
        assert (mask.flatten(2).sum(dim=2) == count).all(), (kind, fraction)
        flat, kept = maps.flatten(2), mask.flatten(2)
        for values, chosen in zip(flat.view(-1, size * size), kept.view(-1, size * size)):
            if 0 < count < size * size:
                assert values[chosen].min() >= values[~chosen].max()
            # ties go to the lower row-major index: the stable order, as numpy computes it
            expected = np.zeros(size * size, dtype=bool)
            expected[np.argsort(-values.numpy(), kind="stable")[:count]] = True
            np.testing.assert_array_equal(chosen.numpy(), expected)
        if kind == "constant":
            assert mask.flatten(2)[..., :count].all() and not mask.flatten(2)[..., count:].any()


def test_fraction_outside_unit_interval_is_refused(model, images):
    cams = make_cams(1)
    targets = torch.zeros(2, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        faithfulness(model, images, cams, targets, fractions=(0.5, 1.5))
    with pytest.raises(ValueError, match="targets"):
        faithfulness(model, images, cams, targets[:1])
    with pytest.raises(ValueError, match="max_batch"):
        faithfulness(model, images, cams, targets, max_batch=0)


@pytest.mark.parametrize("max_batch", [1, 5])
def test_chunking_does_not_change_results(case, model, images, max_batch):
    cams, targets, result = case
    chunked = faithfulness(model, images, cams, targets, fractions=FRACTIONS[1::2], max_batch=max_batch)
    for name in ("insertion", "deletion"):
        torch.testing.assert_close(getattr(chunked, name), getattr(result, name)[..., 1::2], atol=1e-6, rtol=0,
                                   msg=name)
    for name in ("confidence_change", "base_confidence"):
        torch.testing.assert_close(getattr(chunked, name), getattr(result, name), atol=1e-6, rtol=0, msg=name)


def test_given_base_confidence_is_used(case, model, images):
    cams, targets, result = case
    shifted = faithfulness(model, images, cams, targets, fractions=(0.5,), base_confidence=result.base_confidence + 1)
    torch.testing.assert_close(shifted.base_confidence, result.base_confidence + 1)
    torch.testing.assert_close(shifted.confidence_change, result.confidence_change - 1, atol=1e-6, rtol=0)
    torch.testing.assert_close(shifted.insertion, result.insertion[..., 2:3], atol=1e-6, rtol=0)


def test_each_target_uses_its_own_map(model, images, logits):
    """Two targets of the same class with different maps: swapping the maps swaps the results
    (a mix-up of the map index would make the two targets' scores equal, or not swap)."""
    cams = torch.rand(2, 2, MAP, MAP, generator=torch.Generator().manual_seed(5))
    same = make_targets(logits, 1).expand(-1, 2)
    result = faithfulness(model, images, cams, same, fractions=(0.25,))
    swapped = faithfulness(model, images, cams.flip(1), same, fractions=(0.25,))
    for name in ("insertion", "deletion", "confidence_change"):
        ours, theirs = getattr(result, name), getattr(swapped, name)
        assert (ours[:, 0] - ours[:, 1]).abs().max() > 1e-5, name
        torch.testing.assert_close(theirs, ours.flip(1), atol=1e-6, rtol=0, msg=name)
    # and with distinct classes, maps and classes swapped together swap the results
    targets = make_targets(logits, 2)
    result = faithfulness(model, images, cams, targets, fractions=(0.25,))
    swapped = faithfulness(model, images, cams.flip(1), targets.flip(1), fractions=(0.25,))
    for name in ("insertion", "deletion", "confidence_change", "base_confidence"):
        torch.testing.assert_close(getattr(swapped, name), getattr(result, name).flip(1), atol=1e-6, rtol=0)


def test_bf16_autocast_on_cpu(case, model, images):
    cams, targets, result = case
    bf16 = faithfulness(model, images, cams, targets, fractions=FRACTIONS,
                        autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    for name in ("insertion", "deletion", "confidence_change", "base_confidence"):
        value = getattr(bf16, name)
        assert value.dtype == torch.float32 and value.shape == getattr(result, name).shape, name
        assert torch.isfinite(value).all(), name
        # bf16 has ~3 significant digits: near the fp32 scores, not equal to them
        torch.testing.assert_close(value, getattr(result, name), atol=1e-3, rtol=0.1, msg=name)
    assert ((bf16.insertion >= 0) & (bf16.insertion <= 1)).all()
    assert (bf16.base_confidence != result.base_confidence).any()  # the autocast did take effect
