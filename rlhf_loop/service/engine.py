"""The generation engine: one thread owns the model's forward passes and batches every running request.

    deltas = engine.stream(loaded, prompt_ids, params)     # EngineFull when the queue is full (429)
    async with contextlib.aclosing(deltas):
        async for delta in deltas: ...                     # leaving early cancels the request
    engine.run_between_steps(fn)                           # fn() on the engine thread, between two steps

Each step of the engine thread (continuous batching, as in vLLM's v1 engine and nano-vllm):
1. drop the requests whose clients left (their rows leave the batch now);
2. the scheduler (service/scheduler.py) admits waiting requests as a prefill group;
3. the model runner (service/runner.py) runs one decode forward per LoadedVersion over all its
   running rows, and the sampler (service/sampler.py) draws each row's token with its own
   request's parameters and generator, with its log-prob (and the top ones where the request asked);
4. the runner runs the next chunk of the prefill group; when its prompts are complete,
   their first tokens are drawn and their rows (n per request) join the decode batch;
5. each row's detokenizer (service/detokenizer.py) turns its token into text, finished
   rows leave the batch, and the deltas go to the API's event loop, one hop for all
   requests (at most every STREAM_INTERVAL_S, below).

One request's failure never touches another's, and every request gets an end:
- a forward (or the batched sampling after it) that fails fails the requests of that
  batch or prefill group, with the error;
- what is done per request after it (its rows' tokens: a row whose logits are not finite,
  `Choice.advance`, the stop check, the detokenizer) runs in `_advance_request`, wrapped
  once: an error there ends that request alone, at once, and the rest of its batch goes on;
- anything else that fails a step is a bug: every live request ends with the error (none
  is left waiting for ever: the engine keeps every request it took in `_live` until it ends).

A request holds one `LoadedVersion` from start to end. Rows of different LoadedVersion objects never
share a forward, so during a hot swap the old and the new version run side by side, each
in its own batch, until the old one's last row ends; then its batch and KV cache are
dropped and its weights are freed with the last reference to the object.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from rlhf_loop.service import metrics
from rlhf_loop.service.loaded import LoadedVersion
from rlhf_loop.service.request import Choice, Delta, Draw, Request, SamplingParams, Status
from rlhf_loop.service.runner import ModelRunner, Prefill
from rlhf_loop.service.sampler import sample
from rlhf_loop.service.scheduler import Limits, Scheduler

log = logging.getLogger(__name__)

T = TypeVar("T")

# Deltas go to an event loop at most this often, and only once it has written out the last ones: on a
# small model a step takes a millisecond or two, and each SSE write costs the event loop (BentoML's
# middleware, a syscall) GIL time that the next step needs. Held deltas of a request leave together, in
# one write. A first token, an end or an error goes at once.
STREAM_INTERVAL_S = 0.01


class EngineFull(Exception):
    """The waiting queue is at `max_waiting_requests`; the API answers 429 with Retry-After."""


_NOT_YET = object()  # Generation._end before the engine has ended the request


class Generation:
    """The deltas of one request, as an async iterator. `aclose()`, or dropping it unfinished,
    cancels the request: the engine frees its rows at its next step."""

    def __init__(self, engine: "Engine", request: Request):
        self._request = request
        self._end: Any = _NOT_YET  # None (done) or the exception, once `ready()` has read it
        self._cancel = weakref.finalize(self, engine.cancel, request)

    def __aiter__(self) -> "Generation":
        return self

    async def __anext__(self) -> Delta:
        item = await self._request.outbox.get() if self._end is _NOT_YET else self._end
        if isinstance(item, Delta):
            return item
        self._cancel.detach()  # ended (or failed) on the engine's side: nothing left to cancel
        if item is None:
            raise StopAsyncIteration
        raise item

    def ready(self) -> list[Delta]:
        """The deltas that have arrived already, without waiting (the end stays for the next `__anext__`):
        a stream that fell behind catches up in one write instead of one per token."""
        deltas = []
        while self._end is _NOT_YET and not self._request.outbox.empty():
            item = self._request.outbox.get_nowait()
            if isinstance(item, Delta):
                deltas.append(item)
            else:
                self._end = item
        return deltas

    async def aclose(self) -> None:
        self._cancel()


class Engine:
    """One per replica: a thread that runs steps over every running request (see the module docstring)."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.scheduler = Scheduler(limits)
        self.runner = ModelRunner()
        self._wake = threading.Condition()  # guards everything below, shared with the API's threads
        self._inbox: list[Request] = []
        self._calls: list[tuple[Callable[[], Any], Future]] = []
        self._waiting = 0  # len(scheduler.waiting) as of the end of the last step
        self._cancellations = False  # some request was cancelled since the engine last looked
        self._live: dict[Request, None] = {}  # every request taken from the inbox and not ended (engine thread only)
        self._out = _Outbox()  # deltas not handed to the event loop yet (engine thread only)
        self._last_decode_at: float | None = None  # for the inter-token latency: the previous decode step
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    # -- the API's side (any thread)

    def stream(self, loaded: LoadedVersion, prompt_ids: list[int], params: SamplingParams) -> Generation:
        """Queue a request now (EngineFull if the queue is full) and return its deltas."""
        request = Request(loaded, list(prompt_ids), params, asyncio.get_running_loop(), asyncio.Queue())
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self._inbox) + self._waiting >= self.limits.max_waiting_requests:
                metrics.engine_rejected.inc()
                raise EngineFull(f"{self.limits.max_waiting_requests} requests are already waiting")
            self._inbox.append(request)
            self._wake.notify()
        return Generation(self, request)

    def cancel(self, request: Request) -> None:
        """The client left: free the request's rows at the next step (any thread; a finished request is left alone)."""
        request.cancelled = True
        self._cancellations = True

    def run_between_steps(self, fn: Callable[[], T]) -> "Future[T]":
        """Run `fn()` on the engine thread between two steps (no forward runs meanwhile): the place to change
        a model that requests may be using. The future resolves with its result or exception."""
        future: Future[T] = Future()
        with self._wake:
            if self._closed:
                future.set_exception(RuntimeError("the engine is closed"))
                return future
            self._calls.append((fn, future))
            self._wake.notify()
        return future

    def close(self) -> None:
        """Stop after the current step; requests still going get an error, pending calls too."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # -- the engine thread

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._inbox or self._calls or self._closed or self._busy()):
                    self._wake.wait()
                if self._closed:
                    break
                calls, self._calls = self._calls, []
                self.scheduler.waiting.extend(self._inbox)
                self._live.update(dict.fromkeys(self._inbox))
                self._inbox.clear()
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # handed to whoever waits on the future
                        future.set_exception(e)
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as e:  # a bug, not a model failure (those fail their batch only): fail everyone, go on
                log.exception("engine step failed")
                self._fail(list(self._live), e)
            self._out.send(force=not self._busy())
            with self._wake:
                self._waiting = len(self.scheduler.waiting)
        self._live.update(dict.fromkeys(self._inbox))
        self._fail(list(self._live), RuntimeError("the engine is closed"))
        for _, future in self._calls:
            future.set_exception(RuntimeError("the engine is closed"))

    def _busy(self) -> bool:
        return bool(self.scheduler.waiting or self.runner.batches or self.runner.prefilling)

    def _step(self) -> None:
        if self._cancellations:
            self._cancellations = False  # before looking, so that a cancel arriving meanwhile is seen next step
            self._drop_cancelled()
        runner = self.runner
        if runner.prefilling is None:
            group = self.scheduler.admit(runner.rows)
            if group:
                for request in group:
                    request.status = Status.PREFILLING
                try:
                    runner.prefilling = Prefill.of(group)
                except Exception as e:
                    log.exception("cannot prefill %d request(s) on %s", len(group), group[0].loaded.fingerprint)
                    self._fail(group, e)

        now = time.monotonic()
        if runner.batches and self._last_decode_at is not None:
            metrics.inter_token_latency.observe(now - self._last_decode_at)  # what every running row waited
        self._last_decode_at = now if runner.batches else None
        for batch in list(runner.batches):
            try:
                draws = sample(runner.decode(batch), batch.rows)  # (B, V) logits -> B tokens and their log-probs
            except Exception as e:
                log.exception("decode step failed on %s", batch.loaded.fingerprint)
                self._fail(list(dict.fromkeys(c.request for c in batch.rows)), e)
                continue
            self._advance(batch.rows, draws)
            runner.keep(batch, [i for i, choice in enumerate(batch.rows) if choice.running])

        prefill = runner.prefilling
        if prefill is not None:
            started = [(i, r) for i, r in enumerate(prefill.requests) if r.status is Status.PREFILLING]
            origin = [i for i, r in started for _ in r.choices]  # row j continues prompt origin[j]
            rows = [c for _, r in started for c in r.choices]
            try:
                logits = runner.prefill(prefill, self.scheduler.prefill_columns(len(prefill.requests), runner.rows))
                # (k, V) once every prompt is in: each choice draws its first token
                draws = None if logits is None else sample(logits[origin], rows)
            except Exception as e:
                log.exception("prefill failed on %s", prefill.loaded.fingerprint)
                self._fail(prefill.requests, e)
                draws = None
            if draws is not None:
                runner.prefilling = None
                self._advance(rows, draws)
                going = [j for j, choice in enumerate(rows) if choice.running]
                if going:
                    runner.start(prefill, [rows[j] for j in going], [origin[j] for j in going])

        metrics.engine_waiting.set(len(self.scheduler.waiting))
        metrics.engine_running.set(runner.rows)

    def _advance(self, rows: list[Choice], draws: list[Draw | None]) -> None:
        """Give each row its sampled token, request by request: one whose rows fail ends alone, with the error.
        The caller drops the rows that are no longer `running` from the batch."""
        drawn: dict[Request, list[tuple[Choice, Draw | None]]] = {}
        for choice, draw in zip(rows, draws):
            drawn.setdefault(choice.request, []).append((choice, draw))
        for request, its_rows in drawn.items():
            try:
                self._advance_request(request, its_rows)
            except Exception as e:
                log.exception("request failed on %s; the rest of its batch goes on", request.loaded.fingerprint)
                self._end(request, e)

    def _advance_request(self, request: Request, rows: list[tuple[Choice, Draw | None]]) -> None:
        """Queue the deltas of one request's rows (their sampled tokens), and its end once every choice finished."""
        first = request.status is Status.PREFILLING
        for choice, draw in rows:
            if draw is None:
                raise FloatingPointError(f"the model's logits for choice {choice.index} are not finite (NaN or inf)")
            self._out.put(request, choice.advance(draw), urgent=first)
        if first:
            request.status = Status.RUNNING
            metrics.time_to_first_token.observe(time.monotonic() - request.arrived)
        if all(c.finish_reason is not None for c in request.choices):
            self._end(request, None)

    def _end(self, request: Request, item: BaseException | None) -> None:
        """The one way a request ends that its client waits for: None (done) or the error goes to it, and the
        engine forgets it. Its rows, wherever they are, are no longer `running`: whoever holds them drops them."""
        request.status = Status.FINISHED
        del self._live[request]
        self._out.put(request, item)

    def _drop_cancelled(self) -> None:
        gone = [r for r in self._live if r.cancelled]
        for request in gone:
            request.status = Status.FINISHED  # nobody waits for its end
            del self._live[request]
        if gone:
            metrics.engine_cancelled.inc(len(gone))
            self._sweep()

    def _fail(self, requests: list[Request], error: BaseException) -> None:
        """End `requests` with `error` (the API answers 500, or an error event mid-stream) and free their rows."""
        for request in requests:
            if request.status is not Status.FINISHED:
                self._end(request, error)
        self._out.send(force=True)
        self._sweep()

    def _sweep(self) -> None:
        """Take requests that ended early (cancelled, failed) out of the queue, the prefill and the batches."""
        for batch in list(self.runner.batches):
            self.runner.keep(batch, [i for i, c in enumerate(batch.rows) if c.request.status is not Status.FINISHED])
        prefill = self.runner.prefilling
        if prefill is not None and all(r.status is Status.FINISHED for r in prefill.requests):
            self.runner.prefilling = None  # nobody waits for it any more
        self.scheduler.waiting = deque(r for r in self.scheduler.waiting if r.status is not Status.FINISHED)


