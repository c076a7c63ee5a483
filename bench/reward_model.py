"""The reward model on a real model, tuned against frozen, on the same votes: held-out AUROC and seconds.

    .venv/bin/python bench/reward_model.py                       # SmolLM2-135M-Instruct, cheerful and short
    .venv/bin/python bench/reward_model.py --tastes cheerful --labels 1024 --round 128

Answers: SmolLM2-135M-Instruct (`rlhf model fetch smollm2`) answers the simulated users' prompts
(app/assistant_prompts.txt), `--samples` times each at temperature 1 with the serving engine, cached
in .rlhf/bench/. Votes: each taste's verdict on each answer, flipped with probability `--noise`
(as the simulated users vote). Then rounds as the trainer runs them, `--round` new labels each, the
reward model built by the trainer's own code (Networks.open, LoRA layout, the CPU defaults of a
real model: model_defaults) and trained by it:
  tuned   reward.backbone=tuned: its LoRA adapter and head, warm-started, reward.max_steps steps a round
  frozen  reward.backbone=frozen: the head on the frozen base's features, each label's computed once
After every round: held-out AUROC against the votes and against the taste itself (the noise-free
truth), the judge's own figure (the frozen head's: cross-validated over every vote, reward.judge_folds;
the tuned model's: the held-out split's) with its 95 % lower bound, and the round's seconds. Prints the
table and saves bench/results/reward_model-<cpu>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import _timing  # noqa: E402
from rlhf_loop.app import known_models  # noqa: E402
from rlhf_loop.core.contracts import Settings  # noqa: E402
from rlhf_loop.core.models import count_parameters, ensure_policy_store, load_causal_lm  # noqa: E402
from rlhf_loop.core.tastes import TASTES  # noqa: E402
from rlhf_loop.service.engine import Engine  # noqa: E402
from rlhf_loop.service.loaded import LoadedVersion  # noqa: E402
from rlhf_loop.service.request import SamplingParams  # noqa: E402
from rlhf_loop.service.scheduler import Limits  # noqa: E402
from rlhf_loop.trainer.config import TrainerConfig, model_defaults  # noqa: E402
from rlhf_loop.trainer.networks import Networks  # noqa: E402
from rlhf_loop.trainer.reward_model import (  # noqa: E402
    FeatureCache, binary_auroc, is_heldout, score, train_reward_head, train_reward_model,
)
from rlhf_loop.trainer.store import Example  # noqa: E402

CACHE = ROOT / ".rlhf" / "bench"
PROMPTS = [line.strip() for line in (ROOT / "rlhf_loop" / "app" / "assistant_prompts.txt").read_text().splitlines()
           if line.strip() and not line.startswith("#")]


def answers(model_dir: Path, samples: int, max_tokens: int, dtype: str) -> list[dict]:
    """[{prompt, answer}] for every prompt, `samples` times, from the serving engine; cached."""
    path = CACHE / f"answers-{model_dir.name}-{samples}x{max_tokens}.jsonl"
    if path.exists():
        return [json.loads(line) for line in path.read_text().splitlines()]
    model, tok = load_causal_lm(model_dir, Settings(device="cpu", dtype=dtype))
    loaded = LoadedVersion.of(0, model, tok)
    engine = Engine(Limits(max_running_seqs=32, max_batched_tokens=2048, max_waiting_requests=10_000))
    jobs = [(p, s) for s in range(samples) for p in PROMPTS]

    async def run() -> list[dict]:
        async def one(i: int, prompt: str) -> dict:
            params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=max_tokens, n=1, stop=(), seed=i)
            text = [d.text async for d in engine.stream(loaded, loaded.encode_chat([{"role": "user", "content": prompt}]),
                                                        params)]
            return {"prompt": prompt, "answer": "".join(text)}

        sem = asyncio.Semaphore(32)

        async def bounded(i: int, prompt: str) -> dict:
            async with sem:
                return await one(i, prompt)

        return await asyncio.gather(*(bounded(i, p) for i, (p, _) in enumerate(jobs)))

    t0 = time.monotonic()
    out = asyncio.run(run())
    engine.close()
    print(f"{len(out)} answers in {time.monotonic() - t0:.0f}s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return out


def examples_for(rows: list[dict], taste: str, noise: float, seed: int) -> tuple[list[Example], list[bool]]:
    """The votes (one per answer, in a shuffled order) and the taste's own verdicts."""
    rng = random.Random(seed)
    order = rng.sample(range(len(rows)), len(rows))
    out, truth = [], []
    for k, i in enumerate(order):
        r = rows[i]
        liked = TASTES[taste](r["prompt"], r["answer"])
        up = liked if rng.random() >= noise else not liked
        out.append(Example(f"chatcmpl-{seed}-{k:06d}", 0, r["prompt"], [{"role": "user", "content": r["prompt"]}],
                           r["answer"], 1.0 if up else -1.0, 1))
        truth.append(liked)
    return out, truth


