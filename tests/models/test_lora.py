"""LoRA adapters (nemo_rlhf/models/lora.py) on the tiny GPT at TP = PP = 1.

Fresh adapters (B = 0) give exactly the base model; merged forward equals unmerged and the unmerge
restores the base weights bitwise; ``adapters_disabled`` is exactly the base (the reference policy);
only adapter tensors reach the optimizer (counted); training lowers the loss while every base weight
stays bitwise unchanged; adapters save/load on their own and inside the full weights and training
checkpoints (resume exact); ``save_merged_weights`` / ``export_hf`` export the merged model;
``ppo.reference: lora_disabled`` gives bitwise the log-probs of a frozen copy of the initial policy.
TP = 2 (and SP) parity is in tests/multiprocess/test_lora_tp.py.
"""

from __future__ import annotations

import pytest
import torch

from nemo_rlhf.checkpoint.weights import (
    CheckpointError,
    load_adapters,
    load_weights,
    read_adapter_config,
    save_adapters,
    save_merged_weights,
    save_model_weights,
)
from nemo_rlhf.config import ConfigError, LoRAConfig, ModelConfig, parse_config
from nemo_rlhf.models import lora as L
from nemo_rlhf.models.megatron_module import position_ids_like
from nemo_rlhf.models.policy import GPTPolicyModel
from nemo_rlhf.models.reward_model import GPTRewardModel

B, S, R = 4, 16, 4
LORA = {"rank": R, "alpha": 8.0}
# Llama-like variant: RMSNorm, SwiGLU (fc1 holds [gate; up]), GQA, no biases, untied head.
LLAMA = dict(normalization="RMSNorm", activation="swiglu", num_query_groups=2, add_bias_linear=False,
             share_embeddings_and_output_weights=False)
VARIANTS = {"gpt": {}, "llama": LLAMA}


def _policy(build, lora=LORA, optim=None, seed=None, **model):
    kwargs = dict(model_cfg={**model, "lora": lora} if lora else dict(model), optim_cfg=optim,
                  micro_batch_size=2, eos_id=1, pad_id=0)
    return build(GPTPolicyModel, **kwargs) if seed is None else build(GPTPolicyModel, seed=seed, **kwargs)


def _logits(module, tokens):
    module.gpt.eval()
    with torch.no_grad():
        return module.gpt(tokens, position_ids_like(tokens), None).float()


def _randomize_b(module, seed=0, std=0.5):
    """Non-zero B (the adapters then change the outputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in L.adapter_parameters(module):
            if name.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _base_state(module):
    return {k: v.clone() for k, v in module.gpt.state_dict().items()
            if torch.is_tensor(v) and not L.is_adapter_name(k)}


def _adapter_state(module):
    return {n: p.detach().clone() for n, p in L.adapter_parameters(module)}


def _nll_loss(mb, nll):
    loss = nll.float().mean()
    return loss, {"loss": loss.detach()}


def _lm_batch(tiny, seed=0):
    tokens = tiny.tokens(B, S, seed=seed)
    labels = torch.roll(tokens, -1, dims=1)
    return {"tokens": tokens, "labels": labels}


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("node, message", [
    ({"rank": -1}, "model.lora.rank must be >= 0"),
    ({"alpha": 0}, "model.lora.alpha must be > 0"),
    ({"dropout": 1.0}, "model.lora.dropout must be in [0, 1)"),
    ({"target_modules": ["qkv", "fc3"]}, "model.lora.target_modules[1]='fc3' is not one of"),
    ({"target_modules": ["qvk"]}, "(did you mean 'qkv'?)"),
    ({"target_modules": ["qkv", "qkv"]}, "model.lora.target_modules[1]='qkv' is listed twice"),
    ({"target_modules": []}, "model.lora.target_modules must name at least one"),
    ({"ranks": 4}, "unknown key 'ranks' in section 'model.lora' (did you mean 'rank'?)"),
])
def test_bad_lora_config_names_the_field(node, message):
    with pytest.raises(ConfigError) as err:
        parse_config(ModelConfig, {"lora": node})
    assert message in str(err.value)


def test_lora_off_by_default_and_rank_none_is_off():
    assert not parse_config(ModelConfig, {}).lora.enabled
    assert L.lora_config({"lora": {"rank": None}}) is None
    assert L.lora_config({"lora": {"rank": 0}}) is None
    assert L.lora_config({"lora": LoRAConfig(rank=2)}).rank == 2


# ------------------------------------------------------------------ forward
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fresh_adapters_give_exactly_the_base_model(build, tiny, variant):
    """B = 0: bitwise the base model's logits; LoRA also leaves the base initialisation unchanged."""
    base = _policy(build, lora=None, **VARIANTS[variant])
    lora = _policy(build, **VARIANTS[variant])
    names = {n for n, _ in L.lora_modules(lora)}
    assert len(names) == 4 * tiny.model["num_layers"]
    base_sd, lora_sd = _base_state(base), _base_state(lora)
    assert base_sd.keys() == lora_sd.keys()
    assert all(torch.equal(base_sd[k], lora_sd[k]) for k in base_sd)
    assert all(float(p.abs().sum()) > 0 for n, p in L.adapter_parameters(lora) if n.endswith("lora_a"))
    tokens = tiny.tokens(B, S)
    assert torch.equal(_logits(base, tokens), _logits(lora, tokens))


