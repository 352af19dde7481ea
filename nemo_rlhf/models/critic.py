"""Critic: GPT trunk + per-token value head, trained with the clipped value loss."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from nemo_rlhf.models.megatron_module import (
    MegatronGPTModule,
    position_ids_like,
    split_microbatches,
)
from nemo_rlhf.models.pipeline_utils import broadcast_from_last_stage
from nemo_rlhf.rl.losses import clipped_value_loss


class GPTCriticModel(MegatronGPTModule):
    """Value function V(s_t) for every token position: ``tokens [B, S] -> values [B, S]`` float32.

    ``values[:, t]`` is the value of the state after reading ``tokens[:, : t + 1]``, i.e. it aligns
    with the actor's log-prob of ``tokens[:, t + 1]``. Trained with the clipped value loss
    (:func:`nemo_rlhf.rl.losses.clipped_value_loss`).
    """

    def __init__(self, model_cfg: Mapping[str, Any], optim_cfg: Mapping[str, Any] | None,
                 vocab_size: int, micro_batch_size: int, value_clip: float | None = 0.2):
        super().__init__(model_cfg, optim_cfg, vocab_size, scalar_head=True)
        self.micro_batch_size = int(micro_batch_size)
        self.value_clip = value_clip

    @staticmethod
    def _forward(model, mb):
        return model(mb["tokens"], position_ids_like(mb["tokens"]), None)

    @torch.no_grad()
    def values(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, S]`` int64 -> ``values [B, S]`` float32 on every rank (forward only)."""
        self.model.eval()
        mbs = split_microbatches({"tokens": tokens}, self.microbatch_size_for(tokens.shape[0]))
        outs = self.forward_backward(mbs, self._forward,
                                     lambda mb, out: (out.sum() * 0, {"v": out[..., 0].float()}),
                                     forward_only=True)
        v = torch.cat([o["v"] for o in outs]) if outs else None
        return broadcast_from_last_stage(v, tuple(tokens.shape), torch.float32)

    def train_step(self, tokens: torch.Tensor, returns: torch.Tensor, prev_values: torch.Tensor,
                   mask: torch.Tensor) -> dict[str, float]:
        """One optimizer step of the clipped value loss on ``[B, S]`` inputs; returns metrics."""
        batch = {"tokens": tokens, "returns": returns.float(), "prev_values": prev_values.float(),
                 "mask": mask.float()}
        clip = self.value_clip

        def loss_fn(mb, out):
            loss, stats = clipped_value_loss(out[..., 0].float(), mb["prev_values"], mb["returns"],
                                             mb["mask"], clip_eps=clip)
            return loss, {"loss": loss.detach(), **{k: v.detach() for k, v in stats.items()}}

        return self.train_global_batch(batch, self.microbatch_size_for(tokens.shape[0]), self._forward, loss_fn)
