"""Never promote on a reward model that cannot predict the votes (the gate's judge check).

Votes that are noise (each a coin flip, whatever the answer) leave the reward model at chance on
held-out labels. PPO would still find something to climb on it, and its candidates' "reward" would
beat the current policy's; the judge must see that the reward model cannot be trusted and let no
policy train on it, round after round, while the labels are stored and the reward model keeps
training. The judge's approval
gap, which needs 20 held-out labels on the serving version, is reported "not checked" until then.
"""

from __future__ import annotations

import random

import pytest

from rlhf_loop.trainer.config import TrainerConfig
from rlhf_loop.trainer.reward_model import is_heldout
from rlhf_loop.trainer.state import TrainerState
from trainer_helpers import rounds_on, sample_interactions

from rlhf_loop.core.contracts import Feedback, feedback_id_for


@pytest.mark.parametrize("backbone", ["tuned", "frozen"])
def test_a_reward_model_at_chance_promotes_nothing(settings, base_model_dir, backbone):
    interactions = sample_interactions(base_model_dir, 192, seed=21)
    rng = random.Random(5)
    noise = [Feedback(feedback_id=feedback_id_for(it.response_id, 0, None, "u"), response_id=it.response_id,
                      rating=rng.choice([1, -1]), user="u") for it in interactions]
    cfg = TrainerConfig().replace(reward={"max_steps": 12, "backbone": backbone}, gate={"eval_responses": 32})
    state = TrainerState.open(settings, cfg)
    try:
        reports = rounds_on(state, settings, interactions, noise, rounds=3, per_round=64)
    finally:
        state.close()
    assert [r.labels for r in reports] == [64, 128, 192]  # the labels are stored all the same
    assert not any(r.promoted for r in reports), [r.reason for r in reports]
    assert state.policy_store.versions() == [0]
    for r in reports:
        judge = r.checks["rm_auroc"]
        assert not judge["passed"] and judge["value"] < 0.6, judge
        assert "reward model cannot yet predict held-out votes" in r.reason
        if backbone == "frozen":  # the head's AUROC is cross-validated over every vote (reward.judge_folds)
            assert r.reward_model["heldout_up"] + r.reward_model["heldout_down"] == r.labels
            assert f"5-fold AUROC {r.reward_model['auroc']:.2f} on {r.labels} votes" in r.reason
        # asked before any policy trained: no rollouts, no training, no gate evaluation, no candidate
        assert not r.candidate and not {"rollout", "ppo", "gate"} & set(r.seconds), r.seconds
        assert "no candidate: reward model cannot yet predict" in r.summary()
    assert all(r.reward_model["steps"] > 0 for r in reports)  # it kept learning
    # the judge's other check needs 20 held-out labels on the serving version (v0 here, with no parents to
    # pool): the first round has fewer, and says so instead of leaving the check out
    heldout = [sum(is_heldout(it.response_id, cfg.reward.heldout_fraction) for it in interactions[:64 * k])
               for k in (1, 2, 3)]
    for r, n in zip(reports, heldout):
        gap = r.checks["rm_approval_gap"]
        assert (r.reward_model["approval_gap_labels"], r.reward_model["approval_gap_versions"]) == (n, [0])
        if n < 20:
            assert gap["passed"] and gap["value"] is None, gap
            assert gap["skipped"] == f"judge's approval gap not checked: {n} held-out labels on v0, fewer than 20"
            assert gap["skipped"] in r.summary()
        else:
            assert gap["value"] is not None and not gap["skipped"], gap
    assert heldout[0] < 20 <= heldout[-1], heldout
