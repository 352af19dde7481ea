"""A progress display per training stage: a tqdm bar on a terminal, bounded one-line summaries elsewhere.

::

    with StageProgress("ppo", total_steps=cfg.max_steps, initial_step=start_step,
                       metrics_to_show=("ppo/reward", "ppo/kl"), enabled=is_rank_zero()) as progress:
        for step in range(start_step + 1, cfg.max_steps + 1):
            metrics = train_one_step()
            progress.update(step, metrics)

On a terminal (stderr is a TTY): ``ppo:  42%|████▏     | 42/100 [00:31<00:43, 1.34step/s, reward=0.213, kl=1.02]``.
Otherwise (CI, SLURM log files) nothing is redrawn; a line like
``ppo: step 42/100 (42%) | 1.34 step/s | ETA 0:00:43 | reward 0.213 | kl 1.02`` is logged (logger
``nemo_rlhf.progress``, INFO) at most once every ``every_s`` seconds, or every ``every_n_steps``
steps when that is given, plus once at the last step and a closing ``done`` line.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import IO, Any, Mapping, Sequence

from tqdm import tqdm

LOG = logging.getLogger("nemo_rlhf.progress")

#: ``auto`` (bar on a TTY, log lines otherwise), ``bar``, ``log`` or ``off``; ``$NEMO_RLHF_PROGRESS``
#: overrides ``auto``.
PROGRESS_MODES = ("auto", "bar", "log", "off")
PROGRESS_ENV = "NEMO_RLHF_PROGRESS"


def format_duration(seconds: float) -> str:
    """Seconds -> ``H:MM:SS`` (``?`` for unknown / non-finite)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_value(value: float) -> str:
    """A metric value in 4 significant digits (``nan`` / ``inf`` as such)."""
    return f"{value:.4g}"


def short_name(name: str) -> str:
    """Display label of a metric: the part after the last ``/`` (``ppo/reward`` -> ``reward``)."""
    return name.rsplit("/", 1)[-1]


