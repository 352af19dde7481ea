"""Scores of generated text that are not a learned reward model: the VADER sentiment judge
(:mod:`nemo_rlhf.rewards.sentiment`); rule-based reward functions join it here."""

from nemo_rlhf.rewards.sentiment import judge_agreement, positive_fraction, vader_compound, vader_reward

__all__ = ["judge_agreement", "positive_fraction", "vader_compound", "vader_reward"]
