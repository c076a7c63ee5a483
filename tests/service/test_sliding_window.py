"""Sliding-window models in the engine (Gemma 3's local + global layers, Mistral's window on every layer),
with a window of 16 tokens so that prompts and answers run past it; and a model whose cache the engine
cannot batch, refused when it is loaded, before the replica is ready.

The runner's cache layout (service/runner.py) keeps a sliding layer's last `window - 1` columns and lets the
model's own mask code place the window. Checked here: every decode step's logits against the model's own
forward over each row's whole sequence (no cache), while rows join with other prompt lengths, leave, and
leading columns are cut; greedy answers against HF `generate`; batched answers against the same requests
alone. Served and trained end to end: tests/service/test_serve_real_models.py.
"""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace

import httpx
import pytest
import torch
from service_helpers import API_KEY, MODEL, wait_until
from transformers import AutoConfig

from rlhf_loop.core.broker import free_port
from rlhf_loop.core.contracts import Settings
from rlhf_loop.core.models import load_causal_lm
from rlhf_loop.service import serve
from rlhf_loop.service.engine import Engine
from rlhf_loop.service.loaded import LoadedVersion
from rlhf_loop.service.request import SamplingParams
from rlhf_loop.service.runner import ModelRunner, Prefill, cannot_batch
from rlhf_loop.service.scheduler import Limits

SLIDING = ["gemma3-tiny", "mistral-swa-tiny"]
WINDOW = 16  # both shapes' sliding_window
TOPICS = ["cats", "the old harbour and its boats, the gulls and the fishermen who mend their nets at dawn", "rain",
          "coffee, tea and the morning", "a long walk home"]


def load(path: str) -> LoadedVersion:
    model, tok = load_causal_lm(path, Settings(device="cpu"))
    assert model.config.sliding_window == WINDOW
    return LoadedVersion.of(0, model, tok)


def prompt(loaded: LoadedVersion, topic: str) -> list[int]:
    return loaded.encode_chat([{"role": "user", "content": f"Tell me about {topic}."}])


def engine(**limits) -> Engine:
    return Engine(Limits(**{"max_running_seqs": 64, "max_batched_tokens": 512, "max_waiting_requests": 64, **limits}))


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "top_p": 1.0, "max_tokens": 40, "n": 1, "stop": (), "seed": 0, **kw})


async def answer(eng: Engine, loaded: LoadedVersion, prompt_ids: list[int], p: SamplingParams) -> list[list[int]]:
    """Each choice's token ids."""
    ids: list[list[int]] = [[] for _ in range(p.n)]
    async for d in eng.stream(loaded, prompt_ids, p):
        ids[d.index] += d.token_ids
    return ids


def alone(loaded: LoadedVersion, prompt_ids: list[int], p: SamplingParams) -> list[list[int]]:
    eng = engine()
    try:
        return asyncio.run(answer(eng, loaded, prompt_ids, p))
    finally:
        eng.close()


@pytest.mark.parametrize("shape", SLIDING)
def test_every_step_past_the_window_is_the_models_own_forward(shape, random_model):
    """The runner driven by hand: two prompts prefilled together in chunks (one of them decoding as two rows),
    a longer prompt joining the running batch, its rows then leaving (which cuts leading columns), every row
    decoding well past the window. Each step's logits are the model's own for that row's whole sequence."""
    loaded = load(random_model(shape))
    g = torch.Generator().manual_seed(0)
    tokens = lambda n: torch.randint(3, 1000, (n,), generator=g).tolist()  # noqa: E731
    runner = ModelRunner()
    rows: list[SimpleNamespace] = []  # .token_ids: the row's whole sequence, prompt included

    def prefill(prompts: list[list[int]], origin: list[int], chunk: int) -> None:
        group = Prefill.of([SimpleNamespace(loaded=loaded, prompt_ids=p) for p in prompts])
        while (logits := runner.prefill(group, chunk)) is None:
            pass
        new = [SimpleNamespace(token_ids=list(prompts[i])) for i in origin]
        check(logits[origin], new)
        runner.start(group, new, origin)
        rows.extend(new)

    def check(logits: torch.Tensor, of: list[SimpleNamespace]) -> None:
        for got, row in zip(logits, of):
            want = loaded.model(input_ids=torch.tensor([row.token_ids])).logits[0, -1]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for row in of:
            row.token_ids.append(tokens(1)[0])  # the next token fed (any id will do: these are not answers)

    def decode(steps: int) -> None:
        for _ in range(steps):
            (batch,) = runner.batches
            check(runner.decode(batch), batch.rows)

    with torch.inference_mode():  # as on the engine thread
        prefill([tokens(21), tokens(5)], origin=[0, 0, 1], chunk=7)  # 21 > the window already
        decode(6)
        prefill([tokens(40)], origin=[0], chunk=512)  # wider than the batch: the batch is left-padded
        assert runner.batches[0].mask.shape[1] == 40
        decode(4)
        (batch,) = runner.batches
        runner.keep(batch, [0, 1, 2])  # the long prompt's row leaves: its leading columns go
        assert batch.mask.shape[1] == 21 + 6 + 4  # the first prompt and the tokens fed since (the last is not in yet)
        decode(2 * WINDOW)
    assert min(len(r.token_ids) for r in batch.rows) >= 3 * WINDOW


