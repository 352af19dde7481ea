"""nemo_rlhf/utils/loggers.py: config-chosen Lightning loggers, read back from their own files."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from nemo_rlhf.utils.loggers import (
    LoggerConfig,
    MetricLogger,
    MissingLoggerPackageError,
    build_loggers,
)
from nemo_rlhf.utils.logging import read_jsonl

# PPO-like scalars at steps 1..3: value = base + step / 10 (exact in float32 up to ~1e-7 relative)
PPO_BASE = {"ppo/reward": 0.5, "ppo/kl": 2.0, "ppo/pg_loss": -0.25, "ppo/critic_loss": 1.5, "ppo/kl_coef": 0.1}
STEPS = (1, 2, 3)


def ppo_metrics(step: int) -> dict[str, float]:
    return {k: v + step / 10 for k, v in PPO_BASE.items()}


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Keep W&B's config/cache files inside tmp_path and make sure nothing goes online."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def test_all_loggers_write_the_ppo_scalars(tmp_path, wandb_env):
    run_dir = tmp_path / "run"
    cfg = LoggerConfig(jsonl=True, tensorboard=True, wandb=True, mlflow=True, csv=True)
    metrics = MetricLogger.from_config(cfg, run_dir, "ppo", is_rank_zero=True)
    assert [type(lg).__name__ for lg in metrics.loggers] == [
        "JSONLLogger", "TensorBoardLogger", "WandbLogger", "MLFlowLogger", "CSVLogger"]
    metrics.log_hyperparams({"ppo": {"init_kl_coef": 0.1}, "seed": 1234})
    for step in STEPS:
        assert metrics.log(ppo_metrics(step), step=step)
    metrics.finalize("success")
    metrics.finalize("success")  # idempotent

    # TensorBoard: read the event files back
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = run_dir / "tensorboard" / "ppo"
    assert list(tb_dir.glob("events.out.tfevents.*")), sorted(p.name for p in tb_dir.iterdir())
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    assert set(PPO_BASE) <= set(acc.Tags()["scalars"]), acc.Tags()["scalars"]
    for tag, base in PPO_BASE.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == list(STEPS), tag
        assert [e.value for e in events] == pytest.approx([base + s / 10 for s in STEPS], rel=1e-6), tag

    # JSONL: one row a step, the file format the plot and tests read
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(STEPS)
    for row, step in zip(rows, STEPS):
        assert row["stage"] == "ppo" and isinstance(row["time"], float)
        assert {k: row[k] for k in PPO_BASE} == pytest.approx(ppo_metrics(step))
        assert set(row) == {"stage", "step", "time", *PPO_BASE}

    # MLflow: the local file store under the run directory
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{(run_dir / 'mlruns').resolve()}")
    exp = client.get_experiment_by_name("nemo-rlhf")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "run-ppo" and run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "ppo"
    assert run.data.params["ppo/init_kl_coef"] == "0.1"
    for tag, base in PPO_BASE.items():
        hist = sorted(client.get_metric_history(run.info.run_id, tag), key=lambda m: m.step)
        assert [(m.step, m.value) for m in hist] == [(s, pytest.approx(base + s / 10)) for s in STEPS], tag

    # W&B: an offline run under the run directory (nothing sent anywhere)
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run_dir / "wandb").iterdir())
    assert list(offline[0].glob("run-*.wandb"))

    # CSV
    with open(run_dir / "csv" / "ppo" / "metrics.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in csv_rows] == list(STEPS)
    assert float(csv_rows[-1]["ppo/kl_coef"]) == pytest.approx(0.4)


def test_default_config_is_jsonl_only_and_cadence(tmp_path):
    metrics = MetricLogger.from_config(None, tmp_path, "sft")
    assert [type(lg).__name__ for lg in metrics.loggers] == ["JSONLLogger"]
    metrics = MetricLogger.from_config({}, tmp_path, "sft", log_every_n_steps=5)
    logged = [s for s in range(1, 13) if metrics.log({"train/loss": float(s)}, step=s)]
    assert logged == [5, 10]
    assert metrics.log({"val/loss": 1.0}, step=12, force=True)
    assert not metrics.log({"x": None}, step=15)  # nothing left to log
    metrics.finalize()
    assert not metrics.log({"train/loss": 1.0}, step=15)  # after finalize: no-op
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], "val/loss" in r) for r in rows] == [(5, False), (10, False), (12, True)]


def test_tensor_values_and_non_finite(tmp_path):
    torch = pytest.importorskip("torch")
    metrics = MetricLogger(build_loggers(LoggerConfig(), tmp_path, "rm"))
    metrics.log({"train/loss": torch.tensor(0.25), "train/grad_norm": float("nan")}, step=1)
    metrics.finalize()
    (row,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert row["train/loss"] == 0.25 and row["train/grad_norm"] == "nan"


def test_other_ranks_build_and_write_nothing(tmp_path):
    calls = []

    def rank_zero() -> bool:
        calls.append(1)
        return False

    metrics = MetricLogger.from_config(LoggerConfig(tensorboard=True), tmp_path, "ppo", is_rank_zero=rank_zero)
    assert metrics.loggers == [] and calls
    assert not metrics.log({"ppo/reward": 1.0}, step=1)
    metrics.log_hyperparams({"a": 1})
    metrics.finalize()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, pip", [("mlflow", "pip install mlflow-skinny"),
                                       ("wandb", "pip install wandb"),
                                       ("tensorboard", "pip install tensorboard")])
def test_missing_package_names_the_pip_command(tmp_path, monkeypatch, name, pip):
    monkeypatch.setitem(sys.modules, name, None)  # makes `import <name>` raise ImportError
    with pytest.raises(MissingLoggerPackageError) as err:
        build_loggers(LoggerConfig(jsonl=False, **{name: True}), tmp_path, "ppo")
    assert pip in str(err.value) and f"logger.{name}=true" in str(err.value)
    assert isinstance(err.value, ImportError)


def test_config_validation_names_the_key():
    with pytest.raises(KeyError, match=r"unknown key 'tensorbord' in section 'logger' \(did you mean 'tensorboard'\?\)"):
        LoggerConfig.from_dict({"tensorbord": True})
    with pytest.raises(TypeError, match=r"logger\.wandb must be true or false, got 'yes' \(str\)"):
        LoggerConfig(wandb="yes")
    with pytest.raises(TypeError, match=r"logger\.run_name must be a string or null"):
        LoggerConfig(run_name=3)
    with pytest.raises(ValueError, match=r"logger\.wandb_mode"):
        LoggerConfig(wandb_mode="cloud")
    with pytest.raises(ValueError, match=r"log_every_n_steps must be an integer >= 1"):
        MetricLogger([], log_every_n_steps=0)
    with pytest.raises(TypeError, match="LoggerConfig"):
        build_loggers({"jsonl": True}, ".", "sft")
    with pytest.raises(ValueError, match="status"):
        MetricLogger([]).finalize("aborted")


def test_omegaconf_section(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"logger": {"jsonl": True, "csv": True, "run_name": "x"}})
    metrics = MetricLogger.from_config(cfg.logger, tmp_path, "sft")
    assert [type(lg).__name__ for lg in metrics.loggers] == ["JSONLLogger", "CSVLogger"]
    metrics.finalize()


def test_forget_drops_this_stages_redone_records(tmp_path):
    """A resumed stage drops its records that ``redone`` picks (the steps it does again), keeping
    the other stages' records, its own earlier ones and lines it cannot parse, in order."""
    sft = MetricLogger.from_config(None, tmp_path, "sft")
    for step in (1, 2, 3):
        sft.log({"train/loss": float(step)}, step=step)
    sft.finalize()
    metrics = MetricLogger.from_config(None, tmp_path, "dpo")
    for step in (1, 2, 3, 4):
        metrics.log({"train/loss": float(step)}, step=step)
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write("{not json\n")
    later = lambda record: record["step"] > 2  # noqa: E731
    assert metrics.forget(later) == 2
    assert metrics.forget(later) == 0  # nothing left to drop
    metrics.log({"train/loss": 30.0}, step=3)
    metrics.finalize()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[-2] == "{not json"
    rows = [json.loads(x) for x in lines if x != "{not json"]
    assert [(r["stage"], r["step"], r["train/loss"]) for r in rows] == [
        ("sft", 1, 1.0), ("sft", 2, 2.0), ("sft", 3, 3.0), ("dpo", 1, 1.0), ("dpo", 2, 2.0), ("dpo", 3, 30.0)]
    assert MetricLogger.from_config(None, tmp_path / "none", "dpo").forget(later) == 0  # no file yet
    assert not list(tmp_path.glob("*.tmp"))
