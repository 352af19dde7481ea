"""One builder from the Hydra ``model:`` config to a megatron-core ``GPTModel``.

Every role (SFT policy, reward model, critic, actor, reference policy) is built here, so they share
one architecture definition and one checkpoint layout. The transformer layers use megatron-core's
local (torch-only) layer spec; the norms come from :class:`nemo_rlhf.models.norms.TPAwareNorm`,
which supports sequence parallelism without apex or Transformer Engine.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from nemo_rlhf.config import ModelConfig, parse_config, to_plain
from nemo_rlhf.models.lora import init_lora_weights, lora_config, lora_layer_spec
from nemo_rlhf.models.norms import TPAwareNorm

_ACTIVATIONS = {
    # name: (activation_func, gated_linear_unit)
    "gelu": (F.gelu, False),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), False),  # GPT-2's gelu_new
    "relu": (F.relu, False),
    "squared_relu": (lambda x: torch.pow(F.relu(x), 2), False),
    "swiglu": (F.silu, True),
    "geglu": (F.gelu, True),
}
_DTYPES = {"fp32": torch.float32, "32": torch.float32, "bf16": torch.bfloat16,
           "16": torch.float16, "fp16": torch.float16}

# Defaults for every key of the ``model:`` config group this builder reads.
def model_cfg_with_defaults(model_cfg: Mapping[str, Any] | ModelConfig) -> dict[str, Any]:
    """A ``model:`` config (mapping or :class:`~nemo_rlhf.config.ModelConfig`) with every key,
    defaults from :class:`~nemo_rlhf.config.ModelConfig` (the one place they are written).

    Raises:
        ConfigError: (a ``ValueError``) an unknown key (named, with the nearest valid key), or a
            wrong type or range (naming the field).
    """
    if not isinstance(model_cfg, ModelConfig):
        model_cfg = parse_config(ModelConfig, dict(model_cfg), "model")
    return to_plain(model_cfg)


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_model_parallel_size: int) -> int:
    """Round the vocabulary up so every TP rank holds an equal, aligned slice (as Megatron-LM)."""
    multiple = divisible_by * tensor_model_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def transformer_config(model_cfg: Mapping[str, Any]):
    """Build a megatron-core ``TransformerConfig`` from a (defaults-merged) ``model:`` config.

    Raises:
        ValueError: unknown activation, normalization or params_dtype (naming the field).
    """
    from megatron.core.transformer import TransformerConfig

    cfg = model_cfg_with_defaults(model_cfg)
    if cfg["activation"] not in _ACTIVATIONS:
        raise ValueError(f"model.activation={cfg['activation']!r} not in {sorted(_ACTIVATIONS)}")
    if cfg["normalization"] not in ("LayerNorm", "RMSNorm"):
        raise ValueError(f"model.normalization={cfg['normalization']!r}: LayerNorm or RMSNorm")
    if str(cfg["params_dtype"]) not in _DTYPES:
        raise ValueError(f"model.params_dtype={cfg['params_dtype']!r} not in {sorted(_DTYPES)}")
    act, gated = _ACTIVATIONS[cfg["activation"]]
    dtype = _DTYPES[str(cfg["params_dtype"])]
    on_cpu = not torch.cuda.is_available()
    cpu_init = cfg["use_cpu_initialization"]
    if cpu_init is None:
        cpu_init = on_cpu
    return TransformerConfig(
        num_layers=cfg["num_layers"],
        hidden_size=cfg["hidden_size"],
        num_attention_heads=cfg["num_attention_heads"],
        num_query_groups=cfg["num_query_groups"],
        ffn_hidden_size=cfg["ffn_hidden_size"] or 4 * cfg["hidden_size"],
        kv_channels=cfg["kv_channels"],
        hidden_dropout=cfg["hidden_dropout"],
        attention_dropout=cfg["attention_dropout"],
        init_method_std=cfg["init_method_std"],
        layernorm_epsilon=cfg["layernorm_epsilon"],
        normalization=cfg["normalization"],
        activation_func=act,
        gated_linear_unit=gated,
        add_bias_linear=cfg["add_bias_linear"],
        add_qkv_bias=cfg["add_qkv_bias"],
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        tensor_model_parallel_size=cfg["tensor_model_parallel_size"],
        pipeline_model_parallel_size=cfg["pipeline_model_parallel_size"],
        sequence_parallel=cfg["sequence_parallel"],
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=cpu_init,
        # Recompute nothing by default; CPU runs are tiny. Exposed later if needed.
    )


def gpt_block_spec(config, vp_stage: int | None = None, lora=None):
    """Local (torch-only) transformer block spec for this pipeline stage, with TP/SP-aware norms
    (and LoRA linears when ``lora``, a :class:`~nemo_rlhf.config.LoRAConfig`, is given)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    layer_spec = get_gpt_layer_local_spec(normalization=config.normalization)
    sub = layer_spec.submodules
    sub.input_layernorm = TPAwareNorm
    sub.pre_mlp_layernorm = TPAwareNorm
    if lora is not None:
        layer_spec = lora_layer_spec(layer_spec, lora)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=TPAwareNorm)


