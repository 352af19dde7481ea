"""Hugging Face <-> megatron-core ``GPTModel`` conversion (Llama and GPT-2 families), local paths only.

Two layers:

* pure state-dict functions (:func:`hf_config_to_model_cfg`, :func:`hf_state_dict_to_megatron`,
  :func:`megatron_state_dict_to_hf`, :func:`model_cfg_to_hf_config`) that map full (TP = 1)
  tensors between the two naming schemes, exactly and invertibly;
* directory functions (:func:`import_hf`, :func:`export_hf`) that read a ``save_pretrained``
  directory (``config.json`` + ``*.safetensors``) into a megatron dist-checkpoint written by
  :func:`nemo_rlhf.checkpoint.weights.save_model_weights` plus ``model_config.yaml``, and back.
  Every import goes through one writer, :func:`import_state_dict`; :func:`import_hf_model` takes
  an in-memory ``transformers`` model (and tokenizer), as :mod:`nemo_rlhf.checkpoint.gguf` does.

Layouts (see ``docs/conversion.md`` for the full name tables):

* megatron's fused QKV weight ``[G * (q + 2) * d, H]`` (G query groups, q = heads per group,
  d = head dim) is interleaved per query group: ``[q_g (q*d rows); k_g (d rows); v_g (d rows)]``
  for g = 0..G-1. HF Llama keeps separate ``q_proj [heads*d, H]``, ``k_proj``/``v_proj
  [G*d, H]``; GPT-2 keeps one ``c_attn`` Conv1D ``[H, 3H]`` = ``[all q | all k | all v]`` (Conv1D
  weights are stored transposed, ``[in, out]``).
* SwiGLU ``linear_fc1 [2F, H]`` = ``cat(gate_proj, up_proj)`` along rows.
* Vocabulary rows beyond the HF vocabulary (megatron padding) are zeros on import and dropped on
  export.
* Reward / critic heads: our ``output_layer.weight [1, H]`` and ``output_layer.bias [1]`` are HF
  ``score.weight`` and ``score.bias`` (``*ForSequenceClassification`` with ``num_labels=1``). HF's
  classification heads have no bias: on import a missing ``score.bias`` is 0; on export
  ``score.bias`` is written into the safetensors file for a lossless round trip, but
  ``transformers`` ignores it (its score = ours - bias).
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from nemo_rlhf.models.builder import model_cfg_with_defaults, padded_vocab_size

ROLES = ("policy", "reward", "critic")
ARCHS = ("llama", "gpt2")
MODEL_CONFIG_FILE = "model_config.yaml"
_HEAD_ROLES = ("reward", "critic")
HEAD_INIT_SEED = 0  # seed of a freshly initialised reward / critic head on import


def _arch_of(hf_config) -> str:
    model_type = getattr(hf_config, "model_type", None)
    if model_type == "llama":
        return "llama"
    if model_type == "gpt2":
        return "gpt2"
    raise ValueError(f"unsupported HF model_type {model_type!r}; supported: llama, gpt2")


def _rope_theta(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"rope_parameters.rope_type={rope_type!r} is not supported (only 'default')")
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ValueError("HF config has no rope_parameters.rope_theta")
    return float(theta)


def _divisor_for(vocab: int) -> int:
    """Largest power of two <= 128 dividing ``vocab``: at TP = 1 the padded vocab equals ``vocab``."""
    d = 128
    while vocab % d:
        d //= 2
    return d


def hf_config_to_model_cfg(hf_config) -> dict[str, Any]:
    """Our ``model:`` config (keys of ``nemo_rlhf.config.ModelConfig``) for an HF ``LlamaConfig`` or ``GPT2Config``.

    ``make_vocab_size_divisible_by`` is the largest power of two <= 128 dividing the HF vocabulary,
    so at TP = 1 the padded vocabulary equals the HF one (at TP > 1 extra rows may be padded;
    they are zero-filled on import and stripped on export).

    Raises:
        ValueError: unsupported model type, activation, RoPE scaling, or Llama with
            ``mlp_bias=True`` but ``attention_bias=False`` (megatron has one bias switch for
            projections and MLP plus a separate QKV one; that combination has no mapping).
    """
    arch = _arch_of(hf_config)
    c = hf_config
    vocab = int(c.vocab_size)
    if arch == "llama":
        if c.hidden_act != "silu":
            raise ValueError(f"Llama hidden_act={c.hidden_act!r}: only 'silu' (SwiGLU) is supported")
        attn_bias, mlp_bias = bool(c.attention_bias), bool(getattr(c, "mlp_bias", False))
        if mlp_bias and not attn_bias:
            raise ValueError("Llama mlp_bias=True with attention_bias=False has no megatron mapping")
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return dict(
            num_layers=int(c.num_hidden_layers),
            hidden_size=int(c.hidden_size),
            num_attention_heads=int(c.num_attention_heads),
            num_query_groups=int(c.num_key_value_heads or c.num_attention_heads),
            ffn_hidden_size=int(c.intermediate_size),
            kv_channels=int(head_dim),
            max_position_embeddings=int(c.max_position_embeddings),
            vocab_size=vocab,
            make_vocab_size_divisible_by=_divisor_for(vocab),
            position_embedding_type="rope",
            rotary_base=_rope_theta(c),
            normalization="RMSNorm",
            layernorm_epsilon=float(c.rms_norm_eps),
            activation="swiglu",
            # attention_bias (q/k/v/o biases) -> every linear has a bias; MLP biases are zero when
            # mlp_bias=False (checked on export).
            add_bias_linear=attn_bias,
            add_qkv_bias=attn_bias,
            share_embeddings_and_output_weights=bool(c.tie_word_embeddings),
        )
    acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
    if c.activation_function not in acts:
        raise ValueError(f"GPT-2 activation_function={c.activation_function!r} not in {sorted(acts)}")
    if getattr(c, "scale_attn_by_inverse_layer_idx", False) or not getattr(c, "scale_attn_weights", True):
        raise ValueError("GPT-2 scale_attn_by_inverse_layer_idx / scale_attn_weights=False not supported")
    return dict(
        num_layers=int(c.n_layer),
        hidden_size=int(c.n_embd),
        num_attention_heads=int(c.n_head),
        num_query_groups=None,
        ffn_hidden_size=int(c.n_inner or 4 * c.n_embd),
        kv_channels=None,
        max_position_embeddings=int(c.n_positions),
        vocab_size=vocab,
        make_vocab_size_divisible_by=_divisor_for(vocab),
        position_embedding_type="learned_absolute",
        normalization="LayerNorm",
        layernorm_epsilon=float(c.layer_norm_epsilon),
        activation=acts[c.activation_function],
        add_bias_linear=True,
        add_qkv_bias=True,
        share_embeddings_and_output_weights=bool(getattr(c, "tie_word_embeddings", True)),
    )


def model_cfg_to_hf_config(model_cfg: Mapping[str, Any], arch: str, role: str = "policy",
                           pad_token_id: int | None = None):
    """The HF config (``LlamaConfig`` / ``GPT2Config``) equivalent to our ``model:`` config.

    ``architectures`` is ``[<Llama|GPT2>ForCausalLM / GPT2LMHeadModel]`` for the policy and
    ``[<Llama|GPT2>ForSequenceClassification]`` with ``num_labels=1`` for reward / critic.
    ``pad_token_id`` (the tokenizer's) is stored in the config; HF's sequence classifiers need it
    to find the last non-pad token of a batch with more than one row. BOS/EOS ids are left unset.

    Raises:
        ValueError: ``arch``/``role`` unknown, or a model setting the HF architecture cannot express
            (naming the ``model.<field>``).
    """
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} not in {ARCHS}")
    if role not in ROLES:
        raise ValueError(f"role={role!r} not in {ROLES}")
    cfg = model_cfg_with_defaults(model_cfg)
    if not cfg["vocab_size"]:
        raise ValueError("model.vocab_size must be set to export to HF")

    def need(field: str, allowed) -> None:
        if cfg[field] not in allowed:
            raise ValueError(f"model.{field}={cfg[field]!r} cannot be exported as {arch} "
                             f"(needs one of {list(allowed)})")

    head = role in _HEAD_ROLES
    kw: dict[str, Any] = dict(pad_token_id=pad_token_id, bos_token_id=None, eos_token_id=None)
    if head:
        kw["num_labels"] = 1
    if arch == "llama":
        need("normalization", ["RMSNorm"])
        need("activation", ["swiglu"])
        need("position_embedding_type", ["rope"])
        need("rotary_percent", [1.0])
        if cfg["add_qkv_bias"] != cfg["add_bias_linear"]:
            raise ValueError(f"model.add_qkv_bias={cfg['add_qkv_bias']} must equal model.add_bias_linear="
                             f"{cfg['add_bias_linear']} for Llama (attention_bias covers q/k/v/o)")
        heads = int(cfg["num_attention_heads"])
        hf = transformers.LlamaConfig(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["ffn_hidden_size"] or 4 * cfg["hidden_size"]),
            num_hidden_layers=int(cfg["num_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg["num_query_groups"] or heads),
            head_dim=int(cfg["kv_channels"] or cfg["hidden_size"] // heads),
            max_position_embeddings=int(cfg["max_position_embeddings"]),
            rms_norm_eps=float(cfg["layernorm_epsilon"]),
            rope_parameters={"rope_type": "default", "rope_theta": float(cfg["rotary_base"])},
            attention_bias=bool(cfg["add_bias_linear"]),
            mlp_bias=bool(cfg["add_bias_linear"]),
            hidden_act="silu",
            tie_word_embeddings=bool(cfg["share_embeddings_and_output_weights"]) and not head,
            **kw,
        )
        hf.architectures = ["LlamaForSequenceClassification" if head else "LlamaForCausalLM"]
        return hf
    need("normalization", ["LayerNorm"])
    need("activation", ["gelu_tanh", "gelu", "relu"])
    need("position_embedding_type", ["learned_absolute"])
    need("add_bias_linear", [True])
    need("add_qkv_bias", [True])
    if cfg["num_query_groups"] not in (None, cfg["num_attention_heads"]):
        raise ValueError(f"model.num_query_groups={cfg['num_query_groups']} cannot be exported as gpt2 (MHA only)")
    if cfg["kv_channels"] not in (None, cfg["hidden_size"] // cfg["num_attention_heads"]):
        raise ValueError(f"model.kv_channels={cfg['kv_channels']} cannot be exported as gpt2")
    if not head:
        need("share_embeddings_and_output_weights", [True])
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[cfg["activation"]]
    hf = transformers.GPT2Config(
        vocab_size=int(cfg["vocab_size"]),
        n_positions=int(cfg["max_position_embeddings"]),
        n_embd=int(cfg["hidden_size"]),
        n_layer=int(cfg["num_layers"]),
        n_head=int(cfg["num_attention_heads"]),
        n_inner=int(cfg["ffn_hidden_size"] or 4 * cfg["hidden_size"]),
        activation_function=act,
        layer_norm_epsilon=float(cfg["layernorm_epsilon"]),
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=True,
        **kw,
    )
    hf.architectures = ["GPT2ForSequenceClassification" if head else "GPT2LMHeadModel"]
    return hf


# --------------------------------------------------------------------------- QKV layout helpers
def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """``q [heads*d, ...]``, ``k``/``v`` ``[G*d, ...]`` -> megatron ``[G*(q+2)*d, ...]``
    interleaved per query group ``[q_g; k_g; v_g]``."""
    rest = q.shape[1:]
    d = k.shape[0] // groups
    qg = q.reshape(groups, -1, *rest)
    kg = k.reshape(groups, d, *rest)
    vg = v.reshape(groups, d, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def _split_qkv(qkv: torch.Tensor, groups: int, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_fuse_qkv`: ``[G*(q+2)*d, ...]`` -> ``(q [heads*d], k [G*d], v [G*d])``."""
    rest = qkv.shape[1:]
    per_group = heads // groups
    d = qkv.shape[0] // (groups * (per_group + 2))
    x = qkv.reshape(groups, (per_group + 2) * d, *rest)
    q = x[:, : per_group * d].reshape(-1, *rest)
    k = x[:, per_group * d : (per_group + 1) * d].reshape(-1, *rest)
    v = x[:, (per_group + 1) * d :].reshape(-1, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    if rows < w.shape[0]:
        raise ValueError(f"padded vocabulary {rows} is smaller than the HF vocabulary {w.shape[0]}")
    if rows == w.shape[0]:
        return w.clone()
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])])


