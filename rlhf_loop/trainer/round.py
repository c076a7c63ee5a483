"""One training round, top to bottom: consume -> reward model -> the gate's view of the current policy ->
the algorithm (ppo, grpo, rloo: rollouts -> score -> policy-gradient epochs; kto, dpo: the stored
thumbs and preferences) -> the gate's view of the candidate -> publish.

    rlhf train --once                                       # one round on what is stored + what the broker holds
    rlhf train --once --algorithm kto                       # the same data, another algorithm (train.algorithm)
    torchrun --nproc_per_node 2 -m rlhf_loop.trainer.cli --once    # the same round on two ranks (trainer/dist.py)

`run_round` is called by the continuous loop in trainer/cli.py whenever enough new labels arrived,
on every rank. Rank 0 alone consumes, stores, writes and publishes; the round's inputs are
broadcast, every rank trains on its share of each batch, and rollouts and evaluations are
split across ranks and gathered, so the round computes the same candidate at any world size.
The policy trains in place, starting from the current policy (LATEST); if the gate rejects it,
it is restored from the snapshot taken before PPO and the next round starts from the current
policy again. Rank 0 appends the round's metrics to <trainer_dir>/rounds.jsonl and prints one
summary line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from rlhf_loop.trainer import gate, metrics, watch
from rlhf_loop.trainer.dist import Dist
from rlhf_loop.trainer.killpoints import killpoint
from rlhf_loop.trainer.networks import PolicyWithValue, full_tensors, save_atomic
from rlhf_loop.kernels import kl_penalty
from rlhf_loop.trainer.objectives import dpo_loss, grpo_advantages, kto_loss, kto_reference_point, rloo_advantages
from rlhf_loop.trainer.rollout import (
    autocast, behaviour_gap, decode, encode_prompts, forward, left_pad, right_pad, row_seeds, sample,
    score_against_reference,
)
from rlhf_loop.trainer.ppo import Rollout, gae, masked_mean, masked_whiten, policy_loss, token_rewards, value_loss
from rlhf_loop.trainer.reward_model import (
    is_heldout, is_heldout_pair, make_pairs, rule_reward, score, train_reward_head, train_reward_model,
)
from rlhf_loop.trainer.state import TrainerState
from rlhf_loop.trainer.store import Example, PreferencePair, voter_weights

log = logging.getLogger(__name__)


@dataclass
class RoundInputs:
    """What rank 0 read in step 1, broadcast to every rank."""

    round: int
    examples: list[Example]
    preferences: list[PreferencePair]  # live, both answers stored
    pool: list[tuple[str, list[dict]]]  # [(prompt_key, messages)], by key
    gate_plan: list[str]  # last round's gate prompts (keys): gate.eval_prompt_plan keeps them
    label_seq: int
    version: int  # LATEST: the current policy
    line: tuple[int, ...]  # LATEST and its ancestors, newest first (watch.line)
    new_labels: int
    consumed: dict
    voters: dict  # the influence cap: voters, the largest voter's share of the votes, how many were down-weighted


@dataclass
class RoundReport:
    """One line of rounds.jsonl (app/loop.py reads promoted, version, trigger_time, kl_bound)."""

    round: int
    trigger_time: float  # wall clock when the round started, i.e. when its labels had arrived
    kl_bound: float  # GateConfig.max_kl
    labels: int = 0  # labelled responses used
    votes: int = 0  # live votes behind them
    preferences: int = 0  # live preferences whose two answers are stored (ties included)
    new_labels: int = 0
    consumed: dict = field(default_factory=dict)
    voters: dict = field(default_factory=dict)  # the influence cap's effect (RoundInputs.voters)
    reward_model: dict = field(default_factory=dict)
    algorithm: str = "ppo"  # TrainConfig.algorithm
    train: dict = field(default_factory=dict)  # the algorithm's statistics, averaged over its steps
    current: dict = field(default_factory=dict)  # gate's evaluation of the current policy
    candidate: dict = field(default_factory=dict)  # ... and of the candidate
    current_reused: bool = False  # the current policy's gate answers were last round's, scored again (_answers_key)
    reference: dict = field(default_factory=dict)  # ... and of the reference (once per reference version: its floors)
    behaviour: dict = field(default_factory=dict)  # the voted answers' recorded log-probs against the current policy
    checks: dict = field(default_factory=dict)  # every gate check: passed, value, bound, why (failed), skipped (why not)
    budget: dict = field(default_factory=dict)  # the KL budget: update scale, scale-backs, backoff, whether it is spent
    guard_streak: int = 0  # rounds in a row, this one included, whose candidate failed the guard set
    kl_coef: float = float("nan")
    version_before: int = 0
    version: int | None = None  # the version published by this round, if promoted
    promoted: bool = False
    reason: str = ""
    world_size: int = 1  # ranks that trained it ...
    strategy: str = "ddp"  # ... and how (TrainConfig.strategy)
    seconds: dict = field(default_factory=dict)  # per phase + total

    def summary(self) -> str:
        rm = self.reward_model
        labels = f"{self.labels} labels" + (f" + {self.preferences} preferences" if self.preferences else "")
        skipped = "".join(f" | {c['skipped']}" for c in self.checks.values() if c.get("skipped"))
        judge = f"RM acc {rm.get('accuracy', math.nan):.2f} AUROC {rm.get('auroc', math.nan):.2f}"
        if rm.get("heldout_preferences"):
            judge += f" pairs {rm['pair_accuracy']:.2f}"
        if not self.candidate and rm:  # the judge refused the reward model: no policy trained
            return (f"round {self.round}: {labels} (+{self.new_labels}) | {judge} | {self.seconds['total']:.0f}s | "
                    f"no candidate: {self.reason}{skipped}")
        if not self.candidate:
            return f"round {self.round}: {labels} (+{self.new_labels}) | skipped: {self.reason}"
        verdict = f"promoted v{self.version}" if self.promoted else f"rejected: {self.reason}"
        if self.budget.get("update_scale", 1.0) < 1.0:
            verdict += f" (update scaled to {self.budget['update_scale']:g} for the KL bound)"
        if self.budget.get("spent"):
            verdict += " | KL budget spent"
        if self.guard_streak > 1:
            verdict += f" | guard set: {self.guard_streak} rejections in a row"
        verdict += skipped
        return (f"round {self.round}: {labels} (+{self.new_labels}) | {judge} | "
                f"reward {self.current['reward']:.3f} -> {self.candidate['reward']:.3f} | "
                f"KL {self.candidate['kl_to_ref']:.2f} | {self.seconds['total']:.0f}s | {verdict}")


def run_round(state: TrainerState, *, progress: bool = True, drain_s: float | None = None) -> RoundReport:
    """One round, on every rank. drain_s bounds step 1 (default consumer.drain_max_s; the continuous
    loop, which consumes between rounds, passes 0: one catch-up poll)."""
    cfg, tok, d = state.cfg, state.tokenizer, state.dist
    progress = progress and d.is_main
    started = time.time()
    seconds: dict[str, float] = {}
    timer = _PhaseTimer(seconds)

    # 1. consume (rank 0): drain what the broker holds now, each poll stored, then committed
    with timer("consume"):
        inputs: RoundInputs = d.main_only(lambda: _consume(state, progress, drain_s))
    n = inputs.round
    report = RoundReport(round=n, trigger_time=started, kl_bound=cfg.gate.max_kl, labels=len(inputs.examples),
                         votes=sum(e.n_votes for e in inputs.examples), preferences=len(inputs.preferences),
                         new_labels=inputs.new_labels,
                         consumed=inputs.consumed, voters=inputs.voters, version_before=inputs.version, world_size=d.world,
                         strategy=cfg.train.strategy, algorithm=cfg.train.algorithm, seconds=seconds)
    state.follow(inputs.version)  # LATEST as rank 0 read it: an `rlhf sft` or an operator may have moved it
    if not (inputs.examples or inputs.preferences) or not inputs.pool:
        report.reason = "no labelled examples yet"
        return _finish(state, report, inputs.label_seq)
    rng = random.Random(cfg.ppo.seed + n)
    state.check_stop()

    # 2. update the reward model, report held-out accuracy: tuned, a few steps through its backbone (warm
    #    start from last round's); frozen, the features of the new labels, then the head on all of them
    with timer("reward_model"), _bar(progress, n, "reward model", "step") as bar:
        gap_versions = inputs.line[:cfg.gate.rm_gap_versions]
        if cfg.reward.backbone == "frozen":
            rm_metrics = train_reward_head(state.nets.reward, tok, inputs.examples, cfg.reward, state.rm_features,
                                           autocast_dtype=state.dtype, progress=bar, dist=d, gap_versions=gap_versions,
                                           preferences=inputs.preferences)
            if d.is_main:
                save_atomic(state.rm_features.tensors(), state.rm_features_path(state.settings))
        else:
            rm_metrics = train_reward_model(state.nets.reward, tok, inputs.examples, cfg.reward, seed=cfg.ppo.seed + n,
                                            autocast_dtype=state.dtype, progress=bar, dist=d, gap_versions=gap_versions,
                                            preferences=inputs.preferences)
        state.nets.reward.save(state.reward_model_path(state.settings) if d.is_main else None)
    report.reward_model = asdict(rm_metrics)
    if not cfg.reward.rule:  # the judge, now: a reward model it refuses could promote no candidate, so none trains
        judged = gate.judge_checks(report.reward_model, cfg.gate)
        report.checks = {name: asdict(c) for name, c in judged.items()}
        if refused := [c.why for c in judged.values() if not c.passed]:
            report.reason = "; ".join(refused)
            return _finish(state, report, inputs.label_seq)
    reward_fn = rule_reward(cfg.reward.rule) if cfg.reward.rule else partial(
        score, state.nets.reward, tok, max_length=cfg.reward.max_length, batch_size=cfg.ppo.forward_batch_size,
        autocast_dtype=state.dtype)  # (prompts, completions) -> (N,) scores
    # held-out prompts (stable hash split) are for the gate, the others for rollouts (each falls back to all)
    pool = inputs.pool
    heldout = [(k, m) for k, m in pool if is_heldout(k, cfg.reward.heldout_fraction)] or pool
    train_prompts = [m for k, m in pool if not is_heldout(k, cfg.reward.heldout_fraction)] or [m for _, m in pool]
    state.check_stop()

    # 3. the gate's view of the current policy: held-out prompts, fixed noise, before anything trains; and
    #    of the reference, for the floors (once per reference version, then from the trainer store); and how
    #    far the policies that wrote the voted answers are from it, by their recorded log-probs (a metric only:
    #    docs/trainer.md, "Behaviour log-probs")
    planned = gate.eval_prompt_plan(heldout, cfg.gate.eval_responses, kept=inputs.gate_plan)
    d.main_only(lambda: state.store.set("gate_plan", [k for k, _ in planned]))
    plan = [m for _, m in planned]
    answer = partial(gate.answer, reference=state.nets.reference, tokenizer=tok, prompts=plan, seed=cfg.gate.eval_seed,
                     eos_ids=state.eos_ids, max_new_tokens=cfg.ppo.max_new_tokens, temperature=cfg.ppo.temperature,
                     max_prompt_tokens=state.settings.max_prompt_tokens, batch_size=cfg.ppo.forward_batch_size,
                     autocast_dtype=state.dtype, dist=d, guard=state.guard_set)
    score_ = partial(gate.score_answers, reward_fn=reward_fn, batch_size=cfg.ppo.forward_batch_size, dist=d)
    with timer("gate"):
        # the current policy's answers are last round's (its own, or the candidate's it promoted) when nothing
        # that decides them has changed: then only this round's reward model scores them again
        key = _answers_key(state, plan)
        kept = state.gate_answers.get(key)
        report.current_reused = kept is not None
        current_answers = kept or answer(state.nets.policy)
        current = score_(current_answers)
        reference = _reference_eval(state, lambda policy: score_(answer(policy)), current)
        report.behaviour = asdict(behaviour_gap(
            state.nets.policy, tok, inputs.examples, inputs.version, max_answers=cfg.gate.behaviour_answers,
            max_prompt_tokens=state.settings.max_prompt_tokens, batch_size=cfg.ppo.forward_batch_size,
            autocast_dtype=state.dtype, dist=d))
    state.gate_answers = {key: current_answers}
    report.reference = asdict(reference)
    state.check_stop()

    # the policy (and value head) train in place from here; this snapshot restores them if the gate says no
    snapshot = state.nets.snapshot(state.value_head)
    try:
        # 4-6. the algorithm moves the policy (train.algorithm): from fresh rollouts scored by the reward
        #      function (ppo, grpo, rloo), or from the stored thumbs and preferences themselves (kto, dpo)
        if cfg.train.algorithm in ("kto", "dpo"):
            report.train = _learn_from_labels(state, inputs.examples, inputs.preferences, n, timer, progress)
        else:
            report.train = _learn_from_rollouts(state, reward_fn, train_prompts, rng, n, timer, progress,
                                                kl_probe=current_answers)
        report.kl_coef = state.kl_ctl.value
        killpoint("round:trained")

        # 7. the gate's view of the candidate: the same prompts and noise as step 3. A candidate at or over
        #    budget.target of the KL bound has its update scaled back (halved) until it is below: the round
        #    spends the budget it has instead of overshooting it and being thrown away
        with timer("gate"), _bar(progress, n, "gate", "policy", 1) as bar:
            cand_answers = answer(state.nets.policy)
            cand = score_(cand_answers)
            trained, scale, scale_backs = None, 1.0, 0
            while scale_backs < cfg.budget.scale_backs and cand.kl_to_ref >= cfg.budget.target * cfg.gate.max_kl:
                trained = trained or state.nets.snapshot(state.value_head)
                scale, scale_backs = scale / 2, scale_backs + 1
                state.nets.interpolate(snapshot, trained, scale, state.value_head)
                cand_answers = answer(state.nets.policy)
                cand = score_(cand_answers)
            bar.update(1)
        report.budget.update(update_scale=scale, scale_backs=scale_backs)
        report.current, report.candidate = asdict(current), asdict(cand)
        decision = gate.decide(cand, current, cfg.gate, judge=None if cfg.reward.rule else report.reward_model,
                               reference=reference)
        report.promoted, report.reason = decision.promoted, decision.reason
        report.checks = {name: asdict(c) for name, c in decision.checks.items()}
        state.check_stop()

        # 8. publish: policy store version + PolicyUpdate (rank 0; every rank helps gather FSDP2's shards first)
        with timer("publish"):
            if report.promoted:
                weights, head = state.nets.gather(), full_tensors(state.value_head.named_parameters())  # (every rank)
                state.version = report.version = d.main_only(lambda: state.publisher.publish(
                    partial(state.nets.write, weights, tok), parent_version=state.version,
                    base_version=state.nets.base_version if state.nets.layout == "lora" else None, metrics={
                        "rm_reward": cand.reward, "rm_reward_parent": current.reward, "kl_to_ref": cand.kl_to_ref,
                        "response_length": cand.length, "rm_accuracy": rm_metrics.accuracy,
                        "rm_auroc": rm_metrics.auroc, "labels": float(report.labels), "round": float(n),
                        "kl_coef": state.kl_ctl.value}).version)
                save_atomic(head, state.value_head_path(state.settings) if d.is_main else None)
                state.gate_answers = {_answers_key(state, plan): cand_answers}  # the new current policy's
            else:
                state.nets.restore(snapshot, state.value_head)
    except BaseException:
        state.nets.restore(snapshot, state.value_head)  # an aborted round leaves the current policy as it was
        raise
    return _finish(state, report, inputs.label_seq)


def _learn_from_rollouts(state: TrainerState, reward_fn, train_prompts: list[list[dict]], rng: random.Random,
                         n: int, timer: "_PhaseTimer", progress: bool, kl_probe: gate.Answers) -> dict:
    """Steps 4-6 of ppo, grpo and rloo: sample, score, and clipped policy-gradient epochs over minibatches.
    They differ only in the advantage (and where the KL leash goes):
        ppo:  GAE with the value head over per-token rewards (-beta * KL each token, + score at the end)
        grpo: (score - group mean) / group std, shared by an answer's tokens; beta * k3 KL in the loss
        rloo: (score - beta * KL) minus the mean of the group's other answers'; no value head
    grpo and rloo answer rollout_prompts / group_size prompts group_size times each. After every epoch the
    policy's KL to the reference is estimated on `kl_probe`, the current policy's gate answers (_kl_estimate),
    and at budget.early_stop of the bound the epochs stop."""
    cfg, tok, d, algo = state.cfg, state.tokenizer, state.dist, state.cfg.train.algorithm
    group = 1 if algo == "ppo" else cfg.ppo.group_size
    value_head = state.value_head if algo == "ppo" else None
    model = PolicyWithValue(state.nets.policy, value_head)
    with state.nets.policy.active():  # DDP takes the parameters that require grad now: the policy adapter's (lora)
        trainable = d.data_parallel(model)
    params = [p for _, p in model.trainable()]
    opt = torch.optim.AdamW(params, lr=cfg.ppo.lr * state.lr_scale, eps=1e-5)
    perm_gen = torch.Generator().manual_seed(cfg.ppo.seed + n)
    kl_stop = cfg.budget.early_stop * cfg.gate.max_kl
    stats: dict[str, list[float]] = {}
    for batch_idx in range(cfg.ppo.rollout_batches):
        if stats.get("early_stopped"):
            break
        # 4. rollouts: the policy answers sampled logged prompts, each rank its share; row i of the
        #    batch draws its noise from (seed, round, batch, i) wherever it runs
        with timer("rollout"), _bar(progress, n, f"rollout {batch_idx + 1}/{cfg.ppo.rollout_batches}", "seq") as bar:
            asked = rng.choices(train_prompts, k=cfg.ppo.rollout_prompts // group)  # the same on every rank
            prompts = [p for p in asked for _ in range(group)]  # a group's answers are neighbours
            mine, _ = d.shard(len(prompts))
            query, query_mask = left_pad(encode_prompts(tok, [prompts[i] for i in mine], state.settings.max_prompt_tokens),
                                         tok.pad_token_id, state.device)
            state.nets.policy.eval()
            with autocast(state.device, state.dtype):
                response, response_mask = sample(
                    state.nets.policy, query, query_mask, max_new_tokens=cfg.ppo.max_new_tokens,
                    temperature=cfg.ppo.temperature, eos_ids=state.eos_ids, pad_id=tok.pad_token_id,
                    seeds=row_seeds(cfg.ppo.seed, n, batch_idx, rows=mine), lockstep=d.all if d.sharded else None)
                seen = score_against_reference(state.nets.policy, state.nets.reference, query, query_mask, response,
                                               response_mask, temperature=cfg.ppo.temperature,
                                               estimator=cfg.ppo.kl_estimator, batch_size=cfg.ppo.forward_batch_size,
                                               value_head=value_head)
            state.nets.policy.train()
            bar.update(len(prompts))

        # 5. score with the reward function; the algorithm's advantages over the whole batch
        with timer("score"):
            scores = reward_fn([prompts[i] for i in mine], decode(tok, response, response_mask)).to(state.device).float()
            values = seen.values if value_head is not None else torch.zeros_like(seen.logprobs)
            rollout = _gather_rollout(d, state.device, query=query, query_mask=query_mask, response=response,
                                      response_mask=response_mask, logprobs=seen.logprobs, ref_logprobs=seen.ref_logprobs,
                                      values=values, kl=seen.kl, entropy=seen.entropy,
                                      scores=scores.clamp(-cfg.ppo.reward_clip, cfg.ppo.reward_clip))
            beta, mask = state.kl_ctl.value, rollout.response_mask
            if algo == "ppo":
                rewards = token_rewards(rollout.scores, rollout.kl, mask, beta, cfg.ppo.reward_clip)
                advantages, returns = gae(rewards, rollout.values, mask, cfg.ppo.gamma, cfg.ppo.lam)
                if cfg.ppo.whiten_advantages:
                    advantages = masked_whiten(advantages, mask)
            else:
                if algo == "grpo":
                    sequence = grpo_advantages(rollout.scores, group)
                else:
                    sequence = rloo_advantages(rollout.scores - beta * rollout.kl.sum(1), group)
                advantages = sequence[:, None] * mask  # (B, R): every token of an answer shares its advantage
                rewards, returns = torch.zeros_like(advantages), torch.zeros_like(advantages)
            rollout = rollout._replace(rewards=rewards, advantages=advantages, returns=returns)
            seq_kl = rollout.kl.sum(1).mean().item()
            _log(stats, score=rollout.scores.mean().item(), kl=seq_kl, kl_coef=beta,
                 entropy=masked_mean(rollout.entropy, mask).item(), length=mask.sum(1).float().mean().item())
        state.check_stop()

        # 6. policy-gradient epochs over minibatches of this rollout; each rank takes its share of a minibatch
        #    and normalises by the whole minibatch's tokens, so the averaged gradients are the minibatch's
        steps = cfg.ppo.ppo_epochs * math.ceil(len(prompts) / cfg.ppo.minibatch_size)
        with timer("ppo"), _bar(progress, n, f"{algo} {batch_idx + 1}/{cfg.ppo.rollout_batches}", "step", steps) as bar:
            for _ in range(cfg.ppo.ppo_epochs):
                perm = torch.randperm(len(prompts), generator=perm_gen)  # the same on every rank
                for s in _slices(len(prompts), cfg.ppo.minibatch_size):
                    rows = perm[s]
                    tokens = rollout.response_mask[rows.to(state.device)].sum().item()
                    mine_mb, real = d.shard(len(rows))
                    mb = rollout.select(rows[mine_mb[:real]].to(state.device))
                    with autocast(state.device, state.dtype):
                        new = trainable(mb.query, mb.query_mask, mb.response, mb.response_mask,
                                        temperature=cfg.ppo.temperature)
                    pg_loss, pg_stats = policy_loss(new.logprobs, mb.logprobs, mb.advantages, mb.response_mask,
                                                    cfg.ppo.clip_range, num_tokens=tokens)
                    loss = pg_loss - cfg.ppo.entropy_coef * masked_mean(new.entropy, mb.response_mask, tokens)
                    if algo == "ppo":
                        vf_loss, vf_clipfrac = value_loss(new.values, mb.values, mb.returns, mb.response_mask,
                                                          cfg.ppo.clip_range_value, num_tokens=tokens)
                        loss = loss + cfg.ppo.vf_coef * vf_loss
                        _log(stats, vf_loss=d.sum(vf_loss.item()), vf_clipfrac=vf_clipfrac.item())
                    elif algo == "grpo":
                        kl_loss = masked_mean(kl_penalty(new.logprobs, mb.ref_logprobs, "k3"), mb.response_mask, tokens)
                        loss = loss + beta * kl_loss
                        _log(stats, kl_loss=d.sum(kl_loss.item()))
                    opt.zero_grad(set_to_none=True)
                    (loss * d.world).backward()  # DDP / FSDP2 average the ranks' gradients: their sum is the minibatch's
                    torch.nn.utils.clip_grad_norm_(params, cfg.ppo.max_grad_norm)
                    opt.step()
                    _log(stats, pg_loss=d.sum(pg_loss.item()), clipfrac=pg_stats["clipfrac"].item(),
                         approx_kl=pg_stats["approx_kl"].item())
                    bar.update(1)
                    state.check_stop()
                if kl_stop:  # budget.early_stop: after each epoch, how far has the policy gone?
                    kl_now = _kl_estimate(kl_probe, state)
                    _log(stats, kl_estimate=kl_now)
                    if kl_now >= kl_stop:
                        stats["early_stopped"] = [float(bar.n)]  # after this many steps of this batch
                        break
        state.kl_ctl.update(seq_kl, len(prompts))
    out = {k: sum(v) / len(v) for k, v in stats.items()}
    if "kl_estimate" in stats:
        out["kl_estimate_last"] = stats["kl_estimate"][-1]
    return out


@torch.no_grad()
def _kl_estimate(probe: gate.Answers, state: TrainerState) -> float:
    """The policy's KL to the reference per answer, by the gate's own measure (exact over the vocabulary at
    each prefix, summed over the answer) on the gate's prompts, at the current policy's answers to them
    (step 3): the gate then takes it at the candidate's own answers. Before the first step it is exactly the
    current policy's figure. One no-grad pass of the policy and one of the reference over the answers, every
    rank its share. Not on the rollout the epochs train on: the update has just raised exactly those tokens,
    and on SmolLM2 an estimate there read 1.3-27x the gate's figure (docs/trainer.md, "The KL budget")."""
    d, tok, cfg = state.dist, state.tokenizer, state.cfg
    rows = [i for i, t in enumerate(probe.tokens) if t]  # an empty answer is 0 nats from anything
    mine, real = d.shard(len(rows))  # padded to the same forwards on every rank: FSDP2's are collectives
    total, batch = 0.0, cfg.ppo.forward_batch_size
    for i in range(0, len(mine), batch):
        chunk = [rows[j] for j in mine[i:i + batch]]
        query, query_mask = left_pad(encode_prompts(tok, [probe.prompts[r] for r in chunk],
                                                    state.settings.max_prompt_tokens), tok.pad_token_id, state.device)
        response, mask = right_pad([probe.tokens[r] for r in chunk], tok.pad_token_id, state.device)
        with autocast(state.device, state.dtype):
            kl = score_against_reference(state.nets.policy, state.nets.reference, query, query_mask, response, mask,
                                         temperature=cfg.ppo.temperature, estimator="full", batch_size=batch).kl
        total += kl[:max(0, real - i)].sum().item()
    return d.sum(total) / max(1, len(probe.tokens))


