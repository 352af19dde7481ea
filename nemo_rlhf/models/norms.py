"""Torch LayerNorm/RMSNorm usable with megatron sequence parallelism, without apex or TE.

megatron-core's torch fallback (``WrappedTorchNorm``) refuses ``sequence_parallel``. Under SP each
TP rank normalises a different slice of the sequence, so the norm's weight and bias gradients are
partial sums that must be all-reduced over the TP group. megatron's ``finalize_model_grads`` does
exactly that for every parameter tagged ``param.sequence_parallel = True`` (when the model is
wrapped in megatron's ``DistributedDataParallel``). This class builds the plain torch norm and sets
that tag, which is all apex's ``FusedLayerNorm`` does differently for SP.
"""

from __future__ import annotations

import torch


class TPAwareNorm:
    """Factory with megatron's norm signature returning ``torch.nn.LayerNorm`` or ``RMSNorm``.

    Args:
        config: ``TransformerConfig`` (uses ``normalization`` and ``sequence_parallel``).
        hidden_size: normalised dimension H; input ``[S(/TP), B, H]``.
        eps: epsilon.

    Raises:
        ValueError: unsupported ``config.normalization`` or ``zero_centered_gamma``.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str | None = None):
        if config.layernorm_zero_centered_gamma or zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma is not supported by the torch norms")
        kind = normalization or config.normalization
        if kind == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif kind == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"model.normalization={kind!r}: LayerNorm or RMSNorm")
        for param in norm.parameters():
            setattr(param, "sequence_parallel", bool(config.sequence_parallel))
        return norm