def _take(sd: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise KeyError(f"state dict has no tensor {key!r}")
    return sd[key]


# --------------------------------------------------------------------------- state dicts
def hf_state_dict_to_megatron(
    hf_sd: Mapping[str, torch.Tensor], hf_config, padded_vocab: int | None = None
) -> dict[str, torch.Tensor]:
    """HF Llama / GPT-2 tensors -> full (TP = 1) ``GPTModel.state_dict()`` tensors (no ``_extra_state``).

    Args:
        hf_sd: an HF state dict (``LlamaForCausalLM``/``GPT2LMHeadModel`` keys, or the
            ``*ForSequenceClassification`` keys with ``score.weight [1, H]``, optional
            ``score.bias [1]``; a bare ``LlamaModel``/``GPT2Model`` without ``model.``/``transformer.``
            prefixes is accepted too).
        hf_config: its HF config.
        padded_vocab: rows of megatron's embedding (default: the padded vocab of
            :func:`hf_config_to_model_cfg` at TP = 1); extra rows are zeros.

    Returns:
        dict of new tensors (dtype unchanged). Keys: ``embedding.word_embeddings.weight [V_pad, H]``,
        ``embedding.position_embeddings.weight [P, H]`` (GPT-2), ``decoder.layers.{i}.*``,
        ``decoder.final_layernorm.*``, and ``output_layer.weight`` (``[V_pad, H]``, untied LM;
        ``[1, H]`` plus ``output_layer.bias [1]`` when ``score.weight`` is present; absent for a
        tied LM).

    Raises:
        KeyError: a required HF tensor is missing (names it).
        ValueError: unsupported config, or ``score.weight`` with more than one label.
    """
    arch = _arch_of(hf_config)
    cfg = hf_config_to_model_cfg(hf_config)
    if padded_vocab is None:
        padded_vocab = padded_vocab_size(cfg["vocab_size"], cfg["make_vocab_size_divisible_by"], 1)
    prefix = "model." if arch == "llama" else "transformer."
    sd = {(k if k.startswith(prefix) or k.startswith(("lm_head.", "score.")) else prefix + k): v
          for k, v in hf_sd.items()}
    out: dict[str, torch.Tensor] = {}
    L = cfg["num_layers"]
    heads = cfg["num_attention_heads"]
    if arch == "llama":
        groups = cfg["num_query_groups"]
        bias = cfg["add_bias_linear"]
        mlp_bias = bool(getattr(hf_config, "mlp_bias", False))
        out["embedding.word_embeddings.weight"] = _pad_rows(_take(sd, "model.embed_tokens.weight"), padded_vocab)
        for i in range(L):
            h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
            att = h + "self_attn."
            out[m + "input_layernorm.weight"] = _take(sd, h + "input_layernorm.weight").clone()
            for kind in ("weight",) + (("bias",) if bias else ()):
                out[m + f"self_attention.linear_qkv.{kind}"] = _fuse_qkv(
                    _take(sd, att + f"q_proj.{kind}"), _take(sd, att + f"k_proj.{kind}"),
                    _take(sd, att + f"v_proj.{kind}"), groups)
                out[m + f"self_attention.linear_proj.{kind}"] = _take(sd, att + f"o_proj.{kind}").clone()
            out[m + "pre_mlp_layernorm.weight"] = _take(sd, h + "post_attention_layernorm.weight").clone()
            mlp = h + "mlp."
            out[m + "mlp.linear_fc1.weight"] = torch.cat(
                [_take(sd, mlp + "gate_proj.weight"), _take(sd, mlp + "up_proj.weight")])
            out[m + "mlp.linear_fc2.weight"] = _take(sd, mlp + "down_proj.weight").clone()
            if bias:
                if mlp_bias:
                    out[m + "mlp.linear_fc1.bias"] = torch.cat(
                        [_take(sd, mlp + "gate_proj.bias"), _take(sd, mlp + "up_proj.bias")])
                    out[m + "mlp.linear_fc2.bias"] = _take(sd, mlp + "down_proj.bias").clone()
                else:
                    w1, w2 = out[m + "mlp.linear_fc1.weight"], out[m + "mlp.linear_fc2.weight"]
                    out[m + "mlp.linear_fc1.bias"] = w1.new_zeros(w1.shape[0])
                    out[m + "mlp.linear_fc2.bias"] = w2.new_zeros(w2.shape[0])
        out["decoder.final_layernorm.weight"] = _take(sd, "model.norm.weight").clone()
    else:
        hidden = cfg["hidden_size"]
        out["embedding.word_embeddings.weight"] = _pad_rows(_take(sd, "transformer.wte.weight"), padded_vocab)
        out["embedding.position_embeddings.weight"] = _take(sd, "transformer.wpe.weight").clone()
        for i in range(L):
            h, m = f"transformer.h.{i}.", f"decoder.layers.{i}."
            for ours, theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
                out[m + f"{ours}.weight"] = _take(sd, h + f"{theirs}.weight").clone()
                out[m + f"{ours}.bias"] = _take(sd, h + f"{theirs}.bias").clone()
            w = _take(sd, h + "attn.c_attn.weight").t()  # Conv1D [H, 3H] -> [3H, H]
            b = _take(sd, h + "attn.c_attn.bias")
            out[m + "self_attention.linear_qkv.weight"] = _fuse_qkv(*w.split(hidden), groups=heads)
            out[m + "self_attention.linear_qkv.bias"] = _fuse_qkv(*b.split(hidden), groups=heads)
            for ours, theirs in (("self_attention.linear_proj", "attn.c_proj"),
                                 ("mlp.linear_fc1", "mlp.c_fc"), ("mlp.linear_fc2", "mlp.c_proj")):
                out[m + f"{ours}.weight"] = _take(sd, h + f"{theirs}.weight").t().contiguous()
                out[m + f"{ours}.bias"] = _take(sd, h + f"{theirs}.bias").clone()
        out["decoder.final_layernorm.weight"] = _take(sd, "transformer.ln_f.weight").clone()
        out["decoder.final_layernorm.bias"] = _take(sd, "transformer.ln_f.bias").clone()
    if "score.weight" not in sd and not cfg["share_embeddings_and_output_weights"]:
        out["output_layer.weight"] = _pad_rows(_take(sd, "lm_head.weight"), padded_vocab)
    if "score.weight" in sd:
        w = sd["score.weight"]
        if w.shape[0] != 1:
            raise ValueError(f"score.weight has shape {tuple(w.shape)}: only num_labels=1 heads are supported")
        out["output_layer.weight"] = w.clone()
        out["output_layer.bias"] = sd["score.bias"].clone() if "score.bias" in sd else w.new_zeros(1)
    return out


def megatron_state_dict_to_hf(sd: Mapping[str, torch.Tensor], hf_config) -> dict[str, torch.Tensor]:
    """Exact inverse of :func:`hf_state_dict_to_megatron`.

    Args:
        sd: full (TP = 1) ``GPTModel.state_dict()`` tensors; ``_extra_state`` entries are ignored.
            A scalar head ``output_layer.weight [1, H]`` (+ ``output_layer.bias [1]``) becomes
            ``score.weight`` (+ ``score.bias``).
        hf_config: the target HF config (its ``vocab_size`` strips megatron's padding rows).

    Returns:
        HF state dict as ``model.state_dict()`` of ``LlamaForCausalLM``/``GPT2LMHeadModel`` (a tied
        LM includes ``lm_head.weight`` equal to the embedding) or ``*ForSequenceClassification``
        (``score.weight`` plus our extra ``score.bias``).

    Raises:
        KeyError: a required megatron tensor is missing.
        ValueError: non-zero MLP biases for a Llama config with ``mlp_bias=False``.
    """
    arch = _arch_of(hf_config)
    cfg = hf_config_to_model_cfg(hf_config)
    vocab = cfg["vocab_size"]
    sd = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
    out: dict[str, torch.Tensor] = {}
    L = cfg["num_layers"]
    heads = cfg["num_attention_heads"]
    head_w = sd.get("output_layer.weight")
    scalar_head = head_w is not None and head_w.shape[0] == 1 and vocab != 1
    if arch == "llama":
        groups = cfg["num_query_groups"]
        bias = cfg["add_bias_linear"]
        mlp_bias = bool(getattr(hf_config, "mlp_bias", False))
        out["model.embed_tokens.weight"] = _take(sd, "embedding.word_embeddings.weight")[:vocab].clone()
        for i in range(L):
            h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
            att = h + "self_attn."
            for kind in ("weight",) + (("bias",) if bias else ()):
                q, k, v = _split_qkv(_take(sd, m + f"self_attention.linear_qkv.{kind}"), groups, heads)
                out[att + f"q_proj.{kind}"], out[att + f"k_proj.{kind}"], out[att + f"v_proj.{kind}"] = q, k, v
                out[att + f"o_proj.{kind}"] = _take(sd, m + f"self_attention.linear_proj.{kind}").clone()
            gate, up = _take(sd, m + "mlp.linear_fc1.weight").chunk(2)
            out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate.clone(), up.clone()
            out[h + "mlp.down_proj.weight"] = _take(sd, m + "mlp.linear_fc2.weight").clone()
            if bias and mlp_bias:
                gb, ub = _take(sd, m + "mlp.linear_fc1.bias").chunk(2)
                out[h + "mlp.gate_proj.bias"], out[h + "mlp.up_proj.bias"] = gb.clone(), ub.clone()
                out[h + "mlp.down_proj.bias"] = _take(sd, m + "mlp.linear_fc2.bias").clone()
            elif bias:
                for name in ("mlp.linear_fc1.bias", "mlp.linear_fc2.bias"):
                    if bool(_take(sd, m + name).any()):
                        raise ValueError(f"{m + name} is non-zero but the HF config has mlp_bias=False")
            out[h + "input_layernorm.weight"] = _take(sd, m + "input_layernorm.weight").clone()
            out[h + "post_attention_layernorm.weight"] = _take(sd, m + "pre_mlp_layernorm.weight").clone()
        out["model.norm.weight"] = _take(sd, "decoder.final_layernorm.weight").clone()
        embed = out["model.embed_tokens.weight"]
    else:
        out["transformer.wte.weight"] = _take(sd, "embedding.word_embeddings.weight")[:vocab].clone()
        out["transformer.wpe.weight"] = _take(sd, "embedding.position_embeddings.weight").clone()
        for i in range(L):
            h, m = f"transformer.h.{i}.", f"decoder.layers.{i}."
            for ours, theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
                out[h + f"{theirs}.weight"] = _take(sd, m + f"{ours}.weight").clone()
                out[h + f"{theirs}.bias"] = _take(sd, m + f"{ours}.bias").clone()
            q, k, v = _split_qkv(_take(sd, m + "self_attention.linear_qkv.weight"), heads, heads)
            out[h + "attn.c_attn.weight"] = torch.cat([q, k, v]).t().contiguous()
            out[h + "attn.c_attn.bias"] = torch.cat(
                _split_qkv(_take(sd, m + "self_attention.linear_qkv.bias"), heads, heads))
            for ours, theirs in (("self_attention.linear_proj", "attn.c_proj"),
                                 ("mlp.linear_fc1", "mlp.c_fc"), ("mlp.linear_fc2", "mlp.c_proj")):
                out[h + f"{theirs}.weight"] = _take(sd, m + f"{ours}.weight").t().contiguous()
                out[h + f"{theirs}.bias"] = _take(sd, m + f"{ours}.bias").clone()
        out["transformer.ln_f.weight"] = _take(sd, "decoder.final_layernorm.weight").clone()
        out["transformer.ln_f.bias"] = _take(sd, "decoder.final_layernorm.bias").clone()
        embed = out["transformer.wte.weight"]
    if not scalar_head:
        if cfg["share_embeddings_and_output_weights"]:
            out["lm_head.weight"] = embed
        else:
            out["lm_head.weight"] = _take(sd, "output_layer.weight")[:vocab].clone()
    if scalar_head:
        out["score.weight"] = head_w.clone()
        if "output_layer.bias" in sd:
            out["score.bias"] = sd["output_layer.bias"].clone()
    return out


# --------------------------------------------------------------------------- directories
def _load_hf_dir(hf_dir: Path):
    """(config, state dict) of a ``save_pretrained`` directory with safetensors weights."""
    import transformers
    from safetensors.torch import load_file

    if not hf_dir.is_dir():
        raise FileNotFoundError(f"HF model directory {hf_dir} does not exist")
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"HF model directory {hf_dir} has no config.json")
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"HF model directory {hf_dir} has no *.safetensors weights "
                                "(save with save_pretrained(safe_serialization=True))")
    try:
        config = transformers.AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path
        raise ValueError(f"invalid HF config {hf_dir / 'config.json'}: {exc}") from exc
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return config, sd


