"""The engine in-process: batched decoding against HF `generate`, sampling, stop strings, seeds,
cancellation, backpressure, calls between steps, and two policy versions side by side."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import math
import threading
import weakref
from types import SimpleNamespace

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
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
    """fp32: answers are compared token for token with HF generate and with the same request alone."""
    model, tok = load_causal_lm(path, Settings(device="cpu", dtype="float32"))
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
        request = SimpleNamespace(params=SimpleNamespace(temperature=temperature, top_p=top_p, top_logprobs=0),
                                  generator=torch.Generator().manual_seed(seed))
        return [SimpleNamespace(request=request)] * len(logits)

    def tokens(draws) -> list[int]:
        return [d.token_id for d in draws]

    assert set(tokens(sample(logits, rows(0.0, 1.0)))) == {0}
    assert set(tokens(sample(logits, rows(1.0, 0.6)))) == {0, 1}  # 0.5 < 0.6: token 1 completes the nucleus
    assert set(tokens(sample(logits, rows(1.0, 0.01)))) == {0}
    assert set(tokens(sample(logits, rows(1.0, 1.0)))) == {0, 1, 2, 3}
    mixed = rows(0.0, 1.0)[:2] + rows(1.0, 0.6)[:2]  # greedy and nucleus rows in one batch
    assert tokens(sample(logits[:4], mixed))[:2] == [0, 0]
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


# ---------------------------------------------------------------------------- one request's failure is its own
# Issue 22: schema-valid but numerically degenerate sampling parameters used to make the batched draw raise,
# which failed the whole step and left the requests of a prefill group without an end (a 504 after 300 s).

F32 = torch.finfo(torch.float32)
# every extreme the API's schema accepts (temperature in [0, 2], top_p in (0, 1]), and beyond it for temperature:
# the sampler takes any temperature >= 0
TEMPERATURES = [0.0, 5e-324, 1e-300, 1e-45, 1e-40, F32.smallest_normal, 1e-30, 1e-8, 1e-5, 2.0, 1e30, 3.5e38, 1e308]
TOP_PS = [5e-324, 1e-300, 1e-45, 1e-30, 1e-8, 0.5, 1 - 1e-9, 1.0]
temperatures = st.one_of(st.sampled_from(TEMPERATURES), st.floats(0.0, 2.0),
                         st.floats(min_value=0.0, allow_infinity=False))
top_ps = st.one_of(st.sampled_from(TOP_PS), st.floats(0.0, 1.0, exclude_min=True))


def rows_of(*requests: SimpleNamespace) -> list[SimpleNamespace]:
    """Batch rows (the sampler reads `row.request.params` and `row.request.generator`) for requests given as
    SimpleNamespace(temperature=, top_p=, seed=, n=, top_logprobs=)."""
    rows = []
    for r in requests:
        request = SimpleNamespace(params=SimpleNamespace(temperature=r.temperature, top_p=r.top_p,
                                                         top_logprobs=r.top_logprobs),
                                  generator=torch.Generator().manual_seed(r.seed))
        rows += [SimpleNamespace(request=request)] * r.n
    return rows


@settings(max_examples=150, deadline=None)
@given(requests=st.lists(st.builds(SimpleNamespace, temperature=temperatures, top_p=top_ps,
                                   seed=st.integers(-2**63, 2**63 - 1), n=st.integers(1, 3),
                                   top_logprobs=st.integers(0, 3)), min_size=1, max_size=5),
       scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4, 1e30, 1e38]), vocab=st.sampled_from([2, 7, 50, 1000]),
       masked=st.booleans(), broken=st.sampled_from([None, float("nan"), float("inf"), -float("inf")]),
       broken_at=st.floats(0.0, 1.0))
@example(requests=[SimpleNamespace(temperature=t, top_p=p, seed=0, n=1, top_logprobs=2) for t in TEMPERATURES
                   for p in TOP_PS],
         scale=1e38, vocab=50, masked=True, broken=float("nan"), broken_at=0.5)
def test_sampling_is_numerically_safe_for_every_parameter_and_a_broken_row_fails_alone(
        requests, scale, vocab, masked, broken, broken_at):
    """Any temperature >= 0 and top_p in (0, 1], over logits from tiny to float32's largest, some ruled out
    (-inf): every row gets a token that is not ruled out, the top one where the temperature or the nucleus
    leaves only it, with a finite log-prob <= 0 and top log-probs sorted, finite and <= 0; a broken row (a NaN,
    a +inf, or -inf everywhere) comes back None, and every other request draws exactly what it draws in a batch
    without the broken row's request."""
    rows = rows_of(*requests)
    owner = [j for j, r in enumerate(requests) for _ in range(r.n)]  # the request of each row
    g = torch.Generator().manual_seed(len(rows) * vocab)
    logits = (torch.randn(len(rows), vocab, generator=g, dtype=torch.float64) * scale).clamp(-F32.max, F32.max).float()
    if masked:
        logits[:, ::3] = -float("inf")  # every third token ruled out (never a whole row: column 1 stays)
    bad = None if broken is None else round(broken_at * (len(rows) - 1))
    if bad is not None:
        logits[bad, slice(None) if broken < 0 else 1] = broken  # -inf: everywhere, nothing is left to draw
    draws = sample(logits, rows)
    tokens = [None if d is None else d.token_id for d in draws]

    assert len(tokens) == len(rows)
    for i, (row, token) in enumerate(zip(rows, tokens)):
        if i == bad:
            assert token is None, "a broken row drew a token"
            continue
        assert isinstance(token, int) and 0 <= token < vocab and logits[i, token] > -float("inf")
        p = row.request.params
        assert math.isfinite(draws[i].logprob) and draws[i].logprob <= 1e-6, (draws[i], p)
        best = [lp for _, lp in draws[i].top]
        assert 1 <= len(best) <= p.top_logprobs if p.top_logprobs else best == []
        assert best == sorted(best, reverse=True) and all(math.isfinite(lp) and lp <= 1e-6 for lp in best)
        top = logits[i].max()
        # one token left to draw: a temperature that leaves all the mass on the top logit, or a nucleus that keeps
        # only the most likely token (not at a temperature so high that every probability is the same float)
        one_left = p.temperature < 1e-30 or (p.top_p < 0.5 / vocab and p.temperature <= 2.0 and scale >= 1.0)
        if one_left and int((logits[i] == top).sum()) == 1:
            assert logits[i, token] == top, ("one token is left to draw", p)
    if bad is not None:
        kept = [i for i in range(len(rows)) if owner[i] != owner[bad]]
        others = rows_of(*[r for j, r in enumerate(requests) if j != owner[bad]])
        assert sample(logits[kept], others) == [draws[i] for i in kept], "a broken row changed another's draw"


