"""Critic-server faults seen from the client (issue 5): a server killed mid-infer, mid-train and
mid-save, a slow server, a restarted server, lost training replies, and a fuzz of malformed
requests (issue 9: also out-of-range token ids, paths escaping the checkpoint root, foreign
directories, and requests without/with a wrong token to a server with authentication on). Servers
are TinyCriticBackend subprocesses (tests/servers/tiny_backend.py) on loopback, started
concurrently in the background while earlier tests run.

Detection times and the fuzz count are printed (``pytest -s``)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sys
import time
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from nemo_rlhf.servers import (
    CriticClient,
    CriticServerError,
    CriticServerRestarted,
    CriticServerUnavailable,
    find_free_ports,
    start_server_process,
)
from nemo_rlhf.servers.local import LocalCriticClient
from nemo_rlhf.servers.process import ServerProcess, _descendants

sys.path.insert(0, str(Path(__file__).parent))
from raw_http import raw_infer, raw_infer_inputs, raw_path, tree  # noqa: E402
from tiny_backend import TinyCriticBackend  # noqa: E402

pytestmark = [pytest.mark.faults, pytest.mark.server]

REPO_ROOT = Path(__file__).resolve().parents[2]
LIMIT_S = 3.0  # retry_limit_s of the kill tests
MARGIN_S = 2.0  # allowed detection time beyond the limit (the last attempt, scheduling on busy CPUs)
MEASURED: dict[str, float] = {}

# name -> extra tiny_backend.py arguments. Started three at a time when the module starts.
SERVERS = {
    "kill_infer": ["--delay-infer-s", "30"],
    "kill_train": ["--delay-train-s", "30"],
    "kill_save": ["--delay-save-s", "30"],
    "slow": ["--delay-infer-s", "2", "--delay-infer-calls", "1", "--delay-train-s", "3"],
    "restart": ["--delay-train-s", "30"],
    "fuzz": ["--max-batch-size", "8", "--max-seq-len", "32", "--auth-token-env", "NEMO_RLHF_TEST_FUZZ_TOKEN",
             "--debug-log"],
}
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_ERROR_ID = re.compile(r"error id ([0-9a-f]{16})")
# The fuzz server's token (authentication on), handed over in the environment like the sbatch script does.
FUZZ_TOKEN = "fuzz-" + os.urandom(16).hex()
# Filled by the ``servers`` fixture: the servers' checkpoint root and their log directory.
STATE: dict[str, Path] = {}

T = np.zeros((2, 8), dtype=np.int64)
L = np.array([8, 3], dtype=np.int64)
F = np.zeros((2, 8), dtype=np.float32)
ONES = np.ones((2, 8), dtype=np.float32)


def _start(ports: list[int], extra: list[str], log_path: Path) -> ServerProcess:
    extra = ["--checkpoint-root", str(STATE["root"]), *extra]
    code = (
        f"import sys; sys.path[:0] = {[str(REPO_ROOT), str(Path(__file__).parent)]!r}; "
        "import tiny_backend; tiny_backend.main()"
    )
    cmd = [sys.executable, "-c", code, *(str(p) for p in ports), *extra]
    return start_server_process(cmd, "127.0.0.1", ports[0], ready_timeout_s=180, log_path=log_path)


def _kill_hard(proc: ServerProcess) -> None:
    """SIGKILL the server's process group (and strays): a crash, no cleanup."""
    strays = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in strays:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.popen.wait(timeout=10)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """name -> Future of (ServerProcess, [http, grpc, metrics])."""
    logs = tmp_path_factory.mktemp("server_faults")
    STATE["logs"] = logs
    STATE["root"] = Path(os.path.realpath(tmp_path_factory.mktemp("fault_checkpoint_root")))
    os.environ["NEMO_RLHF_TEST_FUZZ_TOKEN"] = FUZZ_TOKEN  # only the fuzz server reads it (--auth-token-env)
    pool = ThreadPoolExecutor(max_workers=3)
    futures: dict[str, Future] = {}
    for name, extra in SERVERS.items():
        ports = find_free_ports(3)
        futures[name] = pool.submit(lambda p=ports, e=extra, n=name: (_start(p, e, logs / f"{n}.log"), p))
    yield futures
    started = [f.result()[0] for f in futures.values() if f.exception() is None]
    list(pool.map(lambda proc: proc.stop(timeout_s=3), started))  # SIGTERM, SIGKILL after 3 s
    pool.shutdown(wait=True)
    if MEASURED:
        print("\nmeasured:", {k: round(v, 2) for k, v in MEASURED.items()})


