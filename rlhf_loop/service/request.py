"""A request's state inside the engine: one typed object, from submission to its last delta.

    Request -> its Choices (the n rows it decodes) -> Deltas (what the API streams)

The scheduler queues `Request`s, the model runner holds their `Choice`s as batch rows,
the sampler draws each row with its request's parameters and generator, and a choice
turns its tokens into text with its own `Detokenizer`. Nothing about a request lives
anywhere else.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from rlhf_loop.service.detokenizer import Detokenizer

if TYPE_CHECKING:
    from rlhf_loop.service.loaded import LoadedVersion

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float  # 0 = greedy
    top_p: float  # nucleus mass in (0, 1]
    max_tokens: int
    n: int  # choices: rows that share one prefill of the prompt
    stop: tuple[str, ...]
    seed: int  # always set: the API draws one when the client gave none, and logs it
    top_logprobs: int = 0  # the most likely tokens each draw also reports (0..20); the chosen one's log-prob always comes


@dataclass(frozen=True)
class Draw:
    """What the sampler (service/sampler.py) drew for one row: its token, the token's log-prob under the distribution it was drawn from, and
    that distribution's most likely tokens as (token id, log-prob), most likely first (only when the
    row's request asked for `top_logprobs`; at most that many)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """New output of one choice: text to show, the tokens sampled with their log-probs (one each, under the
    distribution each was drawn from: service/sampler.py), the most likely tokens at each of them (only when
    the request asked for top_logprobs), and the finish reason on its last delta."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    logprobs: tuple[float, ...] = ()
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()


class Status(enum.Enum):
    WAITING = "waiting"  # queued; nothing computed yet
    PREFILLING = "prefilling"  # its prompt is going through the model, maybe in chunks
    RUNNING = "running"  # its choices are rows of a decode batch
    FINISHED = "finished"  # every choice finished, the request failed, or its client left


@dataclass(eq=False)
class Request:
    """One chat completion: what to generate, with which policy, and where its deltas go.

    `loaded` is the version the API took at admission: every token comes from it, so a
    response never mixes versions. `generator` is seeded by `params.seed` and used by
    this request's rows only. `outbox` is the API's queue on `loop`: the engine thread
    puts Deltas, then None (the end) or an exception, on it with `call_soon_threadsafe`.
    """

    loaded: "LoadedVersion"
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    outbox: asyncio.Queue
    generator: torch.Generator = field(init=False)
    choices: list["Choice"] = field(init=False)
    status: Status = Status.WAITING
    cancelled: bool = False  # set from the API's thread when the client leaves; the engine acts at its next step
    arrived: float = field(default_factory=time.monotonic)  # for the time to first token

    def __post_init__(self) -> None:
        self.generator = torch.Generator(device=self.loaded.device).manual_seed(self.params.seed)
        self.choices = [Choice(self, i, Detokenizer(self.loaded.tokenizer, self.params.stop))
                        for i in range(self.params.n)]


@dataclass(eq=False)
class Choice:
    """One of a request's n answers, and one row of a decode batch while it runs."""

    request: Request
    index: int
    detokenizer: Detokenizer
    # sampled so far: up to and including the token that completed a stop string, eos excluded
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None

    @property
    def running(self) -> bool:
        """Still a row of its batch: not finished, and its request has not ended (failed, cancelled) either."""
        return self.finish_reason is None and self.request.status is not Status.FINISHED

    def advance(self, draw: Draw) -> Delta:
        """Take the token sampled for this choice and say what to stream (the finish reason on the last delta)."""
        token_id = draw.token_id
        if token_id in self.request.loaded.eos_token_ids:
            self.finish_reason = "stop"
            return Delta(self.index, self.detokenizer.flush(), (), "stop")
        self.token_ids.append(token_id)
        text, stopped = self.detokenizer.push(token_id)
        if stopped:
            self.finish_reason = "stop"
        elif len(self.token_ids) == self.request.params.max_tokens:
            self.finish_reason = "length"
            text += self.detokenizer.flush()
        top = (draw.top,) if self.request.params.top_logprobs else ()
        return Delta(self.index, text, (token_id,), self.finish_reason, (draw.logprob,), top)
