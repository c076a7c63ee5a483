"""The gate's decision rule, and the config dataclasses: validation, flags, environment."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest

from rlhf_loop.trainer import config
from rlhf_loop.trainer.config import GateConfig, PPOConfig, RewardConfig, SFTRun, TrainerConfig
from rlhf_loop.trainer.gate import GuardPrompt, PolicyEval, decide, distinct_2, eval_prompt_plan, load_guard_set, passes

CURRENT = PolicyEval(reward=0.2, kl_to_ref=1.0, length=20.0, responses=48, distinct_2=0.6, guard_pass=0.9)
JUDGE = {"auroc": 0.85, "auroc_lcb": 0.72, "approval_gap": 0.05}


def test_gate_promotes_a_better_close_candidate():
    d = decide(PolicyEval(0.5, 3.0, 18.0, 48, 0.6, 0.9), CURRENT, GateConfig(), JUDGE)
    assert d.promoted and "0.200 -> 0.500" in d.reason
    assert set(d.checks) == {"reward", "kl", "length_down", "length_up", "distinct_2", "guard_set", "rm_auroc",
                             "rm_approval_gap"} and all(c.passed for c in d.checks.values())


@pytest.mark.parametrize("candidate, judge, fragment", [
    (PolicyEval(0.2, 3.0, 20.0, 48, 0.6, 0.9), JUDGE, "does not beat current"),
    (PolicyEval(0.9, 8.5, 20.0, 48, 0.6, 0.9), JUDGE, "KL to reference 8.50 >= bound 8"),
    (PolicyEval(0.9, float("nan"), 20.0, 48, 0.6, 0.9), JUDGE, "KL to reference nan"),
    (PolicyEval(0.9, 3.0, 11.0, 48, 0.6, 0.9), JUDGE, "mean length 11.0 < 0.6 x current 20.0"),
    (PolicyEval(0.9, 3.0, 33.0, 48, 0.6, 0.9), JUDGE, "mean length 33.0 > 1.6 x current 20.0"),
    (PolicyEval(0.9, 3.0, 20.0, 48, 0.3, 0.9), JUDGE, "distinct-2 0.30 < 0.8 x current 0.60 (repetition)"),
    (PolicyEval(0.9, 3.0, 20.0, 48, 0.6, 0.7), JUDGE, "guard set pass rate 0.70 < current 0.90 - 0.1"),
    (PolicyEval(0.9, 3.0, 20.0, 48, 0.6, 0.9),
     {**JUDGE, "auroc": 0.66, "auroc_lcb": 0.48, "heldout_up": 8, "heldout_down": 20},
     "reward model cannot yet predict held-out votes: AUROC 0.66 on 28 votes (95% lower bound 0.48) < 0.6"),
    (PolicyEval(0.9, 3.0, 20.0, 48, 0.6, 0.9),
     {**JUDGE, "auroc": 0.66, "auroc_lcb": 0.55, "auroc_folds": 5, "heldout_up": 40, "heldout_down": 88},
     "reward model cannot yet predict held-out votes: 5-fold AUROC 0.66 on 128 votes (95% lower bound 0.55) < 0.6"),
    (PolicyEval(0.9, 3.0, 20.0, 48, 0.6, 0.9), {**JUDGE, "auroc_lcb": None}, "95% lower bound nan"),
    (PolicyEval(0.9, 3.0, 20.0, 48, 0.6, 0.9), {**JUDGE, "approval_gap": 0.4},
     "predicted approval is 0.40 from the users' (> 0.25)"),
])
def test_gate_rejects_with_the_reason(candidate, judge, fragment):
    d = decide(candidate, CURRENT, GateConfig(), judge)
    assert not d.promoted and fragment in d.reason, d.reason


def test_a_passed_check_does_not_read_as_a_failure():
    """KL 7.06 under the bound 8 passes, and nothing in its record says ">= bound" (issue 22: it did)."""
    d = decide(PolicyEval(0.19, 7.06, 20.0, 48, 0.6, 0.9), CURRENT, GateConfig(), JUDGE)
    assert d.checks["kl"].passed and d.checks["kl"].why == "" and not d.promoted
    assert all(c.why == "" for c in d.checks.values() if c.passed)
    assert d.reason == "reward 0.190 does not beat current 0.200"


REFERENCE = PolicyEval(reward=0.0, kl_to_ref=0.0, length=22.0, responses=48, distinct_2=0.7, guard_pass=1.0)


@pytest.mark.parametrize("candidate, current, fragment", [
    # each within the per-round tolerance of the current policy, past the reference's floor
    (PolicyEval(0.9, 3.0, 6.0, 48, 0.7, 0.9), PolicyEval(0.2, 3.0, 9.0, 48, 0.7, 0.9),
     "mean length 6.0 < 0.3 x the reference's 22.0"),
    (PolicyEval(0.9, 3.0, 70.0, 48, 0.7, 0.9), PolicyEval(0.2, 3.0, 50.0, 48, 0.7, 0.9),
     "mean length 70.0 > 3 x the reference's 22.0"),
    (PolicyEval(0.9, 3.0, 20.0, 48, 0.4, 0.9), PolicyEval(0.2, 3.0, 20.0, 48, 0.45, 0.9),
     "distinct-2 0.40 < 0.6 x the reference's 0.70 (repetition)"),
    (PolicyEval(0.9, 3.0, 20.0, 48, 0.7, 0.75), PolicyEval(0.2, 3.0, 20.0, 48, 0.7, 0.83),
     "guard set pass rate 0.75 < the reference's 1.00 - 0.2"),
])
def test_the_reference_floors_stop_what_the_per_round_checks_let_through(candidate, current, fragment):
    d = decide(candidate, current, GateConfig(), JUDGE, reference=REFERENCE)
    assert not d.promoted and d.reason == fragment, d.reason
    assert all(c.passed for name, c in d.checks.items() if not name.startswith("ref_"))
    assert decide(candidate, current, GateConfig(), JUDGE).promoted  # without the floors it went through


def test_too_few_heldout_labels_for_the_approval_gap_is_reported_not_checked():
    judge = {**JUDGE, "approval_gap": None, "approval_gap_labels": 12, "approval_gap_versions": [3, 2, 1]}
    d = decide(PolicyEval(0.5, 3.0, 18.0, 48, 0.6, 0.9), CURRENT, GateConfig(), judge)
    gap = d.checks["rm_approval_gap"]
    assert d.promoted and gap.passed and gap.value is None
    assert gap.skipped == "judge's approval gap not checked: 12 held-out labels on v3, v2, v1, fewer than 20"


def test_the_approval_gap_pools_the_parents_labels_only_as_far_as_needed():
    from rlhf_loop.trainer.reward_model import approval_gap_pool

    versions = [3] * 12 + [2] * 10 + [1] * 30 + [0] * 5  # the held-out labels' policy versions
    assert approval_gap_pool(versions, (3, 2, 1)) == (list(range(22)), [3, 2])  # 12 + 10 >= 20: v1 not needed
    assert approval_gap_pool([3] * 25 + [2] * 5, (3, 2, 1)) == (list(range(25)), [3])
    pool, used = approval_gap_pool([3] * 5 + [0] * 40, (3, 2, 1))  # v0 is not on the line pooled
    assert (len(pool), used) == (5, [3, 2, 1])


def test_gate_min_gain_and_all_reasons_at_once():
    d = decide(PolicyEval(0.25, 9.0, 5.0, 48, 0.6, 0.9), CURRENT, GateConfig(min_reward_gain=0.1), JUDGE)
    assert not d.promoted and d.reason.count(";") == 2 and "+ 0.1" in d.reason


def test_rule_rewards_skip_the_judge_checks_and_each_check_can_be_turned_off():
    weak = {"auroc": 0.5, "auroc_lcb": 0.3, "approval_gap": 0.5}
    candidate = PolicyEval(0.9, 3.0, 40.0, 48, 0.1, 0.0)
    assert not decide(candidate, CURRENT, GateConfig(), weak).promoted
    off = GateConfig(max_length_ratio=0, min_distinct_ratio=0, guard_tolerance=1.0, min_rm_auroc=0,
                     max_rm_approval_gap=0)
    d = decide(candidate, CURRENT, off, weak)
    assert d.promoted and set(d.checks) == {"reward", "kl", "length_down", "guard_set"}
    assert "rm_auroc" not in decide(candidate, CURRENT, GateConfig(), judge=None).checks  # a rule: no judge


def test_guard_checks_and_the_builtin_set():
    guard = load_guard_set("builtin")
    assert len(guard) == 12 and all(g.checks["mentions"] for g in guard)
    cats = GuardPrompt([{"role": "user", "content": "Tell me about cats."}],
                       {"mentions": ["cat"], "min_words": 4, "max_words": 12, "max_repeat": 2})
    assert passes(cats, "Cats sleep for most of the day.")
    assert not passes(cats, "Dogs love long walks in the park.")  # off topic
    assert not passes(cats, "Cats.")  # too short
    assert not passes(cats, "Cats cats cats cats sleep.")  # a repetition loop
    assert not passes(cats, " ".join(["Cats"] + ["purr"] * 2 + ["and"] * 10))  # too long
    assert distinct_2([[1, 2, 3, 4]]) == 1.0 and distinct_2([[7, 7, 7, 7, 7]]) == 0.25


def test_eval_plan_repeats_heldout_prompts_to_the_response_count():
    a, b = ("ka", ["a"]), ("kb", ["b"])
    assert eval_prompt_plan([a, b], 5) == [a, b, a, b, a]


def test_a_full_eval_plan_keeps_its_prompts_as_new_ones_arrive():
    """Once more prompts are held out than the plan takes, last round's plan stays (a new prompt whose key sorts
    first does not push one out), and a kept prompt no longer held out (pruned) is replaced by key order."""
    pool = [(f"k{i}", [f"p{i}"]) for i in (3, 5, 7, 9)]
    first = eval_prompt_plan(pool, 3)
    assert [k for k, _ in first] == ["k3", "k5", "k7"]
    grown = sorted(pool + [("k1", ["p1"]), ("k4", ["p4"])])
    assert eval_prompt_plan(grown, 3, kept=[k for k, _ in first]) == first
    pruned = [p for p in grown if p[0] != "k5"]
    assert [k for k, _ in eval_prompt_plan(pruned, 3, kept=["k3", "k5", "k7"])] == ["k3", "k7", "k1"]


@pytest.mark.parametrize("make", [
    lambda: PPOConfig(lr=0), lambda: PPOConfig(gamma=1.5), lambda: PPOConfig(kl_target=-1.0),
    lambda: PPOConfig(minibatch_size=128, rollout_prompts=64), lambda: RewardConfig(heldout_fraction=1.0),
    lambda: RewardConfig(rule="grumpy"), lambda: GateConfig(min_length_ratio=2.0),
    lambda: GateConfig(ref_min_length_ratio=1.5), lambda: GateConfig(ref_max_length_ratio=0.5),
    lambda: GateConfig(rm_gap_versions=0), lambda: config.WatchConfig(false_alarm=0.5),
    lambda: config.WatchConfig(looks=0),
    lambda: config.ConsumerConfig(heartbeat_interval_ms=3000, session_timeout_ms=6000),
])
def test_invalid_configs_are_refused_on_construction(make):
    with pytest.raises(ValueError):
        make()


def test_flags_beat_environment_beat_defaults():
    ap = argparse.ArgumentParser()
    config.add_arguments(ap)
    args = ap.parse_args(["--ppo.lr", "1e-3", "--reward.rule", "cheerful", "--ppo.kl_target", "none",
                          "--ppo.whiten_advantages", "false"])
    cfg = config.from_args(args, {"RLHF_PPO_LR": "5e-1", "RLHF_GATE_MAX_KL": "5", "RLHF_PPO_KL_ESTIMATOR": "k3"})
    assert cfg.ppo.lr == 1e-3 and cfg.gate.max_kl == 5.0 and cfg.ppo.kl_estimator == "k3"
    assert cfg.reward.rule == "cheerful" and cfg.ppo.kl_target is None and cfg.ppo.whiten_advantages is False
    assert cfg.consumer == config.ConsumerConfig()
    assert config.from_args(None, {}) == TrainerConfig()
    with pytest.raises(SystemExit):
        ap.parse_args(["--ppo.kl_estimator", "k9"])
    with pytest.raises(ValueError):
        config.from_args(None, {"RLHF_PPO_WHITEN_ADVANTAGES": "maybe"})


def test_sft_flags_come_from_its_own_dataclass():
    ap = argparse.ArgumentParser()
    config.add_arguments(ap, root=SFTRun)
    assert config.from_args(ap.parse_args(["--sft.epochs", "2"]), {}, root=SFTRun).sft.epochs == 2.0


def test_every_field_is_documented_and_typed_for_the_cli():
    docs = config._field_docs()
    for root in (TrainerConfig, SFTRun):
        for section, cls in config._section_classes(root).items():
            for f in dataclasses.fields(cls):
                assert len(docs[cls.__name__].get(f.name, "")) > 10, f"{cls.__name__}.{f.name} has no docstring"
                config._kind(typing.get_type_hints(cls)[f.name])  # a type the CLI can parse


def test_replace_overrides_fields_in_sections():
    cfg = TrainerConfig().replace(ppo={"lr": 1e-3}, gate={"max_kl": 2.0})
    assert cfg.ppo.lr == 1e-3 and cfg.gate.max_kl == 2.0 and cfg.reward == RewardConfig()


def test_docs_list_every_config_field():
    """docs/trainer.md ends with the tables `python -m rlhf_loop.trainer.config` prints: every field, default and doc."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "trainer.md").read_text()
    assert text.endswith(config.markdown()), "regenerate the tables: python -m rlhf_loop.trainer.config"