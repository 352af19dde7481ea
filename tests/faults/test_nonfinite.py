"""Non-finite guards: a NaN/Inf loss, gradient, reward or advantage skips the update (weights,
optimizer and LR schedule untouched), is logged and counted; N in a row abort the run with
NonFiniteError and no checkpoint is written after the last good one."""

from __future__ import annotations

import fork_server
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.faults

TINY = dict(num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, max_position_embeddings=64)
VOCAB = 64


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.gpt.state_dict().items() if torch.is_tensor(v)}


def same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def sft_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (8, 16), generator=g)
    mask = torch.zeros(8, 16)
    mask[:, 6:] = 1
    return {"tokens": tokens, "loss_mask": mask}


def labelled(seed: int) -> dict[str, torch.Tensor]:
    from nemo_rlhf.models.policy import shift_labels

    b = sft_batch(seed)
    labels, label_mask = shift_labels(b["tokens"], b["loss_mask"], 0)
    return {"tokens": b["tokens"], "labels": labels, "label_mask": label_mask}


def sft_model(optim):
    from nemo_rlhf.models.policy import GPTPolicyModel

    return GPTPolicyModel(TINY, optim, VOCAB, 8, eos_id=0, pad_id=0)


class PoisonedLoss:
    """Wraps a loss function: the loss of the chosen calls is multiplied by ``value`` (NaN/Inf)."""

    def __init__(self, loss_fn, value: float):
        self.loss_fn, self.value, self.poison = loss_fn, value, False

    def __call__(self, mb, out):
        loss, metrics = self.loss_fn(mb, out)
        if self.poison:
            loss = loss * self.value
            metrics = {**metrics, "loss": loss.detach()}
        return loss, metrics


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_loss_skips_the_step_then_training_continues(megatron_world, value):
    from nemo_rlhf.algorithms.sft import sft_loss

    model = sft_model(dict(lr=1e-2, max_nonfinite_in_a_row=3))
    poisoned = PoisonedLoss(sft_loss, value)
    model.train_on(poisoned, labelled(0))
    before, lr_before = snapshot(model), model.optimizer.param_groups[0]["lr"]
    adam_before = {id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                   for p, s in model.optimizer.optimizer.state.items()} if hasattr(model.optimizer, "optimizer") else {}
    poisoned.poison = True
    m = model.train_on(poisoned, labelled(1))
    assert m["skipped"] == 1.0 and m["nonfinite"] == 1.0 and not np.isfinite(m["loss"])
    assert same(before, snapshot(model)), "a non-finite step changed the weights"
    assert model.optimizer.param_groups[0]["lr"] == lr_before
    for p, s in getattr(model.optimizer, "optimizer", model.optimizer).state.items():
        for k, v in s.items():
            if torch.is_tensor(v) and id(p) in adam_before:
                assert torch.equal(adam_before[id(p)][k], v), f"optimizer state {k} changed"
    assert (model.nonfinite_skipped, model.nonfinite_in_a_row) == (1, 1)
    poisoned.poison = False
    m = model.train_on(poisoned, labelled(2))
    assert m["skipped"] == 0.0 and np.isfinite(m["loss"]) and not same(before, snapshot(model))
    assert (model.nonfinite_skipped, model.nonfinite_in_a_row) == (1, 0)


def test_nonfinite_gradient_with_finite_loss_is_skipped(megatron_world):
    from nemo_rlhf.algorithms.sft import sft_loss

    model = sft_model(dict(lr=1e-2))
    hook = next(model.gpt.parameters()).register_hook(lambda g: g * float("nan"))
    before = snapshot(model)
    try:
        m = model.train_on(sft_loss, labelled(3))
    finally:
        hook.remove()
    assert np.isfinite(m["loss"]) and m["skipped"] == 1.0
    assert same(before, snapshot(model))


def test_n_nonfinite_in_a_row_abort_with_a_clear_error(megatron_world):
    from nemo_rlhf.algorithms.sft import sft_loss
    from nemo_rlhf.models.megatron_module import NonFiniteError

    model = sft_model(dict(lr=1e-2, max_nonfinite_in_a_row=3))
    poisoned = PoisonedLoss(sft_loss, float("nan"))
    poisoned.poison = True
    for i in range(2):
        model.train_on(poisoned, labelled(i))
    with pytest.raises(NonFiniteError, match="3 updates in a row had a non-finite loss.*max_nonfinite_in_a_row=3"):
        model.train_on(poisoned, labelled(2))


class NaNRewardBackend:
    """Wraps a critic backend: ``infer`` returns NaN rewards while ``poison`` is set; counts train calls."""

    def __init__(self, backend):
        self.backend, self.poison, self.train_calls = backend, False, 0
        self.max_seq_len = backend.max_seq_len

    def infer(self, tokens, lengths):
        values, rewards = self.backend.infer(tokens, lengths)
        if self.poison:
            rewards = rewards.copy()
            rewards[1] = np.nan
        return values, rewards

    def train(self, *args):
        self.train_calls += 1
        return self.backend.train(*args)

    def save(self, path):
        self.backend.save(path)

    def load(self, path):
        return self.backend.load(path)


