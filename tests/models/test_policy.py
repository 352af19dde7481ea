"""nemo_rlhf/models/policy.py: response-only logits for the online trainers' policy losses.

PPO's and GRPO's training steps hand the policy :meth:`GPTPolicyModel.response_microbatch`
micro-batches, whose LM head runs at the response positions only. On a tiny GPT (1 layer, H = 32,
a vocabulary padded past its 64 real ids) at TP = PP = 1: the PPO loss (with its entropy term) and
the GRPO loss (k3 KL term, Dr.GRPO aggregation) give the same metrics, gradient norms and updates
as on the full ``[b, S-1]`` micro-batch; a mask outside the responses is refused.
"""

from __future__ import annotations

import pytest
import torch

from nemo_rlhf.rl.advantages import response_mask

TINY = dict(num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, max_position_embeddings=64)
VOCAB = 64
S = 16
PROMPT_LENGTHS = torch.tensor([3, 5, 2, 6])
LENGTHS = torch.tensor([10, 16, 7, 12])  # responses of 7, 11, 5 and 6 tokens; rows right-padded


def two_policies():
    from nemo_rlhf.models.policy import GPTPolicyModel

    a = GPTPolicyModel(TINY, {"lr": 1e-2}, VOCAB, 2, eos_id=0, pad_id=0)
    b = GPTPolicyModel(TINY, {"lr": 1e-2}, VOCAB, 2, eos_id=0, pad_id=0)
    b.gpt.load_state_dict(a.gpt.state_dict())
    return a, b


def rollout_batch(policy, seed: int = 3) -> dict[str, torch.Tensor]:
    """A PPO / GRPO mini-batch as the trainers build it: ``[4, S]`` tokens and ``[4, S-1]`` per-token
    tensors, the old log-probs those of the policy itself (ratios start at 1) plus noise."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (4, S), generator=g)
    mask = response_mask(PROMPT_LENGTHS, LENGTHS, S)
    old = policy.logprobs(tokens) + 0.1 * torch.randn(4, S - 1, generator=g)
    return {"tokens": tokens, "mask": mask, "old_logprobs": old,
            "advantages": torch.randn(4, S - 1, generator=g) * mask,
            "ref_logprobs": old + 0.05 * torch.randn(4, S - 1, generator=g)}


def assert_same_steps(make_loss_fn, keys, per_token):
    """Three steps of ``make_loss_fn(policy)`` on the full mini-batch and on its response-only form."""
    full, windowed = two_policies()
    batch = rollout_batch(full)
    for step in range(3):
        a = full.train_on(make_loss_fn(full), batch)
        mb = windowed.response_microbatch(batch, PROMPT_LENGTHS, LENGTHS, per_token)
        b = windowed.train_on(make_loss_fn(windowed), mb)
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (step, k, a[k], b[k])
    assert mb["logit_positions"].shape == (4, 11)  # the longest response, not S - 1 = 15
    assert a["grad_norm"] > 0.0
    for (name, p), q in zip(full.gpt.named_parameters(), windowed.gpt.parameters()):
        # 1e-5: Adam (lr 1e-2) turns the rounding noise on gradients that are 0 in exact arithmetic
        # (the key bias: softmax ignores it) into steps of ~1e-6; the other tensors agreed to ~5e-8 (PPO, measured once)
        torch.testing.assert_close(q, p, rtol=0, atol=1e-5, msg=name)


def test_ppo_loss_on_response_positions_equals_the_full_logits(megatron_world):
    from nemo_rlhf.algorithms.ppo import ppo_loss_fn

    def make(policy):
        return ppo_loss_fn(policy, clip_eps=0.2, entropy_coef=0.01, clip_eps_high=None)

    assert_same_steps(make, ("loss", "pg_loss", "entropy", "clipfrac", "approx_kl", "ratio_mean", "grad_norm"),
                      ("old_logprobs", "advantages"))


def test_grpo_loss_on_response_positions_equals_the_full_logits(megatron_world):
    from nemo_rlhf.algorithms.critic_free import grpo_loss_fn

    def make(policy):
        return grpo_loss_fn(policy, 0.2, 0.28, beta=0.04, aggregation="seq_mean_token_sum_norm", max_len=12)

    assert_same_steps(make, ("loss", "clipfrac", "ratio_mean", "kl_k3", "grad_norm"),
                      ("old_logprobs", "advantages", "ref_logprobs"))


def test_response_microbatch_gathers_and_refuses_a_mask_outside_the_responses(megatron_world):
    policy, _ = two_policies()
    batch = rollout_batch(policy)
    mb = policy.response_microbatch(batch, PROMPT_LENGTHS, LENGTHS, ("advantages",))
    positions = mb["logit_positions"]
    assert torch.equal(positions[1], torch.arange(4, 15))  # row 1: prompt 5, length 16 -> t = 4 .. 14
    assert torch.equal(mb["mask"].sum(1), (LENGTHS - PROMPT_LENGTHS).float())
    assert torch.equal(mb["advantages"] * mb["mask"], batch["advantages"].gather(1, positions) * mb["mask"])
    assert mb["old_logprobs"] is batch["old_logprobs"]  # not named: passed on unchanged
    bad = dict(batch, mask=batch["mask"].clone())
    bad["mask"][0, 0] = 1.0  # a prompt position
    with pytest.raises(ValueError, match="outside the rows' responses"):
        policy.response_microbatch(bad, PROMPT_LENGTHS, LENGTHS, ("advantages",))
