"""Trainer configuration: one frozen dataclass per component, every field documented.

Defaults cite where they come from. "TRL" is `trl.PPOConfig` / the Ziegler et al. (2019)
adaptive KL controller as TRL implements it; "OpenRLHF" is `openrlhf.cli.train_ppo`'s
argument defaults. Where the embedded ~0.7M-parameter model needs a different value than a
billion-parameter one, the field says so and why (tuned in tests/trainer/test_learning.py
and the end-to-end demo on 2 CPU cores).

Every field is a CLI flag `--<section>.<field>` and an environment variable
`RLHF_<SECTION>_<FIELD>`, built by `add_arguments` / `from_args`. Precedence:
flag > env > the model directory's own `rlhf-trainer.json` > the scale profile for the
model (`model_defaults`) > the dataclass default. The dataclass defaults are the embedded
model's tuned values; `model_defaults` replaces the scale-dependent ones for real models
(10M+ parameters) with values taken from the anchors each field names, and sizes a round
for the device. The loop's own trigger (`RLHF_TRAIN_MIN_LABELS`, `RLHF_TRAIN_MAX_WAIT_S`)
and the late-vote window live in `core.contracts.Settings` with the other deployment settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rlhf_loop.core.tastes import TASTES


MODEL_CONFIG_FILE = "rlhf-trainer.json"  # a model directory's own trainer config: {"ppo": {"lr": 1e-5}, ...}
REAL_MODEL_PARAMS = 10_000_000  # from here on a model gets model_defaults' anchors, below it the tuned toy values
LORA_AUTO_MIN_PARAMS = 50_000_000  # train.adapter=auto picks LoRA from here on
# train.algorithm for a real model on a CPU (model_defaults; rlhf up and bench/loop.py run it too): on SmolLM2 its
# three seeds gained +0.30 (sd 0.04) against PPO's +0.07, clearly better by issue 21's rule; GRPO and KTO were behind
# it in their screen runs (docs/trainer.md, "RLOO against PPO on SmolLM2"). The toy's and a GPU's default stay ppo
REAL_MODEL_CPU_ALGORITHM = "rloo"


@dataclass(frozen=True)
class TrainConfig:
    """What trains: all weights or LoRA adapters (peft) over a frozen base."""

    algorithm: Literal["ppo", "grpo", "rloo", "kto", "dpo"] = "ppo"
    """How the policy learns from the votes: ppo (reward model + PPO with a value head), grpo / rloo
    (reward model, k answers per prompt, a group baseline instead of a critic), kto (the thumbs
    themselves, unpaired), dpo (pairs of a liked and a disliked answer to one prompt). The same
    reward model, gate and publishing for all; docs/trainer.md compares them on one bench."""
    adapter: Literal["auto", "full", "lora"] = "auto"
    """full: every weight trains, a version is a full checkpoint; lora: LoRA adapters on a frozen
    base (the reference), a version is the adapter (megabytes) and the reference is the base
    with the adapter off; auto: lora for models of 50M+ parameters, full below (the embedded
    0.7M model's loop is tuned full-weight; LoRA's memory and version size pay off with size)."""
    lora_rank: int = 8
    """LoRA rank r. "LoRA Without Regret" (Thinking Machines, 2025): for RL even rank 1 matches
    full fine-tuning, a policy gradient carries few bits per episode; 8 leaves headroom and keeps
    a 135M model's version under 10 MB."""
    lora_alpha: float = 32.0
    """LoRA alpha (scale alpha / r); 32 as in "LoRA Without Regret", which fixes alpha and tunes the lr."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input (peft default 0; RL gains nothing from it and it perturbs the
    ratio pi/pi_old between sampling and training)."""
    lora_target_modules: str = "all-linear"
    """Which layers get adapters: peft's 'all-linear' (every linear layer but the output head;
    "LoRA Without Regret": the MLPs matter most), or a comma-separated list of module names."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations during the backward pass instead of keeping them
    (transformers' gradient checkpointing, non-reentrant) in the policy and the reward model:
    activation memory falls from every layer's to about one layer's, for about a third more
    compute in the steps that train. On for real models (model_defaults): bench/rm_memory.py, a
    135M model's reward-model phase (LoRA, malloc threshold fixed) peaks at 1.3-1.4 GB with it,
    4.4 GB without, and runs no slower."""
    strategy: Literal["ddp", "fsdp2"] = "ddp"
    """With several ranks (torchrun): ddp replicates the networks and averages gradients; fsdp2
    (torch's fully_shard) shards every network's weights, gradients and optimizer state across
    the ranks, for models one device cannot hold. One rank: no difference."""
    collective_timeout_s: float = 600.0
    """Timeout of every collective (the process group's): a rank that dies or hangs fails the
    others within this instead of hanging them. It must cover the longest stretch rank 0 works
    alone: a round's consume (drain_max_s + the group join) and writing a version."""

    def __post_init__(self) -> None:
        _positive(self, "lora_rank", "lora_alpha", "collective_timeout_s")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"train.lora_dropout must be in [0, 1), got {self.lora_dropout}")

    def resolved_adapter(self, params: int) -> Literal["full", "lora"]:
        if self.adapter == "auto":
            return "lora" if params >= LORA_AUTO_MIN_PARAMS else "full"
        return self.adapter


