"""fp32 or bf16 on this CPU: what RLHF_DTYPE=auto picks, measured (docs/trainer.md, "bf16 on CPUs").

    .venv/bin/python bench/dtype.py --model smollm2                    # the real model (rlhf model fetch)
    .venv/bin/python bench/dtype.py --model tiny-chat llama-135m       # the embedded model, a random 135M Llama

For each model, in fp32 and in bf16 (weights in bf16; the sampler and the log-probs in fp32):
  serving    the service's engine in-process, decode tokens/s at concurrency 1 and 16 (seeded,
             max_tokens each, answers run to the end: ignore_eos is not needed, tokens are counted)
  training   one LoRA training step as the trainer takes it (forward + backward through the frozen
             base, adapters fp32 under bf16 autocast), seconds per step for a batch of 8 x 160 tokens
  accuracy   on 32 chat prompts: the mean and max KL(fp32 || bf16) of the next-token distribution
             over a 32-token greedy continuation (teacher-forced on fp32's tokens), and how many of the
             32 greedy continuations are identical
Prints a table and saves bench/results/dtype-<model>-<cpu>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import _timing  # noqa: E402
from rlhf_loop.app import known_models, random_models  # noqa: E402
from rlhf_loop.core import tinylm  # noqa: E402
from rlhf_loop.core.contracts import Settings  # noqa: E402
from rlhf_loop.core.models import load_causal_lm  # noqa: E402
from rlhf_loop.service.engine import Engine  # noqa: E402
from rlhf_loop.service.loaded import LoadedVersion  # noqa: E402
from rlhf_loop.service.request import SamplingParams  # noqa: E402
from rlhf_loop.service.scheduler import Limits  # noqa: E402

CACHE = ROOT / ".rlhf" / "bench"
PROMPTS = [line.strip() for line in (ROOT / "rlhf_loop" / "app" / "assistant_prompts.txt").read_text().splitlines()
           if line.strip() and not line.startswith("#")]


def model_dir(name: str) -> Path:
    if name == "smollm2":
        return known_models.ensure("smollm2", CACHE / "models")
    if name == "tiny-chat":
        return tinylm.ensure(CACHE / "models")
    return random_models.ensure(CACHE / "random", name)


def serving(loaded: LoadedVersion, concurrency: int, max_tokens: int) -> float:
    """Decode tokens/s of the engine with `concurrency` requests in flight, 2 x concurrency requests."""
    engine = Engine(Limits(max_running_seqs=64, max_batched_tokens=2048, max_waiting_requests=256))
    prompts = [loaded.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS[:2 * concurrency]]

    async def run() -> int:
        queue = list(range(len(prompts)))
        tokens = 0

        async def worker() -> None:
            nonlocal tokens
            while queue:
                i = queue.pop()
                params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=max_tokens, n=1, stop=(), seed=i)
                async for d in engine.stream(loaded, prompts[i], params):
                    tokens += len(d.token_ids)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return tokens

    asyncio.run(run())  # warm-up: the first forwards of a shape are slower
    t0 = time.perf_counter()
    tokens = asyncio.run(run())
    seconds = time.perf_counter() - t0
    engine.close()
    return tokens / seconds


def training_step(path: Path, dtype: torch.dtype, repeats: int = 3) -> float:
    """Seconds per LoRA step (forward + backward) on 8 x 160 tokens: frozen base in `dtype`, fp32 adapters."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_causal_lm(path, Settings(device="cpu", dtype=str(dtype).removeprefix("torch.")))
    model.requires_grad_(False)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    for n, p in peft.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    ids = torch.randint(0, model.config.vocab_size, (8, 160))

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = peft(input_ids=ids, use_cache=False, logits_to_keep=64).logits
        logits.float().logsumexp(-1).mean().backward()

    return _timing.time_ms(step, torch.device("cpu"), warmup=1, repeats=repeats) / 1e3


@torch.no_grad()
def accuracy(path: Path, n_prompts: int = 32, tokens: int = 32) -> dict:
    """KL(fp32 || bf16) per position along fp32's greedy continuation, and identical greedy continuations."""
    fp32, tok = load_causal_lm(path, Settings(device="cpu", dtype="float32"))
    bf16, _ = load_causal_lm(path, Settings(device="cpu", dtype="bfloat16"))
    kls, same = [], 0
    for text in PROMPTS[:n_prompts]:
        ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                    tokenize=True, return_dict=False)])
        greedy = {}
        for name, model in (("fp32", fp32), ("bf16", bf16)):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            greedy[name] = out[0, ids.shape[1]:].tolist()
        same += greedy["fp32"] == greedy["bf16"]
        full = torch.tensor([ids[0].tolist() + greedy["fp32"]])
        p = fp32(input_ids=full).logits[0, ids.shape[1] - 1:-1].float().log_softmax(-1)
        q = bf16(input_ids=full).logits[0, ids.shape[1] - 1:-1].float().log_softmax(-1)
        kls.append((p.exp() * (p - q)).sum(-1))
    kl = torch.cat(kls)
    return {"prompts": n_prompts, "tokens": tokens, "kl_mean": kl.mean().item(), "kl_p99": kl.quantile(0.99).item(),
            "kl_max": kl.max().item(), "identical_greedy": same}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["smollm2"], choices=["smollm2", "tiny-chat", "llama-135m"])
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = _timing.device_name(torch.device("cpu"))
    for name in args.model:
        path = model_dir(name)
        rows = {}
        for dtype in (torch.float32, torch.bfloat16):
            label = str(dtype).removeprefix("torch.")
            model, tok = load_causal_lm(path, Settings(device="cpu", dtype=label))
            loaded = LoadedVersion.of(0, model, tok)
            rows[label] = {f"serve_tokens_per_s_c{c}": serving(loaded, c, args.max_tokens) for c in args.levels}
            rows[label]["train_step_s"] = training_step(path, dtype)
            print(name, label, {k: round(v, 3) for k, v in rows[label].items()}, flush=True)
        rows["accuracy"] = accuracy(path)
        print(name, "accuracy", rows["accuracy"], flush=True)
        result = {**_timing.environment(torch.device("cpu")), "model": name, "threads": args.threads,
                  "cpu_avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "max_tokens": args.max_tokens, **rows}
        out = _timing.save_json(result, _timing.RESULTS_DIR / f"dtype-{name}-{_timing.slug(device)}.json")
        print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
