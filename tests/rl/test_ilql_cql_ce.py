"""nemo_rlhf/rl/ilql.py: ``ilql_loss(..., cql_ce=...)``, the entry the vocabulary-parallel ILQL loss
(TP > 1, algorithms/ilql.py) uses: per-head cross-entropies computed by the caller give the same loss
as the whole-vocabulary ``q_vocab`` path. (Its TP > 1 use is checked end to end by the ``ilql`` role of
tests/multiprocess/test_layout_parity.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nemo_rlhf.rl.ilql import ilql_loss


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, t, v = 3, 5, 11
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0]], dtype=torch.float32)
    q_vocab = [torch.randn(b, t, v, generator=g, requires_grad=True) for _ in range(2)]
    actions = torch.randint(v, (b, t), generator=g)
    qs = [q.gather(-1, actions.unsqueeze(-1)).squeeze(-1) for q in q_vocab]
    target_qs = [torch.randn(b, t, generator=g) for _ in range(2)]
    return dict(logprobs=-torch.rand(b, t, generator=g), qs=qs, target_qs=target_qs, q_vocab=q_vocab,
                values=torch.randn(b, t + 1, generator=g), actions=actions,
                rewards=torch.randn(b, t, generator=g), mask=mask)


def test_precomputed_cross_entropy_gives_the_same_loss_and_gradient():
    knobs = dict(tau=0.7, gamma=0.9, cql_scale=0.3, awac_scale=1.0, awac_beta=0.5)
    a = _inputs()
    loss_a, stats_a = ilql_loss(*a.values(), **knobs)
    grads_a = torch.autograd.grad(loss_a, a["q_vocab"])
    b = _inputs()
    ce = [F.cross_entropy(q.reshape(-1, q.shape[-1]), b["actions"].reshape(-1), reduction="none").reshape(3, 5)
          for q in b["q_vocab"]]
    loss_b, stats_b = ilql_loss(*{**b, "q_vocab": None}.values(), **knobs, cql_ce=ce)
    grads_b = torch.autograd.grad(loss_b, b["q_vocab"])
    assert stats_a["loss_cql"] > 0
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)
    for k in stats_a:
        torch.testing.assert_close(stats_b[k], stats_a[k], rtol=0, atol=1e-6)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, rtol=0, atol=1e-7)


def test_cross_entropy_count_and_shape_are_checked():
    a = _inputs()
    knobs = dict(tau=0.7, gamma=0.9, cql_scale=0.3, awac_scale=1.0)
    with pytest.raises(ValueError, match="as many Q heads"):
        ilql_loss(*a.values(), **knobs, cql_ce=[torch.zeros(3, 5)])
    with pytest.raises(ValueError, match="shapes differ"):
        ilql_loss(*a.values(), **knobs, cql_ce=[torch.zeros(3, 4), torch.zeros(3, 4)])
