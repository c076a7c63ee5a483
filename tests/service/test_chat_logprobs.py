"""`logprobs` / `top_logprobs` on chat completions: the engine's numbers against a teacher-forced reference
from the same checkpoint (`from_pretrained`), through the official openai client against a real `bentoml serve`,
plain and streamed, and the Interaction on the broker carrying `completion_logprobs` for every request."""

from __future__ import annotations

import asyncio
import math

import httpx
import pytest
import torch
from service_helpers import API_KEY, MODEL, chat, read_events

from rlhf_loop.core.contracts import Interaction, Settings
from rlhf_loop.core.models import load_causal_lm
from rlhf_loop.service.detokenizer import TokenBytes
from rlhf_loop.service.engine import Engine
from rlhf_loop.service.loaded import LoadedVersion
from rlhf_loop.service.request import SamplingParams
from rlhf_loop.service.scheduler import Limits

AUTH = {"Authorization": f"Bearer {API_KEY}"}
TOL = 1e-4  # fp32: the engine's batched, KV-cached forward against one full forward of the same weights


def reference_logprobs(model, prompt_ids: list[int], token_ids: list[int], temperature: float,
                       top_p: float = 1.0) -> torch.Tensor:
    """(R, V) teacher-forced log-probs of the distributions the answer's R tokens were drawn from: log-softmax of
    logits / temperature (temperature 0: the raw logits), renormalised over each position's nucleus (-inf outside),
    as service/sampler.py documents them."""
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].double()  # (R, V)
    logp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
    if top_p < 1.0:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()  # mass of the more likely tokens
        keep = torch.zeros_like(logp, dtype=torch.bool).scatter(-1, order, before < top_p)
        logp = torch.where(keep, logp, -math.inf)
        logp = logp - torch.logsumexp(logp, dim=-1, keepdim=True)
    return logp


def check_against_reference(content, token_ids: list[int], ref: torch.Tensor, token_bytes: TokenBytes, k: int):
    """Each entry of `content` (OpenAI's logprobs.content) is token_ids[i] with the reference's log-prob, and its
    top_logprobs are the reference's k best (those with a finite log-prob), sorted, with their bytes."""
    assert len(content) == len(token_ids) == ref.shape[0]
    for i, (entry, token) in enumerate(zip(content, token_ids)):
        assert bytes(entry.bytes) == token_bytes(token) and entry.token == token_bytes.text(token)
        assert entry.logprob == pytest.approx(ref[i, token].item(), abs=TOL), i
        want = ref[i].topk(k)
        want = [(t, v) for t, v in zip(want.indices.tolist(), want.values.tolist()) if v > -math.inf]
        got = [e.logprob for e in entry.top_logprobs]
        assert got == sorted(got, reverse=True) and len(got) == len(want), i
        assert got == pytest.approx([v for _, v in want], abs=TOL), i
        assert bytes(entry.top_logprobs[0].bytes) == token_bytes(want[0][0]), i
        # the chosen token, when among the best, has its own log-prob there
        assert all(e.logprob == entry.logprob for e in entry.top_logprobs if bytes(e.bytes) == bytes(entry.bytes))


@pytest.fixture(scope="module")
def reference(base_model_dir):
    """The served checkpoint through `from_pretrained`, fp32 (the service's dtype on CPU)."""
    model, tokenizer = load_causal_lm(base_model_dir, Settings(device="cpu", dtype="float32"))
    return model, TokenBytes(tokenizer)


def interaction_of(module_broker, response_id: str, n: int = 1) -> list[Interaction]:
    events = read_events(module_broker.bootstrap, ["rlhf.interactions"],
                         until=lambda evs: sum(e.response_id == response_id for e in evs) >= n)
    return sorted((e for e in events if e.response_id == response_id), key=lambda e: e.choice_index)


# ---------------------------------------------------------------------------- through the API


@pytest.mark.parametrize("temperature, top_p", [(0.7, 1.0), (1.3, 0.6), (0.0, 1.0)])
def test_logprobs_are_those_of_the_distribution_each_token_was_drawn_from(service, module_broker, reference,
                                                                          temperature, top_p):
    """Sampled: log-softmax(logits / T) renormalised over the nucleus; greedy: the raw log-softmax. The
    Interaction on the broker carries the same numbers as `completion_logprobs`."""
    model, token_bytes = reference
    k = 20 if top_p < 1.0 else 5  # 20 against a nucleus: fewer come back where the nucleus is smaller
    r = chat(service.openai(), max_tokens=16, n=2, seed=9, temperature=temperature, top_p=top_p, logprobs=True,
             top_logprobs=k)
    interactions = interaction_of(module_broker, r.id, 2)
    assert len(interactions) == 2
    for c, event in zip(r.choices, interactions):
        assert c.logprobs.refusal is None
        ref = reference_logprobs(model, event.prompt_token_ids, event.completion_token_ids, temperature, top_p)
        check_against_reference(c.logprobs.content, event.completion_token_ids, ref, token_bytes, k)
        assert event.completion_logprobs == [e.logprob for e in c.logprobs.content]
        assert b"".join(bytes(e.bytes) for e in c.logprobs.content).decode() == c.message.content
        if temperature == 0:  # greedy: the chosen token is the most likely one
            assert all(e.top_logprobs[0].logprob == e.logprob for e in c.logprobs.content)
    if top_p < 1.0:  # a nucleus listed whole (fewer than asked) holds all the mass: renormalised
        whole = [e for c in r.choices for e in c.logprobs.content if len(e.top_logprobs) < k]
        assert whole, "no position had a nucleus smaller than 20 tokens"
        assert all(sum(math.exp(t.logprob) for t in e.top_logprobs) == pytest.approx(1.0, abs=1e-4) for e in whole)


