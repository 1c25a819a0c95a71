"""Batched, device-side ROAD (RemOve And Debias, Rong et al. 2022) as pytorch-grad-cam 1.5.7
defines it (pytorch_grad_cam.metrics.road), for K maps per image and P percentiles at once.

For each image b, target k (class targets[b, k], map M = cams[b, k] upsampled bilinearly to the
image) and percentile p:

    morf[b, k, i]   ROADMostRelevantFirst(p):  prob(impute(x, M >= t_p(M))) - prob(x)
    lerf[b, k, i]   ROADLeastRelevantFirst(p): prob(impute(x, 1 - M >= t_p(1 - M))) - prob(x)
    combined        ROADCombined: (mean_i lerf - mean_i morf) / 2, over the percentiles given

prob is the softmax probability of the target (ClassifierOutputSoftmaxTarget). t_p(M) is
np.percentile(M, p) as pytorch-grad-cam calls it (p a Python number, method "linear"): with n
pixels, v = (n - 1) * (p / 100) in float64, a = M's floor(v)-th smallest value, c the next one,
g = v - floor(v), and in float32, t = a + (c - a) * g for g < 0.5 and c - (c - a) * (1 - g)
otherwise; a pixel is removed when not M < t, the comparison in float32 (pytorch-grad-cam's
binary_mask = M < t keeps the rest). Pixels equal to the threshold are removed, so a map with
ties at t removes more than (100 - p)% of the pixels (a constant map removes every pixel). 1 - M
is taken in float32 before its percentile, as there. Their defaults are p = 80 for MoRF and
p = 20 for LeRF; here both use every p of `percentiles`.

impute(x, R) is their NoisyLinearImputer: the removed pixels R are the unknowns u of the linear
system, one per channel, which makes each removed pixel the weighted mean of its in-image
8-neighbours (weights w = 1/6 for the 4 edge neighbours and 1/12 for the 4 diagonal ones, their
setup_sparse_system):

    s_i u_i - sum_{j ~ i, j removed} w_ij u_j = sum_{j ~ i, j kept} w_ij x_j,   s_i = sum_{j ~ i} w_ij

(s_i = 1 inside the image, less at its border: neighbours outside it are dropped), then
noise * N(0, 1) added to the removed pixels only. The system is symmetric positive definite
unless every pixel is removed (then its right-hand side is 0 and the solution, as scipy's spsolve
returns it, is 0: the image becomes the normalized mean plus noise).

Instead of one scipy sparse LU per image on the host, the systems of a whole chunk of perturbed
images are solved together on the device by conjugate gradients preconditioned with one geometric
multigrid V-cycle, all matrix-free over the full pixel grid with the masks applied:

- level 0 is the stencil above (times 12: centre 12 s_i, edge -2, diagonal -1 on removed pixels);
  level l + 1 has ceil((h + 1) / 2) x ceil((w + 1) / 2) points, the even pixels of level l plus one
  past each even-sized side, a point being active when its pixel (clamped into the grid) is;
  prolongation P is bilinear (weights 1, 1/2, 1/4) onto the active pixels, restriction is P^T and
  the coarse operator is the Galerkin product P^T A P, a 9-point stencil per level read off with 9
  probe vectors; the last level (at most 8 x 8 points) is solved densely (Cholesky, float64).
- smoothing is one damped-Jacobi sweep before and one after the coarse correction, so the V-cycle
  is a symmetric positive-definite preconditioner and CG converges in a number of iterations that
  hardly depends on the image size or the size of the removed regions.
- CG runs in float32 on a correction; the solution and its true residual b - A u are kept in
  float64 and CG restarts from that residual (iterative refinement), so float32 rounding of A u
  does not limit the accuracy. Each image and channel stops when its preconditioned residual (an
  estimate of the error of the imputed values) is at most `tol` in every pixel, and is then
  frozen at exactly zero residual while the others go on; past `max_iter` iterations a
  RuntimeWarning says how far it got, and an image with non-finite values gets NaN in its removed
  pixels and a RuntimeWarning instead of stalling the others.

Everything runs on the images' device with no loop over images (only over the levels and the CG
iterations, about 6 to 10 of them); the B * K * 2P perturbed images exist `chunk` at a time.
pytorch-grad-cam's ROADCombined averages over p = 10, 20, ..., 90 by default: `combined` equals
it for the same percentiles.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gradcam_batch.statistics import upsample as upsample_maps  # (B, K, h, w) -> float32 (B, K, H, W)

COARSEST = 8  # the dense solve takes over once both sides of a level are at most this
OMEGA = 0.8  # damped-Jacobi weight
TOL = 1e-6  # default stopping tolerance: estimated error of the imputed pixel values
MAX_ITER = 200


@dataclass
class RoadResult:
    morf: torch.Tensor  # float32 (B, K, P): ROADMostRelevantFirst(p), prob after imputation - before
    lerf: torch.Tensor  # float32 (B, K, P): ROADLeastRelevantFirst(p)
    base_confidence: torch.Tensor  # float32 (B, K): prob of the target on the unmodified image
    percentiles: tuple[float, ...] = ()  # the P percentiles, in the order of the last axis
    iterations: int = 0  # the most CG iterations any chunk's imputation took
    removed_fraction: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # float32 (B, K, 2P)

    @property
    def morf_average(self) -> torch.Tensor:
        """ROADMostRelevantFirstAverage over these percentiles, float32 (B, K)."""
        return self.morf.mean(dim=-1)

    @property
    def lerf_average(self) -> torch.Tensor:
        """ROADLeastRelevantFirstAverage over these percentiles, float32 (B, K)."""
        return self.lerf.mean(dim=-1)

    @property
    def combined(self) -> torch.Tensor:
        """pytorch-grad-cam's ROADCombined over these percentiles: (mean LeRF - mean MoRF) / 2,
        float32 (B, K)."""
        return (self.lerf.mean(dim=-1) - self.morf.mean(dim=-1)) / 2


# ---------------------------------------------------------------------------------------------
# The linear system and its multigrid hierarchy


def _sum3(x: torch.Tensor) -> torch.Tensor:
    """x (..., h, w) convolved with [1, 2, 1] x [1, 2, 1], zero outside the grid."""
    padded = F.pad(x, (1, 1, 1, 1))
    rows = torch.add(padded[..., :-2], padded[..., 2:]).add_(padded[..., 1:-1], alpha=2)  # (h + 2, w)
    return torch.add(rows[..., :-2, :], rows[..., 2:, :]).add_(rows[..., 1:-1, :], alpha=2)


def _fine_diagonal(height: int, width: int, device, dtype) -> torch.Tensor:
    """(1, 1, H, W): 12 s_i + 4, i.e. 16 minus the [1, 2, 1] x [1, 2, 1] weights outside the image."""
    return _sum3(torch.ones(1, 1, height, width, device=device, dtype=dtype))


def _coarse_size(n: int) -> int:
    return n // 2 + 1


def _prolong(coarse: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear prolongation (..., hc, wc) -> (..., height, width): fine (2I, 2J) = coarse (I, J),
    odd pixels the mean of their 2 or 4 coarse neighbours."""
    hc, wc = coarse.shape[-2:]
    lead = coarse.shape[:-2]
    mid_x = (coarse[..., :, :-1] + coarse[..., :, 1:]) * 0.5  # (hc, wc - 1)
    rows = coarse.new_zeros(*lead, hc, 2 * wc)
    rows[..., 0::2] = coarse
    rows[..., 1:-1:2] = mid_x
    fine = coarse.new_zeros(*lead, 2 * hc, 2 * wc)
    fine[..., 0::2, :] = rows
    fine[..., 1:-1:2, :] = (rows[..., :-1, :] + rows[..., 1:, :]) * 0.5
    return fine[..., :height, :width]


