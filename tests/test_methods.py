"""methods.py against a direct NumPy transcription of the published formulas, per image and
per target (the way the widely used reference implementations loop)."""

import numpy as np
import pytest
import torch

from gradcam_batch.methods import METHODS, compute_cam


def numpy_cam(a: np.ndarray, g: np.ndarray, method: str) -> np.ndarray:
    """One map from A (C, H, W) and G (C, H, W), float64."""
    if method == "gradcam":
        cam = (g.mean(axis=(1, 2))[:, None, None] * a).sum(0)
    elif method == "gradcampp":
        g2, g3 = g ** 2, g ** 3
        alpha = g2 / (2 * g2 + a.sum(axis=(1, 2))[:, None, None] * g3 + 1e-6)
        alpha = np.where(g != 0, alpha, 0)
        cam = ((np.maximum(g, 0) * alpha).sum(axis=(1, 2))[:, None, None] * a).sum(0)
    elif method == "xgradcam":
        weights = (g * a / (a.sum(axis=(1, 2))[:, None, None] + 1e-7)).sum(axis=(1, 2))
        cam = (weights[:, None, None] * a).sum(0)
    elif method == "hirescam":
        cam = (g * a).sum(0)
    elif method == "layercam":
        cam = (np.maximum(g, 0) * a).sum(0)
    else:
        cam = np.maximum(g * a, 0).sum(0)
    cam = np.maximum(cam, 0)
    return cam


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_per_image_numpy(method, normalize):
    generator = torch.Generator().manual_seed(hash(method) % 1000)
    a = torch.relu(torch.randn(3, 5, 6, 4, generator=generator, dtype=torch.float64))
    g = torch.randn(3, 2, 5, 6, 4, generator=generator, dtype=torch.float64)
    got = compute_cam(a, g, method, normalize=normalize, dtype=torch.float64)
    assert got.shape == (3, 2, 6, 4)
    for b in range(3):
        for k in range(2):
            want = numpy_cam(a[b].numpy(), g[b, k].numpy(), method)
            if normalize:
                want = (want - want.min()) / (want.max() - want.min() + 1e-7)
            np.testing.assert_allclose(got[b, k].numpy(), want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_constant_map_is_zero_not_nan(method):
    a = torch.ones(2, 4, 3, 3)
    g = torch.zeros(2, 4, 3, 3)  # no gradient: every map is constant zero
    cams = compute_cam(a, g, method)
    assert cams.shape == (2, 1, 3, 3)
    assert torch.isfinite(cams).all() and (cams == 0).all()


def test_normalized_range_and_four_d_gradients():
    a = torch.rand(2, 8, 5, 5)
    g = torch.randn(2, 8, 5, 5)
    cams = compute_cam(a, g, "gradcam")
    assert cams.shape == (2, 1, 5, 5)
    flat = cams.flatten(1)
    nonconstant = flat.amax(1) > 0
    assert torch.allclose(flat.amax(1)[nonconstant], torch.ones(int(nonconstant.sum())), atol=1e-5)
    assert (flat.amin(1) >= 0).all()


@pytest.mark.parametrize("bad, message", [
    (dict(a=(2, 3, 4), g=(2, 3, 4)), "activations must be"),
    (dict(a=(2, 3, 4, 4), g=(2, 1, 1, 3, 4, 4)), "gradients must be"),
    (dict(a=(2, 3, 4, 4), g=(2, 1, 5, 4, 4)), "do not match"),
])
def test_shape_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        compute_cam(torch.zeros(bad["a"]), torch.zeros(bad["g"]), "gradcam")


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown CAM method 'randomcam'"):
        compute_cam(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), "randomcam")