NORMAL = [("the old harbour and its boats", params(seed=11, n=2, temperature=0.8, top_p=0.9, max_tokens=8)),
          ("coffee, tea and the morning", params(temperature=0.0, max_tokens=8))]


def chat_prompt(pol: LoadedVersion, topic: str) -> list[int]:
    return pol.encode_chat([{"role": "user", "content": f"Tell me about {topic}."}])


@pytest.fixture(scope="module")
def beside(base_model_dir, random_model):
    """beside(shape) -> (the model, the NORMAL requests' answers on it, each alone), made once per module."""
    made: dict[str, tuple[LoadedVersion, list]] = {}

    def get(shape: str) -> tuple[LoadedVersion, list]:
        if shape not in made:
            pol = load(base_model_dir if shape == "embedded" else random_model(shape))
            made[shape] = pol, [run(pol, p, prompt=[{"role": "user", "content": f"Tell me about {topic}."}])
                                for topic, p in NORMAL]
        return made[shape]

    return get


class Errors(logging.Handler):
    """The engine's error log lines (a failed step, a failed request), kept."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def submit_together(eng: Engine, jobs: list[tuple[LoadedVersion, list[int], SamplingParams]]) -> list:
    """Queue every job while the engine thread waits, so that they start in one prefill group and decode in
    one batch; each job's (text, token ids, finish reason) per choice, or the exception it ended with."""
    gate = threading.Event()
    held = eng.run_between_steps(gate.wait)

    async def collect(deltas, n: int):
        texts, ids, finish = [""] * n, [[] for _ in range(n)], [None] * n
        async for d in deltas:
            assert finish[d.index] is None, "a choice went on after it finished"
            texts[d.index] += d.text
            ids[d.index] += d.token_ids
            finish[d.index] = d.finish_reason
        return list(zip(texts, ids, finish))

    async def main():
        streams = [eng.stream(pol, prompt, p) for pol, prompt, p in jobs]
        gate.set()
        return await asyncio.gather(*(collect(s, p.n) for s, (_, _, p) in zip(streams, jobs)), return_exceptions=True)

    results = asyncio.run(main())
    assert held.result(timeout=10) is True
    return results


