"""One training round, top to bottom: consume -> reward model -> rollouts -> score -> PPO -> gate -> publish.

    rlhf train --once            # one round on what is stored + what the broker holds now

`run_round` is called by the continuous loop in trainer/cli.py whenever enough new labels
arrived. The candidate is a copy of the current policy (LATEST); if the gate rejects it,
it is dropped and the next round starts again from the current policy. Each round appends
its metrics to <trainer_dir>/rounds.jsonl and prints one summary line.
"""

from __future__ import annotations

import copy
import json
import math
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from tqdm import tqdm

from trainer import gate, metrics
from trainer.killpoints import killpoint
from trainer.policy import autocast, decode, encode_prompts, forward, left_pad, sample, score_against_reference
from trainer.ppo import Rollout, gae, masked_mean, masked_whiten, policy_loss, token_rewards, value_loss
from trainer.reward_model import is_heldout, rule_reward, save_reward_model, score, train_reward_model
from trainer.state import TrainerState


@dataclass
class RoundReport:
    """One line of rounds.jsonl (rlhf/loop.py reads promoted, version, trigger_time, kl_bound)."""

    round: int
    trigger_time: float  # wall clock when the round started, i.e. when its labels had arrived
    kl_bound: float  # GateConfig.max_kl
    labels: int = 0  # labelled responses used
    votes: int = 0  # live votes behind them
    new_labels: int = 0
    consumed: dict = field(default_factory=dict)
    reward_model: dict = field(default_factory=dict)
    ppo: dict = field(default_factory=dict)
    current: dict = field(default_factory=dict)  # gate's evaluation of the current policy
    candidate: dict = field(default_factory=dict)  # ... and of the candidate
    kl_coef: float = float("nan")
    version_before: int = 0
    version: int | None = None  # the version published by this round, if promoted
    promoted: bool = False
    reason: str = ""
    seconds: dict = field(default_factory=dict)  # per phase + total

    def summary(self) -> str:
        rm = self.reward_model
        if not self.candidate:
            return f"round {self.round}: {self.labels} labels (+{self.new_labels}) | skipped: {self.reason}"
        verdict = f"promoted v{self.version}" if self.promoted else f"rejected: {self.reason}"
        return (f"round {self.round}: {self.labels} labels (+{self.new_labels}) | "
                f"RM acc {rm.get('accuracy', math.nan):.2f} AUROC {rm.get('auroc', math.nan):.2f} | "
                f"reward {self.current['reward']:.3f} -> {self.candidate['reward']:.3f} | "
                f"KL {self.candidate['kl_to_ref']:.2f} | {self.seconds['total']:.0f}s | {verdict}")


