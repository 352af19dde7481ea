"""Hugging Face <-> megatron GPTModel conversion: logits parity, exact round trips, reward heads.

Random-init tiny ``transformers`` models (no downloads), CPU, fp32, in a one-process megatron world.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.checkpoint, pytest.mark.usefixtures("megatron_world")]

transformers = pytest.importorskip("transformers")

VOCAB = 128
PAD_ID = 0
TOL = 1e-4


def _llama_config(tied: bool, **kw) -> "transformers.LlamaConfig":
    args = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        tie_word_embeddings=tied, pad_token_id=PAD_ID, bos_token_id=None, eos_token_id=None)
    return transformers.LlamaConfig(**{**args, **kw})


def _gpt2_config(**kw) -> "transformers.GPT2Config":
    args = dict(vocab_size=VOCAB, n_embd=64, n_head=4, n_layer=2, n_positions=64,
                bos_token_id=None, eos_token_id=None, pad_token_id=PAD_ID)
    return transformers.GPT2Config(**{**args, **kw})


CONFIGS = {
    "llama_gqa_untied": lambda: _llama_config(tied=False),
    "llama_tied": lambda: _llama_config(tied=True),
    "gpt2": _gpt2_config,
}


def _perturbed(model):
    """Move every parameter off its init (unit norms, zero biases) so every tensor matters."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _hf_lm(name: str):
    torch.manual_seed(0)
    config = CONFIGS[name]()
    cls = transformers.GPT2LMHeadModel if name == "gpt2" else transformers.LlamaForCausalLM
    return _perturbed(cls(config))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens [3, 12]`` right-padded with PAD_ID, and ``lengths [3]``."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, VOCAB, (3, 12), generator=g)
    lengths = torch.tensor([12, 7, 3])
    tokens[torch.arange(12)[None, :] >= lengths[:, None]] = PAD_ID
    return tokens, lengths


def _nonpad(lengths: torch.Tensor, seq: int) -> torch.Tensor:
    return torch.arange(seq)[None, :] < lengths[:, None]


_LOAD_SCRIPT = """
import sys, torch, transformers
out, auto = sys.argv[1], getattr(transformers, sys.argv[2])
batch = torch.load(out + "/batch.pt")
model = auto.from_pretrained(out).eval()
with torch.no_grad():
    logits = model(input_ids=batch["tokens"], attention_mask=batch["mask"]).logits
torch.save({"logits": logits, "type": type(model).__name__, "state": model.state_dict()}, out + "/result.pt")
"""


def _from_pretrained_in_fresh_process(out: Path, auto: str, tokens, mask) -> dict:
    """``<auto>.from_pretrained(out)`` and its logits, in a fresh interpreter.

    In this process ``cpu_compat`` is active (megatron on CPU), and with it transformers 5.23's
    ``from_pretrained`` leaves the non-persistent RoPE ``inv_freq`` buffer uninitialised; a user
    loading an exported directory does so without megatron, as here.
    """
    torch.save({"tokens": tokens, "mask": mask.long()}, out / "batch.pt")
    proc = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(out), auto],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out / "result.pt")


def _megatron_forward(gpt, tokens: torch.Tensor) -> torch.Tensor:
    """``[B, S, V_pad]`` logits (causal mask; right padding never leaks into earlier positions)."""
    gpt.eval()
    pos = torch.arange(tokens.shape[1])[None, :].expand_as(tokens)
    with torch.no_grad():
        return gpt(tokens, pos, None).float()


def _build_ours(model_cfg, role: str = "policy"):
    from nemo_rlhf.checkpoint.hf import _build

    return _build(model_cfg, role)


def _assert_logits_match(gpt, hf_model):
    tokens, lengths = _batch()
    mask = _nonpad(lengths, tokens.shape[1])
    ours = _megatron_forward(gpt, tokens)[..., :VOCAB]
    with torch.no_grad():
        theirs = hf_model(input_ids=tokens, attention_mask=mask.long()).logits
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs()[mask]
    print(f"HF parity {type(hf_model).__name__}: max |logits diff| {diff.max().item():.3e}")  # -s shows it
    assert diff.max().item() < TOL, diff.max().item()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_conversion_logits_and_round_trip(name):
    from nemo_rlhf.checkpoint.hf import (
        hf_config_to_model_cfg,
        hf_state_dict_to_megatron,
        megatron_state_dict_to_hf,
    )

    hf = _hf_lm(name)
    hf_sd = hf.state_dict()
    cfg = hf_config_to_model_cfg(hf.config)
    sd = hf_state_dict_to_megatron(hf_sd, hf.config)
    gpt = _build_ours(cfg)
    ours = {k for k in gpt.state_dict() if not k.endswith("_extra_state")}
    assert set(sd) == ours
    result = gpt.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("_extra_state") for k in result.missing_keys)
    _assert_logits_match(gpt, hf)

    back = megatron_state_dict_to_hf(sd, hf.config)
    assert set(back) == set(hf_sd)
    for k, v in hf_sd.items():
        assert torch.equal(back[k], v), k
    again = hf_state_dict_to_megatron(back, hf.config)
    assert set(again) == set(sd)
    for k, v in sd.items():
        assert torch.equal(again[k], v), k


