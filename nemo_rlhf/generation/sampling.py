"""Autoregressive sampling with a KV cache on a megatron ``GPTModel`` (any TP/PP layout).

Each step runs through megatron's pipeline schedule (``forward_only``, one micro-batch), so the
same loop works for PP = 1 and PP > 1; the KV cache is megatron's ``StaticInferenceContext`` (each
stage caches its own layers). Logits are gathered over TP (``runtime_gather_output=True``); every
TP rank samples with the same seeded generator and the last stage broadcasts the new tokens to the
other stages, so all ranks agree on the rollout.

Batches of prompts of different lengths are right padded. Decoding starts at the shortest prompt;
while a position is still inside a longer prompt, that prompt's own token is kept instead of the
sample (the approach of megatron's ``TextGenerationController``), so no left padding or attention
mask is needed and positions stay exact.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """Sampling configuration.

    Attributes:
        max_new_tokens: response budget in tokens (generation stops earlier at EOS).
        temperature: softmax temperature; 0 (or ``greedy=True``) means argmax.
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus sampling mass (1.0 = off).
        greedy: argmax decoding.
        seed: seed of the sampling generator (identical on every TP rank).
    """

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    seed: int = 0


@dataclass
class GenerationOutput:
    """Result of :func:`generate`.

    Attributes:
        tokens: ``[B, L]`` int64 prompt + response, right padded with ``pad_id``.
        lengths: ``[B]`` int64 length of prompt + response (including the EOS token if produced).
        prompt_lengths: ``[B]`` int64.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    prompt_lengths: torch.Tensor


@contextlib.contextmanager
def sequence_parallel_disabled(gpt):
    """Run ``gpt`` as plain TP (no sequence parallelism) inside the block.

    Decode steps feed one token, which cannot be split over TP ranks. Sequence parallelism only
    changes where activations are split and which collectives move them (all-gather /
    reduce-scatter instead of all-reduce), not the weights or the maths, so turning it off for
    generation gives the same logits. Flips ``config.sequence_parallel`` (read by the embedding,
    the transformer block and the pipeline schedule) and every module's ``sequence_parallel``
    flag (the TP linear layers), and restores them on exit.
    """
    config = gpt.config
    if not config.sequence_parallel:
        yield
        return
    # Per-module flags fixed at construction: the TP linear layers' `sequence_parallel` and the
    # embeddings' `reduce_scatter_embeddings` (scatter of the embedding output along the sequence).
    flags = [(m, name) for m in gpt.modules() for name in _SP_FLAGS if getattr(m, name, None) is True]
    configs = {id(c): c for c in [config] + [getattr(m, "config", None) for m in gpt.modules()]
               if c is not None and getattr(c, "sequence_parallel", False)}
    try:
        for m, name in flags:
            setattr(m, name, False)
        for c in configs.values():
            c.sequence_parallel = False
        yield
    finally:
        for m, name in flags:
            setattr(m, name, True)
        for c in configs.values():
            c.sequence_parallel = True


