"""Serving benchmark: chat latency and throughput at concurrency 1, 8 and 32, and votes/s ingested.

    python bench/serve.py                       # starts its own broker and `rlhf serve`, then measures
    python bench/serve.py --requests-per-level 64 --max-tokens 32

Per concurrency level it sends a fixed number of chat completions (POST /v1/chat/completions,
httpx, sampled answers of up to --max-tokens tokens) and reports latency p50/p99, requests/s
and completion tokens/s. Then it posts --votes votes at concurrency 16 and reports votes/s
accepted (202) and the time until all of them were read back from Kafka. For comparison, the
naive way: the same requests answered one after another in this process by Hugging Face
`model.generate` on the same model. Prints a table; saves bench/results/serve-<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from kafka import KafkaConsumer, TopicPartition

from rlhf import tinylm
from rlhf.broker import EmbeddedBroker, client_options, free_port
from rlhf.contracts import Feedback, Settings
from rlhf.models import base_model_dir, load_causal_lm
from service import serve

API_KEY = "bench-key"
RESULTS = Path(__file__).resolve().parent / "results"


def prompts(n: int) -> list[str]:
    subjects = list(tinylm.SUBJECTS)
    return [tinylm.QUESTIONS[i % len(tinylm.QUESTIONS)].replace("{s}", subjects[i % len(subjects)]) for i in range(n)]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def chat_level(url: str, concurrency: int, n_requests: int, max_tokens: int, model: str) -> dict:
    """n_requests chat completions, `concurrency` in flight at a time."""
    texts = prompts(n_requests)
    latencies: list[float] = []
    tokens = 0
    ids: list[str] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            i = queue.get_nowait()
            body = {"model": model, "messages": [{"role": "user", "content": texts[i]}], "max_tokens": max_tokens,
                    "temperature": 1.0, "seed": i}
            t0 = time.perf_counter()
            r = await client.post("/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - t0)
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]
            ids.append(r.json()["id"])

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=600,
                                 limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": n_requests, "wall_s": round(wall, 3),
            "latency_p50_s": round(percentile(latencies, 0.5), 4), "latency_p99_s": round(percentile(latencies, 0.99), 4),
            "requests_per_s": round(n_requests / wall, 2), "completion_tokens_per_s": round(tokens / wall, 1),
            "completion_tokens": tokens, "_ids": ids}


async def votes(url: str, response_ids: list[str], n_votes: int, concurrency: int = 16) -> tuple[dict, list[str], float]:
    """POST n_votes votes (unique feedback ids) at `concurrency`; (figures, feedback ids, start time)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n_votes):
        queue.put_nowait(i)
    fids: list[str] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
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
    consumer = KafkaConsumer(**client_options(Settings(kafka_bootstrap_servers=bootstrap)), group_id=None,
                             enable_auto_commit=False, auto_offset_reset="earliest")
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


