"""nemo_rlhf/utils/progress.py: a bar on a terminal, bounded one-line summaries elsewhere."""

from __future__ import annotations

import io
import logging

import pytest

from nemo_rlhf.utils import progress as progress_mod
from nemo_rlhf.utils.progress import StageProgress, format_duration


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(progress_mod.time, "monotonic", c)
    return c


def progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "nemo_rlhf.progress"]


class NotATTY(io.StringIO):
    def isatty(self) -> bool:
        return False


class ATTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_non_tty_logs_at_most_once_per_interval(caplog, clock, monkeypatch):
    monkeypatch.delenv("NEMO_RLHF_PROGRESS", raising=False)
    stream = NotATTY()
    caplog.set_level(logging.INFO, logger="nemo_rlhf.progress")
    with StageProgress("ppo", total_steps=1000, metrics_to_show=("ppo/reward", "ppo/kl"),
                       stream=stream, every_s=30.0) as p:
        assert p.mode == "log"
        for step in range(1, 1001):
            clock.t += 0.5  # 2 steps/s: 500 s in all -> a line every 30 s
            p.update(step, {"ppo/reward": step / 1000, "ppo/kl": 0.5, "ppo/pg_loss": 1.0})
    lines = progress_lines(caplog)
    assert stream.getvalue() == ""  # nothing drawn on a non-TTY stream
    assert 500 // 30 <= len(lines) <= 500 // 30 + 2, lines  # bounded: by time, not by steps
    assert lines[0] == "ppo: step 60/1000 (6%) | 2 step/s | ETA 0:07:50 | reward 0.06 | kl 0.5"
    assert lines[-2].startswith("ppo: step 1000/1000 (100%)")
    assert lines[-1] == "ppo: done, 1000 steps in 0:08:20 (2 step/s)"
    assert all("pg_loss" not in line for line in lines)


def test_every_n_steps_and_resume(caplog, clock):
    caplog.set_level(logging.INFO, logger="nemo_rlhf.progress")
    with StageProgress("sft", total_steps=100, initial_step=40, mode="log", every_n_steps=20) as p:
        for step in range(41, 101):
            clock.t += 2.0
            p.update(step, {"loss": 3.0 - step / 100} if step % 2 else None)  # metrics on odd steps only
    lines = progress_lines(caplog)
    assert [line.split(" |")[0] for line in lines[:-1]] == [
        "sft: step 60/100 (60%)", "sft: step 80/100 (80%)", "sft: step 100/100 (100%)"]
    assert "0.5 step/s" in lines[0] and "ETA 0:01:20" in lines[0]  # rate counts this process's steps only
    assert lines[1].endswith("loss 2.21")  # last odd step's value kept
    assert lines[-1] == "sft: done, 60 steps in 0:02:00 (0.5 step/s)"


def test_stopped_early_or_failed(caplog, clock):
    caplog.set_level(logging.INFO, logger="nemo_rlhf.progress")
    with pytest.raises(RuntimeError):
        with StageProgress("rm", total_steps=10, mode="log", every_n_steps=100) as p:
            clock.t += 5
            p.update(3, {"loss": 0.7})
            raise RuntimeError("boom")
    assert progress_lines(caplog) == ["rm: stopped at step 3/10 after 0:00:05"]


def test_tty_draws_a_bar(clock):
    stream = ATTY()
    with StageProgress("ppo", total_steps=50, metrics_to_show=("ppo/reward", "ppo/kl"), stream=stream) as p:
        assert p.mode == "bar"
        for step in range(1, 51):
            clock.t += 1
            p.update(step, {"ppo/reward": 0.25, "ppo/kl": 1.5})
    out = stream.getvalue()
    assert "ppo:" in out and "50/50" in out and "reward=0.25" in out and "kl=1.5" in out


def test_disabled_and_off_print_nothing(caplog, capsys):
    caplog.set_level(logging.INFO, logger="nemo_rlhf.progress")
    for kwargs in ({"enabled": False}, {"mode": "off"}):
        with StageProgress("sft", total_steps=5, **kwargs) as p:
            for step in range(1, 6):
                p.update(step, {"loss": 1.0})
                p.write("hello")
    assert progress_lines(caplog) == ["hello"] * 5  # enabled=False: nothing; mode "off": no bar, write() logs
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_env_overrides_auto(monkeypatch):
    monkeypatch.setenv("NEMO_RLHF_PROGRESS", "off")
    assert StageProgress("sft", total_steps=5, stream=ATTY()).mode == "off"
    monkeypatch.setenv("NEMO_RLHF_PROGRESS", "log")
    assert StageProgress("sft", total_steps=5, stream=ATTY()).mode == "log"


def test_bad_arguments():
    with pytest.raises(ValueError, match="total_steps"):
        StageProgress("sft", total_steps=0)
    with pytest.raises(ValueError, match="initial_step"):
        StageProgress("sft", total_steps=5, initial_step=6)
    with pytest.raises(ValueError, match="mode"):
        StageProgress("sft", total_steps=5, mode="fancy")
    assert format_duration(3725) == "1:02:05" and format_duration(float("inf")) == "?"
