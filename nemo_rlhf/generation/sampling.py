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

Speed (:func:`fast_generation`, measured on SmolLM2-135M against ``transformers.generate``, see
BENCHMARKS.md). Two parts of megatron-core cost more than the maths on CPU, where neither
flash-attn nor Transformer Engine exists:

* Attention: the static-batching path of the local attention re-applies RoPE to every cached key
  and copies the whole cache ``num_heads / num_query_groups`` times (``repeat_interleave``) at
  every decode step, then runs an unfused ``baddbmm`` / softmax / ``bmm``. Here each
  self-attention of the local spec instead caches keys already rotated (RoPE applied once, at
  their own position, with megatron's formula; cos/sin computed once per step) and calls
  ``torch.nn.functional.scaled_dot_product_attention`` with ``enable_gqa`` (no copies of the KV
  heads). The attention maths is the same, only the order of the floating-point operations
  differs (16 x 32 greedy steps of SmolLM2-135M: logits within 1.6e-4 of megatron's path,
  |logits| up to 42; the same tokens, equal to ``transformers.generate``'s).
* Linear layers: ``ColumnParallelLinear`` / ``RowParallelLinear`` spend ~80 us per call outside
  the matmul (two autograd ``Function`` applications even without grad, a deprecation warning per
  ``RowParallelLinear`` call), 4 calls per layer and token step. Under inference mode the
  transformer layers' plain TP linears run the same ``matmul(x, W^T)`` (+ bias) and TP all-reduce
  directly (bitwise the same outputs).

Everything else (norms, MLP activation, embeddings, output layer, LoRA linears, the pipeline
schedule) stays megatron's, so TP/PP, SP-off and adapters behave as before.
``generate(..., fast_path=False)`` runs megatron's own path. Each forward runs under
``torch.inference_mode``.
"""

from __future__ import annotations

import contextlib
import functools
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


def _supports_cached_attention(gpt, attn) -> bool:
    """Whether :func:`_cached_self_attention` computes what ``attn.forward`` computes for ``attn``
    (a megatron self-attention with the local ``DotProductAttention`` core, plain softmax, full
    causal attention, RoPE or no rotary embedding); other layers keep megatron's own path."""
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    c = attn.config
    return (isinstance(attn, SelfAttention)
            and type(attn.core_attention) is DotProductAttention
            and "forward" not in vars(attn)  # nobody else replaced it
            and getattr(gpt, "position_embedding_type", None) in ("rope", "learned_absolute", "none")
            and not getattr(c, "multi_latent_attention", False)
            and not getattr(c, "attention_output_gate", False)
            and not getattr(c, "flash_decode", False)
            and not getattr(c, "apply_query_key_layer_scaling", False)
            and getattr(c, "softmax_type", "vanilla") == "vanilla"
            and getattr(c, "window_size", None) is None
            and not getattr(c, "no_rope_freq", None)
            and getattr(c, "mrope_section", None) is None
            and getattr(c, "context_parallel_size", 1) == 1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[..., d]`` -> ``[-x[d/2:], x[:d/2]]`` (RoPE, non-interleaved; as megatron's ``_rotate_half``)."""
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _cached_self_attention(attn, cache: dict, shared: dict, hidden_states, attention_mask=None,
                           key_value_states=None, inference_context=None, rotary_pos_emb=None,
                           rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                           attention_bias=None, packed_seq_params=None, sequence_len_offset=None, *,
                           inference_params=None):
    """``SelfAttention.forward`` for static-batch KV-cache generation (see the module docstring).

    ``hidden_states [s, b, H]`` are the tokens at positions ``[o, o + s)``, ``o =
    inference_context.sequence_len_offset``; ``cache`` holds this layer's rotated keys and values,
    ``[b, g, L, d]`` each (g: query groups of this TP rank, d: head size, L: the context's
    ``max_sequence_length``); ``shared`` holds what all layers of a step share (RoPE cos/sin).
    Token ``o + i`` attends to positions ``<= o + i`` (all cached ones when s = 1). Returns
    ``linear_proj``'s ``(output [s, b, H], bias)``. Calls that are not this case (training, no
    context, an explicit mask, cross attention) run megatron's own forward.
    """
    import torch.nn.functional as F
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    ctx = inference_context if inference_context is not None else inference_params
    if (attn.training or ctx is None or attention_mask is not None or key_value_states is not None
            or attention_bias is not None or packed_seq_params is not None
            or getattr(ctx, "batch_size_offset", 0) != 0):
        return type(attn).forward(
            attn, hidden_states, attention_mask, key_value_states=key_value_states,
            inference_context=inference_context, rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
            rotary_pos_cos_sin=rotary_pos_cos_sin, attention_bias=attention_bias,
            packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset,
            inference_params=inference_params)
    query, key, value = attn.get_query_key_value_tensors(hidden_states, None)  # [s, b, heads, d]
    s, b = query.shape[:2]
    start = int(ctx.sequence_len_offset)
    end = start + s
    if rotary_pos_emb is not None:  # freqs [L, 1, 1, d] of every position: rotate at o..o+s-1
        freqs = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
        freqs = freqs[start:end]
        c = attn.config
        if (freqs.shape[-1] != query.shape[-1] or c.rotary_interleaved or c.apply_rope_fusion
                or c.multi_latent_attention):
            query = apply_rotary_pos_emb(query, freqs, config=c, cp_group=attn.pg_collection.cp)
            key = apply_rotary_pos_emb(key, freqs, config=c, cp_group=attn.pg_collection.cp)
        else:
            # megatron's unfused RoPE (rope_utils._apply_rotary_pos_emb_bshd, rotation over the
            # whole head, mscale 1), with cos/sin computed once per step for all layers.
            key_ = ("rope", start, end, query.dtype)
            if shared.get("rope_key") != key_:
                shared["rope_key"] = key_
                shared["rope"] = (torch.cos(freqs).to(query.dtype), torch.sin(freqs).to(query.dtype))
            cos, sin = shared["rope"]
            query = query * cos + _rotate_half(query) * sin
            key = key * cos + _rotate_half(key) * sin
    if "k" not in cache:
        shape = (b, key.shape[2], int(ctx.max_sequence_length), key.shape[3])
        cache["k"] = torch.empty(shape, dtype=key.dtype, device=key.device)
        cache["v"] = torch.empty(shape, dtype=value.dtype, device=value.device)
    k_cache, v_cache = cache["k"], cache["v"]
    k_cache[:, :, start:end] = key.permute(1, 2, 0, 3)
    v_cache[:, :, start:end] = value.permute(1, 2, 0, 3)
    mask = None
    if s > 1 and start > 0:  # a chunk after cached tokens: causal within it, all of the past
        mask = (torch.arange(end, device=query.device).unsqueeze(0)
                <= torch.arange(start, end, device=query.device).unsqueeze(1))
    out = F.scaled_dot_product_attention(
        query.permute(1, 2, 0, 3), k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=mask,
        is_causal=(s > 1 and start == 0), scale=attn.core_attention.softmax_scale, enable_gqa=True)
    out = out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [b, heads, s, d] -> [s, b, heads * d]
    return attn.linear_proj(out)


def _lean_column_parallel_forward(linear, input_, weight=None, runtime_gather_output=None):
    """``ColumnParallelLinear.forward`` in inference mode without the output gather or sequence
    parallelism: ``matmul(x, W_rank^T) (+ bias)`` (what megatron's linear autograd functions compute
    forward; TP > 1: the input is already replicated). ``([s, b, out/TP], bias or None)``."""
    if (weight is not None or runtime_gather_output or linear.gather_output or linear.sequence_parallel
            or linear.explicit_expert_comm or linear.weight is None
            or not torch.is_inference_mode_enabled()):
        return type(linear).forward(linear, input_, weight=weight,
                                    runtime_gather_output=runtime_gather_output)
    out = torch.matmul(input_, linear.weight.t())
    if linear.skip_bias_add:
        return out, linear.bias
    return (out + linear.bias if linear.bias is not None else out), None


def _lean_row_parallel_forward(linear, input_):
    """``RowParallelLinear.forward`` in inference mode for a TP-split input without sequence
    parallelism: ``matmul(x_rank, W_rank^T)``, all-reduced over TP (megatron's ``_reduce``), then the
    bias. ``([s, b, out], bias or None)``."""
    if (not linear.input_is_parallel or linear.sequence_parallel or linear.explicit_expert_comm
            or not torch.is_inference_mode_enabled()):
        return type(linear).forward(linear, input_)
    out = torch.matmul(input_, linear.weight.t())
    if linear.tp_group.size() > 1:
        torch.distributed.all_reduce(out, group=linear.tp_group)
    if linear.skip_bias_add:
        return out, linear.bias
    return (out + linear.bias if linear.bias is not None else out), None


@contextlib.contextmanager
def fast_generation(gpt):
    """Inside the block, ``gpt`` (this rank's TP shard / PP stage) generates through the fast path
    of the module docstring:

    * every self-attention that :func:`_supports_cached_attention` accepts runs
      :func:`_cached_self_attention` when given an inference context (RoPE applied once per key,
      keys and values cached in the ``[b, g, L, d]`` layout of ``scaled_dot_product_attention``,
      grouped-query attention without copying KV heads; the cache lives as long as the block);
    * every linear of the transformer layers whose type is exactly megatron's
      ``ColumnParallelLinear`` / ``RowParallelLinear`` (not LoRA's subclasses) runs
      :func:`_lean_column_parallel_forward` / :func:`_lean_row_parallel_forward` under
      ``torch.inference_mode`` (megatron's own forward otherwise).

    The original forwards are restored on exit. Yields ``{"attention": n, "linear": m}``, the
    numbers of modules switched."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    decoder = getattr(gpt, "decoder", None)
    layers = getattr(decoder, "layers", None) or []
    patched = []
    shared: dict = {}
    counts = {"attention": 0, "linear": 0}
    try:
        for layer in layers:
            attn = getattr(layer, "self_attention", None)
            if attn is not None and _supports_cached_attention(gpt, attn):
                attn.forward = functools.partial(_cached_self_attention, attn, {}, shared)
                patched.append(attn)
                counts["attention"] += 1
        lean = {ColumnParallelLinear: _lean_column_parallel_forward,
                RowParallelLinear: _lean_row_parallel_forward}
        for m in (decoder.modules() if decoder is not None else ()):
            fn = lean.get(type(m))
            if fn is not None and "forward" not in vars(m):
                m.forward = functools.partial(fn, m)
                patched.append(m)
                counts["linear"] += 1
        yield counts
    finally:
        for m in patched:
            del m.forward


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


def _last_token_logits(module, tokens: torch.Tensor, position_ids: torch.Tensor, ctx,
                       vocab: int | None = None, logits_processor=None) -> torch.Tensor | None:
    """One forward of ``tokens [B, s]`` through the schedule; ``[B, V]`` logits of the last
    position on the last stage (None elsewhere), ids ``>= vocab`` (vocabulary padding) at -inf,
    then ``logits_processor(logits)`` if given (see :func:`generate`).

    Runs under ``torch.inference_mode`` (no autograd bookkeeping on any op; the KV cache and the
    returned logits are inference tensors, only read by the sampling code outside it)."""

    def forward_fn(model, mb):
        return model(mb["tokens"], mb["position_ids"], None, inference_context=ctx,
                     runtime_gather_output=True)

    def loss_fn(mb, out):
        return out.sum() * 0, {"logits": out[:, -1, :]}

    with torch.inference_mode():
        outs = module.forward_backward([{"tokens": tokens, "position_ids": position_ids}],
                                       forward_fn, loss_fn, forward_only=True)
        logits = outs[0]["logits"] if outs else None
        if logits is not None and vocab is not None and logits.shape[-1] > vocab:
            logits[:, vocab:] = float("-inf")
        if logits is not None and logits_processor is not None:
            logits = logits_processor(logits)
    return logits


@torch.no_grad()
def generate(module, prompts: torch.Tensor, prompt_lengths: torch.Tensor, params: SamplingParams,
             eos_id: int, pad_id: int, max_seq_len: int | None = None,
             fast_path: bool = True, logits_processor=None) -> GenerationOutput:
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
        fast_path: generate inside :func:`fast_generation` (default); False runs megatron-core's
            own attention and linear layers (slower on CPU; same tokens up to float rounding).
        logits_processor: optional ``(logits [B, V] float) -> [B, V]`` called on the last pipeline
            stage once per decode step, right after that step's forward (inside its inference
            mode) and before temperature / top-k / top-p / sampling; e.g. ILQL's shift by the
            heads' advantages (``models/ilql.py``), whose forward hooks captured the same step's
            hidden states. None: the model's logits.

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
        with sequence_parallel_disabled(module.gpt), (
                fast_generation(module.gpt) if fast_path else contextlib.nullcontext()):
            lengths = _decode(module, tokens, prompt_lengths, params, eos_id, pad_id, logits_processor)
    finally:
        module.model.train(was_training)
    # Rows that never ended use the whole budget; clear anything written past each row's end.
    cols = torch.arange(total, device=dev).unsqueeze(0)
    tokens = torch.where(cols < lengths.unsqueeze(1), tokens, torch.full_like(tokens, pad_id))
    return GenerationOutput(tokens=tokens, lengths=lengths, prompt_lengths=prompt_lengths.clone())


def _decode(module, tokens: torch.Tensor, prompt_lengths: torch.Tensor, params: SamplingParams,
            eos_id: int, pad_id: int, logits_processor=None) -> torch.Tensor:
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
        logits = _last_token_logits(module, tokens[:, start:cur], positions[:, start:cur], ctx, vocab,
                                    logits_processor)
        if start == 0:
            ctx.enable_decode_mode()
        ctx.sequence_len_offset += cur - start
        start = cur
        if logits is not None:
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
