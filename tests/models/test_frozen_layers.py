"""nemo_rlhf/models/trainable.py through the roles: ``model.num_layers_unfrozen`` (frozen bottom
layers and embeddings) and ``optim.layer_lr_decay`` / ``optim.lr_mult`` (parameter groups), on the
tiny 2-layer GPT at TP = PP = 1. The PP = 2 case runs in tests/multiprocess/test_frozen_parity.py.
"""

from __future__ import annotations

import pytest
import torch

from nemo_rlhf.algorithms.sft import sft_loss
from nemo_rlhf.config import ConfigError, ModelConfig, OptimConfig, parse_config
from nemo_rlhf.models.critic import GPTCriticModel
from nemo_rlhf.models.policy import GPTPolicyModel, shift_labels
from nemo_rlhf.models.trainable import freeze_bottom_layers

B, S = 4, 16
UNTIED = {"share_embeddings_and_output_weights": False}


def _policy(build, tiny, k, model_cfg=None, **optim):
    return build(GPTPolicyModel, model_cfg={"num_layers_unfrozen": k, **(model_cfg or {})},
                 optim_cfg={**tiny.optim, **optim}, micro_batch_size=2, eos_id=tiny.eos_id, pad_id=tiny.pad_id)


def _sft_batch(tiny, seed=8):
    tokens = tiny.tokens(B, S, seed=seed)
    loss_mask = torch.zeros(B, S)
    loss_mask[:, 4:] = 1.0
    labels, mask = shift_labels(tokens, loss_mask, tiny.pad_id)
    return {"tokens": tokens, "labels": labels, "label_mask": mask}


def _trainable(model) -> set[str]:
    return {n for n, p in model.gpt.named_parameters() if p.requires_grad}


def _part(name: str) -> str:
    """``decoder.layers.1.mlp.linear_fc1.weight`` -> ``decoder.layers.1.``; ``output_layer.weight`` ->
    ``output_layer.``; ``embedding.word_embeddings.weight`` -> ``embedding.``, ..."""
    depth = 3 if name.startswith("decoder.layers.") else 2 if name.startswith("decoder.") else 1
    return ".".join(name.split(".")[:depth]) + "."


def _adam_state_elements(model) -> int:
    """Elements of Adam's two moments (``exp_avg``, ``exp_avg_sq``) over every optimizer state."""
    state = model.optimizer.optimizer.state  # megatron FP32Optimizer -> torch AdamW
    return sum(s[k].numel() for s in state.values() for k in ("exp_avg", "exp_avg_sq"))


# ------------------------------------------------------------------ which parameters train
@pytest.mark.parametrize("k, tied, want", [
    # tied: the LM head is the embedding matrix and stays frozen with it
    (1, True, {"decoder.layers.1.", "decoder.final_layernorm."}),
    (2, True, {"decoder.layers.0.", "decoder.layers.1.", "decoder.final_layernorm."}),
    (0, True, {"decoder.final_layernorm."}),
    # untied: the LM head trains (also at k = 0, unlike trlX)
    (1, False, {"decoder.layers.1.", "decoder.final_layernorm.", "output_layer."}),
    (0, False, {"decoder.final_layernorm.", "output_layer."}),
])
def test_num_layers_unfrozen_selects_top_layers_norm_and_head(build, tiny, k, tied, want):
    model = _policy(build, tiny, k, {"share_embeddings_and_output_weights": tied})
    trainable = _trainable(model)
    assert {_part(n) for n in trainable} == want
    assert {_part(n) for n, _ in model.gpt.named_parameters()} - want  # something is frozen
    # no DDP gradient buffer for frozen parameters, and the buffer holds exactly the trainable ones
    for n, p in model.model.named_parameters():
        assert hasattr(p, "main_grad") == p.requires_grad, n
    in_buffers = sum(p.numel() for buf in model.model.buffers for p in buf.params)
    assert in_buffers == sum(p.numel() for p in model.gpt.parameters() if p.requires_grad)


