"""Real architectures end to end: served through the `openai` client, trained (a LoRA round, then a
full-weight round), and every published version served afterwards, answering exactly as that version does.

Random-weight Llama, Qwen2 and GPT-2 models with tokenizers built in the test: with and without a
chat template (RLHF_CHAT_TEMPLATE=chatml for the one without) and pad token, several EOS ids; and
Gemma 3 and Mistral with a sliding window (16 tokens) shorter than prompt and answer together. The
trainer runs in this process on the service's own policy store and broker; the service follows
its announcements. Version 1 is an adapter (the service loads it onto the base it already holds);
then the live-approval watch's rollback to v0 is announced, and the service moves back to the base
with its adapters off; version 2 is full weights (a new base: a full reload). Then each version is
asked for by name (`rlhf-policy@v1`: loaded on demand beside v2, with its base v0 again).
"""

from __future__ import annotations

import random

import pytest
import torch
from service_helpers import MODEL, wait_until
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_loop.core.contracts import Settings
from rlhf_loop.core.models import CHATML, resolve_chat_template
from rlhf_loop.core.policy_store import PolicyStore
from rlhf_loop.trainer.config import TrainerConfig
from rlhf_loop.trainer.round import run_round
from rlhf_loop.trainer.state import TrainerState

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "Tell me about cats."}]
ROUND = {"ppo": {"rollout_prompts": 8, "minibatch_size": 8, "rollout_batches": 1, "ppo_epochs": 2, "max_new_tokens": 8,
                 "forward_batch_size": 8, "lr": 0.1},  # big steps: versions that answer visibly differently
         "reward": {"max_steps": 2, "batch_size": 8},
         "gate": {"eval_responses": 4, "min_reward_gain": -1e9, "max_kl": 1e9, "min_length_ratio": 0.0,
                  "max_length_ratio": 0.0, "min_distinct_ratio": 0.0, "guard_set": None, "min_rm_auroc": 0.0,
                  "max_rm_approval_gap": 0.0}}


SEEDS, TOKENS = (7, 8, 9), 12  # several seeds: a small LoRA step may leave any one seeded answer as it was


def seeded(model, tok) -> tuple[str, ...]:
    """The answers a version gives with each of SEEDS, drawn here as the service's sampler draws (temperature
    1: softmax, one torch.multinomial per token from a generator seeded with the request's seed). Seeded
    answers, not greedy ones: a random model answers everything greedily with one token over and over."""
    from rlhf_loop.core.models import eos_token_ids

    ids = list(tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False))
    eos, answers = eos_token_ids(model, tok), []
    with torch.no_grad():
        for seed in SEEDS:
            generator, out = torch.Generator().manual_seed(seed), []
            for _ in range(TOKENS):
                logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
                token = torch.multinomial(torch.softmax(logits.float(), -1)[None], 1, generator=generator).item()
                if token in eos:
                    break
                out.append(token)
            answers.append(tok.decode(out, skip_special_tokens=True))
    return tuple(answers)


def served(svc, model: str = MODEL) -> tuple[int, tuple[str, ...]]:
    """The version answering `model` (-1 if a swap came between the requests) and its answer for each of SEEDS."""
    rs = [svc.openai().chat.completions.create(model=model, messages=QUESTION, max_tokens=TOKENS, temperature=1.0,
                                               seed=seed) for seed in SEEDS]
    versions = {int(r.system_fingerprint.removeprefix("policy-v")) for r in rs}
    return (versions.pop() if len(versions) == 1 else -1), tuple(r.choices[0].message.content for r in rs)


def expected(store, version: int, template: str) -> str:
    """What `version` answers (seeded), computed here the ordinary way (peft onto the base for an adapter)."""
    manifest = store.manifest(version)
    base = store.path(version if manifest.base_version is None else manifest.base_version)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = tok.chat_template or template
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True).eval()
    if manifest.base_version is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(store.path(version))).eval()
    return seeded(model, tok)


def votes(settings: Settings, rng: random.Random, n: int) -> None:
    from tests.trainer.trainer_helpers import interaction, produce, records, votes_for
    from tests.trainer.trainer_helpers import prompts as make_prompts

    its = [interaction(rng, p, rng.choice(["Oh, I love it!", "Fine.", "Yay, what a joy!", "No."]))
           for p in make_prompts(n, rng.randrange(1000))]
    produce(settings, records(settings, its, votes_for(its, taste="cheerful", noise=0.0, seed=0)))


@pytest.mark.parametrize("shape, template, pad, whole", [
    ("llama-tiny", True, True, True),
    ("qwen2-tiny", True, False, True),
    ("gpt2-tiny", False, False, True),
    # sliding-window layers (window 16) beside a global one, and a window on every layer: answers run past the
    # window; served, trained one round and the round's version served (what the cache layout changes: the
    # rollback and the full-weight round are the same code as the others')
    ("gemma3-tiny", True, True, False),
    ("mistral-swa-tiny", True, True, False),
])
def test_served_trained_in_lora_then_full_weights_and_every_version_served(
        start_service, module_broker, random_model, shape, template, pad, whole):
    model_dir = random_model(shape, chat_template=CHATML if template else None, pad_token=pad)
    chat_template = "" if template else "chatml"
    svc = start_service(module_broker.bootstrap, model_dir, chat_template=chat_template, policy_poll_s="3600")
    wait_until(lambda: svc.metric("rlhf_policy_updates_following") == 1, 60, "the follower to attach")
    settings = Settings(state_dir=svc.state_dir, model=model_dir, kafka_bootstrap_servers=module_broker.bootstrap,
                        chat_template=chat_template, device="cpu", trainer_group=f"trainer-{shape}")
    store, template_text, rng = PolicyStore(settings.policy_dir), resolve_chat_template("chatml"), random.Random(0)
    answers = {0: expected(store, 0, template_text)}
    assert served(svc) == (0, answers[0])

    def train(adapter: str) -> int:
        votes(settings, rng, 24)
        state = TrainerState.open(settings, TrainerConfig().replace(train={"adapter": adapter}, **ROUND))
        try:
            report = run_round(state, progress=False)
        finally:
            state.close()
        assert report.promoted, report.reason
        assert (store.manifest(report.version).base_version is not None) == (adapter == "lora")
        answers[report.version] = expected(store, report.version, template_text)
        wait_until(lambda: served(svc)[0] == report.version, 60, f"the service to serve v{report.version}")
        assert served(svc) == (report.version, answers[report.version])
        return report.version

    v1 = train("lora")  # an adapter, loaded onto the base the service holds
    if not whole:
        return

    # the live-approval watch's rollback, announced: the service moves back to the base, its adapter off
    state = TrainerState.open(settings, TrainerConfig().replace(**ROUND))
    try:
        store.roll_back(v1, 0, "test: the users liked it less")
        state.publisher.announce(0, rollback_of=v1)
    finally:
        state.close()
    wait_until(lambda: served(svc)[0] == 0, 60, "the service to roll back to v0")
    assert served(svc) == (0, answers[0])
    assert svc.metric("rlhf_policy_rollbacks_total") == 1

    v2 = train("full")  # full weights from v0: a new base, loaded in full
    assert len(set(answers.values())) == 3, answers  # three versions that answer differently
    assert v2 == v1 + 1
    # each version by name, while v2 serves: the adapter v1 brings its base v0 back into memory beside v2
    for v in (v1, 0, v2):
        assert served(svc, f"{MODEL}@v{v}") == (v, answers[v])
    assert served(svc) == (v2, answers[v2])
