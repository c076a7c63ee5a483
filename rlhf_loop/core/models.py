"""Where models come from: the base model (embedded or any HF causal LM) and policy version 0.

Both the service and the trainer load weights only through `load_causal_lm`, i.e. the
ordinary `from_pretrained` path, with safetensors required.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from rlhf_loop.core import tinylm
from rlhf_loop.core.contracts import EMBEDDED_MODEL, Settings
from rlhf_loop.core.policy_store import PolicyStore

# files a checkpoint may carry into the policy store; anything else (pickles!) stays out
_CHECKPOINT_SUFFIXES = {".json", ".safetensors", ".txt", ".model", ".jinja"}

# ChatML (Qwen's, SmolLM's): what `chatml` means wherever a chat template is given
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class NoChatTemplate(ValueError):
    """The base model's tokenizer has no chat template and none is configured."""


def ensure_chat_template(tokenizer, settings: Settings, source: str) -> None:
    """Give `tokenizer` the configured template if it has none; a clear error if none is configured.

    We do not guess a template for the user: a base model that never saw one answers
    nonsense in any format, and an instruct model needs exactly its own.
    """
    if tokenizer.chat_template:
        return
    if not settings.chat_template:
        raise NoChatTemplate(
            f"the model {source} has no chat template, so chat messages cannot be turned into its prompt. "
            "Set RLHF_CHAT_TEMPLATE to 'chatml', to a .jinja file, or to the template text itself.")
    tokenizer.chat_template = resolve_chat_template(settings.chat_template)


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    """Every id that ends an answer: the generation config's (often several) and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model names no end-of-sequence token (generation_config.eos_token_id, tokenizer.eos_token)")
    return frozenset(ids)


def count_parameters(model_dir: str | Path) -> int:
    """Parameters of a safetensors checkpoint, read from the file headers (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for key in st.keys():
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                total += n
    return total

def base_model_dir(settings: Settings) -> str:
    """A local directory or hub id for the base model; builds the embedded one on first use."""
    if settings.model == EMBEDDED_MODEL:
        return str(tinylm.ensure(settings.model_cache_dir))
    return settings.model


def resolve_chat_template(value: str) -> str:
    """The chat template a setting or flag names: `chatml`, a path to a `.jinja` file, or the template text.

    Raises ValueError (one line) for a missing file or for text with no Jinja in it, so a mistyped
    path is not taken for the template. Jinja errors show when the template is first applied.
    """
    if value.strip().lower() == "chatml":
        return CHATML
    if value.endswith(".jinja"):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError(f"chat template file {value} does not exist")
        return path.read_text()
    if "{{" not in value and "{%" not in value:
        raise ValueError(f"chat template {value!r} is neither 'chatml', a .jinja file, nor a Jinja template")
    return value


def resolve_device(settings: Settings) -> torch.device:
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)


# RLHF_DTYPE=auto on a CPU: bf16 from this many parameters up, when the CPU computes bf16 natively.
# Below it (the embedded 0.74M model) matmuls are too small for bf16 to pay, and its loop is tuned in fp32
# (docs/trainer.md, "bf16 on CPUs"; bench/dtype.py measures both precisions).
BF16_CPU_MIN_PARAMS = 10_000_000


def cpu_computes_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN's bf16 matmuls run natively (elsewhere they are emulated, and slower)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_dtype(settings: Settings, device: torch.device, params: int | None = None) -> torch.dtype:
    """RLHF_DTYPE, with auto = bf16 on CUDA, and on a CPU that computes bf16 for a model of `params` >=
    BF16_CPU_MIN_PARAMS (None: unknown, fp32); else fp32."""
    if settings.dtype != "auto":
        return getattr(torch, settings.dtype)
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if params is not None and params >= BF16_CPU_MIN_PARAMS and cpu_computes_bf16() else torch.float32


def model_dtype(path: str | Path, settings: Settings, device: torch.device) -> torch.dtype:
    """The dtype `load_model` gives the checkpoint at `path` (its size decides auto on a CPU)."""
    params = count_parameters(path) if Path(path).is_dir() else None
    return resolve_dtype(settings, device, params)


# transformers 5.2x loads with use_kernels=True by default once Hugging Face's `kernels` package is installed
# (transformers itself depends on it), and on CUDA its model.train() then fetches compiled kernels from the
# Hub and runs them (kernels-community/rotary, ...): network access and native code nobody here reviewed, at
# run time, and an error offline (HF_HUB_OFFLINE=1, as deployed). Every model this project loads says no: it
# runs PyTorch's own ops, and the trainer's log-prob and KL ops are this project's Triton kernels (kernels/).
NO_HUB_KERNELS = {"use_kernels": False}


def load_causal_lm(path: str | Path, settings: Settings):
    """(model, tokenizer) from a HF checkpoint directory or id, eval mode, on the configured device."""
    return load_model(path, settings), load_tokenizer(path, settings)


def load_model(path: str | Path, settings: Settings):
    """The causal LM alone (safetensors only), in the configured dtype, on the configured device, eval mode."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(settings)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=model_dtype(path, settings, device), use_safetensors=True,
                                                 **NO_HUB_KERNELS)
    return model.to(device).eval()


def load_tokenizer(path: str | Path, settings: Settings):
    """The checkpoint's tokenizer with a chat template (ensure_chat_template) and a pad token (its EOS if it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_chat_template(tokenizer, settings, str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def ensure_policy_store(settings: Settings) -> PolicyStore:
    """The policy store, with version 0 (a copy of the base model) written if the store is empty.
    A store made from another model is refused (LineageMismatch), or with RLHF_NEW_LINEAGE set aside."""
    store = PolicyStore(settings.policy_dir)
    store.check_source(settings.model_source, new_lineage=settings.new_lineage)
    if store.latest() is None and not store.versions():
        src = base_model_dir(settings)
        if not Path(src).is_dir():  # a hub id: materialise it as safetensors
            model, tok = load_causal_lm(src, settings)

            def save(d: Path) -> None:
                model.save_pretrained(d, safe_serialization=True)
                tok.save_pretrained(d)
        else:
            tokenizer = load_tokenizer(src, settings)  # fails early, naming RLHF_CHAT_TEMPLATE, if there is no template

            def save(d: Path) -> None:
                for p in Path(src).iterdir():
                    if p.is_file() and p.suffix in _CHECKPOINT_SUFFIXES:
                        shutil.copy2(p, d / p.name)
                tokenizer.save_pretrained(d)  # with the chat template it was given, so every reader sees the same
        try:
            store.write(0, save, parent_version=None, metrics={}, source=settings.model_source)
        except FileExistsError:
            pass  # a concurrent starter (service replica or trainer) wrote it first
    if store.latest() is None:
        store.set_latest(max(store.versions()))
    return store
