"""REINFORCE++: per-token KL in the reward, return-to-go, batch-normalised advantages, no critic
(``grpo.algorithm: reinforce_pp``).

Hu et al. 2025, "REINFORCE++" (arXiv 2501.03262): ``r_t = -kl_coef * KL_t`` plus the score at the
last response token, ``G_t = sum_{l>=0} gamma^l r_{t+l}``, ``A_t`` = ``G_t`` whitened over every
valid token of the batch (all data-parallel ranks). ``grpo.kl_coef = 0``: no reference model is
built. The step is :class:`~nemo_rlhf.algorithms.critic_free.CriticFreeTrainer`'s.
"""

from __future__ import annotations

import torch

from nemo_rlhf.algorithms.critic_free import CriticFreeTrainer, GroupRollout
from nemo_rlhf.rl.group import reinforce_pp_advantages


class ReinforcePPTrainer(CriticFreeTrainer):
    """REINFORCE++ (``grpo.kl_coef``, ``grpo.gamma``)."""

    def advantages(self, ro: GroupRollout) -> torch.Tensor:
        """``[B, L-1]``: :func:`~nemo_rlhf.rl.group.reinforce_pp_advantages` (whitening statistics
        all-reduced over the data-parallel group)."""
        from megatron.core import parallel_state

        p = self.cfg.grpo
        group = (parallel_state.get_data_parallel_group()
                 if parallel_state.is_initialized() and parallel_state.get_data_parallel_world_size() > 1 else None)
        kl = ro.kl if ro.kl is not None else torch.zeros_like(ro.mask)
        _, advantages, _ = reinforce_pp_advantages(ro.scores, kl, ro.mask, float(p.kl_coef) if ro.kl is not None
                                                   else 0.0, gamma=float(p.gamma), group=group)
        return advantages
