"""nemo_rlhf/rewards/sentiment.py: the VADER judge's scores, thresholds and agreement."""

from __future__ import annotations

import numpy as np
import pytest

from nemo_rlhf.rewards import sentiment
from nemo_rlhf.rewards.sentiment import judge_agreement, positive_fraction, vader_compound, vader_judge, vader_reward


def test_vader_compound_orders_sentiment():
    c = vader_compound(["This movie was wonderful, I loved every minute.", "The plot.", "Awful, boring, a waste.", ""])
    assert c.shape == (4,) and c.dtype == np.float64
    assert c[0] > 0.5 and c[1] == 0.0 and c[2] < -0.5 and c[3] == 0.0
    assert vader_reward(["I ", "It "], ["love it", "hate it"]).tolist() == vader_compound(["I love it", "It hate it"]).tolist()


def test_vader_judge_scores_prompt_plus_response_per_sample():
    prompts, responses = ["The film was", "The film was", "It is"], [" wonderful and moving.", " a dull mess.", " a film."]
    judged = vader_judge(prompts, responses)
    compound = vader_compound([p + r for p, r in zip(prompts, responses)])
    np.testing.assert_array_equal(judged["vader_compound"], compound)
    np.testing.assert_array_equal(judged["vader_positive"], [1.0, 0.0, 0.0])
    assert judged["vader_positive"].dtype == np.float64
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        vader_judge(prompts[:2], responses[:1])


def test_positive_fraction_and_agreement():
    c = np.array([0.9, 0.05, 0.06, -0.4])
    assert positive_fraction(c) == 0.5  # strictly above 0.05
    assert positive_fraction(np.array([])) == 0.0
    rm = np.array([2.0, -1.0, 0.5, -3.0])  # median -0.25: positive for rows 0 and 2
    assert judge_agreement(c, rm) == 1.0
    assert judge_agreement(c, rm, rm_threshold=1.0) == 0.75
    with pytest.raises(ValueError, match="3 VADER scores but 4 RM scores"):
        judge_agreement(c[:3], rm)


def test_errors_name_the_input_and_the_install_command(monkeypatch):
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        vader_compound(["ok", 3])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        vader_reward(["a", "b"], ["c"])
    sentiment._analyzer.cache_clear()
    import builtins
    real_import = builtins.__import__

    def no_vader(name, *a, **k):
        if name.startswith("vaderSentiment"):
            raise ImportError("no module")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_vader)
    with pytest.raises(ImportError, match=r"pip install vaderSentiment==3.3.2"):
        vader_compound(["x"])
    monkeypatch.undo()
    sentiment._analyzer.cache_clear()
