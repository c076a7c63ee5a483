"""Publishing a promoted policy: policy store version (DESIGN.md layout), then a PolicyUpdate on Kafka.

The order makes a crash at any point safe:
  1. record the intent (the version number) in the trainer's SQLite store;
  2. PolicyStore.write: save_pretrained (safetensors) + tokenizer into tmp/, manifest with
     sha256 of every file, rename into versions/, then LATEST replaced atomically;
  3. send the PolicyUpdate (acks=all) and wait for the broker's ack;
  4. clear the intent.
A crash in 2 leaves at most a tmp/ leftover (never a version); after 2 the version is
complete, and `recover()` at the next start finishes 2 (LATEST) and 3 for it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

from kafka import KafkaProducer

from rlhf_loop.core.contracts import PolicyUpdate, Settings
from rlhf_loop.core.policy_store import PolicyStore
from rlhf_loop.trainer.killpoints import killpoint
from rlhf_loop.trainer.store import LabelStore

log = logging.getLogger(__name__)

STALE_TMP_S = 3600.0  # staging dirs older than this belong to dead writers


class Publisher:
    def __init__(self, settings: Settings, policy_store: PolicyStore, store: LabelStore, producer: KafkaProducer, *,
                 name: str):
        self.settings = settings
        self.policy_store = policy_store
        self.store = store
        self.producer = producer
        self.intent_key = f"{name}:publish_intent"  # `rlhf train` and `rlhf sft` each finish their own

    def publish(self, save: Callable[[Path], None], *, parent_version: int, base_version: int | None = None,
                metrics: dict[str, float]) -> PolicyUpdate:
        """Write the next version with `save(dir)` (a checkpoint, or an adapter over `base_version`),
        move LATEST, announce it. Returns the announcement."""
        metrics = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}  # JSON has no nan

        def stage(d: Path) -> None:
            save(d)
            killpoint("publish:staged")

        for _ in range(3):  # another writer (rlhf sft) may take the number first
            version = max(self.policy_store.versions(), default=0) + 1
            self.store.set(self.intent_key, version)
            try:
                self.policy_store.write(version, stage, parent_version=parent_version, metrics=metrics,
                                    base_version=base_version)
                break
            except FileExistsError:
                log.warning("policy version %d was written by someone else; taking the next number", version)
        else:
            raise RuntimeError("could not claim a policy version number after 3 tries")
        killpoint("publish:written")
        update = self.announce(version)
        self.store.set(self.intent_key, None)
        return update

    def announce(self, version: int, rollback_of: int | None = None) -> PolicyUpdate:
        """A PolicyUpdate for `version` (or for the move back to it from `rollback_of`), acked by Kafka."""
        manifest = self.policy_store.manifest(version)
        update = PolicyUpdate(version=version, parent_version=manifest.parent_version,
                              base_version=manifest.base_version, rollback_of=rollback_of,
                              uri=str(self.policy_store.path(version)), files=manifest.files, metrics=manifest.metrics)
        # one key: every update lands in one partition, so replicas see versions in order
        self.producer.send(self.settings.topic_policy_updates, key=b"policy", value=update.to_bytes()).get(timeout=30)
        return update

    def recover(self) -> PolicyUpdate | None:
        """Finish a publish that a crash interrupted (see the module docstring); clean stale tmp/."""
        self.policy_store.clean_tmp(older_than_s=STALE_TMP_S)
        version = self.store.get(self.intent_key)
        if version is None:
            return None
        if not self.policy_store.path(version).is_dir():  # died before the rename: nothing was published
            self.store.set(self.intent_key, None)
            return None
        self.policy_store.verify(version)
        if (self.policy_store.latest() or 0) < version:
            self.policy_store.set_latest(version)
        log.info("re-announcing policy version %d after an interrupted publish", version)
        update = self.announce(version)
        self.store.set(self.intent_key, None)
        return update
