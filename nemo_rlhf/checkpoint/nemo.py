"""NeMo-1 ``.nemo`` GPT archives <-> our megatron-core checkpoints (local paths only).

A NeMo-1 ``.nemo`` file (``MegatronGPTModel``, and NeMo-Aligner's reward / critic models built on
it) is a tar archive, uncompressed since NeMo 1.7 (older ones are gzipped), written by
``NLPSaveRestoreConnector`` from a folder holding:

* ``model_config.yaml`` -- the model's ``cfg`` (no top-level ``model:`` key): ``num_layers``,
  ``hidden_size``, ``normalization``, ``activation``, ``tokenizer:`` ... (mapping in
  :func:`nemo_config_to_model_cfg` and ``docs/conversion.md``);
* the weights, one of
    * ``model_weights/`` -- a megatron-core ``dist_checkpointing`` directory (NeMo >= 1.22 with
      ``mcore_gpt``): the ShardedTensors of ``GPTModel.sharded_state_dict(prefix="model.")``, one
      global tensor per key, layers stacked on a leading axis
      (``model.decoder.layers.self_attention.linear_qkv.weight [L, G*(q+2)*d, H]``); it loads under
      any TP / PP, whatever layout it was saved from;
    * ``model_weights.ckpt`` -- a ``torch.save``-d full state dict (TP = PP = 1, no dist-ckpt):
      per-layer keys ``model.decoder.layers.{i}.*``, ``model.module.*`` with ``megatron_amp_O2``;
    * ``mp_rank_XX/model_weights.ckpt`` or ``tp_rank_XX_pp_rank_XXX/model_weights.ckpt`` -- legacy
      per-rank shards (TP or PP > 1, no dist-ckpt): not supported beyond a single rank;
* tokenizer artifacts (``<32 hex>_tokenizer.model`` ...), referenced from the config as
  ``nemo:<name>``.

Tensor names are megatron-core's, so they map to ours 1:1 after dropping the ``model.`` /
``model.module.`` prefix. Two spellings exist for the per-layer norms: the Transformer-Engine spec
fuses them into the following linear (``self_attention.linear_qkv.layer_norm_{weight,bias}`` =
our ``input_layernorm.*``; ``mlp.linear_fc1.layer_norm_{weight,bias}`` = ``pre_mlp_layernorm.*``);
megatron-core's local spec maps its own names to the TE ones in ``sharded_state_dict``, so every
dist-checkpoint (NeMo's and ours) uses the TE names, and a ``model_weights.ckpt`` may hold either.
``_extra_state`` entries (Transformer-Engine FP8 metadata, pickled ``io.BytesIO``) are never
loaded. NeMo-Aligner's reward model / critic head ``rm_head.{weight [A, H], bias [A]}`` (a
``RowParallelLinear``, like ours) is our scalar head ``output_layer.{weight [1, H], bias [1]}``
for ``num_attributes`` A = 1.

Archives are read and written with :mod:`tarfile` (``filter="data"`` extraction), in the layout of
``nemo.core.connectors.save_restore_connector.SaveRestoreConnector`` (``_make_nemo_file_from_folder``
writes ``tar.add(folder, arcname=".")`` uncompressed; ``_tar_open`` reads plain or gzipped);
``tests/checkpoint/test_nemo_format.py`` checks both directions against nemo_toolkit's connector.
The connector itself is not imported at run time: it pulls in ``nemo.core`` (Lightning, Hydra, ~4 s)
for a dozen lines of tar handling, and it silently skips unsafe members where we raise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import tempfile
import uuid
import warnings
import zlib
from pathlib import Path
from typing import Any, Mapping

import torch

from nemo_rlhf.checkpoint.hf import (
    MODEL_CONFIG_FILE,
    ROLES,
    _build,
    _divisor_for,
    _OneProcessWorld,
    _write_yaml,
)
from nemo_rlhf.checkpoint.signals import save_sharded
from nemo_rlhf.models.builder import model_cfg_with_defaults, padded_vocab_size

WEIGHTS_DIR = "model_weights"  # dist-checkpoint directory inside a .nemo
WEIGHTS_CKPT = "model_weights.ckpt"  # single-file (TP = PP = 1) state dict inside a .nemo
TOKENIZER_DIR = "tokenizer"  # import_nemo copies tokenizer artifacts to <out_dir>/tokenizer/
_HEAD_ROLES = ("reward", "critic")
_CFG = MODEL_CONFIG_FILE
_MULTI_RANK = re.compile(r"^(mp_rank_\d+|tp_rank_\d+_pp_rank_\d+)$")
_ARTIFACT_PREFIX = re.compile(r"^[0-9a-f]{32}_")

# per-layer norm parameter names: ours (megatron-core local spec) -> Transformer-Engine fused
_TE_NORMS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}
_LOCAL_NORMS = {te: ours for ours, te in _TE_NORMS.items()}

_ACTIVATIONS = {  # NeMo activation -> ours
    "gelu": "gelu", "geglu": "geglu", "fast-geglu": "geglu", "swiglu": "swiglu",
    "fast-swiglu": "swiglu", "squared-relu": "squared_relu",
}
_ACTIVATIONS_OUT = {"gelu": "gelu", "gelu_tanh": "gelu", "swiglu": "fast-swiglu", "geglu": "fast-geglu",
                    "squared_relu": "squared-relu"}
_NORMS = {"layernorm": "LayerNorm", "layernorm1p": "LayerNorm", "rmsnorm": "RMSNorm"}
_PRECISION = {"fp32": 32, "32": 32, "bf16": "bf16", "16": 16, "fp16": 16}
_ALIGNER_TARGETS = {
    "reward": "nemo_aligner.models.nlp.gpt.megatron_gpt_reward_model.MegatronGPTRewardModel",
    "critic": "nemo_aligner.models.nlp.gpt.megatron_gpt_critic.MegatronGPTCriticModel",
}
_GPT_TARGET = "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel"
_TRUNCATED = "(not a tar archive, or truncated / corrupt)"


# --------------------------------------------------------------------------- config mapping
def _bad(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{_CFG}: {field}={value!r}: {why}")


def _unwrap(cfg: Mapping[str, Any]) -> dict[str, Any]:
    cfg = dict(cfg)
    if "num_layers" not in cfg and isinstance(cfg.get("model"), Mapping):
        cfg = dict(cfg["model"])
    return cfg


def _parse_nemo_config(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """(our model config without vocabulary fields, layernorm1p?) -- see :func:`nemo_config_to_model_cfg`."""
    cfg = _unwrap(cfg)
    if not cfg.get("mcore_gpt", False):
        raise _bad("mcore_gpt", cfg.get("mcore_gpt"),
                   "a legacy (non-mcore) NeMo GPT checkpoint with language_model.* weights; convert it "
                   "with NeMo's scripts/checkpoint_converters/convert_nemo_gpt_to_mcore.py first")
    for field in ("num_layers", "hidden_size", "num_attention_heads"):
        if not cfg.get(field):
            raise _bad(field, cfg.get(field), "required")
    spec = cfg.get("name") or ""
    if spec not in ("", "te_gpt"):
        raise _bad("name", spec, "only the default GPT layer spec ('' or 'te_gpt') is supported")
    for field, ok in (
        ("num_moe_experts", lambda v: not v), ("qk_layernorm", lambda v: not v),
        ("seq_len_interpolation_factor", lambda v: v is None),
        ("scale_positional_embedding", lambda v: not v), ("apply_embedding_scaling", lambda v: not v),
        ("rotary_interleaved", lambda v: not v), ("mcore_customization_config", lambda v: not v),
        ("apply_residual_connection_post_layernorm", lambda v: not v), ("window_size", lambda v: v is None),
        ("transformer_block_type", lambda v: v in (None, "pre_ln")),
    ):
        if field in cfg and not ok(cfg[field]):
            raise _bad(field, cfg[field], "not supported by our GPT model")
    norm = str(cfg.get("normalization", "layernorm")).lower()
    if norm not in _NORMS:
        raise _bad("normalization", cfg.get("normalization"), f"not in {sorted(_NORMS)}")
    act = str(cfg.get("activation", "gelu"))
    if act not in _ACTIVATIONS:
        raise _bad("activation", act, f"not in {sorted(_ACTIVATIONS)}")
    ours_act = _ACTIVATIONS[act]
    if cfg.get("openai_gelu", False):  # NeMo: openai_gelu replaces the activation function outright
        if act != "gelu":
            raise _bad("openai_gelu", True, f"with activation={act!r} has no equivalent here")
        ours_act = "gelu_tanh"
    pos = cfg.get("position_embedding_type", "learned_absolute")
    if pos not in ("learned_absolute", "rope"):
        raise _bad("position_embedding_type", pos, "only learned_absolute and rope are supported")
    heads = int(cfg["num_attention_heads"])
    groups = cfg.get("num_query_groups")
    seq = cfg.get("encoder_seq_length") or cfg.get("max_position_embeddings") or 512
    out: dict[str, Any] = dict(
        num_layers=int(cfg["num_layers"]),
        hidden_size=int(cfg["hidden_size"]),
        num_attention_heads=heads,
        num_query_groups=int(groups) if groups else None,
        ffn_hidden_size=int(cfg.get("ffn_hidden_size") or 4 * int(cfg["hidden_size"])),
        kv_channels=int(cfg["kv_channels"]) if cfg.get("kv_channels") else None,
        max_position_embeddings=int(seq),
        position_embedding_type=pos,
        rotary_base=cfg.get("rotary_base", 10000),
        rotary_percent=float(cfg.get("rotary_percentage", 1.0)),
        normalization=_NORMS[norm],
        layernorm_epsilon=float(cfg.get("layernorm_epsilon", 1e-5)),
        activation=ours_act,
        add_bias_linear=bool(cfg.get("bias", True)),
        add_qkv_bias=bool(cfg.get("qkv_bias", False)),
        share_embeddings_and_output_weights=bool(cfg.get("share_embeddings_and_output_weights", True)),
    )
    for field in ("hidden_dropout", "attention_dropout", "init_method_std"):
        if cfg.get(field) is not None:
            out[field] = float(cfg[field])
    return out, norm == "layernorm1p"


def vocab_fields(rows: int, vocab_size: int | None = None) -> dict[str, int]:
    """``vocab_size`` and ``make_vocab_size_divisible_by`` for an embedding of ``rows`` rows.

    Without ``vocab_size`` (the tokenizer's), every row is a token: ``vocab_size = rows`` and the
    divisor is the largest power of two <= 128 dividing it. With it, the divisor is the smallest d
    such that padding ``vocab_size`` to a multiple of d gives exactly ``rows`` at TP = 1 (d divides
    ``rows`` and exceeds ``rows - vocab_size``), so our padding reproduces NeMo's.

    Raises:
        ValueError: ``vocab_size`` not in ``1..rows``.
    """
    if vocab_size is None:
        return dict(vocab_size=int(rows), make_vocab_size_divisible_by=_divisor_for(int(rows)))
    if not 0 < vocab_size <= rows:
        raise ValueError(f"vocab_size={vocab_size} must be in 1..{rows} (the embedding's rows)")
    d = next(d for d in range(rows - vocab_size + 1, rows + 1) if rows % d == 0)
    return dict(vocab_size=int(vocab_size), make_vocab_size_divisible_by=d)


def nemo_config_to_model_cfg(cfg: Mapping[str, Any], padded_vocab: int | None = None,
                             vocab_size: int | None = None) -> dict[str, Any]:
    """Our ``model:`` config for a NeMo-1 ``model_config.yaml`` (mcore GPT).

    Args:
        cfg: the NeMo model config (a top-level ``model:`` key is unwrapped).
        padded_vocab: rows of the checkpoint's word embedding (NeMo does not store the vocabulary
            size: it pads the tokenizer's to ``make_vocab_size_divisible_by * TP``, or takes
            ``override_vocab_size``). None: ``override_vocab_size`` if set, else the vocabulary is
            left to the tokenizer (``vocab_size: null``, NeMo's divisor).
        vocab_size: the tokenizer's vocabulary size, see :func:`vocab_fields`.

    Returns:
        keys of ``nemo_rlhf.config.ModelConfig``: ``encoder_seq_length`` -> ``max_position_embeddings`` (NeMo
        builds megatron's GPTModel with it), ``rotary_percentage`` -> ``rotary_percent``, ``bias``
        -> ``add_bias_linear``, ``qkv_bias`` -> ``add_qkv_bias``, ``normalization`` layernorm /
        layernorm1p / rmsnorm -> LayerNorm / LayerNorm / RMSNorm (layernorm1p stores ``gamma - 1``:
        :func:`import_nemo` adds 1 to the norm weights), ``activation`` gelu (``openai_gelu``:
        gelu_tanh) / [fast-]swiglu / [fast-]geglu / squared-relu, dropouts and ``init_method_std``
        when present; the rest keep our defaults (fp32 parameters, TP = PP = 1).

    Raises:
        ValueError: ``model_config.yaml: <field>=<value>: <why>`` for anything our model cannot
            express: ``mcore_gpt`` false or missing (legacy ``language_model.*`` checkpoints:
            convert with NeMo's ``convert_nemo_gpt_to_mcore.py`` first), MoE, other layer specs
            (``name``), RoPE scaling / interleaving, qk-layernorm, ALiBi and other position
            embeddings, reglu, ``openai_gelu`` with a gated activation, sliding windows.
    """
    out, _ = _parse_nemo_config(cfg)
    cfg = _unwrap(cfg)
    if padded_vocab is None and cfg.get("override_vocab_size"):
        padded_vocab = int(cfg["override_vocab_size"])
    if padded_vocab is not None:
        out.update(vocab_fields(int(padded_vocab), vocab_size))
    else:
        out.update(vocab_size=vocab_size,
                   make_vocab_size_divisible_by=int(cfg.get("make_vocab_size_divisible_by", 128)))
    return out


def model_cfg_to_nemo_config(model_cfg: Mapping[str, Any], role: str = "policy",
                             tokenizer: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The NeMo-1 ``model_config.yaml`` for our ``model:`` config (inverse of :func:`nemo_config_to_model_cfg`).

    ``mcore_gpt: true``, ``transformer_engine: false`` (megatron-core's local layer spec; the
    dist-checkpoint uses the TE tensor names either way, so a TE config loads it too), TP = PP = 1
    (NeMo reshards the dist-checkpoint on load), ``override_vocab_size`` = our padded vocabulary at
    TP = 1 (so NeMo builds exactly our embedding whatever its tokenizer), ``precision`` and
    ``megatron_amp_O2`` from ``params_dtype``. For ``role`` reward / critic the NeMo-Aligner keys
    are added (``target`` MegatronGPTRewardModel / MegatronGPTCriticModel, ``output_sequence``,
    ``regression.num_attributes: 1``, ...).

    Args:
        model_cfg: our ``model:`` config (``vocab_size`` must be set).
        role: policy / reward / critic.
        tokenizer: the ``tokenizer:`` section (default: none, ``library: null``).

    Raises:
        ValueError: unknown role, no ``vocab_size``, or a setting NeMo cannot express
            (``model.activation='relu'``, naming the field).
    """
    if role not in ROLES:
        raise ValueError(f"role={role!r} not in {ROLES}")
    cfg = model_cfg_with_defaults(model_cfg)
    if not cfg["vocab_size"]:
        raise ValueError("model.vocab_size must be set to export to NeMo")
    if cfg["activation"] not in _ACTIVATIONS_OUT:
        raise ValueError(f"model.activation={cfg['activation']!r} has no NeMo equivalent "
                         f"(exportable: {sorted(_ACTIVATIONS_OUT)})")
    dtype = str(cfg["params_dtype"])
    head = role in _HEAD_ROLES
    heads = int(cfg["num_attention_heads"])
    padded = padded_vocab_size(int(cfg["vocab_size"]), int(cfg["make_vocab_size_divisible_by"]), 1)
    out: dict[str, Any] = dict(
        mcore_gpt=True,
        transformer_engine=False,
        megatron_amp_O2=_PRECISION.get(dtype) == "bf16",
        precision=_PRECISION.get(dtype, 32),
        micro_batch_size=1,
        global_batch_size=1,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        sequence_parallel=False,
        encoder_seq_length=int(cfg["max_position_embeddings"]),
        max_position_embeddings=int(cfg["max_position_embeddings"]),
        num_layers=int(cfg["num_layers"]),
        hidden_size=int(cfg["hidden_size"]),
        ffn_hidden_size=int(cfg["ffn_hidden_size"] or 4 * cfg["hidden_size"]),
        num_attention_heads=heads,
        num_query_groups=int(cfg["num_query_groups"]) if cfg["num_query_groups"] else None,
        kv_channels=int(cfg["kv_channels"]) if cfg["kv_channels"] else None,
        init_method_std=float(cfg["init_method_std"]),
        hidden_dropout=float(cfg["hidden_dropout"]),
        attention_dropout=float(cfg["attention_dropout"]),
        ffn_dropout=0.0,
        apply_query_key_layer_scaling=False,
        normalization={"LayerNorm": "layernorm", "RMSNorm": "rmsnorm"}[cfg["normalization"]],
        layernorm_epsilon=float(cfg["layernorm_epsilon"]),
        make_vocab_size_divisible_by=int(cfg["make_vocab_size_divisible_by"]),
        override_vocab_size=padded,
        bias=bool(cfg["add_bias_linear"]),
        qkv_bias=bool(cfg["add_qkv_bias"]),
        activation=_ACTIVATIONS_OUT[cfg["activation"]],
        openai_gelu=cfg["activation"] == "gelu_tanh",
        transformer_block_type="pre_ln",
        position_embedding_type=cfg["position_embedding_type"],
        rotary_base=cfg["rotary_base"],
        rotary_percentage=float(cfg["rotary_percent"]),
        share_embeddings_and_output_weights=bool(cfg["share_embeddings_and_output_weights"]) and not head,
        bias_activation_fusion=False,
        bias_dropout_add_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        tokenizer=dict(tokenizer) if tokenizer else dict(library=None, type=None, model=None,
                                                           vocab_file=None, merge_file=None),
        optim=dict(name="fused_adam", lr=1e-5, weight_decay=0.0),
        target=_ALIGNER_TARGETS[role] if head else _GPT_TARGET,
    )
    if head:
        out.update(output_sequence=role == "critic", use_avg_pool=False, forward_mbs=1,
                   reward_model_type="binary_ranking",
                   regression=dict(num_attributes=1, merge_attributes=False, attribute_weights=None))
    return out


# --------------------------------------------------------------------------- state dicts
def _strip_prefix(keys) -> str:
    """``model.module.`` (megatron_amp_O2), ``model.`` or ``''``: the prefix of the model's keys."""
    keys = list(keys)
    for p in ("model.module.", "model.", ""):
        if any(k.startswith(p + "decoder.") or k.startswith(p + "embedding.") for k in keys):
            return p
    raise ValueError("no megatron GPT tensors (decoder.* / embedding.*) found")


def _refuse_legacy(keys, where: str) -> None:
    legacy = next((k for k in keys if "language_model." in k), None)
    if legacy is not None:
        raise ValueError(f"{where} holds legacy (non-mcore) NeMo GPT weights ({legacy!r}); convert the "
                         ".nemo with NeMo's scripts/checkpoint_converters/convert_nemo_gpt_to_mcore.py first")


def _head_keys(p: str, available: Mapping[str, Any], hidden: int) -> tuple[str, str] | None:
    """Checkpoint keys of a one-output scalar head: NeMo-Aligner's ``rm_head``, else a ``[1, H]`` output_layer."""
    for name in ("rm_head", "output_layer"):
        w = available.get(f"{p}{name}.weight")
        if w is None:
            continue
        shape = _global_shape(w)
        if name == "rm_head" and shape[0] != 1:
            raise ValueError(f"{p}rm_head.weight has shape {shape}: only one-attribute heads "
                             "(regression.num_attributes = 1) are supported")
        if shape == (1, hidden):
            return f"{p}{name}.weight", f"{p}{name}.bias"
    return None


def nemo_state_dict_to_megatron(sd: Mapping[str, Any], role: str = "policy", hidden_size: int | None = None,
                                layernorm1p: bool = False) -> dict[str, torch.Tensor]:
    """A NeMo mcore-GPT state dict (``model_weights.ckpt``) -> our ``GPTModel.state_dict()`` tensors.

    Args:
        sd: per-layer tensors with the ``model.`` or ``model.module.`` (``megatron_amp_O2``) prefix
            (or none); TE-fused (``linear_qkv.layer_norm_weight``) or local norm names; non-tensor
            values and ``_extra_state`` entries are dropped.
        role: policy: NeMo-Aligner ``rm_head.*`` is dropped. reward / critic: ``rm_head.{weight
            [1, H], bias [1]}`` (or a ``[1, H]`` ``output_layer``) becomes ``output_layer.*``; a
            vocabulary ``output_layer.weight [V, H]`` is dropped (no head: none is returned).
        hidden_size: H, to tell a ``[1, H]`` head from a one-row vocabulary (default: from the
            embedding).
        layernorm1p: add 1 to every norm weight (NeMo's ``normalization: layernorm1p`` stores
            ``gamma - 1``).

    Returns:
        dict of tensors (dtype unchanged) keyed as ``GPTModel.state_dict()``.

    Raises:
        ValueError: legacy ``language_model.*`` keys, no GPT tensors, a multi-attribute head.
    """
    _refuse_legacy(sd, "the state dict")
    p = _strip_prefix(sd)
    tensors = {k[len(p):]: v for k, v in sd.items()
               if k.startswith(p) and isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    if hidden_size is None:
        hidden_size = int(tensors["embedding.word_embeddings.weight"].shape[1])
    head_keys = _head_keys("", tensors, hidden_size) if role in _HEAD_ROLES else None
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        if k.startswith(("rm_head.", "output_layer.")):
            continue
        m = re.match(r"^(decoder\.layers\.\d+\.)(.*)$", k)
        if m and m.group(2) in _LOCAL_NORMS:
            k = m.group(1) + _LOCAL_NORMS[m.group(2)]
        out[k] = v
    if role in _HEAD_ROLES:
        if head_keys is not None:
            w, b = head_keys
            out["output_layer.weight"] = tensors[w]
            if b in tensors:
                out["output_layer.bias"] = tensors[b]
    elif "output_layer.weight" in tensors:
        out["output_layer.weight"] = tensors["output_layer.weight"]
    if layernorm1p:
        for k in list(out):
            if k.endswith("layernorm.weight"):
                out[k] = out[k] + 1
    return out


# --------------------------------------------------------------------------- archives
def _extract(nemo_path: Path, dest: Path) -> None:
    """Extract a plain or gzipped tar into ``dest`` (``filter="data"``: no links or paths outside)."""
    if not tarfile.is_tarfile(nemo_path):
        raise ValueError(f"{nemo_path} is not a .nemo archive {_TRUNCATED}")
    try:
        with tarfile.open(nemo_path, "r:*") as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ValueError(f"cannot read the .nemo archive {nemo_path} {_TRUNCATED}: {exc}") from exc


def _archive_root(root: Path, where: Path) -> Path:
    if (root / _CFG).is_file():
        return root
    subdirs = [d for d in root.iterdir() if d.is_dir() and (d / _CFG).is_file()]
    if len(subdirs) == 1:
        return subdirs[0]
    raise FileNotFoundError(f"{where} has no {_CFG} (not a NeMo model archive, or a truncated one)")


def _read_nemo_config(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    try:
        conf = OmegaConf.load(path)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path
        raise ValueError(f"cannot parse {path}: {exc}") from exc
    try:
        cfg = OmegaConf.to_container(conf, resolve=True)
    except Exception:  # noqa: BLE001 - unresolvable interpolations elsewhere in the config
        cfg = OmegaConf.to_container(conf, resolve=False)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not a mapping")
    return _unwrap(cfg)


def _tokenizer_artifacts(root: Path, cfg: Mapping[str, Any]) -> dict[str, Path]:
    """``{original file name: path}`` of the ``nemo:`` artifacts of the tokenizer section."""
    tok = cfg.get("tokenizer") or {}
    found: dict[str, Path] = {}
    for value in tok.values() if isinstance(tok, Mapping) else ():
        if isinstance(value, str) and value.startswith("nemo:"):
            path = root / value[len("nemo:"):]
            if path.is_file():
                found[_ARTIFACT_PREFIX.sub("", path.name)] = path
    return found


def _tokenizer_vocab(artifacts: Mapping[str, Path]) -> int | None:
    """Vocabulary size of a ``tokenizer.json`` artifact (added tokens included), if any."""
    path = next((p for name, p in artifacts.items() if name.endswith("tokenizer.json")), None)
    if path is None:
        return None
    try:
        import tokenizers

        return int(tokenizers.Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True))
    except Exception as exc:  # noqa: BLE001 - the vocabulary then comes from the weights
        warnings.warn(f"cannot read tokenizer artifact {path.name}: {exc}", stacklevel=3)
        return None


class _World(_OneProcessWorld):
    def __enter__(self):
        try:
            return super().__enter__()
        except ValueError:
            raise ValueError("NeMo conversion needs full weights: run it in a TP = PP = 1 world "
                             "(or with no process group, and one is created)") from None


def _weights_kind(root: Path, where: Path) -> tuple[str, Path]:
    if (root / WEIGHTS_DIR).is_dir():
        return "dist", root / WEIGHTS_DIR
    if (root / WEIGHTS_CKPT).is_file():
        return "file", root / WEIGHTS_CKPT
    ranks = sorted(d.name for d in root.iterdir() if d.is_dir() and _MULTI_RANK.match(d.name))
    if len(ranks) == 1 and (root / ranks[0] / WEIGHTS_CKPT).is_file():
        return "file", root / ranks[0] / WEIGHTS_CKPT
    if ranks:
        raise ValueError(f"{where} holds a legacy multi-rank checkpoint ({', '.join(ranks[:4])}"
                         f"{', ...' if len(ranks) > 4 else ''}): merge it to TP = PP = 1 first (NeMo's "
                         "examples/nlp/language_modeling/megatron_change_num_partitions.py), or re-save it "
                         "as a distributed checkpoint")
    raise FileNotFoundError(f"{where} has no model weights ({WEIGHTS_DIR}/ or {WEIGHTS_CKPT})")


def _load_file_weights(path: Path) -> dict[str, Any]:
    import pickle

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path} holds objects other than tensors; refusing to unpickle it "
                         f"(weights_only): {exc}") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"cannot read {path} (truncated or corrupt?): {exc}") from exc
    if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path} is not a state dict")
    return dict(sd)


