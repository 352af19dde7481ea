"""Training checkpoints for exact resume: weights, optimizer, LR schedule, RNG, data position.

Layout of one checkpoint ``<root>/step_<k>`` (k = optimizer steps taken, 8 digits):

- megatron ``dist_checkpointing`` (torch_dist) of ``{"model": ..., "optimizer": ...}`` — sharded,
  reshardable across TP/PP;
- ``rng_rank<r>.pt``: every RNG of global rank r (torch CPU, CUDA, megatron's TP tracker, Python,
  NumPy), loaded with ``weights_only=True`` (plain tensors and ints only);
- ``state.json``: step, LR-scheduler state, consumed samples and whatever the trainer adds (KL
  controller, PPO step);
- ``COMPLETE``: written last, after every rank has finished. A directory without it (a run killed
  mid-save) is never resumed from; checkpoints are written into ``step_<k>.tmp`` and renamed.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from nemo_rlhf.checkpoint.signals import PREEMPTION_SIGNALS, save_sharded
from nemo_rlhf.checkpoint.weights import (
    COMPLETE_MARKER,
    CheckpointError,
    barrier,
    global_rank,
    begin_atomic_dir,
    commit_atomic_dir,
)
from nemo_rlhf.parallel.state import any_rank, comm_device

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def rng_state() -> dict[str, Any]:
    """All RNG states of this process as tensors/ints (safe for ``torch.load(weights_only=True)``)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": (py[0], torch.tensor(py[1], dtype=torch.int64), py[2]),
        "numpy": (torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])),
        "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in internal.tolist()), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (incomplete and ``.tmp`` ones ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / COMPLETE_MARKER).exists()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _torch_adam_distributed_optimizers(optimizer) -> list:
    """The megatron ``DistributedOptimizer`` parts of ``optimizer`` (a ``ChainedOptimizer`` or a
    single one) that step a ``torch.optim.Adam``/``AdamW``: megatron's fallback without Apex or
    Transformer Engine (always on CPU, and on GPU machines without them)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in parts if isinstance(o, DistributedOptimizer) and isinstance(o.optimizer, torch.optim.Adam)]


def _init_adam_state(adam: torch.optim.Adam) -> None:
    """Create the per-parameter state of a torch Adam/AdamW that has not stepped yet, exactly as
    its first ``step()`` would (``step`` 0, zero moments); parameters with state are left alone.

    The distributed optimizer's ``sharded_state_dict(is_loading=True)`` reads the common step from
    that state (``assert len(steps) == 1`` on a fresh optimizer). Creating it changes nothing: every
    value is overwritten by the checkpoint, and a first step would create the same values."""
    for group in adam.param_groups:
        on_param_device = bool(group.get("capturable") or group.get("fused"))
        for p in group["params"]:
            state = adam.state[p]
            if state:
                continue
            state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if on_param_device
                             else torch.tensor(0.0, dtype=torch.float32))
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _load_optimizer(optimizer, state_dict: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state_dict)``, working around megatron 0.16.1's distributed
    optimizer with a torch Adam (no Apex/TE; not CPU-specific, hence here and not in cpu_compat):

    - the ``fully_reshardable`` parameter state carries no per-parameter ``step`` (it is in the
      param groups), yet ``_set_main_param_and_optimizer_states`` copies every key of the torch
      state, ``step`` included (``KeyError: 'step'``): the parameter state is loaded separately,
      with ``step`` set aside;
    - ``load_state_dict`` gives every parameter the SAME ``step`` tensor, which torch's
      single-tensor Adam then increments once per parameter: each gets its own copy back
      (without it a resumed DP=2 run's next loss was off by 1.9e-3;
      ``tests/parallel/test_checkpoint_reshard.py`` checks resume is bitwise exact).
    """
    parts = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    subs = [state_dict] if len(parts) == 1 else [state_dict[k] for k in sorted(state_dict)]
    fix = set(map(id, _torch_adam_distributed_optimizers(optimizer)))
    deferred = []
    for part, sub in zip(parts, subs):
        if id(part) in fix and sub.get("param_state_sharding_type") == "fully_reshardable":
            deferred.append((part, sub.pop("param_state")))
            del sub["param_state_sharding_type"]
    optimizer.load_state_dict(state_dict)  # param groups, LR, step (shared), grad scaler
    for part, param_state in deferred:
        state = part.optimizer.state
        steps = {p: s.pop("step") for p, s in state.items() if "step" in s}
        try:
            part.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            for p, step in steps.items():
                state[p]["step"] = step.clone()


def _uses_distributed_optimizer(module) -> bool | None:
    """``optim.distributed_optimizer`` of ``module`` (None without an optimizer)."""
    if module.optimizer is None:
        return None
    return bool(getattr(module, "optim_cfg", {}).get("distributed_optimizer", False))


