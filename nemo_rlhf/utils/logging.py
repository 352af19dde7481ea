"""Run-directory metrics: a Lightning logger writing ``metrics.jsonl`` (one JSON object a line)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one record to a JSONL file (flushed and fsync'ed, so a killed run keeps its lines).

    Non-finite floats are written as strings (``"nan"``, ``"inf"``) to keep the file valid JSON.
    """
    clean = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(clean, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL file written by :func:`append_jsonl`."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class JSONLLogger(Logger):
    """Lightning logger appending ``{"stage", "step", "time", **metrics}`` to ``<run_dir>/metrics.jsonl``
    on global rank 0."""

    def __init__(self, run_dir: str | os.PathLike, stage: str, step_offset: int = 0):
        super().__init__()
        self.path = Path(run_dir) / "metrics.jsonl"
        self.stage = stage
        self.step_offset = int(step_offset)  # steps done before a resume: records keep global steps

    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> str:
        return self.stage

    @property
    @rank_zero_experiment
    def experiment(self) -> None:
        return None

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        return None

    @rank_zero_only
    def forget(self, redone: Callable[[dict[str, Any]], bool]) -> int:
        """Drop this stage's records for which ``redone(record)`` is true (a resumed run logs them
        again), so the file holds each logged step once; other stages' records, records without an
        integer ``step`` and unparsable lines stay, in order. The file is rewritten atomically (a
        temporary file, fsync'ed, then ``os.replace``).

        Returns:
            How many records were dropped (0 without a file).
        """
        if not self.path.exists():
            return 0
        kept, dropped = [], 0
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if (isinstance(record, dict) and record.get("stage") == self.stage
                        and isinstance(record.get("step"), int) and redone(record)):
                    dropped += 1
                else:
                    kept.append(line if line.endswith("\n") else line + "\n")
        if dropped:
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        return dropped

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        append_jsonl(self.path, {"stage": self.stage, "step": None if step is None else step + self.step_offset,
                                 "time": time.time(),
                                 **{k: float(v) for k, v in metrics.items()}})
