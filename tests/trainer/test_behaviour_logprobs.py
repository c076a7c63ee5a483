"""rollout.behaviour_gap: the voted answers' recorded log-probs (Interaction.completion_logprobs, in the label store
as store.Behaviour) against the current policy's, on a real architecture loaded through from_pretrained."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_loop.core.contracts import Settings
from rlhf_loop.core.models import load_causal_lm
from rlhf_loop.trainer.dist import Dist
from rlhf_loop.trainer.rollout import behaviour_gap
from rlhf_loop.trainer.store import Behaviour, Example

PROMPTS = ["Tell me about cats.", "Rain again?", "What is a harbour, and why do boats stay in it?"]


def recorded(model, tokenizer, messages, version: int, temperature: float, seed: int, top_p: float = 1.0) -> Example:
    """An answer `model` samples at `temperature`, with its log-probs as the service records them (teacher-forced
    here, in one forward, fp64 log-softmax: independent of the code under test)."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    g = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
            ids.append(int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g)))
        answer = ids[len(prompt):]
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, len(prompt) - 1:-1].double()
                                 / temperature, -1)
    logprobs = tuple(logp[i, t].item() for i, t in enumerate(answer))
    return Example(f"r{seed}", 0, "k", messages, "", 1.0, 1.0, version,
                   Behaviour(tuple(answer), logprobs, temperature, top_p))


@pytest.fixture(scope="module")
def llama(random_model):
    return load_causal_lm(random_model("llama-tiny"), Settings(device="cpu", dtype="float32"))


def test_answers_of_the_current_version_match_and_older_ones_measure_the_kl(llama, random_model):
    model, tok = llama
    older, _ = load_causal_lm(random_model("llama-tiny", seed=1), Settings(device="cpu", dtype="float32"))
    mine = [recorded(model, tok, [{"role": "user", "content": p}], 3, t, i)
            for i, (p, t) in enumerate(zip(PROMPTS, (1.0, 0.7, 1.3)))]
    theirs = [recorded(older, tok, [{"role": "user", "content": p}], 2, 0.8, 10 + i) for i, p in enumerate(PROMPTS)]
    skipped = [recorded(older, tok, [{"role": "user", "content": PROMPTS[0]}], 2, 1.0, 20, top_p=0.9),
               Example("old", 0, "k", [{"role": "user", "content": "hi"}], "x", 1.0, 1.0, 1, None)]
    gap = behaviour_gap(model, tok, mine + theirs + skipped, 3, max_answers=64, max_prompt_tokens=512, batch_size=2,
                        autocast_dtype=torch.float32, dist=Dist())
    assert gap.onpolicy_answers == 3 and gap.onpolicy_max_gap < 1e-4
    # KL(behaviour || current) per token, from the test's own forward of the current policy
    diffs = []
    for e in theirs:
        prompt = list(tok.apply_chat_template(e.messages, add_generation_prompt=True, tokenize=True, return_dict=False))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + list(e.behaviour.token_ids)])).logits[0, len(prompt) - 1:-1]
        logp = torch.log_softmax(logits.double() / 0.8, -1)
        diffs += [b - logp[i, t].item() for i, (t, b) in enumerate(zip(e.behaviour.token_ids, e.behaviour.logprobs))]
    assert gap.offpolicy_answers == 3
    # random weights answer near-uniformly: two such models are close (a KL of ~4e-4 per token), so tightly
    assert gap.offpolicy_kl == pytest.approx(sum(diffs) / len(diffs), rel=1e-3) and gap.offpolicy_kl != 0
    assert 1 / 3 - 1e-9 <= gap.offpolicy_ess <= 1.0


def test_without_recorded_answers_every_figure_is_absent(llama):
    model, tok = llama
    gap = behaviour_gap(model, tok, [], 0, max_answers=64, max_prompt_tokens=512, batch_size=2,
                        autocast_dtype=torch.float32, dist=Dist())
    assert (gap.onpolicy_answers, gap.offpolicy_answers) == (0, 0)
    assert math.isnan(gap.onpolicy_max_gap) and math.isnan(gap.offpolicy_kl) and math.isnan(gap.offpolicy_ess)
