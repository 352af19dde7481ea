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
    checkpoint of the critic (weights, optimizer, LR schedule, step, RNG) at ``path``, which must
    resolve (``..`` and symbolic links) to a path inside the server's checkpoint root; an existing
    ``path`` (or ``path.tmp``/``path.old``) that is not a complete nemo-rlhf checkpoint is refused
    and nothing on disk changes (:mod:`nemo_rlhf.servers.paths`).
``critic_load`` (batching off)
    input ``path`` ``[1]`` bytes (UTF-8); output ``state`` ``[1]`` bytes (JSON, at least
    ``{"step": n}``). Restores a ``critic_save`` checkpoint (inside the checkpoint root, with the
    ``COMPLETE`` marker): the PPO actor calls it on resume with the critic checkpoint paired with
    its own, so both continue from the same step.
``critic_status`` (batching off)
    input ``ping`` ``[1]`` int64 (ignored); output ``status`` ``[1]`` bytes: JSON
    ``{"instance": <uuid4 drawn when this server object was created>, "train_steps": <backend
    train calls by this server>, "train_duplicates": <train requests answered from the
    request-id cache>}``. Never touches the backend (no lock), so it answers during a long
    training step. A client that sees the instance change knows the server was restarted and
    that the critic state it trained since its last checkpoint is gone.

With an ``auth_token``, Triton refuses any inference request without the header
``triton-access-token: <token>`` (its restricted-API feature) before the request reaches Python.

Every request is validated before the backend sees it. Triton itself rejects a wrong dtype, a
wrong rank and (for ``critic_infer``) ``B > max_batch_size`` with an error reply naming the
input; PyTriton's stub cannot carry zero-size tensors (the client refuses empty batches before
sending). Everything else (rows of ``sequence_lengths`` vs ``B``, lengths outside ``[1, S]``,
``S > backend.max_seq_len``, token ids outside ``[0, backend.vocab_size)``, shapes that disagree
between training inputs, ``B > max_batch_size`` for training, NaN/Inf, paths outside the
checkpoint root) raises :class:`CriticRequestError` inside the inference callable. PyTriton 0.7
turns an exception raised there into an error reply (``pytriton/proxy/inference.py``,
``_handle_requests``): any exception except ``PyTritonUnrecoverableError`` is sent back with the
ERROR flag and the server keeps serving; ``PyTritonUnrecoverableError`` would shut Triton down, so
it is never raised here. Every callable is wrapped (:meth:`CriticServer._guard`) so that the reply
is one line, ``CriticRequestError: CRITIC_REQUEST_ERROR (error id <id>): <detail>``, with no
traceback; the traceback is logged at DEBUG under that error id. Validation never calls the
backend, so a rejected training request changes nothing (``train_steps`` is unchanged).
Exceptions raised by the backend itself become one-line error replies the same way.
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
import socket
import sys
import sysconfig
import threading
import uuid
import zlib
from collections import OrderedDict
from typing import Any, Callable, MutableMapping

import numpy as np

from nemo_rlhf.servers.paths import PathRejected, check_load_path, check_save_path, real_root
from nemo_rlhf.servers.protocol import (
    ERROR_MARKER,
    INFER_MODEL,
    LOAD_MODEL,
    SAVE_MODEL,
    STATUS_MODEL,
    TRAIN_MODEL,
    CriticBackend,
    CriticServerError,
    validate_auth_token,
)

LOGGER = logging.getLogger(__name__)

# Prefix of every validation error message sent back to the client; the client extracts the text
# after it from PyTriton's traceback reply.

# Longest error detail sent back (characters); the rest is cut (the server log has all of it).
MAX_ERROR_DETAIL_CHARS = 1000
# Triton APIs that need the token when authentication is on: PyTriton's defaults plus inference.
# Health, metadata and model-config stay open (readiness probes, clients fetching model configs).
AUTH_RESTRICTED_APIS = ("shared-memory", "model-repository", "statistics", "trace", "logging", "inference")

# How many applied critic_train request ids (with their metrics) the server remembers.
TRAIN_DEDUP_SIZE = 64
# Longest accepted critic_train request id (bytes).
MAX_REQUEST_ID_BYTES = 128


