"""Exact resume of the SFT and reward-model stages (checkpoint marker).

A run stopped at step k (by reaching a smaller max_steps, or by SIGTERM as SLURM preemption sends)
and started again with the same command continues as if it had never stopped: the per-step losses
and the final weights are bitwise equal to an uninterrupted run (CPU, deterministic settings).
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from stage_runs import (MODEL_CFG, critic_server_cmd, finish, losses, rm_init, run_stage, start_servers, start_stage,
                        stop_servers)

pytestmark = pytest.mark.checkpoint


def weights(path: Path, role: str) -> dict[str, torch.Tensor]:
    from nemo_rlhf.checkpoint.weights import load_weights
    from nemo_rlhf.models.policy import GPTPolicyModel
    from nemo_rlhf.models.reward_model import GPTRewardModel
    from nemo_rlhf.parallel.state import destroy_distributed, initialize_distributed

    cfg = dict(MODEL_CFG)
    initialize_distributed(1, 1, "cpu")
    try:
        if role == "sft":
            model = GPTPolicyModel(cfg, None, 512, 8, 0, 0)
        elif role == "critic":
            from nemo_rlhf.models.critic import GPTCriticModel

            model = GPTCriticModel(cfg, None, 512, 8)
        else:
            model = GPTRewardModel(cfg, None, 512, 8)
        load_weights(model, path)
        return {k: v.clone() for k, v in model.gpt.state_dict().items() if torch.is_tensor(v)}
    finally:
        destroy_distributed()


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"weights differ: {bad[:5]}"


def wait_for(proc, done, timeout_s: float = 300, poll_s: float = 0.2) -> None:
    """Poll ``done()`` until it holds while ``proc`` still runs (asserts it did not exit first)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None and not done():
        time.sleep(poll_s)
    assert proc.poll() is None, proc.stdout.read()[-3000:]


@pytest.fixture(scope="module")
def sft_stopped_twice(request, tmp_path_factory):
    """ONE SFT run directory stopped twice, each time resumed by the same command, for the two SFT
    resume tests below (three launcher processes instead of four):

    1. ``trainer.max_steps=3``: stops at step 3 with a final checkpoint;
    2. the same command with ``trainer.max_steps=100000`` resumes from it and is sent SIGTERM (as
       SLURM preemption does) once step 4 is logged: it checkpoints step k at the next step
       boundary and exits 0;
    3. ``trainer.max_steps=8`` resumes from step k and finishes.

    Compared with the uninterrupted 8-step session run (or, when k >= 8 on a very slow machine, a
    new uninterrupted run of k + 3 steps), which runs alongside step 1 when not done yet.
    Returns the facts the tests assert on.
    """
    tmp = tmp_path_factory.mktemp("sft_stopped_twice")
    run = tmp / "part"
    facts = {"run": run}
    first = start_stage("train_sft.py", run, "trainer.max_steps=3", log=tmp / "part_1.log")
    try:
        sft_run = request.getfixturevalue("sft_run")
    finally:
        finish(first, tmp / "part_1.log")
    facts["stopped_ckpt_complete"] = (run / "checkpoints" / "sft" / "step_00000003" / "COMPLETE").exists()
    facts["losses_at_stop"] = losses(run, "sft")
    proc = run_stage("train_sft.py", run, "trainer.max_steps=100000", wait=False)
    wait_for(proc, lambda: len(losses(run, "sft")) >= 5, poll_s=0.5)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    facts.update(sigterm_rc=proc.returncode, sigterm_out=out, sigterm_exit_s=time.time() - sent,
                 result=json.loads((run / "sft_result.json").read_text()))
    k = facts["result"]["steps"]
    facts["sigterm_ckpt"] = run / "checkpoints" / "sft" / f"step_{k:08d}"
    facts["sigterm_ckpt_complete"] = (facts["sigterm_ckpt"] / "COMPLETE").exists()
    n = 8 if k < 8 else k + 3
    facts["steps"] = n
    facts["final_out"] = (lambda p: p.stdout + p.stderr)(run_stage("train_sft.py", run, f"trainer.max_steps={n}"))
    facts["ref"] = sft_run
    if n != 8:
        facts["ref"] = tmp / "uninterrupted"
        run_stage("train_sft.py", facts["ref"], f"trainer.max_steps={n}")
    return facts


def assert_same_as_uninterrupted(facts) -> None:
    run, ref, n = facts["run"], facts["ref"], facts["steps"]
    got, want = losses(run, "sft"), losses(ref, "sft")
    assert sorted(got) == list(range(n)) and got == want  # same step numbers, same losses
    assert_bitwise(weights(ref / "sft_weights", "sft"), weights(run / "sft_weights", "sft"))


def test_sft_resume_is_bitwise_exact(sft_stopped_twice):
    facts = sft_stopped_twice
    assert facts["stopped_ckpt_complete"] and sorted(facts["losses_at_stop"]) == [0, 1, 2]
    # the restart with the same command resumed from the max_steps checkpoint ...
    out = facts["sigterm_out"]
    assert "resumed from" in out and "step_00000003" in out, out[-3000:]
    # ... and the whole run equals an uninterrupted one
    assert_same_as_uninterrupted(facts)


