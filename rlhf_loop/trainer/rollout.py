"""The policy side of a round: prompts -> sampled responses -> log-probs, values, KL, through kernels/.

The policy is a plain Hugging Face causal LM (what gets published); the value head is a
separate Linear on its last hidden state, kept in the trainer's state dir. Sampling is our
own KV-cache loop with Gumbel-max on the raw logits (no top-k / top-p), so the tokens are
drawn from exactly the distribution whose log-probs PPO uses, and a torch.Generator makes
it reproducible (the gate compares two policies on the same noise).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch

from rlhf_loop.kernels import token_logprobs
from rlhf_loop.trainer.ppo import kl_per_token


def new_value_head(model) -> torch.nn.Linear:
    """Linear(hidden, 1), zero-initialised: the first round's critic predicts 0 everywhere."""
    head = torch.nn.Linear(model.config.hidden_size, 1, device=model.device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


def encode_prompts(tokenizer, prompts: list[list[dict]], max_prompt_tokens: int) -> list[list[int]]:
    """Chat-template each prompt with the generation prompt; keep the last max_prompt_tokens ids."""
    out = []
    for messages in prompts:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        out.append(list(ids)[-max_prompt_tokens:])
    return out


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) ids and bool mask, sequences flush right."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), P, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, P - len(s):] = True
    return ids.to(device), mask.to(device)


