"""Tests for nemo_rlhf.rl.losses: PPO actor/critic losses, Bradley-Terry loss, SFT NLL."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_rlhf.rl import bradley_terry_loss, clipped_value_loss, masked_token_nll, ppo_policy_loss

# Five valid tokens + one padded token whose log-prob is garbage (ratio exp(51) would overflow
# the surrogate if it were not masked out before any arithmetic).
RATIOS = [1.5, 1.5, 0.5, 0.5, 1.1]
ADVANTAGES = torch.tensor([[1.0, -1.0, 2.0, -2.0, 1.0, 1e30]])
OLD_LOGPROBS = torch.full((1, 6), -1.0)
MASK = torch.tensor([[1, 1, 1, 1, 1, 0]])


def _logprobs() -> torch.Tensor:
    return torch.tensor([[math.log(r) - 1.0 for r in RATIOS] + [50.0]], requires_grad=True)


def test_ppo_policy_loss_branches_and_clipfrac():
    # eps = 0.2, clip range [0.8, 1.2]:
    #   r=1.5, A=+1: min(1.5, 1.2)   =  1.2  clipped (no gradient)
    #   r=1.5, A=-1: min(-1.5, -1.2) = -1.5  unclipped
    #   r=0.5, A=+2: min(1.0, 1.6)   =  1.0  unclipped
    #   r=0.5, A=-2: min(-1.0, -1.6) = -1.6  clipped (no gradient)
    #   r=1.1, A=+1: inside range    =  1.1  unclipped
    # loss = -(1.2 - 1.5 + 1.0 - 1.6 + 1.1) / 5 = -0.04; clipfrac = 2/5
    lp = _logprobs()
    loss, stats = ppo_policy_loss(lp, OLD_LOGPROBS, ADVANTAGES, MASK, clip_eps=0.2)
    assert loss.item() == pytest.approx(-0.04, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.4)
    assert stats["ratio_mean"].item() == pytest.approx(5.1 / 5)
    lr = [math.log(r) for r in RATIOS]
    assert stats["approx_kl"].item() == pytest.approx(0.5 * sum(x * x for x in lr) / 5, rel=1e-5)
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())

    loss.backward()
    # d loss / d logprob_t = -(1/5) * r_t * A_t on unclipped tokens, 0 on clipped and padded ones
    expected = torch.tensor([[0.0, 0.3, -0.2, 0.0, -0.22, 0.0]])
    torch.testing.assert_close(lp.grad, expected)


def test_ppo_policy_loss_asymmetric_clip():
    # clip range [0.8, 1.28]: token 0 becomes 1.28 instead of 1.2 -> loss = -(0.28) / 5
    loss, stats = ppo_policy_loss(
        _logprobs(), OLD_LOGPROBS, ADVANTAGES, MASK, clip_eps=0.2, clip_eps_high=0.28
    )
    assert loss.item() == pytest.approx(-0.056, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.4)
    # with a wide upper range (2.0) token 0 is no longer clipped
    _, stats = ppo_policy_loss(_logprobs(), OLD_LOGPROBS, ADVANTAGES, MASK, clip_eps=0.2, clip_eps_high=1.0)
    assert stats["clipfrac"].item() == pytest.approx(0.2)


def test_ppo_policy_loss_bf16_and_errors():
    lp = _logprobs().detach().to(torch.bfloat16).requires_grad_(True)
    loss, _ = ppo_policy_loss(lp, OLD_LOGPROBS.bfloat16(), ADVANTAGES.bfloat16(), MASK)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(-0.04, abs=1e-2)
    loss.backward()
    assert lp.grad.dtype == torch.bfloat16 and torch.isfinite(lp.grad).all()
    with pytest.raises(ValueError, match="clip_eps must be in"):
        ppo_policy_loss(_logprobs(), OLD_LOGPROBS, ADVANTAGES, MASK, clip_eps=1.0)
    with pytest.raises(ValueError, match="advantages and mask must have the same shape"):
        ppo_policy_loss(_logprobs(), OLD_LOGPROBS, ADVANTAGES[:, :5], MASK)
    with pytest.raises(ValueError, match="no element"):
        ppo_policy_loss(_logprobs(), OLD_LOGPROBS, ADVANTAGES, torch.zeros_like(MASK))


def test_clipped_value_loss_by_hand():
    # eps = 0.2; V_clip = V_old + clip(V - V_old, -0.2, 0.2)
    #   V=1.0, V_old=0.5, R=1.0: V_clip=0.7, (V-R)^2=0,   (V_clip-R)^2=0.09 -> 0.09 clipped
    #   V=0.6, V_old=0.5, R=2.0: V_clip=0.6, 1.96,         1.96            -> 1.96
    #   V=0.0, V_old=0.5, R=-1 : V_clip=0.3, 1.0,          1.69            -> 1.69 clipped
    #   V=2.0, V_old=0.5, R=0.0: V_clip=0.7, 4.0,          0.49            -> 4.0
    # loss = 0.5 * (0.09 + 1.96 + 1.69 + 4.0) / 4 = 0.9675; vf_clipfrac = 2/4
    values = torch.tensor([[1.0, 0.6, 0.0, 2.0, float("nan")]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.0]])
    ret = torch.tensor([[1.0, 2.0, -1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    loss, stats = clipped_value_loss(values, old, ret, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.9675, abs=1e-6)
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    # d/dV of 0.5 * mean: (V - R) / 4 on unclipped tokens, 0 on clipped (V_clip is constant there)
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -0.35, 0.0, 0.5, 0.0]]))

    # no clipping: 0.5 * (0 + 1.96 + 1 + 4) / 4 = 0.87
    for eps in (None, 0.0):
        loss, stats = clipped_value_loss(values, old, ret, mask, clip_eps=eps)
        assert loss.item() == pytest.approx(0.87, abs=1e-6)
        assert stats["vf_clipfrac"].item() == 0.0


def test_bradley_terry_loss_by_hand():
    rc = torch.tensor([2.0, 0.0, -1.0])
    rr = torch.tensor([1.0, 0.0, 0.5])  # margins d = 1, 0 (tie), -1.5
    loss, acc = bradley_terry_loss(rc, rr)
    expected = sum(math.log(1 + math.exp(-d)) for d in (1.0, 0.0, -1.5)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert acc.item() == pytest.approx(1 / 3)  # the tie counts as wrong
    # numerically stable for large margins: log(1 + exp(-1000)) = 0, log(1 + exp(1000)) = 1000
    loss, acc = bradley_terry_loss(torch.tensor([1000.0, -1000.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx(500.0)
    assert acc.item() == 0.5
    rc = torch.tensor([2.0, 0.0], dtype=torch.bfloat16, requires_grad=True)
    loss, _ = bradley_terry_loss(rc, torch.tensor([1.0, 0.0], dtype=torch.bfloat16))
    loss.backward()
    # d/d r_c of -mean log sigmoid(d) = -(1 - sigmoid(d)) / 2
    expected = torch.tensor([-(1 - 1 / (1 + math.exp(-1))) / 2, -0.25])
    torch.testing.assert_close(rc.grad.float(), expected, atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match="rewards_chosen must be \\[B\\]"):
        bradley_terry_loss(torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))


def test_masked_token_nll():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, float("-inf"), 0.0]], requires_grad=True)
    loss_mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss = masked_token_nll(logprobs, loss_mask)
    assert loss.item() == pytest.approx(2.5)  # (1 + 2 + 3 + 4) / 4
    loss.backward()
    torch.testing.assert_close(logprobs.grad, -loss_mask.float() / 4)
    with pytest.raises(ValueError, match="logprobs and loss_mask must have the same shape"):
        masked_token_nll(logprobs, loss_mask[:, :2])
