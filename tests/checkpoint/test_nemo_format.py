"""NeMo-1 ``.nemo`` import / export: archives built the way NeMo writes them, exact round trips, errors, CLI.

The NeMo-side archives are built here without NeMo's LLM collection (nemo_toolkit 3 is speech-only):
the dist-checkpoint is written ShardedTensor by ShardedTensor as megatron-core's Transformer-Engine
spec names them (``model.`` prefix, fused ``linear_qkv.layer_norm_weight``, layers stacked, two TP
shards, pickled ``io.BytesIO`` ``_extra_state`` objects), the legacy ``model_weights.ckpt`` as a
``megatron_amp_O2`` state dict, and the tar by nemo_toolkit's ``SaveRestoreConnector``.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import fork_server
import pytest
import torch

pytestmark = [pytest.mark.checkpoint, pytest.mark.usefixtures("megatron_world")]

VOCAB_ROWS = 128
L = 2
TE = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
      "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
      "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
      "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias"}
EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                       "mlp.linear_fc2", "self_attention.core_attention")

LLAMA_LIKE = dict(num_layers=L, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                  max_position_embeddings=64, vocab_size=VOCAB_ROWS, make_vocab_size_divisible_by=128,
                  position_embedding_type="rope", rotary_base=5000, normalization="RMSNorm",
                  layernorm_epsilon=1e-5, activation="swiglu", add_bias_linear=False, add_qkv_bias=False,
                  share_embeddings_and_output_weights=False)
GPT2_LIKE = dict(num_layers=L, hidden_size=64, num_attention_heads=4, num_query_groups=None, ffn_hidden_size=256,
                 max_position_embeddings=64, vocab_size=100, make_vocab_size_divisible_by=32,
                 position_embedding_type="learned_absolute", normalization="LayerNorm", layernorm_epsilon=1e-5,
                 activation="gelu", add_bias_linear=True, add_qkv_bias=False,
                 share_embeddings_and_output_weights=True)


# --------------------------------------------------------------------------- helpers
def _model(cfg, role="policy", seed=0):
    """Our model with every parameter moved off its init and made bf16-representable (NeMo stores bf16)."""
    from nemo_rlhf.checkpoint.hf import _build

    torch.manual_seed(seed)
    gpt = _build(cfg, role)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in gpt.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
            p.copy_(p.bfloat16().float())
    return gpt.eval()


def _state(gpt) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in gpt.state_dict().items()
            if v is not None and not k.endswith("_extra_state")}


def _logits(gpt) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 100, (2, 12), generator=g)
    pos = torch.arange(12)[None, :].expand_as(tokens)
    gpt.eval()
    with torch.no_grad():
        return gpt(tokens, pos, None).float()


def _loaded(cfg, weights: Path, role="policy"):
    from nemo_rlhf.checkpoint.hf import _build
    from nemo_rlhf.checkpoint.weights import load_model_weights

    gpt = _build(cfg, role)
    load_model_weights(gpt, weights)
    return gpt


def _assert_same(gpt_a, gpt_b) -> float:
    """Bitwise-equal tensors with the same names; returns max |logits difference|."""
    a, b = _state(gpt_a), _state(gpt_b)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    diff = (_logits(gpt_a) - _logits(gpt_b)).abs().max().item()
    print(f"max |logits diff| = {diff}")
    return diff


def _nemo_config(cfg: dict, **extra) -> dict:
    """A model_config.yaml as NeMo's MegatronGPTModel saves it (a representative subset of its keys)."""
    norm = {"RMSNorm": "rmsnorm", "LayerNorm": "layernorm"}[cfg["normalization"]]
    act = {"swiglu": "fast-swiglu", "gelu": "gelu"}[cfg["activation"]]
    out = dict(
        micro_batch_size=4, global_batch_size=8, tensor_model_parallel_size=2, pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, encoder_seq_length=cfg["max_position_embeddings"],
        max_position_embeddings=cfg["max_position_embeddings"], num_layers=cfg["num_layers"],
        hidden_size=cfg["hidden_size"], ffn_hidden_size=cfg["ffn_hidden_size"],
        num_attention_heads=cfg["num_attention_heads"], num_query_groups=cfg["num_query_groups"],
        init_method_std=0.02, use_scaled_init_method=True, hidden_dropout=0.0, attention_dropout=0.0,
        ffn_dropout=0.0, kv_channels=None, apply_query_key_layer_scaling=True, normalization=norm,
        layernorm_epsilon=cfg["layernorm_epsilon"], do_layer_norm_weight_decay=False,
        make_vocab_size_divisible_by=64, pre_process=True, post_process=True, persist_layer_norm=True,
        bias=cfg["add_bias_linear"], activation=act, headscale=False, transformer_block_type="pre_ln",
        openai_gelu=False, normalize_attention_scores=True,
        position_embedding_type=cfg["position_embedding_type"], rotary_percentage=1.0,
        rotary_base=cfg.get("rotary_base", 10000), attention_type="multihead",
        share_embeddings_and_output_weights=cfg["share_embeddings_and_output_weights"],
        tokenizer=dict(library="megatron", type="GPT2BPETokenizer", model=None, vocab_file=None, merge_file=None,
                       delimiter=None, sentencepiece_legacy=False),
        native_amp_init_scale=4294967296, precision="bf16", mcore_gpt=True, transformer_engine=True,
        megatron_amp_O2=True, seed=1234, sequence_parallel=False, use_cpu_initialization=False,
        optim=dict(name="distributed_fused_adam", lr=1e-5, weight_decay=0.01),
        target="nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel",
        nemo_version="1.23.0",
    )
    out.update(extra)
    return out


