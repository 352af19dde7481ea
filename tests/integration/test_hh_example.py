"""examples/hh_helpful (conf/examples/hh_helpful.yaml) end to end at CI size.

SFT -> reward model -> critic server + PPO on the shipped HH-RLHF helpful dialogues, formatted with
SmolLM2's chat template, with the real SmolLM2 tokenizer and weights cut to their first layers (the
``smollm2`` session fixture's cache: a 2-layer policy, a 1-layer reward model). It checks that the
example's pipeline starts, the SFT policy feeds PPO while the reward model starts from the
truncated base model (``rm_num_layers`` after an ``sft`` stage), the critic server answers,
losses and scores are finite and the prompts reach the policy in the chat format. Resuming is
covered by tests/integration/test_imdb_pipeline.py (the same launcher); the full-size run's figures
are in examples/hh_helpful/README.md and BENCHMARKS.md.
"""

import json
import math
import os
import sys
from pathlib import Path

import fork_server
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from smollm2_run import PIPELINE_POLICY_LAYERS, PIPELINE_RM_LAYERS  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.server]
STEPS = 2


def test_hh_example_runs_sft_rm_ppo_with_chat_template(smollm2, tmp_path):
    run_dir, cache = tmp_path / "hh", smollm2 / "cache"
    small = [f"run_dir={run_dir}", f"cache_dir={cache}",
             f"policy_num_layers={PIPELINE_POLICY_LAYERS}", f"rm_num_layers={PIPELINE_RM_LAYERS}",
             "sft.model.num_layers_unfrozen=1", "rm.model.num_layers_unfrozen=1",
             "critic.model.num_layers_unfrozen=1", "ppo.model.num_layers_unfrozen=1",
             "common.data.max_seq_len=64", "common.data.max_prompt_len=48", "+common.data.max_rows=96", "+common.data.heldout_fraction=0.25",
             "sft.batch.global_batch_size=8", "rm.batch.global_batch_size=8", "ppo.batch.global_batch_size=8",
             f"sft.trainer.max_steps={STEPS}", f"sft.optim.decay_steps={STEPS}", "sft.optim.warmup_steps=0",
             "sft.trainer.limit_val_batches=1",
             f"rm.trainer.max_steps={STEPS}", f"rm.optim.decay_steps={STEPS}", "rm.optim.warmup_steps=0",
             "rm.trainer.val_check_interval=null",
             "ppo.data.max_heldout_prompts=8", "ppo.ppo.sampling.max_new_tokens=6",
             f"ppo.trainer.max_steps={STEPS}", "ppo.trainer.val_check_interval=null",
             "ppo.trainer.limit_val_batches=1", "report_samples=1"]
    cmd = [sys.executable, str(REPO / "launchers" / "run_demo.py"), "--config-name", "examples/hh_helpful", *small]
    proc = fork_server.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "nemo-rlhf demo report" in proc.stdout and "SFT   validation loss" in proc.stdout
    report = json.loads((run_dir / "report.json").read_text())
    sft, rm, ppo = report["sft"], report["rm"], report["ppo"]
    assert sft["steps"] == STEPS and math.isfinite(sft["val_after"]["nll"])
    assert rm["steps"] == STEPS and rm["val_after"]["pairs"] > 0 and 0.0 <= rm["val_after"]["accuracy"] <= 1.0
    # The reward model is the truncated base model (rm_num_layers), not the SFT policy.
    assert f"first {PIPELINE_RM_LAYERS} layers" in report["base_model"]
    assert rm["num_layers"] == PIPELINE_RM_LAYERS and sft["num_layers"] == PIPELINE_POLICY_LAYERS
    assert ppo["steps"] == STEPS
    for when in ("heldout_before", "heldout_after"):
        for key in ("reward", "kl"):
            assert math.isfinite(ppo[when][key]), (when, key)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ppo_rows = [r for r in rows if r["stage"] == "ppo" and "ppo/reward" in r]
    assert [r["step"] for r in ppo_rows] == list(range(STEPS))
    for r in ppo_rows:
        for key in ("ppo/reward", "ppo/kl", "ppo/pg_loss", "ppo/critic_loss"):
            assert math.isfinite(r[key]), (r["step"], key)
    # The prompts PPO sampled from were rendered with the chat template and end on an open assistant
    # turn (a long dialogue keeps its last max_prompt_len tokens, so its start may be cut).
    prompt = report["samples"][0][0]["prompt"]
    assert "<|im_start|>user\n" in prompt and prompt.endswith("<|im_end|>\n<|im_start|>assistant\n"), prompt
