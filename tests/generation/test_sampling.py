"""KV-cache generation (``nemo_rlhf.generation.sampling``) against a no-cache reference loop and
against megatron-core's own static-batching attention path."""

from __future__ import annotations

import pytest
import torch

from nemo_rlhf.generation.sampling import SamplingParams, fast_generation, filter_logits, generate
from nemo_rlhf.models.policy import GPTPolicyModel
from nemo_rlhf.models.megatron_module import position_ids_like

PROMPT_LENGTHS = [2, 6, 4]
MAX_NEW = 8


# A freshly initialised tiny GPT with tied embeddings (std 0.02) greedily repeats its last token,
# which would make the KV-cache comparison trivial. Untied, with a large init, its greedy output
# depends on the whole context (checked in the first test).
CONTEXT_DEPENDENT = dict(init_method_std=1.0, share_embeddings_and_output_weights=False)


@pytest.fixture
def actor(build, tiny):
    """Trainable (DDP-wrapped), as the PPO actor that generates rollouts; context-dependent greedy."""
    return build(GPTPolicyModel, model_cfg=CONTEXT_DEPENDENT, optim_cfg=tiny.optim, micro_batch_size=1,
                 eos_id=tiny.eos_id, pad_id=tiny.pad_id)


@pytest.fixture
def uniform_actor(build, tiny):
    """The default tiny init: next-token distributions close to uniform (for sampling tests)."""
    return build(GPTPolicyModel, micro_batch_size=1, eos_id=tiny.eos_id, pad_id=tiny.pad_id)


@pytest.fixture
def prompts(tiny):
    """``[3, 6]`` right-padded prompts of lengths 2, 6 and 4 (pad positions hold ``pad_id``)."""
    p = tiny.tokens(len(PROMPT_LENGTHS), max(PROMPT_LENGTHS), seed=20)
    for i, n in enumerate(PROMPT_LENGTHS):
        p[i, n:] = tiny.pad_id
    return p, torch.tensor(PROMPT_LENGTHS)


@torch.no_grad()
def reference_greedy(actor, prompt: torch.Tensor, max_new: int, eos_id: int, vocab: int,
                     max_len: int = 64) -> list[int]:
    """No KV cache: full forward over the growing sequence, argmax of the last position over ids < vocab."""
    actor.model.eval()
    seq = prompt.tolist()
    for _ in range(max_new):
        if len(seq) >= max_len:
            break
        t = torch.tensor([seq])
        logits = actor.gpt(t, position_ids_like(t), None)[0, -1, :vocab]
        seq.append(int(torch.argmax(logits)))
        if seq[-1] == eos_id:
            break
    return seq


def _check_row(out, i: int, want: list[int], pad_id: int) -> None:
    n = int(out.lengths[i])
    assert out.tokens[i, :n].tolist() == want
    assert (out.tokens[i, n:] == pad_id).all()


@pytest.mark.parametrize("position_embedding_type", ["rope", "learned_absolute"])
def test_greedy_kv_cache_equals_no_cache_reference(build, prompts, tiny, position_embedding_type):
    # RoPE takes positions from the KV cache's offset; learned absolute embeddings from position_ids.
    actor = build(GPTPolicyModel, model_cfg=dict(CONTEXT_DEPENDENT, position_embedding_type=position_embedding_type),
                  optim_cfg=tiny.optim, micro_batch_size=1, eos_id=tiny.eos_id, pad_id=tiny.pad_id)
    p, lens = prompts
    out = actor.generate(p, lens, SamplingParams(greedy=True, max_new_tokens=MAX_NEW))
    assert out.tokens.shape == (3, max(PROMPT_LENGTHS) + MAX_NEW)
    assert out.prompt_lengths.tolist() == PROMPT_LENGTHS
    for i, n in enumerate(PROMPT_LENGTHS):
        want = reference_greedy(actor, p[i, :n], MAX_NEW, tiny.eos_id, tiny.vocab)
        _check_row(out, i, want, tiny.pad_id)
    # This model does not hit EOS by chance here: every row uses its whole budget.
    assert (out.lengths - lens).tolist() == [MAX_NEW] * 3
    # The test is not trivial: the same token is followed by different tokens in different contexts
    # (so the next token depends on cached keys/values, not only on the last token).
    follows: dict[int, set[int]] = {}
    for i, n in enumerate(PROMPT_LENGTHS):
        row = out.tokens[i, : int(out.lengths[i])].tolist()
        for a, b in zip(row[n - 1:], row[n:]):
            follows.setdefault(a, set()).add(b)
    assert max(len(v) for v in follows.values()) >= 2, follows


