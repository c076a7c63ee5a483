"""The HTTP API, a FastAPI app mounted on the BentoML service (service/service.py).

    POST /v1/chat/completions    OpenAI chat completions, plain or SSE streaming
    GET  /v1/models, /v1/models/{model}   the served name and each version a request may name (rlhf-policy@v3)
    POST /v1/feedback            a thumbs up/down on a response  -> 202
    DELETE /v1/feedback/{id}     withdraw a vote (tombstone)     -> 202
    POST /v1/preferences         which of two answers to one prompt is better -> 202
    DELETE /v1/preferences/{id}  withdraw a preference (tombstone) -> 202
    GET  /v1/loop                what the loop page draws: replicas, rounds, approval (service/loop.py)
    GET  /                       the chat playground (service/static/playground.html)
    GET  /loop                   the loop page (service/static/loop.html)
    GET  /openapi.json, /docs    the OpenAPI document (service/openapi.py) and its Swagger UI page

The admin API listens on its own port (service/admin.py); both are built on service/http.py.
Every handler checks everything before it writes anything: a rejected request (4xx, in
OpenAI's error shape) writes no event. The parts a handler uses (engine, versions, event log,
vote caps) are the running service's, reached through `current()`.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import anyio
import bentoml
from fastapi import Depends, Request
from fastapi.responses import FileResponse, HTMLResponse, Response, StreamingResponse

from rlhf_loop.core.contracts import (
    AnswerRef, Feedback, Interaction, IssuedResponse, Message, Preference, Sampling, bind_feedback_id, cast_by,
    feedback_id_for, make_response_id, parse_response_id, preference_id_for, prompt_tag, split_feedback_id,
)
from rlhf_loop.core.contracts import Settings
from rlhf_loop.service import metrics, openapi
from rlhf_loop.service.detokenizer import TokenBytes
from rlhf_loop.service.engine import Engine, EngineFull, Generation
from rlhf_loop.service.events import EventLog
from rlhf_loop.service.http import APIError, bearer_token, new_app, parse, read_body
from rlhf_loop.service.limits import Caller, VoteLimits
from rlhf_loop.service.loaded import LoadedVersion
from rlhf_loop.service.loop import ReplicaBoard, loop_view
from rlhf_loop.service.request import Delta, SamplingParams
from rlhf_loop.service.schemas import (
    AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice, ChoiceLogprobs, ChunkChoice,
    ChunkDelta, ErrorBody, ErrorResponse, FeedbackAccepted, FeedbackRequest, ModelCard, ModelList, PreferenceAccepted,
    PreferenceRequest, TokenLogprob, TopLogprob, Usage, model_version, version_model_id,
)
from rlhf_loop.service.versions import UnknownVersion, VersionManager, VersionRefused

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4  # as OpenAI
# Retry-After of a 429: the engine's queue moves at every step, so a second usually finds room; a replica
# overloaded for longer needs more replicas (the HPA), not clients that wait longer
RETRY_AFTER_S = 1
# Chat requests naming a version that is not in memory wait here for its load, one load at a time: waiting
# on a limiter holds no worker thread, so a queue of them never starves tokenizing or spooling of threads
NAMED_LOADS = anyio.CapacityLimiter(1)


# ---------------------------------------------------------------------------- app, auth


app = new_app("rlhf-loop chat + feedback API")


class Parts(Protocol):
    """What the handlers use of the running service (service/service.py's ChatService has them)."""

    settings: Settings
    started: int  # unix time the service started: the served name's `created`
    api_keys: frozenset[str]
    id_secret: bytes
    engine: Engine
    versions: VersionManager
    events: EventLog
    vote_limits: VoteLimits
    board: ReplicaBoard


def current() -> Parts:
    return bentoml.get_current_service()


def require_api_key(request: Request) -> None:
    keys = current().api_keys
    if not keys:
        return
    token = bearer_token(request)
    if token is None:
        raise APIError(401, "You didn't provide an API key. Send 'Authorization: Bearer <key>'.", code="invalid_api_key")
    if not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


# ---------------------------------------------------------------------------- chat


@dataclass
class Job:
    """One admitted chat completion: everything decided before generation starts."""

    response_id: str
    created: int
    model: str  # the name the request gave: the served name, or a version's (`rlhf-policy@v3`)
    loaded: LoadedVersion  # taken once: every token of this response comes from this object
    messages: list[Message]
    prompt_ids: list[int]
    params: SamplingParams
    user: str | None
    logprobs: bool  # the client asked for them (the engine reports the chosen tokens' always: the Interaction has them)
    texts: list[list[str]] = field(init=False)  # per choice: the deltas so far
    token_ids: list[list[int]] = field(init=False)
    token_logprobs: list[list[float]] = field(init=False)  # one per token id
    top_logprobs: list[list[tuple[tuple[int, float], ...]]] = field(init=False)  # one per token id, if asked
    finish: list[str | None] = field(init=False)

    def __post_init__(self) -> None:
        n = self.params.n
        self.texts, self.token_ids, self.finish = [[] for _ in range(n)], [[] for _ in range(n)], [None] * n
        self.token_logprobs, self.top_logprobs = [[] for _ in range(n)], [[] for _ in range(n)]

    def add(self, d: Delta) -> None:
        self.texts[d.index].append(d.text)
        self.token_ids[d.index].extend(d.token_ids)
        self.token_logprobs[d.index].extend(d.logprobs)
        self.top_logprobs[d.index].extend(d.top_logprobs)
        if d.finish_reason is not None:
            self.finish[d.index] = d.finish_reason

    def usage(self) -> Usage:
        completion = sum(len(t) for t in self.token_ids)
        return Usage(prompt_tokens=len(self.prompt_ids), completion_tokens=completion,
                     total_tokens=len(self.prompt_ids) + completion)

    def interactions(self) -> list[Interaction]:
        p = self.params
        sampling = Sampling(temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens, seed=p.seed)
        return [
            Interaction(response_id=self.response_id, choice_index=i, policy_version=self.loaded.version,
                        model=self.model, messages=self.messages, prompt_token_ids=self.prompt_ids,
                        completion="".join(self.texts[i]), completion_token_ids=self.token_ids[i],
                        completion_logprobs=self.token_logprobs[i], finish_reason=self.finish[i],
                        sampling=sampling, user=self.user, created=self.created)
            for i in range(p.n)
        ]

    def choice_logprobs(self, i: int) -> ChoiceLogprobs | None:
        """Choice i's `logprobs` in the response: None unless the client asked."""
        if not self.logprobs:
            return None
        return ChoiceLogprobs(content=logprob_content(self.loaded.token_bytes, self.token_ids[i],
                                                      self.token_logprobs[i], self.top_logprobs[i]))


def logprob_content(token_bytes: TokenBytes, token_ids: Sequence[int], logprobs: Sequence[float],
                    top: Sequence[tuple[tuple[int, float], ...]]) -> list[TokenLogprob]:
    """OpenAI's `logprobs.content` for answer tokens: each token's text, bytes and log-prob (one per token
    id), and its most likely alternatives (`top`: one tuple of (id, log-prob) per token, or empty when the
    client asked for none)."""

    def entry(token_id: int, logprob: float) -> dict:
        b = token_bytes(token_id)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(b)}

    return [TokenLogprob(**entry(t, lp), top_logprobs=[TopLogprob(**entry(a, alp)) for a, alp in alts])
            for t, lp, alts in zip(token_ids, logprobs, top or [()] * len(token_ids), strict=True)]


