"""Critic-free advantages: GRPO / Dr.GRPO, RLOO, REINFORCE++, and the DAPO reward/sampling helpers.

Group layout: a batch of ``B = n_groups * num_generations`` responses holds the
``num_generations`` (G) responses to one prompt contiguously: rows ``g*G .. g*G + G - 1`` are
group ``g`` (``scores.view(n_groups, G)``), as TRL's and OpenRLHF's samplers lay them out.
Group statistics never cross a group boundary, so a data-parallel split must keep whole groups.

Sequence-level advantages are ``[B]``; :func:`broadcast_to_tokens` spreads them over the response
tokens ``[B, T]`` (GRPO's "outcome supervision": every token of a response gets its advantage).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nemo_rlhf.rl.advantages import _acc_dtype, compute_gae, per_token_rewards
from nemo_rlhf.rl.masked import as_bool_mask, check_float, check_same_shape, masked_whiten


def _check_finite(name: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Raise ``ValueError`` naming ``name`` and the first bad indices when ``x`` has inf/NaN (where ``mask``)."""
    bad = ~torch.isfinite(x)
    if mask is not None:
        bad = bad & mask
    if bool(bad.any()):
        idx = torch.nonzero(bad)[:5].tolist()
        idx = [i[0] if len(i) == 1 else tuple(i) for i in idx]
        raise ValueError(f"{name} must be finite; non-finite values at indices {idx} (first {len(idx)} shown)")


def _grouped(scores: torch.Tensor, num_generations: int, min_generations: int = 2) -> torch.Tensor:
    """Validate ``scores [B]`` and return it as ``[n_groups, G]`` in float32 (float64 stays float64)."""
    check_float("scores", scores)
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"scores must be [B] with B > 0, got shape {tuple(scores.shape)}")
    if isinstance(num_generations, bool) or not isinstance(num_generations, int):
        raise TypeError(f"num_generations must be an int, got {num_generations!r}")
    if num_generations < min_generations:
        raise ValueError(
            f"num_generations must be >= {min_generations} (a group of one response has no baseline: "
            f"every advantage would be 0), got {num_generations}"
        )
    if scores.numel() % num_generations:
        raise ValueError(
            f"scores has B={scores.numel()} rows, not a multiple of num_generations={num_generations} "
            "(B must be n_groups * num_generations, groups contiguous)"
        )
    _check_finite("scores", scores)
    return scores.to(_acc_dtype(scores)).view(-1, num_generations)


