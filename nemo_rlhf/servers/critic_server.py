"""PyTriton server that exposes a :class:`~nemo_rlhf.servers.protocol.CriticBackend`.

Five Triton models are bound (names in :mod:`nemo_rlhf.servers.protocol`):

``critic_infer`` (batching on, dynamic batcher)
    per-sample inputs ``tokens`` ``(-1,)`` int64 and ``sequence_lengths`` ``(1,)`` int64, so a
    batched request is ``tokens [B, S]`` and ``sequence_lengths [B, 1]``; outputs ``values``
    ``[B, S]`` float32 and ``rewards`` ``[B, 1]`` float32. Concurrent requests are merged by
    Triton's dynamic batcher (up to ``max_batch_size`` rows, waiting at most
    ``max_queue_delay_us``); Triton only merges requests whose per-sample shapes are equal, so
    a merged batch has one ``S`` (observed: concurrent ``[1, 8]`` requests merge, ``[1, 8]`` and
    ``[1, 16]`` do not). Validation runs on the merged batch, so an invalid request fails the
    valid requests merged with it too (PyTriton has no per-request error reply).
``critic_train`` (batching off)
    inputs ``tokens`` ``[B, S]`` int64, ``returns``/``prev_values``/``mask`` ``[B, S]`` float32,
    and the optional ``request_id`` ``[1]`` bytes (1 to 128 bytes of UTF-8, a uuid4 from
    :class:`~nemo_rlhf.servers.client.CriticClient`); outputs ``loss`` ``[1]`` float32 and
    ``metrics`` ``[1]`` bytes (JSON of the backend's metrics dict plus ``"instance"``, the server's
    instance id as a string). Requests are idempotent by ``request_id``: the server remembers the
    ids of the last :data:`TRAIN_DEDUP_SIZE` applied requests with their metrics, and a request
    whose id was already applied gets the remembered metrics without another optimizer step (a
    retry whose first attempt's reply was lost is thus never applied twice); a retry that arrives
    while the first attempt is still training waits for it and gets its metrics. Batching is
    disabled for this model (``ModelConfig(batching=False)``: ``max_batch_size: 0`` and no
    dynamic batcher in the Triton config), so Triton never merges two training requests; the
    callable also loops over the requests it is handed, so one request is always at most one
    ``backend.train`` call (one optimizer step).
``critic_save`` (batching off)
    input ``path`` ``[1]`` bytes (UTF-8); output ``ok`` ``[1]`` bool. Writes a full training
    checkpoint of the critic (weights, optimizer, LR schedule, step, RNG) at ``path``.
``critic_load`` (batching off)
    input ``path`` ``[1]`` bytes (UTF-8); output ``state`` ``[1]`` bytes (JSON, at least
    ``{"step": n}``). Restores a ``critic_save`` checkpoint: the PPO actor calls it on resume with
    the critic checkpoint paired with its own, so both continue from the same step.
``critic_status`` (batching off)
    input ``ping`` ``[1]`` int64 (ignored); output ``status`` ``[1]`` bytes: JSON
    ``{"instance": <uuid4 drawn when this server object was created>, "train_steps": <backend
    train calls by this server>, "train_duplicates": <train requests answered from the
    request-id cache>}``. Never touches the backend (no lock), so it answers during a long
    training step. A client that sees the instance change knows the server was restarted and
    that the critic state it trained since its last checkpoint is gone.

Every request is validated before the backend sees it. Triton itself rejects a wrong dtype, a
wrong rank and (for ``critic_infer``) ``B > max_batch_size`` with an error reply naming the
input; PyTriton's stub cannot carry zero-size tensors (the client refuses empty batches before
sending). Everything else (rows of ``sequence_lengths`` vs ``B``, lengths outside ``[1, S]``,
``S > backend.max_seq_len``, shapes that disagree between training inputs, ``B >
max_batch_size`` for training, NaN/Inf) raises ``ValueError`` inside the inference callable.
PyTriton 0.7 turns an exception raised there into an error reply carrying the traceback text
(``pytriton/proxy/inference.py``, ``_handle_requests``): any exception except
``PyTritonUnrecoverableError`` is sent back with the ERROR flag and the server keeps serving;
``PyTritonUnrecoverableError`` would shut Triton down, so it is never raised here. Validation
never calls the backend, so a rejected training request changes nothing (``train_steps`` is
unchanged). The client recovers the message from the marker ``CRITIC_REQUEST_ERROR`` (see
:func:`request_error`). Exceptions raised by the backend itself become error replies the same way.
``critic_train``'s ``request_id`` (1 to 128 bytes of UTF-8) and the ``path`` of
``critic_save``/``critic_load`` (non-empty UTF-8, no NUL) are checked the same way; Triton checks
the dtype and shape of ``critic_status``'s (otherwise ignored) ``ping``.

Backend calls are serialized with one lock: the backend is one model, so an inference must not
run during an optimizer step.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sysconfig
import threading
import uuid
from collections import OrderedDict
from typing import Any, MutableMapping

import numpy as np

from nemo_rlhf.servers.protocol import (
    INFER_MODEL,
    LOAD_MODEL,
    SAVE_MODEL,
    STATUS_MODEL,
    TRAIN_MODEL,
    CriticBackend,
    CriticServerError,
)

LOGGER = logging.getLogger(__name__)

# Prefix of every validation error message sent back to the client; the client extracts the text
# after it from PyTriton's traceback reply.
ERROR_MARKER = "CRITIC_REQUEST_ERROR"

# How many applied critic_train request ids (with their metrics) the server remembers.
TRAIN_DEDUP_SIZE = 64
# Longest accepted critic_train request id (bytes).
MAX_REQUEST_ID_BYTES = 128


def triton_env_fix(env: MutableMapping[str, str] | None = None) -> str:
    """Prefix ``LD_LIBRARY_PATH`` with the running interpreter's libpython directory.

    PyTriton's python-backend stub otherwise links the system libpython (a different patch
    release than this interpreter) and model loading fails with ``AttributeError: '_thread.RLock'
    object has no attribute '_recursion_count'`` (measured, see
    ``/work/shared/notes/pytriton-and-nemo.md``). PyTriton starts ``tritonserver`` with a copy
    of ``os.environ`` taken when the server starts (``TritonServer._get_env``), so setting it in
    this process before :meth:`CriticServer.start` is enough (verified by the server tests).
    Idempotent.

    Args:
        env: environment to modify in place (e.g. a subprocess env); default ``os.environ``.

    Returns:
        The new value of ``LD_LIBRARY_PATH``.
    """
    env = os.environ if env is None else env
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
    if libdir and (not parts or parts[0] != libdir):
        parts.insert(0, libdir)
    env["LD_LIBRARY_PATH"] = ":".join(parts)
    return env["LD_LIBRARY_PATH"]


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def request_error(message: str) -> ValueError:
    """A ``ValueError`` whose text the client can find in PyTriton's error reply."""
    return ValueError(f"{ERROR_MARKER}: {message}")


