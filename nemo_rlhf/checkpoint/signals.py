"""Checkpoint saves that survive a signal to the whole job step (``scancel``, SLURM preemption).

Every save of this package (training checkpoints, weights, adapters, ``.nemo`` staging) goes through
:func:`save_sharded`, which runs ``dist_checkpointing.save`` inside :func:`preemption_signals_deferred`;
see docs/reliability.md, "Preemption".
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

# The signals that ask a run to checkpoint and stop (SLURM preemption and ``scancel``: SIGTERM;
# ``#SBATCH --signal=B:USR1@300``: SIGUSR1).
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")


@contextlib.contextmanager
def preemption_signals_deferred() -> Iterator[None]:
    """Block SIGTERM and SIGUSR1 in the calling thread for the ``with`` body, then restore the mask.

    ``scancel`` and SLURM preemption signal every process of the job step, not only the launcher.
    megatron-core's checkpoint writer starts helper processes inside ``dist_checkpointing.save`` (a
    ``multiprocessing`` manager for its results queue, which lives on, and the writer workers); a
    child inherits the blocked mask (across ``fork`` and ``exec``), so a group SIGTERM stays pending
    in the helpers instead of killing them, and the launcher's preemption save
    (:class:`~nemo_rlhf.checkpoint.training_state.Preemption`) still has its writer. The launcher's
    own signal is delivered when the mask is restored (or to another of its threads), so no
    preemption request is lost. Helpers end with their parent's
    shutdown, or by SIGKILL (SLURM's end of the grace period).

    ``multiprocessing``'s resource tracker is started first: when a ``spawn`` start launches it,
    CPython unblocks SIGTERM in the caller afterwards (``resource_tracker.ensure_running``), which
    would let the very helper being started inherit an unblocked SIGTERM.
    """
    import signal
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {getattr(signal, name) for name in PREEMPTION_SIGNALS})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def save_sharded(sharded_state_dict: dict[str, Any], path: str | Path, **kwargs: Any) -> None:
    """``megatron.core.dist_checkpointing.save(sharded_state_dict, path, **kwargs)`` inside
    :func:`preemption_signals_deferred`; collective over all ranks like the call it wraps."""
    from megatron.core import dist_checkpointing

    with preemption_signals_deferred():
        dist_checkpointing.save(sharded_state_dict, str(path), **kwargs)