@torch.no_grad()
def grpo_advantages(
    scores: torch.Tensor,
    num_generations: int,
    scale_by_std: bool = True,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Group-relative advantages of GRPO (and Dr.GRPO with ``scale_by_std=False``).

    Shao et al. 2024, "DeepSeekMath", §4.1.2 (outcome supervision), for response ``i`` of a group
    of ``G`` responses to the same prompt::

        A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)

    ``std`` is the sample standard deviation (Bessel-corrected, ``torch.std``'s default, as in TRL,
    veRL and OpenRLHF); ``eps`` keeps a group of identical rewards at ``A = 0``. Liu et al. 2025,
    "Understanding R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO) drop the division:
    ``A_i = r_i - mean(r_1..r_G)`` (``scale_by_std=False``; ``eps`` unused).

    Args:
        scores: float ``[B]`` sequence rewards, ``B = n_groups * num_generations``, groups
            contiguous (see the module docstring).
        num_generations: ``G >= 2``, responses per prompt.
        scale_by_std: divide by the group's ``std + eps`` (GRPO); False for Dr.GRPO.
        eps: added to the std (reward units), ``> 0``. The default 1e-4 is TRL's.

    Returns:
        ``[B]`` advantages, no grad, float32 (float64 for float64 ``scores``).

    Raises:
        TypeError: non-float ``scores`` or non-int ``num_generations``.
        ValueError: ``scores`` not 1-D / empty / not finite, ``B`` not a multiple of
            ``num_generations``, ``num_generations < 2``, or ``eps <= 0`` with ``scale_by_std``.
    """
    if scale_by_std and not eps > 0:
        raise ValueError(f"eps must be > 0 when scale_by_std (a group of equal rewards has std 0), got {eps}")
    r = _grouped(scores, num_generations)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


@torch.no_grad()
def rloo_advantages(scores: torch.Tensor, num_generations: int) -> torch.Tensor:
    """REINFORCE Leave-One-Out advantages.

    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
    from Human Feedback in LLMs", the RLOO estimator (after Kool et al. 2019): each response's
    baseline is the mean reward of the *other* ``G - 1`` responses to the same prompt::

        A_i = r_i - 1/(G-1) * sum_{j != i} r_j   ( = G/(G-1) * (r_i - mean(r_1..r_G)) )

    A KL penalty belongs in ``scores`` beforehand (the paper's ``r - beta * KL`` sequence reward).

    Args:
        scores: float ``[B]`` sequence rewards, ``B = n_groups * num_generations``, groups contiguous.
        num_generations: ``G >= 2``, responses per prompt.

    Returns:
        ``[B]`` advantages, no grad, float32 (float64 for float64 ``scores``).

    Raises:
        TypeError, ValueError: as for :func:`grpo_advantages`.
    """
    r = _grouped(scores, num_generations)
    baseline = (r.sum(dim=1, keepdim=True) - r) / (num_generations - 1)
    return (r - baseline).reshape(-1)


def broadcast_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Spread sequence advantages ``[B]`` over response tokens: ``out[b, t] = advantages[b] * [mask[b, t]]``.

    GRPO outcome supervision (Shao et al. 2024, §4.1.2): ``A_{i,t} = A_i`` for every token ``t`` of
    response ``i``.

    Args:
        advantages: float ``[B]``.
        mask: bool/numeric ``[B, T]``, nonzero at response tokens.

    Returns:
        ``[B, T]`` with ``advantages``' dtype; 0 where ``mask`` is 0.

    Raises:
        TypeError: non-float ``advantages``.
        ValueError: ``advantages`` not ``[B]`` or ``mask`` not ``[B, T]``.
    """
    check_float("advantages", advantages)
    m = as_bool_mask(mask)
    if m.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(m.shape)}")
    if advantages.shape != (m.shape[0],):
        raise ValueError(f"advantages must be [B] = [{m.shape[0]}], got shape {tuple(advantages.shape)}")
    zero = torch.zeros((), dtype=advantages.dtype, device=advantages.device)
    return torch.where(m, advantages.unsqueeze(1), zero)


