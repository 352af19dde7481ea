"""Run the critic server as a subprocess: start, wait for readiness, stop without orphans."""

from __future__ import annotations

import glob
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from nemo_rlhf.servers.critic_server import SHM_DIR, server_workspace_prefix, triton_env_fix
from nemo_rlhf.servers.protocol import ALL_MODELS, INFER_MODEL, CriticServerUnavailable

LOG = logging.getLogger("nemo_rlhf")
_LOG_TAIL_LINES = 30


def _ephemeral_low() -> int:
    """The lowest port of the OS's ephemeral range (Linux ``ip_local_port_range``; 32768 if unreadable)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def find_free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports that were free on ``host`` a moment ago.

    Drawn at random below the OS's ephemeral range (from 10000 up to ``ip_local_port_range``'s low
    end), so that the outgoing connections every process opens meanwhile (clients, the Triton
    stubs, gloo) cannot take them before the server binds: a gRPC port picked by ``bind(0)`` was
    once taken that way under load ("No address added ... Unable to configure socket"). Another
    process may still bind one on purpose. All ``n`` sockets are held open together, so the ports
    are distinct. Falls back to ports the OS picks (``bind(0)``) when no range is left.

    Raises:
        ValueError: if ``n < 1``.
    """
    import random

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    low, high = 10000, _ephemeral_low() - 1
    rng = random.Random()
    sockets: list[socket.socket] = []
    try:
        tries = 0
        while len(sockets) < n and high > low and tries < 200:
            tries += 1
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((host, rng.randint(low, high)))
            except OSError:
                s.close()
                continue
            sockets.append(s)
        while len(sockets) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _log_tail(path: Path, n: int = _LOG_TAIL_LINES) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=n))
    except OSError as e:
        return f"<could not read {path}: {e}>"


