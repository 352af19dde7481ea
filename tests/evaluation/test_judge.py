"""nemo_rlhf/evaluation/judge.py: the win rate (ties count one half) and the head-to-head comparison
of two policies under one sampling seed, on the tiny SFT policy and reward model the session trains
once (tests/conftest.py ``sft_run`` / ``rm_run``).

Checked against independent computations: two copies of the same weights give the same responses
token for token, so every prompt is a tie (win rate 1/2) and the KL is 0; with a different policy,
the baseline's responses are exactly what ``evaluate_policy`` gives it alone with that seed, the
policy's KL is ``evaluate_policy``'s k1 KL against the reference, and the win rate is recounted
from the rows.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from stage_runs import MODEL_CFG

pytestmark = pytest.mark.usefixtures("megatron_world")

PROMPTS = ["\n\nHuman: How do I bake bread?\n\nAssistant:", "\n\nHuman: hello\n\nAssistant:",
           "\n\nHuman: What is a good movie for tonight? I like comedies.\n\nAssistant:",
           "\n\nHuman: Tell me about cats.\n\nAssistant:", "\n\nHuman: Why?\n\nAssistant:"]
SAMPLING = {"max_new_tokens": 6}


def test_win_rate_counts_ties_as_one_half():
    from nemo_rlhf.evaluation.judge import win_rate

    out = win_rate([1.0, 2.0, 3.0, 4.0, 0.5], torch.tensor([0.0, 2.0, 5.0, 4.0, 0.25]))
    se = out.pop("win_rate_se")
    assert out == {"win_rate": (2 + 0.5 * 2) / 5, "wins": 2, "ties": 2, "losses": 1, "prompts": 5}
    # outcomes [1, 1/2, 0, 1/2, 1]: mean 0.6, squared deviations sum 0.7, ddof 1 -> var 0.175
    assert se == pytest.approx(math.sqrt(0.7 / 4 / 5), rel=1e-12)
    assert win_rate([2.0], [1.0])["win_rate_se"] == 0.0
    assert win_rate(np.array([1.0, 1.0]), [1.0, 1.0])["win_rate"] == 0.5
    assert win_rate([2.0], [1.0])["win_rate"] == 1.0 and win_rate([0.0], [1.0])["win_rate"] == 0.0
    with pytest.raises(ValueError, match="3 scores but 2 baseline scores"):
        win_rate([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="no scores"):
        win_rate([], [])
    with pytest.raises(ValueError, match=r"baseline\[1\] = nan is not finite"):
        win_rate([1.0, 2.0], [1.0, float("nan")])


@pytest.fixture(scope="module")
def models(megatron_world, sft_run: Path, rm_run: Path):
    """(SFT policy, a second copy of its weights, tokenizer, reward model)."""
    from nemo_rlhf.evaluation.sources import load_policy, load_reward_model

    src = (lambda run, w: {"path": str(run / w), "format": "weights"})  # noqa: E731
    policy, tok = load_policy(src(sft_run, "sft_weights"), model=MODEL_CFG, micro_batch_size=2)
    twin, _ = load_policy(src(sft_run, "sft_weights"), model=MODEL_CFG, tokenizer=tok, micro_batch_size=2,
                          section="reference")
    rm = load_reward_model(src(rm_run, "rm_weights"), tok, model=MODEL_CFG)
    return policy, twin, tok, rm


def test_same_weights_same_seed_tie_everywhere_and_zero_kl(models):
    from nemo_rlhf.evaluation.judge import compare_policies

    policy, twin, tok, rm = models
    rows, summary = compare_policies(policy, twin, tok, PROMPTS, SAMPLING, seed=11, batch_size=2, reward=rm,
                                     progress=False)
    assert [r["index"] for r in rows] == list(range(len(PROMPTS)))
    for r in rows:
        assert r["policy_response"] == r["reference_response"] and r["policy_tokens"] == r["reference_tokens"]
        assert r["policy_rm_score"] == r["reference_rm_score"] and r["outcome"] == "tie"
        assert r["kl"] == 0.0
    assert summary["identical_responses"] == len(PROMPTS) and summary["prompts"] == len(PROMPTS)
    assert summary["win_rate"] == 0.5 and summary["ties"] == len(PROMPTS) and summary["wins"] == 0
    assert summary["kl_mean"] == 0.0 and summary["seed"] == 11 and summary["sampling"]["max_new_tokens"] == 6
    assert summary["rm_score_mean"]["policy"] == summary["rm_score_mean"]["reference"]


def test_other_policy_same_seed_recounted_from_rows(models):
    from nemo_rlhf.evaluation.generate import evaluate_policy
    from nemo_rlhf.evaluation.judge import compare_policies
    from nemo_rlhf.models.policy import GPTPolicyModel

    reference, _, tok, rm = models
    torch.manual_seed(5)
    other = GPTPolicyModel(MODEL_CFG, None, tok.vocab_size, 2, tok.eos_id, tok.pad_id)  # random weights
    rows, summary = compare_policies(other, reference, tok, PROMPTS, SAMPLING, seed=11, batch_size=2, reward=rm,
                                     progress=False)
    alone, _ = evaluate_policy(reference, tok, PROMPTS, SAMPLING, seed=11, batch_size=2, reward=rm, judges=(),
                               progress=False)
    own, _ = evaluate_policy(other, tok, PROMPTS, SAMPLING, seed=11, batch_size=2, reference=reference, judges=(),
                             progress=False)
    assert [r["reference_response"] for r in rows] == [a["completion"] for a in alone]  # the seed, not the order
    assert [r["reference_rm_score"] for r in rows] == [a["rm_score"] for a in alone]
    assert [r["policy_response"] for r in rows] == [o["completion"] for o in own]
    assert [r["kl"] for r in rows] == [o["kl"] for o in own]
    assert summary["identical_responses"] < len(PROMPTS) and any(abs(r["kl"]) > 1e-3 for r in rows)
    wins = sum(r["policy_rm_score"] > r["reference_rm_score"] for r in rows)
    ties = sum(r["policy_rm_score"] == r["reference_rm_score"] for r in rows)
    assert summary["win_rate"] == pytest.approx((wins + ties / 2) / len(rows))
    assert [r["outcome"] for r in rows].count("win") == wins == summary["wins"]
    assert summary["kl_mean"] == pytest.approx(np.mean([r["kl"] for r in rows]))
    assert summary["rm_score_mean"]["policy"] == pytest.approx(np.mean([r["policy_rm_score"] for r in rows]))


def test_without_a_reward_model_no_win_rate_but_kl(models):
    from nemo_rlhf.evaluation.judge import compare_policies

    policy, twin, tok, _ = models
    rows, summary = compare_policies(policy, twin, tok, PROMPTS[:2], SAMPLING, seed=3, batch_size=2, progress=False)
    assert summary["win_rate"] is None and "rm_score_mean" not in summary
    assert math.isfinite(summary["kl_mean"]) and all("policy_rm_score" not in r and "outcome" not in r for r in rows)
