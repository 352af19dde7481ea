"""Contract between the PyTriton critic server and the model that serves it.

The critic server (``critic_server.py``) is model-agnostic: it validates requests, serializes
them, and calls a :class:`CriticBackend`. The real backend (a Megatron GPT critic with a value
head) implements this protocol elsewhere; the tests use a tiny pure-torch backend.

Names of the Triton models and their tensors are defined here so that server and client agree.
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Protocol, runtime_checkable

import numpy as np

# Triton model names bound by CriticServer.
INFER_MODEL = "critic_infer"
TRAIN_MODEL = "critic_train"
SAVE_MODEL = "critic_save"
LOAD_MODEL = "critic_load"
STATUS_MODEL = "critic_status"
ALL_MODELS = (INFER_MODEL, TRAIN_MODEL, SAVE_MODEL, LOAD_MODEL, STATUS_MODEL)

# Leads every error reply the server makes for a refused or failed request; the client looks for it.
ERROR_MARKER = "CRITIC_REQUEST_ERROR"


@runtime_checkable
class CriticBackend(Protocol):
    """What :class:`~nemo_rlhf.servers.critic_server.CriticServer` calls.

    The server guarantees that the arrays it passes were validated (dtype, rank, shapes,
    ``1 <= lengths <= S <= max_seq_len``, ``0 <= tokens < vocab_size``, finite floats), that a
    ``save``/``load`` path is resolved and inside the server's checkpoint root, that ``save``
    replaces nothing but a complete checkpoint, and that ``load`` gets a complete checkpoint and that calls never overlap
    (one lock around every call), so implementations need not be thread-safe.

    Attributes:
        max_seq_len: largest sequence length ``S`` the backend accepts (tokens).
        vocab_size: number of token ids the model was built for (the unpadded vocabulary); the
            server refuses any token id outside ``0 <= id < vocab_size`` before the backend sees
            it (an out-of-range embedding index is a device-side assert on a GPU).
    """

    max_seq_len: int
    vocab_size: int

    def infer(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Value estimates of the critic and the sequence reward.

        Args:
            tokens: ``[B, S]`` int64 token ids, right-padded.
            lengths: ``[B]`` int64 number of valid tokens per row, ``1 <= lengths[b] <= S``.

        Returns:
            ``(values, rewards)``: ``values`` ``[B, S]`` float32 value estimate V(s_t) per
            position (positions ``>= lengths[b]`` are padding, any value); ``rewards`` ``[B]``
            float32 reward-model score of each full sequence.
        """
        ...

    def train(
        self,
        tokens: np.ndarray,
        returns: np.ndarray,
        prev_values: np.ndarray,
        mask: np.ndarray,
    ) -> dict[str, float]:
        """One optimizer step of the critic (value) loss on one batch.

        Args:
            tokens: ``[B, S]`` int64 token ids.
            returns: ``[B, S]`` float32 GAE returns (regression targets).
            prev_values: ``[B, S]`` float32 values at rollout time (for value clipping).
            mask: ``[B, S]`` float32, 1.0 on positions that enter the loss, else 0.0.

        Returns:
            Scalar metrics of the step; must contain ``"loss"``.
        """
        ...

    def save(self, path: str) -> None:
        """Write a checkpoint of the critic to the directory ``path``: everything :meth:`load`
        needs to continue training exactly (weights, optimizer, step, RNG), in the layout of
        :func:`nemo_rlhf.checkpoint.training_state.save_checkpoint_dir` (written atomically through
        ``path.tmp``, with ``state.json`` holding ``"step"`` and the ``COMPLETE`` marker last), so
        that the server recognises it as a checkpoint it may replace or load."""
        ...

    def load(self, path: str) -> dict[str, float]:
        """Restore the critic from a checkpoint written by :meth:`save` (PPO resume).

        Returns:
            at least ``{"step": <critic optimizer steps taken>}``.

        Raises:
            Exception: the path holds no complete checkpoint (the message names it).
        """
        ...


class CriticServerError(RuntimeError):
    """The critic server answered with an error (e.g. a request that failed validation).

    The message carries the server's explanation.
    """


