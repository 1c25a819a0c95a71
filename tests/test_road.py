"""ROAD (gradcam_batch.road) against pytorch-grad-cam 1.5.7's own implementation: the batched
multigrid-CG imputation against its NoisyLinearImputer (scipy spsolve) and against a float64
dense solve of the system written out here from the definition, and the MoRF / LeRF / combined
scores against ROADMostRelevantFirst / ROADLeastRelevantFirst / ROADCombined with the imputer's
noise set to 0; then the noise, chunking and input checks."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradcam_batch.road import (RoadResult, impute, percentile_thresholds, road, solve_imputation,
                                upsample_maps)

pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")

SIZE = 32
MAP = 4  # the maps' grid (the target layer's resolution)
PERCENTILES = (20, 50, 80)
EDGE, DIAGONAL = 1 / 6, 1 / 12


class TinyNet(nn.Module):
    """A small random-init classifier whose 10-class softmax moves with the pixels (position
    matters through the 4 x 4 pooled grid), so score differences are far above the tolerances."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(4))
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        return 10 * self.head(self.features(x).flatten(1))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are small: one intra-op thread is as fast, and it keeps the module at a few
    seconds when other processes hold the cores (two OpenMP threads then spin-wait for ages)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyNet().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))


def make_cams(seed=1):
    """(3, 2, MAP, MAP) maps in [0, 1]: random ones, a ReLU-like one with many exact zeros (ties
    at the threshold) and a constant one (every pixel ties: all are removed)."""
    generator = torch.Generator().manual_seed(seed)
    cams = torch.rand(3, 2, MAP, MAP, generator=generator)
    cams[1, 1] = (2 * cams[1, 1] - 1).clamp_min(0)
    cams[2, 1] = 0.0
    return cams


def make_targets(model, images):
    """The prediction and the sixth-ranked class."""
    with torch.no_grad():
        ranked = model(images).argsort(dim=1, descending=True)
    return ranked[:, [0, 5]]


