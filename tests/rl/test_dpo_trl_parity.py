"""Parity of the DPO-family losses in nemo_rlhf.rl.preference with TRL 1.16.0, calling TRL's own code
(issue 14 §1).

TRL 1.16 has no standalone DPO loss function: ``DPOTrainer._compute_loss(model, inputs,
return_outputs)`` runs the model and computes every ``loss_type`` inline. These tests call that
method on ``object.__new__(DPOTrainer)`` (``__init__`` skipped: it would load a model and a data
set) given only the attributes it reads (``beta``, ``loss_types``, ``loss_weights``,
``label_smoothing``, ``precompute_ref_logps=True`` so the reference log-probs come from the inputs,
``f_divergence_type="reverse_kl"``, an accelerator stand-in, metric buffers) and a stub model whose
output carries fixed per-token log-probs (``log_probs``, zero outside the completion, as TRL's fused
LM head gives for label -100) plus the logging-only fields (``entropy``, ``mean_logits``, ``is_top1``):

* ``sigmoid`` (DPO), ``ipo`` (TRL's length-normalised IPO), ``robust`` (label-smoothed robust DPO),
  RPO as TRL's recipe ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, α]``;
* TRL's logged metrics ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
  ``rewards/accuracies``.

SimPO and conservative DPO (cDPO, Mitchell 2023) are not ``DPOTrainer`` loss types in 1.16 (its
``sigmoid`` ignores ``label_smoothing``; checked below). Both live in
``trl.experimental.cpo.CPOTrainer.cpo_loss(policy_chosen_logps, policy_rejected_logps)``, a method
reading ``beta``, ``loss_type``, ``label_smoothing``, ``simpo_gamma``, ``alpha`` (AlphaPO, 0 = off)
and ``accelerator``; it is called the same way:

* SimPO: ``loss_type="simpo"`` on average log-probs (CPO's ``average_log_prob`` for simpo);
* cDPO: ``loss_type="sigmoid"`` with ``label_smoothing``, fed the log-ratios
  ``log π - log π_ref`` (CPO's loss is DPO's with the reference dropped, and the formula only
  sees the difference of its two inputs), and the paper's equation written out as a second check.

TRL is imported only here, never by ``nemo_rlhf``. Tensors are float64; tolerance 1e-6.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("trl", reason="TRL is a test dependency (pip install -e '.[test]')")
from trl import DPOTrainer
from trl.experimental.cpo import CPOTrainer

from nemo_rlhf.rl import preference_loss
from nemo_rlhf.rl.preference import dpo_loss, ipo_loss, robust_dpo_loss, simpo_loss

ATOL = 1e-6
PROMPTS = [2, 3, 1, 4, 2, 3]  # prompt tokens per pair (shared by chosen and rejected)
CHOSEN = [5, 2, 6, 1, 4, 3]  # response tokens
REJECTED = [3, 6, 2, 4, 1, 5]
B = len(PROMPTS)
S = max(p + max(c, r) for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)) + 1  # one right pad


def _completion_mask() -> torch.Tensor:
    """TRL's ``completion_mask [2B, S]`` (chosen rows, then rejected): 1 on response tokens."""
    rows = []
    for lengths in (CHOSEN, REJECTED):
        for p, n in zip(PROMPTS, lengths):
            m = torch.zeros(S, dtype=torch.int64)
            m[p:p + n] = 1
            rows.append(m)
    return torch.stack(rows)


