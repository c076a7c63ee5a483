"""Serving benchmark: the continuous-batching engine against the per-request engine it replaced,
HF `generate` on padded batches and transformers' own continuous batching, at concurrency 1 to 64.

    .venv/bin/python bench/serve.py                                  # both models, every variant (long on 2 cores)
    .venv/bin/python bench/serve.py --models embedded --variants service previous
    .venv/bin/python bench/serve.py --levels 1 32 --max-tokens 32 --out /tmp/serve.json

Models: the embedded one and a random-weight Llama of SmolLM-135M's shape (hidden 576, 30
layers, 9 heads, 3 KV heads, vocab 49152; app/random_models.py), whose answers always run to
--max-tokens. Variants, per model and concurrency c (c requests in flight until the level's
requests are all answered):
  service      this checkout's `rlhf serve`: streaming chat completions over HTTP (httpx)
  previous     the same against the last commit whose engine decoded each request on its own
               thread (--previous; default: found with `git log -S ThreadPoolExecutor`), unpacked
               with `git archive` into a temp dir and started with this venv
  engine       this checkout's `Engine` in-process, no HTTP: what batching alone gives
  hf-cb        transformers' `ContinuousBatchingManager` in-process (paged cache, `paged|sdpa`)
  hf-generate  HF `model.generate` on left-padded batches of c prompts, in-process
Each reports completion tokens/s, requests/s, time to first token p50/p99 and latency p50/p99.
Sampling at temperature 1 with a seed per request; hf-cb and hf-generate have no per-request
seed (one sampling config for all) and hf-generate's first token is timed for its whole batch.
In-process variants get the torch threads the service gives its engine (all cores but one).

Then, on `service`: how often batching changes a seeded answer (--agreement-requests requests
with n=2, each alone, then all at concurrency 32; answers compared choice by choice), and on the
embedded model's service, votes/s accepted and the time until all are on Kafka.
Saves bench/results/serve-<device>.json with the machine's description and load averages.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import torch  # noqa: E402
from kafka import KafkaConsumer, TopicPartition  # noqa: E402

import _timing  # noqa: E402
from rlhf_loop.app import random_models  # noqa: E402
from rlhf_loop.core import tinylm  # noqa: E402
from rlhf_loop.core.broker import EmbeddedBroker, free_port  # noqa: E402
from rlhf_loop.core.contracts import Feedback, Settings  # noqa: E402
from rlhf_loop.core.models import base_model_dir, load_causal_lm  # noqa: E402
from rlhf_loop.service import serve  # noqa: E402

API_KEY = "bench-key"
RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("service", "previous", "engine", "hf-cb", "hf-generate")
MIN_REQUESTS = {"embedded": 64, "llama-135m": 16}  # per level, and at least 2 x c
AGREEMENT_REQUESTS = {"embedded": 64, "llama-135m": 16}


def model_path(name: str, settings: Settings) -> str:
    if name == "embedded":
        return base_model_dir(settings)  # builds the embedded model on first use
    return str(random_models.ensure(settings.model_cache_dir / "random", name))


def prompts(n: int) -> list[str]:
    subjects = list(tinylm.SUBJECTS)
    return [tinylm.QUESTIONS[i % len(tinylm.QUESTIONS)].replace("{s}", subjects[i % len(subjects)]) for i in range(n)]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


@dataclass
class Done:
    """One answered request, times from when it was sent."""

    ttft: float | None
    latency: float
    tokens: int


def summary(concurrency: int, done: list[Done], wall: float) -> dict:
    ttfts = [d.ttft for d in done if d.ttft is not None]
    tokens = sum(d.tokens for d in done)
    return {"concurrency": concurrency, "requests": len(done), "wall_s": round(wall, 3),
            "completion_tokens": tokens, "completion_tokens_per_s": round(tokens / wall, 1),
            "requests_per_s": round(len(done) / wall, 2),
            "ttft_p50_s": round(percentile(ttfts, 0.5), 4) if ttfts else None,
            "ttft_p99_s": round(percentile(ttfts, 0.99), 4) if ttfts else None,
            "latency_p50_s": round(percentile([d.latency for d in done], 0.5), 4),
            "latency_p99_s": round(percentile([d.latency for d in done], 0.99), 4)}


async def closed_loop(concurrency: int, n_requests: int, one: Callable[[int], Awaitable[Done]]) -> dict:
    """`concurrency` workers answer requests 0..n_requests-1 with `one(i)`, each taking the next as it finishes."""
    todo = iter(range(n_requests))
    done: list[Done] = []

    async def worker() -> None:
        for i in todo:
            done.append(await one(i))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summary(concurrency, done, time.perf_counter() - t0)


# ---------------------------------------------------------------------------- over HTTP


def chat_body(model: str, text: str, max_tokens: int, seed: int, **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 1.0, "seed": seed, **kw}


async def http_level(url: str, model: str, concurrency: int, n_requests: int, max_tokens: int) -> dict:
    texts = prompts(n_requests)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=1800,
                                 limits=limits) as client:
        async def one(i: int) -> Done:
            body = chat_body(model, texts[i], max_tokens, i, stream=True, stream_options={"include_usage": True})
            t0 = time.perf_counter()
            ttft, tokens = None, 0
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    # string tests, not a JSON parse per token: the client shares the machine with the server
                    if ttft is None and '"content":"' in line and '"content":""' not in line:
                        ttft = time.perf_counter() - t0
                    if '"usage":{' in line:
                        tokens = json.loads(line.removeprefix("data: "))["usage"]["completion_tokens"]
            return Done(ttft, time.perf_counter() - t0, tokens)

        return await closed_loop(concurrency, n_requests, one)


async def seeded_answers(url: str, model: str, n_requests: int, max_tokens: int, concurrency: int) -> list[list[str]]:
    texts = prompts(n_requests)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=1800,
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        answers: list[list[str]] = [[] for _ in range(n_requests)]

        async def one(i: int) -> Done:
            r = await client.post("/v1/chat/completions", json=chat_body(model, texts[i], max_tokens, 1000 + i, n=2))
            r.raise_for_status()
            answers[i] = [c["message"]["content"] for c in r.json()["choices"]]
            return Done(None, 0.0, 0)

        await closed_loop(concurrency, n_requests, one)
    return answers


def agreement(url: str, model: str, n_requests: int, max_tokens: int) -> dict:
    """How often an answer given among 31 others differs from the same seeded request's answer alone."""
    alone = asyncio.run(seeded_answers(url, model, n_requests, max_tokens, 1))
    batched = asyncio.run(seeded_answers(url, model, n_requests, max_tokens, 32))
    pairs = [(a, b) for ra, rb in zip(alone, batched) for a, b in zip(ra, rb)]
    changed = sum(a != b for a, b in pairs)
    return {"requests": n_requests, "n": 2, "choices": len(pairs), "concurrency": 32, "max_tokens": max_tokens,
            "temperature": 1.0, "choices_changed": changed, "fraction_changed": round(changed / len(pairs), 4)}


