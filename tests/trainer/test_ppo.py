"""PPO maths against numbers worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_loop.trainer.ppo import (
    KLController, Rollout, gae, kl_per_token, masked_mean, masked_whiten, policy_loss, token_rewards, value_loss,
)


def t(x, **kw):
    return torch.tensor(x, dtype=torch.float32, **kw)


def test_masked_mean_ignores_masked_positions():
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert masked_mean(x, mask).item() == pytest.approx(7.0 / 3.0)  # (1 + 2 + 4) / 3


def test_masked_whiten_uses_unbiased_variance_over_the_mask():
    x = t([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    # mean 2, unbiased var ((1 - 2)^2 + 0 + (3 - 2)^2) / (3 - 1) = 1 -> (x - 2) / 1; padding -> 0
    torch.testing.assert_close(masked_whiten(x, mask), t([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    # shift_mean=False only rescales: the mean 2 stays
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), t([[1.0, 2.0, 3.0, 0.0]]), atol=1e-6, rtol=0)


def test_gae_by_hand():
    rewards = t([[0.0, 0.0, 1.0]])
    values = t([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # delta_2 = 1 + 0 - 0.7 = 0.3                      A_2 = 0.3
    # delta_1 = 0 + 0.7 - 0.6 = 0.1                    A_1 = 0.1 + 0.5 * 0.3  = 0.25
    # delta_0 = 0 + 0.6 - 0.5 = 0.1                    A_0 = 0.1 + 0.5 * 0.25 = 0.225
    torch.testing.assert_close(adv, t([[0.225, 0.25, 0.3]]))
    torch.testing.assert_close(ret, t([[0.725, 0.85, 1.0]]))  # A + V


def test_gae_discounts_and_stops_at_padding():
    rewards = t([[0.0, 2.0, 0.0], [1.0, 9.0, 9.0]])
    values = t([[1.0, 1.0, 0.0], [0.2, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: delta_1 = 2 + 0.9 * 0 - 1 = 1 (V after the last token is 0)     A_1 = 1
    #        delta_0 = 0 + 0.9 * 1 - 1 = -0.1      A_0 = -0.1 + 0.9 * 0.8 * 1 = 0.62
    # row 1: one token: A_0 = 1 - 0.2 = 0.8; the padding's rewards and values are ignored
    torch.testing.assert_close(adv, t([[0.62, 1.0, 0.0], [0.8, 0.0, 0.0]]))
    torch.testing.assert_close(ret, t([[1.62, 2.0, 0.0], [1.0, 0.0, 0.0]]))


def test_token_rewards_put_the_clipped_score_on_the_last_token():
    scores = t([2.0, -20.0])
    kl = t([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    r = token_rewards(scores, kl, mask, kl_coef=0.5, reward_clip=10.0)
    # row 0: -0.5 * [0.1, 0.2] and + 2 on token 1; token 2 is padding
    # row 1: -0.5 * 0.5 each, and clip(-20) = -10 on token 2
    torch.testing.assert_close(r, t([[-0.05, 1.9, 0.0], [-0.25, -0.25, -10.25]]))


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(t([[1.5, 0.5, 1.1]])).requires_grad_()  # ratios 1.5, 0.5, 1.1
    adv = t([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, stats = policy_loss(logp, old, adv, mask, clip_range=0.2)
    # token 0: max(-1 * 1.5, -1 * 1.2) = -1.2   (clip active: the ratio is held at 1.2)
    # token 1: max(-1 * 0.5, -1 * 0.8) = -0.5   (below 1 - eps with A > 0: no clip, gradient flows)
    # token 2: max(2 * 1.1, 2 * 1.1)   =  2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    expected_kl = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 3
    assert stats["approx_kl"].item() == pytest.approx(expected_kl, rel=1e-5)
    loss.backward()
    # d/dlogp of -A * ratio / 3 = -A * ratio / 3 where unclipped, 0 where the clip is active
    torch.testing.assert_close(logp.grad, t([[0.0, -0.5 / 3, 2.2 / 3]]))


def test_clipped_value_loss_by_hand():
    values = t([[1.0, 0.4]])
    old = t([[0.5, 0.5]])
    returns = t([[2.0, 0.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, clipfrac = value_loss(values, old, returns, mask, clip_range=0.2)
    # token 0: unclipped (1 - 2)^2 = 1, clipped (0.7 - 2)^2 = 1.69 -> 1.69 (clip active)
    # token 1: |0.4 - 0.5| < 0.2, both (0.4 - 0)^2 = 0.16
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.16) / 2, rel=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)


def test_adaptive_kl_controller_by_hand():
    ctl = KLController(value=0.2, target=4.0, horizon=500.0)
    # kl 6: error clip(6 / 4 - 1 = 0.5) = 0.2 -> beta * (1 + 0.2 * 64 / 500) = 0.2 * 1.0256
    assert ctl.update(6.0, 64) == pytest.approx(0.20512)
    # kl 3: error -0.25 -> clipped -0.2 -> * (1 - 0.2 * 50 / 500) = * 0.98
    assert ctl.update(3.0, 50) == pytest.approx(0.20512 * 0.98)
    # kl 4.4: error 0.1 -> * (1 + 0.1 * 100 / 500) = * 1.02
    assert ctl.update(4.4, 100) == pytest.approx(0.20512 * 0.98 * 1.02)
    fixed = KLController(value=0.05, target=None, horizon=500.0)
    assert fixed.update(100.0, 64) == 0.05


def test_kl_estimators_are_wired_to_the_kernels():
    logp = torch.log(t([[0.5, 0.25]])).requires_grad_()
    ref = torch.log(t([[0.25, 0.5]]))
    ln2 = math.log(2.0)
    torch.testing.assert_close(kl_per_token("k1", logp, ref), t([[ln2, -ln2]]))  # log p - log q
    torch.testing.assert_close(kl_per_token("k2", logp, ref), t([[0.5 * ln2**2, 0.5 * ln2**2]]))
    # k3 = exp(r) - r - 1 with r = log q - log p = [-ln2, ln2]: [0.5 + ln2 - 1, 2 - ln2 - 1]
    torch.testing.assert_close(kl_per_token("k3", logp, ref), t([[ln2 - 0.5, 1.0 - ln2]]))
    kl_per_token("k1", logp, ref).sum().backward()
    torch.testing.assert_close(logp.grad, t([[1.0, 1.0]]))  # differentiable w.r.t. log p
    # exact: p = softmax([ln 3, 0]) = [0.75, 0.25], q = softmax([0, 0]) = [0.5, 0.5]
    # KL = 0.75 ln(0.75 / 0.5) + 0.25 ln(0.25 / 0.5)
    logits = t([[[math.log(3.0), 0.0]]]).requires_grad_()
    full = kl_per_token("full", logp[:, :1], ref[:, :1], logits, torch.zeros(1, 1, 2))
    assert full.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-5)
    full.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_rollout_select_takes_the_same_rows_of_every_tensor():
    B, R = 3, 2
    tensors = [torch.arange(B * R).view(B, R) + 100 * i for i in range(12)]
    ro = Rollout(*tensors[:9], torch.arange(B).float(), *tensors[9:])
    sub = ro.select(torch.tensor([2, 0]))
    assert sub.scores.tolist() == [2.0, 0.0]
    assert sub.query.tolist() == [[4, 5], [0, 1]]
    assert sub.returns.tolist() == (tensors[11][[2, 0]]).tolist()
