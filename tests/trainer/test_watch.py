"""The live-approval watch: a promoted version the users like less is rolled back, with no operator.

The scenario: users like cheerful answers, but a brigade's votes (every vote flipped) teach the
trainer the opposite, and the round promotes a gloomier version v1: its reward model agrees with
the votes it saw, so every offline check passes. Then the real users vote on what v1 and v0 say.
The watch (trainer/watch.py, called by the continuous loop after every poll) must move LATEST back
to v0 within the votes its error rates imply, record why, announce it, and train on from v0.
"""

from __future__ import annotations

import json
import math

import pytest

from rlhf_loop.core.contracts import PolicyUpdate
from rlhf_loop.trainer import watch
from rlhf_loop.trainer.config import TrainerConfig, WatchConfig
from rlhf_loop.trainer.round import run_round
from rlhf_loop.trainer.state import TrainerState
from trainer_helpers import consume_all, produce, records, sample_interactions, votes_for


def test_sprt_by_hand():
    cfg = WatchConfig()  # delta 0.1, alpha 0.05, beta 0.1
    upper, lower = math.log(0.9 / 0.05), math.log(0.1 / 0.95)
    # p0 = 0.6, p1 = 0.5: each down adds log(0.5/0.4) = 0.2231, each up adds log(0.5/0.6) = -0.1823
    assert watch.sprt(0, 12, 0.6, cfg)[0] == "watching"  # 12 x 0.2231 = 2.678 < 2.890
    decision, llr, u, l = watch.sprt(0, 13, 0.6, cfg)
    assert decision == "roll back" and llr == pytest.approx(13 * math.log(0.5 / 0.4)) and (u, l) == (upper, lower)
    assert watch.sprt(13, 0, 0.6, cfg)[0] == "keep"  # 13 x -0.1823 = -2.37 <= -2.251
    # Wald's expected sample size at a true approval of 0.2: 2.890 / (0.2 x -0.1823 + 0.8 x 0.2231) = 20.3 votes
    assert watch.expected_votes(0.6, 0.2, cfg) == pytest.approx(2.890 / (0.2 * -0.1823 + 0.8 * 0.2231), rel=1e-3)


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
        parent = sum(v.rating > 0 for v in votes_for(v0, taste="cheerful", noise=0.1, seed=2)) / len(v0)
        child = sum(v.rating > 0 for v in v1_votes) / len(v1)
        assert child < parent - 0.1, (parent, child)  # users like v1 less
        bound = 3 * watch.expected_votes(parent, child, cfg.watch)  # Wald's expected votes, with room for noise
        verdict, cast = None, 0
        for i in range(0, len(v1), 10):
            produce(settings, records(settings, v1[i:i + 10], v1_votes[i:i + 10]))
            cast += 10
            while state.consumer.poll().records:
                pass
            verdict = watch.check(state)
            if verdict is not None and verdict.decision != "watching":
                break
        assert verdict is not None and verdict.decision == "roll back", verdict
        assert cast <= bound, (cast, bound)

        # 3. LATEST is back on v0, the store says why, the replicas were told, and training goes on from v0
        assert state.policy_store.latest() == 0
        rolled = state.policy_store.rollbacks()[1]
        assert rolled["to"] == 0 and "SPRT" in rolled["reason"]
        updates = [PolicyUpdate.model_validate_json(v) for v in
                   consume_all(settings, settings.topic_policy_updates, "test-watch", expect=2)]
        assert [(u.version, u.rollback_of) for u in updates] == [(1, None), (0, 1)]
        assert watch.check(state) is None  # decided: the rolled-back version is not judged again
        report = run_round(state, progress=False)
        assert report.version_before == 0 and state.version in (0, 2) and state.policy_store.latest() != 1
    finally:
        state.close()
    rounds = [json.loads(x) for x in (settings.trainer_dir / "rounds.jsonl").read_text().splitlines()]
    assert rounds[-1]["version_before"] == 0
