"""Where ``critic_save`` / ``critic_load`` may write and read (issue 9).

A request names a path; the server accepts it only inside its checkpoint root
(``server.checkpoint_root``, default the server's ``run_dir``), judged after ``..`` and every
symbolic link are resolved (:func:`os.path.realpath`), and acts on the *resolved* path. A relative
path is taken relative to the checkpoint root.

``critic_save`` replaces or deletes only checkpoints this project wrote. The backends write a
checkpoint ``P`` atomically (:func:`nemo_rlhf.checkpoint.weights.begin_atomic_dir` /
``commit_atomic_dir``): they (re)create ``P.tmp``, and swap an existing ``P`` out through
``P.old``, deleting both. So ``P``, ``P.tmp`` and ``P.old`` must each be absent or a complete
training checkpoint written by :mod:`nemo_rlhf.checkpoint.training_state` — a directory (not a
symbolic link) holding the ``COMPLETE`` marker and a ``state.json`` whose ``"step"`` is an integer
(:func:`checkpoint_problem`). Anything else is refused before the backend is called, so nothing on
disk changes. ``critic_load`` requires the same of ``P``.

Limitation: the checks and the backend's write are not one atomic operation; a process that can
write inside the root could swap a directory for a symbolic link between them. The root should
therefore be writable only by the server's user and the run's own processes.
"""

from __future__ import annotations

import json
import os

# Same value as nemo_rlhf.checkpoint.weights.COMPLETE_MARKER (checked by tests/servers); not
# imported, so that the client side does not import torch through this module.
COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "state.json"
_MAX_STATE_BYTES = 1 << 20


class PathRejected(ValueError):
    """A ``critic_save``/``critic_load`` path the server refuses; the message says why."""


def real_root(root: str | os.PathLike) -> str:
    """The checkpoint root as an absolute path with ``..`` and symbolic links resolved.

    Raises:
        ValueError: ``root`` is empty, or exists and is not a directory.
    """
    text = os.fspath(root)
    if not text:
        raise ValueError("server.checkpoint_root is empty; expected a directory")
    resolved = os.path.realpath(text)
    if os.path.exists(resolved) and not os.path.isdir(resolved):
        raise ValueError(f"server.checkpoint_root {text!r} resolves to {resolved}, which is not a directory")
    return resolved


def resolve_under_root(root: str, text: str) -> str:
    """Resolve a requested path and check that it lies strictly inside ``root``.

    Args:
        root: the checkpoint root, already resolved by :func:`real_root`.
        text: the path from the request (absolute, or relative to ``root``).

    Returns:
        the absolute path with ``..`` and symbolic links resolved.

    Raises:
        PathRejected: the resolved path is ``root`` itself or outside it.
    """
    joined = text if os.path.isabs(text) else os.path.join(root, text)
    full = os.path.realpath(joined)
    if full == root or os.path.commonpath([full, root]) != root:
        raise PathRejected(
            f"input 'path' {text!r} resolves to {full} (after '..' and symbolic links), which is not inside the "
            f"server's checkpoint root; expected a path inside {root} (server.checkpoint_root)"
        )
    return full


def checkpoint_problem(path: str) -> str | None:
    """Why ``path`` is not a complete checkpoint written by nemo-rlhf, or ``None`` if it is one.

    A checkpoint is a directory (not a symbolic link) with a regular file ``COMPLETE`` and a regular
    file ``state.json`` holding a JSON object whose ``"step"`` is an integer — what
    :func:`nemo_rlhf.checkpoint.training_state.save_checkpoint_dir` writes.
    """
    if os.path.islink(path):
        return "is a symbolic link"
    if not os.path.exists(path):
        return "does not exist"
    if not os.path.isdir(path):
        return "is not a directory"
    marker = os.path.join(path, COMPLETE_MARKER)
    if os.path.islink(marker) or not os.path.isfile(marker):
        return f"has no {COMPLETE_MARKER} marker"
    state_path = os.path.join(path, STATE_FILE)
    if os.path.islink(state_path) or not os.path.isfile(state_path):
        return f"has no {STATE_FILE}"
    try:
        if os.path.getsize(state_path) > _MAX_STATE_BYTES:
            return f"has a {STATE_FILE} larger than {_MAX_STATE_BYTES} bytes"
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as exc:
        return f"has an unreadable {STATE_FILE} ({type(exc).__name__})"
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool):
        return f"has a {STATE_FILE} without an integer 'step'"
    return None


def check_save_path(root: str, text: str) -> str:
    """The resolved path ``critic_save`` may write, after checking that writing it destroys nothing
    but checkpoints this project wrote (see the module docstring).

    Args:
        root: the checkpoint root, already resolved by :func:`real_root`.
        text: the path from the request.

    Returns:
        the resolved path to pass to the backend.

    Raises:
        PathRejected: outside the root, or ``P`` / ``P.tmp`` / ``P.old`` exists and is not a
            complete nemo-rlhf checkpoint (the message names which and why).
    """
    full = resolve_under_root(root, text)
    for candidate in (full, full + ".tmp", full + ".old"):
        if not os.path.lexists(candidate):
            continue
        problem = checkpoint_problem(candidate)
        if problem is not None:
            raise PathRejected(
                f"input 'path' {text!r}: {candidate} exists and {problem}, so it is not a checkpoint written by "
                f"nemo-rlhf and critic_save will not replace it (nothing was changed); expected a new path or an "
                f"existing critic checkpoint inside {root}"
            )
    return full


def check_load_path(root: str, text: str) -> str:
    """The resolved path ``critic_load`` may read: inside the root and a complete checkpoint.

    Raises:
        PathRejected: outside the root, or not a complete nemo-rlhf checkpoint (the message
            contains ``missing COMPLETE`` when the marker is absent or the path does not exist).
    """
    full = resolve_under_root(root, text)
    problem = checkpoint_problem(full)
    if problem is not None:
        if problem == "does not exist":
            problem = f"it does not exist: missing {COMPLETE_MARKER} marker"
        elif problem == f"has no {COMPLETE_MARKER} marker":
            problem = f"missing {COMPLETE_MARKER} marker"
        raise PathRejected(
            f"input 'path' {text!r}: no complete checkpoint at {full} ({problem}); expected a directory written "
            f"by critic_save inside {root}"
        )
    return full
