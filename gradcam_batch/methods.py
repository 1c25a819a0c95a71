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

Three more methods are not a channel-weighted sum of one kind, so the Triton kernel does not
implement them (the engine computes them here, on any device). X is the (HW, C) matrix of one
image's maps, positions by channels, centred per channel (X - mean_s X):

    eigencam      cam = X v1, v1 the first right singular vector of X (first principal
                  component of the activations); gradient-free: one map per image
    eigengradcam  the same with X built from G * A, per target
    kpcacam       cam = sqrt(l1) u1, (l1, u1) the top eigenpair of the centred sigmoid kernel
                  K = tanh(X X^T / C + 1) (HW x HW), as scikit-learn's KernelPCA(n_components=1,
                  kernel="sigmoid") computes it for pytorch-grad-cam's KPCA_CAM; gradient-free
    fem           w = mean_s [A > mean_s A + 2 std_s A] (std with 1/HW)   cam = sum_c w * A;
                  gradient-free (Feature Explanation Method, pytorch-grad-cam's FEM, k = 2)

Four more take the Grad-CAM formula (w = mean_s G, cam = sum_c w * A) on gradients the engine
prepares differently, so the Triton kernel runs them as gradcam:

    finercam      G = d S / d A with Finer-CAM's score S = sum_j p_j (z_t - alpha z_j) / (sum_j p_j + 1e-9)
                  over the classes j whose logits z_j lie nearest the target's z_t (p = softmax(z)),
                  as pytorch-grad-cam's FinerCAM with FinerWeightedTarget
    shapleycam    G - H A / 2, H the Hessian of the target's logit with respect to A (a Hessian-vector
                  product through the head only), pytorch-grad-cam's ShapleyCAM
    cam           Zhou et al.'s CAM: w = the target's row of the final linear layer when the head
                  after the layer is global average pooling then that layer; the engine passes
                  G = w broadcast over the positions. The exact gradient of such a head is w / HW,
                  so CAM's raw maps are HW times Grad-CAM's and equal after normalization
    scorecam, ablationcam  perturbation methods: the engine measures the channel weights w with
                  extra forwards (perturbation.py) and passes G = w broadcast over the positions

The sign of a singular vector is arbitrary; ours is fixed so that the map correlates positively
with the decomposed matrix's mean over channels (A for eigencam and kpcacam, G * A for
eigengradcam).
"""

from __future__ import annotations

import torch

from gradcam_batch.method_names import (ALL_METHODS, EIGEN_METHODS, EXTRA_METHODS, GRADIENT_FREE,  # noqa: F401
                                        METHODS, PERTURBATION_METHODS, PREPARED_METHODS)


def formula_of(method: str) -> str:
    """The channel-weighted formula that computes `method`'s maps from its (prepared) gradients."""
    return "gradcam" if method in PREPARED_METHODS else method
FEM_SIGMAS = 2  # pytorch-grad-cam's FEM default k

# Epsilons are part of the published formulas; the kernel uses the same constants.
GRADCAMPP_EPS = 1e-6
XGRADCAM_EPS = 1e-7
NORMALIZE_EPS = 1e-7


def check_cam_inputs(activations: torch.Tensor, gradients: torch.Tensor | None, method: str) -> torch.Tensor | None:
    """Validate shapes and the method name; return gradients as (B, K, C, H, W) (None: only for
    a gradient-free method, whose maps then come with K = 1)."""
    if method not in ALL_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; expected one of {', '.join(ALL_METHODS)}")
    if activations.dim() != 4:
        raise ValueError(f"activations must be (B, C, H, W), got shape {tuple(activations.shape)}")
    if gradients is None:
        if method not in GRADIENT_FREE:
            raise ValueError(f"CAM method {method!r} needs gradients")
        return None
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


def channel_weighted_maps(activations: torch.Tensor, gradients: torch.Tensor | None, method: str) -> torch.Tensor:
    """The raw map sum over channels, before ReLU: (B, K, H, W) in the inputs' dtype."""
    gradients = check_cam_inputs(activations, gradients, method)
    method = formula_of(method)
    if method in EXTRA_METHODS:
        return extra_method_maps(activations, gradients, method)
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


