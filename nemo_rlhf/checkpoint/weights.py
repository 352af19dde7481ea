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
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    tmp = begin_atomic_dir(path)
    dist_checkpointing.save(gpt.sharded_state_dict(), str(tmp))
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
        names of the parameters that were skipped.

    Raises:
        CheckpointError: the directory is missing or incomplete, or lacks required weights.
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
    sharded = gpt.sharded_state_dict()
    missing = []
    for name in list(sharded.keys()):
        item = sharded[name]
        key = getattr(item, "key", name)
        if any(name.startswith(p) for p in skip_prefixes):
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
