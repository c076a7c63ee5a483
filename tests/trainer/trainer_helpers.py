"""Helpers for the trainer tests: traffic whose taste is known, producing it, reading topics back."""

from __future__ import annotations

import random

import torch

from rlhf_loop.core.contracts import Feedback, Interaction, Message, Sampling, Settings, feedback_id_for
from rlhf_loop.core.tastes import TASTES
from rlhf_loop.core.tinylm import QUESTIONS, SUBJECTS


def response_id(rng: random.Random) -> str:
    """An id shaped like the service's (the trainer does not check the HMAC tag), from a seeded rng
    so the reward model's held-out split (a hash of the id) is the same in every run."""
    return f"chatcmpl-{rng.getrandbits(96):024x}-{rng.getrandbits(96):024x}"


def interaction(rng: random.Random, messages: list[dict], completion: str, token_ids: list[int] = (0,)) -> Interaction:
    return Interaction(
        response_id=response_id(rng), policy_version=0, model="rlhf-policy",
        messages=[Message(**m) for m in messages], prompt_token_ids=[0], completion=completion,
        completion_token_ids=list(token_ids), finish_reason="stop",
        sampling=Sampling(temperature=1.0, top_p=1.0, max_tokens=48), user="app",
    )


def prompts(n: int, seed: int) -> list[list[dict]]:
    """n chat prompts like the embedded model's users ask (12 subjects x 8 questions)."""
    rng = random.Random(seed)
    return [[{"role": "user", "content": rng.choice(QUESTIONS).replace("{s}", rng.choice(list(SUBJECTS)))}]
            for _ in range(n)]


def sample_interactions(model_dir: str, n: int, *, seed: int, max_new_tokens: int = 48) -> list[Interaction]:
    """n interactions answered by the model in `model_dir` (what the service would log)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_loop.trainer.rollout import decode, encode_prompts, left_pad, row_seeds, sample

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rng = random.Random(seed)
    out = []
    ps = prompts(n, seed)
    for i in range(0, n, 64):
        chunk = ps[i:i + 64]
        ids = encode_prompts(tok, chunk, 512)
        q, qm = left_pad(ids, tok.pad_token_id, torch.device("cpu"))
        r, rm = sample(model, q, qm, max_new_tokens=max_new_tokens, temperature=1.0, eos_ids=[tok.eos_token_id],
                       pad_id=tok.pad_token_id, seeds=row_seeds(seed, rows=range(i, i + len(chunk))))
        for p, text, row, mask in zip(chunk, decode(tok, r, rm), r, rm):
            out.append(interaction(rng, p, text, row[mask].tolist()))
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


# ---------------------------------------------------------------------------- the trainer as a process

SMALL_ROUND = {  # a round of a few seconds; the gate always promotes so publishing is exercised
    "RLHF_REWARD_MAX_STEPS": "3", "RLHF_PPO_ROLLOUT_PROMPTS": "8", "RLHF_PPO_MINIBATCH_SIZE": "8",
    "RLHF_PPO_ROLLOUT_BATCHES": "1", "RLHF_PPO_PPO_EPOCHS": "1", "RLHF_PPO_MAX_NEW_TOKENS": "12",
    "RLHF_GATE_EVAL_RESPONSES": "8", "RLHF_GATE_MIN_REWARD_GAIN": "-1e9", "RLHF_GATE_MAX_KL": "1e9",
    "RLHF_GATE_MIN_LENGTH_RATIO": "0", "RLHF_GATE_MAX_LENGTH_RATIO": "0", "RLHF_GATE_MIN_DISTINCT_RATIO": "0",
    "RLHF_GATE_GUARD_SET": "none", "RLHF_GATE_MIN_RM_AUROC": "0", "RLHF_GATE_MAX_RM_APPROVAL_GAP": "0",
    "RLHF_CONSUMER_MAX_POLL_RECORDS": "25",
}


def trainer_env(settings: Settings, base_model_dir: str, **extra: str) -> dict[str, str]:
    """Environment for `rlhf train` on the test's broker and state dir, with SMALL_ROUND sizes."""
    import os

    return {**os.environ, **SMALL_ROUND, "RLHF_STATE_DIR": str(settings.state_dir), "RLHF_MODEL": base_model_dir,
            "RLHF_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers, "RLHF_DEVICE": "cpu",
            "RLHF_TOPIC_PARTITIONS": str(settings.topic_partitions), "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


class TrainerProcess:
    """`rlhf train ARGS` as a subprocess whose stdout lines can be awaited (stderr goes to `log`)."""

    def __init__(self, env: dict[str, str], log, *args: str):
        import queue
        import subprocess
        import sys
        import threading

        self.proc = subprocess.Popen([sys.executable, "-m", "rlhf_loop", "train", "--no-progress", "--threads", "1",
                                      *args], env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.proc.stdout], daemon=True).start()

    def wait_for(self, predicate, timeout: float = 240.0) -> str:
        """The first new stdout line for which predicate(line) holds."""
        import queue

        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no matching line for {timeout}s; stdout so far: {''.join(self.seen)}") from None
            self.seen.append(line)
            if predicate(line):
                return line

    def kill(self) -> None:
        """SIGKILL (and reap) if still running."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def rounds_on(state, settings: Settings, interactions: list[Interaction], votes: list[Feedback], *, rounds: int,
              per_round: int, until=None) -> list:
    """`rounds` rounds, each after the next `per_round` interactions and votes went through the
    broker; `until(state)` true before a round stops early (as cli.loop does once the KL budget
    is spent)."""
    from rlhf_loop.trainer.round import run_round

    reports = []
    for r in range(rounds):
        if until is not None and until(state):
            break
        batch = slice(r * per_round, (r + 1) * per_round)
        produce(settings, records(settings, interactions[batch], votes[batch]))
        report = run_round(state, progress=False)
        for _ in range(5):  # on a loaded machine the consumer's first group join can outlast a round's poll
            if report.labels:
                break
            report = run_round(state, progress=False)
        reports.append(report)
    return reports
