"""Critic: GPT trunk + per-token value head (a ``[B, S, 1]`` scalar head replacing the LM head)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from nemo_rlhf.models.megatron_module import LossFn, MegatronGPTModule, split_microbatches
from nemo_rlhf.models.pipeline_utils import broadcast_from_last_stage


def prefix_values(out: torch.Tensor, pooling: str = "last") -> torch.Tensor:
    """Per-token values ``[b, S, 1]`` from a scalar head's outputs ``out [b, S, 1]``, read the way
    a reward model with that ``model.reward_pooling`` reads its score, so that a critic initialised
    from the reward model starts at V(s_t) = the reward model's score of ``tokens[:, : t + 1]``:

    - ``last``: the head's output at t (``out`` itself);
    - ``mean``: the mean of the head's outputs over positions 0..t (a causal running mean; padding
      after a sequence's end never enters the values of its real positions).

    With ``mean``, reading raw per-token outputs instead would start the critic at each token's
    contribution to the average, not at the value of the prefix, and GAE's TD errors (Schulman et
    al. 2016, eq. 11) would be noise from the first PPO step.

    Raises:
        ValueError: an unknown ``pooling``.
    """
    if pooling == "last":
        return out
    if pooling != "mean":
        raise ValueError(f"reward pooling must be 'last' or 'mean', got {pooling!r}")
    counts = torch.arange(1, out.shape[1] + 1, device=out.device, dtype=out.dtype)
    return out.cumsum(dim=1) / counts[None, :, None]


class GPTCriticModel(MegatronGPTModule):
    """Value function V(s_t) for every token position: ``tokens [B, S] -> values [B, S]`` float32.

    ``values[:, t]`` is the value of the state after reading ``tokens[:, : t + 1]``, i.e. it aligns
    with the actor's log-prob of ``tokens[:, t + 1]``. What a trainer may call: :meth:`values`,
    and :meth:`train_on` / :meth:`evaluate_on` with a value loss (e.g.
    :func:`nemo_rlhf.rl.losses.clipped_value_loss`) whose ``output`` is the values ``[b, S, 1]``.
    The head's outputs become values through :func:`prefix_values` with ``model.reward_pooling``
    (default ``last``: the outputs themselves).
    """

    def __init__(self, model_cfg: Mapping[str, Any], optim_cfg: Mapping[str, Any] | None,
                 vocab_size: int, micro_batch_size: int):
        super().__init__(model_cfg, optim_cfg, vocab_size, micro_batch_size, scalar_head=True)
        self.pooling = str(model_cfg.get("reward_pooling") or "last")

    def _on_values(self, loss_fn: LossFn) -> LossFn:
        return lambda mb, out: loss_fn(mb, prefix_values(out, self.pooling))

    def train_on(self, loss_fn: LossFn, batch: Mapping[str, torch.Tensor] | list[dict],
                 micro_batch_size: int | None = None) -> dict[str, float]:
        """One optimizer step of the value loss ``loss_fn(mb, values [b, S, 1])`` (see
        :meth:`MegatronGPTModule.train_on`)."""
        return super().train_on(self._on_values(loss_fn), batch, micro_batch_size)

    @torch.no_grad()
    def evaluate_on(self, loss_fn: LossFn, batch: Mapping[str, torch.Tensor] | list[dict],
                    micro_batch_size: int | None = None) -> dict[str, float]:
        """Forward-only ``loss_fn(mb, values [b, S, 1])`` (see :meth:`MegatronGPTModule.evaluate_on`)."""
        return super().evaluate_on(self._on_values(loss_fn), batch, micro_batch_size)

    @torch.no_grad()
    def values(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, S]`` int64 -> ``values [B, S]`` float32 on every rank (forward only)."""
        self.model.eval()
        mbs = split_microbatches({"tokens": tokens}, self.microbatch_size_for(tokens.shape[0]))
        outs = self.forward_backward(mbs, self.forward_step,
                                     self._on_values(lambda mb, v: (v.sum() * 0, {"v": v[..., 0].float()})),
                                     forward_only=True)
        v = torch.cat([o["v"] for o in outs]) if outs else None
        return broadcast_from_last_stage(v, tuple(tokens.shape), torch.float32)
