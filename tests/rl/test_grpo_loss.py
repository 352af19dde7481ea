"""Tests for nemo_rlhf.rl.losses.grpo_policy_loss and aggregate_loss (GRPO / Dr.GRPO / DAPO)."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_rlhf.rl import LOSS_AGGREGATIONS, aggregate_loss, grpo_policy_loss, ppo_policy_loss

# Same tokens as tests/rl/test_losses.py: five valid tokens + one padded token with garbage.
RATIOS = [1.5, 1.5, 0.5, 0.5, 1.1]
ADVANTAGES = torch.tensor([[1.0, -1.0, 2.0, -2.0, 1.0, 1e30]])
OLD_LOGPROBS = torch.full((1, 6), -1.0)
MASK = torch.tensor([[1, 1, 1, 1, 1, 0]])


def _logprobs() -> torch.Tensor:
    return torch.tensor([[math.log(r) - 1.0 for r in RATIOS] + [50.0]], requires_grad=True)


def test_grpo_policy_loss_per_token_by_hand():
    # eps = 0.2: -min(r A, clip(r, 0.8, 1.2) A) per token (see test_losses.py), 0 at padding
    lp = _logprobs()
    per_token, stats = grpo_policy_loss(lp, OLD_LOGPROBS, ADVANTAGES, MASK, clip_eps_low=0.2)
    torch.testing.assert_close(per_token, torch.tensor([[-1.2, 1.5, -1.0, 1.6, -1.1, 0.0]]))
    assert stats["clipfrac"].item() == pytest.approx(0.4)
    assert stats["clip_high_frac"].item() == pytest.approx(0.2)  # r = 1.5 > 1.2 with A > 0
    assert stats["clip_low_frac"].item() == pytest.approx(0.2)  # r = 0.5 < 0.8 with A < 0
    assert stats["ratio_mean"].item() == pytest.approx(5.1 / 5)
    assert "kl" not in stats
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())
    # token_mean of it is the PPO loss (-0.04), with the same gradient
    loss = aggregate_loss(per_token, MASK, "token_mean")
    assert loss.item() == pytest.approx(-0.04, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 0.3, -0.2, 0.0, -0.22, 0.0]]))


def test_grpo_policy_loss_asymmetric_clip_and_sequence_advantages():
    # clip range [0.8, 1.28]: token 0 becomes -1.28
    per_token, stats = grpo_policy_loss(
        _logprobs(), OLD_LOGPROBS, ADVANTAGES, MASK, clip_eps_low=0.2, clip_eps_high=0.28
    )
    assert per_token[0, 0].item() == pytest.approx(-1.28)
    assert stats["clip_high_frac"].item() == pytest.approx(0.2)
    # a [B] sequence advantage equals the same value on every token
    adv = torch.tensor([0.7, -0.3])
    lp = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    old = lp + 0.2
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    a, _ = grpo_policy_loss(lp, old, adv, mask)
    b, _ = grpo_policy_loss(lp, old, adv.unsqueeze(1).expand(2, 4), mask)
    torch.testing.assert_close(a, b)


def test_grpo_policy_loss_k3_kl_term():
    lp = _logprobs()
    ref = torch.tensor([[-1.0, -0.5, -2.0, -1.0, -1.0, float("nan")]])  # NaN at padding is ignored
    beta = 0.1
    per_token, stats = grpo_policy_loss(lp, OLD_LOGPROBS, ADVANTAGES, MASK, beta=beta, ref_logprobs=ref)
    d = ref[0, :5] - lp.detach()[0, :5]
    k3 = torch.exp(d) - d - 1  # DeepSeekMath eq. 4 / Schulman's k3
    assert (k3 >= 0).all()
    surrogate = torch.tensor([-1.2, 1.5, -1.0, 1.6, -1.1])
    torch.testing.assert_close(per_token[0, :5], surrogate + beta * k3)
    assert per_token[0, 5] == 0
    assert stats["kl"].item() == pytest.approx(k3.mean().item(), rel=1e-5)
    # d/dlp of beta * k3 = beta * (1 - exp(ref - lp)); clipped tokens keep only the KL gradient
    per_token.sum().backward()
    r = torch.tensor(RATIOS)
    surr_grad = torch.tensor([0.0, 1.0, -1.0, 0.0, -1.0]) * r * ADVANTAGES[0, :5].abs()
    expected = surr_grad + beta * (1 - torch.exp(d))
    torch.testing.assert_close(lp.grad[0, :5], expected)
    assert lp.grad[0, 5] == 0
    # beta = 0 with a reference: no KL in the loss, but reported
    per_token0, stats0 = grpo_policy_loss(lp, OLD_LOGPROBS, ADVANTAGES, MASK, beta=0.0, ref_logprobs=ref)
    torch.testing.assert_close(per_token0[0, :5], surrogate)
    assert "kl" in stats0


def test_grpo_policy_loss_errors_and_dtypes():
    with pytest.raises(ValueError, match="ref_logprobs is required when beta > 0"):
        grpo_policy_loss(_logprobs(), OLD_LOGPROBS, ADVANTAGES, MASK, beta=0.1)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        grpo_policy_loss(_logprobs(), OLD_LOGPROBS, ADVANTAGES, MASK, beta=-0.1)
    with pytest.raises(ValueError, match="clip_eps_low must be in"):
        grpo_policy_loss(_logprobs(), OLD_LOGPROBS, ADVANTAGES, MASK, clip_eps_low=0.0)
    with pytest.raises(ValueError, match="clip_eps_high must be > 0"):
        grpo_policy_loss(_logprobs(), OLD_LOGPROBS, ADVANTAGES, MASK, clip_eps_high=0.0)
    with pytest.raises(ValueError, match=r"must be \[B\] or \[B, T\]"):
        grpo_policy_loss(_logprobs(), OLD_LOGPROBS, torch.zeros(3), MASK)
    with pytest.raises(ValueError, match="ref_logprobs and mask must have the same shape"):
        grpo_policy_loss(_logprobs(), OLD_LOGPROBS, ADVANTAGES, MASK, beta=0.1, ref_logprobs=torch.zeros(1, 5))
    with pytest.raises(TypeError, match="advantages must be a floating-point tensor"):
        grpo_policy_loss(_logprobs(), OLD_LOGPROBS, torch.ones(1, 6, dtype=torch.long), MASK)
    lp = _logprobs().detach().bfloat16().requires_grad_(True)
    per_token, _ = grpo_policy_loss(lp, OLD_LOGPROBS.bfloat16(), ADVANTAGES.bfloat16(), MASK)
    assert per_token.dtype == torch.float32
    aggregate_loss(per_token, MASK, "seq_mean_token_mean").backward()
    assert lp.grad.dtype == torch.bfloat16 and torch.isfinite(lp.grad).all()


def test_aggregate_loss_modes_by_hand():
    inf = float("inf")
    loss = torch.tensor([[1.0, 2.0, 3.0, inf], [4.0, inf, inf, inf], [9.0, 9.0, 9.0, 9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # row 2 is empty
    # token_mean: (1+2+3+4)/4; seq_mean_token_mean: (2 + 4)/2 over the 2 non-empty rows;
    # seq_mean_token_sum: (6 + 4)/2; seq_mean_token_sum_norm: 10 / (B=3 * max_len=5)
    expected = {
        "token_mean": 2.5,
        "seq_mean_token_mean": 3.0,
        "seq_mean_token_sum": 5.0,
        "seq_mean_token_sum_norm": 10.0 / 15.0,
    }
    assert set(expected) == set(LOSS_AGGREGATIONS)
    for mode, value in expected.items():
        out = aggregate_loss(loss, mask, mode, max_len=5)
        assert out.dim() == 0 and out.item() == pytest.approx(value), mode
    # gradients: the weight of each valid token
    grads = {
        "token_mean": [[0.25, 0.25, 0.25, 0.0], [0.25, 0.0, 0.0, 0.0]],
        "seq_mean_token_mean": [[1 / 6, 1 / 6, 1 / 6, 0.0], [0.5, 0.0, 0.0, 0.0]],
        "seq_mean_token_sum": [[0.5, 0.5, 0.5, 0.0], [0.5, 0.0, 0.0, 0.0]],
        "seq_mean_token_sum_norm": [[1 / 15, 1 / 15, 1 / 15, 0.0], [1 / 15, 0.0, 0.0, 0.0]],
    }
    for mode, g in grads.items():
        loss.grad = None
        aggregate_loss(loss, mask, mode, max_len=5).backward()
        torch.testing.assert_close(loss.grad, torch.tensor(g + [[0.0] * 4]), msg=mode)


def test_aggregate_loss_errors():
    loss, mask = torch.ones(2, 3), torch.tensor([[1, 1, 1], [1, 0, 0]])
    with pytest.raises(ValueError, match="loss aggregation mode must be one of"):
        aggregate_loss(loss, mask, "mean")
    with pytest.raises(ValueError, match="max_len must be an int >= 1"):
        aggregate_loss(loss, mask, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="max_len must be an int >= 1"):
        aggregate_loss(loss, mask, "seq_mean_token_sum_norm", max_len=0)
    with pytest.raises(ValueError, match=r"max_len=2 is shorter than a response in the batch \(3 valid tokens\)"):
        aggregate_loss(loss, mask, "seq_mean_token_sum_norm", max_len=2)
    with pytest.raises(ValueError, match="mask selects no element"):
        aggregate_loss(loss, torch.zeros(2, 3), "seq_mean_token_mean")
    with pytest.raises(ValueError, match=r"per_token_loss must be \[B, T\]"):
        aggregate_loss(torch.ones(3), torch.ones(3), "token_mean")
    with pytest.raises(ValueError, match="per_token_loss and mask must have the same shape"):
        aggregate_loss(loss, torch.ones(2, 4), "token_mean")


def test_grpo_token_mean_equals_ppo_policy_loss():
    g = torch.Generator().manual_seed(1)
    lp = torch.randn(3, 5, generator=g)
    old = lp + 0.3 * torch.randn(3, 5, generator=g)
    adv = torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    ppo, ppo_stats = ppo_policy_loss(lp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.3)
    per_token, stats = grpo_policy_loss(lp, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.3)
    torch.testing.assert_close(aggregate_loss(per_token, mask, "token_mean"), ppo)
    torch.testing.assert_close(stats["clipfrac"], ppo_stats["clipfrac"])
