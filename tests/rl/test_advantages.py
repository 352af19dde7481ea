"""Tests for nemo_rlhf.rl.advantages: GAE and per-token rewards against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from nemo_rlhf.rl import compute_gae, per_token_rewards

GAMMA, LAM = 0.9, 0.8  # gamma * lam = 0.72


def test_gae_single_row_by_hand():
    rewards = torch.tensor([[1.0, -0.5, 2.0]])
    values = torch.tensor([[0.5, 1.0, -1.0]])
    # delta_2 = 2.0 + 0.9*0      - (-1.0) =  3.0   (episode ends: no bootstrap)
    # delta_1 = -0.5 + 0.9*(-1.0) - 1.0   = -2.4
    # delta_0 = 1.0 + 0.9*1.0    - 0.5    =  1.4
    # A_2 = 3.0;  A_1 = -2.4 + 0.72*3.0 = -0.24;  A_0 = 1.4 + 0.72*(-0.24) = 1.2272
    adv, ret = compute_gae(rewards, values, torch.ones(1, 3), GAMMA, LAM)
    torch.testing.assert_close(adv, torch.tensor([[1.2272, -0.24, 3.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.7272, 0.76, 2.0]]))  # A + V
    assert adv.dtype == ret.dtype == torch.float32
    assert not adv.requires_grad


def test_gae_rows_of_different_lengths_and_empty_row():
    nan = float("nan")
    rewards = torch.tensor([[1.0, -0.5, 2.0, 100.0], [0.5, 1.0, nan, 7.0], [3.0, 3.0, 3.0, 3.0]])
    values = torch.tensor([[0.5, 1.0, -1.0, 50.0], [0.2, 0.4, 9.0, float("inf")], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    adv, ret = compute_gae(rewards, values, mask, GAMMA, LAM)
    # row 1: delta_1 = 1.0 - 0.4 = 0.6; delta_0 = 0.5 + 0.9*0.4 - 0.2 = 0.66
    #        A_1 = 0.6; A_0 = 0.66 + 0.72*0.6 = 1.092; returns = A + V = 1.292, 1.0
    expected_adv = torch.tensor([[1.2272, -0.24, 3.0, 0.0], [1.092, 0.6, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    expected_ret = torch.tensor([[1.7272, 0.76, 2.0, 0.0], [1.292, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected_adv)
    torch.testing.assert_close(ret, expected_ret)


def test_gae_limits_lambda_one_and_zero():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    # lam = 1: A_t = sum_l gamma^l r_{t+l} - V_t (Monte-Carlo return minus baseline)
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=1.0)
    for b, n in enumerate([5, 3]):
        for t in range(n):
            mc = sum(0.9**l * rewards[b, t + l].item() for l in range(n - t))
            assert adv[b, t].item() == pytest.approx(mc - values[b, t].item(), abs=1e-5)
            assert ret[b, t].item() == pytest.approx(mc, abs=1e-5)
    # lam = 0: A_t = delta_t (one-step TD error)
    adv0, _ = compute_gae(rewards, values, mask, gamma=0.9, lam=0.0)
    assert adv0[1, 2].item() == pytest.approx(rewards[1, 2].item() - values[1, 2].item())  # last token
    assert adv0[1, 1].item() == pytest.approx((rewards[1, 1] + 0.9 * values[1, 2] - values[1, 1]).item())


def test_gae_leading_padding_and_dtypes():
    # Valid run may start after position 0 (e.g. prompt positions masked out).
    rewards = torch.tensor([[5.0, 1.0, -0.5, 2.0]])
    values = torch.tensor([[5.0, 0.5, 1.0, -1.0]])
    adv, ret = compute_gae(rewards, values, torch.tensor([[0, 1, 1, 1]]), GAMMA, LAM)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 1.2272, -0.24, 3.0]]))
    for dtype, out_dtype in [(torch.bfloat16, torch.float32), (torch.float64, torch.float64)]:
        adv, _ = compute_gae(rewards.to(dtype), values.to(dtype), torch.tensor([[0, 1, 1, 1]]), GAMMA, LAM)
        assert adv.dtype == out_dtype
        expected = torch.tensor([1.2272, -0.24, 3.0], dtype=out_dtype)
        torch.testing.assert_close(adv[0, 1:], expected, atol=2e-2, rtol=0)


def test_gae_errors():
    r = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="rows \\[1\\] have gaps"):
        compute_gae(r, r, torch.tensor([[1, 1, 0], [1, 0, 1]]), GAMMA, LAM)
    with pytest.raises(ValueError, match="gamma must be in"):
        compute_gae(r, r, torch.ones(2, 3), 1.5, LAM)
    with pytest.raises(ValueError, match="lam must be in"):
        compute_gae(r, r, torch.ones(2, 3), GAMMA, -0.1)
    with pytest.raises(ValueError, match="rewards and values must have the same shape"):
        compute_gae(r, torch.zeros(2, 4), torch.ones(2, 3), GAMMA, LAM)
    with pytest.raises(ValueError, match="rewards must be \\[B, T\\]"):
        compute_gae(torch.zeros(3), torch.zeros(3), torch.ones(3), GAMMA, LAM)


def test_per_token_rewards_by_hand():
    scores = torch.tensor([2.0, -1.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, -0.4, 9.9]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = per_token_rewards(scores, kl, mask, kl_coef=0.5)
    # row 0: -0.5*[0.1, 0.2, 0.3] + [0, 0, 2.0]  -> [-0.05, -0.1, 1.85]
    # row 1: -0.5*[0.5, -0.4] + [0, -1.0], pad 0 -> [-0.25, -0.8, 0]
    torch.testing.assert_close(out, torch.tensor([[-0.05, -0.1, 1.85], [-0.25, -0.8, 0.0]]))
    # kl_coef = 0: only the score at the last valid token
    out = per_token_rewards(scores, kl, mask, 0.0)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 2.0], [0.0, -1.0, 0.0]]))


def test_per_token_rewards_errors():
    kl = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="rows \\[1\\] have no valid token"):
        per_token_rewards(torch.zeros(2), kl, torch.tensor([[1, 0, 0], [0, 0, 0]]), 0.1)
    with pytest.raises(ValueError, match="scores must be \\[B\\]"):
        per_token_rewards(torch.zeros(3), kl, torch.ones(2, 3), 0.1)
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        per_token_rewards(torch.zeros(2), kl, torch.ones(2, 3), -0.1)
