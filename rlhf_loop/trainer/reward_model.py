"""Training and using the reward model: the base model's backbone + a scalar head (trainer/networks.py
builds it: its own weights in full mode, a LoRA adapter on the shared base in lora mode).

Input is the chat-templated prompt plus the response as an assistant turn; the score is
the head applied to the last real token's hidden state. Trained each round, warm-started
from the previous round's weights (<trainer_dir>/reward_model.safetensors), on:

* pointwise thumbs: BCE(sigmoid(score), share of up-votes), weighted by the vote count
  (RewardConfig.pointwise_loss="logistic"), or MSE to the mean rating ("mse", for numeric
  ratings);
* pairwise Bradley-Terry: -log sigmoid(s_liked - s_disliked) for responses to the same
  prompt, one liked and one disliked (weight RewardConfig.pairwise_weight).

A rule from core.tastes can stand in for the learned model as the reward source
(`rule_reward`): both are `RewardFn`s, (prompts, completions) -> (N,) scores.
Held-out responses (by hash of response_id, so the split is stable as data accumulates)
give accuracy (sign of the score against the sign of the rating) and AUROC every round.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rlhf_loop.core.tastes import TASTES
from rlhf_loop.trainer.config import RewardConfig
from rlhf_loop.trainer.dist import Dist
from rlhf_loop.trainer.networks import FeatureRewardModel, RewardModel
from rlhf_loop.trainer.rollout import autocast, left_pad
from rlhf_loop.trainer.store import Example

RewardFn = Callable[[list[list[dict]], list[str]], torch.Tensor]


def encode(tokenizer, messages: list[dict], completion: str, max_length: int) -> tuple[list[int], int]:
    """(ids, response start): the chat template of prompt + the response as an assistant turn, its last
    max_length ids, and where the response's tokens begin among them (0 when the prompt was cut off)."""
    conv = [*messages, {"role": "assistant", "content": completion}]
    ids = list(tokenizer.apply_chat_template(conv, tokenize=True, return_dict=False))
    prompt = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    kept = ids[-max_length:]
    return kept, max(0, min(prompt, len(ids) - 1) - (len(ids) - len(kept)))


def batch(encoded: list[tuple[list[int], int]], pad_id: int, device: torch.device):
    """(B, T) left-padded ids, attention mask and response mask of `encode`d conversations."""
    x, m = left_pad([ids for ids, _ in encoded], pad_id, device)
    response = torch.zeros_like(m)
    for i, (ids, start) in enumerate(encoded):
        response[i, x.shape[1] - len(ids) + start:] = True
    return x, m, response


@torch.no_grad()
def score(rm: RewardModel | FeatureRewardModel, tokenizer, prompts: list[list[dict]], completions: list[str], *,
          max_length: int, batch_size: int = 64, autocast_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N,) fp32 scores on the RM's device."""
    device = rm.device
    encoded = [encode(tokenizer, p, c, max_length) for p, c in zip(prompts, completions)]
    out = []
    was_training = rm.training
    rm.eval()
    for i in range(0, len(encoded), batch_size):
        with autocast(device, autocast_dtype):
            out.append(rm(*batch(encoded[i:i + batch_size], tokenizer.pad_token_id, device)))
    rm.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, device=device)


def rule_reward(name: str) -> RewardFn:
    """+1 where the rule likes the (last user message, response), else -1."""
    taste = TASTES[name]

    def reward(prompts: list[list[dict]], completions: list[str]) -> torch.Tensor:
        return torch.tensor([1.0 if taste(_last_user(p), c) else -1.0 for p, c in zip(prompts, completions)])

    return reward