def _restrict(fine: torch.Tensor, hc: int, wc: int) -> torch.Tensor:
    """The transpose of _prolong: (..., h, w) -> (..., hc, wc)."""
    height, width = fine.shape[-2:]
    # one zero before, zeros after up to 2 * hc + 1 (resp. 2 * wc + 1)
    padded = F.pad(fine, (1, 2 * wc - width, 1, 2 * hc - height))
    cols = padded[..., 1::2][..., :wc] + 0.5 * (padded[..., 0::2][..., :wc] + padded[..., 2::2][..., :wc])
    return cols[..., 1::2, :][..., :hc, :] + 0.5 * (cols[..., 0::2, :][..., :hc, :] + cols[..., 2::2, :][..., :hc, :])


def _coarse_mask(mask: torch.Tensor) -> torch.Tensor:
    """Active points of the next level: the even pixels and, past an even-sized side, the last
    pixel again (the index clamped into the grid)."""
    height, width = mask.shape[-2:]
    rows = torch.arange(_coarse_size(height), device=mask.device).mul_(2).clamp_(max=height - 1)
    cols = torch.arange(_coarse_size(width), device=mask.device).mul_(2).clamp_(max=width - 1)
    return mask[..., rows, :][..., cols]


def _stencil_apply(coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y_K = sum_D coeffs[:, D, K] x_{K + D} for the 9 offsets D (row-major, (-1, -1) first),
    coeffs (N, 9, h, w), x (N, C, h, w); zero outside the grid."""
    height, width = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1))
    out = coeffs[:, 4:5] * x
    for index in range(9):
        if index == 4:
            continue
        dy, dx = divmod(index, 3)
        out.addcmul_(coeffs[:, index:index + 1], padded[..., dy:dy + height, dx:dx + width])
    return out


class _Level:
    """One level of the hierarchy: its active mask (N, 1, h, w), OMEGA / diagonal (0 where
    inactive) and either the fine stencil (level 0) or Galerkin coefficients (N, 9, h, w)."""

    def __init__(self, mask: torch.Tensor, coeffs: torch.Tensor | None, fine_diag: torch.Tensor | None):
        self.mask = mask
        self.coeffs = coeffs
        self.fine_diag = fine_diag
        diag = coeffs[:, 4:5] if coeffs is not None else fine_diag * mask - 4 * mask
        # OMEGA / diagonal: the damped-Jacobi step (0 on inactive points)
        self.jacobi = torch.where(diag > 0, OMEGA / torch.where(diag > 0, diag, torch.ones_like(diag)),
                                  torch.zeros_like(diag))
        self.dense_inverse: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mask.shape[-2:])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A x for x zero off the active points (N, C, h, w)."""
        if self.coeffs is None:
            return torch.addcmul(self.fine_diag * x, _sum3(x), self.mask, value=-1)
        return _stencil_apply(self.coeffs, x)


def _galerkin(level: _Level) -> _Level:
    """The next level: P^T A P on the active coarse points, read off with 9 probe vectors (each
    coarse point's 3 x 3 neighbours have 9 distinct colours (I mod 3, J mod 3))."""
    height, width = level.shape
    mask = _coarse_mask(level.mask)
    hc, wc = mask.shape[-2:]
    device, dtype = mask.device, mask.dtype
    colour = ((torch.arange(hc, device=device) % 3)[:, None] * 3 + (torch.arange(wc, device=device) % 3)[None, :])
    probes = (colour == torch.arange(9, device=device).view(9, 1, 1)).to(dtype)  # (9, hc, wc)
    batch = mask.shape[0]
    probes = probes.unsqueeze(0) * mask  # (N, 9, hc, wc): the 9 probes as channels
    # 3 probes at a time: the fine level's temporaries then take no more than a solve's
    responses = torch.cat([_restrict(level.apply(_prolong(probes[:, group:group + 3], height, width) * level.mask),
                                     hc, wc) for group in (0, 3, 6)], dim=1) * mask
    # coefficient of offset D at K: the response to the probe of colour(K + D)
    coeffs = torch.empty(batch, 9, hc, wc, device=device, dtype=dtype)
    for index in range(9):
        dy, dx = divmod(index, 3)
        shifted = (((torch.arange(hc, device=device) + dy - 1) % 3)[:, None] * 3
                   + ((torch.arange(wc, device=device) + dx - 1) % 3)[None, :])
        coeffs[:, index] = responses.gather(1, shifted.expand(batch, 1, hc, wc)).squeeze(1)
    # exact symmetry (the probes give it up to rounding): a_{K, K+D} = a_{K+D, K}
    padded = F.pad(coeffs, (1, 1, 1, 1))
    symmetric = coeffs.clone()
    for index in range(9):
        if index == 4:
            continue
        dy, dx = divmod(index, 3)
        mirror = 8 - index
        symmetric[:, index] = 0.5 * (coeffs[:, index] + padded[:, mirror, dy:dy + hc, dx:dx + wc])
    return _Level(mask, symmetric, None)


def _dense_inverse(level: _Level) -> torch.Tensor:
    """(N, n, n) float32 inverse of the level's matrix on its n = h * w points (identity rows on
    the inactive ones); zero for a matrix with no Dirichlet data (every pixel removed: singular,
    and its right-hand side is 0)."""
    height, width = level.shape
    n = height * width
    batch = level.mask.shape[0]
    basis = torch.eye(n, device=level.mask.device, dtype=level.mask.dtype).view(1, n, height, width)
    columns = level.apply(basis.expand(batch, n, height, width) * level.mask)  # (N, n, h, w): A e_j
    matrix = columns.reshape(batch, n, n).transpose(1, 2).double()
    active = level.mask.reshape(batch, n).double()
    matrix = matrix + torch.diag_embed(1 - active)
    matrix = 0.5 * (matrix + matrix.transpose(1, 2))
    factor, info = torch.linalg.cholesky_ex(matrix)
    good = info == 0
    factor = torch.where(good[:, None, None], factor, torch.eye(n, device=factor.device, dtype=factor.dtype))
    inverse = torch.cholesky_inverse(factor)
    return torch.where(good[:, None, None], inverse, torch.zeros_like(inverse)).to(level.mask.dtype)


class _Hierarchy:
    """The multigrid V-cycle preconditioner for N masks (N, H, W), True = removed (unknown)."""

    def __init__(self, removed: torch.Tensor, dtype=torch.float32):
        batch, height, width = removed.shape
        mask = removed.to(dtype).unsqueeze(1)
        self.levels = [_Level(mask, None, _fine_diagonal(height, width, removed.device, dtype))]
        while max(self.levels[-1].shape) > COARSEST:
            self.levels.append(_galerkin(self.levels[-1]))
        inverse = _dense_inverse(self.levels[-1])
        # every pixel removed: no Dirichlet data, a singular system whose right-hand side is 0
        # (the float64 factorization may still succeed, with a huge inverse)
        singular = removed.reshape(batch, -1).all(dim=1)
        self.levels[-1].dense_inverse = inverse.masked_fill(singular[:, None, None], 0)

    def fine_apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.levels[0].apply(x)

    def precondition(self, residual: torch.Tensor, depth: int = 0) -> torch.Tensor:
        level = self.levels[depth]
        if level.dense_inverse is not None:
            batch, channels, height, width = residual.shape
            flat = residual.reshape(batch, channels, height * width)
            return torch.matmul(flat, level.dense_inverse).view_as(residual)
        x = residual * level.jacobi  # one Jacobi sweep from zero
        defect = residual - level.apply(x)
        coarse = self.levels[depth + 1]
        correction = self.precondition(_restrict(defect, *coarse.shape) * coarse.mask, depth + 1)
        x.add_(_prolong(correction, *level.shape).mul_(level.mask))
        defect = residual - level.apply(x)
        return x.addcmul_(defect, level.jacobi)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, C, 1, 1): the inner products over the pixels of (N, C, H, W) fields."""
    return torch.linalg.vecdot(a.flatten(-2), b.flatten(-2)).unsqueeze(-1).unsqueeze(-1)


def _max_norm(a: torch.Tensor) -> torch.Tensor:
    """(N, C, 1, 1): the largest absolute value over the pixels."""
    return a.abs().amax(dim=(-2, -1), keepdim=True)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
    """numerator / denominator where `use` and the denominator is positive, 0 elsewhere."""
    use = use & (denominator > 0)
    return torch.where(use, numerator / torch.where(use, denominator, torch.ones_like(denominator)),
                       torch.zeros_like(numerator))


def _pcg(hierarchy: _Hierarchy, residual: torch.Tensor, z: torch.Tensor, active: torch.Tensor, tol: float,
         budget: int) -> tuple[torch.Tensor, int]:
    """Preconditioned CG from zero for A d = residual (float32 (N, C, H, W), z = B residual, both
    overwritten) on the systems `active` (N, C, 1, 1), each until its preconditioned residual is at
    most tol. A system that got there is frozen, its residual and direction set to exactly 0 (so
    the iterations the others still need cannot drive it into float32 denormals, which are two
    orders of magnitude slower on CPUs). Returns d and the iterations taken (at most budget)."""
    correction = torch.zeros_like(residual)
    residual.masked_fill_(~active, 0)
    z.masked_fill_(~active, 0)
    direction = z.clone()
    rz = _dot(residual, z)
    iterations = 0
    while iterations < budget:
        iterations += 1
        q = hierarchy.fine_apply(direction)
        alpha = _ratio(rz, _dot(direction, q), active)
        correction.addcmul_(alpha, direction)
        residual.addcmul_(alpha, q, value=-1)
        z = hierarchy.precondition(residual)
        still = active & (_max_norm(z) > tol)
        if not bool(still.any()):
            break
        if not torch.equal(still, active):
            residual.masked_fill_(~still, 0)
            z.masked_fill_(~still, 0)
            active = still
        rz_new = _dot(residual, z)
        beta = _ratio(rz_new, rz, active)
        rz = rz_new
        direction = z.addcmul_(beta, direction)
    return correction, iterations


def solve_imputation(images: torch.Tensor, removed: torch.Tensor, tol: float = TOL,
                     max_iter: int = MAX_ITER) -> tuple[torch.Tensor, int]:
    """The noise-free NoisyLinearImputer of images (N, C, H, W) with removed (N, H, W) bool: the
    removed pixels replaced by the solution of the linear system, float32 (N, C, H, W), and the
    number of CG iterations it took (0 when nothing needed solving). tol: the largest estimated
    error of an imputed value, in the images' units; max_iter: the CG iteration cap (then a
    RuntimeWarning, and the last iterate).

    Mixed precision: CG runs in float32 on the correction, the solution and its true residual
    b - A u are kept in float64 and CG restarts from that residual until it meets `tol`, so the
    result is not limited by float32 rounding in A u (which, for removed regions a hundred pixels
    across, would leave errors of about 1e-6 to 1e-5). Autocast is off inside (a bf16 matmul in
    the coarsest solve would make the preconditioner unsymmetric)."""
    device_type = images.device.type
    no_autocast = (torch.autocast(device_type=device_type, enabled=False) if device_type in ("cpu", "cuda")
                   else contextlib.nullcontext())
    with no_autocast:
        images = images.float()
        mask = removed.to(images.dtype).unsqueeze(1)
        hierarchy = _Hierarchy(removed, images.dtype)
        known = images.masked_fill(removed.unsqueeze(1), 0)  # (not a product: NaN * 0 is NaN)
        mask64 = mask.double()
        diag64 = hierarchy.levels[0].fine_diag.double()
        rhs = _sum3(known.double()).mul_(mask64)  # the kept neighbours' weights, times 12
        solution = torch.zeros_like(rhs)
        residual = rhs.float()
        iterations = 0
        previous = math.inf
        while True:  # one CG run per (re)start from the true residual
            if iterations:
                residual = (rhs - (diag64 * solution).sub_(_sum3(solution)).mul_(mask64)).float()
            z = hierarchy.precondition(residual)
            estimates = _max_norm(z)  # (N, C, 1, 1); NaN for an image with non-finite values
            finite = torch.isfinite(estimates)
            estimate = estimates.where(finite, torch.zeros_like(estimates)).max().item()
            # stop when done, out of iterations, or when a restart gained nothing (each should
            # gain about 6 digits); systems with non-finite values are left out
            if not estimate > tol or iterations >= max_iter or estimate > previous / 2:
                break
            previous = estimate
            correction, taken = _pcg(hierarchy, residual, z, estimates > tol, tol / 2, max_iter - iterations)
            iterations += taken
            solution.add_(correction)
        # an image with non-finite values gets NaN in its removed pixels, as an LU solve gives
        solution.masked_fill_(~finite, math.nan)
    if not estimate <= tol:
        warnings.warn(f"ROAD imputation did not converge: estimated error {estimate:.3g} > tol {tol:g} after "
                      f"{iterations} conjugate-gradient iterations", RuntimeWarning, stacklevel=2)
    if not bool(finite.all()):
        warnings.warn(f"ROAD imputation: {int((~finite).flatten(1).any(dim=1).sum())} of {finite.shape[0]} "
                      "images have non-finite values; their removed pixels are NaN", RuntimeWarning, stacklevel=2)
    return torch.where(removed.unsqueeze(1), solution.float(), images), iterations


# ---------------------------------------------------------------------------------------------
# Thresholds, perturbations and scores


def percentile_position(percentile: float, num_values: int) -> tuple[int, int, float]:
    """np.percentile's linear interpolation point for a Python number p over n values: the
    indices (lower, upper) into the sorted values and the weight g of the upper one, computed as
    numpy computes them (v = (n - 1) * (p / 100) in float64, clamped to the last value)."""
    virtual = (num_values - 1) * (percentile / 100)
    if virtual >= num_values - 1:
        return num_values - 1, num_values - 1, 0.0
    lower = max(math.floor(virtual), 0)
    return lower, lower + 1, virtual - lower


def percentile_thresholds(maps: torch.Tensor, percentiles: Sequence[float]) -> torch.Tensor:
    """float32 (..., P): np.percentile(map, p) of each map (..., H, W) for each p, bit for bit as
    numpy gives it for float32 maps and a Python number p (the interpolation done in float32,
    the weight rounded to float32; numpy's _lerp switches form at g = 0.5)."""
    ordered = maps.flatten(-2).float().sort(dim=-1).values
    columns = []
    for percentile in percentiles:
        lower, upper, weight = percentile_position(float(percentile), ordered.shape[-1])
        low, high = ordered[..., lower], ordered[..., upper]
        span = high - low
        if weight >= 0.5:
            columns.append(high - span * torch.tensor(1 - weight, dtype=torch.float32, device=maps.device))
        else:
            columns.append(low + span * torch.tensor(weight, dtype=torch.float32, device=maps.device))
    return torch.stack(columns, dim=-1)


def impute(images: torch.Tensor, removed: torch.Tensor, noise: float = 0.0,
           generator: torch.Generator | None = None, tol: float = TOL, max_iter: int = MAX_ITER) -> torch.Tensor:
    """NoisyLinearImputer(noise) of images (N, C, H, W) with removed (N, H, W) bool (True = the
    pixel is removed and imputed): float32 (N, C, H, W), the kept pixels unchanged, the removed
    ones the solution of the linear system plus noise * N(0, 1) drawn from `generator` (one
    standard normal per pixel and channel of the whole batch, in that order, masked to the
    removed pixels, so the draw does not depend on the masks)."""
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if removed.dim() != 3 or removed.shape[0] != images.shape[0] or removed.shape[1:] != images.shape[2:]:
        raise ValueError(f"removed must be (N, H, W) = {(images.shape[0], *images.shape[2:])}, "
                         f"got shape {tuple(removed.shape)}")
    _check_noise(noise, generator, images.device)
    removed = removed.to(device=images.device, dtype=torch.bool)
    with torch.no_grad():
        imputed, _ = solve_imputation(images, removed, tol, max_iter)
        return _add_noise(imputed, removed, noise, generator)


def _check_noise(noise: float, generator: torch.Generator | None, device: torch.device) -> None:
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    if generator is not None and generator.device.type != torch.device(device).type:
        raise ValueError(f"generator is on {generator.device}, the images on {device}")


def _add_noise(imputed: torch.Tensor, removed: torch.Tensor, noise: float,
               generator: torch.Generator | None) -> torch.Tensor:
    if noise == 0:
        return imputed
    draw = torch.randn(imputed.shape, generator=generator, device=imputed.device, dtype=imputed.dtype)
    return imputed.addcmul_(draw, removed.unsqueeze(1).to(imputed.dtype), value=noise)


def _check_inputs(images: torch.Tensor, cams: torch.Tensor, targets: torch.Tensor,
                  percentiles: tuple) -> None:
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float (B, C, H, W) tensor, got {images.dtype} of shape "
                         f"{tuple(images.shape)}")
    if cams.dim() != 4 or cams.shape[0] != images.shape[0]:
        raise ValueError(f"cams must be (B, K, h, w) with B = {images.shape[0]}, got shape {tuple(cams.shape)}")
    if tuple(targets.shape) != tuple(cams.shape[:2]):
        raise ValueError(f"targets must be (B, K) = {tuple(cams.shape[:2])}, got shape {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer class indices, got {targets.dtype}")
    if not percentiles:
        raise ValueError("percentiles must hold at least one value")
    for percentile in percentiles:
        if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real) or not 0 < percentile < 100:
            raise ValueError(f"percentiles must be numbers strictly between 0 and 100, got {percentile!r}")


