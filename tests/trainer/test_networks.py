"""Scaling a candidate's update back (trainer/networks.py `interpolate`, the KL budget's step 2): the weights
the model computes with move by the stated fraction of the round's update.

Full weights: start + alpha (end - start), exactly. LoRA: a layer adds s B A, so the fraction must be of
the adapter's delta. Scaling A and B each (what the trainer did before issue 22) gives
(B0 + a dB)(A0 + a dA), whose dB dA term goes with alpha^2; `lora_fraction` gives B0 A0 + alpha (B1 A1 -
B0 A0) exactly when that has rank r or less (every round from the zero adapter) and its best rank-r
approximation otherwise, so never further from it than the old way.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_loop.core.contracts import Settings
from rlhf_loop.core.models import ensure_policy_store
from rlhf_loop.trainer.config import RewardConfig, TrainConfig
from rlhf_loop.trainer.networks import Networks, lora_fraction


def old_way(B0, A0, B1, A1, alpha):
    return (B0 + alpha * (B1 - B0)) @ (A0 + alpha * (A1 - A0))


def test_lora_fraction_by_hand():
    """From the zero adapter (B0 = 0) B went to [2, 0]^T and A from [1, 0] to [1, 1]: B1 A1 = [[2, 2], [0, 0]],
    half of it is [[1, 1], [0, 0]]. The old way: B = [1, 0]^T, A = [1, 0.5], product [[1, 0.5], [0, 0]]."""
    B0, A0, B1, A1 = torch.zeros(2, 1), torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0], [0.0]]), torch.tensor([[1.0, 1.0]])
    B, A = lora_fraction(B0, A0, B1, A1, 0.5)
    assert B.shape == (2, 1) and A.shape == (1, 2)
    torch.testing.assert_close(B @ A, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(old_way(B0, A0, B1, A1, 0.5), torch.tensor([[1.0, 0.5], [0.0, 0.0]]))


@pytest.mark.parametrize("alpha", [0.5, 0.25, 0.125])
def test_lora_fraction_on_a_135m_layer(alpha):
    """A llama-135m MLP projection's adapter shapes (1536 x 576, rank 8), float64 so the checks are exact."""
    g = torch.Generator().manual_seed(0)
    out, inp, r = 1536, 576, 8
    A0 = torch.randn(r, inp, generator=g, dtype=torch.float64) / inp ** 0.5  # peft's kaiming-uniform scale
    B1 = torch.randn(out, r, generator=g, dtype=torch.float64) * 1e-2
    A1 = A0 + torch.randn(r, inp, generator=g, dtype=torch.float64) * 3e-2
    # the first round: from the zero adapter the target has rank r, and it comes out exactly
    B, A = lora_fraction(torch.zeros(out, r, dtype=torch.float64), A0, B1, A1, alpha)
    torch.testing.assert_close(B @ A, alpha * (B1 @ A1), rtol=1e-10, atol=1e-12)
    old = old_way(torch.zeros(out, r, dtype=torch.float64), A0, B1, A1, alpha)
    assert (old - alpha * B1 @ A1).norm() > 1e-3 * (alpha * B1 @ A1).norm()  # the old way is off at first order
    # a round from a trained adapter: rank up to 2r; the best rank-r approximation (Eckart-Young)
    B0 = B1 + torch.randn(out, r, generator=g, dtype=torch.float64) * 1e-2
    target = (1 - alpha) * B0 @ A0 + alpha * B1 @ A1
    B, A = lora_fraction(B0, A0, B1, A1, alpha)
    discarded = torch.linalg.svdvals(target)[r:].square().sum().sqrt()
    assert (B @ A - target).norm().item() == pytest.approx(discarded.item(), rel=1e-6)
    assert (B @ A - target).norm() <= (old_way(B0, A0, B1, A1, alpha) - target).norm()
    # only B moved, or only A: rank r again, exact
    for b1, a1 in ((B1, A0), (B0, A1)):
        B, A = lora_fraction(B0, A0, b1, a1, alpha)
        torch.testing.assert_close(B @ A, (1 - alpha) * B0 @ A0 + alpha * b1 @ a1, rtol=1e-10, atol=1e-12)


def _deltas(nets: Networks) -> dict[str, torch.Tensor]:
    """Per adapted layer, the weight it adds (peft's own get_delta_weight: s B A, transposed as the layer needs)."""
    from peft.tuners.lora import LoraLayer

    return {name: m.get_delta_weight("policy").detach().clone() for name, m in nets.policy.peft.named_modules()
            if isinstance(m, LoraLayer) and "policy" in m.lora_A}


