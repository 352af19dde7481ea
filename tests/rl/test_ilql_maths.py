"""nemo_rlhf/rl/ilql.py: the ILQL equations (Snell et al. 2022) on small hand-computed tensors. (Named
test_ilql_maths.py, not test_ilql.py: pytest imports test files by basename, and tests/algorithms/test_ilql.py
holds the trainer tests.)"""

from __future__ import annotations

import math

import pytest
import torch

from nemo_rlhf.rl.ilql import (
    AWAC_MAX_WEIGHT,
    awac_loss,
    awac_weights,
    cql_loss,
    expectile_loss,
    ilql_decode_logits,
    ilql_loss,
    next_state_mask,
    polyak_update_,
    q_loss,
    q_targets,
    standardize_rewards,
    terminal_rewards,
    topk_mask,
    value_loss,
)

# Two rows, T = 4 positions. Row 0: prompt length 2, total length 5 -> actions at t = 1, 2, 3.
# Row 1: prompt length 1, total length 3 -> actions at t = 0, 1.
MASK = torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])


def test_terminal_rewards_put_the_score_on_the_last_action():
    r = terminal_rewards(torch.tensor([0.5, -2.0]), MASK)
    assert torch.equal(r, torch.tensor([[0.0, 0.0, 0.0, 0.5], [0.0, -2.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="no action"):
        terminal_rewards(torch.tensor([1.0, 1.0]), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"scores must be \[B=2\]"):
        terminal_rewards(torch.tensor([1.0]), MASK)


def test_next_state_mask_zeroes_terminal_transitions():
    # the state after the last action is terminal (V = 0); off-response positions stay 0
    assert torch.equal(next_state_mask(MASK), torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))


def test_q_targets_are_r_plus_gamma_v_next_with_terminal_zero():
    rewards = terminal_rewards(torch.tensor([1.0, 2.0]), MASK)
    v_next = torch.tensor([[9.0, 3.0, 4.0, 7.0], [5.0, 6.0, 8.0, 8.0]], requires_grad=True)
    got = q_targets(rewards, v_next, MASK, gamma=0.5)
    # row 0: t=1: 0 + .5*3; t=2: 0 + .5*4; t=3 (last): 1 + 0 (terminal). t=0 off-response: 0.
    # row 1: t=0: 0 + .5*5; t=1 (last): 2 + 0.
    want = torch.tensor([[0.0, 1.5, 2.0, 1.0], [2.5, 2.0, 0.0, 0.0]])
    assert torch.allclose(got, want) and not got.requires_grad
    with pytest.raises(ValueError, match="gamma"):
        q_targets(rewards, v_next, MASK, gamma=1.5)


def test_expectile_loss_weights_tau_above_and_one_minus_tau_below():
    diff = torch.tensor([2.0, -2.0, 0.0])
    assert torch.allclose(expectile_loss(diff, 0.8), torch.tensor([0.8 * 4, 0.2 * 4, 0.0]))
    with pytest.raises(ValueError, match="tau"):
        expectile_loss(diff, 1.0)


def test_value_loss_is_the_masked_mean_expectile_without_gradient_into_q():
    tq = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, -1.0, 0.0, 0.0]], requires_grad=True)
    v = torch.tensor([[5.0, 0.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    loss = value_loss(tq, v, MASK, tau=0.7)
    # actions: (1-0)=1 -> .7; (2-3)=-1 -> .3; 0 -> 0; (1-0)=1 -> .7; (-1-0) -> .3 * 1. 5 actions.
    assert math.isclose(loss.item(), (0.7 + 0.3 + 0.0 + 0.7 + 0.3) / 5, rel_tol=1e-6)
    loss.backward()
    assert tq.grad is None and v.grad is not None


def test_q_loss_sums_heads_of_masked_mean_squares():
    target = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    q1 = torch.tensor([[100.0, 2.0, 1.0, 0.0], [1.0, 1.0, 50.0, 50.0]])
    q2 = torch.zeros(2, 4)
    # q1: (1 + 0 + 1 + 1 + 1) / 5; q2: (1 + 1 + 1 + 0 + 0) / 5
    assert math.isclose(q_loss([q1, q2], target, MASK).item(), 4 / 5 + 3 / 5, rel_tol=1e-6)


def test_cql_is_cross_entropy_of_q_over_the_vocabulary():
    mask = torch.tensor([[1.0, 0.0]])
    q = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 100.0]]])
    actions = torch.tensor([[0, 0]])
    want = math.log(math.exp(1) + math.exp(2) + math.exp(3)) - 1.0  # logsumexp Q - Q(a)
    assert math.isclose(cql_loss([q], actions, mask).item(), want, rel_tol=1e-6)
    assert math.isclose(cql_loss([q, q], actions, mask).item(), 2 * want, rel_tol=1e-6)


