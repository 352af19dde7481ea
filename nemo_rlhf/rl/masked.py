"""Masked reductions over response tokens.

Conventions used throughout ``nemo_rlhf.rl``:

* ``B`` = batch (rollouts), ``T`` = response-token positions (the positions that carry a
  log-prob / value).
* ``mask`` is a bool or numeric tensor with the same shape as the values (usually ``[B, T]``);
  a position counts when ``mask != 0`` (padding is on the right).

Positions where the mask is 0 are excluded with ``torch.where`` rather than by multiplying with the
mask, so ``inf``/``NaN`` garbage at padded positions can neither leak into the result nor into its
gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Raise ``ValueError`` naming both fields when ``a.shape != b.shape``."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_float(name: str, x: torch.Tensor) -> None:
    """Raise ``TypeError`` naming the field when ``x`` is not a floating-point tensor."""
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """Return ``mask`` as a bool tensor (``True`` where ``mask != 0``)."""
    if not torch.is_tensor(mask):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    return mask if mask.dtype == torch.bool else mask != 0


def _prepare(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    check_float("values", values)
    m = as_bool_mask(mask)
    check_same_shape("values", values, "mask", m)
    return m


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``values`` over the positions where ``mask`` is set.

    Args:
        values: float tensor, e.g. ``[B, T]``, any float dtype.
        mask: bool/numeric tensor of the same shape; nonzero = counted.
        dim: dimension to reduce; ``None`` reduces over all elements (0-dim result).

    Returns:
        Tensor with ``values.dtype``: 0-dim when ``dim is None``, else ``values`` with ``dim``
        removed (e.g. ``[B]`` for ``dim=1``). Empty masks give 0.

    Raises:
        TypeError: ``values`` is not a float tensor.
        ValueError: ``values`` and ``mask`` shapes differ.
    """
    m = _prepare(values, mask)
    return torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is set (token mean).

    Args:
        values: float tensor, e.g. ``[B, T]``, any float dtype.
        mask: bool/numeric tensor of the same shape; nonzero = counted.
        dim: dimension to reduce; ``None`` averages over all masked elements (0-dim result).

    Returns:
        Tensor with ``values.dtype``, shaped as for :func:`masked_sum`.

    Raises:
        TypeError: ``values`` is not a float tensor.
        ValueError: shapes differ, or the mask selects no element (in any reduced slice when
            ``dim`` is given) — the mean would be NaN.
    """
    m = _prepare(values, mask)
    count = m.sum(dim=dim)
    if bool((count == 0).any()):
        where = "" if dim is None else f" along dim={dim} (empty slices: {int((count == 0).sum())})"
        raise ValueError(f"masked_mean: mask selects no element{where}")
    total = torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(dim=dim)
    return total / count.to(values.dtype)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over all masked positions (two-pass: mean, then squared deviations).

    Args:
        values: float tensor, e.g. ``[B, T]``.
        mask: bool/numeric tensor of the same shape; nonzero = counted.
        unbiased: apply Bessel's correction ``n / (n - 1)``.

    Returns:
        0-dim tensor with ``values.dtype`` (differentiable).

    Raises:
        ValueError: shapes differ, the mask is empty, or ``unbiased`` with a single element.
    """
    m = _prepare(values, mask)
    n = int(m.sum())
    if n == 0:
        raise ValueError("masked_var: mask selects no element")
    if unbiased and n < 2:
        raise ValueError("masked_var: unbiased variance needs at least 2 masked elements, got 1")
    mean = masked_mean(values, m)
    var = masked_sum((values - mean) ** 2, m) / n
    return var * (n / (n - 1)) if unbiased else var


def _global_mean_var(
    values: torch.Tensor, mask: torch.Tensor, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked mean and biased variance (float32 or float64), reduced over ``group`` when given."""
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    x = values.detach().to(acc)
    zero = torch.zeros((), dtype=acc, device=x.device)
    # Pass 1: sum and count -> mean. Pass 2: sum of squared deviations -> variance. Two small
    # all-reduces instead of one (sum, sum of squares, count): no cancellation in float32.
    sum_count = torch.stack([torch.where(mask, x, zero).sum(), mask.sum().to(acc)])
    if group is not None:
        dist.all_reduce(sum_count, op=dist.ReduceOp.SUM, group=group)
    total, count = sum_count[0], sum_count[1]
    if float(count) == 0:  # same global count on every rank: all ranks raise together
        where = " on any rank of group" if group is not None else ""
        raise ValueError(f"masked_whiten: mask selects no element{where}")
    mean = total / count
    sq = torch.where(mask, (x - mean) ** 2, zero).sum()
    if group is not None:
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=group)
    return mean, sq / count


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Normalise ``values`` to zero mean and unit variance over the masked positions.

    ``out = (values - mean) / sqrt(var + eps)`` (plus ``mean`` again when ``shift_mean=False``),
    with the biased (population) variance, as in OpenAI lm-human-preferences and NeMo-Aligner.
    Typically applied to GAE advantages before the PPO policy loss.

    The statistics are computed without gradient in float32 (float64 for float64 input) and
    treated as constants; the output is differentiable w.r.t. ``values`` through the affine map.

    Args:
        values: float tensor ``[B, T]`` (any shape equal to ``mask``'s), any float dtype.
        mask: bool/numeric tensor of the same shape; nonzero = counted.
        shift_mean: if False, add the mean back (scale only).
        eps: added to the variance before the square root.
        group: a ``torch.distributed`` process group (e.g. the data-parallel group). When given,
            sum, count and sum of squared deviations are all-reduced over it, so the result on each
            rank equals whitening the concatenation of all ranks' batches. All ranks of ``group``
            must call this function. A rank may hold an empty local mask.

    Returns:
        Tensor with the shape and dtype of ``values``; masked-out positions are 0.

    Raises:
        TypeError: ``values`` is not a float tensor.
        ValueError: shapes differ, or the mask selects no element (globally over ``group``).
        RuntimeError: ``group`` is given but ``torch.distributed`` is not initialized.
    """
    m = _prepare(values, mask)
    if group is not None and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("masked_whiten: group was given but torch.distributed is not initialized")
    mean, var = _global_mean_var(values, m, group)
    x = values.to(mean.dtype)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros((), dtype=out.dtype, device=out.device)).to(values.dtype)