def _write_yaml(path: Path, cfg: dict) -> None:
    from omegaconf import OmegaConf

    path.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))


def _te_name(name: str) -> str:
    m = re.match(r"^decoder\.layers\.(\d+)\.(.*)$", name)
    return f"decoder.layers.{m.group(1)}.{TE.get(m.group(2), m.group(2))}" if m else name


def _save_nemo_dist_ckpt(sd: dict[str, torch.Tensor], folder: Path, glu: bool, tp: int = 2) -> None:
    """``model_weights/`` as NeMo writes it from a TP = ``tp`` run: TE names, ``model.`` keys, layers
    stacked on a leading axis, TP shards along megatron's split dims, BytesIO ``_extra_state`` objects."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    col = ("self_attention.linear_qkv.", "mlp.linear_fc1.")
    row = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
    out = {}
    for name, t in sd.items():
        m = re.match(r"^decoder\.layers\.(\d+)\.(.*)$", _te_name(name))
        layer = m is not None
        rest = m.group(2) if layer else name
        key = "model." + (f"decoder.layers.{rest}" if layer else name)
        dim, n = None, tp
        if layer and rest.startswith(col) and "layer_norm" not in rest:
            dim, n = 0, (2 * tp if glu and rest.startswith("mlp.") else tp)
        elif layer and rest in row:
            dim = 1
        elif rest in ("embedding.word_embeddings.weight", "output_layer.weight", "rm_head.weight") and t.shape[0] > 1:
            dim = 0
        pre = ((0, int(m.group(1)), L),) if layer else ()
        pieces = t.bfloat16().chunk(n, dim) if dim is not None else [t.bfloat16()]
        for r, piece in enumerate(pieces):
            offs = pre + (((dim + len(pre), r, n),) if dim is not None else ())
            out[f"{key}/{name}/{r}"] = ShardedTensor.from_rank_offsets(
                key, piece.contiguous(), *offs, replica_id=0, prepend_axis_num=len(pre))
    for i in range(L):
        for mod in EXTRA_STATE_MODULES:
            key = f"model.decoder.layers.{mod}._extra_state"
            out[f"{key}/{i}"] = ShardedObject(key, io.BytesIO(b"te-fp8-meta"), (L,), (i,), replica_id=0)
    (folder / "model_weights").mkdir(parents=True)
    dist_checkpointing.save(out, str(folder / "model_weights"))


def _tar_with_nemo_connector(folder: Path, path: Path) -> Path:
    from nemo.core.connectors.save_restore_connector import SaveRestoreConnector

    SaveRestoreConnector._make_nemo_file_from_folder(str(path), str(folder))
    return path


def _tokenizer_json(path: Path, size: int = 100) -> Path:
    import tokenizers

    vocab = {"<|endoftext|>": 0, **{f"t{i}": i for i in range(1, size)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def _check_cfg(got: dict, want: dict) -> None:
    from nemo_rlhf.models.builder import model_cfg_with_defaults

    g, w = model_cfg_with_defaults(got), model_cfg_with_defaults(want)
    assert {k: g[k] for k in want} == {k: w[k] for k in want}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A GPT-2-like checkpoint of ours, its tokenizer.json and its export_nemo archive."""
    from nemo_rlhf.checkpoint.hf import _write_yaml as write_ours
    from nemo_rlhf.checkpoint.nemo import export_nemo
    from nemo_rlhf.checkpoint.weights import save_model_weights

    d = tmp_path_factory.mktemp("exported")
    gpt = _model(GPT2_LIKE, seed=5)
    save_model_weights(gpt, d / "ckpt" / "weights")
    write_ours(d / "ckpt" / "model_config.yaml", GPT2_LIKE)
    tok = _tokenizer_json(d / "tokenizer.json")
    path = export_nemo(d / "ckpt", GPT2_LIKE, d / "out" / "gpt.nemo", tokenizer_path=tok)
    return dict(dir=d, gpt=gpt, nemo=path, tokenizer=tok, ckpt=d / "ckpt")