def test_streamed_chunks_carry_the_logprobs_of_their_own_tokens(service):
    client = service.openai()
    kw = dict(max_tokens=20, n=2, seed=4, temperature=0.9, logprobs=True, top_logprobs=3)
    plain = chat(client, **kw)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me about cats."}], stream=True, **kw))
    for c in plain.choices:
        mine = [ch.choices[0] for ch in chunks if ch.choices and ch.choices[0].index == c.index]
        assert mine[0].delta.role == "assistant" and mine[0].logprobs is None
        with_tokens = [x for x in mine if x.logprobs is not None]
        streamed = [e for x in with_tokens for e in x.logprobs.content]
        assert [e.model_dump() for e in streamed] == [e.model_dump() for e in c.logprobs.content]
        for x in with_tokens:  # a chunk's text is what its tokens' bytes add (a split character waits for its end)
            assert x.logprobs.refusal is None and x.delta.content is not None
        assert "".join(x.delta.content or "" for x in mine) == c.message.content


def test_without_logprobs_the_answer_has_none_but_its_interaction_does(service, module_broker):
    r = chat(service.openai(), max_tokens=12, seed=2)
    assert r.choices[0].logprobs is None
    (event,) = interaction_of(module_broker, r.id)
    assert len(event.completion_logprobs) == len(event.completion_token_ids) == r.usage.completion_tokens
    assert all(math.isfinite(x) and x <= 0 for x in event.completion_logprobs)


@pytest.mark.parametrize("body, param", [
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true, as OpenAI
    ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 2.0}, "top_logprobs"),
    ({"logprobs": "true"}, "logprobs"),
])
def test_bad_logprobs_parameters_are_400_in_openais_shape(service, body, param):
    before = service.metric("rlhf_completions_total")
    r = httpx.post(f"{service.url}/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == "invalid_value"
    assert service.metric("rlhf_completions_total") == before  # nothing generated, nothing logged


# ---------------------------------------------------------------------------- the engine, on a real-shaped model


def test_the_engine_reports_logprobs_on_a_135m_llama(random_model):
    """SmolLM-135M's shape (vocab 49152, 30 layers): two requests batched together, one asking for top_logprobs
    and one not (it gets only its tokens' log-probs), against one teacher-forced forward each."""
    model, tokenizer = load_causal_lm(random_model("llama-135m"), Settings(device="cpu", dtype="float32"))
    loaded = LoadedVersion.of(0, model, tokenizer)
    prompts = [loaded.encode_chat([{"role": "user", "content": t}]) for t in ("Tell me about cats.", "Rain?")]
    ps = [SamplingParams(temperature=0.8, top_p=1.0, max_tokens=6, n=1, stop=(), seed=1, top_logprobs=4),
          SamplingParams(temperature=0.0, top_p=1.0, max_tokens=6, n=1, stop=(), seed=2)]
    eng = Engine(Limits(max_running_seqs=8, max_batched_tokens=512, max_waiting_requests=8))

    async def answer(prompt, p):
        ids, lps, tops = [], [], []
        async for d in eng.stream(loaded, prompt, p):
            ids += d.token_ids
            lps += d.logprobs
            tops += d.top_logprobs
        return ids, lps, tops

    async def both():
        return await asyncio.gather(*(answer(prompt, p) for prompt, p in zip(prompts, ps)))

    try:
        results = asyncio.run(both())
    finally:
        eng.close()
    for prompt, p, (ids, lps, tops) in zip(prompts, ps, results):
        assert ids and len(lps) == len(ids)
        ref = reference_logprobs(model, prompt, ids, p.temperature)
        assert lps == pytest.approx([ref[i, t].item() for i, t in enumerate(ids)], abs=TOL)
        if p.top_logprobs:
            assert len(tops) == len(ids)
            for i, top in enumerate(tops):
                want = ref[i].topk(p.top_logprobs)
                assert [t for t, _ in top] == want.indices.tolist()
                assert [v for _, v in top] == pytest.approx(want.values.tolist(), abs=TOL)
        else:
            assert tops == []


@pytest.mark.parametrize("shape", ["embedded", "llama-135m"])
def test_token_bytes_join_into_the_text_multibyte_characters_included(shape, base_model_dir, random_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir if shape == "embedded" else random_model("llama-135m"))
    token_bytes = TokenBytes(tokenizer)
    text = "Hello wörld, café ☕ 日本語 🎉 done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any(token_bytes.text(i).endswith("\ufffd") for i in ids), "no character was split across tokens"
    assert b"".join(token_bytes(i) for i in ids).decode() == text
    assert token_bytes(tokenizer.eos_token_id) == tokenizer.eos_token.encode()
