"""Import a GGUF model: convert it once into a safetensors directory that loads like any HF checkpoint.

    rlhf model import FILE.gguf OUT_DIR [--dtype float32|bfloat16] [--chat-template chatml|FILE.jinja|TEMPLATE]
    RLHF_MODEL=OUT_DIR rlhf up

Many small open models ship as GGUF (llama.cpp's format). The service and the trainer load
weights only through `from_pretrained` on safetensors (core/models.py), so a GGUF is turned
into such a directory here, once: transformers' GGUF loader reads it (dequantizing quantized
tensors and undoing llama.cpp's q/k permutation) and builds the tokenizer from the
`tokenizer.ggml.*` metadata; we save model, tokenizer, chat template and a generation config
naming every end-of-generation id, then load the result back the ordinary way and generate a
few tokens before reporting success. Nothing is written to OUT_DIR unless all of that worked.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf_loop.app.staging import staged

# Token texts llama.cpp ends generation on besides the ids a file names (llama-vocab.cpp,
# special_eog_ids; it matches by text, ggml-org/llama.cpp#9606). Without them an imported
# ChatML model whose file names only <|im_end|> would run on past <|endoftext|>.
LLAMA_CPP_EOG_TOKENS = frozenset({
    "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "<EOT>", "<｜end▁of▁sentence｜>",
})
BOS_KEY, PAD_KEY = "tokenizer.ggml.bos_token_id", "tokenizer.ggml.padding_token_id"
EOS_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
# encoder-decoders: transformers reads them from GGUF, but they are not chat LMs for this service
NOT_CAUSAL = {"t5", "umt5"}
DTYPES = ("float32", "bfloat16")  # float32: lossless for every GGUF type; bfloat16: half the size
SAMPLE_TOKENS = 8
SAMPLE_PROMPT = "Hello! Who are you?"
NO_TEMPLATE_WARNING = (
    "warning: {file} has no chat template, and the service cannot chat with this model until it has one: "
    "re-import with --chat-template (chatml, a .jinja file or the template text), or set RLHF_CHAT_TEMPLATE "
    "when serving it"
)


class GGUFImportError(Exception):
    """A reason the import cannot go ahead, in one line for the user."""


@dataclass(frozen=True)
class ImportReport:
    out_dir: Path
    architecture: str  # the GGUF's general.architecture
    model_class: str
    params: int
    dtype: str
    eos_ids: list[int]
    eos_tokens: list[str]
    chat_template: str  # where it came from: "from the GGUF", "from --chat-template", or "none"
    sample: str  # the greedy continuation of SAMPLE_PROMPT, decoded

    def lines(self) -> list[str]:
        return [
            f"imported into {self.out_dir}",
            f"  architecture   {self.architecture} ({self.model_class})",
            f"  parameters     {self.params:,}",
            f"  dtype          {self.dtype}",
            f"  eos ids        {self.eos_ids} {self.eos_tokens}",
            f"  chat template  {self.chat_template}",
            f"  sample         {self.sample!r}",
        ]


def supported_architectures() -> list[str]:
    """GGUF architectures this transformers can load as a causal LM (its older table and its newer one)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.integrations.gguf import GGUF_CONFIG_ARCHS

    names = set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"} - NOT_CAUSAL
    return sorted(names | set(GGUF_CONFIG_ARCHS))


def _spelling(arch: str) -> str:
    # files say `qwen2moe`, `gpt-oss`; transformers' tables say `qwen2_moe`, `gpt_oss`
    return arch.replace("-", "").replace("_", "")


def read_metadata(path: Path) -> dict:
    """The GGUF's metadata {key: value}; GGUFImportError if `path` is missing or not a GGUF."""
    import gguf

    if not path.is_file():
        raise GGUFImportError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFImportError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError) as e:  # what the reader raises on a truncated or corrupt file
        raise GGUFImportError(f"{path}: not a readable GGUF file ({e})") from e
    return {key: field.contents() for key, field in reader.fields.items()}


def check_architecture(path: Path, metadata: dict) -> str:
    arch = metadata.get("general.architecture")
    supported = supported_architectures()
    if arch is None or _spelling(arch) not in {_spelling(a) for a in supported}:
        raise GGUFImportError(f"{path}: transformers cannot load GGUF architecture {arch!r}; "
                              f"it can load: {', '.join(supported)}")
    return arch


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise GGUFImportError(f"{out_dir} exists and is not an empty directory; choose a new OUT_DIR")


def end_of_generation_ids(metadata: dict) -> list[int]:
    """Ids that end generation: the eos/eot/eom ids the file names, then llama.cpp's end-of-turn tokens by text."""
    ids = [int(metadata[k]) for k in EOS_KEYS if k in metadata]
    tokens = metadata.get("tokenizer.ggml.tokens", [])
    ids += [i for i, t in enumerate(tokens) if t in LLAMA_CPP_EOG_TOKENS]
    return list(dict.fromkeys(ids))  # unique, the file's own first


