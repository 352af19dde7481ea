"""nemo_rlhf/utils/console.py: INFO shows the project's lines, third-party chatter needs WARNING."""

from __future__ import annotations

import io
import logging
import warnings

import pytest

from nemo_rlhf.utils.console import (
    ERROR_ONLY_LOGGERS,
    NOISY_LOGGERS,
    OWN_LOGGERS,
    ConsoleHandler,
    configure_console_logging,
    parse_level,
)

TOUCHED = ("", *OWN_LOGGERS, *NOISY_LOGGERS, *ERROR_ONLY_LOGGERS, "lightning.pytorch.utilities.rank_zero",
           "some_other_lib", "pytorch_lightning", "lightning_fabric")


@pytest.fixture
def restore_logging():
    """configure_console_logging changes process-wide state: put it back afterwards."""
    saved = {name: (lg.level, list(lg.handlers), lg.propagate)
             for name in TOUCHED for lg in [logging.getLogger(name)]}
    with warnings.catch_warnings():
        yield
    for name, (level, handlers, propagate) in saved.items():
        lg = logging.getLogger(name)
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.propagate = propagate


def emit_samples() -> None:
    logging.getLogger("megatron.core.distributed.param_and_grad_buffer").info("Params for bucket 1 (658944 elements)")
    logging.getLogger("megatron.core.optimizer").info("Setting up optimizer with config OptimizerConfig(lr=0.001)")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False, used: False")
    logging.getLogger("nv_one_logger.api.config").warning("OneLogger: Setting error_handling_strategy")
    logging.getLogger("some_other_lib").info("third-party chatter")
    logging.getLogger("nemo_rlhf").info("sft: starting at step 0")
    logging.getLogger("nemo_rlhf.checkpoint").info("saved checkpoint step_00000003")
    logging.getLogger("nemo_rlhf").debug("sft: debug detail")
    logging.getLogger("megatron.core.dist_checkpointing").warning("megatron warning")


def test_info_shows_only_project_lines_and_warnings(restore_logging):
    import lightning.pytorch  # noqa: F401 - sets its own logger level on import: must not matter

    out = io.StringIO()
    configure_console_logging("INFO", stream=out, fmt="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lightning.pytorch").setLevel(logging.INFO)  # as a re-import would do
    emit_samples()
    assert out.getvalue().splitlines() == [
        "INFO nemo_rlhf: sft: starting at step 0",
        "INFO nemo_rlhf.checkpoint: saved checkpoint step_00000003",
        "WARNING megatron.core.dist_checkpointing: megatron warning",
    ]
    assert logging.getLogger("megatron").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("nv_one_logger").getEffectiveLevel() == logging.ERROR


def test_debug_keeps_everything(restore_logging):
    out = io.StringIO()
    configure_console_logging("INFO", stream=out)
    configure_console_logging("debug", stream=out, fmt="%(name)s: %(message)s")  # reconfigure: one handler
    emit_samples()
    lines = out.getvalue().splitlines()
    assert len(lines) == 9, lines
    assert "megatron.core.optimizer: Setting up optimizer with config OptimizerConfig(lr=0.001)" in lines
    assert "nemo_rlhf: sft: debug detail" in lines
    assert sum(isinstance(h, ConsoleHandler) for h in logging.getLogger().handlers) == 1


def test_other_ranks_show_warnings_only(restore_logging):
    out = io.StringIO()
    configure_console_logging("INFO", is_rank_zero=False, stream=out, fmt="%(name)s: %(message)s")
    emit_samples()
    logging.getLogger("nemo_rlhf.servers").warning("critic server failed")
    assert out.getvalue().splitlines() == ["megatron.core.dist_checkpointing: megatron warning",
                                           "nemo_rlhf.servers: critic server failed"]


def test_replaces_basic_config_handler_but_keeps_others(restore_logging):
    root = logging.getLogger()
    plain = logging.StreamHandler(io.StringIO())  # what basicConfig / Hydra's job logging install
    keep = logging.FileHandler(__file__ + ".never-opened", delay=True)
    root.addHandler(plain)
    root.addHandler(keep)
    configure_console_logging("INFO", stream=io.StringIO())
    assert plain not in root.handlers and keep in root.handlers
    root.removeHandler(keep)


def test_known_warnings_are_silenced_at_info(restore_logging):
    configure_console_logging("INFO", stream=io.StringIO())
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("You defined a `validation_step` but have no `val_dataloader`. Skipping val loop.")
        warnings.warn("`LightningModule.configure_optimizers` returned `None`, this fit will run with no optimizer")
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch Norm")
        warnings.warn("Future Hydra versions will no longer change working directory at job runtime by default.")
        warnings.warn("something new and important", UserWarning)
    assert [str(w.message) for w in caught] == ["something new and important"]


def test_parse_level():
    assert parse_level("info") == logging.INFO and parse_level(logging.DEBUG) == logging.DEBUG
    with pytest.raises(ValueError, match="DEBUG"):
        parse_level("verbose")
    with pytest.raises(ValueError):
        configure_console_logging("LOUD")


def test_log_lines_do_not_break_an_active_bar(restore_logging):
    from nemo_rlhf.utils.progress import StageProgress

    class TTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = TTY()
    configure_console_logging("INFO", stream=out, fmt="%(message)s")
    with StageProgress("sft", total_steps=4, stream=out) as p:
        for step in range(1, 5):
            p.update(step, {"loss": 1.0})
            logging.getLogger("nemo_rlhf").info("evaluation at step %d", step)
    lines = [seg.strip() for line in out.getvalue().splitlines() for seg in line.split("\r")]
    for step in range(1, 5):
        assert f"evaluation at step {step}" in lines  # on a line of its own, not glued to the bar
    assert lines[-1].startswith("sft: done, 4 steps in ")


def test_rank_zero_from_env(monkeypatch):
    from nemo_rlhf.utils.console import rank_zero_from_env

    for var in ("RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert rank_zero_from_env()
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert not rank_zero_from_env()
    monkeypatch.setenv("RANK", "0")  # torchrun's RANK wins
    assert rank_zero_from_env()
