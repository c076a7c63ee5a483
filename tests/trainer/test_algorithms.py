"""Every algorithm besides PPO (tests/trainer/test_learning.py) learns a taste from votes on a real broker.

The same traffic for each: the base model's answers to logged prompts, voted by the `cheerful`
rule with 10 % noise, through Kafka, two rounds. grpo and rloo learn from their own rollouts
scored by the reward model; kto and dpo from the stored thumbs themselves. The published policy
must please the rule clearly more often than the base model on fresh prompts (its own samples,
scored by the rule, not by anything it was trained on), close to the reference.
"""

from __future__ import annotations

import pytest

from rlhf_loop.trainer.config import TrainerConfig
from rlhf_loop.trainer.gate import evaluate
from rlhf_loop.trainer.reward_model import rule_reward
from rlhf_loop.trainer.state import TrainerState
from trainer_helpers import prompts, rounds_on, sample_interactions, votes_for

pytestmark = pytest.mark.slow

ROUNDS, PER_ROUND = 2, 120
SMALL = {"reward": {"max_steps": 12}, "gate": {"eval_responses": 32}, "direct": {"max_steps": 40, "epochs": 4.0}}


@pytest.fixture(scope="module")
def traffic(base_model_dir):
    interactions = sample_interactions(base_model_dir, ROUNDS * PER_ROUND, seed=0)
    return interactions, votes_for(interactions, taste="cheerful", noise=0.1, seed=1)


def rule_eval(policy, state: TrainerState):
    return evaluate(policy, state.nets.reference, state.tokenizer, rule_reward("cheerful"), prompts(96, seed=12345),
                    seed=7, eos_ids=state.eos_ids, max_new_tokens=48, temperature=1.0, max_prompt_tokens=512,
                    batch_size=96)


BASE_EVAL = {}  # every algorithm starts from the same base policy: its evaluation is computed once


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "kto", "dpo"])
def test_each_algorithm_learns_the_taste_behind_the_votes(settings, traffic, algorithm):
    interactions, votes = traffic
    state = TrainerState.open(settings, TrainerConfig().replace(train={"algorithm": algorithm}, **SMALL))
    try:
        if "base" not in BASE_EVAL:
            BASE_EVAL["base"] = rule_eval(state.nets.policy, state)
        before = BASE_EVAL["base"]
        reports = rounds_on(state, settings, interactions, votes, rounds=ROUNDS, per_round=PER_ROUND)
        after = rule_eval(state.nets.policy, state)
    finally:
        state.close()
    assert all(r.algorithm == algorithm and r.train for r in reports)
    assert any(r.promoted for r in reports), [r.reason for r in reports]
    # +1/-1 rewards: +0.3 is 15 more answers in 100 that the taste likes
    assert after.reward >= before.reward + 0.3, (algorithm, before, after)
    assert after.kl_to_ref < state.cfg.gate.max_kl
    if algorithm in ("grpo", "rloo"):
        assert "vf_loss" not in reports[-1].train  # no critic
    else:
        assert reports[-1].train["examples"] > 0 and "score" not in reports[-1].train  # no rollouts
