"""Pure-torch RL math for RLHF: masked reductions, GAE, KL penalty/controllers, losses, and the
critic-free group advantages (GRPO, Dr.GRPO, RLOO, REINFORCE++) with the DAPO helpers, and the
offline preference losses (DPO, cDPO, robust DPO, IPO, RPO, SimPO: preference.py).

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
from nemo_rlhf.rl.ilql import (
    awac_loss,
    awac_weights,
    cql_loss,
    expectile_loss,
    ilql_decode_logits,
    ilql_loss,
    polyak_update_,
    q_loss,
    q_targets,
    terminal_rewards,
    value_loss,
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
from nemo_rlhf.rl.preference import (
    PREFERENCE_LOSSES,
    chosen_nll,
    dpo_logits,
    dpo_loss,
    implicit_rewards,
    ipo_loss,
    preference_loss,
    robust_dpo_loss,
    simpo_loss,
)

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "PREFERENCE_LOSSES",
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate_loss",
    "bradley_terry_loss",
    "broadcast_to_tokens",
    "build_kl_controller",
    "chosen_nll",
    "clipped_value_loss",
    "compute_gae",
    "dpo_logits",
    "dpo_loss",
    "dynamic_sampling_mask",
    "grpo_advantages",
    "grpo_policy_loss",
    "implicit_rewards",
    "ipo_loss",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "masked_token_nll",
    "masked_var",
    "masked_whiten",
    "overlong_penalty",
    "per_token_rewards",
    "ppo_policy_loss",
    "preference_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "robust_dpo_loss",
    "simpo_loss",
    # ILQL (rl/ilql.py)
    "awac_loss",
    "awac_weights",
    "cql_loss",
    "expectile_loss",
    "ilql_decode_logits",
    "ilql_loss",
    "polyak_update_",
    "q_loss",
    "q_targets",
    "terminal_rewards",
    "value_loss",
]