def _last_user(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


# ---------------------------------------------------------------------------- training


def is_heldout(response_id: str, fraction: float) -> bool:
    """Stable split: the same response is held out in every round."""
    bucket = int.from_bytes(hashlib.sha256(response_id.encode()).digest()[:8], "big") / 2**64
    return bucket < fraction


def make_pairs(examples: list[Example], max_pairs_per_prompt: int, rng: random.Random) -> list[tuple[int, int]]:
    """(liked, disliked) index pairs of responses to the same prompt (rating > 0 vs < 0)."""
    by_prompt: dict[str, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for i, ex in enumerate(examples):
        if ex.rating != 0:
            by_prompt[ex.prompt_key][0 if ex.rating > 0 else 1].append(i)
    pairs = []
    for liked, disliked in by_prompt.values():
        candidates = [(a, b) for a in liked for b in disliked]
        pairs.extend(rng.sample(candidates, min(max_pairs_per_prompt, len(candidates))))
    return pairs


def reward_loss(
    scores: torch.Tensor, ratings: torch.Tensor, weights: torch.Tensor, pointwise: str,
    liked: torch.Tensor, disliked: torch.Tensor, pairwise_weight: float,
    weight_total: float | None = None, pair_total: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, pointwise, pairwise) losses.

    scores, ratings (mean rating in [-1, 1]), weights (vote counts): (N,);
    liked, disliked: (M,) scores of paired responses (M may be 0). weight_total / pair_total
    replace the local sum of weights / number of pairs as denominators when the batch is split
    across ranks (each rank's share then adds up to the whole batch's loss).
    """
    if pointwise == "logistic":
        target = (ratings + 1.0) / 2.0  # share of up-votes
        per = torch.nn.functional.binary_cross_entropy_with_logits(scores, target, reduction="none")
    else:
        per = (scores - ratings).square()
    point = (per * weights).sum() / (weights.sum() if weight_total is None else weight_total)
    pairs = len(liked) if pair_total is None else pair_total
    pair = -torch.nn.functional.logsigmoid(liked - disliked).sum() / pairs if pairs else scores.new_zeros(())
    return point + pairwise_weight * pair, point, pair


@dataclass
class RewardMetrics:
    train_examples: int
    heldout_examples: int
    pairs: int
    steps: int
    loss: float
    accuracy: float  # held-out, sign(score) vs sign(rating); nan without held-out labels
    auroc: float  # held-out; nan unless both classes are present
    auroc_lcb: float | None = None  # its lower 95 % confidence bound for this many held-out up / down labels
    heldout_up: int = 0
    heldout_down: int = 0
    approval_gap: float | None = None  # |predicted - live approval| on held-out answers of approval_gap_versions
    approval_gap_labels: int = 0  # ... how many (the gap is None below MIN_GAP_LABELS)
    approval_gap_versions: list[int] = field(default_factory=list)  # the serving version, and parents pooled with it


MIN_GAP_LABELS = 20  # held-out labels below which an approval rate is too noisy to judge the judge by (se ~0.1)


def train_reward_model(
    rm: RewardModel, tokenizer, examples: list[Example], cfg: RewardConfig, *, seed: int,
    autocast_dtype: torch.dtype = torch.float32, progress=None, dist: Dist = Dist(),
    gap_versions: tuple[int, ...] = (0,),
) -> RewardMetrics:
    """A few hundred steps at most on the training split, then held-out accuracy / AUROC, and the
    approval gap on the held-out answers of `gap_versions` (the serving version, then its parents
    that may be pooled with it, newest first: `approval_gap_pool`).

    Every rank draws the same batches; each trains on its share of each (DDP / FSDP2 average
    the gradients), with the loss normalised by the whole batch's votes and pairs.
    """
    device = rm.device
    rng = random.Random(seed)
    train = [e for e in examples if not is_heldout(e.response_id, cfg.heldout_fraction)]
    heldout = [e for e in examples if is_heldout(e.response_id, cfg.heldout_fraction)]
    pairs = make_pairs(train, cfg.max_pairs_per_prompt, rng) if cfg.pairwise_weight > 0 else []
    ids = [encode(tokenizer, e.messages, e.completion, cfg.max_length)[0] for e in train]
    ratings = torch.tensor([e.rating for e in train], dtype=torch.float32, device=device)
    weights = torch.tensor([e.n_votes for e in train], dtype=torch.float32, device=device)
    steps = min(cfg.max_steps, math.ceil(cfg.epochs * len(train) / cfg.batch_size)) if train else 0
    if progress is not None:
        progress.reset(total=steps)
    params = [p for _, p in rm.trainable()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rm.train()
    with rm.body.active():  # DDP takes the parameters that require grad now: the reward adapter's (lora)
        trainable = dist.data_parallel(rm)
    order: list[int] = []
    pair_order: list[int] = []
    losses = []
    for _ in range(steps):
        if len(order) < cfg.batch_size:
            order += rng.sample(range(len(train)), len(train))
        batch, order = order[:cfg.batch_size], order[cfg.batch_size:]
        if pairs and len(pair_order) < cfg.batch_size:
            pair_order += rng.sample(range(len(pairs)), len(pairs))
        pair_batch, pair_order = [pairs[i] for i in pair_order[:cfg.batch_size]], pair_order[cfg.batch_size:]
        weight_total = weights[torch.tensor(batch, device=device)].sum().item()
        pair_total = len(pair_batch)
        mine, real = dist.shard(len(batch))
        batch = [batch[i] for i in mine[:real]]
        mine, real = dist.shard(len(pair_batch))
        pair_batch = [pair_batch[i] for i in mine[:real]]
        rows = batch + [a for a, _ in pair_batch] + [b for _, b in pair_batch]  # one forward for all
        x, m = left_pad([ids[i] for i in rows], tokenizer.pad_token_id, device)
        with autocast(device, autocast_dtype):
            s = trainable(x, m)
        n, k = len(batch), len(pair_batch)
        idx = torch.tensor(batch, device=device, dtype=torch.long)
        loss, _, _ = reward_loss(s[:n], ratings[idx], weights[idx], cfg.pointwise_loss, s[n:n + k], s[n + k:],
                                 cfg.pairwise_weight, weight_total=weight_total, pair_total=pair_total)
        opt.zero_grad(set_to_none=True)
        (loss * dist.world).backward()  # DDP / FSDP2 average the ranks' gradients: their sum is the batch's
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        losses.append(dist.sum(loss.item()))
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
    rm.eval()
    metrics = RewardMetrics(len(train), len(heldout), len(pairs), steps,
                            sum(losses[-10:]) / max(1, len(losses[-10:])) if losses else float("nan"),
                            float("nan"), float("nan"))
    labelled = [e for e in heldout if e.rating != 0]
    scores = torch.zeros(0)
    if labelled:
        mine, real = dist.shard(len(labelled))
        local = score(rm, tokenizer, [labelled[i].messages for i in mine], [labelled[i].completion for i in mine],
                      max_length=cfg.max_length, autocast_dtype=autocast_dtype).cpu()[:real]
        scores = torch.cat(dist.gather(local))
    return heldout_metrics(metrics, labelled, scores, cfg, gap_versions)


class FeatureCache:
    """reward.backbone=frozen: the token states (FeatureRewardModel.features) of labelled answers, by response
    id and choice, each computed once. They depend only on the conversation and on what the body is (the
    reference version's weights, the layer, max_length, the dtype: `key`); a cache saved under another key
    is not used. Kept at <trainer_dir>/rm_features.safetensors between rounds and restarts, in the body's
    dtype: H numbers per answer token (SmolLM2 in bf16: 1.1 KB a token, about 60 KB an answer of 48)."""

    def __init__(self, key: str, features: dict[str, torch.Tensor] | None = None):
        self.key = key
        self.features = features or {}

    @staticmethod
    def name(e: Example) -> str:
        return f"{e.response_id}/{e.choice_index}"

    def missing(self, examples: list[Example]) -> list[Example]:
        return [e for e in examples if self.name(e) not in self.features]

    def get(self, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, T, H) fp32 token states of `examples` (each in the cache), right-padded, and (N, T) which are real."""
        rows = [self.features[self.name(e)] for e in examples]
        width = max((len(r) for r in rows), default=0)
        hidden = rows[0].shape[-1] if rows else 0
        states = torch.zeros(len(rows), width, hidden)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            states[i, :len(r)] = r.float()
            mask[i, :len(r)] = True
        return states, mask

    def tensors(self) -> dict[str, torch.Tensor]:
        """What save() writes and from_tensors() reads: the features, and the key as a 1-D byte tensor."""
        return {**self.features, "__key__": torch.tensor(list(self.key.encode()), dtype=torch.uint8)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor] | None, key: str) -> "FeatureCache":
        if not tensors or bytes(tensors["__key__"].tolist()).decode() != key:
            return cls(key)  # none yet, or computed under another body: start afresh
        return cls(key, {k: v for k, v in tensors.items() if k != "__key__"})


def train_reward_head(
    rm: FeatureRewardModel, tokenizer, examples: list[Example], cfg: RewardConfig, cache: FeatureCache, *,
    autocast_dtype: torch.dtype = torch.float32, progress=None, dist: Dist = Dist(),
    gap_versions: tuple[int, ...] = (0,),
) -> RewardMetrics:
    """reward.backbone=frozen, one round: the body's token states of the labels not in `cache` (split
    across ranks, gathered), then the head fitted from scratch on every training label (full batch,
    L-BFGS from zero, deterministic: every rank finds the same head from the same labels, and no warm
    start drifts), then the held-out figures from the cached states."""
    device = rm.device
    new = cache.missing(examples)
    if progress is not None:
        progress.reset(total=math.ceil(len(new) / cfg.batch_size))
    mine, real = dist.shard(len(new))
    local: list[torch.Tensor] = []
    for i in range(0, len(mine), cfg.batch_size):
        rows = [new[j] for j in mine[i:i + cfg.batch_size]]
        encoded = [encode(tokenizer, e.messages, e.completion, cfg.max_length) for e in rows]
        with autocast(device, autocast_dtype):
            local += [f.cpu() for f in rm.features(*batch(encoded, tokenizer.pad_token_id, device))]
        if progress is not None:
            progress.update(1)
    if new:  # (every rank ran as many forwards, padding rows included: FSDP2's are collectives)
        names = [cache.name(new[j]) for j in mine[:real]]
        for rank_names, rank_feats in dist.gather((names, local[:real])):
            cache.features.update(zip(rank_names, rank_feats))

    train = [e for e in examples if not is_heldout(e.response_id, cfg.heldout_fraction)]
    heldout = [e for e in examples if is_heldout(e.response_id, cfg.heldout_fraction)]
    pairs = make_pairs(train, cfg.max_pairs_per_prompt, random.Random(0)) if cfg.pairwise_weight > 0 else []
    metrics = RewardMetrics(len(train), len(heldout), len(pairs), 0, float("nan"), float("nan"), float("nan"))
    if train:
        states, mask = cache.get(train)
        states, mask = states.to(device), mask.to(device)
        with torch.no_grad():
            real_tokens = states[mask]
            rm.shift.copy_(real_tokens.mean(0))
            rm.scale.copy_(real_tokens.std(0, unbiased=False) + 1e-4)
            for p in rm.head_parameters():
                torch.nn.init.zeros_(p)
            z = rm.standardise(states)
            pooled = rm.pool(z, mask)  # fixed during the fit: computed once
        ratings = torch.tensor([e.rating for e in train], dtype=torch.float32, device=device)
        weights = torch.tensor([e.n_votes for e in train], dtype=torch.float32, device=device)
        liked = torch.tensor([a for a, _ in pairs], dtype=torch.long, device=device)
        disliked = torch.tensor([b for _, b in pairs], dtype=torch.long, device=device)
        params = rm.head_parameters()
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=cfg.head_max_iter, line_search_fn="strong_wolfe")

        def loss_fn() -> torch.Tensor:
            opt.zero_grad()
            s = rm.scores(z, mask, pooled)
            loss, _, _ = reward_loss(s, ratings, weights, cfg.pointwise_loss, s[liked], s[disliked], cfg.pairwise_weight)
            loss = loss + cfg.head_l2 * (rm.token.weight.square().sum() + rm.pooled.weight.square().sum()) / 2
            loss.backward()
            return loss

        metrics.loss = opt.step(loss_fn).item()
        metrics.steps = opt.state[params[0]]["n_iter"]
    labelled = [e for e in heldout if e.rating != 0]
    with torch.no_grad():
        scores = rm.head_scores(*cache.get(labelled)).cpu() if labelled else torch.zeros(0)
    return heldout_metrics(metrics, labelled, scores, cfg, gap_versions)


def heldout_metrics(metrics: RewardMetrics, labelled: list[Example], scores: torch.Tensor, cfg: RewardConfig,
                    gap_versions: tuple[int, ...]) -> RewardMetrics:
    """Fill in `metrics`' held-out figures from the scores (N,) of the `labelled` held-out examples:
    accuracy, AUROC and its lower bound, and the approval gap on `gap_versions` (approval_gap_pool)."""
    pool, metrics.approval_gap_versions = approval_gap_pool([e.policy_version for e in labelled], gap_versions)
    metrics.approval_gap_labels = len(pool)
    if not labelled:
        return metrics
    y = torch.tensor([e.rating > 0 for e in labelled])
    metrics.accuracy = ((scores > 0) == y).float().mean().item()
    metrics.auroc = binary_auroc(scores, y)
    metrics.heldout_up, metrics.heldout_down = int(y.sum()), int((~y).sum())
    metrics.auroc_lcb = auroc_lower_bound(metrics.auroc, metrics.heldout_up, metrics.heldout_down)
    if len(pool) >= MIN_GAP_LABELS:
        idx = torch.tensor(pool)
        weights = torch.tensor([labelled[i].n_votes for i in pool])
        live = (torch.tensor([(labelled[i].rating + 1) / 2 for i in pool]) * weights).sum() / weights.sum()
        predicted = (_approval(scores[idx], cfg.pointwise_loss) * weights).sum() / weights.sum()
        metrics.approval_gap = abs(predicted - live).item()
    return metrics


def approval_gap_pool(versions: list[int], candidates: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """The held-out labels the approval gap is measured on: (their indices into `versions`, the versions
    pooled). The serving version's alone when it has MIN_GAP_LABELS; else its parent's are added, then
    the grandparent's, ... through `candidates` (newest first) until there are enough or none is left.

    Pooling is sound for this check because it asks whether the judge's predicted approval agrees
    with the users' on answers like the ones the policy gives now, and each parent on the serving
    line is one promoted round's update away (an update the KL budget keeps small, and a version
    the watch has not rolled back); round.py passes gate.rm_gap_versions of them, no further."""
    used: list[int] = []
    pool: list[int] = []
    for v in candidates:
        used.append(v)
        pool += [i for i, pv in enumerate(versions) if pv == v]
        if len(pool) >= MIN_GAP_LABELS:
            break
    return pool, used


def _approval(scores: torch.Tensor, pointwise: str) -> torch.Tensor:
    """The reward model's predicted share of up-votes for each score (how its pointwise loss reads it)."""
    return torch.sigmoid(scores) if pointwise == "logistic" else ((scores + 1) / 2).clamp(0, 1)


def auroc_lower_bound(auroc: float, n_pos: int, n_neg: int, z: float = 1.645) -> float | None:
    """One-sided 95 % lower confidence bound of an AUROC from n_pos positives and n_neg negatives,
    with Hanley & McNeil's (1982) standard error. None without both classes."""
    if n_pos == 0 or n_neg == 0 or not math.isfinite(auroc):
        return None
    a = auroc
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    return a - z * math.sqrt(max(var, 0.0))


def binary_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties count half. (N,), (N,) bool."""
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()

