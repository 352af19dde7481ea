"""Run a script on N local ranks as torchrun does, forking the ranks after one shared import.

    python tests/multiprocess/fork_launch.py --nproc-per-node 2 --master-port 29500 SCRIPT [ARGS...]

Each rank runs ``SCRIPT`` as ``__main__`` (``sys.argv = [SCRIPT, *ARGS]``, the script's folder first
on ``sys.path``) with torchrun's variables set: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``MASTER_ADDR`` (127.0.0.1), ``MASTER_PORT``. As with torchrun,
when a rank fails the others are stopped and the exit status is the first failure's; ranks die with
the launcher (``PR_SET_PDEATHSIG``), and each rank's process group (the rank and the helpers it
started, such as dist_checkpointing's writer processes) is killed when the rank ends, so no process
outlives the launcher or keeps the caller's output pipe open.

Why not torchrun itself: every rank it starts imports torch, megatron-core and Lightning anew,
about 6 s of CPU per rank on the 2-core CI machine, which made up most of the cost of the
multi-process tests (~60 ranks per CI run). Here they are imported once, before the fork, and the
ranks share them. The parent has started no threads when it forks (checked), and one OpenMP thread
per rank (``OMP_NUM_THREADS=1``) means no OpenMP pool exists to be broken by the fork.
``tests/multiprocess/torchrun_helper.py`` uses this launcher unless ``NEMO_RLHF_TEST_TORCHRUN=1``;
the real torchrun stays under test in ``tests/multiprocess/test_critic_server_tp.py`` (its server
ranks) and in that mode.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import runpy
import signal
import sys
import threading
import traceback


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent (the launcher) exits (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def _kill_group(pgid: int) -> None:
    """SIGKILL the process group of a rank (the rank and whatever it started), if any is left."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _run_rank(rank: int, nproc: int, port: int, script: str, args: list[str]) -> int:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported like torchrun's ranks do, then exit 1
        lines = traceback.format_exc().splitlines()
        sys.stderr.write("".join(f"[rank{rank}]: {line}\n" for line in lines))
        return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc-per-node", type=int, required=True)
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    # The heavy imports every rank of these tests makes, once (the reason for this launcher).
    import lightning.pytorch  # noqa: F401
    import megatron.core  # noqa: F401
    import torch  # noqa: F401

    import nemo_rlhf.algorithms.ppo  # noqa: F401
    import nemo_rlhf.checkpoint.training_state  # noqa: F401

    if threading.active_count() != 1:
        raise RuntimeError(f"fork_launch: {threading.active_count()} threads before the fork; fork needs one")
    sys.stdout.flush()
    sys.stderr.flush()
    ranks: dict[int, int] = {}
    for rank in range(a.nproc_per_node):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setpgid(0, 0)  # its own process group: its helpers (checkpoint writers) end with it
                _die_with_parent()
                code = _run_rank(rank, a.nproc_per_node, a.master_port, a.script, a.args)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        ranks[pid] = rank
    status = 0
    while ranks:
        pid, wait_status = os.wait()
        rank = ranks.pop(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        _kill_group(pid)  # e.g. dist_checkpointing's multiprocessing workers, which keep our stdout open
        if code != 0 and status == 0:
            status = code if code > 0 else 1
            sys.stderr.write(f"[fork_launch] rank {rank} exited with {code}; stopping the other ranks\n")
            for other in ranks:
                _kill_group(other)
    return status


if __name__ == "__main__":
    sys.exit(main())