# --------------------------------------------------------------------------- (a) dist-checkpoint archive
def test_import_dist_checkpoint_archive_te_names_gqa(tmp_path: Path):
    from nemo_rlhf.checkpoint.nemo import import_nemo

    gpt = _model(LLAMA_LIKE)
    folder = tmp_path / "nemo_folder"
    _save_nemo_dist_ckpt(_state(gpt), folder, glu=True)
    (folder / "2b3fd6f6c0a74c4f8ed5ba14b2d1b3a2_tokenizer.model").write_bytes(b"sentencepiece-model")
    tok = dict(library="sentencepiece", type=None, model="nemo:2b3fd6f6c0a74c4f8ed5ba14b2d1b3a2_tokenizer.model",
               vocab_file=None, merge_file=None, delimiter=None, sentencepiece_legacy=False)
    _write_yaml(folder / "model_config.yaml", _nemo_config(LLAMA_LIKE, tokenizer=tok))
    archive = _tar_with_nemo_connector(folder, tmp_path / "llama.nemo")

    cfg = import_nemo(archive, tmp_path / "out")
    _check_cfg(cfg, LLAMA_LIKE)
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.model").read_bytes() == b"sentencepiece-model"
    assert not list(tmp_path.glob(".out.nemo-extract-*"))
    diff = _assert_same(gpt, _loaded(cfg, tmp_path / "out" / "weights"))
    assert diff == 0.0

    # a plain GPT imported as a critic: same trunk, fresh head
    with pytest.warns(UserWarning, match="freshly initialised"):
        import_nemo(archive, tmp_path / "critic", role="critic")
    critic = _state(_loaded(cfg, tmp_path / "critic" / "weights", role="critic"))
    assert critic["output_layer.weight"].shape == (1, 64)
    ours = _state(gpt)
    for k, v in critic.items():
        if not k.startswith("output_layer."):
            assert torch.equal(v, ours[k]), k