def _learn_from_labels(state: TrainerState, examples: list[Example], preferences: list[PreferencePair], n: int,
                       timer: "_PhaseTimer", progress: bool) -> dict:
    """Steps 4-6 of kto and dpo: no rollouts, no reward model in the update; the stored answers, their
    thumbs and the users' preferences are the data (the reward model still trains and is still the gate's judge).
        kto: every answer with a net thumbs-up is desirable, net thumbs-down undesirable (kto_loss); a
             preference's chosen answer is desirable and its rejected one undesirable, weighted by its
             influence-cap weight (as the KTO paper turns pairwise data into unpaired)
        dpo: pairs of a liked and a disliked answer to the same prompt, then every preference as the
             pair it is (dpo_loss, each weighted by its influence-cap weight; thumbs-derived pairs 1)
    Ties say nothing either algorithm can use and are left out. Held-out answers (reward.heldout_fraction)
    and held-out preferences (is_heldout_pair) are left out, as for the reward model."""
    cfg, tok, d, algo = state.cfg, state.tokenizer, state.dist, state.cfg.train.algorithm
    direct = cfg.direct
    rng = random.Random(cfg.ppo.seed + n)
    train = [e for e in examples if e.rating != 0 and not is_heldout(e.response_id, cfg.reward.heldout_fraction)]
    compared = [p for p in preferences if not p.tie and not is_heldout_pair(p, cfg.reward.heldout_fraction)]
    # dpo: (prompt, chosen answer, rejected answer, weight)
    pairs = ([(train[a].messages, train[a].completion, train[b].completion, 1.0)
              for a, b in make_pairs(train, cfg.reward.max_pairs_per_prompt, rng)]
             + [(p.messages, p.chosen.completion, p.rejected.completion, p.weight) for p in compared]
             if algo == "dpo" else [])
    if algo == "kto":
        train += [x for p in compared for x in p.as_examples()]
    items = len(pairs) if algo == "dpo" else len(train)
    steps = min(direct.max_steps, math.ceil(direct.epochs * items / direct.batch_size)) if items else 0
    model = PolicyWithValue(state.nets.policy, None)
    with state.nets.policy.active():
        trainable = d.data_parallel(model)
    params = [p for _, p in model.trainable()]
    opt = torch.optim.AdamW(params, lr=direct.lr * state.lr_scale, eps=1e-5)
    stats: dict[str, list[float]] = {}

    def logratios(batch: list[tuple[list[dict], str]], grad: bool) -> torch.Tensor:
        """(B,) log pi(answer | prompt) - log pi_ref(answer | prompt), summed over the answer's tokens."""
        query, query_mask = left_pad(encode_prompts(tok, [p for p, _ in batch], state.settings.max_prompt_tokens),
                                     tok.pad_token_id, state.device)
        answers = [tok(a, add_special_tokens=False)["input_ids"][:cfg.ppo.max_new_tokens - 1] + [min(state.eos_ids)]
                   for _, a in batch]
        response, response_mask = right_pad(answers, tok.pad_token_id, state.device)
        with autocast(state.device, state.dtype):
            with torch.no_grad():
                ref = forward(state.nets.reference, query, query_mask, response, response_mask,
                              temperature=1.0).logprobs.sum(1)
            with torch.enable_grad() if grad else torch.no_grad():
                pol = trainable(query, query_mask, response, response_mask, temperature=1.0).logprobs.sum(1)
        return pol - ref

    order: list[int] = []
    with timer("ppo"), _bar(progress, n, algo, "step", steps) as bar:
        for _ in range(steps):
            if len(order) < direct.batch_size:
                order += rng.sample(range(items), items)
            batch, order = order[:direct.batch_size], order[direct.batch_size:]
            positions, real = d.shard(len(batch))
            positions = positions[:real]
            mine = [batch[j] for j in positions]
            if algo == "kto":
                rows = [train[i] for i in mine]
                shifted = [train[batch[(j + 1) % len(batch)]] for j in positions]  # (x_i, y_{i+1}): mismatched pairs
                local = logratios([(r.messages, s.completion) for r, s in zip(rows, shifted)], grad=False).tolist()
                z0 = kto_reference_point(torch.tensor([x for part in d.gather(local) for x in part]))
                weight_total = sum(train[i].n_votes for i in batch)
                r = logratios([(e.messages, e.completion) for e in rows], grad=True)
                loss = kto_loss(r, torch.tensor([e.rating > 0 for e in rows], device=state.device),
                                torch.tensor([e.n_votes for e in rows], device=state.device), z0, beta=direct.beta,
                                desirable_weight=direct.desirable_weight, undesirable_weight=direct.undesirable_weight,
                                weight_total=weight_total)
                _log(stats, z0=z0.item(), logratio=d.sum(r.sum().item()) / len(batch))
            else:
                rows = [pairs[i] for i in mine]
                chosen = logratios([(m, c) for m, c, _, _ in rows], True)
                rejected = logratios([(m, r) for m, _, r, _ in rows], True)
                loss = dpo_loss(chosen, rejected, beta=direct.beta, pair_total=sum(pairs[i][3] for i in batch),
                                weights=torch.tensor([w for *_, w in rows], device=state.device))
                _log(stats, margin=d.sum((chosen - rejected).sum().item()) / len(batch))
            opt.zero_grad(set_to_none=True)
            (loss * d.world).backward()  # DDP / FSDP2 average the ranks' gradients: their sum is the batch's
            torch.nn.utils.clip_grad_norm_(params, cfg.ppo.max_grad_norm)
            opt.step()
            _log(stats, loss=d.sum(loss.item()))
            bar.update(1)
            state.check_stop()
    return {"examples": float(len(train)), "pairs": float(len(pairs)), "preferences": float(len(compared)),
            "steps": float(steps),
            **{k: sum(v) / len(v) for k, v in stats.items()}}


