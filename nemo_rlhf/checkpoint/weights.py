"""Model-weight checkpoints with megatron-core ``dist_checkpointing`` (torch_dist format).

A checkpoint written under one TP/PP layout loads under any other (megatron reshards).
Writes are atomic: every rank writes into ``<path>.tmp``; after a barrier rank 0 renames it to
``<path>`` and writes ``<path>/COMPLETE``. A directory without ``COMPLETE`` is never loaded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from nemo_rlhf.checkpoint.signals import save_sharded

COMPLETE_MARKER = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or unreadable (the message names the path)."""


def barrier() -> None:
    """``torch.distributed.barrier()`` when a process group exists (a no-op in one process)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def global_rank() -> int:
    """This process's global rank (0 without a process group)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def begin_atomic_dir(final: Path) -> Path:
    """Collective: rank 0 (re)creates an empty ``<final>.tmp``; every rank returns it after a barrier."""
    tmp = final.with_name(final.name + ".tmp")
    if global_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    return tmp


def commit_atomic_dir(tmp: Path, final: Path) -> None:
    """Rank 0 only: write the ``COMPLETE`` marker into ``tmp`` and swap it in for ``final`` (an
    existing ``final`` is renamed to ``<final>.old`` first and deleted after), so a reader finds
    the previous complete directory or the new one, never a partial one."""
    (tmp / COMPLETE_MARKER).write_text("ok\n")
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_model_weights(gpt, path: str | os.PathLike) -> Path:
    """Save a megatron ``GPTModel``'s weights (all TP/PP shards, collectively) to ``path``.

    Must be called on every rank. An existing checkpoint at ``path`` is replaced atomically.
    With LoRA on, the adapter tensors (``*.lora_a``, ``*.lora_b``) are saved with the base weights.

    Raises:
        CheckpointError: the model's LoRA adapters are merged (:func:`save_merged_weights` exports
            a merged model).
    """

    from nemo_rlhf.models.lora import is_merged

    path = Path(path)
    if is_merged(gpt):  # the base weights hold the adapters: saving both would apply them twice
        raise CheckpointError(f"cannot save {path}: the LoRA adapters are merged into the base weights; unmerge "
                              f"them (nemo_rlhf.models.lora.unmerge_lora) or use save_merged_weights for export")
    tmp = begin_atomic_dir(path)
    save_sharded(gpt.sharded_state_dict(), tmp)
    barrier()
    if global_rank() == 0:
        commit_atomic_dir(tmp, path)
    barrier()
    return path


