"""Helper for the multi-process tests: run a module under torchrun on loopback (imported by the
tests of this directory as `from torchrun_helper import torchrun`; not a conftest, so that its
name cannot collide with the other directories' conftest modules)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from nemo_rlhf.servers.process import find_free_ports
from nemo_rlhf.utils.hydra import quiet_warnings

quiet_warnings()
REPO = Path(__file__).resolve().parents[2]


FORK_LAUNCH = Path(__file__).with_name("fork_launch.py")


def torchrun(nproc: int, module_args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``SCRIPT ARGS...`` (``module_args``) on ``nproc`` ranks on loopback, one thread per rank:
    through ``fork_launch.py`` (torchrun's variables, one shared import of torch/megatron/Lightning
    for all ranks), or through ``python -m torch.distributed.run`` itself when the environment sets
    ``NEMO_RLHF_TEST_TORCHRUN=1``."""
    port = find_free_ports(1)[0]
    if os.environ.get("NEMO_RLHF_TEST_TORCHRUN") == "1":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={port}", "--master-addr=127.0.0.1", *module_args]
    else:
        cmd = [sys.executable, str(FORK_LAUNCH), f"--nproc-per-node={nproc}", f"--master-port={port}", *module_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc
