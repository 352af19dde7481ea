"""The demo's stages at a smaller size: SFT -> RM -> critic server (subprocess) -> PPO, end to end.

Runs the README's main command (launchers/run_demo.py) with fewer steps, then checks what it
promises: checkpoints, metrics.jsonl with every stage, the PNG plot, the printed report, and that
the critic server process is gone afterwards.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.server]


def test_demo_pipeline_small(tmp_path):
    run_dir = tmp_path / "demo"
    cmd = [sys.executable, str(REPO / "launchers" / "run_demo.py"), f"run_dir={run_dir}",
           "sft.trainer.max_steps=30", "sft.trainer.val_check_interval=15",
           "rm.trainer.max_steps=20", "rm.trainer.val_check_interval=10",
           "ppo.trainer.max_steps=6", "ppo.trainer.val_check_interval=3",
           "ppo.data.max_heldout_prompts=32", "+common.data.max_rows=3000"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "nemo-rlhf demo report" in proc.stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert report["sft"]["val_after"]["nll"] < report["sft"]["val_before"]["nll"]
    assert 0.0 <= report["rm"]["val_after"]["accuracy"] <= 1.0 and report["rm"]["val_after"]["pairs"] > 0
    assert report["sft"]["steps"] == 30 and report["rm"]["steps"] == 20 and report["ppo"]["steps"] == 6
    for key in ("sft_weights", "rm_weights", "ppo_actor_weights", "ppo_critic_weights"):
        assert (run_dir / key / "COMPLETE").exists(), key
    stages = {json.loads(line)["stage"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"sft", "rm", "ppo"}
    png = (run_dir / "ppo_reward_kl.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # The server was stopped: no process still serves from this run directory.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(run_dir) not in ps
