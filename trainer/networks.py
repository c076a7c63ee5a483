"""The networks a round uses, laid out one of two ways (TrainConfig.adapter):

             current (LATEST)   candidate (trained)     reference             reward model backbone
    full     its own weights    a deep copy of current  its own weights       its own weights
    lora     adapter 'current'  adapter 'candidate'     the base, adapters    adapter 'reward'
                                                        off
             ... in lora mode all four sit on ONE frozen base, the reference version, in a peft PeftModel.

A `Net` is one of them, called like the Hugging Face model (`net(input_ids=..., ...)`); it
switches its own adapter on around the call, so the round never touches adapters. Sharing
the base is sound because it never trains in lora mode: the reference is exactly the base,
the reward model is the base with its own adapter and head, and the value head reads the
candidate's hidden states (in full mode it shares the policy's backbone the same way). The
reward model does not share the policy's weights in full mode: training it would move them.

A full-weight version is a `save_pretrained` checkpoint; a LoRA version is the adapter in
peft's format (`adapter_model.safetensors` + `adapter_config.json`) whose manifest names its
base (rlhf/policy_store.py). Full mode can start from a LoRA LATEST (merged into full
weights); lora mode needs LATEST to be the base or an adapter over it.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from rlhf.contracts import Settings
from rlhf.models import load_causal_lm, resolve_device
from rlhf.policy_store import PolicyStore
from trainer.config import TrainConfig

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


@dataclass(eq=False)
class Net:
    """One network of the round: `module` called with `adapter` switched on (lora), or as it is (full)."""

    module: torch.nn.Module  # what a call runs: the causal LM, or the reward model's backbone body
    peft: torch.nn.Module | None = None  # lora: the PeftModel holding every adapter
    adapter: str | None = None  # lora: the adapter on during the call; None = all adapters off (the base)

    def __call__(self, **kwargs):
        with self.active():
            return self.module(**kwargs)

    @contextmanager
    def active(self):
        if self.peft is None:
            yield
        elif self.adapter is None:
            with self.peft.disable_adapter():
                yield
        else:
            if self.peft.active_adapter != self.adapter:
                self.peft.set_adapter(self.adapter)  # also makes it the one that requires grad
            yield

    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """What training this network changes: every weight (full), or its adapter's (lora)."""
        if self.peft is None:
            return list(self.module.named_parameters())
        tag = f".{self.adapter}."
        return [(n, p) for n, p in self.peft.named_parameters() if tag in n]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named_trainable()]

    def train(self, mode: bool = True) -> "Net":
        self.module.train(mode)
        return self

    def eval(self) -> "Net":
        return self.train(False)

    @property
    def training(self) -> bool:
        return self.module.training

    @property
    def config(self):
        return self.module.config

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device


class RewardModel:
    """A backbone (`Net` over the base model's body) + a scalar head on the last real token.

    input_ids, attention_mask (B, T), any padding side -> scores (B,) fp32.
    """

    def __init__(self, body: Net, head: torch.nn.Linear):
        self.body, self.head = body, head

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from trainer.policy import position_ids

        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask.long(),
                           position_ids=position_ids(attention_mask)).last_hidden_state  # (B, T, H)
        T = input_ids.shape[1]
        last = (attention_mask.long() * torch.arange(T, device=input_ids.device)).argmax(-1)  # (B,)
        h = hidden[torch.arange(len(last), device=last.device), last]  # (B, H)
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.body.parameters(), *self.head.parameters()]

    def train(self, mode: bool = True) -> "RewardModel":
        self.body.train(mode)
        self.head.train(mode)
        return self

    def eval(self) -> "RewardModel":
        return self.train(False)

    @property
    def training(self) -> bool:
        return self.head.training

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"body.{n}": p for n, p in self.body.named_trainable()},
                **{f"head.{k}": v for k, v in self.head.state_dict().items()}}

    def save(self, path: Path) -> None:
        """safetensors, written to a temp file and renamed over the old one."""
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp))
        tmp.replace(path)

    def load(self, path: Path) -> bool:
        """Last round's weights, if they fit this layout (False, and a log line, if not: e.g. full -> lora)."""
        saved = load_file(path)
        mine = self.state_dict()
        if set(saved) != set(mine) or any(saved[k].shape != mine[k].shape for k in mine):
            log.warning("%s does not fit this reward model's layout; it starts afresh", path)
            return False
        with torch.no_grad():
            for k, v in mine.items():
                v.copy_(saved[k])
        return True


