"""Round trips through a real PyTriton critic server on 127.0.0.1 (one in-process server per module)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from nemo_rlhf.servers import (
    CriticClient,
    CriticServer,
    CriticServerError,
    CriticServerUnavailable,
    find_free_ports,
    start_server_process,
    triton_env_fix,
)
from nemo_rlhf.servers.critic_server import validate_infer_request, validate_train_request
from nemo_rlhf.servers.process import _descendants

sys.path.insert(0, str(Path(__file__).parent))
from raw_http import one_line_reply as _one_line_reply  # noqa: E402
from raw_http import raw_infer, raw_infer_inputs as _raw_infer_inputs, raw_path as _raw_path  # noqa: E402
from raw_http import raw_train_inputs as _raw_train_inputs, tree as _tree  # noqa: E402
from tiny_backend import TinyCriticBackend  # noqa: E402

pytestmark = pytest.mark.server

MAX_SEQ_LEN = 128
MAX_BATCH = 16
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def backend() -> TinyCriticBackend:
    return TinyCriticBackend(vocab_size=32, hidden=8, max_seq_len=MAX_SEQ_LEN, seed=0)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The server's checkpoint root (resolved)."""
    return Path(os.path.realpath(tmp_path_factory.mktemp("checkpoint_root")))


@pytest.fixture(scope="module")
def server(backend, root):
    http, grpc, metrics = find_free_ports(3)
    with CriticServer(
        backend, http_port=http, grpc_port=grpc, metrics_port=metrics, max_batch_size=MAX_BATCH, checkpoint_root=root
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with CriticClient(server.host, server.http_port, infer_timeout_s=60, train_timeout_s=60, init_timeout_s=30) as c:
        c.wait_until_ready()
        yield c


def _batch(rng: np.random.Generator, b: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = rng.integers(0, 32, size=(b, s), dtype=np.int64)
    lengths = rng.integers(1, s + 1, size=(b,), dtype=np.int64)
    return tokens, lengths


def _train_inputs(b: int = 4, s: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 32, size=(b, s), dtype=np.int64)
    returns = rng.normal(size=(b, s)).astype(np.float32)
    prev_values = np.zeros((b, s), dtype=np.float32)
    mask = (rng.random((b, s)) < 0.7).astype(np.float32)
    return tokens, returns, prev_values, mask


def test_triton_env_fix_prefixes_libpython_dir_once():
    env = {"LD_LIBRARY_PATH": "/opt/x"}
    libdir = sysconfig.get_config_var("LIBDIR")
    assert triton_env_fix(env) == f"{libdir}:/opt/x"
    assert triton_env_fix(env) == f"{libdir}:/opt/x"  # idempotent
    assert triton_env_fix({}) == libdir


@pytest.mark.parametrize(
    "tokens, lengths, message",
    [
        # Triton rejects these before the callable runs; the validator is the backstop.
        (np.zeros((2, 4), np.int32), np.ones(2, np.int64), "input 'tokens' must have dtype int64, got int32"),
        (np.zeros(4, np.int64), np.ones(2, np.int64), r"input 'tokens' must have rank 2, got shape \(4,\)"),
        (np.zeros((2, 4), np.int64), np.ones(3, np.int64), "'sequence_lengths' has 3 rows but 'tokens' has B = 2"),
        (np.zeros((0, 4), np.int64), np.ones(0, np.int64), r"empty batch \(B = 0\)"),
        (np.zeros((9, 4), np.int64), np.ones(9, np.int64), "B = 9; expected B <= 8"),
        (np.zeros((2, 4), np.int64), np.array([4, 5]), "row 1 is 5; expected 1 <= length <= S = 4"),
        (np.array([[1, 2], [3, 32]]), np.ones(2, np.int64), r"'tokens' row 1, column 1 is 32; expected a token id 0 <= id < vocab_size = 32"),
        (np.array([[1, -2], [3, 4]]), np.ones(2, np.int64), r"'tokens' row 0, column 1 is -2; expected a token id 0 <= id < vocab_size = 32"),
    ],
)
def test_infer_validator_names_input(tokens, lengths, message):
    with pytest.raises(ValueError, match=message):
        validate_infer_request(tokens, lengths, max_seq_len=16, max_batch_size=8, vocab_size=32)


def test_train_validator_names_input():
    tokens, returns, prev_values, mask = _train_inputs(b=2, s=4)
    validate_train_request(tokens, returns, prev_values, mask, max_seq_len=4, max_batch_size=2)  # valid
    with pytest.raises(ValueError, match="input 'mask' must have dtype float32, got float64"):
        validate_train_request(tokens, returns, prev_values, mask.astype(np.float64), 4, 2)
    with pytest.raises(ValueError, match="S = 4; expected 1 <= S <= 3"):
        validate_train_request(tokens, returns, prev_values, mask, 3, 2)
    bad = tokens.copy()
    bad[1, 2] = 99999999
    with pytest.raises(ValueError, match=r"'tokens' row 1, column 2 is 99999999; expected a token id 0 <= id < vocab_size = 32"):
        validate_train_request(bad, returns, prev_values, mask, 4, 2, vocab_size=32)
    returns[1, 3] = -np.inf
    with pytest.raises(ValueError, match=r"input 'returns' has a non-finite value -inf at \[1, 3\]"):
        validate_train_request(tokens, returns, prev_values, mask, 4, 2)


def test_infer_roundtrip_matches_backend(client, backend):
    tokens, lengths = _batch(np.random.default_rng(0), 8, MAX_SEQ_LEN)
    values, rewards = client.infer(tokens, lengths)
    assert values.shape == (8, MAX_SEQ_LEN) and values.dtype == np.float32
    assert rewards.shape == (8,) and rewards.dtype == np.float32
    expected_values, expected_rewards = backend.infer(tokens, lengths)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(rewards, expected_rewards)
    # The tiny backend's reward is the value at the last valid token.
    np.testing.assert_array_equal(rewards, values[np.arange(8), lengths - 1])


def test_concurrent_infer_async_all_answered(client, backend):
    rng = np.random.default_rng(1)
    # Mixed batch sizes and sequence lengths: Triton may merge equal-S requests, never unequal ones.
    batches = [_batch(rng, b, s) for b, s in [(1, 8), (3, 8), (2, 8), (4, 32), (1, 32), (2, 5), (5, 8), (1, 128)] * 2]
    futures = [client.infer_async(t, n) for t, n in batches]
    for (tokens, lengths), future in zip(batches, futures):
        values, rewards = future.result(timeout=120)
        expected_values, expected_rewards = backend.infer(tokens, lengths)
        np.testing.assert_array_equal(values, expected_values)
        np.testing.assert_array_equal(rewards, expected_rewards)


def test_train_is_one_step_changes_weights_and_returns_the_loss(client, backend):
    tokens, returns, prev_values, mask = _train_inputs()
    before = {k: v.clone() for k, v in backend.model.state_dict().items()}
    values_before, _ = backend.infer(tokens, np.full(4, 16, dtype=np.int64))
    expected_loss = float((mask * (values_before - returns) ** 2).sum() / mask.sum())
    calls = backend.train_calls

    metrics = client.train(tokens, returns, prev_values, mask)

    assert backend.train_calls == calls + 1
    assert np.isfinite(metrics["loss"])
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert metrics["num_tokens"] == float(mask.sum())
    after = backend.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_train_request_id_is_applied_once_and_status_counts_steps(client, server, backend):
    from nemo_rlhf.servers.critic_server import TRAIN_DEDUP_SIZE

    status = client.status()
    assert status["instance"] == server.instance == client.instance
    calls, steps = backend.train_calls, status["train_steps"]
    first = client.train(*_train_inputs(), request_id="same-id")
    again = client.train(*_train_inputs(seed=1), request_id="same-id")  # a retry: not applied again
    assert again == first and "instance" not in first
    assert backend.train_calls == calls + 1
    assert client.status()["train_steps"] == steps + 1
    assert client.status()["train_duplicates"] >= 1
    for i in range(TRAIN_DEDUP_SIZE):  # the oldest ids are forgotten after TRAIN_DEDUP_SIZE others
        client.train(*_train_inputs(b=1, s=2), request_id=f"filler-{i}")
    client.train(*_train_inputs(), request_id="same-id")
    assert backend.train_calls == calls + 2 + TRAIN_DEDUP_SIZE


def test_save_then_load_restores_weights_optimizer_and_step(client, backend, root):
    path = root / "roundtrip" / "critic"
    client.save(str(path))
    assert (path / "COMPLETE").is_file() and json.loads((path / "state.json").read_text())["step"] == backend.train_calls
    state = torch.load(path / "model.pt", weights_only=True)
    for key, value in backend.model.state_dict().items():
        assert torch.equal(state["model"][key], value)
    saved = {k: v.clone() for k, v in backend.model.state_dict().items()}
    calls = backend.train_calls
    client.train(*_train_inputs())  # moves weights, Adam moments and the step
    assert client.load(str(path)) == {"step": float(calls)}
    assert backend.train_calls == calls
    for key, value in backend.model.state_dict().items():
        assert torch.equal(saved[key], value)
    with pytest.raises(CriticServerError, match="no-such-dir.*missing COMPLETE"):
        client.load(str(root / "no-such-dir"))
    client.save(str(path))  # an existing checkpoint of ours is replaced
    assert client.load(str(path)) == {"step": float(calls)}


def _infer_req(tokens, lengths):
    return lambda c: c.infer(tokens, lengths)


def _train_req(**changes):
    def call(c):
        inputs = dict(zip(("tokens", "returns", "prev_values", "mask"), _train_inputs()))
        inputs.update(changes)
        return c.train(**inputs)

    return call


_T = np.zeros((2, 8), dtype=np.int64)
_L = np.array([8, 3], dtype=np.int64)
_F = np.zeros((4, 16), dtype=np.float32)
_NAN = _F.copy()
_NAN[1, 2] = np.nan
_INF = _F.copy()
_INF[0, 0] = np.inf

BAD_REQUESTS = {
    # critic_infer
    # (some are rejected by Triton itself before the callable runs, with Triton's message)
    "tokens int32": (_infer_req(_T.astype(np.int32), _L), "input 'tokens' data-type is 'INT32'"),
    "tokens rank 1": (_infer_req(_T[0], _L), "'tokens' batch size does not match"),
    "tokens rank 3": (_infer_req(_T[:, :, None], _L), "unexpected shape for input 'tokens'"),
    "lengths rows != B": (_infer_req(_T, _L[:1]), "batch size does not match"),
    "length 0": (_infer_req(_T, np.array([8, 0], dtype=np.int64)), "sequence_lengths"),
    "length > S": (_infer_req(_T, np.array([9, 3], dtype=np.int64)), "sequence_lengths"),
    "S > max_seq_len": (
        _infer_req(np.zeros((2, MAX_SEQ_LEN + 1), np.int64), _L),
        f"input 'tokens' has sequence length S = {MAX_SEQ_LEN + 1}; expected 1 <= S <= {MAX_SEQ_LEN}",
    ),
    "B > max_batch_size": (
        _infer_req(np.zeros((MAX_BATCH + 1, 4), np.int64), np.ones(MAX_BATCH + 1, np.int64)),
        f"batch-size must be <= {MAX_BATCH}",
    ),
    # critic_train
    "returns NaN": (_train_req(returns=_NAN), "input 'returns' has a non-finite value nan at [1, 2]"),
    "mask Inf": (_train_req(mask=_INF), "input 'mask' has a non-finite value inf at [0, 0]"),
    "prev_values shape": (_train_req(prev_values=_F[:, :8].copy()), "input 'prev_values' has shape (4, 8)"),
    "returns float64": (_train_req(returns=_F.astype(np.float64)), "input 'returns' data-type is 'FP64'"),
    "train tokens rank 1": (_train_req(tokens=np.zeros(16, np.int64)), "unexpected shape for input 'tokens'"),
    "train token id too large": (_train_req(tokens=np.full((4, 16), 32, np.int64)), "'tokens' row 0, column 0 is 32"),
    "infer token id negative": (_infer_req(np.full((2, 8), -1, np.int64), _L), "'tokens' row 0, column 0 is -1"),
    "train B > max_batch_size": (
        _train_req(**dict(zip(("tokens", "returns", "prev_values", "mask"), _train_inputs(b=MAX_BATCH + 1)))),
        f"B = {MAX_BATCH + 1}; expected B <= {MAX_BATCH}",
    ),
    # critic_save
    "save empty path": (lambda c: c.save(""), "input 'path' is empty"),
    "load empty path": (lambda c: c.load(""), "input 'path' is empty"),
}


@pytest.mark.parametrize("kind", list(BAD_REQUESTS))
def test_bad_request_is_an_error_reply_and_server_keeps_serving(client, backend, kind):
    call, expected_in_message = BAD_REQUESTS[kind]
    calls = backend.train_calls
    with pytest.raises(CriticServerError) as info:
        call(client)
    assert not isinstance(info.value, CriticServerUnavailable)
    assert expected_in_message in str(info.value)
    assert backend.train_calls == calls  # the backend never saw it
    tokens, lengths = _batch(np.random.default_rng(2), 2, 8)
    np.testing.assert_array_equal(client.infer(tokens, lengths)[0], backend.infer(tokens, lengths)[0])


def test_empty_batch_is_refused_by_client_and_survived_by_server(client, backend):
    calls = backend.train_calls
    with pytest.raises(ValueError, match="input 'tokens' of 'critic_infer' is empty"):
        client.infer(_T[:0], _L[:0])
    with pytest.raises(ValueError, match="input 'tokens' of 'critic_train' is empty"):
        client.train(*(a[:0] for a in _train_inputs()))
    # Sent anyway (raw PyTriton client): an error reply, and the server keeps serving.
    from pytriton.client import ModelClient
    from pytriton.client.exceptions import PyTritonClientInferenceServerError

    with ModelClient(client.url, "critic_train", init_timeout_s=10, inference_timeout_s=10) as raw:
        with pytest.raises(PyTritonClientInferenceServerError):
            empty = (a[:0] for a in _train_inputs())
            raw.infer_sample(**dict(zip(("tokens", "returns", "prev_values", "mask"), empty)))
    assert backend.train_calls == calls
    np.testing.assert_array_equal(client.infer(_T, _L)[0], backend.infer(_T, _L)[0])


def test_validation_message_is_the_servers(client):
    with pytest.raises(CriticServerError, match=r"input 'sequence_lengths' row 1 is 0; expected 1 <= length <= S = 8"):
        client.infer(_T, np.array([8, 0], dtype=np.int64))


def test_backend_exception_is_an_error_reply_and_server_keeps_serving(client, backend):
    backend.raise_next = RuntimeError("simulated CUDA OOM")
    with pytest.raises(CriticServerError, match="RuntimeError: simulated CUDA OOM") as info:
        client.infer(_T, _L)
    assert not isinstance(info.value, CriticServerUnavailable)
    assert "[server error id " in str(info.value) and "Traceback" not in str(info.value)
    backend.raise_next = RuntimeError("simulated\nmulti-line failure")
    status, message = raw_infer(client.url, "critic_infer", _raw_infer_inputs(_T, _L))
    assert status >= 400 and _one_line_reply(message)
    assert "the backend failed: RuntimeError: simulated multi-line failure" in message
    np.testing.assert_array_equal(client.infer(_T, _L)[1], backend.infer(_T, _L)[1])


def test_slow_inference_raises_unavailable_naming_the_infer_timeout(server, backend):
    backend.delay_next_s = 2.0
    # retry_limit_s=0: give up after the first timeout (retries are tested in test_server_faults.py).
    with CriticClient(server.host, server.http_port, infer_timeout_s=0.5, init_timeout_s=30, retry_limit_s=0) as c:
        c.wait_until_ready()
        with pytest.raises(
            CriticServerUnavailable, match=r"\(model 'critic_infer'\) unavailable: .* did not answer within 0.5 s"
        ):
            c.infer(_T, _L)


def test_nothing_listening_raises_unavailable_naming_host_port_model():
    (port,) = find_free_ports(1)
    with CriticClient("127.0.0.1", port, infer_timeout_s=1.0, init_timeout_s=1.0) as c:
        with pytest.raises(CriticServerUnavailable) as info:
            c.infer(_T, _L)
        message = str(info.value)
        assert f"http://127.0.0.1:{port}" in message and "'critic_infer'" in message and "1.0 s" in message
        with pytest.raises(CriticServerUnavailable, match="'critic_infer'"):
            c.infer_async(_T, _L).result(timeout=60)
        with pytest.raises(CriticServerUnavailable, match="'critic_train'"):
            c.train(*_train_inputs())


def test_server_that_never_answers_raises_unavailable():
    with socket.socket() as listener:  # accepts connections (kernel backlog) but never replies
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        with CriticClient("127.0.0.1", port, infer_timeout_s=1.0, init_timeout_s=1.0) as c:
            with pytest.raises(CriticServerUnavailable, match=f"127.0.0.1:{port}"):
                c.infer(_T, _L)


def test_process_that_exits_early_raises_unavailable_with_log_tail(tmp_path):
    (port,) = find_free_ports(1)
    cmd = [sys.executable, "-c", "print('boom: no backend'); raise SystemExit(3)"]
    with pytest.raises(CriticServerUnavailable) as info:
        start_server_process(cmd, "127.0.0.1", port, ready_timeout_s=30, log_path=tmp_path / "server.log")
    assert "exited with code 3" in str(info.value) and "boom: no backend" in str(info.value)


@pytest.mark.parametrize("stop_timeout_s", [60.0, 0.0], ids=["graceful", "killed"])  # graceful: ~11 s idle
def test_server_process_serves_then_stops_without_orphans(tmp_path, stop_timeout_s):
    """A served request, then ServerProcess.stop: no process, shared-memory store or PyTriton
    workspace of the server is left, whether it exits by itself after SIGTERM (``graceful``) or is
    SIGKILLed at once (``killed``: stop removes what PyTriton could not)."""
    from nemo_rlhf.servers.critic_server import SHM_DIR, server_workspace_prefix

    http, grpc, metrics = find_free_ports(3)
    paths = [str(REPO_ROOT), str(Path(__file__).parent)]
    code = f"import sys; sys.path[:0] = {paths!r}; import tiny_backend; tiny_backend.main()"
    cmd = [sys.executable, "-c", code, str(http), str(grpc), str(metrics)]
    proc = start_server_process(cmd, "127.0.0.1", http, ready_timeout_s=120, log_path=tmp_path / "server.log")
    try:
        children = _descendants(proc.pid)
        assert children, "expected tritonserver and backend stubs under the server process"
        leftovers = [f"{SHM_DIR}/pytrtion{proc.pid}-*", server_workspace_prefix(proc.pid) + "*"]
        stores, workspaces = (glob.glob(pattern) for pattern in leftovers)
        assert len(stores) >= 1 and len(workspaces) == 1, (stores, workspaces)
        with CriticClient("127.0.0.1", http, init_timeout_s=30, retry_limit_s=1.0, retry_backoff_s=0.2) as c:
            tokens, lengths = _batch(np.random.default_rng(3), 2, 8)
            # Same seed and architecture as the subprocess's backend -> same weights.
            np.testing.assert_array_equal(c.infer(tokens, lengths)[0], TinyCriticBackend().infer(tokens, lengths)[0])
            code = proc.stop(timeout_s=stop_timeout_s)
            assert code == (0 if stop_timeout_s else -signal.SIGKILL)
            # A stopped (crashed) server is reported as unavailable, not as a hang.
            with pytest.raises(CriticServerUnavailable, match="'critic_infer'"):
                c.infer(tokens, lengths)
    finally:
        proc.stop(timeout_s=10)
    assert not proc.is_alive()
    alive = [pid for pid in children if os.path.exists(f"/proc/{pid}") and _not_zombie(pid)]
    assert alive == []
    assert [glob.glob(pattern) for pattern in leftovers] == [[], []]


def test_remove_server_leftovers_takes_only_the_given_pids(tmp_path, monkeypatch):
    """remove_server_leftovers: the shared-memory stores and workspaces of the given pids, nothing of
    another process (pid 12 is not pid 123), nothing outside the two name patterns."""
    import pytriton.constants

    from nemo_rlhf.servers.critic_server import server_workspace_prefix
    from nemo_rlhf.servers.process import remove_server_leftovers

    monkeypatch.setattr(pytriton.constants, "PYTRITON_HOME", tmp_path / "home")
    shm = tmp_path / "shm"
    shm.mkdir()
    for name in ("pytrtion12-aa-1", "pytrtion12-bb-2", "pytrtion123-aa-1", "psm_12", "pytrtion7-cc"):
        (shm / name).write_bytes(b"x")
    for pid in (12, 123):
        (Path(server_workspace_prefix(pid) + "inst") / "model-store").mkdir(parents=True)
    removed = remove_server_leftovers([12, 99], shm_dir=str(shm))
    assert sorted(Path(p).name for p in removed) == sorted(["pytrtion12-aa-1", "pytrtion12-bb-2",
                                                           Path(server_workspace_prefix(12) + "inst").name])
    assert sorted(p.name for p in shm.iterdir()) == ["psm_12", "pytrtion123-aa-1", "pytrtion7-cc"]
    assert [p.name for p in (tmp_path / "home").iterdir()] == [Path(server_workspace_prefix(123) + "inst").name]
    assert remove_server_leftovers([12], shm_dir=str(shm)) == []


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ------------------------------------------------------------------ raw KServe-v2 HTTP (issue 9)


@pytest.mark.parametrize(
    "model, tokens, where",
    [
        ("critic_infer", np.array([[1, 2, 99999999]], np.int64), "row 0, column 2 is 99999999"),
        ("critic_infer", np.array([[1, 2, 3], [4, -2, 5]], np.int64), "row 1, column 1 is -2"),
        ("critic_train", np.array([[1, 2], [3, 32]], np.int64), "row 1, column 1 is 32"),
        ("critic_train", np.array([[-7, 2]], np.int64), "row 0, column 0 is -7"),
    ],
)
def test_raw_out_of_range_token_ids_are_refused_before_the_model(client, server, backend, model, tokens, where):
    calls = backend.train_calls
    inputs = _raw_infer_inputs(tokens, [tokens.shape[1]] * tokens.shape[0]) if model == "critic_infer" else _raw_train_inputs(tokens)
    status, message = raw_infer(server.url, model, inputs)
    assert status >= 400, message
    assert _one_line_reply(message), message
    assert f"input 'tokens' {where}; expected a token id 0 <= id < vocab_size = 32" in message
    assert backend.train_calls == calls
    status, _ = raw_infer(server.url, "critic_infer", _raw_infer_inputs(_T, _L))
    assert status == 200


def test_raw_save_never_replaces_a_foreign_directory_or_file(server, root, backend):
    foreign = root / "foreign"
    foreign.mkdir()
    payload = os.urandom(4096) + b"\nuser data\n"
    (foreign / "data.txt").write_bytes(payload)
    (root / "notes.txt").write_text("not a checkpoint")
    (root / "partial.tmp").mkdir()  # the temporary directory a save to 'partial' would reuse
    (root / "partial.tmp" / "keep.bin").write_bytes(b"\x00\x01")
    fake = root / "fake"  # has a COMPLETE marker but no state.json: not ours either
    fake.mkdir()
    (fake / "COMPLETE").write_text("ok\n")
    before = _tree(root)
    for target, why in [
        (str(foreign), "exists and has no COMPLETE marker"),
        ("foreign", "exists and has no COMPLETE marker"),  # relative: inside the root
        (str(root / "notes.txt"), "exists and is not a directory"),
        (str(root / "partial"), "partial.tmp exists"),
        (str(fake), "exists and has no state.json"),
    ]:
        status, message = raw_infer(server.url, "critic_save", _raw_path(target))
        assert status >= 400 and _one_line_reply(message), message
        assert why in message and "nothing was changed" in message, message
    assert (foreign / "data.txt").read_bytes() == payload
    assert _tree(root) == before


def test_raw_save_and_load_cannot_escape_the_root(server, root, tmp_path, client):
    outside = Path(os.path.realpath(tmp_path)) / "outside"
    outside.mkdir()
    (outside / "data.txt").write_bytes(b"outside data")
    client.save(str(root / "good"))  # a real checkpoint, then a copy of it outside the root
    shutil.copytree(root / "good", outside / "ckpt")
    (root / "link_out").symlink_to(outside, target_is_directory=True)
    (root / "ckpt_link").symlink_to(outside / "ckpt", target_is_directory=True)
    (root / "sub").mkdir()
    before_root, before_outside = _tree(root), _tree(outside)
    escapes = [
        f"{root}/../{root.name}_escape",
        "../escape",
        "sub/../../escape",
        str(outside / "new"),
        str(root / "link_out" / "new"),
        str(root / "link_out"),
        str(root / "ckpt_link"),
        str(root),
        "/",
    ]
    for path in escapes:
        status, message = raw_infer(server.url, "critic_save", _raw_path(path))
        assert status >= 400 and _one_line_reply(message), (path, message)
        assert "not inside the server's checkpoint root" in message, (path, message)
    for path in ["../outside/ckpt", str(root / "ckpt_link"), str(outside / "ckpt"), f"{root}/sub/../../outside/ckpt"]:
        status, message = raw_infer(server.url, "critic_load", _raw_path(path))
        assert status >= 400 and _one_line_reply(message), (path, message)
        assert "not inside the server's checkpoint root" in message, (path, message)
    assert _tree(root) == before_root and _tree(outside) == before_outside
    assert not (root.parent / f"{root.name}_escape").exists() and not (root.parent / "escape").exists()
    # The same checkpoint inside the root loads; without its COMPLETE marker it is refused.
    status, message = raw_infer(server.url, "critic_load", _raw_path(str(root / "good")))
    assert status == 200, message
    shutil.copytree(root / "good", root / "unmarked")
    (root / "unmarked" / "COMPLETE").unlink()
    status, message = raw_infer(server.url, "critic_load", _raw_path("unmarked"))
    assert status >= 400 and _one_line_reply(message) and "missing COMPLETE marker" in message, message


@pytest.mark.parametrize("failure", [
    ["terminate called after throwing an instance of 'boost::interprocess::lock_exception'"],
    ['  File "/venv/lib/python3.11/site-packages/tritonclient/http/_client.py", line 296, in _post',
     "TimeoutError: timed out"],
], ids=["triton_abort", "model_load_timeout"])
def test_a_triton_startup_abort_is_retried_and_other_exits_are_not(tmp_path, failure):
    """A server that dies before it is ready with a known start-up failure under load in its log
    (Triton's abort; PyTriton's model load timing out) is started again (here: it serves a fake
    health endpoint on its second start); a server that dies with any other error, a timeout
    elsewhere included, is reported at once, with its log."""
    from nemo_rlhf.servers.process import find_free_ports

    port = find_free_ports(1)[0]
    marker = tmp_path / "started_once"
    script = tmp_path / "fake_server.py"
    script.write_text(f"""
import http.server, pathlib, sys
marker = pathlib.Path({str(marker)!r})
if sys.argv[1] == "transient" and not marker.exists():
    marker.write_text("x")
    print({chr(10).join(failure)!r}, flush=True)
    sys.exit(134)
if sys.argv[1] == "broken":
    print("ValueError: bad config; TimeoutError: timed out", flush=True)
    sys.exit(1)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", {port}), H).serve_forever()
""")
    server = start_server_process([sys.executable, str(script), "transient"], "127.0.0.1", port, 30,
                                  tmp_path / "a.log")
    try:
        assert marker.exists() and failure[-1] in (tmp_path / "a.log").read_text()
    finally:
        server.stop()
    with pytest.raises(CriticServerUnavailable, match="bad config"):
        start_server_process([sys.executable, str(script), "broken"], "127.0.0.1", port, 30, tmp_path / "b.log")
    assert (tmp_path / "b.log").read_text().count("bad config") == 1  # started once, not retried


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    """find_free_ports draws below the OS's ephemeral range, where outgoing connections never land."""
    from nemo_rlhf.servers.process import _ephemeral_low, find_free_ports

    ports = find_free_ports(9)
    assert len(set(ports)) == 9 and all(10000 <= p < _ephemeral_low() for p in ports)
    for p in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", p))
    with pytest.raises(ValueError, match="n must be >= 1"):
        find_free_ports(0)
