"""GRPO and Dr.GRPO: group-relative advantages, no critic (``grpo.algorithm: grpo | dr_grpo``).

GRPO (Shao et al. 2024, "DeepSeekMath", §4.1.2): every token of response ``i`` of a group of ``G``
responses to one prompt gets ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)``; the KL to the
reference is a loss term, ``beta * k3`` (eq. 3-4; ``beta = 0``: no reference model is built).
Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): ``A_i = r_i - mean(r_group)``
and token sums over a constant (``grpo.loss_aggregation: seq_mean_token_sum_norm`` by default).
The step itself is :class:`~nemo_rlhf.algorithms.critic_free.CriticFreeTrainer`'s.
"""

from __future__ import annotations

import torch

from nemo_rlhf.algorithms.critic_free import CriticFreeTrainer, GroupRollout
from nemo_rlhf.rl.group import broadcast_to_tokens, grpo_advantages


class GRPOTrainer(CriticFreeTrainer):
    """GRPO / Dr.GRPO (``grpo.scale_rewards``: divide by the group std; default true for ``grpo``,
    false for ``dr_grpo``)."""

    def advantages(self, ro: GroupRollout) -> torch.Tensor:
        """``[B, L-1]``: :func:`~nemo_rlhf.rl.group.grpo_advantages` of the scores ``[B]``
        broadcast to the response tokens (:func:`~nemo_rlhf.rl.group.broadcast_to_tokens`)."""
        p = self.cfg.grpo
        adv = grpo_advantages(ro.scores, int(p.num_generations), scale_by_std=p.effective_scale_rewards,
                              eps=float(p.std_eps))
        return broadcast_to_tokens(adv, ro.mask)
