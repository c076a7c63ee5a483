"""One request's failure is its own, through a real `bentoml serve` (issue 22).

On the 135M Llama-shaped random model (its answers run to max_tokens, slowly): a burst of
schema-valid requests with numerically degenerate sampling parameters beside normal
streams, and a plain (non-streaming) request whose client leaves.
"""

from __future__ import annotations

import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import openai
import pytest
from service_helpers import API_KEY, MODEL, read_events, wait_until

from rlhf_loop.core.contracts import Interaction

# the extremes of what the schema accepts (temperature in [0, 2], top_p in (0, 1]): each used to fail the
# engine's step, and with it every request of the step; the ones in a prefill group then hung until the 504
DEGENERATE = [(5e-324, 1.0), (1e-300, 5e-324), (1e-45, 0.5), (1e-40, 1e-300), (2.0, 5e-324), (1e-30, 1.0),
              (0.0, 1e-45), (1.1754943508222875e-38, 1e-8)]
# and beyond it: refused at once
REFUSED = [dict(temperature=1e308), dict(temperature=-5e-324), dict(top_p=0.0), dict(top_p=1.0000001)]


@pytest.fixture(scope="module")
def llama_service(start_service, module_broker, random_model):
    return start_service(module_broker.bootstrap, random_model("llama-135m"))


def messages(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


@pytest.mark.timeout(600)
def test_a_burst_of_degenerate_sampling_parameters_beside_normal_streams(llama_service):
    """Every request starts at once; the normal streams complete, every schema-valid degenerate one is
    answered (streamed or not), every out-of-schema one gets its 400, and the engine never failed a step."""
    svc = llama_service
    client = svc.openai()
    kinds = ["normal"] * 10 + ["degenerate"] * len(DEGENERATE) * 2 + ["refused"] * len(REFUSED)
    start = threading.Barrier(len(kinds))

    def normal(i: int):
        start.wait()
        chunks = list(client.chat.completions.create(model=MODEL, messages=messages(f"Tell me a story, {i}."),
                                                     seed=i, temperature=0.8, max_tokens=8, n=1 + i % 2, stream=True))
        return {c.index: c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason}

    def degenerate(i: int):
        temperature, top_p = DEGENERATE[i // 2]
        kw = dict(model=MODEL, messages=messages("Tell me about rain."), temperature=temperature, top_p=top_p,
                  max_tokens=8, n=1 + i % 3, seed=i)
        start.wait()
        if i % 2:
            chunks = list(client.chat.completions.create(**kw, stream=True))
            return {c.index: c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason}
        return {c.index: c.finish_reason for c in client.chat.completions.create(**kw).choices}

    def refused(i: int):
        start.wait()
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=messages("Hi"), max_tokens=4, **REFUSED[i])
        return e.value.body["param"]

    with ThreadPoolExecutor(len(kinds)) as pool:
        futures = ([pool.submit(normal, i) for i in range(10)]
                   + [pool.submit(degenerate, i) for i in range(len(DEGENERATE) * 2)]
                   + [pool.submit(refused, i) for i in range(len(REFUSED))])
        results = [f.result() for f in futures]
    for kind, i, result in zip(kinds, [*range(10), *range(len(DEGENERATE) * 2), *range(len(REFUSED))], results):
        if kind == "refused":
            assert result in ("temperature", "top_p"), result
        else:
            n = 1 + i % (2 if kind == "normal" else 3)
            assert sorted(result) == list(range(n)) and set(result.values()) <= {"stop", "length"}, (kind, i, result)
    assert "engine step failed" not in svc.log_tail(10_000) and "request failed" not in svc.log_tail(10_000)


@pytest.mark.timeout(600)
def test_a_plain_request_whose_client_leaves_is_cancelled_and_logs_nothing(llama_service, module_broker):
    """A non-streaming request for 2 x 256 tokens, its connection closed while it decodes: the engine cancels
    it (its rows leave the batch) and no Interaction is written for it; the next request is logged as usual."""
    svc = llama_service
    cancelled = svc.metric("rlhf_engine_cancelled_total")
    completions = svc.metric("rlhf_completions_total")
    spooled = svc.metric("rlhf_events_spooled_total", topic="rlhf.interactions")
    left = svc.metric("rlhf_requests_total", endpoint="chat", status="499")
    prompt = "Tell me everything, and take your time."
    body = json.dumps({"model": MODEL, "messages": messages(prompt), "max_tokens": 256, "n": 2, "seed": 3}).encode()
    url = urlsplit(svc.url)
    sock = socket.create_connection((url.hostname, url.port))
    try:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {API_KEY}"
                     f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_until(lambda: svc.metric("rlhf_engine_running_seqs") == 2, 120, "the request's two rows to decode")
    finally:
        sock.close()  # the client leaves
    wait_until(lambda: svc.metric("rlhf_engine_cancelled_total") == cancelled + 1, 120, "the engine to cancel it")
    wait_until(lambda: svc.metric("rlhf_engine_running_seqs") == 0, 60, "its two rows to leave the batch")
    assert svc.metric("rlhf_requests_total", endpoint="chat", status="499") == left + 1

    after = svc.openai().chat.completions.create(model=MODEL, messages=messages("Hi"), max_tokens=2, seed=1)
    svc.wait_drained()
    events = read_events(module_broker.bootstrap, ["rlhf.interactions"],
                         until=lambda evs: any(e.response_id == after.id for e in evs))
    assert not [e for e in events if isinstance(e, Interaction) and e.messages[0].content == prompt]
    assert svc.metric("rlhf_events_spooled_total", topic="rlhf.interactions") == spooled + 1  # `after`'s alone
    assert svc.metric("rlhf_completions_total") == completions + 1
