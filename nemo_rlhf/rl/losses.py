"""Losses for SFT, the reward model (Bradley-Terry), PPO (clipped actor and critic losses) and
the critic-free methods (GRPO / Dr.GRPO / DAPO per-token policy loss and its aggregation).

The PPO/SFT token losses are masked token means (:func:`~nemo_rlhf.rl.masked.masked_mean`); the
GRPO policy loss is returned per token and reduced by :func:`aggregate_loss`. Inputs of
any float dtype are accepted; half-precision inputs (fp16/bf16) are upcast to float32 first, so
losses are float32 (float64 for float64 inputs). Masked-out positions are replaced by 0 before any
arithmetic, so garbage there cannot produce inf/NaN values or gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nemo_rlhf.rl.kl import kl_penalty
from nemo_rlhf.rl.masked import as_bool_mask, check_float, check_same_shape, masked_mean, masked_sum

LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm")


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


def grpo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token GRPO policy loss: clipped ratio surrogate plus a k3 KL-to-reference term.

    Shao et al. 2024, "DeepSeekMath", eq. 3 (GRPO objective) with the KL estimator of eq. 4
    (Schulman 2020's k3), negated for minimisation, before any averaging::

        r_t  = exp(logprobs_t - old_logprobs_t)
        kl_t = exp(ref_t - logprobs_t) - (ref_t - logprobs_t) - 1                     (k3, >= 0)
        l_t  = -min(r_t * A_t, clip(r_t, 1 - clip_eps_low, 1 + clip_eps_high) * A_t) + beta * kl_t

    Asymmetric clipping (``clip_eps_high > clip_eps_low``) is DAPO's "Clip-Higher" (Yu et al. 2025,
    §3.1). Reduce the result with :func:`aggregate_loss`: GRPO's ``1/G sum_i 1/|o_i| sum_t`` is
    ``"seq_mean_token_mean"``, DAPO's token-level loss (§3.3) ``"token_mean"``, Dr.GRPO's
    ``"seq_mean_token_sum_norm"``. ``old_logprobs`` and ``advantages`` are treated as constants;
    the KL term's gradient flows through ``logprobs``.

    Args:
        logprobs: float ``[B, T]`` policy log-probs (nats) of the sampled tokens, with grad.
        old_logprobs: float ``[B, T]`` log-probs under the sampling policy (``logprobs.detach()``
            for a single on-policy step).
        advantages: float ``[B]`` sequence advantages (e.g. :func:`~nemo_rlhf.rl.group.grpo_advantages`,
            broadcast to every token) or ``[B, T]`` token advantages.
        mask: bool/numeric ``[B, T]``, nonzero at response tokens.
        clip_eps_low: lower clip range, ``0 < clip_eps_low < 1``.
        clip_eps_high: upper clip range ``> 0``; defaults to ``clip_eps_low``.
        beta: KL coefficient ``>= 0``; 0 means no KL term (``ref_logprobs`` may then be None).
        ref_logprobs: float ``[B, T]`` reference-policy log-probs; required when ``beta > 0``.

    Returns:
        ``(per_token_loss, stats)``: ``per_token_loss`` float ``[B, T]`` (float32, float64 for
        float64 inputs), 0 where ``mask`` is 0; ``stats`` detached 0-dim token means over valid
        tokens: ``"clipfrac"`` (clipped term strictly smaller: no gradient), ``"clip_low_frac"``
        (``r < 1 - clip_eps_low`` and ``A < 0``), ``"clip_high_frac"`` (``r > 1 + clip_eps_high`` and
        ``A > 0``), ``"ratio_mean"``, and ``"kl"`` (mean k3, nats) when ``ref_logprobs`` is given.

    Raises:
        TypeError: non-float inputs.
        ValueError: shapes differ, empty mask, clip ranges or ``beta`` out of bounds, or
            ``beta > 0`` without ``ref_logprobs``.
    """
    clip_eps_high = clip_eps_low if clip_eps_high is None else clip_eps_high
    if not 0.0 < clip_eps_low < 1.0:
        raise ValueError(f"clip_eps_low must be in (0, 1), got {clip_eps_low}")
    if not clip_eps_high > 0.0:
        raise ValueError(f"clip_eps_high must be > 0, got {clip_eps_high}")
    if not (beta >= 0.0 and beta < float("inf")):
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    if beta > 0.0 and ref_logprobs is None:
        raise ValueError(f"ref_logprobs is required when beta > 0 (beta={beta})")
    check_float("logprobs", logprobs)
    check_float("advantages", advantages)
    if advantages.dim() == 1:
        if logprobs.dim() != 2 or advantages.shape[0] != logprobs.shape[0]:
            raise ValueError(
                f"advantages of shape {tuple(advantages.shape)} must be [B] or [B, T] for logprobs "
                f"of shape {tuple(logprobs.shape)}"
            )
        advantages = advantages.unsqueeze(1).expand_as(logprobs)
    tensors = {"logprobs": logprobs, "old_logprobs": old_logprobs, "advantages": advantages}
    if ref_logprobs is not None:
        tensors["ref_logprobs"] = ref_logprobs
    m, ts = _masked_inputs(mask, **tensors)
    lp, old, adv = ts[0], ts[1].detach(), ts[2].detach()
    ratio = torch.exp(lp - old)
    surr = ratio * adv
    surr_clipped = torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high) * adv
    per_token = -torch.minimum(surr, surr_clipped)
    kl = kl_penalty(lp, ts[3], "k3") if ref_logprobs is not None else None
    if beta > 0.0:
        per_token = per_token + beta * kl
    per_token = torch.where(m, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    with torch.no_grad():
        f = per_token.dtype
        stats = {
            "clipfrac": masked_mean((surr_clipped < surr).to(f), m),
            "clip_low_frac": masked_mean(((ratio < 1.0 - clip_eps_low) & (adv < 0)).to(f), m),
            "clip_high_frac": masked_mean(((ratio > 1.0 + clip_eps_high) & (adv > 0)).to(f), m),
            "ratio_mean": masked_mean(ratio, m),
        }
        if kl is not None:
            stats["kl"] = masked_mean(kl, m)
    return per_token, stats


def aggregate_loss(
    per_token_loss: torch.Tensor, mask: torch.Tensor, mode: str, max_len: int | None = None
) -> torch.Tensor:
    """Reduce a per-token loss ``l [B, T]`` to a scalar; ``mode`` is one of ``LOSS_AGGREGATIONS``.

    With ``m`` the mask, ``|o_b| = sum_t m_bt`` and ``B'`` the rows with at least one valid token:

    * ``"token_mean"``: ``sum_bt m l / sum_bt m`` — every token weighs the same (DAPO,
      Yu et al. 2025, §3.3 "Token-Level Policy Gradient Loss").
    * ``"seq_mean_token_mean"``: ``1/|B'| sum_b (1/|o_b|) sum_t m l`` — GRPO as written
      (Shao et al. 2024, eq. 3); a response's tokens share one unit of weight.
    * ``"seq_mean_token_sum"``: ``1/|B'| sum_b sum_t m l`` — per-sequence sums, averaged.
    * ``"seq_mean_token_sum_norm"``: ``sum_bt m l / (B * max_len)`` — Dr.GRPO (Liu et al. 2025):
      token sums divided by a constant (the generation budget), no per-response length
      normalisation. Here the denominator counts all ``B`` rows, empty ones included.

    Rows without a valid token are left out of the ``seq_mean_*`` means (they carry no loss).

    Args:
        per_token_loss: float ``[B, T]`` (e.g. from :func:`grpo_policy_loss`), with grad.
        mask: bool/numeric ``[B, T]``, nonzero at response tokens.
        mode: aggregation name.
        max_len: the constant of ``"seq_mean_token_sum_norm"`` in tokens (usually the maximum
            response length), ``>= 1`` and ``>=`` every row's valid-token count; ignored by the
            other modes.

    Returns:
        0-dim loss, float32 (float64 for float64 input; fp16/bf16 upcast).

    Raises:
        TypeError: non-float ``per_token_loss``.
        ValueError: not ``[B, T]``, shapes differ, empty mask, unknown ``mode``, or ``max_len``
            missing / < 1 / shorter than a row for ``"seq_mean_token_sum_norm"``.
    """
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss aggregation mode must be one of {list(LOSS_AGGREGATIONS)}, got {mode!r}")
    check_float("per_token_loss", per_token_loss)
    if per_token_loss.dim() != 2:
        raise ValueError(f"per_token_loss must be [B, T], got shape {tuple(per_token_loss.shape)}")
    m, (loss,) = _masked_inputs(mask, per_token_loss=per_token_loss)
    lengths = m.sum(dim=1)
    if int(lengths.sum()) == 0:
        raise ValueError("aggregate_loss: mask selects no element")
    if mode == "token_mean":
        return masked_mean(loss, m)
    if mode == "seq_mean_token_sum_norm":
        if max_len is None or isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be an int >= 1 for mode 'seq_mean_token_sum_norm', got {max_len!r}")
        longest = int(lengths.max())
        if longest > max_len:
            raise ValueError(f"max_len={max_len} is shorter than a response in the batch ({longest} valid tokens)")
        return masked_sum(loss, m) / (loss.shape[0] * max_len)
    sums = masked_sum(loss, m, dim=1)  # [B]
    per_seq = sums if mode == "seq_mean_token_sum" else sums / lengths.clamp(min=1).to(sums.dtype)
    return masked_mean(per_seq, lengths > 0)
