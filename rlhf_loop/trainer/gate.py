"""The promotion gate: does the round's candidate beat the current policy, close to the reference,
without the marks of reward hacking, judged by a reward model that can be trusted?

Both policies answer the same held-out prompts with the same sampling noise (a seeded
generator per row: common random numbers make the comparison far less noisy than two
independent samples), and are measured the same way:

* reward:      mean reward-function score of the responses (this round's RM, or the rule),
* kl_to_ref:   mean over responses of sum_t KL(pi(.|prefix_t) || pi_ref(.|prefix_t)), exact
               over the vocabulary (kernels.full_kl), nats per response,
* length:      mean response length in tokens,
* distinct_2:  distinct token bigrams / bigrams over all responses (repetition shows here),
* guard_pass:  share of the guard set's greedy answers (fixed prompts, rule checks) that pass.

`decide` runs every check of GateConfig (each can be turned off) and promotes only if all
pass; the checks and their values go to rounds.jsonl. Length, distinct-2 and the guard set are
held both against the current policy (per-round tolerances) and against the reference (floors
that do not move: a chain of candidates each a little worse than the last passes every per-round
check, and is stopped there). The judge's own checks use the reward model's held-out metrics:
AUROC on thumbs and pairwise accuracy on preferences, each at its lower confidence bound (rule
rewards are exempt; preferences alone can pass the judge, `_judge`), and the gap between its predicted
approval and the users' on the serving version's answers (pooled with its parent's, ..., when
there are too few; "not checked" with the reason when there are still too few). Preferences give
no approval rate: the gap (like the live-approval watch, trainer/watch.py) is on thumbs alone.
"""

from __future__ import annotations

import json
import math
import re
from functools import partial
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf_loop.core.tastes import TASTES
from rlhf_loop.trainer.config import GateConfig
from rlhf_loop.trainer.dist import Dist
from rlhf_loop.trainer.rollout import autocast, decode, encode_prompts, left_pad, row_seeds, sample, score_against_reference
from rlhf_loop.trainer.reward_model import MIN_GAP_LABELS, RewardFn


BUILTIN_GUARD_SET = Path(__file__).with_name("guard_set.jsonl")


@dataclass(frozen=True)
class PolicyEval:
    reward: float
    kl_to_ref: float
    length: float
    responses: int
    distinct_2: float = 1.0
    guard_pass: float | None = None  # None: no guard set


@dataclass(frozen=True)
class GuardPrompt:
    messages: list[dict]
    checks: dict  # check name -> argument (GUARD_CHECKS)


@dataclass(frozen=True)
class Check:
    passed: bool
    value: float | None
    bound: float | None
    why: str = ""  # for a failed check: what the summary line says ("" when it passed)
    skipped: str = ""  # for a check that could not be made (it passes): why not, also on the summary line


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    checks: dict[str, Check] = field(default_factory=dict)


@dataclass(frozen=True)
class Answers:
    """A policy's answers to the gate's prompts, and all that is measured on them without a reward function:
    per response its KL to the reference (nats), length (tokens) and tokens; the guard set's pass rate. The
    same weights, prompts and sampling noise give the same answers, so a round keeps the current policy's
    between rounds (trainer/round.py) and only scores them again, by the new reward model."""
    prompts: list[list[dict]]
    texts: list[str]
    kl: list[float]
    length: list[float]
    tokens: list[list[int]]
    guard_pass: float | None = None


@torch.no_grad()
def answer(
    policy, reference, tokenizer, prompts: list[list[dict]], *, seed: int, eos_ids: Collection[int],
    max_new_tokens: int, temperature: float, max_prompt_tokens: int, batch_size: int,
    autocast_dtype: torch.dtype = torch.float32, dist: Dist = Dist(), guard: list[GuardPrompt] = (),
) -> Answers:
    """Sample one response per prompt (seeded), measure its exact KL to the reference, length and tokens;
    then the greedy answer to each guard prompt, checked by its rules (greedy: a regression check must
    not depend on sampling luck).

    The prompts are split across ranks and the results gathered; prompt i draws its noise from
    (seed, i) wherever it runs, so the answers do not depend on the number of ranks.
    """
    device = policy.device
    was_training = policy.training
    policy.eval()
    sample_ = partial(_sample_texts, policy, tokenizer, eos_ids=eos_ids, max_new_tokens=max_new_tokens,
                      temperature=temperature, max_prompt_tokens=max_prompt_tokens, batch_size=batch_size,
                      autocast_dtype=autocast_dtype, dist=dist, device=device)

    def measure(query, query_mask, response, mask, chunk, texts):
        kl = score_against_reference(policy, reference, query, query_mask, response, mask, temperature=temperature,
                                     estimator="full", batch_size=batch_size).kl
        return (texts, kl.sum(1).cpu().tolist(), mask.sum(1).float().cpu().tolist(),
                [r[m].tolist() for r, m in zip(response.cpu(), mask.cpu())])

    rows = sample_(prompts, seed, measure)
    guard_pass = None
    if guard:
        answers = sample_([g.messages for g in guard], seed, lambda *a: [a[-1]], temperature=0.0)
        texts = [t for chunk in answers for t in chunk[0]]
        guard_pass = sum(passes(g, t) for g, t in zip(guard, texts)) / len(guard)
    policy.train(was_training)
    return Answers(list(prompts), *([x for r in rows for x in r[i]] for i in range(4)), guard_pass=guard_pass)


