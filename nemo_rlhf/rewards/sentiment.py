"""VADER sentiment as an independent judge (Hutto & Gilbert 2014, "VADER: A Parsimonious
Rule-based Model for Sentiment Analysis of Social Media Text", ICWSM).

VADER is a lexicon- and rule-based analyser (the ``vaderSentiment`` package ships its lexicon): no
learned weights, nothing a policy was trained against. The examples use it to check that PPO
against a *learned* reward model moved what a human would call sentiment, not only the reward
model's score. Its ``compound`` score is a normalised sum of the lexicon valences in [-1, 1]; the
authors' thresholds call a text positive when ``compound >= 0.05`` and negative when
``compound <= -0.05`` (here: positive iff ``compound > 0.05``, as the issue's gate counts).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

VADER_INSTALL = "pip install vaderSentiment==3.3.2  (or: pip install -e '.[examples]')"
POSITIVE_THRESHOLD = 0.05


@lru_cache(maxsize=1)
def _analyzer():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as exc:
        raise ImportError(f"the VADER sentiment judge needs the vaderSentiment package: {VADER_INSTALL}") from exc
    return SentimentIntensityAnalyzer()


def vader_compound(texts: Sequence[str]) -> np.ndarray:
    """VADER compound sentiment of each text.

    Args:
        texts: ``B`` strings.

    Returns:
        ``[B]`` float64 in [-1, 1] (-1 most negative, +1 most positive; 0.0 for an empty text).

    Raises:
        ImportError: ``vaderSentiment`` is not installed (the message names the install command).
        TypeError: an entry is not a str (its index named).
    """
    analyzer = _analyzer()
    out = np.zeros(len(texts), dtype=np.float64)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"vader_compound: texts[{i}] is {type(t).__name__}, not str")
        out[i] = analyzer.polarity_scores(t)["compound"]
    return out


def vader_reward(prompts: Sequence[str], responses: Sequence[str], **_metadata) -> np.ndarray:
    """VADER compound of ``prompt + response`` as a reward function (``[B]`` float64), the
    ``reward_fn(prompts, responses, **metadata)`` signature; used by the examples as a judge only."""
    if len(prompts) != len(responses):
        raise ValueError(f"vader_reward: {len(prompts)} prompts but {len(responses)} responses")
    return vader_compound([p + r for p, r in zip(prompts, responses)])


def vader_judge(prompts: Sequence[str], responses: Sequence[str]) -> dict[str, np.ndarray]:
    """The held-out VADER judge of each sample: ``{"vader_compound": [B] float64 in [-1, 1],
    "vader_positive": [B] float64 (1.0 where compound > POSITIVE_THRESHOLD)}`` of
    ``prompt + response`` (:func:`vader_reward`).

    Raises:
        ValueError: as :func:`vader_reward`; ImportError / TypeError: as :func:`vader_compound`.
    """
    compound = vader_reward(prompts, responses)
    return {"vader_compound": compound, "vader_positive": (compound > POSITIVE_THRESHOLD).astype(np.float64)}


def positive_fraction(compound: np.ndarray, threshold: float = POSITIVE_THRESHOLD) -> float:
    """Fraction of ``compound [B]`` strictly above ``threshold`` (0.0 for B = 0)."""
    compound = np.asarray(compound, dtype=np.float64)
    return float((compound > threshold).mean()) if compound.size else 0.0


def judge_agreement(compound: np.ndarray, rm_scores: np.ndarray, rm_threshold: float | None = None,
                    threshold: float = POSITIVE_THRESHOLD) -> float:
    """Fraction of texts where VADER and the reward model agree on the sign of the sentiment:
    both positive (``compound > threshold`` and ``rm_score > rm_threshold``) or both not.

    Args:
        compound: ``[B]`` VADER compound scores.
        rm_scores: ``[B]`` reward-model scores of the same texts (a Bradley-Terry reward has no
            fixed zero: ``rm_threshold`` defaults to the median of ``rm_scores``).
        rm_threshold: the reward-model score above which a text counts as positive.

    Raises:
        ValueError: the two arrays differ in length.
    """
    compound = np.asarray(compound, dtype=np.float64)
    rm_scores = np.asarray(rm_scores, dtype=np.float64)
    if compound.shape != rm_scores.shape:
        raise ValueError(f"judge_agreement: {compound.shape[0]} VADER scores but {rm_scores.shape[0]} RM scores")
    if not compound.size:
        return 0.0
    cut = float(np.median(rm_scores)) if rm_threshold is None else float(rm_threshold)
    return float(((compound > threshold) == (rm_scores > cut)).mean())
