"""The megatron model roles against plain-torch references at TP = PP = 1.

Each loss/log-prob that goes through megatron's pipeline schedule is recomputed by hand from the raw
``GPTModel`` output with ``torch.log_softmax``; the vocab-parallel helpers are compared with torch
autograd; and a few optimizer steps must actually lower the losses.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from nemo_rlhf.algorithms.reward_model import bradley_terry_step_loss, pair_microbatches
from nemo_rlhf.algorithms.sft import sft_loss
from nemo_rlhf.models.critic import GPTCriticModel
from nemo_rlhf.models.policy import GPTPolicyModel, mask_padded_vocab, shift_labels
from nemo_rlhf.servers.megatron_backend import critic_loss_fn
from nemo_rlhf.models.megatron_module import position_ids_like, split_microbatches
from nemo_rlhf.models.reward_model import GPTRewardModel, gather_last_token
from nemo_rlhf.models.vocab_parallel import token_logprobs, vocab_parallel_entropy

B, S = 4, 16


def _raw_output(module, tokens: torch.Tensor) -> torch.Tensor:
    """The bare ``GPTModel`` forward (no schedule): logits ``[B, S, V]`` or head outputs ``[B, S, 1]``."""
    module.model.eval()
    with torch.no_grad():
        return module.gpt(tokens, position_ids_like(tokens), None).float()


def _sft_batch(tiny, prompt_lens, lengths, seed=0):
    """Right-padded SFT batch: ``loss_mask`` is 1 on response tokens ``[P, L)``."""
    tokens = tiny.tokens(len(lengths), S, seed=seed)
    loss_mask = torch.zeros(len(lengths), S)
    for i, (p, n) in enumerate(zip(prompt_lens, lengths)):
        tokens[i, n:] = tiny.pad_id
        loss_mask[i, p:n] = 1.0
    return {"tokens": tokens, "loss_mask": loss_mask}


def _labelled(batch, pad_id):
    labels, mask = shift_labels(batch["tokens"], batch["loss_mask"], pad_id)
    return {"tokens": batch["tokens"], "labels": labels, "label_mask": mask}


def _sft_eval(model, batch):
    return model.evaluate_on(sft_loss, _labelled(batch, model.pad_id))


def _sft_train(model, batch):
    return model.train_on(sft_loss, _labelled(batch, model.pad_id))


def _rm_eval(model, batch):
    return model.evaluate_on(bradley_terry_step_loss, pair_microbatches(batch, model.micro_batch_size))


# ------------------------------------------------------------------ SFT
def test_shift_labels_hand_example():
    tokens = torch.tensor([[5, 6, 7, 8]])
    loss_mask = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    labels, mask = shift_labels(tokens, loss_mask, pad_id=0)
    assert labels.tolist() == [[6, 7, 8, 0]]
    # position 1 predicts token 2 (the first response token), position 2 predicts token 3
    assert mask.tolist() == [[0.0, 1.0, 1.0, 0.0]]


def test_sft_nll_through_schedule_equals_manual_log_softmax(build, tiny):
    model = build(GPTPolicyModel, micro_batch_size=2, eos_id=tiny.eos_id, pad_id=tiny.pad_id)
    # Different response token counts per micro-batch (5+3 vs 10+1), so the token-weighted "nll"
    # and the mean of per-micro-batch means ("loss") differ.
    batch = _sft_batch(tiny, prompt_lens=[3, 5, 2, 4], lengths=[8, 8, 12, 5])
    got = _sft_eval(model, batch)

    logits = _raw_output(model, batch["tokens"])
    assert logits.shape == (B, S, tiny.padded_vocab)
    logp = torch.log_softmax(logits.double(), dim=-1)  # megatron's CE runs over the padded vocabulary
    nll = -logp[:, :-1].gather(-1, batch["tokens"][:, 1:, None])[..., 0]  # [B, S-1]
    mask = batch["loss_mask"][:, 1:].double()
    want_nll = (nll * mask).sum() / mask.sum()
    per_mb = [(nll[i:i + 2] * mask[i:i + 2]).sum() / mask[i:i + 2].sum() for i in (0, 2)]
    want_loss = sum(per_mb) / 2

    assert got["nll"] == pytest.approx(want_nll.item(), abs=1e-5)
    assert got["loss"] == pytest.approx(want_loss.item(), abs=1e-5)
    assert abs(want_nll.item() - want_loss.item()) > 1e-3  # the two averages really are different
    # an untrained model is close to uniform over the padded vocabulary
    assert got["nll"] == pytest.approx(torch.log(torch.tensor(128.0)).item(), abs=0.5)


def test_sft_nll_is_independent_of_micro_batch_size(build, tiny):
    model = build(GPTPolicyModel, micro_batch_size=1, eos_id=tiny.eos_id, pad_id=tiny.pad_id)
    batch = _sft_batch(tiny, prompt_lens=[3, 5, 2, 4], lengths=[8, 8, 12, 5], seed=1)
    nlls = []
    for mbs in (1, 2, 4):
        model.micro_batch_size = mbs
        nlls.append(_sft_eval(model, batch)["nll"])
    assert nlls[1] == pytest.approx(nlls[0], abs=1e-6)
    assert nlls[2] == pytest.approx(nlls[0], abs=1e-6)


def test_split_microbatches_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="micro_batch_size=3"):
        split_microbatches({"tokens": torch.zeros(4, 2)}, 3)
    with pytest.raises(ValueError, match="micro_batch_size=0"):
        split_microbatches({"tokens": torch.zeros(4, 2)}, 0)


# ------------------------------------------------------------------ vocab-parallel helpers (TP = 1)
def test_token_logprobs_and_grad_equal_torch(megatron_cpu):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 5, 128, generator=g)).requires_grad_(True)
    targets = torch.randint(0, 128, (3, 5), generator=g)
    upstream = torch.randn(3, 5, generator=g)
    before = logits.detach().clone()

    lp = token_logprobs(logits, targets)
    assert lp.shape == (3, 5) and lp.dtype == torch.float32
    assert torch.equal(logits.detach(), before)  # megatron's kernel writes into its input: not here
    (lp * upstream).sum().backward()
    grad = logits.grad.clone()

    ref_logits = before.clone().requires_grad_(True)
    ref = torch.log_softmax(ref_logits, -1).gather(-1, targets[..., None])[..., 0]
    (ref * upstream).sum().backward()
    torch.testing.assert_close(lp.detach(), ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, ref_logits.grad, atol=1e-5, rtol=0)


def test_vocab_parallel_entropy_and_grad_equal_torch(megatron_cpu):
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(3, 5, 128, generator=g)).requires_grad_(True)
    upstream = torch.randn(3, 5, generator=g)
    ent = vocab_parallel_entropy(logits)
    (ent * upstream).sum().backward()

    ref_logits = logits.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(ref_logits, -1)
    ref = -(logp.exp() * logp).sum(-1)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(ent.detach(), ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits.grad, ref_logits.grad, atol=1e-5, rtol=0)
    # hand values: uniform over 128 -> log 128; one-hot-like -> ~0
    flat = vocab_parallel_entropy(torch.zeros(1, 1, 128))
    peaked = vocab_parallel_entropy(torch.tensor([[[100.0] + [0.0] * 127]]))
    assert flat.item() == pytest.approx(torch.log(torch.tensor(128.0)).item(), abs=1e-5)
    assert peaked.item() == pytest.approx(0.0, abs=1e-6)


def test_mask_padded_vocab_hand_example(megatron_cpu):
    logits = torch.arange(8, dtype=torch.float32).reshape(1, 1, 8)
    masked = mask_padded_vocab(logits, 5)
    assert masked[0, 0, :5].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert masked[0, 0, 5:].tolist() == [-1e9] * 3
    assert torch.equal(logits, torch.arange(8, dtype=torch.float32).reshape(1, 1, 8))  # not in place
    assert mask_padded_vocab(logits, None) is logits
    assert mask_padded_vocab(logits, 8) is logits


# ------------------------------------------------------------------ reward model
def test_gather_last_token_hand_example_and_errors():
    out = torch.arange(12, dtype=torch.float32).reshape(2, 6, 1)  # row 0: 0..5, row 1: 6..11
    assert gather_last_token(out, torch.tensor([3, 6])).tolist() == [2.0, 11.0]
    assert gather_last_token(out, torch.tensor([1, 1])).tolist() == [0.0, 6.0]
    with pytest.raises(ValueError, match=r"\[1, 6\]"):
        gather_last_token(out, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"\[1, 6\]"):
        gather_last_token(out, torch.tensor([3, 7]))


def _preference_batch(tiny, chosen_len, rejected_len, seed=0):
    """``collate_preference`` layout: ``tokens [2B, S]`` (chosen rows, then rejected), ``lengths [2B]``."""
    lengths = torch.tensor(chosen_len + rejected_len)
    tokens = tiny.tokens(len(lengths), S, seed=seed)
    for i, n in enumerate(lengths.tolist()):
        tokens[i, n:] = tiny.pad_id
    return {"tokens": tokens, "lengths": lengths}


def test_reward_model_bt_loss_and_accuracy_equal_manual(build, tiny):
    model = build(GPTRewardModel, micro_batch_size=2)
    with torch.no_grad():  # a visible bias must not change margins: check it cancels
        model.gpt.output_layer.bias.fill_(0.5)
    batch = _preference_batch(tiny, [9, 5, 16, 7], [4, 12, 6, 16], seed=3)
    got = _rm_eval(model, batch)

    out = _raw_output(model, batch["tokens"])
    assert out.shape == (8, S, 1)
    r = out[torch.arange(8), batch["lengths"] - 1, 0].double()  # reward at the last real token
    margin = r[:4] - r[4:]
    want_loss = -F.logsigmoid(margin).mean()
    want_acc = (margin > 0).double().mean()
    assert got["loss"] == pytest.approx(want_loss.item(), abs=1e-5)
    assert got["accuracy"] == pytest.approx(want_acc.item(), abs=1e-9)
    assert got["reward_chosen"] == pytest.approx(r[:4].mean().item(), abs=1e-5)
    assert got["reward_rejected"] == pytest.approx(r[4:].mean().item(), abs=1e-5)
    # score() returns the same per-sequence rewards
    torch.testing.assert_close(model.score(batch["tokens"], batch["lengths"]).double(), r, atol=1e-5, rtol=0)


def test_mean_pooled_reward_model_averages_the_head_over_real_tokens(build, tiny):
    """model.reward_pooling=mean: score and the Bradley-Terry loss read the head's per-token
    outputs averaged over each row's real tokens (padding excluded), by hand from the raw output."""
    from nemo_rlhf.algorithms.reward_model import RewardModelTrainer
    from nemo_rlhf.models.reward_model import pool_scores

    model = build(GPTRewardModel, micro_batch_size=2, model_cfg={"reward_pooling": "mean"})
    batch = _preference_batch(tiny, [9, 5, 16, 7], [4, 12, 6, 16], seed=3)
    out = _raw_output(model, batch["tokens"])
    lengths = batch["lengths"]
    r = torch.stack([out[i, : int(n), 0].double().mean() for i, n in enumerate(lengths)])
    torch.testing.assert_close(model.score(batch["tokens"], lengths).double(), r, atol=1e-5, rtol=0)
    got = model.evaluate_on(lambda mb, o: RewardModelTrainer._loss_fn(SimpleNamespace(model=model), mb, o),
                            pair_microbatches(batch, model.micro_batch_size))
    assert got["loss"] == pytest.approx(-F.logsigmoid(r[:4] - r[4:]).mean().item(), abs=1e-5)
    assert pool_scores(out, lengths, "last").tolist() == pytest.approx(gather_last_token(out, lengths).tolist())
    with pytest.raises(ValueError, match="'last' or 'mean'"):
        pool_scores(out, lengths, "max")
    with pytest.raises(ValueError, match="lengths must be in"):
        pool_scores(out, torch.tensor([0, 1, 1, 1, 1, 1, 1, 1]), "mean")