def _server(servers, name: str) -> tuple[ServerProcess, int]:
    proc, ports = servers[name].result(timeout=300)
    return proc, ports[0]


def _client(port: int, **kwargs) -> CriticClient:
    args = dict(infer_timeout_s=10, train_timeout_s=10, init_timeout_s=30, retry_limit_s=LIMIT_S, retry_backoff_s=0.2)
    args.update(kwargs)
    client = CriticClient("127.0.0.1", port, **args)
    client.wait_until_ready()
    return client


def _retry_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "nemo_rlhf.servers" and r.levelno == logging.WARNING and "retrying in" in r.getMessage()
    ]


# ------------------------------------------------------------------ retry loop (no server)


class _FakeClient(CriticClient):
    """CriticClient whose requests are scripted: no network."""

    def __init__(self, script, **kwargs):
        super().__init__("127.0.0.1", 9, **kwargs)
        self.script = list(script)
        self.sent = []
        self.pauses = []
        self._reached = True
        self._instance = "A"
        self._closing.wait = lambda pause: self.pauses.append(round(pause, 6)) or False

    def _probe_ready(self, model, timeout_s):
        pass

    def _call(self, model, timeout_s, batched, inputs):
        self.sent.append((model, {k: np.copy(v) for k, v in inputs.items()}))
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step


def _unavailable(model="critic_infer"):
    return CriticServerUnavailable("http://127.0.0.1:9", model, 1.0, "ConnectionRefusedError: refused")


def _infer_ok():
    return {"values": np.zeros((2, 8), np.float32), "rewards": np.zeros((2, 1), np.float32)}


def _status(instance):
    return {"status": np.array([f'{{"instance": "{instance}", "train_steps": 0}}'.encode()], dtype=object)}


