"""The gate's reward-hacking checks on real models: a candidate that games the reward is rejected.

The users' taste here is the `cheerful` rule, which likes any answer with an exclamation mark.
A candidate that has learnt to answer "!!!!..." to everything scores far better on that rule
than the base model, and is exactly what the guards are for: its answers no longer mention
what was asked (the guard set), they are one token repeated (distinct-2), and they are empty
of words. The gate must reject it, naming the guards, and promote an honest candidate.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_loop.core.models import eos_token_ids
from rlhf_loop.trainer.config import GateConfig
from rlhf_loop.trainer.gate import decide, evaluate, load_guard_set
from rlhf_loop.trainer.reward_model import rule_reward
from trainer_helpers import prompts


class Shouting(torch.nn.Module):
    """The base model with one token's logit raised by `boost`: a policy that learnt to shout."""

    def __init__(self, model, token: int, boost: float):
        super().__init__()
        self.model, self.token, self.boost = model, token, boost

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        out.logits[..., self.token] += self.boost
        return out

    @property
    def device(self):
        return self.model.device


@pytest.fixture(scope="module")
def base(base_model_dir):
    return AutoModelForCausalLM.from_pretrained(base_model_dir).eval(), AutoTokenizer.from_pretrained(base_model_dir)


def gate_eval(policy, reference, tok):
    return evaluate(policy, reference, tok, rule_reward("cheerful"), prompts(16, seed=5), seed=7,
                    eos_ids=eos_token_ids(reference, tok), max_new_tokens=24, temperature=1.0, max_prompt_tokens=512,
                    batch_size=16, guard=load_guard_set("builtin"))


def test_a_degenerate_candidate_that_games_the_reward_is_rejected_by_the_guards(base):
    model, tok = base
    current = gate_eval(model, model, tok)
    shouting = gate_eval(Shouting(model, tok.convert_tokens_to_ids("!"), 30.0), model, tok)
    assert shouting.reward == 1.0 > current.reward  # the reward is fooled: every answer pleases the rule ...
    assert current.guard_pass > 0.5 and shouting.guard_pass < 0.1  # ... the guard set is not
    assert shouting.distinct_2 < 0.2 < current.distinct_2
    d = decide(shouting, current, GateConfig(max_kl=1e9), judge=None)
    assert not d.promoted
    assert not d.checks["guard_set"].passed and not d.checks["distinct_2"].passed and d.checks["reward"].passed
    assert "guard set pass rate" in d.reason and "repetition" in d.reason


def test_an_honest_candidate_passes_the_guards(base):
    """A candidate that is the base model with its cheerful tokens a little likelier passes every guard."""
    model, tok = base
    current = gate_eval(model, model, tok)
    honest = gate_eval(Shouting(model, tok.convert_tokens_to_ids("!"), 1.0), model, tok)
    d = decide(honest, current, GateConfig(max_kl=1e9), judge=None)
    assert d.checks["guard_set"].passed and d.checks["distinct_2"].passed and d.checks["length_down"].passed, d.reason


def test_a_run_of_guard_rejections_is_reported_and_a_pass_ends_it(base):
    """The loop's failure mode when the users reward what the guard set forbids: every round trains a
    candidate the guard set rejects. After gate.guard_stall_rounds of them each round says so (its
    summary line, rounds.jsonl's guard_streak, the trainer metric); a candidate that passes the guard
    set, or is promoted, ends the run; a round skipped before training leaves it as it was."""
    from dataclasses import asdict

    from prometheus_client import REGISTRY

    from rlhf_loop.trainer import metrics
    from rlhf_loop.trainer.round import RoundReport, guard_stall, guard_streak

    model, tok = base
    current = gate_eval(model, model, tok)
    views = {"shouting": gate_eval(Shouting(model, tok.convert_tokens_to_ids("!"), 30.0), model, tok),
             "honest": gate_eval(Shouting(model, tok.convert_tokens_to_ids("!"), 1.0), model, tok)}

    def round_of(n: int, candidate: str | None) -> RoundReport:
        report = RoundReport(round=n, trigger_time=0.0, kl_bound=1e9, current=asdict(current), seconds={"total": 1.0})
        if candidate is None:
            report.reason = "too few labels"
            return report
        d = decide(views[candidate], current, GateConfig(max_kl=1e9), judge=None)
        report.candidate, report.promoted, report.reason = asdict(views[candidate]), d.promoted, d.reason
        report.checks = {name: asdict(c) for name, c in d.checks.items()}
        return report

    streak, seen = 0, []
    for n, candidate in enumerate(["shouting", "shouting", None, "shouting", "honest", "shouting"], 1):
        report = round_of(n, candidate)
        report.guard_streak = streak = guard_streak(streak, report)
        metrics.observe_round(asdict(report))
        seen.append((streak, REGISTRY.get_sample_value("rlhf_trainer_guard_rejections_in_a_row"), report.summary(),
                     guard_stall(report, GateConfig())))  # warns from 3 (the default guard_stall_rounds)
    assert [s for s, _, _, _ in seen] == [1, 2, 2, 3, 0, 1]
    assert [g for _, g, _, _ in seen] == [1, 2, 2, 3, 0, 1]
    assert "guard set: 3 rejections in a row" in seen[3][2] and "guard set:" not in seen[0][2] + seen[4][2]
    assert [w is not None for *_, w in seen] == [False, False, False, True, False, False]
    assert "rejected 3 candidates in a row (pass rate 0.0" in seen[3][3] and "(builtin)" in seen[3][3]
    long_run = round_of(7, "shouting")
    long_run.guard_streak = 9
    assert guard_stall(long_run, GateConfig()) is not None
    assert guard_stall(long_run, GateConfig(guard_stall_rounds=0)) is None  # 0: never
