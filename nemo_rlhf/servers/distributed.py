"""A critic server that spans several processes (TP x PP): rank 0 serves, the others follow.

PyTriton runs in global rank 0 only. Every request it receives is first broadcast to all ranks of
the server's world as a command (operation + numpy arrays), then every rank runs the same backend
call collectively (the critic's TP/PP collectives need every rank), and rank 0 returns the result.
Followers block in :func:`follow` until rank 0 sends ``stop`` (when its server shuts down).

The command channel is its own gloo group with a long timeout, so followers can wait for requests
for days without the default collective timeout killing them.
"""

from __future__ import annotations

import datetime
import logging
import threading
from typing import Any

import numpy as np
import torch

LOG = logging.getLogger("nemo_rlhf.servers")
_IDLE_TIMEOUT = datetime.timedelta(days=30)


def command_group():
    """A gloo process group over the whole world for server commands (long timeout)."""
    return torch.distributed.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)


def _exchange(group, command: Any = None) -> Any:
    obj = [command]
    torch.distributed.broadcast_object_list(obj, src=0, group=group)
    return obj[0]


class LeaderBackend:
    """Rank 0's view of a multi-process backend: same methods as the backend, each one broadcast
    to the followers before it runs here. Thread-safe (the server calls it from its threads).

    ``critic_train`` request ids are handled by :class:`~nemo_rlhf.servers.critic_server.CriticServer`
    before it calls :meth:`train`: a repeated id is answered from the server's cache and never
    reaches this class, so the followers never see it either and every rank takes exactly the
    same optimizer steps. ``critic_status`` does not touch the backend (nothing is broadcast)."""

    def __init__(self, backend, group):
        self.backend = backend
        self.group = group
        self.max_seq_len = backend.max_seq_len
        self.vocab_size = backend.vocab_size
        self._lock = threading.Lock()

    def _run(self, op: str, *arrays: np.ndarray):
        with self._lock:
            _exchange(self.group, (op, [np.ascontiguousarray(a) for a in arrays]))
            return getattr(self.backend, op)(*arrays)

    def infer(self, tokens: np.ndarray, lengths: np.ndarray):
        return self._run("infer", tokens, lengths)

    def train(self, tokens, returns, prev_values, mask) -> dict:
        return self._run("train", tokens, returns, prev_values, mask)

    def save(self, path: str) -> None:
        with self._lock:
            _exchange(self.group, ("save", [path]))
            self.backend.save(path)

    def load(self, path: str) -> dict:
        with self._lock:
            _exchange(self.group, ("load", [path]))
            return self.backend.load(path)

    def stop_followers(self) -> None:
        """Release the followers (call once, when the server has stopped)."""
        with self._lock:
            _exchange(self.group, ("stop", []))


def follow(backend, group) -> None:
    """Follower loop of ranks > 0: run every command rank 0 broadcasts until ``stop``.

    A backend error is logged and the loop continues: rank 0 hits the same error in the same
    collective call and reports it to the client.
    """
    while True:
        op, args = _exchange(group)
        if op == "stop":
            return
        try:
            getattr(backend, op)(*args)
        except Exception:  # noqa: BLE001 - rank 0 reports it to the client
            LOG.exception("critic server follower: %s failed", op)