def test_all_layers_train_by_default(build, tiny):
    model = _policy(build, tiny, -1)
    assert _trainable(model) == {n for n, _ in model.gpt.named_parameters()}


def test_critic_value_head_trains_at_k0(build, tiny):
    critic = build(GPTCriticModel, model_cfg={"num_layers_unfrozen": 0}, optim_cfg=tiny.optim, micro_batch_size=2)
    assert _trainable(critic) == {"decoder.final_layernorm.weight", "decoder.final_layernorm.bias",
                                  "output_layer.weight", "output_layer.bias"}


# ------------------------------------------------------------------ frozen weights, optimizer state, loss
def test_frozen_weights_bitwise_unchanged_no_optimizer_state_and_loss_falls(build, tiny):
    model = _policy(build, tiny, 1, UNTIED, lr=3e-3)
    frozen = {n: p.detach().clone() for n, p in model.gpt.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.gpt.named_parameters() if p.requires_grad}
    assert set(frozen) and set(trained)
    batch = _sft_batch(tiny)
    losses = [model.train_on(sft_loss, batch)["loss"] for _ in range(8)]

    after = dict(model.gpt.named_parameters())
    for n, p in frozen.items():
        assert torch.equal(after[n], p), f"frozen {n} changed"
    assert all(not torch.equal(after[n], p) for n, p in trained.items())
    assert losses[-1] < losses[0] - 0.3, losses

    # Adam state: two moments per trainable element, nothing for the frozen ones
    n_trainable = sum(p.numel() for p in trained.values())
    n_all = n_trainable + sum(p.numel() for p in frozen.values())
    elements = _adam_state_elements(model)
    print(f"\noptimizer state: {elements} elements = 2 x {n_trainable} trainable of {n_all} parameters")
    assert elements == 2 * n_trainable
    assert set(model.optimizer.optimizer.state) == {p for p in model.gpt.parameters() if p.requires_grad}
    full = _policy(build, tiny, -1, UNTIED, lr=3e-3)
    full.train_on(sft_loss, batch)
    assert _adam_state_elements(full) == 2 * n_all


def test_config_refuses_more_unfrozen_layers_than_layers():
    with pytest.raises(ConfigError, match=r"model.num_layers_unfrozen=3 > model.num_layers=2"):
        ModelConfig(num_layers=2, num_layers_unfrozen=3)
    with pytest.raises(ConfigError, match=r"model.num_layers_unfrozen must be >= -1"):
        ModelConfig(num_layers_unfrozen=-2)


def test_freeze_refuses_out_of_range(build, tiny):
    model = _policy(build, tiny, -1)
    with pytest.raises(ValueError, match=r"num_layers_unfrozen=5 must be in \[-1, model.num_layers=2\]"):
        freeze_bottom_layers(model.gpt, 5)


# ------------------------------------------------------------------ layer-wise learning rates
DECAY = 0.5
MULT = {"head": 10.0, "embedding": 0.1}
# tiny untied GPT, 2 layers: depth 0 head/final norm, layer 1 -> 1, layer 0 -> 2, embedding -> 3
EXPECTED = {"embedding.": 0.1 * DECAY ** 3, "decoder.layers.0.": DECAY ** 2, "decoder.layers.1.": DECAY,
            "decoder.final_layernorm.": 1.0, "output_layer.": 10.0}


def _expected_mult(name: str) -> float:
    name = name.removeprefix("module.")
    (mult,) = [m for prefix, m in EXPECTED.items() if name.startswith(prefix)]
    return mult


