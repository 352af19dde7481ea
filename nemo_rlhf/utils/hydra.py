"""Hydra entry-point decorator for the launchers (NeMo's ``hydra_runner`` when available)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def quiet_warnings() -> None:
    """Silence the import-time notices megatron-core prints when apex/TE are absent (CPU runs)."""
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")
    warnings.filterwarnings("ignore", message=".*Falling back to Torch Norm.*")
    warnings.filterwarnings("ignore", message=".*cuda_graph_scope.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*self.log.*trainer.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def to_dict(cfg: Any) -> Any:
    """OmegaConf node -> plain Python containers (interpolations resolved); anything else as is."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def hydra_entry(config_name: str):
    """``@hydra_entry("gpt_sft")``: parse ``conf/<config_name>.yaml`` plus command-line overrides.

    Uses ``nemo.core.config.hydra_runner`` (no per-run output directory, cwd unchanged) when
    nemo_toolkit is installed, else plain ``hydra.main``.
    """
    quiet_warnings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from nemo.core.config import hydra_runner

        return hydra_runner(config_path=CONF_DIR, config_name=config_name)
    except ImportError:  # pragma: no cover - nemo_toolkit is a declared dependency
        import hydra

        def deco(fn):
            return hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")(fn)

        return deco