def run(backbone: str, model_dir: Path, examples: list[Example], truth: list[bool], args) -> list[dict]:
    settings = Settings(state_dir=CACHE / "rm-state" / backbone, model=str(model_dir), device="cpu", dtype=args.dtype)
    store = ensure_policy_store(settings)
    params = count_parameters(store.path(0))
    cfg = TrainerConfig().replace(**model_defaults(store.path(0), params, "cpu"))
    cfg = cfg.replace(reward={"backbone": backbone})
    nets = Networks.open(settings, store, cfg.train, cfg.reward, cfg.train.adapter, 0, 0)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(store.path(0))
    dtype = getattr(torch, args.dtype)
    cache = FeatureCache("bench")
    rows = []
    for end in range(args.round, min(args.labels, len(examples)) + 1, args.round):
        seen = examples[:end]
        t0 = time.monotonic()
        if backbone == "frozen":
            m = train_reward_head(nets.reward, tok, seen, cfg.reward, cache, autocast_dtype=dtype)
        else:
            m = train_reward_model(nets.reward, tok, seen, cfg.reward, seed=end, autocast_dtype=dtype)
        seconds = time.monotonic() - t0
        held = [i for i, e in enumerate(seen) if is_heldout(e.response_id, cfg.reward.heldout_fraction)]
        s = score(nets.reward, tok, [seen[i].messages for i in held], [seen[i].completion for i in held],
                  max_length=cfg.reward.max_length, autocast_dtype=dtype).cpu()
        true_auroc = binary_auroc(s, torch.tensor([truth[i] for i in held]))
        heldout_auroc = binary_auroc(s, torch.tensor([seen[i].rating > 0 for i in held]))
        row = {"backbone": backbone, "labels": end, "heldout": len(held), "auroc_votes": heldout_auroc,
               "auroc_taste": true_auroc, "judge_auroc": m.auroc, "judge_lcb": m.auroc_lcb,
               "judge_votes": m.heldout_up + m.heldout_down, "judge_folds": m.auroc_folds,
               "round_s": seconds, "steps": m.steps}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def judge(row: dict | None) -> str:
    """The judge's figure: AUROC (lower bound) on how many votes; the judge passes at a bound of 0.6."""
    if row is None:
        return "-"
    bound = "-" if row["judge_lcb"] is None else f"{row['judge_lcb']:.2f}"
    return f"{row['judge_auroc']:.2f} ({bound}) on {row['judge_votes']}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tastes", nargs="+", default=["cheerful", "short"])
    ap.add_argument("--backbones", nargs="+", default=["frozen", "tuned"], choices=["frozen", "tuned"])
    ap.add_argument("--labels", type=int, default=1024)
    ap.add_argument("--round", type=int, default=128, help="new labels per round")
    ap.add_argument("--samples", type=int, default=4, help="answers per prompt")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model_dir = known_models.ensure("smollm2", CACHE / "models")
    rows = answers(model_dir, args.samples, args.max_tokens, args.dtype)
    results = []
    for taste in args.tastes:
        examples, truth = examples_for(rows, taste, args.noise, args.seed)
        for backbone in args.backbones:
            results += [{"taste": taste, **r} for r in run(backbone, model_dir, examples, truth, args)]
    print("\n| taste | labels | frozen AUROC (votes / taste) | tuned AUROC (votes / taste) | judge's AUROC, bound: frozen "
          "| tuned | frozen s/round | tuned s/round |")
    print("|---|---|---|---|---|---|---|---|")
    for taste in args.tastes:
        for n in sorted({r["labels"] for r in results}):
            by = {r["backbone"]: r for r in results if r["taste"] == taste and r["labels"] == n}
            cell = lambda b, f: f"{by[b][f]:.2f}" if b in by else "-"  # noqa: E731
            print(f"| {taste} | {n} | {cell('frozen', 'auroc_votes')} / {cell('frozen', 'auroc_taste')} | "
                  f"{cell('tuned', 'auroc_votes')} / {cell('tuned', 'auroc_taste')} | "
                  f"{judge(by.get('frozen'))} | {judge(by.get('tuned'))} | "
                  f"{cell('frozen', 'round_s')} | {cell('tuned', 'round_s')} |")
    device = _timing.device_name(torch.device("cpu"))
    out = _timing.save_json({**_timing.environment(torch.device("cpu")), "args": vars(args), "rows": results},
                            _timing.RESULTS_DIR / f"reward_model-{_timing.slug(device)}.json")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
