"""The generation engine in-process, on the embedded model: decode loop, sampling, stop strings, seeds."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest
import torch

from rlhf.contracts import Settings
from rlhf.models import load_causal_lm
from service.engine import Engine, Policy, SamplingParams, TextAssembler, generate, sample

PROMPT = [{"role": "user", "content": "Tell me about trains."}]


@pytest.fixture(scope="module")
def policy(base_model_dir) -> Policy:
    torch.set_num_threads(1)
    model, tok = load_causal_lm(base_model_dir, Settings(device="cpu"))
    return Policy.from_pretrained(0, model, tok)


def params(**kw) -> SamplingParams:
    base = dict(temperature=1.0, top_p=1.0, max_tokens=24, n=1, stop=(), seed=0)
    return SamplingParams(**{**base, **kw})


def run(policy: Policy, p: SamplingParams) -> list[tuple[str, list[int], str]]:
    """(text, token ids, finish reason) per choice."""
    texts, ids, finish = [""] * p.n, [[] for _ in range(p.n)], [None] * p.n
    for d in generate(policy, policy.encode_chat(PROMPT), p):
        texts[d.index] += d.text
        ids[d.index] += d.token_ids
        if d.finish_reason:
            assert finish[d.index] is None, "a choice finished twice"
            finish[d.index] = d.finish_reason
    return list(zip(texts, ids, finish))


def test_greedy_decoding_with_the_kv_cache_matches_hf_generate(policy):
    prompt_ids = policy.encode_chat(PROMPT)
    ((text, ids, finish),) = run(policy, params(temperature=0.0, max_tokens=40))
    ref = policy.model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=40,
                                pad_token_id=policy.tokenizer.pad_token_id)[0, len(prompt_ids):].tolist()
    ref = [t for t in ref if t not in policy.eos_token_ids and t != policy.tokenizer.pad_token_id]
    assert ids == ref
    assert text == policy.tokenizer.decode(ref, skip_special_tokens=True)
    assert finish == ("stop" if len(ids) < 40 else "length")


def test_max_tokens_ends_an_answer_with_length(policy):
    ((text, ids, finish),) = run(policy, params(temperature=0.0, max_tokens=3))
    assert (len(ids), finish) == (3, "length")
    assert text == policy.tokenizer.decode(ids, skip_special_tokens=True)


def test_the_same_seed_gives_the_same_answers_whatever_runs_alongside(policy):
    alone = run(policy, params(seed=7, n=2))
    results: dict[int, list] = {}

    def worker(i: int, seed: int) -> None:
        results[i] = run(policy, params(seed=seed, n=2))

    threads = [threading.Thread(target=worker, args=(i, s)) for i, s in enumerate([7, 8, 7, 9])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == alone and results[2] == alone
    answers = {tuple(c[0] for c in r) for r in results.values()}
    assert len(answers) >= 3, "different seeds should give different answers"


def test_n_choices_are_sampled_independently_from_one_prefill(policy):
    choices = run(policy, params(seed=3, n=4, max_tokens=30))
    assert len(choices) == 4 and all(f in ("stop", "length") for _, _, f in choices)
    assert len({text for text, _, _ in choices}) > 1


def test_stop_strings_end_the_answer_and_are_cut_out(policy):
    ((full, _, _),) = run(policy, params(temperature=0.0, max_tokens=40))
    words = full.split()
    assert len(words) >= 4, full
    stop = " ".join(words[2:4])  # two words from the middle, spanning several tokens
    ((text, ids, finish),) = run(policy, params(temperature=0.0, max_tokens=40, stop=("zzz-never", stop)))
    assert (text, finish) == (full[: full.index(stop)], "stop")
    assert stop not in text


def test_text_assembler_holds_back_a_possible_stop_string(policy):
    tok = policy.tokenizer
    text = "Cats sleep for most of the day. Cats purr."
    asm = TextAssembler(tok, ("most of the",))
    shown, stopped = [], False
    for t in tok.encode(text, add_special_tokens=False):
        delta, stopped = asm.push(t)
        shown.append(delta)
        if stopped:
            break
    assert stopped and "".join(shown) == "Cats sleep for "
    assert not any("most" in s for s in shown), "a piece of the stop string leaked before it was complete"

    asm = TextAssembler(tok, ("day!",))  # "day" appears, "day!" never does: held back, then released
    out = "".join(asm.push(t)[0] for t in tok.encode(text, add_special_tokens=False)) + asm.flush()
    assert out == text


def test_sampling_respects_temperature_zero_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, -1)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, 0.0, 1.0, g).tolist()) == {0}
    assert set(sample(logits, 1.0, 0.6, g).tolist()) == {0, 1}  # 0.5 < 0.6: token 1 completes the nucleus
    assert set(sample(logits, 1.0, 0.01, g).tolist()) == {0}
    assert set(sample(logits, 1.0, 1.0, g).tolist()) == {0, 1, 2, 3}


def test_engine_runs_requests_side_by_side_and_frees_a_thread_when_the_client_leaves(policy):
    engine = Engine(threads=1)
    prompt = policy.encode_chat(PROMPT)

    async def first_delta_then_leave() -> None:
        async with contextlib.aclosing(engine.stream(policy, prompt, params(max_tokens=200, temperature=0.0))) as s:
            async for _ in s:
                break

    async def full(seed: int) -> str:
        return "".join([d.text async for d in engine.stream(policy, prompt, params(seed=seed))])

    async def main() -> list[str]:
        await first_delta_then_leave()
        # with one thread, these finish only if the abandoned generation let go of it
        return await asyncio.wait_for(asyncio.gather(full(1), full(2)), timeout=120)

    try:
        a, b = asyncio.run(main())
    finally:
        engine.close()
    assert (a, b) == (run(policy, params(seed=1))[0][0], run(policy, params(seed=2))[0][0])