class _Outbox:
    """What the engine hands to the API's event loops: per loop, one `call_soon_threadsafe` per hand-off."""

    def __init__(self) -> None:
        self.loops: dict[asyncio.AbstractEventLoop, _Handoff] = {}

    def put(self, request: Request, item: Delta | BaseException | None, urgent: bool = False) -> None:
        handoff = self.loops.setdefault(request.loop, _Handoff())
        handoff.items.append((request.outbox, item))
        handoff.since = min(handoff.since, time.monotonic())
        handoff.urgent = handoff.urgent or urgent or not isinstance(item, Delta)

    def send(self, force: bool = False) -> None:
        """Hand over what is due (see STREAM_INTERVAL_S); `force`: everything."""
        now = time.monotonic()
        for loop, h in list(self.loops.items()):
            if not h.items or not (force or h.urgent or (h.drained and now - h.since >= STREAM_INTERVAL_S)):
                continue
            items, h.items, h.since, h.urgent, h.drained = h.items, [], float("inf"), False, False
            try:
                loop.call_soon_threadsafe(_deliver, items, h)
            except RuntimeError:  # that loop is closed: its requests' clients are gone
                del self.loops[loop]


@dataclass(eq=False)
class _Handoff:
    """Deltas waiting for one event loop, and whether that loop has written out the last ones."""

    items: list[tuple[asyncio.Queue, Any]] = field(default_factory=list)
    since: float = float("inf")  # when the oldest waiting item was put
    urgent: bool = False  # holds a first token, an end or an error
    drained: bool = True  # set on the loop once the readers woken by the last hand-off have run


def _deliver(items: list[tuple[asyncio.Queue, Any]], handoff: _Handoff) -> None:
    for queue, item in items:
        queue.put_nowait(item)
    # the readers these puts woke run before this callback (the ready queue is first in, first out)
    asyncio.get_running_loop().call_soon(setattr, handoff, "drained", True)
