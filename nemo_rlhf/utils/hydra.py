"""Hydra entry-point decorator for the launchers (NeMo's ``hydra_runner`` when available)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from nemo_rlhf.utils.console import configure_console_logging, level_from_env, quiet_warnings, rank_zero_from_env

__all__ = ["CONF_DIR", "hydra_entry", "quiet_warnings", "to_dict"]  # quiet_warnings: re-exported

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def to_dict(cfg: Any) -> Any:
    """OmegaConf node or config dataclass -> plain Python containers (interpolations resolved);
    anything else as is."""
    import dataclasses

    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    return cfg


def dotted_leaves(node: Any, prefix: str):
    """``(dotted key, value)`` of every leaf of a config mapping: nested sections (``model.lora``)
    become one command-line override per key (Hydra's override grammar takes no quoted dict keys)."""
    for key, value in node.items():
        if hasattr(value, "items"):
            yield from dotted_leaves(value, f"{prefix}.{key}")
        else:
            yield f"{prefix}.{key}", value


def hydra_entry(config_name: str):
    """``@hydra_entry("gpt_sft")``: parse ``conf/<config_name>.yaml`` plus command-line overrides.

    Uses ``nemo.core.config.hydra_runner`` (no per-run output directory, cwd unchanged) when
    nemo_toolkit is installed, else plain ``hydra.main``.

    Console logging (:func:`nemo_rlhf.utils.console.configure_console_logging`) is set up twice:
    here, so that import-time chatter is already filtered, and again as the job starts, because
    Hydra's job logging replaces the root handler. The level is ``cfg.log_level`` when the config
    has that key, else ``$NEMO_RLHF_LOG_LEVEL``, else INFO; ranks other than 0 show only warnings
    and errors of their own.
    """
    configure_console_logging(level_from_env(), is_rank_zero=rank_zero_from_env())

    def with_console_logging(fn):
        @functools.wraps(fn)
        def job(cfg, *args, **kwargs):
            level = cfg.get("log_level", None) if hasattr(cfg, "get") else None
            configure_console_logging(level or level_from_env(), is_rank_zero=rank_zero_from_env())
            return fn(cfg, *args, **kwargs)

        return job

    def decorate(fn):
        @functools.wraps(fn)
        def main(*args, **kwargs):
            # NeMo/Hydra are imported here, when the entry point runs, not when the launcher module
            # is imported: megatron's checkpoint writer starts a `spawn` helper process that
            # re-imports the launcher module, and it needs none of this (~8 s per launcher saved).
            try:
                from nemo.core.config import hydra_runner

                runner = hydra_runner(config_path=CONF_DIR, config_name=config_name)
            except ImportError:  # pragma: no cover - nemo_toolkit is a declared dependency
                import hydra

                runner = hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")
            return runner(with_console_logging(fn))(*args, **kwargs)

        return main

    return decorate