def triton_env_fix(env: MutableMapping[str, str] | None = None) -> str:
    """Prefix ``LD_LIBRARY_PATH`` with the running interpreter's libpython directory.

    PyTriton's python-backend stub otherwise links the system libpython (a different patch
    release than this interpreter) and model loading fails with ``AttributeError: '_thread.RLock'
    object has no attribute '_recursion_count'`` (measured on the project's CPU machines with
    PyTriton 0.7.0 and Python 3.11). PyTriton starts ``tritonserver`` with a copy
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


# Where PyTriton's shared-memory tensor stores live (multiprocessing.shared_memory on Linux); each
# is named ``pytrtion<pid>-<hex>`` after the process that runs ``Triton(...)``.
SHM_DIR = "/dev/shm"


def server_workspace_prefix(pid: int | None = None, host: str | None = None) -> str:
    """Prefix of the PyTriton workspaces of the critic servers run by process ``pid`` on ``host``
    (default: this process, this host): ``$PYTRITON_HOME/workspace_nr_<host>_<pid>_``, ``<host>``
    the CRC-32 of the host name in hex (it keeps apart two nodes that share a home directory), which
    :class:`CriticServer` completes with the first 8 characters of its instance id (PyTriton's
    default home is ``~/.cache/pytriton``). Short: Triton's Unix sockets live in the workspace, and
    a socket path may not exceed 107 bytes (a 36-character id and a host name broke model loading).

    Named, not random (PyTriton's default), so that whoever stopped a server that could not clean up
    after itself (killed by SIGKILL) can remove its workspace:
    :func:`nemo_rlhf.servers.process.remove_server_leftovers`.
    """
    from pytriton.constants import PYTRITON_HOME

    pid = os.getpid() if pid is None else int(pid)
    host = socket.gethostname() if host is None else host
    return os.path.join(str(PYTRITON_HOME), f"workspace_nr_{zlib.crc32(host.encode()):08x}_{pid}_")


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _one_line(text: str, limit: int = MAX_ERROR_DETAIL_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class CriticRequestError(ValueError):
    """A request the server refuses (or that failed in the backend); becomes a one-line error reply.

    ``str(error)`` is ``CRITIC_REQUEST_ERROR: <detail>``, or with an error id
    ``CRITIC_REQUEST_ERROR (error id <id>): <detail>``; ``detail`` names the input, what was wrong
    and what was expected, on one line.

    PyTriton 0.7 formats an exception raised by an inference callable with
    ``traceback.format_exception(None, e, e.__traceback__)`` and sends that text as the reply
    (``pytriton/proxy/inference.py``). This class reports no ``__traceback__`` at Python level (the
    interpreter still tracks the real one, so ``sys.exc_info()`` and the server's DEBUG log have
    it), and it is raised ``from None``, so the reply is the single line
    ``CriticRequestError: CRITIC_REQUEST_ERROR (error id <id>): <detail>`` with no file paths.

    Attributes:
        detail: the one-line message without the marker.
        error_id: the id the server logged the traceback under (``None`` before the server adds it).
    """

    __module__ = "builtins"  # the reply shows "CriticRequestError: ...", not the module path

    def __init__(self, detail: str, error_id: str | None = None):
        self.detail = _one_line(detail)
        self.error_id = error_id
        tag = ERROR_MARKER if error_id is None else f"{ERROR_MARKER} (error id {error_id})"
        super().__init__(f"{tag}: {self.detail}")

    @property
    def __traceback__(self):  # noqa: D401 - see the class docstring
        return None

    @__traceback__.setter
    def __traceback__(self, value) -> None:
        pass


def request_error(message: str) -> CriticRequestError:
    """A :class:`CriticRequestError` (a ``ValueError``) whose text the client finds in the error reply."""
    return CriticRequestError(message)


class _DropPyTritonDuplicate(logging.Filter):
    """Drops PyTriton's own WARNING (with the full traceback) for an error this server already
    logged: one line at WARNING/ERROR plus the traceback at DEBUG under the error id."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return ERROR_MARKER not in record.getMessage()
        except Exception:  # noqa: BLE001 - never break logging
            return True


_PYTRITON_FILTER = _DropPyTritonDuplicate()

# PyTriton 0.7.0's python-backend model (pytriton/proxy/model.py, copied into Triton's model
# repository and run by the stub process) re-raises the callable's error inside ``execute``, and
# the stub then wraps it in its own traceback ("Model execute error: Traceback ... /tmp/folderXYZ/
# 1/model.py ... At: ..."), as it does for a failure in the stub itself (e.g. a zero-size tensor
# it cannot serialize). _patch_stub_model makes ``execute`` return one error response per request
# instead (Triton's documented per-request error), carrying only the callable's message, or the
# last line (exception type and message) of the stub's own traceback.
_STUB_EDITS = (
    (
        "                    raise triton_responses_or_error\n",
        "                    return _nemo_rlhf_error_responses(triton_requests, triton_responses_or_error)\n",
    ),
    (
        '            raise pb_utils.TritonModelException(f"Model execute error: {msg}") from None',
        '            return _nemo_rlhf_error_responses(triton_requests, "Model execute error: " + msg.strip().splitlines()[-1])',
    ),
)
_STUB_HELPER = '''

def _nemo_rlhf_error_responses(triton_requests, error):
    """Added by nemo_rlhf.servers.critic_server: the error as one response per request, no traceback."""
    message = error.message() if callable(getattr(error, "message", None)) else str(error)
    return [pb_utils.InferenceResponse(error=pb_utils.TritonError(message.strip())) for _ in triton_requests]
'''


def _patch_stub_model(source: bytes) -> bytes:
    """PyTriton's stub ``model.py`` with error replies as per-request error responses (see above).

    Returns the source unchanged (and logs a WARNING: replies then carry the stub's traceback) if
    this PyTriton version's ``model.py`` does not have the expected line exactly once.
    """
    text = source.decode("utf-8")
    if "import triton_python_backend_utils as pb_utils" not in text or any(text.count(old) != 1 for old, _ in _STUB_EDITS):
        LOGGER.warning("PyTriton's stub model.py has an unexpected layout: error replies will carry its traceback")
        return source
    for old, new in _STUB_EDITS:
        text = text.replace(old, new)
    return (text + _STUB_HELPER).encode("utf-8")


def _one_line_error_replies(triton: Any) -> None:
    """Make every model bound on ``triton`` ship the patched stub (:func:`_patch_stub_model`)."""
    models = getattr(getattr(triton, "_model_manager", None), "_models", None)
    if not isinstance(models, dict):
        LOGGER.warning("PyTriton's model manager has an unexpected layout: error replies will carry a traceback")
        return
    for model in models.values():
        original = model.get_proxy_model_files

        def patched(original=original) -> dict:
            files = dict(original())
            for key in files:
                if key.endswith("/model.py"):
                    files[key] = _patch_stub_model(files[key])
            return files

        model.get_proxy_model_files = patched


def _check_array(name: str, array: Any, dtype: type, ndim: int) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise request_error(f"input '{name}' must be a numpy array, got {type(array).__name__}")
    if array.dtype != dtype:
        raise request_error(f"input '{name}' must have dtype {np.dtype(dtype).name}, got {array.dtype}")
    if array.ndim != ndim:
        raise request_error(f"input '{name}' must have rank {ndim}, got shape {tuple(array.shape)}")
    return array


def _check_tokens(tokens: Any, max_seq_len: int, max_batch_size: int, vocab_size: int | None) -> tuple[int, int]:
    tokens = _check_array("tokens", tokens, np.int64, 2)
    batch_size, seq_len = tokens.shape
    if batch_size < 1:
        raise request_error("input 'tokens' has an empty batch (B = 0); expected B >= 1")
    if batch_size > max_batch_size:
        raise request_error(f"input 'tokens' has batch size B = {batch_size}; expected B <= {max_batch_size}")
    if seq_len < 1 or seq_len > max_seq_len:
        raise request_error(f"input 'tokens' has sequence length S = {seq_len}; expected 1 <= S <= {max_seq_len}")
    if vocab_size is not None:
        bad = (tokens < 0) | (tokens >= vocab_size)
        if bad.any():  # every position, padding included: the model embeds them all
            row, col = (int(i) for i in np.argwhere(bad)[0])
            raise request_error(
                f"input 'tokens' row {row}, column {col} is {int(tokens[row, col])}; expected a token id "
                f"0 <= id < vocab_size = {vocab_size}"
            )
    return batch_size, seq_len


def validate_infer_request(
    tokens: Any, lengths: Any, max_seq_len: int, max_batch_size: int, vocab_size: int | None = None
) -> None:
    """Check an inference request before it reaches the backend.

    Args:
        tokens: ``[B, S]`` int64 with ``0 <= tokens < vocab_size``.
        lengths: ``[B]`` int64 with ``1 <= lengths[b] <= S``.
        max_seq_len: the backend's largest ``S``.
        max_batch_size: the largest ``B``.
        vocab_size: the backend's vocabulary size (``None``: token ids are not checked).

    Raises:
        ValueError: naming the input and what was expected (message starts with
            ``CRITIC_REQUEST_ERROR``).
    """
    batch_size, seq_len = _check_tokens(tokens, max_seq_len, max_batch_size, vocab_size)
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
    tokens: Any,
    returns: Any,
    prev_values: Any,
    mask: Any,
    max_seq_len: int,
    max_batch_size: int,
    vocab_size: int | None = None,
) -> None:
    """Check a training request before it reaches the backend.

    Args:
        tokens: ``[B, S]`` int64 with ``0 <= tokens < vocab_size``.
        returns, prev_values, mask: ``[B, S]`` float32, all finite.
        max_seq_len: the backend's largest ``S``.
        max_batch_size: the largest ``B``.
        vocab_size: the backend's vocabulary size (``None``: token ids are not checked).

    Raises:
        ValueError: naming the input and what was expected (message starts with
            ``CRITIC_REQUEST_ERROR``).
    """
    _check_tokens(tokens, max_seq_len, max_batch_size, vocab_size)
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

    There is no TLS. With ``auth_token`` set, Triton itself refuses every inference request
    (``critic_infer/train/save/load/status``) without the header ``triton-access-token: <token>``
    before any Python runs; without it anyone who can reach the ports can run, train and save the
    critic. Keep the default loopback ``host`` for local runs; on a cluster bind the node's
    private address and keep the ports inside the cluster network (docs/cluster.md).

    Args:
        backend: the critic model; ``backend.max_seq_len`` bounds ``S`` and
            ``backend.vocab_size`` bounds the token ids.
        host: address the HTTP/gRPC/metrics endpoints bind to.
        http_port, grpc_port, metrics_port: TCP ports (Triton defaults 8000/8001/8002).
        max_batch_size: largest number of rows ``B`` in one ``critic_infer``/``critic_train``
            call (Triton rejects larger inference requests itself).
        max_queue_delay_us: how long (microseconds) Triton's dynamic batcher may hold an
            inference request to merge it with others.
        log_verbose: Triton's verbose log level (0 = off).
        checkpoint_root: the only directory tree ``critic_save``/``critic_load`` may touch (paths
            are judged after resolving ``..`` and symbolic links; relative paths are relative to
            it); ``None`` refuses every save and load. See :mod:`nemo_rlhf.servers.paths`.
        auth_token: shared secret (16 to 512 characters of ``A-Z a-z 0-9 _ . ~ -``); ``None``:
            no authentication. Never logged.

    Attributes:
        instance: uuid4 string drawn when this object is created; reported by ``critic_status``
            and in every ``critic_train`` reply so that clients detect a restarted server.
        train_steps: backend ``train`` calls made by this server (optimizer steps).
        train_duplicates: ``critic_train`` requests answered from the request-id cache.

    Raises:
        ValueError: for a non-positive ``max_batch_size``/``backend.max_seq_len``/
            ``backend.vocab_size``, a malformed ``auth_token``, or a ``checkpoint_root`` that is
            not a directory.
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
        checkpoint_root: str | os.PathLike | None = None,
        auth_token: str | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if int(backend.max_seq_len) < 1:
            raise ValueError(f"backend.max_seq_len must be >= 1, got {backend.max_seq_len}")
        vocab_size = getattr(backend, "vocab_size", None)
        if vocab_size is None or int(vocab_size) < 1:
            raise ValueError(f"backend.vocab_size must be an int >= 1 (token ids are checked against it), got {vocab_size!r}")
        self.vocab_size = int(vocab_size)
        self.checkpoint_root = None if checkpoint_root is None else real_root(checkpoint_root)
        self._auth_token = None if auth_token is None else validate_auth_token(auth_token, "auth_token")
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
    def auth_enabled(self) -> bool:
        """Whether Triton requires the token on the inference API."""
        return self._auth_token is not None

    @property
    def url(self) -> str:
        """HTTP endpoint, e.g. ``http://127.0.0.1:8000``."""
        return f"http://{self.host}:{self.http_port}"

    # ---- inference callables (run in PyTriton's handler threads of this process) ----

    def _infer_fn(self, tokens: np.ndarray, sequence_lengths: np.ndarray) -> dict[str, np.ndarray]:
        lengths = sequence_lengths.reshape(-1) if sequence_lengths.ndim == 2 else sequence_lengths
        validate_infer_request(tokens, lengths, self.backend.max_seq_len, self.max_batch_size, self.vocab_size)
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
                self.vocab_size,
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

    def _checked_path(self, text: str, check: Callable[[str, str], str]) -> str:
        if self.checkpoint_root is None:
            raise request_error(
                "input 'path': this server has no checkpoint root, so critic_save and critic_load are disabled; "
                "expected a server started with server.checkpoint_root (or run_dir) set"
            )
        try:
            return check(self.checkpoint_root, text)
        except PathRejected as e:
            raise request_error(str(e)) from None

    def _save_fn(self, requests: list) -> list[dict[str, np.ndarray]]:
        responses = []
        for request in requests:
            text = _path_input(request, "a checkpoint directory")
            with self._lock:  # checked under the lock: no other save/load runs in between
                path = self._checked_path(text, check_save_path)
                self.backend.save(path)
            LOGGER.info("critic_save: wrote %s", path)
            responses.append({"ok": np.array([True])})
        return responses

    def _load_fn(self, requests: list) -> list[dict[str, np.ndarray]]:
        responses = []
        for request in requests:
            text = _path_input(request, "a checkpoint directory")
            with self._lock:
                path = self._checked_path(text, check_load_path)
                state = self.backend.load(path)
            LOGGER.info("critic_load: restored %s", path)
            state = {str(k): float(v) for k, v in dict(state).items()}
            responses.append({"state": np.array([json.dumps(state).encode()], dtype=np.object_)})
        return responses

    def _guard(self, model: str, fn: Callable) -> Callable:
        """Wrap an inference callable so that every exception becomes a one-line error reply.

        A refused request is logged at WARNING (one line), a backend failure at ERROR (one line);
        in both cases the traceback goes to this module's logger at DEBUG under a fresh error id,
        which the reply carries: ``CRITIC_REQUEST_ERROR (error id <id>): <detail>``.
        """

        def guarded(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - every error becomes a reply
                error_id = uuid.uuid4().hex[:16]
                if isinstance(exc, CriticRequestError):
                    detail = exc.detail
                    LOGGER.warning("%s: refused a request (error id %s): %s", model, error_id, detail)
                else:
                    detail = f"the backend failed: {type(exc).__name__}: {exc}"
                    LOGGER.error("%s: backend error (error id %s): %s", model, error_id, _one_line(detail))
                LOGGER.debug("%s: traceback of error id %s", model, error_id, exc_info=sys.exc_info())
                raise CriticRequestError(detail, error_id=error_id) from None

        return guarded

    # ---- lifecycle ----

    def _make_triton(self):
        from pytriton.decorators import batch
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

        triton_env_fix()
        pytriton_logger = logging.getLogger("pytriton.proxy.inference")
        if _PYTRITON_FILTER not in pytriton_logger.filters:
            pytriton_logger.addFilter(_PYTRITON_FILTER)
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
        security = None  # PyTriton's default: a random token on its management APIs only
        if self._auth_token is not None:
            security = TritonSecurityConfig(
                access_token=self._auth_token, restricted_endpoints=list(AUTH_RESTRICTED_APIS)
            )
        # A named workspace (server_workspace_prefix), removable by the parent if this process is killed.
        workspace = server_workspace_prefix() + self.instance[:8]
        triton = Triton(config=config, security_config=security, workspace=workspace)
        triton.bind(
            model_name=INFER_MODEL,
            infer_func=self._guard(INFER_MODEL, batch(self._infer_fn)),
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
            infer_func=self._guard(TRAIN_MODEL, self._train_fn),
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
            infer_func=self._guard(SAVE_MODEL, self._save_fn),
            inputs=[Tensor(name="path", dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name="ok", dtype=np.bool_, shape=(1,))],
            config=ModelConfig(batching=False),
        )
        triton.bind(
            model_name=LOAD_MODEL,
            infer_func=self._guard(LOAD_MODEL, self._load_fn),
            inputs=[Tensor(name="path", dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name="state", dtype=np.bytes_, shape=(1,))],
            config=ModelConfig(batching=False),
        )
        triton.bind(
            model_name=STATUS_MODEL,
            infer_func=self._guard(STATUS_MODEL, self._status_fn),
            inputs=[Tensor(name="ping", dtype=np.int64, shape=(1,))],
            outputs=[Tensor(name="status", dtype=np.bytes_, shape=(1,))],
            config=ModelConfig(batching=False),
        )
        _one_line_error_replies(triton)
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
        LOGGER.info("critic server ready at %s (instance %s, authentication %s, checkpoint root %s)", self.url,
                    self.instance, "on" if self.auth_enabled else "off", self.checkpoint_root)
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
        LOGGER.info("critic server starting at %s (instance %s, authentication %s, checkpoint root %s)", self.url,
                    self.instance, "on" if self.auth_enabled else "off", self.checkpoint_root)
        try:
            self._triton.serve()
        finally:
            self.stop()

    def __enter__(self) -> CriticServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