def test_awac_is_weighted_nll_of_taken_actions():
    lp = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert math.isclose(awac_loss(lp, mask).item(), (1 + 2 + 3) / 3, rel_tol=1e-6)
    w = torch.tensor([[2.0, 0.5], [1.0, 9.0]])
    assert math.isclose(awac_loss(lp, mask, w).item(), (2 + 1 + 3) / 3, rel_tol=1e-6)


def test_awac_weights_are_exp_advantage_capped_and_detached():
    q = torch.tensor([[0.5, 10.0], [-1.0, 0.0]], requires_grad=True)
    v = torch.tensor([[0.0, 0.0], [0.0, 1.0]], requires_grad=True)
    w = awac_weights(q, v, 2.0)
    assert not w.requires_grad
    want = torch.tensor([[math.exp(1.0), AWAC_MAX_WEIGHT], [math.exp(-2.0), math.exp(-2.0)]])
    torch.testing.assert_close(w, want)  # exp(2 * 10) is capped at 100 (IQL's EXP_ADV_MAX)
    assert torch.equal(awac_weights(q, v, 0.0), torch.ones(2, 2))
    with pytest.raises(ValueError, match="awac_beta must be >= 0"):
        awac_weights(q, v, -1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        awac_weights(q, v[:, :1], 1.0)


def test_ilql_loss_weights_awac_by_the_capped_advantage():
    torch.manual_seed(1)
    b, t = 2, 3
    mask = torch.ones(b, t)
    lp = -torch.rand(b, t)
    qs = [torch.randn(b, t)]
    target_qs = [torch.tensor([[0.0, 5.0, -1.0], [1.0, 0.0, 0.0]])]
    values = torch.zeros(b, t + 1)
    q_vocab = [torch.randn(b, t, 4)]
    actions = torch.zeros(b, t, dtype=torch.long)
    rewards = torch.zeros(b, t)
    _, stats = ilql_loss(lp, qs, target_qs, q_vocab, values, actions, rewards, mask, tau=0.7, gamma=1.0,
                         cql_scale=0.0, awac_scale=1.0, awac_beta=1.0)
    w = torch.exp(target_qs[0]).clamp(max=100.0)
    assert math.isclose(stats["loss_awac"].item(), (-lp * w).mean().item(), rel_tol=1e-6)


def test_ilql_loss_combines_the_terms_as_written():
    torch.manual_seed(0)
    b, t, vocab = 2, 4, 5
    tokens = torch.randint(0, vocab, (b, t + 1))
    actions = tokens[:, 1:]
    logits = torch.randn(b, t, vocab)
    lp = torch.log_softmax(logits, -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    qv = [torch.randn(b, t, vocab, requires_grad=True) for _ in range(2)]
    tqv = [torch.randn(b, t, vocab) for _ in range(2)]
    values = torch.randn(b, t + 1, requires_grad=True)
    qs = [q.gather(-1, actions.unsqueeze(-1)).squeeze(-1) for q in qv]
    tqs = [q.gather(-1, actions.unsqueeze(-1)).squeeze(-1) for q in tqv]
    rewards = terminal_rewards(torch.tensor([1.0, -1.0]), MASK)
    tau, gamma, cql_scale, awac_scale = 0.8, 0.9, 0.1, 1.0
    loss, stats = ilql_loss(lp, qs, tqs, qv, values, actions, rewards, MASK, tau=tau, gamma=gamma,
                            cql_scale=cql_scale, awac_scale=awac_scale)

    # written out, one action at a time
    n = MASK.sum().item()
    lq = lv = lc = la = 0.0
    for i in range(b):
        for j in range(t):
            if not MASK[i, j]:
                continue
            terminal = j + 1 >= t or not MASK[i, j + 1]
            target = rewards[i, j].item() + (0.0 if terminal else gamma * values[i, j + 1].item())
            qhat = min(tqs[0][i, j].item(), tqs[1][i, j].item())
            d = qhat - values[i, j].item()
            lq += sum((q[i, j].item() - target) ** 2 for q in qs) / n
            lv += (tau if d >= 0 else 1 - tau) * d * d / n
            for q in qv:
                lc += (torch.logsumexp(q[i, j], 0).item() - q[i, j, actions[i, j]].item()) / n
            la += -lp[i, j].item() / n
    assert math.isclose(stats["loss_q"].item(), lq, rel_tol=1e-5)
    assert math.isclose(stats["loss_v"].item(), lv, rel_tol=1e-5)
    assert math.isclose(stats["loss_cql"].item(), lc, rel_tol=1e-5)
    assert math.isclose(stats["loss_awac"].item(), la, rel_tol=1e-5)
    assert math.isclose(loss.item(), lq + lv + cql_scale * lc + awac_scale * la, rel_tol=1e-5)
    loss.backward()
    assert values.grad is not None and all(q.grad is not None for q in qv)
    # V(s_{t+1}) is a target: the gradient into V comes only from the expectile term at t
    assert torch.all(values.grad[:, 0][MASK[:, 0] == 0] == 0)
    with pytest.raises(ValueError, match=r"values must be \[B, T\+1\]"):
        ilql_loss(lp, qs, tqs, qv, values[:, :-1], actions, rewards, MASK, tau=tau, gamma=gamma,
                  cql_scale=cql_scale, awac_scale=awac_scale)


def test_polyak_update_moves_targets_by_alpha():
    target = [torch.tensor([0.0, 10.0]), torch.tensor([[1.0]])]
    source = [torch.tensor([1.0, 0.0]), torch.tensor([[3.0]])]
    polyak_update_(target, source, alpha=0.25)
    assert torch.allclose(target[0], torch.tensor([0.25, 7.5])) and torch.allclose(target[1], torch.tensor([[1.5]]))
    polyak_update_(target, source, alpha=1.0)
    assert torch.equal(target[0], source[0])
    with pytest.raises(ValueError, match="alpha"):
        polyak_update_(target, source, alpha=1.5)
    with pytest.raises(ValueError, match="shapes differ"):
        polyak_update_([torch.zeros(2)], [torch.zeros(3)], alpha=0.5)


def test_decode_logits_shift_by_beta_times_min_q_minus_v_then_top_k():
    logits = torch.tensor([[0.0, 1.0, 2.0, float("-inf")]])
    q1 = torch.tensor([[5.0, 0.0, 0.0, 0.0]])
    q2 = torch.tensor([[4.0, 1.0, -1.0, 0.0]])
    v = torch.tensor([1.0])
    lsm = torch.log_softmax(logits, -1)
    got = ilql_decode_logits(logits, [q1, q2], v, beta=2.0)
    want = lsm + 2.0 * (torch.tensor([[4.0, 0.0, -1.0, 0.0]]) - 1.0)
    assert torch.allclose(got[:, :3], want[:, :3]) and got[0, 3] == float("-inf")
    # beta = 0: the policy's own distribution
    assert torch.allclose(torch.softmax(ilql_decode_logits(logits, [q1, q2], v, beta=0.0), -1),
                          torch.softmax(logits, -1))
    # top-k after the shift: shifted [3.59, -3.41, -4.41, -inf] -> tokens 0 and 1 survive, while the
    # policy's own top-2 would be tokens 2 and 1
    top2 = ilql_decode_logits(logits, [q1, q2], v, beta=2.0, top_k=2)
    assert torch.isfinite(top2[0, [0, 1]]).all() and torch.isinf(top2[0, [2, 3]]).all()
    assert torch.equal(topk_mask(logits, 0), logits)


def test_standardize_rewards():
    r = standardize_rewards(torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(r, torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))
    assert torch.equal(standardize_rewards(torch.tensor([2.0, 2.0])), torch.zeros(2, dtype=torch.float64))