class CriticServerUnavailable(CriticServerError):
    """The critic server could not be reached, or did not answer within the timeout.

    The message names the URL (host and port), the Triton model, the timeout in seconds and the
    underlying cause; when the client retried (``attempts`` > 1 or ``retry_limit_s`` given) it
    also names the number of attempts and the seconds spent retrying.

    Attributes:
        url, model, timeout_s, cause: as given.
        attempts: requests sent before giving up (1 = not retried).
        waited_s: seconds from the first failure to giving up (0.0 = not retried).
        retry_limit_s: the client's retry limit, or None when no retry loop was involved.
    """

    def __init__(
        self,
        url: str,
        model: str,
        timeout_s: float,
        cause: str,
        attempts: int = 1,
        waited_s: float = 0.0,
        retry_limit_s: float | None = None,
    ):
        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        self.cause = cause
        self.attempts = attempts
        self.waited_s = waited_s
        self.retry_limit_s = retry_limit_s
        message = f"critic server {url} (model {model!r}) did not answer within {timeout_s:.1f} s: {cause}"
        if retry_limit_s is not None:
            message = (
                f"critic server {url} (model {model!r}) unavailable: gave up after {attempts} attempt(s) "
                f"over {waited_s:.1f} s of retrying (retry limit {retry_limit_s:.1f} s); last cause: "
                f"did not answer within {timeout_s:.1f} s: {cause}"
            )
        super().__init__(message)

    def __reduce__(self):  # picklable (e.g. through a process pool) despite the extra arguments
        return (
            type(self),
            (self.url, self.model, self.timeout_s, self.cause, self.attempts, self.waited_s, self.retry_limit_s),
        )


class CriticServerRestarted(CriticServerError):
    """The critic server answered, but it is not the server process this client talked to before.

    Detected from the server's ``instance`` id (a uuid4 drawn when the server starts, reported by
    ``critic_status`` and by every ``critic_train`` reply). A restarted server has lost every
    critic update since its last checkpoint, so continuing would silently pair the actor with a
    different critic: the run must resume from its last paired (actor + critic) checkpoint.

    Attributes:
        url: the server's URL.
        old_instance, new_instance: the instance ids seen first and now.
    """

    def __init__(self, url: str, old_instance: str, new_instance: str):
        self.url = url
        self.old_instance = old_instance
        self.new_instance = new_instance
        super().__init__(
            f"critic server {url} was restarted (instance {old_instance} -> {new_instance}): the server's "
            f"critic state since its last checkpoint is lost; the run must resume from the last paired "
            f"actor+critic checkpoint"
        )

    def __reduce__(self):
        return (type(self), (self.url, self.old_instance, self.new_instance))


# ---- authentication (Triton's restricted-API header) ----

# Environment variable read for the shared token when the config names none (server and client).
DEFAULT_AUTH_TOKEN_ENV = "NEMO_RLHF_CRITIC_TOKEN"
# The HTTP header Triton checks on restricted APIs (PyTriton's TRITON_ACCESS_HEADER).
AUTH_HEADER = "triton-access-token"
_TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9_.~-]{16,512}$")


def validate_auth_token(token: str, source: str) -> str:
    """Check a shared token and return it.

    Args:
        token: the token text.
        source: where it came from (a config key or environment variable), for the message.

    Raises:
        ValueError: not 16 to 512 characters of ``A-Z a-z 0-9 _ . ~ -`` (Triton parses the token
            out of ``--http-restricted-api=<apis>:<header>=<token>``, so separators are not
            allowed); the message names ``source`` but never contains the token.
    """
    if not isinstance(token, str) or not _TOKEN_PATTERN.match(token):
        length = len(token) if isinstance(token, str) else type(token).__name__
        raise ValueError(
            f"critic auth token from {source} is invalid (length {length}); expected 16 to 512 characters of "
            f"A-Z a-z 0-9 _ . ~ - (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


def resolve_auth_token(
    token: str | None = None,
    token_env: str | None = DEFAULT_AUTH_TOKEN_ENV,
    environ: Mapping[str, str] | None = None,
    config_prefix: str = "server",
) -> str | None:
    """The shared token of the critic server and its clients, or ``None`` (authentication off).

    ``token`` (``<prefix>.auth_token``) wins when set; otherwise the environment variable named
    ``token_env`` (``<prefix>.auth_token_env``, default :data:`DEFAULT_AUTH_TOKEN_ENV`) when it is
    set and non-empty. Prefer the environment variable: a token in a config file ends up in logs
    and on shared filesystems.

    Raises:
        ValueError: the token is malformed (see :func:`validate_auth_token`).
    """
    environ = os.environ if environ is None else environ
    if token not in (None, ""):
        return validate_auth_token(str(token), f"{config_prefix}.auth_token")
    if token_env:
        value = environ.get(str(token_env), "")
        if value:
            return validate_auth_token(value, f"environment variable {token_env} ({config_prefix}.auth_token_env)")
    return None
