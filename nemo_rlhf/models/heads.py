"""Scalar heads (per-token value, sequence reward) as megatron tensor-parallel layers.

A head replaces ``GPTModel.output_layer`` on the last pipeline stage, so ``GPTModel.forward``
returns ``[B, S, 1]`` head outputs instead of vocabulary logits, with the final norm, PP and the
checkpoint layout unchanged. The projection is a ``RowParallelLinear(H -> 1)``: each TP rank
multiplies its slice of the hidden dimension and the partial sums are all-reduced, so the head is
exact under any TP. Under sequence parallelism the hidden states arrive split along the sequence;
they are all-gathered first (the backward splits the gradient, it does not sum it, because every
TP rank already holds the full gradient after the row-parallel layer's input scatter).
"""

from __future__ import annotations

import torch

from nemo_rlhf.models.builder import config_without_sequence_parallel


def _scalar_head_class():
    from megatron.core import tensor_parallel

    class ScalarHead(tensor_parallel.RowParallelLinear):
        """``[S(/TP), B, H] -> [S, B, 1]`` linear head, TP-exact, SP-aware.

        A ``RowParallelLinear(H -> 1)`` with ``input_is_parallel=False`` (parameters
        ``weight [1, H/TP]`` and ``bias [1]``, so the checkpoint keys are ``output_layer.weight``
        and ``output_layer.bias``).

        Args:
            config: the trunk's ``TransformerConfig``.
            init_std: std of the normal weight init (bias starts at 0).
        """

        def __init__(self, config, init_std: float | None = None):
            std = config.init_method_std if init_std is None else init_std
            super().__init__(
                config.hidden_size,
                1,
                config=config_without_sequence_parallel(config),
                init_method=lambda w: torch.nn.init.normal_(w, mean=0.0, std=std),
                bias=True,
                input_is_parallel=False,
                skip_bias_add=False,
            )
            self.gather_sequence = config.sequence_parallel

        def forward(self, hidden_states: torch.Tensor, weight=None, runtime_gather_output=None):
            """Returns ``(out [S, B, 1], None)`` — the ``output_layer`` calling convention."""
            if self.gather_sequence:
                from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

                hidden_states = gather_from_sequence_parallel_region(
                    hidden_states, tensor_parallel_output_grad=False
                )
            out, _ = super().forward(hidden_states)
            return out, None

    return ScalarHead


def attach_scalar_head(model, init_std: float | None = None):
    """Replace ``model.output_layer`` with a :class:`ScalarHead` on the last PP stage (in place).

    The model must have been built with ``share_embeddings_and_output_weights=False``.

    Returns:
        the same model; its forward now returns ``[B, S, 1]`` on the last stage.

    Raises:
        ValueError: if the model ties its output layer to the embedding.
    """
    if model.share_embeddings_and_output_weights:
        raise ValueError("a scalar-head model must be built with share_embeddings_and_output_weights=False")
    if model.post_process:
        model.output_layer = _scalar_head_class()(model.config, init_std)
    return model
