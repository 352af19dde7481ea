"""Run the launchers from tests in processes forked from one pre-imported server.

Every ``python launchers/<x>.py`` a test starts pays ~6 s of CPU importing torch, megatron-core,
Lightning and nemo_rlhf before it does anything, and CI starts about fifty of them on its two
cores. Here one server process per pytest worker imports all that once; each launcher run is a
fork of it that runs the script as ``__main__``, as ``python SCRIPT ARGS`` would (``python -m
nemo_rlhf.<module> ARGS`` too):

- ``sys.argv = [SCRIPT, *ARGS]``, the script's folder first on ``sys.path``, the requested working
  directory and environment (``os.environ`` replaced), stdin/stdout/stderr from the caller's file
  descriptors (passed over a Unix socket), its own session when asked (``start_new_session``);
- it exits the way the interpreter does (``SystemExit`` code, 1 and a traceback on an uncaught
  exception, atexit handlers and non-daemon threads joined), and the server reports the exit status
  as ``subprocess`` does (``-N`` for a signal);
- the caller gets a :class:`ForkedProcess` with the part of ``subprocess.Popen`` the tests use
  (``pid``, ``poll``, ``wait``, ``communicate``, ``send_signal``, ``terminate``, ``kill``,
  ``returncode``, ``stdout``), so signals go to the launcher process itself.

:func:`popen` and :func:`run` fall back to ``subprocess`` for any other command, for a request whose
``OMP_NUM_THREADS`` differs from the server's (torch reads it once), and everywhere when
``NEMO_RLHF_TEST_NO_FORK=1``. The server starts no thread before forking (checked, as in
``tests/multiprocess/fork_launch.py``) and dies with the pytest worker that started it.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = REPO / "launchers"
_MAX_FDS = 3


# ----------------------------------------------------------------------------------------- server
def _preload() -> None:
    """The imports every launcher makes (inside its Hydra entry point), once."""
    import hydra  # noqa: F401
    import lightning.pytorch  # noqa: F401
    import megatron.core  # noqa: F401
    import torch  # noqa: F401

    import nemo_rlhf.algorithms.dpo  # noqa: F401
    import nemo_rlhf.algorithms.grpo  # noqa: F401
    import nemo_rlhf.algorithms.ilql  # noqa: F401
    import nemo_rlhf.algorithms.ppo  # noqa: F401
    import nemo_rlhf.algorithms.rejection_sampling  # noqa: F401
    import nemo_rlhf.algorithms.reward_model  # noqa: F401
    import nemo_rlhf.algorithms.rloo  # noqa: F401
    import nemo_rlhf.algorithms.sft  # noqa: F401
    import nemo_rlhf.checkpoint.training_state  # noqa: F401
    import nemo_rlhf.config  # noqa: F401
    import nemo_rlhf.evaluation.generate  # noqa: F401


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def _send(conn: socket.socket, msg: dict) -> None:
    try:
        conn.sendall((json.dumps(msg) + "\n").encode())
    except OSError:  # the caller went away; its process still runs to its end
        pass


def _serve(path: str) -> Optional[dict]:
    """Accept requests until stdin closes (the pytest worker ended). Returns only in a forked
    child: the request it is to run."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    print("ready", flush=True)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(sys.stdin, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    while True:
        for key, _ in sel.select(timeout=0.05):
            if key.fileobj is sys.stdin:
                if not sys.stdin.readline():
                    return None
                continue
            conn, _ = listener.accept()
            data, fds, _, _ = socket.recv_fds(conn, 1 << 20, _MAX_FDS)
            while not data.endswith(b"\n"):
                more = conn.recv(1 << 20)
                if not more:
                    break
                data += more
            request = json.loads(data)
            if threading.active_count() != 1:
                _send(conn, {"error": f"{threading.active_count()} threads in the fork server; fork needs one"})
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                listener.close()
                sel.close()
                for other in children.values():
                    other.close()
                conn.close()
                for target, fd in zip((0, 1, 2), fds):
                    os.dup2(fd, target)
                for fd in fds:
                    os.close(fd)
                return request
            for fd in fds:
                os.close(fd)
            children[pid] = conn
            _send(conn, {"pid": pid})
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                _send(conn, {"returncode": os.waitstatus_to_exitcode(status)})
                conn.close()


def _server_main(path: str) -> None:
    _die_with_parent()
    _preload()
    request = _serve(path)
    if request is None:
        return
    # A forked child: become ``python SCRIPT ARGS`` and let the interpreter exit as it would.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if request["new_session"]:
        os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    import runpy

    argv = list(request["argv"])
    if argv[0] == "-m":  # python -m MODULE ARGS: the working directory first on sys.path
        sys.argv = argv[1:]
        sys.path[0] = os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return
    sys.argv = argv
    sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
    runpy.run_path(argv[0], run_name="__main__")


