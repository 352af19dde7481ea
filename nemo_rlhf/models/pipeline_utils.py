"""Moving results of the last pipeline stage to every rank."""

from __future__ import annotations

import torch


def broadcast_from_last_stage(tensor: torch.Tensor | None, shape: tuple[int, ...],
                              dtype: torch.dtype) -> torch.Tensor:
    """Broadcast ``tensor`` (present on the last PP stage only) to all stages of this PP group.

    Args:
        tensor: the tensor on the last stage; ignored (may be None) elsewhere.
        shape, dtype: what every rank receives.

    Returns:
        the tensor, on every rank of the pipeline group. With PP = 1 it is returned unchanged.
    """
    from megatron.core import parallel_state

    from nemo_rlhf.parallel.state import comm_device

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return tensor
    if parallel_state.is_pipeline_last_stage():
        buf = tensor.to(device=comm_device(), dtype=dtype).contiguous()
    else:
        buf = torch.empty(shape, dtype=dtype, device=comm_device())
    torch.distributed.broadcast(buf, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                group=parallel_state.get_pipeline_model_parallel_group())
    return buf