# --------------------------------------------------------------------------- (b) legacy single file
def test_import_legacy_model_weights_ckpt_amp_o2_tied_gzipped(tmp_path: Path):
    from nemo_rlhf.checkpoint.nemo import import_nemo

    gpt = _model(GPT2_LIKE, seed=1)
    sd = {f"model.module.{_te_name(k)}": v.bfloat16() for k, v in _state(gpt).items()}
    assert "model.module.decoder.layers.0.self_attention.linear_qkv.layer_norm_bias" in sd
    assert not any(k.startswith("model.module.output_layer") for k in sd)  # tied
    for i in range(L):
        for mod in EXTRA_STATE_MODULES:
            sd[f"model.module.decoder.layers.{i}.{mod}._extra_state"] = io.BytesIO(b"te-fp8-meta")
    folder = tmp_path / "folder"
    folder.mkdir()
    torch.save(sd, folder / "model_weights.ckpt")
    _write_yaml(folder / "model_config.yaml", _nemo_config(GPT2_LIKE, tensor_model_parallel_size=1))
    archive = tmp_path / "gpt2.nemo"
    with tarfile.open(archive, "w:gz") as tar:  # NeMo < 1.7 wrote gzipped archives
        tar.add(folder, arcname=".")

    cfg = import_nemo(archive, tmp_path / "out", vocab_size=100)
    _check_cfg(cfg, GPT2_LIKE)  # vocab 100 padded by 32 -> the 128 stored rows
    diff = _assert_same(gpt, _loaded(cfg, tmp_path / "out" / "weights"))
    assert diff == 0.0

    # an extracted directory works too; without vocab_size every row is a token
    cfg2 = import_nemo(folder, tmp_path / "out2")
    assert (cfg2["vocab_size"], cfg2["make_vocab_size_divisible_by"]) == (128, 128)


# --------------------------------------------------------------------------- (c) export -> import
def test_export_archive_layout_and_round_trip(exported, tmp_path: Path):
    from megatron.core import dist_checkpointing
    from nemo.core.connectors.save_restore_connector import SaveRestoreConnector
    from omegaconf import OmegaConf

    from nemo_rlhf.checkpoint.nemo import import_nemo, nemo_config_to_model_cfg

    with tarfile.open(exported["nemo"], "r:") as tar:  # uncompressed, as NeMo >= 1.7 writes
        names = tar.getnames()
    assert "./model_config.yaml" in names and "./model_weights/metadata.json" in names
    art = [n for n in names if n.endswith("_tokenizer.json")]
    assert len(art) == 1 and re.fullmatch(r"\./[0-9a-f]{32}_tokenizer\.json", art[0])

    # unpack with nemo_toolkit's connector, then restore the weights as NLPSaveRestoreConnector does
    folder = Path(SaveRestoreConnector._unpack_nemo_file(str(exported["nemo"]), str(tmp_path / "unpacked")))
    nemo_cfg = OmegaConf.to_container(OmegaConf.load(folder / "model_config.yaml"))
    assert nemo_cfg["mcore_gpt"] and not nemo_cfg["transformer_engine"]
    assert nemo_cfg["tokenizer"]["model"] == "nemo:" + art[0][2:]
    assert (nemo_cfg["override_vocab_size"], nemo_cfg["normalization"], nemo_cfg["activation"]) == (
        128, "layernorm", "gelu")
    _check_cfg(nemo_config_to_model_cfg(nemo_cfg, vocab_size=100), GPT2_LIKE)

    from nemo_rlhf.checkpoint.hf import _build

    fresh = _build(GPT2_LIKE, "policy")
    state = dist_checkpointing.load(fresh.sharded_state_dict(prefix="model."), str(folder / "model_weights"))
    fresh.load_state_dict({k[len("model."):]: v for k, v in state.items()}, strict=False)
    assert _assert_same(exported["gpt"], fresh) == 0.0

    cfg = import_nemo(exported["nemo"], tmp_path / "back")  # vocab 100 from the tokenizer.json artifact
    _check_cfg(cfg, GPT2_LIKE)
    assert _assert_same(exported["gpt"], _loaded(cfg, tmp_path / "back" / "weights")) == 0.0


