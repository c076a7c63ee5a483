"""Seconds per training round and per phase, peak memory, bytes per version and swap time, by weight layout.

    PYTHONPATH=. .venv/bin/python bench/train_round.py                                  # embedded model, 4 rounds
    PYTHONPATH=. .venv/bin/python bench/train_round.py --model llama-135m --adapter full lora --rounds 2

What runs, per layout (`--adapter`: full, lora or auto, each in a fresh process so peak RSS is its
own): an embedded broker (tansu), the model (`tiny-chat` = the embedded one; a shape name of
rlhf/random_models.py such as `llama-135m` = that random-weight model, built into --model-cache; or
any HF causal-LM directory), a real service (`rlhf serve`) on the same policy store, and the
trainer's own `run_round` with the config `rlhf train` would resolve for that model (its scale
profile; only train.adapter is set here, so every layout gets the same rollout settings). Before each
round, --labels new interactions (the base model's answers to logged-style prompts) and one vote
each (the 'cheerful' taste, 10 % noise) are produced to Kafka, so step 1 really consumes and joins
them; the gate is told to promote (gate.min_reward_gain = -inf: random models have nothing to learn,
and every round should publish, so the swap can be timed).

Reported per round: the phases of trainer/round.py and the total; per layout: the median of each
phase, the trainer's peak RSS (ru_maxrss of its process: model, optimizer, activations), the bytes
of each published version, and the swap time: from the end of the publish (the announcement acked
by Kafka) to the first chat answer the service gives with the new version's fingerprint. Results:
bench/results/train_round-<model>-<device>.json. --threads sets torch's CPU threads (default 1:
what `rlhf train` takes on 2 cores, beside the service).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import RESULTS_DIR, device_name, slug  # noqa: E402

PHASES = ("consume", "reward_model", "rollout", "score", "ppo", "gate", "publish", "total")


def model_dir(name: str, cache: Path) -> str:
    from rlhf import random_models, tinylm

    if name == "tiny-chat":
        return str(tinylm.ensure(cache))
    if name in random_models.SHAPES:
        return str(random_models.ensure(cache / "random", name))
    return name


def traffic(state, n: int, rng: random.Random, noise: float):
    """n interactions answered by the reference (base) model, and one vote each by the taste."""
    from rlhf import tinylm
    from rlhf.contracts import Feedback, Interaction, Message, Sampling, feedback_id_for
    from rlhf.tastes import cheerful
    from trainer.policy import decode, encode_prompts, left_pad, sample

    tok = state.tokenizer
    prompts = [[{"role": "user", "content": rng.choice(tinylm.QUESTIONS).replace("{s}", rng.choice(list(tinylm.SUBJECTS)))}]
               for _ in range(n)]
    out = []
    for i in range(0, n, 16):
        chunk = prompts[i:i + 16]
        q, qm = left_pad(encode_prompts(tok, chunk, 512), tok.pad_token_id, state.device)
        r, m = sample(state.nets.reference, q, qm, max_new_tokens=state.cfg.ppo.max_new_tokens, temperature=1.0,
                      eos_ids=state.eos_ids, pad_id=tok.pad_token_id, seeds=[rng.getrandbits(63) for _ in chunk])
        for p, text in zip(chunk, decode(tok, r, m)):
            rid = f"chatcmpl-{rng.getrandbits(96):024x}-bench"
            it = Interaction(response_id=rid, policy_version=0, model="rlhf-policy",
                             messages=[Message(**x) for x in p], prompt_token_ids=[0], completion=text,
                             completion_token_ids=[0], finish_reason="stop",
                             sampling=Sampling(temperature=1.0, top_p=1.0, max_tokens=48))
            liked = cheerful(p[-1]["content"], text) != (rng.random() < noise)
            fb = Feedback(feedback_id=feedback_id_for(rid, 0, None, "bench"), response_id=rid,
                          rating=1 if liked else -1, user="bench")
            out.append((it, fb))
    return out


def first_answer_from(url: str, version: int, timeout: float = 120.0) -> float:
    """Wall clock of the first chat answer whose fingerprint is policy-v<version>."""
    import httpx

    deadline = time.monotonic() + timeout
    body = {"model": "rlhf-policy", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    while time.monotonic() < deadline:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        if r.status_code == 200 and r.json()["system_fingerprint"] == f"policy-v{version}":
            return time.time()
        time.sleep(0.02)
    raise TimeoutError(f"the service did not serve v{version} within {timeout:.0f}s")


def run_layout(args: argparse.Namespace) -> dict:
    """One layout in this process: rounds, phases, peak RSS, version bytes, swap times."""
    from kafka import KafkaProducer

    from rlhf.broker import EmbeddedBroker, client_options, ensure_topics, free_port
    from rlhf.contracts import Settings
    from service import serve
    from trainer import config
    from trainer.cli import resolve_config
    from trainer.round import run_round
    from trainer.state import TrainerState

    torch.set_num_threads(args.threads)
    path = model_dir(args.model, args.model_cache)
    state_dir = Path(tempfile.mkdtemp(prefix="rlhf-bench-train-"))
    rows, swaps = [], []
    with EmbeddedBroker(log_path=state_dir / "broker.log") as broker:
        settings = Settings(state_dir=state_dir, model=path, kafka_bootstrap_servers=broker.bootstrap)
        ensure_topics(settings)
        ap = argparse.ArgumentParser()
        config.add_arguments(ap)
        cfg = resolve_config(ap.parse_args(["--train.adapter", args.layout]), settings)
        cfg = cfg.replace(gate={"min_reward_gain": float("-inf")})
        port = free_port()
        env = {**os.environ, "RLHF_STATE_DIR": str(state_dir), "RLHF_MODEL": path,
               "RLHF_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "RLHF_ADMIN_PORT": str(free_port())}
        env.pop("BENTOML_HOME", None)
        service = serve.spawn("127.0.0.1", port, env, open(state_dir / "service.log", "ab"))
        state = TrainerState.open(settings, cfg)
        producer = KafkaProducer(**client_options(settings), acks="all")
        rng = random.Random(0)
        try:
            serve.wait_ready(f"http://127.0.0.1:{port}", service, timeout=300)
            for _ in range(args.rounds):
                for it, fb in traffic(state, args.labels, rng, args.noise):
                    producer.send(settings.topic_interactions, key=it.response_id.encode(), value=it.to_bytes())
                    producer.send(settings.topic_feedback, key=fb.response_id.encode(), value=fb.to_bytes())
                producer.flush(30)
                time.sleep(1.0)  # let the broker settle so step 1 measures a typical drain
                rep = run_round(state, progress=False)
                published = time.time()
                row = {"round": rep.round, "labels": rep.labels, "promoted": rep.promoted, "reason": rep.reason,
                       "seconds": {k: round(v, 2) for k, v in rep.seconds.items()}}
                if rep.promoted:
                    vdir = state.policies.path(rep.version)
                    row["version_bytes"] = sum(p.stat().st_size for p in vdir.iterdir())
                    row["swap_s"] = round(first_answer_from(f"http://127.0.0.1:{port}", rep.version) - published, 3)
                    swaps.append(row["swap_s"])
                rows.append(row)
                print(f"  {args.layout}: round {rep.round} {rep.seconds['total']:.1f}s, "
                      f"version {row.get('version_bytes', 0) / 1e6:.1f} MB, swap {row.get('swap_s')} s", flush=True)
        finally:
            producer.close()
            state.close()
            serve.terminate(service)
    return {
        "layout": state.nets.layout, "config": cfg.to_dict(), "rounds": rows,
        "median_seconds": {p: round(statistics.median(r["seconds"][p] for r in rows), 2) for p in PHASES},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "version_bytes": max((r.get("version_bytes", 0) for r in rows), default=None),
        "swap_s_median": statistics.median(swaps) if swaps else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-chat", help="tiny-chat, a random_models shape (llama-135m), or a dir")
    ap.add_argument("--adapter", nargs="+", default=["auto"], choices=["auto", "full", "lora"])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--labels", type=int, default=128, help="new labels before each round (rlhf up: 128)")
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model-cache", type=Path, default=Path(".rlhf/models"))
    ap.add_argument("--layout", help=argparse.SUPPRESS)  # internal: run one layout in this process
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    if args.layout:
        args.out.write_text(json.dumps(run_layout(args)))
        return 0

    model_dir(args.model, args.model_cache)  # build it once, outside the timed processes
    results = []
    for layout in args.adapter:
        out = Path(tempfile.mkstemp(suffix=".json")[1])
        cmd = [sys.executable, __file__, "--model", args.model, "--rounds", str(args.rounds), "--labels",
               str(args.labels), "--noise", str(args.noise), "--threads", str(args.threads), "--model-cache",
               str(args.model_cache), "--layout", layout, "--out", str(out)]
        print(f"{layout}: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        results.append(json.loads(out.read_text()))

    device = torch.device("cpu")
    payload = {"bench": "train_round", "device": device_name(device), "cpu_count": os.cpu_count(),
               "torch": torch.__version__, "threads": args.threads, "model": args.model, "labels_per_round": args.labels,
               "load_average_after": round(os.getloadavg()[0], 2), "layouts": results}
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"train_round-{slug(args.model)}-{slug(device_name(device))}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\n{'layout':>8} " + " ".join(f"{p:>12}" for p in PHASES) + f" {'peak RSS MB':>12} {'version MB':>11} {'swap s':>7}")
    for r in results:
        m = r["median_seconds"]
        print(f"{r['layout']:>8} " + " ".join(f"{m[p]:>12.2f}" for p in PHASES)
              + f" {r['peak_rss_mb']:>12.0f} {(r['version_bytes'] or 0) / 1e6:>11.2f} {r['swap_s_median'] or float('nan'):>7.2f}")
    if len(results) == 2 and {r["layout"] for r in results} == {"full", "lora"}:
        full, lora = sorted(results, key=lambda r: r["layout"])
        print(f"lora / full: round {lora['median_seconds']['total'] / full['median_seconds']['total']:.2f}, "
              f"peak RSS {lora['peak_rss_mb'] / full['peak_rss_mb']:.2f}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
