"""RLOO: REINFORCE with a leave-one-out baseline, no critic (``grpo.algorithm: rloo``).

Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
Human Feedback in LLMs": the sequence reward is ``r_i - kl_coef * KL_i`` (``KL_i`` the summed
per-token KL estimate of response ``i`` to the reference; ``grpo.kl_coef = 0``: no reference
model is built) and each response's baseline is the mean reward of the other ``G - 1`` responses
to the same prompt; the advantage is given to every response token. The step is
:class:`~nemo_rlhf.algorithms.critic_free.CriticFreeTrainer`'s.
"""

from __future__ import annotations

import torch

from nemo_rlhf.algorithms.critic_free import CriticFreeTrainer, GroupRollout
from nemo_rlhf.rl.group import broadcast_to_tokens, rloo_advantages


class RLOOTrainer(CriticFreeTrainer):
    """RLOO with the KL penalty in the sequence reward (``grpo.kl_coef``)."""

    def advantages(self, ro: GroupRollout) -> torch.Tensor:
        """``[B, L-1]``: :func:`~nemo_rlhf.rl.group.rloo_advantages` of ``scores - kl_coef *
        sum_t KL_t`` ``[B]``, broadcast to the response tokens."""
        p = self.cfg.grpo
        scores = ro.scores
        if ro.kl is not None and p.kl_coef > 0:
            scores = scores - float(p.kl_coef) * ro.kl.sum(dim=1)
        return broadcast_to_tokens(rloo_advantages(scores, int(p.num_generations)), ro.mask)