@dataclass
class Networks:
    layout: Literal["full", "lora"]
    current: Net
    reference: Net
    reward: RewardModel
    base_version: int  # lora: the version the adapters apply to (the reference); full: the reference too
    settings: Settings

    # ------------------------------------------------------------------ building

    @classmethod
    def open(cls, settings: Settings, store: PolicyStore, train: TrainConfig, layout: Literal["full", "lora"],
             current_version: int, reference_version: int) -> "Networks":
        if store.manifest(reference_version).base_version is not None:
            raise ValueError(f"the reference, version {reference_version}, is a LoRA adapter; it must be full weights")
        build = _open_lora if layout == "lora" else _open_full
        nets = build(settings, store, train, reference_version)
        nets.follow(store, current_version)
        return nets

    # ------------------------------------------------------------------ per round

    def new_candidate(self) -> Net:
        """The round's candidate, starting equal to the current policy, in train mode."""
        if self.layout == "full":  # fp32 master weights (autocast does bf16 on CUDA)
            return Net(copy.deepcopy(self.current.module).float().requires_grad_(True)).train()
        cand = Net(self.current.module, self.current.peft, "candidate")
        _copy_adapter(self.current.peft, "current", "candidate")
        return cand.train()

    def promote(self, candidate: Net) -> None:
        """The candidate becomes the current policy (after it is published)."""
        if self.layout == "full":
            self.current = candidate.eval()
        else:
            _copy_adapter(self.current.peft, "candidate", "current")

    def save(self, net: Net, tokenizer, d: Path) -> None:
        """Write `net` as a policy version's files: a checkpoint (full) or an adapter (lora)."""
        if self.layout == "full":
            net.module.save_pretrained(d, safe_serialization=True)
            tokenizer.save_pretrained(d)
            return
        from peft import get_peft_model_state_dict

        weights = get_peft_model_state_dict(net.peft, adapter_name=net.adapter)
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(d / ADAPTER_WEIGHTS))
        net.peft.peft_config[net.adapter].save_pretrained(str(d))  # adapter_config.json
        extra = d / net.adapter  # (peft writes non-default adapters' configs into a subfolder)
        if extra.is_dir():
            (extra / ADAPTER_CONFIG).replace(d / ADAPTER_CONFIG)
            extra.rmdir()

    def follow(self, store: PolicyStore, version: int) -> None:
        """Make `version` (LATEST, verified by the caller) the current policy."""
        manifest = store.manifest(version)
        if self.layout == "full":  # current is frozen: each round trains a copy of it
            self.current = self.reference if version == self.base_version else Net(
                load_full(store, version, self.settings).requires_grad_(False))
            return
        if version == self.base_version:
            _reset_adapter(self.current.peft, "current")
        elif manifest.base_version == self.base_version:
            _load_adapter(self.current.peft, "current", store.path(version))
        else:
            raise ValueError(
                f"LATEST (version {version}) is {'full weights' if manifest.base_version is None else 'an adapter over version ' + str(manifest.base_version)}, "
                f"not an adapter over the reference, version {self.base_version}: LoRA training needs its base to be "
                f"the reference. Train full weights (train.adapter=full), or make it the reference "
                f"(ppo.reference_version={version}) if it is full weights.")


# ---------------------------------------------------------------------------- layouts