@pytest.mark.parametrize("shape", SLIDING)
def test_greedy_decoding_past_the_window_matches_hf_generate(shape, random_model):
    loaded = load(random_model(shape))
    for topic in TOPICS[:2]:
        ids = prompt(loaded, topic)
        want = loaded.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=40,
                                     pad_token_id=loaded.tokenizer.pad_token_id)[0, len(ids):].tolist()
        stop = next((i for i, t in enumerate(want) if t in loaded.eos_token_ids), len(want))
        (got,) = alone(loaded, ids, params(temperature=0.0))
        assert got == want[:stop]
        assert len(ids) + len(got) > 2 * WINDOW


@pytest.mark.parametrize("shape", SLIDING)
@pytest.mark.parametrize("max_batched_tokens", [512, 7])  # 7: every prompt is prefilled in chunks
def test_requests_batched_together_answer_as_each_would_alone(shape, max_batched_tokens, random_model):
    """Prompts of different lengths (shorter and longer than the window), some joining a batch that is
    already decoding: each answer is the one its request gets alone. Seeded sampling: its draws follow
    every logit, where a random model's greedy answer may repeat one token."""
    loaded = load(random_model(shape))
    prompts = [prompt(loaded, t) for t in TOPICS]
    ps = [params(seed=i, max_tokens=30 + 3 * i, n=1 + i % 2) for i in range(len(prompts))]
    eng = engine(max_batched_tokens=max_batched_tokens)

    async def main():
        first = [asyncio.create_task(answer(eng, loaded, prompts[i], ps[i])) for i in range(2)]
        await asyncio.sleep(0.01)  # the rest join a batch that is already decoding
        rest = [asyncio.create_task(answer(eng, loaded, prompts[i], ps[i])) for i in range(2, len(prompts))]
        return [await t for t in first + rest]

    try:
        together = asyncio.run(main())
    finally:
        eng.close()
    for i, result in enumerate(together):
        assert result == alone(loaded, prompts[i], ps[i]), i
    assert max(len(ids) for result in together for ids in result) > WINDOW


def test_which_caches_the_engine_can_batch():
    tiny = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1)
    for arch, extra in [("llama", {}), ("mistral", {"sliding_window": 16}), ("gemma2", {"sliding_window": 16}),
                        ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}),
                        ("gemma3_text", {"sliding_window": 16})]:
        assert cannot_batch(AutoConfig.for_model(arch, num_hidden_layers=2, **tiny, **extra)) is None, arch
    hybrid = AutoConfig.for_model("lfm2", num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"], **tiny)
    assert cannot_batch(hybrid) == ("its cache has layers the engine cannot batch: 'conv' (layers [0, 2]); "
                                    "continuous batching runs full-attention and sliding-window attention layers only")
    # Llama 4's chunked attention: a cache like a sliding window's, but its mask is not a window
    chunked = AutoConfig.for_model("llama4_text", num_hidden_layers=4, intermediate_size_mlp=32, attention_chunk_size=8,
                                   **tiny)
    assert "'chunked_attention' (layers [0, 1, 2])" in cannot_batch(chunked)


def test_a_model_the_engine_cannot_batch_is_refused_before_ready(tmp_path, broker, random_model):
    """LFM2 (convolution layers beside attention): the only version is refused at load, with the reason in one
    log line and in /admin/versions; the replica never becomes ready and reports itself not alive."""
    admin_key = "admin-test-key"
    port, admin_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLHF_", "BENTOML_HOME"))}
    env.update({"RLHF_STATE_DIR": str(tmp_path / "state"), "RLHF_MODEL": random_model("lfm2-tiny"),
                "RLHF_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "RLHF_API_KEYS": API_KEY,
                "RLHF_ADMIN_PORT": str(admin_port), "RLHF_ADMIN_KEY": admin_key})
    log_path = tmp_path / "service.log"
    with open(log_path, "ab") as log:
        proc = serve.spawn("127.0.0.1", port, env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        def probe(path: str) -> int | None:
            try:
                return httpx.get(f"{url}{path}", timeout=5).status_code
            except httpx.HTTPError:
                return None  # not listening yet

        wait_until(lambda: probe("/livez") == 503, 120, "/livez to fail")
        assert probe("/readyz") == 503
        lines = [line for line in log_path.read_text().splitlines() if "refused (unsupported)" in line]
        assert len(lines) == 1 and "'conv' (layers [0])" in lines[0], lines
        status = httpx.get(f"http://127.0.0.1:{admin_port}/admin/versions",
                           headers={"Authorization": f"Bearer {admin_key}"}, timeout=10).json()
        assert status["serving"] is None
        assert status["versions"][0]["refused"].startswith("unsupported: its cache has layers the engine cannot batch")
        r = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
        assert (r.status_code, r.json()["error"]["code"]) == (503, "model_not_ready"), r.text
    finally:
        serve.terminate(proc)
