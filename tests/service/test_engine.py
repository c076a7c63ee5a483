"""The engine in-process: batched decoding against HF `generate`, sampling, stop strings, seeds,
cancellation, backpressure, calls between steps, and two policy versions side by side."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import threading
import weakref
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import REGISTRY

from rlhf_loop.core.contracts import Settings
from rlhf_loop.core.models import load_causal_lm
from rlhf_loop.service.detokenizer import Detokenizer
from rlhf_loop.service.engine import Engine, EngineFull
from rlhf_loop.service.loaded import LoadedVersion
from rlhf_loop.service.request import SamplingParams
from rlhf_loop.service.sampler import nucleus, sample
from rlhf_loop.service.scheduler import Limits

PROMPT = [{"role": "user", "content": "Tell me about trains."}]
TOPICS = ["cats", "the old harbour and its boats", "rain", "coffee, tea and the morning", "dogs", "a long walk home"]


def load(path: str, version: int = 0) -> LoadedVersion:
    model, tok = load_causal_lm(path, Settings(device="cpu"))
    return LoadedVersion.of(version, model, tok)


@pytest.fixture(scope="module")
def loaded(base_model_dir) -> LoadedVersion:
    return load(base_model_dir)


def params(**kw) -> SamplingParams:
    base = dict(temperature=1.0, top_p=1.0, max_tokens=24, n=1, stop=(), seed=0)
    return SamplingParams(**{**base, **kw})


def engine(**limits) -> Engine:
    return Engine(Limits(**{"max_running_seqs": 64, "max_batched_tokens": 512, "max_waiting_requests": 64, **limits}))


async def answer(eng: Engine, loaded: LoadedVersion, prompt_ids: list[int],
                 p: SamplingParams) -> list[tuple[str, list[int], str]]:
    """(text, token ids, finish reason) per choice."""
    texts, ids, finish = [""] * p.n, [[] for _ in range(p.n)], [None] * p.n
    async for d in eng.stream(loaded, prompt_ids, p):
        assert finish[d.index] is None, "a choice went on after it finished"
        texts[d.index] += d.text
        ids[d.index] += d.token_ids
        finish[d.index] = d.finish_reason
    return list(zip(texts, ids, finish))


def run(loaded: LoadedVersion, p: SamplingParams, prompt=PROMPT, **limits):
    """One request alone on a fresh engine."""
    eng = engine(**limits)
    try:
        return asyncio.run(answer(eng, loaded, loaded.encode_chat(prompt), p))
    finally:
        eng.close()


def hf_greedy(loaded: LoadedVersion, prompt_ids: list[int], max_tokens: int) -> list[int]:
    out = loaded.model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_tokens,
                                pad_token_id=loaded.tokenizer.pad_token_id)[0, len(prompt_ids):].tolist()
    stop = next((i for i, t in enumerate(out) if t in loaded.eos_token_ids), len(out))
    return out[:stop]


def test_greedy_decoding_with_the_kv_cache_matches_hf_generate(loaded):
    prompt_ids = loaded.encode_chat(PROMPT)
    ((text, ids, finish),) = run(loaded, params(temperature=0.0, max_tokens=40))
    assert ids == hf_greedy(loaded, prompt_ids, 40)
    assert text == loaded.tokenizer.decode(ids, skip_special_tokens=True)
    assert finish == ("stop" if len(ids) < 40 else "length")


@pytest.mark.parametrize("shape", ["embedded", "llama-tiny", "gpt2-tiny"])
@pytest.mark.parametrize("max_batched_tokens", [512, 7])  # 7: every prompt is prefilled in chunks
def test_requests_batched_together_answer_as_each_would_alone(shape, max_batched_tokens, base_model_dir, random_model):
    """Prompts of different lengths, some arriving together, some joining a batch that is already
    decoding, left-padded into one batch: each answer is the one its request gets alone, so positions,
    masks and cache merges are right. Seeded sampling, because greedy decoding of a random-weight model
    repeats one token whatever the positions say."""
    pol = load(base_model_dir if shape == "embedded" else random_model(shape))
    prompts = [pol.encode_chat([{"role": "user", "content": f"Tell me about {t}."}]) for t in TOPICS]
    assert len({len(p) for p in prompts}) > 2
    ps = [params(seed=i, max_tokens=12 + 2 * i, n=1 + i % 2) for i in range(len(prompts))]
    eng = engine(max_batched_tokens=max_batched_tokens)

    async def main():
        first = [asyncio.create_task(answer(eng, pol, prompts[i], ps[i])) for i in range(3)]
        await asyncio.sleep(0.01)  # the rest join a batch that is already decoding
        rest = [asyncio.create_task(answer(eng, pol, prompts[i], ps[i])) for i in range(3, len(prompts))]
        return [await t for t in first + rest]

    try:
        together = asyncio.run(main())
    finally:
        eng.close()
    for i, result in enumerate(together):
        eng = engine()
        try:
            assert result == asyncio.run(answer(eng, pol, prompts[i], ps[i])), (shape, i)
        finally:
            eng.close()


def test_max_tokens_ends_an_answer_with_length(loaded):
    ((text, ids, finish),) = run(loaded, params(temperature=0.0, max_tokens=3))
    assert (len(ids), finish) == (3, "length")
    assert text == loaded.tokenizer.decode(ids, skip_special_tokens=True)


def test_a_seeded_request_alone_is_reproducible_and_n_choices_differ(loaded):
    p = params(seed=7, n=3, max_tokens=30, top_p=0.9)
    first = run(loaded, p)
    assert run(loaded, p) == first
    assert len({text for text, _, _ in first}) > 1, "the n choices should be sampled independently"
    assert run(loaded, dataclasses.replace(p, seed=8)) != first


def test_stop_strings_end_each_choice_and_are_cut_out(loaded):
    ((full, _, _),) = run(loaded, params(temperature=0.0, max_tokens=40))
    words = full.split()
    assert len(words) >= 4, full
    stop = " ".join(words[2:4])  # two words from the middle, spanning several tokens
    choices = run(loaded, params(temperature=0.0, max_tokens=40, n=2, stop=("zzz-never", stop)))
    assert [(text, finish) for text, _, finish in choices] == [(full[: full.index(stop)], "stop")] * 2


def test_detokenizer_holds_back_a_possible_stop_string(loaded):
    tok = loaded.tokenizer
    text = "Cats sleep for most of the day. Cats purr."
    detok = Detokenizer(tok, ("most of the",))
    shown, stopped = [], False
    for t in tok.encode(text, add_special_tokens=False):
        delta, stopped = detok.push(t)
        shown.append(delta)
        if stopped:
            break
    assert stopped and "".join(shown) == "Cats sleep for "
    assert not any("most" in s for s in shown), "a piece of the stop string leaked before it was complete"

    detok = Detokenizer(tok, ("day!",))  # "day" appears, "day!" never does: held back, then released
    out = "".join(detok.push(t)[0] for t in tok.encode(text, add_special_tokens=False)) + detok.flush()
    assert out == text


@pytest.mark.parametrize("shape", ["embedded", "llama-135m"])
def test_incremental_detokenization_equals_decoding_the_whole_answer(shape, base_model_dir, random_model):
    """Random ids split multi-byte characters across tokens and include special tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model_dir if shape == "embedded" else random_model(shape))
    # a token that ends in a byte no character continues, repeated: what a random model's greedy answer can be
    broken = next(i for i in range(len(tok)) if tok.decode([i, i, i]).count("\ufffd") == 3)
    g = torch.Generator().manual_seed(0)
    for k in range(20):
        ids = torch.randint(0, len(tok), (60,), generator=g).tolist() if k else [broken] * 12
        full = tok.decode(ids, skip_special_tokens=True)
        detok = Detokenizer(tok, ())
        deltas = [detok.push(t)[0] for t in ids]
        assert "".join(deltas) + detok.flush() == full
        assert "".join(deltas[:30]), "text must stream as it comes, not only at the end"
        stop = full[len(full) // 2: len(full) // 2 + 3]  # may hold U+FFFD: bytes that make no character
        detok = Detokenizer(tok, (stop,))
        shown = ""
        for t in ids:
            delta, stopped = detok.push(t)
            shown += delta
            if stopped:
                break
        assert (shown, stopped) == (full[: full.index(stop)], True)


def test_sampling_respects_temperature_zero_and_each_rows_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, -1)

    def rows(temperature: float, top_p: float, seed: int = 0) -> list:
        request = SimpleNamespace(params=SimpleNamespace(temperature=temperature, top_p=top_p),
                                  generator=torch.Generator().manual_seed(seed))
        return [SimpleNamespace(request=request)] * len(logits)

    assert set(sample(logits, rows(0.0, 1.0))) == {0}
    assert set(sample(logits, rows(1.0, 0.6))) == {0, 1}  # 0.5 < 0.6: token 1 completes the nucleus
    assert set(sample(logits, rows(1.0, 0.01))) == {0}
    assert set(sample(logits, rows(1.0, 1.0))) == {0, 1, 2, 3}
    mixed = rows(0.0, 1.0)[:2] + rows(1.0, 0.6)[:2]  # greedy and nucleus rows in one batch
    assert sample(logits[:4], mixed)[:2] == [0, 0]
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    assert torch.equal(nucleus(probs, torch.tensor([0.6, 1.0])), torch.tensor([[0.5, 0.3, 0.0], [0.5, 0.3, 0.2]]))


