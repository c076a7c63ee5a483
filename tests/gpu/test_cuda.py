"""The CUDA path: a training round on the GPU in bf16 through the Triton kernels, and the serving engine on the GPU.

Skipped where torch sees no CUDA device (CI, this project's 2-core machine). `bench/cuda_check.sh` runs
this file on a GPU machine, with the kernels' own tests (tests/kernels, in-process on the GPU there) and
the kernel benches; docs/kernels.md and docs/trainer.md record what it measured, and on which card.

What the CPU suite cannot show and these do: that the dispatch really sends every log-prob and KL of a
round to the Triton kernels on CUDA tensors (none to the torch fallback), that a round trains and
publishes in bf16 on the GPU for the embedded model and for a 135M Llama-shaped one (LoRA and full
weights), that what it publishes loads the ordinary way and computes what the trainer held in memory,
and that the engine's batched decoding on the GPU answers each request as it is answered alone.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from trainer_helpers import interaction, produce, prompts, records, votes_for  # noqa: E402

ANSWERS = ["Oh, I love it!", "It is fine.", "Great, what a joy!", "Hmm, no.", "Yay!", "Rain again."]
PROMOTE = {"gate": {"min_reward_gain": -1e9, "min_rm_auroc": 0.0, "max_kl": 1e9, "min_length_ratio": 0.0,
                    "max_length_ratio": 0.0, "min_distinct_ratio": 0.0, "guard_set": None,
                    "max_rm_approval_gap": 0.0, "eval_responses": 16}}


@pytest.fixture
def settings(tmp_path, broker):
    from rlhf_loop.core.broker import ensure_topics
    from rlhf_loop.core.contracts import Settings

    s = Settings(state_dir=tmp_path / "state", kafka_bootstrap_servers=broker.bootstrap, topic_partitions=2,
                 device="cuda")  # dtype auto: bf16 on CUDA
    ensure_topics(s)
    return s


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("shape,adapter", [("embedded", "full"), ("llama-135m", "lora"), ("llama-135m", "full")])
def test_a_round_on_cuda_in_bf16_goes_through_the_triton_kernels_and_publishes_what_it_trained(
        settings, base_model_dir, random_model, shape, adapter, monkeypatch):
    from rlhf_loop.kernels import _dispatch
    from rlhf_loop.trainer.config import TrainerConfig
    from rlhf_loop.trainer.round import run_round
    from rlhf_loop.trainer.state import TrainerState

    backends: list[str] = []
    resolve = _dispatch.resolve_backend
    monkeypatch.setattr(_dispatch, "resolve_backend", lambda *a, **k: backends.append(resolve(*a, **k)) or backends[-1])

    s = settings.model_copy(update={"model": base_model_dir if shape == "embedded" else random_model(shape)})
    rng = random.Random(7)
    its = [interaction(rng, p, rng.choice(ANSWERS), token_ids=[5, 6, 7]) for p in prompts(128, 7)]
    produce(s, records(s, its, votes_for(its, taste="cheerful", noise=0.1, seed=7)))
    cfg = TrainerConfig().replace(train={"adapter": adapter}, **PROMOTE)
    torch.cuda.reset_peak_memory_stats()
    state = TrainerState.open(s, cfg)
    try:
        assert state.dtype == torch.bfloat16
        assert state.nets.policy.named_trainable()[0][1].device.type == "cuda"
        report = run_round(state, progress=False)
        print("CUDA-ROUND " + json.dumps({
            "model": shape, "adapter": adapter, "device": torch.cuda.get_device_name(), "dtype": "bfloat16",
            "labels": report.labels, "seconds": report.seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "kernel_calls": {b: backends.count(b) for b in set(backends)}, "kl": report.candidate.get("kl_to_ref"),
            "rm_auroc": report.reward_model.get("auroc"), "summary": report.summary()}), flush=True)
        assert report.labels == 128 and report.promoted and report.version == 1, report.reason
        assert backends and set(backends) == {"triton"}, backends  # every log-prob and KL of the round, on the GPU
        probe = torch.tensor([[3, 17, 42, 99, 5, 11, 23]], device="cuda")
        with torch.no_grad():
            trained = state.nets.policy(input_ids=probe).logits
            reference = state.nets.reference(input_ids=probe).logits
        assert relative_error(trained, reference) > 1e-3, "the round changed nothing"
        store = state.policy_store
    finally:
        state.close()

    from transformers import AutoModelForCausalLM

    from rlhf_loop.core.models import NO_HUB_KERNELS

    base = AutoModelForCausalLM.from_pretrained(store.path(0), use_safetensors=True, dtype=torch.bfloat16,
                                                 **NO_HUB_KERNELS).cuda()
    if adapter == "lora":
        from peft import PeftModel

        published = PeftModel.from_pretrained(base, str(store.path(1))).eval()
    else:
        published = AutoModelForCausalLM.from_pretrained(store.path(1), use_safetensors=True, dtype=torch.bfloat16,
                                                         **NO_HUB_KERNELS).cuda().eval()
    with torch.no_grad():
        served = published(input_ids=probe).logits
    # bf16 weights either way: what was published computes what the trainer held, to bf16 rounding
    assert relative_error(served, trained) < 2e-2


def test_the_engine_on_cuda_answers_requests_batched_together_as_each_alone(random_model):
    """The 135M Llama shape in fp32 on the GPU: prompts of different lengths, some joining a batch already
    decoding; seeded sampling (greedy on random weights repeats one token). Then 24 streams in bf16 at once,
    each finishing."""
    from rlhf_loop.core.contracts import Settings
    from rlhf_loop.core.models import load_causal_lm
    from rlhf_loop.service.engine import Engine
    from rlhf_loop.service.loaded import LoadedVersion
    from rlhf_loop.service.request import SamplingParams
    from rlhf_loop.service.scheduler import Limits

    def engine() -> Engine:
        return Engine(Limits(max_running_seqs=64, max_batched_tokens=512, max_waiting_requests=64))

    async def answer(eng, loaded, prompt_ids, p):
        ids, finish = [[] for _ in range(p.n)], [None] * p.n
        async for d in eng.stream(loaded, prompt_ids, p):
            ids[d.index] += d.token_ids
            finish[d.index] = d.finish_reason
        return list(zip(map(tuple, ids), finish))

    def params(**kw) -> SamplingParams:
        return SamplingParams(**{**dict(temperature=1.0, top_p=1.0, max_tokens=24, n=1, stop=(), seed=0), **kw})

    path = random_model("llama-135m")
    model, tok = load_causal_lm(path, Settings(device="cuda", dtype="float32"))
    pol = LoadedVersion.of(0, model, tok)
    assert pol.device.type == "cuda"
    topics = ["cats", "the old harbour and its boats", "rain", "coffee, tea and the morning", "dogs", "a long walk"]
    prompt_ids = [pol.encode_chat([{"role": "user", "content": f"Tell me about {t}."}]) for t in topics]
    ps = [params(seed=i, max_tokens=12 + 2 * i, n=1 + i % 2) for i in range(len(topics))]
    eng = engine()

    async def together():
        first = [asyncio.create_task(answer(eng, pol, prompt_ids[i], ps[i])) for i in range(3)]
        await asyncio.sleep(0.01)
        rest = [asyncio.create_task(answer(eng, pol, prompt_ids[i], ps[i])) for i in range(3, len(topics))]
        return [await t for t in first + rest]

    try:
        batched = asyncio.run(together())
    finally:
        eng.close()
    for i, result in enumerate(batched):
        eng = engine()
        try:
            assert result == asyncio.run(answer(eng, pol, prompt_ids[i], ps[i])), i
        finally:
            eng.close()

    model, tok = load_causal_lm(path, Settings(device="cuda", dtype="bfloat16"))
    pol = LoadedVersion.of(1, model, tok)
    eng = engine()

    async def streams():
        return await asyncio.gather(*[answer(eng, pol, prompt_ids[i % len(topics)], params(seed=i, max_tokens=64))
                                      for i in range(24)])

    try:
        started = time.perf_counter()
        out = asyncio.run(streams())
        seconds = time.perf_counter() - started
    finally:
        eng.close()
    tokens = sum(len(ids) for choices in out for ids, _ in choices)
    print("CUDA-ENGINE " + json.dumps({"model": "llama-135m", "dtype": "bfloat16", "streams": 24, "tokens": tokens,
                                       "seconds": seconds, "device": torch.cuda.get_device_name()}), flush=True)
    assert all(finish in ("stop", "length") for choices in out for _, finish in choices)
