"""Issue 9 pieces that need no running server: path confinement and checkpoint recognition
(nemo_rlhf/servers/paths.py), token resolution, CriticClient.from_config, the serve stage's
security settings, and the one-line error reply mechanism."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nemo_rlhf.servers import CriticClient, CriticServer
from nemo_rlhf.servers.critic_server import CriticRequestError, _patch_stub_model
from nemo_rlhf.servers.paths import (
    COMPLETE_MARKER,
    PathRejected,
    check_load_path,
    check_save_path,
    checkpoint_problem,
    real_root,
)
from nemo_rlhf.servers.protocol import CriticBackend, resolve_auth_token

sys.path.insert(0, str(Path(__file__).parent))
from tiny_backend import TinyCriticBackend  # noqa: E402

pytestmark = pytest.mark.server

TOKEN = "t" * 24


def _checkpoint(path: Path, step: int = 3) -> Path:
    path.mkdir(parents=True)
    (path / "state.json").write_text(json.dumps({"step": step}))
    (path / "COMPLETE").write_text("ok\n")
    return path


def test_complete_marker_matches_the_checkpoint_module():
    from nemo_rlhf.checkpoint.weights import COMPLETE_MARKER as written

    assert COMPLETE_MARKER == written


def test_tiny_backend_implements_the_protocol_and_writes_recognised_checkpoints(tmp_path):
    backend = TinyCriticBackend()
    assert isinstance(backend, CriticBackend) and backend.vocab_size == 32
    backend.save(str(tmp_path / "ckpt"))
    assert checkpoint_problem(str(tmp_path / "ckpt")) is None
    backend.save(str(tmp_path / "ckpt"))  # replaced atomically, no leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_checkpoint_recognition(tmp_path):
    assert checkpoint_problem(str(_checkpoint(tmp_path / "good"))) is None
    assert checkpoint_problem(str(tmp_path / "missing")) == "does not exist"
    (tmp_path / "file").write_text("x")
    assert checkpoint_problem(str(tmp_path / "file")) == "is not a directory"
    (tmp_path / "link").symlink_to(tmp_path / "good")
    assert checkpoint_problem(str(tmp_path / "link")) == "is a symbolic link"
    no_marker = _checkpoint(tmp_path / "no_marker")
    (no_marker / "COMPLETE").unlink()
    assert checkpoint_problem(str(no_marker)) == "has no COMPLETE marker"
    no_state = _checkpoint(tmp_path / "no_state")
    (no_state / "state.json").unlink()
    assert checkpoint_problem(str(no_state)) == "has no state.json"
    for text, problem in [("{", "unreadable state.json"), ('{"step": "3"}', "without an integer 'step'"),
                          ("[1]", "without an integer 'step'"), ('{"step": true}', "without an integer 'step'")]:
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        _checkpoint(bad)
        (bad / "state.json").write_text(text)
        assert problem in checkpoint_problem(str(bad))


def test_paths_are_confined_after_resolving_dotdot_and_symlinks(tmp_path):
    root = real_root(tmp_path / "root")
    Path(root).mkdir()
    outside = tmp_path / "outside"
    _checkpoint(outside / "ckpt")
    (Path(root) / "out").symlink_to(outside, target_is_directory=True)
    assert check_save_path(root, "a/b") == os.path.join(root, "a", "b")  # relative: under the root
    assert check_save_path(root, f"{root}/x/../y") == os.path.join(root, "y")
    for text in ["..", "../x", "a/../../x", str(outside / "new"), "out", "out/new", root, "/", "/etc"]:
        with pytest.raises(PathRejected, match="not inside the server's checkpoint root"):
            check_save_path(root, text)
        with pytest.raises(PathRejected, match="not inside the server's checkpoint root"):
            check_load_path(root, text)
    with pytest.raises(PathRejected, match="not inside"):
        check_load_path(root, "out/ckpt")  # a real checkpoint, but outside after resolution
    _checkpoint(Path(root) / "in")
    (Path(root) / "in_link").symlink_to(Path(root) / "in", target_is_directory=True)
    assert check_load_path(root, "in_link") == os.path.join(root, "in")  # resolved, inside: fine
    assert check_save_path(root, "in") == os.path.join(root, "in")  # our own checkpoint: replaceable
    with pytest.raises(PathRejected, match="missing COMPLETE marker"):
        check_load_path(root, "nothing")
    with pytest.raises(ValueError, match="not a directory"):
        real_root(Path(root) / "in" / "COMPLETE")


def test_save_refuses_foreign_path_tmp_and_old(tmp_path):
    root = real_root(tmp_path)
    for suffix in ("", ".tmp", ".old"):
        target = tmp_path / f"c{len(suffix)}"
        (tmp_path / f"c{len(suffix)}{suffix}").mkdir()
        (tmp_path / f"c{len(suffix)}{suffix}" / "user.txt").write_text("mine")
        with pytest.raises(PathRejected, match="is not a checkpoint written by nemo-rlhf.*nothing was changed"):
            check_save_path(root, str(target))
    (tmp_path / "d.tmp").symlink_to(tmp_path / "c0")
    with pytest.raises(PathRejected, match="d.tmp exists and is a symbolic link"):
        check_save_path(root, "d")


def test_auth_token_resolution_never_puts_the_token_in_messages():
    env = {"MY_TOKEN": TOKEN, "SHORT": "abc", "EMPTY": ""}
    assert resolve_auth_token(None, "MY_TOKEN", env) == TOKEN
    assert resolve_auth_token("u" * 20, "MY_TOKEN", env) == "u" * 20  # explicit wins
    assert resolve_auth_token(None, "EMPTY", env) is None
    assert resolve_auth_token(None, "UNSET", env) is None
    assert resolve_auth_token(None, None, env) is None
    with pytest.raises(ValueError, match="environment variable SHORT .server.auth_token_env") as info:
        resolve_auth_token(None, "SHORT", env)
    assert "abc" not in str(info.value)
    with pytest.raises(ValueError, match="server.auth_token"):
        resolve_auth_token("has:colon-and-more-chars", None, env)
    with pytest.raises(ValueError, match="auth_token"):
        CriticServer(TinyCriticBackend(), auth_token="short")


def test_client_from_config_reads_timeouts_retries_and_the_token_from_the_environment():
    cfg = OmegaConf.create({"host": "10.0.0.7", "port": 5555, "infer_timeout_s": 12, "train_timeout_s": 34,
                            "init_timeout_s": 5, "retry_limit_s": 7, "retry_backoff_s": 0.5, "retry_backoff_max_s": 2,
                            "auth_token": None, "auth_token_env": "CRITIC_TOKEN_FOR_TEST"})
    with CriticClient.from_config(cfg, environ={"CRITIC_TOKEN_FOR_TEST": TOKEN}) as client:
        assert client.url == "http://10.0.0.7:5555" and client.auth_enabled and client._auth_token == TOKEN
        assert (client.infer_timeout_s, client.train_timeout_s, client.init_timeout_s) == (12.0, 34.0, 5.0)
        assert (client.retry_limit_s, client.retry_backoff_s, client.retry_backoff_max_s) == (7.0, 0.5, 2.0)
    with CriticClient.from_config({"host": "h", "port": 1}, environ={}) as client:  # defaults, no token
        assert not client.auth_enabled and client.retry_limit_s == 300.0
    with CriticClient.from_config({"host": "h", "port": 1}, environ={"NEMO_RLHF_CRITIC_TOKEN": TOKEN}) as client:
        assert client.auth_enabled  # the default variable
    with CriticClient.from_config({"host": "h", "port": 1, "auth_token_env": None},
                                  environ={"NEMO_RLHF_CRITIC_TOKEN": TOKEN}) as client:
        assert not client.auth_enabled
    with pytest.raises(KeyError, match="critic.port"):
        CriticClient.from_config({"host": "h"})
    with pytest.raises(ValueError, match="critic.auth_token_env"):
        CriticClient.from_config({"host": "h", "port": 1, "auth_token_env": "T"}, environ={"T": "bad token"})


def test_serve_stage_security_settings_default_to_run_dir_and_drop_the_variable(tmp_path):
    from nemo_rlhf.servers.serve import server_security

    cfg = OmegaConf.create({"run_dir": str(tmp_path / "run"),
                            "server": {"checkpoint_root": None, "auth_token": None,
                                       "auth_token_env": "NEMO_RLHF_CRITIC_TOKEN"}})
    env = {"NEMO_RLHF_CRITIC_TOKEN": TOKEN, "OTHER": "1"}
    assert server_security(cfg, env) == (str(tmp_path / "run"), TOKEN)
    assert env == {"OTHER": "1"}  # not inherited by tritonserver / the stubs
    cfg.server.checkpoint_root = str(tmp_path / "shared")
    assert server_security(cfg, {}) == (str(tmp_path / "shared"), None)
    cfg.server.auth_token_env = None
    assert server_security(cfg, {"NEMO_RLHF_CRITIC_TOKEN": TOKEN})[1] is None
    with pytest.raises(ValueError, match="checkpoint_root"):
        server_security(OmegaConf.create({"run_dir": None, "server": {}}), {})


def test_request_error_formats_as_one_line_without_traceback():
    def fail():
        try:
            raise KeyError("inner")
        except KeyError:
            raise CriticRequestError("input 'x' is\nbad; expected good", error_id="abc") from None

    with pytest.raises(CriticRequestError) as info:
        fail()
    error = info.value
    text = "".join(traceback.format_exception(None, error, error.__traceback__))  # what PyTriton sends
    assert text == "CriticRequestError: CRITIC_REQUEST_ERROR (error id abc): input 'x' is bad; expected good\n"
    assert info.tb is not None  # the interpreter keeps the real traceback for the server's DEBUG log


def test_stub_patch_applies_to_this_pytriton_and_compiles():
    import pytriton.proxy

    source = (Path(pytriton.proxy.__file__).parent / "model.py").read_bytes()
    patched = _patch_stub_model(source)
    assert patched != source and b"_nemo_rlhf_error_responses(triton_requests" in patched
    compile(patched, "model.py", "exec")
    assert _patch_stub_model(b"something else") == b"something else"
