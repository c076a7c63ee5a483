"""Write a GGUF file from a Hugging Face Llama checkpoint the way llama.cpp's converter does (test support).

    from gguf_writer import write_gguf
    quantized = write_gguf(random_model("llama-tiny"), tmp_path / "model.gguf")

What llama.cpp's `convert_hf_to_gguf.py` does for a Llama model, with the `gguf` package:
tensors under llama.cpp's names (`gguf.get_tensor_name_map`), the q/k rows permuted from
Hugging Face's rotary layout (halves) to llama.cpp's (interleaved pairs), no `output.weight`
when the embeddings are tied, the shape as `llama.*` metadata, and a byte-level BPE tokenizer
as `tokenizer.ggml.model = "gpt2"` with tokens, token types, merges, special ids and the chat
template. The tensors named in `q8_0` are stored quantized (Q8_0, quantized in Python by
`gguf.quants`), so loading has to dequantize them; the rest are F32. It returns the HF names of
the parameters that went through Q8_0.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

# a permuted one (attn_q), an unpermuted one (ffn_down) and the embeddings, in every layer
Q8_0 = ("token_embd.weight", "attn_q.weight", "ffn_down.weight")


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection from HF's rotary layout to llama.cpp's: (n_head*d, in) -> same shape.

    HF rotates the first half of each head against the second half; llama.cpp rotates adjacent
    pairs. llama.cpp's converter (LlamaModel.permute) reorders each head's rows accordingly;
    transformers' GGUF loader undoes it (LlamaTensorProcessor._reverse_permute_weights).
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_dir: str | Path, path: Path, *, q8_0: tuple[str, ...] = Q8_0,
               chat_template: bool = True) -> set[str]:
    """Write the Llama checkpoint in `model_dir` to `path` as a GGUF; `chat_template=False` leaves the template out.

    Returns the HF parameter names stored as Q8_0 (the tied head among them when the embeddings are).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    assert cfg.model_type == "llama", f"this writer does Llama only, not {cfg.model_type}"

    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_name(Path(model_dir).name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8_0 else gguf.LlamaFileType.ALL_F32)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # tokenizer: every id's token in byte-level spelling; the added (special) tokens are CONTROL
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    special = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_token_merges([" ".join(m) for m in merges])
    # what llama.cpp's SpecialVocab takes from tokenizer_config.json: the tokenizer's eos and pad
    w.add_eos_token_id(tok.eos_token_id)
    if tok.pad_token_id is not None:
        w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    if chat_template and tok.chat_template:
        w.add_chat_template(tok.chat_template)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    quantized = set()
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes output.weight only when it is not the embedding matrix
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, f"no llama.cpp name for {hf_name}"
        data = t.numpy()
        if name.endswith("attn_q.weight"):
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        if name.endswith(q8_0):
            quantized.add(hf_name)
            w.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if cfg.tie_word_embeddings and "model.embed_tokens.weight" in quantized:
        quantized.add("lm_head.weight")
    return quantized
