"""The gate's decision rule, and the config dataclasses: validation, flags, environment."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest

from trainer import config
from trainer.config import GateConfig, PPOConfig, RewardConfig, SFTRun, TrainerConfig
from trainer.gate import PolicyEval, decide, eval_prompt_plan

CURRENT = PolicyEval(reward=0.2, kl_to_ref=1.0, length=20.0, responses=48)


def test_gate_promotes_a_better_close_candidate():
    ok, why = decide(PolicyEval(0.5, 3.0, 18.0, 48), CURRENT, GateConfig())
    assert ok and "0.200 -> 0.500" in why


@pytest.mark.parametrize("candidate, fragment", [
    (PolicyEval(0.2, 3.0, 20.0, 48), "does not beat current"),
    (PolicyEval(0.9, 8.5, 20.0, 48), "KL to reference 8.50 >= bound 8"),
    (PolicyEval(0.9, float("nan"), 20.0, 48), "KL to reference nan"),
    (PolicyEval(0.9, 3.0, 11.0, 48), "mean length 11.0 < 0.6 x current 20.0"),
])
def test_gate_rejects_with_the_reason(candidate, fragment):
    ok, why = decide(candidate, CURRENT, GateConfig())
    assert not ok and fragment in why


def test_gate_min_gain_and_all_reasons_at_once():
    ok, why = decide(PolicyEval(0.25, 9.0, 5.0, 48), CURRENT, GateConfig(min_reward_gain=0.1))
    assert not ok and why.count(";") == 2 and "+ 0.1" in why


def test_eval_plan_repeats_heldout_prompts_to_the_response_count():
    assert eval_prompt_plan([["a"], ["b"]], 5) == [["a"], ["b"], ["a"], ["b"], ["a"]]


@pytest.mark.parametrize("make", [
    lambda: PPOConfig(lr=0), lambda: PPOConfig(gamma=1.5), lambda: PPOConfig(kl_target=-1.0),
    lambda: PPOConfig(minibatch_size=128, rollout_prompts=64), lambda: RewardConfig(heldout_fraction=1.0),
    lambda: RewardConfig(rule="grumpy"), lambda: GateConfig(min_length_ratio=2.0),
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
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "trainer.md").read_text()
    for root in (TrainerConfig, SFTRun):
        for section, cls in config._section_classes(root).items():
            assert f"(`{cls.__name__}`)" in text
            for f in dataclasses.fields(cls):
                assert f"| `{f.name}` | `{f.default!r}` |" in text, f"docs/trainer.md lacks {section}.{f.name}={f.default!r}"