def test_batched_generation_equals_each_row_alone(actor, prompts, tiny):
    p, lens = prompts
    params = SamplingParams(greedy=True, max_new_tokens=MAX_NEW)
    out = actor.generate(p, lens, params)
    for i, n in enumerate(PROMPT_LENGTHS):
        alone = actor.generate(p[i:i + 1, :n], lens[i:i + 1], params)
        m = int(alone.lengths[0])
        assert m == int(out.lengths[i])
        assert alone.tokens[0, :m].tolist() == out.tokens[i, :m].tolist()


def test_eos_stops_a_row_and_the_rest_is_pad(actor, prompts, tiny):
    p, lens = prompts
    # The EOS id: a greedy token of row 0 that first occurs at response index k >= 2.
    free = reference_greedy(actor, p[0, :2], MAX_NEW, eos_id=-1, vocab=tiny.vocab)
    response = free[2:]
    k = next(j for j in range(2, len(response)) if response[j] not in response[:j])
    eos = response[k]
    pad = 99 if eos != 99 else 98
    out = generate(actor, p, lens, SamplingParams(greedy=True, max_new_tokens=MAX_NEW),
                   eos_id=eos, pad_id=pad)
    assert int(out.lengths[0]) == 2 + k + 1
    assert int(out.tokens[0, 2 + k]) == eos
    assert (out.tokens[0, 2 + k + 1:] == pad).all()
    stopped = 0
    for i, n in enumerate(PROMPT_LENGTHS):  # every row stops at its own first EOS (if any)
        want = reference_greedy(actor, p[i, :n], MAX_NEW, eos, tiny.vocab)
        _check_row(out, i, want, pad)
        stopped += want[-1] == eos
    assert stopped >= 2  # rows stop at different steps; the batch carries on for the others


def test_max_new_tokens_caps_each_row(actor, prompts, tiny):
    p, lens = prompts
    out = actor.generate(p, lens, SamplingParams(greedy=True, max_new_tokens=3))
    assert out.tokens.shape[1] == max(PROMPT_LENGTHS) + 3
    assert ((out.lengths - lens) <= 3).all()
    assert (out.lengths - lens).tolist() == [3, 3, 3]


def test_max_position_embeddings_caps_the_sequence(actor, tiny):
    prompt = tiny.tokens(1, 60, seed=21)
    out = actor.generate(prompt, torch.tensor([60]), SamplingParams(greedy=True, max_new_tokens=8))
    assert out.tokens.shape == (1, 64)
    assert int(out.lengths[0]) == 64
    want = reference_greedy(actor, prompt[0], 8, tiny.eos_id, tiny.vocab, max_len=64)
    assert out.tokens[0].tolist() == want
    with pytest.raises(ValueError, match="no room"):
        actor.generate(tiny.tokens(1, 64, seed=22), torch.tensor([64]), SamplingParams(max_new_tokens=4))


def test_sampling_is_reproducible_and_stays_in_the_unpadded_vocab(uniform_actor, prompts, tiny):
    p, lens = prompts
    params = SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW, seed=7)
    a = uniform_actor.generate(p, lens, params)
    b = uniform_actor.generate(p, lens, params)
    c = uniform_actor.generate(p, lens, SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW, seed=8))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    assert not torch.equal(a.tokens, c.tokens)
    # A near-uniform untrained model would draw a padded id (>= 100 of 128) ~22% of the time.
    for out in (a, c):
        for i in range(3):
            assert (out.tokens[i, : int(out.lengths[i])] < tiny.vocab).all()