def _consume(state: TrainerState, progress: bool, drain_s: float | None) -> RoundInputs:
    """Step 1 on rank 0: drain the broker into the label store, prune, finish an interrupted publish."""
    n = state.round + 1
    with _bar(progress, n, "consume", "msg") as bar:
        consumed = asdict(state.consumer.drain(drain_s, progress=bar))
    state.store.prune()
    state.publisher.recover()  # a publish a broker outage interrupted is announced now
    cap = state.cfg.reward.max_voter_share
    counts = state.store.voter_counts()
    weights = voter_weights([v for v, c in counts.items() for _ in range(c)], cap)
    voters = {"voters": len(counts), "max_share": max(counts.values()) / sum(counts.values()) if counts else 0.0,
              "capped": sum(w < 1.0 for w in weights.values()), "cap": cap}
    latest = state.policy_store.latest()
    examples, preferences = state.store.labels(cap)
    return RoundInputs(round=n, examples=examples, preferences=preferences, pool=state.store.prompts(),
                       gate_plan=state.store.get("gate_plan") or [],
                       label_seq=state.store.label_seq(), version=latest,
                       line=tuple(watch.line(state.policy_store, latest)), new_labels=state.new_labels(),
                       consumed=consumed, voters=voters)


def _reference_eval(state: TrainerState, evaluate, current: gate.PolicyEval) -> gate.PolicyEval:
    """The reference's figures for the gate's floors (every rank). Its answers do not change, so they are
    evaluated once per reference version and what else decides them (the guard set, the sampling
    settings), then read from the trainer store; the held-out prompts do grow with the pool, which
    moves a mean length or distinct-2 by far less than the floors' margins. While the reference is
    the policy serving, its figures are the current policy's. Their reward (this round's reward
    model's) is not used."""
    cfg = state.cfg
    what = json.dumps([[asdict(g) for g in state.guard_set], cfg.gate.eval_seed,
                       cfg.gate.eval_responses, cfg.ppo.max_new_tokens, cfg.ppo.temperature], sort_keys=True)
    key = f"reference_eval:{cfg.ppo.reference_version}:{hashlib.sha256(what.encode()).hexdigest()[:16]}"
    cached = state.dist.main_only(lambda: state.store.get(key))
    if cached is not None:
        return gate.PolicyEval(**cached)
    figures = current if state.version == cfg.ppo.reference_version else evaluate(state.nets.reference)
    if state.dist.is_main:
        state.store.set(key, asdict(figures))
    return figures


