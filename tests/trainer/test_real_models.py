"""A real architecture through a training round, full-weight and LoRA, with random weights and a tokenizer
built here; and the errors for a model the trainer cannot take as it is.

Learning is not what these check (random models have nothing to learn from; tests/trainer/test_learning.py
does that on the embedded model): the gate is told to promote, and the check is that what is published is
exactly the trainer's candidate, loadable the ordinary way (from_pretrained; peft onto the base for an
adapter), verified with its base. tests/service/test_serve_real_models.py takes Llama, Qwen2 and GPT-2
(with and without chat template and pad token) through both layouts and the service.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_loop.core.contracts import PolicyUpdate

from rlhf_loop.trainer.config import RewardConfig, TrainerConfig
from rlhf_loop.trainer.round import run_round
from rlhf_loop.trainer.state import TrainerState
from trainer_helpers import consume_all, interaction, produce, prompts, records, votes_for

ANSWERS = ["Oh, I love it!", "It is fine.", "Great, what a joy!", "Hmm, no.", "Yay!", "Rain again."]
TINY = {"ppo": {"rollout_prompts": 8, "minibatch_size": 8, "rollout_batches": 1, "ppo_epochs": 1,
                "max_new_tokens": 8, "forward_batch_size": 8},
        "reward": {"max_steps": 2, "batch_size": 8}, "gate": {"eval_responses": 4, "min_reward_gain": -1e9, "min_rm_auroc": 0.0}}


def traffic(n: int, seed: int):
    """n answers with their votes; each as the service logs it, with its tokens' log-probs (made up: these
    token ids are not the text's, and no round trains on them; the behaviour metric reads them)."""
    rng = random.Random(seed)
    its = [interaction(rng, p, rng.choice(ANSWERS), token_ids=[5, 6, 7]).model_copy(
        update={"completion_logprobs": [-1.0, -2.0, -0.5]}) for p in prompts(n, seed)]
    return its, votes_for(its, taste="cheerful", noise=0.0, seed=seed)


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_a_round_publishes_exactly_the_candidate(settings, random_model, adapter):
    """GPT-2: the odd architecture (Conv1D layers, whose LoRA weights are stored transposed), no chat
    template, no pad token. tests/service/test_serve_real_models.py runs both layouts on all three
    architectures and checks the service answers as the published version does; this checks that
    the published version is the trainer's in-memory candidate."""
    model_dir = random_model("gpt2-tiny", chat_template=None, pad_token=False)
    # a model without a template needs RLHF_CHAT_TEMPLATE (here: its field) to be trained on chats
    s = settings.model_copy(update={"model": model_dir, "chat_template": "chatml"})
    its, votes = traffic(24, seed=5)
    produce(s, records(s, its, votes))
    cfg = TrainerConfig().replace(train={"adapter": adapter}, **TINY)
    state = TrainerState.open(s, cfg)
    try:
        report = run_round(state, progress=False)
        assert report.promoted and report.version == 1, report.reason
        # every voted answer came from version 0, the current policy: on-policy, and its made-up log-probs are not
        # the policy's
        assert report.behaviour["onpolicy_answers"] == report.labels > 0 and report.behaviour["offpolicy_answers"] == 0
        assert report.behaviour["onpolicy_max_gap"] > 0.1
        store = state.policy_store
        manifest = store.verify(1)
        probe = torch.tensor([[3, 17, 42, 99, 5]])
        with torch.no_grad():
            trained = state.nets.policy(input_ids=probe).logits
            reference = state.nets.reference(input_ids=probe).logits
        assert not torch.allclose(trained, reference), "the round changed nothing"
    finally:
        state.close()

    if adapter == "lora":
        from peft import PeftModel

        assert manifest.base_version == 0
        assert set(manifest.files) == {"adapter_model.safetensors", "adapter_config.json"}
        base = AutoModelForCausalLM.from_pretrained(store.path(0), use_safetensors=True)
        published = PeftModel.from_pretrained(base, str(store.path(1))).eval()
    else:
        assert manifest.base_version is None and "model.safetensors" in manifest.files
        published = AutoModelForCausalLM.from_pretrained(store.path(1), use_safetensors=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(published(input_ids=probe).logits, trained, rtol=1e-4, atol=1e-5)

    (update,) = [PolicyUpdate.model_validate_json(v)
                 for v in consume_all(s, s.topic_policy_updates, "test-updates", expect=1)]
    assert update.version == 1 and update.base_version == manifest.base_version
    assert update.files == manifest.files


def test_a_model_without_a_chat_template_is_refused_with_the_setting_to_use(settings, random_model):
    from rlhf_loop.core.models import NoChatTemplate, ensure_policy_store

    s = settings.model_copy(update={"model": random_model("gpt2-tiny", chat_template=None, pad_token=False)})
    with pytest.raises(NoChatTemplate, match="RLHF_CHAT_TEMPLATE"):
        ensure_policy_store(s)
    assert not s.policy_dir.exists() or not list((s.policy_dir / "versions").glob("v*"))  # nothing half-written


def test_lora_needs_latest_on_its_base(settings, base_model_dir):
    """LATEST a full-weight version other than the reference: LoRA cannot sit on it; the error says what to do."""
    from rlhf_loop.core.models import ensure_policy_store

    store = ensure_policy_store(settings)

    def save(d):
        model = AutoModelForCausalLM.from_pretrained(store.path(0), use_safetensors=True)
        model.save_pretrained(d)

    store.write(1, save, parent_version=0)
    with pytest.raises(ValueError, match="ppo.reference_version=1"):
        TrainerState.open(settings, TrainerConfig().replace(train={"adapter": "lora"}))



@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_gradient_checkpointing_changes_memory_not_gradients(settings, random_model, adapter):
    """train.gradient_checkpointing recomputes activations in the backward pass: the policy's and the reward
    model's gradients must be the ones computed without it (and it must really be on)."""
    from rlhf_loop.core.models import ensure_policy_store
    from rlhf_loop.trainer.config import TrainConfig
    from rlhf_loop.trainer.dist import Dist
    from rlhf_loop.trainer.networks import Networks
    from rlhf_loop.trainer.rollout import forward

    s = settings.model_copy(update={"model": random_model("llama-tiny")})
    store = ensure_policy_store(s)
    g = torch.Generator().manual_seed(0)
    query, response = torch.randint(3, 200, (3, 6), generator=g), torch.randint(3, 200, (3, 5), generator=g)
    ones = lambda t: torch.ones_like(t, dtype=torch.bool)  # noqa: E731
    grads = {}
    for checkpointing in (False, True):
        nets = Networks.open(s, store, TrainConfig(adapter=adapter, gradient_checkpointing=checkpointing), RewardConfig(), adapter, 0, 0,
                             Dist())
        torch.manual_seed(1)
        for p in (p for _, p in nets.reward.trainable()):  # the reward head starts at zero: give it a gradient path
            if p.dim() == 2 and p.shape[0] == 1:
                torch.nn.init.normal_(p)
        nets.policy.train()
        nets.reward.train()
        lm = nets.policy.module
        on = lm.is_activation_checkpointing if hasattr(lm, "is_activation_checkpointing") else lm.is_gradient_checkpointing
        assert on == checkpointing
        with nets.policy.active():
            forward(nets.policy, query, ones(query), response, ones(response), temperature=1.0).logprobs.sum().backward()
        with nets.reward.body.active():
            nets.reward(torch.cat([query, response], 1), ones(torch.cat([query, response], 1))).sum().backward()
        params = [*nets.policy.named_trainable(), *nets.reward.trainable()]
        grads[checkpointing] = {n: p.grad.clone() for n, p in params if p.grad is not None}
    assert grads[False].keys() == grads[True].keys() and len(grads[False]) > 4
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("algorithm", [None, "kto"])
def test_a_135m_model_on_a_cpu_trains_with_its_profiles_algorithm(settings, random_model, algorithm):
    """`rlhf train`'s config on a model of SmolLM2's shape on a CPU (cli.resolve_config): RLOO unless a flag says
    otherwise (issue 21's rule), and kto's 4 steps of 8 answers; a round of each trains as the profile says and is
    published. Shorter answers and a smaller gate keep it a test; the rest is the profile's."""
    import argparse

    from rlhf_loop.trainer.cli import resolve_config

    s = settings.model_copy(update={"model": random_model("llama-135m")})
    its, votes = traffic(40, seed=7)
    produce(s, records(s, its, votes))
    cfg = resolve_config(argparse.Namespace(**({"train.algorithm": algorithm} if algorithm else {})), s)
    assert (cfg.train.algorithm, cfg.train.adapter) == (algorithm or "rloo", "lora")
    assert (cfg.direct.batch_size, cfg.direct.max_steps, cfg.ppo.rollout_prompts) == (8, 4, 16)
    cfg = cfg.replace(ppo={"max_new_tokens": 8},
                      gate={"eval_responses": 4, "behaviour_answers": 4, "min_reward_gain": -1e9, "min_rm_auroc": 0.0})
    state = TrainerState.open(s, cfg)
    try:
        report = run_round(state, progress=False)
    finally:
        state.close()
    assert report.promoted and report.version == 1, report.reason
    if algorithm == "kto":
        assert report.train["steps"] == 4 and report.train["examples"] > 24  # 4 batches of 8 from the thumbs
    else:
        assert "pg_loss" in report.train and "vf_loss" not in report.train  # a policy gradient, and no critic
