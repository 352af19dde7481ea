"""Tests for nemo_rlhf.rl.group: GRPO / Dr.GRPO, RLOO and REINFORCE++ advantages and the DAPO
helpers, against hand-computed values of the papers' equations."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_rlhf.rl import (
    broadcast_to_tokens,
    dynamic_sampling_mask,
    grpo_advantages,
    masked_whiten,
    overlong_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
)

# two groups of G = 4, laid out contiguously: [1, 0, 0, 1] and four identical rewards
SCORES = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])


def test_grpo_advantages_by_hand():
    # group 0: mean 0.5, sample std sqrt(4 * 0.25 / 3) = 1/sqrt(3): A = +-0.5 * sqrt(3)
    # group 1: all equal -> r - mean = 0, and eps keeps 0 / (0 + eps) = 0
    a = math.sqrt(3) / 2
    adv = grpo_advantages(SCORES, num_generations=4, eps=1e-12)
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]))
    assert adv.shape == (8,) and adv.dtype == torch.float32 and not adv.requires_grad
    # eps enters as std + eps
    adv = grpo_advantages(SCORES, num_generations=4, eps=0.1)
    assert adv[0].item() == pytest.approx(0.5 / (1 / math.sqrt(3) + 0.1))
    # Dr.GRPO: no std normalisation
    adv = grpo_advantages(SCORES, num_generations=4, scale_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]))
    # groups of 2: [1, 0] [0, 1] [2, 2] [2, 2]
    adv = grpo_advantages(SCORES, num_generations=2, scale_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]))


def test_group_statistics_stay_inside_groups():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(12, generator=g, dtype=torch.float64)
    perm = torch.tensor([2, 0, 1])  # permute whole groups of 4
    permuted = scores.view(3, 4)[perm].reshape(-1)
    for fn in (grpo_advantages, rloo_advantages):
        adv = fn(scores, 4)
        assert adv.dtype == torch.float64
        torch.testing.assert_close(fn(permuted, 4), adv.view(3, 4)[perm].reshape(-1))
        # each group's advantages sum to zero (mean baseline / leave-one-out baseline)
        torch.testing.assert_close(adv.view(3, 4).sum(dim=1), torch.zeros(3, dtype=torch.float64))
    # shifting one group's rewards does not change any advantage
    shifted = scores.clone()
    shifted[4:8] += 10.0
    torch.testing.assert_close(grpo_advantages(shifted, 4), grpo_advantages(scores, 4))


def test_rloo_advantages_by_hand():
    # G = 3, [1, 2, 6]: baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5
    scores = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])
    adv = rloo_advantages(scores, num_generations=3)
    torch.testing.assert_close(adv, torch.tensor([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0]))
    # = G / (G - 1) * (r - group mean)
    torch.testing.assert_close(adv, 1.5 * grpo_advantages(scores, 3, scale_by_std=False))


@pytest.mark.parametrize("fn", [grpo_advantages, rloo_advantages, dynamic_sampling_mask])
def test_group_input_errors(fn):
    with pytest.raises(ValueError, match="not a multiple of num_generations=3"):
        fn(SCORES, 3)
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        fn(SCORES, 1)
    with pytest.raises(TypeError, match="num_generations must be an int"):
        fn(SCORES, 2.0)
    with pytest.raises(ValueError, match=r"scores must be finite; non-finite values at indices \[1, 6\]"):
        fn(torch.tensor([0.0, float("nan"), 1.0, 1.0, 0.0, 0.0, float("inf"), 0.0]), 4)
    with pytest.raises(ValueError, match=r"scores must be \[B\]"):
        fn(SCORES.view(2, 4), 4)
    with pytest.raises(TypeError, match="scores must be a floating-point tensor"):
        fn(torch.tensor([1, 0, 0, 1]), 2)


def test_grpo_advantages_eps_error():
    with pytest.raises(ValueError, match="eps must be > 0 when scale_by_std"):
        grpo_advantages(SCORES, 4, eps=0.0)
    grpo_advantages(SCORES, 4, scale_by_std=False, eps=0.0)  # Dr.GRPO: eps unused


def test_broadcast_to_tokens():
    adv = torch.tensor([0.5, -2.0])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    out = broadcast_to_tokens(adv, mask)
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5, 0.0], [0.0, -2.0, -2.0]]))
    assert broadcast_to_tokens(adv.double(), mask.bool()).dtype == torch.float64
    with pytest.raises(ValueError, match=r"advantages must be \[B\] = \[2\]"):
        broadcast_to_tokens(torch.zeros(3), mask)
    with pytest.raises(ValueError, match=r"mask must be \[B, T\]"):
        broadcast_to_tokens(adv, torch.ones(2))


def test_reinforce_pp_advantages_by_hand():
    nan = float("nan")
    scores = torch.tensor([1.0, -1.0])
    kl = torch.tensor([[0.2, 0.4, 0.1], [0.3, 0.5, nan]])  # garbage past the end of row 1
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    beta = 0.5
    rewards, adv, ret = reinforce_pp_advantages(scores, kl, mask, kl_coef=beta, gamma=1.0)
    # r_t = -beta * kl_t, + score at the last valid token
    exp_rewards = torch.tensor([[-0.1, -0.2, -0.05 + 1.0], [-0.15, -0.25 - 1.0, 0.0]])
    torch.testing.assert_close(rewards, exp_rewards)
    # gamma = 1: G_t = score - beta * sum_{i >= t} kl_i (Hu 2025)
    exp_ret = torch.tensor(
        [[1.0 - 0.5 * 0.7, 1.0 - 0.5 * 0.5, 1.0 - 0.5 * 0.1], [-1.0 - 0.5 * 0.8, -1.0 - 0.5 * 0.5, 0.0]]
    )
    torch.testing.assert_close(ret, exp_ret)
    # whitened over the 5 valid tokens of the batch (population variance, eps 1e-8)
    valid = exp_ret[mask.bool()]
    mean, var = valid.mean(), valid.var(unbiased=False)
    exp_adv = torch.where(mask.bool(), (exp_ret - mean) / torch.sqrt(var + 1e-8), torch.zeros(()))
    torch.testing.assert_close(adv, exp_adv)
    assert adv[mask.bool()].mean().abs() < 1e-6
    assert adv[1, 2] == 0 and ret[1, 2] == 0
    # discount: G_t = r_t + gamma * G_{t+1}
    _, adv_g, ret_g = reinforce_pp_advantages(scores, kl, mask, kl_coef=beta, gamma=0.5)
    r = exp_rewards
    torch.testing.assert_close(
        ret_g[0], torch.stack([r[0, 0] + 0.5 * r[0, 1] + 0.25 * r[0, 2], r[0, 1] + 0.5 * r[0, 2], r[0, 2]])
    )
    torch.testing.assert_close(adv_g, masked_whiten(ret_g, mask))


def test_reinforce_pp_errors():
    scores, mask = torch.tensor([1.0, 0.0]), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"kl must be finite; non-finite values at indices \[\(1, 0\)\]"):
        reinforce_pp_advantages(scores, torch.tensor([[0.0, 0.0, 0.0], [float("inf"), 0.0, 0.0]]), mask, 0.1)
    with pytest.raises(ValueError, match="scores must be finite"):
        reinforce_pp_advantages(torch.tensor([1.0, float("nan")]), torch.zeros(2, 3), mask, 0.1)
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        reinforce_pp_advantages(scores, torch.zeros(2, 3), mask, -0.1)
    with pytest.raises(ValueError, match="gamma must be in"):
        reinforce_pp_advantages(scores, torch.zeros(2, 3), mask, 0.1, gamma=1.5)
    with pytest.raises(ValueError, match="kl and mask must have the same shape"):
        reinforce_pp_advantages(scores, torch.zeros(2, 4), mask, 0.1)
    with pytest.raises(ValueError, match="no valid token"):
        reinforce_pp_advantages(scores, torch.zeros(2, 3), torch.tensor([[1, 1, 0], [0, 0, 0]]), 0.1)


def test_overlong_penalty_dapo_eq13():
    # L_max = 20, L_cache = 4: 0 up to 16 tokens, (16 - |y|) / 4 up to 20, -1 beyond
    lengths = torch.tensor([0, 10, 16, 17, 18, 19, 20, 21, 100])
    out = overlong_penalty(lengths, max_len=20, cache_len=4)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]))
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="cache_len must be > 0"):
        overlong_penalty(lengths, max_len=20, cache_len=0)
    with pytest.raises(ValueError, match="max_len must be > cache_len=4"):
        overlong_penalty(lengths, max_len=4, cache_len=4)
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        overlong_penalty(torch.tensor([3, -1]), max_len=20, cache_len=4)
    with pytest.raises(ValueError, match=r"lengths must be \[B\]"):
        overlong_penalty(lengths.view(3, 3), max_len=20, cache_len=4)


def test_dynamic_sampling_mask():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0])
    keep = dynamic_sampling_mask(scores, num_generations=3)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [False, True, False, False]
    # a kept group has a non-zero GRPO advantage, a dropped group none
    adv = grpo_advantages(scores, 3).view(4, 3)
    assert (adv.abs().sum(dim=1) > 0).tolist() == keep.tolist()
