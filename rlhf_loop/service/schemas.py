"""Request and response bodies of the HTTP API: OpenAI's chat shapes, feedback, preferences, the loop page's
view, admin, errors.

Requests are validated strictly (a string is not a number, a float is not an int) and a
field we do not support but a client might send is accepted and ignored only when
ignoring it cannot change the answer; `tools` and non-text content are refused.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from rlhf_loop.core.contracts import FEEDBACK_KEY
from rlhf_loop.core.loop_report import LoopRound, VersionApproval

# ---------------------------------------------------------------------------- chat request


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]  # developer = OpenAI's newer name for system
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def contract_role(self) -> Literal["system", "user", "assistant"]:
        return "system" if self.role == "developer" else self.role


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


MAX_TOP_LOGPROBS = 20  # as OpenAI
StopString = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions. Limits that depend on settings are checked by the handler."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1)
    stop: StopString | list[StopString] | None = Field(None)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    user: str | None = Field(None, max_length=256)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None  # each answer token's log-prob under the distribution it was drawn from
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # only with logprobs: true (as OpenAI)
    # accepted for compatibility, refused when it would change the answer
    tools: list[Any] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


# ---------------------------------------------------------------------------- chat response


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class TopLogprob(BaseModel):
    """One of the most likely tokens at a position: its text (U+FFFD for part of a character), log-prob, and
    its own UTF-8 bytes (a character split across tokens is whole once their bytes are joined)."""

    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(BaseModel):
    """An answer token (as TopLogprob) and the `top_logprobs` most likely tokens where it was drawn, most
    likely first; fewer when fewer could be drawn (outside the nucleus a token's log-prob is -inf)."""

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """A choice's (or a stream chunk's) log-probs: one entry per token of its content."""

    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChoiceLogprobs | None = None  # with logprobs: true, those of the tokens in this chunk's delta


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """A model clients may name: the served name (whatever version serves now) or one version of it.
    `parent` and `root` are vLLM's extra fields, in this project's terms (docs/service.md, "Versions by name")."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rlhf-loop"
    parent: str | None = None  # a version: the version it was trained from
    root: str | None = None  # the served name: the version it names now; a version: the full weights it runs on


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------------- model names
# `<served name>` is the version serving now; `<served name>@v<N>` is version N (as vLLM lists LoRA adapters
# beside their base). N as the store and response ids write it: decimal, no leading zero, at most 9 digits.

_VERSION_SUFFIX = "@v(0|[1-9][0-9]{0,8})"


def version_model_id(served: str, version: int) -> str:
    """The model name of one version: `rlhf-policy@v3`."""
    return f"{served}@v{version}"


def model_version(served: str, model: str) -> int | None:
    """The version a request's `model` names: None for the served name (the version serving now), N for
    `<served>@vN`; ValueError for any other name."""
    if model == served:
        return None
    m = re.fullmatch(re.escape(served) + _VERSION_SUFFIX, model)
    if m is None:
        raise ValueError(f"not a model name of {served!r}: {model!r}")
    return int(m[1])


def model_name_pattern(served: str) -> str:
    """The names `model_version` takes, as a JSON Schema (ECMA-262) pattern."""
    literal = "".join("\\" + c if c in r"\^$.|?*+()[]{}/" else c for c in served)
    return f"^{literal}({_VERSION_SUFFIX})?$"


# ---------------------------------------------------------------------------- feedback

FeedbackKey = Annotated[str, StringConstraints(pattern=f"^{FEEDBACK_KEY.pattern}$")]


class FeedbackRequest(BaseModel):
    """POST /v1/feedback. `feedback_id` is the client's idempotency key (default: one per voter and choice);
    `user` names the voter only under an API key (without keys the client address is the voter)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    response_id: str = Field(max_length=128)
    rating: Literal["up", "down", 1, -1]
    choice_index: int = Field(0, ge=0)
    comment: str | None = Field(None, max_length=4000)
    user: str | None = Field(None, max_length=256)
    feedback_id: FeedbackKey | None = None

    @field_validator("rating", mode="before")
    @classmethod
    def _exactly_one_of(cls, v: Any) -> Any:
        if isinstance(v, (bool, float)):  # Literal compares with ==, which would take true and 1.0
            raise ValueError("rating must be \"up\", \"down\", 1 or -1")
        return v

    def signed_rating(self) -> Literal[1, -1]:
        return 1 if self.rating in ("up", 1) else -1


class FeedbackAccepted(BaseModel):
    id: str
    object: Literal["feedback", "feedback.deleted"]
    status: Literal["accepted"] = "accepted"
    response_id: str
    rating: Literal["up", "down"] | None
    deleted: bool = False


# ---------------------------------------------------------------------------- preferences


class AnswerChoice(BaseModel):
    """One answer of a response this service gave: its id and which choice (default the first)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    response_id: str = Field(max_length=128)
    choice_index: int = Field(0, ge=0)


class PreferenceRequest(BaseModel):
    """POST /v1/preferences: `chosen` is preferred to `rejected`, two answers to one prompt (two choices of
    one `n` >= 2 response, or two responses to the same messages); with `tie`, neither is (the two are
    just the pair). `user` names the voter only under an API key, as for feedback."""

    model_config = ConfigDict(extra="forbid", strict=True)

    chosen: AnswerChoice
    rejected: AnswerChoice
    tie: bool = False
    user: str | None = Field(None, max_length=256)
    comment: str | None = Field(None, max_length=4000)


class PreferenceAccepted(BaseModel):
    id: str
    object: Literal["preference"] = "preference"
    chosen: AnswerChoice | None
    rejected: AnswerChoice | None
    tie: bool = False
    deleted: bool = False


# ---------------------------------------------------------------------------- the loop page (GET /v1/loop)


class ReplicaServing(BaseModel):
    """One replica's line on the replica board (service/loop.py)."""

    name: str = Field(description="`<hostname>:<port>`: in Kubernetes the pod's name")
    serving: int | None = Field(description="the policy version it serves; null while it loads its first")
    pinned: int | None = Field(description="the version an admin pinned on it, or null")
    latest: int | None = Field(description="LATEST in the policy store as it last read it")
    seen: float = Field(description="unix time of this line; older than a few `policy_poll_s`: the replica is away")
    answering: bool = Field(False, description="true for the replica that answered this request")


class TrainerStatus(BaseModel):
    status: Literal["ok", "not_configured", "unreachable"]
    detail: str | None = Field(None, description="why there are no rounds: the setting missing, or the error")


class LoopView(BaseModel):
    """GET /v1/loop: what the loop page at /loop draws."""

    object: Literal["loop"] = "loop"
    replicas: list[ReplicaServing]
    trainer: TrainerStatus = Field(description="whether the rounds and approval below come from the trainer")
    rounds: list[LoopRound] = Field(description="the trainer's newest rounds, oldest first (empty without it)")
    approval: list[VersionApproval] = Field(description="live approval by policy version over time (empty without it)")


# ---------------------------------------------------------------------------- admin


class PinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    version: int = Field(ge=0)


# ---------------------------------------------------------------------------- errors


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