def _sharded(module, is_loading: bool) -> dict[str, Any]:
    model_sd = module.gpt.sharded_state_dict()
    out = {"model": model_sd}
    if module.optimizer is not None:
        # Loading needs the state (see _init_adam_state); so does saving before the first step
        # (a preemption during the initial evaluation). Either way the values are a fresh Adam's.
        for part in _torch_adam_distributed_optimizers(module.optimizer):
            _init_adam_state(part.optimizer)
        out["optimizer"] = module.optimizer.sharded_state_dict(_optimizer_model_sd(module, model_sd),
                                                               is_loading=is_loading, metadata=_OPTIM_METADATA)
        if not is_loading:
            _share_common_step(module.optimizer, out["optimizer"])
    return out


def _share_common_step(optimizer, optimizer_sd: dict[str, Any]) -> None:
    """Give every rank's (non-distributed) optimizer state the same ``common_step``; collective.

    megatron's optimizer saves Adam's step, shared by all parameters, as ``state['common_step']``,
    a common (non-sharded) value that dist_checkpointing writes from global rank 0 only. A rank that
    holds no trainable parameter has no step: with ``model.num_layers_unfrozen`` under PP the
    first stage may be all frozen, and its checkpoint had no step at all, so resuming it in any
    layout failed in torch's ``Adam.__setstate__`` (``KeyError: 'step'``). The step (the largest
    over ranks and chained optimizers: they step together) is written into every rank's dict."""
    parts = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    subs = [optimizer_sd] if len(parts) == 1 else [optimizer_sd[k] for k in sorted(optimizer_sd)]
    plain = [sub for sub in subs if isinstance(sub.get("state"), dict)]  # distributed: step in param groups
    steps = [float(sub["state"]["common_step"]) for sub in plain if "common_step" in sub["state"]]
    step = torch.tensor(max(steps, default=0.0), dtype=torch.float64, device=comm_device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(step, op=torch.distributed.ReduceOp.MAX)
    if float(step) > 0:
        for sub in plain:
            sub["state"]["common_step"] = torch.tensor(float(step), dtype=torch.float32)


def _optimizer_model_sd(module, model_sd: dict[str, Any]) -> dict[str, Any]:
    """The model's sharded state dict that keys the optimizer state: ``model_sd`` itself, or — when
    some parameters are frozen (``model.num_layers_unfrozen``) — one keyed per layer
    (``non_homogeneous_layers``). megatron stacks a tensor of every layer into one sharded tensor
    ``[num_layers, ...]``; the optimizer state of frozen layers does not exist, so its rows would
    be written by no rank, which dist_checkpointing refuses ("Invalid access pattern"). Per-layer
    keys use global layer numbers, so the state still reshards across PP layouts."""
    if all(p.requires_grad for p in module.gpt.parameters()):
        return model_sd
    return module.gpt.sharded_state_dict(metadata={"non_homogeneous_layers": True})


def save_checkpoint_dir(final: str | Path, module, extra: dict[str, Any] | None = None,
                        before_complete: Callable[[Path], None] | None = None) -> Path:
    """Write a complete training checkpoint of ``module`` at ``final``; collective over all ranks.

    Written into ``<final>.tmp`` and renamed to ``final`` after the ``COMPLETE`` marker, so a
    reader never sees a half-written ``final``; an existing ``final`` is replaced.

    Args:
        final: the checkpoint directory to create.
        module: the model/optimizer owner (``gpt``, ``optimizer``, ``lr_scheduler``,
            ``completed_steps``).
        extra: JSON-serialisable trainer state (consumed samples, KL controller, PPO step, ...).
        before_complete: called on every rank with the temporary directory after the shards are
            written and before the marker (PPO: the critic server saves into ``<tmp>/critic``);
            an exception leaves the checkpoint incomplete, so it is never resumed from.

    Returns:
        ``final``.
    """

    final = Path(final)
    tmp = begin_atomic_dir(final)
    save_sharded(_sharded(module, is_loading=False), tmp, validate_access_integrity=True)
    torch.save(rng_state(), tmp / f"rng_rank{global_rank()}.pt")
    barrier()
    if before_complete is not None:
        before_complete(tmp)
        barrier()
    if global_rank() == 0:
        state = {"step": module.completed_steps,
                 "distributed_optimizer": _uses_distributed_optimizer(module),
                 "lr_scheduler": module.lr_scheduler.state_dict() if module.lr_scheduler else None,
                 "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
                 **(extra or {})}
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        commit_atomic_dir(tmp, final)
    barrier()
    return final


def save_training_checkpoint(root: str | Path, module, extra: dict[str, Any] | None = None,
                             keep_last: int = 2,
                             before_complete: Callable[[Path], None] | None = None) -> Path:
    """Save ``module`` at ``<root>/step_<k>`` (k = ``module.completed_steps``) with
    :func:`save_checkpoint_dir`, then delete all but the newest ``keep_last`` complete checkpoints.
    Collective over all ranks.

    Returns:
        the checkpoint directory.
    """
    root = Path(root)
    final = save_checkpoint_dir(root / f"step_{module.completed_steps:08d}", module, extra, before_complete)
    if global_rank() == 0:
        for old in complete_checkpoints(root)[:-max(int(keep_last), 1)]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_training_checkpoint(path: str | Path, module) -> dict[str, Any]:
    """Restore weights, optimizer, LR schedule, step counter and RNG of ``module`` from ``path``.

    The checkpoint may come from another TP/PP layout (weights and optimizer reshard); RNG states
    are restored only when the world size is unchanged.

    Returns:
        the trainer state of ``state.json`` (with ``step``).

    Raises:
        CheckpointError: incomplete or unreadable checkpoint (the message names the path).
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not (path / COMPLETE_MARKER).exists():
        raise CheckpointError(f"no complete checkpoint at {path} (missing {COMPLETE_MARKER} marker)")
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path / 'state.json'}: {exc}") from exc
    saved_dist, ours = state.get("distributed_optimizer"), _uses_distributed_optimizer(module)
    if saved_dist is not None and ours is not None and saved_dist != ours:
        # megatron's two optimizers store different parameter groups (KeyError 'pre_wd_mult').
        raise CheckpointError(
            f"checkpoint {path} was saved with optim.distributed_optimizer={str(saved_dist).lower()} but this run "
            f"has optim.distributed_optimizer={str(ours).lower()}: set it back to resume (any DP/TP/PP layout "
            f"works), or start a new run from the weights with init_from={path} checkpoint.resume=false")
    try:
        loaded = dist_checkpointing.load(_sharded(module, is_loading=True), str(path))
    except BaseException as exc:  # torch's CheckpointException derives from BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise CheckpointError(f"failed to load checkpoint {path}: {exc}") from exc
    module.gpt.load_state_dict(loaded["model"], strict=False)
    if module.optimizer is not None and "optimizer" in loaded:
        try:
            _load_optimizer(module.optimizer, loaded["optimizer"])
        except (KeyError, ValueError, RuntimeError, AssertionError) as exc:
            raise CheckpointError(f"optimizer state in {path} does not fit this run's optimizer "
                                  f"({type(exc).__name__}: {exc})") from exc
    if module.lr_scheduler is not None and state.get("lr_scheduler"):
        module.lr_scheduler.load_state_dict(state["lr_scheduler"])
    module.completed_steps = int(state["step"])
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rng_file = path / f"rng_rank{global_rank()}.pt"
    if state.get("world_size") == world and rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state


class Preemption:
    """Turns SIGTERM / SIGUSR1 (SLURM preemption, ``scancel``) into a flag the training loop polls,
    so the run checkpoints at the next step boundary and exits cleanly instead of dying mid-step."""

    SIGNALS = PREEMPTION_SIGNALS

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> "Preemption":
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        import signal

        self.requested = signal.Signals(signum).name

    def uninstall(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agreed(self) -> bool:
        """True on every rank if any rank was signalled (one all-reduce)."""
        return any_rank(self.requested is not None)


def make_checkpoint_callback(root: str | Path, every_n_steps: int, keep_last: int, extra_fn, preemption: Preemption,
                             before_complete: Callable[[Path], None] | None = None):
    """A Lightning callback: checkpoint every ``every_n_steps`` optimizer steps (0: never), at the
    last step, and when preemption was requested (then stop the Trainer). Periodic and final
    checkpoints are not written after a step skipped for non-finite values."""
    import logging

    import lightning.pytorch as pl

    log = logging.getLogger("nemo_rlhf.checkpoint")

    class TrainingCheckpoint(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            step = module.completed_steps
            preempted = preemption.agreed()
            # No periodic/final checkpoint in the middle of a non-finite streak (the step was
            # skipped): the newest checkpoint stays the last one that followed a real update.
            suspect = getattr(module, "nonfinite_in_a_row", 0) > 0
            periodic = every_n_steps > 0 and step % every_n_steps == 0 and not suspect
            last = module.max_train_steps is not None and step >= module.max_train_steps and not suspect
            if preempted or periodic or last:
                path = save_training_checkpoint(root, module, extra_fn(), keep_last=keep_last,
                                                before_complete=before_complete)
                log.info("saved checkpoint %s%s", path, f" (preempted by {preemption.requested})" if preempted else "")
            if preempted:
                module.preempted = True
                trainer.should_stop = True

    return TrainingCheckpoint()
