"""An in-process stand-in for :class:`~nemo_rlhf.servers.client.CriticClient` (same methods).

For single-process runs that colocate the critic with the actor (unit tests, laptops): calls go
straight to a :class:`~nemo_rlhf.servers.protocol.CriticBackend`, synchronously, in the caller's
thread (megatron's parallel state is process-global, so the critic must not run concurrently with
the actor in another thread of the same process). The futures it returns are already resolved.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import numpy as np


class LocalCriticClient:
    """Client-compatible wrapper of a backend: ``infer``, ``infer_async``, ``train``, ``save``,
    ``load``, ``status``. Nothing can be lost between caller and backend, so there are no retries,
    ``request_id`` is accepted and ignored, and the instance is always ``"local"``."""

    # In-process: every rank of the actor's model-parallel group calls it (the critic's own TP/PP
    # collectives need them all), synchronously — megatron's globals forbid running it in a
    # background thread next to the actor.
    in_process = True

    def __init__(self, backend: Any):
        self.backend = backend
        self.train_steps = 0

    def infer(self, tokens: np.ndarray, lengths: np.ndarray):
        return self.backend.infer(tokens, lengths)

    def infer_async(self, tokens: np.ndarray, lengths: np.ndarray) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(self.backend.infer(tokens, lengths))
        except Exception as exc:  # noqa: BLE001 - delivered through the future
            fut.set_exception(exc)
        return fut

    def train(self, tokens, returns, prev_values, mask, request_id: str | None = None) -> dict:
        metrics = self.backend.train(tokens, returns, prev_values, mask)
        self.train_steps += 1
        return metrics

    def status(self) -> dict:
        return {"instance": "local", "train_steps": self.train_steps}

    def save(self, path: str) -> None:
        self.backend.save(path)

    def load(self, path: str) -> dict:
        return dict(self.backend.load(path))

    def wait_until_ready(self, timeout_s: float | None = None) -> None:
        return None

    def close(self) -> None:
        return None