@dataclass(frozen=True)
class ConsumerConfig:
    """The Kafka group consumer that joins votes to responses."""

    poll_timeout_ms: int = 1000
    """How long one poll waits for records (kafka-python's poll timeout)."""
    max_poll_records: int = 500
    """Records per poll, i.e. per SQLite transaction + offset commit (kafka-python default 500)."""
    session_timeout_ms: int = 6000
    """Group session timeout. 6 s makes tansu's group join take ~3 s instead of ~23 s (DESIGN.md)."""
    heartbeat_interval_ms: int = 1000
    """Heartbeats, well under a third of the session timeout (Kafka's rule of thumb)."""
    max_poll_interval_ms: int = 900_000
    """A round runs between polls; 15 min covers a slow CPU round (kafka-python default 300 000)."""
    drain_max_s: float = 10.0
    """Step 1 of a round drains until a poll comes back empty, but at most this long after the
    partitions are assigned: with users voting all the time the stream never pauses, and the
    continuous loop consumes between rounds anyway."""
    dedupe_window_s: float = 7 * 24 * 3600.0
    """How long seen event ids and vote tombstones are kept for de-duplication (a redelivery
    older than this counts again). Bounded state; a week covers any spool outage."""
    prompt_pool_size: int = 5000
    """Most recent distinct prompts kept for rollouts and the gate's held-out set."""

    def __post_init__(self) -> None:
        _positive(self, "poll_timeout_ms", "max_poll_records", "session_timeout_ms", "heartbeat_interval_ms",
                  "max_poll_interval_ms", "drain_max_s", "dedupe_window_s", "prompt_pool_size")
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("consumer.heartbeat_interval_ms must be at most a third of session_timeout_ms")


@dataclass(frozen=True)
class RewardConfig:
    """The reward model: the base model's backbone + a scalar head, trained on the labelled examples."""

    backbone: Literal["tuned", "frozen"] = "tuned"
    """tuned: the backbone trains with the head (its own weights in full mode, its own LoRA adapter
    in lora mode), every round, through the whole body. frozen: only a small head trains, on the
    frozen base's hidden states of the answer's tokens at reward.feature_layer (each token scored,
    the best one counts, plus a linear read of their mean and max), computed once per labelled
    answer and kept; a round costs a forward of its new labels. The embedded model's loop is tuned
    with 'tuned'; real models on CPU default to 'frozen' (model_defaults; docs/trainer.md compares
    the two on the same votes)."""
    feature_layer: int = 0
    """backbone=frozen: the decoder layer whose hidden states are the features (0: the one a quarter
    of the way up the body, which read the simulated tastes best on SmolLM2: docs/trainer.md)."""
    head_l2: float = 1.0
    """backbone=frozen: L2 penalty on the head's weights (features standardised; the loss is a mean
    over votes); 1 read held-out votes best of 0.03-10 on SmolLM2's answers (docs/trainer.md)."""
    head_max_iter: int = 100
    """backbone=frozen: L-BFGS iterations of the head's fit, from zero, every round."""
    judge_folds: int = 5
    """backbone=frozen: the judge's AUROC (gate.min_rm_auroc) k-fold cross-validated over every vote (ups
    against downs of the same fold: reward_model.within_fold_auroc), the held-out split one of the folds
    (k - 1 more head fits a round, each a fraction of a second); 1: on the held-out split alone, as with
    backbone=tuned, where a fit is a training run. The served head never sees the held-out split either way."""
    judge_folds_until: int = 100
    """... while the held-out split has fewer up and down votes than this (0: always). From there its own
    bound is within about 0.1 of its AUROC (0.75 on 100 votes, 30 up: 0.66), and the folds' fits, each a
    pass over every vote's token states per L-BFGS step, would cost a round on SmolLM2 beside the service
    15-20 s more at 1,000-1,300 labels (docs/trainer.md)."""

    lr: float = 3e-4
    """AdamW learning rate. OpenRLHF's RM default is 9e-6 for 7B models; the 0.7M embedded
    model needs a much larger step to learn within a round (tuned)."""
    batch_size: int = 16
    """Examples (and as many pairs) per step. OpenRLHF train_batch_size 128 at 7B scale;
    small here because a CPU step costs ~0.4 s per 48 sequences."""
    epochs: float = 1.0
    """Passes over the training split per round (OpenRLHF max_epochs 1); the RM is
    warm-started, so older labels have been seen in earlier rounds already."""
    max_steps: int = 40
    """Cap on steps per round, so rounds stay short as labels accumulate (CPU budget)."""
    pointwise_loss: Literal["logistic", "mse"] = "logistic"
    """Per-response loss. logistic: BCE of sigmoid(score) against the fraction of up-votes
    (thumbs); mse: squared error against the mean numeric rating (ratings on any scale)."""
    pairwise_weight: float = 1.0
    """Weight of the Bradley-Terry loss -log sigmoid(s_liked - s_disliked) over pairs of
    responses to the same prompt (InstructGPT / OpenRLHF RM loss); 0 turns it off."""
    max_pairs_per_prompt: int = 16
    """Pairs sampled per prompt, so a popular prompt does not dominate the pairwise loss."""
    preference_weight: float = 1.0
    """Weight of one user preference (POST /v1/preferences) in the Bradley-Terry loss, against 1 for a pair
    made from thumbs: both say "this answer over that one to the same prompt", a preference directly.
    Scaled by its influence-cap weight; pairwise_weight scales the whole term (0 also turns preferences off)."""
    heldout_fraction: float = 0.2
    """Share of responses (by hash of response_id, stable across rounds) kept for held-out
    accuracy / AUROC and never trained on."""
    weight_decay: float = 0.0
    """AdamW weight decay (OpenRLHF l2 default 0)."""
    max_grad_norm: float = 1.0
    """Gradient clipping (OpenRLHF max_norm 1.0)."""
    max_length: int = 256
    """Tokens of prompt + response the RM reads (longer inputs keep their end)."""
    max_voter_share: float = 0.2
    """Influence cap: no identity (an API key, or a client address without keys) carries more than
    this share of the labels a round trains on, and no voter (a key's user) more than this share
    of its identity's; votes above it are down-weighted (trainer/store.py). 0.2 = at least five
    identities share the weight; 1 turns it off."""
    rule: str | None = None
    """Reward PPO and the gate with a rule from core.tastes (e.g. 'cheerful': +1 if liked,
    -1 if not) instead of the learned RM; the RM is still trained and reported."""

    def __post_init__(self) -> None:
        _positive(self, "lr", "batch_size", "epochs", "max_steps", "max_pairs_per_prompt", "max_grad_norm", "max_length",
                  "head_max_iter", "judge_folds")
        _non_negative(self, "pairwise_weight", "preference_weight", "weight_decay", "feature_layer", "head_l2",
                      "judge_folds_until")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"reward.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if not 0.0 < self.max_voter_share <= 1.0:
            raise ValueError(f"reward.max_voter_share must be in (0, 1], got {self.max_voter_share}")
        if self.rule is not None and self.rule not in TASTES:
            raise ValueError(f"reward.rule must be one of {sorted(TASTES)} or None, got {self.rule!r}")


