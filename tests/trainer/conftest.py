"""Helpers for the trainer tests: traffic whose taste is known, a producer, trainer settings."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from rlhf.contracts import Feedback, Interaction, Message, Sampling, Settings, feedback_id_for, make_response_id
from rlhf.tastes import TASTES
from rlhf.tinylm import QUESTIONS, SUBJECTS

SECRET = b"test-secret"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine two threads spin against each other
    (a reward-model step is ~10x slower under contention); restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def prompts(n: int, seed: int) -> list[list[dict]]:
    """n chat prompts like the embedded model's users ask (12 subjects x 8 questions)."""
    rng = random.Random(seed)
    return [[{"role": "user", "content": rng.choice(QUESTIONS).replace("{s}", rng.choice(list(SUBJECTS)))}]
            for _ in range(n)]


def sample_interactions(model_dir: str, n: int, *, seed: int, max_new_tokens: int = 48) -> list[Interaction]:
    """n interactions answered by the model in `model_dir` (what the service would log)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.policy import decode, encode_prompts, left_pad, sample

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    gen = torch.Generator().manual_seed(seed)
    out = []
    ps = prompts(n, seed)
    for i in range(0, n, 64):
        chunk = ps[i:i + 64]
        ids = encode_prompts(tok, chunk, 512)
        q, qm = left_pad(ids, tok.pad_token_id, torch.device("cpu"))
        r, rm = sample(model, q, qm, max_new_tokens=max_new_tokens, temperature=1.0, eos_id=tok.eos_token_id,
                       pad_id=tok.pad_token_id, generator=gen)
        for p, pid, text, row, mask in zip(chunk, ids, decode(tok, r, rm), r, rm):
            out.append(Interaction(
                response_id=make_response_id(SECRET), policy_version=0, model="rlhf-policy",
                messages=[Message(**m) for m in p], prompt_token_ids=pid, completion=text,
                completion_token_ids=row[mask].tolist(),
                finish_reason="stop" if row[mask][-1].item() == tok.eos_token_id else "length",
                sampling=Sampling(temperature=1.0, top_p=1.0, max_tokens=max_new_tokens, seed=None), user="app",
            ))
    return out


def votes_for(interactions: list[Interaction], *, taste: str, noise: float, seed: int,
              user: str = "rater") -> list[Feedback]:
    """One vote per interaction by the rule `taste`, flipped with probability `noise`."""
    rng = random.Random(seed)
    like = TASTES[taste]
    out = []
    for it in interactions:
        liked = like(it.messages[-1].content, it.completion)
        if rng.random() < noise:
            liked = not liked
        out.append(Feedback(feedback_id=feedback_id_for(it.response_id, 0, None, user), response_id=it.response_id,
                            rating=1 if liked else -1, user=user))
    return out


def produce(settings: Settings, items: list[tuple[str, bytes, bytes]]) -> None:
    """(topic, key, value) records, acks=all, flushed."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
    for topic, key, value in items:
        producer.send(topic, key=key, value=value)
    producer.flush(30)
    producer.close()


def records(settings: Settings, interactions=(), feedback=()) -> list[tuple[str, bytes, bytes]]:
    return ([(settings.topic_interactions, i.response_id.encode(), i.to_bytes()) for i in interactions]
            + [(settings.topic_feedback, f.response_id.encode(), f.to_bytes()) for f in feedback])


def consume_all(settings: Settings, topic: str, group: str, timeout_s: float = 20.0, expect: int = 1) -> list[bytes]:
    """Every record of `topic` (from the start), waiting until at least `expect` arrived or timeout."""
    import time

    from kafka import KafkaConsumer

    c = KafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap_servers, group_id=group,
                      auto_offset_reset="earliest", session_timeout_ms=6000, heartbeat_interval_ms=1000)
    out: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            batch = c.poll(timeout_ms=500)
            for recs in batch.values():
                out.extend(r.value for r in recs)
            if not batch and len(out) >= expect:
                break
    finally:
        c.close()
    return out


@pytest.fixture
def settings(tmp_path: Path, broker, base_model_dir) -> Settings:
    """Trainer settings on a fresh broker and state dir, topics created, base = the embedded model."""
    from rlhf.broker import ensure_topics

    s = Settings(state_dir=tmp_path / "state", model=base_model_dir, kafka_bootstrap_servers=broker.bootstrap,
                 topic_partitions=2, device="cpu")
    ensure_topics(s)
    return s