def _check_array(name: str, array: Any, dtype: type, ndim: int) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise request_error(f"input '{name}' must be a numpy array, got {type(array).__name__}")
    if array.dtype != dtype:
        raise request_error(f"input '{name}' must have dtype {np.dtype(dtype).name}, got {array.dtype}")
    if array.ndim != ndim:
        raise request_error(f"input '{name}' must have rank {ndim}, got shape {tuple(array.shape)}")
    return array


def _check_tokens(tokens: Any, max_seq_len: int, max_batch_size: int) -> tuple[int, int]:
    tokens = _check_array("tokens", tokens, np.int64, 2)
    batch_size, seq_len = tokens.shape
    if batch_size < 1:
        raise request_error("input 'tokens' has an empty batch (B = 0); expected B >= 1")
    if batch_size > max_batch_size:
        raise request_error(f"input 'tokens' has batch size B = {batch_size}; expected B <= {max_batch_size}")
    if seq_len < 1 or seq_len > max_seq_len:
        raise request_error(f"input 'tokens' has sequence length S = {seq_len}; expected 1 <= S <= {max_seq_len}")
    return batch_size, seq_len


def validate_infer_request(tokens: Any, lengths: Any, max_seq_len: int, max_batch_size: int) -> None:
    """Check an inference request before it reaches the backend.

    Args:
        tokens: ``[B, S]`` int64.
        lengths: ``[B]`` int64 with ``1 <= lengths[b] <= S``.
        max_seq_len: the backend's largest ``S``.
        max_batch_size: the largest ``B``.

    Raises:
        ValueError: naming the input and what was expected (message starts with
            ``CRITIC_REQUEST_ERROR``).
    """
    batch_size, seq_len = _check_tokens(tokens, max_seq_len, max_batch_size)
    lengths = _check_array("sequence_lengths", lengths, np.int64, 1)
    if lengths.shape[0] != batch_size:
        raise request_error(
            f"input 'sequence_lengths' has {lengths.shape[0]} rows but 'tokens' has B = {batch_size}; expected equal"
        )
    bad = np.flatnonzero((lengths < 1) | (lengths > seq_len))
    if bad.size:
        row = int(bad[0])
        raise request_error(
            f"input 'sequence_lengths' row {row} is {int(lengths[row])}; expected 1 <= length <= S = {seq_len}"
        )


