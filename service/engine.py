"""Generation: a loaded policy, a token-by-token decode loop with a KV cache, and the engine in front.

    async for delta in engine.stream(policy, prompt_ids, params): ...

The API layer only talks to `Engine.stream`. Behind it, today, every request decodes on
its own worker thread (torch releases the GIL inside its ops, so requests overlap); a
continuous-batching scheduler would replace `Engine` and keep the same `stream`
signature, grouping requests that hold the same `Policy` object.

A request holds one `Policy` from start to end, so a hot swap never mixes versions
inside one answer: the old object lives until its last request lets go of it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Policy:
    """One loaded policy version. Immutable: swapping versions means swapping Policy objects."""

    version: int
    model: Any  # a transformers causal LM in eval mode
    tokenizer: Any
    eos_token_ids: frozenset[int]
    max_context: int  # positions the model can attend to (prompt + completion)

    @classmethod
    def from_pretrained(cls, version: int, model, tokenizer) -> "Policy":
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        max_context = model.config.max_position_embeddings
        return cls(version, model, tokenizer, frozenset(eos_ids), max_context)

    @property
    def fingerprint(self) -> str:
        """What `system_fingerprint` says: the one version that produced a response."""
        return f"policy-v{self.version}"

    @property
    def device(self) -> torch.device:
        return self.model.device

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                                       tokenize=True, return_dict=False))


@dataclass(frozen=True)
class SamplingParams:
    temperature: float  # 0 = greedy
    top_p: float  # nucleus mass in (0, 1]
    max_tokens: int
    n: int  # choices, decoded as one batch of n rows
    stop: tuple[str, ...]
    seed: int  # always set: the API draws one when the client gave none, and logs it


@dataclass(frozen=True)
class Delta:
    """New output of one choice: text to show, the tokens sampled, and the finish reason on its last delta."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None


class TextAssembler:
    """Token ids -> text deltas for one choice, with stop strings cut out and never leaked.

    The text is decoded from all ids each step (byte-level BPE can split a character across
    tokens; a trailing U+FFFD means "incomplete") and a tail that could still become a stop
    string is held back until it cannot.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.emitted = 0  # characters of text already handed out

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (new text, whether a stop string ended the answer)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
            delta = text[self.emitted:end]
            self.emitted = max(self.emitted, end)
            return delta, True
        safe = len(text.rstrip("\ufffd"))
        hold = max((k for s in self.stop for k in range(1, len(s)) if text[:safe].endswith(s[:k])), default=0)
        delta = text[self.emitted:safe - hold]
        self.emitted = max(self.emitted, safe - hold)
        return delta, False

    def flush(self) -> str:
        """Whatever was held back, at the end of an answer that did not hit a stop string."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta = text[self.emitted:]
        self.emitted = len(text)
        return delta


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: greedy at temperature 0, else temperature + nucleus sampling."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        drop[..., 0] = False  # a top_p below float32's smallest number compares as 0 >= 0 (found by fuzzing)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(policy: Policy, prompt_ids: list[int], params: SamplingParams,
             cancelled: threading.Event | None = None) -> Iterator[Delta]:
    """Decode `params.n` answers to one prompt, yielding deltas as tokens come.

    One prefill of the prompt, its KV cache repeated to n rows, then one forward per step
    over the rows still going; finished rows leave the batch. Sampling uses this request's
    own generator seeded by `params.seed`, so the same seed gives the same answers however
    many other requests run meanwhile.
    """
    if cancelled is not None and cancelled.is_set():  # the client left while this waited in the queue
        return
    model, device = policy.model, policy.device
    generator = torch.Generator(device=device).manual_seed(params.seed)
    texts = [TextAssembler(policy.tokenizer, params.stop) for _ in range(params.n)]

    out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True)  # prefill (1, T)
    cache = out.past_key_values
    logits = out.logits[:, -1, :].expand(params.n, -1)  # (n, V)
    if params.n > 1:
        cache.batch_repeat_interleave(params.n)
    rows = list(range(params.n))  # batch row -> choice index

    for step in range(params.max_tokens):
        if cancelled is not None and cancelled.is_set():
            return
        next_ids = sample(logits, params.temperature, params.top_p, generator).tolist()  # (B,)
        keep: list[int] = []
        for row, (choice, tok) in enumerate(zip(rows, next_ids)):
            asm = texts[choice]
            if tok in policy.eos_token_ids:
                yield Delta(choice, asm.flush(), (), "stop")
                continue
            text, stopped = asm.push(tok)
            if stopped:
                yield Delta(choice, text, (tok,), "stop")
            elif step == params.max_tokens - 1:
                yield Delta(choice, text + asm.flush(), (tok,), "length")
            else:
                yield Delta(choice, text, (tok,))
                keep.append(row)
        if not keep:
            return
        if len(keep) < len(rows):
            cache.batch_select_indices(torch.tensor(keep, device=device))
            next_ids = [next_ids[r] for r in keep]
            rows = [rows[r] for r in keep]
        step_ids = torch.tensor(next_ids, device=device).unsqueeze(-1)  # (B, 1)
        out = model(input_ids=step_ids, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1, :]  # (B, V)


class Engine:
    """Runs generations on a pool of worker threads and streams their deltas to asyncio.

    `threads` requests decode at once; more wait in the pool's queue (never behind a lock).
    This class is the seam for a batching scheduler: same `stream` signature, different inside.
    """

    def __init__(self, threads: int):
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="generate")

    async def stream(self, policy: Policy, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue()
        cancelled = threading.Event()

        def run() -> None:
            try:
                for delta in generate(policy, prompt_ids, params, cancelled):
                    loop.call_soon_threadsafe(queue.put_nowait, delta)
            except BaseException as e:  # handed to the awaiting request, which raises it
                loop.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        self._pool.submit(run)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()  # the client went away or the caller stopped reading: free the thread

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
