"""The promotion gate: does the round's candidate beat the current policy, close to the reference?

Both policies answer the same held-out prompts with the same sampling noise (a seeded
generator: common random numbers make the comparison far less noisy than two independent
samples), and are measured the same way:

* reward:    mean reward-function score of the responses (this round's RM, or the rule),
* kl_to_ref: mean over responses of sum_t KL(pi(.|prefix_t) || pi_ref(.|prefix_t)), exact
             over the vocabulary (kernels.full_kl), nats per response,
* length:    mean response length in tokens.

`decide` then promotes only if reward improves by more than GateConfig.min_reward_gain,
kl_to_ref < max_kl, and length >= min_length_ratio x the current policy's.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import torch

from trainer.config import GateConfig
from trainer.dist import Dist
from trainer.policy import autocast, decode, encode_prompts, left_pad, row_seeds, sample, score_against_reference
from trainer.reward_model import RewardFn


@dataclass(frozen=True)
class PolicyEval:
    reward: float
    kl_to_ref: float
    length: float
    responses: int


@torch.no_grad()
def evaluate(
    policy, reference, tokenizer, reward_fn: RewardFn, prompts: list[list[dict]], *, seed: int,
    eos_ids: Collection[int], max_new_tokens: int, temperature: float, max_prompt_tokens: int, batch_size: int,
    autocast_dtype: torch.dtype = torch.float32, dist: Dist = Dist(),
) -> PolicyEval:
    """Sample one response per prompt (seeded), score, measure exact KL to the reference and length.

    The prompts are split across ranks and the results gathered; prompt i draws its noise from
    (seed, i) wherever it runs, so the evaluation does not depend on the number of ranks.
    """
    device = policy.device
    was_training = policy.training
    policy.eval()
    mine, real = dist.shard(len(prompts))
    rewards, kls, lengths = [], [], []
    for i in range(0, len(mine), batch_size):
        rows = mine[i:i + batch_size]
        chunk = [prompts[r] for r in rows]
        query, query_mask = left_pad(encode_prompts(tokenizer, chunk, max_prompt_tokens), tokenizer.pad_token_id, device)
        with autocast(device, autocast_dtype):
            response, mask = sample(policy, query, query_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                                    eos_ids=eos_ids, pad_id=tokenizer.pad_token_id, seeds=row_seeds(seed, rows=rows),
                                    lockstep=dist.all if dist.sharded else None)
            kl = score_against_reference(policy, reference, query, query_mask, response, mask,
                                         temperature=temperature, estimator="full", batch_size=batch_size).kl
        rewards.append(reward_fn(chunk, decode(tokenizer, response, mask)).float().cpu())
        kls.append(kl.sum(1).cpu())
        lengths.append(mask.sum(1).float().cpu())
    policy.train(was_training)
    local = [torch.cat(x)[:real] if x else torch.zeros(0) for x in (rewards, kls, lengths)]
    reward, kl, length = (torch.cat(parts) for parts in zip(*dist.gather(local)))
    return PolicyEval(reward.mean().item(), kl.mean().item(), length.mean().item(), len(prompts))


def decide(candidate: PolicyEval, current: PolicyEval, cfg: GateConfig) -> tuple[bool, str]:
    """(promote?, why). The reason names every failed condition."""
    failed = []
    if not candidate.reward > current.reward + cfg.min_reward_gain:
        failed.append(f"reward {candidate.reward:.3f} does not beat current {current.reward:.3f}"
                      + (f" + {cfg.min_reward_gain:g}" if cfg.min_reward_gain else ""))
    if not candidate.kl_to_ref < cfg.max_kl:  # also catches nan
        failed.append(f"KL to reference {candidate.kl_to_ref:.2f} >= bound {cfg.max_kl:g}")
    if not candidate.length >= cfg.min_length_ratio * current.length:
        failed.append(f"mean length {candidate.length:.1f} < {cfg.min_length_ratio:g} x current {current.length:.1f}")
    if failed:
        return False, "; ".join(failed)
    return True, (f"reward {current.reward:.3f} -> {candidate.reward:.3f}, KL {candidate.kl_to_ref:.2f} < {cfg.max_kl:g}, "
                  f"length {candidate.length:.1f} vs {current.length:.1f}")


def eval_prompt_plan(heldout: list[list[dict]], responses: int) -> list[list[dict]]:
    """The held-out prompts repeated in order until there are `responses` of them."""
    reps = math.ceil(responses / len(heldout))
    return (heldout * reps)[:responses]
