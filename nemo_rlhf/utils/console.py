"""What the console shows: one handler for the whole process, third-party chatter held at WARNING.

At ``INFO`` the console shows only the project's own records (``nemo_rlhf.*``: stage starts,
evaluations, checkpoints, the final report) plus WARNING and above from everyone; the INFO dumps of
megatron-core (DDP/optimizer config reprs, parameter names per gradient bucket), Lightning's
accelerator banners, NeMo's and nv-one-logger's notices, and a list of known harmless warnings are
dropped. ``DEBUG`` keeps everything.

Deliberately free of heavy imports (no torch, lightning or megatron): launchers call it first.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import IO

#: Loggers whose records are shown at INFO (and DEBUG when asked); everything else needs WARNING.
OWN_LOGGERS = ("nemo_rlhf", "__main__", "launchers")

#: Third-party loggers set to :data:`THIRD_PARTY_LEVEL` at INFO (levels set here so the records are
#: not even built; the handler filter below catches whatever a library re-enables on import).
NOISY_LOGGERS = (
    "megatron", "megatron.core", "lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric",
    "pytorch_lightning", "pytriton", "tritonclient", "nemo", "nemo_logger", "torch", "torch.distributed",
    "urllib3", "httpx", "httpcore", "filelock", "fsspec", "matplotlib", "PIL", "hydra", "wandb", "mlflow",
    "git", "numexpr", "h5py", "asyncio", "datasets", "transformers", "huggingface_hub", "sentencepiece",
    "tensorboard", "absl", "numba", "onelogger",
)
THIRD_PARTY_LEVEL = logging.WARNING

#: Loggers whose WARNINGs are noise too (nv-one-logger warns that telemetry is off on every start).
ERROR_ONLY_LOGGERS = ("nv_one_logger",)

#: Lightning attaches its own stream handler (and stops propagation) when it is imported before the
#: root logger has one; we route those loggers through the root handler instead.
_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")

DEFAULT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DEFAULT_DATEFMT = "%H:%M:%S"

#: Environment variable read by :func:`level_from_env` (launchers: ``NEMO_RLHF_LOG_LEVEL=DEBUG``).
LOG_LEVEL_ENV = "NEMO_RLHF_LOG_LEVEL"

_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")

# Known harmless warnings (message regex, category): silenced at INFO and above.
_QUIET_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # megatron-core on CPU / without apex or Transformer Engine (import time)
    (".*(Apex|Transformer Engine).*not installed.*", Warning),
    (".*Falling back to Torch Norm.*", Warning),
    (".*cuda_graph_scope.*", Warning),
    # NeMo's hydra_runner does not pass version_base
    (".*Future Hydra versions will no longer change working directory.*", Warning),
    # Lightning used as a shell around a hand-written loop (goes away with the plain-loop trainers)
    (".*self.log.*trainer.*", Warning),
    (".*but have no `val_dataloader`.*", Warning),
    (".*configure_optimizers` returned `None`.*", Warning),
    (".*is smaller than the logging interval.*", Warning),
    (".*does not have many workers which may be a bottleneck.*", Warning),
    (".*GPU available but not used.*", Warning),
    # W&B, Lightning's WandbLogger passes anonymous=None
    (".*anonymous setting has no effect.*", Warning),
)


def quiet_warnings() -> None:
    """Silence known harmless warnings: megatron-core's import-time notices when apex/TE are absent
    (CPU runs), NeMo's Hydra working-directory notice, Lightning's warnings about features this
    project does not use, and all ``FutureWarning``. Idempotent; also sets
    ``TOKENIZERS_PARALLELISM=false`` unless already set."""
    for message, category in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _is_own(name: str) -> bool:
    return name == "root" or any(name == p or name.startswith(p + ".") for p in OWN_LOGGERS)


class _ThirdPartyFilter(logging.Filter):
    """Passes the project's own records and third-party records at ``min_level`` or above."""

    def __init__(self, min_level: int):
        super().__init__()
        self.min_level = min_level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.min_level or _is_own(record.name)


