"""Where an evaluated model comes from: a converted directory, a trainer's weights, or an HF / GGUF
model converted on the way in; and the one-process megatron world the models run in.

A *source* (:class:`~nemo_rlhf.config.ModelSourceConfig`: ``policy:``, ``reference:``,
``score.reward:`` of ``conf/generate.yaml``) is one of

==============  ===========================================================================
``megatron``    a directory written by ``python -m nemo_rlhf.convert gguf-to-megatron`` /
                ``hf-to-megatron``: ``weights/`` (dist-checkpoint), ``model_config.yaml``, and
                usually the tokenizer files (``tokenizer.json``, ``tokenizer_config.json``)
``weights``     a :func:`~nemo_rlhf.checkpoint.weights.save_model_weights` directory written by a
                trainer (``<run_dir>/sft_weights``, ``rm_weights``, ``ppo_actor_weights``); its
                shape is ``model_config`` (a ``model_config.yaml``) or the caller's ``model:``
                section, its tokenizer the one in the run directory or the caller's ``tokenizer:``
``hf``          a Hugging Face ``save_pretrained`` directory (``config.json`` + safetensors),
                converted by :func:`nemo_rlhf.checkpoint.hf.import_hf`
``gguf``        a ``.gguf`` file, converted by :func:`nemo_rlhf.checkpoint.gguf.import_gguf`
==============  ===========================================================================

``format: auto`` tells them apart by their files (:func:`detect_format`). HF and GGUF sources are
converted into ``cache_dir`` (kept and reused when the source file is unchanged) or a temporary
directory deleted at exit, and then read as ``megatron``.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nemo_rlhf.checkpoint.cache import converted_model
from nemo_rlhf.checkpoint.hf import MODEL_CONFIG_FILE, read_model_config
from nemo_rlhf.checkpoint.weights import COMPLETE_MARKER, CheckpointError, load_weights
from nemo_rlhf.config import (
    ConfigError,
    ModelConfig,
    ModelSourceConfig,
    TokenizerConfig,
    parse_config,
    to_plain,
)
from nemo_rlhf.data.tokenizer import Tokenizer, load_tokenizer
from nemo_rlhf.models.builder import model_cfg_with_defaults
from nemo_rlhf.models.policy import GPTPolicyModel
from nemo_rlhf.models.reward_model import GPTRewardModel

LOG = logging.getLogger("nemo_rlhf.evaluation")

__all__ = ["ResolvedSource", "detect_format", "ensure_world", "load_policy", "load_reward_model",
           "resolve_source", "source_config"]


@dataclasses.dataclass
class ResolvedSource:
    """A source ready to load.

    Attributes:
        path: the source as given (directory or file).
        format: ``megatron``, ``weights``, ``hf`` or ``gguf`` (what ``path`` was).
        weights: the :func:`~nemo_rlhf.checkpoint.weights.save_model_weights` directory to load.
        model_cfg: the ``model:`` config (plain dict, every key) the weights were written with.
        tokenizer_cfg: the ``tokenizer:`` config of the tokenizer files found with the source, or None.
    """

    path: Path
    format: str
    weights: Path
    model_cfg: dict[str, Any]
    tokenizer_cfg: dict[str, Any] | None


def source_config(source: Any, section: str = "policy") -> ModelSourceConfig:
    """A :class:`~nemo_rlhf.config.ModelSourceConfig` from a config, a mapping or a path.

    Raises:
        ConfigError: unknown key or ``format`` (naming ``<section>.<key>``).
    """
    if isinstance(source, ModelSourceConfig):
        return source
    if isinstance(source, (str, os.PathLike)):
        source = {"path": os.fspath(source)}
    return parse_config(ModelSourceConfig, source, section)


def detect_format(path: str | os.PathLike) -> str:
    """``megatron``, ``weights``, ``hf`` or ``gguf``, from what ``path`` holds (see the module
    docstring).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is none of the four (the message lists what was looked for).
    """
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix == ".gguf":
            return "gguf"
        raise ValueError(f"{p} is a file but not a .gguf file; a model source is a converted directory "
                         f"(weights/ + {MODEL_CONFIG_FILE}), a weights directory, an HF directory or a .gguf file")
    if not p.is_dir():
        raise FileNotFoundError(f"model source {p} does not exist")
    if (p / MODEL_CONFIG_FILE).is_file() and (p / "weights").is_dir():
        return "megatron"
    if (p / COMPLETE_MARKER).exists() or (p / ".metadata").exists():
        return "weights"
    if (p / "config.json").is_file():
        return "hf"
    raise ValueError(f"cannot tell what {p} holds: no weights/ + {MODEL_CONFIG_FILE} (python -m nemo_rlhf.convert "
                     f"output), no {COMPLETE_MARKER} marker (a trainer's weights directory), no config.json "
                     f"(Hugging Face directory)")


def _tokenizer_files(d: Path) -> dict[str, Any] | None:
    """The ``tokenizer:`` config of the tokenizer files in directory ``d``, or None."""
    if (d / "tokenizer.json").is_file():
        if (d / "tokenizer_config.json").is_file():
            return {"type": "hf", "path": str(d)}
        return {"type": "tokenizer_json", "path": str(d / "tokenizer.json")}
    return None


_TEMP_DIRS: list[str] = []


def _remove_temp_dirs() -> None:
    for d in _TEMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)


def _convert(src: Path, fmt: str, role: str, cache_dir: str | None) -> Path:
    """Convert an HF directory / GGUF file into a ``megatron`` directory: into ``cache_dir`` (found
    there when the source is unchanged: :func:`nemo_rlhf.checkpoint.cache.converted_model`), or
    with ``cache_dir`` None into a temporary directory removed at exit."""
    if cache_dir is None:
        if not _TEMP_DIRS:
            atexit.register(_remove_temp_dirs)
        cache_dir = tempfile.mkdtemp(prefix=f"nemo_rlhf_{fmt}_{role}_")
        _TEMP_DIRS.append(cache_dir)
    LOG.info("%s: converted (%s, role %s) in %s", src, fmt, role, cache_dir)
    return converted_model(str(src), role, cache_dir=cache_dir)


def resolve_source(source: Any, *, role: str = "policy", section: str = "policy",
                   model: ModelConfig | Mapping[str, Any] | None = None) -> ResolvedSource:
    """Find (or make, for HF / GGUF) the weights, ``model:`` config and tokenizer files of a source.

    Args:
        source: a :class:`~nemo_rlhf.config.ModelSourceConfig`, a mapping of its keys, or a path.
        role: ``policy`` or ``reward`` (an HF / GGUF source is converted with this role).
        section: the source's config section, for messages (``policy``, ``reference``, ``score.reward``).
        model: the ``model:`` section for a ``weights`` source without ``model_config``.

    Raises:
        ConfigError: no ``path``; a ``weights`` source with neither ``model_config`` nor ``model``.
        FileNotFoundError / ValueError: see :func:`detect_format`; a ``format`` that does not fit
            the files; a bad ``model_config.yaml``; a failed conversion.
    """
    cfg = source_config(source, section)
    if not cfg.path:
        raise ConfigError(f"{section}.path is not set")
    path = Path(cfg.path).expanduser()
    found = detect_format(path)
    fmt = found if cfg.format == "auto" else cfg.format
    if fmt != found:
        raise ValueError(f"{section}.format={fmt} but {path} looks like a {found} source "
                         f"(set {section}.format=auto or {found})")
    if fmt in ("hf", "gguf"):
        converted = _convert(path, fmt, role, cfg.cache_dir)
        inner = resolve_source(dataclasses.replace(cfg, path=str(converted), format="megatron", cache_dir=None),
                               role=role, section=section, model=model)
        return dataclasses.replace(inner, path=path, format=fmt)
    if fmt == "megatron":
        yaml = Path(cfg.model_config).expanduser() if cfg.model_config else path / MODEL_CONFIG_FILE
        model_cfg = read_model_config(yaml)
        return ResolvedSource(path, fmt, path / "weights", model_cfg_with_defaults(model_cfg), _tokenizer_files(path))
    if cfg.model_config:
        model_cfg = read_model_config(Path(cfg.model_config).expanduser())
    elif model is not None:
        model_cfg = to_plain(model) if isinstance(model, ModelConfig) else dict(model)
    else:
        raise ConfigError(f"{section}.path={path} is a weights directory without a model config: give its shape "
                          f"({section}.model_config=<model_config.yaml> or the model: section it was trained with)")
    tok = _tokenizer_files(path) or _tokenizer_files(path.parent)
    return ResolvedSource(path, fmt, path, model_cfg_with_defaults(model_cfg), tok)


def _check_one_process(model_cfg: Mapping[str, Any], section: str) -> None:
    tp, pp = int(model_cfg["tensor_model_parallel_size"]), int(model_cfg["pipeline_model_parallel_size"])
    if tp != 1 or pp != 1:
        raise ConfigError(f"generate runs in one process: {section} asks for model.tensor_model_parallel_size={tp}, "
                          f"model.pipeline_model_parallel_size={pp}; set both to 1 (the weights load into any layout)")


def ensure_world(accelerator: str = "cpu", seed: int = 1234) -> bool:
    """The one-process megatron world the models run in: created (TP = PP = 1) when there is no
    process group, else the existing one is checked.

    Returns:
        True when this call created it (the caller may tear it down with
        :func:`nemo_rlhf.parallel.state.destroy_distributed`).

    Raises:
        ConfigError: an existing world with more than one process, or TP / PP > 1.
    """
    from megatron.core import parallel_state

    from nemo_rlhf.parallel.state import initialize_distributed

    created = not torch.distributed.is_initialized()
    if created or not parallel_state.model_parallel_is_initialized():
        initialize_distributed(1, 1, accelerator, seed=seed)
    world = torch.distributed.get_world_size()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if world != 1 or tp != 1 or pp != 1:
        raise ConfigError(f"generate runs in one process, but this one is in a world of {world} processes "
                          f"(TP {tp}, PP {pp}); run it alone (python launchers/generate.py ..., not under torchrun)")
    return created


def _load_into(module, resolved: ResolvedSource, section: str) -> None:
    try:
        load_weights(module, resolved.weights)
    except (CheckpointError, RuntimeError, ValueError) as exc:
        shape = {k: resolved.model_cfg[k] for k in ("num_layers", "hidden_size", "num_attention_heads",
                                                     "ffn_hidden_size", "vocab_size")}
        hint = "" if resolved.format != "weights" else (
            f"; a weights directory is read with the model: section (or {section}.model_config): it must be the "
            f"shape the weights were trained with")
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"  # not the whole traceback text
        raise CheckpointError(f"{section}: cannot load {resolved.weights} into a model of {shape}: {detail}{hint}") \
            from exc


def load_policy(source: Any, *, model: ModelConfig | Mapping[str, Any] | None = None,
                tokenizer: TokenizerConfig | Mapping[str, Any] | Tokenizer | None = None,
                micro_batch_size: int = 16, accelerator: str = "cpu", seed: int = 1234,
                section: str = "policy") -> tuple[GPTPolicyModel, Tokenizer]:
    """A frozen :class:`~nemo_rlhf.models.policy.GPTPolicyModel` (no optimizer) with a source's
    weights, and its tokenizer.

    Creates the one-process megatron world if there is none (:func:`ensure_world`).

    Args:
        source: see :func:`resolve_source` (a path, a mapping or a ``ModelSourceConfig``).
        model: ``model:`` section for a ``weights`` source without ``model_config``.
        tokenizer: a :class:`~nemo_rlhf.data.tokenizer.Tokenizer`, or its ``tokenizer:`` config (a
            config of ``type: train_bpe`` -- the default section -- means "the source's own files"),
            or None: the tokenizer files found with the source.
        micro_batch_size: rows per forward of ``logprobs``.
        accelerator, seed: of the world created here.
        section: the source's config section, for messages.

    Returns:
        ``(policy, tokenizer)``; the policy's eos / pad ids are the tokenizer's.

    Raises:
        ConfigError: no tokenizer found or given; a model layout with TP / PP > 1; see
            :func:`resolve_source`, :func:`ensure_world`.
        CheckpointError: the weights do not load (missing, incomplete, or another shape: the
            message names the shape tried).
        ValueError: the tokenizer has more ids than the model's vocabulary.
    """
    resolved = resolve_source(source, role="policy", section=section, model=model)
    if isinstance(tokenizer, Tokenizer):  # e.g. the policy's, for a reference policy
        _check_same_vocab(resolved, tokenizer, section)
    tok = resolve_tokenizer(tokenizer, resolved, section)
    return _build_policy(resolved, tok, micro_batch_size, accelerator, seed, section), tok


def resolve_tokenizer(tokenizer: Any, resolved: ResolvedSource, section: str) -> Tokenizer:
    """The tokenizer to use with ``resolved`` (see :func:`load_policy`)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    cfg = None
    if tokenizer is not None:
        plain = to_plain(tokenizer) if isinstance(tokenizer, TokenizerConfig) else dict(tokenizer)
        if plain.get("type", "train_bpe") != "train_bpe":
            cfg = plain
    if cfg is None:
        cfg = resolved.tokenizer_cfg
        if cfg is None:
            raise ConfigError(f"{section}.path={resolved.path} has no tokenizer files (tokenizer.json) in it or its "
                              f"parent directory: set tokenizer.type=tokenizer_json tokenizer.path=<tokenizer.json> "
                              f"(or tokenizer.type=hf tokenizer.path=<directory>)")
        LOG.info("%s: tokenizer %s (%s)", section, cfg["path"], cfg["type"])
    return load_tokenizer(cfg)


