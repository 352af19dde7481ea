"""The from-scratch demo's stages at a smaller size: SFT -> RM -> critic server (subprocess) -> PPO, then
the same pipeline with algorithm=rloo (a critic-free trainer rewarded by the server's reward model), then
stages=[sft,rm,dpo] in the same run directory (DPO from the SFT policy and its judge).

Runs the README's smoke path (launchers/run_demo.py --config-name demo_tiny) at the launchers' smallest size (1 layer,
H = 32, 600 HH rows, 128 tokens, 512-token BPE, 8 sampled tokens) and with few steps, then checks
what it promises: checkpoints, metrics.jsonl with every stage, the PNG plot, the printed report,
and that the critic server process is gone afterwards. (How well the demo learns at full size is
BENCHMARKS.md's business, not CI's.)
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import fork_server
import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.server]
SFT_STEPS, RM_STEPS, PPO_STEPS, RLOO_STEPS, DPO_STEPS = 20, 10, 4, 2, 4
SMALL = ["+common.model.num_layers=1", "+common.model.hidden_size=32", "+common.model.ffn_hidden_size=64",
         "+common.model.max_position_embeddings=128", "+common.data.max_rows=600",
         "+common.data.max_seq_len=128", "+common.data.max_prompt_len=96", "+sft.tokenizer.vocab_size=512",
         "rm.batch.global_batch_size=16",
         f"sft.trainer.max_steps={SFT_STEPS}", "sft.trainer.val_check_interval=10",
         f"rm.trainer.max_steps={RM_STEPS}", "rm.trainer.val_check_interval=5"]


def demo_cmd(run_dir: Path, *overrides: str) -> list[str]:
    """launchers/run_demo.py --config-name demo_tiny at the SMALL size writing into ``run_dir``."""
    return [sys.executable, str(REPO / "launchers" / "run_demo.py"), "--config-name", "demo_tiny", f"run_dir={run_dir}",
            *SMALL, *overrides]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """The run directory of this file's tests: the DPO test after the PPO test resumes its SFT and
    reward-model stages (run alone, it trains them first)."""
    return tmp_path_factory.mktemp("demo_stages") / "demo"


def test_demo_pipeline_small(demo_dir, tmp_path):
    run_dir = demo_dir
    cmd = demo_cmd(run_dir, "ppo.data.max_heldout_prompts=16", "+ppo.ppo.sampling.max_new_tokens=8",
                   "+ppo.logger.tensorboard=true",
                   f"ppo.trainer.max_steps={PPO_STEPS}", "ppo.trainer.val_check_interval=2")
    # One intra-op thread for the demo process and (inherited) its critic server: tiny models.
    proc = fork_server.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900,
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
    proc = fork_server.run(cmd_rloo, cwd=tmp_path, capture_output=True, text=True, timeout=900,
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


def test_demo_dpo_stage_and_judge(demo_dir, tmp_path):
    """stages=[sft,rm,dpo]: DPO from the SFT policy on the same HH pairs (held-out implicit-reward
    accuracy before/after), then the judge: the SFT and DPO policies answer the same held-out prompts
    with one sampling seed, the reward model of the rm stage scores both (win rate, ties 1/2), and the
    DPO policy's KL to the SFT policy is measured on its own samples (dpo_samples.jsonl)."""
    run_dir = demo_dir
    n_prompts = 8
    cmd = demo_cmd(run_dir, "stages=[sft,rm,dpo]", f"dpo.trainer.max_steps={DPO_STEPS}",
                   "dpo.trainer.val_check_interval=2",
                   "dpo.optim.lr=3e-3", "dpo.optim.min_lr=3e-3", "dpo.optim.warmup_steps=0",  # move the tiny policy
                   f"dpo_judge.max_prompts={n_prompts}", "dpo_judge.batch_size=4",
                   "dpo_judge.sampling.max_new_tokens=8")
    proc = fork_server.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "DPO   held-out implicit-reward accuracy" in proc.stdout and "DPO wins under the reward model" in proc.stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert report["sft"]["steps"] == SFT_STEPS and report["rm"]["steps"] == RM_STEPS
    dpo = report["dpo"]
    assert dpo["steps"] == DPO_STEPS and (run_dir / "dpo_weights" / "COMPLETE").exists()
    for when in ("val_before", "val_after"):
        assert 0.0 <= dpo[when]["rewards/accuracies"] <= 1.0 and dpo[when]["pairs"] > 0, when
    # The reference is the start policy: before the first step every implicit reward is 0, the loss ln 2.
    assert dpo["val_before"]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert dpo["val_before"]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert abs(dpo["val_after"]["loss"] - math.log(2)) > 1e-3  # lr 3e-3: the policy moved
    judge = dpo["judge"]
    rows = [json.loads(line) for line in (run_dir / "dpo_samples.jsonl").read_text().splitlines()]
    assert len(rows) == judge["prompts"] == n_prompts
    for r in rows:
        assert {"prompt", "reference_response", "policy_response", "reference_rm_score", "policy_rm_score",
                "kl"} <= set(r)
    wins = sum(r["policy_rm_score"] > r["reference_rm_score"] for r in rows)
    ties = sum(r["policy_rm_score"] == r["reference_rm_score"] for r in rows)
    assert 0.0 <= judge["win_rate"] <= 1.0 and judge["win_rate"] == pytest.approx((wins + ties / 2) / len(rows))
    outcomes = [1.0 if r["policy_rm_score"] > r["reference_rm_score"] else
                0.5 if r["policy_rm_score"] == r["reference_rm_score"] else 0.0 for r in rows]
    mean = sum(outcomes) / len(rows)
    se = math.sqrt(sum((o - mean) ** 2 for o in outcomes) / (len(rows) - 1) / len(rows))
    assert judge["win_rate_se"] == pytest.approx(se, abs=1e-12)
    assert f"standard error {judge['win_rate_se']:.3f}" in proc.stdout
    assert math.isfinite(judge["kl_mean"]) and judge["kl_mean"] == pytest.approx(sum(r["kl"] for r in rows) / len(rows))
    assert judge["identical_responses"] < n_prompts  # the DPO policy is not the SFT policy any more
    assert json.loads((run_dir / "dpo_samples.summary.json").read_text())["win_rate"] == judge["win_rate"]
    assert report["wall_s"]["dpo"] > 0 and report["wall_s"]["dpo_judge"] > 0