def test_model_cfg_mapping_by_hand():
    from nemo_rlhf.checkpoint.hf import hf_config_to_model_cfg

    g = hf_config_to_model_cfg(_gpt2_config())
    assert (g["normalization"], g["activation"], g["position_embedding_type"]) == (
        "LayerNorm", "gelu_tanh", "learned_absolute")
    assert g["add_bias_linear"] and g["add_qkv_bias"] and g["share_embeddings_and_output_weights"]
    assert (g["ffn_hidden_size"], g["max_position_embeddings"], g["vocab_size"]) == (256, 64, VOCAB)
    lcfg = hf_config_to_model_cfg(_llama_config(tied=False))
    assert (lcfg["normalization"], lcfg["activation"], lcfg["num_query_groups"], lcfg["kv_channels"]) == (
        "RMSNorm", "swiglu", 2, 16)
    assert lcfg["rotary_base"] == 5000.0 and not lcfg["add_bias_linear"]
    assert not lcfg["share_embeddings_and_output_weights"]
    # 50257 (GPT-2's vocabulary) is odd: no padding at TP = 1.
    assert hf_config_to_model_cfg(_gpt2_config(vocab_size=50257))["make_vocab_size_divisible_by"] == 1
    with pytest.raises(ValueError, match="rope_type"):
        hf_config_to_model_cfg(_llama_config(tied=False, rope_parameters={
            "rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}))


def test_qkv_interleave_by_hand():
    """2 query groups x 2 heads, head dim 1: rows [q0 q1 | k0 | v0 | q2 q3 | k1 | v1]."""
    from nemo_rlhf.checkpoint.hf import _fuse_qkv, _split_qkv

    q = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    k = torch.tensor([[10.0], [11.0]])
    v = torch.tensor([[20.0], [21.0]])
    fused = _fuse_qkv(q, k, v, groups=2)
    assert fused.flatten().tolist() == [0.0, 1.0, 10.0, 20.0, 2.0, 3.0, 11.0, 21.0]
    q2, k2, v2 = _split_qkv(fused, groups=2, heads=4)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_vocab_padding_rows_are_zero_and_stripped():
    from nemo_rlhf.checkpoint.hf import hf_state_dict_to_megatron, megatron_state_dict_to_hf

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(_llama_config(tied=False, vocab_size=100))
    sd = hf_state_dict_to_megatron(hf.state_dict(), hf.config, padded_vocab=128)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        assert sd[key].shape == (128, 64)
        assert not sd[key][100:].any()
    back = megatron_state_dict_to_hf(sd, hf.config)
    assert torch.equal(back["lm_head.weight"], hf.state_dict()["lm_head.weight"])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_import_export_directories(name, tmp_path: Path):
    from nemo_rlhf.checkpoint.hf import export_hf, import_hf, read_model_config
    from nemo_rlhf.checkpoint.weights import load_model_weights

    hf = _hf_lm(name)
    hf.save_pretrained(tmp_path / "hf")
    cfg = import_hf(tmp_path / "hf", tmp_path / "meg")
    assert read_model_config(tmp_path / "meg" / "model_config.yaml") == cfg
    gpt = _build_ours(cfg)
    load_model_weights(gpt, tmp_path / "meg" / "weights")
    _assert_logits_match(gpt, hf)

    arch = "gpt2" if name == "gpt2" else "llama"
    export_hf(tmp_path / "meg", cfg, tmp_path / "out", arch=arch)
    tokens, lengths = _batch()
    mask = _nonpad(lengths, tokens.shape[1])
    loaded = _from_pretrained_in_fresh_process(tmp_path / "out", "AutoModelForCausalLM", tokens, mask)
    assert loaded["type"] == type(hf).__name__
    hf_sd = hf.state_dict()
    assert set(loaded["state"]) == set(hf_sd)
    for k, v in hf_sd.items():
        assert torch.equal(loaded["state"][k], v), k
    with torch.no_grad():  # rows of pad queries are arbitrary: compare real tokens only
        old = hf(input_ids=tokens, attention_mask=mask.long()).logits[mask]
    assert (loaded["logits"][mask] - old).abs().max().item() < 1e-6


def test_reward_head_round_trip(tmp_path: Path):
    from nemo_rlhf.checkpoint.hf import export_hf, import_hf
    from nemo_rlhf.checkpoint.weights import load_weights
    from nemo_rlhf.models.reward_model import GPTRewardModel

    torch.manual_seed(0)
    config = _llama_config(tied=False, num_labels=1)
    hf = _perturbed(transformers.LlamaForSequenceClassification(config))
    hf.save_pretrained(tmp_path / "hf")
    cfg = import_hf(tmp_path / "hf", tmp_path / "rm", role="reward")
    rm = GPTRewardModel(cfg, None, vocab_size=VOCAB, micro_batch_size=3)
    load_weights(rm, tmp_path / "rm" / "weights")
    assert torch.equal(rm.gpt.output_layer.weight, hf.score.weight)
    assert not rm.gpt.output_layer.bias.any()

    tokens, lengths = _batch()
    with torch.no_grad():
        theirs = hf(input_ids=tokens, attention_mask=_nonpad(lengths, 12).long()).logits[:, 0]
    ours = rm.score(tokens, lengths)
    assert ours.shape == (3,)
    assert (ours - theirs).abs().max().item() < TOL

    # role detected from the [1, H] head
    export_hf(tmp_path / "rm", cfg, tmp_path / "out", arch="llama", pad_token_id=PAD_ID)
    loaded = _from_pretrained_in_fresh_process(tmp_path / "out", "AutoModelForSequenceClassification",
                                               tokens, _nonpad(lengths, 12))
    assert loaded["type"] == "LlamaForSequenceClassification"
    assert loaded["logits"].shape == (3, 1)  # num_labels = 1
    for k, v in hf.state_dict().items():
        assert torch.equal(loaded["state"][k], v), k
    assert (loaded["logits"][:, 0] - theirs).abs().max().item() < 1e-6
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "out" / "model.safetensors"))) >= {"score.weight", "score.bias"}