def _check_vocab(resolved: ResolvedSource, tok: Tokenizer, section: str) -> None:
    model_vocab = resolved.model_cfg.get("vocab_size")
    if model_vocab is not None and tok.vocab_size > int(model_vocab):
        raise ValueError(f"{section}: the tokenizer has {tok.vocab_size} ids but the model's vocabulary is "
                         f"{model_vocab}: they do not belong together")


def _check_same_vocab(resolved: ResolvedSource, tokenizer: Tokenizer, section: str) -> None:
    """A source that comes with its own tokenizer files must share ``tokenizer``'s vocabulary."""
    if resolved.tokenizer_cfg is None:
        return
    own = load_tokenizer(resolved.tokenizer_cfg)
    if own.backend.get_vocab() != tokenizer.backend.get_vocab():
        raise ValueError(f"{section}: {resolved.path} comes with a tokenizer ({resolved.tokenizer_cfg['path']}) whose "
                         f"vocabulary differs from the policy's: it would read the policy's token ids as other words")


def _build_policy(resolved: ResolvedSource, tok: Tokenizer, micro_batch_size: int, accelerator: str,
                  seed: int, section: str) -> GPTPolicyModel:
    _check_one_process(resolved.model_cfg, section)
    _check_vocab(resolved, tok, section)
    ensure_world(accelerator, seed)
    policy = GPTPolicyModel(resolved.model_cfg, None, tok.vocab_size, micro_batch_size, tok.eos_id, tok.pad_id)
    _load_into(policy, resolved, section)
    LOG.info("%s: %s (%s) loaded", section, resolved.path, resolved.format)
    return policy


def load_reward_model(source: Any, tokenizer: Tokenizer, *, model: ModelConfig | Mapping[str, Any] | None = None,
                      micro_batch_size: int = 16, accelerator: str = "cpu", seed: int = 1234,
                      section: str = "score.reward") -> GPTRewardModel:
    """A frozen :class:`~nemo_rlhf.models.reward_model.GPTRewardModel` with a source's weights
    (an HF / GGUF source is converted with role ``reward``), for scoring token ids of ``tokenizer``
    (the policy's).

    Raises:
        ConfigError / CheckpointError / ValueError: as :func:`load_policy`; also when the source's
            own tokenizer files hold a vocabulary different from ``tokenizer``'s.
    """
    resolved = resolve_source(source, role="reward", section=section, model=model)
    _check_one_process(resolved.model_cfg, section)
    _check_vocab(resolved, tok=tokenizer, section=section)
    _check_same_vocab(resolved, tokenizer, section)
    ensure_world(accelerator, seed)
    rm = GPTRewardModel(resolved.model_cfg, None, tokenizer.vocab_size, micro_batch_size)
    _load_into(rm, resolved, section)
    LOG.info("%s: %s (%s) loaded", section, resolved.path, resolved.format)
    return rm