class StageProgress:
    """Progress of one stage: step / total, steps per second, ETA and a few chosen metrics.

    Args:
        stage: label shown first (``"sft"``, ``"rm"``, ``"ppo"``).
        total_steps: the step the stage ends at (global optimizer steps, > 0).
        initial_step: steps already done (a resumed run starts here; rate and ETA count only the
            steps done in this process).
        metrics_to_show: metric names to display (exact keys of the dicts passed to :meth:`update`),
            shown by their last ``/`` component; a metric missing from an update keeps its last value.
        enabled: False (e.g. on ranks other than 0) makes every method a no-op.
        mode: one of :data:`PROGRESS_MODES`. ``auto`` = ``$NEMO_RLHF_PROGRESS`` if set, else a bar
            when ``stream`` is a TTY, else log lines.
        stream: where the bar is drawn (default ``sys.stderr``); log lines go through logging.
        every_s: in log mode, the least number of seconds between two lines (> 0).
        every_n_steps: in log mode, log every this many steps instead of by time (>= 1), e.g. for
            deterministic output.

    Raises:
        ValueError: ``total_steps < 1``, ``initial_step`` outside ``[0, total_steps]``, an unknown
            ``mode``, ``every_s <= 0`` or ``every_n_steps < 1``.
    """

    def __init__(self, stage: str, total_steps: int, initial_step: int = 0,
                 metrics_to_show: Sequence[str] = ("loss",), enabled: bool = True, *, mode: str = "auto",
                 stream: IO[str] | None = None, every_s: float = 30.0, every_n_steps: int | None = None):
        if total_steps < 1:
            raise ValueError(f"{stage}: total_steps must be >= 1, got {total_steps}")
        if not 0 <= initial_step <= total_steps:
            raise ValueError(f"{stage}: initial_step must be in [0, total_steps={total_steps}], got {initial_step}")
        if mode not in PROGRESS_MODES:
            raise ValueError(f"progress mode must be one of {', '.join(PROGRESS_MODES)}, got {mode!r}")
        if every_s <= 0:
            raise ValueError(f"every_s must be > 0, got {every_s}")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.stage, self.total, self.initial = stage, int(total_steps), int(initial_step)
        self.metrics_to_show = tuple(metrics_to_show)
        self.enabled = bool(enabled)
        self.stream = stream
        self.every_s, self.every_n_steps = float(every_s), every_n_steps
        self.step = self.initial
        self.values: dict[str, float] = {}
        self.mode = self._resolve_mode(mode) if self.enabled else "off"
        self._bar: tqdm | None = None
        self._t0 = time.monotonic()
        self._last_line_t = self._t0
        self._last_line_step = self.initial
        self._closed = False

    def _resolve_mode(self, mode: str) -> str:
        if mode == "auto":
            env = os.environ.get(PROGRESS_ENV, "").strip().lower()
            if env in PROGRESS_MODES and env != "auto":
                return env
            stream = self.stream if self.stream is not None else sys.stderr
            isatty = getattr(stream, "isatty", None)
            return "bar" if isatty is not None and isatty() else "log"
        return mode

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> "StageProgress":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def start(self) -> None:
        """Open the bar (bar mode) and restart the clock; called by ``with``."""
        self._t0 = self._last_line_t = time.monotonic()
        if self.mode == "bar" and self._bar is None:
            self._bar = tqdm(total=self.total, initial=self.initial, desc=self.stage, unit="step",
                             file=self.stream if self.stream is not None else sys.stderr,
                             dynamic_ncols=True, leave=True, smoothing=0.1)

    # -- numbers ---------------------------------------------------------------------------------
    def rate(self) -> float:
        """Steps per second done in this process so far (0.0 before the first step)."""
        elapsed = time.monotonic() - self._t0
        done = self.step - self.initial
        return done / elapsed if done > 0 and elapsed > 0 else 0.0

    def eta_s(self) -> float:
        """Estimated seconds to ``total_steps`` at the current rate (``inf`` when unknown)."""
        r = self.rate()
        return (self.total - self.step) / r if r > 0 else math.inf

    def summary(self) -> str:
        """The one-line status used in log mode (and by :meth:`close`)."""
        parts = [f"{self.stage}: step {self.step}/{self.total} ({100.0 * self.step / self.total:.0f}%)",
                 f"{self.rate():.3g} step/s", f"ETA {format_duration(self.eta_s())}"]
        parts += [f"{short_name(k)} {format_value(self.values[k])}" for k in self.metrics_to_show if k in self.values]
        return " | ".join(parts)

    # -- updates ---------------------------------------------------------------------------------
    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Record that global step ``step`` is done (steps may be skipped; going backwards is
        ignored) and refresh the shown metrics from ``metrics`` (values convertible to float)."""
        if not self.enabled or self._closed:
            return
        for k in self.metrics_to_show:
            if metrics and metrics.get(k) is not None:
                v = metrics[k]
                self.values[k] = float(v.item() if hasattr(v, "item") else v)
        step = min(int(step), self.total)
        advanced = step > self.step
        if advanced:
            self.step = step
        if self.mode == "bar":
            if self._bar is None:
                self.start()
            if self.values:
                self._bar.set_postfix({short_name(k): format_value(self.values[k]) for k in self.metrics_to_show
                                       if k in self.values}, refresh=False)
            if advanced:
                self._bar.update(self.step - self._bar.n)
        elif self.mode == "log" and advanced and self._due():
            self._emit(self.summary())

    def _due(self) -> bool:
        if self.step >= self.total:
            return True
        if self.every_n_steps is not None:
            return self.step - self._last_line_step >= self.every_n_steps
        return time.monotonic() - self._last_line_t >= self.every_s

    def _emit(self, line: str) -> None:
        LOG.info("%s", line)
        self._last_line_t, self._last_line_step = time.monotonic(), self.step

    def write(self, message: str) -> None:
        """Print a line above the bar without breaking it (bar mode), or log it (other modes)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream if self.stream is not None else sys.stderr)
        else:
            LOG.info("%s", message)

    def close(self, failed: bool = False) -> None:
        """Close the bar and log a closing line (``done: N steps in H:MM:SS (r step/s)``, or
        ``stopped at step k/N`` when the stage ended early or ``failed``). Idempotent."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.mode == "off":
            return
        elapsed = time.monotonic() - self._t0
        if self.step >= self.total and not failed:
            self._emit(f"{self.stage}: done, {self.step - self.initial} steps in {format_duration(elapsed)} "
                       f"({self.rate():.3g} step/s)")
        else:
            self._emit(f"{self.stage}: stopped at step {self.step}/{self.total} after {format_duration(elapsed)}")
