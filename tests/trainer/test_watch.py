"""The live-approval watch: a promoted version the users like less is rolled back, with no operator.

By hand: the test's looks, bounds and z statistic (trainer/watch.py). With real stores and a real
broker: every promoted version is judged against its own parent, several at once, a superseded one
too; rolling back an ancestor of LATEST takes LATEST back to that ancestor's parent. End to end:
users like cheerful answers, but a brigade's votes (every vote flipped) teach the trainer the
opposite, and the round promotes a gloomier version v1: its reward model agrees with the votes it
saw, so every offline check passes. Then the real users vote on what v1 and v0 say. The watch
(called by the continuous loop after every poll) must move LATEST back to v0, record why, announce
it, and train on from v0. The rates (false rollbacks, votes to catch a worse version) are
bench/rollback_sim.py's.
"""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
from kafka import KafkaProducer

from rlhf_loop.core.contracts import Feedback, PolicyUpdate
from rlhf_loop.core.policy_store import PolicyStore
from rlhf_loop.trainer import watch
from rlhf_loop.trainer.config import TrainerConfig, WatchConfig
from rlhf_loop.trainer.publish import Publisher
from rlhf_loop.trainer.round import run_round
from rlhf_loop.trainer.state import TrainerState
from rlhf_loop.trainer.store import LabelStore
from trainer_helpers import consume_all, interaction, produce, records, sample_interactions, votes_for


def test_looks_bounds_and_z_by_hand():
    cfg = WatchConfig()  # alpha 0.05, looks at 50, 100, 200, 400 votes
    looks = watch.schedule(cfg)
    assert [x.votes for x in looks] == [50, 100, 200, 400]
    # alpha_k = 0.05 x (n_k - n_{k-1}) / 400: 50/400, 50/400, 100/400, 200/400 of it, 0.05 in all
    assert [x.alpha for x in looks] == pytest.approx([0.00625, 0.00625, 0.0125, 0.025])
    assert sum(x.alpha for x in looks) == pytest.approx(0.05)
    assert [x.bound for x in looks] == pytest.approx([2.4977, 2.4977, 2.2414, 1.9600], abs=1e-4)  # Phi^-1(1 - alpha_k)
    # 20/50 against the parent's 70/100: q = 90/150 = 0.6, se = sqrt(0.24 x (1/50 + 1/100)) = 0.084853
    assert watch.z_statistic(20, 30, 70, 30) == pytest.approx(-0.3 / 0.084853, rel=1e-4)  # -3.54
    # 30/50 against 70/100: q = 2/3, se = sqrt(2/9 x 0.03) = 0.081650
    assert watch.z_statistic(30, 20, 70, 30) == pytest.approx(-0.1 / 0.081650, rel=1e-4)  # -1.22
    assert watch.z_statistic(0, 50, 0, 100) == 0.0  # every vote agrees: no evidence either way
    assert watch.decide(-3.54, looks[0], cfg) == "roll back"
    assert watch.decide(-2.49, looks[0], cfg) == "watching"  # not past 2.4977 at the first look ...
    assert watch.decide(-2.0, looks[3], cfg) == "roll back"  # ... past 1.96 at the last
    assert watch.decide(-1.22, looks[3], cfg) == "keep"  # the last look: no significant drop, kept
    # a look waits for its votes and for the parent's min_parent_votes (20); a poll past several takes the last
    assert watch.next_look(49, 100, 0, cfg) is None and watch.next_look(50, 19, 0, cfg) is None
    assert watch.next_look(50, 20, 0, cfg).k == 1 and watch.next_look(99, 20, 1, cfg) is None
    assert watch.next_look(450, 100, 1, cfg).k == 4


# ---------------------------------------------------------------------------- several watches, real stores