def first_component_maps(maps: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W): each map set's projection on its first principal component.

    X (HW, C) is centred per channel; the projection X v1 equals sqrt(l1) u1 with (l1, u1) the
    top eigenpair of the Gram matrix X X^T (or X v1 from X^T X when C < HW), so one batched
    `eigh` of a min(HW, C)-square matrix replaces the SVD: exact whatever the spectral gap
    (power iteration and `torch.svd_lowrank` are not), and on 2 CPU cores 40-50x faster than a
    batched `torch.linalg.svd` at (64, 49, 512) and (64, 196, 768).
    Sign: positive correlation with the mean over channels of the maps (ties: as computed).
    """
    count, channels, height, width = maps.shape
    X = maps.flatten(2).transpose(1, 2)  # (N, HW, C)
    X = X - X.mean(dim=1, keepdim=True)
    if height * width <= channels:
        values, vectors = torch.linalg.eigh(X @ X.transpose(1, 2))
        projection = vectors[..., -1] * values[..., -1:].clamp(min=0).sqrt()
    else:
        values, vectors = torch.linalg.eigh(X.transpose(1, 2) @ X)
        projection = (X @ vectors[..., -1:]).squeeze(-1)
    # projection has zero mean over s, so its covariance with the channel mean is this dot product
    covariance = (projection * maps.flatten(2).mean(dim=1)).sum(dim=1, keepdim=True)
    projection = torch.where(covariance < 0, -projection, projection)
    return projection.view(count, height, width)


def kernel_component_maps(maps: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W): kernel PCA's first component with the sigmoid kernel
    tanh(gamma <x, y> + 1), gamma = 1/C (scikit-learn's defaults), over the HW positions of the
    centred (HW, C) matrix; sign as in first_component_maps. Memory: an (N, HW, HW) kernel."""
    count, channels, height, width = maps.shape
    X = maps.flatten(2).transpose(1, 2)
    X = X - X.mean(dim=1, keepdim=True)
    kernel = torch.tanh(X @ X.transpose(1, 2) / channels + 1)
    kernel = (kernel - kernel.mean(dim=1, keepdim=True) - kernel.mean(dim=2, keepdim=True)
              + kernel.mean(dim=(1, 2), keepdim=True))  # centred in feature space
    values, vectors = torch.linalg.eigh(kernel)
    # Kernel entries are O(1) (tanh): a top eigenvalue within the centring's rounding (constant
    # maps leave a kernel of equal entries) is no component, and its sqrt would be a noise map.
    top = values[..., -1:]
    top = torch.where(top > 4 * height * width * torch.finfo(top.dtype).eps, top, torch.zeros_like(top))
    projection = vectors[..., -1] * top.sqrt()
    covariance = (projection * maps.flatten(2).mean(dim=1)).sum(dim=1, keepdim=True)
    projection = torch.where(covariance < 0, -projection, projection)
    return projection.view(count, height, width)


def extra_method_maps(activations: torch.Tensor, gradients: torch.Tensor | None, method: str) -> torch.Tensor:
    """eigencam, eigengradcam, fem before ReLU: (B, K, H, W); the gradient-free ones give one
    map per image, expanded (a view) to the K targets of `gradients` (K = 1 without them)."""
    batch, num_targets = (activations.shape[0], 1) if gradients is None else gradients.shape[:2]
    if method == "eigengradcam":
        return first_component_maps((gradients * activations.unsqueeze(1)).flatten(0, 1)).view(
            batch, num_targets, *activations.shape[2:])
    if method == "eigencam":
        maps = first_component_maps(activations)
    elif method == "kpcacam":
        maps = kernel_component_maps(activations)
    else:  # fem
        threshold = (activations.mean(dim=(2, 3), keepdim=True)
                     + FEM_SIGMAS * activations.std(dim=(2, 3), correction=0, keepdim=True))
        weights = (activations > threshold).to(activations.dtype).mean(dim=(2, 3))
        maps = torch.einsum("bc,bchw->bhw", weights, activations)
    return maps.unsqueeze(1).expand(batch, num_targets, *maps.shape[1:])


def normalize_maps(cams: torch.Tensor) -> torch.Tensor:
    """Per-map min-max over the last two dims; a constant map becomes all zeros, never NaN."""
    flat = cams.flatten(-2)
    low = flat.amin(dim=-1, keepdim=True)
    high = flat.amax(dim=-1, keepdim=True)
    return ((flat - low) / (high - low + NORMALIZE_EPS)).view_as(cams)


def compute_cam(
    activations: torch.Tensor,
    gradients: torch.Tensor | None,
    method: str = "gradcam",
    normalize: bool = True,
    dtype: torch.dtype | None = torch.float32,
) -> torch.Tensor:
    """CAMs (B, K, H, W) for `method`: weighted channel sum, ReLU, optional min-max.

    `dtype` is the computation dtype (fp32 by default, as the kernel accumulates; tests pass
    float64 for the oracle); None keeps the inputs' dtype. `gradients` may be None for the
    GRADIENT_FREE methods.
    """
    if dtype is not None:
        activations = activations.to(dtype)
        gradients = None if gradients is None else gradients.to(dtype)
    cams = torch.relu(channel_weighted_maps(activations, gradients, method))
    return normalize_maps(cams) if normalize else cams