def load_gguf(path: Path, dtype: str):
    """(model, tokenizer) from the GGUF with transformers' loader, every tensor dequantized to `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from rlhf_loop.core.models import NO_HUB_KERNELS

    try:
        # dequantize=True: plain tensors in ordinary layers, and no GGUF quantizer left on the model
        # (without it the newer loader keeps quantized blocks, and save_pretrained refuses)
        # the file by its name inside its directory: transformers joins the two (a relative path given
        # whole would be joined to its own directory a second time)
        folder, name = str(path.resolve().parent), path.name
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=getattr(torch, dtype), quantization_config=GgufConfig(dequantize=True),
            **NO_HUB_KERNELS,
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, NotImplementedError) as e:  # transformers' words for "this file, not that one"
        raise GGUFImportError(f"{path}: transformers could not load it: {' '.join(str(e).split())}") from e
    return model, tokenizer


def save(model, tokenizer, stage: Path, source: Path) -> None:
    """save_pretrained into `stage`; refuse if anything but safetensors/json/text came out (no pickles)."""
    from rlhf_loop.core.models import _CHECKPOINT_SUFFIXES

    model.save_pretrained(stage, safe_serialization=True)
    tokenizer.save_pretrained(stage)
    (stage / "gguf_import.json").write_text(json.dumps(
        {"source": source.name, "bytes": source.stat().st_size, "dtype": str(model.dtype).removeprefix("torch.")},
        indent=2))
    unsafe = sorted(p.name for p in stage.iterdir() if p.suffix not in _CHECKPOINT_SUFFIXES)
    if unsafe or not list(stage.glob("*.safetensors")):
        raise GGUFImportError(f"save_pretrained wrote {unsafe or 'no safetensors'}; refusing to keep it")


def sample(model_dir: Path, dtype: str) -> str:
    """Load `model_dir` the way the service does and decode a few greedy tokens after a chat prompt."""
    import torch

    from transformers import AutoTokenizer

    from rlhf_loop.core.contracts import Settings
    from rlhf_loop.core.models import load_model

    model = load_model(model_dir, Settings(dtype=dtype))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # as saved: a model without a template is sampled raw
    messages = [{"role": "user", "content": SAMPLE_PROMPT}]
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    else:
        ids = tokenizer(SAMPLE_PROMPT)["input_ids"]
    prompt = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=SAMPLE_TOKENS,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=False)


def import_gguf(path: Path, out_dir: Path, *, dtype: str = "float32", chat_template: str | None = None,
                log=print) -> ImportReport:
    """Convert the GGUF at `path` into a safetensors directory `out_dir`, checked by generating; see the module doc.

    `chat_template` (already resolved text) replaces the GGUF's own; `log` gets progress lines.
    """
    path, out_dir = Path(path), Path(out_dir)
    # 1. refuse early: a missing or foreign file, an architecture transformers cannot read, a used OUT_DIR
    metadata = read_metadata(path)
    arch = check_architecture(path, metadata)
    check_out_dir(out_dir)
    eos_ids = end_of_generation_ids(metadata)
    template = chat_template or metadata.get("tokenizer.chat_template")
    origin = "from --chat-template" if chat_template else "from the GGUF" if template else "none"

    # 2. read and dequantize (transformers shows a bar per tensor)
    t0 = time.monotonic()
    log(f"converting {path} ({path.stat().st_size / 2**20:.1f} MiB, {arch}) to {dtype}...")
    model, tokenizer = load_gguf(path, dtype)
    tokenizer.chat_template = template
    # the file's ids, not the config class's defaults (LlamaConfig's bos 1 / eos 2) where it names none
    special_ids = {"bos_token_id": metadata.get(BOS_KEY), "eos_token_id": eos_ids or None,
                   "pad_token_id": metadata.get(PAD_KEY)}
    for target in (model.config, model.generation_config):
        for name, value in special_ids.items():
            setattr(target, name, value)
    report = dict(architecture=arch, model_class=type(model).__name__,
                  params=sum(p.numel() for p in model.parameters()), dtype=dtype, eos_ids=eos_ids,
                  eos_tokens=tokenizer.convert_ids_to_tokens(eos_ids), chat_template=origin)

    # 3. save into a stage next to OUT_DIR, check it loads and generates, then rename it into place
    with staged(out_dir) as stage:
        log(f"saving safetensors ({time.monotonic() - t0:.0f}s so far)...")
        save(model, tokenizer, stage, path)
        del model
        gc.collect()
        log(f"checking: loading it back and generating {SAMPLE_TOKENS} tokens...")
        text = sample(stage, dtype)
    return ImportReport(out_dir=out_dir, sample=text, **report)


def main(argv: list[str]) -> int:
    from rlhf_loop.core.models import resolve_chat_template

    ap = argparse.ArgumentParser(prog="rlhf model import", description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", type=Path, metavar="FILE.gguf")
    ap.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="a new (or empty) directory")
    ap.add_argument("--dtype", choices=DTYPES, default="float32",
                    help="weights as saved: float32 (lossless, default) or bfloat16 (half the size)")
    ap.add_argument("--chat-template", metavar="chatml|FILE.jinja|TEMPLATE",
                    help="chat template to use instead of the GGUF's (required for chat if it has none)")
    args = ap.parse_args(argv)
    try:
        template = resolve_chat_template(args.chat_template) if args.chat_template else None
    except ValueError as e:
        ap.error(str(e))
    try:
        report = import_gguf(args.gguf, args.out_dir, dtype=args.dtype, chat_template=template,
                             log=lambda line: print(line, file=sys.stderr, flush=True))
    except GGUFImportError as e:
        print(f"rlhf model import: error: {e}", file=sys.stderr)
        return 1
    print("\n".join(report.lines()))
    if report.chat_template == "none":
        print(NO_TEMPLATE_WARNING.format(file=args.gguf), file=sys.stderr)
    return 0