def test_reward_head_export_is_nemo_aligner_rm_head(tmp_path: Path):
    from megatron.core import dist_checkpointing, tensor_parallel

    from nemo_rlhf.checkpoint.hf import _build
    from nemo_rlhf.checkpoint.nemo import export_nemo, import_nemo
    from nemo_rlhf.checkpoint.weights import save_model_weights

    rm = _model(LLAMA_LIKE, role="reward", seed=2)
    save_model_weights(rm, tmp_path / "rm")
    path = export_nemo(tmp_path / "rm", LLAMA_LIKE, tmp_path / "rm.nemo")  # role detected from [1, H]
    SaveRestoreConnector = pytest.importorskip("nemo.core.connectors.save_restore_connector").SaveRestoreConnector
    folder = Path(SaveRestoreConnector._unpack_nemo_file(str(path), str(tmp_path / "unpacked")))
    meta = dist_checkpointing.load_tensors_metadata(str(folder / "model_weights"))
    assert tuple(meta["model.rm_head.weight"].global_shape) == (1, 64)
    assert tuple(meta["model.output_layer.weight"].global_shape) == (VOCAB_ROWS, 64)
    assert "nemo_aligner" in (folder / "model_config.yaml").read_text()

    # NeMo-Aligner's GPTRewardModel: an untied GPTModel plus rm_head = RowParallelLinear(H, 1, bias)
    aligner = _build(LLAMA_LIKE, "policy")
    aligner.rm_head = tensor_parallel.RowParallelLinear(
        64, 1, config=aligner.config, init_method=torch.nn.init.zeros_, bias=True, input_is_parallel=False,
        skip_bias_add=False)
    state = dist_checkpointing.load(aligner.sharded_state_dict(prefix="model."), str(folder / "model_weights"))
    assert torch.equal(state["model.rm_head.weight"], rm.output_layer.weight)
    assert torch.equal(state["model.rm_head.bias"], rm.output_layer.bias)

    cfg = import_nemo(path, tmp_path / "back", role="reward")
    assert _assert_same(rm, _loaded(cfg, tmp_path / "back" / "weights", role="reward")) == 0.0


# --------------------------------------------------------------------------- mapping details
def test_config_mapping_by_hand():
    from nemo_rlhf.checkpoint.nemo import model_cfg_to_nemo_config, nemo_config_to_model_cfg, vocab_fields

    base = _nemo_config(GPT2_LIKE)
    c = nemo_config_to_model_cfg({**base, "openai_gelu": True, "normalization": "layernorm1p"}, padded_vocab=128)
    assert (c["activation"], c["normalization"], c["vocab_size"]) == ("gelu_tanh", "LayerNorm", 128)
    assert model_cfg_to_nemo_config({**GPT2_LIKE, "activation": "gelu_tanh"})["openai_gelu"] is True
    c = nemo_config_to_model_cfg({"model": {**base, "activation": "swiglu", "num_query_groups": 2,
                                            "override_vocab_size": 96, "encoder_seq_length": 32}})
    assert (c["activation"], c["num_query_groups"], c["vocab_size"], c["max_position_embeddings"]) == (
        "swiglu", 2, 96, 32)
    assert vocab_fields(50304, 50257) == dict(vocab_size=50257, make_vocab_size_divisible_by=48)
    assert vocab_fields(50257) == dict(vocab_size=50257, make_vocab_size_divisible_by=1)
    for field, value in (("activation", "reglu"), ("position_embedding_type", "alibi"), ("num_moe_experts", 8),
                         ("normalization", "low_precision_layernorm"), ("name", "megatron_falcon_gpt"),
                         ("seq_len_interpolation_factor", 4.0)):
        with pytest.raises(ValueError, match=f"model_config.yaml: {field}="):
            nemo_config_to_model_cfg({**base, field: value})
    with pytest.raises(ValueError, match="model_config.yaml: openai_gelu"):
        nemo_config_to_model_cfg({**base, "openai_gelu": True, "activation": "fast-swiglu"})
    with pytest.raises(ValueError, match="model.activation='relu'"):
        model_cfg_to_nemo_config({**GPT2_LIKE, "activation": "relu"})
    reward = model_cfg_to_nemo_config(LLAMA_LIKE, role="critic")
    assert reward["output_sequence"] and reward["regression"]["num_attributes"] == 1
    assert reward["target"].endswith("MegatronGPTCriticModel") and not reward["share_embeddings_and_output_weights"]


