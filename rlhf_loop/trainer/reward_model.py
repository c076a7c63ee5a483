"""Training and using the reward model: the base model's backbone + a scalar head (trainer/networks.py
builds it: its own weights in full mode, a LoRA adapter on the shared base in lora mode).

Input is the chat-templated prompt plus the response as an assistant turn; the score is
the head applied to the last real token's hidden state. Trained each round, warm-started
from the previous round's weights (<trainer_dir>/reward_model.safetensors), on:

* pointwise thumbs: BCE(sigmoid(score), share of up-votes), weighted by the vote count
  (RewardConfig.pointwise_loss="logistic"), or MSE to the mean rating ("mse", for numeric
  ratings);
* pairwise Bradley-Terry: -log sigmoid(s_liked - s_disliked) for responses to the same
  prompt, one liked and one disliked (weight RewardConfig.pairwise_weight); the users' own
  preferences (POST /v1/preferences) are such pairs directly, each counting
  RewardConfig.preference_weight times a thumbs-derived pair (times its influence-cap weight).
  A tie is a pair with target 1/2: -(log sigmoid(d) + log sigmoid(-d)) / 2, which pulls the two
  scores together (the Bradley-Terry likelihood of a coin flip between them).

A rule from core.tastes can stand in for the learned model as the reward source
(`rule_reward`): both are `RewardFn`s, (prompts, completions) -> (N,) scores.
Held-out responses (by hash of response_id, so the split is stable as data accumulates)
give accuracy (sign of the score against the sign of the rating) and AUROC every round;
held-out preferences (either answer held out) give pairwise accuracy, P(s_chosen > s_rejected),
with its lower confidence bound: the judge's figure when there are preferences (trainer/gate.py).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from rlhf_loop.core.tastes import TASTES
from rlhf_loop.trainer.config import RewardConfig
from rlhf_loop.trainer.dist import Dist
from rlhf_loop.trainer.networks import FeatureRewardModel, RewardModel
from rlhf_loop.trainer.rollout import autocast, left_pad
from rlhf_loop.trainer.store import Answer, Example, PreferencePair

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


def _bucket(response_id: str) -> float:
    """A response's place in [0, 1), the same in every round: what the splits are cut from."""
    return int.from_bytes(hashlib.sha256(response_id.encode()).digest()[:8], "big") / 2**64


def is_heldout(response_id: str, fraction: float) -> bool:
    """Stable split: the same response is held out in every round."""
    return _bucket(response_id) < fraction


def is_heldout_pair(p: PreferencePair, fraction: float) -> bool:
    """A preference is held out when either of its answers is: then no preference trains on a held-out
    answer, and the thumbs' held-out figures stay clean (a held-out preference may share an answer with
    a training thumb; the two choices of one n=2 response, one response id, never do)."""
    return is_heldout(p.chosen.response_id, fraction) or is_heldout(p.rejected.response_id, fraction)


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


class Pair(NamedTuple):
    """One Bradley-Terry pair: rows `better` and `worse` (indices into the rows a round scores), the probability
    that `better` is the better one (1; 1/2 for a tie) and the pair's weight."""

    better: int
    worse: int
    target: float = 1.0
    weight: float = 1.0


def all_pairs(thumb_pairs: list[tuple[int, int]], preferences: list[PreferencePair], first_row: int,
              preference_weight: float) -> list[Pair]:
    """The thumbs-derived pairs (weight 1), then one pair per preference, whose answers are rows
    first_row + 2k (chosen) and first_row + 2k + 1 (rejected): weight preference_weight x its
    influence-cap weight, target 1/2 for a tie."""
    return [Pair(a, b) for a, b in thumb_pairs] + [
        Pair(first_row + 2 * k, first_row + 2 * k + 1, 0.5 if p.tie else 1.0, preference_weight * p.weight)
        for k, p in enumerate(preferences)]


def preference_rows(preferences: list[PreferencePair]) -> list[tuple[list[dict], str]]:
    """(messages, completion) of each preference's chosen, then rejected answer: the rows all_pairs names."""
    return [(p.messages, a.completion) for p in preferences for a in (p.chosen, p.rejected)]


