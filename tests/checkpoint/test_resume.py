"""Exact resume of the SFT and reward-model stages (checkpoint marker).

A run stopped at step k (by reaching a smaller max_steps, or by SIGTERM as SLURM preemption sends)
and started again with the same command continues as if it had never stopped: the per-step losses
and the final weights are bitwise equal to an uninterrupted run (CPU, deterministic settings).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.checkpoint

REPO = Path(__file__).resolve().parents[2]
SMALL = ["data.max_rows=600", "trainer.val_check_interval=1000", "trainer.limit_val_batches=1",
         "trainer.log_every_n_steps=1", "model.num_layers=1", "model.hidden_size=32",
         "model.ffn_hidden_size=64", "model.max_position_embeddings=128", "data.max_seq_len=128",
         "data.max_prompt_len=96", "tokenizer.vocab_size=512", "checkpoint.every_n_steps=0"]


def run_stage(launcher: str, run_dir: Path, *overrides: str, wait: bool = True):
    cmd = [sys.executable, str(REPO / "launchers" / launcher), f"run_dir={run_dir}", *SMALL, *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(run_dir: Path, stage: str) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if r["stage"] == stage and "train/loss" in r}


def weights(path: Path, role: str) -> dict[str, torch.Tensor]:
    from nemo_rlhf.models.gpt_sft import GPTSFTModel
    from nemo_rlhf.models.reward_model import GPTRewardModel
    from nemo_rlhf.parallel.state import destroy_distributed, initialize_distributed

    cfg = dict(num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
               max_position_embeddings=128)
    initialize_distributed(1, 1, "cpu")
    try:
        if role == "sft":
            model = GPTSFTModel(cfg, None, 512, 8, 0)
        elif role == "critic":
            from nemo_rlhf.models.critic import GPTCriticModel

            model = GPTCriticModel(cfg, None, 512, 8)
        else:
            model = GPTRewardModel(cfg, None, 512, 8)
        model.load_weights(path)
        return {k: v.clone() for k, v in model.gpt.state_dict().items() if torch.is_tensor(v)}
    finally:
        destroy_distributed()


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"weights differ: {bad[:5]}"


@pytest.fixture(scope="module")
def sft_full(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_full")
    run_stage("train_sft.py", d, "trainer.max_steps=8")
    return d


def test_sft_resume_is_bitwise_exact(sft_full, tmp_path):
    part = tmp_path / "part"
    run_stage("train_sft.py", part, "trainer.max_steps=3")
    assert (part / "checkpoints" / "sft" / "step_00000003" / "COMPLETE").exists()
    proc = run_stage("train_sft.py", part, "trainer.max_steps=8")
    assert "resumed from" in proc.stdout + proc.stderr
    full_l, part_l = losses(sft_full, "sft"), losses(part, "sft")
    assert sorted(part_l) == list(range(8)) and part_l == full_l  # same step numbers, same losses
    assert_bitwise(weights(sft_full / "sft_weights", "sft"), weights(part / "sft_weights", "sft"))


def test_rm_resume_is_bitwise_exact(sft_full, tmp_path):
    common = [f"init_from={sft_full / 'sft_weights'}", f"tokenizer.path={sft_full / 'tokenizer.json'}"]
    full, part = tmp_path / "full", tmp_path / "part"
    run_stage("train_reward_model.py", full, *common, "trainer.max_steps=4")
    run_stage("train_reward_model.py", part, *common, "trainer.max_steps=2")
    run_stage("train_reward_model.py", part, *common, "trainer.max_steps=4")
    assert losses(full, "rm") == losses(part, "rm") and len(losses(full, "rm")) == 4
    assert_bitwise(weights(full / "rm_weights", "rm"), weights(part / "rm_weights", "rm"))


@pytest.mark.faults
def test_sigterm_checkpoints_and_resume_continues_exactly(sft_full, tmp_path):
    run = tmp_path / "preempted"
    proc = run_stage("train_sft.py", run, "trainer.max_steps=100000", wait=False)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(losses(run, "sft")) >= 3:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert time.time() - sent < 60
    result = json.loads((run / "sft_result.json").read_text())
    assert result["preempted"] and result["signal"] == "SIGTERM"
    k = result["steps"]
    ckpt = run / "checkpoints" / "sft" / f"step_{k:08d}"
    assert (ckpt / "COMPLETE").exists() and Path(result["resume_from"]) == ckpt
    # Resume and compare with an uninterrupted run: the 8-step fixture run when k < 8 (the usual
    # case: the signal is sent after step 3), else a new one of k + 3 steps.
    n = 8 if k < 8 else k + 3
    run_stage("train_sft.py", run, f"trainer.max_steps={n}")
    ref = sft_full
    if n != 8:
        ref = tmp_path / "uninterrupted"
        run_stage("train_sft.py", ref, f"trainer.max_steps={n}")
    assert losses(run, "sft") == losses(ref, "sft")
    assert_bitwise(weights(run / "sft_weights", "sft"), weights(ref / "sft_weights", "sft"))


def test_incomplete_checkpoints_are_never_resumed_and_old_ones_pruned(tmp_path):
    from nemo_rlhf.checkpoint.training_state import latest_checkpoint

    run = tmp_path / "keep"
    run_stage("train_sft.py", run, "trainer.max_steps=5", "checkpoint.every_n_steps=1", "checkpoint.keep_last=2")
    root = run / "checkpoints" / "sft"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000005"]
    # A half-written checkpoint (no COMPLETE marker) and a leftover .tmp are ignored.
    (root / "step_00000009").mkdir()
    (root / "step_00000010.tmp").mkdir()
    assert latest_checkpoint(root) == root / "step_00000005"


def test_corrupt_checkpoint_error_names_the_path(tmp_path):
    from nemo_rlhf.checkpoint.training_state import load_training_checkpoint
    from nemo_rlhf.checkpoint.weights import CheckpointError
    from nemo_rlhf.models.gpt_sft import GPTSFTModel
    from nemo_rlhf.parallel.state import destroy_distributed, initialize_distributed

    run = tmp_path / "corrupt"
    run_stage("train_sft.py", run, "trainer.max_steps=2")
    ckpt = run / "checkpoints" / "sft" / "step_00000002"
    cfg = dict(num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, max_position_embeddings=128)
    initialize_distributed(1, 1, "cpu")
    try:
        # The weights of a training checkpoint are usable as init_from weights ...
        plain = GPTSFTModel(cfg, None, 512, 8, 0)
        plain.load_weights(ckpt)
        final = GPTSFTModel(cfg, None, 512, 8, 0)
        final.load_weights(run / "sft_weights")
        tensors = lambda m: {k: v for k, v in m.gpt.state_dict().items() if torch.is_tensor(v)}  # noqa: E731
        assert_bitwise(tensors(plain), tensors(final))
        # ... but resuming it with the other optimizer kind is refused, naming path and field.
        dist = GPTSFTModel(cfg, dict(lr=1e-3, distributed_optimizer=True), 512, 8, 0)
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
        model = GPTSFTModel(cfg, dict(lr=1e-3), 512, 8, 0)
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
             "ppo.num_minibatches=2", "checkpoint.every_n_steps=0", "critic.init_timeout_s=120"]


@pytest.fixture(scope="module")
def rm_weights(sft_full, tmp_path_factory):
    d = tmp_path_factory.mktemp("rm_for_ppo")
    run_stage("train_reward_model.py", d, f"init_from={sft_full / 'sft_weights'}",
              f"tokenizer.path={sft_full / 'tokenizer.json'}", "trainer.max_steps=2")
    return d / "rm_weights"


def start_critic_server(sft_full: Path, rm: Path, log: Path):
    from nemo_rlhf.servers.process import find_free_ports, start_server_process

    port = find_free_ports(3)[0]
    cmd = [sys.executable, str(REPO / "launchers" / "serve_critic.py"), f"reward_model_path={rm}",
           f"tokenizer.path={sft_full / 'tokenizer.json'}", f"server.port={port}", f"server.grpc_port={port + 1}",
           f"server.metrics_port={port + 2}", "batch.global_batch_size=8", "batch.micro_batch_size=4",
           "model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64",
           "model.max_position_embeddings=128"]
    return start_server_process(cmd, "127.0.0.1", port, ready_timeout_s=240, log_path=log), port


def ppo_rows(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("ppo/")}
            for r in rows if r["stage"] == "ppo" and "ppo/reward" in r}


def ppo_val_rows(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("val/")}
            for r in rows if r["stage"] == "ppo" and "val/reward" in r}


@pytest.mark.faults
def test_ppo_resume_with_critic_server_is_bitwise_exact(sft_full, rm_weights, tmp_path):
    """SIGTERM a PPO run at step k (the critic server saves in step with the actor), resume it with
    a *fresh* critic server (which must load the paired critic checkpoint), and compare with an
    uninterrupted run of the same length: every PPO metric (critic loss, KL coefficient included),
    the held-out evaluations, the actor weights and the critic weights are bitwise equal."""
    servers = [start_critic_server(sft_full, rm_weights, tmp_path / f"server{i}.log") for i in range(3)]
    try:
        common = [f"init_from={sft_full / 'sft_weights'}", f"tokenizer.path={sft_full / 'tokenizer.json'}",
                  *PPO_SMALL]
        run = tmp_path / "preempted"
        proc = run_stage("train_ppo_actor.py", run, *common, f"critic.port={servers[0][1]}",
                         "trainer.max_steps=100000", wait=False)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").exists() and len(ppo_rows(run)) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
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
        servers[0][0].stop()

        n = k + 2
        proc = run_stage("train_ppo_actor.py", run, *common, f"critic.port={servers[1][1]}", f"trainer.max_steps={n}")
        assert "resumed from" in proc.stdout + proc.stderr
        ref = tmp_path / "uninterrupted"
        run_stage("train_ppo_actor.py", ref, *common, f"critic.port={servers[2][1]}", f"trainer.max_steps={n}")
    finally:
        for server, _ in servers:
            server.stop()
    got, want = ppo_rows(run), ppo_rows(ref)
    assert sorted(got) == list(range(n)) and got == want
    assert ppo_val_rows(run) == ppo_val_rows(ref)
    assert_bitwise(weights(run / "ppo_actor_weights", "sft"), weights(ref / "ppo_actor_weights", "sft"))
    assert_bitwise(weights(run / "ppo_critic_weights", "critic"), weights(ref / "ppo_critic_weights", "critic"))
