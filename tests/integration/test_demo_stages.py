"""The from-scratch demo's stages at a smaller size: SFT -> RM -> critic server (subprocess) -> PPO, then
the same pipeline with algorithm=rloo (a critic-free trainer rewarded by the server's reward model).

Runs the README's smoke path (launchers/run_demo.py --config-name demo_tiny) at the launchers' smallest size (1 layer,
H = 32, 600 HH rows, 128 tokens, 512-token BPE, 8 sampled tokens) and with few steps, then checks
what it promises: checkpoints, metrics.jsonl with every stage, the PNG plot, the printed report,
and that the critic server process is gone afterwards. (How well the demo learns at full size is
BENCHMARKS.md's business, not CI's.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.server]
SFT_STEPS, RM_STEPS, PPO_STEPS, RLOO_STEPS = 20, 10, 4, 2


def test_demo_pipeline_small(tmp_path):
    run_dir = tmp_path / "demo"
    small = ["+common.model.num_layers=1", "+common.model.hidden_size=32", "+common.model.ffn_hidden_size=64",
             "+common.model.max_position_embeddings=128", "+common.data.max_rows=600",
             "+common.data.max_seq_len=128", "+common.data.max_prompt_len=96", "+sft.tokenizer.vocab_size=512",
             "rm.batch.global_batch_size=16", "ppo.data.max_heldout_prompts=16",
             "+ppo.ppo.sampling.max_new_tokens=8", "+ppo.logger.tensorboard=true"]
    cmd = [sys.executable, str(REPO / "launchers" / "run_demo.py"), "--config-name", "demo_tiny", f"run_dir={run_dir}",
           *small,
           f"sft.trainer.max_steps={SFT_STEPS}", "sft.trainer.val_check_interval=10",
           f"rm.trainer.max_steps={RM_STEPS}", "rm.trainer.val_check_interval=5",
           f"ppo.trainer.max_steps={PPO_STEPS}", "ppo.trainer.val_check_interval=2"]
    # One intra-op thread for the demo process and (inherited) its critic server: tiny models.
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "nemo-rlhf demo report" in proc.stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert report["sft"]["val_after"]["nll"] < report["sft"]["val_before"]["nll"]
    assert 0.0 <= report["rm"]["val_after"]["accuracy"] <= 1.0 and report["rm"]["val_after"]["pairs"] > 0
    assert report["sft"]["steps"] == SFT_STEPS and report["rm"]["steps"] == RM_STEPS
    assert report["ppo"]["steps"] == PPO_STEPS
    for key in ("sft_weights", "rm_weights", "ppo_actor_weights", "ppo_critic_weights"):
        assert (run_dir / key / "COMPLETE").exists(), key
    stages = {json.loads(line)["stage"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"sft", "rm", "ppo"}
    # The PPO stage also logged to TensorBoard (logger.tensorboard=true): every PPO scalar that
    # matters is in the event files at every step, with the values of metrics.jsonl.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard" / "ppo"))
    events.Reload()
    jsonl = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if r["stage"] == "ppo" and "ppo/reward" in r}
    for tag in ("ppo/reward", "ppo/kl", "ppo/pg_loss", "ppo/critic_loss", "ppo/kl_coef"):
        scalars = events.Scalars(tag)
        assert [e.step for e in scalars] == list(range(PPO_STEPS)), tag
        assert [e.value for e in scalars] == pytest.approx([jsonl[e.step][tag] for e in scalars], rel=1e-6), tag
    assert [e.step for e in events.Scalars("val/reward")] == [0, 2, 4]  # before, every 2 steps, after
    png = (run_dir / "ppo_reward_kl.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # The server was stopped: no process still serves from this run directory.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(run_dir) not in ps

    # The same pipeline with a critic-free algorithm in place of PPO (run_demo.py algorithm=rloo):
    # SFT and RM resume at their last step (nothing retrained), the server's reward model rewards,
    # the samples go to grpo_samples.jsonl, the report names the algorithm.
    cmd_rloo = [c for c in cmd if not c.startswith(("ppo.", "+ppo."))] + [
        "algorithm=rloo", f"grpo.trainer.max_steps={RLOO_STEPS}", "grpo.trainer.val_check_interval=2",
        "grpo.batch.global_batch_size=16", "+grpo.grpo.sampling.max_new_tokens=8", "grpo.data.max_heldout_prompts=8"]
    proc = subprocess.run(cmd_rloo, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "RLOO" in proc.stdout and "reward-model score" in proc.stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert report["rloo"]["steps"] == RLOO_STEPS and report["rloo"]["algorithm"] == "rloo"
    assert report["sft"]["steps"] == SFT_STEPS and report["rm"]["steps"] == RM_STEPS  # resumed, not retrained
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for r in rows if r["stage"] == "grpo" and "grpo/reward_reward_model" in r) == RLOO_STEPS
    assert (run_dir / "grpo_samples.jsonl").exists()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(run_dir) not in ps