def test_adapter_output_is_eq3_of_hu_et_al(build, tiny):
    """One layer by hand: ``W0 x + b + (alpha / r) B A x`` for a column- and a row-parallel LoRA linear."""
    model = _policy(build)
    _randomize_b(model)
    layer = model.gpt.decoder.layers[0]
    x = torch.randn(S, B, tiny.model["hidden_size"], generator=torch.Generator().manual_seed(3))
    for linear, width in ((layer.self_attention.linear_qkv, tiny.model["hidden_size"]),
                          (layer.mlp.linear_fc2, tiny.model["ffn_hidden_size"])):
        xi = x if width == x.shape[-1] else torch.randn(S, B, width, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            out, bias = linear(xi)
        out = out + (bias if bias is not None else 0)
        expected = xi @ linear.weight.T + linear.bias + LORA["alpha"] / R * (xi @ linear.lora_a.T @ linear.lora_b.T)
        assert (out - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_merged_equals_unmerged_and_unmerge_restores_the_base(build, tiny, variant):
    model = _policy(build, **VARIANTS[variant])
    _randomize_b(model)
    tokens = tiny.tokens(B, S)
    base_before = _base_state(model)
    unmerged = _logits(model, tokens)
    with L.adapters_disabled(model):
        assert (unmerged - _logits(model, tokens)).abs().max().item() > 1e-2  # the adapters matter
    assert L.merge_lora(model) == 4 * tiny.model["num_layers"]
    assert L.is_merged(model)
    merged_sd = _base_state(model)
    assert any(not torch.equal(merged_sd[k], base_before[k]) for k in base_before)
    assert (_logits(model, tokens) - unmerged).abs().max().item() <= 1e-5
    with pytest.raises(RuntimeError, match="already merged"):
        L.merge_lora(model)
    L.unmerge_lora(model)
    after = _base_state(model)
    assert all(torch.equal(after[k], base_before[k]) for k in base_before)
    assert torch.equal(_logits(model, tokens), unmerged)
    with L.merged_lora(model):  # the context manager, and a merge that keeps no copy
        assert L.is_merged(model)
    L.merge_lora(model, keep_base=False)
    L.unmerge_lora(model)
    after = _base_state(model)
    assert max((after[k] - base_before[k]).abs().max().item() for k in base_before) <= 1e-6


def test_merged_model_refuses_training_and_checkpoints(build, tiny, tmp_path):
    model = _policy(build, optim=tiny.optim)
    with L.merged_lora(model):
        with pytest.raises(RuntimeError, match="unmerge them"):
            model.train_on(_nll_loss, _lm_batch(tiny))
        with pytest.raises(CheckpointError, match="merged"):
            save_model_weights(model.gpt, tmp_path / "w")
        with pytest.raises(RuntimeError, match="merged"):
            with L.adapters_disabled(model):
                pass
    assert not L.is_merged(model)


def test_adapters_disabled_is_exactly_the_base_model(build, tiny):
    """The reference policy without a second copy: bitwise the base model's logits and log-probs."""
    base = _policy(build, lora=None)
    model = _policy(build)
    _randomize_b(model)
    tokens = tiny.tokens(B, S)
    with_adapters = _logits(model, tokens)
    with L.adapters_disabled(model):
        assert torch.equal(_logits(model, tokens), _logits(base, tokens))
        assert torch.equal(model.logprobs(tokens), base.logprobs(tokens))
    assert torch.equal(_logits(model, tokens), with_adapters)
    with pytest.raises(ValueError), L.adapters_disabled(model):  # restored on error too
        raise ValueError
    assert torch.equal(_logits(model, tokens), with_adapters)


# ------------------------------------------------------------------ training
def _adapter_numel(tiny, targets=("qkv", "proj", "fc1", "fc2")):
    h, f = tiny.model["hidden_size"], tiny.model["ffn_hidden_size"]
    shapes = {"qkv": (h, 3 * h), "proj": (h, h), "fc1": (h, f), "fc2": (f, h)}  # (in, out), multi-head attention
    return tiny.model["num_layers"] * sum(R * (shapes[t][0] + shapes[t][1]) for t in targets)


def _optimizer_params(module):
    return [p for g in module.optimizer.param_groups for p in g["params"]]


@pytest.mark.parametrize("targets", [("qkv", "proj", "fc1", "fc2"), ("qkv", "fc2")])
def test_only_adapters_reach_the_optimizer(build, tiny, targets):
    model = _policy(build, lora={**LORA, "target_modules": list(targets)}, optim=tiny.optim)
    params = _optimizer_params(model)
    adapters = L.adapter_parameters(model)
    assert len(params) == len(adapters) == 2 * len(targets) * tiny.model["num_layers"]
    assert {id(p) for p in params} == {id(p) for _, p in adapters}
    assert sum(p.numel() for p in params) == _adapter_numel(tiny, targets)
    trainable = [n for n, p in model.gpt.named_parameters() if p.requires_grad]
    assert all(L.is_adapter_name(n) for n in trainable)
    # megatron DDP's gradient buffer holds the adapters only
    assert sum(b.numel_unpadded for b in model.model.buffers) == _adapter_numel(tiny, targets)
    model.train_on(_nll_loss, _lm_batch(tiny))
    state = model.optimizer.optimizer.state  # torch AdamW under megatron's wrapper
    assert len(state) == len(adapters)
    assert sum(s["exp_avg"].numel() for s in state.values()) == _adapter_numel(tiny, targets)


def test_train_head_adds_the_head(build, tiny):
    """With model.lora.train_head the output head trains too (tied embeddings: the embedding matrix);
    the reward model's scalar head likewise."""
    model = _policy(build, lora={**LORA, "train_head": True}, optim=tiny.optim)
    names = {n for n, p in model.gpt.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in L.adapter_parameters(model)} | {"embedding.word_embeddings.weight"}
    rm = build(GPTRewardModel, model_cfg={"lora": {**LORA, "train_head": True}}, optim_cfg=tiny.optim,
               micro_batch_size=2)
    names = {n for n, p in rm.gpt.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in L.adapter_parameters(rm)} | {"output_layer.weight", "output_layer.bias"}
    assert sum(p.numel() for p in _optimizer_params(rm)) == _adapter_numel(tiny) + tiny.model["hidden_size"] + 1
    with pytest.raises(RuntimeError, match="train_head"):
        with L.adapters_disabled(model):
            pass


def test_training_lowers_the_loss_and_keeps_base_weights_bitwise(build, tiny):
    model = _policy(build, optim=dict(tiny.optim, lr=1e-2))
    batch = _lm_batch(tiny)
    base_before, adapters_before = _base_state(model), _adapter_state(model)
    losses = [model.train_on(_nll_loss, batch)["loss"] for _ in range(6)]
    assert losses[-1] < losses[0] - 0.05, losses
    after = _base_state(model)
    assert all(torch.equal(after[k], base_before[k]) for k in base_before)
    changed = _adapter_state(model)
    assert all(not torch.equal(changed[n], adapters_before[n]) for n in changed if n.endswith("lora_b"))


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_adapters_save_and_load_on_their_own_bitwise(build, tiny, tmp_path, variant):
    model = _policy(build, **VARIANTS[variant])
    _randomize_b(model, seed=1)
    save_adapters(model.gpt, tmp_path / "adapters")
    assert read_adapter_config(tmp_path / "adapters") == {**LoRAConfig(**LORA).__dict__}
    files = {p.name for p in (tmp_path / "adapters").iterdir()}
    assert {"COMPLETE", L.CONFIG_FILE} <= files
    other = _policy(build, seed=tiny.seed + 1, **VARIANTS[variant])  # other A init (and other base)
    before_base = _base_state(other)
    load_adapters(other, tmp_path / "adapters")
    got, want = _adapter_state(other), _adapter_state(model)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    after_base = _base_state(other)
    assert all(torch.equal(after_base[k], before_base[k]) for k in before_base)  # base untouched

    with pytest.raises(CheckpointError, match=r"model.lora.rank=4, this model has model.lora.rank=2"):
        load_adapters(_policy(build, lora={**LORA, "rank": 2}, **VARIANTS[variant]), tmp_path / "adapters")
    with pytest.raises(CheckpointError, match="model.lora.target_modules"):
        load_adapters(_policy(build, lora={**LORA, "target_modules": ["qkv"]}, **VARIANTS[variant]),
                      tmp_path / "adapters")
    with pytest.raises(CheckpointError, match="need a model built with model.lora"):
        load_adapters(_policy(build, lora=None, **VARIANTS[variant]), tmp_path / "adapters")
    with pytest.raises(CheckpointError, match="no LoRA adapters"):
        save_adapters(_policy(build, lora=None).gpt, tmp_path / "none")


def test_full_weights_checkpoint_carries_the_adapters(build, tiny, tmp_path):
    model = _policy(build, **LLAMA)
    _randomize_b(model, seed=2)
    save_model_weights(model.gpt, tmp_path / "full")
    fresh = _policy(build, seed=tiny.seed + 1, **LLAMA)
    assert load_weights(fresh, tmp_path / "full") == []
    a, b = model.gpt.state_dict(), fresh.gpt.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))
    tokens = tiny.tokens(B, S)
    assert torch.equal(_logits(model, tokens), _logits(fresh, tokens))
    # a LoRA checkpoint into a model without LoRA: refused (the adapters would be dropped silently)
    with pytest.raises(CheckpointError, match="holds LoRA adapters"):
        load_weights(_policy(build, lora=None, **LLAMA), tmp_path / "full")


