"""Client of the PyTriton critic server (:mod:`nemo_rlhf.servers.critic_server`).

Each call opens a PyTriton ``ModelClient`` (HTTP) in the thread that makes it and closes it
afterwards, so calls from several threads never share a connection (the tritonclient/gevent
connection objects are not thread-safe). The Triton model configs are fetched once, while
waiting for readiness (bounded by ``init_timeout_s``), and reused, so a call after that is one
HTTP request bounded by its inference/training timeout.

Errors:
    * no connection, connection lost, or no answer in time -> :class:`CriticServerUnavailable`
      (names URL, model, timeout and cause);
    * an error reply (e.g. a request that failed the server's validation) ->
      :class:`CriticServerError` carrying the server's message.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from nemo_rlhf.servers.critic_server import ERROR_MARKER
from nemo_rlhf.servers.protocol import (
    INFER_MODEL,
    LOAD_MODEL,
    SAVE_MODEL,
    TRAIN_MODEL,
    CriticServerError,
    CriticServerUnavailable,
)

_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): .*$", re.MULTILINE)


def _server_message(text: str) -> str:
    """The useful part of a PyTriton error reply (which may be a whole server-side traceback)."""
    if ERROR_MARKER in text:
        return text.split(ERROR_MARKER + ": ", 1)[-1].splitlines()[0]
    lines = [m.group(0) for m in _EXCEPTION_LINE.finditer(text)]
    if "Traceback" in text and lines:
        return lines[-1]  # the exception raised in the server's inference callable
    return text.replace("Error occurred during inference request. Message: ", "")


def _is_unavailable(exc: BaseException) -> bool:
    """True for errors meaning 'server not reachable / not answering in time'."""
    from pytriton.client.exceptions import (
        PyTritonClientModelUnavailableError,
        PyTritonClientTimeoutError,
    )

    if isinstance(exc, (PyTritonClientTimeoutError, PyTritonClientModelUnavailableError, OSError)):
        return True  # OSError covers ConnectionError, socket.timeout/TimeoutError
    # geventhttpclient / gevent raise their own types for broken connections.
    return type(exc).__module__.split(".")[0] in {"gevent", "geventhttpclient", "grpc"}


class CriticClient:
    """Talk to a running :class:`~nemo_rlhf.servers.critic_server.CriticServer` over HTTP.

    Args:
        host: server address, e.g. ``"127.0.0.1"``.
        port: the server's HTTP port.
        infer_timeout_s: limit (seconds) on one ``critic_infer`` request.
        train_timeout_s: limit (seconds) on one ``critic_train`` or ``critic_save`` request.
        init_timeout_s: limit (seconds) on waiting for the server and a model to be ready the
            first time that model is used.
        max_workers: threads serving :meth:`infer_async` (concurrent in-flight requests).

    Example::

        with CriticClient("127.0.0.1", 8000) as critic:
            future = critic.infer_async(tokens, lengths)  # server works ...
            logprobs = actor.logprobs(tokens)              # ... while the actor does too
            values, rewards = future.result()
    """

    def __init__(
        self,
        host: str,
        port: int,
        infer_timeout_s: float = 60.0,
        train_timeout_s: float = 600.0,
        init_timeout_s: float = 30.0,
        max_workers: int = 4,
    ):
        self.url = f"http://{host}:{port}"
        self.infer_timeout_s = float(infer_timeout_s)
        self.train_timeout_s = float(train_timeout_s)
        self.init_timeout_s = float(init_timeout_s)
        self._configs: dict[str, Any] = {}
        self._configs_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="critic-client")
        self._closed = False

    # ---- plumbing ----

    def _model_config(self, model: str, timeout_s: float) -> Any:
        """Wait until ``model`` is ready (at most ``timeout_s``) and return its Triton config (cached)."""
        with self._configs_lock:
            if model in self._configs:
                return self._configs[model]
        from pytriton.client import ModelClient

        try:
            with ModelClient(self.url, model, init_timeout_s=timeout_s, inference_timeout_s=timeout_s) as client:
                client.wait_for_model(timeout_s)
                config = client.model_config
        except Exception as e:
            if _is_unavailable(e) or "timed out" in str(e):
                raise CriticServerUnavailable(self.url, model, timeout_s, f"{type(e).__name__}: {e}") from e
            raise
        with self._configs_lock:
            self._configs[model] = config
        return config

    def _call(
        self, model: str, timeout_s: float, batched: bool, inputs: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        if self._closed:
            raise CriticServerError(f"CriticClient for {self.url} is closed")
        from pytriton.client import ModelClient
        from pytriton.client.exceptions import PyTritonClientInferenceServerError

        for name, array in inputs.items():
            if np.asarray(array).size == 0:
                # PyTriton's stub cannot serialize zero-size tensors ("memoryview: cannot cast view
                # with zeros in shape"), so the server's reply would not name the input.
                raise ValueError(
                    f"input {name!r} of {model!r} is empty (shape {np.shape(array)}); expected B >= 1, S >= 1"
                )
        config = self._model_config(model, self.init_timeout_s)
        client = ModelClient(
            self.url,
            model,
            init_timeout_s=self.init_timeout_s,
            inference_timeout_s=timeout_s,
            model_config=config,
            ensure_model_is_ready=False,
        )
        try:
            if batched:
                return client.infer_batch(**inputs)
            return client.infer_sample(**inputs)
        except PyTritonClientInferenceServerError as e:
            raise CriticServerError(
                f"critic server {self.url} (model {model!r}) rejected the request: {_server_message(e.message)}"
            ) from e
        except Exception as e:
            if _is_unavailable(e):
                raise CriticServerUnavailable(self.url, model, timeout_s, f"{type(e).__name__}: {e}") from e
            raise
        finally:
            client.close()

    # ---- public API ----

    def wait_until_ready(self, timeout_s: float | None = None) -> None:
        """Block until the server and all three models are ready.

        Args:
            timeout_s: total limit in seconds (default ``init_timeout_s``).

        Raises:
            CriticServerUnavailable: if not ready in time.
        """
        timeout_s = self.init_timeout_s if timeout_s is None else float(timeout_s)
        deadline = time.monotonic() + timeout_s
        for model in (INFER_MODEL, TRAIN_MODEL, SAVE_MODEL, LOAD_MODEL):
            self._model_config(model, max(0.1, deadline - time.monotonic()))

    def infer(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Critic values and rewards for a batch (blocking).

        Args:
            tokens: ``[B, S]`` int64 token ids.
            lengths: ``[B]`` int64 valid lengths, ``1 <= lengths[b] <= S``.

        Returns:
            ``(values [B, S] float32, rewards [B] float32)``.

        Raises:
            ValueError: an input is empty (``B = 0`` or ``S = 0``), checked before sending.
            CriticServerError: the server rejected the request (message says why).
            CriticServerUnavailable: no answer within ``infer_timeout_s`` (or ``init_timeout_s``
                while waiting for readiness).
        """
        lengths = np.asarray(lengths)
        outputs = self._call(
            INFER_MODEL,
            self.infer_timeout_s,
            batched=True,
            inputs={"tokens": tokens, "sequence_lengths": lengths[:, None] if lengths.ndim == 1 else lengths},
        )
        return outputs["values"], outputs["rewards"].reshape(-1)

    def infer_async(self, tokens: np.ndarray, lengths: np.ndarray) -> Future:
        """Like :meth:`infer` but returns at once.

        Returns:
            ``Future`` whose ``result()`` is ``(values [B, S] float32, rewards [B] float32)`` or
            raises what :meth:`infer` raises.
        """
        if self._closed:
            raise CriticServerError(f"CriticClient for {self.url} is closed")
        return self._pool.submit(self.infer, tokens, lengths)

    def train(
        self, tokens: np.ndarray, returns: np.ndarray, prev_values: np.ndarray, mask: np.ndarray
    ) -> dict[str, float]:
        """One critic optimizer step on the server (blocking; one call = one step).

        Args:
            tokens: ``[B, S]`` int64.
            returns: ``[B, S]`` float32 GAE returns.
            prev_values: ``[B, S]`` float32 rollout-time values.
            mask: ``[B, S]`` float32 loss mask.

        Returns:
            The backend's metrics, including ``"loss"``.

        Raises:
            CriticServerError / CriticServerUnavailable: as for :meth:`infer`, with
                ``train_timeout_s``.
        """
        outputs = self._call(
            TRAIN_MODEL,
            self.train_timeout_s,
            batched=False,
            inputs={"tokens": tokens, "returns": returns, "prev_values": prev_values, "mask": mask},
        )
        return json.loads(outputs["metrics"][0])

    def save(self, path: str) -> None:
        """Ask the server to write a critic checkpoint to ``path`` (a path on the server's machine).

        Raises:
            CriticServerError / CriticServerUnavailable: as for :meth:`train`.
        """
        outputs = self._call(
            SAVE_MODEL,
            self.train_timeout_s,
            batched=False,
            inputs={"path": np.array([str(path).encode("utf-8")], dtype=np.object_)},
        )
        if not bool(outputs["ok"][0]):
            raise CriticServerError(f"critic server {self.url} could not save to {path!r}")

    def load(self, path: str) -> dict[str, float]:
        """Ask the server to restore the critic from a :meth:`save` checkpoint at ``path``.

        Returns:
            the critic's state, at least ``{"step": n}`` (critic optimizer steps taken).

        Raises:
            CriticServerError: no complete checkpoint at ``path`` (the message names it).
            CriticServerUnavailable: as for :meth:`train`.
        """
        outputs = self._call(
            LOAD_MODEL,
            self.train_timeout_s,
            batched=False,
            inputs={"path": np.array([str(path).encode("utf-8")], dtype=np.object_)},
        )
        return json.loads(outputs["state"][0])

    def close(self) -> None:
        """Wait for in-flight :meth:`infer_async` calls, then release the worker threads (idempotent)."""
        self._closed = True
        self._pool.shutdown(wait=True)

    def __enter__(self) -> CriticClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
