"""The other algorithms' objectives against numbers worked out by hand (trainer/objectives.py)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_loop.trainer.objectives import dpo_loss, grpo_advantages, kto_loss, kto_reference_point, rloo_advantages


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_grpo_advantage_is_the_score_in_units_of_its_groups_spread():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = grpo_advantages(scores, group=4)
    # group 1: mean 0.5, unbiased std sqrt(4 x 0.25 / 3) = 0.57735; group 2: all alike -> 0
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert adv.tolist() == pytest.approx([expected, -expected, -expected, expected, 0, 0, 0, 0], abs=1e-6)


def test_rloo_advantage_leaves_the_answer_itself_out_of_its_baseline():
    adv = rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), group=4)
    # baselines: (2+3+6)/3, (1+3+6)/3, (1+2+6)/3, (1+2+3)/3
    assert adv.tolist() == pytest.approx([1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2], abs=1e-6)


def test_kto_loss_by_hand():
    logratio = torch.tensor([1.0, -0.5])
    loss = kto_loss(logratio, torch.tensor([True, False]), torch.tensor([1.0, 2.0]), torch.tensor(0.2), beta=0.5)
    up = 1 - sigmoid(0.5 * (1.0 - 0.2))  # desirable: 1 - sigmoid(beta (r - z0))
    down = 1 - sigmoid(0.5 * (0.2 - (-0.5)))  # undesirable: 1 - sigmoid(beta (z0 - r))
    assert loss.item() == pytest.approx((1 * up + 2 * down) / 3, rel=1e-6)
    weighted = kto_loss(logratio, torch.tensor([True, False]), torch.tensor([1.0, 2.0]), torch.tensor(0.2), beta=0.5,
                        desirable_weight=2.0, undesirable_weight=0.5, weight_total=6.0)
    assert weighted.item() == pytest.approx((1 * 2 * up + 2 * 0.5 * down) / 6, rel=1e-6)


def test_kto_reference_point_is_the_mismatched_mean_floored_at_zero_without_gradient():
    x = torch.tensor([0.2, 0.6], requires_grad=True)
    z0 = kto_reference_point(x)
    assert z0.item() == pytest.approx(0.4) and not z0.requires_grad
    assert kto_reference_point(torch.tensor([-1.0, 0.4])).item() == 0.0


def test_dpo_loss_by_hand():
    loss = dpo_loss(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.5]), beta=0.1)
    # -log sigmoid(0.1 x 2) and -log sigmoid(0.1 x -0.5), averaged
    assert loss.item() == pytest.approx((math.log1p(math.exp(-0.2)) + math.log1p(math.exp(0.05))) / 2, rel=1e-6)
    assert dpo_loss(torch.tensor([1.0]), torch.tensor([-1.0]), beta=0.1, pair_total=4).item() == pytest.approx(
        math.log1p(math.exp(-0.2)) / 4, rel=1e-6)
