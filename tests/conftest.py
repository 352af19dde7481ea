"""Session-wide fixtures: the tiny SFT policy and reward model, trained ONCE per test run through
the launchers (tests/stage_runs.py: SMALL size) and shared by tests/checkpoint, tests/faults and
tests/integration. Tests must not write into these run directories (copy what they modify)."""

from __future__ import annotations

from pathlib import Path

import pytest

import stage_runs

SFT_STEPS = 8  # tests/checkpoint resumes runs of this length and compares them with this one
RM_STEPS = 4


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory) -> Path:
    """Run directory of an uninterrupted 8-step SFT run (``launchers/train_sft.py``, SMALL size):
    ``sft_weights/``, ``tokenizer.json``, ``metrics.jsonl`` (per-step losses), and the training
    checkpoints of every step with the last two kept (``checkpoints/sft/step_00000007``, ``..8``)."""
    d = tmp_path_factory.mktemp("sft_run")
    stage_runs.run_stage("train_sft.py", d, f"trainer.max_steps={SFT_STEPS}", "checkpoint.every_n_steps=1",
                         "checkpoint.keep_last=2")
    return d


@pytest.fixture(scope="session")
def rm_run(sft_run, tmp_path_factory) -> Path:
    """Run directory of an uninterrupted 4-step reward-model run initialised from :func:`sft_run`
    (``rm_weights/``, ``metrics.jsonl``); its final checkpoint is ``checkpoints/rm/step_00000004``."""
    d = tmp_path_factory.mktemp("rm_run")
    stage_runs.run_stage("train_reward_model.py", d, *stage_runs.rm_init(sft_run), f"trainer.max_steps={RM_STEPS}")
    return d