def _store_versions(policy_store: PolicyStore, parents: dict[int, int | None]) -> None:
    """Versions with these parents (dummy files: the watch reads manifests, never weights)."""
    for v, parent in parents.items():
        policy_store.write(v, lambda d, v=v: (d / "config.json").write_text(json.dumps({"v": v})),
                           parent_version=parent)


def _vote(store: LabelStore, rng: random.Random, version: int, ups: int, downs: int) -> None:
    """`ups` + `downs` answers by `version`, each with one vote."""
    events = []
    for i in range(ups + downs):
        it = interaction(rng, [{"role": "user", "content": "Tell me about cats."}], "Cats nap.").model_copy(
            update={"policy_version": version})
        events += [it, Feedback(feedback_id=f"f-{it.response_id}", response_id=it.response_id,
                                rating=1 if i < ups else -1, user=f"u{i % 16}")]
    store.apply_batch(events, {})


@pytest.fixture
def watched(settings):
    """The watch's view of a trainer: real policy store, label store and publisher on the test's broker."""
    policy_store = PolicyStore(settings.policy_dir)
    store = LabelStore(settings.trainer_dir / "labels.sqlite", late_vote_window_s=3600, dedupe_window_s=3600,
                       prompt_pool_size=100)
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, acks="all")
    state = SimpleNamespace(cfg=TrainerConfig(), policy_store=policy_store, store=store,
                            publisher=Publisher(settings, policy_store, store, producer, name="trainer"))
    yield state
    producer.close()
    store.close()


def test_every_promoted_version_is_judged_and_an_ancestors_rollback_takes_latest_back(settings, watched):
    """v0 -> v1 (as good as v0) -> v2 (users like it less than v1) -> v3 = LATEST, built on v2. The
    rounds promoted v2 and v3 before v1's or v2's test decided; both are judged all the same."""
    state, rng = watched, random.Random(0)
    _store_versions(state.policy_store, {0: None, 1: 0, 2: 1, 3: 2})
    _vote(state.store, rng, 0, 70, 30)  # 0.70
    _vote(state.store, rng, 1, 35, 15)  # 0.70 over 50: look 1, no drop
    _vote(state.store, rng, 2, 15, 35)  # 0.30 over 50 against v1's 0.70: z = -4.0 at look 1
    _vote(state.store, rng, 3, 8, 2)  # 10 votes: no look yet

    verdicts = watch.check(state)
    assert [(v.version, v.parent, v.decision, v.look.k) for v in verdicts] == [(1, 0, "watching", 1),
                                                                              (2, 1, "roll back", 1)]
    assert verdicts[1].z == pytest.approx(-4.0)
    # v2 was an ancestor of LATEST (v3): LATEST goes back to v2's parent, v3 (built on v2) with it
    assert state.policy_store.latest() == 1
    record = state.policy_store.rollbacks()
    assert set(record) == {2} and record[2]["to"] == 1
    assert "z -4.00 <= -2.50 at look 1 of 4" in record[2]["reason"] and "LATEST v3 was built on it (v3)" in record[2]["reason"]
    update = PolicyUpdate.model_validate_json(consume_all(settings, settings.topic_policy_updates, "t-watch")[-1])
    assert (update.version, update.rollback_of) == (1, 3)  # replicas serving v3 (LATEST until now) move to v1
    assert state.store.get("watch:2") == "rolled back" and state.store.get("watch_looks:1") == 1

    # v3 is off LATEST's line now: never judged, however its votes go; nothing new for v1 yet
    _vote(state.store, rng, 3, 0, 60)
    assert watch.check(state) == []
    # v1 reaches 400 votes in one poll: its last look (the ones passed over are skipped) keeps it
    _vote(state.store, rng, 1, 245, 105)
    (kept,) = watch.check(state)
    assert (kept.version, kept.decision, kept.look.k, kept.votes) == (1, "keep", 4, 400)
    assert state.store.get("watch:1") == "kept" and watch.check(state) == []
    assert state.policy_store.latest() == 1 and set(state.policy_store.rollbacks()) == {2}


