"""launchers/run_demo.py restarts a critic server that dies under PPO (at most ``server_restarts``
times) and PPO resumes; the failures are reported; a preempted stage stops the pipeline cleanly. The server, client and PPO are fakes here (the
real server-death path of PPO itself, emergency checkpoint and resume, is
tests/faults/test_stage_faults.py::test_critic_server_killed_mid_run)."""

import importlib.util
import logging
import os
import warnings
from pathlib import Path

import pytest

from nemo_rlhf.algorithms.ppo import CriticServerFailure
from nemo_rlhf.config import register_configs
from nemo_rlhf.servers.protocol import CriticServerError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _restore_logging():
    """Importing the launcher runs ``@hydra_entry``, which sets up console logging for the whole
    process (a root handler, logger levels, warning filters): undo it so later tests in this
    worker see the logging they expect."""
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    saved = {name: (lg.level, lg.propagate, lg.handlers[:])
             for name, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    with warnings.catch_warnings():
        yield
    root.handlers[:] = saved_root[0]
    root.setLevel(saved_root[1])
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger):
            level, propagate, handlers = saved.get(name, (logging.NOTSET, True, []))
            lg.setLevel(level)
            lg.propagate = propagate
            lg.handlers[:] = handlers


def _launcher():
    spec = importlib.util.spec_from_file_location("run_demo_under_test", REPO / "launchers" / "run_demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class FakeServer:
    def __init__(self, log):
        self.log = log
        log.append("start")

    def stop(self):
        self.log.append("stop")


class FakeClient:
    @classmethod
    def from_config(cls, cfg):
        return cls()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture(autouse=True)
def _no_token_left_behind():
    """run_online_stage sets the demo's access token in os.environ (for its server and client):
    undo it after each test, or this worker's later tests would start token-checking servers whose
    clients (launched with a copy of the environment from before) send none."""
    before = os.environ.get("NEMO_RLHF_CRITIC_TOKEN")
    yield
    os.environ.pop("NEMO_RLHF_CRITIC_TOKEN", None)
    if before is not None:
        os.environ["NEMO_RLHF_CRITIC_TOKEN"] = before


def _run(tmp_path, failures, restarts, result=None, algorithm="ppo"):
    from hydra import compose, initialize_config_dir

    register_configs()
    mod = _launcher()
    log, calls = [], []

    def run_ppo(cfg, critic):
        calls.append(cfg.run_dir)
        if failures:
            raise failures.pop(0)
        return result or {"heldout_prompts": 8, "steps": 3}

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("demo_tiny", [f"server_restarts={restarts}", f"algorithm={algorithm}"])
        wall = {}
        out = mod.run_online_stage(cfg, tmp_path, {}, None, {"type": "tokenizer_json", "path": "tok.json"}, "sft_w",
                                   {"checkpoint": "rm_w", "reward_pooling": "last"}, wall, FakeClient,
                                   lambda n: [20000], lambda *a, **k: FakeServer(log), run_stage=run_ppo)
    return out, log, calls, wall


@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "rs"])
def test_dead_server_is_restarted_and_ppo_resumes(tmp_path, algorithm):
    """The same restart loop serves PPO and the algorithms run in its place (algorithm=...)."""
    failures = [CriticServerFailure("critic server 127.0.0.1:20000 failed at PPO step 3: stub not healthy\n  more"),
                CriticServerError("critic server http://127.0.0.1:20000 rejected the request: stub not healthy")]
    out, log, calls, wall = _run(tmp_path, failures, restarts=2, algorithm=algorithm)
    assert log == ["start", "stop"] * 3  # every server stopped, a fresh one per attempt
    assert len(calls) == 3 and out[algorithm]["steps"] == 3
    assert out[algorithm]["server_restarts"] == [
        "critic server 127.0.0.1:20000 failed at PPO step 3: stub not healthy",
        "critic server http://127.0.0.1:20000 rejected the request: stub not healthy"]
    assert wall[algorithm] >= 0.0 and "server_start" in wall


def test_restarts_are_bounded(tmp_path):
    failures = [CriticServerFailure("first"), CriticServerFailure("second")]
    with pytest.raises(CriticServerFailure, match="second"):
        _run(tmp_path, failures, restarts=1)


def test_other_errors_are_not_retried(tmp_path):
    with pytest.raises(ValueError, match="bad batch"):
        _run(tmp_path, [ValueError("bad batch")], restarts=2)


def test_preempted_ppo_is_passed_through(tmp_path):
    """SIGTERM during PPO: the stage's preemption result comes back as is (no report figures
    computed from it) and the pipeline stops there (launchers/run_demo.py _preempted)."""
    pre = {"preempted": True, "signal": "SIGTERM", "steps": 4, "resume_from": "/r/checkpoints/ppo/step_00000004"}
    out, log, calls, _ = _run(tmp_path, [], restarts=2, result=dict(pre))
    assert out == {"ppo": pre} and log == ["start", "stop"] and len(calls) == 1
    assert _launcher()._preempted("ppo", out["ppo"]) and not _launcher()._preempted("rm", {"steps": 3})
