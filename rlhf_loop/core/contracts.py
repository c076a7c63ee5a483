"""The contracts shared by the service and the trainer: settings, events, ids, store layout.

Both sides import this file and nothing else of each other (docs/architecture.md).
Every event is JSON from one of the pydantic models below; producer and consumer use
the same classes, so a field renamed here is renamed everywhere.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# An event may gain an optional field (with a default) without a new version: new readers read old
# events. Events forbid unknown fields, so readers (the trainer) are deployed before writers (the
# service). A field whose meaning changes, or that is removed, is a new version.
SCHEMA_VERSION = 1
EMBEDDED_MODEL = "tiny-chat"  # the model setting's value that means "the project's own default model"


# ---------------------------------------------------------------------------- settings


class Settings(BaseSettings):
    """Every setting the code reads, from `RLHF_*` environment variables.

    Paths left empty are derived from `state_dir`. Secrets are never logged.
    """

    model_config = SettingsConfigDict(env_prefix="RLHF_", extra="ignore", frozen=True)

    # -- model and state
    model: str = Field(EMBEDDED_MODEL, description="'tiny-chat' (built on first use) or any HF causal-LM dir/id")
    served_model_name: str = Field("rlhf-policy", description="the `model` name clients use")
    state_dir: Path = Field(Path(".rlhf"), description="root for models, spool, trainer state, policies")
    policy_store: Path | None = Field(None, description="policy store dir; default <state_dir>/policies")
    new_lineage: bool = Field(False, description="the store was made from another model than RLHF_MODEL: move its versions aside (<store>/lineages/<n>) and start again from RLHF_MODEL's version 0; without it such a store is refused")
    chat_template: str = Field("", description="chat template for a base model that has none: 'chatml', a .jinja file, or the Jinja text itself")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bf16 on CUDA, fp32 on CPU")

    # -- kafka
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism; used only with the SASL_* protocols")
    kafka_sasl_username: str = Field("", description="SASL user (Strimzi: the KafkaUser's name); required with SASL_*")
    kafka_sasl_password: SecretStr = Field(SecretStr(""), description="SASL password; required with SASL_*")
    kafka_ssl_cafile: str = Field("", description="path to the CA PEM that signed the brokers' certificates (SSL, "
                                                  "SASL_SSL); empty = the system CAs")
    topic_interactions: str = "rlhf.interactions"
    topic_feedback: str = "rlhf.feedback"
    topic_policy_updates: str = "rlhf.policy-updates"
    topic_dlq: str = "rlhf.dlq"
    topic_partitions: int = Field(3, ge=1, description="partitions for topics this project creates")
    create_topics: bool = Field(True, description="create missing topics at start (off where Strimzi owns them)")

    # -- service
    host: str = "0.0.0.0"
    port: int = 3000
    admin_port: int = Field(3001, description="admin API port, separate so a NetworkPolicy can keep it private")
    api_keys: SecretStr = Field(SecretStr(""), description="comma-separated bearer keys, each `key` or `key=quota` "
                                                           "(its own vote_key_rate_limit); empty = no auth")
    admin_key: SecretStr = Field(SecretStr(""), description="bearer key for /admin; empty = admin API disabled")
    response_id_secret: SecretStr = Field(SecretStr(""), description="HMAC key for response ids; empty = per-state-dir file")
    max_body_bytes: int = Field(256 * 1024, ge=1024)
    max_messages: int = Field(64, ge=1)
    max_prompt_tokens: int = Field(512, ge=8)
    max_tokens_limit: int = Field(256, ge=1, description="cap on max_tokens / max_completion_tokens")
    default_max_tokens: int = Field(48, ge=1)
    max_n: int = Field(4, ge=1)
    spool_max_bytes: int = Field(512 * 1024 * 1024, description="spool disk cap; above it chat still works, events are counted as dropped")
    engine_max_running_seqs: int = Field(64, ge=1, description="rows (choices) one replica decodes per step, in one batch per policy version")
    engine_max_batched_tokens: int = Field(512, ge=1, description="tokens per engine step: decode rows plus prompt tokens; longer prompts are prefilled in chunks")
    engine_max_waiting_requests: int = Field(128, ge=1, description="requests queued before they start; beyond it chat answers 429 with Retry-After")
    policy_poll_s: float = Field(5.0, gt=0, description="how often a replica re-reads LATEST (fallback for missed announcements)")
    named_versions_kept: int = Field(2, ge=0, description="versions a replica keeps loaded for chat requests that name "
                                                          "one (`model: <served name>@v<N>`), least recently named out "
                                                          "first; an adapter costs its few MB, a full-weight version "
                                                          "(or an adapter over a base not in memory) a model's memory; "
                                                          "0 = only the versions in memory anyway (serving, draining) "
                                                          "can be named")
    vote_rate_limit: int = Field(60, ge=0, description="votes per window per voter (a key's user, or the key for a vote "
                                                       "without one; without keys, the client address: its votes and "
                                                       "withdrawals together), per replica; 0 = no cap")
    vote_rate_window_s: float = Field(60.0, gt=0, description="the window of both vote caps, seconds")
    vote_key_rate_limit: int = Field(3000, ge=0, description="votes + withdrawals per window per API key, all its users "
                                                             "together, per replica, unless RLHF_API_KEYS gives that key "
                                                             "its own (`key=quota`); 0 = no cap")

    # -- trainer
    trainer_group: str = "rlhf-trainer"
    train_min_labels: int = Field(64, ge=1, description="a round starts when this many new labels arrived ...")
    train_max_wait_s: float = Field(120.0, gt=0, description="... or this long passed with at least one")
    late_vote_window_s: float = Field(3600.0, gt=0, description="how long a vote waits for its response, and back")
    trainer_metrics_port: int = Field(0, ge=0, le=65535, description="`rlhf train` serves Prometheus /metrics here; 0 = off")
    trainer_url: str = Field("", description="the trainer's metrics server (http://<host>:<RLHF_TRAINER_METRICS_PORT>), "
                                             "whose GET /loop a replica relays to the loop page; empty = the page "
                                             "shows no rounds")

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @property
    def policy_dir(self) -> Path:
        return (self.policy_store or self.state_dir / "policies").expanduser().resolve()

    @property
    def model_source(self) -> str:
        """The base model as a policy store records it (Manifest.source): a directory by its absolute
        path, the embedded model or a hub id by name."""
        path = Path(self.model).expanduser()
        return str(path.resolve()) if path.is_dir() else self.model

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"

    @property
    def trainer_dir(self) -> Path:
        return self.state_dir / "trainer"

    @property
    def model_cache_dir(self) -> Path:
        return self.state_dir / "models"

    def api_key_set(self) -> frozenset[str]:
        return frozenset(self.api_key_quotas())

    def api_key_quotas(self) -> dict[str, int]:
        """API key -> its vote quota: `key=N` gives N, a bare `key` vote_key_rate_limit. Only a decimal
        number after the last `=` is a quota, so a key may itself end in `=` (base64 padding)."""
        out = {}
        for entry in filter(None, (e.strip() for e in self.api_keys.get_secret_value().split(","))):
            m = re.fullmatch(r"(.+)=([0-9]+)", entry)
            out[m[1] if m else entry] = int(m[2]) if m else self.vote_key_rate_limit
        return out

    def id_secret(self) -> bytes:
        """The response-id HMAC key: from the environment, else one kept in the state dir (single-host dev)."""
        if self.response_id_secret.get_secret_value():
            return self.response_id_secret.get_secret_value().encode()
        path = self.state_dir / "response_id_secret"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{uuid.uuid4().hex}")
            # created with its mode: a file made first and chmod-ed after is readable by others in between
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                f.write(secrets.token_hex(32))
            try:
                path.hardlink_to(tmp)  # first writer wins; others read its key
            except FileExistsError:
                pass
            tmp.unlink()
        return path.read_text().strip().encode()


# ---------------------------------------------------------------------------- response ids

_ID_PREFIX = "chatcmpl-"


def make_response_id(secret: bytes, policy_version: int = 0, n: int = 1, prompt: str | None = None) -> str:
    """`chatcmpl-<nonce>-<tag>`: tag = HMAC(secret, nonce), so any replica can check it issued the id.

    The nonce is `<random hex>v<policy_version>n<n>p<prompt>`: the tag covers the policy version
    that produced the response, its number of choices and its prompt's tag (prompt_tag), so a
    vote can be attributed to a version (and its choice_index checked), and a preference between
    two responses checked to compare answers to one prompt, without shared state. Ids made before
    prompts were bound have no `p` part: still valid for votes (parse_response_id's prompt None).
    """
    nonce = f"{secrets.token_hex(12)}v{policy_version}n{n}" + (f"p{prompt}" if prompt is not None else "")
    return f"{_ID_PREFIX}{nonce}-{_tag(secret, nonce)}"


def prompt_tag(secret: bytes, messages: list[Message]) -> str:
    """16 hex of HMAC(secret, the prompt): equal for equal prompts, and (keyed) says nothing of the prompt
    to whoever holds an id. The canonical form is the trainer's prompt_key's: [[role, content], ...]."""
    canonical = json.dumps([[m.role, m.content] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hmac.new(secret, b"prompt\x00" + canonical.encode(), hashlib.sha256).hexdigest()[:16]


class IssuedResponse(NamedTuple):
    policy_version: int
    n: int
    prompt: str | None = None  # its prompt's prompt_tag; None in ids issued before prompts were bound


_NONCE = re.compile(r"[0-9a-f]{24}v(\d{1,9})n(\d{1,4})(?:p([0-9a-f]{16}))?")
MAX_RESPONSE_ID = 96  # "chatcmpl-" + nonce (at most 24 + 1 + 9 + 1 + 4 + 1 + 16) + "-" + 24


def parse_response_id(secret: bytes, response_id: str) -> IssuedResponse | None:
    """What a response id we issued says (policy version, number of choices, prompt tag); None if not ours."""
    if not verify_response_id(secret, response_id):
        return None
    m = _NONCE.fullmatch(response_id[len(_ID_PREFIX):].partition("-")[0])
    return IssuedResponse(int(m[1]), int(m[2]), m[3]) if m else None


def verify_response_id(secret: bytes, response_id: str) -> bool:
    if not response_id.startswith(_ID_PREFIX) or len(response_id) > MAX_RESPONSE_ID:
        return False
    nonce, _, tag = response_id[len(_ID_PREFIX):].partition("-")
    return bool(nonce) and hmac.compare_digest(tag.encode(), _tag(secret, nonce).encode())  # bytes: any text is input


def _tag(secret: bytes, nonce: str) -> str:
    return hmac.new(secret, nonce.encode(), hashlib.sha256).hexdigest()[:24]


FEEDBACK_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # a client's idempotency key
_BOUND_KEY = re.compile(rf"{FEEDBACK_KEY.pattern}\.[0-9a-f]{{16}}")  # the part of a feedback id after ':'


def feedback_id_for(response_id: str, choice_index: int, key: str | None, voter: str | None) -> str:
    """`<response_id>:<key>`, one vote's id among its identity's votes; the key is the client's, else
    one per (voter, choice), so that a voter's second vote on an answer replaces the first.

    The service binds it to the identity that cast it (bind_feedback_id) before using it. Carrying
    the response id lets DELETE /v1/feedback/{id} key its tombstone to the vote's partition
    without shared state.
    """
    if key is None:
        key = "u" + hashlib.sha256(f"{voter or ''}\x00{choice_index}".encode()).hexdigest()[:16]
    return f"{response_id}:{key}"


Label = Literal["vote", "preference"]  # what a bound id names: bind_feedback_id's tags differ by it


def preference_id_for(a: AnswerRef, b: AnswerRef, voter: str) -> str:
    """`<response_id>:pref-<hash>`, one preference's id among its identity's: one per (voter, unordered
    pair of answers), so a voter's second preference between the same two answers (either way round,
    or a tie) replaces the first. The response id is the pair's first answer's (AnswerRef order), the
    Kafka key of all its events: a replacement and a withdrawal land on the partition of what they replace.
    The service binds it to the identity (bind_feedback_id(..., label="preference")) before using it.
    """
    first, second = sorted([a, b], key=lambda r: (r.response_id, r.choice_index))
    digest = hashlib.sha256(f"{voter}\x00{first.response_id}\x00{first.choice_index}\x00"
                            f"{second.response_id}\x00{second.choice_index}".encode()).hexdigest()[:16]
    return f"{first.response_id}:pref-{digest}"


def bind_feedback_id(secret: bytes, identity: str, feedback_id: str, label: Label = "vote") -> str:
    """The canonical feedback (or preference) id `<response_id>:<key>.<tag>`, tag = HMAC(secret, label,
    identity, feedback_id).

    Another identity's vote with the same key gets another id (a second vote, never a replacement),
    and any replica can tell from the id alone whether a caller cast it (cast_by). `label` keeps the
    kinds apart: a preference's id is no vote's id, whatever key a client chose.
    """
    return f"{feedback_id}.{_bind_tag(secret, identity, feedback_id, label)}"


def cast_by(secret: bytes, identity: str, feedback_id: str, label: Label = "vote") -> bool:
    """Whether `feedback_id` is one that `identity` cast (bind_feedback_id made it for that identity and label)."""
    unbound, _, tag = feedback_id.rpartition(".")
    return hmac.compare_digest(tag.encode(), _bind_tag(secret, identity, unbound, label).encode())


def _bind_tag(secret: bytes, identity: str, feedback_id: str, label: Label) -> str:
    return hmac.new(secret, f"{label}\x00{identity}\x00{feedback_id}".encode(), hashlib.sha256).hexdigest()[:16]


def split_feedback_id(feedback_id: str) -> tuple[str, str] | None:
    """`<response_id>:<key>.<tag>` -> (response_id, key with its tag); None when it is not of that form."""
    response_id, sep, key = feedback_id.partition(":")
    return (response_id, key) if sep and _BOUND_KEY.fullmatch(key) else None


# ---------------------------------------------------------------------------- events


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    ts: datetime = Field(default_factory=_now)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None = None


class Interaction(Event):
    """One answer (one choice of a completion). Keyed by `response_id`."""

    kind: Literal["interaction"] = "interaction"
    response_id: str
    choice_index: int = Field(0, ge=0)
    policy_version: int = Field(ge=0)
    model: str
    messages: list[Message] = Field(min_length=1)
    prompt_token_ids: list[int]
    completion: str
    completion_token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    sampling: Sampling
    user: str | None = None
    created: int = Field(default_factory=lambda: int(time.time()))
    # The behaviour policy's log-prob of each completion token (policy_version, as sampled: temperature and top_p
    # applied; for temperature 0 the raw log-softmax), one per completion_token_ids; None in events from before it
    completion_logprobs: list[float] | None = None

    @model_validator(mode="after")
    def _one_logprob_per_token(self) -> "Interaction":
        if self.completion_logprobs is not None and len(self.completion_logprobs) != len(self.completion_token_ids):
            raise ValueError(f"completion_logprobs has {len(self.completion_logprobs)} entries for "
                             f"{len(self.completion_token_ids)} completion tokens")
        return self

    @property
    def key(self) -> str:
        """The Kafka key: a response's events share a partition."""
        return self.response_id


