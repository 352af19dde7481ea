"""Experiment loggers chosen in config, any combination, through Lightning's logger classes.

``metrics.jsonl`` (:class:`~nemo_rlhf.utils.logging.JSONLLogger`, on by default), TensorBoard,
Weights & Biases (offline by default: works with no network), MLflow (a local file store under the
run directory by default) and CSV. Trainers build them once per stage and log through
:class:`MetricLogger`, which fans out on global rank 0 only::

    metrics = MetricLogger.from_config(cfg.logger, cfg.run_dir, "ppo", is_rank_zero=is_rank_zero(),
                                       log_every_n_steps=cfg.trainer.log_every_n_steps)
    metrics.log_hyperparams(to_dict(cfg))
    for step in range(start + 1, max_steps + 1):
        ...
        metrics.log({"ppo/reward": r, "ppo/kl": kl}, step=step)            # every log_every_n_steps
        metrics.log({"val/reward": v}, step=step, force=True)              # evaluations: always
    metrics.finalize("success")

Where things go (``<run_dir>`` = the stage's run directory):

- jsonl: ``<run_dir>/metrics.jsonl`` (one object a line: ``stage``, ``step``, ``time``, metrics)
- tensorboard: ``<run_dir>/tensorboard/<stage>/events.out.tfevents.*``
  (``tensorboard --logdir <run_dir>/tensorboard`` shows each stage as a run)
- wandb: ``<run_dir>/wandb/offline-run-*`` in offline mode (``wandb sync <dir>`` uploads it later)
- mlflow: ``file:<run_dir>/mlruns`` (``mlflow ui --backend-store-uri file:<run_dir>/mlruns``)
- csv: ``<run_dir>/csv/<stage>/metrics.csv``
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

# Lightning (and torch under it) is imported inside build_loggers, not here: nemo_rlhf.config
# imports LoggerConfig, and parsing a config must not cost a torch import (tens of seconds on a
# busy CPU machine).
if TYPE_CHECKING:
    from lightning.pytorch.loggers.logger import Logger

LOG = logging.getLogger("nemo_rlhf.loggers")

WANDB_MODES = ("offline", "online", "disabled")

#: What to install for each optional logger: (module imported, pip command named in the error).
OPTIONAL_PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard==2.21.0"),
    "wandb": ("wandb", "pip install wandb==0.31.0"),
    "mlflow": ("mlflow", "pip install mlflow-skinny==3.17.2"),
}


class MissingLoggerPackageError(ImportError):
    """A logger was enabled in config but its package is not installed (the message names the
    config key and the ``pip install`` command)."""


@dataclass
class LoggerConfig:
    """Which experiment loggers a stage writes to, and their settings (the ``logger:`` config section).

    Attributes:
        jsonl: write ``<run_dir>/metrics.jsonl`` (read by the tests, the plot and the demo report).
        tensorboard: write TensorBoard event files under ``<run_dir>/tensorboard/<stage>``.
        wandb: log to Weights & Biases.
        wandb_project: W&B project name.
        wandb_entity: W&B entity (team or user); ``None`` = the account's default.
        wandb_mode: ``"offline"`` (default; no network, files under ``<run_dir>/wandb``, upload
            later with ``wandb sync``), ``"online"`` or ``"disabled"``.
        mlflow: log to MLflow.
        mlflow_tracking_uri: MLflow tracking URI; ``None`` = the local file store
            ``file:<run_dir>/mlruns``.
        mlflow_experiment: MLflow experiment name.
        csv: write ``<run_dir>/csv/<stage>/metrics.csv`` (Lightning's CSVLogger).
        run_name: run name shown by W&B and MLflow; ``None`` = ``<run_dir name>-<stage>``.

    How often training metrics are logged is not here but ``trainer.log_every_n_steps`` (passed to
    :class:`MetricLogger`), so that the default exists once.

    Raises:
        TypeError: a field has the wrong type (the message names the field).
        ValueError: ``wandb_mode`` is not one of :data:`WANDB_MODES`.
    """

    jsonl: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "nemo-rlhf"
    wandb_entity: str | None = None
    wandb_mode: str = "offline"
    mlflow: bool = False
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "nemo-rlhf"
    csv: bool = False
    run_name: str | None = None

    def __post_init__(self) -> None:
        kinds = {"bool": (bool, "true or false"), "str": (str, "a string"),
                 "str | None": ((str, type(None)), "a string or null")}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected, words = kinds[f.type]
            if not isinstance(value, expected):
                raise TypeError(f"logger.{f.name} must be {words}, got {value!r} ({type(value).__name__})")
        if self.wandb_mode not in WANDB_MODES:
            raise ValueError(f"logger.wandb_mode must be one of {list(WANDB_MODES)}, got {self.wandb_mode!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "LoggerConfig":
        """Build from a plain mapping (e.g. ``to_dict(cfg.logger)``); ``None`` = all defaults.

        Raises:
            KeyError: an unknown key (the message names it, the section and the nearest valid key).
            TypeError, ValueError: as the constructor.
        """
        values = dict(values or {})
        names = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in names:
                near = difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else f"; valid keys: {', '.join(names)}"
                raise KeyError(f"unknown key {key!r} in section 'logger'{hint}")
        return cls(**values)


def require_package(logger_name: str) -> None:
    """Import the package behind an optional logger, or raise naming the install command.

    Raises:
        MissingLoggerPackageError: the package (:data:`OPTIONAL_PACKAGES`) cannot be imported.
    """
    module, pip_cmd = OPTIONAL_PACKAGES[logger_name]
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise MissingLoggerPackageError(
            f"logger.{logger_name}=true needs the '{module}' package, which is not installed: "
            f"{pip_cmd}  (or: pip install -e '.[loggers]'; or set logger.{logger_name}=false)") from exc


def default_run_name(run_dir: str | os.PathLike, stage: str) -> str:
    """``<run_dir name>-<stage>``, e.g. ``demo-ppo``."""
    return f"{Path(run_dir).resolve().name}-{stage}"


def build_loggers(cfg: LoggerConfig, run_dir: str | os.PathLike, stage: str) -> list[Logger]:
    """Create the loggers ``cfg`` enables for one stage (in the order jsonl, tensorboard, wandb,
    mlflow, csv). Nothing is written until the first metric; call it on global rank 0 only
    (:meth:`MetricLogger.from_config` does).

    Steps passed to the loggers are global optimizer steps (resumed runs continue the count), so the
    JSONL logger is built with ``step_offset=0``.

    Raises:
        MissingLoggerPackageError: an enabled logger's package is not installed.
        TypeError: ``cfg`` is not a :class:`LoggerConfig`.
    """
    if not isinstance(cfg, LoggerConfig):
        raise TypeError(f"build_loggers needs a LoggerConfig, got {type(cfg).__name__} "
                        f"(use LoggerConfig.from_dict for a mapping)")
    from nemo_rlhf.utils.logging import JSONLLogger

    run_dir = Path(run_dir)
    name = cfg.run_name or default_run_name(run_dir, stage)
    loggers: list[Logger] = []
    if cfg.jsonl:
        loggers.append(JSONLLogger(run_dir, stage))
    if cfg.tensorboard:
        require_package("tensorboard")
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=stage,
                                         default_hp_metric=False))
    if cfg.wandb and cfg.wandb_mode != "disabled":
        require_package("wandb")
        import wandb
        from lightning.pytorch.loggers import WandbLogger

        run_dir.mkdir(parents=True, exist_ok=True)
        loggers.append(WandbLogger(name=name, project=cfg.wandb_project, entity=cfg.wandb_entity,
                                   save_dir=str(run_dir), mode=cfg.wandb_mode, group=run_dir.resolve().name,
                                   job_type=stage, settings=wandb.Settings(silent=True)))
    if cfg.mlflow:
        require_package("mlflow")
        from lightning.pytorch.loggers import MLFlowLogger

        from mlflow import MlflowClient

        uri = cfg.mlflow_tracking_uri or f"file:{run_dir.resolve() / 'mlruns'}"
        if uri.startswith("file:"):
            # MLflow >= 3.7 refuses the file store unless asked (it is in maintenance mode, but it
            # is the only local store that needs no database packages).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(uri)  # create the experiment here: Lightning warns when it has to
        if client.get_experiment_by_name(cfg.mlflow_experiment) is None:
            client.create_experiment(cfg.mlflow_experiment)
        loggers.append(MLFlowLogger(experiment_name=cfg.mlflow_experiment, run_name=name, tracking_uri=uri,
                                    tags={"stage": stage}))
    if cfg.csv:
        from lightning.pytorch.loggers import CSVLogger

        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv", version=stage))
    return loggers


def _as_float(value: Any) -> float:
    if hasattr(value, "item"):  # torch / numpy scalars
        value = value.item()
    return float(value)


class MetricLogger:
    """Fans ``{name: value}`` metrics out to Lightning loggers, on global rank 0 only.

    Args:
        loggers: the loggers (e.g. from :func:`build_loggers`); may be empty.
        is_rank_zero: ``bool`` or a no-argument callable returning it (evaluated at each call, so
            it may be passed before the process group exists). On other ranks every method is a
            no-op.
        log_every_n_steps: :meth:`log` forwards only at steps that are multiples of this unless
            ``force=True``.
    """

    def __init__(self, loggers: Sequence[Logger], is_rank_zero: bool | Callable[[], bool] = True,
                 log_every_n_steps: int = 1):
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be an integer >= 1, got {log_every_n_steps!r}")
        self.loggers = list(loggers)
        self._is_rank_zero = is_rank_zero
        self.log_every_n_steps = log_every_n_steps
        self._finalized = False

    @classmethod
    def from_config(cls, cfg: LoggerConfig | Mapping[str, Any] | None, run_dir: str | os.PathLike, stage: str,
                    is_rank_zero: bool | Callable[[], bool] = True, log_every_n_steps: int = 1) -> "MetricLogger":
        """Build the loggers ``cfg`` enables (on rank 0 only; other ranks get none).

        ``log_every_n_steps``: pass ``trainer.log_every_n_steps`` (see :meth:`log`).

        ``cfg`` may be a :class:`LoggerConfig`, a plain mapping or an OmegaConf node (converted
        with :meth:`LoggerConfig.from_dict`), or ``None`` for the defaults.

        Raises:
            KeyError, TypeError, ValueError: invalid config (see :class:`LoggerConfig`), or
                ``log_every_n_steps`` < 1 (ValueError).
            MissingLoggerPackageError: an enabled logger's package is not installed.
        """
        if not isinstance(cfg, LoggerConfig):
            from nemo_rlhf.utils.hydra import to_dict

            cfg = LoggerConfig.from_dict(to_dict(cfg))
        self = cls([], is_rank_zero, log_every_n_steps)
        if self.is_rank_zero:
            self.loggers = build_loggers(cfg, run_dir, stage)
            LOG.debug("%s: logging to %s", stage, ", ".join(type(lg).__name__ for lg in self.loggers) or "nothing")
        return self

    @property
    def is_rank_zero(self) -> bool:
        """Whether this process writes (the ``is_rank_zero`` argument, evaluated now)."""
        flag = self._is_rank_zero
        return bool(flag() if callable(flag) else flag)

    def log(self, metrics: Mapping[str, Any], step: int, *, force: bool = False) -> bool:
        """Log scalar metrics at global optimizer step ``step`` to every logger.

        Values may be Python numbers or 0-d tensors / numpy scalars (converted with ``float``);
        ``None`` values are skipped. Non-finite values are passed through (JSONL writes them as
        strings).

        Args:
            metrics: ``{name: value}``; names like ``ppo/reward`` group in TensorBoard / W&B.
            step: global optimizer step (>= 0).
            force: log even when ``step`` is not a multiple of ``log_every_n_steps``
                (evaluations, final metrics).

        Returns:
            Whether the metrics were forwarded (False on other ranks, off-cadence steps, empty
            metrics or after :meth:`finalize`).

        Raises:
            ValueError: ``step`` is negative.
            TypeError: a value cannot be converted to ``float``.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self._finalized or not self.is_rank_zero or not self.loggers:
            return False
        if not force and step % self.log_every_n_steps:
            return False
        values = {k: _as_float(v) for k, v in metrics.items() if v is not None}
        if not values:
            return False
        for lg in self.loggers:
            lg.log_metrics(values, step=int(step))
        return True

    def forget(self, redone: Callable[[dict[str, Any]], bool]) -> int:
        """After a resume: drop this stage's JSONL records for which ``redone(record)`` is true
        (``record``: the logged dict with ``stage``, ``step``, ``time`` and the metrics), written
        before the interruption for steps the resumed run does again. The other loggers keep what
        they wrote (TensorBoard, W&B and MLflow show a step's later value). Returns the number of
        records dropped (0 on other ranks)."""
        if self._finalized or not self.is_rank_zero:
            return 0
        return sum(int(lg.forget(redone) or 0) for lg in self.loggers if hasattr(lg, "forget"))

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        """Record the run's configuration (nested dicts are flattened by each logger) on rank 0.
        JSONL ignores it (the run directory holds the config)."""
        if self._finalized or not self.is_rank_zero:
            return
        for lg in self.loggers:
            lg.log_hyperparams(dict(params))

    def finalize(self, status: str = "success") -> None:
        """Flush and close every logger (idempotent); ends the W&B run if one was started.

        Args:
            status: ``"success"`` or ``"failed"`` (MLflow records it as FINISHED / FAILED, W&B as
                exit code 0 / 1).

        Raises:
            ValueError: another ``status``.
        """
        if status not in ("success", "failed"):
            raise ValueError(f"status must be 'success' or 'failed', got {status!r}")
        if self._finalized:
            return
        self._finalized = True
        if not self.is_rank_zero:
            return
        for lg in self.loggers:
            try:
                lg.finalize(status)
            except Exception:  # noqa: BLE001 - one broken logger must not hide the others' data
                LOG.warning("finalizing %s failed", type(lg).__name__, exc_info=True)
        if any(type(lg).__name__ == "WandbLogger" for lg in self.loggers):
            import wandb

            run = wandb.run
            if run is not None:
                run_dir = Path(run.dir).parent  # run.dir is <run>/files
                offline = run.settings.mode == "offline"
                wandb.finish(exit_code=0 if status == "success" else 1)
                if offline:
                    LOG.info("W&B offline run saved in %s (upload it with: wandb sync %s)", run_dir, run_dir)

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finalize("success" if exc_type is None else "failed")
