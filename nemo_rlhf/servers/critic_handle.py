"""The trainer's one handle on the critic/reward model, remote or in-process.

It owns the three decisions every call needs:

* which rank calls: a remote server (:class:`~nemo_rlhf.servers.client.CriticClient`) is called
  by the first rank of each model-parallel (TP x PP) group, which broadcasts the answer to its
  group; an in-process critic (:class:`~nemo_rlhf.servers.local.LocalCriticClient`) is called by
  every rank, synchronously (its own TP/PP collectives need them all, and megatron's globals
  forbid running it in a thread next to the actor). Saving and loading the critic is one request
  from global rank 0 (remote) or collective (in-process);
* overlap: ``critic_infer`` is a future the trainer collects after its own forwards;
  ``critic_train`` requests run in a background thread while the actor trains;
* failures: a :class:`~nemo_rlhf.servers.protocol.CriticServerError` seen by the calling rank is
  raised on every rank together (one all-reduce), so no rank is left waiting in a collective.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable

import numpy as np
import torch

from nemo_rlhf.parallel.state import any_rank, comm_device
from nemo_rlhf.servers.protocol import CriticServerError


def is_server_caller() -> bool:
    """True on the rank of each TP x PP group that talks to a remote critic server."""
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_pipeline_model_parallel_rank() == 0)


def broadcast_model_parallel(tensor: torch.Tensor) -> torch.Tensor:
    """Broadcast ``tensor`` from the server-calling rank to its TP x PP group (same shape and
    dtype on every rank; returned on ``tensor``'s device)."""
    from megatron.core import parallel_state

    group = parallel_state.get_model_parallel_group()
    size = torch.distributed.get_world_size(group) if torch.distributed.is_initialized() else 1
    if size <= 1:
        return tensor
    buf = tensor.to(comm_device()).contiguous()
    torch.distributed.broadcast(buf, src=torch.distributed.get_global_rank(group, 0), group=group)
    return buf.to(tensor.device)


def raise_if_any_rank_failed(error: BaseException | None, what: str) -> None:
    """Make a failure seen by one rank an error on every rank (one all-reduce over the world).

    Raises:
        ``error`` on the rank that had it; :class:`CriticServerError` naming ``what`` elsewhere.
    """
    failed = any_rank(error is not None)
    if error is not None:
        raise error
    if failed:
        raise CriticServerError(f"{what} failed on another rank (its log names the server and the cause); "
                                f"all ranks stop together")


class CriticHandle:
    """What a trainer calls on the critic and reward model.

    Args:
        client: a ``CriticClient`` (remote; may be None on ranks that do not call the server) or a
            ``LocalCriticClient`` (``in_process = True``).
    """

    def __init__(self, client: Any):
        self.client = client
        self.in_process = bool(getattr(client, "in_process", False))
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="critic-train")

    def _calls(self) -> bool:
        return self.in_process or is_server_caller()

    def _raise_together(self, error: BaseException | None, what: str) -> None:
        if self.in_process:
            if error is not None:
                raise error
            return
        raise_if_any_rank_failed(error, what)

    # -------------------------------------------------------------- rollouts
    def infer_async(self, tokens: torch.Tensor, lengths: torch.Tensor) -> concurrent.futures.Future | None:
        """Start ``critic_infer`` on ``tokens [B, L]`` int64, ``lengths [B]``; collect it with
        :meth:`infer_result` (every rank must)."""
        if self._calls():
            return self.client.infer_async(tokens.cpu().numpy(), lengths.cpu().numpy())
        return None

    def infer_result(self, future, shape: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Wait for :meth:`infer_async`'s answer: ``values [B, L]`` float32 (critic values in the
        server's layout) and ``scores [B]`` float32 (reward-model scores), on every rank.

        Raises:
            CriticServerError (or a subclass): on every rank when the call failed on any.
        """
        b, length = shape
        error = values_np = scores_np = None
        if future is not None:
            try:
                values_np, scores_np = future.result()
            except CriticServerError as exc:
                error = exc
        self._raise_together(error, "critic_infer")
        if future is not None:
            values = torch.from_numpy(np.array(values_np, dtype=np.float32, copy=True)).to(device)
            scores = torch.from_numpy(np.array(scores_np, dtype=np.float32, copy=True)).reshape(b).to(device)
        else:
            values = torch.empty(b, length, dtype=torch.float32, device=device)
            scores = torch.empty(b, dtype=torch.float32, device=device)
        if self.in_process:
            return values, scores
        return broadcast_model_parallel(values), broadcast_model_parallel(scores)

    # -------------------------------------------------------------- training
    def train_async(self, tokens: torch.Tensor, returns: torch.Tensor, values: torch.Tensor,
                    mask: torch.Tensor) -> concurrent.futures.Future | None:
        """Send one ``critic_train`` step: ``tokens [b, L]`` int64, ``returns [b, L-1]``,
        ``values [b, L]`` (the rollout's, for value clipping), ``mask [b, L-1]``; the ``[b, L-1]``
        inputs are padded to the server's ``[b, L]`` layout. Remote: runs in a background thread
        (overlapping the actor's update); in-process: runs now. Collect with :meth:`train_results`."""
        if not self._calls():
            return None
        pad = torch.zeros(returns.shape[0], 1, device=returns.device)
        args = (tokens.cpu().numpy(), torch.cat([returns, pad], dim=1).cpu().numpy(), values.cpu().numpy(),
                torch.cat([mask, pad], dim=1).cpu().numpy())
        if not self.in_process:
            return self._pool.submit(self.client.train, *args)
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result(self.client.train(*args))
        return done

    def train_results(self, futures: list) -> list[float]:
        """Wait for every :meth:`train_async` future; returns the critic losses (empty on ranks
        that do not call the server).

        Raises:
            CriticServerError (or a subclass): on every rank when a step failed on any.
        """
        losses, error = [], None
        for f in futures:
            if f is None:
                continue
            try:
                losses.append(f.result()["loss"])
            except CriticServerError as exc:
                error = error or exc
        self._raise_together(error, "critic_train")
        return losses

    # -------------------------------------------------------------- checkpoints
    def _on_owner(self, what: str, call: Callable[[], Any]) -> Any:
        result, error = None, None
        if self.in_process or torch.distributed.get_rank() == 0:
            try:
                result = call()
            except CriticServerError as exc:
                error = exc
        self._raise_together(error, what)
        return result

    def save(self, path: str) -> None:
        """The critic's full training checkpoint at ``path`` (absolute, visible to the server);
        collective over the trainer's ranks."""
        self._on_owner("critic_save", lambda: self.client.save(path))

    def load(self, path: str) -> dict[str, float] | None:
        """Restore the critic from a :meth:`save` checkpoint; returns ``{"step": ...}`` on the
        rank that asked (None elsewhere). Collective."""
        return self._on_owner("critic_load", lambda: self.client.load(path))

    def close(self) -> None:
        """Wait for background requests and stop the thread."""
        self._pool.shutdown(wait=True)
