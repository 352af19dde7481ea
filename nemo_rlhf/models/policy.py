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

Response-only logits: a micro-batch carrying ``logit_positions [b, R]`` (from
:func:`response_positions`) gets logits ``[b, R, V/TP]`` at those positions only — the LM head and
the vocabulary-wide softmax run on the response, not on the prompt (:func:`output_layer_at`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Iterator, Mapping

import torch

from nemo_rlhf.generation.sampling import GenerationOutput, SamplingParams, generate
from nemo_rlhf.models.megatron_module import MegatronGPTModule, position_ids_like, split_microbatches
from nemo_rlhf.models.pipeline_utils import broadcast_from_last_stage
from nemo_rlhf.models.vocab_parallel import token_logprobs, vocab_parallel_entropy
from nemo_rlhf.rl.masked import masked_sum


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


def response_positions(prompt_lengths: torch.Tensor, lengths: torch.Tensor, seq_len: int,
                       multiple_of: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions whose logits score each row's response, left-aligned per row.

    Position ``t`` predicts token ``t + 1``, so a row with prompt length P and length L is scored at
    ``t = P-1 .. L-2`` (:func:`~nemo_rlhf.rl.advantages.response_mask`); row i's j-th response
    position is ``P_i - 1 + j``.

    Args:
        prompt_lengths, lengths: ``[b]`` int64 prompt and prompt + response lengths (tokens).
        seq_len: S, the padded length of ``tokens [b, S]``.
        multiple_of: R is rounded up to a multiple of this (the TP size under sequence parallelism).

    Returns:
        ``(positions, mask)``: ``[b, R]`` int64 positions in ``[0, S-2]`` with ``R`` the longest
        response (>= 1; past a row's response they repeat in-range positions) and ``[b, R]``
        float32, 1 on the row's response positions.
    """
    counts = (lengths - prompt_lengths).clamp(min=0)
    r = max(int(counts.max()) if counts.numel() else 1, 1)
    r = int(math.ceil(r / multiple_of) * multiple_of)
    j = torch.arange(r, device=lengths.device)
    positions = (prompt_lengths.unsqueeze(1) - 1 + j).clamp(0, max(seq_len - 2, 0))
    return positions, (j.unsqueeze(0) < counts.unsqueeze(1)).float()


@contextlib.contextmanager
def output_layer_at(layers: Iterable[torch.nn.Module], positions: torch.Tensor | None) -> Iterator[None]:
    """Within the block, every forward of each LM head in ``layers`` (megatron
    ``ColumnParallelLinear``, input ``[S(/TP), b, H]``) reads the hidden states at ``positions
    [b, R]`` only, so it returns logits ``[R, b, V/TP]`` (``GPTModel``: ``[b, R, V/TP]``). Gradients
    flow back to the selected positions; the others get zero from the LM head. ``positions=None``
    leaves the layers alone.

    Under sequence parallelism the sequence is all-gathered first and the selected ``R`` positions
    scattered again over TP (``R`` must be a multiple of the TP size: :func:`response_positions`'
    ``multiple_of``).

    Raises:
        ValueError: under sequence parallelism, ``R`` not a multiple of the TP size.
    """
    if positions is None:
        yield
        return
    from megatron.core.tensor_parallel import (gather_from_sequence_parallel_region,
                                               scatter_to_sequence_parallel_region)

    def select(module, args, kwargs):
        hidden = args[0]
        sp = bool(getattr(module, "sequence_parallel", False))
        group = getattr(module, "tp_group", None)
        if sp:  # the backward keeps this rank's chunk of the (already summed) gradient
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False, group=group)
        idx = positions.t().to(hidden.device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        hidden = hidden.gather(0, idx)
        if sp:
            tp = torch.distributed.get_world_size(group)
            if hidden.shape[0] % tp:
                raise ValueError(f"output_layer_at: {hidden.shape[0]} positions per row is not a multiple of the "
                                 f"TP size {tp} (sequence parallelism): build them with multiple_of={tp}")
            hidden = scatter_to_sequence_parallel_region(hidden, group=group)
        return (hidden, *args[1:]), kwargs

    handles = [layer.register_forward_pre_hook(select, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def lm_heads(model) -> list[torch.nn.Module]:
    """The LM head (``output_layer``) of ``model`` (a ``GPTModel``, possibly wrapped by DDP) on the
    last pipeline stage; ``[]`` elsewhere."""
    while not hasattr(model, "output_layer") and hasattr(model, "module"):
        model = model.module
    return [model.output_layer] if getattr(model, "post_process", False) and hasattr(model, "output_layer") else []


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
        # On the last PP stage: logits (at mb["logit_positions"] only, when given), or per-token
        # NLL of mb["labels"]; hidden states elsewhere (passed on unchanged to the next stage).
        labels = mb.get("labels")
        positions = mb.get("logit_positions")
        with output_layer_at(lm_heads(model), positions) if positions is not None else contextlib.nullcontext():
            return model(mb["tokens"], position_ids_like(mb["tokens"]), None, labels=labels)

    def response_positions(self, prompt_lengths: torch.Tensor, lengths: torch.Tensor,
                           seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`response_positions` for this model's layout (R a multiple of the TP size under
        sequence parallelism)."""
        from megatron.core import parallel_state

        sp = bool(self.gpt.config.sequence_parallel)
        return response_positions(prompt_lengths, lengths, seq_len,
                                  parallel_state.get_tensor_model_parallel_world_size() if sp else 1)

    def response_microbatch(self, batch: Mapping[str, torch.Tensor], prompt_lengths: torch.Tensor,
                            lengths: torch.Tensor, per_token: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """``batch`` (``tokens [b, S]``, a response ``mask [b, S-1]`` and the per-token ``[b, S-1]``
        tensors named in ``per_token``, e.g. old log-probs and advantages) for a forward whose LM head
        runs at the response positions only: with ``logit_positions [b, R]``
        (:meth:`response_positions`) and every named tensor and the mask gathered there (``[b, R]``;
        the mask also 0 past each row's response). A loss that reduces over masked tokens only gives
        the same value on it (the same terms, summed in another order); read its logits with
        :meth:`scored_logits`.

        Args:
            batch: ``{name: tensor}`` with ``tokens`` and ``mask``; other entries pass unchanged.
            prompt_lengths, lengths: ``[b]`` int64 prompt and prompt + response lengths (tokens).
            per_token: names of ``[b, S-1]`` tensors aligned with the log-prob convention.

        Raises:
            ValueError: ``mask`` selects a position outside the rows' responses (``P-1 .. L-2``),
                which the response-only logits would drop.
        """
        tokens, mask = batch["tokens"], batch["mask"]
        positions, window = self.response_positions(prompt_lengths, lengths, tokens.shape[1])
        out = dict(batch)
        out["logit_positions"] = positions
        for name in per_token:
            out[name] = batch[name].gather(1, positions.to(batch[name].device))
        out["mask"] = mask.gather(1, positions.to(mask.device)) * window.to(mask.device, mask.dtype)
        if int(torch.count_nonzero(out["mask"])) != int(torch.count_nonzero(mask)):
            raise ValueError("response_microbatch: the mask selects positions outside the rows' responses "
                             "(prompt_lengths - 1 .. lengths - 2)")
        return out

    def scored_logits(self, mb: Mapping[str, torch.Tensor], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A forward's logits and the tokens they predict, for a micro-batch with or without
        ``logit_positions`` (:meth:`response_microbatch`): ``(logits [b, T, V/TP]`` float32 with the
        vocabulary padding masked, ``targets [b, T]`` int64), T = S - 1 (every position, as
        :meth:`masked_logits`) or R (the response positions)."""
        positions = mb.get("logit_positions")
        if positions is None:
            return self.masked_logits(logits), mb["tokens"][:, 1:]
        return (mask_padded_vocab(logits.float(), self.gpt.unpadded_vocab_size),
                mb["tokens"].gather(1, positions.to(mb["tokens"].device) + 1))

    def logprobs_at(self, logits: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                    inplace: bool = False) -> torch.Tensor:
        """``logits [b, R, V/TP]`` at ``positions [b, R]`` (a forward with ``logit_positions``) ->
        ``[b, R]`` float32 log-probs of the tokens they predict (``tokens[i, positions[i, j] + 1]``),
        vocabulary padding masked. ``inplace``: megatron's cross entropy may overwrite ``logits``
        (a forward's fresh output: nothing else reads it)."""
        return token_logprobs(*self.scored_logits({"tokens": tokens, "logit_positions": positions}, logits),
                              inplace=inplace)

    @torch.no_grad()
    def response_logps(self, tokens: torch.Tensor, prompt_lengths: torch.Tensor,
                       lengths: torch.Tensor) -> torch.Tensor:
        """``tokens [B, S]`` -> ``[B]`` float32 summed log-probs (nats) of each row's response tokens
        (positions ``P-1 .. L-2``), on every rank; logits at the response positions only."""
        self.model.eval()
        positions, mask = self.response_positions(prompt_lengths, lengths, tokens.shape[1])

        def loss_fn(mb, logits):
            lp = self.logprobs_at(logits, mb["tokens"], mb["logit_positions"], inplace=True)
            return logits.sum() * 0, {"sums": masked_sum(lp, mb["mask"], dim=1)}

        mbs = split_microbatches({"tokens": tokens, "logit_positions": positions, "mask": mask},
                                 self.microbatch_size_for(tokens.shape[0]))
        outs = self.forward_backward(mbs, self.forward_step, loss_fn, forward_only=True)
        sums = torch.cat([o["sums"] for o in outs]) if outs else None
        return broadcast_from_last_stage(sums, (tokens.shape[0],), torch.float32)

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
