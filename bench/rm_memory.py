"""Peak memory of the trainer's reward-model phase, by layout, gradient checkpointing and malloc threshold.

    PYTHONPATH=. .venv/bin/python bench/rm_memory.py                      # llama-135m, 8 configurations
    PYTHONPATH=. .venv/bin/python bench/rm_memory.py --model DIR --steps 2
    PYTHONPATH=. .venv/bin/python bench/rm_memory.py --checkpointing on --thresholds 131072 4194304 --out NAME

Each configuration runs in a fresh process (peak RSS is per process): the trainer's networks
opened as `rlhf train` opens them (Networks.open, the model's scale profile, the layout given),
then trainer.reward_model.train_reward_model on 128 labelled answers (`--steps` steps of the
profile's batch: 8 labels + 8 pairs = 24 sequences of ~85 tokens for the 135M model on CPU, then
the held-out scoring). Reported: peak RSS of the process (VmHWM; weights included) after
opening the networks and after the phase. "malloc default" is glibc as it comes (its mmap
threshold rises whenever a large block is freed); "malloc fixed" sets MALLOC_MMAP_THRESHOLD_ to
each of --thresholds (default: trainer.cli.MMAP_THRESHOLD, what `rlhf train` sets at start). Results:
bench/results/rm_memory-<model>-<device>.json (or --out NAME). Seconds are printed, but they are not a speed
figure unless the machine was otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def vm_hwm_mb() -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    return round(int(line.split()[1]) / 1024, 1)


def child(model: str, layout: str, checkpointing: bool, steps: int) -> dict:
    import dataclasses

    import torch

    from rlhf_loop.core.contracts import Settings
    from rlhf_loop.core.models import count_parameters, ensure_policy_store, resolve_device
    from rlhf_loop.core.policy_store import PolicyStore
    from rlhf_loop.trainer.config import TrainerConfig, model_defaults
    from rlhf_loop.trainer.dist import Dist
    from rlhf_loop.trainer.networks import Networks
    from rlhf_loop.trainer.reward_model import train_reward_model
    from rlhf_loop.trainer.store import Example

    torch.set_num_threads(1)
    settings = Settings(state_dir=Path(tempfile.mkdtemp(prefix="rm-memory-")), model=model, device="cpu")
    store = ensure_policy_store(settings)
    params = count_parameters(store.path(0))
    profile = model_defaults(model, params, resolve_device(settings).type, layout)
    profile.setdefault("train", {}).update(adapter=layout, gradient_checkpointing=checkpointing)
    cfg = TrainerConfig().replace(**profile)
    nets = Networks.open(settings, PolicyStore(settings.policy_dir), cfg.train, cfg.reward, layout, 0, 0, Dist())
    opened = vm_hwm_mb()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(store.path(0))
    rng = random.Random(0)
    words = "the cat sat on a mat and it was happy wonderful rain coffee trains sea moon".split()
    examples = [Example(response_id=f"chatcmpl-{i:024x}-{i:024x}", choice_index=0, prompt_key=f"p{i % 40}",
                        messages=[{"role": "user", "content": "Tell me about " + rng.choice(words)}],
                        completion=" ".join(rng.choice(words) for _ in range(rng.randint(10, 30))),
                        rating=rng.choice([1.0, -1.0]), n_votes=1.0) for i in range(128)]
    t0 = time.perf_counter()
    train_reward_model(nets.reward, tok, examples, dataclasses.replace(cfg.reward, max_steps=steps), seed=0)
    return {"layout": layout, "gradient_checkpointing": checkpointing, "params": params, "steps": steps,
            "batch_size": cfg.reward.batch_size, "peak_rss_mb_opened": opened, "peak_rss_mb": vm_hwm_mb(),
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-135m", help="tiny-chat, a random_models shape, or a model directory")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--model-cache", type=Path, default=Path(".rlhf/models"))
    ap.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--thresholds", nargs="+", type=int, default=None,
                    help="fixed mmap thresholds in bytes (default: the one rlhf train sets)")
    ap.add_argument("--out", default=None, help="results name (default rm_memory-<model>-<device>)")
    ap.add_argument("--child", nargs=3, metavar=("LAYOUT", "CHECKPOINTING", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        layout, checkpointing, path = args.child
        print(json.dumps(child(path, layout, checkpointing == "on", args.steps)), flush=True)
        return 0

    import torch

    from _timing import RESULTS_DIR, device_name, slug
    from train_round import model_dir  # tiny-chat, a random_models shape, or a directory: as train_round takes it

    path = model_dir(args.model, args.model_cache)
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    from rlhf_loop.trainer.cli import MMAP_THRESHOLD

    runs = []
    for threshold in [None, *(args.thresholds or [MMAP_THRESHOLD])]:  # None: glibc's default
        malloc = "default" if threshold is None else "fixed"
        for checkpointing in args.checkpointing:
            for layout in ("full", "lora"):
                e = env if threshold is None else {**env, "MALLOC_MMAP_THRESHOLD_": str(threshold)}
                out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", layout,
                                      checkpointing, path], env=e, capture_output=True, text=True, check=True)
                row = {**json.loads(out.stdout.strip().splitlines()[-1]), "malloc": malloc,
                       "mmap_threshold": threshold}
                runs.append(row)
                print(f"malloc {malloc:7} {'' if threshold is None else threshold:>8} checkpointing {checkpointing:3} "
                      f"{layout:4}: peak RSS {row['peak_rss_mb']:8.0f} MB (after opening {row['peak_rss_mb_opened']:6.0f})"
                      f"  {row['seconds']:6.1f} s", flush=True)
    cpu = torch.device("cpu")
    payload = {"bench": "rm_memory", "model": args.model, "device": device_name(cpu), "cpu_count": os.cpu_count(),
               "torch": torch.__version__, "load_average_after": round(os.getloadavg()[0], 2), "runs": runs}
    RESULTS_DIR.mkdir(exist_ok=True)
    dest = RESULTS_DIR / f"{args.out or f'rm_memory-{slug(args.model)}-{slug(device_name(cpu))}'}.json"
    dest.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"results: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
