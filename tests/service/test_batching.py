"""Continuous batching through a real `bentoml serve`, with the official openai client.

Three models: the embedded one, a Llama of SmolLM-135M's shape (hidden 576, 30 layers, 9
heads, 3 KV heads, vocab 49152) and a GPT-2, the last two with random weights and
tokenizers built by app/random_models.py. On each: 32 concurrent streams with mixed n,
stop, seed, temperature, top_p and max_tokens give exactly the answers each request gets
alone. Then what only some models can show: a client that leaves frees its rows (the 135M
model, whose answers are long and slow), and a full queue answers 429 (GPT-2, with tiny limits).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai
import pytest
from service_helpers import API_KEY, MODEL, ServiceProcess, wait_until

TOPICS = ["cats", "rain in the city", "coffee", "trains and stations", "the sea", "music", "dogs", "winter"]


def _serve(tmp_path_factory, model_dir: str, bootstrap: str, **settings: str):
    svc = ServiceProcess.start(tmp_path_factory.mktemp("service"), model_dir, bootstrap, **settings)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def embedded_service(tmp_path_factory, base_model_dir, module_broker):
    yield from _serve(tmp_path_factory, base_model_dir, module_broker.bootstrap)


@pytest.fixture(scope="module")
def llama_service(tmp_path_factory, random_model, module_broker):
    # fp32: these tests compare batched answers with the same requests alone, token for token, and a random
    # model's near-uniform logits turn bf16's batch-dependent rounding into other tokens (RLHF_DTYPE=auto would
    # pick bf16 for 135M parameters on this CPU; tests/service/test_isolation.py serves it in bf16)
    yield from _serve(tmp_path_factory, random_model("llama-135m"), module_broker.bootstrap, dtype="float32")


@pytest.fixture(scope="module")
def gpt2_service(tmp_path_factory, random_model, module_broker):
    yield from _serve(tmp_path_factory, random_model("gpt2-tiny", pad_token=False), module_broker.bootstrap)


@pytest.fixture(scope="module")
def tight_service(tmp_path_factory, random_model, module_broker):
    """GPT-2 with room for one running row and one waiting request."""
    yield from _serve(tmp_path_factory, random_model("gpt2-tiny", pad_token=False), module_broker.bootstrap,
                      engine_max_running_seqs="1", engine_max_waiting_requests="1")


@dataclass(frozen=True)
class Spec:
    """One request of the mix."""

    topic: str
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    include_usage: bool

    def kwargs(self) -> dict:
        return dict(model=MODEL, messages=[{"role": "user", "content": f"Tell me about {self.topic}."}], n=self.n,
                    temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens, seed=self.seed)


def mix(count: int) -> list[Spec]:
    return [Spec(TOPICS[i % len(TOPICS)], n=1 + i % 3, temperature=(0.0, 0.7, 1.0, 1.3)[i % 4],
                 top_p=(1.0, 0.9)[i // 4 % 2], max_tokens=4 + i % 9, seed=100 + i, include_usage=i % 2 == 0)
            for i in range(count)]


@dataclass
class Streamed:
    texts: list[str]
    finish: list[str | None]
    usage: object | None


def stream(client: openai.OpenAI, spec: Spec, stop: str | None) -> Streamed:
    chunks = list(client.chat.completions.create(**spec.kwargs(), stop=stop, stream=True,
                                                 stream_options={"include_usage": spec.include_usage}))
    assert len({c.id for c in chunks}) == 1 and len({c.system_fingerprint for c in chunks}) == 1
    texts, finish, roles = [""] * spec.n, [None] * spec.n, set()
    for c in chunks:
        for ch in c.choices:
            assert finish[ch.index] is None, "a choice went on after its finish chunk"
            if ch.delta.role:
                assert texts[ch.index] == "" and ch.index not in roles
                roles.add(ch.index)
            texts[ch.index] += ch.delta.content or ""
            finish[ch.index] = ch.finish_reason
    assert roles == set(range(spec.n)), "every choice opens with a role delta"
    usage = chunks[-1].usage if spec.include_usage else None
    assert (usage is not None) == spec.include_usage and (not spec.include_usage or chunks[-1].choices == [])
    return Streamed(texts, finish, usage)


@pytest.mark.parametrize("model", ["embedded", pytest.param("llama", marks=pytest.mark.slow), "gpt2"])
def test_32_concurrent_streams_with_mixed_options_answer_as_each_alone(model, request):
    """Alone first (one request at a time, so each runs by itself in the engine), then all at once.
    A stop string taken from the middle of a choice's answer must cut exactly there, in every choice."""
    streams = 32
    svc = request.getfixturevalue(f"{model}_service")
    client = svc.openai()
    specs = mix(streams)
    alone = [client.chat.completions.create(**s.kwargs()) for s in specs]
    again = client.chat.completions.create(**specs[1].kwargs())
    assert [c.message.content for c in again.choices] == [c.message.content for c in alone[1].choices], \
        "a seeded request alone is not reproducible"

    stops: list[str | None] = []
    for i, r in enumerate(alone):
        text = r.choices[0].message.content
        stops.append(text[len(text) // 2: len(text) // 2 + 3] if i % 3 == 0 and len(text) >= 6 else None)
    assert sum(s is not None for s in stops) >= 5

    with ThreadPoolExecutor(streams) as pool:
        together = list(pool.map(lambda i: stream(client, specs[i], stops[i]), range(streams)))

    for spec, stop, r, got in zip(specs, stops, alone, together):
        want_texts, want_finish = [], []
        for c in r.choices:
            cut = stop is not None and stop in c.message.content
            want_texts.append(c.message.content[: c.message.content.index(stop)] if cut else c.message.content)
            want_finish.append("stop" if cut else c.finish_reason)
        assert (got.texts, got.finish) == (want_texts, want_finish), (spec, stop)
        assert all(f in ("stop", "length") for f in got.finish)
        if got.usage is not None:
            assert got.usage.completion_tokens <= spec.n * spec.max_tokens
            if stop is None:
                assert got.usage.completion_tokens == r.usage.completion_tokens


@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_frees_its_rows(llama_service):
    """The 135M random model's answers run to max_tokens, slowly: only the disconnect can end this one early."""
    svc = llama_service
    cancelled = svc.metric("rlhf_engine_cancelled_total")
    completions = svc.metric("rlhf_completions_total")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 256,
            "n": 2, "stream": True}
    with httpx.stream("POST", f"{svc.url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        for line in r.iter_lines():
            if '"content":"' in line and '"role"' not in line:  # tokens are flowing
                assert svc.metric("rlhf_engine_running_seqs") == 2  # read while the stream is still open
                break  # closing the line iterator may already drop the connection
    # the client has left
    wait_until(lambda: svc.metric("rlhf_engine_cancelled_total") == cancelled + 1, 60, "the engine to cancel the request")
    wait_until(lambda: svc.metric("rlhf_engine_running_seqs") == 0, 60, "its two rows to leave the batch")
    assert svc.metric("rlhf_completions_total") == completions, "an abandoned answer is no completion"


def test_a_full_queue_answers_429_with_retry_after_and_writes_nothing(tight_service):
    svc = tight_service
    spooled = svc.metric("rlhf_events_spooled_total")
    rejected = svc.metric("rlhf_engine_rejected_total")
    start = threading.Barrier(12)

    def send(i: int) -> httpx.Response:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Tell me about {TOPICS[i % 8]}."}],
                "max_tokens": 200, "stream": i % 2 == 1}
        with svc.http(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            start.wait()
            r = http.post("/v1/chat/completions", json=body)
            r.read()
            return r

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(send, range(12)))
    busy = [r for r in responses if r.status_code == 429]
    ok = [r for r in responses if r.status_code == 200]
    assert len(busy) + len(ok) == 12 and busy and ok, [r.status_code for r in responses]
    for r in busy:
        assert r.headers["retry-after"].isdigit() and int(r.headers["retry-after"]) >= 1
        assert r.headers["content-type"].startswith("application/json")  # no stream was started
        err = r.json()["error"]
        assert (err["code"], err["type"]) == ("rate_limit_exceeded", "requests") and err["message"]
    assert svc.metric("rlhf_engine_rejected_total") == rejected + len(busy)
    assert svc.metric("rlhf_events_spooled_total") == spooled + len(ok), "a refused request wrote an event"

    # the openai client retries a 429 after Retry-After: with retries, everyone gets an answer
    patient = openai.OpenAI(base_url=f"{svc.url}/v1", api_key=API_KEY, max_retries=20, timeout=120)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda t: patient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": t}], max_tokens=50), TOPICS[:4]))
    assert all(a.choices[0].finish_reason in ("stop", "length") for a in answers)