async def votes(url: str, response_ids: list[str], n_votes: int, concurrency: int = 16) -> tuple[dict, list[str], float]:
    """POST n_votes votes (unique feedback ids) at `concurrency`; (figures, feedback ids, start time)."""
    todo = iter(range(n_votes))
    fids: list[str] = []

    async def worker(client: httpx.AsyncClient) -> None:
        for i in todo:
            body = {"response_id": response_ids[i % len(response_ids)], "rating": "up" if i % 3 else "down",
                    "feedback_id": f"bench-{i}"}
            r = await client.post("/v1/feedback", json=body)
            assert r.status_code == 202, r.text
            fids.append(r.json()["id"])

    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as client:
        start = time.time()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"votes": n_votes, "concurrency": concurrency, "wall_s": round(wall, 3),
            "votes_per_s": round(n_votes / wall, 1)}, fids, start


def time_until_on_kafka(bootstrap: str, topic: str, feedback_ids: set[str], start: float, timeout: float = 300) -> float:
    """Seconds from the first vote sent until the last of `feedback_ids` was readable on Kafka."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest")
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        missing = set(feedback_ids)
        deadline = time.monotonic() + timeout
        while missing and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                for r in records:
                    missing.discard(Feedback.model_validate_json(r.value).feedback_id)
        if missing:
            raise RuntimeError(f"{len(missing)} votes not on Kafka after {timeout:.0f}s")
        return time.time() - start
    finally:
        consumer.close()


def previous_commit() -> str:
    """The last commit whose engine decoded every request on its own thread (the parent of the one that
    removed the thread pool from service/engine.py)."""
    out = subprocess.run(["git", "log", "-1", "--format=%H", "-S", "ThreadPoolExecutor", "--", "service/engine.py"],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    return subprocess.run(["git", "rev-parse", f"{out}^"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()


def unpack(commit: str, dest: Path) -> Path:
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True, capture_output=True).stdout
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


@contextmanager
def service(source: Path, model_dir: str, bootstrap: str, state: Path):
    """`rlhf serve` from the checkout at `source` (this venv); yields (url, seconds to ready)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("RLHF_", "BENTOML_HOME"))},
           "RLHF_STATE_DIR": str(state), "RLHF_MODEL": model_dir, "RLHF_API_KEYS": API_KEY,
           "RLHF_ADMIN_PORT": str(free_port()), "RLHF_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
           "BENTOML_DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1",
           # the vote path's capacity, not what one client may cast
           "RLHF_VOTE_RATE_LIMIT": "0", "RLHF_VOTE_KEY_RATE_LIMIT": "0"}
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "service.log", "ab") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "rlhf_loop", "serve", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=source, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            serve.wait_ready(url, proc, timeout=300)
            yield url, time.perf_counter() - t0
        finally:
            serve.terminate(proc)


