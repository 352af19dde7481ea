"""Validation of a TP x PP x DP layout against the model and batch sizes, before anything starts."""

from __future__ import annotations

from typing import Any, Mapping


class LayoutError(ValueError):
    """A parallel layout or batch configuration that cannot work; the message lists every violation."""


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


def validate_layout(
    model_cfg: Mapping[str, Any],
    world_size: int,
    global_batch_size: int | None = None,
    micro_batch_size: int | None = None,
    prefix: str = "model",
    batch_prefix: str = "batch",
) -> int:
    """Check a parallel layout and return the data-parallel size DP = world / (TP * PP).

    Checks: heads % TP, query groups % TP, layers % PP, world size = TP * PP * DP,
    SP requires TP > 1, global batch % (micro-batch * DP).

    Args:
        model_cfg: the ``model:`` config (num_layers, num_attention_heads, num_query_groups,
            tensor_model_parallel_size, pipeline_model_parallel_size, sequence_parallel).
        world_size: number of processes that hold this model.
        global_batch_size: samples per optimizer step over all DP ranks (optional).
        micro_batch_size: samples per micro-batch per DP rank (optional).
        prefix: config path of the model fields in messages (e.g. ``"model"``).
        batch_prefix: config path of the batch-size fields in messages.

    Raises:
        LayoutError: naming every offending field and its value.
    """
    tp = int(_get(model_cfg, "tensor_model_parallel_size", 1))
    pp = int(_get(model_cfg, "pipeline_model_parallel_size", 1))
    sp = bool(_get(model_cfg, "sequence_parallel", False))
    heads = int(model_cfg["num_attention_heads"])
    groups = int(_get(model_cfg, "num_query_groups", heads))
    layers = int(model_cfg["num_layers"])
    errors: list[str] = []
    if tp < 1 or pp < 1:
        errors.append(f"{prefix}.tensor_model_parallel_size={tp} and "
                      f"{prefix}.pipeline_model_parallel_size={pp} must be >= 1")
    else:
        if heads % tp:
            errors.append(f"{prefix}.num_attention_heads={heads} is not divisible by "
                          f"{prefix}.tensor_model_parallel_size={tp}")
        if groups % tp:
            errors.append(f"{prefix}.num_query_groups={groups} is not divisible by "
                          f"{prefix}.tensor_model_parallel_size={tp}")
        if layers % pp:
            errors.append(f"{prefix}.num_layers={layers} is not divisible by "
                          f"{prefix}.pipeline_model_parallel_size={pp}")
        if world_size % (tp * pp):
            errors.append(f"world size {world_size} is not TP*PP*DP: {prefix}.tensor_model_parallel_size"
                          f"={tp} * {prefix}.pipeline_model_parallel_size={pp} = {tp * pp} does not "
                          f"divide it")
    if heads % groups:
        errors.append(f"{prefix}.num_attention_heads={heads} is not divisible by "
                      f"{prefix}.num_query_groups={groups}")
    if sp and tp == 1:
        errors.append(f"{prefix}.sequence_parallel=true requires "
                      f"{prefix}.tensor_model_parallel_size > 1 (got {tp})")
    dp = max(world_size // max(tp * pp, 1), 1)
    if global_batch_size is not None and micro_batch_size is not None:
        if micro_batch_size < 1:
            errors.append(f"{batch_prefix}.micro_batch_size={micro_batch_size} must be >= 1")
        elif global_batch_size % (micro_batch_size * dp):
            errors.append(f"{batch_prefix}.global_batch_size={global_batch_size} is not divisible by "
                          f"{batch_prefix}.micro_batch_size={micro_batch_size} * data-parallel size {dp}")
    if errors:
        raise LayoutError("invalid parallel layout:\n  - " + "\n  - ".join(errors))
    return dp
