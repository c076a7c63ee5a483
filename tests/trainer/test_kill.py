"""Kill -9 the trainer at named points while it consumes, trains and publishes; restart; nothing is lost or doubled.

Each run is `rlhf train --once` as a subprocess on a real broker. RLHF_TRAINER_PAUSE_AT
makes it stop at a kill point (trainer/killpoints.py) and say so; the test then SIGKILLs
it. The traffic has everything that can go wrong: votes before their responses, the same
event sent twice, votes changed, votes withdrawn, several users per response. At the end
the stored labels must equal what the produced votes say, exactly, and the policy store
must hold only complete versions, each announced on Kafka.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

from rlhf_loop.core.contracts import Feedback, PolicyUpdate, feedback_id_for
from rlhf_loop.core.policy_store import PolicyStore
from rlhf_loop.core.tinylm import QUESTIONS, SUBJECTS, TONES, make_answer
from rlhf_loop.trainer.store import LabelStore
from trainer_helpers import TrainerProcess, consume_all, interaction, produce, records, trainer_env

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


class Traffic:
    """Interactions and feedback with known outcome: `expected` is feedback_id -> final rating."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.clock = 0
        self.expected: dict[str, float] = {}

    def vote(self, rid: str, user: str, rating: int | None) -> Feedback:
        self.clock += 1
        fb = Feedback(feedback_id=feedback_id_for(rid, 0, None, user), response_id=rid, rating=rating, user=user,
                      deleted=rating is None, ts=T0 + timedelta(seconds=self.clock))
        if rating is None:
            self.expected.pop(fb.feedback_id, None)
        else:
            self.expected[fb.feedback_id] = float(rating)
        return fb

    def batch(self, settings, n: int) -> list[tuple[str, bytes, bytes]]:
        out = []
        for i in range(n):
            subject = self.rng.choice(list(SUBJECTS))
            messages = [{"role": "user", "content": self.rng.choice(QUESTIONS).replace("{s}", subject)}]
            it = interaction(self.rng, messages, make_answer(self.rng, subject, self.rng.choice(list(TONES)), False))
            first = self.vote(it.response_id, "alice", self.rng.choice([1, -1]))
            events = [first]
            if i % 3 == 0:
                events.append(self.vote(it.response_id, "bob", self.rng.choice([1, -1])))
            if i % 5 == 0:
                events.append(first)  # the same event twice (a producer retry)
            if i % 7 == 0:
                events.append(self.vote(it.response_id, "alice", -(first.rating)))  # changed her mind
            if i % 6 == 0:
                events.append(self.vote(it.response_id, "bob", None))  # bob withdraws
            fb = records(settings, feedback=events)
            it_rec = records(settings, interactions=[it])
            out.extend(fb + it_rec if i % 4 == 0 else it_rec + fb)  # every 4th: votes before the response
        return out


def run_trainer(env: dict, log, pause_at: str | None = None) -> str:
    """`rlhf train --once`; with pause_at, SIGKILL it as soon as it reports reaching that point."""
    proc = TrainerProcess({**env, **({"RLHF_TRAINER_PAUSE_AT": pause_at} if pause_at else {})}, log, "--once")
    try:
        if pause_at:
            proc.wait_for(lambda line: line.startswith(f"PAUSED AT {pause_at} ") or line.startswith("round "))
            assert proc.seen[-1].startswith("PAUSED AT"), f"finished without reaching {pause_at}: {proc.seen}"
        else:
            proc.wait_for(lambda line: line.startswith("round "))  # the summary line: the round is done
            assert proc.proc.wait(60) == 0
    finally:
        proc.kill()
    return "".join(proc.seen)


def test_sigkill_anywhere_loses_nothing_and_counts_nothing_twice(settings, base_model_dir, tmp_path):
    env = trainer_env(settings, base_model_dir)
    traffic = Traffic(seed=0)
    with open(tmp_path / "trainer.log", "w") as log:
        produce(settings, traffic.batch(settings, 60))
        run_trainer(env, log, "consume:applied")  # mid-transaction: this poll's rows vanish
        run_trainer(env, log, "consume:stored")  # stored, offsets not committed: redelivered next time
        produce(settings, traffic.batch(settings, 40))
        run_trainer(env, log, "round:trained")  # everything consumed, PPO done, nothing published
        run_trainer(env, log, "publish:staged")  # version files in tmp/, not renamed
        produce(settings, traffic.batch(settings, 20))
        run_trainer(env, log, "publish:written")  # version 1 complete + LATEST, not announced
        final = run_trainer(env, log)  # recovers (announces v1), consumes the rest, publishes v2

    store = LabelStore(settings.trainer_dir / "labels.sqlite", late_vote_window_s=3600, dedupe_window_s=3600,
                       prompt_pool_size=100)
    assert store.votes() == traffic.expected  # none lost, none doubled, upserts and withdrawals honoured
    assert sum(e.n_votes for e in store.examples()) == len(traffic.expected)
    assert store.pending_votes() == 0
    store.close()

    policy_store = PolicyStore(settings.policy_dir)
    assert policy_store.versions() == [0, 1, 2] and policy_store.latest() == 2, final
    for v in policy_store.versions():
        policy_store.verify(v)
    assert policy_store.manifest(2).parent_version == 1
    leftovers = list(policy_store.tmp_dir.iterdir())
    assert leftovers, "the publish:staged kill should have left a staging dir behind"
    assert all(not p.name[1:].isdigit() for p in leftovers)  # staging names never look like versions
    updates = [PolicyUpdate.model_validate_json(v) for v in
               consume_all(settings, settings.topic_policy_updates, "test-updates", expect=2)]
    assert [u.version for u in updates] == [1, 2]
    assert all(u.files == policy_store.manifest(u.version).files for u in updates)
