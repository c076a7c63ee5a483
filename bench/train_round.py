"""Seconds per training round, and per phase, on the default model with broker-fed votes.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python bench/train_round.py                # 4 rounds x 128 labels
    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python bench/train_round.py --rounds 6 --labels 64

What runs: an embedded broker (tansu), the embedded default model (built into --model-cache
on first use), and the trainer's own `run_round` with the default TrainerConfig, exactly as
`rlhf train` runs it. Before each round, --labels new interactions (answers sampled from the
base model to logged-style prompts) and one vote each (the 'cheerful' taste, 10 % noise) are
produced to Kafka, so step 1 really consumes and joins them. Reported per round: the phases
of trainer/round.py (consume, reward_model, rollout, score, ppo, gate, publish) and the total,
with labels, RM accuracy, reward before/after, KL and the gate's verdict; and the median of
each phase over the rounds. Results go to bench/results/train_round-<device-slug>.json.
--threads sets torch's CPU threads (default 1: what `rlhf train` takes on 2 cores, beside
the service).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import RESULTS_DIR, device_name, slug  # noqa: E402

from rlhf import tinylm  # noqa: E402
from rlhf.broker import EmbeddedBroker, ensure_topics  # noqa: E402
from rlhf.contracts import Feedback, Interaction, Message, Sampling, Settings, feedback_id_for  # noqa: E402
from rlhf.models import resolve_device  # noqa: E402
from rlhf.tastes import cheerful  # noqa: E402
from trainer.config import TrainerConfig  # noqa: E402
from trainer.policy import decode, encode_prompts, left_pad, sample  # noqa: E402
from trainer.round import run_round  # noqa: E402
from trainer.state import TrainerState  # noqa: E402

PHASES = ("consume", "reward_model", "rollout", "score", "ppo", "gate", "publish", "total")


def traffic(state: TrainerState, n: int, rng: random.Random, gen: torch.Generator, noise: float):
    """n interactions answered by the reference (base) model, and one vote each by the taste."""
    tok = state.tokenizer
    prompts = [[{"role": "user", "content": rng.choice(tinylm.QUESTIONS).replace("{s}", rng.choice(list(tinylm.SUBJECTS)))}]
               for _ in range(n)]
    out = []
    for i in range(0, n, 64):
        chunk = prompts[i:i + 64]
        q, qm = left_pad(encode_prompts(tok, chunk, 512), tok.pad_token_id, state.device)
        r, m = sample(state.nets.reference, q, qm, max_new_tokens=48, temperature=1.0, eos_ids=state.eos_ids,
                      pad_id=tok.pad_token_id, generator=gen)
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--labels", type=int, default=128, help="new labels before each round (rlhf up: 128)")
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model-cache", type=Path, default=Path(".rlhf/models"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from kafka import KafkaProducer

    model_dir = str(tinylm.ensure(args.model_cache))
    state_dir = Path(tempfile.mkdtemp(prefix="rlhf-bench-train-"))
    cfg = TrainerConfig()
    rows = []
    with EmbeddedBroker(log_path=state_dir / "broker.log") as broker:
        settings = Settings(state_dir=state_dir, model=model_dir, kafka_bootstrap_servers=broker.bootstrap)
        ensure_topics(settings)
        state = TrainerState.open(settings, cfg)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        rng, gen = random.Random(0), torch.Generator().manual_seed(0)
        try:
            for _ in range(args.rounds):
                for it, fb in traffic(state, args.labels, rng, gen, args.noise):
                    producer.send(settings.topic_interactions, key=it.response_id.encode(), value=it.to_bytes())
                    producer.send(settings.topic_feedback, key=fb.response_id.encode(), value=fb.to_bytes())
                producer.flush(30)
                time.sleep(1.0)  # let the broker settle so step 1 measures a typical drain
                rep = run_round(state, progress=False)
                rows.append({
                    "round": rep.round, "labels": rep.labels, "seconds": {k: round(v, 2) for k, v in rep.seconds.items()},
                    "rm_accuracy": rep.reward_model.get("accuracy"), "rm_auroc": rep.reward_model.get("auroc"),
                    "rm_steps": rep.reward_model.get("steps"), "reward_before": rep.current.get("reward"),
                    "reward_after": rep.candidate.get("reward"), "kl_to_ref": rep.candidate.get("kl_to_ref"),
                    "promoted": rep.promoted, "reason": rep.reason,
                })
        finally:
            producer.close()
            state.close()

    device = resolve_device(settings)
    median = {p: round(statistics.median(r["seconds"][p] for r in rows), 2) for p in PHASES}
    out = {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "model": Path(model_dir).name, "labels_per_round": args.labels,
        "config": cfg.to_dict(), "median_seconds": median, "rounds": rows,
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"train_round-{slug(device_name(device))}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{'round':>5} {'labels':>6} " + " ".join(f"{p:>12}" for p in PHASES) + "  verdict")
    for r in rows:
        print(f"{r['round']:>5} {r['labels']:>6} " + " ".join(f"{r['seconds'][p]:>12.2f}" for p in PHASES)
              + f"  {'promoted' if r['promoted'] else 'rejected'}")
    print(f"{'median':>12} " + " ".join(f"{median[p]:>12.2f}" for p in PHASES))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