def test_backoff_doubles_up_to_the_cap_and_gives_up_naming_attempts_and_cause(caplog, monkeypatch):
    import types

    from nemo_rlhf.servers import client as client_module

    clock = [100.0]
    monkeypatch.setattr(client_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    client = _FakeClient([_unavailable()] * 50, retry_limit_s=20.0, retry_backoff_s=1.0, retry_backoff_max_s=4.0)

    def wait(pause):  # the backoff sleep: advance the fake clock
        client.pauses.append(pause)
        clock[0] += pause
        return False

    client._closing.wait = wait
    with caplog.at_level(logging.WARNING, logger="nemo_rlhf.servers"):
        with pytest.raises(CriticServerUnavailable) as info:
            client.infer(T, L)
    # 1, 2, 4, 4, 4, 4 (= 19 s), then the rest up to the limit, then one last attempt.
    assert client.pauses == [1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 1.0]
    err = info.value
    assert err.attempts == 8 and err.waited_s == pytest.approx(20.0) and err.retry_limit_s == 20.0
    message = str(err)
    for part in ("http://127.0.0.1:9", "'critic_infer'", "8 attempt(s)", "20.0 s", "ConnectionRefusedError: refused"):
        assert part in message
    assert len(_retry_warnings(caplog)) == 7


def test_error_reply_is_not_retried():
    client = _FakeClient([CriticServerError("rejected: bad lengths")])
    with pytest.raises(CriticServerError, match="bad lengths") as info:
        client.infer(T, L)
    assert not isinstance(info.value, CriticServerUnavailable)
    assert len(client.sent) == 1 and client.pauses == []


def test_retried_infer_checks_the_instance_once_and_detects_a_restart():
    client = _FakeClient([_unavailable(), _infer_ok(), _status("A")])
    client.infer(T, L)
    assert [m for m, _ in client.sent] == ["critic_infer", "critic_infer", "critic_status"]
    client = _FakeClient([_infer_ok()])
    client.infer(T, L)  # no failure: no extra request
    assert [m for m, _ in client.sent] == ["critic_infer"]
    client = _FakeClient([_unavailable(), _infer_ok(), _status("B")])
    with pytest.raises(CriticServerRestarted) as info:
        client.infer(T, L)
    message = str(info.value)
    assert "http://127.0.0.1:9" in message and "A -> B" in message and "last paired" in message


def test_train_retries_reuse_the_request_id_and_never_go_to_a_restarted_server():
    reply = {"metrics": np.array([b'{"loss": 0.5, "instance": "A"}'], dtype=object)}
    client = _FakeClient([_unavailable("critic_train"), _status("A"), reply])
    assert client.train(T, F, F, ONES) == {"loss": 0.5}  # "instance" is consumed by the client
    ids = [inputs["request_id"][0] for model, inputs in client.sent if model == "critic_train"]
    assert len(ids) == 2 and ids[0] == ids[1] and len(ids[0]) == 32  # uuid4 hex
    client = _FakeClient([reply])
    client.train(T, F, F, ONES, request_id="step-7")
    assert client.sent[0][1]["request_id"][0] == b"step-7"
    # Restarted before the retry: the retry is not sent.
    client = _FakeClient([_unavailable("critic_train"), _status("B")])
    with pytest.raises(CriticServerRestarted):
        client.train(T, F, F, ONES)
    assert [m for m, _ in client.sent] == ["critic_train", "critic_status"]


def test_a_server_never_reached_is_bounded_by_init_timeout_and_not_retried():
    client = _FakeClient([_unavailable()], retry_limit_s=300)
    client._reached = False
    with pytest.raises(CriticServerUnavailable) as info:
        client.infer(T, L)
    assert info.value.attempts == 1 and client.pauses == []


def test_local_client_accepts_request_id_and_reports_status():
    local = LocalCriticClient(TinyCriticBackend())
    assert local.status() == {"instance": "local", "train_steps": 0}
    metrics = local.train(T, F, F, ONES, request_id="abc")
    assert "loss" in metrics and local.status()["train_steps"] == 1


# ------------------------------------------------------------------ killed server


def _kill_during(servers, name, call, caplog):
    """Start ``call(client)`` in a thread, kill the server 1 s later; return (error, detection s)."""
    proc, port = _server(servers, name)
    client = _client(port)
    result: dict = {}

    def run():
        try:
            call(client)
        except Exception as e:  # noqa: BLE001 - examined below
            result["error"], result["at"] = e, time.monotonic()

    with caplog.at_level(logging.WARNING, logger="nemo_rlhf.servers"):
        with ThreadPoolExecutor(1) as pool:
            done = pool.submit(run)
            time.sleep(1.0)  # the request is in the backend (which sleeps 30 s)
            killed_at = time.monotonic()
            _kill_hard(proc)
            done.result(timeout=LIMIT_S + 30)
    client.close()
    assert "error" in result, "the call returned although the server was killed"
    detection = result["at"] - killed_at
    MEASURED[f"{name} detection s"] = detection
    assert _retry_warnings(caplog), "retries are logged at WARNING on nemo_rlhf.servers"
    return result["error"], port, detection


@pytest.mark.parametrize(
    "name, model, call",
    [
        ("kill_infer", "critic_infer", lambda c: c.infer(T, L)),
        ("kill_train", "critic_train", lambda c: c.train(T, F, F, ONES)),
        ("kill_save", "critic_save", lambda c: c.save(str(STATE["root"] / "kill_save" / "critic"))),
    ],
)
def test_server_killed_mid_request_is_detected_within_the_retry_limit(servers, caplog, name, model, call):
    error, port, detection = _kill_during(servers, name, call, caplog)
    assert isinstance(error, CriticServerUnavailable), repr(error)
    message = str(error)
    assert f"127.0.0.1:{port}" in message and f"'{model}'" in message and "attempt(s)" in message
    assert error.attempts >= 2 and error.retry_limit_s == LIMIT_S
    assert LIMIT_S - 0.1 <= detection <= LIMIT_S + MARGIN_S, detection


# ------------------------------------------------------------------ slow server, lost replies


def test_one_off_slow_infer_is_retried_and_succeeds(servers, caplog):
    _, port = _server(servers, "slow")  # the first infer sleeps 2 s
    with _client(port, infer_timeout_s=0.5, retry_limit_s=10) as client:
        with caplog.at_level(logging.WARNING, logger="nemo_rlhf.servers"):
            start = time.monotonic()
            values, rewards = client.infer(T, L)
            elapsed = time.monotonic() - start
        MEASURED["slow infer recovered s"] = elapsed
        expected_values, expected_rewards = TinyCriticBackend().infer(T, L)  # same seed: same weights
        np.testing.assert_array_equal(values, expected_values)
        np.testing.assert_array_equal(rewards, expected_rewards)
        assert any("PyTritonClientTimeoutError" in w for w in _retry_warnings(caplog))
        assert 0.5 <= elapsed <= 10.0


def test_train_whose_reply_is_lost_is_applied_exactly_once(servers):
    _, port = _server(servers, "slow")  # every train sleeps 3 s
    with _client(port, train_timeout_s=0.4, retry_limit_s=15, retry_backoff_s=0.2, retry_backoff_max_s=0.5) as client:
        before = client.status()["train_steps"]
        metrics = client.train(T, F, F, ONES, request_id="lost-reply-1")  # 1st attempt times out, applied anyway
        assert np.isfinite(metrics["loss"]) and "instance" not in metrics
        time.sleep(1.0)  # let every queued retry of that id be answered
        status = client.status()
        assert status["train_steps"] == before + 1
        assert status["train_duplicates"] >= 1
        # The same id again (e.g. a retry after the actor's own restart): still not applied again.
        assert client.train(T, F, F, ONES, request_id="lost-reply-1") == metrics
        assert client.status()["train_steps"] == before + 1


def test_persistently_slow_train_gives_up_in_bounded_time_and_is_applied_once(servers):
    _, port = _server(servers, "slow")
    with _client(port, train_timeout_s=0.3, retry_limit_s=1.0, retry_backoff_s=0.2) as client:
        before = client.status()["train_steps"]
        start = time.monotonic()
        with pytest.raises(CriticServerUnavailable, match="'critic_train'") as info:
            client.train(T, F, F, ONES)
        elapsed = time.monotonic() - start
        MEASURED["slow train gave up s"] = elapsed
        # first attempt (0.3 s) + 1 s of retries + the last attempt (0.3 s) + its readiness probe
        assert elapsed <= 0.3 + 1.0 + 0.3 + MARGIN_S
        assert info.value.attempts >= 2
        time.sleep(4.0)  # the server finishes the first attempt; the queued retries hit the cache
        assert client.status()["train_steps"] == before + 1


# ------------------------------------------------------------------ restarted server


def test_restarted_server_is_detected_and_load_re_pairs(servers, tmp_path):
    proc, port = _server(servers, "restart")  # trains sleep 30 s: a train is in flight at the kill
    _, ports = servers["restart"].result()
    client = _client(port, retry_limit_s=120, retry_backoff_s=0.2, retry_backoff_max_s=1.0)
    old = client.instance
    ckpt = STATE["root"] / "restart" / "critic"
    client.save(str(ckpt))
    with ThreadPoolExecutor(2) as pool:
        train = pool.submit(client.train, T, F, F, ONES)
        time.sleep(1.0)
        infer = client.infer_async(T, L)  # waits behind the training step (one backend lock)
        time.sleep(0.5)
        _kill_hard(proc)
        new_proc = _start(ports, [], tmp_path / "restarted.log")  # same ports, no delays
        try:
            ready_at = time.monotonic()
            for future in (infer, train):
                with pytest.raises(CriticServerRestarted) as info:
                    future.result(timeout=60)
                message = str(info.value)
                assert f"127.0.0.1:{port}" in message and old in message and "last paired" in message
            MEASURED["restart detected after new server ready s"] = time.monotonic() - ready_at
            new = info.value.new_instance
            assert new != old
            # The train retry was refused before it was sent: the new server never trained.
            with CriticClient("127.0.0.1", port) as fresh:
                fresh.wait_until_ready()
                assert fresh.status() == {"instance": new, "train_steps": 0, "train_duplicates": 0}
            with pytest.raises(CriticServerRestarted):
                client.status()  # stays restarted ...
            assert client.load(str(ckpt)) == {"step": 0.0}  # ... until the resume loads
            assert client.instance == new
            assert "loss" in client.train(T, F, F, ONES)
            assert client.status()["train_steps"] == 1
        finally:
            client.close()
            new_proc.stop(timeout_s=5)


# ------------------------------------------------------------------ auth (issue 9)


def test_auth_refuses_requests_without_the_right_token_before_any_python_runs(servers, tmp_path):
    _, port = _server(servers, "fuzz")
    url = f"http://127.0.0.1:{port}"
    root = STATE["root"]
    infer = raw_infer_inputs(T, L)
    save = raw_path(str(root / "auth_probe"))
    for token in (None, "wrong-" + "x" * 20, FUZZ_TOKEN[:-1]):
        for model, inputs in (("critic_infer", infer), ("critic_save", save), ("critic_status", [
                {"name": "ping", "datatype": "INT64", "shape": [1], "data": [0]}])):
            status, message = raw_infer(url, model, inputs, token=token)
            assert status == 403 and "restricted" in message and "triton-access-token" in message, (token, message)
            assert "Traceback" not in message and "CRITIC_REQUEST_ERROR" not in message  # refused by Triton itself
    assert not (root / "auth_probe").exists()
    status, body = raw_infer(url, "critic_infer", infer, token=FUZZ_TOKEN)
    assert status == 200 and json.loads(body)["outputs"], body
    with _NO_PROXY_OPENER.open(f"{url}/v2/health/ready", timeout=10) as response:  # readiness needs no token
        assert response.status == 200
    with CriticClient("127.0.0.1", port, init_timeout_s=30, retry_limit_s=5) as anonymous:
        with pytest.raises(CriticServerError, match="requires a token; the client sent none") as info:
            anonymous.infer(T, L)
        assert not isinstance(info.value, CriticServerUnavailable)
    with CriticClient("127.0.0.1", port, init_timeout_s=30, retry_limit_s=5, auth_token="y" * 24) as wrong:
        with pytest.raises(CriticServerError, match="one that does not match"):
            wrong.infer(T, L)
    os.environ["NEMO_RLHF_TEST_CLIENT_TOKEN"] = FUZZ_TOKEN
    try:
        cfg = {"host": "127.0.0.1", "port": port, "infer_timeout_s": 10, "auth_token_env": "NEMO_RLHF_TEST_CLIENT_TOKEN"}
        with CriticClient.from_config(cfg) as client:
            assert client.auth_enabled
            client.wait_until_ready()
            np.testing.assert_array_equal(client.infer(T, L)[0], TinyCriticBackend(max_seq_len=MAX_S).infer(T, L)[0])
            assert client.status()["train_steps"] == 0
    finally:
        del os.environ["NEMO_RLHF_TEST_CLIENT_TOKEN"]
    log = (STATE["logs"] / "fuzz.log").read_text()
    assert FUZZ_TOKEN not in log and "authentication on" in log


# ------------------------------------------------------------------ fuzz

FUZZ_N = 1000
MAX_B, MAX_S = 8, 32
VOCAB = 32  # TinyCriticBackend's default vocab_size


def _fuzz_layout(root: Path, outside: Path) -> dict[str, list[str]]:
    """Foreign files, symlinks and checkpoints around the fuzz server's root; returns the bad paths
    that critic_save / critic_load requests name (each must be refused, nothing may change)."""
    fuzz = root / "fuzz"
    (fuzz / "foreign").mkdir(parents=True)
    (fuzz / "foreign" / "data.txt").write_bytes(os.urandom(1024))
    (fuzz / "notes.txt").write_text("not a checkpoint\n")
    (fuzz / "partial.tmp").mkdir()
    (fuzz / "partial.tmp" / "junk").write_bytes(b"junk")
    (fuzz / "marker_only").mkdir()
    (fuzz / "marker_only" / "COMPLETE").write_text("ok\n")
    outside.mkdir()
    (outside / "data.txt").write_bytes(os.urandom(1024))
    (fuzz / "link_out").symlink_to(outside, target_is_directory=True)
    (fuzz / "file_link").symlink_to(outside / "data.txt")
    escapes = [
        "../fuzz_escape", "fuzz/../../fuzz_escape", f"{root}/fuzz/../../fuzz_escape", str(outside / "new"),
        str(outside), f"{fuzz}/link_out", f"{fuzz}/link_out/new", f"{fuzz}/file_link", str(root), "/",
        "/tmp", "fuzz/link_out/../../../x",
    ]
    foreign = [f"{fuzz}/foreign", "fuzz/foreign", f"{fuzz}/foreign/data.txt", f"{fuzz}/notes.txt",
               f"{fuzz}/partial", f"{fuzz}/marker_only"]
    return {"critic_save": escapes + foreign,
            "critic_load": escapes + foreign + [f"{fuzz}/missing", f"{fuzz}/partial.tmp", str(outside / "ckpt")]}


def _fuzz_case(rng: np.random.Generator, bad_paths: dict[str, list[str]]) -> tuple[str, str, dict[str, np.ndarray]]:
    """(model, description, inputs) of one malformed request; model "auth" is a valid request
    sent without / with a wrong token."""
    b = int(rng.integers(1, MAX_B + 1))
    s = int(rng.integers(2, MAX_S + 1))
    tokens = rng.integers(0, VOCAB, size=(b, s), dtype=np.int64)
    lengths = rng.integers(1, s + 1, size=(b, 1), dtype=np.int64)
    floats = {k: rng.normal(size=(b, s)).astype(np.float32) for k in ("returns", "prev_values", "mask")}
    model = str(rng.choice(["critic_infer", "critic_train", "critic_save", "critic_load", "critic_status", "auth"],
                           p=[0.3, 0.35, 0.1, 0.1, 0.05, 0.1]))

    def bad_token_ids(kind: str) -> None:
        high = VOCAB + int(rng.choice([0, 1, 1000, 99999999, 2**62]))
        low = -int(rng.choice([1, 2, 1000, 2**62]))
        tokens[int(rng.integers(b)), int(rng.integers(s))] = high if kind == "token_high" else low

    if model == "auth":
        kind = str(rng.choice(["no token", "wrong token"]))
        target = str(rng.choice(["critic_infer", "critic_save", "critic_status"]))
        return "auth", f"auth {kind} {target}", {"target": target}
    if model == "critic_infer":
        kind = str(rng.choice(["dtype", "rank", "negative", "zero", "too_long", "rows", "seq", "batch", "empty",
                               "lengths_dtype", "token_high", "token_negative"],
                              p=[0.08] * 10 + [0.1, 0.1]))
        inputs = {"tokens": tokens, "sequence_lengths": lengths}
        if kind == "dtype":
            inputs["tokens"] = tokens.astype(rng.choice([np.int32, np.float32, np.uint8, np.float64]))
        elif kind == "lengths_dtype":
            inputs["sequence_lengths"] = lengths.astype(rng.choice([np.int32, np.float32]))
        elif kind == "rank":
            inputs["tokens"] = tokens[:, :, None] if rng.random() < 0.5 else tokens.reshape(-1)
        elif kind in ("negative", "zero", "too_long"):
            bad = {"negative": -int(rng.integers(1, 1000)), "zero": 0, "too_long": s + int(rng.integers(1, 100))}[kind]
            lengths[int(rng.integers(b)), 0] = bad
        elif kind == "rows":
            other = b + int(rng.choice([-1, 1])) if b > 1 else 2
            inputs["sequence_lengths"] = rng.integers(1, s + 1, size=(other, 1), dtype=np.int64)
        elif kind == "seq":
            s2 = MAX_S + int(rng.integers(1, 64))
            inputs = {"tokens": np.zeros((b, s2), np.int64), "sequence_lengths": np.full((b, 1), s2, np.int64)}
        elif kind == "batch":
            b2 = MAX_B + int(rng.integers(1, 8))
            inputs = {"tokens": np.zeros((b2, s), np.int64), "sequence_lengths": np.full((b2, 1), s, np.int64)}
        elif kind in ("token_high", "token_negative"):
            bad_token_ids(kind)
        else:  # empty
            inputs = {"tokens": np.zeros((0, s), np.int64), "sequence_lengths": np.zeros((0, 1), np.int64)}
        return model, f"infer {kind}", inputs
    if model == "critic_train":
        kind = str(rng.choice(["nonfinite", "dtype", "rank", "shape", "seq", "batch", "empty", "request_id", "missing",
                               "token_high", "token_negative"], p=[0.08] * 9 + [0.14, 0.14]))
        inputs = {"tokens": tokens, **floats, "request_id": np.array([f"fuzz-{rng.integers(1 << 62)}".encode()], dtype=object)}
        name = str(rng.choice(["returns", "prev_values", "mask"]))
        if kind == "nonfinite":
            inputs[name][int(rng.integers(b)), int(rng.integers(s))] = rng.choice([np.nan, np.inf, -np.inf])
        elif kind == "dtype":
            if rng.random() < 0.3:
                inputs["tokens"] = tokens.astype(np.int32)
            else:
                inputs[name] = inputs[name].astype(rng.choice([np.float64, np.float16, np.int64]))
        elif kind == "rank":
            inputs[name] = inputs[name].reshape(-1) if rng.random() < 0.5 else inputs[name][:, :, None]
        elif kind == "shape":
            inputs[name] = rng.normal(size=(b + 1, s) if rng.random() < 0.5 else (b, s - 1)).astype(np.float32)
        elif kind == "seq":
            s2 = MAX_S + int(rng.integers(1, 64))
            inputs.update({k: np.zeros((b, s2), v.dtype) for k, v in inputs.items() if k != "request_id"})
        elif kind == "batch":
            b2 = MAX_B + int(rng.integers(1, 8))
            inputs.update({k: np.zeros((b2, s), v.dtype) for k, v in inputs.items() if k != "request_id"})
        elif kind == "empty":
            shape = (0, s) if rng.random() < 0.5 else (b, 0)
            inputs.update({k: np.zeros(shape, v.dtype) for k, v in inputs.items() if k != "request_id"})
        elif kind == "request_id":
            inputs["request_id"] = [
                np.array([b""], dtype=object),
                np.array([b"x" * 200], dtype=object),
                np.array([b"\xff\xfe"], dtype=object),
                np.array([7], dtype=np.int64),
                np.array([b"a", b"b"], dtype=object),
            ][int(rng.integers(5))]
        elif kind in ("token_high", "token_negative"):
            bad_token_ids(kind)
        else:  # missing
            del inputs[name]
        return model, f"train {kind}", inputs
    if model in ("critic_save", "critic_load"):
        if rng.random() < 0.6:  # a well-formed path the server must refuse
            path = bad_paths[model][int(rng.integers(len(bad_paths[model])))]
            return model, f"{model} refused path", {"path": np.array([path.encode()], dtype=object)}
        paths = [
            np.array([b""], dtype=object),
            np.array([b"/tmp/a\x00b"], dtype=object),
            np.array([b"\xff\xfe"], dtype=object),
            np.array([b"/tmp/a", b"/tmp/b"], dtype=object),
            np.array([1], dtype=np.int64),
        ]
        return model, f"{model} bad path", {"path": paths[int(rng.integers(len(paths)))]}
    bad_pings = [np.array([0.5], dtype=np.float32), np.array([1, 2], dtype=np.int64), np.array([[1]], dtype=np.int64)]
    return model, "status bad ping", {"ping": bad_pings[int(rng.integers(len(bad_pings)))]}




def _check_error_text(i: int, kind: str, message: str) -> None:
    """An error reply is one line without a traceback; the server's own carry an error id."""
    assert "Traceback" not in message and "\n" not in message.strip(), (i, kind, message)
    if any(word in kind for word in ("token_", "refused path", "nonfinite", "too_long", "zero")):
        assert "CRITIC_REQUEST_ERROR (error id " in message, (i, kind, message)


def test_fuzz_malformed_requests_all_get_error_replies_and_the_server_keeps_serving(servers, caplog, tmp_path):
    from pytriton.client import ModelClient
    from pytriton.client.exceptions import PyTritonClientInferenceServerError

    _, port = _server(servers, "fuzz")
    url = f"http://127.0.0.1:{port}"
    root = STATE["root"]
    outside = Path(os.path.realpath(tmp_path)) / "outside"
    bad_paths = _fuzz_layout(root, outside)
    rng = np.random.default_rng(20261121)
    client = _client(port, retry_limit_s=60, auth_token=FUZZ_TOKEN)  # an error reply must never be retried
    # A complete checkpoint outside the root (a copy of a real one): loading it must still be refused.
    client.save(str(root / "fuzz" / "seed_ckpt"))
    shutil.copytree(root / "fuzz" / "seed_ckpt", outside / "ckpt")
    before_root, before_outside = tree(root), tree(outside)
    raw = {}
    kinds: dict[str, int] = {}
    error_ids: set[str] = set()
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="nemo_rlhf.servers"):
        try:
            for model in ("critic_infer", "critic_train", "critic_save", "critic_load", "critic_status"):
                raw[model] = ModelClient(url, model, init_timeout_s=30, inference_timeout_s=10, access_token=FUZZ_TOKEN)
            for i in range(FUZZ_N):
                model, kind, inputs = _fuzz_case(rng, bad_paths)
                kinds[kind] = kinds.get(kind, 0) + 1
                if model == "auth":  # a valid request, refused by Triton for its token
                    target = inputs["target"]
                    body = {"critic_infer": raw_infer_inputs(T, L), "critic_save": raw_path(str(root / "fuzz" / "auth")),
                            "critic_status": [{"name": "ping", "datatype": "INT64", "shape": [1], "data": [0]}]}[target]
                    token = None if "no token" in kind else "z" * 32
                    status, message = raw_infer(url, target, body, token=token)
                    assert status == 403 and "restricted" in message, (i, kind, message)
                    continue
                if kind.startswith(("infer token", "train token")) or "refused path" in kind:
                    # Raw KServe-v2 JSON over urllib, with the token.
                    if model == "critic_infer":
                        body = raw_infer_inputs(inputs["tokens"], inputs["sequence_lengths"])
                    elif model == "critic_train":
                        body = [{"name": k, "datatype": "INT64" if k == "tokens" else "FP32", "shape": list(v.shape),
                                 "data": v.ravel().tolist()} for k, v in inputs.items() if k != "request_id"]
                    else:
                        body = raw_path(inputs["path"][0].decode())
                    status, message = raw_infer(url, model, body, token=FUZZ_TOKEN)
                    assert status >= 400, (i, kind, message)
                    _check_error_text(i, kind, message)
                    error_ids.update(_ERROR_ID.findall(message))
                    if "token" in kind:
                        assert "expected a token id 0 <= id < vocab_size = 32" in message, (i, kind, message)
                    continue
                via_client = i % 5 == 0 and model in ("critic_infer", "critic_train") and "empty" not in kind
                if via_client and kind != "train missing" and "request_id" not in kind:
                    with pytest.raises(CriticServerError) as info:
                        if model == "critic_infer":
                            client.infer(inputs["tokens"], inputs["sequence_lengths"])
                        else:
                            client.train(*(inputs[k] for k in ("tokens", "returns", "prev_values", "mask")))
                    assert not isinstance(info.value, CriticServerUnavailable), (i, kind, info.value)
                    assert "Traceback" not in str(info.value), (i, kind, info.value)
                    continue
                sender = raw[model].infer_batch if model == "critic_infer" else raw[model].infer_sample
                try:
                    sender(**inputs)
                except PyTritonClientInferenceServerError as e:
                    _check_error_text(i, kind, e.message)
                    continue
                pytest.fail(f"malformed request {i} ({kind}) got no error reply")
            elapsed = time.monotonic() - start
            MEASURED["fuzz requests"] = FUZZ_N
            MEASURED["fuzz s"] = elapsed
            print("\nfuzz cases:", dict(sorted(kinds.items())))
            status = client.status()
            assert status["train_steps"] == 0  # the backend trained on none of them
            # ... and valid requests succeed.
            values, rewards = client.infer(T, L)
            np.testing.assert_array_equal(values, TinyCriticBackend(max_seq_len=MAX_S).infer(T, L)[0])
            assert np.isfinite(client.train(T, F, F, ONES)["loss"])
            assert client.status()["train_steps"] == 1
            # The one checkpoint the test asks for; nothing else under the root (or outside it) changed.
            client.save(str(root / "fuzz" / "asked"))
            assert client.load(str(root / "fuzz" / "asked")) == {"step": 1.0}
        finally:
            for c in raw.values():
                c.close()
            client.close()
    after_root = tree(root)
    assert {k: after_root.get(k) for k in before_root} == before_root
    added = sorted(set(after_root) - set(before_root))
    assert added and all(k == "fuzz/asked" or k.startswith("fuzz/asked/") for k in added), added
    assert "fuzz/asked/COMPLETE" in added
    assert tree(outside) == before_outside
    assert not (root.parent / "fuzz_escape").exists()
    assert not _retry_warnings(caplog)
    assert elapsed < 120
    # The server logged each refused request's traceback at DEBUG under the id its reply carried.
    log = (STATE["logs"] / "fuzz.log").read_text()
    assert error_ids and FUZZ_TOKEN not in log
    for error_id in sorted(error_ids)[:20]:
        assert f"traceback of error id {error_id}\nTraceback (most recent call last):" in log, error_id
