"""Critic: GPT trunk + per-token value head (a ``[B, S, 1]`` scalar head replacing the LM head)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from nemo_rlhf.models.megatron_module import MegatronGPTModule, split_microbatches
from nemo_rlhf.models.pipeline_utils import broadcast_from_last_stage


class GPTCriticModel(MegatronGPTModule):
    """Value function V(s_t) for every token position: ``tokens [B, S] -> values [B, S]`` float32.

    ``values[:, t]`` is the value of the state after reading ``tokens[:, : t + 1]``, i.e. it aligns
    with the actor's log-prob of ``tokens[:, t + 1]``. What a trainer may call: :meth:`values`,
    and :meth:`train_on` with a value loss (e.g. :func:`nemo_rlhf.rl.losses.clipped_value_loss`)
    whose ``output`` is the head's ``[b, S, 1]``.
    """

    def __init__(self, model_cfg: Mapping[str, Any], optim_cfg: Mapping[str, Any] | None,
                 vocab_size: int, micro_batch_size: int):
        super().__init__(model_cfg, optim_cfg, vocab_size, micro_batch_size, scalar_head=True)

    @torch.no_grad()
    def values(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, S]`` int64 -> ``values [B, S]`` float32 on every rank (forward only)."""
        self.model.eval()
        mbs = split_microbatches({"tokens": tokens}, self.microbatch_size_for(tokens.shape[0]))
        outs = self.forward_backward(mbs, self.forward_step,
                                     lambda mb, out: (out.sum() * 0, {"v": out[..., 0].float()}),
                                     forward_only=True)
        v = torch.cat([o["v"] for o in outs]) if outs else None
        return broadcast_from_last_stage(v, tuple(tokens.shape), torch.float32)