def test_state_dict_mapping_layernorm1p_and_heads():
    from nemo_rlhf.checkpoint.nemo import nemo_state_dict_to_megatron

    sd = {"model.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": torch.zeros(4),
          "model.decoder.final_layernorm.weight": torch.full((4,), 0.5),
          "model.embedding.word_embeddings.weight": torch.ones(8, 4),
          "model.output_layer.weight": torch.ones(8, 4),
          "model.rm_head.weight": torch.full((1, 4), 2.0), "model.rm_head.bias": torch.tensor([3.0]),
          "model.decoder.layers.0.self_attention.linear_qkv._extra_state": io.BytesIO(b"x")}
    out = nemo_state_dict_to_megatron(sd, layernorm1p=True)
    assert torch.equal(out["decoder.layers.0.input_layernorm.weight"], torch.ones(4))
    assert torch.equal(out["decoder.final_layernorm.weight"], torch.full((4,), 1.5))
    assert out["output_layer.weight"].shape == (8, 4) and not any("extra" in k for k in out)
    rm = nemo_state_dict_to_megatron(sd, role="reward")
    assert torch.equal(rm["output_layer.weight"], sd["model.rm_head.weight"])
    assert torch.equal(rm["output_layer.bias"], sd["model.rm_head.bias"])
    with pytest.raises(ValueError, match="num_attributes"):
        nemo_state_dict_to_megatron({**sd, "model.rm_head.weight": torch.ones(3, 4)}, role="reward")


# --------------------------------------------------------------------------- (d) errors
def _archive(tmp_path: Path, name: str, files: dict[str, object], gz: bool = False) -> Path:
    folder = tmp_path / (name + "_folder")
    folder.mkdir()
    for rel, content in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, dict) and rel.endswith(".yaml"):
            _write_yaml(folder / rel, content)
        elif isinstance(content, dict):
            torch.save(content, folder / rel)
        else:
            (folder / rel).write_bytes(content)
    path = tmp_path / f"{name}.nemo"
    with tarfile.open(path, "w:gz" if gz else "w:") as tar:
        tar.add(folder, arcname=".")
    return path


