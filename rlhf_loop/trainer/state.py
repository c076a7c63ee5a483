"""What the trainer holds between rounds, and where it keeps it.

    <trainer_dir>/labels.sqlite            labels, join state, offsets record, counters (trainer/store.py)
    <trainer_dir>/reward_model.safetensors the reward model, warm start for the next round
    <trainer_dir>/value_head.safetensors   the critic's head (not published)
    <trainer_dir>/rounds.jsonl             one JSON line of metrics per round

The current policy is always the policy store's LATEST (re-read before every round, so a
version published by `rlhf sft` or an operator's rollback is picked up); the reference is
PPOConfig.reference_version (0, the base model, unless an SFT version is chosen), frozen.
How the networks are laid out (full weights, or LoRA adapters on one shared base) is
trainer/networks.py. On start a publish that a crash interrupted is finished first.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from kafka import KafkaProducer
from safetensors.torch import load_file

from rlhf_loop.core.broker import client_options
from rlhf_loop.core.contracts import Settings
from rlhf_loop.core.models import count_parameters, ensure_policy_store, eos_token_ids, load_tokenizer, model_dtype, resolve_device
from rlhf_loop.core.policy_store import PolicyStore
from rlhf_loop.trainer.config import TrainerConfig
from rlhf_loop.trainer.consumer import VoteConsumer
from rlhf_loop.trainer.dist import Dist
from rlhf_loop.trainer.gate import load_guard_set
from rlhf_loop.trainer.networks import Networks
from rlhf_loop.trainer.rollout import new_value_head
from rlhf_loop.trainer.ppo import KLController
from rlhf_loop.trainer.publish import Publisher
from rlhf_loop.trainer.reward_model import FeatureCache
from rlhf_loop.trainer.store import LabelStore

log = logging.getLogger(__name__)


class RoundAborted(Exception):
    """A stop was requested mid-round; nothing of the round is kept except the stored labels."""


@dataclass
class TrainerState:
    settings: Settings
    cfg: TrainerConfig
    dist: Dist
    policy_store: PolicyStore
    tokenizer: object
    eos_ids: frozenset[int]
    nets: Networks
    version: int  # of the current policy
    value_head: torch.nn.Linear
    kl_ctl: KLController
    lr_scale: float  # the KL budget's backoff on the learning rates (config.BudgetConfig), 1 = as configured
    device: torch.device
    dtype: torch.dtype  # autocast's: bf16 on CUDA and, for real models, on CPUs that compute it (core/models.py)
    # rank 0 alone talks to Kafka and owns the label store and the publishing (None on the other ranks)
    store: LabelStore | None = None
    consumer: VoteConsumer | None = None
    producer: KafkaProducer | None = None
    publisher: Publisher | None = None
    guard_set: list = field(default_factory=list)  # gate.GuardPrompt: fixed prompts whose checks must not regress
    rm_features: FeatureCache | None = None  # reward.backbone=frozen: labelled answers' features, kept between rounds
    gate_answers: dict = field(default_factory=dict)  # round._answers_key -> gate.Answers: the current policy's, kept
    stop: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def open(cls, settings: Settings, cfg: TrainerConfig, dist: Dist = Dist()) -> "TrainerState":
        _check_divisible(cfg, dist.world)
        device = resolve_device(settings)
        store = consumer = producer = publisher = None
        if dist.is_main:
            settings.trainer_dir.mkdir(parents=True, exist_ok=True)
            store = LabelStore(settings.trainer_dir / "labels.sqlite", late_vote_window_s=settings.late_vote_window_s,
                               dedupe_window_s=cfg.consumer.dedupe_window_s,
                               prompt_pool_size=cfg.consumer.prompt_pool_size)
            ensure_policy_store(settings)
            producer = KafkaProducer(**client_options(settings), client_id="rlhf-trainer",
                                     acks="all", retries=5, max_block_ms=30_000)
            policy_store = PolicyStore(settings.policy_dir)
            publisher = Publisher(settings, policy_store, store, producer, name="trainer")
            publisher.recover()
            consumer = VoteConsumer(settings, store, cfg.consumer, producer)
        # what only rank 0 can read (its state dir, LATEST as it stands now), for every rank
        start = dist.broadcast({
            "version": PolicyStore(settings.policy_dir).latest(),
            "kl_coef": store.get("kl_coef", cfg.ppo.init_kl_coef),
            "lr_scale": store.get("lr_scale", 1.0),
            "reward_model": _read(cls.reward_model_path(settings)),
            "rm_features": _read(cls.rm_features_path(settings)) if cfg.reward.backbone == "frozen" else None,
            "value_head": _read(cls.value_head_path(settings)),
        } if dist.is_main else None)
        policy_store = PolicyStore(settings.policy_dir)
        version, ref_version = start["version"], cfg.ppo.reference_version
        policy_store.verify(version)
        policy_store.verify(ref_version)
        layout = cfg.train.resolved_adapter(count_parameters(policy_store.path(ref_version)))
        nets = Networks.open(settings, policy_store, cfg.train, cfg.reward, layout, version, ref_version, dist)
        if start["reward_model"] is not None:
            nets.reward.load(start["reward_model"])
        tokenizer = load_tokenizer(policy_store.path(ref_version), settings)
        value_head = new_value_head(nets.policy)
        if start["value_head"] is not None:
            value_head.load_state_dict(start["value_head"])
        dist.shard_model(value_head)
        kl_ctl = KLController(start["kl_coef"], cfg.ppo.kl_target, cfg.ppo.kl_horizon)
        dtype = model_dtype(policy_store.path(ref_version), settings, device)  # autocast's: bf16 where it pays
        rm_features = None
        if cfg.reward.backbone == "frozen":  # features are the reference's, at this layer, length and precision
            key = (f"v{ref_version}:{policy_store.manifest_sha256(ref_version)}:layer{nets.reward.layer}:tokens:"
                   f"{cfg.reward.max_length}:{dtype}")
            rm_features = FeatureCache.from_tensors(start["rm_features"], key)
        if dist.is_main:
            log.info("trainer ready: policy v%d, reference v%d, %s weights, %d rank(s) (%s), %d labels stored, "
                     "device %s, %s", version, ref_version, layout, dist.world, cfg.train.strategy, len(store.votes()),
                     device, str(dtype).removeprefix("torch."))
        return cls(settings, cfg, dist, policy_store, tokenizer, eos_token_ids(nets.reference.module, tokenizer), nets,
                   version, value_head, kl_ctl, start["lr_scale"], device, dtype, store, consumer, producer,
                   publisher, load_guard_set(cfg.gate.guard_set), rm_features)

    def close(self) -> None:
        if self.dist.is_main:
            self.consumer.close()
            self.producer.close(timeout=10)
            self.store.close()

    # ------------------------------------------------------------------ between rounds

    @staticmethod
    def reward_model_path(settings: Settings) -> Path:
        return settings.trainer_dir / "reward_model.safetensors"

    @staticmethod
    def rm_features_path(settings: Settings) -> Path:
        return settings.trainer_dir / "rm_features.safetensors"

    @staticmethod
    def value_head_path(settings: Settings) -> Path:
        return settings.trainer_dir / "value_head.safetensors"

    @property
    def rounds_path(self) -> Path:
        return self.settings.trainer_dir / "rounds.jsonl"

    @property
    def round(self) -> int:
        return self.store.get("round", 0)

    @property
    def label_watermark(self) -> int:
        """The vote sequence number the last round had seen: labels after it are 'new'."""
        return self.store.get("label_watermark", 0)

    def new_labels(self) -> int:
        return self.store.label_count(since_seq=self.label_watermark)

    def follow(self, latest: int) -> None:
        """Make `latest` (LATEST as rank 0 read it) the current policy if it moved since ours (sft, rollback)."""
        if latest != self.version:
            self.policy_store.verify(latest)
            self.nets.follow(self.policy_store, latest)
            if self.dist.is_main:
                log.info("policy store LATEST moved v%d -> v%d; training from v%d", self.version, latest, latest)
            self.version = latest

    def check_stop(self) -> None:
        """Raise RoundAborted on every rank if any rank was asked to stop (a collective: all ranks call it)."""
        if self.dist.any(self.stop.is_set()):
            raise RoundAborted("stop requested")



def _read(path: Path) -> dict[str, torch.Tensor] | None:
    return load_file(path) if path.exists() else None


def _check_divisible(cfg: TrainerConfig, world: int) -> None:
    """Batches split evenly across ranks: every rank runs as many steps as the others."""
    sizes = {"ppo.rollout_prompts": cfg.ppo.rollout_prompts, "ppo.minibatch_size": cfg.ppo.minibatch_size,
             "reward.batch_size": cfg.reward.batch_size, "direct.batch_size": cfg.direct.batch_size}
    uneven = [f"{k}={v}" for k, v in sizes.items() if v % world]
    if uneven:
        raise ValueError(f"with {world} ranks, {', '.join(uneven)} must be multiples of {world}")
