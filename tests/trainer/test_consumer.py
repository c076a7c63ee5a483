"""The vote consumer on a real broker: poison messages go to the DLQ, consumption goes on,
offsets are committed after the store, and a full redelivery changes nothing."""

from __future__ import annotations

import json
import random

from kafka import KafkaProducer, TopicPartition

from rlhf_loop.core.contracts import DeadLetter, Settings
from rlhf_loop.core.tinylm import make_answer
from rlhf_loop.trainer.config import ConsumerConfig
from rlhf_loop.trainer.consumer import VoteConsumer
from rlhf_loop.trainer.store import LabelStore
from trainer_helpers import consume_all, interaction, produce, records, votes_for


def open_consumer(settings: Settings, store: LabelStore) -> tuple[VoteConsumer, KafkaProducer]:
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
    return VoteConsumer(settings, store, ConsumerConfig(max_poll_records=4), producer), producer


def test_poison_messages_land_in_the_dlq_and_the_consumer_keeps_going(settings, tmp_path):
    rng = random.Random(0)
    good = [interaction(rng, [{"role": "user", "content": "Tell me about cats."}],
                        make_answer(rng, "cats", tone, False)) for tone in ("cheerful", "plain", "gloomy", "cheerful")]
    votes = votes_for(good, taste="cheerful", noise=0.0, seed=0)
    valid_interaction = json.loads(good[0].to_bytes())
    vote_without_rating = {**json.loads(votes[0].to_bytes()), "rating": None, "event_id": "6f1c2d3e-0000-4000-8000-000000000001"}
    poison = [
        (settings.topic_interactions, b"k", b"this is not json"),
        (settings.topic_interactions, b"k", b'{"kind": "interaction", "response_id": "x"}'),  # fields missing
        (settings.topic_feedback, b"k", b"\xff\xfe\x00 binary"),
        (settings.topic_feedback, b"k", json.dumps(vote_without_rating).encode()),  # a vote needs a rating
        (settings.topic_feedback, b"k", json.dumps(valid_interaction).encode()),  # an interaction on the feedback topic
        (settings.topic_interactions, b"k", None),  # a null record
    ]
    good_records = records(settings, good, votes)
    produce(settings, [r for pair in zip(good_records, poison + [None] * 2) for r in pair if r is not None])

    store = LabelStore(tmp_path / "labels.sqlite", late_vote_window_s=3600, dedupe_window_s=3600, prompt_pool_size=10)
    consumer, producer = open_consumer(settings, store)
    stats = consumer.drain(max_seconds=60)
    assert stats.records == len(good_records) + len(poison)
    assert (stats.interactions, stats.votes, stats.dead_letters) == (4, 4, len(poison))
    assert store.votes() == {v.feedback_id: float(v.rating) for v in votes}

    letters = [DeadLetter.model_validate_json(v) for v in consume_all(settings, settings.topic_dlq, "dlq-reader",
                                                                      expect=len(poison))]
    assert len(letters) == len(poison)
    reasons = " | ".join(sorted(d.reason for d in letters))
    for fragment in ("invalid Interaction", "invalid Feedback", "a vote needs a rating", "empty record value"):
        assert fragment in reasons
    assert {(d.topic, d.value) for d in letters} >= {(settings.topic_interactions, "this is not json")}
    assert all(d.offset >= 0 for d in letters)

    # offsets were committed after the store: Kafka's committed offsets equal the store's own record
    for (topic, partition), next_offset in store.consumed_offsets().items():
        assert consumer.consumer.committed(TopicPartition(topic, partition)) == next_offset
    consumer.close()

    # every record delivered again (a new group starts from the beginning, as after a crash
    # between the SQLite commit and the offset commit): nothing changes, nothing re-sent
    redelivery = settings.model_copy(update={"trainer_group": "another-group"})
    again, producer2 = open_consumer(redelivery, store)
    stats = again.drain(max_seconds=60)
    assert stats.records == len(good_records) + len(poison)
    assert (stats.interactions, stats.votes, stats.duplicates, stats.dead_letters) == (0, 0, 8, 0)
    assert store.votes() == {v.feedback_id: float(v.rating) for v in votes}
    again.close()
    assert len(consume_all(settings, settings.topic_dlq, "dlq-reader-2", expect=len(poison))) == len(poison)
    producer.close()
    producer2.close()
    store.close()