def test_a_client_that_leaves_frees_its_rows_and_the_rest_go_on(random_model):
    loaded = load(random_model("llama-tiny"))  # random weights: an answer runs to max_tokens, it never ends early
    eng = engine(max_running_seqs=2)
    prompt = loaded.encode_chat(PROMPT)
    cancelled = REGISTRY.get_sample_value("rlhf_engine_cancelled_total") or 0.0

    async def first_delta_then_leave() -> None:
        async with contextlib.aclosing(eng.stream(loaded, prompt, params(max_tokens=200, n=2))) as deltas:
            async for _ in deltas:
                break

    async def main():
        await first_delta_then_leave()
        # with room for two rows, these run only once the abandoned request's two rows are gone
        return await asyncio.wait_for(asyncio.gather(answer(eng, loaded, prompt, params(seed=1)),
                                                     answer(eng, loaded, prompt, params(seed=2))), timeout=120)

    try:
        a, b = asyncio.run(main())
        assert eng.runner.rows == 0 and not eng.runner.batches
    finally:
        eng.close()
    assert REGISTRY.get_sample_value("rlhf_engine_cancelled_total") == cancelled + 1
    assert (a, b) == (run(loaded, params(seed=1)), run(loaded, params(seed=2)))


def test_a_full_queue_refuses_at_once_and_calls_run_between_steps(loaded):
    eng = engine(max_waiting_requests=1)
    prompt = loaded.encode_chat(PROMPT)
    gate = threading.Event()
    held = eng.run_between_steps(gate.wait)  # the engine thread waits here: nothing leaves the queue

    async def main():
        first = eng.stream(loaded, prompt, params(seed=1))
        with pytest.raises(EngineFull):
            eng.stream(loaded, prompt, params(seed=2))
        gate.set()
        return [d async for d in first]

    try:
        deltas = asyncio.run(main())
        assert held.result(timeout=10) is True
        assert deltas and deltas[-1].finish_reason is not None
        assert eng.run_between_steps(lambda: eng.runner.rows).result(timeout=10) == 0
        with pytest.raises(ZeroDivisionError):
            eng.run_between_steps(lambda: 1 / 0).result(timeout=10)
    finally:
        eng.close()