async def admit(svc: Parts, req: ChatCompletionRequest) -> Job:
    """Check a request against the limits and the version it names; 4xx before anything happens."""
    s = svc.settings
    try:
        version = model_version(s.served_model_name, req.model)
    except ValueError:
        raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{s.served_model_name}' "
                            f"and its versions, '{s.served_model_name}@v<N>' (GET /v1/models lists them).",
                       param="model", code="model_not_found") from None
    if len(req.messages) > s.max_messages:
        raise APIError(400, f"Too many messages: {len(req.messages)} > {s.max_messages}.", param="messages",
                       code="invalid_value")
    if req.tools:
        raise APIError(400, "'tools' are not supported by this server.", param="tools", code="unsupported_parameter")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "'top_logprobs' is only allowed when 'logprobs' is true.", param="top_logprobs",
                       code="invalid_value")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true.", param="stream_options",
                       code="invalid_value")
    n = req.n or 1
    if n > s.max_n:
        raise APIError(400, f"'n' must be at most {s.max_n}.", param="n", code="invalid_value")
    name, max_tokens = next(((k, v) for k, v in (("max_completion_tokens", req.max_completion_tokens),
                                                  ("max_tokens", req.max_tokens)) if v is not None),
                            ("max_tokens", s.default_max_tokens))
    if max_tokens > s.max_tokens_limit:
        raise APIError(400, f"'{name}' is too large: {max_tokens} > {s.max_tokens_limit}.", param=name,
                       code="invalid_value")
    stop = req.stop_strings()
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(400, f"At most {MAX_STOP_STRINGS} stop sequences.", param="stop", code="invalid_value")

    loaded = await version_for(svc, req.model, version)  # checked last: naming a version may load it
    messages = [Message(role=m.contract_role(), content=m.text()) for m in req.messages]
    prompt_ids = await anyio.to_thread.run_sync(loaded.encode_chat, [m.model_dump() for m in messages])
    if len(prompt_ids) > s.max_prompt_tokens:
        raise APIError(400, f"The prompt is {len(prompt_ids)} tokens; the limit is {s.max_prompt_tokens}.",
                       param="messages", code="context_length_exceeded")
    if len(prompt_ids) + max_tokens > loaded.max_context:
        raise APIError(400, f"The prompt ({len(prompt_ids)} tokens) plus '{name}' ({max_tokens}) exceeds the "
                            f"model's context of {loaded.max_context} tokens.", param="messages",
                       code="context_length_exceeded")
    params = SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        max_tokens=max_tokens, n=n, stop=stop,
        seed=secrets.randbits(63) if req.seed is None else req.seed,
        top_logprobs=req.top_logprobs or 0,
    )
    # the id carries the prompt's tag: a preference between two responses is checked to be about one prompt
    rid = make_response_id(svc.id_secret, loaded.version, n, prompt_tag(svc.id_secret, messages))
    return Job(response_id=rid, created=int(time.time()), model=req.model, loaded=loaded, messages=messages,
               prompt_ids=prompt_ids, params=params, user=req.user, logprobs=bool(req.logprobs))