def test_ppo_nonfinite_reward_skips_actor_and_critic_updates(megatron_world):
    from nemo_rlhf.algorithms.ppo import PPOTrainer
    from nemo_rlhf.config import PPOActorStageConfig, parse_config
    from nemo_rlhf.models.critic import GPTCriticModel
    from nemo_rlhf.models.megatron_module import NonFiniteError
    from nemo_rlhf.models.policy import GPTPolicyModel
    from nemo_rlhf.models.reward_model import GPTRewardModel
    from nemo_rlhf.servers.local import LocalCriticClient
    from nemo_rlhf.servers.megatron_backend import MegatronCriticBackend

    rm = GPTRewardModel(TINY, None, VOCAB, micro_batch_size=8)
    critic = GPTCriticModel(TINY, dict(lr=1e-3), VOCAB, micro_batch_size=8)
    backend = NaNRewardBackend(MegatronCriticBackend(critic, rm, max_seq_len=64))
    ref = GPTPolicyModel(TINY, None, VOCAB, micro_batch_size=8, eos_id=0, pad_id=0)
    cfg = parse_config(PPOActorStageConfig, {
        "run_dir": ".", "init_from": "unused", "tokenizer": {"path": "unused"},
        "batch": {"global_batch_size": 8, "micro_batch_size": 8},
        "ppo": {"ppo_epochs": 1, "num_minibatches": 2, "sampling": {"max_new_tokens": 6}, "seed": 3,
                "kl_controller": {"type": "adaptive", "init_kl_coef": 0.05, "target": 6.0, "horizon": 10000}}})
    actor = GPTPolicyModel(TINY, dict(lr=1e-3, max_nonfinite_in_a_row=2), VOCAB, 8, eos_id=0, pad_id=0)
    trainer = PPOTrainer.from_models(cfg, actor, ref, LocalCriticClient(backend))
    actor.gpt.load_state_dict(ref.gpt.state_dict())

    def step(prompts):
        metrics = trainer.train_step(prompts)
        trainer.step += 1
        return metrics

    prompts = {"prompts": torch.randint(10, VOCAB, (8, 4), generator=torch.Generator().manual_seed(0)),
               "prompt_lengths": torch.full((8,), 4)}
    m = step(prompts)
    assert backend.train_calls == 2 and m["nonfinite_total"] == 0.0
    kl_coef, weights, critic_weights = trainer.kl_ctl.value, snapshot(actor), snapshot(critic)
    backend.poison = True
    m = step(prompts)
    assert m == {"nonfinite": 1.0, "skipped": 1.0, "nonfinite_total": 1.0}
    assert backend.train_calls == 2, "the critic was trained on a non-finite rollout"
    assert same(weights, snapshot(actor)) and same(critic_weights, snapshot(critic))
    assert trainer.kl_ctl.value == kl_coef and actor.nonfinite_skipped == 1
    backend.poison = False
    step(prompts)  # recovers: updates again, streak reset
    assert backend.train_calls == 4 and actor.nonfinite_in_a_row == 0 and not same(weights, snapshot(actor))
    backend.poison = True
    step(prompts)
    with pytest.raises(NonFiniteError, match="2 updates in a row had a non-finite rollout scores"):
        step(prompts)


def test_sft_stage_aborts_nonzero_and_keeps_the_last_good_checkpoint(tmp_path):
    """A learning rate of 1e30 makes every loss after the first step non-finite: those steps are
    skipped, the third in a row aborts the launcher with a non-zero status naming the cause, and
    the checkpoint of step 1 (the last update) is the newest one — nothing is written after it."""
    import json
    import os
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    run = tmp_path / "blowup"
    cmd = [sys.executable, str(repo / "launchers" / "train_sft.py"), f"run_dir={run}", "data.max_rows=300",
           "model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64",
           "model.max_position_embeddings=128", "data.max_seq_len=128", "data.max_prompt_len=96",
           "tokenizer.vocab_size=512", "trainer.max_steps=20", "trainer.val_check_interval=null",
           "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=1",
           "checkpoint.keep_last=5",
           "optim.lr=1e30", "optim.warmup_steps=0", "optim.max_nonfinite_in_a_row=3"]
    proc = fork_server.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "NonFiniteError" in out and "optim.max_nonfinite_in_a_row=3" in out, out[-3000:]
    assert out.count("update skipped") >= 3
    ckpts = sorted(p.name for p in (run / "checkpoints" / "sft").iterdir())
    assert ckpts == ["step_00000001"], ckpts
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in rows if r.get("train/skipped") == 1.0]
    assert skipped == [1, 2], rows  # steps 2 and 3 (0-based 1, 2) were logged as skipped before the abort