def _dist_metadata(wdir: Path) -> dict[str, Any]:
    from megatron.core import dist_checkpointing

    from nemo_rlhf.checkpoint.weights import CheckpointError

    meta_file = wdir / "metadata.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{wdir} is not a distributed checkpoint (no metadata.json; truncated archive?)")
    try:
        backend = json.loads(meta_file.read_text()).get("sharded_backend")
    except ValueError as exc:
        raise CheckpointError(f"{meta_file} is not valid JSON: {exc}") from exc
    if backend != "torch_dist":
        raise ValueError(f"{meta_file}: sharded_backend={backend!r}: only torch_dist checkpoints can be read "
                         "with megatron-core 0.16 (re-save the model with dist_ckpt_format: torch_dist)")
    try:
        return dict(dist_checkpointing.load_tensors_metadata(str(wdir)))
    except Exception as exc:  # noqa: BLE001 - re-raised with the path
        raise CheckpointError(f"cannot read checkpoint metadata at {wdir}: {exc}") from exc


def _global_shape(t) -> tuple[int, ...]:
    return tuple(getattr(t, "global_shape", None) or t.shape)


def _load_dist_weights(gpt, wdir: Path, role: str, available: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Load a NeMo dist-checkpoint into ``gpt``'s layout; returns our ``state_dict()`` tensors (no head if none)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException as TorchCheckpointException

    from nemo_rlhf.checkpoint.weights import CheckpointError

    p = _strip_prefix(available)
    head = role in _HEAD_ROLES
    head_keys = _head_keys(p, available, gpt.config.hidden_size) if head else None
    sharded = gpt.sharded_state_dict(prefix=p)
    for name in list(sharded):
        item = sharded[name]
        local = name[len(p):]
        if local.endswith("_extra_state"):
            del sharded[name]
            continue
        if head and local.startswith("output_layer."):
            if head_keys is None or (local == "output_layer.bias" and head_keys[1] not in available):
                del sharded[name]  # keeps its fresh init
                continue
            item.key = head_keys[0] if local == "output_layer.weight" else head_keys[1]
        if item.key not in available:
            alias = next((item.key.replace(a, b) for a, b in {**_LOCAL_NORMS, **_TE_NORMS}.items()
                          if item.key.endswith(a)), None)
            if alias is None or alias not in available:
                hint = (" (a NeMo-Aligner reward model / critic? import it with role reward or critic)"
                        if local == "output_layer.weight" and f"{p}rm_head.weight" in available else "")
                raise CheckpointError(f"checkpoint {wdir} has no tensor {item.key!r} (parameter "
                                      f"{local!r}){hint}")
            item.key = alias
        if hasattr(item, "global_shape"):
            want, have = tuple(item.global_shape), _global_shape(available[item.key])
            if want != have:
                raise ValueError(f"checkpoint {wdir}: {item.key} has shape {have}, the model config "
                                 f"gives {want}")
    try:
        state = dist_checkpointing.load(sharded, str(wdir))
    except (Exception, TorchCheckpointException) as exc:  # noqa: BLE001 - torch's is a BaseException
        raise CheckpointError(f"failed to load checkpoint {wdir}: {exc}") from exc
    return {k[len(p):]: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def import_nemo(nemo_path: str | os.PathLike, out_dir: str | os.PathLike, role: str = "policy",
                vocab_size: int | None = None) -> dict[str, Any]:
    """Convert a NeMo-1 ``.nemo`` GPT archive into a megatron checkpoint of ``role``.

    Writes ``<out_dir>/weights`` (a :func:`save_model_weights` dist-checkpoint, TP/PP-reshardable),
    ``<out_dir>/model_config.yaml`` (our ``model:`` config, as :func:`import_hf`), and copies the
    tokenizer's ``nemo:`` artifacts to ``<out_dir>/tokenizer/`` (file names without NeMo's 32-hex
    prefix). Parameters are fp32 (bf16 / fp16 checkpoints are up-cast exactly).

    Args:
        nemo_path: a ``.nemo`` file (tar, plain or gzipped) or an extracted directory. Weights:
            ``model_weights/`` (dist-checkpoint, any saved TP / PP), ``model_weights.ckpt``
            (TP = PP = 1, read with ``torch.load(weights_only=True)``), or a single
            ``mp_rank_00/`` / ``tp_rank_00_pp_rank_000/`` shard; ``model.`` and
            ``model.module.`` (``megatron_amp_O2``) prefixes; tied embeddings (no
            ``output_layer.weight``); TE-fused or local norm names.
        out_dir: output directory.
        role: policy / reward / critic. For reward / critic the head is NeMo-Aligner's
            ``rm_head`` (``[1, H]`` + bias), or a ``[1, H]`` ``output_layer``; a checkpoint without
            one (a plain GPT) gives a fresh head and a warning. The policy ignores an ``rm_head``.
        vocab_size: the tokenizer's vocabulary size (<= the embedding's rows; the rest is NeMo's
            padding). Default: from a ``tokenizer.json`` artifact if there is one, else the
            embedding's rows (every row a token).

    Returns:
        the ``model:`` config written.

    Raises:
        FileNotFoundError: ``nemo_path`` missing, or no ``model_config.yaml`` / weights in it.
        ValueError: not a tar archive or a truncated one, an unsupported config
            (``model_config.yaml: <field>``, see :func:`nemo_config_to_model_cfg`), legacy
            ``language_model.*`` weights, legacy multi-rank shards, non-tensor pickles, a tensor
            whose shape does not match the config.
        CheckpointError: the dist-checkpoint lacks a tensor or cannot be read (names the path).
    """
    if role not in ROLES:
        raise ValueError(f"role={role!r} not in {ROLES}")
    from nemo_rlhf.checkpoint.weights import CheckpointError

    nemo_path, out_dir = Path(nemo_path), Path(out_dir)
    if not nemo_path.exists():
        raise FileNotFoundError(f".nemo archive {nemo_path} does not exist")
    if nemo_path.is_dir():
        return _import_root(nemo_path, nemo_path, out_dir, role, vocab_size)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.nemo-extract-", dir=out_dir.parent))
    try:
        _extract(nemo_path, tmp)
        return _import_root(tmp, nemo_path, out_dir, role, vocab_size)
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        if str(tmp) not in str(exc):
            raise
        # name the archive, not the temporary extraction directory
        raise type(exc)(str(exc).replace(str(tmp), f"{nemo_path}:")) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _import_root(folder: Path, nemo_path: Path, out_dir: Path, role: str, vocab_size: int | None) -> dict[str, Any]:
    """:func:`import_nemo` of an extracted archive ``folder``."""
    from nemo_rlhf.checkpoint.weights import save_model_weights

    root = _archive_root(folder, nemo_path)
    nemo_cfg = _read_nemo_config(root / _CFG)
    arch_cfg, layernorm1p = _parse_nemo_config(nemo_cfg)
    kind, wpath = _weights_kind(root, nemo_path)
    artifacts = _tokenizer_artifacts(root, nemo_cfg)
    tokenizer_vocab = _tokenizer_vocab(artifacts) if vocab_size is None else None
    head = role in _HEAD_ROLES
    if kind == "dist":
        available = _dist_metadata(wpath)
        _refuse_legacy(available, str(wpath))
        p = _strip_prefix(available)
        file_sd = None
    else:
        file_sd = _load_file_weights(wpath)
        _refuse_legacy(file_sd, str(wpath))
        p = _strip_prefix(file_sd)
        available = {k: v for k, v in file_sd.items() if isinstance(v, torch.Tensor)}
    emb = available.get(f"{p}embedding.word_embeddings.weight")
    if emb is None:
        raise ValueError(f"{wpath} has no {p}embedding.word_embeddings.weight")
    rows = _global_shape(emb)[0]
    if tokenizer_vocab is not None and tokenizer_vocab > rows:
        warnings.warn(f"the tokenizer.json artifact of {nemo_path} has {tokenizer_vocab} tokens, more than "
                      f"the {rows} embedding rows: ignored", stacklevel=3)
    elif tokenizer_vocab is not None:
        vocab_size = tokenizer_vocab
    model_cfg = {**arch_cfg, **vocab_fields(rows, vocab_size)}
    pos = available.get(f"{p}embedding.position_embeddings.weight")
    if model_cfg["position_embedding_type"] == "learned_absolute" and pos is not None:
        model_cfg["max_position_embeddings"] = _global_shape(pos)[0]
    if not head and not model_cfg["share_embeddings_and_output_weights"] \
            and f"{p}output_layer.weight" not in available:
        raise ValueError(f"{_CFG}: share_embeddings_and_output_weights=False but {wpath} has no "
                         f"{p}output_layer.weight")
    if head and _head_keys(p, available, model_cfg["hidden_size"]) is None:
        warnings.warn(f"{nemo_path} has no one-output rm_head: the {role} head is freshly initialised",
                      stacklevel=3)
    with _World():
        gpt = _build(model_cfg, role)
        dtype = next(gpt.parameters()).dtype
        if kind == "dist":
            sd = _load_dist_weights(gpt, wpath, role, available)
            if layernorm1p:
                sd = {k: (v + 1 if k.endswith("layernorm.weight") else v) for k, v in sd.items()}
        else:
            sd = nemo_state_dict_to_megatron(file_sd, role, model_cfg["hidden_size"], layernorm1p)
            if model_cfg["share_embeddings_and_output_weights"] and not head:
                sd.pop("output_layer.weight", None)  # tied: the embedding is the projection
        result = gpt.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")
                   and not (head and k.startswith("output_layer."))]
        if missing or result.unexpected_keys:
            raise ValueError(f"conversion of {nemo_path} gave missing {missing}, "
                             f"unexpected {result.unexpected_keys}")
        save_model_weights(gpt, out_dir / "weights")
    _write_yaml(out_dir / MODEL_CONFIG_FILE, model_cfg)
    if artifacts:
        (out_dir / TOKENIZER_DIR).mkdir(exist_ok=True)
        for name, path in artifacts.items():
            shutil.copyfile(path, out_dir / TOKENIZER_DIR / name)
    return model_cfg


def _tokenizer_section(tokenizer_path: Path | None, folder: Path) -> dict[str, Any] | None:
    """Copy the tokenizer into ``folder`` as a NeMo artifact; its ``tokenizer:`` config section."""
    if tokenizer_path is None:
        return None
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"tokenizer file {tokenizer_path} does not exist")
    name = f"{uuid.uuid4().hex}_{tokenizer_path.name}"
    if tokenizer_path.suffix == ".json":
        section = dict(library="huggingface", type=None, model=f"nemo:{name}", vocab_file=None,
                       merge_file=None, delimiter=None, use_fast=True)
    elif tokenizer_path.suffix == ".model":
        section = dict(library="sentencepiece", type=None, model=f"nemo:{name}", vocab_file=None,
                       merge_file=None, delimiter=None, sentencepiece_legacy=False)
    else:
        raise ValueError(f"tokenizer {tokenizer_path}: expected a tokenizer.json (Hugging Face tokenizers) "
                         "or a SentencePiece .model file")
    shutil.copyfile(tokenizer_path, folder / name)
    return section


