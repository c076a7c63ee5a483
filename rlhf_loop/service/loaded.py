"""A loaded version of the policy, as the engine runs it: its weights (its own, or its base's with
its LoRA adapter on), its tokenizer, and the one forward the engine calls.

    loaded = LoadedVersion.of(version, model, tokenizer, base=base, adapter="v3_1")
    logits, cache = loaded.forward(ids, mask, positions, cache)    # (B, V) last-position logits

Several versions can share one base model in memory (`SharedBase`): the full-weight version
itself and every LoRA adapter version over it, each switched on around its own forwards
(core/lora.py). Loading and swapping versions is service/versions.py's job; this is only
what a request needs from the version it runs on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from transformers import DynamicCache

from rlhf_loop.core import lora
from rlhf_loop.core.models import eos_token_ids
from rlhf_loop.service.detokenizer import TokenBytes


@dataclass(eq=False)
class SharedBase:
    """A full-weight version in memory that several loaded versions share: itself, and the LoRA
    adapter versions over it.

    `peft` is set (on the engine thread, by the version manager) when the first adapter is loaded:
    peft injects the adapter layers into `model`'s own modules, so from then on every forward
    through them names its adapter, or turns them off for the base version itself (LoadedVersion.forward).
    """

    version: int
    model: Any  # the causal LM, eval mode
    tokenizer: Any
    manifest_sha256: str  # of the base's manifest when it was verified and loaded: an adapter must name it
    peft: Any = None  # the peft PeftModel around `model`, once an adapter is on it


@dataclass(frozen=True)
class LoadedVersion:
    """One version of the policy, loaded. Immutable: swapping versions means swapping these objects."""

    version: int
    model: Any  # a transformers causal LM in eval mode (for an adapter version: its base's)
    tokenizer: Any
    eos_token_ids: frozenset[int]
    max_context: int  # positions the model can attend to (prompt + completion)
    base: SharedBase | None = None  # the weights it runs on, shared with the adapter versions over them
    adapter: str | None = None  # an adapter version's adapter name in base.peft; None: the base's own weights

    @classmethod
    def of(cls, version: int, model, tokenizer, *, base: SharedBase | None = None,
           adapter: str | None = None) -> "LoadedVersion":
        return cls(version, model, tokenizer, eos_token_ids(model, tokenizer), model.config.max_position_embeddings,
                   base, adapter)

    @property
    def fingerprint(self) -> str:
        """What `system_fingerprint` says: the one version that produced a response."""
        return f"policy-v{self.version}"

    @cached_property
    def token_bytes(self) -> TokenBytes:
        """Token id -> its bytes and text, for the API's log-probs (service/detokenizer.py)."""
        return TokenBytes(self.tokenizer)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                                       tokenize=True, return_dict=False))

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                cache: DynamicCache) -> tuple[torch.Tensor, DynamicCache]:
        """The one way the engine runs the model: (B, Q) ids, (B, T + Q) mask over the cache's T columns
        and the new ones (None: no padding anywhere), (B, Q) positions -> (B, V) logits of the last
        position, and the grown cache."""
        # this version's weights on: its adapter, or for the base version of a model that carries
        # adapters, none of them (the engine thread alone runs forwards)
        with lora.running(self.base.peft if self.base is not None else None, self.adapter):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :], out.cache