class Feedback(Event):
    """A vote (rating +1/-1) or its withdrawal (`deleted`, rating None). Keyed by `response_id`.

    The latest event per `feedback_id` wins; the same `event_id` twice counts once. A feedback id is
    bound to the identity that cast it (bind_feedback_id), so only that identity replaces or withdraws it.
    """

    kind: Literal["feedback"] = "feedback"
    feedback_id: str
    response_id: str
    choice_index: int = Field(0, ge=0)
    rating: Literal[1, -1] | None
    comment: str | None = None
    user: str | None = None  # the client's own user id: data, trusted only as part of `voter` under an API key
    # Who cast it, as the service authenticated it: `key:<hash of the API key>`, else `address:<hash of the
    # client address>` (HMACs with the response-id secret); None in events from before identities.
    identity: str | None = None
    # Whom the influence caps count: `<identity>/<user>` under a key (its app vouches for its users), else the
    # identity; in events from before identities, whatever the service then counted (or None: the user).
    voter: str | None = None
    deleted: bool = False

    @property
    def key(self) -> str:
        return self.response_id


class PolicyUpdate(Event):
    """A promoted policy version, announced after it is complete in the store; or a rollback.

    `base_version` is set when the version is a LoRA adapter over that (full) version.
    `rollback_of` is set when LATEST moved back to `version` from that version (the trainer's
    live-approval watch): replicas serving `rollback_of` move back although `version` is older.
    """

    kind: Literal["policy_update"] = "policy_update"
    version: int = Field(ge=0)
    parent_version: int | None = Field(None, ge=0)
    base_version: int | None = None
    rollback_of: int | None = None
    uri: str
    files: dict[str, str]
    metrics: dict[str, float] = {}
    created: int = Field(default_factory=lambda: int(time.time()))