# ----------------------------------------------------------------------------------------- client
class _Server:
    """The fork server of this process (started on first use)."""

    def __init__(self, env: dict) -> None:
        self.dir = tempfile.mkdtemp(prefix="nemo_rlhf_fork_")
        self.path = os.path.join(self.dir, "sock")
        self.omp = env.get("OMP_NUM_THREADS")
        self.proc = subprocess.Popen([sys.executable, __file__, self.path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, cwd=str(REPO), text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"fork server did not start (exit status {self.proc.poll()}): {line!r}")
        atexit.register(self.close)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        try:
            os.unlink(self.path)
            os.rmdir(self.dir)
        except OSError:
            pass


_SERVER: Optional[_Server] = None


def _server(env: dict) -> Optional[_Server]:
    global _SERVER
    if _SERVER is None or not _SERVER.alive():
        _SERVER = _Server(env)
    return _SERVER if _SERVER.omp == env.get("OMP_NUM_THREADS") else None


class ForkedProcess:
    """A launcher run in a fork of the server: the subset of ``subprocess.Popen`` the tests use."""

    def __init__(self, conn: socket.socket, argv: list[str], stdout: Any, stderr: Any, text: bool) -> None:
        self._conn = conn
        self._buf = b""
        self.args = argv
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: Optional[int] = None
        self._text = text
        msg = self._message(None)
        if msg is None or "error" in msg:
            raise RuntimeError(f"fork server: {(msg or {}).get('error', 'closed the connection')}")
        self.pid: int = msg["pid"]

    def _message(self, timeout: Optional[float]) -> Optional[dict]:
        """The server's next message; None at EOF. Raises ``subprocess.TimeoutExpired``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            with selectors.DefaultSelector() as sel:
                sel.register(self._conn, selectors.EVENT_READ)
                if not sel.select(left):
                    raise subprocess.TimeoutExpired(self.args, timeout)
            chunk = self._conn.recv(4096)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def _finish(self, msg: Optional[dict]) -> int:
        if msg is None:
            raise RuntimeError(f"fork server died while pid {self.pid} ran")
        self.returncode = msg["returncode"]
        self._conn.close()
        return self.returncode

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            try:
                self._finish(self._message(0))
            except subprocess.TimeoutExpired:
                pass
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if self.returncode is None:
            self._finish(self._message(timeout))
        return self.returncode

    def communicate(self, timeout: Optional[float] = None) -> tuple[Any, Any]:
        """Read the piped outputs to EOF, then wait (``subprocess.Popen.communicate`` without input)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        streams = {f.fileno(): (f, []) for f in (self.stdout, self.stderr) if f is not None}
        with selectors.DefaultSelector() as sel:
            for fd in streams:
                sel.register(fd, selectors.EVENT_READ)
            while sel.get_map():
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                events = sel.select(left)
                if not events:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                for key, _ in events:
                    chunk = os.read(key.fd, 1 << 16)
                    if chunk:
                        streams[key.fd][1].append(chunk)
                    else:
                        sel.unregister(key.fd)
        results = []
        for f in (self.stdout, self.stderr):
            if f is None:
                results.append(None)
                continue
            data = b"".join(streams[f.fileno()][1])
            f.close()
            results.append(data.decode(errors="replace") if self._text else data)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return results[0], results[1]

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _forked_server(cmd: list[str], env: dict) -> Optional[_Server]:
    """The fork server for ``cmd`` with ``env``, or None when it must run as a plain subprocess."""
    if os.environ.get("NEMO_RLHF_TEST_NO_FORK") == "1" or len(cmd) < 2 or cmd[0] != sys.executable:
        return None
    if cmd[1] == "-m":
        if len(cmd) < 3 or not cmd[2].startswith("nemo_rlhf."):
            return None
    elif Path(cmd[1]).suffix != ".py" or Path(cmd[1]).resolve().parent != LAUNCHERS:
        return None
    return _server(env)


def _target(spec: Any, default: int, text: bool, pipes: list, close_after: list) -> int:
    if spec == subprocess.PIPE:
        read_fd, write_fd = os.pipe()
        pipes.append(os.fdopen(read_fd, "r" if text else "rb"))
        close_after.append(write_fd)
        return write_fd
    pipes.append(None)
    return default if spec is None else (spec if isinstance(spec, int) else spec.fileno())


def popen(cmd: list[str], *, cwd: Any = None, env: Optional[dict] = None, stdout: Any = None, stderr: Any = None,
          text: bool = False, start_new_session: bool = False) -> Any:
    """``subprocess.Popen(cmd, ...)``: ``[sys.executable, launchers/<x>.py | -m nemo_rlhf.<m>, *args]`` through the fork
    server (stdin /dev/null; ``stdout``/``stderr``: None, ``subprocess.PIPE``, a file or an fd,
    ``stderr`` also ``subprocess.STDOUT``), anything else through ``subprocess``."""
    env = dict(os.environ if env is None else env)
    server = _forked_server(cmd, env)
    if server is None:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=text,
                                start_new_session=start_new_session)
    close_after: list[int] = []
    pipes: list = []
    out_fd = _target(stdout, sys.stdout.fileno(), text, pipes, close_after)
    if stderr == subprocess.STDOUT:
        err_fd = out_fd
        pipes.append(None)
    else:
        err_fd = _target(stderr, sys.stderr.fileno(), text, pipes, close_after)
    null = os.open(os.devnull, os.O_RDONLY)
    close_after.append(null)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(server.path)
        request = {"argv": [str(a) for a in cmd[1:]], "cwd": str(cwd or os.getcwd()), "env": env,
                   "new_session": start_new_session}
        socket.send_fds(conn, [(json.dumps(request) + "\n").encode()], [null, out_fd, err_fd])
    finally:
        for fd in close_after:
            os.close(fd)
    return ForkedProcess(conn, list(map(str, cmd)), pipes[0], pipes[1], text)


def run(cmd: list[str], *, capture_output: bool = False, text: bool = False, timeout: Optional[float] = None,
        cwd: Any = None, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, ...)`` through :func:`popen`: on timeout the process is killed and
    ``subprocess.TimeoutExpired`` raised, as ``subprocess.run`` does."""
    pipe = subprocess.PIPE if capture_output else None
    proc = popen(cmd, cwd=cwd, env=env, stdout=pipe, stderr=pipe, text=text)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


if __name__ == "__main__":
    _server_main(sys.argv[1])