def _answers_key(state: TrainerState, plan: list[list[dict]]) -> str:
    """What decides the current policy's gate answers (gate.Answers): its version, the prompts, the sampling
    noise and settings, the reference (their KL), the guard set, and the numerics (dtype, batches, ranks)."""
    cfg = state.cfg
    what = json.dumps([state.version, plan, cfg.gate.eval_seed, cfg.ppo.max_new_tokens, cfg.ppo.temperature,
                       state.settings.max_prompt_tokens, cfg.ppo.reference_version, [asdict(g) for g in state.guard_set],
                       str(state.dtype), cfg.ppo.forward_batch_size, state.dist.world], sort_keys=True)
    return hashlib.sha256(what.encode()).hexdigest()


def _gather_rollout(d: Dist, device: torch.device, **local: torch.Tensor) -> Rollout:
    """Every rank's rows of a rollout, in rank (= prompt) order, on every rank. Queries stay flush right
    (left padding), responses flush left; rewards, advantages and returns are filled in by step 5."""
    parts = d.gather({k: v.detach().cpu() for k, v in local.items()}) if d.world > 1 else [local]
    P = max(p["query"].shape[1] for p in parts)
    R = max(p["response"].shape[1] for p in parts)

    def cat(name: str, width: int | None = None, left: bool = False, fill=0) -> torch.Tensor:
        out = []
        for p in parts:
            t = p[name]
            if width is not None and t.shape[1] < width:
                pad = torch.full((t.shape[0], width - t.shape[1]), fill, dtype=t.dtype)
                t = torch.cat([pad, t] if left else [t, pad], dim=1)
            out.append(t)
        return torch.cat(out).to(device)

    zeros = cat("kl", R) * 0
    return Rollout(cat("query", P, left=True), cat("query_mask", P, left=True, fill=False), cat("response", R),
                   cat("response_mask", R, fill=False), cat("logprobs", R), cat("ref_logprobs", R), cat("values", R),
                   cat("kl", R), cat("entropy", R), cat("scores"), zeros, zeros, zeros)