def test_two_versions_run_side_by_side_and_the_old_one_is_freed(random_model):
    old, new = load(random_model("llama-tiny"), 0), load(random_model("llama-tiny", seed=1), 1)
    prompt = old.encode_chat(PROMPT)
    p = params(seed=5, max_tokens=60)
    alone = {v.version: run(v, p) for v in (old, new)}
    assert alone[0] != alone[1]
    eng = engine()

    async def main():
        tasks = [asyncio.create_task(answer(eng, v, prompt, p)) for v in (old, new, old, new)]
        batches = []
        while not all(t.done() for t in tasks):
            batches.append(await asyncio.wrap_future(eng.run_between_steps(lambda: len(eng.runner.batches))))
        return [t.result() for t in tasks], max(batches)

    try:
        results, most = asyncio.run(main())
        assert results == [alone[0], alone[1], alone[0], alone[1]], "an answer mixed versions"
        assert most == 2, "each version decodes in its own batch, side by side"
        gone = weakref.ref(old.model)
        del old, alone
        gc.collect()
        assert gone() is None, "the engine still holds the old version after its last request ended"
    finally:
        eng.close()


def test_a_failing_model_fails_its_requests_only(loaded):
    class Broken(torch.nn.Module):
        device, config = loaded.device, loaded.model.config

        def forward(self, **_):
            raise RuntimeError("out of memory (simulated)")

    broken = dataclasses.replace(loaded, version=9, model=Broken())
    eng = engine()
    prompt = loaded.encode_chat(PROMPT)

    async def main():
        bad = asyncio.create_task(answer(eng, broken, prompt, params()))
        good = asyncio.create_task(answer(eng, loaded, prompt, params(seed=3)))
        with pytest.raises(RuntimeError, match="simulated"):
            await bad
        return await good

    try:
        assert asyncio.run(main()) == run(loaded, params(seed=3))
    finally:
        eng.close()
