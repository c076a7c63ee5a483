"""LoRA versions: an adapter version's files, and which adapter a shared base runs with.

A LoRA version is a directory of the policy store holding peft's two files (below); its
manifest names the full-weight version it applies to and that version's manifest hash
(core/policy_store.py). The trainer writes them (`write_adapter`), the service and the
trainer read them (`read_adapter`), and both run several adapters on one base model through
peft, switching with `running(...)`: the one place that knows how.

    adapter_config.json          a peft LoraConfig (rank, alpha, target modules)
    adapter_model.safetensors    the weights, under peft's saved names: the adapter's own
                                 name left out ('...q_proj.lora_A.weight' for the module's
                                 '...q_proj.lora_A.<adapter>.weight')
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"



def read_adapter(version_dir: Path):
    """(LoraConfig, weights under their saved names) of an adapter version's directory."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(str(version_dir))
    return config, load_file(Path(version_dir) / ADAPTER_WEIGHTS)


def write_adapter(d: Path, config, weights: dict[str, torch.Tensor]) -> None:
    """An adapter version's two files into `d`: `weights` under their saved names (`saved_names`)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in weights.items()}, str(d / ADAPTER_WEIGHTS))
    config.save_pretrained(str(d))  # ADAPTER_CONFIG


def saved_names(named: dict[str, torch.Tensor], adapter: str) -> dict[str, torch.Tensor]:
    """A model's adapter tensors ('...lora_A.<adapter>.weight') under their saved names ('...lora_A.weight')."""
    tag = f".{adapter}."
    return {n.replace(tag, "."): t for n, t in named.items() if tag in n}


@contextlib.contextmanager
def running(peft, adapter: str | None, *, trainable: bool = False):
    """Forwards inside run with `adapter` on, or with every adapter off (None: the base itself).

    `peft` is the PeftModel holding the adapters, or None for a model that has none (then
    nothing changes). Switching costs a few attribute writes, done only when another adapter
    ran last. `trainable`: the adapter's weights require grad (the trainer's), else none does.
    """
    if peft is None:
        yield
    elif adapter is None:
        with _adapters_off(peft):
            yield
    else:
        if peft.active_adapter != adapter:
            peft.set_adapter(adapter, inference_mode=not trainable)
        yield


@contextlib.contextmanager
def _adapters_off(peft):
    """peft's `disable_adapter()` without its cost: that one also sets requires_grad on every adapter
    weight of every layer, going in and out (38 ms a switch on SmolLM2, 3.5 ms this way, paid by every
    reference forward of a LoRA round); this flips the layers' own off switch, which is all their
    forward reads, and leaves requires_grad as it was (a forward with adapters off touches no adapter
    weight, so none can get a gradient)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in peft.modules() if isinstance(m, BaseTunerLayer)]
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, was in zip(layers, before):
            m._disable_adapters = was


def put_adapter(peft, model, name: str, config, weights: dict[str, torch.Tensor]):
    """`weights` (saved names) as the adapter `name` on `model`; returns the PeftModel that holds it
    (made around `model` on its first adapter, else `peft`, which must not hold `name` yet)."""
    from peft import get_peft_model, set_peft_model_state_dict

    config.inference_mode = True
    if peft is None:
        peft = get_peft_model(model, config, adapter_name=name).eval()
    else:
        peft.add_adapter(name, config)
    result = set_peft_model_state_dict(peft, weights, adapter_name=name)
    if result.unexpected_keys:
        raise ValueError(f"adapter weights do not fit the base: {result.unexpected_keys[:3]}")
    return peft


def drop_adapter(peft, name: str) -> None:
    """Delete the adapter `name` from `peft` (peft keeps at least one: a last one stays, and is never
    switched on again unless loaded anew)."""
    if name in peft.peft_config and len(peft.peft_config) > 1:
        peft.delete_adapter(name)
