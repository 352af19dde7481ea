"""Pure-torch RL math for RLHF: masked reductions, GAE, KL penalty/controllers, losses, and the
critic-free group advantages (GRPO, Dr.GRPO, RLOO, REINFORCE++) with the DAPO helpers.

No megatron imports; every function works on any device and float dtype.
"""

from __future__ import annotations

from nemo_rlhf.rl.advantages import compute_gae, per_token_rewards
from nemo_rlhf.rl.group import (
    broadcast_to_tokens,
    dynamic_sampling_mask,
    grpo_advantages,
    overlong_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
)
from nemo_rlhf.rl.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    build_kl_controller,
    kl_penalty,
)
from nemo_rlhf.rl.losses import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    bradley_terry_loss,
    clipped_value_loss,
    grpo_policy_loss,
    masked_token_nll,
    ppo_policy_loss,
)
from nemo_rlhf.rl.masked import masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate_loss",
    "bradley_terry_loss",
    "broadcast_to_tokens",
    "build_kl_controller",
    "clipped_value_loss",
    "compute_gae",
    "dynamic_sampling_mask",
    "grpo_advantages",
    "grpo_policy_loss",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "masked_token_nll",
    "masked_var",
    "masked_whiten",
    "overlong_penalty",
    "per_token_rewards",
    "ppo_policy_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
]
