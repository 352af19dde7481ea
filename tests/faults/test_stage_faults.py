"""The PPO actor against a critic server that dies (SIGKILL of its process group) mid-run.

The actor must notice within ``critic.retry_limit_s`` (+ one request timeout), write an actor-only
emergency checkpoint, keep the last paired actor+critic checkpoint intact, and exit non-zero with a
message naming the server and the paired checkpoint the same command resumes from. Also: preemption
of the reward-model stage by SIGUSR1, and by SIGTERM to its whole process group."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from stage_runs import DATA, MODEL, critic_server_cmd, launch, start_servers, stop_servers

pytestmark = [pytest.mark.faults, pytest.mark.server]


@pytest.fixture(scope="module")
def trained(sft_run, rm_run) -> dict[str, Path]:
    """The session's SFT policy, tokenizer and reward model (tests/conftest.py: trained once per
    test run, at the launchers' smallest size, which MODEL and DATA here repeat)."""
    return {"sft_weights": sft_run / "sft_weights", "tokenizer": sft_run / "tokenizer.json",
            "rm_weights": rm_run / "rm_weights"}


def ppo_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r["step"] for r in rows if r["stage"] == "ppo" and "ppo/reward" in r]


def test_critic_server_killed_mid_run(trained, tmp_path):
    from nemo_rlhf.servers.process import find_free_ports

    # The server starts while the actor starts (the actor waits for it: critic.init_timeout_s).
    ports = find_free_ports(3)
    port = ports[0]
    starting = start_servers([(critic_server_cmd(trained["rm_weights"], trained["tokenizer"], ports,
                                                  f"server.checkpoint_root={tmp_path}"), port,
                               tmp_path / "server1.log")])
    run = tmp_path / "ppo"
    args = [f"run_dir={run}", f"init_from={trained['sft_weights']}",
            f"tokenizer.path={trained['tokenizer']}", *MODEL, *DATA, "critic.init_timeout_s=300",
            "batch.global_batch_size=8", "batch.micro_batch_size=4", "ppo.sampling.max_new_tokens=8",
            "data.max_heldout_prompts=8", "trainer.val_check_interval=null", "checkpoint.every_n_steps=1",
            "checkpoint.keep_last=2", "critic.infer_timeout_s=10", "critic.train_timeout_s=10",
            "++critic.retry_limit_s=4", "++critic.retry_backoff_s=0.5"]
    proc = launch("train_ppo_actor.py", *args, f"critic.port={port}", "trainer.max_steps=1000", wait=False)
    try:
        server = starting[0].result(timeout=600)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and len(ppo_steps(run)) < 2:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        os.killpg(server.pid, signal.SIGKILL)  # the critic node dies mid-rollout/training
        killed = time.time()
        out, _ = proc.communicate(timeout=240)
        detected_s = time.time() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        stop_servers(starting)
    print(f"critic server killed: actor exited {proc.returncode} after {detected_s:.1f} s")  # -s shows it
    print("\n".join(line for line in out.splitlines() if "critic server 127.0.0.1" in line or "emergency" in line)[-2000:])
    assert proc.returncode != 0, out[-3000:]
    assert f"critic server 127.0.0.1:{port} failed" in out, out[-3000:]
    # bounded: retry limit (4 s) + one request timeout (10 s) + the emergency save, with margin
    assert detected_s < 60, f"took {detected_s:.1f} s to give up"
    root = run / "checkpoints" / "ppo"
    emergency = sorted(root.glob("emergency_step_*"))
    assert len(emergency) == 1 and (emergency[0] / "COMPLETE").exists()
    state = json.loads((emergency[0] / "state.json").read_text())
    assert state["critic"] is None and "127.0.0.1" in state["reason"]
    from nemo_rlhf.checkpoint.training_state import latest_checkpoint

    # The paired actor+critic checkpoint is intact and is what the same command resumes from (the
    # emergency one is never picked; resuming a paired checkpoint against a fresh server is
    # tests/checkpoint/test_resume.py's bitwise PPO test).
    paired = latest_checkpoint(root)
    assert paired is not None and (paired / "critic" / "COMPLETE").exists()
    assert int(paired.name.split("_")[1]) >= 2
    assert f"the run resumes (same command, with a running critic server) from the newest paired actor+critic " \
           f"checkpoint: {paired}" in out


def rm_args(trained: dict[str, Path], run: Path, every_n_steps: int) -> list[str]:
    """The reward-model launcher's overrides for the preemption tests: from the session SFT policy,
    at the smallest size, a loss logged every step, a checkpoint every ``every_n_steps`` (0: none)."""
    return [f"run_dir={run}", f"init_from={trained['sft_weights']}", f"tokenizer.path={trained['tokenizer']}",
            *MODEL, *DATA, "trainer.val_check_interval=null", "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1", f"checkpoint.every_n_steps={every_n_steps}"]


@pytest.mark.parametrize("sig", ["SIGUSR1"])  # SIGTERM: the SFT and PPO tests in tests/checkpoint
def test_reward_model_stage_preempted_checkpoints_and_exits_cleanly(trained, tmp_path, sig):
    """SLURM's --signal=B:USR1@300 / preemption SIGTERM: checkpoint at the next step boundary, exit 0
    within a bounded time; the same command then resumes from that checkpoint."""
    run = tmp_path / "rm"
    args = rm_args(trained, run, every_n_steps=0)
    proc = launch("train_reward_model.py", *args, "trainer.max_steps=100000", wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        path = run / "metrics.jsonl"
        if path.exists() and sum('"train/loss"' in x for x in path.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    sent = time.time()
    proc.send_signal(getattr(signal, sig))
    out, _ = proc.communicate(timeout=120)
    took = time.time() - sent
    assert proc.returncode == 0, out[-3000:]
    assert took < 30, f"{sig}: {took:.1f} s from signal to exit"
    result = json.loads((run / "rm_result.json").read_text())
    assert result["preempted"] and result["signal"] == sig
    k = result["steps"]
    assert (run / "checkpoints" / "rm" / f"step_{k:08d}" / "COMPLETE").exists()
    proc = launch("train_reward_model.py", *args, f"trainer.max_steps={k + 1}")
    assert "resumed from" in proc.stdout + proc.stderr
    assert json.loads((run / "rm_result.json").read_text())["steps"] == k + 1


def test_group_sigterm_after_a_checkpoint_still_checkpoints(trained, tmp_path):
    """``scancel`` / SLURM preemption signal every process of the job step, not only the launcher:
    SIGTERM to the launcher's whole process group after it has written a checkpoint (so the
    checkpoint writer's helper process exists and is signalled too) still ends in a complete
    preemption checkpoint and exit 0. Before saves deferred SIGTERM, the helper died at the signal
    and the preemption save failed with ``BrokenPipeError`` (found killing a DPO run with ``pkill -f``)."""
    run = tmp_path / "rm"
    proc = launch("train_reward_model.py", *rm_args(trained, run, every_n_steps=1), "trainer.max_steps=100000",
                  wait=False, start_new_session=True)
    root = run / "checkpoints" / "rm"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (root / "step_00000002" / "COMPLETE").exists():
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    os.killpg(proc.pid, signal.SIGTERM)  # the launcher started its own session: its pgid is its pid
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    result = json.loads((run / "rm_result.json").read_text())
    assert result["preempted"] and result["signal"] == "SIGTERM", result
    k = result["steps"]
    assert k >= 2 and (root / f"step_{k:08d}" / "COMPLETE").exists(), sorted(p.name for p in root.iterdir())
    assert not list(root.glob("*.tmp")), sorted(p.name for p in root.iterdir())
