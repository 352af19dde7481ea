"""Tests for nemo_rlhf.rl.kl: KL estimators and KL-coefficient controllers."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from nemo_rlhf.rl import AdaptiveKLController, FixedKLController, build_kl_controller, kl_penalty


def test_kl_estimators_by_hand():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])  # d = logp - ref = [0.5, -1.0]
    torch.testing.assert_close(kl_penalty(logp, ref), torch.tensor([[0.5, -1.0]]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([[0.125, 0.5]]))
    # k3 = exp(-d) + d - 1
    k3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([k3]))
    torch.testing.assert_close(kl_penalty(logp, ref, "abs"), torch.tensor([[0.5, 1.0]]))
    assert kl_penalty(logp.to(torch.bfloat16), ref.to(torch.bfloat16), "k3").dtype == torch.bfloat16


def test_k1_and_k3_are_unbiased_estimates_of_true_kl():
    # Sample tokens from pi; the mean of k1 and k3 approaches KL(pi || ref).
    g = torch.Generator().manual_seed(0)
    pi = torch.tensor([0.5, 0.3, 0.15, 0.05])
    ref = torch.tensor([0.25, 0.25, 0.25, 0.25])
    true_kl = (pi * (pi / ref).log()).sum().item()
    tokens = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    logp, logp_ref = pi.log()[tokens][None], ref.log()[tokens][None]
    for est in ("k1", "k3"):
        assert kl_penalty(logp, logp_ref, est).mean().item() == pytest.approx(true_kl, abs=5e-3)
    assert (kl_penalty(logp, logp_ref, "k3") >= 0).all()


def test_kl_penalty_errors():
    with pytest.raises(ValueError, match=r"one of \['k1', 'k2', 'k3', 'abs'\], got 'kl'"):
        kl_penalty(torch.zeros(1, 2), torch.zeros(1, 2), "kl")
    with pytest.raises(ValueError, match="logprobs and ref_logprobs must have the same shape"):
        kl_penalty(torch.zeros(1, 2), torch.zeros(1, 3))


def test_fixed_controller():
    c = FixedKLController(0.05)
    c.update(100.0, 256)
    assert c.value == 0.05
    assert c.state_dict() == {"value": 0.05}
    with pytest.raises(ValueError, match="kl_coef must be a finite number >= 0"):
        FixedKLController(-1.0)


def test_adaptive_controller_after_several_updates():
    c = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    c.update(8.0, 256)  # e = clip(8/6 - 1 = 0.333, +-0.2) = 0.2   -> mult 1 + 0.2*256/10000 = 1.00512
    assert c.value == pytest.approx(0.1 * 1.00512, rel=1e-12)
    c.update(6.6, 256)  # e = 6.6/6 - 1 = 0.1                      -> mult 1 + 0.1*0.0256 = 1.00256
    c.update(3.0, 512)  # e = clip(-0.5) = -0.2                     -> mult 1 - 0.2*0.0512 = 0.98976
    c.update(torch.tensor(6.0), 512)  # e = 0                       -> mult 1
    assert c.value == pytest.approx(0.1 * 1.00512 * 1.00256 * 0.98976, rel=1e-12)

    restored = AdaptiveKLController(0.1, 6.0, 10000)
    restored.load_state_dict(c.state_dict())
    assert restored.value == c.value
    with pytest.raises(ValueError, match="current_kl must be finite"):
        c.update(float("nan"), 1)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(init_kl_coef=-0.1, target=6.0, horizon=100), "init_kl_coef"),
        (dict(init_kl_coef=0.1, target=0.0, horizon=100), "target"),
        (dict(init_kl_coef=0.1, target=6.0, horizon=0), "horizon"),
    ],
)
def test_adaptive_controller_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        AdaptiveKLController(**kwargs)
    with pytest.raises(ValueError, match=f"^kl_controller.{field}"):
        build_kl_controller({"type": "adaptive", **kwargs})


def test_build_kl_controller():
    cfg = OmegaConf.create({"type": "adaptive", "init_kl_coef": 0.2, "target": 6, "horizon": 10000})
    c = build_kl_controller(cfg)
    assert isinstance(c, AdaptiveKLController) and c.value == 0.2 and c.target == 6.0
    c = build_kl_controller({"type": "fixed", "init_kl_coef": 0.02, "target": None, "horizon": None})
    assert isinstance(c, FixedKLController) and c.value == 0.02
    with pytest.raises(ValueError, match="kl_controller.type must be 'fixed' or 'adaptive', got 'pid'"):
        build_kl_controller({"type": "pid", "init_kl_coef": 0.1})
    with pytest.raises(ValueError, match="kl_controller.horizon is required"):
        build_kl_controller({"type": "adaptive", "init_kl_coef": 0.1, "target": 6.0})
    with pytest.raises(ValueError, match="kl_controller.init_kl_coef must be"):
        build_kl_controller({"type": "fixed", "init_kl_coef": -1})