# ---------------------------------------------------------------------------- helpers


def _finish(state: TrainerState, report: RoundReport, label_seq: int) -> RoundReport:
    """The KL budget's bookkeeping (every rank alike); then persist the round's counters and metrics and
    print the summary line (rank 0)."""
    report.seconds["total"] = time.time() - report.trigger_time
    if report.candidate:
        _spend_budget(state, report)
    if not state.dist.is_main:
        return report
    state.store.set("round", report.round)
    state.store.set("label_watermark", label_seq)
    state.store.set("kl_coef", state.kl_ctl.value)
    state.store.set("lr_scale", state.lr_scale)
    if report.candidate:  # a round that trained no candidate (no labels, the judge refused) learnt nothing of it
        state.store.set("budget_spent", report.budget.get("spent"))
    report.guard_streak = guard_streak(state.store.get("guard_streak") or 0, report)
    state.store.set("guard_streak", report.guard_streak)
    if (stall := guard_stall(report, state.cfg.gate)) is not None:
        log.warning(stall)
    append_round(state.rounds_path, report)
    metrics.observe_round(asdict(report))
    print(report.summary(), flush=True)
    return report


def append_round(path: Path, report: RoundReport) -> None:
    """Append the round to rounds.jsonl (read by app/loop.py and the trainer's GET /loop, trainer/metrics.py)."""
    with open(path, "a") as f:
        f.write(json.dumps(_nan_to_none(asdict(report))) + "\n")  # strict JSON: nan -> null