def test_missing_directories_name_the_path(tmp_path: Path, capsys):
    from nemo_rlhf.checkpoint.hf import export_hf, import_hf
    from nemo_rlhf.convert import main

    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        import_hf(missing, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_hf(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=str(missing)):
        export_hf(missing, {"vocab_size": VOCAB}, tmp_path / "out")
    with pytest.raises(ValueError, match="role"):
        import_hf(tmp_path / "empty", tmp_path / "out", role="actor")

    assert main(["hf-to-megatron", "--hf-dir", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert str(missing) in capsys.readouterr().err
    assert main(["megatron-to-hf", "--ckpt", str(tmp_path / "empty"), "--model-config",
                 str(missing / "model_config.yaml"), "--out", str(tmp_path / "o"), "--arch", "gpt2"]) == 2
    assert str(missing / "model_config.yaml") in capsys.readouterr().err


def test_export_refuses_unexpressible_config():
    from nemo_rlhf.checkpoint.hf import model_cfg_to_hf_config

    with pytest.raises(ValueError, match="model.normalization"):
        model_cfg_to_hf_config({"vocab_size": VOCAB, "normalization": "LayerNorm",
                                "activation": "swiglu"}, arch="llama")
    with pytest.raises(ValueError, match="model.position_embedding_type"):
        model_cfg_to_hf_config({"vocab_size": VOCAB, "activation": "gelu_tanh"}, arch="gpt2")


@pytest.mark.parametrize("name", ["llama_tied", "gpt2"])
def test_truncated_import_equals_the_first_layers(name, tmp_path: Path):
    """import_hf(num_layers=1) keeps embeddings, layer 0, final norm and head: its logits equal the
    HF model with only its first layer (same weights), and too many layers is refused."""
    from nemo_rlhf.checkpoint.hf import import_hf
    from nemo_rlhf.checkpoint.weights import load_model_weights

    hf = _hf_lm(name)
    hf.save_pretrained(tmp_path / "hf")
    cfg = import_hf(tmp_path / "hf", tmp_path / "meg", num_layers=1)
    assert cfg["num_layers"] == 1
    gpt = _build_ours(cfg)
    load_model_weights(gpt, tmp_path / "meg" / "weights")
    blocks = hf.transformer.h if name == "gpt2" else hf.model.layers
    del blocks[1:]
    hf.config.num_hidden_layers = 1
    _assert_logits_match(gpt, hf)
    with pytest.raises(ValueError, match=r"num_layers=3: the model has 2 layers"):
        import_hf(tmp_path / "hf", tmp_path / "meg3", num_layers=3)
