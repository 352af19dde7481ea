#!/usr/bin/env bash
# The whole SFT -> reward model -> PPO demo on CPU: bash scripts/demo.sh [Hydra overrides...]
# (config: conf/demo.yaml). Sets up the venv first (scripts/setup_env.sh).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
VENV="${NEMO_RLHF_VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$REPO_ROOT/$VENV" ;; esac

bash scripts/setup_env.sh

export PYTHONUNBUFFERED=1
exec "$VENV/bin/python" launchers/run_demo.py "$@"
