"""Running the launchers from tests at the smallest size (helpers for tests/conftest.py and the
checkpoint, fault and integration tests; a plain module, imported as ``stage_runs`` because
tests/ is on ``sys.path`` through the root conftest).

Every launcher run is a process, forked from one pre-imported server per pytest worker
(``tests/fork_server.py``) so that it does not import megatron-core and Lightning again; the tests
still start as few of them as they can and share the trained SFT and reward-model runs of
``tests/conftest.py`` (one of each per test session).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
from pathlib import Path

import fork_server

REPO = Path(__file__).resolve().parents[1]
# Subprocesses: one intra-op thread (the models are tiny; threads only contend on 2 cores).
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

# The launchers' smallest model (1 layer, H = 32) and data (600 HH rows, 128 tokens), for every
# test that runs a stage; the session fixtures of tests/conftest.py are trained with exactly these.
MODEL = ["model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64",
         "model.max_position_embeddings=128"]
DATA = ["data.max_rows=600", "data.max_seq_len=128", "data.max_prompt_len=96"]
SMALL = [*DATA, "trainer.val_check_interval=1000", "trainer.limit_val_batches=1",
         "trainer.log_every_n_steps=1", *MODEL, "tokenizer.vocab_size=512", "checkpoint.every_n_steps=0"]
# Model arguments of the checkpoints written with MODEL (for loading them in-process).
MODEL_CFG = dict(num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                 max_position_embeddings=128)
VOCAB = 512


def launch(script: str, *args: str, wait: bool = True, timeout: float = 600, start_new_session: bool = False):
    """``python launchers/<script> *args``; waits and asserts exit status 0 unless ``wait=False``
    (then returns the ``Popen``, stdout and stderr merged into ``proc.stdout``; ``start_new_session``:
    in its own session, so ``os.killpg(proc.pid, sig)`` signals it and its helpers as SLURM would)."""
    cmd = [sys.executable, str(REPO / "launchers" / script), *args]
    if not wait:
        return fork_server.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                                 start_new_session=start_new_session)
    proc = fork_server.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_stage(launcher: str, run_dir: Path, *overrides: str, wait: bool = True):
    """A stage launcher at the SMALL size writing into ``run_dir`` (see :func:`launch`)."""
    return launch(launcher, f"run_dir={run_dir}", *SMALL, *overrides, wait=wait)


def rm_init(sft_run: Path) -> list[str]:
    """Overrides that start a reward-model or PPO run from the SFT run directory ``sft_run``."""
    return [f"init_from={sft_run / 'sft_weights'}", f"tokenizer.path={sft_run / 'tokenizer.json'}"]


def start_stage(launcher: str, run_dir: Path, *overrides: str, log: Path):
    """:func:`run_stage` in the background, its output going to ``log`` (a file: an unread pipe
    would block it). Finish it with :func:`finish`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        return fork_server.popen([sys.executable, str(REPO / "launchers" / launcher), f"run_dir={run_dir}", *SMALL,
                                  *overrides], stdout=out, stderr=subprocess.STDOUT, text=True, env=ENV)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    """Wait for a :func:`start_stage` process, assert exit status 0, return its output."""
    proc.wait(timeout=timeout)
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    return out


def losses(run_dir: Path, stage: str) -> dict[int, float]:
    """``{step: train/loss}`` of ``stage`` in ``<run_dir>/metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return {r["step"]: r["train/loss"] for r in rows if r["stage"] == stage and "train/loss" in r}


def critic_server_cmd(rm_weights: Path, tokenizer: Path, ports: list[int], *extra: str) -> list[str]:
    """The critic server launcher at the SMALL model size on ``ports`` (HTTP, gRPC, metrics), with
    one intra-op thread like the launchers the tests start (``env`` execs it: same pid)."""
    http, grpc, metrics = ports
    return ["env", "OMP_NUM_THREADS=1", sys.executable, str(REPO / "launchers" / "serve_critic.py"),
            f"reward_model_path={rm_weights}", f"tokenizer.path={tokenizer}", f"server.port={http}",
            f"server.grpc_port={grpc}", f"server.metrics_port={metrics}", "batch.global_batch_size=8",
            "batch.micro_batch_size=4", *MODEL, *extra]


def start_servers(cmds: list[tuple[list[str], int, Path]], ready_timeout_s: float = 300):
    """Start critic servers ``(cmd, http_port, log_path)`` at once, without waiting for them: their
    imports overlap with each other and with the actor runs a test starts meanwhile (a client
    waits for its server through ``critic.init_timeout_s``).

    Returns one future per server resolving to its ``ServerProcess`` once it is ready.
    """
    from nemo_rlhf.servers.process import start_server_process

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(cmds))
    futures = [pool.submit(start_server_process, cmd, "127.0.0.1", port, ready_timeout_s, log)
               for cmd, port, log in cmds]
    pool.shutdown(wait=False)
    return futures


def stop_servers(futures) -> None:
    """Stop every server of :func:`start_servers` (waiting for any still starting)."""
    for f in futures:
        try:
            server = f.result(timeout=600)
        except Exception:  # noqa: BLE001 - never became ready: start_server_process stopped it
            continue
        server.stop()