def test_base_checkpoint_loads_into_a_lora_model_with_fresh_adapters(build, tiny, tmp_path):
    """LoRA starts from plain (e.g. SFT) weights: the adapters keep their fresh values (B = 0)."""
    base = _policy(build, lora=None, seed=tiny.seed + 5)
    save_model_weights(base.gpt, tmp_path / "base")
    model = _policy(build)
    adapters = _adapter_state(model)
    skipped = load_weights(model, tmp_path / "base")
    assert sorted(skipped) == sorted(adapters)
    assert all(torch.equal(adapters[n], p) for n, p in L.adapter_parameters(model))
    tokens = tiny.tokens(B, S)
    assert torch.equal(_logits(model, tokens), _logits(base, tokens))


def test_save_merged_weights_exports_a_plain_model(build, tiny, tmp_path):
    model = _policy(build, **LLAMA)
    _randomize_b(model, seed=3)
    tokens = tiny.tokens(B, S)
    want = _logits(model, tokens)
    base_before = _base_state(model)
    save_merged_weights(model.gpt, tmp_path / "merged")
    assert not L.is_merged(model)
    assert all(torch.equal(v, base_before[k]) for k, v in _base_state(model).items())
    plain = _policy(build, lora=None, **LLAMA)
    load_weights(plain, tmp_path / "merged")
    assert (_logits(plain, tokens) - want).abs().max().item() <= 1e-5