def export_nemo(ckpt_dir: str | os.PathLike, model_cfg: Mapping[str, Any], out_path: str | os.PathLike,
                tokenizer_path: str | os.PathLike | None = None, role: str | None = None) -> Path:
    """Write a NeMo-1 ``.nemo`` archive of a megatron checkpoint.

    The archive (uncompressed tar, members ``./model_config.yaml``, ``./model_weights/``, the
    tokenizer artifact) is what ``NLPSaveRestoreConnector.save_to`` writes for an mcore GPT with
    distributed checkpointing: ``model_weights/`` is a torch_dist dist-checkpoint of
    ``gpt.sharded_state_dict(prefix="model.")`` (TE tensor names, layers stacked, our
    ``_extra_state`` objects, which are empty), loadable at any TP / PP. For reward / critic the
    head is written as NeMo-Aligner's ``model.rm_head.{weight [1, H], bias [1], _extra_state}`` plus
    a placeholder ``model.output_layer.weight`` (a copy of the word embedding: NeMo-Aligner's reward
    model always builds an untied vocabulary projection it never uses), and the config targets
    ``MegatronGPTRewardModel`` / ``MegatronGPTCriticModel``. The file is written to
    ``<out_path>.tmp`` and renamed.

    Args:
        ckpt_dir: a :func:`save_model_weights` directory, or one holding it as ``weights/``.
        model_cfg: its ``model:`` config (``vocab_size`` set).
        out_path: the ``.nemo`` file to write (replaced if it exists).
        tokenizer_path: a ``tokenizer.json`` (config ``library: huggingface``, ``model:
            nemo:<hex>_tokenizer.json``; NeMo's HF AutoTokenizer also needs ``tokenizer.type``, a
            directory or hub id, set on restore) or a SentencePiece ``.model`` (``library:
            sentencepiece``), stored as an artifact.
        role: policy / reward / critic; None: detected (a ``[1, H]`` ``output_layer.weight`` is a head).

    Returns:
        ``out_path``.

    Raises:
        CheckpointError / FileNotFoundError: missing or incomplete checkpoint, missing tokenizer.
        ValueError: a config NeMo cannot express, an unsupported tokenizer file.
    """
    from megatron.core import dist_checkpointing

    from nemo_rlhf.checkpoint.weights import COMPLETE_MARKER, CheckpointError, global_rank

    ckpt_dir, out_path = Path(ckpt_dir), Path(out_path)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist")
    if not (ckpt_dir / COMPLETE_MARKER).exists() and (ckpt_dir / "weights" / COMPLETE_MARKER).exists():
        ckpt_dir = ckpt_dir / "weights"
    if not (ckpt_dir / COMPLETE_MARKER).exists():
        raise CheckpointError(f"no complete checkpoint at {ckpt_dir} (missing {COMPLETE_MARKER} marker)")
    if role is None:
        meta = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
        w = meta.get("output_layer.weight")
        role = "reward" if w is not None and _global_shape(w)[:1] == (1,) else "policy"
    tok = Path(tokenizer_path) if tokenizer_path is not None else None
    if tok is not None and not tok.is_file():
        raise FileNotFoundError(f"tokenizer file {tok} does not exist")
    if tok is not None and tok.suffix not in (".json", ".model"):
        raise ValueError(f"tokenizer {tok}: expected a tokenizer.json (Hugging Face tokenizers) "
                         "or a SentencePiece .model file")
    cfg = model_cfg_with_defaults(model_cfg)
    model_cfg_to_nemo_config(cfg, role)  # validate before any work
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = out_path.with_name(f".{out_path.name}.staging")
    with _World():
        try:
            _export_staged(cfg, role, ckpt_dir, staging, out_path, tok)
        finally:
            if global_rank() == 0:
                shutil.rmtree(staging, ignore_errors=True)
    return out_path