def test_reward_ignores_right_padding(build, tiny):
    """Causal attention: a row's reward depends only on its own tokens, not on what is padded after."""
    model = build(GPTRewardModel, micro_batch_size=1)
    tokens = tiny.tokens(1, S, seed=4)
    scores = model.score(tokens, torch.tensor([6]))
    other_pad = tokens.clone()
    other_pad[0, 6:] = tiny.tokens(1, S - 6, seed=5)  # different garbage after the end
    short = tokens[:, :6]
    assert model.score(other_pad, torch.tensor([6])).item() == pytest.approx(scores.item(), abs=1e-5)
    assert model.score(short, torch.tensor([6])).item() == pytest.approx(scores.item(), abs=1e-5)
    assert model.score(tokens, torch.tensor([7])).item() != pytest.approx(scores.item(), abs=1e-6)


# ------------------------------------------------------------------ actor / critic
def test_actor_logprobs_equal_manual_log_softmax_over_unpadded_vocab(build, tiny):
    actor = build(GPTPolicyModel, micro_batch_size=2, eos_id=tiny.eos_id, pad_id=tiny.pad_id)
    tokens = tiny.tokens(B, S, seed=6)
    lp = actor.logprobs(tokens)
    assert lp.shape == (B, S - 1) and lp.dtype == torch.float32

    logits = _raw_output(actor, tokens).double()
    masked = logits.clone()
    masked[..., tiny.vocab:] = float("-inf")
    want = torch.log_softmax(masked[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]
    torch.testing.assert_close(lp.double(), want, atol=1e-5, rtol=0)
    # The padding columns matter: the unmasked softmax (over 128 ids) gives clearly lower log-probs.
    unmasked = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]
    assert (want - unmasked).mean().item() > 0.1