def test_errors_name_the_path_or_field(exported, tmp_path: Path, capsys):
    from nemo_rlhf.checkpoint.nemo import export_nemo, import_nemo
    from nemo_rlhf.checkpoint.weights import CheckpointError
    from nemo_rlhf.convert import main

    out = tmp_path / "out"
    missing = tmp_path / "nope.nemo"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        import_nemo(missing, out)

    not_tar = tmp_path / "not_a_tar.nemo"
    not_tar.write_bytes(b"this is not a tar archive" * 100)
    with pytest.raises(ValueError, match=re.escape(str(not_tar)) + ".*not a .nemo archive"):
        import_nemo(not_tar, out)

    no_cfg = _archive(tmp_path, "no_cfg",
                      {"model_weights.ckpt": {"model.embedding.word_embeddings.weight": torch.ones(2)}})
    with pytest.raises(FileNotFoundError, match=re.escape(str(no_cfg)) + ".*model_config.yaml"):
        import_nemo(no_cfg, out)

    legacy_sd = {"model.language_model.embedding.word_embeddings.weight": torch.ones(VOCAB_ROWS, 64),
                 "model.language_model.encoder.layers.0.input_layernorm.weight": torch.ones(64)}
    legacy_cfg = {k: v for k, v in _nemo_config(GPT2_LIKE).items() if k != "mcore_gpt"}
    legacy = _archive(tmp_path, "legacy", {"model_config.yaml": legacy_cfg, "model_weights.ckpt": legacy_sd})
    with pytest.raises(ValueError, match="model_config.yaml: mcore_gpt=None.*convert_nemo_gpt_to_mcore"):
        import_nemo(legacy, out)
    mislabeled = _archive(tmp_path, "mislabeled", {"model_config.yaml": _nemo_config(GPT2_LIKE),
                                                   "model_weights.ckpt": legacy_sd})
    with pytest.raises(ValueError, match="language_model.*convert_nemo_gpt_to_mcore"):
        import_nemo(mislabeled, out)

    alibi = _archive(tmp_path, "alibi", {"model_config.yaml": _nemo_config(GPT2_LIKE, position_embedding_type="alibi"),
                                         "model_weights.ckpt": legacy_sd})
    with pytest.raises(ValueError, match="model_config.yaml: position_embedding_type='alibi'"):
        import_nemo(alibi, out)

    ranks = _archive(tmp_path, "ranks", {"model_config.yaml": _nemo_config(GPT2_LIKE),
                                         "mp_rank_00/model_weights.ckpt": b"x", "mp_rank_01/model_weights.ckpt": b"x"})
    with pytest.raises(ValueError, match="mp_rank_00, mp_rank_01.*megatron_change_num_partitions"):
        import_nemo(ranks, out)

    data = exported["nemo"].read_bytes()
    with tarfile.open(exported["nemo"]) as tar:
        last = tar.getmembers()[-1]  # model_weights/metadata.json
    assert last.name == "./model_weights/metadata.json"
    for size in (len(data) // 2, last.offset):  # inside a member, between members
        cut = tmp_path / f"truncated_{size}.nemo"
        cut.write_bytes(data[:size])
        with pytest.raises((ValueError, CheckpointError), match=re.escape(str(cut))):
            import_nemo(cut, out)
    assert not list(tmp_path.glob(".out.nemo-extract-*"))

    vocab_txt = tmp_path / "vocab.txt"
    vocab_txt.write_text("a\nb\n")
    with pytest.raises(ValueError, match=re.escape(str(vocab_txt))):
        export_nemo(exported["ckpt"], GPT2_LIKE, tmp_path / "x.nemo", tokenizer_path=vocab_txt)
    assert not (tmp_path / "x.nemo").exists()

    assert main(["nemo-to-megatron", "--nemo", str(not_tar), "--out", str(out)]) == 2
    assert f"error: {not_tar}" in capsys.readouterr().err
    assert main(["megatron-to-nemo", "--ckpt", str(exported["ckpt"]), "--model-config",
                 str(missing), "--out", str(tmp_path / "x.nemo")]) == 2
    assert str(missing) in capsys.readouterr().err


# --------------------------------------------------------------------------- (e) CLI
def test_cli_both_directions(exported, tmp_path: Path):
    from nemo_rlhf.checkpoint.hf import read_model_config

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmds = {
        "import": [sys.executable, "-m", "nemo_rlhf.convert", "nemo-to-megatron", "--nemo", str(exported["nemo"]),
                   "--out", str(tmp_path / "imported")],
        "export": [sys.executable, "-m", "nemo_rlhf.convert", "megatron-to-nemo", "--ckpt", str(exported["ckpt"]),
                   "--model-config", str(exported["ckpt"] / "model_config.yaml"), "--out",
                   str(tmp_path / "cli.nemo"), "--tokenizer", str(exported["tokenizer"])],
    }
    procs = {k: fork_server.popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for k, c in cmds.items()}  # both at once: 2 cores
    for k, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, (k, stderr[-3000:])
        assert "wrote" in stdout
    cfg = read_model_config(tmp_path / "imported" / "model_config.yaml")
    _check_cfg(cfg, GPT2_LIKE)
    assert _assert_same(exported["gpt"], _loaded(cfg, tmp_path / "imported" / "weights")) == 0.0
    with tarfile.open(tmp_path / "cli.nemo") as tar:
        names = tar.getnames()
    assert "./model_config.yaml" in names and any(n.startswith("./model_weights/") for n in names)