@torch.no_grad()
def reinforce_pp_advantages(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    gamma: float = 1.0,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """REINFORCE++ advantages: KL-penalised token rewards -> return-to-go -> batch whitening.

    Hu et al. 2025, "REINFORCE++" (arXiv 2501.03262): token-level KL penalty in the reward and
    global (batch) advantage normalisation, no critic::

        r_t   = -kl_coef * KL_t  (+ score at the last response token)       (as Ziegler et al. 2019)
        G_t   = sum_{l >= 0} gamma^l * r_{t+l}                              (return-to-go)
        A_t   = (G_t - mean_batch(G)) / sqrt(var_batch(G) + 1e-8)           (over all valid tokens)

    With ``gamma = 1`` this is the paper's ``A_t = r(x, y) - beta * sum_{i >= t} KL_i``, normalised.
    The statistics are over every valid token of the batch (all-reduced over ``group`` when given),
    with the biased variance of :func:`~nemo_rlhf.rl.masked.masked_whiten`.

    Args:
        scores: float ``[B]`` sequence rewards.
        kl: float ``[B, T]`` per-token KL estimates (nats), e.g.
            :func:`~nemo_rlhf.rl.kl.kl_penalty` of rollout and reference log-probs.
        mask: bool/numeric ``[B, T]`` response tokens, one contiguous run per row, no empty row.
        kl_coef: ``beta >= 0``.
        gamma: discount in ``[0, 1]`` (1 in the paper).
        group: data-parallel process group the whitening statistics are reduced over.

    Returns:
        ``(rewards, advantages, returns)``, each ``[B, T]`` float32 (float64 for float64 inputs),
        no grad, 0 where ``mask`` is 0.

    Raises:
        TypeError: non-float ``scores``/``kl``.
        ValueError: bad shapes, non-finite ``scores`` or ``kl`` at valid tokens, ``kl_coef < 0``,
            ``gamma`` outside ``[0, 1]``, a row with no valid token or with gaps.
        RuntimeError: ``group`` given but ``torch.distributed`` not initialized.
    """
    check_float("scores", scores)
    check_float("kl", kl)
    m = as_bool_mask(mask)
    check_same_shape("kl", kl, "mask", m)
    _check_finite("scores", scores)
    _check_finite("kl", kl, m)
    rewards = per_token_rewards(scores, kl, m, kl_coef)
    returns, _ = compute_gae(rewards, torch.zeros_like(rewards), m, gamma, lam=1.0)  # V = 0: A = G_t
    advantages = masked_whiten(returns, m, group=group)
    return rewards, advantages, returns


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO soft overlong punishment (Yu et al. 2025, "DAPO", §3.4, eq. 13), added to the reward::

        R_length(y) = 0                                   if |y| <= L_max - L_cache
                    = ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
                    = -1                                  if |y| > L_max

    Args:
        lengths: ``[B]`` response lengths ``|y|`` in tokens (int or float tensor).
        max_len: ``L_max`` (tokens), ``> cache_len``.
        cache_len: ``L_cache`` (tokens), the width of the linear ramp, ``> 0``.

    Returns:
        ``[B]`` float32 penalties in ``[-1, 0]``.

    Raises:
        TypeError: ``lengths`` not a tensor.
        ValueError: ``lengths`` not 1-D, negative or non-finite; ``cache_len <= 0`` or
            ``max_len <= cache_len``.
    """
    if not torch.is_tensor(lengths):
        raise TypeError(f"lengths must be a torch.Tensor, got {type(lengths).__name__}")
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be [B], got shape {tuple(lengths.shape)}")
    if not cache_len > 0:
        raise ValueError(f"cache_len must be > 0, got {cache_len}")
    if not max_len > cache_len:
        raise ValueError(f"max_len must be > cache_len={cache_len}, got {max_len}")
    n = lengths.to(torch.float64 if lengths.dtype == torch.float64 else torch.float32)
    _check_finite("lengths", n)
    if bool((n < 0).any()):
        raise ValueError(f"lengths must be >= 0, got min {n.min().item()}")
    expected = max_len - cache_len
    ramp = (expected - n) / cache_len
    return torch.where(n <= expected, torch.zeros_like(n), torch.where(n <= max_len, ramp, -torch.ones_like(n)))


def dynamic_sampling_mask(scores: torch.Tensor, num_generations: int) -> torch.Tensor:
    """DAPO dynamic-sampling filter: which groups have non-identical rewards.

    Yu et al. 2025, "DAPO", §3.2 (Dynamic Sampling): the objective is constrained to groups with
    ``0 < |{o_i : is_equivalent(a, o_i)}| < G``, i.e. neither all correct nor all wrong; for
    general (real-valued) rewards, groups whose rewards are not all equal.

    A group whose ``G`` rewards are all equal has zero group-relative advantage and gives no policy
    gradient; DAPO drops such groups and samples more prompts to refill the batch.

    Args:
        scores: float ``[B]`` sequence rewards, ``B = n_groups * num_generations``, groups contiguous.
        num_generations: ``G >= 2``.

    Returns:
        bool ``[n_groups]``: True where ``max(r_g) > min(r_g)`` (exact comparison).

    Raises:
        TypeError, ValueError: as for :func:`grpo_advantages`.
    """
    r = _grouped(scores, num_generations)
    return r.amax(dim=1) > r.amin(dim=1)