def test_top_k_one_sampling_is_greedy(actor, prompts):
    p, lens = prompts
    greedy = actor.generate(p, lens, SamplingParams(greedy=True, max_new_tokens=MAX_NEW))
    top1 = actor.generate(p, lens, SamplingParams(temperature=0.7, top_k=1, max_new_tokens=MAX_NEW, seed=3))
    assert torch.equal(greedy.tokens, top1.tokens)


def test_filter_logits_hand_example():
    inf = float("-inf")
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, :2]).all()
    torch.testing.assert_close(filter_logits(logits, top_k=2)[0, 2:], logits[0, 2:])
    # sorted probs 0.4, 0.3, 0.2, 0.1; mass before each: 0, 0.4, 0.7, 0.9
    kept = lambda x: (~torch.isinf(x[0])).tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_p=0.5)) == [False, False, True, True]
    assert kept(filter_logits(logits, top_p=0.75)) == [False, True, True, True]
    assert kept(filter_logits(logits, top_p=0.01)) == [False, False, False, True]  # top token always kept
    assert kept(filter_logits(logits, top_k=3, top_p=0.5)) == [False, False, True, True]
    assert torch.equal(filter_logits(logits), logits)
    assert filter_logits(logits, top_k=1)[0].tolist()[:3] == [inf, inf, inf]


@pytest.mark.parametrize("lengths", [[0, 3, 2], [2, 7, 4]])
def test_prompt_lengths_out_of_range_raise(actor, prompts, lengths):
    p, _ = prompts
    with pytest.raises(ValueError, match=r"prompt_lengths must be in \[1, 6\]"):
        actor.generate(p, torch.tensor(lengths), SamplingParams(greedy=True, max_new_tokens=2))


# Grouped-query attention (4 heads, 2 KV groups) with RoPE and RMSNorm, like Llama / SmolLM2.
GQA = dict(num_query_groups=2, normalization="RMSNorm", position_embedding_type="rope")


@pytest.mark.parametrize("model_cfg", [dict(CONTEXT_DEPENDENT, **GQA), GQA], ids=["context_dependent", "near_uniform"])
def test_fast_generation_gives_the_tokens_of_megatrons_own_path(build, prompts, tiny, model_cfg):
    # generate() swaps megatron's static-batching attention (RoPE re-applied to the whole cache,
    # KV heads copied per query head, baddbmm/softmax/bmm) for cached rotated keys and SDPA with
    # grouped-query attention, and runs the layers' TP linears without megatron's per-call
    # overhead: the same maths, so the same tokens, greedy and sampled with a seed.
    actor = build(GPTPolicyModel, model_cfg=model_cfg, micro_batch_size=1, eos_id=tiny.eos_id, pad_id=tiny.pad_id)
    modules = [m for layer in actor.gpt.decoder.layers
               for m in (layer.self_attention, layer.self_attention.linear_qkv, layer.self_attention.linear_proj,
                         layer.mlp.linear_fc1, layer.mlp.linear_fc2)]
    with fast_generation(actor.gpt) as switched:
        assert switched == {"attention": 2, "linear": 8}
        assert all("forward" in vars(m) for m in modules)
    assert not any("forward" in vars(m) for m in modules)  # megatron's forwards are back
    p, lens = prompts
    for params in (SamplingParams(greedy=True, max_new_tokens=MAX_NEW),
                   SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW, seed=5),
                   SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=MAX_NEW, seed=6)):
        fast = generate(actor, p, lens, params, eos_id=tiny.eos_id, pad_id=tiny.pad_id)
        megatron = generate(actor, p, lens, params, eos_id=tiny.eos_id, pad_id=tiny.pad_id, fast_path=False)
        assert torch.equal(fast.tokens, megatron.tokens) and torch.equal(fast.lengths, megatron.lengths), params
    greedy = generate(actor, p, lens, SamplingParams(greedy=True, max_new_tokens=MAX_NEW), tiny.eos_id, tiny.pad_id)
    for i, n in enumerate(PROMPT_LENGTHS):  # and the no-cache reference (a full forward per token)
        _check_row(greedy, i, reference_greedy(actor, p[i, :n], MAX_NEW, tiny.eos_id, tiny.vocab), tiny.pad_id)