def test_training_checkpoint_resumes_lora_exactly(build, tiny, tmp_path):
    """Weights (base + adapters), Adam state of the adapters and the step come back; the next step
    is bitwise the uninterrupted run's."""
    from nemo_rlhf.checkpoint.training_state import load_training_checkpoint, save_checkpoint_dir

    optim = dict(tiny.optim, lr=1e-2)
    batch = _lm_batch(tiny)
    model = _policy(build, optim=optim)
    for _ in range(2):
        model.train_on(_nll_loss, batch)
        model.completed_steps += 1
    save_checkpoint_dir(tmp_path / "step_2", model)
    want_loss = model.train_on(_nll_loss, batch)["loss"]
    want = _adapter_state(model)

    resumed = _policy(build, seed=tiny.seed + 9, optim=optim)
    load_training_checkpoint(tmp_path / "step_2", resumed)
    assert resumed.completed_steps == 2
    got_loss = resumed.train_on(_nll_loss, batch)["loss"]
    assert got_loss == want_loss
    got = _adapter_state(resumed)
    assert all(torch.equal(got[n], want[n]) for n in want)
    base_a, base_b = _base_state(model), _base_state(resumed)
    assert all(torch.equal(base_a[k], base_b[k]) for k in base_a)


# ------------------------------------------------------------------ the reference policy in PPO
def test_ppo_reference_lora_disabled_equals_a_frozen_copy(build, tiny):
    """``ppo.reference: lora_disabled``: the rollout's reference log-probs are bitwise those of a
    separate frozen copy of the initial policy, before and after PPO steps moved the actor."""
    from nemo_rlhf.algorithms.ppo import PPOTrainer
    from nemo_rlhf.config import PPOActorStageConfig
    from nemo_rlhf.models.critic import GPTCriticModel
    from nemo_rlhf.servers.local import LocalCriticClient
    from nemo_rlhf.servers.megatron_backend import MegatronCriticBackend

    policy = _policy(build, optim=dict(tiny.optim, lr=1e-2))
    frozen_copy = _policy(build, lora=None)  # same seed: the same base weights
    critic = build(GPTCriticModel, optim_cfg=tiny.optim, micro_batch_size=2)
    rm = build(GPTRewardModel, micro_batch_size=2)
    backend = MegatronCriticBackend(critic, rm, tiny.model["max_position_embeddings"], lambda path: None,
                                    value_clip=0.2)
    cfg = parse_config(PPOActorStageConfig, {
        "run_dir": ".", "init_from": "unused", "tokenizer": {"path": "unused"},
        "model": {**tiny.model, "lora": LORA},
        "batch": {"global_batch_size": 4, "micro_batch_size": 2},
        "ppo": {"reference": "lora_disabled", "ppo_epochs": 1, "num_minibatches": 2, "seed": 5,
                "kl_controller": {"type": "fixed", "init_kl_coef": 0.05}, "sampling": {"max_new_tokens": 6}}})
    trainer = PPOTrainer.from_models(cfg, policy, L.LoRAReference(policy), LocalCriticClient(backend))
    prompts, plens = tiny.tokens(4, 6, seed=3), torch.tensor([6, 3, 5, 4])
    ro = trainer.rollout(prompts, plens, trainer.sampling)
    assert torch.equal(ro.ref_logprobs, frozen_copy.logprobs(ro.tokens))
    assert torch.equal(ro.logprobs, ro.ref_logprobs)  # fresh adapters: the actor is the reference
    for _ in range(2):
        metrics = trainer.train_step({"prompts": prompts, "prompt_lengths": plens})
        trainer.step += 1
    assert metrics["nonfinite"] == 0.0
    ro = trainer.rollout(prompts, plens, trainer.sampling)
    assert torch.equal(ro.ref_logprobs, frozen_copy.logprobs(ro.tokens))
    assert (ro.logprobs - ro.ref_logprobs).abs().max().item() > 1e-4  # the actor moved