def test_critic_values_equal_raw_head_output(build, tiny):
    critic = build(GPTCriticModel, micro_batch_size=2)
    tokens = tiny.tokens(B, S, seed=7)
    values = critic.values(tokens)
    assert values.shape == (B, S) and values.dtype == torch.float32
    torch.testing.assert_close(values, _raw_output(critic, tokens)[..., 0], atol=1e-6, rtol=0)


def test_mean_pooled_critic_starts_at_the_reward_models_prefix_scores(build, tiny):
    """model.reward_pooling=mean: the critic's value at t is the running mean of its head over
    positions 0..t, so with the reward model's weights V(s_t) = the RM's score of tokens[:, :t+1]
    (the potential GAE needs), and the value loss trains through that reading."""
    from nemo_rlhf.models.critic import prefix_values

    rm = build(GPTRewardModel, seed=21, micro_batch_size=2, model_cfg={"reward_pooling": "mean"})
    critic = build(GPTCriticModel, seed=21, micro_batch_size=2, model_cfg={"reward_pooling": "mean"},
                   optim_cfg=dict(tiny.optim, lr=3e-3))
    tokens = tiny.tokens(B, S, seed=22)
    values = critic.values(tokens)
    for t in (0, 3, S - 1):
        scores = rm.score(tokens, torch.full((B,), t + 1))
        torch.testing.assert_close(values[:, t], scores, atol=1e-5, rtol=0)
    raw = _raw_output(critic, tokens)[..., 0]
    assert not torch.allclose(values, raw, atol=1e-3)  # not the head's raw outputs
    torch.testing.assert_close(prefix_values(raw[..., None], "last")[..., 0], raw)
    with pytest.raises(ValueError, match="'last' or 'mean'"):
        prefix_values(raw[..., None], "max")
    returns = torch.linspace(-1.0, 1.0, S).repeat(B, 1)
    batch = {"tokens": tokens, "returns": returns, "prev_values": values, "mask": torch.ones(B, S)}
    first = critic.evaluate_on(critic_loss_fn(None), batch)["loss"]
    assert first == pytest.approx(0.5 * ((values - returns) ** 2).mean().item(), abs=1e-5)
    for _ in range(20):
        critic.train_on(critic_loss_fn(None), batch)
    assert critic.evaluate_on(critic_loss_fn(None), batch)["loss"] < 0.5 * first