class _OneProcessWorld:
    """Context manager: a single-process CPU megatron world, unless one already exists."""

    def __enter__(self):
        from megatron.core import parallel_state

        self.created = not torch.distributed.is_initialized()
        if self.created:
            from nemo_rlhf.parallel.state import initialize_distributed

            initialize_distributed(1, 1, "cpu")
        elif (parallel_state.get_tensor_model_parallel_world_size() != 1
              or parallel_state.get_pipeline_model_parallel_world_size() != 1):
            raise ValueError("HF conversion needs full weights: run it in a TP = PP = 1 world "
                             "(or with no process group, and one is created)")
        return self

    def __exit__(self, *exc):
        if self.created:
            from nemo_rlhf.parallel.state import destroy_distributed

            destroy_distributed()


def _build(model_cfg: Mapping[str, Any], role: str):
    from nemo_rlhf.models.builder import build_gpt_model
    from nemo_rlhf.models.heads import attach_scalar_head

    head = role in _HEAD_ROLES
    gpt = build_gpt_model(model_cfg, share_embeddings_and_output_weights=False if head else None)
    if head:
        attach_scalar_head(gpt)
    return gpt


def _write_yaml(path: Path, cfg: Mapping[str, Any]) -> None:
    from omegaconf import OmegaConf

    path.write_text(OmegaConf.to_yaml(OmegaConf.create(dict(cfg))))


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``model_config.yaml`` (our ``model:`` config; a top-level ``model:`` key is unwrapped).

    Raises:
        FileNotFoundError: no such file. ValueError: not a mapping, or unknown keys.
    """
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model config {path} does not exist")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(cfg, dict):
        raise ValueError(f"model config {path} is not a mapping")
    if set(cfg) == {"model"}:
        cfg = cfg["model"]
    try:
        model_cfg_with_defaults(cfg)
    except ValueError as exc:
        raise ValueError(f"model config {path}: {exc}") from exc
    return cfg


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "special_tokens_map.json")


_LAYER_KEY = re.compile(r"^(?:model\.layers|transformer\.h)\.(\d+)\.")


def truncate_layers(hf_config, hf_sd: Mapping[str, torch.Tensor], num_layers: int):
    """Keep the first ``num_layers`` transformer layers of an HF Llama / GPT-2 model.

    The embeddings, the final norm and the LM head stay; ``model.layers.<i>.*`` /
    ``transformer.h.<i>.*`` with ``i >= num_layers`` are dropped. A shallower model from the same
    pretrained weights (e.g. a cheap reward model or critic that reads the lower layers' features).

    Returns:
        ``(config, state_dict)``: a copy of ``hf_config`` with ``num_hidden_layers`` (``n_layer``)
        set, and the filtered state dict.

    Raises:
        ValueError: ``num_layers`` < 1 or more than the model has (both numbers named).
    """
    import copy

    total = int(getattr(hf_config, "num_hidden_layers", None) or getattr(hf_config, "n_layer"))
    if not 1 <= int(num_layers) <= total:
        raise ValueError(f"num_layers={num_layers}: the model has {total} layers (keep 1..{total})")
    cfg = copy.deepcopy(hf_config)
    setattr(cfg, "num_hidden_layers" if hasattr(cfg, "num_hidden_layers") else "n_layer", int(num_layers))
    sd = {k: v for k, v in hf_sd.items()
          if not ((m := _LAYER_KEY.match(k)) and int(m.group(1)) >= int(num_layers))}
    return cfg, sd


def import_state_dict(hf_config, hf_sd: Mapping[str, torch.Tensor], out_dir: str | os.PathLike,
                      role: str = "policy", source: str = "the HF state dict",
                      num_layers: int | None = None) -> dict[str, Any]:
    """Write an HF Llama / GPT-2 state dict as a megatron checkpoint of ``role`` (the one writer
    behind :func:`import_hf`, :func:`import_hf_model` and :func:`nemo_rlhf.checkpoint.gguf.import_gguf`).

    Maps ``hf_sd`` with :func:`hf_state_dict_to_megatron`, loads it into a freshly built TP = PP = 1
    ``GPTModel`` of ``role`` (in the parameters' dtype), and writes ``<out_dir>/weights`` (a
    :func:`~nemo_rlhf.checkpoint.weights.save_model_weights` dist-checkpoint, TP/PP-reshardable) and
    ``<out_dir>/model_config.yaml`` (our ``model:`` config). For ``role`` reward / critic the scalar
    head comes from HF ``score.weight [1, H]`` (and ``score.bias`` if present, else 0); when there is
    no ``score.weight`` (a causal LM), the head keeps a fresh init (normal(0, init_method_std)
    weight drawn after ``torch.manual_seed(HEAD_INIT_SEED)`` in a forked RNG, so every import gives
    the same head; zero bias) and a warning is issued. Runs in the current
    megatron world (it must be TP = PP = 1) or creates and destroys a one-process CPU world.

    Args:
        hf_config: the HF config (``LlamaConfig`` / ``GPT2Config``).
        hf_sd: its state dict (full tensors, any float dtype).
        out_dir: output directory (created).
        role: ``policy``, ``reward`` or ``critic``.
        source: where ``hf_sd`` came from, for messages.
        num_layers: keep only the first this many transformer layers (:func:`truncate_layers`);
            None: all.

    Returns:
        the ``model:`` config written.

    Raises:
        ValueError: unknown role, unsupported HF architecture, tensors that do not fill the model,
            or ``num_layers`` outside 1..(the model's layers).
    """
    from nemo_rlhf.checkpoint.weights import save_model_weights

    if role not in ROLES:
        raise ValueError(f"role={role!r} not in {ROLES}")
    if num_layers is not None:
        hf_config, hf_sd = truncate_layers(hf_config, hf_sd, num_layers)
    out_dir = Path(out_dir)
    model_cfg = hf_config_to_model_cfg(hf_config)
    head = role in _HEAD_ROLES
    if not head:
        hf_sd = {k: v for k, v in hf_sd.items() if not k.startswith("score.")}
    elif "score.weight" not in hf_sd:
        warnings.warn(f"{source} has no score.weight: the {role} head is freshly initialised", stacklevel=3)
    sd = hf_state_dict_to_megatron(hf_sd, hf_config)
    if head and sd.get("output_layer.weight") is not None and sd["output_layer.weight"].shape[0] != 1:
        del sd["output_layer.weight"]  # an untied LM's lm_head: not part of a scalar-head model
    with _OneProcessWorld():
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left untouched
            torch.manual_seed(HEAD_INIT_SEED)  # a fresh scalar head is the same on every import
            gpt = _build(model_cfg, role)
        dtype = next(gpt.parameters()).dtype
        result = gpt.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")
                   and not (head and k.startswith("output_layer."))]
        if missing or result.unexpected_keys:
            raise ValueError(f"conversion of {source} gave missing {missing}, unexpected {result.unexpected_keys}")
        out_dir.mkdir(parents=True, exist_ok=True)
        save_model_weights(gpt, out_dir / "weights")
    _write_yaml(out_dir / MODEL_CONFIG_FILE, model_cfg)
    return model_cfg


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, role: str = "policy",
              num_layers: int | None = None) -> dict[str, Any]:
    """Convert an HF ``save_pretrained`` directory into a megatron checkpoint of ``role``.

    Writes ``<out_dir>/weights`` and ``<out_dir>/model_config.yaml`` through
    :func:`import_state_dict` (heads: see there), and copies the directory's tokenizer files
    (:data:`TOKENIZER_FILES`, those present) next to them, so that ``<out_dir>`` also serves as
    ``tokenizer.type: hf``, ``tokenizer.path: <out_dir>`` when the HF directory had a tokenizer.

    Returns:
        the ``model:`` config written.

    Raises:
        FileNotFoundError: ``hf_dir`` missing, or without config.json / safetensors (names the path).
        ValueError: unknown role or unsupported HF architecture.
    """
    if role not in ROLES:
        raise ValueError(f"role={role!r} not in {ROLES}")
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    hf_config, hf_sd = _load_hf_dir(hf_dir)
    model_cfg = import_state_dict(hf_config, hf_sd, out_dir, role, source=str(hf_dir), num_layers=num_layers)
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, out_dir / name)
    return model_cfg


def import_hf_model(model, out_dir: str | os.PathLike, role: str = "policy", tokenizer=None,
                    source: str | None = None, num_layers: int | None = None) -> dict[str, Any]:
    """Convert an in-memory ``transformers`` model (e.g. one loaded from a GGUF file) into a
    megatron checkpoint of ``role`` through :func:`import_state_dict`, and save its tokenizer.

    Args:
        model: a ``LlamaForCausalLM`` / ``GPT2LMHeadModel`` (or ``*ForSequenceClassification``);
            its ``state_dict()`` is converted in its own dtype (load it in fp32 for exact weights).
        out_dir: output directory: ``weights/``, ``model_config.yaml`` and, with ``tokenizer``,
            ``tokenizer.save_pretrained`` files (``tokenizer.json``, ``tokenizer_config.json``,
            ``chat_template.jinja``), loadable as ``tokenizer.type: hf``, ``tokenizer.path: <out_dir>``.
        role: ``policy``, ``reward`` or ``critic``.
        tokenizer: a ``transformers`` tokenizer, or None.
        source: where the model came from, for messages (default: its class name).

    Returns:
        the ``model:`` config written.

    Raises:
        ValueError: see :func:`import_state_dict`.
    """
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    model_cfg = import_state_dict(model.config, sd, out_dir, role, source=source or type(model).__name__,
                                  num_layers=num_layers)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return model_cfg


def export_hf(
    ckpt_dir: str | os.PathLike,
    model_cfg: Mapping[str, Any],
    out_dir: str | os.PathLike,
    arch: str = "llama",
    role: str | None = None,
    pad_token_id: int | None = None,
) -> Path:
    """Convert a megatron checkpoint into an HF directory (``config.json`` + ``model.safetensors``).

    Args:
        ckpt_dir: a :func:`save_model_weights` directory, or a directory holding one as ``weights``
            (as written by :func:`import_hf`).
        model_cfg: its ``model:`` config (must set ``vocab_size``).
        out_dir: output directory, loadable by ``AutoModelForCausalLM.from_pretrained`` (policy) or
            ``AutoModelForSequenceClassification`` (reward / critic: ``score.weight [1, H]``,
            ``num_labels=1``; our ``score.bias [1]`` is also stored but ignored by transformers).
        arch: ``"llama"`` or ``"gpt2"``.
        role: policy / reward / critic; None: detected from the checkpoint (a ``[1, H]``
            ``output_layer.weight`` means a scalar head).
        pad_token_id: written to ``config.json`` (needed by HF sequence classifiers for batches).

    Returns:
        ``out_dir``.

    Raises:
        CheckpointError / FileNotFoundError: missing or incomplete checkpoint (names the path).
        ValueError: a config the HF architecture cannot express.
    """
    from safetensors.torch import save_file

    from nemo_rlhf.checkpoint.weights import COMPLETE_MARKER, CheckpointError, load_model_weights
    from nemo_rlhf.models.lora import is_adapter_name, merge_lora

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist")
    if not (ckpt_dir / COMPLETE_MARKER).exists() and (ckpt_dir / "weights" / COMPLETE_MARKER).exists():
        ckpt_dir = ckpt_dir / "weights"
    if role is None:
        from megatron.core import dist_checkpointing

        if not (ckpt_dir / COMPLETE_MARKER).exists():
            raise CheckpointError(f"no complete checkpoint at {ckpt_dir} (missing {COMPLETE_MARKER} marker)")
        meta = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
        w = meta.get("output_layer.weight")
        shape = tuple(getattr(w, "global_shape", None) or w.shape) if w is not None else ()
        role = "reward" if shape[:1] == (1,) else "policy"
    cfg = model_cfg_with_defaults(model_cfg)
    hf_config = model_cfg_to_hf_config(cfg, arch, role, pad_token_id)
    with _OneProcessWorld():
        gpt = _build(cfg, role)
        load_model_weights(gpt, ckpt_dir)
        merge_lora(gpt, keep_base=False)  # model.lora: the adapters are folded into the exported weights
        sd = {k: v.detach().cpu() for k, v in gpt.state_dict().items() if v is not None and not is_adapter_name(k)}
    hf_sd = megatron_state_dict_to_hf(sd, hf_config)
    if hf_config.tie_word_embeddings:
        hf_sd.pop("lm_head.weight", None)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_config.dtype = str(next(iter(hf_sd.values())).dtype).removeprefix("torch.")
    hf_config.save_pretrained(str(out_dir))
    save_file({k: v.contiguous().clone() for k, v in hf_sd.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    return out_dir