def validate_train_request(
    tokens: Any, returns: Any, prev_values: Any, mask: Any, max_seq_len: int, max_batch_size: int
) -> None:
    """Check a training request before it reaches the backend.

    Args:
        tokens: ``[B, S]`` int64.
        returns, prev_values, mask: ``[B, S]`` float32, all finite.
        max_seq_len: the backend's largest ``S``.
        max_batch_size: the largest ``B``.

    Raises:
        ValueError: naming the input and what was expected (message starts with
            ``CRITIC_REQUEST_ERROR``).
    """
    _check_tokens(tokens, max_seq_len, max_batch_size)
    for name, array in (("returns", returns), ("prev_values", prev_values), ("mask", mask)):
        array = _check_array(name, array, np.float32, 2)
        if array.shape != tokens.shape:
            raise request_error(
                f"input '{name}' has shape {tuple(array.shape)}; expected the shape of 'tokens' {tuple(tokens.shape)}"
            )
        if not np.isfinite(array).all():
            row, col = (int(i) for i in np.argwhere(~np.isfinite(array))[0])
            raise request_error(f"input '{name}' has a non-finite value {array[row, col]} at [{row}, {col}]")


def validate_request_id(request_id: Any) -> str:
    """Check the optional ``request_id`` input of ``critic_train`` and return it as text.

    Raises:
        ValueError: not one non-empty UTF-8 byte string of at most ``MAX_REQUEST_ID_BYTES`` bytes
            (message starts with ``CRITIC_REQUEST_ERROR``).
    """
    if not isinstance(request_id, np.ndarray) or request_id.shape != (1,) or not isinstance(request_id[0], bytes):
        raise request_error(f"input 'request_id' must be one UTF-8 encoded string of shape (1,), got {request_id!r}")
    raw = request_id[0]
    if not 1 <= len(raw) <= MAX_REQUEST_ID_BYTES:
        raise request_error(
            f"input 'request_id' has {len(raw)} bytes; expected 1 to {MAX_REQUEST_ID_BYTES} (e.g. a uuid4)"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise request_error(f"input 'request_id' is not valid UTF-8: {e}") from None


def _path_input(request: dict, what: str) -> str:
    path = request["path"]
    if not isinstance(path, np.ndarray) or path.shape != (1,) or not isinstance(path[0], bytes):
        raise request_error(f"input 'path' must be one UTF-8 encoded string of shape (1,), got {path!r}")
    try:
        text = path[0].decode("utf-8")
    except UnicodeDecodeError as e:
        raise request_error(f"input 'path' is not valid UTF-8: {e}") from None
    if not text:
        raise request_error(f"input 'path' is empty; expected {what}")
    if "\x00" in text:
        raise request_error("input 'path' contains a NUL character")
    return text


class CriticServer:
    """Serve a :class:`CriticBackend` over PyTriton (HTTP and gRPC on ``host``).

    Use ``run()`` to serve until interrupted (blocking), or ``start()``/``stop()`` (or ``with
    CriticServer(...) as server:``) to serve from background threads of this process.

    PyTriton has no authentication and no TLS: anyone who can reach the ports can run, train and
    save the critic. Keep the default loopback ``host`` for local runs; on a cluster bind the
    node's private address and keep the ports inside the cluster network (docs/cluster.md).

    Args:
        backend: the critic model; ``backend.max_seq_len`` bounds ``S``.
        host: address the HTTP/gRPC/metrics endpoints bind to.
        http_port, grpc_port, metrics_port: TCP ports (Triton defaults 8000/8001/8002).
        max_batch_size: largest number of rows ``B`` in one ``critic_infer``/``critic_train``
            call (Triton rejects larger inference requests itself).
        max_queue_delay_us: how long (microseconds) Triton's dynamic batcher may hold an
            inference request to merge it with others.
        log_verbose: Triton's verbose log level (0 = off).

    Attributes:
        instance: uuid4 string drawn when this object is created; reported by ``critic_status``
            and in every ``critic_train`` reply so that clients detect a restarted server.
        train_steps: backend ``train`` calls made by this server (optimizer steps).
        train_duplicates: ``critic_train`` requests answered from the request-id cache.

    Raises:
        ValueError: for a non-positive ``max_batch_size``/``backend.max_seq_len``.
    """

    def __init__(
        self,
        backend: CriticBackend,
        host: str = "127.0.0.1",
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        max_batch_size: int = 64,
        max_queue_delay_us: int = 2000,
        log_verbose: int = 0,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if int(backend.max_seq_len) < 1:
            raise ValueError(f"backend.max_seq_len must be >= 1, got {backend.max_seq_len}")
        self.backend = backend
        self.host = host
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.metrics_port = metrics_port
        self.max_batch_size = max_batch_size
        self.max_queue_delay_us = max_queue_delay_us
        self.log_verbose = log_verbose
        self._lock = threading.Lock()
        self._triton = None
        self.instance = str(uuid.uuid4())
        self.train_steps = 0
        self.train_duplicates = 0
        # request id -> metrics of applied train requests (oldest first), and ids being applied now.
        self._applied: OrderedDict[str, dict[str, float]] = OrderedDict()
        self._in_flight: dict[str, threading.Event] = {}
        self._dedup_lock = threading.Lock()

    def status(self) -> dict[str, Any]:
        """``{"instance", "train_steps", "train_duplicates"}`` (what ``critic_status`` returns)."""
        return {
            "instance": self.instance,
            "train_steps": self.train_steps,
            "train_duplicates": self.train_duplicates,
        }

    @property
    def url(self) -> str:
        """HTTP endpoint, e.g. ``http://127.0.0.1:8000``."""
        return f"http://{self.host}:{self.http_port}"

    # ---- inference callables (run in PyTriton's handler threads of this process) ----

    def _infer_fn(self, tokens: np.ndarray, sequence_lengths: np.ndarray) -> dict[str, np.ndarray]:
        lengths = sequence_lengths.reshape(-1) if sequence_lengths.ndim == 2 else sequence_lengths
        validate_infer_request(tokens, lengths, self.backend.max_seq_len, self.max_batch_size)
        with self._lock:
            values, rewards = self.backend.infer(tokens, lengths)
        values = np.asarray(values, dtype=np.float32)
        rewards = np.asarray(rewards, dtype=np.float32).reshape(-1)
        if values.shape != tokens.shape or rewards.shape != (tokens.shape[0],):
            # A backend bug, not the client's: plain RuntimeError (still an error reply).
            raise RuntimeError(
                f"backend.infer returned values {values.shape} and rewards {rewards.shape}; "
                f"expected {tokens.shape} and ({tokens.shape[0]},)"
            )
        return {"values": values, "rewards": rewards.reshape(-1, 1)}

    def _train_fn(self, requests: list) -> list[dict[str, np.ndarray]]:
        # Validate every request first so that a bad one cannot leave earlier ones half-applied.
        request_ids = []
        for request in requests:
            validate_train_request(
                request["tokens"],
                request["returns"],
                request["prev_values"],
                request["mask"],
                self.backend.max_seq_len,
                self.max_batch_size,
            )
            # PyTriton's Request has no .get(); an optional input that was not sent is absent.
            request_ids.append(validate_request_id(request["request_id"]) if "request_id" in request else None)
        responses = []
        for request, request_id in zip(requests, request_ids):  # one request = one optimizer step
            metrics = self._train_once(request, request_id)
            reply = {**metrics, "instance": self.instance}
            responses.append(
                {
                    "loss": np.array([metrics["loss"]], dtype=np.float32),
                    "metrics": np.array([json.dumps(reply).encode()], dtype=np.object_),
                }
            )
        return responses

    def _train_once(self, request: dict, request_id: str | None) -> dict[str, float]:
        """Apply one training request unless its id was applied already (then its cached metrics)."""
        if request_id is None:
            return self._apply_train(request)
        while True:
            with self._dedup_lock:
                if request_id in self._applied:
                    self._applied.move_to_end(request_id)
                    self.train_duplicates += 1
                    LOGGER.warning(
                        "critic_train request %s was already applied: answering with its metrics, no second "
                        "optimizer step (a retry after a lost reply)",
                        request_id,
                    )
                    return self._applied[request_id]
                done = self._in_flight.get(request_id)
                if done is None:
                    done = self._in_flight[request_id] = threading.Event()
                    break
            # The same id is being applied right now (the client gave up waiting and retried): wait
            # for it, then answer from the cache (or apply it here if that attempt failed).
            LOGGER.warning("critic_train request %s is already being applied: waiting for it", request_id)
            done.wait()
        try:
            metrics = self._apply_train(request)
            with self._dedup_lock:
                self._applied[request_id] = metrics
                while len(self._applied) > TRAIN_DEDUP_SIZE:
                    self._applied.popitem(last=False)
            return metrics
        finally:
            with self._dedup_lock:
                del self._in_flight[request_id]
            done.set()

    def _apply_train(self, request: dict) -> dict[str, float]:
        with self._lock:
            metrics = self.backend.train(request["tokens"], request["returns"], request["prev_values"], request["mask"])
            self.train_steps += 1
        if "loss" not in metrics:
            raise RuntimeError(f"backend.train returned metrics without 'loss': {sorted(metrics)}")
        return {str(k): float(v) for k, v in metrics.items()}

    def _status_fn(self, requests: list) -> list[dict[str, np.ndarray]]:
        status = json.dumps(self.status()).encode()
        return [{"status": np.array([status], dtype=np.object_)} for _ in requests]

    def _save_fn(self, requests: list) -> list[dict[str, np.ndarray]]:
        responses = []
        for request in requests:
            text = _path_input(request, "a file path")
            with self._lock:
                self.backend.save(text)
            responses.append({"ok": np.array([True])})
        return responses

    def _load_fn(self, requests: list) -> list[dict[str, np.ndarray]]:
        responses = []
        for request in requests:
            text = _path_input(request, "a checkpoint directory")
            with self._lock:
                state = self.backend.load(text)
            state = {str(k): float(v) for k, v in dict(state).items()}
            responses.append({"state": np.array([json.dumps(state).encode()], dtype=np.object_)})
        return responses

    # ---- lifecycle ----

    def _make_triton(self):
        from pytriton.decorators import batch
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig

        triton_env_fix()
        config = TritonConfig(
            http_address=self.host,
            http_port=self.http_port,
            grpc_address=self.host,
            grpc_port=self.grpc_port,
            metrics_address=self.host,
            metrics_port=self.metrics_port,
            log_verbose=self.log_verbose,
            exit_on_error=True,
            strict_readiness=True,
        )
        triton = Triton(config=config)
        triton.bind(
            model_name=INFER_MODEL,
            infer_func=batch(self._infer_fn),
            inputs=[
                Tensor(name="tokens", dtype=np.int64, shape=(-1,)),
                Tensor(name="sequence_lengths", dtype=np.int64, shape=(1,)),
            ],
            outputs=[
                Tensor(name="values", dtype=np.float32, shape=(-1,)),
                Tensor(name="rewards", dtype=np.float32, shape=(1,)),
            ],
            config=ModelConfig(
                batching=True,
                max_batch_size=self.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=self.max_queue_delay_us),
            ),
        )
        float_2d = dict(dtype=np.float32, shape=(-1, -1))
        triton.bind(
            model_name=TRAIN_MODEL,
            infer_func=self._train_fn,
            inputs=[
                Tensor(name="tokens", dtype=np.int64, shape=(-1, -1)),
                Tensor(name="returns", **float_2d),
                Tensor(name="prev_values", **float_2d),
                Tensor(name="mask", **float_2d),
                Tensor(name="request_id", dtype=np.bytes_, shape=(1,), optional=True),
            ],
            outputs=[
                Tensor(name="loss", dtype=np.float32, shape=(1,)),
                Tensor(name="metrics", dtype=np.bytes_, shape=(1,)),
            ],
            config=ModelConfig(batching=False),
        )
        triton.bind(
            model_name=SAVE_MODEL,
            infer_func=self._save_fn,
            inputs=[Tensor(name="path", dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name="ok", dtype=np.bool_, shape=(1,))],
            config=ModelConfig(batching=False),
        )
        triton.bind(
            model_name=LOAD_MODEL,
            infer_func=self._load_fn,
            inputs=[Tensor(name="path", dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name="state", dtype=np.bytes_, shape=(1,))],
            config=ModelConfig(batching=False),
        )
        triton.bind(
            model_name=STATUS_MODEL,
            infer_func=self._status_fn,
            inputs=[Tensor(name="ping", dtype=np.int64, shape=(1,))],
            outputs=[Tensor(name="status", dtype=np.bytes_, shape=(1,))],
            config=ModelConfig(batching=False),
        )
        return triton

    def start(self) -> CriticServer:
        """Start Triton and load the five models; returns once they are ready.

        Raises:
            RuntimeError: if already started.
            CriticServerError: if Triton or a model failed to start (e.g. the python-backend stub
                could not load); the message carries Triton's reason.
        """
        if self._triton is not None:
            raise RuntimeError("CriticServer is already started")
        triton = self._make_triton()
        try:
            triton.run()
        except Exception as e:
            triton.stop()
            raise CriticServerError(f"critic server {self.url} failed to start: {e}") from e
        except BaseException:
            triton.stop()
            raise
        self._triton = triton
        LOGGER.info("critic server ready at %s (instance %s)", self.url, self.instance)
        return self

    def stop(self) -> None:
        """Stop Triton (idempotent)."""
        if self._triton is not None:
            triton, self._triton = self._triton, None
            triton.stop()

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM or until Triton dies (blocking), then stop Triton.

        When called from the main thread, SIGTERM is turned into ``KeyboardInterrupt`` so that
        Triton and its workspace are cleaned up as for Ctrl-C.
        """
        if self._triton is not None:
            raise RuntimeError("CriticServer is already started")
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        self._triton = self._make_triton()
        LOGGER.info("critic server starting at %s (instance %s)", self.url, self.instance)
        try:
            self._triton.serve()
        finally:
            self.stop()

    def __enter__(self) -> CriticServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
