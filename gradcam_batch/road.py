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
- the iteration stops when the preconditioned residual (an estimate of the error of the pixel
  values) is at most `tol` in every pixel of every image and channel, checked again on the true
  residual b - A u; past `max_iter` iterations a RuntimeWarning says how far it got.

Everything runs in float32 (the dense coarsest solve in float64) on the images' device, with no
loop over images; the B * K * 2P perturbed images exist `chunk` at a time.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gradcam_batch.statistics import upsample as upsample_maps  # (B, K, h, w) -> float32 (B, K, H, W)

COARSEST = 8  # the dense solve takes over once both sides of a level are at most this
OMEGA = 0.8  # damped-Jacobi weight
TOL = 1e-5  # default stopping tolerance: estimated error of the imputed pixel values
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
    """One level of the hierarchy: its active mask (N, 1, h, w), 1 / diagonal (0 where inactive)
    and either the fine stencil (level 0) or Galerkin coefficients (N, 9, h, w)."""

    def __init__(self, mask: torch.Tensor, coeffs: torch.Tensor | None, fine_diag: torch.Tensor | None):
        self.mask = mask
        self.coeffs = coeffs
        self.fine_diag = fine_diag
        diag = coeffs[:, 4:5] if coeffs is not None else fine_diag * mask - 4 * mask
        self.inv_diag = torch.where(diag > 0, 1 / torch.where(diag > 0, diag, torch.ones_like(diag)),
                                    torch.zeros_like(diag))
        self.dense_inverse: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mask.shape[-2:])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A x for x zero off the active points (N, C, h, w)."""
        if self.coeffs is None:
            return (self.fine_diag * x).sub_(_sum3(x)).mul_(self.mask)
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
    responses = _restrict(level.apply(_prolong(probes, height, width) * level.mask), hc, wc) * mask
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
        x = residual * level.inv_diag * OMEGA  # one Jacobi sweep from zero
        defect = residual - level.apply(x)
        coarse = self.levels[depth + 1]
        correction = self.precondition(_restrict(defect, *coarse.shape) * coarse.mask, depth + 1)
        x.add_(_prolong(correction, *level.shape).mul_(level.mask))
        defect = residual - level.apply(x)
        return x.addcmul_(defect, level.inv_diag, value=OMEGA)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=(-2, -1), keepdim=True)


def solve_imputation(images: torch.Tensor, removed: torch.Tensor, tol: float = TOL,
                     max_iter: int = MAX_ITER) -> tuple[torch.Tensor, int]:
    """The noise-free NoisyLinearImputer of images (N, C, H, W) with removed (N, H, W) bool: the
    removed pixels replaced by the solution of the linear system, float32 (N, C, H, W), and the
    number of CG iterations it took (0 when nothing needed solving)."""
    images = images.float()
    mask = removed.to(images.dtype).unsqueeze(1)
    hierarchy = _Hierarchy(removed, images.dtype)
    known = images * (1 - mask)
    rhs = _sum3(known).mul_(mask)  # the kept neighbours' weights, times 12
    solution = torch.zeros_like(images)
    iterations = 0
    estimate = math.inf
    while True:  # one pass per (re)start from the true residual
        residual = rhs - hierarchy.fine_apply(solution)
        z = hierarchy.precondition(residual)
        estimate = z.abs().amax().item()
        if estimate <= tol or iterations >= max_iter:
            break
        direction = z.clone()
        rz = _dot(residual, z)
        while iterations < max_iter:
            iterations += 1
            q = hierarchy.fine_apply(direction)
            pq = _dot(direction, q)
            alpha = torch.where(pq > 0, rz / torch.where(pq > 0, pq, torch.ones_like(pq)), torch.zeros_like(pq))
            solution.addcmul_(alpha, direction)
            residual.addcmul_(alpha, q, value=-1)
            z = hierarchy.precondition(residual)
            estimate = z.abs().amax().item()
            if estimate <= tol:
                break
            rz_new = _dot(residual, z)
            beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)), torch.zeros_like(rz))
            rz = rz_new
            direction = z.add_(direction * beta)
    if not estimate <= tol:
        warnings.warn(f"ROAD imputation did not converge: estimated error {estimate:.3g} > tol {tol:g} "
                      f"after {iterations} conjugate-gradient iterations", RuntimeWarning, stacklevel=2)
    return known + solution * mask, iterations
