"""Pure-PyTorch reference of every CAM formula.

This module is both the CPU path of the engine and the oracle the Triton kernel is tested
against (tests evaluate it in float64). Shapes follow the kernel contract:

    activations  A: (B, C, H, W)
    gradients    G: (B, K, C, H, W) for K targets per image, or (B, C, H, W) for K = 1
    result         : (B, K, H, W)

The formulas are the published ones, written the way the widely used reference implementations
compute them (sums and means over the spatial positions s, sums over channels c):

    gradcam     w = mean_s G                                   cam = sum_c w * A
    gradcampp   a = G^2 / (2 G^2 + (sum_s A) G^3 + 1e-6), a = 0 where G == 0
                w = sum_s relu(G) * a                          cam = sum_c w * A
    xgradcam    w = sum_s (G * A / (sum_s A + 1e-7))           cam = sum_c w * A
    hirescam                                                   cam = sum_c G * A
    layercam                                                   cam = sum_c relu(G) * A
    elementwise                                                cam = sum_c relu(G * A)

followed by ReLU and, when normalizing, a per-map min-max `(cam - min) / (max - min + 1e-7)`.
"""

from __future__ import annotations

import torch

METHODS = ("gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "elementwise")

# Epsilons are part of the published formulas; the kernel uses the same constants.
GRADCAMPP_EPS = 1e-6
XGRADCAM_EPS = 1e-7
NORMALIZE_EPS = 1e-7


def check_cam_inputs(activations: torch.Tensor, gradients: torch.Tensor, method: str) -> torch.Tensor:
    """Validate shapes and the method name; return gradients as (B, K, C, H, W)."""
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; expected one of {', '.join(METHODS)}")
    if activations.dim() != 4:
        raise ValueError(f"activations must be (B, C, H, W), got shape {tuple(activations.shape)}")
    if gradients.dim() == 4:
        gradients = gradients.unsqueeze(1)
    if gradients.dim() != 5:
        raise ValueError(
            f"gradients must be (B, K, C, H, W) or (B, C, H, W), got shape {tuple(gradients.shape)}"
        )
    batch, _, channels, height, width = gradients.shape
    if (batch, channels, height, width) != tuple(activations.shape):
        raise ValueError(
            f"gradients {tuple(gradients.shape)} do not match activations {tuple(activations.shape)}"
        )
    return gradients


def channel_weighted_maps(activations: torch.Tensor, gradients: torch.Tensor, method: str) -> torch.Tensor:
    """The raw map sum over channels, before ReLU: (B, K, H, W) in the inputs' dtype."""
    gradients = check_cam_inputs(activations, gradients, method)
    A = activations.unsqueeze(1)  # (B, 1, C, H, W), shared by the K targets
    G = gradients
    if method == "gradcam":
        weights = G.mean(dim=(3, 4))
    elif method == "gradcampp":
        g2 = G * G
        g3 = g2 * G
        sum_a = A.sum(dim=(3, 4), keepdim=True)
        alpha = g2 / (2 * g2 + sum_a * g3 + GRADCAMPP_EPS)
        alpha = torch.where(G != 0, alpha, torch.zeros_like(alpha))
        weights = (torch.relu(G) * alpha).sum(dim=(3, 4))
    elif method == "xgradcam":
        sum_a = A.sum(dim=(3, 4), keepdim=True)
        weights = (G * A / (sum_a + XGRADCAM_EPS)).sum(dim=(3, 4))
    elif method == "hirescam":
        return (G * A).sum(dim=2)
    elif method == "layercam":
        return (torch.relu(G) * A).sum(dim=2)
    else:  # elementwise
        return torch.relu(G * A).sum(dim=2)
    # weights (B, K, C) -> weighted channel sum
    return torch.einsum("bkc,bchw->bkhw", weights, activations)


def normalize_maps(cams: torch.Tensor) -> torch.Tensor:
    """Per-map min-max over the last two dims; a constant map becomes all zeros, never NaN."""
    flat = cams.flatten(-2)
    low = flat.amin(dim=-1, keepdim=True)
    high = flat.amax(dim=-1, keepdim=True)
    return ((flat - low) / (high - low + NORMALIZE_EPS)).view_as(cams)


def compute_cam(
    activations: torch.Tensor,
    gradients: torch.Tensor,
    method: str = "gradcam",
    normalize: bool = True,
    dtype: torch.dtype | None = torch.float32,
) -> torch.Tensor:
    """CAMs (B, K, H, W) for `method`: weighted channel sum, ReLU, optional min-max.

    `dtype` is the computation dtype (fp32 by default, as the kernel accumulates; tests pass
    float64 for the oracle); None keeps the inputs' dtype.
    """
    if dtype is not None:
        activations = activations.to(dtype)
        gradients = gradients.to(dtype)
    cams = torch.relu(channel_weighted_maps(activations, gradients, method))
    return normalize_maps(cams) if normalize else cams
