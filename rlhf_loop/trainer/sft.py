"""`rlhf sft`: supervised fine-tuning of the current policy on demonstrations (the seeds' first stage).

    rlhf sft demos.jsonl                  # train LATEST, publish it as the next version
    rlhf sft demos.jsonl --out DIR        # ... or just save the checkpoint to DIR
    rlhf sft demos.jsonl --sft.epochs 2   # any SFTConfig field (trainer/config.py)

DATA.jsonl holds one chat per line: {"messages": [{"role": "user", "content": ...},
{"role": "assistant", "content": ...}, ...]}. Only assistant tokens are trained (the
template's tokens around them and every other turn are context); the loss is the mean
negative log-likelihood of those tokens, via kernels.token_logprobs.
To make the SFT model PPO's reference afterwards: `rlhf train --ppo.reference_version N`.
SFT trains and publishes full weights (a LoRA LATEST is merged into its base first): an
SFT'd model is meant to become a new reference, i.e. a new base for LoRA versions.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm import tqdm

from rlhf_loop.kernels import token_logprobs
from rlhf_loop.core.contracts import Message, Settings
from rlhf_loop.trainer import config
from rlhf_loop.trainer.config import SFTConfig
from rlhf_loop.trainer.rollout import autocast, position_ids

log = logging.getLogger(__name__)


class Demonstration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: list[Message] = Field(min_length=2)


def read_demonstrations(path: Path) -> list[list[dict]]:
    """The chats of a JSONL file; a line that is not a valid chat with an assistant turn is an error."""
    chats = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            demo = Demonstration.model_validate_json(line)
        except ValidationError as e:
            raise ValueError(f"{path}:{n}: not a chat: {e.errors()[0]['msg']}") from e
        if not any(m.role == "assistant" for m in demo.messages):
            raise ValueError(f"{path}:{n}: no assistant turn to learn from")
        chats.append([m.model_dump() for m in demo.messages])
    if not chats:
        raise ValueError(f"{path}: no demonstrations")
    return chats


def tokenize(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """(ids, labels): labels are the ids on assistant turns and -100 elsewhere.

    Assistant turn i spans template(messages[:i], add_generation_prompt) .. template(messages[:i+1]),
    which holds for any chat template whose rendering of a prefix is a prefix of the whole.
    """
    ids = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
    labels = [-100] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)) if i else 0
        upto = list(tokenizer.apply_chat_template(messages[:i + 1], tokenize=True, return_dict=False))
        if ids[:len(upto)] != upto:
            raise ValueError("the chat template does not render prefixes as prefixes; cannot find assistant turns")
        labels[start:len(upto)] = upto[start:]
    return ids[:max_length], labels[:max_length]


def sft_loss(model, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean NLL of the labelled tokens. ids, labels, mask: (B, T), right-padded, labels -100 off-target."""
    logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids(mask)).logits  # (B, T, V)
    target = labels[:, 1:]  # position t predicts token t + 1
    logp = token_logprobs(logits[:, :-1], target)  # (B, T - 1), 0 where target == -100
    keep = target != -100
    return -(logp * keep).sum() / keep.sum().clamp(min=1)


def train(model, tokenizer, chats: list[list[dict]], cfg: SFTConfig, *, device: torch.device,
          dtype: torch.dtype, progress: bool = True) -> list[float]:
    """SFT in place; returns the mean loss of each epoch."""
    data = [tokenize(tokenizer, c, cfg.max_length) for c in chats]
    rng = random.Random(cfg.seed)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = math.ceil(cfg.epochs * steps_per_epoch)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    model.train()
    epoch_losses: list[list[float]] = []
    order: list[int] = []
    bar = tqdm(total=total, desc="sft", unit="step", disable=not progress, file=sys.stderr, leave=False)
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = rng.sample(range(len(data)), len(data))
            epoch_losses.append([])
        batch = [data[i] for i in order[(step % steps_per_epoch) * cfg.batch_size:][:cfg.batch_size]]
        ids, labels, mask = _right_pad(batch, tokenizer.pad_token_id, device)
        with autocast(device, dtype):
            loss = sft_loss(model, ids, labels, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        epoch_losses[-1].append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return [sum(e) / len(e) for e in epoch_losses]


def _right_pad(batch: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device):
    T = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), -100, dtype=torch.long)
    mask = torch.zeros(len(batch), T, dtype=torch.bool)
    for i, (x, y) in enumerate(batch):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
        mask[i, :len(x)] = True
    return ids.to(device), labels.to(device), mask.to(device)


def main(argv: list[str] | None = None) -> int:
    from rlhf_loop.core.models import ensure_policy_store, load_tokenizer, model_dtype, resolve_device
    from rlhf_loop.trainer.networks import load_full

    ap = argparse.ArgumentParser(prog="rlhf sft", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("data", type=Path, help="JSONL of {'messages': [...]} chats")
    ap.add_argument("--out", type=Path, help="save the checkpoint here instead of publishing a version")
    ap.add_argument("--no-progress", action="store_true")
    config.add_arguments(ap, root=config.SFTRun)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config.from_args(args, root=config.SFTRun).sft
    settings = Settings()
    chats = read_demonstrations(args.data)
    policy_store = ensure_policy_store(settings)
    parent = policy_store.latest()
    policy_store.verify(parent)
    model = load_full(policy_store, parent, settings).float()  # fp32 master weights; autocast does bf16 on CUDA
    base = policy_store.path(parent if policy_store.manifest(parent).base_version is None
                             else policy_store.manifest(parent).base_version)
    tokenizer = load_tokenizer(base, settings)
    device = resolve_device(settings)
    losses = train(model, tokenizer, chats, cfg, device=device, dtype=model_dtype(base, settings, device),
                   progress=not args.no_progress)
    print(f"sft: {len(chats)} demonstrations, loss per epoch {' '.join(f'{x:.3f}' for x in losses)}", flush=True)
    if args.out is not None:
        model.save_pretrained(args.out, safe_serialization=True)
        tokenizer.save_pretrained(args.out)
        print(f"sft: saved to {args.out}", flush=True)
        return 0
    update = _publish(settings, policy_store, model, tokenizer, parent, losses, len(chats))
    print(f"sft: published v{update.version} (parent v{parent}); "
          f"to make it PPO's reference: rlhf train --ppo.reference_version {update.version}", flush=True)
    return 0


def _publish(settings, policy_store, model, tokenizer, parent: int, losses: list[float], n: int):
    from kafka import KafkaProducer

    from rlhf_loop.core.broker import client_options, ensure_topics
    from rlhf_loop.trainer.publish import Publisher
    from rlhf_loop.trainer.store import LabelStore

    if settings.create_topics:
        ensure_topics(settings)
    trainer_cfg = config.ConsumerConfig()
    store = LabelStore(settings.trainer_dir / "labels.sqlite", late_vote_window_s=settings.late_vote_window_s,
                       dedupe_window_s=trainer_cfg.dedupe_window_s, prompt_pool_size=trainer_cfg.prompt_pool_size)
    producer = KafkaProducer(**client_options(settings), acks="all", client_id="rlhf-sft")
    try:
        publisher = Publisher(settings, policy_store, store, producer, name="sft")
        publisher.recover()
        def save(d: Path) -> None:
            model.save_pretrained(d, safe_serialization=True)
            tokenizer.save_pretrained(d)

        return publisher.publish(save, parent_version=parent,
                                 metrics={"sft_loss": losses[-1], "sft_examples": float(n)})
    finally:
        producer.close(timeout=10)
        store.close()


if __name__ == "__main__":
    sys.exit(main())
