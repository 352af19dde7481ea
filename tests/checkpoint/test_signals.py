"""nemo_rlhf.checkpoint.signals: signal handling around a checkpoint save (the save and resume
themselves: tests/checkpoint/test_resume.py; a whole launcher under a group SIGTERM:
tests/faults/test_stage_faults.py)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

from nemo_rlhf.checkpoint.signals import PREEMPTION_SIGNALS, preemption_signals_deferred
from nemo_rlhf.checkpoint.training_state import Preemption


def test_helpers_started_during_a_save_outlive_a_group_sigterm():
    """A helper process started inside the save (as megatron-core's writer starts its spawned
    results-queue manager) ignores SIGTERM until SIGKILL; the caller's mask is restored after."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    ctx = multiprocessing.get_context("spawn")
    with preemption_signals_deferred():
        helper = ctx.Process(target=time.sleep, args=(60,), daemon=True)
        helper.start()
        assert {signal.SIGTERM, signal.SIGUSR1} <= signal.pthread_sigmask(signal.SIG_BLOCK, [])
    try:
        for name in PREEMPTION_SIGNALS:
            os.kill(helper.pid, getattr(signal, name))
        helper.join(3)
        assert helper.is_alive() and helper.exitcode is None
    finally:
        helper.kill()
        helper.join(10)
    assert helper.exitcode == -signal.SIGKILL
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def test_the_callers_signal_arrives_after_the_save():
    """A SIGTERM to the saving thread during the save is not lost: its handler runs once the mask is
    restored, so the preemption flag is set for the next step boundary. (Sent to the thread: a
    signal to the process may be taken by another thread that does not block it, which is fine for
    the launcher, but would not test the deferral.)"""
    preemption = Preemption().install()
    try:
        with preemption_signals_deferred():
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
            time.sleep(0.1)
            assert preemption.requested is None
        time.sleep(0.1)
        assert preemption.requested == "SIGTERM"
    finally:
        preemption.uninstall()