class ConsoleHandler(logging.Handler):
    """Writes records through ``tqdm.write`` so an active progress bar is cleared and redrawn
    instead of being broken by log lines. ``stream=None`` means ``sys.stderr`` at emit time (so
    test capture and redirection work)."""

    def __init__(self, stream: IO[str] | None = None, level: int = logging.NOTSET):
        super().__init__(level)
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            stream = self.stream if self.stream is not None else sys.stderr
            try:
                from tqdm import tqdm

                tqdm.write(msg, file=stream)
            except ImportError:  # pragma: no cover - tqdm is a declared dependency
                stream.write(msg + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def parse_level(level: str | int) -> int:
    """``"INFO"`` / ``"debug"`` / ``logging.INFO`` -> the numeric level.

    Raises:
        ValueError: an unknown level name or a negative number (the message lists the valid names).
    """
    if isinstance(level, bool):
        raise ValueError(f"log level must be one of {', '.join(_LEVELS)}, got {level!r}")
    if isinstance(level, int):
        if level < 0:
            raise ValueError(f"log level must be >= 0, got {level}")
        return level
    name = str(level).strip().upper()
    if name not in _LEVELS:
        raise ValueError(f"log level must be one of {', '.join(_LEVELS)}, got {level!r}")
    return getattr(logging, name)


def level_from_env(default: str = "INFO") -> str:
    """The level named by ``$NEMO_RLHF_LOG_LEVEL`` (default ``default``)."""
    return os.environ.get(LOG_LEVEL_ENV, default) or default


def rank_zero_from_env() -> bool:
    """Whether this process is global rank 0, from the launcher's environment (``RANK`` as set by
    torchrun, else ``SLURM_PROCID``; neither set = a single process = rank 0). Usable before any
    process group exists."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]) == 0
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]) == 0
    return True


def configure_console_logging(level: str | int = "INFO", *, is_rank_zero: bool = True,
                              stream: IO[str] | None = None, fmt: str = DEFAULT_FORMAT,
                              datefmt: str = DEFAULT_DATEFMT) -> None:
    """Set up the process's console logging (call it again to change the level; idempotent).

    Installs one :class:`ConsoleHandler` on the root logger (replacing plain ``StreamHandler`` s
    that ``logging.basicConfig`` or Hydra's job logging installed; other handlers, e.g. pytest's
    capture handlers or file handlers, are kept).

    - ``level`` INFO (default) or higher: ``nemo_rlhf`` at ``level``; third-party loggers
      (:data:`NOISY_LOGGERS`, and any other non-project logger via a handler filter) at WARNING;
      nv-one-logger at ERROR; NeMo's own ``nemo_logger`` at WARNING; :func:`quiet_warnings`.
    - ``level`` DEBUG (or lower): everything is shown, every logger at DEBUG; no warning filters
      are added (those already added by earlier calls stay).
    - ``is_rank_zero=False``: the project's own loggers are raised to WARNING so that N ranks do
      not repeat the same INFO lines; warnings and errors of every rank are still shown.

    Args:
        level: a level name (``"DEBUG"``, ``"INFO"``, ``"WARNING"``, ``"ERROR"``, ``"CRITICAL"``,
            any case) or a numeric level.
        is_rank_zero: whether this process is global rank 0.
        stream: where to write (default: ``sys.stderr``, looked up at each write).
        fmt, datefmt: :class:`logging.Formatter` format strings.

    Raises:
        ValueError: ``level`` is not a valid level (see :func:`parse_level`).
    """
    lvl = parse_level(level)
    debug = lvl <= logging.DEBUG
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, ConsoleHandler) or type(h) is logging.StreamHandler:
            root.removeHandler(h)
    handler = ConsoleHandler(stream)
    handler.setFormatter(logging.Formatter(fmt, datefmt=datefmt))
    third_party = logging.DEBUG if debug else max(lvl, THIRD_PARTY_LEVEL)
    if not debug:
        handler.addFilter(_ThirdPartyFilter(third_party))
    root.addHandler(handler)
    root.setLevel(lvl)

    own_level = lvl if is_rank_zero else max(lvl, logging.WARNING)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(own_level)
    for name in _LIGHTNING_LOGGERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if type(h) is logging.StreamHandler:
                lg.removeHandler(h)
        lg.propagate = True
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if debug else third_party)
    for name in ERROR_ONLY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if debug else max(lvl, logging.ERROR))
    if not debug:
        quiet_warnings()