def test_a_rollback_of_latest_itself_moves_only_latest(settings, watched):
    state, rng = watched, random.Random(1)
    _store_versions(state.policy_store, {0: None, 1: 0, 2: 1})
    _vote(state.store, rng, 0, 60, 40)
    _vote(state.store, rng, 1, 60, 40)  # 0.60 over 100, as v0: looks 1-2 at once, the second taken
    _vote(state.store, rng, 2, 10, 40)  # 0.20 over 50 against 0.60
    verdicts = watch.check(state)
    assert [(v.version, v.decision, v.look.k) for v in verdicts] == [(1, "watching", 2), (2, "roll back", 1)]
    assert state.policy_store.latest() == 1 and "built on it" not in state.policy_store.rollbacks()[2]["reason"]
    update = PolicyUpdate.model_validate_json(consume_all(settings, settings.topic_policy_updates, "t-watch")[-1])
    assert (update.version, update.rollback_of) == (1, 2)


# ---------------------------------------------------------------------------- end to end


def test_a_version_the_users_like_less_is_rolled_back_within_the_stated_votes(settings, base_model_dir):
    cfg = TrainerConfig().replace(gate={"min_rm_auroc": 0.0})  # a few dozen held-out labels: judge on its merits
    state = TrainerState.open(settings, cfg)
    try:
        # 1. a brigade's flipped votes on the base model's answers: the round learns to be less cheerful
        brigade = sample_interactions(base_model_dir, 160, seed=11)
        produce(settings, records(settings, brigade, votes_for(brigade, taste="cheerful", noise=1.0, seed=1,
                                                               user="brigade")))
        report = run_round(state, progress=False)
        assert report.promoted and state.policy_store.latest() == 1, report.reason

        # 2. the real users vote on what v0 said (the parent's approval), then on what v1 says
        v0 = sample_interactions(base_model_dir, 80, seed=12)
        produce(settings, records(settings, v0, votes_for(v0, taste="cheerful", noise=0.1, seed=2, user="users")))
        v1 = [it.model_copy(update={"policy_version": 1}) for it in
              sample_interactions(str(state.policy_store.path(1)), 200, seed=13)]
        v1_votes = votes_for(v1, taste="cheerful", noise=0.1, seed=3, user="users")
        verdicts, cast = [], 0
        for i in range(0, len(v1), 10):
            produce(settings, records(settings, v1[i:i + 10], v1_votes[i:i + 10]))
            cast += 10
            while state.consumer.poll().records:
                pass
            verdicts = watch.check(state)
            if any(v.decision != "watching" for v in verdicts):
                break
        assert [v.decision for v in verdicts] == ["roll back"], verdicts
        verdict = verdicts[0]
        assert verdict.approval < verdict.parent_approval - 0.1, verdict  # users like v1 less than all of v0's votes
        assert cast <= 200 and verdict.look.votes <= cast, (cast, verdict)  # by the third look (200 votes)

        # 3. LATEST is back on v0, the store says why, the replicas were told, and training goes on from v0
        assert state.policy_store.latest() == 0
        rolled = state.policy_store.rollbacks()[1]
        assert rolled["to"] == 0 and f"at look {verdict.look.k} of 4" in rolled["reason"]
        updates = [PolicyUpdate.model_validate_json(v) for v in
                   consume_all(settings, settings.topic_policy_updates, "test-watch", expect=2)]
        assert [(u.version, u.rollback_of) for u in updates] == [(1, None), (0, 1)]
        assert watch.check(state) == []  # decided: the rolled-back version is not judged again
        report = run_round(state, progress=False)
        assert report.version_before == 0 and state.version in (0, 2) and state.policy_store.latest() != 1
    finally:
        state.close()
    rounds = [json.loads(x) for x in (settings.trainer_dir / "rounds.jsonl").read_text().splitlines()]
    assert rounds[-1]["version_before"] == 0
