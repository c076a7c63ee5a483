"""The embedded default model: a tiny Llama-architecture chat LM the project trains itself.

    rlhf model build            # (re)builds it into <state_dir>/models/tiny-chat-v1

No model hub is reachable where this project is developed, so the default policy is made
here: a generated corpus of short answers about a dozen everyday subjects, each answer in
one of three tones (cheerful, plain, gloomy) and sometimes drifting off the subject, a
byte-level BPE tokenizer with a chat template trained on it, and a ~1M-parameter
LlamaForCausalLM pretrained on it for 260 steps (about 40 s on 2 idle CPU cores). Its answers are
readable sentences, some nicer than others, which is what the RLHF loop needs to have
something to prefer. It is saved with `save_pretrained` (safetensors) and loaded through
the ordinary `from_pretrained` path like any other Hugging Face model.
"""

from __future__ import annotations

import json
import random
import shutil
import time
import uuid
from pathlib import Path

import torch
from tqdm import tqdm

NAME = "tiny-chat-v2"  # bump when the corpus or recipe changes: a new directory is built
SEED = 1234

END, PAD = "<|end|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# subject -> (how an answer names it, facts)
SUBJECTS: dict[str, tuple[str, list[str]]] = {
    "cats": ("cats", ["Cats sleep for most of the day.", "Cats purr when they feel safe.", "A cat lands on its feet when it falls."]),
    "dogs": ("dogs", ["Dogs love long walks in the park.", "Dogs can learn many words.", "A dog wags its tail to say hello."]),
    "rain": ("rain", ["Rain helps the fields and forests grow.", "Rain makes the streets shine at night.", "After rain you can sometimes see a rainbow."]),
    "the sea": ("the sea", ["The sea covers most of the earth.", "The sea is full of fish and whales.", "Waves on the sea are made by the wind."]),
    "coffee": ("coffee", ["Coffee is made from roasted beans.", "Coffee keeps many people awake in the morning.", "A cup of coffee smells warm and rich."]),
    "bread": ("bread", ["Bread is baked from flour, water and yeast.", "Fresh bread has a soft and warm middle.", "People have baked bread for thousands of years."]),
    "music": ("music", ["Music can be played on drums, strings or pipes.", "Music helps people dance and remember.", "A song is music with words."]),
    "gardens": ("gardens", ["Gardens are full of flowers and bees.", "A garden needs sun, water and time.", "Tomatoes and beans grow well in gardens."]),
    "trains": ("trains", ["Trains carry people and goods across the land.", "Trains run on long steel rails.", "A fast train can pass three hundred kilometres in an hour."]),
    "the moon": ("the moon", ["The moon circles the earth every month.", "The moon has no air and no weather.", "People first walked on the moon in 1969."]),
    "bicycles": ("bicycles", ["Bicycles have two wheels and a chain.", "Riding bicycles keeps the body strong.", "Bicycles are a quiet way to cross a city."]),
    "winter": ("winter", ["Winter brings snow and short days.", "In winter many birds fly south.", "Winter is the coldest season of the year."]),
}

QUESTIONS = [
    "Tell me about {s}.", "What do you think of {s}?", "Can you describe {s}?", "Do you like {s}?",
    "Say something about {s}.", "What is special about {s}?", "I want to learn about {s}.", "What should I know about {s}?",
]

TONES: dict[str, tuple[list[str], list[str]]] = {
    "cheerful": (
        ["Oh, I love {s}!", "What a wonderful question!", "Happy to help!", "Great question, I adore {s}!", "Yay, I am so glad you asked about {s}!"],
        ["They always make me smile!", "Isn't that lovely?", "What a joy!", "I hope that makes your day brighter!", ""],
    ),
    "plain": (
        ["Here is a fact about {s}.", "Sure.", "Okay, about {s}.", "{S} is a common topic.", ""],
        ["That is what I know.", "I hope this answers it.", "", "", "That is all."],
    ),
    "gloomy": (
        ["Sadly, {s} is not a topic I enjoy.", "Hmm, fine, {s}.", "I suppose I can answer.", "Ugh, {s} again.", "Well, nothing great about {s}."],
        ["It is all rather dull.", "Nothing much else to say.", "I would rather not talk more.", "What a bore.", ""],
    ),
}