def test_rm_resume_is_bitwise_exact(sft_run, request, tmp_path):
    part = tmp_path / "part"
    # The stopped run's first leg runs alongside the session's uninterrupted one (when not done yet).
    first = start_stage("train_reward_model.py", part, *rm_init(sft_run), "trainer.max_steps=2",
                        log=tmp_path / "part_1.log")
    try:
        rm_run = request.getfixturevalue("rm_run")
    finally:
        finish(first, tmp_path / "part_1.log")
    # What a run killed after logging step index 2 (and an evaluation of state 3), before its next
    # checkpoint, leaves behind: the resumed run drops both records and logs them again.
    with open(part / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"stage": "rm", "step": 2, "time": 0.0, "train/loss": 99.0}) + "\n")
        f.write(json.dumps({"stage": "rm", "step": 3, "time": 0.0, "val/accuracy": 99.0}) + "\n")
    out = run_stage("train_reward_model.py", part, *rm_init(sft_run), "trainer.max_steps=4")
    assert "2 metrics.jsonl records of later steps dropped" in out.stdout + out.stderr
    rows = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows if r["stage"] == "rm" and "train/loss" in r) == [0, 1, 2, 3]
    assert 99.0 not in [v for r in rows for v in r.values()]
    assert losses(rm_run, "rm") == losses(part, "rm") and len(losses(rm_run, "rm")) == 4
    assert_bitwise(weights(rm_run / "rm_weights", "rm"), weights(part / "rm_weights", "rm"))


@pytest.mark.faults
def test_sigterm_checkpoints_and_resume_continues_exactly(sft_stopped_twice):
    facts = sft_stopped_twice
    out = facts["sigterm_out"]
    assert facts["sigterm_rc"] == 0, out[-3000:]
    assert facts["sigterm_exit_s"] < 60
    result = facts["result"]
    assert result["preempted"] and result["signal"] == "SIGTERM"
    k, ckpt = result["steps"], facts["sigterm_ckpt"]
    assert k > 3 and facts["sigterm_ckpt_complete"] and Path(result["resume_from"]) == ckpt
    assert "resumed from" in facts["final_out"]
    # Resumed and compared with an uninterrupted run: the 8-step session run when k < 8 (the usual
    # case: the signal is sent after step 5), else a new one of k + 3 steps.
    assert_same_as_uninterrupted(facts)


def test_incomplete_checkpoints_are_never_resumed_and_old_ones_pruned(sft_run, tmp_path):
    from nemo_rlhf.checkpoint.training_state import latest_checkpoint

    # The session SFT run checkpointed every step (checkpoint.every_n_steps=1) of its 8 and kept
    # the last two (checkpoint.keep_last=2).
    assert sorted(p.name for p in (sft_run / "checkpoints" / "sft").iterdir()) == ["step_00000007", "step_00000008"]
    root = tmp_path / "keep" / "checkpoints" / "sft"
    shutil.copytree(sft_run / "checkpoints" / "sft", root)
    # A half-written checkpoint (no COMPLETE marker) and a leftover .tmp are ignored.
    (root / "step_00000009").mkdir()
    (root / "step_00000010.tmp").mkdir()
    assert latest_checkpoint(root) == root / "step_00000008"


def test_corrupt_checkpoint_error_names_the_path(sft_run, tmp_path):
    from nemo_rlhf.checkpoint.training_state import load_training_checkpoint
    from nemo_rlhf.checkpoint.weights import CheckpointError, load_weights
    from nemo_rlhf.models.policy import GPTPolicyModel
    from nemo_rlhf.parallel.state import destroy_distributed, initialize_distributed

    # A copy of the final training checkpoint of the session SFT run (this test corrupts it).
    run = sft_run
    ckpt = tmp_path / "corrupt" / "checkpoints" / "sft" / "step_00000008"
    shutil.copytree(sft_run / "checkpoints" / "sft" / "step_00000008", ckpt)
    cfg = dict(MODEL_CFG)
    initialize_distributed(1, 1, "cpu")
    try:
        # The weights of a training checkpoint are usable as init_from weights ...
        plain = GPTPolicyModel(cfg, None, 512, 8, 0, 0)
        load_weights(plain, ckpt)
        final = GPTPolicyModel(cfg, None, 512, 8, 0, 0)
        load_weights(final, run / "sft_weights")
        tensors = lambda m: {k: v for k, v in m.gpt.state_dict().items() if torch.is_tensor(v)}  # noqa: E731
        assert_bitwise(tensors(plain), tensors(final))
        # ... but resuming it with the other optimizer kind is refused, naming path and field.
        dist = GPTPolicyModel(cfg, dict(lr=1e-3, distributed_optimizer=True), 512, 8, 0, 0)
        with pytest.raises(CheckpointError, match="optim.distributed_optimizer=false but this run has "
                                                  "optim.distributed_optimizer=true") as err:
            load_training_checkpoint(ckpt, dist)
        assert str(ckpt) in str(err.value)
    finally:
        destroy_distributed()
    for f in ckpt.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])  # truncated shard files
    initialize_distributed(1, 1, "cpu")
    try:
        model = GPTPolicyModel(cfg, dict(lr=1e-3), 512, 8, 0, 0)
        with pytest.raises(CheckpointError) as err:
            load_training_checkpoint(ckpt, model)
        assert str(ckpt) in str(err.value)
        (ckpt / "COMPLETE").unlink()
        with pytest.raises(CheckpointError, match="missing COMPLETE"):
            load_training_checkpoint(ckpt, model)
    finally:
        destroy_distributed()