async def version_for(svc: Parts, model: str, version: int | None) -> LoadedVersion:
    """The loaded version a request's `model` names (`version`: None for the served name, the version serving
    now); 503 before any is loaded, 404 for a version this replica cannot serve (service/versions.py, `named`)."""
    current = svc.versions.current
    if current is None:
        raise APIError(503, "The model is still loading; retry shortly.", type="server_error", code="model_not_ready")
    if version is None:
        return current
    loaded = svc.versions.in_memory(version)
    if loaded is not None:
        return loaded
    try:
        return await anyio.to_thread.run_sync(svc.versions.named, version, limiter=NAMED_LOADS)
    except UnknownVersion:
        raise APIError(404, f"The model '{model}' does not exist: this server cannot serve policy version {version} "
                            "(GET /v1/models lists the ones it can).", param="model", code="model_not_found") from None
    except VersionRefused:
        # why stays in the log and the admin API: a load error may name the server's paths
        raise APIError(404, f"The model '{model}' cannot be served: policy version {version} failed this server's "
                            "checks (its files' hashes, or loading it).", param="model", code="model_not_found") from None


async def finish(svc: Parts, job: Job, started: float) -> None:
    """Log the answered completion: one Interaction per choice to the spool, and the metrics."""
    with anyio.CancelScope(shield=True):  # a client leaving now must not lose the event of a finished answer
        await anyio.to_thread.run_sync(svc.events.emit, job.interactions())
    v = str(job.loaded.version)
    usage = job.usage()
    metrics.completions.labels(policy_version=v).inc()
    metrics.tokens.labels(kind="prompt", policy_version=v).inc(usage.prompt_tokens)
    metrics.tokens.labels(kind="completion", policy_version=v).inc(usage.completion_tokens)
    metrics.generation_seconds.observe(time.monotonic() - started)