def reward_loss(
    scores: torch.Tensor, ratings: torch.Tensor, weights: torch.Tensor, pointwise: str,
    liked: torch.Tensor, disliked: torch.Tensor, pairwise_weight: float,
    weight_total: float | None = None, pair_total: float | None = None,
    pair_weights: torch.Tensor | None = None, pair_targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, pointwise, pairwise) losses.

    scores, ratings (mean rating in [-1, 1]), weights (vote counts): (N,);
    liked, disliked: (M,) scores of paired responses (M may be 0; N too, with preferences only);
    pair_weights (M,): each pair's weight (default 1); pair_targets (M,): the probability t that
    `liked` is the better one (default 1; 1/2 for a tie), the pair's loss being
    -(t log sigmoid(d) + (1 - t) log sigmoid(-d)), d = liked - disliked (t = 1: -log sigmoid(d)).
    The pairwise loss is the pair-weighted mean. weight_total / pair_total replace the local sums of
    weights / pair weights as denominators when the batch is split across ranks (each rank's share then
    adds up to the whole batch's loss).
    """
    if pointwise == "logistic":
        target = (ratings + 1.0) / 2.0  # share of up-votes
        per = torch.nn.functional.binary_cross_entropy_with_logits(scores, target, reduction="none")
    else:
        per = (scores - ratings).square()
    votes = weights.sum() if weight_total is None else weight_total
    point = (per * weights).sum() / votes if votes else scores.new_zeros(())  # none: a batch of preferences only
    w = torch.ones_like(liked) if pair_weights is None else pair_weights
    pairs = w.sum() if pair_total is None else pair_total
    d = liked - disliked
    per_pair = -torch.nn.functional.logsigmoid(d)
    if pair_targets is not None:
        t = pair_targets
        per_pair = -(t * torch.nn.functional.logsigmoid(d) + (1 - t) * torch.nn.functional.logsigmoid(-d))
    pair = (w * per_pair).sum() / pairs if pairs else scores.new_zeros(())
    return point + pairwise_weight * pair, point, pair


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """P(score of the chosen answer > the rejected one's), equal scores counting half. (P,), (P,); nan for P = 0."""
    if len(chosen) == 0:
        return float("nan")
    return ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean().item()


def accuracy_lower_bound(accuracy: float, n: int, z: float = 1.645) -> float | None:
    """One-sided 95 % lower confidence bound of a proportion from n trials (Wilson's score interval:
    inside [0, 1] and sound for small n). None for n = 0."""
    if n == 0 or not math.isfinite(accuracy):
        return None
    centre = accuracy + z * z / (2 * n)
    spread = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


@dataclass
class RewardMetrics:
    train_examples: int
    heldout_examples: int
    pairs: int
    steps: int
    loss: float
    accuracy: float  # held-out, sign(score) vs sign(rating); nan without held-out labels
    auroc: float  # the judge's figure, held-out (auroc_folds); nan unless both classes are present
    auroc_lcb: float | None = None  # its lower 95 % confidence bound for this many held-out up / down labels
    auroc_folds: int = 1  # 1: on the held-out split; k > 1: cross-validated, every label scored by a head fit
    # without its fold (RewardConfig.judge_folds, within_fold_auroc), heldout_up / _down then count every label
    heldout_up: int = 0
    heldout_down: int = 0
    approval_gap: float | None = None  # |predicted - live approval| on held-out answers of approval_gap_versions
    approval_gap_labels: int = 0  # ... how many (the gap is None below MIN_GAP_LABELS)
    approval_gap_versions: list[int] = field(default_factory=list)  # the serving version, and parents pooled with it
    train_preferences: int = 0  # preferences trained on (counted in `pairs` too)
    heldout_preferences: int = 0  # held-out preferences that are not ties: what pair_accuracy is measured on
    pair_accuracy: float = float("nan")  # held-out, P(s_chosen > s_rejected); nan without held-out preferences
    pair_accuracy_lcb: float | None = None  # its lower 95 % confidence bound (accuracy_lower_bound)


MIN_GAP_LABELS = 20  # held-out labels below which an approval rate is too noisy to judge the judge by (se ~0.1)


def train_reward_model(
    rm: RewardModel, tokenizer, examples: list[Example], cfg: RewardConfig, *, seed: int,
    autocast_dtype: torch.dtype = torch.float32, progress=None, dist: Dist = Dist(),
    gap_versions: tuple[int, ...] = (0,), preferences: list[PreferencePair] = (),
) -> RewardMetrics:
    """A few hundred steps at most on the training split, then held-out accuracy / AUROC, pairwise accuracy
    on the held-out preferences, and the approval gap on the held-out answers of `gap_versions` (the serving
    version, then its parents that may be pooled with it, newest first: `approval_gap_pool`).

    Rows are the training thumbs, then each training preference's two answers (preference_rows); every
    step takes batch_size thumbs and batch_size pairs (all_pairs: the thumbs-derived ones and the
    preferences). Every rank draws the same batches; each trains on its share of each (DDP / FSDP2 average
    the gradients), with the loss normalised by the whole batch's votes and pair weights.
    """
    device = rm.device
    rng = random.Random(seed)
    train = [e for e in examples if not is_heldout(e.response_id, cfg.heldout_fraction)]
    heldout = [e for e in examples if is_heldout(e.response_id, cfg.heldout_fraction)]
    train_prefs = [p for p in preferences if not is_heldout_pair(p, cfg.heldout_fraction)]
    heldout_prefs = [p for p in preferences if is_heldout_pair(p, cfg.heldout_fraction)]
    if cfg.pairwise_weight > 0:
        pairs = all_pairs(make_pairs(train, cfg.max_pairs_per_prompt, rng), train_prefs, len(train),
                          cfg.preference_weight)
    else:
        pairs, train_prefs = [], []
    rows = [(e.messages, e.completion) for e in train] + preference_rows(train_prefs)
    ids = [encode(tokenizer, m, c, cfg.max_length)[0] for m, c in rows]
    ratings = torch.tensor([e.rating for e in train], dtype=torch.float32, device=device)
    weights = torch.tensor([e.n_votes for e in train], dtype=torch.float32, device=device)
    pair_targets = torch.tensor([p.target for p in pairs], dtype=torch.float32, device=device)
    pair_weights = torch.tensor([p.weight for p in pairs], dtype=torch.float32, device=device)
    items = max(len(train), len(train_prefs))  # with preferences only, a round still takes its steps
    steps = min(cfg.max_steps, math.ceil(cfg.epochs * items / cfg.batch_size)) if items else 0
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
        pair_batch, pair_order = pair_order[:cfg.batch_size], pair_order[cfg.batch_size:]
        weight_total = weights[torch.tensor(batch, device=device, dtype=torch.long)].sum().item()
        pair_total = pair_weights[torch.tensor(pair_batch, device=device, dtype=torch.long)].sum().item()
        mine, real = dist.shard(len(batch))
        batch = [batch[i] for i in mine[:real]]
        mine, real = dist.shard(len(pair_batch))
        pair_batch = [pair_batch[i] for i in mine[:real]]
        chosen = [pairs[i] for i in pair_batch]
        rows_now = batch + [p.better for p in chosen] + [p.worse for p in chosen]  # one forward for all
        x, m = left_pad([ids[i] for i in rows_now], tokenizer.pad_token_id, device)
        with autocast(device, autocast_dtype):
            s = trainable(x, m)
        n, k = len(batch), len(pair_batch)
        idx = torch.tensor(batch, device=device, dtype=torch.long)
        pidx = torch.tensor(pair_batch, device=device, dtype=torch.long)
        loss, _, _ = reward_loss(s[:n], ratings[idx], weights[idx], cfg.pointwise_loss, s[n:n + k], s[n + k:],
                                 cfg.pairwise_weight, weight_total=weight_total, pair_total=pair_total,
                                 pair_weights=pair_weights[pidx], pair_targets=pair_targets[pidx])
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
                            float("nan"), float("nan"), train_preferences=len(train_prefs))
    labelled = [e for e in heldout if e.rating != 0]
    compared = [p for p in heldout_prefs if not p.tie]
    scores = _score_split(rm, tokenizer, [(e.messages, e.completion) for e in labelled], cfg, autocast_dtype, dist)
    pair_scores = _score_split(rm, tokenizer, preference_rows(compared), cfg, autocast_dtype, dist)
    return heldout_metrics(metrics, labelled, scores, cfg, gap_versions, pair_scores.view(-1, 2))


def _score_split(rm: RewardModel, tokenizer, rows: list[tuple[list[dict], str]], cfg: RewardConfig,
                 autocast_dtype: torch.dtype, dist: Dist) -> torch.Tensor:
    """(N,) scores of the (messages, completion) rows on CPU, each rank scoring its share (gathered)."""
    if not rows:
        return torch.zeros(0)
    mine, real = dist.shard(len(rows))
    local = score(rm, tokenizer, [rows[i][0] for i in mine], [rows[i][1] for i in mine], max_length=cfg.max_length,
                  autocast_dtype=autocast_dtype).cpu()[:real]
    return torch.cat(dist.gather(local))


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
    def name(e: Example | Answer) -> str:
        return f"{e.response_id}/{e.choice_index}"

    def missing(self, examples: list[Example], preferences: list[PreferencePair] = ()) -> list[tuple[str, list[dict], str]]:
        """(name, messages, completion) of each answer of `examples` and `preferences` not in the cache, once each."""
        out: dict[str, tuple[str, list[dict], str]] = {}
        answers = [(e, e.messages) for e in examples] + [(a, p.messages) for p in preferences
                                                          for a in (p.chosen, p.rejected)]
        for a, messages in answers:
            name = self.name(a)
            if name not in self.features:
                out.setdefault(name, (name, messages, a.completion))
        return list(out.values())

    def get(self, answers: list[Example | Answer]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, T, H) fp32 token states of `answers` (each in the cache), right-padded, and (N, T) which are real."""
        rows = [self.features[self.name(e)] for e in answers]
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
    gap_versions: tuple[int, ...] = (0,), preferences: list[PreferencePair] = (),
) -> RewardMetrics:
    """reward.backbone=frozen, one round: the body's token states of the answers not in `cache` (thumbs and
    both answers of each preference; split across ranks, gathered), then the head fitted from scratch on
    every training label (full batch, L-BFGS from zero, deterministic: every rank finds the same head from
    the same labels, and no warm start drifts), then the held-out figures (thumbs and preferences) from the
    cached states. With reward.judge_folds = k > 1 (and while the held-out split has fewer than
    reward.judge_folds_until up and down votes) the judge's AUROC is k-fold cross-validated: k - 1 more heads,
    each fit without one fold of the training split (and with the held-out one), score that fold, and the
    AUROC (and its lower bound) is taken over every vote, ups against downs of the same fold
    (within_fold_auroc). The served head is fit as without it, and its accuracy, approval gap and pairwise
    figures stay on the held-out split. A head's fit costs a fraction of a second on cached features; the
    judge's bound, from k times the held-out votes, is that much tighter (the first rounds' held-out split
    has a few dozen votes: docs/trainer.md, "The judge, cross-validated")."""
    device = rm.device
    new = cache.missing(examples, preferences)
    if progress is not None:
        progress.reset(total=math.ceil(len(new) / cfg.batch_size))
    mine, real = dist.shard(len(new))
    local: list[torch.Tensor] = []
    for i in range(0, len(mine), cfg.batch_size):
        rows = [new[j] for j in mine[i:i + cfg.batch_size]]
        encoded = [encode(tokenizer, messages, completion, cfg.max_length) for _, messages, completion in rows]
        with autocast(device, autocast_dtype):
            local += [f.cpu() for f in rm.features(*batch(encoded, tokenizer.pad_token_id, device))]
        if progress is not None:
            progress.update(1)
    if new:  # (every rank ran as many forwards, padding rows included: FSDP2's are collectives)
        names = [new[j][0] for j in mine[:real]]
        for rank_names, rank_feats in dist.gather((names, local[:real])):
            cache.features.update(zip(rank_names, rank_feats))

    train = [e for e in examples if not is_heldout(e.response_id, cfg.heldout_fraction)]
    heldout = [e for e in examples if is_heldout(e.response_id, cfg.heldout_fraction)]
    train_prefs = [p for p in preferences if not is_heldout_pair(p, cfg.heldout_fraction)]
    heldout_prefs = [p for p in preferences if is_heldout_pair(p, cfg.heldout_fraction)]
    labelled = [e for e in heldout if e.rating != 0]
    # the judge's folds first (each fit overwrites the head), the served head last; only while the held-out split
    # is small (judge_folds_until: a decision on its size, never on what it says)
    folds = cfg.judge_folds if not cfg.judge_folds_until or len(labelled) < cfg.judge_folds_until else 1
    folded = [_fold_scores(rm, cache, examples, preferences, j, cfg) for j in range(1, folds)]
    loss, steps, pairs, train_prefs = _fit_head(rm, cache, train, train_prefs, cfg)
    metrics = RewardMetrics(len(train), len(heldout), pairs, steps, loss, float("nan"), float("nan"),
                            train_preferences=len(train_prefs))
    compared = [a for p in heldout_prefs if not p.tie for a in (p.chosen, p.rejected)]
    with torch.no_grad():
        scores = rm.head_scores(*cache.get(labelled)).cpu() if labelled else torch.zeros(0)
        pair_scores = rm.head_scores(*cache.get(compared)).cpu() if compared else torch.zeros(0)
    metrics = heldout_metrics(metrics, labelled, scores, cfg, gap_versions, pair_scores.view(-1, 2))
    if folds > 1:
        # the judge's AUROC: every vote scored by the head that did not see it (the served head's for the held-out
        # fold), each fold's ups against its own downs
        by_fold = [(scores, torch.tensor([e.rating > 0 for e in labelled], dtype=torch.bool))] + [
            (torch.tensor([s for _, s in f]), torch.tensor([e.rating > 0 for e, _ in f], dtype=torch.bool))
            for f in folded]
        metrics.auroc_folds = folds
        metrics.auroc, metrics.auroc_lcb, metrics.heldout_up, metrics.heldout_down = within_fold_auroc(by_fold)
    return metrics


def fold(response_id: str, fraction: float, folds: int) -> int:
    """The response's fold for the judge's cross-validation (RewardConfig.judge_folds): 0 is the held-out
    split (is_heldout), the training split is shared evenly among 1 .. folds - 1, by the same stable hash."""
    bucket = _bucket(response_id)
    if bucket < fraction or folds < 2:
        return 0
    return 1 + min(folds - 2, int((bucket - fraction) / (1 - fraction) * (folds - 1)))


def _fold_scores(rm: FeatureRewardModel, cache: FeatureCache, examples: list[Example],
                 preferences: list[PreferencePair], j: int, cfg: RewardConfig) -> list[tuple[Example, float]]:
    """Fit the head on every label outside fold `j` (the held-out fold's included: as many labels as the served
    head fits on) and score fold j's thumbs with it: (example, score) of each up or down vote in fold j."""
    def in_fold(response_id: str) -> bool:
        return fold(response_id, cfg.heldout_fraction, cfg.judge_folds) == j

    thumbs = [e for e in examples if not in_fold(e.response_id)]
    prefs = [p for p in preferences if not (in_fold(p.chosen.response_id) or in_fold(p.rejected.response_id))]
    scored = [e for e in examples if in_fold(e.response_id) and e.rating != 0]
    if not scored:
        return []
    _fit_head(rm, cache, thumbs, prefs, cfg)
    with torch.no_grad():
        return list(zip(scored, rm.head_scores(*cache.get(scored)).cpu().tolist()))