_GUARD_SET_CHECKS = ("guard_set", "ref_guard_set")  # against the current policy, and the reference's floor


def guard_streak(previous: int, report: RoundReport) -> int:
    """Rounds in a row whose candidate failed the guard set (either check): +1 for such a round; a
    candidate that passed it resets the count; a round without a candidate (skipped) leaves it as it was."""
    if not report.candidate:
        return previous
    failed = any(not report.checks.get(name, {}).get("passed", True) for name in _GUARD_SET_CHECKS)
    return previous + 1 if failed else 0


def guard_stall(report: RoundReport, cfg) -> str | None:
    """The warning for a run of gate.guard_stall_rounds or more guard-set rejections, else None (also for a
    round skipped before training, which leaves the run as it was)."""
    if not cfg.guard_stall_rounds or report.guard_streak < cfg.guard_stall_rounds or not report.candidate:
        return None
    check = next(report.checks[n] for n in _GUARD_SET_CHECKS if not report.checks.get(n, {}).get("passed", True))
    return (f"the guard set has rejected {report.guard_streak} candidates in a row (pass rate {check['value']:.2f}, "
            f"needed {check['bound']:.2f}): the votes pull the policy where the guard set ({cfg.guard_set}) forbids. "
            "Rounds go on; look at the guard set and at what the users reward.")


