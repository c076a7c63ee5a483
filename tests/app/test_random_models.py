"""Random-weight models of real architectures: loadable with from_pretrained, tokenizer as big as the vocab."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_loop.app import random_models


@pytest.mark.parametrize("shape", ["llama-tiny", "qwen2-tiny", "gpt2-tiny", "gemma3-tiny", "mistral-swa-tiny",
                                   "lfm2-tiny"])
def test_random_model_loads_and_every_id_decodes(shape, random_model):
    path = Path(random_model(shape))
    assert (path / "model.safetensors").exists() and not list(path.glob("*.bin"))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    assert len(tok) == model.config.vocab_size
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi, wörld!"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert tok.decode(tok("Hi, wörld!")["input_ids"]) == "Hi, wörld!"  # byte-level: lossless
    assert isinstance(tok.decode(list(range(len(tok)))), str)
    assert model.generation_config.eos_token_id == [tok.convert_tokens_to_ids("<|im_end|>"),
                                                    tok.convert_tokens_to_ids("<|endoftext|>")]
    out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > len(ids)


def test_variants_without_template_or_pad_token(random_model):
    tok = AutoTokenizer.from_pretrained(random_model("llama-tiny", chat_template=None, pad_token=False))
    assert tok.chat_template is None and tok.pad_token is None and tok.eos_token == "<|endoftext|>"


def test_135m_shape_is_smollm_shape():
    _, fields = random_models.SHAPES["llama-135m"]
    # SmolLM-135M: 134.5M parameters with tied embeddings
    h, i, n, v = fields["hidden_size"], fields["intermediate_size"], fields["num_hidden_layers"], fields["vocab_size"]
    kv = h // fields["num_attention_heads"] * fields["num_key_value_heads"]
    params = v * h + n * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h
    assert 134e6 < params < 135e6
    assert json.loads(json.dumps(fields))  # plain values, as saved in config.json


@pytest.mark.parametrize("shape, layer_types", [
    ("gemma3-tiny", ["sliding_attention", "sliding_attention", "full_attention"]),
    ("mistral-swa-tiny", ["sliding_attention", "sliding_attention"]),
    ("lfm2-tiny", ["conv", "full_attention"]),
])
def test_sliding_window_and_hybrid_shapes_have_the_layers_they_are_for(shape, layer_types, random_model):
    """What the service's engine tests rely on: a window of 16 (shorter than a chat), and which cache layers."""
    from transformers import AutoConfig
    from transformers.cache_utils import get_layer_types_and_kwargs

    config = AutoConfig.from_pretrained(random_model(shape))
    assert get_layer_types_and_kwargs(config)[0] == layer_types
    if "sliding_attention" in layer_types:
        assert config.sliding_window == 16