# ---------------------------------------------------------------------------- in-process


def engine_level(loaded, prompt_ids: list[list[int]], concurrency: int, n_requests: int, max_tokens: int) -> dict:
    from rlhf_loop.service.engine import Engine
    from rlhf_loop.service.request import SamplingParams
    from rlhf_loop.service.scheduler import Limits

    s = Settings()
    engine = Engine(Limits(s.engine_max_running_seqs, s.engine_max_batched_tokens, s.engine_max_waiting_requests))

    async def one(i: int) -> Done:
        params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=max_tokens, n=1, stop=(), seed=i)
        t0 = time.perf_counter()
        ttft, tokens = None, 0
        async for d in engine.stream(loaded, prompt_ids[i % len(prompt_ids)], params):
            ttft = ttft if ttft is not None or not d.text else time.perf_counter() - t0
            tokens += len(d.token_ids)
        return Done(ttft, time.perf_counter() - t0, tokens)

    try:
        return asyncio.run(closed_loop(concurrency, n_requests, one))
    finally:
        engine.close()


def hf_cb_level(manager, prompt_ids: list[list[int]], concurrency: int, n_requests: int, max_tokens: int) -> dict:
    """Closed loop on transformers' manager: a new request as soon as one finishes."""
    sent: dict[str, float] = {}
    done: list[Done] = []
    todo = iter(range(n_requests))

    def send() -> None:
        i = next(todo, None)
        if i is not None:
            rid = f"r{i}-{time.monotonic_ns()}"
            sent[rid] = time.perf_counter()
            manager.add_request(prompt_ids[i % len(prompt_ids)], request_id=rid, max_new_tokens=max_tokens,
                                record_timestamps=True)

    t0 = time.perf_counter()
    for _ in range(concurrency):
        send()
    while len(done) < n_requests:
        out = manager.get_result(timeout=5)
        if out is None or not out.is_finished():
            if out is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching thread died")
            continue
        start = sent.pop(out.request_id)
        first = out.timestamps[0] - start if out.timestamps else None
        done.append(Done(first, out.lifespan[1] - start, len(out.generated_tokens)))
        send()
    return summary(concurrency, done, time.perf_counter() - t0)