def naive_baseline(model_dir: str, n_requests: int, max_tokens: int, torch_threads: int) -> dict:
    """The same requests answered one at a time in-process with HF `generate` (no server, no batching),
    with as many torch threads as the service gives each request (more oversubscribes a shared machine)."""
    torch.set_num_threads(torch_threads)
    model, tok = load_causal_lm(model_dir, Settings(device="cpu"))
    latencies, tokens = [], 0
    t0 = time.perf_counter()
    for i, text in enumerate(prompts(n_requests)):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        torch.manual_seed(i)
        s = time.perf_counter()
        out = model.generate(ids, do_sample=True, temperature=1.0, max_new_tokens=max_tokens,
                             pad_token_id=tok.pad_token_id)
        latencies.append(time.perf_counter() - s)
        tokens += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - t0
    return {"what": "HF model.generate, sequential, in-process", "torch_threads": torch_threads,
            "requests": n_requests, "wall_s": round(wall, 3),
            "latency_p50_s": round(percentile(latencies, 0.5), 4), "latency_p99_s": round(percentile(latencies, 0.99), 4),
            "requests_per_s": round(n_requests / wall, 2), "completion_tokens_per_s": round(tokens / wall, 1)}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).lower().replace(" ", "-")
    return "cpu"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-level", type=int, default=64, help="at least 4 x the concurrency")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--votes", type=int, default=1000)
    ap.add_argument("--engine-threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/serve-<device>.json")
    args = ap.parse_args()

    settings = Settings()
    model_dir = base_model_dir(settings)  # builds the embedded model on first use
    load_before = os.getloadavg()
    torch_threads = max(1, (os.cpu_count() or 1) // args.engine_threads)  # as service/service.py sets it
    baseline = naive_baseline(model_dir, args.requests_per_level, args.max_tokens, torch_threads)
    print(f"naive baseline: {baseline['requests_per_s']:.1f} req/s", flush=True)
    state = Path(tempfile.mkdtemp(prefix="rlhf-bench-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RLHF_STATE_DIR": str(state), "RLHF_MODEL": model_dir, "RLHF_API_KEYS": API_KEY,
           "RLHF_ENGINE_THREADS": str(args.engine_threads), "RLHF_ADMIN_PORT": str(free_port()),
           "RLHF_VOTE_RATE_LIMIT": "0"}  # what the vote path takes, not what one client may cast
    env.pop("BENTOML_HOME", None)
    with EmbeddedBroker(log_path=state / "broker.log") as broker, open(state / "service.log", "ab") as log:
        env["RLHF_KAFKA_BOOTSTRAP_SERVERS"] = broker.bootstrap
        t0 = time.perf_counter()
        proc = serve.spawn("127.0.0.1", port, env, log)
        try:
            serve.wait_ready(url, proc)
            startup = time.perf_counter() - t0
            print(f"service ready in {startup:.1f}s (log: {state / 'service.log'})", flush=True)
            asyncio.run(chat_level(url, 4, 8, args.max_tokens, settings.served_model_name))  # warm-up
            levels = []
            for c in args.levels:
                r = asyncio.run(chat_level(url, c, max(args.requests_per_level, 4 * c), args.max_tokens,
                                           settings.served_model_name))
                levels.append(r)
                print(f"  concurrency {c:>3}: p50 {r['latency_p50_s']:.3f}s p99 {r['latency_p99_s']:.3f}s "
                      f"{r['requests_per_s']:.1f} req/s {r['completion_tokens_per_s']:.0f} tok/s", flush=True)
            ids = levels[-1]["_ids"]
            vote, fids, start = asyncio.run(votes(url, ids, args.votes))
            vote["all_on_kafka_s"] = round(time_until_on_kafka(broker.bootstrap, settings.topic_feedback,
                                                               set(fids), start), 3)
            print(f"  votes: {vote['votes_per_s']:.0f}/s accepted, all on Kafka after {vote['all_on_kafka_s']:.2f}s",
                  flush=True)
        finally:
            serve.terminate(proc)

    for r in levels:
        r.pop("_ids")
    result = {
        "bench": "serve", "device": device_name(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "python": sys.version.split()[0], "torch": torch.__version__, "model": Path(model_dir).name,
        "max_tokens": args.max_tokens, "engine_threads": args.engine_threads, "startup_s": round(startup, 1),
        "chat": levels, "votes": vote, "naive_hf_generate": baseline,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "note": "CPU figures on a shared machine (other jobs running); compare rows of one run, not runs.",
    }
    print()
    print(f"{'':<34}{'p50 s':>8}{'p99 s':>8}{'req/s':>8}{'tok/s':>8}")
    for r in levels:
        print(f"{'service, concurrency ' + str(r['concurrency']):<34}{r['latency_p50_s']:>8.3f}{r['latency_p99_s']:>8.3f}"
              f"{r['requests_per_s']:>8.1f}{r['completion_tokens_per_s']:>8.0f}")
    b = baseline
    print(f"{'HF generate, sequential':<34}{b['latency_p50_s']:>8.3f}{b['latency_p99_s']:>8.3f}"
          f"{b['requests_per_s']:>8.1f}{b['completion_tokens_per_s']:>8.0f}")
    print(f"votes: {vote['votes_per_s']:.0f}/s accepted (concurrency {vote['concurrency']}), "
          f"all {vote['votes']} on Kafka {vote['all_on_kafka_s']:.2f}s after the first was sent")
    out = args.out or RESULTS / f"serve-{device_name()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