def _export_staged(cfg: Mapping[str, Any], role: str, ckpt_dir: Path, staging: Path, out_path: Path,
                   tok: Path | None) -> None:
    """:func:`export_nemo` inside the megatron world: fill ``staging``, tar it to ``out_path``."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    from nemo_rlhf.checkpoint.weights import barrier, global_rank, load_model_weights
    from nemo_rlhf.models.lora import is_adapter_name, merge_lora

    head = role in _HEAD_ROLES
    if global_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        (staging / WEIGHTS_DIR).mkdir(parents=True)
    barrier()
    gpt = _build(cfg, role)
    load_model_weights(gpt, ckpt_dir)
    merge_lora(gpt, keep_base=False)  # model.lora: the adapters are folded into the exported weights
    sharded = {k: v for k, v in gpt.sharded_state_dict(prefix="model.").items() if not is_adapter_name(k)}
    if head and gpt.post_process:
        for name in [n for n in sharded if n.startswith("model.output_layer.")]:
            item = sharded.pop(name)
            item.key = "model.rm_head." + item.key[len("model.output_layer."):]
            sharded["model.rm_head." + name[len("model.output_layer."):]] = item
        sharded["model.rm_head._extra_state"] = ShardedObject(
            "model.rm_head._extra_state", None, (1,), (0,), replica_id=0)
        emb = gpt.embedding.word_embeddings.weight.detach().clone()
        sharded["model.output_layer.weight"] = ShardedTensor.from_rank_offsets(
            "model.output_layer.weight", emb, replica_id=0)
    save_sharded(sharded, staging / WEIGHTS_DIR)
    barrier()
    if global_rank() == 0:
        tmp = out_path.with_name(out_path.name + ".tmp")
        try:
            section = _tokenizer_section(tok, staging)
            _write_yaml(staging / _CFG, model_cfg_to_nemo_config(cfg, role, section))
            with tarfile.open(tmp, "w:") as tar:  # as SaveRestoreConnector._make_nemo_file_from_folder
                tar.add(staging, arcname=".")
            os.replace(tmp, out_path)
        finally:
            tmp.unlink(missing_ok=True)
    barrier()