def degenerate(max_tokens: int):
    """(sampling parameters anywhere in what the schema accepts and beyond, a topic)"""
    return st.tuples(st.builds(lambda t, p, seed, n, m: params(temperature=t, top_p=p, seed=seed, n=n, max_tokens=m),
                               temperatures, top_ps, st.integers(-2**63, 2**63 - 1), st.integers(1, 3),
                               st.integers(1, max_tokens)),
                     st.sampled_from(TOPICS))


@pytest.mark.parametrize("shape, examples, max_tokens", [
    ("embedded", 40, 12),
    pytest.param("llama-135m", 4, 4, marks=pytest.mark.timeout(900)),  # SmolLM-135M's shape: seconds per example
])
def test_degenerate_sampling_parameters_beside_normal_requests_in_one_batch(beside, shape, examples, max_tokens):
    """Requests with any temperature >= 0 and top_p in (0, 1] share a prefill group and a decode batch with
    normal ones: every request ends with a finish reason, the normal ones answer exactly as alone, and the
    engine logs no error (nothing failed) and its thread lives on."""
    pol, alone = beside(shape)
    engine_log = logging.getLogger("rlhf_loop.service.engine")

    @settings(max_examples=examples, deadline=None)
    @given(odd=st.lists(degenerate(max_tokens), min_size=1, max_size=4))
    @example(odd=[(params(temperature=5e-324, top_p=1e-300, n=3, max_tokens=max_tokens), "rain"),
                  (params(temperature=1e308, top_p=1.0, max_tokens=max_tokens), "dogs"),
                  (params(temperature=1e-40, top_p=0.5, n=2, max_tokens=max_tokens), "cats"),
                  (params(temperature=2.0, top_p=5e-324, max_tokens=max_tokens), "rain")])
    def sweep(odd):
        jobs = [(pol, chat_prompt(pol, t), p) for t, p in NORMAL] + [(pol, chat_prompt(pol, t), p) for p, t in odd]
        errors = Errors()
        engine_log.addHandler(errors)
        eng = engine()
        try:
            results = submit_together(eng, jobs)
            assert eng._thread.is_alive()
        finally:
            eng.close()
            engine_log.removeHandler(errors)
        assert results[:len(NORMAL)] == alone, "a normal request's answer changed beside degenerate ones"
        for (p, _), result in zip(odd, results[len(NORMAL):]):
            assert not isinstance(result, BaseException), (p, result)
            for _, ids, finish in result:
                assert finish == ("length" if len(ids) == p.max_tokens else "stop") and len(ids) <= p.max_tokens, p
        assert not errors.records, [r.getMessage() for r in errors.records]

    sweep()