def _fit_head(rm: FeatureRewardModel, cache: FeatureCache, train: list[Example], train_prefs: list[PreferencePair],
              cfg: RewardConfig) -> tuple[float, int, int, list[PreferencePair]]:
    """The head fitted from zero on these thumbs and preferences (their states in `cache`): the standardisation
    from their tokens, then L-BFGS on the full batch. (loss, L-BFGS iterations, pairs, preferences used)."""
    device = rm.device
    if cfg.pairwise_weight > 0:
        pairs = all_pairs(make_pairs(train, cfg.max_pairs_per_prompt, random.Random(0)), train_prefs, len(train),
                          cfg.preference_weight)
    else:
        pairs, train_prefs = [], []
    if not (train or train_prefs):
        return float("nan"), 0, len(pairs), train_prefs
    # rows: the thumbs, then each preference's chosen and rejected answer (all_pairs' numbering)
    states, mask = cache.get(train + [a for p in train_prefs for a in (p.chosen, p.rejected)])  # (N + 2P, T, H)
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
    liked = torch.tensor([p.better for p in pairs], dtype=torch.long, device=device)
    disliked = torch.tensor([p.worse for p in pairs], dtype=torch.long, device=device)
    pair_targets = torch.tensor([p.target for p in pairs], dtype=torch.float32, device=device)
    pair_weights = torch.tensor([p.weight for p in pairs], dtype=torch.float32, device=device)
    params = rm.head_parameters()
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=cfg.head_max_iter, line_search_fn="strong_wolfe")
    n = len(train)

    def loss_fn() -> torch.Tensor:
        opt.zero_grad()
        s = rm.scores(z, mask, pooled)
        loss, _, _ = reward_loss(s[:n], ratings, weights, cfg.pointwise_loss, s[liked], s[disliked],
                                 cfg.pairwise_weight, pair_weights=pair_weights, pair_targets=pair_targets)
        loss = loss + cfg.head_l2 * (rm.token.weight.square().sum() + rm.pooled.weight.square().sum()) / 2
        loss.backward()
        return loss

    loss = opt.step(loss_fn).item()
    return loss, opt.state[params[0]]["n_iter"], len(pairs), train_prefs