def _spend_budget(state: TrainerState, report: RoundReport) -> None:
    """After a rejection for KL, be more conservative: lr x backoff_lr (down to 1/16), beta x backoff_beta;
    each promotion undoes one step. The budget is spent when the serving version's KL is already at
    budget.spent of the bound and this round's candidate was not promoted for want of KL: it failed the
    KL check, or it needed every scale-back (the smallest step the bound leaves did not make a version).
    A rejection on other grounds near the bound (a noisy reward verdict) does not spend it: the next
    round tries again. Once spent, cli.loop runs no more rounds until LATEST moves (or the trainer
    restarts with a larger bound or another reference)."""
    b, bound = state.cfg.budget, state.cfg.gate.max_kl
    kl_rejected = not report.checks.get("kl", {}).get("passed", True)
    if kl_rejected:
        state.lr_scale = max(state.lr_scale * b.backoff_lr, 1 / 16)
        state.kl_ctl.value *= b.backoff_beta
    elif report.promoted:
        state.lr_scale = min(1.0, state.lr_scale / b.backoff_lr)
    report.budget.update(lr_scale=state.lr_scale, kl_coef_after=state.kl_ctl.value, bound=bound,
                         backed_off=kl_rejected)
    serving_kl = report.current["kl_to_ref"]
    scaled_out = b.scale_backs > 0 and report.budget["scale_backs"] == b.scale_backs
    if not report.promoted and serving_kl >= b.spent * bound and (kl_rejected or scaled_out):
        grounds = ("its KL was over the bound" if kl_rejected else
                   f"it was scaled back {b.scale_backs} times (1/{2 ** b.scale_backs} of its update) and still failed")
        report.budget["spent"] = {
            "version": state.version, "bound": bound, "serving_kl": serving_kl,
            "why": (f"v{state.version} is at KL {serving_kl:.2f} of the bound {bound:g} and this round's candidate "
                    f"was not promoted: {grounds} ({report.reason}); raise gate.max_kl or make a new reference "
                    f"(rlhf sft, ppo.reference_version) to go further")}


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
