"""The gate keeps the current policy's answers between rounds (trainer/round.py, gate.Answers): a round whose
current policy, prompts and sampling settings are last round's scores last round's answers again instead of
sampling them again. Checked on SmolLM-135M's shape (random weights, LoRA, the CPU's dtype) through the real
store and rounds: what is kept is what sampling the current policy now gives, after a rejected round (the
current policy's own answers) and after a promoted one (the candidate's, which it became), while new prompts
keep arriving (a full plan keeps its prompts: gate.eval_prompt_plan)."""

from __future__ import annotations

import math
import random

import torch

from rlhf_loop.trainer import gate
from rlhf_loop.trainer.config import TrainerConfig
from rlhf_loop.trainer.round import _answers_key, _kl_estimate, run_round
from rlhf_loop.trainer.state import TrainerState
from trainer_helpers import interaction, produce, prompts, records, votes_for

ANSWERS = ["Oh, I love it!", "It is fine.", "Great, what a joy!", "Hmm, no.", "Yay!", "Rain again."]
SMALL = {"train": {"adapter": "lora"},
         "ppo": {"rollout_prompts": 4, "minibatch_size": 4, "rollout_batches": 1, "ppo_epochs": 1,
                 "max_new_tokens": 6, "forward_batch_size": 4},
         "reward": {"backbone": "frozen", "max_steps": 2, "batch_size": 8, "heldout_fraction": 0.5},
         "gate": {"eval_responses": 4, "guard_set": None, "min_rm_auroc": 0.0, "max_rm_approval_gap": 0.0, "behaviour_answers": 0}}


def traffic(n: int, seed: int):
    rng = random.Random(seed)
    its = [interaction(rng, p, rng.choice(ANSWERS)) for p in prompts(n, seed)]
    return its, votes_for(its, taste="cheerful", noise=0.0, seed=seed)


def fresh_answers(state: TrainerState, plan) -> gate.Answers:
    cfg = state.cfg
    return gate.answer(state.nets.policy, state.nets.reference, state.tokenizer, plan, seed=cfg.gate.eval_seed,
                       eos_ids=state.eos_ids, max_new_tokens=cfg.ppo.max_new_tokens, temperature=cfg.ppo.temperature,
                       max_prompt_tokens=state.settings.max_prompt_tokens, batch_size=cfg.ppo.forward_batch_size,
                       autocast_dtype=state.dtype, dist=state.dist, guard=state.guard_set)


def test_the_current_policys_gate_answers_are_kept_and_are_what_it_answers(settings, random_model):
    s = settings.model_copy(update={"model": random_model("llama-135m")})
    cfg = TrainerConfig().replace(**SMALL)
    state = TrainerState.open(s, cfg)
    try:
        its, votes = traffic(40, seed=3)
        produce(s, records(s, its[:30], votes[:30]))
        state.cfg = cfg.replace(gate={**SMALL["gate"], "min_reward_gain": 1e9})  # round 1 is rejected
        first = run_round(state, progress=False)
        assert first.labels and not first.promoted and not first.current_reused, first.reason
        (key, kept), = state.gate_answers.items()
        plan = kept.prompts
        assert len({str(p) for p in plan}) == len(plan) == 4, "the plan is full: more held-out prompts than it takes"

        produce(s, records(s, its[30:], votes[30:]))  # new prompts arrive: a full plan keeps its prompts
        state.cfg = cfg.replace(gate={**SMALL["gate"], "min_reward_gain": -1e9})  # round 2 is promoted
        second = run_round(state, progress=False)
        assert second.labels > first.labels
        assert second.current_reused, "round 2's current policy (not promoted since) sampled its answers again"
        for name in ("kl_to_ref", "length", "distinct_2", "guard_pass"):  # only the reward is scored again
            assert second.current[name] == first.current[name], name
        assert second.promoted and second.version == 1, second.reason

        (key2, kept2), = state.gate_answers.items()
        assert key2 != key and key2 == _answers_key(state, plan)  # the new version's, on the same plan
        assert kept2.prompts == plan
        kept_figures = gate.score_answers(kept2, lambda p, t: torch.zeros(len(t)), batch_size=4)
        for name in ("kl_to_ref", "length", "distinct_2"):
            assert second.candidate[name] == getattr(kept_figures, name), name
        now = fresh_answers(state, plan)  # v1, the candidate it promoted, sampled now
        assert now.texts == kept2.texts and now.tokens == kept2.tokens
        assert now.length == kept2.length
        assert torch.allclose(torch.tensor(now.kl), torch.tensor(kept2.kl), rtol=1e-4, atol=1e-4)
        # the next round's in-round KL estimate (budget.early_stop) takes the gate's measure on these answers:
        # before its first step it reads the current policy's figure
        assert math.isclose(_kl_estimate(kept2, state), second.candidate["kl_to_ref"], rel_tol=1e-3, abs_tol=1e-5)
    finally:
        state.close()
