"""The trainer spends the KL budget on purpose (issue 15): a taste that needs more KL than the bound.

Cheerful answers are far more than 1 nat from the base model (the loop gains its +0.4 at KL 5-7),
so with gate.max_kl = 1 the users want more than the leash allows. Without the budget, every round
started from the same policy with the same step, overshot the bound and was thrown away, round after
round. With it, rounds stop their epochs early or scale their update back to land under the bound, a
rejection for KL makes the next round more conservative, and once the serving version sits at the
bound and cannot improve, the trainer says the budget is spent (round report, rounds.jsonl, metric)
instead of burning more rounds.

The reward is the taste's own rule (reward.rule), so the judge's check does not stand in the way:
this test is about the KL bound alone.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

from rlhf_loop.core.broker import ensure_topics
from rlhf_loop.trainer.cli import budget_spent
from rlhf_loop.trainer.config import TrainerConfig
from rlhf_loop.trainer.round import RoundReport, _finish, _spend_budget
from rlhf_loop.trainer.state import TrainerState
from trainer_helpers import rounds_on, sample_interactions, votes_for

BOUND, MAX_ROUNDS, PER_ROUND = 1.0, 8, 32
NO_BUDGET = {"early_stop": 0.0, "scale_backs": 0, "backoff_lr": 1.0, "backoff_beta": 1.0, "spent": 1.0}


def longest_run(flags: list[bool]) -> int:
    best = run = 0
    for f in flags:
        run = run + 1 if f else 0
        best = max(best, run)
    return best


def run_rounds(settings, interactions, votes, cfg: TrainerConfig, rounds: int):
    """Rounds of PER_ROUND new labels each, as cli.loop runs them: none once the budget is spent."""
    state = TrainerState.open(settings, cfg)
    try:
        reports = rounds_on(state, settings, interactions, votes, rounds=rounds, per_round=PER_ROUND,
                            until=budget_spent)
        return state, reports, budget_spent(state)
    finally:
        state.close()


def trail(reports) -> str:
    return "; ".join(f"{'v%d' % r.version if r.promoted else 'rejected'} KL {r.candidate['kl_to_ref']:.2f} "
                     f"scale {r.budget.get('update_scale', 1):g}" for r in reports)


def test_a_taste_beyond_the_bound_spends_the_budget_without_a_run_of_kl_rejections(settings, base_model_dir, tmp_path):
    interactions = sample_interactions(base_model_dir, MAX_ROUNDS * PER_ROUND, seed=3)
    votes = votes_for(interactions, taste="cheerful", noise=0.1, seed=4)
    # the edge of the bound reached within MAX_ROUNDS: one scale-back (three by default) and the serving version
    # at 0.6 of the bound counts as at it (0.85). With the defaults the policy kept finding promotions just
    # under the bound (KL 0.78-0.90) for 11 rounds, and the current policy's KL, sampled again on a grown
    # prompt plan, read 0.74 for a version promoted at 0.97: longer than a test should run
    cfg = TrainerConfig().replace(reward={"rule": "cheerful"}, gate={"max_kl": BOUND}, ppo={"rollout_batches": 1},
                                  budget={"scale_backs": 1, "spent": 0.6})

    # the premise: without the budget, a round's update lands far over the bound
    blind = settings.model_copy(update={"state_dir": tmp_path / "blind", **{
        f"topic_{t}": f"blind.{t}" for t in ("interactions", "feedback", "policy_updates", "dlq")}})
    ensure_topics(blind)
    _, unaware, _ = run_rounds(blind, interactions, votes, cfg.replace(budget=NO_BUDGET), 1)
    assert not unaware[0].checks["kl"]["passed"] and unaware[0].candidate["kl_to_ref"] > 2 * BOUND, trail(unaware)

    state, reports, spent_now = run_rounds(settings, interactions, votes, cfg, MAX_ROUNDS)
    kl_rejected = [not r.checks["kl"]["passed"] for r in reports]
    assert any(r.promoted for r in reports), trail(reports)  # it did move toward the taste, within the bound
    assert all(r.candidate["kl_to_ref"] < BOUND for r in reports if r.promoted), trail(reports)
    # the leash is reached: the serving version sits at the bound, and the trainer says so and stops
    assert spent_now, trail(reports)
    assert longest_run(kl_rejected) <= 2, trail(reports)  # no more than one consecutive KL rejection after the first
    spent = reports[-1].budget["spent"]
    assert spent["version"] == state.policy_store.latest() and spent["serving_kl"] >= cfg.budget.spent * BOUND, spent
    assert "raise gate.max_kl" in spent["why"]
    assert "KL budget spent" in reports[-1].summary()
    # a rejection for KL made the next round more conservative, and the report says so
    for r in reports:
        if not r.checks["kl"]["passed"]:
            assert r.budget["backed_off"] and r.budget["lr_scale"] < 1.0, r.budget
    # the budget spent shows where people look: rounds.jsonl and the trainer's metric
    last = json.loads((settings.trainer_dir / "rounds.jsonl").read_text().splitlines()[-1])
    assert last["budget"]["spent"]["version"] == spent["version"]
    assert REGISTRY.get_sample_value("rlhf_trainer_kl_budget_spent") == 1.0
    print(f"\nwithout the budget: {trail(unaware)}\nwith it: {trail(reports)}")


def test_the_in_round_estimate_reads_the_kl_the_gate_then_measures(settings, base_model_dir):
    """budget.early_stop decides on an estimate taken after each epoch (round._kl_estimate). It must read what
    the gate then measures of the candidate (exact KL on its own answers to the gate's prompts), not how far
    the update raised the tokens it trained on: estimates on the rollout read 1.3-27x the gate's figure on
    SmolLM2 (from the sampled tokens) and 1.6-4x here (exact, at the rollout's prefixes), and stopped rounds
    after one epoch at a fraction of the bound (docs/trainer.md, "The KL budget")."""
    interactions = sample_interactions(base_model_dir, 3 * PER_ROUND, seed=5)
    votes = votes_for(interactions, taste="cheerful", noise=0.1, seed=6)
    # a bound far away: the estimate is taken after every epoch, nothing stops or scales the round
    cfg = TrainerConfig().replace(reward={"rule": "cheerful"}, gate={"max_kl": 1000.0}, ppo={"rollout_batches": 1})
    _, reports, _ = run_rounds(settings, interactions, votes, cfg, 3)
    pairs = [(round(r.train["kl_estimate_last"], 2), round(r.candidate["kl_to_ref"], 2)) for r in reports]
    assert all(r.budget.get("update_scale", 1) == 1 for r in reports), trail(reports)
    assert pairs[-1][1] > 0.5, f"the policy should have moved: {pairs}"
    for estimate, gate_kl in pairs:
        assert 0.5 * gate_kl <= estimate <= 2 * gate_kl, pairs  # measured 1.7x, 1.2x, 0.94x


@pytest.mark.parametrize("failed, scale_backs, spent", [
    ("reward", 0, False),  # a noisy reward verdict near the bound: the next round tries again (issue 22)
    ("reward", 2, False),  # scaled back, not to the end: a smaller step is still left
    ("reward", 3, True),  # every scale-back used: the smallest step the bound leaves did not make a version
    ("kl", 3, True),  # over the bound
    ("kl", 0, True),
])
def test_the_budget_is_spent_only_for_want_of_kl(failed, scale_backs, spent):
    """The serving version at KL 7.2 of the bound 8 (past budget.spent 0.85), a candidate rejected."""
    cfg = TrainerConfig()  # budget.scale_backs 3
    state = SimpleNamespace(cfg=cfg, lr_scale=1.0, kl_ctl=SimpleNamespace(value=0.2), version=5)
    checks = {"reward": {"passed": failed != "reward"}, "kl": {"passed": failed != "kl"}}
    reason = ("reward 3.001 does not beat current 3.023" if failed == "reward" else "KL to reference 8.30 >= bound 8")
    report = RoundReport(round=9, trigger_time=0.0, kl_bound=8.0, current={"kl_to_ref": 7.2, "reward": 3.023},
                         candidate={"kl_to_ref": 8.3 if failed == "kl" else 7.06, "reward": 3.001}, checks=checks,
                         reason=reason, budget={"update_scale": 0.5 ** scale_backs, "scale_backs": scale_backs},
                         seconds={"total": 1.0})
    _spend_budget(state, report)
    assert bool(report.budget.get("spent")) is spent, report.budget
    assert ("KL budget spent" in report.summary()) is spent
    if spent:
        grounds = "its KL was over the bound" if failed == "kl" else "scaled back 3 times (1/8 of its update)"
        assert grounds in report.budget["spent"]["why"] and reason in report.budget["spent"]["why"]


def test_a_round_that_trains_nothing_keeps_the_spent_budget(settings, tmp_path):
    """A round with no candidate (the judge refused its reward model, or no labels yet) says nothing about the
    KL budget: the flag a trained round stored stays, and `--once` or the loop still see it spent."""
    from rlhf_loop.trainer.store import LabelStore

    store = LabelStore(tmp_path / "labels.sqlite", late_vote_window_s=60.0, dedupe_window_s=60.0, prompt_pool_size=100)
    flag = {"version": 3, "bound": 8.0, "serving_kl": 7.5, "why": "..."}
    store.set("budget_spent", flag)
    state = SimpleNamespace(cfg=TrainerConfig(), dist=SimpleNamespace(is_main=True), store=store, lr_scale=1.0,
                            kl_ctl=SimpleNamespace(value=0.2), rounds_path=tmp_path / "rounds.jsonl")
    refused = RoundReport(round=4, trigger_time=0.0, kl_bound=8.0, reward_model={"accuracy": 0.5, "auroc": 0.5},
                          reason="reward model cannot yet predict held-out votes")
    _finish(state, refused, label_seq=10)
    assert store.get("budget_spent") == flag
    store.close()