def load_full(store: PolicyStore, version: int, settings: Settings) -> torch.nn.Module:
    """A version as a plain causal LM (dropout off): a checkpoint as it is, an adapter merged into its base."""
    base_version = store.manifest(version).base_version
    if base_version is None:
        return without_dropout(load_causal_lm(store.path(version), settings)[0])
    from peft import PeftModel

    base = load_causal_lm(store.path(base_version), settings)[0]
    return without_dropout(PeftModel.from_pretrained(base, str(store.path(version))).merge_and_unload())


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Every dropout off (GPT-2 has 0.1 in three places). PPO's ratio pi/pi_old must be exactly 1 before
    the first step and the gate compares policies on the same noise; TRL's PPO and reward trainers
    disable dropout for the same reasons."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _open_full(settings: Settings, store: PolicyStore, train: TrainConfig, reference_version: int) -> Networks:
    from transformers import AutoModel

    reference = load_full(store, reference_version, settings).requires_grad_(False)
    device = resolve_device(settings)
    body = without_dropout(AutoModel.from_pretrained(store.path(reference_version), dtype=torch.float32,
                                                     use_safetensors=True))
    ref = Net(reference)
    return Networks("full", current=ref, reference=ref, reward=_reward_model(Net(body.to(device)), body.config),
                    base_version=reference_version, settings=settings)


def _open_lora(settings: Settings, store: PolicyStore, train: TrainConfig, reference_version: int) -> Networks:
    from peft import get_peft_model

    base = load_full(store, reference_version, settings)  # bf16 on CUDA: frozen, adapters stay fp32
    base.requires_grad_(False)
    cfg = _lora_config(train)
    peft = get_peft_model(base, cfg, adapter_name="current")
    peft.add_adapter("candidate", copy.deepcopy(cfg))
    peft.add_adapter("reward", copy.deepcopy(cfg))
    body = peft.get_base_model().base_model  # the decoder body (LlamaModel, GPT2Model, ...) with adapters injected
    return Networks("lora", current=Net(peft, peft, "current"), reference=Net(peft, peft, None),
                    reward=_reward_model(Net(body, peft, "reward"), base.config),
                    base_version=reference_version, settings=settings)


def _lora_config(train: TrainConfig):
    from peft import LoraConfig

    targets = train.lora_target_modules
    return LoraConfig(r=train.lora_rank, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout,
                      target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
                      bias="none", task_type="CAUSAL_LM")


def _reward_model(body: Net, config) -> RewardModel:
    head = torch.nn.Linear(config.hidden_size, 1, device=body.device)
    torch.nn.init.zeros_(head.weight)  # the first round starts from score 0 for everything
    torch.nn.init.zeros_(head.bias)
    return RewardModel(body, head)


def _adapter_params(peft, adapter: str) -> dict[str, torch.nn.Parameter]:
    """name with the adapter's name taken out -> parameter, for one adapter."""
    tag = f".{adapter}."
    return {n.replace(tag, "."): p for n, p in peft.named_parameters() if tag in n}


@torch.no_grad()
def _copy_adapter(peft, src: str, dst: str) -> None:
    to = _adapter_params(peft, dst)
    for name, p in _adapter_params(peft, src).items():
        to[name].copy_(p)


@torch.no_grad()
def _reset_adapter(peft, adapter: str) -> None:
    """The adapter as the identity: LoRA's B matrices zero (peft's own initialisation)."""
    for name, p in _adapter_params(peft, adapter).items():
        if ".lora_B." in name:
            p.zero_()


def _load_adapter(peft, adapter: str, version_dir: Path) -> None:
    """A stored adapter's weights into `adapter`; its shape (rank, target modules) must match the trainer's."""
    from peft import LoraConfig, set_peft_model_state_dict

    stored = LoraConfig.from_pretrained(str(version_dir))
    mine = peft.peft_config[adapter]
    if (stored.r, set(stored.target_modules or [])) != (mine.r, set(mine.target_modules or [])):
        raise ValueError(f"{version_dir} is a rank-{stored.r} adapter on {sorted(stored.target_modules)}; the trainer "
                         f"is configured for rank {mine.r} on {sorted(mine.target_modules)} (train.lora_*)")
    weights = load_file(version_dir / ADAPTER_WEIGHTS, device=str(next(peft.parameters()).device))
    result = set_peft_model_state_dict(peft, weights, adapter_name=adapter)
    missing = [k for k in result.missing_keys if f".{adapter}." in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{version_dir}: adapter weights do not fit (missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]})")