@torch.no_grad()
def score_answers(answers: Answers, reward_fn: RewardFn, *, batch_size: int, dist: Dist = Dist()) -> PolicyEval:
    """The gate's figures of `answers`, their reward from `reward_fn` (each rank scores its share, in as
    many batches as every other: an FSDP2 reward model's forwards are collectives)."""
    mine, real = dist.shard(len(answers.texts))
    rewards = []
    for i in range(0, len(mine), batch_size):
        rows = mine[i:i + batch_size]
        keep = max(0, min(len(rows), real - i))
        got = reward_fn([answers.prompts[r] for r in rows], [answers.texts[r] for r in rows]).float().cpu()
        rewards += got[:keep].tolist()
    reward = torch.tensor([x for rank in dist.gather(rewards) for x in rank])
    return PolicyEval(reward.mean().item(), torch.tensor(answers.kl).mean().item(),
                      torch.tensor(answers.length).mean().item(), len(answers.texts), distinct_2(answers.tokens),
                      answers.guard_pass)


def evaluate(policy, reference, tokenizer, reward_fn: RewardFn, prompts: list[list[dict]], *, seed: int,
             batch_size: int, dist: Dist = Dist(), **sampling) -> PolicyEval:
    """`answer`, then `score_answers`: the gate's figures of a policy (PolicyEval's fields, module doc)."""
    return score_answers(answer(policy, reference, tokenizer, prompts, seed=seed, batch_size=batch_size, dist=dist,
                                **sampling), reward_fn, batch_size=batch_size, dist=dist)


def _sample_texts(policy, tokenizer, prompts, seed, measure, *, eos_ids, max_new_tokens, temperature,
                  max_prompt_tokens, batch_size, autocast_dtype, dist, device) -> list:
    """`measure(query, query_mask, response, mask, prompts, texts)` for each chunk of this rank's share of
    `prompts` (row i seeded with (seed, i)), gathered from every rank in prompt order."""
    mine, real = dist.shard(len(prompts))
    out = []
    for i in range(0, len(mine), batch_size):
        rows = mine[i:i + batch_size]
        keep = max(0, min(len(rows), real - i))  # this chunk's rows that are not padding (Dist.shard)
        chunk = [prompts[r] for r in rows]
        query, query_mask = left_pad(encode_prompts(tokenizer, chunk, max_prompt_tokens), tokenizer.pad_token_id, device)
        with autocast(device, autocast_dtype):
            response, mask = sample(policy, query, query_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                                    eos_ids=eos_ids, pad_id=tokenizer.pad_token_id, seeds=row_seeds(seed, rows=rows),
                                    lockstep=dist.all if dist.sharded else None)
            measured = measure(query, query_mask, response, mask, chunk, decode(tokenizer, response, mask))
        out.append(tuple(m[:keep] for m in measured))
    return [part for rank in dist.gather(out) for part in rank]


def decide(candidate: PolicyEval, current: PolicyEval, cfg: GateConfig, judge: dict | None = None,
           reference: PolicyEval | None = None) -> Decision:
    """Every check of the gate; promote only if all pass. `judge`: the reward model's held-out
    metrics (RewardMetrics as a dict; None when a rule is the reward). `reference`: the reference
    policy's figures (None: no floors), of which the reward is not used (the reward function
    changes every round)."""
    c, cur = candidate, current
    checks = {
        "reward": _check(c.reward > cur.reward + cfg.min_reward_gain, c.reward, cur.reward + cfg.min_reward_gain,
                         f"reward {c.reward:.3f} does not beat current {cur.reward:.3f}"
                         + (f" + {cfg.min_reward_gain:g}" if cfg.min_reward_gain else "")),
        "kl": _check(c.kl_to_ref < cfg.max_kl, c.kl_to_ref, cfg.max_kl,  # (< also fails on nan)
                     f"KL to reference {c.kl_to_ref:.2f} >= bound {cfg.max_kl:g}"),
        **_drift(c, cur, "current", cfg.min_length_ratio, cfg.max_length_ratio, cfg.min_distinct_ratio,
                 cfg.guard_tolerance),
    }
    if reference is not None:
        floors = _drift(c, reference, "the reference's", cfg.ref_min_length_ratio, cfg.ref_max_length_ratio,
                        cfg.ref_min_distinct_ratio, cfg.ref_guard_tolerance)
        checks.update({f"ref_{name}": ch for name, ch in floors.items()})
    if judge is not None:
        checks.update(judge_checks(judge, cfg))
    failed = [ch.why for ch in checks.values() if not ch.passed]
    if failed:
        return Decision(False, "; ".join(failed), checks)
    return Decision(True, f"reward {cur.reward:.3f} -> {c.reward:.3f}, KL {c.kl_to_ref:.2f} < {cfg.max_kl:g}, "
                          f"length {c.length:.1f} vs {cur.length:.1f}", checks)