_SP_FLAGS = ("sequence_parallel", "reduce_scatter_embeddings")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then top-p (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration")
    filtering of ``logits [B, V]``: removed entries become ``-inf``. The most likely token is
    always kept."""
    if top_k and top_k > 0:
        k = min(int(top_k), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        cum = torch.cumsum(probs, dim=-1)
        remove = cum - probs > top_p  # keep the token that crosses the threshold
        remove[..., 0] = False
        mask = torch.zeros_like(remove).scatter(-1, idx, remove)
        logits = logits.masked_fill(mask, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """``logits [B, V]`` float -> next tokens ``[B]`` int64."""
    if params.greedy or params.temperature <= 0:
        return torch.argmax(logits, dim=-1)
    logits = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _last_token_logits(module, tokens: torch.Tensor, position_ids: torch.Tensor, ctx) -> torch.Tensor | None:
    """One forward of ``tokens [B, s]`` through the schedule; ``[B, V]`` logits on the last stage."""

    def forward_fn(model, mb):
        return model(mb["tokens"], mb["position_ids"], None, inference_context=ctx,
                     runtime_gather_output=True)

    def loss_fn(mb, out):
        return out.sum() * 0, {"logits": out[:, -1, :]}

    outs = module.forward_backward([{"tokens": tokens, "position_ids": position_ids}],
                                   forward_fn, loss_fn, forward_only=True)
    return outs[0]["logits"] if outs else None


@torch.no_grad()
def generate(module, prompts: torch.Tensor, prompt_lengths: torch.Tensor, params: SamplingParams,
             eos_id: int, pad_id: int, max_seq_len: int | None = None) -> GenerationOutput:
    """Sample responses for a batch of right-padded prompts with a KV cache.

    Args:
        module: a :class:`~nemo_rlhf.models.megatron_module.MegatronGPTModule` holding a language
            model (its ``gpt`` has a vocabulary projection).
        prompts: ``[B, P]`` int64, right padded.
        prompt_lengths: ``[B]`` int64, each in ``[1, P]``.
        params: sampling configuration.
        eos_id: end-of-sequence token id (stops a row; it is kept in the output).
        pad_id: fill value after the end of each row.
        max_seq_len: cap on prompt + response length (default: the model's max positions).

    Returns:
        :class:`GenerationOutput` identical on every rank.

    Raises:
        ValueError: bad prompt lengths, or prompts that leave no room to generate.
    """
    b, p = prompts.shape
    if bool((prompt_lengths < 1).any()) or bool((prompt_lengths > p).any()):
        raise ValueError(f"prompt_lengths must be in [1, {p}], got {prompt_lengths.tolist()}")
    limit = max_seq_len or module.gpt.max_sequence_length
    if p > int(limit):
        raise ValueError(f"prompts tensor is {p} tokens wide, more than max_seq_len={limit}")
    total = min(p + int(params.max_new_tokens), int(limit))
    if total <= int(prompt_lengths.max()):
        raise ValueError(f"prompts of up to {int(prompt_lengths.max())} tokens leave no room to generate "
                         f"within max_seq_len={limit}")
    dev = module.model_device
    prompt_lengths = prompt_lengths.to(dev)
    tokens = torch.full((b, total), pad_id, dtype=torch.long, device=dev)
    tokens[:, :p] = prompts.to(dev)
    was_training = module.model.training
    module.model.eval()
    try:
        with sequence_parallel_disabled(module.gpt):
            lengths = _decode(module, tokens, prompt_lengths, params, eos_id, pad_id)
    finally:
        module.model.train(was_training)
    # Rows that never ended use the whole budget; clear anything written past each row's end.
    cols = torch.arange(total, device=dev).unsqueeze(0)
    tokens = torch.where(cols < lengths.unsqueeze(1), tokens, torch.full_like(tokens, pad_id))
    return GenerationOutput(tokens=tokens, lengths=lengths, prompt_lengths=prompt_lengths.clone())


def _decode(module, tokens: torch.Tensor, prompt_lengths: torch.Tensor, params: SamplingParams,
            eos_id: int, pad_id: int) -> torch.Tensor:
    """The KV-cache loop of :func:`generate`: prefill up to the shortest prompt, then one token
    per step. Writes the sampled tokens into ``tokens [B, L]`` in place; returns ``lengths [B]``."""
    from megatron.core import parallel_state
    from megatron.core.inference.contexts import StaticInferenceContext

    from nemo_rlhf.parallel.state import comm_device

    b, total = tokens.shape
    dev = tokens.device
    vocab = getattr(module.gpt, "unpadded_vocab_size", None)
    positions = torch.arange(total, device=dev).unsqueeze(0).expand(b, total)
    lengths = torch.full((b,), total, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    ctx = StaticInferenceContext(b, total)
    gen = torch.Generator(device=dev).manual_seed(int(params.seed))
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    start = 0
    for cur in range(int(prompt_lengths.min()), total):
        logits = _last_token_logits(module, tokens[:, start:cur], positions[:, start:cur], ctx)
        if start == 0:
            ctx.enable_decode_mode()
        ctx.sequence_len_offset += cur - start
        start = cur
        if logits is not None:
            if vocab is not None and logits.shape[-1] > vocab:
                logits[:, vocab:] = float("-inf")
            sampled = sample_next(logits.float(), params, gen)
        else:
            sampled = torch.empty(b, dtype=torch.long, device=dev)
        if pp > 1:  # the last stage sampled: every stage needs the token for the next step
            buf = sampled.to(comm_device())
            torch.distributed.broadcast(buf, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                        group=parallel_state.get_pipeline_model_parallel_group())
            sampled = buf.to(dev)
        in_prompt = cur < prompt_lengths
        new = torch.where(in_prompt, tokens[:, cur], sampled)
        new = torch.where(done, torch.full_like(new, pad_id), new)
        tokens[:, cur] = new
        budget_spent = cur + 1 >= prompt_lengths + int(params.max_new_tokens)
        ended = (~in_prompt) & (~done) & ((new == eos_id) | budget_spent)
        lengths[ended] = cur + 1
        done |= ended
        if bool(done.all()):
            break
    return lengths
