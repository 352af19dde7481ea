"""Actor (policy): response-token log-probs, KV-cache sampling, PPO clipped surrogate + entropy bonus."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from nemo_rlhf.generation.sampling import GenerationOutput, SamplingParams, generate
from nemo_rlhf.models.megatron_module import (
    MegatronGPTModule,
    position_ids_like,
    split_microbatches,
)
from nemo_rlhf.models.pipeline_utils import broadcast_from_last_stage
from nemo_rlhf.models.vocab_parallel import token_logprobs, vocab_parallel_entropy
from nemo_rlhf.rl.losses import ppo_policy_loss
from nemo_rlhf.rl.masked import masked_mean


def mask_padded_vocab(logits: torch.Tensor, unpadded_vocab: int | None) -> torch.Tensor:
    """Return ``logits`` with the vocabulary padding (ids >= ``unpadded_vocab``) set to -1e9.

    ``logits [..., V/TP]`` is this TP rank's slice of the padded vocabulary. A finite value keeps
    ``p * log p`` at 0 (no NaN) in the entropy.
    """
    if unpadded_vocab is None:
        return logits
    from megatron.core import parallel_state

    shard = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    if start + shard <= unpadded_vocab:
        return logits
    cols = torch.arange(start, start + shard, device=logits.device)
    return logits.masked_fill(cols >= unpadded_vocab, -1e9)


class GPTActorModel(MegatronGPTModule):
    """Policy model. Also used, frozen (``optim_cfg=None``), as the reference policy.

    Log-prob convention: ``logprobs[:, t] = log pi(tokens[:, t+1] | tokens[:, :t+1])``, shape
    ``[B, S-1]``; the response positions of a row with prompt length P and total length L are
    ``t in [P-1, L-2]``.
    """

    def __init__(self, model_cfg: Mapping[str, Any], optim_cfg: Mapping[str, Any] | None,
                 vocab_size: int, micro_batch_size: int, eos_id: int, pad_id: int):
        super().__init__(model_cfg, optim_cfg, vocab_size)
        self.micro_batch_size = int(micro_batch_size)
        self.eos_id = int(eos_id)
        self.pad_id = int(pad_id)

    @staticmethod
    def _forward(model, mb):
        return model(mb["tokens"], position_ids_like(mb["tokens"]), None)

    @torch.no_grad()
    def logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, S]`` -> ``[B, S-1]`` float32 log-probs of each next token, on every rank."""
        self.model.eval()
        vocab = self.gpt.unpadded_vocab_size

        def loss_fn(mb, logits):
            logits = mask_padded_vocab(logits[:, :-1].float(), vocab).clone()
            return logits.sum() * 0, {"lp": token_logprobs(logits, mb["tokens"][:, 1:], inplace=True)}

        outs = self.forward_backward(split_microbatches({"tokens": tokens}, self.microbatch_size_for(tokens.shape[0])),
                                     self._forward, loss_fn, forward_only=True)
        lp = torch.cat([o["lp"] for o in outs]) if outs else None
        b, s = tokens.shape
        return broadcast_from_last_stage(lp, (b, s - 1), torch.float32)

    def generate(self, prompts: torch.Tensor, prompt_lengths: torch.Tensor,
                 params: SamplingParams) -> GenerationOutput:
        """Sample responses (see :func:`nemo_rlhf.generation.sampling.generate`)."""
        return generate(self, prompts, prompt_lengths, params, eos_id=self.eos_id, pad_id=self.pad_id)

    def ppo_step(self, batch: Mapping[str, torch.Tensor], clip_eps: float, entropy_coef: float,
                 clip_eps_high: float | None = None) -> dict[str, float]:
        """One optimizer step of the PPO loss on a mini-batch.

        Args:
            batch: ``tokens [b, S]`` int64, ``old_logprobs [b, S-1]``, ``advantages [b, S-1]``,
                ``mask [b, S-1]`` (response positions).
            clip_eps: PPO ratio clip (Schulman et al. 2017, eq. 7).
            entropy_coef: weight of the entropy bonus (subtracted from the loss).

        Returns:
            metrics: ``loss``, ``pg_loss``, ``entropy``, ``clipfrac``, ``approx_kl``,
            ``ratio_mean``, ``grad_norm``, ``lr``, ``skipped``.
        """
        vocab = self.gpt.unpadded_vocab_size

        def loss_fn(mb, logits):
            logits = mask_padded_vocab(logits[:, :-1].float(), vocab)
            entropy = vocab_parallel_entropy(logits) if entropy_coef else None
            lp = token_logprobs(logits, mb["tokens"][:, 1:])
            pg_loss, stats = ppo_policy_loss(lp, mb["old_logprobs"], mb["advantages"], mb["mask"],
                                             clip_eps=clip_eps, clip_eps_high=clip_eps_high)
            loss = pg_loss
            metrics = {"pg_loss": pg_loss, **stats}
            if entropy is not None:
                ent = masked_mean(entropy, mb["mask"])
                loss = loss - entropy_coef * ent
                metrics["entropy"] = ent
            metrics["loss"] = loss
            return loss, metrics

        return self.train_global_batch(dict(batch), self.microbatch_size_for(batch["tokens"].shape[0]),
                                       self._forward, loss_fn)
