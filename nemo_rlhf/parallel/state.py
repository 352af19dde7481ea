"""Process-group and megatron parallel-state set-up, identical on CPU (gloo) and GPU (NCCL).

The world is read from the launcher's environment, in this order:
``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``), SLURM ``srun``
(``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; the master address is the first host of
``SLURM_JOB_NODELIST`` unless ``MASTER_ADDR`` is set), otherwise a single process on loopback.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from nemo_rlhf.parallel import cpu_compat


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job: global rank, world size, local rank (per node)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    # "node[001-004,007],other" -> "node001"; "a,b" -> "a"
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.rstrip("]").split(",")[0].split("-")[0]
        return prefix + first
    return head


def read_dist_env() -> DistEnv:
    """Read rank/world size from torchrun or SLURM variables; a lone process otherwise."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        port = int(env.get("MASTER_PORT", 29500 + int(env.get("SLURM_JOB_ID", "0")) % 10000))
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                       int(env.get("SLURM_LOCALID", 0)), addr, port)
    return DistEnv(0, 1, 0, "127.0.0.1", _free_port())


def initialize_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    accelerator: str = "cpu",
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> DistEnv:
    """Create the default process group and megatron's TP/PP/DP groups, and seed every RNG.

    On ``accelerator="cpu"`` the gloo backend is used and :mod:`nemo_rlhf.parallel.cpu_compat` is
    activated; on ``"gpu"`` NCCL is used, the CUDA device is set from the local rank and nothing is
    patched. Calling it again with the same layout is a no-op.

    Args:
        tensor_model_parallel_size: TP size.
        pipeline_model_parallel_size: PP size. DP = world_size / (TP * PP).
        accelerator: ``"cpu"`` or ``"gpu"``.
        seed: base seed; megatron derives the TP-rank seeds from it
            (``model_parallel_cuda_manual_seed``).
        timeout_minutes: collective timeout.

    Raises:
        ValueError: bad accelerator, or a world size that TP*PP does not divide.
    """
    from megatron.core import parallel_state, tensor_parallel

    if accelerator not in ("cpu", "gpu"):
        raise ValueError(f"trainer.accelerator must be 'cpu' or 'gpu', got {accelerator!r}")
    dist = read_dist_env()
    mp = tensor_model_parallel_size * pipeline_model_parallel_size
    if dist.world_size % mp != 0:
        raise ValueError(
            f"world size {dist.world_size} is not divisible by tensor_model_parallel_size "
            f"({tensor_model_parallel_size}) * pipeline_model_parallel_size "
            f"({pipeline_model_parallel_size}) = {mp}"
        )
    if accelerator == "cpu":
        cpu_compat.activate()
        backend = "gloo"
    else:
        torch.cuda.set_device(dist.local_rank)
        backend = "nccl"

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=backend,
            init_method=f"tcp://{dist.master_addr}:{dist.master_port}",
            rank=dist.rank,
            world_size=dist.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if parallel_state.model_parallel_is_initialized():
        same = (parallel_state.get_tensor_model_parallel_world_size() == tensor_model_parallel_size
                and parallel_state.get_pipeline_model_parallel_world_size()
                == pipeline_model_parallel_size)
        if not same:
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            distributed_timeout_minutes=timeout_minutes,
        )
    seed_everything(seed)
    return dist


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and megatron's TP-aware RNG tracker (different per PP stage)."""
    import random

    import numpy as np
    from megatron.core import parallel_state, tensor_parallel

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def destroy_distributed() -> None:
    """Tear down megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def comm_device() -> torch.device:
    """Device of tensors passed to collectives: the current CUDA device under NCCL, else CPU."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank iff ``flag`` is true on at least one rank of the world (one all-reduce
    over the default group; every rank must call it). Without torch.distributed: ``flag``."""
    if not torch.distributed.is_initialized():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=comm_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def is_rank_zero() -> bool:
    """True on global rank 0, or when torch.distributed is not initialised."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def setup_parallel(model_cfg: Mapping[str, Any], world_batch: tuple[int, int], accelerator: str,
                   seed: int) -> int:
    """Validate the layout, then initialise torch.distributed and megatron's groups.

    Args:
        model_cfg: the ``model:`` section (TP/PP sizes, heads, layers, ...).
        world_batch: ``(global_batch_size, micro_batch_size)``.
        accelerator: ``"cpu"`` (gloo) or ``"gpu"`` (NCCL).
        seed: base seed (:func:`seed_everything`).

    Returns:
        the data-parallel size.

    Raises:
        LayoutError: every violation of the layout, in one message.
    """
    from nemo_rlhf.parallel.layout import validate_layout

    gbs, mbs = world_batch
    dp = validate_layout(model_cfg, read_dist_env().world_size, gbs, mbs)
    initialize_distributed(int(model_cfg.get("tensor_model_parallel_size", 1) or 1),
                           int(model_cfg.get("pipeline_model_parallel_size", 1) or 1),
                           accelerator=accelerator, seed=int(seed))
    return dp
