"""Pure-torch RL math for RLHF: masked reductions, GAE, KL penalty/controllers and losses.

No megatron imports; every function works on any device and float dtype.
"""

from __future__ import annotations

from nemo_rlhf.rl.advantages import compute_gae, per_token_rewards
from nemo_rlhf.rl.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    build_kl_controller,
    kl_penalty,
)
from nemo_rlhf.rl.losses import bradley_terry_loss, clipped_value_loss, masked_token_nll, ppo_policy_loss
from nemo_rlhf.rl.masked import masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "bradley_terry_loss",
    "build_kl_controller",
    "clipped_value_loss",
    "compute_gae",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "masked_token_nll",
    "masked_var",
    "masked_whiten",
    "per_token_rewards",
    "ppo_policy_loss",
]