def test_group_lrs_follow_layer_decay_and_multipliers_through_the_schedule(build, tiny):
    model = _policy(build, tiny, -1, UNTIED, optimizer="sgd", lr=0.1, min_lr=0.01, warmup_steps=2,
                    decay_steps=6, decay_style="cosine", clip_grad=1e9, layer_lr_decay=DECAY, lr_mult=MULT)
    groups = model.optimizer.param_groups
    name_of = {p: n for n, p in model.model.named_parameters()}
    assert sum(len(g["params"]) for g in groups) == len(name_of)
    batch = _sft_batch(tiny)
    seen = set()
    for step in range(6):
        base = model.base_lr()
        for g in groups:
            for p in g["params"]:
                assert g["lr"] == pytest.approx(base * _expected_mult(name_of[p]), rel=1e-12), (step, name_of[p])
                seen.add(_expected_mult(name_of[p]))
        before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
        lrs = {name_of[p]: g["lr"] for g in groups for p in g["params"]}
        model.train_on(sft_loss, batch)
        # plain SGD, no clipping, no weight decay: each weight moves by its group's lr times its gradient
        for n, p in model.model.named_parameters():
            torch.testing.assert_close(before[n] - p.detach(), lrs[n] * p.main_grad, atol=1e-7, rtol=1e-5)
    assert seen == set(EXPECTED.values())
    assert model.base_lr() == pytest.approx(0.01)  # past decay_steps: min_lr (groups: min_lr x mult)


def test_default_optimizer_groups_unchanged(build, tiny):
    model = _policy(build, tiny, -1)
    groups = model.optimizer.param_groups
    # megatron's standard groups only: with and without weight decay, at the plain schedule
    assert len(groups) == 2 and all(g["max_lr"] == tiny.optim["lr"] for g in groups)


def test_frozen_parameters_are_in_no_group(build, tiny):
    model = _policy(build, tiny, 1, UNTIED, layer_lr_decay=DECAY)
    in_groups = {p for g in model.optimizer.param_groups for p in g["params"]}
    assert in_groups == {p for p in model.gpt.parameters() if p.requires_grad}


def test_optim_config_validation():
    with pytest.raises(ConfigError, match=r"optim.layer_lr_decay must be in \(0, 1\]"):
        OptimConfig(layer_lr_decay=0.0)
    with pytest.raises(ConfigError, match=r"optim.lr_mult.head must be >= 0"):
        parse_config(OptimConfig, {"lr_mult": {"head": -1.0}})
    with pytest.raises(ConfigError, match=r"unknown key 'haed' in section 'optim.lr_mult' \(did you mean 'head'\?\)"):
        parse_config(OptimConfig, {"lr_mult": {"haed": 2.0}})


# ------------------------------------------------------------------ resume
def test_resume_with_frozen_layers_and_lr_groups_is_exact(build, tiny, tmp_path):
    """A training checkpoint (weights, Adam state of the trainable parameters, per-group LRs, schedule)
    resumes bitwise: the resumed model's next step equals the uninterrupted one's."""
    from nemo_rlhf.checkpoint.training_state import load_training_checkpoint, save_checkpoint_dir

    optim = dict(lr=3e-3, warmup_steps=1, decay_steps=6, layer_lr_decay=DECAY, lr_mult=MULT)
    batch = _sft_batch(tiny)
    a = _policy(build, tiny, 1, UNTIED, **optim)
    for _ in range(2):
        a.train_on(sft_loss, batch)
    a.completed_steps = 2
    save_checkpoint_dir(tmp_path / "ck", a)
    b = _policy(build, tiny, 1, UNTIED, **optim)
    b.gpt.load_state_dict({k: v.clone() + 1 if torch.is_tensor(v) else v for k, v in b.gpt.state_dict().items()})
    load_training_checkpoint(tmp_path / "ck", b)
    assert [g["lr"] for g in b.optimizer.param_groups] == [g["lr"] for g in a.optimizer.param_groups]
    ma, mb = a.train_on(sft_loss, batch), b.train_on(sft_loss, batch)
    assert ma == mb
    for (n, pa), pb in zip(a.gpt.named_parameters(), b.gpt.parameters()):
        assert torch.equal(pa, pb), n
    assert _adam_state_elements(b) == _adam_state_elements(a) == 2 * sum(
        p.numel() for p in a.gpt.parameters() if p.requires_grad)