class PoisonFrom(torch.nn.Module):
    """A model whose logits are NaN for every row at or beyond `position` (what a forward that overflows does)."""

    def __init__(self, model, position: int):
        super().__init__()
        self.inner, self.position = model, position
        self.config = model.config

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def forward(self, **kw):
        out = self.inner(**kw)
        out.logits[kw["position_ids"][:, -1] >= self.position] = float("nan")
        return out


def test_a_row_with_non_finite_logits_fails_its_request_alone(beside):
    """One prefill group, then one decode batch: the NORMAL requests never reach the poisoned position; a
    prompt that ends just before it reaches it at its third token (in the decode batch), one that ends past
    it at its first (in the prefill group). Each broken request ends with a clear error, at once; the
    others answer as alone, and nothing is left in the engine."""
    pol, alone = beside("embedded")
    prompts = [chat_prompt(pol, topic) for topic, _ in NORMAL]
    position = max(len(ids) + p.max_tokens for ids, (_, p) in zip(prompts, NORMAL))  # beyond what NORMAL feeds
    filler = prompts[0] * (2 + position // len(prompts[0]))  # any tokens will do
    poisoned = dataclasses.replace(pol, model=PoisonFrom(pol.model, position))
    jobs = [(poisoned, ids, p) for ids, (_, p) in zip(prompts, NORMAL)]
    jobs += [(poisoned, filler[:position - 2], params(max_tokens=30, n=2)),
             (poisoned, filler[:position + 5], params(max_tokens=30, temperature=0.0))]
    eng = engine()
    try:
        results = submit_together(eng, jobs)
        assert results[:len(NORMAL)] == alone
        for failed in results[len(NORMAL):]:
            assert isinstance(failed, FloatingPointError) and "not finite" in str(failed), failed
        assert eng.run_between_steps(lambda: (eng.runner.rows, len(eng._live))).result(timeout=10) == (0, 0)
    finally:
        eng.close()


def test_an_error_in_one_requests_detokenizer_fails_it_alone(beside, monkeypatch):
    """A bug that trips on one request's text (here: on a stop string it carries) fails that request, and only
    it, in the middle of a batch."""
    pol, alone = beside("embedded")
    push = Detokenizer.push

    def trips(self, token_id):
        if "\N{COLLISION SYMBOL}" in self.stop:
            raise ValueError("a detokenizer bug (simulated)")
        return push(self, token_id)

    monkeypatch.setattr(Detokenizer, "push", trips)
    jobs = [(pol, chat_prompt(pol, topic), p) for topic, p in NORMAL]
    jobs.insert(1, (pol, jobs[0][1], params(n=2, stop=("\N{COLLISION SYMBOL}",))))
    eng = engine()
    try:
        results = submit_together(eng, jobs)
    finally:
        eng.close()
    assert [results[0], results[2]] == alone
    assert isinstance(results[1], ValueError) and "simulated" in str(results[1])


@pytest.mark.timeout(120)
def test_a_step_that_fails_outside_any_request_ends_every_request_and_the_engine_goes_on(loaded, monkeypatch):
    """A bug in the engine's own bookkeeping (here: starting the rows of a complete prefill) fails the step:
    every request the engine holds ends with the error, including those whose prefill was done but whose rows
    had not joined a batch yet (they used to be nobody's: their clients waited for ever); the next request
    is served as usual."""
    from rlhf_loop.service.runner import ModelRunner

    start = ModelRunner.start
    broken = {"once": True}

    def start_once_broken(self, *args):
        if broken.pop("once", False):
            raise RuntimeError("a bookkeeping bug (simulated)")
        return start(self, *args)

    monkeypatch.setattr(ModelRunner, "start", start_once_broken)
    prompt = loaded.encode_chat(PROMPT)
    eng = engine()
    try:
        results = submit_together(eng, [(loaded, prompt, params(seed=s, max_tokens=20)) for s in range(3)])
        assert all(isinstance(r, RuntimeError) and "simulated" in str(r) for r in results), results
        assert asyncio.run(answer(eng, loaded, prompt, params(seed=1))) == run(loaded, params(seed=1))
    finally:
        eng.close()