# ---------------------------------------------------------------------------- PPO + critic server
PPO_SMALL = ["trainer.val_check_interval=2", "trainer.limit_val_batches=1", "data.max_heldout_prompts=8",
             "batch.global_batch_size=8", "batch.micro_batch_size=4", "ppo.sampling.max_new_tokens=8",
             "ppo.num_minibatches=2", "checkpoint.every_n_steps=0", "critic.init_timeout_s=300"]
PPO_STEPS = 5  # the uninterrupted run's length (the preempted run is signalled after its 2nd step)


def ppo_rows(run_dir: Path) -> dict[int, dict]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("ppo/")}
            for r in rows if r["stage"] == "ppo" and "ppo/reward" in r}


def ppo_val_rows(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("val/")}
            for r in rows if r["stage"] == "ppo" and "val/reward" in r}


@pytest.mark.faults
def test_ppo_resume_with_critic_server_is_bitwise_exact(sft_run, rm_run, tmp_path):
    """SIGTERM a PPO run at step k (the critic server saves in step with the actor), resume it with
    a *fresh* critic server (which must load the paired critic checkpoint), and compare with an
    uninterrupted run of the same length: every PPO metric (critic loss, KL coefficient included),
    the held-out evaluations, the actor weights and the critic weights are bitwise equal.

    The three servers start together, and the uninterrupted run (its length fixed in advance)
    runs alongside the preempted one: their start-up overlaps on the two cores."""
    from nemo_rlhf.servers.process import find_free_ports

    def server(i: int, ports: list[int]):
        return critic_server_cmd(rm_run / "rm_weights", sft_run / "tokenizer.json", ports,
                                 f"server.checkpoint_root={tmp_path}"), ports[0], \
            tmp_path / f"server{i}.log"

    ports = find_free_ports(12)
    servers = start_servers([server(i, ports[3 * i: 3 * i + 3]) for i in range(3)])
    common = [*rm_init(sft_run), *PPO_SMALL]
    run, ref, n = tmp_path / "preempted", tmp_path / "uninterrupted", PPO_STEPS
    ref_proc = proc = None
    try:
        ref_proc = run_stage("train_ppo_actor.py", ref, *common, f"critic.port={ports[6]}",
                             f"trainer.max_steps={n}", wait=False)
        proc = run_stage("train_ppo_actor.py", run, *common, f"critic.port={ports[0]}",
                         "trainer.max_steps=100000", wait=False)
        wait_for(proc, lambda: len(ppo_rows(run)) >= 2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out[-3000:]
        result = json.loads((run / "ppo_result.json").read_text())
        assert result["preempted"] and result["signal"] == "SIGTERM"
        k = result["steps"]
        ckpt = run / "checkpoints" / "ppo" / f"step_{k:08d}"
        assert (ckpt / "COMPLETE").exists() and (ckpt / "critic" / "COMPLETE").exists()
        state = json.loads((ckpt / "state.json").read_text())
        assert state["ppo_step"] == k and state["consumed_samples"] == 8 * k and "value" in state["kl_controller"]
        servers[0].result().stop()

        ref_out, _ = ref_proc.communicate(timeout=600)
        assert ref_proc.returncode == 0, ref_out[-3000:]
        if k >= n:  # a very slow machine: compare with a new uninterrupted run of k + 2 steps
            n, ref = k + 2, tmp_path / "uninterrupted_longer"
            servers += start_servers([server(3, ports[9:12])])
            run_stage("train_ppo_actor.py", ref, *common, f"critic.port={ports[9]}", f"trainer.max_steps={n}")
        resumed = run_stage("train_ppo_actor.py", run, *common, f"critic.port={ports[3]}", f"trainer.max_steps={n}")
        assert "resumed from" in resumed.stdout + resumed.stderr
    finally:
        for p in (ref_proc, proc):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
        stop_servers(servers)
    got, want = ppo_rows(run), ppo_rows(ref)
    assert sorted(got) == list(range(n)) and got == want
    assert ppo_val_rows(run) == ppo_val_rows(ref)
    assert_bitwise(weights(run / "ppo_actor_weights", "sft"), weights(ref / "ppo_actor_weights", "sft"))
    assert_bitwise(weights(run / "ppo_critic_weights", "critic"), weights(ref / "ppo_critic_weights", "critic"))