def dense_reference(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The imputation from the definition, in float64 with a dense solve: every removed pixel
    the weighted mean of its in-image 8-neighbours (1/6 edge, 1/12 diagonal)."""
    channels, height, width = image.shape
    unknown = np.flatnonzero(removed.ravel())
    number = {pixel: n for n, pixel in enumerate(unknown)}
    matrix = np.zeros((len(unknown), len(unknown)))
    rhs = np.zeros((len(unknown), channels))
    flat = image.reshape(channels, -1).astype(np.float64)
    for n, pixel in enumerate(unknown):
        row, col = divmod(int(pixel), width)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                y, x = row + dy, col + dx
                if (dy, dx) == (0, 0) or not (0 <= y < height and 0 <= x < width):
                    continue
                weight = EDGE if dy == 0 or dx == 0 else DIAGONAL
                matrix[n, n] += weight
                neighbour = y * width + x
                if neighbour in number:
                    matrix[n, number[neighbour]] -= weight
                else:
                    rhs[n] += weight * flat[:, neighbour]
    out = flat.copy()
    if len(unknown):
        out[:, unknown] = np.linalg.solve(matrix, rhs).T
    return out.reshape(image.shape)


def blob_mask(generator, height, width, fraction):
    """A smooth removed region (an upsampled random grid above its quantile), as CAMs make."""
    field = torch.nn.functional.interpolate(torch.rand(1, 1, 4, 4, generator=generator), size=(height, width),
                                            mode="bilinear", align_corners=False)[0, 0]
    return field >= torch.quantile(field.flatten(), 1 - fraction)


def mask_cases(height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    cases = {
        "random half": torch.rand(height, width, generator=generator) < 0.5,
        "blob 80%": blob_mask(generator, height, width, 0.8),
        "blob 20%": blob_mask(generator, height, width, 0.2),
        "nothing": torch.zeros(height, width, dtype=torch.bool),
        "all but a corner": torch.ones(height, width, dtype=torch.bool),
        "all but the centre": torch.ones(height, width, dtype=torch.bool),
        "border ring": torch.ones(height, width, dtype=torch.bool),
        "left half": torch.zeros(height, width, dtype=torch.bool),
    }
    cases["all but a corner"][-1, -1] = False
    cases["all but the centre"][height // 2, width // 2] = False
    cases["border ring"][1:-1, 1:-1] = False
    cases["left half"][:, :width // 2] = True
    return cases


@pytest.mark.parametrize("shape", [(SIZE, SIZE), (24, 41)], ids=["square", "odd"])
def test_imputation_matches_spsolve_and_dense_solve(shape):
    road_module = pytest.importorskip("pytorch_grad_cam.metrics.road")
    height, width = shape
    cases = mask_cases(height, width)
    removed = torch.stack(list(cases.values()))
    images = torch.randn(len(cases), 3, height, width, generator=torch.Generator().manual_seed(3))
    ours, iterations = solve_imputation(images, removed)
    assert ours.dtype == torch.float32 and ours.shape == images.shape
    assert 0 < iterations <= 20
    imputer = road_module.NoisyLinearImputer(noise=0)
    for n, name in enumerate(cases):
        theirs = imputer(images[n], (~removed[n]).float())  # their mask: 1 = kept
        dense = dense_reference(images[n].numpy(), removed[n].numpy())
        np.testing.assert_allclose(ours[n].numpy(), theirs.numpy(), atol=1e-5, rtol=0, err_msg=name)
        np.testing.assert_allclose(ours[n].numpy(), dense, atol=1e-5, rtol=0, err_msg=name)
        np.testing.assert_allclose(theirs.numpy(), dense, atol=1e-5, rtol=0, err_msg=name)
        kept = ~removed[n]
        assert torch.equal(ours[n][:, kept], images[n][:, kept]), name  # kept pixels untouched
    # the edge cases: nothing removed is the image, one kept pixel spreads its value everywhere
    assert torch.equal(ours[3], images[3])
    torch.testing.assert_close(ours[4], images[4][:, -1:, -1:].expand(-1, height, width), atol=1e-5, rtol=0)


def test_everything_removed_gives_zero_like_spsolve():
    road_module = pytest.importorskip("pytorch_grad_cam.metrics.road")
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    removed = torch.zeros(2, 16, 16, dtype=torch.bool)
    removed[0] = True  # singular system (no kept pixel), right-hand side 0
    removed[1, 3:9, 5:12] = True
    ours, _ = solve_imputation(images, removed)
    theirs = road_module.NoisyLinearImputer(noise=0)(images[0], torch.zeros(16, 16))
    assert torch.equal(ours[0], torch.zeros_like(ours[0])) and torch.equal(theirs, torch.zeros_like(theirs))
    np.testing.assert_allclose(ours[1].numpy(), dense_reference(images[1].numpy(), removed[1].numpy()), atol=1e-5)


def test_imputation_of_larger_holes_converges_accurately():
    """A 96 x 96 image with 80% removed in one blob (removed pixels ~40 from any kept one):
    the preconditioner keeps the iterations few, the float64 residual the values exact."""
    road_module = pytest.importorskip("pytorch_grad_cam.metrics.road")
    generator = torch.Generator().manual_seed(5)
    removed = torch.stack([blob_mask(generator, 96, 96, 0.8), blob_mask(generator, 96, 96, 0.5)])
    images = torch.randn(2, 3, 96, 96, generator=generator)
    ours, iterations = solve_imputation(images, removed)
    assert iterations <= 15
    imputer = road_module.NoisyLinearImputer(noise=0)
    for n in range(2):
        theirs = imputer(images[n], (~removed[n]).float())
        np.testing.assert_allclose(ours[n].numpy(), theirs.numpy(), atol=1e-5, rtol=0)


def test_non_finite_image_is_isolated():
    """A NaN in a kept pixel makes that image's channel NaN where it is imputed (and warns); the
    other images and channels are solved as if it were not there. Autocast does not reach the
    solver."""
    generator = torch.Generator().manual_seed(12)
    images = torch.randn(3, 3, 24, 24, generator=generator)
    removed = torch.rand(3, 24, 24, generator=generator) < 0.6
    removed[0, 5, 5] = False
    images[0, 1, 5, 5] = math.nan
    with pytest.warns(RuntimeWarning, match="1 of 3 images have non-finite values"):
        ours, _ = solve_imputation(images, removed)
    assert ours[0, 1][removed[0]].isnan().all()
    kept = ~removed[0]
    torch.testing.assert_close(ours[0][:, kept], images[0][:, kept], atol=0, rtol=0, equal_nan=True)
    clean, _ = solve_imputation(images[1:], removed[1:])
    torch.testing.assert_close(ours[1:], clean, atol=1e-5, rtol=0)  # the batch changes rounding only
    assert not ours[0, ::2].isnan().any()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast, _ = solve_imputation(images[1:], removed[1:])
    assert torch.equal(autocast, clean)


def test_unconverged_imputation_warns():
    removed = blob_mask(torch.Generator().manual_seed(6), 32, 32, 0.8).unsqueeze(0)
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with pytest.warns(RuntimeWarning, match="did not converge"):
        solve_imputation(images, removed, tol=1e-12, max_iter=2)


@pytest.mark.parametrize("kind", ["random", "zeros", "levels", "constant"])
def test_thresholds_are_numpy_percentiles(kind):
    generator = torch.Generator().manual_seed(8)
    maps = torch.rand(4, 17, 23, generator=generator)
    if kind == "zeros":
        maps = (2 * maps - 1).clamp_min(0)
    elif kind == "levels":
        maps = torch.randint(0, 5, maps.shape, generator=generator).float() / 4
    elif kind == "constant":
        maps = torch.full_like(maps, 0.3)
    percentiles = (1, 20, 33.3, 50, 80, 99.9)
    for values in (maps, 1 - maps):
        got = percentile_thresholds(values, percentiles)
        assert got.dtype == torch.float32 and got.shape == (4, len(percentiles))
        for n in range(4):
            for i, p in enumerate(percentiles):
                want = np.percentile(values[n].numpy(), p)
                assert want.dtype == np.float32
                assert got[n, i].item() == want, (kind, n, p)


def test_ties_at_the_threshold_follow_numpy_rounding():
    """21 x 21 pixels at p = 55: numpy's index (n - 1) * 0.55 is 242.00000000000003, so its
    threshold lies a hair above the 243rd value, which rounds back to it in float32 when that
    value is 0.05 (then every pixel equal to 0.05 is removed) but stays above it when it is 0
    (then the zeros are kept). torch.quantile (float32 index) gives 0.05000026 instead and would
    keep the 0.05 pixels: the thresholds must be numpy's, bit for bit."""
    order = torch.randperm(441, generator=torch.Generator().manual_seed(0))
    for low, removed_count in ((0.05, 441), (0.0, 198)):
        values = torch.full((441,), low)
        values[243:] = torch.linspace(0.1, 1, 198)
        values = values[order].view(1, 21, 21)
        threshold = percentile_thresholds(values, (55,))[0, 0]
        assert threshold.item() == np.percentile(values[0].numpy(), 55)
        assert (~(values < threshold)).sum().item() == removed_count
        if low > 0:
            assert torch.quantile(values.flatten(), 0.55).item() > low  # the float32 index misses it


@pytest.fixture(scope="module")
def case(model, images):
    cams = make_cams()
    targets = make_targets(model, images)
    return cams, targets, road(model, images, cams, targets, percentiles=PERCENTILES, noise=0)


def test_result_shapes(case):
    cams, targets, result = case
    assert isinstance(result, RoadResult) and result.percentiles == (20.0, 50.0, 80.0)
    for name in ("morf", "lerf", "removed_fraction", "combined", "morf_average", "lerf_average"):
        value = getattr(result, name)
        assert value.dtype == torch.float32, name
    assert result.morf.shape == result.lerf.shape == (3, 2, 3)
    torch.testing.assert_close(result.combined, (result.lerf_average - result.morf_average) / 2)
    assert result.removed_fraction.shape == (3, 2, 6)
    assert result.combined.shape == (3, 2) and result.base_confidence.shape == (3, 2)
    assert 0 < result.iterations <= 20
    # MoRF(p) removes the pixels at or above the p-th percentile: (100 - p)% of them, more when
    # values tie with the threshold (an upsampled 4 x 4 grid repeats a few values)
    fractions = result.removed_fraction
    nominal = torch.tensor([0.8, 0.5, 0.2, 0.8, 0.5, 0.2])
    assert (fractions >= nominal - 1 / SIZE ** 2).all()
    torch.testing.assert_close(fractions[0, 0], nominal, atol=5e-3, rtol=0)
    assert (fractions[2, 1] == 1).all()  # a constant map: every pixel ties with the threshold
    assert fractions[1, 1, 0] > 0.8  # many exact zeros at the 20th percentile: all removed too


def test_morf_and_lerf_match_pytorch_grad_cam(case, model, images):
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    cams, targets, result = case
    maps = upsample_maps(cams, (SIZE, SIZE)).numpy()  # they take maps at the image size
    for k in range(2):
        wanted = [ClassifierOutputSoftmaxTarget(int(c)) for c in targets[:, k]]
        for i, percentile in enumerate(PERCENTILES):
            for ours, metric_class in ((result.morf, ROADMostRelevantFirst), (result.lerf, ROADLeastRelevantFirst)):
                metric = metric_class(percentile)
                metric.perturbation.imputer.noise = 0
                theirs = metric(images, maps[:, k], wanted, model)
                assert theirs.shape == (3,)
                np.testing.assert_allclose(ours[:, k, i].numpy(), theirs, atol=1e-4, rtol=0,
                                           err_msg=f"{metric_class.__name__}({percentile}), target {k}")
    # the comparison is not vacuous: the scores move far more than the tolerance
    assert result.morf.abs().max() > 0.05 and result.lerf.abs().max() > 0.05
    assert (result.morf[..., 0] - result.morf[..., -1]).abs().max() > 0.01


def test_combined_matches_pytorch_grad_cam(case, model, images, monkeypatch):
    road_module = pytest.importorskip("pytorch_grad_cam.metrics.road")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    # ROADCombined builds its metrics itself: make their imputer's default noise 0
    monkeypatch.setattr(road_module.NoisyLinearImputer.__init__, "__defaults__",
                        (0.0, road_module.neighbors_weights))
    cams, targets, result = case
    maps = upsample_maps(cams, (SIZE, SIZE)).numpy()
    for k in range(2):
        wanted = [ClassifierOutputSoftmaxTarget(int(c)) for c in targets[:, k]]
        theirs = road_module.ROADCombined(percentiles=list(PERCENTILES))(images, maps[:, k], wanted, model)
        np.testing.assert_allclose(result.combined[:, k].numpy(), theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunk", [1, 7])
def test_chunking_does_not_change_results(case, model, images, chunk):
    cams, targets, result = case
    chunked = road(model, images, cams, targets, percentiles=PERCENTILES, noise=0, chunk=chunk)
    for name in ("morf", "lerf", "base_confidence", "removed_fraction"):
        torch.testing.assert_close(getattr(chunked, name), getattr(result, name), atol=1e-6, rtol=0, msg=name)


def test_given_base_confidence_is_used(case, model, images):
    cams, targets, result = case
    shifted = road(model, images, cams, targets, percentiles=PERCENTILES[:1], noise=0,
                   base_confidence=result.base_confidence + 1)
    torch.testing.assert_close(shifted.morf, result.morf[..., :1] - 1, atol=1e-6, rtol=0)
    torch.testing.assert_close(shifted.lerf, result.lerf[..., :1] - 1, atol=1e-6, rtol=0)
    one_line_value_error(road, model, images, cams, targets, base_confidence=result.base_confidence[:2],
                         match="base_confidence")


def test_full_resolution_maps_and_swapped_targets(model, images):
    """Maps already at the image size are used as they are; swapping maps and targets together
    swaps the scores (the map and class indices stay paired)."""
    cams = torch.rand(3, 2, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    targets = make_targets(model, images)
    result = road(model, images, cams, targets, percentiles=(30, 70), noise=0)
    swapped = road(model, images, cams.flip(1), targets.flip(1), percentiles=(30, 70), noise=0)
    for name in ("morf", "lerf", "base_confidence"):
        torch.testing.assert_close(getattr(swapped, name), getattr(result, name).flip(1), atol=1e-6, rtol=0)
    assert (result.morf[:, 0] - result.morf[:, 1]).abs().max() > 1e-3


def test_noise_is_seeded_and_only_on_removed_pixels():
    generator = torch.Generator().manual_seed(10)
    removed = torch.stack([blob_mask(generator, 48, 48, 0.6), torch.rand(48, 48, generator=generator) < 0.3])
    images = torch.randn(2, 3, 48, 48, generator=generator)
    exact = impute(images, removed, noise=0)
    first = impute(images, removed, noise=0.05, generator=torch.Generator().manual_seed(11))
    again = impute(images, removed, noise=0.05, generator=torch.Generator().manual_seed(11))
    other = impute(images, removed, noise=0.05, generator=torch.Generator().manual_seed(12))
    assert torch.equal(first, again) and not torch.equal(first, other)
    difference = first - exact
    kept = ~removed.unsqueeze(1).expand_as(difference)
    assert torch.equal(difference[kept], torch.zeros_like(difference[kept]))
    # exactly noise * one standard normal per pixel and channel, drawn in order
    draw = torch.randn(images.shape, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(difference, 0.05 * draw * removed.unsqueeze(1), atol=1e-6, rtol=0)
    samples = difference[~kept].double()
    assert samples.numel() > 5000
    assert abs(samples.mean().item()) < 5 * 0.05 / math.sqrt(samples.numel())
    assert abs(samples.std().item() / 0.05 - 1) < 0.05


def test_road_noise_is_reproducible(case, model, images):
    cams, targets, exact = case
    runs = [road(model, images, cams, targets, percentiles=PERCENTILES, noise=0.01,
                 generator=torch.Generator().manual_seed(seed)) for seed in (1, 1, 2)]
    for name in ("morf", "lerf"):
        assert torch.equal(getattr(runs[0], name), getattr(runs[1], name)), name
        assert not torch.equal(getattr(runs[0], name), getattr(runs[2], name)), name
        # noise of 0.01 on normalized pixels moves the scores a little, not a lot
        assert not torch.equal(getattr(runs[0], name), getattr(exact, name)), name
        torch.testing.assert_close(getattr(runs[0], name), getattr(exact, name), atol=0.05, rtol=0)


def test_bf16_autocast_on_cpu(case, model, images):
    cams, targets, result = case
    calls = []

    def autocast():
        calls.append(1)
        return torch.autocast("cpu", dtype=torch.bfloat16)

    bf16 = road(model, images, cams, targets, percentiles=PERCENTILES, noise=0, autocast=autocast)
    assert calls and bf16.morf.dtype == torch.float32
    assert torch.isfinite(bf16.morf).all() and torch.isfinite(bf16.lerf).all()
    torch.testing.assert_close(bf16.morf, result.morf, atol=0.05, rtol=0)
    assert (bf16.base_confidence != result.base_confidence).any()  # the autocast did take effect


def one_line_value_error(function, *args, match, **kwargs):
    with pytest.raises(ValueError, match=match) as error:
        function(*args, **kwargs)
    assert "\n" not in str(error.value)


def test_bad_input_is_refused(model, images):
    cams, targets = make_cams(), torch.zeros(3, 2, dtype=torch.int64)
    for percentiles in ((0, 50), (50, 100), (-5,), (150,), (), (float("nan"),), ("50",), (True,)):
        one_line_value_error(road, model, images, cams, targets, percentiles=percentiles, match="percentiles")
    one_line_value_error(road, model, images, cams[:2], targets, match="cams")
    one_line_value_error(road, model, images, cams[:, :, None], targets, match="cams")
    one_line_value_error(road, model, images, cams, targets[:, :1], match="targets")
    one_line_value_error(road, model, images, cams, targets.float(), match="targets")
    one_line_value_error(road, model, images[0], cams, targets, match="images")
    one_line_value_error(road, model, images.long(), cams, targets, match="images")
    one_line_value_error(road, model, images, cams, targets, noise=-0.1, match="noise")
    one_line_value_error(road, model, images, cams, targets, noise=float("inf"), match="noise")
    one_line_value_error(road, model, images, cams, targets, chunk=0, match="chunk")
    removed = torch.zeros(3, SIZE, SIZE, dtype=torch.bool)
    one_line_value_error(impute, images, removed[:2], match="removed")
    one_line_value_error(impute, images, removed[:, :-1], match="removed")
    one_line_value_error(impute, images[0], removed, match="images")


@pytest.mark.gpu
def test_cuda_matches_cpu(case, model, images):
    cams, targets, result = case
    device = torch.device("cuda")
    on_gpu = road(model.to(device), images.to(device), cams.to(device), targets.to(device),
                  percentiles=PERCENTILES, noise=0)
    model.to("cpu")
    for name in ("morf", "lerf", "removed_fraction"):
        torch.testing.assert_close(getattr(on_gpu, name).cpu(), getattr(result, name), atol=1e-4, rtol=0, msg=name)
    removed = torch.stack(list(mask_cases(40, 40).values()))
    pictures = torch.randn(len(removed), 3, 40, 40, generator=torch.Generator().manual_seed(13))
    torch.testing.assert_close(impute(pictures.to(device), removed.to(device)).cpu(), impute(pictures, removed),
                               atol=1e-5, rtol=0)
    noisy = impute(pictures.to(device), removed.to(device), noise=0.1,
                   generator=torch.Generator(device=device).manual_seed(1))
    assert torch.equal(noisy, impute(pictures.to(device), removed.to(device), noise=0.1,
                                     generator=torch.Generator(device=device).manual_seed(1)))
