"""The policy (actor, SFT model, reference policy): a megatron GPT language model.

What a trainer may call: :meth:`GPTPolicyModel.generate` (KV-cache sampling),
:meth:`GPTPolicyModel.logprobs` (per-token log-probs of given tokens),
:meth:`~nemo_rlhf.models.megatron_module.MegatronGPTModule.train_on` /
:meth:`~nemo_rlhf.models.megatron_module.MegatronGPTModule.evaluate_on` with the trainer's loss.
The losses themselves (SFT NLL, PPO clipped surrogate, ...) live in :mod:`nemo_rlhf.rl`; this
module only turns logits into token log-probs / entropies, vocabulary-parallel.

Log-prob convention: ``logprobs[:, t] = log pi(tokens[:, t+1] | tokens[:, :t+1])``, shape
``[B, S-1]``; the response positions of a row with prompt length P and total length L are
``t in [P-1, L-2]``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from nemo_rlhf.generation.sampling import GenerationOutput, SamplingParams, generate
from nemo_rlhf.models.megatron_module import MegatronGPTModule, position_ids_like, split_microbatches
from nemo_rlhf.models.pipeline_utils import broadcast_from_last_stage
from nemo_rlhf.models.vocab_parallel import token_logprobs, vocab_parallel_entropy


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


def shift_labels(tokens: torch.Tensor, loss_mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token labels: ``labels[:, t] = tokens[:, t+1]``; the mask moves with them.

    Args:
        tokens: ``[B, S]`` int64.
        loss_mask: ``[B, S]`` float, 1 on tokens that count (response tokens and EOS).

    Returns:
        labels ``[B, S]`` int64 (last column = pad_id) and label mask ``[B, S]`` float32 (last
        column 0): position t is trained to predict token t+1 when token t+1 is a response token.
    """
    labels = torch.full_like(tokens, pad_id)
    labels[:, :-1] = tokens[:, 1:]
    mask = torch.zeros_like(loss_mask, dtype=torch.float32)
    mask[:, :-1] = loss_mask[:, 1:].float()
    return labels, mask


class GPTPolicyModel(MegatronGPTModule):
    """Policy model; also used frozen (``optim_cfg=None``) as the reference policy.

    :meth:`forward_step` gives the loss function logits ``[b, S, V/TP]`` of ``mb["tokens"]``, or —
    when the micro-batch has ``labels [b, S]`` — the per-token negative log-likelihood ``[b, S]``
    (nats) of the labels (megatron's vocabulary-parallel cross entropy; no ``[b, S, V]`` tensor
    is kept).
    Turn logits into what a loss needs with :meth:`response_logprobs` and :meth:`entropy`.

    Args:
        model_cfg, optim_cfg, vocab_size, micro_batch_size: see
            :class:`~nemo_rlhf.models.megatron_module.MegatronGPTModule`.
        eos_id: generation stops at this token.
        pad_id: padding of generated batches.
    """

    def __init__(self, model_cfg: Mapping[str, Any], optim_cfg: Mapping[str, Any] | None,
                 vocab_size: int, micro_batch_size: int, eos_id: int, pad_id: int):
        super().__init__(model_cfg, optim_cfg, vocab_size, micro_batch_size)
        self.eos_id = int(eos_id)
        self.pad_id = int(pad_id)

    @staticmethod
    def forward_step(model, mb):
        # On the last PP stage: logits, or per-token NLL of mb["labels"]; hidden states elsewhere
        # (passed on unchanged to the next stage).
        labels = mb.get("labels")
        return model(mb["tokens"], position_ids_like(mb["tokens"]), None, labels=labels)

    def masked_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [b, S, V/TP]`` -> float32 ``[b, S-1, V/TP]`` logits that predict tokens 1..S-1,
        vocabulary padding masked."""
        return mask_padded_vocab(logits[:, :-1].float(), self.gpt.unpadded_vocab_size)

    @staticmethod
    def response_logprobs(masked_logits: torch.Tensor, tokens: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``[b, S-1]`` float32 log-probs of ``tokens[:, 1:]`` under :meth:`masked_logits`.
        ``inplace`` lets megatron's cross entropy overwrite ``masked_logits`` (saves a copy)."""
        return token_logprobs(masked_logits, tokens[:, 1:], inplace=inplace)

    @staticmethod
    def entropy(masked_logits: torch.Tensor) -> torch.Tensor:
        """``[b, S-1]`` float32 entropy (nats) of each next-token distribution (vocab-parallel)."""
        return vocab_parallel_entropy(masked_logits)

    @torch.no_grad()
    def logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, S]`` -> ``[B, S-1]`` float32 log-probs of each next token, on every rank."""
        self.model.eval()

        def loss_fn(mb, logits):
            lp = self.response_logprobs(self.masked_logits(logits).clone(), mb["tokens"], inplace=True)
            return logits.sum() * 0, {"lp": lp}

        mbs = split_microbatches({"tokens": tokens}, self.microbatch_size_for(tokens.shape[0]))
        outs = self.forward_backward(mbs, self.forward_step, loss_fn, forward_only=True)
        lp = torch.cat([o["lp"] for o in outs]) if outs else None
        b, s = tokens.shape
        return broadcast_from_last_stage(lp, (b, s - 1), torch.float32)

    def generate(self, prompts: torch.Tensor, prompt_lengths: torch.Tensor,
                 params: SamplingParams) -> GenerationOutput:
        """Sample responses to right-padded ``prompts [B, P]`` (see
        :func:`nemo_rlhf.generation.sampling.generate`); identical on every rank."""
        return generate(self, prompts, prompt_lengths, params, eos_id=self.eos_id, pad_id=self.pad_id)
