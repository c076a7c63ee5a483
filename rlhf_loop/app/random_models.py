"""Random-weight Hugging Face causal LMs of real architectures and shapes, with tokenizers built here.

    from rlhf_loop.app import random_models
    path = random_models.ensure(cache_dir, "llama-135m")              # SmolLM-135M's shape, ChatML
    path = random_models.ensure(cache_dir, "gpt2-tiny", chat_template=None, pad_token=False)

No model hub is reachable where this project is developed and tested, yet every feature
must work with real models, not only the embedded toy. These are what the tests and the
benchmarks use instead: the architectures people serve (Llama, Qwen2, Mistral, Gemma,
Gemma 3, GPT-2) at the shapes they ship (`llama-135m` is SmolLM-135M's: hidden 576, 30
layers, 9 heads, 3 KV heads, vocab 49152, tied embeddings), and with sliding-window
attention (`gemma3-tiny`, `mistral-swa-tiny`: a window of 16 tokens, so answers run past
it), with random weights, saved with `save_pretrained` (safetensors) and loaded through the
ordinary `from_pretrained` path.

The tokenizer is a byte-level BPE whose merges are made up (every pair of byte symbols,
pairs of the most common symbols first) so its vocabulary has exactly the model's size: any id a
random model samples decodes to something, and multi-byte characters split across tokens
happen for real. Variants: with the ChatML template or none, with a pad token or none,
and the generation config names several EOS ids (`<|im_end|>` and `<|endoftext|>`).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from rlhf_loop.core.models import CHATML

RECIPE = 1  # bump when a shape, the tokenizer or the template changes: cached copies are rebuilt

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# name -> (architecture, config fields). Shapes of released models where a name says so.
SHAPES: dict[str, tuple[str, dict]] = {
    # SmolLM-135M (Llama architecture)
    "llama-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                 num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                 tie_word_embeddings=True)),
    "llama-tiny": ("llama", dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 tie_word_embeddings=True)),
    "qwen2-tiny": ("qwen2", dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 tie_word_embeddings=True)),
    "qwen3-tiny": ("qwen3", dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 max_position_embeddings=512, tie_word_embeddings=True)),
    "mistral-tiny": ("mistral", dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                     sliding_window=None, tie_word_embeddings=False)),
    "gemma-tiny": ("gemma", dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                 max_position_embeddings=512)),
    # sliding-window attention, the window (16) far shorter than a chat so that answers run past it:
    # Gemma 3's text model (local layers with their own RoPE base, then a global one; the 270M-27B models
    # repeat 5 local : 1 global), and Mistral 7B v0.1's layout (every layer a window)
    "gemma3-tiny": ("gemma3_text", dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                        max_position_embeddings=512, sliding_window=16,
                                        layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
    "mistral-swa-tiny": ("mistral", dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                         sliding_window=16, tie_word_embeddings=False)),
    # a hybrid the engine cannot batch (its cache holds convolution state): LFM2's layout, short convolutions
    # with attention layers between them
    "lfm2-tiny": ("lfm2", dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                               layer_types=["conv", "full_attention"])),
    "gpt2-tiny": ("gpt2", dict(vocab_size=1024, n_embd=64, n_layer=2, n_head=4, n_positions=512)),
    # GPT-2 small (124M)
    "gpt2-124m": ("gpt2", dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)),
}


def build_tokenizer(vocab_size: int, *, chat_template: str | None = CHATML, pad_token: bool = True):
    """A byte-level BPE tokenizer of exactly `vocab_size` ids (3 special tokens, 256 bytes, made-up merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [ENDOFTEXT, IM_START, IM_END]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # letters, then the byte-level space symbol, digits and punctuation, then everything else
    order = sorted(alphabet, key=lambda c: (not c.islower(), c != "Ġ", not c.isupper(), not c.isdigit(), c))
    vocab = {t: i for i, t in enumerate(specials + order)}
    n_merges = vocab_size - len(vocab)
    if n_merges < 0 or n_merges > len(order) ** 2:
        raise ValueError(f"vocab_size {vocab_size} is out of this tokenizer's range")
    merges = []
    rank = {c: i for i, c in enumerate(order)}
    for a, b in sorted(((a, b) for a in order for b in order), key=lambda p: (max(rank[p[0]], rank[p[1]]), p)):
        if len(merges) == n_merges:
            break
        if a + b not in vocab:  # pairs of the most common symbols first
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    while len(vocab) < vocab_size:  # pairs that collided with single symbols: pad with unused ids
        vocab[f"<|unused{len(vocab)}|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END if chat_template else ENDOFTEXT, bos_token=None,
        pad_token=ENDOFTEXT if pad_token else None, chat_template=chat_template, model_max_length=2048,
    )


def build(out_dir: Path, shape: str, *, chat_template: str | None = CHATML, pad_token: bool = True,
          seed: int = 0) -> Path:
    """Write a random-weight model of `shape` and its tokenizer to `out_dir` (save_pretrained, safetensors)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch, fields = SHAPES[shape]
    tokenizer = build_tokenizer(fields["vocab_size"], chat_template=chat_template, pad_token=pad_token)
    eos_ids = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
    config = AutoConfig.for_model(arch, **fields, bos_token_id=None, eos_token_id=eos_ids,
                                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = eos_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir = Path(out_dir)
    stage = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:8]}"
    stage.mkdir(parents=True)
    model.save_pretrained(stage, safe_serialization=True)
    tokenizer.save_pretrained(stage)
    (stage / "random_model.json").write_text(json.dumps({
        "shape": shape, "architecture": arch, "recipe": RECIPE, "seed": seed, "chat_template": bool(chat_template),
        "pad_token": pad_token, "params": sum(p.numel() for p in model.parameters()),
    }, indent=2))
    try:
        stage.rename(out_dir)
    except OSError:  # a concurrent builder finished first
        shutil.rmtree(stage)
    return out_dir


def ensure(cache_dir: Path, shape: str, *, chat_template: str | None = CHATML, pad_token: bool = True,
           seed: int = 0) -> Path:
    """The model's directory in `cache_dir`, built on first use."""
    variant = f"{shape}-r{RECIPE}-s{seed}" + ("" if chat_template else "-notemplate") + ("" if pad_token else "-nopad")
    out = Path(cache_dir) / variant
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        build(out, shape, chat_template=chat_template, pad_token=pad_token, seed=seed)
    return out