def hf_generate_level(model, tok, prompt_ids: list[list[int]], concurrency: int, n_requests: int,
                      max_tokens: int) -> dict:
    """Batches of `concurrency` prompts, left-padded, one `generate` call each; a batch's requests end together."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class FirstToken(LogitsProcessor):
        at: float | None = None

        def __call__(self, input_ids, scores):
            self.at = self.at or time.perf_counter()
            return scores

    done: list[Done] = []
    pad = tok.pad_token_id
    t0 = time.perf_counter()
    for start in range(0, n_requests, concurrency):
        batch = [prompt_ids[i % len(prompt_ids)] for i in range(start, min(start + concurrency, n_requests))]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
        first = FirstToken()
        s = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                             max_new_tokens=max_tokens, pad_token_id=pad, logits_processor=LogitsProcessorList([first]))
        latency = time.perf_counter() - s
        eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
                  else [model.generation_config.eos_token_id])
        for row in out[:, width:].tolist():
            tokens = next((k for k, t in enumerate(row) if t in eos), len(row))
            done.append(Done(first.at - s if first.at else None, latency, tokens))
    return summary(concurrency, done, time.perf_counter() - t0)


# ---------------------------------------------------------------------------- main


def run_model(name: str, args, settings: Settings, broker: EmbeddedBroker, work: Path, previous: Path | None) -> dict:
    model_dir = model_path(name, settings)
    min_requests = args.min_requests or MIN_REQUESTS[name]
    levels = [(c, max(min_requests, 2 * c)) for c in args.levels]
    result: dict = {"model": name, "model_dir": Path(model_dir).name, "variants": {}}

    def record(variant: str, rows: list[dict], load_before: tuple, **extra) -> None:
        result["variants"][variant] = {"levels": rows, "load_average_before_after": [round(load_before[0], 2),
                                       round(os.getloadavg()[0], 2)], **extra}

    for variant, source in (("service", ROOT), ("previous", previous)):
        if variant not in args.variants:
            continue
        load = os.getloadavg()
        with service(source, model_dir, broker.bootstrap, work / f"{name}-{variant}") as (url, ready):
            print(f"[{name}] {variant}: ready in {ready:.1f}s", flush=True)
            asyncio.run(http_level(url, settings.served_model_name, 4, 8, args.max_tokens))  # warm-up
            rows = []
            for c, n in levels:
                rows.append(asyncio.run(http_level(url, settings.served_model_name, c, n, args.max_tokens)))
                print(f"  c={c:>3}: {fmt(rows[-1])}", flush=True)
            extra = {"startup_s": round(ready, 1)}
            if variant == "service" and args.agreement:
                extra["seeded_agreement"] = agreement(url, settings.served_model_name,
                                                      AGREEMENT_REQUESTS[name], args.max_tokens)
                print(f"  seeded answers changed by batching: {extra['seeded_agreement']}", flush=True)
            if variant == "service" and name == "embedded" and args.votes:
                r = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                               json=chat_body(settings.served_model_name, "Hi", 4, 1, n=4), timeout=60)
                vote, fids, start = asyncio.run(votes(url, [r.json()["id"]], args.votes))
                vote["all_on_kafka_s"] = round(time_until_on_kafka(broker.bootstrap, settings.topic_feedback,
                                                                   set(fids), start), 3)
                extra["votes"] = vote
                print(f"  votes: {vote['votes_per_s']:.0f}/s accepted, all on Kafka after "
                      f"{vote['all_on_kafka_s']:.2f}s", flush=True)
        record(variant, rows, load, **extra)

    in_process = [v for v in ("engine", "hf-cb", "hf-generate") if v in args.variants]
    if in_process:
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads - 1))  # as service/service.py gives its engine
        model, tok = load_causal_lm(model_dir, Settings(device="cpu" if not torch.cuda.is_available() else "cuda"))
        from rlhf_loop.service.loaded import LoadedVersion

        loaded = LoadedVersion.of(0, model, tok)
        prompt_ids = [loaded.encode_chat([{"role": "user", "content": t}]) for t in prompts(max(n for _, n in levels))]
        for variant in in_process:
            load = os.getloadavg()
            print(f"[{name}] {variant}", flush=True)
            manager = cb_manager(model_dir, args.max_tokens) if variant == "hf-cb" else None

            def level(c: int, n: int) -> dict:
                if variant == "engine":
                    return engine_level(loaded, prompt_ids, c, n, args.max_tokens)
                if variant == "hf-cb":
                    return hf_cb_level(manager, prompt_ids, c, n, args.max_tokens)
                return hf_generate_level(model, tok, prompt_ids, c, n, args.max_tokens)

            level(4, 8)  # warm-up (hf-cb allocates its paged cache on the first requests)
            rows = []
            for c, n in levels:
                rows.append(level(c, n))
                print(f"  c={c:>3}: {fmt(rows[-1])}", flush=True)
            if variant == "hf-cb":
                manager.stop(block=True, timeout=30)
            record(variant, rows, load, torch_threads=torch.get_num_threads())
        torch.set_num_threads(threads)
    return result


def cb_manager(model_dir: str, max_tokens: int):
    """transformers' ContinuousBatchingManager on its own copy of the model (it switches the attention to paged)."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model, tok = load_causal_lm(model_dir, Settings(device="cpu" if not torch.cuda.is_available() else "cuda"))
    eos = model.generation_config.eos_token_id
    config = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=max_tokens,
                              eos_token_id=eos, pad_token_id=tok.pad_token_id)
    s = Settings()
    cb = ContinuousBatchingConfig(max_batch_tokens=s.engine_max_batched_tokens,
                                  max_requests_per_batch=s.engine_max_running_seqs)
    manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=cb)
    manager.start()
    return manager