def heldout_metrics(metrics: RewardMetrics, labelled: list[Example], scores: torch.Tensor, cfg: RewardConfig,
                    gap_versions: tuple[int, ...], pair_scores: torch.Tensor = torch.zeros(0, 2)) -> RewardMetrics:
    """Fill in `metrics`' held-out figures from the scores (N,) of the `labelled` held-out examples:
    accuracy, AUROC and its lower bound, and the approval gap on `gap_versions` (approval_gap_pool); and
    from the (P, 2) scores of the held-out preferences that are not ties (chosen, rejected): pairwise
    accuracy and its lower bound."""
    metrics.heldout_preferences = len(pair_scores)
    metrics.pair_accuracy = pairwise_accuracy(pair_scores[:, 0], pair_scores[:, 1])
    metrics.pair_accuracy_lcb = accuracy_lower_bound(metrics.pair_accuracy, len(pair_scores))
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
    return auroc - z * math.sqrt(_auroc_variance(auroc, n_pos, n_neg))


def _auroc_variance(a: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil's (1982) variance of an AUROC `a` measured on n_pos positives and n_neg negatives."""
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    return max((a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg), 0.0)


def within_fold_auroc(folds: list[tuple[torch.Tensor, torch.Tensor]],
                      z: float = 1.645) -> tuple[float, float | None, int, int]:
    """Cross-validated AUROC from each fold's (scores, is-up) as scored by its own head: P(up > down) over the
    pairs within a fold (each fold's AUROC weighted by its pairs), not over all votes at once, because
    heads fit on different folds differ by an offset (each fold's up-vote share shifts its head's bias:
    the fold with more ups is scored by a head trained on fewer) that pooling would mix into the ranking,
    biased low where the signal is weak (Airola et al. 2011, "An experimental comparison of
    cross-validation techniques for estimating the area under the ROC curve"). Its lower bound: the
    folds' Hanley-McNeil variances at that AUROC, weighted likewise, as from independent test sets.
    (auroc, its lower 95 % bound, up-votes, down-votes); nan and None without a fold holding both."""
    counts = [(int(y.sum()), int((~y).sum())) for _, y in folds]
    pairs = [p * n for p, n in counts]
    total = sum(pairs)
    ups, downs = sum(p for p, _ in counts), sum(n for _, n in counts)
    if total == 0:
        return float("nan"), None, ups, downs
    a = sum(binary_auroc(s, y) * w for (s, y), w in zip(folds, pairs) if w) / total
    var = sum((w / total) ** 2 * _auroc_variance(a, p, n) for (p, n), w in zip(counts, pairs) if w)
    return a, a - z * math.sqrt(var), ups, downs


def binary_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties count half. (N,), (N,) bool."""
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()

