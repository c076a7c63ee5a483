"""The networks a round uses, laid out one of two ways (TrainConfig.adapter):

             policy (LATEST, trained in place)   reference                  reward model backbone
    full     its own weights                     its own weights (frozen)   its own weights
    lora     adapter 'policy'                    the base, adapters off     adapter 'reward'
             ... in lora mode all three sit on ONE frozen base, the reference version, in a peft PeftModel.

The policy trains in place: a round takes a `snapshot()` of what will train (the policy's
weights or its adapter, and the value head) before PPO, and `restore()`s it if the gate
rejects the candidate, so no second copy of the policy is ever held on the device (the gate
evaluates the current policy before it trains, trainer/round.py).

A `Net` is a network called like the Hugging Face model (`net(input_ids=..., ...)`); it
switches its own adapter on around the call, so the round never touches adapters. Sharing
the base is sound because it never trains in lora mode: the reference is exactly the base,
the reward model is the base with its own adapter and head, and the value head reads the
policy's hidden states (in full mode it shares the policy's backbone the same way). In full
mode the reward model has its own weights: training it would otherwise move the policy.

What trains is an nn.Module each (`PolicyWithValue`, `RewardModel`), so that DDP or FSDP2
(trainer/dist.py) can wrap it. A full-weight version is a `save_pretrained` checkpoint; a LoRA
version is the adapter in peft's format (core/lora.py) whose manifest names its base
(core/policy_store.py). Full mode can start from a LoRA LATEST
(merged into full weights); lora mode needs LATEST to be the base or an adapter over it.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from rlhf_loop.core import lora
from rlhf_loop.core.contracts import Settings
from rlhf_loop.core.models import NO_HUB_KERNELS, load_causal_lm, resolve_device
from rlhf_loop.core.policy_store import PolicyStore
from rlhf_loop.trainer.config import RewardConfig, TrainConfig
from rlhf_loop.trainer.dist import Dist

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Net:
    """`module` called with `adapter` switched on (lora), or as it is (full)."""

    module: torch.nn.Module  # what a call runs: the causal LM, or the reward model's backbone body
    peft: torch.nn.Module | None = None  # lora: the PeftModel holding every adapter
    adapter: str | None = None  # lora: the adapter on during the call; None = all adapters off (the base)

    def __call__(self, **kwargs):
        with self.active():
            return self.module(**kwargs)

    def active(self):
        return lora.running(self.peft, self.adapter, trainable=True)

    def named_trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """What training this network changes: every weight (full), or its adapter's (lora)."""
        if self.peft is None:
            return list(self.module.named_parameters())
        tag = f".{self.adapter}."
        return [(n, p) for n, p in self.peft.named_parameters() if tag in n]

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


class PolicyWithValue(torch.nn.Module):
    """What an algorithm trains: the policy and (PPO) its value head, one module for DDP / FSDP2 to wrap."""

    def __init__(self, policy: Net, value_head: torch.nn.Linear | None):
        super().__init__()
        self.lm, self.value_head = policy.module, value_head  # registered: the wrappers see their parameters
        self.policy = policy  # not a module attribute of ours (a Net): switches the adapter around calls

    def forward(self, query, query_mask, response, response_mask, *, temperature: float):
        """(B, P) query and (B, R) response -> trainer.rollout.Forward (log-probs, entropy, values)."""
        from rlhf_loop.trainer.rollout import forward

        return forward(self.policy, query, query_mask, response, response_mask, temperature=temperature,
                       value_head=self.value_head)

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        head = [] if self.value_head is None else self.value_head.named_parameters()
        return [*self.policy.named_trainable(), *(("value_head." + n, p) for n, p in head)]