@dataclass(frozen=True)
class PPOConfig:
    """Rollouts and the PPO update with a KL penalty against the frozen reference (version 0)."""

    rollout_prompts: int = 64
    """Prompts per rollout batch, sampled from the logged prompts (OpenRLHF rollout_batch_size
    512 at 7B scale; 64 = TRL's local_rollout_forward_batch_size, one forward on CPU)."""
    rollout_batches: int = 2
    """Rollout + update iterations per round (each: sample, score, ppo_epochs of updates)."""
    max_new_tokens: int = 48
    """Response length cap (TRL response_length 53; the service's default_max_tokens 48)."""
    temperature: float = 1.0
    """Sampling temperature; log-probs use the same temperature (TRL temperature 0.7; 1.0
    samples the policy itself, so ratios start at exactly 1)."""
    ppo_epochs: int = 4
    """Passes over each rollout batch (TRL num_ppo_epochs 4)."""
    minibatch_size: int = 16
    """Sequences per optimiser step (OpenRLHF micro_train_batch_size 8; 16 keeps a CPU step
    near 0.2 s and gives 4 steps per rollout batch and epoch)."""
    lr: float = 2e-4
    """AdamW learning rate. TRL 1.41e-5 / OpenRLHF actor 1e-6 at GPT-2/7B scale; the 0.7M
    embedded model needs ~10x TRL's step to move within a round (tuned)."""
    max_grad_norm: float = 1.0
    """Gradient clipping (OpenRLHF max_norm 1.0)."""
    clip_range: float = 0.2
    """PPO ratio clip epsilon (TRL cliprange 0.2, OpenRLHF eps_clip 0.2)."""
    clip_range_value: float = 0.2
    """Value clip around the rollout's values (TRL cliprange_value 0.2, OpenRLHF value_clip 0.2)."""
    vf_coef: float = 0.1
    """Value loss weight; the value head shares the policy backbone (TRL vf_coef 0.1)."""
    entropy_coef: float = 0.0
    """Entropy bonus weight; entropy is always logged (TRL's PPO adds no bonus)."""
    gamma: float = 1.0
    """GAE discount (TRL gamma 1.0, OpenRLHF gamma 1.0)."""
    lam: float = 0.95
    """GAE lambda (TRL lam 0.95, OpenRLHF lambd 0.95)."""
    whiten_advantages: bool = True
    """Whiten advantages over the batch's response tokens (TRL always does)."""
    reward_clip: float = 10.0
    """The RM score is clipped to [-reward_clip, reward_clip] (OpenRLHF reward_clip_range (-10, 10))."""
    kl_estimator: Literal["k1", "k2", "k3", "full"] = "k1"
    """Per-token KL in the reward: k1 = log p - log p_ref (TRL kl_estimator 'k1'), k2, k3
    (Schulman's unbiased low-variance estimator), or 'full' = exact KL over the vocabulary.
    All through kernels/."""
    init_kl_coef: float = 0.2
    """beta at the first round (TRL init_kl_coef 0.2; OpenRLHF 0.01). The controller adapts it."""
    kl_target: float | None = 4.0
    """Adaptive KL controller target, nats per response (Ziegler et al.; TRL target 6 for
    GPT-2 sentiment). None keeps beta fixed (OpenRLHF's default). Below the gate's max_kl, so
    the controller, not the gate, does the steering."""
    kl_horizon: float = 500.0
    """Adaptive controller horizon, in sequences. TRL's 10000 suits runs of ~1M episodes; an
    online run here sees a few thousand, so 500 lets beta move by up to ~5% per round."""
    reference_version: int = 0
    """Policy-store version of the frozen reference (and the reward model's initial backbone):
    0 = the base model; after `rlhf sft` publishes vN, N makes the SFT model the reference
    (InstructGPT's recipe)."""
    forward_batch_size: int = 64
    """Sequences per no-grad forward when scoring rollouts (TRL local_rollout_forward_batch_size 64)."""
    seed: int = 0
    """Seed for rollout sampling and minibatch order; round r uses seed + r."""
    group_size: int = 4
    """grpo / rloo: answers per prompt, the group whose mean is each answer's baseline; a rollout
    batch then asks rollout_prompts / group_size prompts (the same number of answers as ppo).
    GRPO's paper samples 64 at 7B; 4 keeps the prompts varied at this batch size."""

    def __post_init__(self) -> None:
        _positive(self, "rollout_prompts", "rollout_batches", "max_new_tokens", "temperature", "ppo_epochs",
                  "minibatch_size", "lr", "max_grad_norm", "clip_range", "clip_range_value", "reward_clip",
                  "kl_horizon", "forward_batch_size")
        if self.group_size < 2:
            raise ValueError(f"ppo.group_size must be >= 2, got {self.group_size}")
        _non_negative(self, "vf_coef", "entropy_coef", "init_kl_coef", "reference_version")
        if not (0.0 < self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ValueError(f"ppo.gamma must be in (0, 1] and ppo.lam in [0, 1], got {self.gamma}, {self.lam}")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ValueError(f"ppo.kl_target must be > 0 or None, got {self.kl_target}")
        if self.minibatch_size > self.rollout_prompts:
            raise ValueError("ppo.minibatch_size must not exceed ppo.rollout_prompts")


@dataclass(frozen=True)
class BudgetConfig:
    """Spending the KL budget (gate.max_kl) on purpose instead of discovering it at the gate
    (trainer/round.py steps 6-7 and _finish; trainer/cli.py)."""

    early_stop: float = 0.8
    """ppo, grpo, rloo: their epochs stop when the in-round estimate of the policy's KL to the
    reference (per answer: the gate's exact measure, on the current policy's gate answers) reaches
    this share of gate.max_kl (PPO's early stopping on a target KL, as in OpenAI's baselines).
    0 turns it off."""
    target: float = 0.9
    """A candidate whose KL (the gate's own measure: same prompts, same noise) is at or above this
    share of gate.max_kl has its update scaled back ..."""
    scale_backs: int = 3
    """... halved at most this many times (its weights moved back toward the round's start: 1/2,
    1/4, 1/8 of the update), until it is below. For every algorithm. 0 turns it off."""
    backoff_lr: float = 0.5
    """After a rejection for KL, the next rounds' learning rate is multiplied by this (down to 1/16
    of the configured one) and beta (the KL penalty) by backoff_beta; each promotion undoes one step."""
    backoff_beta: float = 1.5
    """See backoff_lr."""
    spent: float = 0.85
    """The budget is spent when the serving version's KL is at least this share of gate.max_kl and a
    round could not turn what is left into a promotion: rounds stop (labels keep being stored, the
    watch keeps watching) until LATEST moves, the bound is raised, or a new reference is set."""

    def __post_init__(self) -> None:
        _non_negative(self, "early_stop", "scale_backs")
        for name in ("target", "backoff_lr", "spent"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"budget.{name} must be in (0, 1], got {getattr(self, name)}")
        if self.backoff_beta < 1.0:
            raise ValueError(f"budget.backoff_beta must be >= 1, got {self.backoff_beta}")


@dataclass(frozen=True)
class DirectConfig:
    """kto and dpo (train.algorithm): learning from the stored thumbs without rollouts."""

    beta: float = 0.1
    """How far from the reference the log-ratio may go before the loss flattens (TRL's KTO and DPO beta 0.1)."""
    lr: float = 1e-4
    """AdamW learning rate. TRL's KTOConfig / DPOConfig 1e-6 at 7B; the 0.7M embedded model needs
    a far larger step (tuned, as ppo.lr)."""
    batch_size: int = 16
    """Answers (kto) or pairs (dpo) per step."""
    epochs: float = 1.0
    """Passes over the stored labels per round."""
    max_steps: int = 24
    """Cap on steps per round, so rounds stay short as labels accumulate."""
    desirable_weight: float = 1.0
    """KTO's lambda_D, the weight of a thumbs-up answer's loss (TRL default 1)."""
    undesirable_weight: float = 1.0
    """KTO's lambda_U, the weight of a thumbs-down answer's loss (TRL default 1; the KTO paper
    suggests lambda_D n_D / (lambda_U n_U) in [1, 4/3] when the classes are unbalanced)."""

    def __post_init__(self) -> None:
        _positive(self, "beta", "lr", "batch_size", "epochs", "max_steps", "desirable_weight", "undesirable_weight")


@dataclass(frozen=True)
class GateConfig:
    """Whether a round's candidate replaces the current policy."""

    eval_responses: int = 48
    """Responses each policy gives in the comparison: the held-out prompts (those whose hash
    falls in reward.heldout_fraction, or the whole pool while there are none), repeated in
    order as needed, sampled with eval_seed."""
    eval_seed: int = 1234
    """Sampling seed for the comparison, the same for candidate and current policy."""
    min_reward_gain: float = 0.0
    """Candidate's mean held-out reward must exceed the current policy's by more than this."""
    max_kl: float = 8.0
    """Candidate's mean KL(pi || pi_ref) per response (exact, summed over tokens, nats) must
    be below this. Above kl_target so the controller, not the gate, does the steering."""
    min_length_ratio: float = 0.6
    """Length drift, down: the candidate's mean response length must be at least this share of
    the current policy's (against collapsing to empty answers, a classic reward hack). Per round,
    so a taste for short answers is still reached, over several rounds."""
    max_length_ratio: float = 1.6
    """Length drift, up: at most this multiple of the current policy's mean length (reward models
    are known to favour length; RLHF length bias, Singhal et al. 2023). 0 turns it off."""
    min_distinct_ratio: float = 0.8
    """Degeneracy: the candidate's distinct-2 (distinct token bigrams / bigrams over its answers)
    must be at least this share of the current policy's (repetition loops score well with some
    reward models). 0 turns it off."""
    guard_set: str | None = "builtin"
    """Fixed prompts with rule checks that must not regress (a JSONL of {"messages", "checks"};
    trainer/guard_set.jsonl, 'builtin', is for the embedded model's domain; give your own for
    yours; none turns it off). Checks: mentions, min_words, max_words, not_contains, max_repeat, taste."""
    guard_tolerance: float = 0.1
    """The candidate's guard pass rate (greedy answers) may fall at most this much below the current
    policy's (0.1: one prompt of the built-in twelve)."""
    ref_min_length_ratio: float = 0.3
    """The floors against the reference (ppo.reference_version), which do not move: the per-round
    checks above allow each candidate a little drift, and a chain of promotions would add it up
    (0.6 per round is 0.2 after three). Length, down: at least this share of the reference's mean
    length (the embedded model answers in ~22 tokens: a floor of ~7)."""
    ref_max_length_ratio: float = 3.0
    """Length, up: at most this multiple of the reference's mean length. 0 turns it off."""
    ref_min_distinct_ratio: float = 0.6
    """Repetition: distinct-2 at least this share of the reference's. 0 turns it off."""
    ref_guard_tolerance: float = 0.2
    """The guard set's pass rate at most this below the reference's (0.2: two prompts of the
    built-in twelve; the per-round tolerance allows one, every round)."""
    guard_stall_rounds: int = 3
    """After this many rounds in a row whose candidate failed the guard set, every further one warns
    (the log, `guard_streak` in rounds.jsonl, rlhf_trainer_guard_rejections_in_a_row): the votes pull
    the policy where the guard set forbids, so rounds keep training and throwing the result away.
    Rounds go on; the guard set or the taste needs a person's look. 0: never warn."""
    min_rm_auroc: float = 0.6
    """The judge: a learned reward model's held-out AUROC, at its lower 95 % confidence bound
    (Hanley-McNeil, for the number of held-out up and down votes), must be at least this, or no
    candidate it scored is promoted (chance is 0.5). Rule rewards are exempt. 0 turns it off.
    Without held-out thumbs of both kinds but with held-out preferences, the judge is judged by
    min_rm_pair_accuracy alone (the check reports this AUROC "not checked")."""
    min_rm_pair_accuracy: float = 0.6
    """The judge on preferences: the reward model's held-out pairwise accuracy (share of held-out
    preferences, ties left out, whose chosen answer it scores higher), at its lower 95 % confidence
    bound (Wilson), must be at least this whenever there are held-out preferences (chance is 0.5;
    the same bar as min_rm_auroc, which is a pairwise accuracy too: over up/down pairs). 0 turns it off."""
    max_rm_approval_gap: float = 0.25
    """The judge against the users: |the reward model's predicted approval - the live approval|
    on held-out answers of the serving version must be at most this (a judge whose approval
    disagrees with the users' is optimised in the wrong direction). It needs 20 of them, pooled
    with the parents' (rm_gap_versions) when the serving version has fewer; with fewer still the
    round reports it "not checked" and why. 0 turns it off."""
    rm_gap_versions: int = 3
    """How many versions of the serving version's line (it, its parent, its grandparent) the
    approval gap may pool held-out labels from: each is one promoted round away from the next."""
    behaviour_answers: int = 64
    """Voted answers (sampled, at top_p 1) whose recorded log-probs (Interaction.completion_logprobs) each round
    compares with the current policy's: rounds.jsonl `behaviour` (rollout.BehaviourGap). A metric, not a check:
    one no-grad forward over them. 0 turns it off."""

    def __post_init__(self) -> None:
        _positive(self, "eval_responses", "max_kl")
        _positive(self, "rm_gap_versions")
        _non_negative(self, "max_length_ratio", "min_distinct_ratio", "guard_tolerance", "min_rm_auroc",
                      "min_rm_pair_accuracy",
                      "max_rm_approval_gap", "guard_stall_rounds", "ref_max_length_ratio", "ref_min_distinct_ratio",
                      "ref_guard_tolerance", "behaviour_answers")
        for name in ("min_length_ratio", "ref_min_length_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"gate.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("max_length_ratio", "ref_max_length_ratio"):
            if getattr(self, name) and getattr(self, name) < 1.0:
                raise ValueError(f"gate.{name} must be >= 1 (or 0: off), got {getattr(self, name)}")


@dataclass(frozen=True)
class WatchConfig:
    """After a promotion: every promoted version's live approval against its parent's (trainer/watch.py)."""

    enabled: bool = True
    """Roll a promoted version back, with no operator, when its users' approval drops significantly."""
    false_alarm: float = 0.05
    """alpha: the chance of rolling back a version as good as its parent, over all its looks
    together (spent across the looks; bench/rollback_sim.py measures it)."""
    first_look: int = 50
    """The version's votes at its first look; each further look at twice as many (50, 100, 200,
    400). Fewer votes than ~50 cannot show a drop against a parent's ~100 anyway."""
    looks: int = 4
    """Looks in all. A version with no significant drop by its last look is kept and no longer
    watched; the later looks see little more, as the parent's votes bound what any test sees."""
    min_parent_votes: int = 20
    """A look waits until the parent has this many votes (the floor of the normal approximation;
    the test accounts for the parent's uncertainty however many it has)."""

    def __post_init__(self) -> None:
        _positive(self, "first_look", "looks", "min_parent_votes")
        if not 0.0 < self.false_alarm < 0.5:
            raise ValueError(f"watch.false_alarm must be in (0, 0.5), got {self.false_alarm}")


@dataclass(frozen=True)
class SFTConfig:
    """`rlhf sft`: supervised fine-tuning on demonstrations (assistant tokens only)."""

    epochs: float = 3.0
    """Passes over the demonstrations (TRL SFTConfig num_train_epochs 3)."""
    lr: float = 2e-4
    """AdamW learning rate (TRL SFTConfig 2e-5 at 1B+ scale; the 0.7M embedded model needs
    ~10x, as for PPO)."""
    batch_size: int = 16
    """Conversations per step (TRL per_device_train_batch_size 8; 16 halves the CPU steps)."""
    max_length: int = 512
    """Tokens per conversation; longer ones keep their beginning (TRL max_length 1024)."""
    max_grad_norm: float = 1.0
    """Gradient clipping (TRL max_grad_norm 1.0)."""
    seed: int = 0
    """Shuffling seed."""

    def __post_init__(self) -> None:
        _positive(self, "epochs", "lr", "batch_size", "max_length", "max_grad_norm")


@dataclass(frozen=True)
class SFTRun:
    """The sections `rlhf sft` reads (flags --sft.<field>)."""

    sft: SFTConfig = field(default_factory=SFTConfig)


@dataclass(frozen=True)
class TrainerConfig:
    """Everything a round needs besides `Settings`."""

    train: TrainConfig = field(default_factory=TrainConfig)
    consumer: ConsumerConfig = field(default_factory=ConsumerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    direct: DirectConfig = field(default_factory=DirectConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)

    def __post_init__(self) -> None:
        if self.train.algorithm in ("grpo", "rloo") and self.ppo.rollout_prompts % self.ppo.group_size:
            raise ValueError(f"{self.train.algorithm}: ppo.group_size ({self.ppo.group_size}) must divide "
                             f"ppo.rollout_prompts ({self.ppo.rollout_prompts})")

    def replace(self, **sections: dict) -> "TrainerConfig":
        """A copy with some fields overridden: `cfg.replace(ppo={"lr": 1e-4})`."""
        return dataclasses.replace(self, **{
            name: dataclasses.replace(getattr(self, name), **values) for name, values in sections.items()
        })

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _section_classes(root: type) -> dict[str, type]:
    """section name -> its dataclass, in the root dataclass's field order."""
    hints = typing.get_type_hints(root)
    return {f.name: hints[f.name] for f in dataclasses.fields(root)}


# ---------------------------------------------------------------------------- defaults by model


def model_defaults(model_dir: str | Path, params: int, device_type: str, adapter: str = "auto") -> dict[str, dict]:
    """Section -> field -> default for this model: its scale profile, then its own rlhf-trainer.json.

    Models under REAL_MODEL_PARAMS keep the dataclass defaults (tuned on the 0.7M embedded
    model). Real models get learning rates from the anchors (TRL's PPOConfig 3e-6 and
    OpenRLHF's RM 9e-6 full-weight; "LoRA Without Regret": LoRA's best lr is ~10x full
    fine-tuning's) and, on CPU, a round sized to finish in minutes (bench/train_round.py:
    a 135M model's PPO step takes seconds per sequence on 2 cores). `adapter` is the
    train.adapter a flag or variable already chose; 'auto' is decided here, by size, and the
    profile names the layout, so everything after (the trainer's networks, the learning rates,
    the log line) follows one decision.
    """
    layout = TrainConfig(adapter=adapter).resolved_adapter(params)  # the one place 'auto' is decided
    out: dict[str, dict] = {"train": {"adapter": layout}}
    if params >= REAL_MODEL_PARAMS:
        lora = layout == "lora"
        out["train"]["gradient_checkpointing"] = True
        out["ppo"] = {"lr": 3e-5 if lora else 3e-6}
        out["reward"] = {"lr": 9e-5 if lora else 9e-6}
        out["direct"] = {"lr": 1e-5 if lora else 1e-6}  # TRL's KTOConfig / DPOConfig 1e-6; x10 for LoRA
        if device_type == "cpu":
            out["train"]["algorithm"] = REAL_MODEL_CPU_ALGORITHM
            # a CPU round affords 4 optimizer steps (2 epochs x 2 minibatches of 16 rollouts): at the anchors'
            # lr they left SmolLM2 where it was (KL 0.06 nats, bf16's own noise, over 11 rounds), so 10x
            out["ppo"].update(lr=3e-4 if lora else 3e-5, rollout_prompts=16, rollout_batches=1, ppo_epochs=2,
                              minibatch_size=8, max_new_tokens=32, forward_batch_size=16)
            # the frozen-feature head: a round's reward model is a forward of its new labels, not steps through
            # the whole body, and it predicted held-out votes better at the steps a CPU round affords
            # (docs/trainer.md, "A real model on a CPU"; bench/reward_model.py)
            out["reward"].update(batch_size=8, max_steps=8, backbone="frozen")
            out["gate"] = {"eval_responses": 16, "behaviour_answers": 16}  # the behaviour metric: a forward each
            # kto and dpo: as many answers through the policy with gradients as ppo's round (4 steps of 8), and 10x
            # the anchor for the same reason. A round on SmolLM2 then takes 71-78 s beside the service (its 4 steps
            # 41-45 s); the dataclass's 24 steps of 16 are 12x the answers (docs/trainer.md, "GRPO and KTO on SmolLM2")
            out["direct"].update(lr=1e-4 if lora else 1e-5, batch_size=8, max_steps=4)
    path = Path(model_dir) / MODEL_CONFIG_FILE
    if path.exists():
        own = json.loads(path.read_text())
        sections = _section_classes(TrainerConfig)
        for section, values in own.items():
            if section not in sections or not isinstance(values, dict):
                raise ValueError(f"{path}: unknown section {section!r}; sections are {sorted(sections)}")
            names = {f.name for f in dataclasses.fields(sections[section])}
            unknown = set(values) - names
            if unknown:
                raise ValueError(f"{path}: unknown {section} field(s) {sorted(unknown)}")
            out.setdefault(section, {}).update(values)
    return out


# ---------------------------------------------------------------------------- CLI / env


def add_arguments(parser: argparse.ArgumentParser, root: type = TrainerConfig) -> None:
    """One `--section.field` flag per field of each section of `root`; help from the field docstrings."""
    docs = _field_docs()
    for section, cls in _section_classes(root).items():
        group = parser.add_argument_group(f"{section} ({cls.__name__})")
        for f in dataclasses.fields(cls):
            kind, choices = _kind(typing.get_type_hints(cls)[f.name])
            group.add_argument(
                f"--{section}.{f.name}", dest=f"{section}.{f.name}", default=None,
                metavar=kind.upper() if choices is None else "{" + ",".join(choices) + "}",
                choices=None if choices is None else [*choices, *(["none"] if "none" in kind else [])],
                help=f"{docs[cls.__name__].get(f.name, '')} [default {f.default!r}; env RLHF_{section.upper()}_{f.name.upper()}]",
            )


def from_args(args: argparse.Namespace | None = None, environ: typing.Mapping[str, str] | None = None,
              root: type = TrainerConfig, defaults: dict[str, dict] | None = None):
    """`root` (TrainerConfig) from parsed flags, then RLHF_<SECTION>_<FIELD> variables, then
    `defaults` (model_defaults), then the dataclass defaults."""
    environ = os.environ if environ is None else environ
    values = vars(args) if args is not None else {}
    sections = {}
    for section, cls in _section_classes(root).items():
        hints = typing.get_type_hints(cls)
        kwargs = dict((defaults or {}).get(section, {}))
        for f in dataclasses.fields(cls):
            raw = values.get(f"{section}.{f.name}")
            if raw is None:
                raw = environ.get(f"RLHF_{section.upper()}_{f.name.upper()}")
            if raw is not None:
                kwargs[f.name] = _parse(raw, hints[f.name], f"{section}.{f.name}")
        sections[section] = cls(**kwargs)
    return root(**sections)


def explicit(args: argparse.Namespace | None, environ: typing.Mapping[str, str] | None, section: str,
             name: str) -> str | None:
    """The raw value a flag or variable gives one field (None: not given), before defaults are known."""
    environ = os.environ if environ is None else environ
    raw = (vars(args) if args is not None else {}).get(f"{section}.{name}")
    return raw if raw is not None else environ.get(f"RLHF_{section.upper()}_{name.upper()}")


def _kind(tp) -> tuple[str, tuple | None]:
    """('int' | 'float' | 'bool' | 'str' | 'choice', with '|none' when optional), Literal choices."""
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) != len(typing.get_args(tp))
        (tp,) = args
    if typing.get_origin(tp) is Literal:
        return "choice" + ("|none" if optional else ""), tuple(typing.get_args(tp))
    return tp.__name__ + ("|none" if optional else ""), None


def _parse(raw: str, tp, name: str):
    kind, choices = _kind(tp)
    if kind.endswith("|none") and raw.strip().lower() == "none":
        return None
    base = kind.removesuffix("|none")
    if base == "choice":
        if raw not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {raw!r}")
        return raw
    if base == "bool":
        if raw.lower() not in {"1", "0", "true", "false", "yes", "no"}:
            raise ValueError(f"{name} must be true or false, got {raw!r}")
        return raw.lower() in {"1", "true", "yes"}
    return {"int": int, "float": float, "str": str}[base](raw)


def _field_docs() -> dict[str, dict[str, str]]:
    """The attribute docstrings above, per class and field, for --help."""
    import ast
    import inspect

    out: dict[str, dict[str, str]] = {}
    for node in ast.parse(inspect.getsource(inspect.getmodule(TrainerConfig))).body:
        if isinstance(node, ast.ClassDef):
            docs = out.setdefault(node.name, {})
            for prev, cur in zip(node.body, node.body[1:]):
                if (isinstance(prev, ast.AnnAssign) and isinstance(cur, ast.Expr)
                        and isinstance(cur.value, ast.Constant) and isinstance(cur.value.value, str)):
                    docs[prev.target.id] = " ".join(cur.value.value.split()).replace("%", "%%")
    return out


def _positive(obj, *names: str) -> None:
    for n in names:
        if not getattr(obj, n) > 0:
            raise ValueError(f"{type(obj).__name__}.{n} must be > 0, got {getattr(obj, n)!r}")


def _non_negative(obj, *names: str) -> None:
    for n in names:
        if not getattr(obj, n) >= 0:
            raise ValueError(f"{type(obj).__name__}.{n} must be >= 0, got {getattr(obj, n)!r}")


def markdown() -> str:
    """The configuration tables of docs/trainer.md: `python -m rlhf_loop.trainer.config` prints them."""
    docs, lines = _field_docs(), []
    for root in (TrainerConfig, SFTRun):
        for section, cls in _section_classes(root).items():
            lines += [f"**{section}** (`{cls.__name__}`)", "", "| field | default | meaning |", "|---|---|---|"]
            for f in dataclasses.fields(cls):
                doc = docs[cls.__name__].get(f.name, "").replace("%%", "%").replace("|", "\\|")
                lines.append(f"| `{f.name}` | `{f.default!r}` | {doc} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
