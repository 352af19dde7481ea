"""Per-token rewards and Generalized Advantage Estimation (GAE) for PPO rollouts."""

from __future__ import annotations

import torch

from nemo_rlhf.rl.masked import as_bool_mask, check_float, check_same_shape


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Promoted dtype of ``tensors``, at least float32 (float64 stays float64)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation over right-padded response tokens.

    Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
    Estimation", eqs. 11-16::

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = sum_{l>=0} (gamma * lam)^l * delta_{t+l}      (computed backwards)
        returns = A_t + V_t

    Each row is one episode that ends at its last valid token: ``V`` beyond it is 0 (no
    bootstrap). Positions where ``mask`` is 0 get advantage 0 and return 0; garbage (even
    inf/NaN) there is ignored. Rows with an all-zero mask give zeros.

    Args:
        rewards: float ``[B, T]`` per-token rewards (see :func:`per_token_rewards`).
        values: float ``[B, T]`` critic values ``V(s_t)`` at the same positions.
        mask: bool/numeric ``[B, T]``, nonzero at response tokens; the valid positions of a row
            must be one contiguous run (right padding; leading zeros are allowed).
        gamma: discount factor in ``[0, 1]``.
        lam: GAE lambda in ``[0, 1]``.

    Returns:
        ``(advantages, returns)``, both ``[B, T]``, no grad, accumulated and returned in float32
        (float64 if an input is float64).

    Raises:
        TypeError: non-float ``rewards``/``values``.
        ValueError: shapes are not equal 2-D ``[B, T]``, ``gamma``/``lam`` outside ``[0, 1]``, or a
            row whose valid positions are not contiguous.
    """
    check_float("rewards", rewards)
    check_float("values", values)
    m = as_bool_mask(mask)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, T], got shape {tuple(rewards.shape)}")
    check_same_shape("rewards", rewards, "values", values)
    check_same_shape("rewards", rewards, "mask", m)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    starts = (m[:, 1:] & ~m[:, :-1]).sum(dim=1) + m[:, 0]  # number of runs of valid tokens per row
    if bool((starts > 1).any()):
        rows = torch.nonzero(starts > 1).flatten().tolist()
        raise ValueError(f"mask must be one contiguous run of valid tokens per row; rows {rows} have gaps")

    acc = _acc_dtype(rewards, values)
    zero = torch.zeros((), dtype=acc, device=rewards.device)
    r = torch.where(m, rewards.to(acc), zero)
    v = torch.where(m, values.to(acc), zero)
    advantages = torch.zeros_like(r)
    last_gae = torch.zeros_like(r[:, 0])
    next_value = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        last_gae = torch.where(m[:, t], delta + gamma * lam * last_gae, zero)
        advantages[:, t] = last_gae
        next_value = v[:, t]  # 0 past the last valid token: no bootstrap
    returns = torch.where(m, advantages + v, zero)
    return advantages, returns


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token PPO rewards: KL penalty at every token plus the reward-model score at the end.

    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", §2.2:
    ``R(x, y) = r(x, y) - beta * log(pi(y|x) / rho(y|x))``, spread over tokens as
    ``r_t = -kl_coef * kl_t`` at each valid token, with ``scores[b]`` added at the last valid
    token of row ``b``. Masked positions are 0.

    Args:
        scores: float ``[B]`` sequence-level reward-model scores.
        kl: float ``[B, T]`` per-token KL estimates (see ``kl_penalty``).
        mask: bool/numeric ``[B, T]``, nonzero at response tokens.
        kl_coef: KL coefficient ``beta >= 0`` (e.g. a KL controller's ``.value``).

    Returns:
        float ``[B, T]`` rewards in float32 (float64 if an input is float64).

    Raises:
        TypeError: non-float ``scores``/``kl``.
        ValueError: bad shapes, ``kl_coef < 0``, or a row with no valid token.
    """
    check_float("scores", scores)
    check_float("kl", kl)
    m = as_bool_mask(mask)
    if kl.dim() != 2:
        raise ValueError(f"kl must be [B, T], got shape {tuple(kl.shape)}")
    check_same_shape("kl", kl, "mask", m)
    if scores.shape != (kl.shape[0],):
        raise ValueError(f"scores must be [B] = [{kl.shape[0]}], got shape {tuple(scores.shape)}")
    if not kl_coef >= 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    lengths = m.sum(dim=1)
    if bool((lengths == 0).any()):
        rows = torch.nonzero(lengths == 0).flatten().tolist()
        raise ValueError(f"per_token_rewards: rows {rows} have no valid token in mask")

    acc = _acc_dtype(scores, kl)
    T = kl.shape[1]
    last = (T - 1) - m.flip(dims=[1]).to(torch.uint8).argmax(dim=1)  # index of last valid token
    rows = torch.arange(kl.shape[0], device=kl.device)
    rewards = torch.where(m, -kl_coef * kl.to(acc), torch.zeros((), dtype=acc, device=kl.device))
    return rewards.index_put((rows, last), scores.to(acc), accumulate=True)


def response_mask(prompt_lengths: torch.Tensor, lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[B, L-1]`` float32 mask of the log-prob positions that score response tokens.

    Position t scores token t+1 (``logprobs[:, t] = log pi(tokens[:, t+1] | tokens[:, :t+1])``),
    so a row with prompt length P and total length Lr has response positions ``P-1 <= t <= Lr-2``.

    Args:
        prompt_lengths, lengths: ``[B]`` int64 prompt and prompt + response lengths (tokens).
        seq_len: L, the padded length of the rollout's ``tokens [B, L]``.
    """
    t = torch.arange(seq_len - 1, device=lengths.device).unsqueeze(0)
    return ((t >= prompt_lengths.unsqueeze(1) - 1) & (t <= lengths.unsqueeze(1) - 2)).float()


def ppo_advantages(
    scores: torch.Tensor,
    values: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    gamma: float,
    lam: float,
    whiten: bool = True,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The RLHF-PPO advantage pipeline: KL-penalised per-token rewards -> GAE -> whitening.

    Ziegler et al. 2019 §2.2 (reward ``r - beta * KL`` per token, :func:`per_token_rewards`),
    Schulman et al. 2016 eqs. 11-16 (GAE, :func:`compute_gae`), advantage whitening over the
    data-parallel batch (:func:`~nemo_rlhf.rl.masked.masked_whiten`, as NeMo-Aligner and
    lm-human-preferences do).

    Args:
        scores: ``[B]`` float reward-model scores.
        values: ``[B, T]`` float critic values at the log-prob positions (T = L - 1).
        kl: ``[B, T]`` float per-token KL estimates, already masked (:func:`~nemo_rlhf.rl.kl.kl_penalty`).
        mask: ``[B, T]`` response positions (:func:`response_mask`).
        kl_coef: β (the KL controller's current value).
        gamma, lam: GAE discount and λ.
        whiten: normalise advantages to zero mean, unit variance over the masked positions.
        group: process group the whitening statistics are all-reduced over (data parallel).

    Returns:
        ``(rewards, advantages, returns)``, each ``[B, T]`` float32.
    """
    rewards = per_token_rewards(scores, kl, mask, kl_coef)
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    if whiten:
        from nemo_rlhf.rl.masked import masked_whiten

        advantages = masked_whiten(advantages, mask, group=group)
    return rewards, advantages, returns