def test_sft_training_lowers_nll(build, tiny):
    model = build(GPTPolicyModel, optim_cfg=dict(tiny.optim, lr=3e-3), micro_batch_size=2,
                  eos_id=tiny.eos_id, pad_id=tiny.pad_id)
    batch = _sft_batch(tiny, prompt_lens=[3, 5, 2, 4], lengths=[12, 16, 14, 10], seed=8)
    before = _sft_eval(model, batch)["nll"]
    for _ in range(30):
        metrics = _sft_train(model, batch)
        assert metrics["skipped"] == 0.0
    after = _sft_eval(model, batch)["nll"]
    assert before - after > 1.0, (before, after)


def test_critic_training_lowers_value_loss(build, tiny):
    critic = build(GPTCriticModel, optim_cfg=dict(tiny.optim, lr=3e-3), micro_batch_size=2)
    tokens = tiny.tokens(B, S, seed=9)
    returns = torch.linspace(-1.0, 1.0, S).repeat(B, 1)  # a position-dependent target
    mask = torch.ones(B, S)
    mask[:, :4] = 0
    prev = torch.zeros(B, S)
    batch = {"tokens": tokens, "returns": returns, "prev_values": prev, "mask": mask}
    first = critic.train_on(critic_loss_fn(None), batch)["loss"]
    for _ in range(19):
        last = critic.train_on(critic_loss_fn(None), batch)["loss"]
    values = critic.values(tokens)
    want = 0.5 * ((values - returns)[:, 4:] ** 2).mean().item()
    assert first > 0.1  # 0.5 * mean(returns^2) ~ 0.19 at init (values ~ 0)
    assert want < 0.25 * first, (first, last, want)


