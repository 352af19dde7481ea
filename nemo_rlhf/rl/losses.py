"""Losses for SFT, the reward model (Bradley-Terry) and PPO (clipped actor and critic losses).

All token losses are masked token means (:func:`~nemo_rlhf.rl.masked.masked_mean`). Inputs of
any float dtype are accepted; half-precision inputs (fp16/bf16) are upcast to float32 first, so
losses are float32 (float64 for float64 inputs). Masked-out positions are replaced by 0 before any
arithmetic, so garbage there cannot produce inf/NaN values or gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nemo_rlhf.rl.masked import as_bool_mask, check_float, check_same_shape, masked_mean


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _masked_inputs(
    mask: torch.Tensor, mask_name: str = "mask", **tensors: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Validate ``tensors`` against ``mask``; return the bool mask and upcast, zero-filled tensors."""
    m = as_bool_mask(mask)
    out = []
    for name, t in tensors.items():
        check_float(name, t)
        check_same_shape(name, t, mask_name, m)
        t = _upcast(t)
        out.append(torch.where(m, t, torch.zeros((), dtype=t.dtype, device=t.device)))
    return m, out


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss for the actor.

    Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7, negated for
    minimisation and averaged over valid tokens::

        r_t = exp(logprobs_t - old_logprobs_t)
        L   = -masked_mean(min(r_t * A_t, clip(r_t, 1 - clip_eps, 1 + clip_eps_high) * A_t))

    ``old_logprobs`` and ``advantages`` are treated as constants (detached).

    Args:
        logprobs: float ``[B, T]`` actor log-probs (nats) of the rollout tokens, with grad.
        old_logprobs: float ``[B, T]`` log-probs of the same tokens under the rollout policy.
        advantages: float ``[B, T]`` (usually whitened GAE advantages).
        mask: bool/numeric ``[B, T]``, nonzero at response tokens.
        clip_eps: lower clip range, ``0 < clip_eps < 1``.
        clip_eps_high: upper clip range (> 0); defaults to ``clip_eps`` (asymmetric "clip-higher"
            otherwise).

    Returns:
        ``(loss, stats)``: ``loss`` a 0-dim float32/float64 tensor; ``stats`` detached 0-dim
        tensors ``"clipfrac"`` (fraction of valid tokens where the clipped term is strictly
        smaller, i.e. the token gets no gradient), ``"approx_kl"`` (``0.5 * mean(log r_t ** 2)``,
        an estimate of KL(old || new)) and ``"ratio_mean"`` (mean ``r_t``).

    Raises:
        TypeError: non-float inputs.
        ValueError: shapes differ, empty mask, or clip ranges out of bounds.
    """
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if not 0.0 < clip_eps < 1.0:
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")
    if not clip_eps_high > 0.0:
        raise ValueError(f"clip_eps_high must be > 0, got {clip_eps_high}")
    m, (lp, old, adv) = _masked_inputs(
        mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages
    )
    log_ratio = lp - old.detach()
    adv = adv.detach()
    ratio = torch.exp(log_ratio)
    surr = ratio * adv
    surr_clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps_high) * adv
    loss = -masked_mean(torch.minimum(surr, surr_clipped), m)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((surr_clipped < surr).to(loss.dtype), m),
            "approx_kl": masked_mean(0.5 * log_ratio.square(), m),
            "ratio_mean": masked_mean(ratio, m),
        }
    return loss, stats


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value (critic) loss, PPO2 baselines / NeMo-Aligner convention::

        V_clip = old_values + clip(values - old_values, -clip_eps, clip_eps)
        L      = 0.5 * masked_mean(max((values - returns)**2, (V_clip - returns)**2))

    Args:
        values: float ``[B, T]`` critic values, with grad.
        old_values: float ``[B, T]`` critic values at rollout time (detached).
        returns: float ``[B, T]`` GAE returns (detached).
        mask: bool/numeric ``[B, T]``, nonzero at response tokens.
        clip_eps: value clip range; ``None`` or ``<= 0`` disables clipping
            (``L = 0.5 * masked_mean((values - returns)**2)``).

    Returns:
        ``(loss, stats)``: ``loss`` a 0-dim float32/float64 tensor; ``stats["vf_clipfrac"]``
        (detached, 0-dim) is the fraction of valid tokens where the clipped term is strictly
        larger and therefore used (0 without clipping).

    Raises:
        TypeError: non-float inputs.
        ValueError: shapes differ or empty mask.
    """
    m, (v, old, ret) = _masked_inputs(mask, values=values, old_values=old_values, returns=returns)
    old, ret = old.detach(), ret.detach()
    err = (v - ret).square()
    if clip_eps is None or clip_eps <= 0:
        loss = 0.5 * masked_mean(err, m)
        return loss, {"vf_clipfrac": torch.zeros((), dtype=loss.dtype, device=loss.device)}
    v_clipped = old + torch.clamp(v - old, -clip_eps, clip_eps)
    err_clipped = (v_clipped - ret).square()
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), m)
    with torch.no_grad():
        vf_clipfrac = masked_mean((err_clipped > err).to(loss.dtype), m)
    return loss, {"vf_clipfrac": vf_clipfrac}


def bradley_terry_loss(
    rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022, InstructGPT, eq. 1)::

        L = -mean(log sigmoid(r_chosen - r_rejected))

    computed with ``F.logsigmoid`` (stable for large margins).

    Args:
        rewards_chosen: float ``[B]`` reward-model scores of the preferred responses.
        rewards_rejected: float ``[B]`` scores of the rejected responses of the same prompts.

    Returns:
        ``(loss, accuracy)``: 0-dim float32/float64 ``loss``; detached 0-dim ``accuracy`` =
        fraction of pairs with ``r_chosen > r_rejected`` (ties count as wrong).

    Raises:
        TypeError: non-float inputs.
        ValueError: inputs not 1-D of equal, non-zero length.
    """
    check_float("rewards_chosen", rewards_chosen)
    check_float("rewards_rejected", rewards_rejected)
    check_same_shape("rewards_chosen", rewards_chosen, "rewards_rejected", rewards_rejected)
    if rewards_chosen.dim() != 1 or rewards_chosen.numel() == 0:
        raise ValueError(f"rewards_chosen must be [B] with B > 0, got shape {tuple(rewards_chosen.shape)}")
    margin = _upcast(rewards_chosen) - _upcast(rewards_rejected)
    loss = -F.logsigmoid(margin).mean()
    accuracy = (margin.detach() > 0).to(loss.dtype).mean()
    return loss, accuracy


def masked_token_nll(logprobs: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over the tokens where ``loss_mask`` is set (the SFT loss).

    Args:
        logprobs: float ``[B, T]`` log-probs (nats) of the target tokens.
        loss_mask: bool/numeric ``[B, T]``, nonzero at tokens that count (e.g. response tokens).

    Returns:
        0-dim float32/float64 loss in nats per token.

    Raises:
        TypeError: non-float ``logprobs``.
        ValueError: shapes differ or empty mask.
    """
    m, (lp,) = _masked_inputs(loss_mask, "loss_mask", logprobs=logprobs)
    return -masked_mean(lp, m)