def _check(passed: bool, value: float | None, bound: float | None, why: str) -> Check:
    """A check whose `why` is kept only if it failed (a passed check's report must not read as a failure)."""
    return Check(passed, value, bound, "" if passed else why)


def _drift(c: PolicyEval, base: PolicyEval, against: str, min_length: float, max_length: float,
           min_distinct: float, guard_tolerance: float) -> dict[str, Check]:
    """The reward-hacking checks of `c` against `base` (the current policy, or the reference): length
    both ways, distinct-2 (repetition), the guard set. A ratio of 0 turns its check off (not min_length)."""
    out = {"length_down": _check(c.length >= min_length * base.length, c.length, min_length * base.length,
                                 f"mean length {c.length:.1f} < {min_length:g} x {against} {base.length:.1f}")}
    if max_length:
        out["length_up"] = _check(c.length <= max_length * base.length, c.length, max_length * base.length,
                                  f"mean length {c.length:.1f} > {max_length:g} x {against} {base.length:.1f}")
    if min_distinct:
        out["distinct_2"] = _check(c.distinct_2 >= min_distinct * base.distinct_2, c.distinct_2,
                                   min_distinct * base.distinct_2,
                                   f"distinct-2 {c.distinct_2:.2f} < {min_distinct:g} x {against} "
                                   f"{base.distinct_2:.2f} (repetition)")
    if c.guard_pass is not None and base.guard_pass is not None:
        bound = base.guard_pass - guard_tolerance
        out["guard_set"] = _check(c.guard_pass >= bound, c.guard_pass, bound,
                                  f"guard set pass rate {c.guard_pass:.2f} < {against} {base.guard_pass:.2f} "
                                  f"- {guard_tolerance:g}")
    return out


def judge_checks(judge: dict, cfg: GateConfig) -> dict[str, Check]:
    """The checks on the reward model alone (RewardMetrics as a dict): known as soon as it has trained, so
    the round asks them before any policy trains (trainer/round.py), and the gate includes them again."""
    checks = _judge(judge, cfg)
    if cfg.max_rm_approval_gap:
        checks["rm_approval_gap"] = _approval_gap(judge, cfg.max_rm_approval_gap)
    return checks


def _judge(judge: dict, cfg: GateConfig) -> dict[str, Check]:
    """Can the reward model predict held-out labels? Each kind it can be measured on must say so: thumbs by
    AUROC (rm_auroc: on the held-out split, or cross-validated over every vote: RewardMetrics.auroc_folds),
    preferences by pairwise accuracy (rm_pair_accuracy), each at its lower confidence bound. With held-out
    preferences but no held-out thumbs of both kinds, rm_auroc is skipped (passes,
    with the reason on the summary line) and preferences alone decide; with neither, rm_auroc fails."""
    out = {}
    auroc_lcb, pair_lcb = judge.get("auroc_lcb"), judge.get("pair_accuracy_lcb")
    if cfg.min_rm_auroc and auroc_lcb is None and pair_lcb is not None and cfg.min_rm_pair_accuracy:
        out["rm_auroc"] = Check(True, None, cfg.min_rm_auroc, skipped=(
            f"judge's AUROC not checked: no held-out thumbs of both kinds; judged on "
            f"{judge['heldout_preferences']} held-out preferences"))
    elif cfg.min_rm_auroc:
        folds = judge.get("auroc_folds", 1)
        how = f"{folds}-fold AUROC" if folds > 1 else "AUROC"
        votes = judge.get("heldout_up", 0) + judge.get("heldout_down", 0)
        out["rm_auroc"] = _check(auroc_lcb is not None and auroc_lcb >= cfg.min_rm_auroc, auroc_lcb, cfg.min_rm_auroc,
                                 f"reward model cannot yet predict held-out votes: {how} "
                                 f"{judge.get('auroc', math.nan):.2f} on {votes} votes (95% lower bound "
                                 f"{math.nan if auroc_lcb is None else auroc_lcb:.2f}) < {cfg.min_rm_auroc:g}")
    if cfg.min_rm_pair_accuracy and pair_lcb is not None:
        out["rm_pair_accuracy"] = _check(
            pair_lcb >= cfg.min_rm_pair_accuracy, pair_lcb, cfg.min_rm_pair_accuracy,
            f"reward model cannot yet predict held-out preferences: pairwise accuracy {judge['pair_accuracy']:.2f} "
            f"(95% lower bound {pair_lcb:.2f}, {judge['heldout_preferences']} pairs) < {cfg.min_rm_pair_accuracy:g}")
    return out


