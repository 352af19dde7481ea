"""Token log-probs and entropy on vocabulary-parallel logits, without gathering the vocabulary.

Logits arrive as ``[B, T, V/TP]``: each TP rank holds a contiguous slice of the (padded)
vocabulary. Log-softmax needs the partition function over the whole vocabulary, which is an
all-reduce of per-shard sums (the maths of megatron's ``vocab_parallel_cross_entropy``).
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """log p(target) for each position.

    Args:
        logits: ``[B, T, V/TP]`` vocab-parallel logits (any float dtype; computed in fp32).
        targets: ``[B, T]`` int64 token ids in the padded vocabulary.
        inplace: allow overwriting ``logits`` (megatron's kernel writes into its input).

    Returns:
        ``[B, T]`` float32 log-probabilities, differentiable w.r.t. ``logits``.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    x = logits.float()
    if x is logits and not inplace:
        x = x.clone()
    return -vocab_parallel_cross_entropy(x, targets)


def vocab_parallel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy H = log Z - sum_v p_v * z_v of the softmax over the full (TP-sharded) vocabulary.

    Args:
        logits: ``[B, T, V/TP]`` vocab-parallel logits.

    Returns:
        ``[B, T]`` float32 entropy in nats, differentiable. The cross-rank sums use megatron's
        ``reduce_from_tensor_model_parallel_region`` (all-reduce forward, identity backward):
        the entropy, like every megatron loss, is replicated on all TP ranks, so each rank's
        logit shard must receive the plain partial derivative. An all-reduce in the backward
        (``torch.distributed.nn.functional.all_reduce``) would multiply the gradient by TP —
        measured: exactly 2.0x at TP=2 (tests/parallel/test_vocab_parallel_tp.py).
    """
    from megatron.core import parallel_state

    x = logits.float()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
    z_max = x.detach().amax(dim=-1, keepdim=True)
    if group is not None:
        torch.distributed.all_reduce(z_max, op=torch.distributed.ReduceOp.MAX, group=group)
    z = x - z_max
    e = torch.exp(z)
    sum_e = e.sum(dim=-1)
    sum_ez = (e * z).sum(dim=-1)
    if group is not None:
        from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

        sum_e = reduce_from_tensor_model_parallel_region(sum_e)
        sum_ez = reduce_from_tensor_model_parallel_region(sum_ez)
    return torch.log(sum_e) - sum_ez / sum_e


def vocab_parallel_gather(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``values[..., ids]`` of a vocabulary-parallel tensor, without gathering the vocabulary.

    Args:
        values: ``[B, T, V/TP]`` this TP rank's contiguous slice of a vocabulary-sized output (e.g.
            ILQL's Q over the vocabulary), any float dtype.
        ids: ``[B, T]`` int64 ids in the padded vocabulary.

    Returns:
        ``[B, T]`` (``values``' dtype), replicated on every TP rank, differentiable: each rank picks
        the ids inside its slice (0 elsewhere) and the slices are summed with megatron's
        ``reduce_from_tensor_model_parallel_region`` (all-reduce forward, identity backward, so the
        gradient reaches only the rank that holds each id; see :func:`vocab_parallel_entropy`).
        With TP = 1 it is ``values.gather(-1, ids)``.
    """
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return values.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    local, outside = _local_ids(ids, values.shape[-1])
    picked = values.gather(-1, local.unsqueeze(-1)).squeeze(-1)
    picked = picked.masked_fill(outside, 0.0)
    return reduce_from_tensor_model_parallel_region(picked)


def _local_ids(ids: torch.Tensor, shard: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` (padded vocabulary) as indices into this TP rank's ``shard``-long contiguous slice:
    ``(local, outside)``, ``local`` set to 0 where the id lies on another rank (``outside``)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size() if parallel_state.is_initialized() else 1
    local = ids - (parallel_state.get_tensor_model_parallel_rank() * shard if tp > 1 else 0)
    outside = (local < 0) | (local >= shard)
    return local.masked_fill(outside, 0), outside


def vocab_parallel_linear_at(x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    """``(x @ weight.T + bias)[..., ids]`` of a vocabulary-parallel linear, computed only at ``ids``:
    one ``K``-long dot product per position instead of a ``K x V/TP`` matmul (e.g. ILQL's target Q
    heads, whose loss reads Q of the taken actions only).

    Args:
        x: ``[B, T, K]`` inputs (replicated over TP).
        weight: ``[V/TP, K]`` this TP rank's contiguous slice of the output matrix.
        ids: ``[B, T]`` int64 ids in the padded vocabulary.
        bias: ``[V/TP]`` or None.

    Returns:
        ``[B, T]`` float32, replicated on every TP rank: each rank computes the ids inside its slice (0
        elsewhere) and the slices are summed as :func:`vocab_parallel_gather` does. Equal to gathering
        the full product up to float rounding (the sum runs in another order).
    """
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size() if parallel_state.is_initialized() else 1
    local, outside = _local_ids(ids, weight.shape[0])
    out = (weight[local].to(x.dtype) * x).sum(-1)
    if bias is not None:
        out = out + bias[local].to(out.dtype)
    out = out.float().masked_fill(outside, 0.0)
    if tp == 1:
        return out
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(out)
