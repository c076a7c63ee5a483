"""The other algorithms' objectives as small pure functions (PPO's are in trainer/ppo.py).

Shapes: N sequences; `group` = answers per prompt, the N rows laid out prompt by prompt
(rows [g*k, (g+1)*k) answer prompt g). tests/trainer/test_objectives.py checks each against
numbers worked out by hand.

    grpo_advantages   (N,) scores -> (N,)   (r - group mean) / (group std + eps)    DeepSeekMath (Shao et al., 2024)
    rloo_advantages   (N,) rewards -> (N,)  r_i - mean of the group's others        Ahmadian et al. (2024)
    kto_loss          sequence log-ratios + thumbs -> scalar                         Ethayarajh et al. (2024), as TRL
    dpo_loss          (chosen, rejected) log-ratios -> scalar                        Rafailov et al. (2023)

A log-ratio is log pi(y|x) - log pi_ref(y|x) summed over the response's tokens (log-probs
from rlhf_loop.kernels.token_logprobs).
"""

from __future__ import annotations

import torch


def grpo_advantages(scores: torch.Tensor, group: int, eps: float = 1e-4) -> torch.Tensor:
    """(N,) -> (N,): each answer's score against its group's, in units of the group's spread
    (unbiased std, eps 1e-4 as TRL's GRPOTrainer). A group whose answers all score alike gets 0."""
    g = scores.view(-1, group)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """(N,) -> (N,): r_i minus the mean of the other k - 1 answers to the same prompt (REINFORCE
    leave-one-out: an unbiased baseline that uses no critic). group >= 2."""
    g = rewards.view(-1, group)
    others = (g.sum(1, keepdim=True) - g) / (group - 1)
    return (g - others).reshape(-1)


def kto_loss(
    logratio: torch.Tensor, desirable: torch.Tensor, weights: torch.Tensor, z0: torch.Tensor, *, beta: float,
    desirable_weight: float = 1.0, undesirable_weight: float = 1.0, weight_total: float | None = None,
) -> torch.Tensor:
    """Kahneman-Tversky optimisation from unpaired thumbs, TRL's formulation.

    logratio (N,): each answer's log pi/pi_ref; desirable (N,) bool: thumbs up; weights (N,): its
    votes; z0 (): the reference point, the batch-mismatched KL estimate max(0, mean log pi/pi_ref
    over (x_i, y_j) pairs, j != i), no gradient. Per answer: desirable: lambda_D (1 - sigmoid(beta
    (r - z0))), undesirable: lambda_U (1 - sigmoid(beta (z0 - r))); the vote-weighted mean
    (weight_total: the whole batch's weight when it is split across ranks).
    """
    z0 = z0.detach()
    up = desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0)))
    down = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio)))
    per = torch.where(desirable, up, down)
    return (per * weights).sum() / (weights.sum() if weight_total is None else weight_total)


def kto_reference_point(mismatched_logratio: torch.Tensor) -> torch.Tensor:
    """z0 = max(0, mean log pi/pi_ref of answers paired with other prompts), detached (TRL's KL term)."""
    return mismatched_logratio.detach().mean().clamp(min=0.0)


def dpo_loss(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, *, beta: float,
             pair_total: float | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Direct preference optimisation: the weighted mean over pairs of -log sigmoid(beta (r_chosen - r_rejected)).
    (M,), (M,) -> scalar; weights (M,): each pair's (default 1; a preference's influence-cap weight);
    pair_total: the whole batch's weight when it is split across ranks."""
    losses = -torch.nn.functional.logsigmoid(beta * (chosen_logratio - rejected_logratio))
    if weights is not None:
        losses = losses * weights
    return losses.sum() / ((len(losses) if weights is None else weights.sum()) if pair_total is None else pair_total)
