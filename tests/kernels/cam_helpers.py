"""Inputs, the float64 oracle and the comparison shared by the fused_cam tests."""

import zlib

import torch

from gradcam_batch.methods import compute_cam
from gradcam_batch.kernels import fused_cam

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Max error on normalized maps (values in [0, 1]); raw maps are compared relative to their max.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def make_inputs(shape, dtype, layout, seed, signed=False):
    """Random A (post-ReLU-like unless `signed`) and G (B, K, C, H, W) in `layout`.

    nchw: both contiguous. nhwc: channels_last A and per-image channels-last G.
    kfirst: G produced as (K, B, C, H, W) and transposed, as a batched backward returns it.
    """
    batch, targets, channels, height, width = shape
    generator = torch.Generator().manual_seed(seed)
    activations = torch.randn(batch, channels, height, width, generator=generator)
    if not signed:
        activations = activations.relu()
    gradients = torch.randn(batch, targets, channels, height, width, generator=generator)
    activations = activations.to(device=DEVICE, dtype=dtype)
    gradients = gradients.to(device=DEVICE, dtype=dtype)
    if layout == "nhwc":
        activations = activations.contiguous(memory_format=torch.channels_last)
        gradients = gradients.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    elif layout == "kfirst":
        gradients = gradients.transpose(0, 1).contiguous().transpose(0, 1)
    return activations, gradients


def reference(activations, gradients, method, normalize):
    """The oracle: float64 evaluation of the (already dtype-rounded) inputs."""
    return compute_cam(activations.double(), gradients.double(), method, normalize, dtype=torch.float64)


def poisoned_out(shape):
    batch, targets, _, height, width = shape
    return torch.full((batch, targets, height, width), float("nan"), device=DEVICE)


def assert_close(result, expected, normalize, tolerance):
    assert result.dtype == torch.float32 and result.is_contiguous()
    assert result.shape == expected.shape
    assert not torch.isnan(result).any(), "NaN in the result (unwritten or 0/0)"
    error = (result.double() - expected).abs().flatten(-2)
    if not normalize:  # raw values scale with C: compare relative to each map's max
        error = error / expected.abs().flatten(-2).amax(-1, keepdim=True).clamp_min(1e-12)
    assert error.max().item() <= tolerance, f"max error {error.max().item():.3g} > {tolerance}"


def check(shape, method, dtype, layout, normalize, seed, launch=fused_cam, **kwargs):
    activations, gradients = make_inputs(shape, dtype, layout, seed, signed=kwargs.pop("signed", False))
    out = poisoned_out(shape)
    result = launch(activations, gradients, method, normalize, out=out, **kwargs)
    assert result is out
    expected = reference(activations, gradients, method, normalize)
    assert_close(result, expected, normalize, TOLERANCE[dtype])


def fresh_seed(*parts) -> int:
    return zlib.crc32("-".join(map(str, parts)).encode())  # fresh per case, stable across runs