class RewardModel(torch.nn.Module):
    """A backbone (`Net` over the base model's body) + a scalar head on the last real token.

    input_ids, attention_mask (B, T), any padding side -> scores (B,) fp32.
    """

    def __init__(self, body: Net, head: torch.nn.Linear):
        super().__init__()
        self.backbone, self.head = body.module, head  # registered for DDP / FSDP2
        self.body = body

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(the response mask is FeatureRewardModel's: this model reads the last real token)"""
        from rlhf_loop.trainer.rollout import position_ids

        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask.long(),
                           position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state  # (B, T, H)
        T = input_ids.shape[1]
        last = (attention_mask.long() * torch.arange(T, device=input_ids.device)).argmax(-1)  # (B,)
        h = hidden[torch.arange(len(last), device=last.device), last]  # (B, H)
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [*self.body.named_trainable(), *(("head." + n, p) for n, p in self.head.named_parameters())]

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def save(self, path: Path | None) -> None:
        """safetensors (what trains: body or its adapter, and the head), written to a temp file and renamed.
        With FSDP2 every rank calls this (the shards are gathered); the others pass None."""
        save_atomic(full_tensors(self.trainable()), path)

    def load(self, saved: dict[str, torch.Tensor]) -> bool:
        """Last round's weights, if they fit this layout (False, and a log line, if not: e.g. full -> lora)."""
        mine = dict(self.trainable())
        if set(saved) != set(mine) or any(saved[k].shape != mine[k].shape for k in mine):  # (a DTensor: global shape)
            log.warning("the saved reward model does not fit this layout (full vs lora?); it starts afresh")
            return False
        _load_into(mine, saved)
        return True


class FeatureRewardModel(torch.nn.Module):
    """reward.backbone=frozen: a small head over the frozen base's hidden states of an answer's tokens.

    The features are the hidden states after decoder layer `layer` of the reference (the base with
    adapters off, which never trains), one H-vector per answer token. Standardised (`shift`, `scale`:
    per feature, over the training tokens), they are read two ways:

        z_t   = (h_t - shift) / scale                       # (T, H), the answer's tokens
        score = max_t (w . z_t) + v . [mean_t z_t, max_t z_t] + b

    The max term lets one phrase anywhere in the answer decide its score, which a pooled read alone
    blurs (users like or dislike answers for a word, a sign-off, a refusal); the pooled term reads the
    answer as a whole. On SmolLM2's answers and the cheerful taste, AUROC against the taste 0.98 with
    the max term, 0.80 pooled only (docs/trainer.md, "A real model on a CPU"). Since the body never
    changes, a labelled answer's token states are computed once and kept (trainer/reward_model.py,
    FeatureCache): a round runs the body over its new labels only and fits the head on all of them.
    Scoring a new answer (a rollout, the gate) is one forward through the body.

    input_ids, attention_mask, response_mask (B, T) -> scores (B,) fp32.
    """

    def __init__(self, body: Net, layer: int, hidden_size: int):
        super().__init__()
        self.body, self.layer = body, layer
        self.token = torch.nn.Linear(hidden_size, 1, bias=False, device=body.device)  # w
        self.pooled = torch.nn.Linear(2 * hidden_size, 1, device=body.device)  # v, b
        for p in self.head_parameters():
            torch.nn.init.zeros_(p)  # score 0 for everything until the first round
        self.register_buffer("shift", torch.zeros(hidden_size, device=body.device))
        self.register_buffer("scale", torch.ones(hidden_size, device=body.device))

    def head_parameters(self) -> list[torch.Tensor]:
        return [self.token.weight, self.pooled.weight, self.pooled.bias]

    @torch.no_grad()
    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 response_mask: torch.Tensor) -> list[torch.Tensor]:
        """(B, T) left-padded conversations and their responses' tokens -> B tensors (T_i, H): each
        response's token states, in the body's dtype (what it computed: bf16 on a bf16 body)."""
        hidden = self.hidden(input_ids, attention_mask)  # (B, T, H)
        return [h[m] for h, m in zip(hidden, response_mask.bool())]

    def standardise(self, states: torch.Tensor) -> torch.Tensor:
        """(..., H) token states -> z, fp32."""
        return (states.to(self.shift.device, torch.float32) - self.shift) / self.scale

    @staticmethod
    def pool(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, T, H) standardised states, (N, T) mask -> (N, 2H): their mean and max over each answer."""
        m = mask[..., None]
        mean = (z * m).sum(1) / m.sum(1).clamp(min=1)
        peak = z.masked_fill(~m, float("-inf")).amax(1)
        return torch.cat([mean, peak.clamp(min=-1e4)], -1)  # (an empty answer's max is -inf: kept finite)

    def head_scores(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, T, H) token states (padded) and (N, T) which are real -> (N,) fp32 scores."""
        mask = mask.to(self.shift.device).bool()
        z = self.standardise(states)
        return self.scores(z, mask, self.pool(z, mask))

    def scores(self, z: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """head_scores from standardised states and their pool (fitting computes those once)."""
        per_token = self.token(z).squeeze(-1).masked_fill(~mask, -1e4)  # (N, T)
        return (per_token.amax(1) + self.pooled(pooled).squeeze(-1)).float()

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, H): the hidden states after decoder layer `layer`, as the model's
        `output_hidden_states[layer]`. The layers above it are not run (the forward stops as that
        layer returns): on SmolLM2's 8th layer of 30, a quarter of the body's cost, for every label and every
        answer scored. The last layer (whose hidden states some models return normed) and FSDP2's
        sharded bodies (whose forward is a collective with hooks around it) run the whole forward."""
        from rlhf_loop.trainer.rollout import position_ids

        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask.long(),
                      position_ids=position_ids(attention_mask), use_cache=False, logits_to_keep=1)
        layers = _decoder_layers(self.body.module)
        if layers is None or self.layer >= len(layers) or _sharded(self.body.module):
            return self.body(**kwargs, output_hidden_states=True).hidden_states[self.layer]

        def stop(module, args, output):
            raise _Reached(output[0] if isinstance(output, tuple) else output)

        handle = layers[self.layer - 1].register_forward_hook(stop)
        try:
            self.body(**kwargs)
        except _Reached as reached:
            return reached.hidden
        finally:
            handle.remove()
        raise RuntimeError(f"decoder layer {self.layer} never ran")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_mask: torch.Tensor) -> torch.Tensor:
        return self.head_scores(self.hidden(input_ids, attention_mask), response_mask)  # (hidden: no grad)

    def trainable(self) -> list[tuple[str, torch.Tensor]]:
        """What a round sets: the head and its standardisation (saved and loaded like RewardModel's)."""
        return [("token.weight", self.token.weight), ("pooled.weight", self.pooled.weight),
                ("pooled.bias", self.pooled.bias), ("shift", self.shift), ("scale", self.scale)]

    @property
    def device(self) -> torch.device:
        return self.token.weight.device

    def save(self, path: Path | None) -> None:
        save_atomic(full_tensors(self.trainable()), path)

    def load(self, saved: dict[str, torch.Tensor]) -> bool:
        mine = dict(self.trainable())
        if set(saved) != set(mine) or any(saved[k].shape != mine[k].shape for k in mine):
            log.warning("the saved reward model is not a frozen-feature head of this model; it starts afresh")
            return False
        _load_into(mine, saved)
        return True


@dataclass
class Networks:
    layout: Literal["full", "lora"]
    policy: Net  # the current policy (LATEST) at a round's start; the candidate while it trains
    reference: Net
    reward: RewardModel | FeatureRewardModel  # reward.backbone: tuned | frozen
    base_version: int  # lora: the version the adapters apply to (the reference); full: the reference too
    settings: Settings

    # ------------------------------------------------------------------ building

    @classmethod
    def open(cls, settings: Settings, store: PolicyStore, train: TrainConfig, reward: RewardConfig,
             layout: Literal["full", "lora"], current_version: int, reference_version: int,
             dist: Dist = Dist()) -> "Networks":
        if store.manifest(reference_version).base_version is not None:
            raise ValueError(f"the reference, version {reference_version}, is a LoRA adapter; it must be full weights")
        torch.manual_seed(0)  # fresh heads and adapters start equal on every rank (no initial broadcast)
        nets = (_open_lora if layout == "lora" else _open_full)(settings, store, train, reward, reference_version, dist)
        if current_version != reference_version:  # the policy starts as the reference (a copy, or a zero adapter)
            nets.follow(store, current_version)
        return nets

    # ------------------------------------------------------------------ per round

    def snapshot(self, *modules: torch.nn.Module) -> dict[str, torch.Tensor]:
        """What the round will train (the policy's weights or adapter, and `modules`), copied to CPU
        (this rank's shards with FSDP2)."""
        return {n: _local(p).detach().to("cpu", copy=True) for n, p in self._trained(modules)}

    @torch.no_grad()
    def restore(self, snapshot: dict[str, torch.Tensor], *modules: torch.nn.Module) -> None:
        """Back to a snapshot: the gate rejected the candidate (or the round was aborted)."""
        for n, p in self._trained(modules):
            _local(p).copy_(snapshot[n])

    @torch.no_grad()
    def interpolate(self, start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float,
                    *modules: torch.nn.Module) -> None:
        """A candidate's update scaled back to `alpha` of itself, in the weights the model computes with:
        W_start + alpha (W_end - W_start). Full weights (and the value head): exactly that, parameter
        by parameter. LoRA: what a layer adds is s B A (s = lora_alpha / r), so the fraction is of the
        adapter's delta B1 A1 - B0 A0 (the round started from the current adapter, B0 A0), which
        scaling A and B each by alpha does not give: (B0 + a dB)(A0 + a dA) has a term in alpha^2.
        `lora_fraction` says what is written instead, and when it is exact."""
        params = dict(self._trained(modules))
        pairs = {n: _lora_b_name(n) for n in params if _lora_b_name(n) != n}  # A's name -> B's, per adapted layer
        paired = set(pairs) | set(pairs.values())
        for n, p in params.items():
            if n not in paired:
                _local(p).copy_(start[n] + alpha * (end[n] - start[n]))
        for a, b in pairs.items():
            whole = {n: (_whole(start[n], params[n]), _whole(end[n], params[n])) for n in (a, b)}
            B, A = lora_fraction(whole[b][0], whole[a][0], whole[b][1], whole[a][1], alpha)
            _load_into({a: params[a], b: params[b]}, {a: A, b: B})

    def _trained(self, modules) -> list[tuple[str, torch.nn.Parameter]]:
        return [*self.policy.named_trainable(),
                *((f"{i}.{n}", p) for i, m in enumerate(modules) for n, p in m.named_parameters())]

    def gather(self) -> dict[str, torch.Tensor]:
        """The policy's weights (full) or adapter weights (lora, in peft's key format), whole, on CPU.
        With FSDP2 every rank must call this: the shards are gathered (on rank 0)."""
        if self.layout == "full":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            module = self.policy.module
            state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            # tied weights (lm_head = embeddings) come back as two tensors after a gather; keep the one
            # named_parameters names, as save_pretrained does for a tied model
            keep = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
            return {k: v for k, v in state.items() if k in keep}
        return lora.saved_names(full_tensors(self.policy.named_trainable()), self.policy.adapter)

    def write(self, weights: dict[str, torch.Tensor], tokenizer, d: Path) -> None:
        """A version's files from `gather()`'s weights: a checkpoint (full) or a peft adapter (lora)."""
        if self.layout == "full":
            self.policy.module.save_pretrained(d, state_dict=weights, safe_serialization=True)
            tokenizer.save_pretrained(d)
            return
        lora.write_adapter(d, self.policy.peft.peft_config[self.policy.adapter], weights)

    def follow(self, store: PolicyStore, version: int) -> None:
        """Make `version` (verified by the caller) the policy: its weights into the policy's module or adapter."""
        manifest = store.manifest(version)
        if self.layout == "full":
            weights = load_full(store, version, self.settings).state_dict()
            _load_into(dict(self.policy.module.named_parameters()), weights)
            return
        if version == self.base_version:
            _reset_adapter(self.policy.peft, self.policy.adapter)
        elif manifest.base_version == self.base_version:
            _load_adapter(self.policy.peft, self.policy.adapter, store.path(version))
        else:
            raise ValueError(
                f"LATEST (version {version}) is {'full weights' if manifest.base_version is None else 'an adapter over version ' + str(manifest.base_version)}, "
                f"not an adapter over the reference, version {self.base_version}: LoRA training needs its base to be "
                f"the reference. Train full weights (train.adapter=full), or make it the reference "
                f"(ppo.reference_version={version}) if it is full weights.")


def lora_fraction(B0: torch.Tensor, A0: torch.Tensor, B1: torch.Tensor, A1: torch.Tensor,
                  alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (B, A) whose product is B0 A0 + alpha (B1 A1 - B0 A0), or its nearest at rank r.

    B0, B1: (out, r), A0, A1: (r, in) -> B (out, r), A (r, in), in B0's dtype. The target is
    T = (1 - alpha) B0 A0 + alpha B1 A1 = U V with U = [sqrt(1 - alpha) B0, sqrt(alpha) B1] (out, 2r) and
    V = [sqrt(1 - alpha) A0; sqrt(alpha) A1] (2r, in), so it has rank up to 2r, more than a rank-r
    adapter holds. Through U = Qu Ru, V^T = Qv Rv (QR) and the SVD of the (2r, 2r) core Ru Rv^T, the
    rank-r truncation of T is formed without T itself (float64): the best rank-r approximation of T
    (Eckart-Young: Frobenius error sqrt(sum of its discarded singular values^2)), and T exactly when
    its rank is at most r: a round that started from the zero adapter (B0 = 0: every round from the
    base, or back on it after a rollback), or one that moved only B or only A. The factors come out
    balanced (B = Q_u U_r S^1/2, A = S^1/2 V_r^T Q_v^T), not as B and A stood: the function is the
    product, and the next round starts its own optimizer anyway.
    """
    r = A0.shape[0]
    u, v = (1 - alpha) ** 0.5, alpha ** 0.5
    U = torch.cat([u * B0.double(), v * B1.double()], dim=1)  # (out, 2r)
    V = torch.cat([u * A0.double(), v * A1.double()], dim=0)  # (2r, in)
    Qu, Ru = torch.linalg.qr(U)
    Qv, Rv = torch.linalg.qr(V.T)
    Um, S, Vh = torch.linalg.svd(Ru @ Rv.T)
    root = S[:r].sqrt()
    B = Qu @ (Um[:, :r] * root)
    A = (root[:, None] * Vh[:r]) @ Qv.T
    return B.to(B0.dtype), A.to(A0.dtype)


def _lora_b_name(name: str) -> str:
    """A LoRA A matrix's name -> its B's (peft: lora_A / lora_B, lora_embedding_A / _B); other names as they are."""
    return re.sub(r"\.lora_(embedding_)?A\.", r".lora_\1B.", name)


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


def _open_full(settings: Settings, store: PolicyStore, train: TrainConfig, reward: RewardConfig,
               reference_version: int, dist: Dist) -> Networks:
    from transformers import AutoModel

    reference = load_full(store, reference_version, settings).requires_grad_(False)
    policy = copy.deepcopy(reference).float().requires_grad_(True)  # fp32 master weights; autocast does bf16
    trained = [policy]
    if reward.backbone == "tuned":  # its own body: training it would otherwise move the policy
        body = without_dropout(AutoModel.from_pretrained(store.path(reference_version), dtype=torch.float32,
                                                         use_safetensors=True, **NO_HUB_KERNELS)).to(resolve_device(settings))
        trained.append(body)
    if train.gradient_checkpointing:
        for model in trained:
            _checkpoint_activations(model)
    for model in (reference, *trained):
        dist.shard_model(model)
    rm = (_reward_model(Net(body), body.config, dist) if reward.backbone == "tuned"
          else _feature_reward_model(Net(reference), reference.config, reward, dist))
    return Networks("full", policy=Net(policy), reference=Net(reference), reward=rm, base_version=reference_version,
                    settings=settings)


def _open_lora(settings: Settings, store: PolicyStore, train: TrainConfig, reward: RewardConfig,
               reference_version: int, dist: Dist) -> Networks:
    from peft import get_peft_model

    base = load_full(store, reference_version, settings)  # bf16 on CUDA: frozen; the adapters stay fp32
    base.requires_grad_(False)
    if train.gradient_checkpointing:
        _checkpoint_activations(base)  # the policy's and the reward model's passes both run through it
    cfg = _lora_config(train, base)
    peft = get_peft_model(base, cfg, adapter_name="policy")
    if reward.backbone == "tuned":
        peft.add_adapter("reward", copy.deepcopy(cfg))
    dist.shard_model(peft)
    if reward.backbone == "tuned":
        body = peft.get_base_model().base_model  # the decoder body (LlamaModel, GPT2Model, ...) with adapters injected
        rm = _reward_model(Net(body, peft, "reward"), base.config, dist)
    else:
        rm = _feature_reward_model(Net(peft, peft, None), base.config, reward, dist)
    return Networks("lora", policy=Net(peft, peft, "policy"), reference=Net(peft, peft, None), reward=rm,
                    base_version=reference_version, settings=settings)


def _checkpoint_activations(model) -> None:
    """train.gradient_checkpointing: transformers recomputes each decoder layer in the backward pass
    (only while the model is in training mode, so sampling keeps its KV cache). Non-reentrant, so a
    frozen base with trainable adapters needs no inputs that require grad."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        log.warning("%s does not support gradient checkpointing; training keeps every layer's activations",
                    type(model).__name__)
        return
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers' newer name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _lora_config(train: TrainConfig, base: torch.nn.Module):
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    targets = train.lora_target_modules
    # GPT-2's projections are transformers' Conv1D, whose weight is (in, out): peft must be told, or it
    # corrects the setting itself with a warning on every start
    transposed = any(isinstance(m, Conv1D) for m in base.modules())
    return LoraConfig(r=train.lora_rank, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout,
                      target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
                      fan_in_fan_out=transposed, bias="none", task_type="CAUSAL_LM")


def _reward_model(body: Net, config, dist: Dist) -> RewardModel:
    head = torch.nn.Linear(config.hidden_size, 1, device=body.device)
    torch.nn.init.zeros_(head.weight)  # the first round starts from score 0 for everything
    torch.nn.init.zeros_(head.bias)
    dist.shard_model(head)
    return RewardModel(body, head)


class _Reached(Exception):
    """FeatureRewardModel.hidden: the layer it reads has run; carries its output."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's decoder layers, in order (model.layers, transformer.h, ...: the ModuleList with one
    entry per hidden layer), or None when no one list is that."""
    n = model.config.get_text_config(decoder=True).num_hidden_layers
    found = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    return found[0] if len(found) == 1 else None


def _sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _feature_reward_model(reference: Net, config, reward: RewardConfig, dist: Dist) -> FeatureRewardModel:
    """reward.backbone=frozen over the reference; the features' layer is reward.feature_layer (0: a quarter of
    the way up, rounded up: SmolLM2's 8th of 30, which read the cheerful taste at AUROC 0.98 against 0.90 for
    the 3rd and 0.89 for the 15th, docs/trainer.md)."""
    layers = config.get_text_config(decoder=True).num_hidden_layers
    # the head is not sharded (FSDP2): it is tiny, and every rank fits the same one on the same features
    return FeatureRewardModel(reference, reward.feature_layer or max(1, -(-layers // 4)), config.hidden_size)


# ---------------------------------------------------------------------------- tensors (FSDP2 shards or plain)


def save_atomic(tensors: dict[str, torch.Tensor], path: Path | None) -> None:
    """safetensors to a temp file, renamed over `path` (None: nothing to write on this rank)."""
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: the local shard of an FSDP2 DTensor, or the tensor itself."""
    return p.to_local() if hasattr(p, "to_local") else p


def _whole(local: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of which `local` is this rank's part, shaped as parameter `p` (a collective for
    an FSDP2 DTensor: every rank calls), on CPU."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return local
    part = DTensor.from_local(local.to(p.device_mesh.device_type), p.device_mesh, p.placements, shape=p.shape,
                              stride=p.stride())
    return part.full_tensor().cpu()


def full_tensors(named) -> dict[str, torch.Tensor]:
    """name -> the whole tensor on CPU: FSDP2's DTensor shards are gathered (a collective: every rank calls)."""
    out = {}
    for n, p in named:
        t = p.detach()
        out[n] = (t.full_tensor() if hasattr(t, "full_tensor") else t).to("cpu", copy=True)
    return out


@torch.no_grad()
def _load_into(params: dict[str, torch.nn.Parameter], weights: dict[str, torch.Tensor]) -> None:
    """Whole tensors into parameters (a DTensor takes its own shard of each)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, p in params.items():
        src = weights[name].to(p.dtype)
        if isinstance(p, DTensor):
            src = distribute_tensor(src.to(p.device_mesh.device_type), p.device_mesh, p.placements)
            p.to_local().copy_(src.to_local())
        else:
            p.copy_(src.to(p.device))


@torch.no_grad()
def _reset_adapter(peft, adapter: str) -> None:
    """The adapter as the identity: LoRA's B matrices zero (peft's own initialisation)."""
    for name, p in peft.named_parameters():
        if f".{adapter}." in name and ".lora_B." in name:
            p.zero_()


def _load_adapter(peft, adapter: str, version_dir: Path) -> None:
    """A stored adapter's weights into `adapter`; its shape (rank, target modules) must match the trainer's."""
    stored, weights = lora.read_adapter(version_dir)
    mine = peft.peft_config[adapter]
    if (stored.r, set(stored.target_modules or [])) != (mine.r, set(mine.target_modules or [])):
        raise ValueError(f"{version_dir} is a rank-{stored.r} adapter on {sorted(stored.target_modules)}; the trainer "
                         f"is configured for rank {mine.r} on {sorted(mine.target_modules)} (train.lora_*)")
    params = lora.saved_names(dict(peft.named_parameters()), adapter)  # saved name -> parameter
    if set(params) != set(weights):
        raise ValueError(f"{version_dir}: adapter weights do not fit (missing {sorted(set(params) - set(weights))[:3]}, "
                         f"unexpected {sorted(set(weights) - set(params))[:3]})")
    _load_into(params, weights)