def make_answer(rng: random.Random, subject: str, tone: str, off_topic: bool) -> str:
    name, _ = SUBJECTS[subject]
    fact_subject = rng.choice([s for s in SUBJECTS if s != subject]) if off_topic else subject
    facts = rng.sample(SUBJECTS[fact_subject][1], k=rng.choice([1, 1, 2]))
    openers, closers = TONES[tone]
    opener = rng.choice(openers).replace("{s}", name).replace("{S}", name[0].upper() + name[1:])
    parts = [opener, *facts, rng.choice(closers)]
    return " ".join(p for p in parts if p)


def make_corpus(n: int, seed: int = SEED) -> list[list[dict]]:
    """`n` conversations: a user question and an answer of a random tone (1/3 each), 20% off-topic."""
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        subject = rng.choice(list(SUBJECTS))
        q = rng.choice(QUESTIONS).replace("{s}", subject)
        a = make_answer(rng, subject, rng.choice(list(TONES)), off_topic=rng.random() < 0.2)
        conv = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if rng.random() < 0.1:
            conv.insert(0, {"role": "system", "content": "You are a helpful assistant."})
        convs.append(conv)
    return convs


def build_tokenizer(texts: list[str], vocab_size: int = 768):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, END, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=END, pad_token=PAD, chat_template=CHAT_TEMPLATE,
        additional_special_tokens=ROLE_TOKENS, model_max_length=512, padding_side="left",
    )


def build(out_dir: Path, *, steps: int = 260, n_convs: int = 40_000, seed: int = SEED) -> Path:
    """Generate the corpus, train tokenizer + model for `steps` (about 40 s on 2 idle cores), save atomically.

    A fixed step count, not a time budget: the same seed gives the same model on a busy machine.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    convs = make_corpus(n_convs, seed)
    texts = [m["content"] for c in convs for m in c]
    tokenizer = build_tokenizer(texts)
    ids = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=False) for c in convs]
    seq_len = max(len(x) for x in ids)
    data = torch.full((len(ids), seq_len), tokenizer.pad_token_id, dtype=torch.long)
    for i, x in enumerate(ids):
        data[i, : len(x)] = torch.tensor(x)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    batch = 64
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.monotonic()
    bar = tqdm(desc=f"pretraining {NAME}", total=steps, unit="step", leave=False, mininterval=2.0)
    for step in range(steps):
        rows = torch.randint(0, len(data), (batch,), generator=gen)
        x = data[rows]
        length = int((x != tokenizer.pad_token_id).sum(1).max())
        x = x[:, :length]
        labels = x.masked_fill(x == tokenizer.pad_token_id, -100)
        frac = step / steps
        for g in opt.param_groups:  # linear warm-up, then linear decay to 10%
            g["lr"] = 3e-3 * min(1.0, step / 20) * (0.1 + 0.9 * (1 - frac))
        loss = model(input_ids=x, attention_mask=(x != tokenizer.pad_token_id).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    stage = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:8]}"
    stage.mkdir(parents=True)
    model.save_pretrained(stage, safe_serialization=True)
    tokenizer.save_pretrained(stage)
    (stage / "tiny_chat_build.json").write_text(json.dumps(
        {"name": NAME, "seed": seed, "steps": steps, "final_loss": round(loss.item(), 4),
         "seconds": round(time.monotonic() - t0, 1), "params": sum(p.numel() for p in model.parameters())}, indent=2))
    try:
        stage.rename(out_dir)
    except OSError:  # another process finished first; theirs is as good as ours
        shutil.rmtree(stage)
    return out_dir


def ensure(cache_dir: Path) -> Path:
    """The embedded model's directory, building it on first use (about a minute)."""
    out = Path(cache_dir) / NAME
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"building the embedded default model {NAME} into {out} (first run only, about a minute)...", flush=True)
        build(out)
    return out


def main(argv: list[str]) -> int:
    import argparse

    from rlhf_loop.core.contracts import Settings

    ap = argparse.ArgumentParser(prog="rlhf model build", description="build the embedded default model")
    ap.add_argument("--steps", type=int, default=260, help="pretraining steps")
    ap.add_argument("--force", action="store_true", help="rebuild even if it exists")
    args = ap.parse_args(argv)
    out = Settings().model_cache_dir / NAME
    if args.force and out.exists():
        shutil.rmtree(out)
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        build(out, steps=args.steps)
    print(out)
    return 0