class AnswerRef(BaseModel):
    """One answer: a choice of a response, by id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    response_id: str
    choice_index: int = Field(0, ge=0)


class Preference(Event):
    """One identity's preference between two answers to one prompt, or its withdrawal (`deleted`, with
    chosen and rejected None). `tie`: neither is better (chosen / rejected are then just the two).

    Like a Feedback: the latest event per `preference_id` wins; the same `event_id` twice counts once;
    the id is bound to the identity that cast it (bind_feedback_id, label "preference"), one per voter
    and unordered pair (preference_id_for). Keyed by the id's response id (`key`): the pair's first
    answer's, which is the chosen one's or the rejected one's (docs/architecture.md says why not always
    the chosen's). The service checked both ids are its own and answer the same prompt.
    """

    kind: Literal["preference"] = "preference"
    preference_id: str
    chosen: AnswerRef | None
    rejected: AnswerRef | None
    tie: bool = False
    comment: str | None = None
    user: str | None = None  # as Feedback's
    identity: str | None = None  # as Feedback's
    voter: str | None = None  # as Feedback's: whom the influence caps count
    deleted: bool = False

    @model_validator(mode="after")
    def _pair_or_tombstone(self) -> "Preference":
        if self.deleted != (self.chosen is None) or (self.chosen is None) != (self.rejected is None):
            raise ValueError("a preference needs chosen and rejected; a withdrawal (deleted=true) must have neither")
        if self.chosen is not None and self.chosen == self.rejected:
            raise ValueError("chosen and rejected are the same answer")
        return self

    @property
    def key(self) -> str:
        return self.preference_id.partition(":")[0]


AnyEvent = Annotated[Interaction | Feedback | Preference | PolicyUpdate, Field(discriminator="kind")]
FeedbackEvent = Annotated[Feedback | Preference, Field(discriminator="kind")]  # what the feedback topic carries


class DeadLetter(BaseModel):
    """What the trainer writes to the DLQ topic for a message it could not use."""

    topic: str
    partition: int
    offset: int
    reason: str
    value: str  # the original bytes, decoded with errors="replace"
    ts: datetime = Field(default_factory=_now)


# ---------------------------------------------------------------------------- policy store layout
#
#   <policy_dir>/versions/v000003/{config.json, model.safetensors, tokenizer*, manifest.json}   full weights
#   <policy_dir>/versions/v000004/{adapter_config.json, adapter_model.safetensors, manifest.json}
#                                 a LoRA adapter; its manifest names the base version and the
#                                 sha256 of the base's manifest, so both are verified
#   <policy_dir>/LATEST          -> "3\n"   (replaced atomically with os.replace)
#   <policy_dir>/ROLLBACKS.json  -> {"4": {"to": 3, "reason": ..., "ts": ...}}   versions rolled back, and why
#   <policy_dir>/tmp/            staging; a version appears in versions/ only when complete
# Version 0 is the base (reference) model. core/policy_store.py implements this.


def version_dirname(version: int) -> str:
    return f"v{version:06d}"


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int
    parent_version: int | None
    files: dict[str, str]  # file name -> sha256 hex
    metrics: dict[str, float] = {}
    created: int
    base_version: int | None = None  # a LoRA adapter: the full version it applies to ...
    base_sha256: str | None = None  # ... and the sha256 of that version's manifest.json
    source: str | None = None  # version 0: the model it was copied from (Settings.model_source); None in older stores