def load_model_weights(gpt, path: str | os.PathLike, skip_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Load weights saved by :func:`save_model_weights` into ``gpt`` (any TP/PP layout).

    Args:
        gpt: the megatron ``GPTModel`` of this rank.
        path: checkpoint directory.
        skip_prefixes: parameter-name prefixes that are not loaded and keep their current
            (freshly initialised) values, e.g. ``("output_layer.",)`` when a reward model or
            critic starts from an SFT checkpoint (its head replaces the vocabulary projection).

    Returns:
        names of the parameters that were skipped (with LoRA on and a checkpoint without adapters,
        e.g. the SFT weights LoRA starts from: the adapters, which keep their fresh values).

    Raises:
        CheckpointError: the directory is missing or incomplete, or lacks required weights (some
            but not all adapters included); it holds LoRA adapters and the model has none; the
            model's adapters are merged.
    """
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException as TorchCheckpointException

    path = Path(path)
    if not (path / COMPLETE_MARKER).exists():
        raise CheckpointError(f"no complete checkpoint at {path} (missing {COMPLETE_MARKER} marker)")
    try:
        available = set(dist_checkpointing.load_tensors_metadata(str(path)).keys())
    except Exception as exc:  # noqa: BLE001 - re-raised with the path
        raise CheckpointError(f"cannot read checkpoint metadata at {path}: {exc}") from exc
    from nemo_rlhf.models.lora import is_adapter_name, is_merged

    if is_merged(gpt):
        raise CheckpointError(f"cannot load {path} into a model whose LoRA adapters are merged: unmerge them first")
    sharded = gpt.sharded_state_dict()
    missing = []
    saved_adapters = sorted(k for k in available if is_adapter_name(k))
    if saved_adapters and not any(is_adapter_name(k) for k in sharded):
        raise CheckpointError(
            f"checkpoint {path} holds LoRA adapters ({saved_adapters[0]!r}, ...) but this model has none: set "
            f"model.lora as the run that wrote it did (see its model_config / lora_config), or export a merged "
            f"model with save_merged_weights")
    for name in list(sharded.keys()):
        item = sharded[name]
        key = getattr(item, "key", name)
        if any(name.startswith(p) for p in skip_prefixes) or (is_adapter_name(name) and not saved_adapters):
            # (a base checkpoint without adapters: LoRA starts from its fresh adapters, B = 0)
            missing.append(name)
            del sharded[name]
            continue
        if key in available:
            continue
        if name.endswith("_extra_state"):
            del sharded[name]
            continue
        raise CheckpointError(f"checkpoint {path} has no tensor {key!r} (parameter {name!r})")
    try:
        state = dist_checkpointing.load(sharded, str(path))
    except (Exception, TorchCheckpointException) as exc:  # noqa: BLE001 - torch's is a BaseException
        raise CheckpointError(f"failed to load checkpoint {path}: {exc}") from exc
    result = gpt.load_state_dict(state, strict=False)
    unexpected = [k for k in result.missing_keys
                  if not k.endswith("_extra_state") and k not in missing
                  and not any(k.startswith(p) for p in skip_prefixes)]
    if unexpected:
        raise CheckpointError(f"checkpoint {path} did not provide {unexpected}")
    return missing


def load_weights(module, path: str | os.PathLike, skip_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Load a :func:`save_model_weights` checkpoint into a model role (policy, reward model,
    critic: anything with ``gpt`` and ``optimizer``) and refresh the optimizer's fp32 main copies
    (with bf16/fp16 parameters the megatron optimizer would otherwise write its stale copies back
    at the first step).

    Returns:
        the skipped parameter names (see :func:`load_model_weights`).

    Raises:
        CheckpointError: as :func:`load_model_weights`.
    """
    skipped = load_model_weights(module.gpt, path, skip_prefixes=skip_prefixes)
    if module.optimizer is not None:
        module.optimizer.reload_model_params()
    return skipped


# ----------------------------------------------------------------------------- LoRA adapters
def save_adapters(gpt, path: str | os.PathLike) -> Path:
    """Save only the LoRA adapters of ``gpt`` (every TP/PP shard, collectively) and its LoRA config.

    ``path`` becomes a dist-checkpoint of the ``*.lora_a`` / ``*.lora_b`` tensors (kilobytes to
    megabytes instead of the whole model) plus ``lora_config.json`` (``model.lora``); it loads
    under any TP/PP layout with :func:`load_adapters`. Replaced atomically, as
    :func:`save_model_weights`. Must be called on every rank.

    Raises:
        CheckpointError: the model has no LoRA adapters, or they are merged.
    """
    import json


    from nemo_rlhf.models.lora import CONFIG_FILE, adapter_sharded_state_dict, is_merged, lora_config_dict

    path = Path(path)
    config = lora_config_dict(gpt)
    if config is None:
        raise CheckpointError(f"cannot save adapters to {path}: the model has no LoRA adapters (model.lora.rank=0)")
    if is_merged(gpt):
        raise CheckpointError(f"cannot save adapters to {path}: they are merged into the base weights; unmerge first")
    tmp = begin_atomic_dir(path)
    save_sharded(adapter_sharded_state_dict(gpt), tmp)
    barrier()
    if global_rank() == 0:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
        commit_atomic_dir(tmp, path)
    barrier()
    return path


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The ``model.lora`` config saved with adapters at ``path`` (``lora_config.json``).

    Raises:
        CheckpointError: no complete adapter checkpoint at ``path``.
    """
    import json

    from nemo_rlhf.models.lora import CONFIG_FILE

    path = Path(path)
    if not (path / COMPLETE_MARKER).exists() or not (path / CONFIG_FILE).exists():
        raise CheckpointError(f"no complete LoRA adapter checkpoint at {path} (needs {COMPLETE_MARKER} and "
                              f"{CONFIG_FILE}; written by save_adapters)")
    return json.loads((path / CONFIG_FILE).read_text())


def load_adapters(module, path: str | os.PathLike) -> None:
    """Load adapters saved by :func:`save_adapters` into a model with the same LoRA shape (any
    TP/PP layout); the base weights are untouched. ``module``: a role (its optimizer's fp32 main
    copies are refreshed, as :func:`load_weights`) or a megatron ``GPTModel``.

    Raises:
        CheckpointError: no adapter checkpoint at ``path``; the model has no LoRA, its adapters are
            merged, or ``model.lora.rank`` / ``alpha`` / ``target_modules`` differ from the saved
            ones (each named with both values).
    """
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException as TorchCheckpointException

    from nemo_rlhf.models.lora import adapter_sharded_state_dict, is_adapter_name, is_merged, lora_config_dict

    path = Path(path)
    gpt = getattr(module, "gpt", module)
    saved = read_adapter_config(path)
    ours = lora_config_dict(gpt)
    if ours is None:
        raise CheckpointError(f"adapters at {path} (rank {saved.get('rank')}) need a model built with model.lora "
                              f"(this one has model.lora.rank=0): set model.lora as in {path}/lora_config.json")
    for key in ("rank", "alpha", "target_modules"):
        if saved.get(key) != ours[key]:
            raise CheckpointError(f"adapters at {path} were saved with model.lora.{key}={saved.get(key)!r}, this model "
                                  f"has model.lora.{key}={ours[key]!r}: build the model with the saved value")
    if is_merged(gpt):
        raise CheckpointError(f"cannot load adapters from {path}: this model's adapters are merged; unmerge first")
    try:
        state = dist_checkpointing.load(adapter_sharded_state_dict(gpt), str(path))
    except (Exception, TorchCheckpointException) as exc:  # noqa: BLE001 - torch's is a BaseException
        raise CheckpointError(f"failed to load adapters from {path}: {exc}") from exc
    result = gpt.load_state_dict(state, strict=False)
    absent = [k for k in result.missing_keys if is_adapter_name(k)]
    if absent:
        raise CheckpointError(f"adapter checkpoint {path} did not provide {absent}")
    if getattr(module, "optimizer", None) is not None:
        module.optimizer.reload_model_params()


def save_merged_weights(gpt, path: str | os.PathLike) -> Path:
    """Export ``gpt`` with its LoRA adapters merged into the base weights, as a plain weights
    checkpoint (no adapter tensors): it loads into a model without LoRA (``model.lora.rank=0``)
    and converts like any other (``python -m nemo_rlhf.convert megatron-to-hf`` / ``-to-nemo``).
    The model itself is unmerged again (bitwise) on return. Collective; without LoRA the same as
    :func:`save_model_weights`.
    """

    from nemo_rlhf.models.lora import is_adapter_name, merged_lora

    path = Path(path)
    with merged_lora(gpt):
        sharded = {k: v for k, v in gpt.sharded_state_dict().items() if not is_adapter_name(k)}
        tmp = begin_atomic_dir(path)
        save_sharded(sharded, tmp)
    barrier()
    if global_rank() == 0:
        commit_atomic_dir(tmp, path)
    barrier()
    return path