def _target_probs(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, autocast) -> torch.Tensor:
    """float32 softmax probabilities (N,) of targets (N,): the forward under autocast, the
    logits cast to fp32 and the softmax outside it (as faithfulness and the engine do)."""
    with autocast():
        logits = model(images)
    return torch.softmax(logits.float(), dim=1).gather(1, targets.unsqueeze(1)).squeeze(1)


def road(model: nn.Module, images: torch.Tensor, cams: torch.Tensor, targets: torch.Tensor,
         percentiles: Sequence[float] = (20, 40, 60, 80), noise: float = 0.01,
         generator: torch.Generator | None = None,
         autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
         chunk: int | None = None, tol: float = TOL, max_iter: int = MAX_ITER,
         base_confidence: torch.Tensor | None = None) -> RoadResult:
    """ROAD MoRF and LeRF scores of K maps per image at P percentiles, on the device.

    model: eval-mode classifier. images: the normalized float (B, 3, H, W) input. cams:
    (B, K, h, w) maps in [0, 1] at any resolution (upsampled bilinearly to (H, W)). targets: int64
    (B, K) class indices. percentiles: the P values of p, each strictly between 0 and 100 (Python
    numbers, as pytorch-grad-cam takes them). noise: the imputer's noise level (0.01 there; 0 for
    the exact imputation), drawn from `generator` (on the images' device; None: the default one)
    chunk by chunk, so the scores are reproducible for a given generator state and chunk.
    autocast: a callable returning the context for the forwards (e.g. the engine's bf16 autocast;
    default none). chunk: perturbed images imputed and forwarded at a time (default 64). tol,
    max_iter: the imputation's stopping rule (estimated error of the imputed pixel values) and CG
    iteration cap per chunk (past it a RuntimeWarning, and the scores of the unconverged images).
    base_confidence: float32 (B, K) probabilities of the targets on the unmodified images when the
    caller has them (CamResult.probs); computed here otherwise.

    Cost: B forwards of the unmodified images (none given base_confidence) plus B * K * 2P
    forwards of imputed ones, in chunks, under torch.no_grad(); per chunk, a multigrid hierarchy
    and about 6 to 10 CG iterations, each a few dozen passes over the chunk's pixels. Memory
    beyond the model's: the upsampled maps and their float32 complements (8 bytes per pixel per
    map) and for one chunk about 25 float32 images' worth of solver state per perturbed image
    (about 1 GB for 64 at 224 x 224).
    """
    percentiles = tuple(percentiles)
    _check_inputs(images, cams, targets, percentiles)
    if base_confidence is not None and tuple(base_confidence.shape) != tuple(targets.shape):
        raise ValueError(f"base_confidence must be (B, K) = {tuple(targets.shape)}, "
                         f"got shape {tuple(base_confidence.shape)}")
    chunk = 64 if chunk is None else chunk
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    device = images.device
    _check_noise(noise, generator, device)
    autocast = contextlib.nullcontext if autocast is None else autocast
    batch, num_targets = targets.shape
    height, width = images.shape[-2:]
    num_percentiles = len(percentiles)
    slots = 2 * num_percentiles  # MoRF at each p, then LeRF at each p
    targets = targets.to(device=device, dtype=torch.int64)

    with torch.no_grad():
        maps = upsample_maps(cams.to(device), (height, width))  # (B, K, H, W) float32
        complements = 1 - maps  # LeRF ranks 1 - map, in float32 as pytorch-grad-cam does
        thresholds = torch.cat([percentile_thresholds(maps, percentiles),
                                percentile_thresholds(complements, percentiles)], dim=-1)  # (B, K, 2P)
        slot_is_morf = torch.arange(slots, device=device) < num_percentiles

        if base_confidence is None:
            base = torch.empty(batch, num_targets, dtype=torch.float32, device=device)
            for start in range(0, batch, chunk):
                end = min(start + chunk, batch)
                with autocast():
                    logits = model(images[start:end])
                base[start:end] = torch.softmax(logits.float(), dim=1).gather(1, targets[start:end])
        else:
            base = base_confidence.to(device=device, dtype=torch.float32)

        total = batch * num_targets * slots  # flat order (b, k, slot)
        probs = torch.empty(total, dtype=torch.float32, device=device)
        removed_fraction = torch.empty(total, dtype=torch.float32, device=device)
        iterations = 0
        for start in range(0, total, chunk):
            index = torch.arange(start, min(start + chunk, total), device=device)
            image_index = index // (num_targets * slots)
            map_index = (index // slots) % num_targets
            slot = index % slots
            values = torch.where(slot_is_morf[slot].view(-1, 1, 1), maps[image_index, map_index],
                                 complements[image_index, map_index])
            # pytorch-grad-cam keeps `value < threshold` and imputes every other pixel
            removed = ~(values < thresholds[image_index, map_index, slot].view(-1, 1, 1))
            imputed, taken = solve_imputation(images[image_index], removed, tol, max_iter)
            iterations = max(iterations, taken)
            imputed = _add_noise(imputed, removed, noise, generator)
            probs[start:start + index.shape[0]] = _target_probs(
                model, imputed.to(images.dtype), targets[image_index, map_index], autocast)
            removed_fraction[start:start + index.shape[0]] = removed.flatten(1).float().mean(dim=1)

    probs = probs.view(batch, num_targets, slots)
    return RoadResult(
        morf=probs[..., :num_percentiles] - base.unsqueeze(-1),
        lerf=probs[..., num_percentiles:] - base.unsqueeze(-1),
        base_confidence=base,
        percentiles=tuple(float(p) for p in percentiles),
        iterations=iterations,
        removed_fraction=removed_fraction.view(batch, num_targets, slots),
    )