def _approval_gap(judge: dict, max_gap: float) -> Check:
    """The judge against the users: passes, unchecked, when the serving version and the parents pooled
    with it have too few held-out labels (RewardMetrics.approval_gap_versions and _labels say which and
    how many; reward_model.approval_gap_pool, why pooling them is sound)."""
    gap = judge["approval_gap"]
    if gap is None:
        versions = ", ".join(f"v{v}" for v in judge["approval_gap_versions"])
        return Check(True, None, max_gap, skipped=(
            f"judge's approval gap not checked: {judge['approval_gap_labels']} held-out labels on {versions}, "
            f"fewer than {MIN_GAP_LABELS}"))
    return _check(gap <= max_gap, gap, max_gap,
                  f"reward model's predicted approval is {gap:.2f} from the users' (> {max_gap:g})")


# ---------------------------------------------------------------------------- the guard set


def load_guard_set(spec: str | None) -> list[GuardPrompt]:
    """GateConfig.guard_set: 'builtin' (trainer/guard_set.jsonl), a JSONL path, or None (no guard set)."""
    if spec is None:
        return []
    path = BUILTIN_GUARD_SET if spec == "builtin" else Path(spec)
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            unknown = set(row["checks"]) - set(GUARD_CHECKS)
            if unknown:
                raise ValueError(f"{path}:{n}: unknown checks {sorted(unknown)}; known: {sorted(GUARD_CHECKS)}")
            out.append(GuardPrompt(row["messages"], row["checks"]))
    return out


def _mentions(answer: str, words: list[str], prompt: str) -> bool:
    return all(re.search(rf"\b{re.escape(w.lower())}", answer.lower()) for w in words)


def _max_repeat(answer: str, n: int, prompt: str) -> bool:
    """No word repeated more than n times in a row."""
    words, run = answer.lower().split(), 1
    for a, b in zip(words, words[1:]):
        run = run + 1 if a == b else 1
        if run > n:
            return False
    return True


GUARD_CHECKS = {
    "mentions": _mentions,  # every listed word (as a word start: 'cat' matches 'cats')
    "min_words": lambda answer, n, prompt: len(answer.split()) >= n,
    "max_words": lambda answer, n, prompt: len(answer.split()) <= n,
    "not_contains": lambda answer, texts, prompt: not any(t.lower() in answer.lower() for t in texts),
    "max_repeat": _max_repeat,
    "taste": lambda answer, name, prompt: TASTES[name](prompt, answer),  # a taste of core/tastes.py
}


def passes(guard: GuardPrompt, answer: str) -> bool:
    prompt = next((m["content"] for m in reversed(guard.messages) if m["role"] == "user"), "")
    return all(GUARD_CHECKS[name](answer, arg, prompt) for name, arg in guard.checks.items())


def distinct_2(responses: list[list[int]]) -> float:
    """Distinct token bigrams / bigrams over all responses (1.0 when there are none)."""
    bigrams = [(a, b) for r in responses for a, b in zip(r, r[1:])]
    return len(set(bigrams)) / len(bigrams) if bigrams else 1.0


def eval_prompt_plan(heldout: list[tuple[str, list[dict]]], responses: int,
                     kept: Collection[str] = ()) -> list[tuple[str, list[dict]]]:
    """The gate's prompts, (prompt_key, messages): `responses` of them, from the held-out prompts (in key order).
    While they all fit, all of them, repeated in order. Once there are more, `responses` distinct ones: first
    those of `kept` (last round's plan, its keys) that are still held out, then the others by key. So a full
    plan stays the same from round to round as new prompts arrive, and the current policy's answers to it
    can be kept (trainer/round.py)."""
    if len(heldout) <= responses:
        return (heldout * math.ceil(responses / len(heldout)))[:responses]
    by_key = dict(heldout)
    chosen = list(dict.fromkeys(k for k in kept if k in by_key))[:responses]
    taken = set(chosen)
    chosen += [k for k, _ in heldout if k not in taken][:responses - len(chosen)]
    return [(k, by_key[k]) for k in chosen]
