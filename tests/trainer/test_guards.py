"""The gate's reward-hacking checks on real models: a candidate that games the reward is rejected.

The users' taste here is the `cheerful` rule, which likes any answer with an exclamation mark.
A candidate that has learnt to answer "!!!!..." to everything scores far better on that rule
than the base model, and is exactly what the guards are for: its answers no longer mention
what was asked (the guard set), they are one token repeated (distinct-2), and they are empty
of words. The gate must reject it, naming the guards, and promote an honest candidate. And the guards must not
drift: a chain of candidates, each a little worse than the last and within every per-round tolerance,
is stopped by the floors held against the reference.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_loop.core.models import eos_token_ids
from rlhf_loop.trainer.config import GateConfig
from rlhf_loop.trainer.gate import decide, evaluate, load_guard_set
from rlhf_loop.trainer.reward_model import rule_reward
from rlhf_loop.core.tinylm import QUESTIONS, SUBJECTS
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


class Forgetting(torch.nn.Module):
    """The base model, except on prompts that name one of `subjects`: there `token`'s logit is raised by 30
    (with "!" it shouts, with the end token it says nothing). A chain of these, one subject more each, is
    a policy that drifts a little further every round. A prompt is seen by the call that reads it (more
    than one token); the decoding calls after it (one token each, from the cache) keep that call's rows."""

    def __init__(self, model, tok, subjects: list[str], token: int):
        super().__init__()
        self.model, self.token = model, token
        self.ids = torch.tensor([tok(" " + s, add_special_tokens=False).input_ids[-1] for s in subjects] or [-1])
        self.rows = None

    def forward(self, input_ids, **kwargs):
        if input_ids.shape[1] > 1:
            self.rows = torch.isin(input_ids, self.ids).any(1)  # (B,) this batch's prompts that name one
        out = self.model(input_ids=input_ids, **kwargs)
        out.logits[self.rows, :, self.token] += 30.0
        return out

    @property
    def device(self):
        return self.model.device


def walk_chain(model, tok, subjects, token, eval_prompts, guard) -> list:
    """Candidate k forgets subjects[:k], its current policy subjects[:k-1] (as if each was promoted);
    the first current policy is the reference (the base model). Every decision of the chain, in order."""
    def view(k):
        return evaluate(Forgetting(model, tok, subjects[:k], token), model, tok, rule_reward("cheerful"), eval_prompts,
                        seed=7, eos_ids=eos_token_ids(model, tok), max_new_tokens=24, temperature=1.0,
                        max_prompt_tokens=512, batch_size=24, guard=guard)

    views = [view(k) for k in range(len(subjects) + 1)]
    cfg = GateConfig(max_kl=1e9, min_reward_gain=-1e9)  # neither reward nor KL is what this chain is about
    return [decide(views[k], views[k - 1], cfg, judge=None, reference=views[0]) for k in range(1, len(views))]


def per_round_checks_pass(d) -> bool:
    return all(c.passed for name, c in d.checks.items() if not name.startswith("ref_"))


def test_a_chain_of_shorter_candidates_is_stopped_by_the_reference_floor(base):
    """Each candidate answers 1 of 12 subjects more with nothing: its mean length is 3/4 to 11/12 of the
    last one's (the per-round floor is 0.6), until it is under 0.3 x the reference's."""
    model, tok = base
    eval_prompts = [[{"role": "user", "content": q.replace("{s}", s)}] for s in SUBJECTS for q in QUESTIONS[:1]]
    chain = walk_chain(model, tok, list(SUBJECTS)[:9], tok.eos_token_id, eval_prompts, guard=[])
    assert all(per_round_checks_pass(d) for d in chain), [d.reason for d in chain]
    assert [d.promoted for d in chain] == [True] * 8 + [False], [d.reason for d in chain]
    stopped = chain[-1]
    assert set(n for n, c in stopped.checks.items() if not c.passed) == {"ref_length_down"}, stopped.reason
    assert "x the reference's" in stopped.reason


def test_a_chain_of_candidates_forgetting_the_guard_set_is_stopped_by_the_reference_floor(base):
    """Each candidate fails one guard prompt more (1/12 = 0.083, within the per-round 0.1); the third is
    0.25 under the reference's pass rate, past its 0.2. The gate's prompts name none of those subjects,
    so nothing else changes along the chain."""
    model, tok = base
    forgotten = list(SUBJECTS)[:3]
    eval_prompts = [[{"role": "user", "content": q.replace("{s}", s)}] for s in list(SUBJECTS)[3:] for q in QUESTIONS[:2]]
    chain = walk_chain(model, tok, forgotten, tok.convert_tokens_to_ids("!"), eval_prompts, load_guard_set("builtin"))
    assert [round(d.checks["guard_set"].value, 3) for d in chain] == [0.917, 0.833, 0.75]
    assert all(per_round_checks_pass(d) for d in chain), [d.reason for d in chain]
    assert [d.promoted for d in chain] == [True, True, False], [d.reason for d in chain]
    assert chain[-1].reason == "guard set pass rate 0.75 < the reference's 1.00 - 0.2"
