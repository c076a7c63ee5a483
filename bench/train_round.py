"""Seconds per training round and per phase, peak memory, bytes per version and swap time, by layout and ranks.

    PYTHONPATH=. .venv/bin/python bench/train_round.py                                    # embedded model, 4 rounds
    PYTHONPATH=. .venv/bin/python bench/train_round.py --model llama-135m --adapter full lora --rounds 2
    PYTHONPATH=. .venv/bin/python bench/train_round.py --nproc 1 2                        # 1 rank vs 2 (torchrun)
    PYTHONPATH=. .venv/bin/python bench/train_round.py --model smollm2 --rounds 3          # the real instruct model
    PYTHONPATH=. .venv/bin/python bench/train_round.py --model smollm2 --set RLHF_REWARD_BACKBONE=tuned RLHF_DTYPE=float32

What runs, for each combination of --adapter and --nproc: an embedded broker (tansu), a real
service (`rlhf serve`) and the trainer exactly as deployed, `rlhf train [--nproc N]` (continuous,
a round per --labels new labels), all on a fresh state dir. The model is `tiny-chat` (the embedded
one), a shape of app/random_models.py (e.g. `llama-135m`: SmolLM-135M's shape, random weights,
built into --model-cache), a known real model (`smollm2`, fetched and imported once into
--model-cache; its prompts are the simulated users' assistant prompts), or any HF causal-LM
directory; `--set` passes settings to the service and the trainer (e.g. RLHF_DTYPE,
RLHF_REWARD_BACKBONE) for a comparison in the same run; the trainer resolves its config as
`rlhf train` does (the model's scale profile; only train.adapter is set here, so every layout has
the same rollout settings). Before each round the bench produces --labels interactions (the base
model's answers to logged-style prompts) and one vote each ('cheerful' taste, 10 % noise), and the
gate is told to promote (gate.min_reward_gain = -inf: random models have nothing to learn, and every
round should publish so that the swap can be timed).

Reported per combination: the median of each phase of trainer/round.py and of the total (from
rounds.jsonl), the trainer's peak RSS (VmHWM of the trainer and its ranks, summed), the bytes of a
published version, and the swap time: from the end of the round (its rounds.jsonl line, written
after the announcement was acked) to the first chat answer with the new version's fingerprint.
Results: bench/results/train_round-<model>-<device>.json. --threads: torch threads per rank
(default 1: what `rlhf train` takes on 2 cores, beside the service).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from kafka import KafkaProducer
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import RESULTS_DIR, device_name, slug  # noqa: E402

from rlhf_loop.app import known_models, random_models  # noqa: E402
from rlhf_loop.app.simulate import ASSISTANT_PROMPTS  # noqa: E402
from rlhf_loop.core import tinylm  # noqa: E402
from rlhf_loop.core.broker import EmbeddedBroker, client_options, ensure_topics, free_port  # noqa: E402
from rlhf_loop.core.contracts import Feedback, Interaction, Message, Sampling, Settings, feedback_id_for  # noqa: E402
from rlhf_loop.core.models import eos_token_ids, load_causal_lm  # noqa: E402
from rlhf_loop.core.tastes import cheerful  # noqa: E402
from rlhf_loop.service import serve  # noqa: E402
from rlhf_loop.trainer.rollout import decode, encode_prompts, left_pad, sample  # noqa: E402

PHASES = ("consume", "reward_model", "rollout", "score", "ppo", "gate", "publish", "total")


def model_dir(name: str, cache: Path) -> str:
    if name == "tiny-chat":
        return str(tinylm.ensure(cache))
    if name in random_models.SHAPES:
        return str(random_models.ensure(cache / "random", name))
    return known_models.resolve(name, cache)


class Traffic:
    """Interactions answered by the base model, one vote each by the taste (what the service would log)."""

    def __init__(self, path: str, seed: int, noise: float, max_new_tokens: int, assistant: bool):
        self.model, self.tok = load_causal_lm(path, Settings(device="cpu"))
        self.assistant = assistant  # a real model is asked what real assistants are, the toy its own domain
        self.eos = eos_token_ids(self.model, self.tok)
        self.rng, self.noise, self.max_new_tokens = random.Random(seed), noise, max_new_tokens

    def batch(self, n: int) -> list[tuple[Interaction, Feedback]]:
        rng, tok = self.rng, self.tok
        prompts = [[{"role": "user", "content": rng.choice(ASSISTANT_PROMPTS) if self.assistant else
                     rng.choice(tinylm.QUESTIONS).replace("{s}", rng.choice(list(tinylm.SUBJECTS)))}] for _ in range(n)]
        out = []
        for i in range(0, n, 16):
            chunk = prompts[i:i + 16]
            q, qm = left_pad(encode_prompts(tok, chunk, 512), tok.pad_token_id, torch.device("cpu"))
            r, m = sample(self.model, q, qm, max_new_tokens=self.max_new_tokens, temperature=1.0, eos_ids=self.eos,
                          pad_id=tok.pad_token_id, seeds=[rng.getrandbits(63) for _ in chunk])
            for p, text in zip(chunk, decode(tok, r, m)):
                rid = f"chatcmpl-{rng.getrandbits(96):024x}-bench"
                it = Interaction(response_id=rid, policy_version=0, model="rlhf-policy",
                                 messages=[Message(**x) for x in p], prompt_token_ids=[0], completion=text,
                                 completion_token_ids=[0], finish_reason="stop",
                                 sampling=Sampling(temperature=1.0, top_p=1.0, max_tokens=self.max_new_tokens))
                liked = cheerful(p[-1]["content"], text) != (rng.random() < self.noise)
                out.append((it, Feedback(feedback_id=feedback_id_for(rid, 0, None, "bench"), response_id=rid,
                                         rating=1 if liked else -1, user="bench")))
        return out


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident memory) of `pid` and its descendants (torchrun's ranks), summed, in MB."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            hwm = next(x for x in Path(f"/proc/{p}/status").read_text().splitlines() if x.startswith("VmHWM"))
            total += int(hwm.split()[1]) / 1024
        except (OSError, StopIteration):
            continue
    return round(total, 1)


def first_answer_with(url: str, version: int, timeout: float = 300.0) -> float:
    """Wall clock of the first chat answer whose fingerprint is policy-v<version>."""
    deadline = time.monotonic() + timeout
    body = {"model": "rlhf-policy", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    while time.monotonic() < deadline:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        if r.status_code == 200 and r.json()["system_fingerprint"] == f"policy-v{version}":
            return time.time()
        time.sleep(0.02)
    raise TimeoutError(f"the service did not serve v{version} within {timeout:.0f}s")


def run(args: argparse.Namespace, path: str, adapter: str, nproc: int, traffic: Traffic) -> dict:
    """One combination: broker, service, `rlhf train`, --rounds rounds of --labels labels."""
    state = Path(tempfile.mkdtemp(prefix=f"rlhf-bench-train-{adapter}-{nproc}-"))
    rows = []
    with EmbeddedBroker(log_path=state / "broker.log") as broker:
        settings = Settings(state_dir=state, model=path, kafka_bootstrap_servers=broker.bootstrap)
        ensure_topics(settings)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "RLHF_STATE_DIR": str(state), "RLHF_MODEL": path, "PYTHONPATH": str(ROOT),
               "RLHF_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "RLHF_ADMIN_PORT": str(free_port()),
               "RLHF_TRAIN_ADAPTER": adapter, "RLHF_GATE_MIN_REWARD_GAIN": "-inf", "RLHF_GATE_MAX_KL": "1e9",
               "RLHF_GATE_MIN_RM_AUROC": "0", "RLHF_GATE_MAX_RM_APPROVAL_GAP": "0", "RLHF_GATE_GUARD_SET": "none",
               "RLHF_GATE_MIN_DISTINCT_RATIO": "0", "RLHF_GATE_MAX_LENGTH_RATIO": "0", "RLHF_GATE_MIN_LENGTH_RATIO": "0",
               "RLHF_TRAIN_MIN_LABELS": str(args.labels), "RLHF_TRAIN_MAX_WAIT_S": "3600",
               **dict(kv.split("=", 1) for kv in args.set)}
        env.pop("BENTOML_HOME", None)
        service = serve.spawn("127.0.0.1", port, env, open(state / "service.log", "ab"))
        trainer = None
        try:
            serve.wait_ready(url, service, timeout=600)
            cmd = [sys.executable, "-m", "rlhf_loop", "train", "--no-progress", "--threads", str(args.threads),
                   *(["--nproc", str(nproc)] if nproc > 1 else [])]
            trainer = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(state / "trainer.log", "ab"),
                                       stderr=subprocess.STDOUT, start_new_session=True)
            rounds_path = state / "trainer" / "rounds.jsonl"
            producer = KafkaProducer(**client_options(settings), acks="all")
            for r in range(1, args.rounds + 1):
                for it, fb in traffic.batch(args.labels):
                    producer.send(settings.topic_interactions, key=it.response_id.encode(), value=it.to_bytes())
                    producer.send(settings.topic_feedback, key=fb.response_id.encode(), value=fb.to_bytes())
                producer.flush(60)
                while not rounds_path.exists() or len(rounds_path.read_text().splitlines()) < r:
                    if trainer.poll() is not None:
                        raise RuntimeError(f"the trainer exited with {trainer.returncode}; see {state / 'trainer.log'}")
                    time.sleep(0.2)
                rep = json.loads(rounds_path.read_text().splitlines()[r - 1])
                row = {"round": rep["round"], "labels": rep["labels"], "promoted": rep["promoted"],
                       "world_size": rep["world_size"], "seconds": {k: round(v, 2) for k, v in rep["seconds"].items()},
                       # the in-round estimate budget.early_stop reads, against the gate's figure of the candidate
                       "kl": {"estimate": rep["train"].get("kl_estimate_last"), "gate": rep["candidate"].get("kl_to_ref")}}
                if rep["promoted"]:
                    ended = rep["trigger_time"] + rep["seconds"]["total"]
                    row["swap_s"] = round(first_answer_with(url, rep["version"]) - ended, 3)
                    vdir = settings.policy_dir / "versions" / f"v{rep['version']:06d}"
                    row["version_bytes"] = sum(p.stat().st_size for p in vdir.iterdir())
                rows.append(row)
                print(f"  {adapter} x{nproc}: round {r} {row['seconds']['total']:.1f}s "
                      f"version {row.get('version_bytes', 0) / 1e6:.2f} MB swap {row.get('swap_s')} s", flush=True)
            producer.close()
            rss = peak_rss_mb(trainer.pid)
            layout = json.loads(rounds_path.read_text().splitlines()[0])
        finally:
            if trainer is not None:
                serve.terminate(trainer)
            serve.terminate(service)
    swaps = [r["swap_s"] for r in rows if "swap_s" in r]
    trained = [r for r in rows if r["round"] > 1] or rows  # round 1 includes the group join and first loads
    return {"adapter": adapter, "nproc": nproc, "rounds": rows, "peak_rss_mb": rss,
            "median_seconds": {p: round(statistics.median(r["seconds"].get(p, 0.0) for r in trained), 2)  # kto, dpo:
                               for p in PHASES},  # no rollout or score phase
            "version_bytes": max((r.get("version_bytes", 0) for r in rows), default=None),
            "swap_s_median": statistics.median(swaps) if swaps else None, "world_size": layout["world_size"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-chat", help="tiny-chat, a random_models shape (llama-135m), or a dir")
    ap.add_argument("--adapter", nargs="+", default=["auto"], choices=["auto", "full", "lora"])
    ap.add_argument("--nproc", nargs="+", type=int, default=[1], help="trainer ranks (torchrun), one run each")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--labels", type=int, default=128, help="new labels before each round (rlhf up: 128)")
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--model-cache", type=Path, default=Path(".rlhf/models"))
    ap.add_argument("--set", nargs="*", default=[], metavar="RLHF_X=VALUE", help="settings for the service and trainer")
    ap.add_argument("--out", default=None, help="results name (default train_round-<model>-<device>)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    torch.set_num_threads(args.threads)
    path = model_dir(args.model, args.model_cache)
    results = []
    for adapter in args.adapter:
        for nproc in args.nproc:
            traffic = Traffic(path, seed=0, noise=args.noise, max_new_tokens=32,  # the same votes for every run
                              assistant=args.model in known_models.KNOWN)
            print(f"{args.model}: train.adapter={adapter}, {nproc} rank(s)", flush=True)
            results.append(run(args, path, adapter, nproc, traffic))

    cpu = torch.device("cpu")
    payload = {"bench": "train_round", "device": device_name(cpu), "cpu_count": os.cpu_count(),
               "torch": torch.__version__, "threads_per_rank": args.threads, "model": args.model,
               "labels_per_round": args.labels, "settings": args.set,
               "load_average_after": round(os.getloadavg()[0], 2), "runs": results,
               "note": "median over rounds 2.. (round 1 includes the consumer group join)"}
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"{args.out or 'train_round-' + slug(args.model) + '-' + slug(device_name(cpu))}.json"
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\n{'adapter':>8} {'ranks':>5} " + " ".join(f"{p:>12}" for p in PHASES)
          + f" {'peak RSS MB':>12} {'version MB':>11} {'swap s':>7}")
    for r in results:
        m = r["median_seconds"]
        print(f"{r['adapter']:>8} {r['nproc']:>5} " + " ".join(f"{m[p]:>12.2f}" for p in PHASES)
              + f" {r['peak_rss_mb']:>12.0f} {(r['version_bytes'] or 0) / 1e6:>11.2f} {r['swap_s_median'] or float('nan'):>7.2f}")
    by = {(r["adapter"], r["nproc"]): r for r in results}
    if ("full", 1) in by and ("lora", 1) in by:
        full, lora = by["full", 1], by["lora", 1]
        print(f"lora / full: round {lora['median_seconds']['total'] / full['median_seconds']['total']:.2f}, "
              f"peak RSS {lora['peak_rss_mb'] / full['peak_rss_mb']:.2f}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