@pytest.mark.parametrize("model, ppo, message", [
    ({}, {"reference": "lora_disabled"}, "set model.lora.rank >= 1 (got 0)"),
    ({"lora": {"rank": 2, "train_head": True}}, {"reference": "lora_disabled"}, "model.lora.train_head=false (got true)"),
    ({"lora": {"rank": 2}}, {"reference": "lora_disabled", "reference_offload": True}, "set one of them off"),
])
def test_ppo_reference_lora_disabled_config_errors(model, ppo, message):
    from nemo_rlhf.config import PPOActorStageConfig

    with pytest.raises(ConfigError) as err:
        parse_config(PPOActorStageConfig, {"init_from": "a", "tokenizer": {"path": "t"}, "model": model, "ppo": ppo})
    assert message in str(err.value)


def test_hf_export_folds_the_adapters_in(build, tiny, tmp_path):
    """``export_hf`` of a LoRA checkpoint (its model_config with ``model.lora``) writes the merged
    weights: transformers' Llama on them gives the LoRA model's logits."""
    from transformers import AutoModelForCausalLM

    from nemo_rlhf.checkpoint.hf import export_hf

    cfg = {**tiny.model, **LLAMA, "vocab_size": tiny.vocab, "lora": LORA}
    model = _policy(build, **LLAMA)
    _randomize_b(model, seed=4)
    save_model_weights(model.gpt, tmp_path / "lora")
    export_hf(tmp_path / "lora", cfg, tmp_path / "hf", arch="llama")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    tokens = tiny.tokens(B, S)
    with torch.no_grad():
        theirs = hf(input_ids=tokens).logits
    ours = _logits(model, tokens)[..., : tiny.vocab]
    assert (theirs - ours).abs().max().item() <= 1e-5
    with L.adapters_disabled(model):  # and the adapters are in there
        assert (theirs - _logits(model, tokens)[..., : tiny.vocab]).abs().max().item() > 1e-3