def test_train_step_is_independent_of_micro_batch_size(build, tiny):
    """Same batch, same initial weights: mbs 2 and 4 give the same loss, grads and updated weights.

    Every row has the same number of response tokens, so the mean of per-micro-batch means (what
    megatron's schedule averages) equals the global token mean.
    """
    models = [build(GPTPolicyModel, seed=11, optim_cfg=tiny.optim, micro_batch_size=m, eos_id=tiny.eos_id,
                    pad_id=tiny.pad_id)
              for m in (2, 4)]
    sd = [{k: v.clone() for k, v in m.unwrapped_state_dict().items() if torch.is_tensor(v)}
          for m in models]
    assert all(torch.equal(sd[0][k], sd[1][k]) for k in sd[0])
    batch = _sft_batch(tiny, prompt_lens=[3, 5, 2, 4], lengths=[10, 12, 9, 11], seed=10)
    metrics = []
    for m in models:
        metrics.append(_sft_train(m, batch))
    assert metrics[0]["loss"] == pytest.approx(metrics[1]["loss"], abs=1e-6)
    assert metrics[0]["nll"] == pytest.approx(metrics[1]["nll"], abs=1e-6)
    assert metrics[0]["grad_norm"] == pytest.approx(metrics[1]["grad_norm"], rel=1e-5)

    params = [dict(m.gpt.named_parameters()) for m in models]
    for name, p in params[0].items():
        q = params[1][name]
        torch.testing.assert_close(p.main_grad, q.main_grad, atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=0, msg=name)
    # and the step really moved the weights
    moved = max((params[0][k].detach() - sd[0][k]).abs().max().item() for k in params[0])
    assert moved > 1e-4