def _train(nets: Networks, steps: int, seed: int) -> None:
    """A few AdamW steps of the policy adapter on random tokens: A and B both move, as in a round."""
    torch.manual_seed(seed)
    params = [p for _, p in nets.policy.named_trainable()]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 1000, (4, 16))
    nets.policy.train()
    for _ in range(steps):
        loss = nets.policy(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    nets.policy.eval()


def test_scaling_back_a_lora_candidate_scales_its_weight_delta(tmp_path, random_model):
    """A real peft LoRA policy (llama, through from_pretrained) and a value head; the round's snapshots."""
    settings = Settings(state_dir=tmp_path / "state", model=random_model("llama-tiny"), device="cpu")
    store = ensure_policy_store(settings)
    nets = Networks.open(settings, store, TrainConfig(adapter="lora"), RewardConfig(), "lora", 0, 0)
    head = torch.nn.Linear(64, 1)

    # round 1, from the zero adapter: the candidate at 1/4 adds exactly 1/4 of what the trained one adds
    start = nets.snapshot(head)
    _train(nets, 5, seed=1)
    with torch.no_grad():
        head.weight.add_(1.0)
    end = nets.snapshot(head)
    trained = _deltas(nets)
    nets.interpolate(start, end, 0.25, head)
    for name, delta in _deltas(nets).items():
        torch.testing.assert_close(delta, 0.25 * trained[name], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(head.weight.detach(), start["0.weight"] + 0.25)  # the value head: linear

    # round 2, from that candidate (now B0 != 0): at 1/2, as close as rank r allows, never further than before
    start, before = nets.snapshot(head), _deltas(nets)
    _train(nets, 5, seed=2)
    end, after = nets.snapshot(head), _deltas(nets)
    nets.interpolate(start, end, 0.5, head)
    got = _deltas(nets)
    errors, old_errors = [], []
    for name in got:
        target = before[name] + 0.5 * (after[name] - before[name])
        errors.append((got[name] - target).norm() / (after[name] - before[name]).norm())
        a, b = name + ".lora_A.policy.weight", name + ".lora_B.policy.weight"
        scale = after[name].norm() / (end[b] @ end[a]).norm()  # s, and the layer's transpose, by ratio
        old = scale * old_way(start[b], start[a], end[b], end[a], 0.5)
        old_errors.append((old.reshape(target.shape) - target).norm() / (after[name] - before[name]).norm())
    assert max(errors) < 0.1, max(errors)
    assert all(e <= o * (1 + 1e-3) for e, o in zip(errors, old_errors)), (errors, old_errors)
    # what it costs in the policy's outputs: per-token KL from the exact target (the base weights moved by
    # the target delta, adapter off) to the candidate, and to the old way's candidate
    ids = torch.randint(0, 1000, (8, 32), generator=torch.Generator().manual_seed(3))
    targets = {n: before[n] + 0.5 * (after[n] - before[n]) for n in got}
    kl_new = _kl_to_exact(nets, ids, targets)
    nets.interpolate(start, end, 1.0, head)  # back to the end, then the old way by hand
    old = {n: (start[n] + 0.5 * (end[n] - start[n])) for n, _ in nets.policy.named_trainable()}
    nets.restore({**end, **old}, head)
    kl_old = _kl_to_exact(nets, ids, targets)
    print(f"\nround 2 at 1/2, as a share of the round's update: delta error {max(errors):.3f} (old way "
          f"{max(old_errors):.3f}); KL to the exact target per token {kl_new:.2e} (old way {kl_old:.2e})")


@torch.no_grad()
def _kl_to_exact(nets: Networks, ids: torch.Tensor, targets: dict[str, torch.Tensor]) -> float:
    """Mean per-token KL(exact || the policy as it is), the exact one being the base with `targets` added
    to its weights and the adapter off."""
    from peft.tuners.lora import LoraLayer

    logp = torch.log_softmax(nets.policy(input_ids=ids).logits.double(), -1)
    layers = {name: m for name, m in nets.policy.peft.named_modules() if isinstance(m, LoraLayer) and "policy" in m.lora_A}
    for name, m in layers.items():
        m.base_layer.weight.add_(targets[name])
    exact = torch.log_softmax(nets.reference(input_ids=ids).logits.double(), -1)
    for name, m in layers.items():
        m.base_layer.weight.sub_(targets[name])
    return (exact.exp() * (exact - logp)).sum(-1).mean().item()