def build_gpt_model(
    model_cfg: Mapping[str, Any],
    vocab_size: int | None = None,
    share_embeddings_and_output_weights: bool | None = None,
):
    """Build this rank's part of a megatron-core ``GPTModel`` (its TP shard and PP stage).

    Args:
        model_cfg: the ``model:`` config (keys of :class:`~nemo_rlhf.config.ModelConfig`).
        vocab_size: tokenizer vocabulary size, used when ``model.vocab_size`` is null. It is padded
            to a multiple of ``make_vocab_size_divisible_by * TP``.
        share_embeddings_and_output_weights: override of the config value (scalar-head models
            have no vocabulary projection to tie).

    Returns:
        ``GPTModel`` whose forward takes ``input_ids [B, S]`` int64, ``position_ids [B, S]`` int64,
        ``attention_mask`` (None: causal) and returns logits ``[B, S, V_padded / TP]`` on the last
        stage, or hidden states ``[S, B, H]`` on other stages.
        With ``model.lora.rank`` >= 1 its attention/MLP linears carry LoRA adapters
        (:mod:`nemo_rlhf.models.lora`; ``model.lora_config`` holds the config, else None).

    Raises:
        ValueError: no vocabulary size given, or a bad config value.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    cfg = model_cfg_with_defaults(model_cfg)
    config = transformer_config(cfg)
    lora = lora_config(cfg)  # model.lora: None when off
    vocab = cfg["vocab_size"] or vocab_size
    if not vocab:
        raise ValueError("model.vocab_size is null and no tokenizer vocabulary size was given")
    padded = padded_vocab_size(int(vocab), cfg["make_vocab_size_divisible_by"],
                               cfg["tensor_model_parallel_size"])
    tie = cfg["share_embeddings_and_output_weights"]
    if share_embeddings_and_output_weights is not None:
        tie = share_embeddings_and_output_weights
    model = GPTModel(
        config=config,
        transformer_layer_spec=gpt_block_spec(config, lora=lora),
        vocab_size=padded,
        max_sequence_length=cfg["max_position_embeddings"],
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=tie,
        position_embedding_type=cfg["position_embedding_type"],
        rotary_percent=cfg["rotary_percent"],
        rotary_base=cfg["rotary_base"],
    )
    model.unpadded_vocab_size = int(vocab)
    model.lora_config = lora
    if lora is not None:
        init_lora_weights(model)
    return model


def config_without_sequence_parallel(config):
    """A copy of a TransformerConfig with ``sequence_parallel=False`` (for layers fed gathered input)."""
    return dataclasses.replace(config, sequence_parallel=False)