def right_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R) ids and bool mask, sequences flush left."""
    R = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), R), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), R, dtype=torch.bool)
    for i, x in enumerate(seqs):
        ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, :len(x)] = True
    return ids.to(device), mask.to(device)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counting only real tokens, so left padding does not shift them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def row_seeds(*keys: int, rows: Sequence[int]) -> list[int]:
    """One sampling seed per row, from the keys (seed, round, batch, ...) and the row's index in the
    whole batch: a row draws the same noise whichever rank samples it, alone or in any batch."""
    base = hashlib.sha256(repr(keys).encode()).digest()
    return [int.from_bytes(hashlib.sha256(base + r.to_bytes(8, "big")).digest()[:8], "big") >> 1 for r in rows]


@torch.no_grad()
def sample(
    model, query: torch.Tensor, query_mask: torch.Tensor, *, max_new_tokens: int, temperature: float,
    eos_ids: Collection[int], pad_id: int, seeds: Sequence[int], lockstep: Callable[[bool], bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample responses. query, query_mask: (B, P) -> response (B, R) with pad after EOS, mask (B, R).

    R = the longest response (<= max_new_tokens); any of `eos_ids` ends a row (models often
    have several). Gumbel-max: argmax(z / T + g) with g ~ Gumbel(0, 1) draws from
    softmax(z / T) without forming probabilities; row i's noise comes from its own generator
    seeded with seeds[i]. temperature 0: greedy. `lockstep(all_done) -> stop` lets ranks whose forwards are
    collectives (FSDP2) stop together (Dist.all); one rank stops when its rows are done.
    """
    B = query.shape[0]
    eos = torch.tensor(sorted(eos_ids), device=query.device)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    attn = query_mask.long()
    pos = position_ids(query_mask)
    out = model(input_ids=query, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache, logits = out.cache, out.logits[:, -1]  # (B, V)
    next_pos = pos[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=query.device)
    tokens, alive = [], []
    for _ in range(max_new_tokens):
        if temperature == 0:
            token = torch.argmax(logits, dim=-1)  # (B,)
        else:
            u = torch.stack([torch.rand(logits.shape[-1], generator=g) for g in gens]).to(logits.device)  # (B, V)
            gumbel = -torch.log(-torch.log(u.clamp(min=1e-20, max=1.0 - 1e-7)))
            token = torch.argmax(logits.float() / temperature + gumbel, dim=-1)  # (B,)
        alive.append(~done)
        tokens.append(torch.where(done, torch.full_like(token, pad_id), token))
        done = done | torch.isin(token, eos)
        stop = bool(done.all())
        if lockstep(stop) if lockstep is not None else stop:
            break
        attn = torch.cat([attn, torch.ones(B, 1, dtype=attn.dtype, device=attn.device)], dim=1)
        next_pos = next_pos + 1
        out = model(input_ids=tokens[-1][:, None], attention_mask=attn, position_ids=next_pos[:, None],
                    cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
    return torch.stack(tokens, 1), torch.stack(alive, 1)


@dataclass
class Forward:
    """What one forward pass over (query + response) gives for the response tokens.

    logprobs, entropy, values: (B, R) fp32, 0 off the response mask; logits: (B, R, V) or None.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor
    values: torch.Tensor | None
    logits: torch.Tensor | None


def forward(
    model, query: torch.Tensor, query_mask: torch.Tensor, response: torch.Tensor, response_mask: torch.Tensor,
    *, temperature: float, value_head: torch.nn.Linear | None = None, keep_logits: bool = False,
) -> Forward:
    """Policy (or reference) pass: log pi(response token), entropy, optional values, via kernels/."""
    P = query.shape[1]
    ids = torch.cat([query, response], dim=1)  # (B, P + R)
    mask = torch.cat([query_mask, response_mask], dim=1)
    R = response.shape[1]
    # the logits of the response's R tokens only, not the prompt's (the output head is a fifth of a small
    # model's FLOPs, and its (B, T, vocab) output the largest activation): the response fills the last R
    # positions, and position P - 1 + t predicts response token t
    out = model(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids(mask),
                output_hidden_states=value_head is not None, use_cache=False, logits_to_keep=R + 1)
    logits = out.logits[:, :-1]  # (B, R, V)
    labels = response.masked_fill(~response_mask, -100)
    logp, entropy = token_logprobs(logits, labels, temperature=temperature, return_entropy=True)
    values = None
    if value_head is not None:
        hidden = out.hidden_states[-1][:, P - 1:-1]  # (B, R, H): the state before each response token
        values = value_head(hidden.to(value_head.weight.dtype)).squeeze(-1).float() * response_mask
    return Forward(logp, entropy, values, logits if keep_logits else None)


@dataclass
class Scored:
    """Sampled responses seen by the policy and the reference; all (B, R) fp32, 0 off the mask."""

    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor | None
    entropy: torch.Tensor
    kl: torch.Tensor  # per-token KL estimate (the configured estimator) against the reference


@torch.no_grad()
def score_against_reference(
    policy, reference, query, query_mask, response, response_mask, *, temperature: float, estimator: str,
    batch_size: int, value_head: torch.nn.Linear | None = None,
) -> Scored:
    """Policy and reference passes over (query + response) in chunks of batch_size sequences."""
    parts = []
    for i in range(0, len(query), batch_size):
        s = slice(i, i + batch_size)
        pol = forward(policy, query[s], query_mask[s], response[s], response_mask[s], temperature=temperature,
                      value_head=value_head, keep_logits=estimator == "full")
        ref = forward(reference, query[s], query_mask[s], response[s], response_mask[s], temperature=temperature,
                      keep_logits=estimator == "full")
        ref_logits = None if ref.logits is None else ref.logits.to(pol.logits.dtype)
        kl = kl_per_token(estimator, pol.logprobs, ref.logprobs, pol.logits, ref_logits, temperature) * response_mask[s]
        parts.append((pol.logprobs, ref.logprobs, pol.values, pol.entropy, kl))
    logp, ref_logp, values, entropy, kl = zip(*parts)
    return Scored(torch.cat(logp), torch.cat(ref_logp), None if value_head is None else torch.cat(values),
                  torch.cat(entropy), torch.cat(kl))


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 autocast over fp32 master weights on CUDA; a no-op for fp32 (CPU)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def decode(tokenizer, response: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    """Response texts without special tokens (EOS, padding)."""
    return tokenizer.batch_decode([r[m].tolist() for r, m in zip(response, response_mask)], skip_special_tokens=True)


@dataclass
class BehaviourGap:
    """The voted answers' recorded log-probs (store.Behaviour: what the serving version did) against the current
    policy's on the same tokens at the same temperature. Only sampled answers (temperature > 0) at top_p 1 count:
    a greedy answer was not drawn from the distribution its log-probs describe, and a nucleus the trainer's
    forward does not cut. nan where no answer counted (docs/trainer.md, "Behaviour log-probs").

    onpolicy_*: answers the current version wrote, whose recorded log-probs are the current policy's own; their
        largest |recorded - recomputed| per token (nats) says whether serving and training compute the same
        policy (fp32 on both: ~1e-5; bf16 serving: ~1e-2; other weights: far more).
    offpolicy_*: answers other versions wrote. kl: the mean over their tokens of recorded - recomputed, the k1
        estimate of KL(behaviour || current) per token (unbiased: each token was drawn from the behaviour
        policy). ess: the effective sample size of the answers' importance weights pi_current(y) / pi_behaviour(y),
        as a share of the answers (1: the current policy would have written them as often; near 0: a
        correction would rest on a few answers).
    """

    onpolicy_answers: int = 0
    onpolicy_max_gap: float = float("nan")
    offpolicy_answers: int = 0
    offpolicy_kl: float = float("nan")
    offpolicy_ess: float = float("nan")


@torch.no_grad()
def behaviour_gap(policy, tokenizer, examples: Sequence, version: int, *, max_answers: int, max_prompt_tokens: int,
                  batch_size: int, autocast_dtype: torch.dtype, dist) -> BehaviourGap:
    """BehaviourGap of the first `max_answers` sampled answers among `examples` (store.Example) with recorded
    log-probs, under `policy` (the current policy, `version`). Every rank runs its share (dist.shard) and gets all."""
    usable = [e for e in examples if e.behaviour is not None and e.behaviour.token_ids
              and e.behaviour.temperature > 0 and e.behaviour.top_p >= 1.0][:max_answers]
    mine, real = dist.shard(len(usable))
    rows: list[tuple[bool, float, int, float]] = []  # per answer: on-policy, sum of gaps, tokens, max |gap|
    for i in range(0, len(mine), batch_size):
        chunk = [usable[j] for j in mine[i:i + batch_size]]
        query, query_mask = left_pad(encode_prompts(tokenizer, [e.messages for e in chunk], max_prompt_tokens),
                                     tokenizer.pad_token_id, policy.device)
        response, mask = right_pad([list(e.behaviour.token_ids) for e in chunk], tokenizer.pad_token_id, policy.device)
        with autocast(policy.device, autocast_dtype):
            logits = forward(policy, query, query_mask, response, mask, temperature=1.0, keep_logits=True).logits
        temperature = torch.tensor([e.behaviour.temperature for e in chunk], device=policy.device)[:, None, None]
        current = token_logprobs(logits.float() / temperature, response.masked_fill(~mask, -100))  # (B, R)
        recorded = torch.zeros_like(current)  # (B, R), flush left as the response
        for row, e in zip(recorded, chunk):
            row[:len(e.behaviour.logprobs)] = torch.tensor(e.behaviour.logprobs, dtype=current.dtype)
        gap = (recorded - current) * mask  # (B, R)
        rows += [(e.policy_version == version, g.sum().item(), int(m.sum()), g.abs().max().item())
                 for e, g, m in zip(chunk, gap, mask)][:max(0, real - i)]
    rows = [r for part in dist.gather(rows) for r in part]
    out = BehaviourGap()
    on = [r for r in rows if r[0]]
    off = [r for r in rows if not r[0]]
    if on:
        out.onpolicy_answers, out.onpolicy_max_gap = len(on), max(r[3] for r in on)
    if off:
        log_w = -torch.tensor([r[1] for r in off], dtype=torch.float64)  # log pi_current(y) - log pi_behaviour(y)
        w = (log_w - log_w.max()).exp()
        out.offpolicy_answers = len(off)
        out.offpolicy_kl = sum(r[1] for r in off) / sum(r[2] for r in off)
        out.offpolicy_ess = (w.sum() ** 2 / (len(off) * (w ** 2).sum())).item()
    return out
