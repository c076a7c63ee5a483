"""The HTTP API of a real `bentoml serve` process, through the official openai client and raw HTTP."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from service_helpers import API_KEY, MODEL, chat, read_events

from rlhf_loop.core.contracts import Feedback, Interaction, make_response_id, parse_response_id

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_probes_and_model_list(service):
    assert httpx.get(f"{service.url}/livez").status_code == 200
    assert httpx.get(f"{service.url}/readyz").status_code == 200
    models = service.openai().models.list().data  # the served name, then each version it can serve (test_versions.py)
    assert [(m.id, m.object, m.root) for m in models] == [(MODEL, "model", f"{MODEL}@v0"),
                                                          (f"{MODEL}@v0", "model", f"{MODEL}@v0")]
    assert service.openai().models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        service.openai().models.retrieve("gpt-4o")


def test_chat_completion_has_openai_shape_and_names_its_policy_version(service):
    r = chat(service.openai(), max_tokens=12, seed=1, user="alice")
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert r.system_fingerprint == "policy-v0"
    (c,) = r.choices
    assert c.index == 0 and c.message.role == "assistant" and c.message.content
    assert c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert parse_response_id(service.id_secret(), r.id)[:2] == (0, 1)  # (policy version, n), then the prompt's tag


def test_seed_reproduces_answers_even_among_concurrent_requests(service):
    client = service.openai()
    kw = dict(max_tokens=20, temperature=1.0, n=2)
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(chat, client, seed=s, **kw) for s in (5, 6, 5, 7, 5, 8)]
        results = [f.result() for f in futures]
    answers = [tuple(c.message.content for c in r.choices) for r in results]
    assert answers[0] == answers[2] == answers[4]
    assert len(set(answers)) >= 3
    assert any(a[0] != a[1] for a in answers), "the n=2 choices should be sampled independently"


def test_n_and_max_completion_tokens(service):
    r = chat(service.openai(), n=3, max_completion_tokens=4, seed=11)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens <= 12
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)


def test_stop_strings_cut_the_answer(service):
    client = service.openai()
    full = chat(client, temperature=0, max_tokens=40).choices[0].message.content
    words = full.split()
    assert len(words) >= 4, full
    stop = " ".join(words[2:4])
    r = chat(client, temperature=0, max_tokens=40, stop=[stop, "never-there"])
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me about cats."}],
                                              temperature=0, max_tokens=40, stop=stop, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == full[: full.index(stop)]


def test_streaming_with_the_openai_client_matches_the_plain_answer(service):
    client = service.openai()
    plain = chat(client, seed=42, max_tokens=24, n=2)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me about cats."}], seed=42, max_tokens=24, n=2,
        stream=True, stream_options={"include_usage": True}))
    assert {ch.id for ch in chunks} == {chunks[0].id} and chunks[0].id != plain.id
    assert {ch.system_fingerprint for ch in chunks} == {"policy-v0"}
    text, finish, first = ["", ""], [None, None], {}
    for ch in chunks[:-1]:
        (c,) = ch.choices
        first.setdefault(c.index, c.delta)
        text[c.index] += c.delta.content or ""
        if c.finish_reason:
            finish[c.index] = c.finish_reason
    assert all(d.role == "assistant" for d in first.values())
    assert text == [c.message.content for c in plain.choices]
    assert finish == [c.finish_reason for c in plain.choices]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == plain.usage.completion_tokens


def test_raw_sse_ends_with_done(service):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{service.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "usage" not in chunks[0]  # only with stream_options.include_usage


def test_votes_replace_dedupe_and_withdraw_and_all_reach_kafka(service, module_broker):
    client, http = service.openai(), service.http(headers=AUTH)
    r = chat(client, n=2, seed=3, user="alice")
    up_before = service.metric("rlhf_votes_total", rating="up", policy_version="0")

    def vote(**body) -> httpx.Response:
        return http.post("/v1/feedback", json={"response_id": r.id, **body})

    first = vote(rating="up", user="alice")
    assert first.status_code == 202
    fid = first.json()["id"]
    assert first.json() == {"id": fid, "object": "feedback", "status": "accepted", "response_id": r.id,
                            "rating": "up", "deleted": False}
    changed = vote(rating=-1, user="alice", comment="changed my mind")
    assert changed.json()["id"] == fid  # the same user's second vote replaces the first
    bob = vote(rating="up", user="bob", choice_index=1)
    assert bob.json()["id"] not in (fid,)
    keyed = [vote(rating=1, feedback_id="client-key-1") for _ in range(2)]
    keyed_id = keyed[0].json()["id"]  # the client's key, bound to the API key that sent it
    assert keyed_id == keyed[1].json()["id"] and keyed_id.startswith(f"{r.id}:client-key-1.")
    gone = http.delete(f"/v1/feedback/{fid}")
    assert gone.status_code == 202 and gone.json()["deleted"] is True

    assert service.metric("rlhf_votes_total", rating="up", policy_version="0") == up_before + 4  # alice, bob, keyed x2
    service.wait_drained()
    events = read_events(module_broker.bootstrap, ["rlhf.interactions", "rlhf.feedback"],
                         until=lambda evs: sum(e.response_id == r.id for e in evs) >= 8)
    mine = [e for e in events if e.response_id == r.id]
    interactions = [e for e in mine if isinstance(e, Interaction)]
    assert sorted(e.choice_index for e in interactions) == [0, 1]
    for e in interactions:
        assert e.policy_version == 0 and e.model == MODEL and e.user == "alice" and e.sampling.seed == 3
        assert e.completion == r.choices[e.choice_index].message.content
        assert e.finish_reason == r.choices[e.choice_index].finish_reason
        assert e.messages[0].content == "Tell me about cats." and e.prompt_token_ids
    assert sum(len(e.completion_token_ids) for e in interactions) == r.usage.completion_tokens
    votes = [e for e in mine if isinstance(e, Feedback)]
    alice = [(e.rating, e.deleted, e.comment) for e in votes if e.feedback_id == fid]
    assert alice == [(1, False, None), (-1, False, "changed my mind"), (None, True, None)]  # in order: latest wins
    assert [e.rating for e in votes if e.feedback_id == keyed_id] == [1, 1]
    assert [(e.choice_index, e.user) for e in votes if e.feedback_id == bob.json()["id"]] == [(1, "bob")]
    (identity,) = {e.identity for e in votes}  # one API key: one identity; its users are its voters
    assert identity.startswith("key:") and {e.voter for e in votes if e.user} == {f"{identity}/alice", f"{identity}/bob"}
    assert len({e.event_id for e in mine}) == len(mine)


def test_metrics_has_the_service_counters_next_to_bentomls(service):
    chat(service.openai(), max_tokens=4)
    names = {n for n, _ in service.metrics()}
    for name in ("rlhf_requests_total", "rlhf_tokens_total", "rlhf_completions_total", "rlhf_spool_depth",
                 "rlhf_spool_bytes", "rlhf_events_spooled_total", "rlhf_policy_version"):
        assert name in names, name
    assert any(n.startswith("bentoml_") for n in names)
    assert service.metric("rlhf_requests_total", endpoint="chat", status="200") >= 1
    assert service.metric("rlhf_tokens_total", kind="completion", policy_version="0") >= 1


# ---------------------------------------------------------------------------- bad input

MSG = [{"role": "user", "content": "hi"}]


def _chat_body(**kw) -> dict:
    return {"model": MODEL, "messages": MSG, "max_tokens": 4, **kw}


def _oversize_stream():
    for _ in range(40):
        yield b" " * 8192  # 320 KiB, no Content-Length (chunked): the limit must hold on what arrives


# (name, method, path, request kwargs, status, error code, param)
BAD = [
    ("malformed json", "POST", "/v1/chat/completions", dict(content=b'{"model": "rlhf-policy", "messages": ['), 400, "invalid_json", None),
    ("body not an object", "POST", "/v1/chat/completions", dict(json=[1, 2]), 400, "invalid_json", None),
    ("missing model", "POST", "/v1/chat/completions", dict(json={"messages": MSG}), 400, "invalid_value", "model"),
    ("temperature is a string", "POST", "/v1/chat/completions", dict(json=_chat_body(temperature="hot")), 400, "invalid_value", "temperature"),
    ("n is a string", "POST", "/v1/chat/completions", dict(json=_chat_body(n="2")), 400, "invalid_value", "n"),
    ("temperature too high", "POST", "/v1/chat/completions", dict(json=_chat_body(temperature=3)), 400, "invalid_value", "temperature"),
    ("empty messages", "POST", "/v1/chat/completions", dict(json=_chat_body(messages=[])), 400, "invalid_value", "messages"),
    ("unknown role", "POST", "/v1/chat/completions", dict(json=_chat_body(messages=[{"role": "wizard", "content": "hi"}])), 400, "invalid_value", "messages[0].role"),
    ("content not text", "POST", "/v1/chat/completions", dict(json=_chat_body(messages=[{"role": "user", "content": 7}])), 400, "invalid_value", "messages[0].content"),
    ("unknown model", "POST", "/v1/chat/completions", dict(json=_chat_body(model="gpt-4o")), 404, "model_not_found", "model"),
    ("unknown version", "POST", "/v1/chat/completions", dict(json=_chat_body(model="rlhf-policy@v7")), 404,
     "model_not_found", "model"),
    ("huge max_tokens", "POST", "/v1/chat/completions", dict(json=_chat_body(max_tokens=100_000)), 400, "invalid_value", "max_tokens"),
    ("huge max_completion_tokens", "POST", "/v1/chat/completions", dict(json=_chat_body(max_completion_tokens=100_000)), 400, "invalid_value", "max_completion_tokens"),
    ("n too large", "POST", "/v1/chat/completions", dict(json=_chat_body(n=50)), 400, "invalid_value", "n"),
    ("too many messages", "POST", "/v1/chat/completions", dict(json=_chat_body(messages=MSG * 65)), 400, "invalid_value", "messages"),
    ("too many stop strings", "POST", "/v1/chat/completions", dict(json=_chat_body(stop=list("abcde"))), 400, "invalid_value", "stop"),
    ("prompt over the token cap", "POST", "/v1/chat/completions", dict(json=_chat_body(messages=[{"role": "user", "content": "cats and dogs " * 400}])), 400, "context_length_exceeded", "messages"),
    ("stream_options without stream", "POST", "/v1/chat/completions", dict(json=_chat_body(stream_options={"include_usage": True})), 400, "invalid_value", "stream_options"),
    ("tools", "POST", "/v1/chat/completions", dict(json=_chat_body(tools=[{"type": "function"}])), 400, "unsupported_parameter", "tools"),
    ("oversize body", "POST", "/v1/chat/completions", dict(json=_chat_body(user="x" * 300_000)), 413, "request_too_large", None),
    ("oversize chunked body", "POST", "/v1/chat/completions", dict(content=_oversize_stream()), 413, "request_too_large", None),
    ("missing api key", "POST", "/v1/chat/completions", dict(json=_chat_body(), headers={"Authorization": ""}), 401, "invalid_api_key", None),
    ("wrong api key", "POST", "/v1/chat/completions", dict(json=_chat_body(), headers={"Authorization": "Bearer sk-wrong"}), 401, "invalid_api_key", None),
    ("models without key", "GET", "/v1/models", dict(headers={"Authorization": ""}), 401, "invalid_api_key", None),
    ("unknown url", "GET", "/v1/engines", {}, 404, "unknown_url", None),
    ("bad rating", "POST", "/v1/feedback", "rating=meh", 400, "invalid_value", "rating"),
    ("rating true", "POST", "/v1/feedback", "rating=true", 400, "invalid_value", "rating"),
    ("rating 2", "POST", "/v1/feedback", "rating=2", 400, "invalid_value", "rating"),
    ("choice out of range", "POST", "/v1/feedback", "choice_index=3", 400, "invalid_value", "choice_index"),
    ("bad feedback_id", "POST", "/v1/feedback", "feedback_id=a b/c", 400, "invalid_value", "feedback_id"),
    ("forged response id", "POST", "/v1/feedback", "forged", 404, "response_not_found", "response_id"),
    ("response id of another secret", "POST", "/v1/feedback", "foreign", 404, "response_not_found", "response_id"),
    ("not a response id", "POST", "/v1/feedback", dict(json={"response_id": "chatcmpl-abc", "rating": "up"}), 404, "response_not_found", "response_id"),
    ("missing response id", "POST", "/v1/feedback", dict(json={"rating": "up"}), 400, "invalid_value", "response_id"),
    ("feedback without key", "POST", "/v1/feedback", "nokey", 401, "invalid_api_key", None),
    ("withdraw forged id", "DELETE", "/v1/feedback/{forged}:u123", {}, 404, "feedback_not_found", "feedback_id"),
    ("withdraw nonsense", "DELETE", "/v1/feedback/nonsense", {}, 404, "feedback_not_found", "feedback_id"),
    ("withdraw an id without its tag", "DELETE", "/v1/feedback/{issued}:u123", {}, 404, "feedback_not_found", "feedback_id"),
    ("withdraw a vote no one cast", "DELETE", "/v1/feedback/{issued}:u123.0123456789abcdef", {}, 403, "permission_denied", "feedback_id"),
    ("admin not on the api port", "GET", "/admin/versions", {}, 404, "unknown_url", None),
    ("admin without token", "GET", "ADMIN/admin/versions", dict(headers={"Authorization": ""}), 401, "invalid_api_key", None),
    ("admin with an api key", "GET", "ADMIN/admin/versions", {}, 403, "admin_disabled", None),
    ("admin pin, admin off", "POST", "ADMIN/admin/pin", dict(json={"version": 0}, headers={"Authorization": "Bearer anything"}), 403, "admin_disabled", None),
]


@pytest.fixture(scope="module")
def issued_id(service) -> str:
    return chat(service.openai(), max_tokens=4).id


def _feedback_request(spec: str, rid: str) -> dict:
    """Feedback cases written as 'field=value' (JSON-decoded when possible) or a named forgery."""
    body = {"response_id": rid, "rating": "up"}
    if spec == "forged":
        body["response_id"] = rid[:-1] + ("0" if rid[-1] != "0" else "1")
    elif spec == "foreign":
        body["response_id"] = make_response_id(b"some other secret", 0, 1)
    elif spec == "nokey":
        return dict(json=body, headers={"Authorization": ""})
    else:
        key, _, value = spec.partition("=")
        try:
            body[key] = json.loads(value)
        except json.JSONDecodeError:
            body[key] = value
    return dict(json=body)


@pytest.mark.parametrize("name,method,path,kwargs,status,code,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_4xx_in_openai_shape_and_writes_nothing(
        service, issued_id, name, method, path, kwargs, status, code, param):
    if isinstance(kwargs, str):
        kwargs = _feedback_request(kwargs, issued_id)
    forged = issued_id[:-1] + ("0" if issued_id[-1] != "0" else "1")
    path = path.replace("{forged}", forged).replace("{issued}", issued_id).replace("ADMIN/", f"{service.admin_url}/")
    kwargs = {**kwargs, "headers": {**AUTH, **kwargs.get("headers", {})}}
    spooled = service.metric("rlhf_events_spooled_total")
    dropped = service.metric("rlhf_events_dropped_total")
    with service.http() as http:
        r = http.request(method, path, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["code"], err["param"]) == (code, param)
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert service.metric("rlhf_events_spooled_total") == spooled and service.metric("rlhf_events_dropped_total") == dropped


def test_the_openai_client_raises_its_own_error_types(service):
    client = service.openai()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=MSG)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        service.openai(api_key="sk-wrong").models.list()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=10**6)
    assert e.value.param == "max_tokens"
