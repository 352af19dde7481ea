"""A stateless, resumable batch sampler: the batch of global step k depends only on (seed, k)."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class StepBatchSampler(Sampler[list[int]]):
    """Yields this DP rank's sample indices for global steps ``start_step .. end_step - 1``.

    Step k belongs to epoch ``e = k // steps_per_epoch``; the epoch's order is a permutation drawn
    from ``torch.Generator().manual_seed(seed + e)`` (identity when ``shuffle=False``); step k takes
    the k-th slice of ``global_batch_size`` samples (the last incomplete slice of an epoch is
    dropped) and DP rank r its r-th share. A run resumed at step k therefore sees exactly the
    batches an uninterrupted run would have seen.

    Raises:
        ValueError: fewer samples than one global batch, or a global batch not divisible by DP.
    """

    def __init__(self, num_samples: int, global_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 start_step: int, end_step: int, shuffle: bool = True):
        if global_batch_size % dp_size:
            raise ValueError(f"global batch {global_batch_size} is not divisible by data-parallel size {dp_size}")
        if num_samples < global_batch_size:
            raise ValueError(f"{num_samples} samples are fewer than one global batch of {global_batch_size}")
        self.n, self.gbs, self.seed, self.shuffle = num_samples, global_batch_size, seed, shuffle
        self.per_rank = global_batch_size // dp_size
        self.dp_rank = dp_rank
        self.start, self.end = int(start_step), int(end_step)
        self.steps_per_epoch = num_samples // global_batch_size

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __iter__(self) -> Iterator[list[int]]:
        epoch, order = None, None
        for k in range(self.start, self.end):
            e, i = divmod(k, self.steps_per_epoch)
            if e != epoch:
                epoch, order = e, self._order(e)
            batch = order[i * self.gbs : (i + 1) * self.gbs]
            yield batch[self.dp_rank * self.per_rank : (self.dp_rank + 1) * self.per_rank].tolist()

    def __len__(self) -> int:
        return max(self.end - self.start, 0)
