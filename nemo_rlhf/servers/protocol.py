"""Contract between the PyTriton critic server and the model that serves it.

The critic server (``critic_server.py``) is model-agnostic: it validates requests, serializes
them, and calls a :class:`CriticBackend`. The real backend (a Megatron GPT critic with a value
head) implements this protocol elsewhere; the tests use a tiny pure-torch backend.

Names of the Triton models and their tensors are defined here so that server and client agree.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

# Triton model names bound by CriticServer.
INFER_MODEL = "critic_infer"
TRAIN_MODEL = "critic_train"
SAVE_MODEL = "critic_save"
LOAD_MODEL = "critic_load"
STATUS_MODEL = "critic_status"
ALL_MODELS = (INFER_MODEL, TRAIN_MODEL, SAVE_MODEL, LOAD_MODEL, STATUS_MODEL)


@runtime_checkable
class CriticBackend(Protocol):
    """What :class:`~nemo_rlhf.servers.critic_server.CriticServer` calls.

    The server guarantees that the arrays it passes were validated (dtype, rank, shapes,
    ``1 <= lengths <= S <= max_seq_len``, finite floats) and that calls never overlap
    (one lock around every call), so implementations need not be thread-safe.

    Attributes:
        max_seq_len: largest sequence length ``S`` the backend accepts (tokens).
    """

    max_seq_len: int

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
        """Write a checkpoint of the critic to ``path`` (a file or directory path): everything
        :meth:`load` needs to continue training exactly (weights, optimizer, step, RNG)."""
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