def _http_ok(url: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _descendants(pid: int) -> list[int]:
    """PIDs of all live descendants of ``pid`` (Linux ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # fields after "(comm)": state, ppid, ...
        children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def remove_server_leftovers(pids: list[int], shm_dir: str = SHM_DIR) -> list[str]:
    """Remove what stopped critic server processes ``pids`` (of this host) could not clean up.

    A server killed before PyTriton's own clean-up leaves its shared-memory tensor stores
    (``<shm_dir>/pytrtion<pid>-*``, 4 MB each, in RAM: ``/dev/shm``) and its workspace
    (``server_workspace_prefix(pid) + <instance>``: model store, sockets, a copy of the Triton
    binaries, ~22 MB). Before this existed, every stop by SIGKILL left both behind (measured on the
    CI machine: 464 stores, 1.9 GB of ``/dev/shm``, and 178 workspaces, 3.8 GB). Call it only once
    the processes are gone: a live server's files would be removed from under it.

    Args:
        pids: the server process and its descendants (any of them may have run ``Triton(...)``).
        shm_dir: where the shared-memory stores live (``/dev/shm``; tests pass a temporary folder).

    Returns:
        The paths removed (none after a clean exit).
    """
    removed: list[str] = []
    for pid in pids:
        for path in glob.glob(os.path.join(shm_dir, f"pytrtion{int(pid)}-*")):
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
        for path in glob.glob(glob.escape(server_workspace_prefix(pid)) + "*"):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class ServerProcess:
    """A critic server subprocess in its own process group (see :func:`start_server_process`).

    Attributes:
        popen: the ``subprocess.Popen`` of the server command.
        url: ``http://host:http_port``.
        log_path: file receiving the server's stdout and stderr.
    """

    def __init__(self, popen: subprocess.Popen, url: str, log_path: Path):
        self.popen = popen
        self.url = url
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = _LOG_TAIL_LINES) -> str:
        """Last ``n`` lines of the server log."""
        return _log_tail(self.log_path, n)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM the process group, wait up to ``timeout_s`` seconds, then SIGKILL.

        Descendants that left the group (e.g. with ``setsid``) are found through ``/proc`` before
        signalling and killed as well, so no ``tritonserver`` or backend stub outlives the server.
        A server exits by itself ~11 s after SIGTERM on an idle 2-core CPU (Triton unloads the
        models, then PyTriton closes one model's connections a second at a time and removes its
        workspace); the default waits for that. Whatever a killed server left behind (shared memory,
        workspace) is removed afterwards (:func:`remove_server_leftovers`).

        Returns:
            The server's exit code (negative: killed by that signal), or None if it could not be
            reaped.
        """
        pgid = self.popen.pid  # start_new_session=True: the server leads its own group
        strays = _descendants(self.popen.pid)
        if self.popen.poll() is None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left in the group or among the descendants gets SIGKILL.
        _signal_group(pgid, signal.SIGKILL)
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            code = self.popen.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            return None
        left = remove_server_leftovers([self.popen.pid, *strays])
        if left:
            LOG.info("critic server %s: removed %d files it left behind (shared memory, workspace)", self.url, len(left))
        return code

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# Start-up failures of a critic server under heavy CPU load, each given as the substrings that all
# appear in the log of the failed start. Nothing was served yet, so starting again is safe.
# 1. Triton's python backend aborts the whole server when a model's stub process is slow to attach to
#    its shared memory (load average 10+ on 2 cores: "terminate called after throwing an instance of
#    'boost::interprocess::lock_exception'", Signal 6, during TRITONBACKEND_ModelInstanceInitialize).
# 2. PyTriton loads the models through Triton's HTTP API with a 60-s network timeout; a load that
#    takes longer (three pytest workers on 2 cores, 2026-12-03: twice in one run) raises
#    "TimeoutError: timed out" in tritonclient and the server exits with code 1.
TRANSIENT_START_FAILURES = (
    ("boost::interprocess::lock_exception",),
    ("tritonclient/http/_client.py", "TimeoutError: timed out"),
)


def start_server_process(
    cmd: list[str],
    host: str,
    http_port: int,
    ready_timeout_s: float,
    log_path: str | os.PathLike,
    start_attempts: int = 3,
) -> ServerProcess:
    """Start ``cmd`` (a critic server) and wait until it serves all its models.

    The command runs in a new session/process group, with this process's environment plus the
    ``LD_LIBRARY_PATH`` fix of :func:`~nemo_rlhf.servers.critic_server.triton_env_fix`, and
    stdout and stderr appended to ``log_path``. Readiness means ``GET /v2/health/ready`` and
    ``GET /v2/models/<model>/ready`` for each model of
    :data:`~nemo_rlhf.servers.protocol.ALL_MODELS` answer 200 (PyTriton loads the models one
    after the other once HTTP is up).

    Args:
        cmd: argv of the server, e.g. ``[sys.executable, "-m", "...", "--http-port", "8000"]``.
        host, http_port: where the server's HTTP endpoint will listen.
        ready_timeout_s: seconds to wait for readiness (per attempt).
        log_path: file for the server's output (parent directories are created).
        start_attempts: starts in all when the server dies before it is ready with one of the
            :data:`TRANSIENT_START_FAILURES` in its log (Triton's start-up abort, or a model load
            past PyTriton's timeout, under CPU contention); each retry is logged at WARNING. Any
            other early exit is not retried.

    Returns:
        The running :class:`ServerProcess`.

    Raises:
        CriticServerUnavailable: if the process exits early (after the last attempt, for a
            transient failure) or is not ready in time (the process group is then stopped); the
            message includes the last 30 log lines.
    """
    for attempt in range(1, max(int(start_attempts), 1) + 1):
        offset = Path(log_path).stat().st_size if Path(log_path).exists() else 0
        try:
            return _start_once(cmd, host, http_port, ready_timeout_s, log_path)
        except CriticServerUnavailable as exc:
            with open(log_path, "rb") as f:
                f.seek(offset)
                this_attempt = f.read().decode("utf-8", "replace")
            transient = next((sig for sig in TRANSIENT_START_FAILURES if all(s in this_attempt for s in sig)), None)
            if transient is None or attempt >= start_attempts:
                raise
            LOG.warning("critic server %s:%d died while loading its models (%s, a known start-up failure "
                        "under CPU contention); starting it again (attempt %d of %d): %s", host, http_port,
                        " ... ".join(transient), attempt + 1, start_attempts, exc.__class__.__name__)
    raise AssertionError("unreachable")


def _start_once(cmd: list[str], host: str, http_port: int, ready_timeout_s: float,
                log_path: str | os.PathLike) -> ServerProcess:
    """One start of :func:`start_server_process` (no retry)."""
    url = f"http://{host}:{http_port}"
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    triton_env_fix(env)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    server = ServerProcess(popen, url, log_path)
    deadline = time.monotonic() + ready_timeout_s
    while True:
        code = popen.poll()
        if code is not None:
            server.stop()  # reap anything it left behind in its group
            cause = f"server process exited with code {code}; last lines of {log_path}:\n{server.log_tail()}"
            raise CriticServerUnavailable(url, INFER_MODEL, ready_timeout_s, cause)
        if _http_ok(f"{url}/v2/health/ready", 1.0) and all(
            _http_ok(f"{url}/v2/models/{model}/ready", 1.0) for model in ALL_MODELS
        ):
            return server
        if time.monotonic() >= deadline:
            server.stop()
            cause = f"server not ready in time (process stopped); last lines of {log_path}:\n{server.log_tail()}"
            raise CriticServerUnavailable(url, INFER_MODEL, ready_timeout_s, cause)
        time.sleep(0.25)