def run_round(state: TrainerState, *, progress: bool = True, drain_s: float | None = None) -> RoundReport:
    """One round. drain_s bounds step 1 (default consumer.drain_max_s; the continuous loop,
    which consumes between rounds, passes 0: one catch-up poll)."""
    cfg, tok = state.cfg, state.tokenizer
    n = state.round + 1
    rng = random.Random(cfg.ppo.seed + n)
    generator = torch.Generator().manual_seed(cfg.ppo.seed + n)
    report = RoundReport(round=n, trigger_time=time.time(), kl_bound=cfg.gate.max_kl)
    timer = _PhaseTimer(report.seconds)

    # 1. consume: drain what the broker holds now; each poll is stored, then committed
    with timer("consume"), _bar(progress, n, "consume", "msg") as bar:
        report.consumed = asdict(state.consumer.drain(drain_s, progress=bar))
        state.store.prune()
        state.publisher.recover()  # a publish a broker outage interrupted is announced now
        state.follow_latest()
    examples = state.store.examples()
    label_seq = state.store.label_seq()
    report.labels, report.votes = len(examples), sum(e.n_votes for e in examples)
    report.new_labels, report.version_before = state.new_labels(), state.version
    pool = state.store.prompts()  # [(prompt_key, messages)]
    if not examples or not pool:
        report.reason = "no labelled examples yet"
        return _finish(state, report, label_seq)
    state.check_stop()

    # 2. update the reward model (warm start from last round's), report held-out accuracy
    with timer("reward_model"), _bar(progress, n, "reward model", "step") as bar:
        rm_metrics = train_reward_model(state.reward_model, tok, examples, cfg.reward, seed=cfg.ppo.seed + n,
                                        autocast_dtype=state.dtype, progress=bar)
        save_reward_model(state.reward_model, state.reward_model_path(state.settings))
    report.reward_model = asdict(rm_metrics)
    reward_fn = rule_reward(cfg.reward.rule) if cfg.reward.rule else partial(
        score, state.reward_model, tok, max_length=cfg.reward.max_length, batch_size=cfg.ppo.forward_batch_size,
        autocast_dtype=state.dtype)  # (prompts, completions) -> (N,) scores
    # held-out prompts (stable hash split) are for the gate, the others for rollouts (each falls back to all)
    heldout = [m for k, m in pool if is_heldout(k, cfg.reward.heldout_fraction)] or [m for _, m in pool]
    train_prompts = [m for k, m in pool if not is_heldout(k, cfg.reward.heldout_fraction)] or [m for _, m in pool]
    state.check_stop()

    candidate = copy.deepcopy(state.policy).train()
    value_head = copy.deepcopy(state.value_head)
    opt = torch.optim.AdamW([*candidate.parameters(), *value_head.parameters()], lr=cfg.ppo.lr, eps=1e-5)
    stats: dict[str, list[float]] = {}
    for batch_idx in range(cfg.ppo.rollout_batches):
        # 3. rollouts: the candidate (= the current policy at first) answers sampled logged prompts
        with timer("rollout"), _bar(progress, n, f"rollout {batch_idx + 1}/{cfg.ppo.rollout_batches}", "seq") as bar:
            prompts = rng.choices(train_prompts, k=cfg.ppo.rollout_prompts)
            query, query_mask = left_pad(encode_prompts(tok, prompts, state.settings.max_prompt_tokens),
                                         tok.pad_token_id, state.device)
            candidate.eval()
            with autocast(state.device, state.dtype):
                response, response_mask = sample(candidate, query, query_mask, max_new_tokens=cfg.ppo.max_new_tokens,
                                                 temperature=cfg.ppo.temperature, eos_id=tok.eos_token_id,
                                                 pad_id=tok.pad_token_id, generator=generator)
                seen = score_against_reference(candidate, state.reference, query, query_mask, response, response_mask,
                                               temperature=cfg.ppo.temperature, estimator=cfg.ppo.kl_estimator,
                                               batch_size=cfg.ppo.forward_batch_size, value_head=value_head)
            candidate.train()
            bar.update(len(prompts))

        # 4. score with the reward model; per-token reward = -beta * KL, + score at the end; GAE
        with timer("score"):
            scores = reward_fn(prompts, decode(tok, response, response_mask)).to(state.device).float()
            rewards = token_rewards(scores, seen.kl, response_mask, state.kl_ctl.value, cfg.ppo.reward_clip)
            advantages, returns = gae(rewards, seen.values, response_mask, cfg.ppo.gamma, cfg.ppo.lam)
            if cfg.ppo.whiten_advantages:
                advantages = masked_whiten(advantages, response_mask)
            rollout = Rollout(query, query_mask, response, response_mask, seen.logprobs, seen.ref_logprobs, seen.values,
                              seen.kl, seen.entropy, scores.clamp(-cfg.ppo.reward_clip, cfg.ppo.reward_clip), rewards,
                              advantages, returns)
            seq_kl = seen.kl.sum(1).mean().item()
            _log(stats, score=scores.mean().item(), kl=seq_kl, entropy=masked_mean(seen.entropy, response_mask).item(),
                 length=response_mask.sum(1).float().mean().item(), kl_coef=state.kl_ctl.value)
        state.check_stop()

        # 5. PPO epochs over minibatches of this rollout
        steps = cfg.ppo.ppo_epochs * math.ceil(len(prompts) / cfg.ppo.minibatch_size)
        with timer("ppo"), _bar(progress, n, f"ppo {batch_idx + 1}/{cfg.ppo.rollout_batches}", "step", steps) as bar:
            for _ in range(cfg.ppo.ppo_epochs):
                perm = torch.randperm(len(prompts), generator=generator)
                for s in _slices(len(prompts), cfg.ppo.minibatch_size):
                    mb = rollout.select(perm[s].to(state.device))
                    with autocast(state.device, state.dtype):
                        new = forward(candidate, mb.query, mb.query_mask, mb.response, mb.response_mask,
                                      temperature=cfg.ppo.temperature, value_head=value_head)
                    pg_loss, pg_stats = policy_loss(new.logprobs, mb.logprobs, mb.advantages, mb.response_mask,
                                                    cfg.ppo.clip_range)
                    vf_loss, vf_clipfrac = value_loss(new.values, mb.values, mb.returns, mb.response_mask,
                                                      cfg.ppo.clip_range_value)
                    ent = masked_mean(new.entropy, mb.response_mask)
                    loss = pg_loss + cfg.ppo.vf_coef * vf_loss - cfg.ppo.entropy_coef * ent
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_([*candidate.parameters(), *value_head.parameters()],
                                                   cfg.ppo.max_grad_norm)
                    opt.step()
                    _log(stats, pg_loss=pg_loss.item(), vf_loss=vf_loss.item(), clipfrac=pg_stats["clipfrac"].item(),
                         approx_kl=pg_stats["approx_kl"].item(), vf_clipfrac=vf_clipfrac.item())
                    bar.update(1)
                    state.check_stop()
        state.kl_ctl.update(seq_kl, len(prompts))
    report.ppo = {k: sum(v) / len(v) for k, v in stats.items()}
    report.kl_coef = state.kl_ctl.value
    killpoint("round:trained")

    # 6. gate: current policy and candidate answer the same held-out prompts with the same noise
    with timer("gate"), _bar(progress, n, "gate", "policy", 2) as bar:
        plan = gate.eval_prompt_plan(heldout, cfg.gate.eval_responses)
        evals = []
        for policy in (state.policy, candidate):
            evals.append(gate.evaluate(policy, state.reference, tok, reward_fn, plan, seed=cfg.gate.eval_seed,
                                       max_new_tokens=cfg.ppo.max_new_tokens, temperature=cfg.ppo.temperature,
                                       max_prompt_tokens=state.settings.max_prompt_tokens,
                                       batch_size=cfg.ppo.forward_batch_size, autocast_dtype=state.dtype))
            bar.update(1)
        current, cand = evals
        report.current, report.candidate = asdict(current), asdict(cand)
        report.promoted, report.reason = gate.decide(cand, current, cfg.gate)
    state.check_stop()

    # 7. publish: policy store version + PolicyUpdate; the candidate becomes the current policy
    with timer("publish"):
        if report.promoted:
            update = state.publisher.publish(candidate, tok, parent_version=state.version, metrics={
                "rm_reward": cand.reward, "rm_reward_parent": current.reward, "kl_to_ref": cand.kl_to_ref,
                "response_length": cand.length, "rm_accuracy": rm_metrics.accuracy, "rm_auroc": rm_metrics.auroc,
                "labels": float(report.labels), "round": float(n), "kl_coef": state.kl_ctl.value,
            })
            state.policy, state.value_head, state.version = candidate, value_head, update.version
            state.save_value_head()
            report.version = update.version
    return _finish(state, report, label_seq)


# ---------------------------------------------------------------------------- helpers


def _finish(state: TrainerState, report: RoundReport, label_seq: int) -> RoundReport:
    """Persist the round's counters and metrics; print the summary line."""
    report.seconds["total"] = time.time() - report.trigger_time
    state.store.set("round", report.round)
    state.store.set("label_watermark", label_seq)
    state.store.set("kl_coef", state.kl_ctl.value)
    with open(state.rounds_path, "a") as f:
        f.write(json.dumps(_nan_to_none(asdict(report))) + "\n")  # strict JSON: nan -> null
    metrics.observe_round(asdict(report))
    print(report.summary(), flush=True)
    return report


def _nan_to_none(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def _slices(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def _log(stats: dict[str, list[float]], **values: float) -> None:
    for k, v in values.items():
        stats.setdefault(k, []).append(v)


class _PhaseTimer:
    def __init__(self, seconds: dict):
        self.seconds = seconds

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


def _bar(enabled: bool, n: int, phase: str, unit: str, total: int | None = None) -> tqdm:
    return tqdm(total=total, desc=f"round {n} {phase}", unit=unit, leave=False, disable=not enabled,
                file=sys.stderr, mininterval=0.5, dynamic_ncols=True)
