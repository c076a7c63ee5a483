"""PPO maths as small pure functions, and the Rollout container they work on.

Shapes: B sequences, R response tokens (right-padded; `mask` is 1 on sampled tokens,
EOS included, 0 on padding). Every (B, R) output is 0 where the mask is 0. The formulas
follow TRL's PPO trainer (and Ziegler et al. 2019 for the KL penalty and its controller);
tests/trainer/test_ppo.py checks each against numbers worked out by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from rlhf_loop.kernels import full_kl, kl_penalty


class Rollout(NamedTuple):
    """One batch of sampled responses with everything the PPO epochs need. All on one device.

    query:         (B, P) int64, prompt ids, left-padded
    query_mask:    (B, P) bool, 1 on prompt tokens
    response:      (B, R) int64, sampled ids, EOS included, pad after it
    response_mask: (B, R) bool, 1 on sampled tokens
    logprobs:      (B, R) fp32, log pi_old(token) at sampling time (temperature applied)
    ref_logprobs:  (B, R) fp32, log pi_ref(token)
    values:        (B, R) fp32, value head's V(state before the token)
    kl:            (B, R) fp32, per-token KL estimate against the reference (PPOConfig.kl_estimator)
    entropy:       (B, R) fp32, entropy of pi_old at each step
    scores:        (B,)   fp32, reward-model (or rule) score of the whole response, clipped
    rewards:       (B, R) fp32, -beta * kl, plus the score on the last response token
    advantages:    (B, R) fp32, GAE advantages (whitened if configured)
    returns:       (B, R) fp32, advantages (before whitening) + values: the value targets
    """

    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    kl: torch.Tensor
    entropy: torch.Tensor
    scores: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def select(self, idx: torch.Tensor) -> "Rollout":
        """The rows `idx` (a minibatch) of every tensor."""
        return Rollout(*(t[idx] for t in self))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1. x, mask: same shape -> scalar.

    `num_tokens` replaces the local count of masked positions as the denominator: with the
    minibatch split across ranks, sum / (the whole minibatch's tokens) per rank adds up to the
    mean over the whole minibatch (trainer/dist.py).
    """
    mask = mask.to(x.dtype)
    return (x * mask).sum() / (mask.sum().clamp(min=1.0) if num_tokens is None else num_tokens)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over masked positions, unbiased variance (as TRL). (B, R) -> (B, R), 0 off-mask.

    With shift_mean=False the mean is added back (only the scale changes).
    """
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n
    var = ((x - mean).square() * m).sum() / (n - 1).clamp(min=1.0)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def kl_per_token(
    estimator: str,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    logits: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) through kernels/. logprobs, ref_logprobs: (B, R) -> (B, R).

    "k1" / "k2" / "k3" estimate it from the sampled tokens' log-probs (kernels.kl_penalty);
    "full" is exact over the vocabulary from logits, ref_logits: (B, R, V) (kernels.full_kl).
    """
    if estimator == "full":
        return full_kl(logits, ref_logits, temperature=temperature)
    return kl_penalty(logprobs, ref_logprobs, estimator)


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float, reward_clip: float
) -> torch.Tensor:
    """Per-token rewards: -kl_coef * kl everywhere, + clip(score) on each row's last token.

    scores: (B,); kl, mask: (B, R) -> (B, R). A row with no tokens gets no score.
    """
    m = mask.to(kl.dtype)
    rewards = -kl_coef * kl * m
    last = (m.sum(1).long() - 1).clamp(min=0)  # right padding: the last 1 is at length - 1
    clipped = scores.clamp(-reward_clip, reward_clip).to(rewards.dtype) * (m.sum(1) > 0)
    return rewards.scatter_add(1, last.unsqueeze(1), clipped.unsqueeze(1))


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation. rewards, values, mask: (B, R) -> advantages, returns: (B, R).

    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last token is 0: the episode ends),
    A_t = delta_t + gamma * lam * A_{t+1}; returns = A + V.
    """
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    R = values.shape[1]
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * m


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = exp(logp - old).

    All inputs (B, R) -> scalar loss, and stats: clipfrac (share of tokens where the clip
    was active) and approx_kl (0.5 mean (logp - old)^2, as TRL logs it). num_tokens: masked_mean.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, num_tokens)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).float(), mask).detach(),
        "approx_kl": (0.5 * masked_mean(log_ratio.square(), mask)).detach(),
    }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range: float,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 mean max((V - G)^2, (clip(V, V_old +- eps) - G)^2). (B, R) -> scalar, clipfrac."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_loss = (values - returns).square()
    clipped_loss = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask, num_tokens)
    return loss, masked_mean((clipped_loss > unclipped_loss).float(), mask).detach()


@dataclass
class KLController:
    """beta for the KL penalty. Adaptive (Ziegler et al. 2019, as in TRL) when `target` is set:

        error = clip(kl / target - 1, -0.2, 0.2);   beta *= 1 + error * n_steps / horizon

    where kl is the batch's mean KL per response (nats) and n_steps its number of responses.
    With target None beta stays fixed.
    """

    value: float
    target: float | None
    horizon: float

    def update(self, current_kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value
