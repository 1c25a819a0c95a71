"""What the backward differentiates: the target's logit, or Finer-CAM's score.

`grad_outputs(logits, targets, cfg)` is d score / d logits for each target, (K, B, classes): the
backward through the head then gives d score / d A. For the logit that is a one-hot row. For
Finer-CAM (Zhang et al. 2025, pytorch-grad-cam's FinerCAM with FinerWeightedTarget) the score of
target t compares it with the classes whose logits lie nearest z_t:

    S = sum_j p_j (z_t - alpha z_j) / (sum_j p_j + 1e-9),   p = softmax(z)

over j = the classes ranked `finer_comparison_categories` (1 = the nearest other class) by
|z_j - z_t|, the softmax weights differentiated too, as pytorch-grad-cam does.
"""

from __future__ import annotations

import torch

FINER_EPS = 1e-9


def comparison_classes(logits: torch.Tensor, targets: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """(B, K, J) classes at the given ranks of nearness to each target's logit (rank 0: the target
    itself); ranks past the last class are dropped, as pytorch-grad-cam clamps them."""
    num_classes = logits.shape[1]
    ranks = [rank for rank in ranks if rank < num_classes]
    target_logits = logits.gather(1, targets)  # (B, K)
    distance = (logits.unsqueeze(1) - target_logits.unsqueeze(2)).abs()  # (B, K, N)
    distance.scatter_(2, targets.unsqueeze(2), -1.0)  # the target ranks first even among exact ties
    order = distance.argsort(dim=2)
    return order[..., ranks] if ranks else order[..., :0]


def finer_scores(logits: torch.Tensor, targets: torch.Tensor, comparisons: torch.Tensor, alpha: float) -> torch.Tensor:
    """(B, K) Finer-CAM scores; differentiable in logits."""
    probs = torch.softmax(logits, dim=1)
    main = logits.gather(1, targets).unsqueeze(2)  # (B, K, 1)
    flat = comparisons.flatten(1)
    others = logits.gather(1, flat).view_as(comparisons).to(logits.dtype)
    weights = probs.gather(1, flat).view_as(comparisons)
    return (weights * (main - alpha * others)).sum(dim=2) / (weights.sum(dim=2) + FINER_EPS)


def grad_outputs(logits: torch.Tensor, targets: torch.Tensor, method: str, alpha: float = 1.0,
                 ranks: list[int] | None = None) -> torch.Tensor:
    """(K, B, classes): d score_k / d logits for each image and target."""
    num_targets = targets.shape[1]
    if method != "finercam":
        one_hot = torch.zeros((num_targets, *logits.shape), dtype=logits.dtype, device=logits.device)
        return one_hot.scatter_(2, targets.t().unsqueeze(2), 1.0)
    with torch.enable_grad():
        leaf = logits.detach().float().requires_grad_()
        comparisons = comparison_classes(leaf.detach(), targets, list(ranks or [1, 2, 3]))
        scores = finer_scores(leaf, targets, comparisons, alpha)
        rows = [torch.autograd.grad(scores[:, k].sum(), leaf, retain_graph=k + 1 < num_targets)[0]
                for k in range(num_targets)]
    return torch.stack(rows).to(logits.dtype)