def fmt(r: dict) -> str:
    ttft = "-" if r["ttft_p50_s"] is None else f"{r['ttft_p50_s']:.3f}/{r['ttft_p99_s']:.3f}"
    return (f"{r['completion_tokens_per_s']:>8.1f} tok/s {r['requests_per_s']:>7.2f} req/s  ttft p50/p99 {ttft} s  "
            f"latency p50/p99 {r['latency_p50_s']:.3f}/{r['latency_p99_s']:.3f} s")


def table(results: list[dict]) -> str:
    """Markdown: a row per model, variant and level."""
    lines = ["| model | variant | c | tok/s | req/s | TTFT p50 / p99 s | latency p50 / p99 s |",
             "|---|---|---|---|---|---|---|"]
    for m in results:
        for variant, v in m["variants"].items():
            for r in v["levels"]:
                ttft = "-" if r["ttft_p50_s"] is None else f"{r['ttft_p50_s']:.3f} / {r['ttft_p99_s']:.3f}"
                lines.append(f"| {m['model']} | {variant} | {r['concurrency']} | {r['completion_tokens_per_s']:.0f} | "
                             f"{r['requests_per_s']:.2f} | {ttft} | {r['latency_p50_s']:.3f} / {r['latency_p99_s']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["embedded", "llama-135m"], choices=["embedded", "llama-135m"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--min-requests", type=int, default=None,
                    help="requests per level, at least 2 x c (default: 64 embedded, 16 for the 135M model)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--previous", default=None, help="commit of the per-request engine (default: found in git)")
    ap.add_argument("--no-agreement", dest="agreement", action="store_false", help="skip the seeded-answer check")
    ap.add_argument("--votes", type=int, default=1000, help="votes to post (embedded service); 0 skips")
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/serve-<device>.json")
    args = ap.parse_args()

    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = Settings()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="rlhf-bench-serve-"))
    commit = None
    previous = None
    if "previous" in args.variants:
        commit = args.previous or previous_commit()
        previous = unpack(commit, work / "previous-src")
    results = []
    with EmbeddedBroker(log_path=work / "broker.log") as broker:
        for name in args.models:
            results.append(run_model(name, args, settings, broker, work, previous))

    slug = "cpu" if device.type == "cpu" else _timing.slug(_timing.device_name(device))
    out = args.out or RESULTS / f"serve-{slug}.json"
    payload = {
        "bench": "serve", "device": _timing.device_name(device), "device_type": device.type,
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
        "torch": torch.__version__, "max_tokens": args.max_tokens, "previous_commit": commit,
        "load_average_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        "note": "CPU figures on a shared machine (other jobs running): compare rows of one run, and read each "
                "variant's load average; an idle machine's figures are in docs/service.md when re-run there.",
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print()
    print(table(results))
    print(f"saved {out} (work dir {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