def start(svc: Parts, job: Job) -> Generation:
    """Queue the job in the engine, or answer 429 (nothing written) when its queue is full."""
    try:
        return svc.engine.stream(job.loaded, job.prompt_ids, job.params)
    except EngineFull:
        raise APIError(429, "The server is at capacity; retry after the time in the Retry-After header.",
                       type="requests", code="rate_limit_exceeded",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None


@app.post("/v1/chat/completions", dependencies=[Depends(require_api_key)], **openapi.CHAT)
async def chat_completions(request: Request):
    svc = current()
    req = parse(ChatCompletionRequest, await read_body(request, svc.settings.max_body_bytes))
    job = await admit(svc, req)
    started = time.monotonic()
    deltas = start(svc, job)
    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return StreamingResponse(_sse(svc, job, deltas, started, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        answered = await _collect(request, job, deltas)
    except Exception:  # the engine's error for this request (inside _collect's task group's ExceptionGroup)
        log.exception("generation failed for %s", job.response_id)
        raise APIError(500, "The server failed to generate a completion.", type="server_error",
                       code="generation_failed") from None
    if not answered:
        return Response(status_code=499)  # nginx's "client closed request": only the request metrics see it
    await finish(svc, job, started)
    return ChatCompletion(
        id=job.response_id, created=job.created, model=job.model, system_fingerprint=job.loaded.fingerprint,
        choices=[Choice(index=i, message=AssistantMessage(content="".join(job.texts[i])), finish_reason=job.finish[i],
                        logprobs=job.choice_logprobs(i))
                 for i in range(job.params.n)],
        usage=job.usage(),
    ).model_dump(mode="json")


async def _collect(request: Request, job: Job, deltas: Generation) -> bool:
    """Add the whole answer to `job`; False if the client went away first, which cancels the generation
    (its rows leave the batch at the engine's next step) and leaves nothing to log.

    The client's leaving is seen by waiting on the ASGI receive channel, as Starlette's StreamingResponse
    does for a stream: the body is read, so the next message is `http.disconnect`, sent by uvicorn the
    moment the connection closes (or once the response is complete). Polling `request.is_disconnected()`
    instead would need a poll interval, trading the CPU of every waiting request against how long an
    abandoned one keeps its rows."""
    left = False

    async def cancel_on_disconnect() -> None:
        nonlocal left
        while (await request.receive())["type"] != "http.disconnect":
            pass
        left = True
        tg.cancel_scope.cancel()

    async with contextlib.aclosing(deltas), anyio.create_task_group() as tg:
        tg.start_soon(cancel_on_disconnect)
        async for delta in deltas:
            job.add(delta)
        tg.cancel_scope.cancel()  # the answer is complete: stop watching
    return not left


async def _sse(svc: Parts, job: Job, deltas: Generation, started: float,
               include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's stream: a role delta per choice, content deltas, a finish chunk per choice,
    a usage chunk if asked, then `data: [DONE]`."""

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        body = ChatCompletionChunk(id=job.response_id, created=job.created, model=job.model,
                                   system_fingerprint=job.loaded.fingerprint, choices=choices, usage=usage)
        data = body.model_dump(mode="json", exclude_none=not include_usage)
        for c in data["choices"]:  # OpenAI omits unset delta fields but keeps finish_reason: null (refusal too)
            c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
            c.setdefault("finish_reason", None)
            if c.get("logprobs") is not None:
                c["logprobs"].setdefault("refusal", None)
        return f"data: {_json(data)}\n\n"

    def events(d: Delta) -> str:
        job.add(d)
        # with logprobs, a token whose text is held back (part of a character, a possible stop string) still
        # gets its chunk: every token's log-prob arrives in the chunk of the delta that drew it
        logprobs = None if not job.logprobs else ChoiceLogprobs(content=logprob_content(
            job.loaded.token_bytes, d.token_ids, d.logprobs, d.top_logprobs))
        shown = d.text or (logprobs is not None and d.token_ids)
        out = chunk([ChunkChoice(index=d.index, delta=ChunkDelta(content=d.text), logprobs=logprobs)]) if shown else ""
        if d.finish_reason is not None:
            out += chunk([ChunkChoice(index=d.index, delta=ChunkDelta(), finish_reason=d.finish_reason)])
        return out

    async with contextlib.aclosing(deltas):  # a client that leaves mid-stream cancels its rows
        yield "".join(chunk([ChunkChoice(index=i, delta=ChunkDelta(role="assistant", content=""))])
                      for i in range(job.params.n))
        try:
            async for d in deltas:
                # with the deltas that came meanwhile: a busy event loop writes once per request, not per token
                if text := "".join(events(e) for e in (d, *deltas.ready())):
                    yield text
        except Exception:
            log.exception("generation failed mid-stream for %s", job.response_id)
            err = ErrorResponse(error=ErrorBody(message="The server failed to generate a completion.",
                                                type="server_error", code="generation_failed"))
            yield f"data: {err.model_dump_json()}\n\n"
            return
    await finish(svc, job, started)
    if include_usage:
        yield chunk([], usage=job.usage())
    yield "data: [DONE]\n\n"


def _json(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def model_cards(svc: Parts) -> list[ModelCard]:
    """The served name, then every version a request may name, oldest first (reads the store's manifests)."""
    served, serving = svc.settings.served_model_name, svc.versions.current
    alias = ModelCard(id=served, created=svc.started,
                      root=None if serving is None else version_model_id(served, serving.version))
    return [alias, *(version_card(served, info) for info in svc.versions.servable())]


def version_card(served: str, info: dict) -> ModelCard:
    """One version's card from its manifest as `PolicyStore.info` gives it."""
    version, parent, base = info["version"], info["parent_version"], info["base_version"]
    return ModelCard(id=version_model_id(served, version), created=info["created"],
                     parent=None if parent is None else version_model_id(served, parent),
                     root=version_model_id(served, version if base is None else base))


@app.get("/v1/models", dependencies=[Depends(require_api_key)], **openapi.LIST_MODELS)
async def list_models():
    cards = await anyio.to_thread.run_sync(model_cards, current())
    return ModelList(data=cards).model_dump()


@app.get("/v1/models/{model:path}", dependencies=[Depends(require_api_key)], **openapi.RETRIEVE_MODEL)
async def retrieve_model(model: str):
    card = next((c for c in await anyio.to_thread.run_sync(model_cards, current()) if c.id == model), None)
    if card is None:
        raise APIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")
    return card.model_dump()


# ---------------------------------------------------------------------------- feedback

def caller_of(svc: Parts, request: Request, user: str | None) -> Caller:
    """Who sends this vote (service/limits.py): its API key when the server has keys (the dependency
    checked it), else its client address; `user` counts only under a key."""
    key = bearer_token(request) if svc.api_keys else None
    address = request.client.host if request.client else "unknown"
    return svc.vote_limits.caller(svc.id_secret, key, address, user)


def cap_votes(svc: Parts, caller: Caller, *, withdrawal: bool = False) -> None:
    """429 with Retry-After when a vote cap is reached (service/limits.py), before anything is written."""
    refusal = svc.vote_limits.admit(caller, withdrawal=withdrawal)
    if refusal is not None:
        metrics.votes_rate_limited.labels(identity_kind=refusal.kind).inc()
        window = svc.settings.vote_rate_window_s
        raise APIError(429, f"Rate limit reached for votes ({refusal.kind}): at most {refusal.limit} per {window:g} s "
                            f"on this server. Retry after {refusal.retry_after_s} s.", type="rate_limit_exceeded",
                       code="rate_limit_exceeded", headers={"Retry-After": str(refusal.retry_after_s)})


async def record(svc: Parts, event: Feedback | Preference) -> None:
    """Spool a vote or a preference; if it cannot be (spool full, disk error) the client is told, so it can retry."""
    if not await anyio.to_thread.run_sync(svc.events.emit, [event]):
        raise APIError(503, "The vote could not be recorded right now; retry later.", type="server_error",
                       code="events_unavailable")


def issued_answer(svc: Parts, response_id: str, choice_index: int, where: str) -> IssuedResponse:
    """What the id says of a response this service issued, with `choice_index` one of its choices; 404 / 400
    (param `<where>response_id` / `<where>choice_index`) otherwise."""
    issued = parse_response_id(svc.id_secret, response_id)
    if issued is None:
        raise APIError(404, f"No response with id '{response_id}' was issued by this service.",
                       param=f"{where}response_id", code="response_not_found")
    if choice_index >= issued.n:
        raise APIError(400, f"'{where}choice_index' must be below {issued.n}: the response has {issued.n} choice(s).",
                       param=f"{where}choice_index", code="invalid_value")
    return issued


@app.post("/v1/feedback", status_code=202, dependencies=[Depends(require_api_key)], **openapi.FEEDBACK)
async def post_feedback(request: Request):
    svc = current()
    req = parse(FeedbackRequest, await read_body(request, svc.settings.max_body_bytes))
    issued = issued_answer(svc, req.response_id, req.choice_index, "")
    caller = caller_of(svc, request, req.user)
    cap_votes(svc, caller)
    # the default id is one per (voter, choice); bound to the identity, so no other identity's vote replaces it
    fid = bind_feedback_id(svc.id_secret, caller.identity,
                           feedback_id_for(req.response_id, req.choice_index, req.feedback_id, caller.voter))
    rating = req.signed_rating()
    event = Feedback(feedback_id=fid, response_id=req.response_id, choice_index=req.choice_index, rating=rating,
                     comment=req.comment, user=req.user, identity=caller.identity, voter=caller.voter)
    await record(svc, event)
    word = "up" if rating == 1 else "down"
    metrics.votes.labels(rating=word, policy_version=str(issued.policy_version)).inc()
    return FeedbackAccepted(id=fid, object="feedback", response_id=req.response_id, rating=word).model_dump()


@app.delete("/v1/feedback/{feedback_id:path}", status_code=202, dependencies=[Depends(require_api_key)],
            **openapi.WITHDRAW)
async def delete_feedback(feedback_id: str, request: Request):
    svc = current()
    rid, _ = split_feedback_id(feedback_id) or ("", "")
    issued = parse_response_id(svc.id_secret, rid)
    if issued is None:
        raise APIError(404, f"No feedback with id '{feedback_id}' can exist: it names no response this service issued.",
                       param="feedback_id", code="feedback_not_found")
    caller = caller_of(svc, request, None)
    if not cast_by(svc.id_secret, caller.identity, feedback_id):
        raise APIError(403, "Only whoever cast a vote may withdraw it: this one was cast with another API key "
                            "(or, on a server without keys, from another client address).",
                       param="feedback_id", code="permission_denied")
    cap_votes(svc, caller, withdrawal=True)
    event = Feedback(feedback_id=feedback_id, response_id=rid, rating=None, deleted=True, identity=caller.identity)
    await record(svc, event)
    metrics.votes_withdrawn.labels(policy_version=str(issued.policy_version)).inc()
    return FeedbackAccepted(id=feedback_id, object="feedback.deleted", response_id=rid, rating=None,
                            deleted=True).model_dump()


# ---------------------------------------------------------------------------- preferences


def same_prompt(chosen: AnswerRef, rejected: AnswerRef, a: IssuedResponse, b: IssuedResponse) -> None:
    """400 unless the two answers are two and answer one prompt: two choices of one response, or two responses
    whose ids carry the same prompt tag (make_response_id); ids from before prompts were bound carry none."""
    if chosen == rejected:
        raise APIError(400, "'chosen' and 'rejected' are the same answer: a preference compares two.",
                       param="rejected", code="invalid_value")
    if chosen.response_id == rejected.response_id:
        return
    if a.prompt is None or b.prompt is None:
        raise APIError(400, "One of the responses was issued before response ids carried their prompt, so this "
                            "server cannot tell whether both answer the same prompt; compare two choices of one "
                            "response, or newer responses.", param="rejected.response_id", code="prompt_unknown")
    if a.prompt != b.prompt:
        raise APIError(400, "The two responses answer different prompts: a preference compares answers to the "
                            "same messages.", param="rejected.response_id", code="prompt_mismatch")


@app.post("/v1/preferences", status_code=202, dependencies=[Depends(require_api_key)], **openapi.PREFERENCE)
async def post_preference(request: Request):
    svc = current()
    req = parse(PreferenceRequest, await read_body(request, svc.settings.max_body_bytes))
    chosen, rejected = (AnswerRef(response_id=c.response_id, choice_index=c.choice_index)
                        for c in (req.chosen, req.rejected))
    issued = issued_answer(svc, chosen.response_id, chosen.choice_index, "chosen.")
    same_prompt(chosen, rejected, issued, issued_answer(svc, rejected.response_id, rejected.choice_index, "rejected."))
    caller = caller_of(svc, request, req.user)
    cap_votes(svc, caller)  # a preference is a label like a vote: the same caps count it
    # one id per (voter, unordered pair), bound to the identity: its next preference on the pair replaces this one
    pid = bind_feedback_id(svc.id_secret, caller.identity, preference_id_for(chosen, rejected, caller.voter),
                           label="preference")
    event = Preference(preference_id=pid, chosen=chosen, rejected=rejected, tie=req.tie, comment=req.comment,
                       user=req.user, identity=caller.identity, voter=caller.voter)
    await record(svc, event)
    metrics.preferences.labels(tie=str(req.tie).lower(), policy_version=str(issued.policy_version)).inc()
    return PreferenceAccepted(id=pid, chosen=req.chosen, rejected=req.rejected, tie=req.tie).model_dump()


@app.delete("/v1/preferences/{preference_id:path}", status_code=202, dependencies=[Depends(require_api_key)],
            **openapi.WITHDRAW_PREFERENCE)
async def delete_preference(preference_id: str, request: Request):
    svc = current()
    rid, _ = split_feedback_id(preference_id) or ("", "")
    if parse_response_id(svc.id_secret, rid) is None:
        raise APIError(404, f"No preference with id '{preference_id}' can exist: it names no response this service "
                            "issued.", param="preference_id", code="preference_not_found")
    caller = caller_of(svc, request, None)
    if not cast_by(svc.id_secret, caller.identity, preference_id, label="preference"):
        raise APIError(403, "Only whoever stated a preference may withdraw it: this one was stated with another API "
                            "key (or, on a server without keys, from another client address).",
                       param="preference_id", code="permission_denied")
    cap_votes(svc, caller, withdrawal=True)
    await record(svc, Preference(preference_id=preference_id, chosen=None, rejected=None, deleted=True,
                                 identity=caller.identity))
    metrics.preferences_withdrawn.inc()
    return PreferenceAccepted(id=preference_id, chosen=None, rejected=None, deleted=True).model_dump()


# ---------------------------------------------------------------------------- the loop page's data


@app.get("/v1/loop", dependencies=[Depends(require_api_key)], **openapi.LOOP)
async def get_loop():
    svc = current()
    return (await loop_view(svc.settings, svc.board)).model_dump(mode="json")


@app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
@app.api_route("/admin/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def unknown_url(request: Request, rest: str):
    """OpenAI's 404 for any other /v1 path, and for /admin here: the admin API has its own port."""
    raise APIError(404, f"Unknown request URL: {request.method} {request.url.path}.", code="unknown_url")


# ---------------------------------------------------------------------------- pages and the OpenAPI document
# A route of this app wins over BentoML's own at the same path (docs/service.md, "OpenAPI"):
# `/` is the playground instead of BentoML's index page, `/docs.json` our document.

STATIC = Path(__file__).parent / "static"


@app.get("/", include_in_schema=False)
async def playground():
    return FileResponse(STATIC / "playground.html", media_type="text/html")


@app.get("/loop", include_in_schema=False)
async def loop_page():
    return FileResponse(STATIC / "loop.html", media_type="text/html")


@app.get("/openapi.json", include_in_schema=False)
@app.get("/docs.json", include_in_schema=False)
async def openapi_document():
    return openapi.document(app, current().settings, max_stop=MAX_STOP_STRINGS)


@app.get("/docs", include_in_schema=False)
async def docs():
    return HTMLResponse(openapi.DOCS_PAGE)
