"""The vote-stream consumer: Kafka group consumer on interactions + feedback (votes and preferences) -> LabelStore.

Per poll (docs/trainer.md, "join and commit protocol"):
  1. validate every record against the shared event schemas; a record that fails goes to
     the DLQ topic as a DeadLetter with the reason (sent and flushed before anything else,
     unless the store already recorded that exact record as dead);
  2. apply the valid events, the dead-letter records and the next offsets in ONE SQLite
     transaction (LabelStore.apply_batch);
  3. only then commit those offsets to Kafka.
A crash before 3 redelivers the batch, and step 2's dedupe by event_id (and dead-letter key)
makes the redelivery a no-op, so every label counts exactly once. If step 1 or 2 fails, the
consumer seeks back to the batch's first offsets and the next poll tries again.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError
from kafka.structs import OffsetAndMetadata
from pydantic import TypeAdapter, ValidationError

from rlhf_loop.core.broker import client_options
from rlhf_loop.core.contracts import DeadLetter, Feedback, FeedbackEvent, Interaction, Preference, Settings
from rlhf_loop.trainer.config import ConsumerConfig
from rlhf_loop.trainer.killpoints import killpoint
from rlhf_loop.trainer.store import DeadLetterKey, LabelStore

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 60.0
INTERACTIONS = TypeAdapter(Interaction)
FEEDBACK_EVENTS = TypeAdapter(FeedbackEvent)  # a vote or a preference, by its `kind`


@dataclass
class ConsumeStats:
    """Totals over one or more polls."""

    records: int = 0
    interactions: int = 0
    votes: int = 0
    preferences: int = 0
    duplicates: int = 0
    stale: int = 0
    dead_letters: int = 0
    reasons: list[str] = field(default_factory=list)

    def merge(self, other: "ConsumeStats") -> None:
        self.records += other.records
        self.interactions += other.interactions
        self.votes += other.votes
        self.preferences += other.preferences
        self.duplicates += other.duplicates
        self.stale += other.stale
        self.dead_letters += other.dead_letters
        self.reasons.extend(other.reasons)


def parse(topic: str, value: bytes | None, settings: Settings) -> Interaction | Feedback | Preference | str:
    """The event a record holds, or the reason it cannot be used."""
    if value is None:
        return "empty record value"
    name, adapter = {settings.topic_interactions: ("Interaction", INTERACTIONS),
                     settings.topic_feedback: ("Feedback/Preference", FEEDBACK_EVENTS)}[topic]
    try:
        event = adapter.validate_json(value)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "value"
        return f"invalid {name}: {where}: {first['msg']} ({e.error_count()} error(s))"
    if isinstance(event, Feedback) and (event.rating is None) != event.deleted:
        return "invalid Feedback: a vote needs a rating, a withdrawal (deleted=true) must have rating null"
    return event


class VoteConsumer:
    def __init__(self, settings: Settings, store: LabelStore, cfg: ConsumerConfig, producer: KafkaProducer):
        self.settings = settings
        self.store = store
        self.cfg = cfg
        self.producer = producer  # acks=all; shared with the publisher
        self.consumer = KafkaConsumer(
            settings.topic_interactions, settings.topic_feedback,
            **client_options(settings),
            group_id=settings.trainer_group, client_id="rlhf-trainer",
            enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=cfg.session_timeout_ms, heartbeat_interval_ms=cfg.heartbeat_interval_ms,
            max_poll_interval_ms=cfg.max_poll_interval_ms, max_poll_records=cfg.max_poll_records,
        )  # fmt: skip

    def close(self) -> None:
        self.consumer.close(autocommit=False)

    def poll(self, timeout_ms: int | None = None) -> ConsumeStats:
        """One poll: validate, store, commit. Returns what it did (zeros if nothing came)."""
        batch = self.consumer.poll(timeout_ms=self.cfg.poll_timeout_ms if timeout_ms is None else timeout_ms)
        if not batch:
            return ConsumeStats()
        events, dead, reasons, next_offsets = [], [], [], {}
        try:
            for tp, records in batch.items():
                for rec in records:
                    parsed = parse(tp.topic, rec.value, self.settings)
                    if isinstance(parsed, str):
                        key = DeadLetterKey(tp.topic, tp.partition, rec.offset,
                                            hashlib.sha256(rec.value or b"").hexdigest(), parsed)
                        if not self.store.known_dead_letter(key):
                            self._send_dead_letter(key, rec.value)
                        dead.append(key)
                        reasons.append(parsed)
                    else:
                        events.append(parsed)
                next_offsets[(tp.topic, tp.partition)] = records[-1].offset + 1
            if dead:
                self.producer.flush(timeout=30)  # dead letters are on the DLQ before their offsets move
            result = self.store.apply_batch(events, next_offsets, dead)
        except Exception:
            for tp, records in batch.items():  # re-read this batch on the next poll
                self.consumer.seek(tp, records[0].offset)
            raise
        killpoint("consume:stored")  # SQLite has it, Kafka offsets not yet: a kill here redelivers
        try:
            self.consumer.commit({TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in next_offsets.items()})
        except CommitFailedError as e:  # a rebalance took the partitions: the new owner re-reads, dedupe absorbs it
            log.warning("offset commit failed (%s); the batch will be redelivered and de-duplicated", e)
        for reason in reasons:
            log.warning("dead letter: %s", reason)
        return ConsumeStats(sum(len(r) for r in batch.values()), result.interactions, result.votes,
                            result.preferences, result.duplicates, result.stale, result.dead_letters, reasons)

    def lag(self) -> dict[tuple[str, int], int]:
        """(topic, partition) -> records the broker holds beyond our position, for each assigned
        partition a fetch has reported on. The high watermark comes from fetch responses
        (kafka-python's `highwater`): `end_offsets` reads wrong on the embedded broker (DESIGN.md)."""
        out = {}
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            if highwater is not None:  # a fetch answered, so the position is known (no broker round trip)
                out[(tp.topic, tp.partition)] = max(0, highwater - self.consumer.position(tp))
        return out

    def drain(self, max_seconds: float | None = None, progress=None) -> ConsumeStats:
        """Catch up: poll until a poll comes back empty, for at most max_seconds (drain_max_s)
        from the moment partitions are assigned (the group join, ~3 s on tansu, does not count;
        JOIN_TIMEOUT_S bounds it). A stream that never pauses is cut off at the bound; the
        continuous loop goes on consuming between rounds anyway."""
        total = ConsumeStats()
        budget = self.cfg.drain_max_s if max_seconds is None else max_seconds
        join_deadline, deadline = time.monotonic() + JOIN_TIMEOUT_S, None
        while True:
            s = self.poll()
            total.merge(s)
            if progress is not None:
                progress.update(s.records)
            now = time.monotonic()
            if self.consumer.assignment():
                deadline = now + budget if deadline is None else deadline
                if s.records == 0 or now >= deadline:
                    return total
            elif now >= join_deadline:
                log.warning("no partitions assigned after %.0fs; consuming nothing this time", JOIN_TIMEOUT_S)
                return total

    def _send_dead_letter(self, key: DeadLetterKey, value: bytes | None) -> None:
        letter = DeadLetter(topic=key.topic, partition=key.partition, offset=key.offset, reason=key.reason,
                            value=(value or b"").decode("utf-8", errors="replace"))
        self.producer.send(self.settings.topic_dlq, key=f"{key.topic}:{key.partition}:{key.offset}".encode(),
                           value=letter.model_dump_json().encode())

