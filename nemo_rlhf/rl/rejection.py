"""Rejection sampling and best-of-n: which of ``n`` scored responses per prompt to keep, and the
best-of-n reward curve.

Rejection-sampling fine-tuning (Touvron et al. 2023, "Llama 2", §3.2.3: sample K answers per
prompt, keep the best under the reward model, fine-tune on them; Dong et al. 2023, "RAFT", Alg. 1;
trlX's RFT) keeps per prompt the argmax of the reward (:func:`select_best`) or every response
whose reward reaches a threshold (:func:`select_threshold`). Best-of-n evaluation (Nakano et al.
2021, "WebGPT", §5; Stiennon et al. 2020, §4.1) reports the expected reward of the best of ``n``
samples as ``n`` grows (:func:`best_of_n_curve`).

All functions take ``scores [P, N]``: row ``p`` holds the rewards of the ``N`` responses sampled for
prompt ``p`` (float, any finite values, arbitrary units of the reward).
"""

from __future__ import annotations

from typing import Sequence

import torch


def _check_scores(scores: torch.Tensor, name: str) -> None:
    if scores.dim() != 2 or scores.shape[1] < 1:
        raise ValueError(f"{name}: scores must be [P, N] with N >= 1, got shape {list(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{name}: scores hold a non-finite value")


def select_best(scores: torch.Tensor) -> torch.Tensor:
    """Keep the best response of each prompt (Llama 2 §3.2.3; RAFT Alg. 1 with one kept per prompt).

    Args:
        scores: ``[P, N]`` float rewards.

    Returns:
        ``[P, N]`` bool, exactly one True per row: the argmax (the first one on ties).

    Raises:
        ValueError: ``scores`` not ``[P, N]`` with N >= 1, or non-finite.
    """
    _check_scores(scores, "select_best")
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[torch.arange(scores.shape[0]), scores.argmax(dim=1)] = True  # torch.argmax: first maximal index
    return keep


def select_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep every response whose reward is at least ``threshold`` (RAFT's reward filtering, trlX
    RFT's score cut; a prompt may keep none or several).

    Args:
        scores: ``[P, N]`` float rewards.
        threshold: the smallest reward kept (same units as ``scores``).

    Returns:
        ``[P, N]`` bool, True where ``scores >= threshold``.

    Raises:
        ValueError: ``scores`` not ``[P, N]`` or non-finite, or a non-finite ``threshold``.
    """
    _check_scores(scores, "select_threshold")
    threshold = float(threshold)
    if threshold != threshold or threshold in (float("inf"), float("-inf")):
        raise ValueError(f"select_threshold: threshold must be finite, got {threshold}")
    return scores >= threshold


def best_of_n_index(scores: torch.Tensor, n: int) -> torch.Tensor:
    """The best response of each disjoint block of ``n`` samples: the ``N`` samples of a prompt are
    split in order into ``N / n`` blocks of ``n`` and each block's argmax (first on ties) taken.

    Args:
        scores: ``[P, N]`` float rewards.
        n: block size, dividing ``N``.

    Returns:
        ``[P, N / n]`` int64 indices into the ``N`` columns.

    Raises:
        ValueError: bad ``scores``, ``n < 1`` or ``n`` not dividing ``N``.
    """
    _check_scores(scores, "best_of_n_index")
    p, total = scores.shape
    if n < 1 or total % n:
        raise ValueError(f"best_of_n: n={n} must be >= 1 and divide the {total} samples per prompt")
    blocks = scores.reshape(p, total // n, n)
    return blocks.argmax(dim=2) + torch.arange(0, total, n, device=scores.device)


def best_of_n_curve(scores: torch.Tensor, ns: Sequence[int]) -> dict[int, float]:
    """Mean best-of-n reward for each ``n`` in ``ns``: ``mean_p mean_b max_{i in block b} r_{p,i}``
    over the disjoint blocks of :func:`best_of_n_index` (all ``N`` samples are used for every ``n``,
    an unbiased estimate of ``E[max of n i.i.d. samples]`` with lower variance than one block).

    Args:
        scores: ``[P, N]`` float rewards (``N`` i.i.d. samples per prompt).
        ns: block sizes, each dividing ``N`` (e.g. 1, 4, 16 with N = 16).

    Returns:
        ``{n: mean best-of-n reward}`` (Python floats, the units of ``scores``).

    Raises:
        ValueError: as :func:`best_of_n_index`.
    """
    out = {}
    for n in ns:
        idx = best_of_n_index(scores, int(n))
        out[int(n)] = float(scores.double().gather(1, idx).mean())
    return out