def _per_token(seed: int) -> torch.Tensor:
    """Per-token log-probs ``[2B, S-1]`` aligned with TRL's shifted completion mask, 0 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(2 * B, S - 1, generator=g, dtype=torch.float64) * 3.0 - 0.01
    return lp * _completion_mask()[:, 1:]


POLICY = _per_token(1)
REF = _per_token(2)
MASK = _completion_mask()
LEN_C = torch.tensor(CHOSEN)
LEN_R = torch.tensor(REJECTED)


def _sums(per_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = per_token.sum(1)
    return s[:B], s[B:]


class _Accelerator:
    device = torch.device("cpu")

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x


def _trl_dpo(loss_types: list[str], beta: float, label_smoothing: float = 0.0,
             loss_weights: list[float] | None = None) -> tuple[float, dict[str, float]]:
    """TRL's ``DPOTrainer._compute_loss`` on the fixed log-probs; returns the loss and the eval metrics."""
    t = object.__new__(DPOTrainer)
    t.accelerator = _Accelerator()
    t.model = SimpleNamespace(training=False)  # eval mode: metrics go to _metrics["eval"]
    t.aux_loss_enabled = False
    t.ld_alpha = None
    t.precompute_ref_logps = True
    t.f_divergence_type = "reverse_kl"
    t.loss_types = loss_types
    t.loss_weights = loss_weights or [1.0] * len(loss_types)
    t.beta = beta
    t.label_smoothing = label_smoothing
    t.use_weighting = False
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t._total_train_tokens = 0
    t._tp_size = 1
    n = S - 1
    outputs = SimpleNamespace(log_probs=POLICY.clone(), entropy=torch.zeros(2 * B, n, dtype=torch.float64),
                              mean_logits=torch.zeros(2 * B, n, dtype=torch.float64),
                              is_top1=torch.zeros(2 * B, n, dtype=torch.bool))
    ref_c, ref_r = _sums(REF)
    inputs = {"input_ids": torch.arange(2 * B * S).reshape(2 * B, S) % 50 + 1,
              "attention_mask": torch.ones(2 * B, S, dtype=torch.int64),
              "completion_mask": MASK, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    loss = t._compute_loss(lambda **kw: outputs, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in t._metrics["eval"].items()}


def _ours(loss_type: str, **kw) -> tuple[float, dict[str, float]]:
    pc, pr = _sums(POLICY)
    rc, rr = _sums(REF)
    loss, metrics = preference_loss(loss_type, pc, pr, rc, rr, LEN_C, LEN_R, **kw)
    return float(loss), {k: float(v) for k, v in metrics.items()}


def test_the_fixture_is_what_it_says():
    # TRL's completion mask, shifted, selects exactly our response tokens
    assert MASK[:, 1:].sum(1).tolist() == CHOSEN + REJECTED
    assert (POLICY != 0).sum(1).tolist() == CHOSEN + REJECTED


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_dpo_equals_trl(beta):
    trl_loss, trl_m = _trl_dpo(["sigmoid"], beta)
    loss, m = _ours("sigmoid", beta=beta)
    assert loss == pytest.approx(trl_loss, abs=ATOL)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected"):
        assert m[k] == pytest.approx(trl_m[k], abs=ATOL), k
    assert 0.0 < m["rewards/accuracies"] < 1.0  # the fixture has both right and wrong pairs


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_ipo_equals_trl(beta):
    trl_loss, _ = _trl_dpo(["ipo"], beta)
    assert _ours("ipo", beta=beta)[0] == pytest.approx(trl_loss, abs=ATOL)
    # ...and it is the length-normalised form: the whole-sequence form of eq. 17 differs here
    pc, pr = _sums(POLICY)
    rc, rr = _sums(REF)
    unnormalised = float((((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2).mean())
    assert abs(unnormalised - trl_loss) > 1e-2


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_robust_label_smoothed_equals_trl(eps):
    trl_loss, _ = _trl_dpo(["robust"], 0.2, label_smoothing=eps)
    assert _ours("robust", beta=0.2, label_smoothing=eps)[0] == pytest.approx(trl_loss, abs=ATOL)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_rpo_equals_trl_sigmoid_plus_sft(alpha):
    trl_loss, _ = _trl_dpo(["sigmoid", "sft"], 0.1, loss_weights=[1.0, alpha])
    loss, m = _ours("rpo", beta=0.1, rpo_alpha=alpha)
    assert loss == pytest.approx(trl_loss, abs=ATOL)
    assert m["nll"] == pytest.approx(float(-POLICY[:B].sum() / LEN_C.sum()), abs=ATOL)


def test_trl_1_16_sigmoid_ignores_label_smoothing():
    """Why cDPO is checked against CPOTrainer: DPOTrainer 1.16's sigmoid has no label smoothing."""
    assert _trl_dpo(["sigmoid"], 0.1, label_smoothing=0.2)[0] == pytest.approx(_trl_dpo(["sigmoid"], 0.1)[0],
                                                                                abs=1e-12)


def _cpo(loss_type: str, beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.5) -> CPOTrainer:
    t = object.__new__(CPOTrainer)
    t.accelerator = _Accelerator()
    t.alpha = 0.0  # AlphaPO off
    t.beta, t.loss_type, t.label_smoothing, t.simpo_gamma = beta, loss_type, label_smoothing, simpo_gamma
    return t


@pytest.mark.parametrize("eps", [0.1, 0.25])
def test_conservative_dpo_equals_trl_cpo_sigmoid_and_the_paper(eps):
    pc, pr = _sums(POLICY)
    rc, rr = _sums(REF)
    trl_losses, trl_rc, trl_rr = _cpo("sigmoid", 0.3, eps).cpo_loss(pc - rc, pr - rr)
    ours = dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=eps)
    torch.testing.assert_close(ours, trl_losses, atol=ATOL, rtol=0)
    # Mitchell 2023: L = -(1-ε) log σ(βΔ) - ε log σ(-βΔ)
    delta = (pc - rc) - (pr - rr)
    paper = -(1 - eps) * F.logsigmoid(0.3 * delta) - eps * F.logsigmoid(-0.3 * delta)
    torch.testing.assert_close(ours, paper, atol=ATOL, rtol=0)
    _, m = _ours("sigmoid", beta=0.3, label_smoothing=eps)
    assert m["rewards/chosen"] == pytest.approx(float(trl_rc.mean()), abs=ATOL)
    assert m["rewards/rejected"] == pytest.approx(float(trl_rr.mean()), abs=ATOL)


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 0.5, 0.0), (2.5, 1.2, 0.0), (2.0, 0.5, 0.1)])
def test_simpo_equals_trl_cpo(beta, gamma, eps):
    pc, pr = _sums(POLICY)
    avg_c, avg_r = pc / LEN_C, pr / LEN_R  # CPOTrainer's average_log_prob=True for simpo
    trl_losses, trl_rc, trl_rr = _cpo("simpo", beta, eps, gamma).cpo_loss(avg_c, avg_r)
    ours = simpo_loss(pc, pr, LEN_C, LEN_R, beta=beta, gamma=gamma, label_smoothing=eps)
    torch.testing.assert_close(ours, trl_losses, atol=ATOL, rtol=0)
    loss, m = preference_loss("simpo", pc, pr, None, None, LEN_C, LEN_R, beta=beta, simpo_gamma=gamma,
                              label_smoothing=eps)
    assert float(loss) == pytest.approx(float(trl_losses.mean()), abs=ATOL)
    assert float(m["rewards/chosen"]) == pytest.approx(float(trl_rc.mean()), abs=ATOL)
    assert float(m["rewards/margins"]) == pytest.approx(float((trl_rc - trl_rr).mean()), abs=ATOL)


def test_functions_agree_with_entry_point_and_hand_values():
    one = torch.tensor([-1.0], dtype=torch.float64)
    zero = torch.tensor([0.0], dtype=torch.float64)
    # Δ = (-1 - 0) - (0 - 0) = -1, β = 1: -log σ(-1) = log(1 + e)
    assert float(dpo_loss(one, zero, zero, zero, beta=1.0)) == pytest.approx(math.log(1 + math.e))
    # robust at ε = 0 is DPO
    assert float(robust_dpo_loss(one, zero, zero, zero, beta=1.0)) == pytest.approx(math.log(1 + math.e))
    # IPO: h = -1/2 (two chosen tokens) - 0, τ = 0.5: (h - 1)^2 = 2.25
    two = torch.tensor([2])
    assert float(ipo_loss(one, zero, zero, zero, two, two, beta=0.5)) == pytest.approx(2.25)
