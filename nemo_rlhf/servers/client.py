"""Client of the PyTriton critic server (:mod:`nemo_rlhf.servers.critic_server`).

Each call opens a PyTriton ``ModelClient`` (HTTP) in the thread that makes it and closes it
afterwards, so calls from several threads never share a connection (the tritonclient/gevent
connection objects are not thread-safe). The Triton model configs are fetched once, while
waiting for readiness (bounded by ``init_timeout_s``), and reused, so a call after that is one
HTTP request bounded by its inference/training timeout.

Errors:
    * no connection, connection lost, or no answer in time -> :class:`CriticServerUnavailable`
      (names URL, model, timeout and cause). Once the client has reached the server, every call
      retries this with exponential backoff (``retry_backoff_s``, doubling, at most
      ``retry_backoff_max_s``) until ``retry_limit_s`` seconds have passed since the first
      failure; then the error names the attempts, the seconds spent and the last cause. Before
      the server was ever reached (no successful call yet) the wait is bounded by
      ``init_timeout_s`` and not retried;
    * an error reply (e.g. a request that failed the server's validation) ->
      :class:`CriticServerError` carrying the server's one-line message and its error id (under
      which the server logged the traceback), never retried; a request refused by Triton for a
      missing or wrong token (``auth_token``) is such an error reply too;
    * a server that answers with another ``instance`` id than the one first seen ->
      :class:`CriticServerRestarted` (its critic state since the last checkpoint is lost).

Which calls are retried and why that is safe:
    * ``infer``/``status``: read-only. After a retried ``infer`` succeeds, one ``critic_status``
      request checks that the server was not restarted meanwhile.
    * ``train``: each call carries a ``request_id`` (uuid4) that the server remembers for its last
      64 applied requests; a retry reuses it, so a training step whose reply was lost is answered
      from the server's cache instead of being applied twice. Before each retry the instance is
      checked, so a retry is never applied to a restarted server; every reply carries the instance.
    * ``save``: rewrites the same directory; the instance is checked before and after it, so a
      restarted (untrained) critic is never saved as the actor's partner.
    * ``load``: idempotent; afterwards the server's critic is the checkpoint's, so the instance it
      reports becomes the client's reference (resuming against a restarted server is the normal
      way to recover from :class:`CriticServerRestarted`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Mapping

import numpy as np

from nemo_rlhf.servers.protocol import (
    ERROR_MARKER,
    ALL_MODELS,
    AUTH_HEADER,
    DEFAULT_AUTH_TOKEN_ENV,
    INFER_MODEL,
    LOAD_MODEL,
    SAVE_MODEL,
    STATUS_MODEL,
    TRAIN_MODEL,
    CriticServerError,
    CriticServerRestarted,
    CriticServerUnavailable,
    resolve_auth_token,
)

LOG = logging.getLogger("nemo_rlhf.servers")

# Triton's own replies for a model that is not (yet) loaded, e.g. a restarting server whose HTTP
# endpoint is up before its models: unavailability, not a rejected request.
# Readiness probes go straight to the server, never through an http_proxy from the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_MODEL_NOT_LOADED = re.compile(r"Request for unknown model|has no available versions|is not ready")

_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): .*$", re.MULTILINE)
_MARKED = re.compile(re.escape(ERROR_MARKER) + r"(?: \(error id (?P<id>[0-9a-f]+)\))?: (?P<detail>.*)")
# Triton's reply to a restricted API called without (or with a wrong) token.
_AUTH_REFUSED = re.compile(r"restricted|access.token", re.IGNORECASE)


def _server_message(text: str) -> str:
    """The useful part of a PyTriton error reply: the server's one-line detail (with its error id,
    under which the server logged the traceback), or the last exception line of a traceback."""
    match = _MARKED.search(text)
    if match:
        detail = match.group("detail").splitlines()[0] if match.group("detail") else ""
        return detail + (f" [server error id {match.group('id')}]" if match.group("id") else "")
    lines = [m.group(0) for m in _EXCEPTION_LINE.finditer(text)]
    if "Traceback" in text and lines:
        return lines[-1]  # the exception raised in the server's inference callable
    return text.replace("Error occurred during inference request. Message: ", "")


def _absolute(path: Any) -> str:
    """``path`` made absolute against this process's working directory (empty stays empty, so the
    server names the empty input)."""
    text = str(path)
    return os.path.abspath(text) if text else text


def _is_model_not_loaded(text: str) -> bool:
    return ERROR_MARKER not in text and "Traceback" not in text and bool(_MODEL_NOT_LOADED.search(text))


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
        infer_timeout_s: limit (seconds) on one ``critic_infer`` or ``critic_status`` request.
        train_timeout_s: limit (seconds) on one ``critic_train``, ``critic_save`` or
            ``critic_load`` request.
        init_timeout_s: limit (seconds) on waiting for the server and a model to be ready the
            first time that model is used.
        max_workers: threads serving :meth:`infer_async` (concurrent in-flight requests).
        retry_limit_s: how long (seconds, from the first failure of a call) an unavailable server
            is retried before the call raises :class:`CriticServerUnavailable`; 0 = no retries.
            A call that gives up has taken at most about ``retry_limit_s`` plus one request
            timeout after its first failure (a dead server refuses connections at once).
        retry_backoff_s: wait before the first retry (seconds); doubles at each retry.
        retry_backoff_max_s: largest wait between two retries (seconds).
        auth_token: the server's shared token (sent as the ``triton-access-token`` header on
            every request); ``None``: none sent. :meth:`from_config` reads it from an environment
            variable instead of the config.

    Call :meth:`wait_until_ready` first: it records the server's instance id, which every later
    restart check compares with.

    Example::

        with CriticClient("127.0.0.1", 8000) as critic:
            critic.wait_until_ready()
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
        retry_limit_s: float = 300.0,
        retry_backoff_s: float = 1.0,
        retry_backoff_max_s: float = 30.0,
        auth_token: str | None = None,
    ):
        if retry_limit_s < 0 or retry_backoff_s < 0 or retry_backoff_max_s < 0:
            raise ValueError(
                f"retry_limit_s, retry_backoff_s and retry_backoff_max_s must be >= 0, got "
                f"{retry_limit_s}, {retry_backoff_s}, {retry_backoff_max_s}"
            )
        self.url = f"http://{host}:{port}"
        self._auth_token = resolve_auth_token(auth_token, None, config_prefix="critic") if auth_token else None
        self.infer_timeout_s = float(infer_timeout_s)
        self.train_timeout_s = float(train_timeout_s)
        self.init_timeout_s = float(init_timeout_s)
        self.retry_limit_s = float(retry_limit_s)
        self.retry_backoff_s = float(retry_backoff_s)
        self.retry_backoff_max_s = float(retry_backoff_max_s)
        self._configs: dict[str, Any] = {}
        self._configs_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="critic-client")
        self._closed = False
        self._closing = threading.Event()  # wakes retry loops on close()
        self._reached = False  # some request was answered: from then on unavailability is retried
        self._instance: str | None = None
        self._instance_lock = threading.Lock()

    @classmethod
    def from_config(cls, critic_cfg: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> CriticClient:
        """A client built from the actor's ``critic:`` config section (a dict or DictConfig).

        Keys: ``host``, ``port`` (required); ``infer_timeout_s``, ``train_timeout_s``,
        ``init_timeout_s``, ``max_workers``, ``retry_limit_s``, ``retry_backoff_s``,
        ``retry_backoff_max_s`` (optional: the constructor's defaults when absent or null);
        ``auth_token`` (optional, discouraged: it lands in logs and configs) and
        ``auth_token_env`` (name of the environment variable holding the token, default
        ``NEMO_RLHF_CRITIC_TOKEN``; null: do not read the environment). An explicit
        ``auth_token`` wins over the environment variable; neither set means no token is sent.

        Args:
            critic_cfg: the ``critic:`` mapping.
            environ: where to read ``auth_token_env`` (default ``os.environ``).

        Raises:
            KeyError: ``host`` or ``port`` is missing (the message names ``critic.<key>``).
            ValueError: a malformed token (the message names its source, never the token).
        """

        def get(key: str) -> Any:
            return critic_cfg.get(key)

        for key in ("host", "port"):
            if get(key) is None:
                raise KeyError(f"critic.{key} is missing from the critic config")
        kwargs: dict[str, Any] = {}
        for key in ("infer_timeout_s", "train_timeout_s", "init_timeout_s", "retry_limit_s", "retry_backoff_s",
                    "retry_backoff_max_s"):
            if get(key) is not None:
                kwargs[key] = float(get(key))
        if get("max_workers") is not None:
            kwargs["max_workers"] = int(get("max_workers"))
        token_env = critic_cfg["auth_token_env"] if "auth_token_env" in critic_cfg else DEFAULT_AUTH_TOKEN_ENV
        token = resolve_auth_token(get("auth_token"), token_env, environ, config_prefix="critic")
        return cls(str(get("host")), int(get("port")), auth_token=token, **kwargs)

    @property
    def auth_enabled(self) -> bool:
        """Whether this client sends the ``triton-access-token`` header."""
        return self._auth_token is not None

    @property
    def instance(self) -> str | None:
        """The server instance id this client is paired with (None before the first status/train)."""
        return self._instance

    # ---- plumbing ----

    def _model_config(self, model: str, timeout_s: float) -> Any:
        """Wait until ``model`` is ready (at most ``timeout_s``) and return its Triton config (cached)."""
        with self._configs_lock:
            if model in self._configs:
                return self._configs[model]
        from pytriton.client import ModelClient

        try:
            with ModelClient(
                self.url, model, init_timeout_s=timeout_s, inference_timeout_s=timeout_s, access_token=self._auth_token
            ) as client:
                client.wait_for_model(timeout_s)
                config = client.model_config
        except Exception as e:
            if _is_unavailable(e) or "timed out" in str(e):
                raise CriticServerUnavailable(self.url, model, timeout_s, f"{type(e).__name__}: {e}") from e
            raise
        with self._configs_lock:
            self._configs[model] = config
        self._reached = True
        return config

    def _call(
        self, model: str, timeout_s: float, batched: bool, inputs: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """One request, no retries."""
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
            access_token=self._auth_token,
        )
        try:
            outputs = client.infer_batch(**inputs) if batched else client.infer_sample(**inputs)
        except PyTritonClientInferenceServerError as e:
            if _is_model_not_loaded(e.message):  # a (re)starting server: its models are loading
                raise CriticServerUnavailable(self.url, model, timeout_s, f"model not loaded: {e.message}") from e
            self._reached = True
            message = _server_message(e.message)
            if ERROR_MARKER not in e.message and _AUTH_REFUSED.search(e.message):
                message += (
                    " (authentication: the server requires a token; the client sent "
                    + ("one that does not match" if self._auth_token else "none")
                    + f": set critic.auth_token_env / {DEFAULT_AUTH_TOKEN_ENV} to the server's token)"
                )
            raise CriticServerError(f"critic server {self.url} (model {model!r}) rejected the request: {message}") from e
        except Exception as e:
            if _is_unavailable(e):
                raise CriticServerUnavailable(self.url, model, timeout_s, f"{type(e).__name__}: {e}") from e
            raise
        finally:
            client.close()
        self._reached = True
        return outputs

    def _probe_ready(self, model: str, timeout_s: float) -> None:
        """Raise :class:`CriticServerUnavailable` unless ``GET /v2/models/<model>/ready`` answers 200."""
        timeout_s = max(0.1, min(timeout_s, 10.0))
        request = urllib.request.Request(f"{self.url}/v2/models/{model}/ready")
        if self._auth_token:
            request.add_header(AUTH_HEADER, self._auth_token)
        try:
            with _NO_PROXY.open(request, timeout=timeout_s) as response:
                if response.status == 200:
                    return
                cause = f"model not ready (HTTP {response.status})"
        except urllib.error.HTTPError as e:
            cause = f"model not ready (HTTP {e.code})"
        except (urllib.error.URLError, OSError) as e:
            cause = f"{type(e).__name__}: {e}"
        raise CriticServerUnavailable(self.url, model, timeout_s, cause)

    def _with_retries(self, model: str, timeout_s: float, attempt, before_retry=None):
        """Run ``attempt()``; retry it on :class:`CriticServerUnavailable` with exponential backoff.

        Gives up when ``retry_limit_s`` seconds have passed since the first failure (the last
        attempt starts no later than that), or at once if the server was never reached.
        ``before_retry()`` runs before each retry (after the readiness probe); it may raise.

        Returns:
            ``(result, attempts)``.
        """
        attempts, first_failure, delay = 0, None, self.retry_backoff_s
        while True:
            attempts += 1
            try:
                if attempts > 1:
                    self._probe_ready(model, timeout_s)
                    if before_retry is not None:
                        before_retry()
                result = attempt()
            except CriticServerUnavailable as e:
                now = time.monotonic()
                if first_failure is None:
                    first_failure = now
                    if not self._reached:
                        raise  # never reached: bounded by init_timeout_s, not retried
                waited = now - first_failure
                remaining = self.retry_limit_s - waited
                if remaining <= 0 or self._closing.is_set():
                    LOG.error(
                        "critic server %s (model %r): giving up after %d attempt(s) over %.1f s (retry limit %.1f s)",
                        self.url, model, attempts, waited, self.retry_limit_s,
                    )
                    raise CriticServerUnavailable(
                        self.url, model, timeout_s, e.cause, attempts, waited, self.retry_limit_s
                    ) from e
                pause = min(delay, self.retry_backoff_max_s, remaining)
                LOG.warning(
                    "critic server %s (model %r) unavailable (attempt %d, %.1f s since the first failure, "
                    "limit %.1f s); retrying in %.1f s: %s",
                    self.url, model, attempts, waited, self.retry_limit_s, pause, e.cause,
                )
                self._closing.wait(pause)
                delay = min(max(delay * 2, 1e-3), self.retry_backoff_max_s)
                continue
            if attempts > 1:
                LOG.warning(
                    "critic server %s (model %r) answered again after %d attempts (%.1f s)",
                    self.url, model, attempts, time.monotonic() - first_failure,
                )
            return result, attempts

    def _observe_instance(self, instance: str, adopt: bool = False) -> None:
        """Record the first instance id seen; raise :class:`CriticServerRestarted` if it changes
        (``adopt``: take the new one instead, after a ``load``)."""
        with self._instance_lock:
            old = self._instance
            if old is None or adopt:
                if old is not None and old != instance:
                    LOG.warning("critic server %s: now paired with instance %s (was %s) after load", self.url, instance, old)
                self._instance = instance
                return
        if instance != old:
            raise CriticServerRestarted(self.url, old, instance)

    def _status_once(self) -> dict[str, Any]:
        outputs = self._call(
            STATUS_MODEL, self.infer_timeout_s, batched=False, inputs={"ping": np.zeros(1, dtype=np.int64)}
        )
        return json.loads(outputs["status"][0])

    def _check_instance(self) -> dict[str, Any]:
        """One ``critic_status`` request (not retried); raises if the instance changed."""
        status = self._status_once()
        self._observe_instance(str(status["instance"]))
        return status

    # ---- public API ----

    def wait_until_ready(self, timeout_s: float | None = None) -> None:
        """Block until the server and all five models are ready; record the server's instance id.

        Args:
            timeout_s: total limit in seconds (default ``init_timeout_s``).

        Raises:
            CriticServerUnavailable: if not ready in time.
            CriticServerRestarted: the server is not the instance this client saw before.
        """
        timeout_s = self.init_timeout_s if timeout_s is None else float(timeout_s)
        deadline = time.monotonic() + timeout_s
        for model in ALL_MODELS:
            self._model_config(model, max(0.1, deadline - time.monotonic()))
        self._check_instance()

    def status(self) -> dict[str, Any]:
        """The server's ``{"instance": ..., "train_steps": n, ...}`` (retried like :meth:`infer`).

        Raises:
            CriticServerRestarted: the instance differs from the first one this client saw.
            CriticServerUnavailable: as for :meth:`infer`.
        """
        status, _ = self._with_retries(STATUS_MODEL, self.infer_timeout_s, self._status_once)
        self._observe_instance(str(status["instance"]))
        return status

    def infer(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Critic values and rewards for a batch (blocking).

        Args:
            tokens: ``[B, S]`` int64 token ids.
            lengths: ``[B]`` int64 valid lengths, ``1 <= lengths[b] <= S``.

        Returns:
            ``(values [B, S] float32, rewards [B] float32)``.

        Raises:
            ValueError: an input is empty (``B = 0`` or ``S = 0``), checked before sending.
            CriticServerError: the server rejected the request (message says why); not retried.
            CriticServerUnavailable: no answer within ``infer_timeout_s``, retried until
                ``retry_limit_s`` (or not ready within ``init_timeout_s`` before the server was
                ever reached).
            CriticServerRestarted: the request succeeded after retries, but on a restarted server.
        """
        lengths = np.asarray(lengths)
        inputs = {"tokens": tokens, "sequence_lengths": lengths[:, None] if lengths.ndim == 1 else lengths}
        outputs, attempts = self._with_retries(
            INFER_MODEL, self.infer_timeout_s, lambda: self._call(INFER_MODEL, self.infer_timeout_s, True, inputs)
        )
        if attempts > 1:
            self.status()  # one extra request, only after failures: was the server restarted?
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
        self,
        tokens: np.ndarray,
        returns: np.ndarray,
        prev_values: np.ndarray,
        mask: np.ndarray,
        request_id: str | None = None,
    ) -> dict[str, float]:
        """One critic optimizer step on the server (blocking; one call = at most one step).

        Args:
            tokens: ``[B, S]`` int64.
            returns: ``[B, S]`` float32 GAE returns.
            prev_values: ``[B, S]`` float32 rollout-time values.
            mask: ``[B, S]`` float32 loss mask.
            request_id: idempotency key (default: a new uuid4). Retries of this call reuse it, and
                the server applies a given id at most once (it remembers its last 64 ids).

        Returns:
            The backend's metrics, including ``"loss"`` (floats; the server's ``"instance"`` is
            consumed by the client).

        Raises:
            CriticServerError / CriticServerUnavailable: as for :meth:`infer`, with
                ``train_timeout_s``.
            CriticServerRestarted: the server that answered (or would answer a retry) is not the
                one this client trained before.
        """
        request_id = uuid.uuid4().hex if request_id is None else str(request_id)
        inputs = {
            "tokens": tokens,
            "returns": returns,
            "prev_values": prev_values,
            "mask": mask,
            "request_id": np.array([request_id.encode("utf-8")], dtype=np.object_),
        }
        outputs, _ = self._with_retries(
            TRAIN_MODEL,
            self.train_timeout_s,
            lambda: self._call(TRAIN_MODEL, self.train_timeout_s, False, inputs),
            before_retry=self._check_instance,  # never retry onto a restarted server
        )
        metrics = json.loads(outputs["metrics"][0])
        instance = metrics.pop("instance", None)
        if instance is not None:
            self._observe_instance(str(instance))
        return metrics

    def save(self, path: str) -> None:
        """Ask the server to write a critic checkpoint to the directory ``path``.

        ``path`` is made absolute here (``os.path.abspath``: the actor and the server must see the
        same filesystem at the same paths) and must lie inside the server's checkpoint root
        (``server.checkpoint_root``); an existing ``path`` that is not a nemo-rlhf checkpoint is
        refused by the server and left as it is. The server's instance is checked before and after
        (a restarted server's critic is not the one trained with the actor); unavailability is
        retried (a save rewrites the same path).

        Raises:
            CriticServerError / CriticServerUnavailable: as for :meth:`train`.
            CriticServerRestarted: the server was restarted since this client last saw it.
        """
        inputs = {"path": np.array([_absolute(path).encode("utf-8")], dtype=np.object_)}
        self.status()
        outputs, _ = self._with_retries(
            SAVE_MODEL,
            self.train_timeout_s,
            lambda: self._call(SAVE_MODEL, self.train_timeout_s, False, inputs),
            before_retry=self._check_instance,
        )
        if not bool(outputs["ok"][0]):
            raise CriticServerError(f"critic server {self.url} could not save to {path!r}")
        self.status()

    def load(self, path: str) -> dict[str, float]:
        """Ask the server to restore the critic from a :meth:`save` checkpoint at ``path``.

        ``path`` is made absolute as for :meth:`save` and must be a complete checkpoint inside the
        server's checkpoint root. Unavailability is retried (loading twice gives the same state). Afterwards the server's
        critic is the checkpoint's, so the instance it reports becomes this client's reference:
        loading the paired checkpoint into a restarted server is how a run recovers.

        Returns:
            the critic's state, at least ``{"step": n}`` (critic optimizer steps taken).

        Raises:
            CriticServerError: no complete checkpoint at ``path``, or ``path`` outside the server's
                checkpoint root (the message names it).
            CriticServerUnavailable: as for :meth:`train`.
        """
        inputs = {"path": np.array([_absolute(path).encode("utf-8")], dtype=np.object_)}
        outputs, _ = self._with_retries(
            LOAD_MODEL, self.train_timeout_s, lambda: self._call(LOAD_MODEL, self.train_timeout_s, False, inputs)
        )
        state = json.loads(outputs["state"][0])
        status, _ = self._with_retries(STATUS_MODEL, self.infer_timeout_s, self._status_once)
        self._observe_instance(str(status["instance"]), adopt=True)
        return state

    def close(self) -> None:
        """Stop retrying, wait for in-flight :meth:`infer_async` calls, release the threads (idempotent)."""
        self._closed = True
        self._closing.set()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> CriticClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
