"""Defaults by the model's size: the full/LoRA layout is decided once, by `model_defaults`, and
everything after it (learning rates, the trainer's networks) follows that one decision."""

from __future__ import annotations

import json

from rlhf_loop.trainer import config
from rlhf_loop.trainer.config import LORA_AUTO_MIN_PARAMS, REAL_MODEL_PARAMS, TrainerConfig


def test_auto_is_decided_once_by_size_and_the_learning_rates_follow_it(tmp_path):
    toy = config.model_defaults(tmp_path, 740_000, "cpu")
    assert toy == {"train": {"adapter": "full"}}  # the embedded model keeps its tuned dataclass defaults
    mid = config.model_defaults(tmp_path, REAL_MODEL_PARAMS, "cpu")
    assert mid["train"]["adapter"] == "full" and mid["ppo"]["lr"] == 3e-5  # a CPU round's few steps: 10x the anchor
    assert config.model_defaults(tmp_path, REAL_MODEL_PARAMS, "cuda")["ppo"]["lr"] == 3e-6  # TRL's
    big = config.model_defaults(tmp_path, LORA_AUTO_MIN_PARAMS, "cpu")
    assert big["train"]["adapter"] == "lora" and big["ppo"]["lr"] == 3e-4 and big["reward"]["lr"] == 9e-5
    assert config.model_defaults(tmp_path, LORA_AUTO_MIN_PARAMS, "cuda")["ppo"]["lr"] == 3e-5
    assert big["reward"]["backbone"] == "frozen"  # on a CPU: a round's reward model is its new labels' forwards
    # the algorithm issue 21's rule chose on a real model on a CPU; a GPU's and the toy's stay the dataclass's (ppo)
    assert big["train"]["algorithm"] == mid["train"]["algorithm"] == "rloo"
    assert "algorithm" not in config.model_defaults(tmp_path, LORA_AUTO_MIN_PARAMS, "cuda")["train"]
    # kto / dpo on a CPU: ppo's 32 answers with gradients a round (4 steps of 8) at 10x the anchor
    assert big["direct"] == {"lr": 1e-4, "batch_size": 8, "max_steps": 4} and mid["direct"]["lr"] == 1e-5
    assert config.model_defaults(tmp_path, LORA_AUTO_MIN_PARAMS, "cuda")["direct"] == {"lr": 1e-5}  # TRL's, x10 LoRA
    assert "backbone" not in config.model_defaults(tmp_path, LORA_AUTO_MIN_PARAMS, "cuda")["reward"]
    forced = config.model_defaults(tmp_path, LORA_AUTO_MIN_PARAMS, "cpu", adapter="full")
    assert forced["train"]["adapter"] == "full" and forced["ppo"]["lr"] == 3e-5
    cfg = TrainerConfig().replace(**big)
    assert cfg.train.adapter == "lora" and cfg.train.resolved_adapter(1) == "lora", "resolved: size no longer matters"


def test_a_model_directory_carries_its_own_trainer_config(tmp_path):
    (tmp_path / config.MODEL_CONFIG_FILE).write_text(json.dumps({"ppo": {"lr": 1e-5}}))
    assert config.model_defaults(tmp_path, LORA_AUTO_MIN_PARAMS, "cuda")["ppo"]["lr"] == 1e-5


def test_a_flag_or_variable_overrides_the_profiles_algorithm(tmp_path):
    import argparse

    profile = config.model_defaults(tmp_path, LORA_AUTO_MIN_PARAMS, "cpu")
    assert config.from_args(None, {}, defaults=profile).train.algorithm == "rloo"
    assert config.from_args(None, {"RLHF_TRAIN_ALGORITHM": "ppo"}, defaults=profile).train.algorithm == "ppo"
    flags = argparse.Namespace(**{"train.algorithm": "kto"})
    assert config.from_args(flags, {"RLHF_TRAIN_ALGORITHM": "ppo"}, defaults=profile).train.algorithm == "kto"
