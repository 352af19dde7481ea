"""Tests for nemo_rlhf.rl.masked: hand-computed masked reductions and DP whitening over gloo."""

from __future__ import annotations

import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nemo_rlhf.rl import masked_mean, masked_sum, masked_var, masked_whiten

NAN = float("nan")
# Valid values 1..5 in two right-padded rows; padding holds garbage (inf / nan / 100).
VALUES = torch.tensor([[1.0, 2.0, 3.0, float("inf")], [4.0, 5.0, NAN, 100.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def test_masked_sum_and_mean_ignore_padding_garbage():
    assert masked_sum(VALUES, MASK).item() == 15.0
    assert masked_mean(VALUES, MASK).item() == 3.0  # 15 / 5
    torch.testing.assert_close(masked_sum(VALUES, MASK, dim=1), torch.tensor([6.0, 9.0]))
    torch.testing.assert_close(masked_mean(VALUES, MASK, dim=1), torch.tensor([2.0, 4.5]))
    # per-column mean over columns 0..2 with a bool mask: (1+4)/2, (2+5)/2, 3/1
    out = masked_mean(VALUES[:, :3], MASK[:, :3].bool(), dim=0)
    torch.testing.assert_close(out, torch.tensor([2.5, 3.5, 3.0]))
    # Per-column mean: columns 0..2 are non-empty, column 3 is empty -> error (mean undefined).
    with pytest.raises(ValueError, match="dim=0"):
        masked_mean(VALUES, MASK, dim=0)


def test_masked_mean_gradient_is_finite_and_zero_at_padding():
    x = VALUES.clone().requires_grad_(True)
    masked_mean(x, MASK).backward()
    torch.testing.assert_close(x.grad, MASK.float() / 5)


def test_masked_var_hand_computed():
    # mean 3, squared deviations 4 1 0 1 4 -> sum 10; biased 10/5 = 2, unbiased 10/4 = 2.5
    assert masked_var(VALUES, MASK, unbiased=False).item() == pytest.approx(2.0)
    assert masked_var(VALUES, MASK).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(torch.tensor([[7.0, 1.0]]), torch.tensor([[1, 0]]))


def test_masked_whiten_hand_computed():
    out = masked_whiten(VALUES, MASK)
    s = math.sqrt(2.0 + 1e-8)  # biased variance 2
    expected = torch.tensor([[-2 / s, -1 / s, 0.0, 0.0], [1 / s, 2 / s, 0.0, 0.0]])
    torch.testing.assert_close(out, expected)
    out = masked_whiten(VALUES, MASK, shift_mean=False)
    expected_shift = torch.tensor([[3 - 2 / s, 3 - 1 / s, 3.0, 0.0], [3 + 1 / s, 3 + 2 / s, 0.0, 0.0]])
    torch.testing.assert_close(out, expected_shift)


def test_masked_whiten_half_precision_and_float64():
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)) * 4 + 10
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    ref = masked_whiten(x.double(), mask)
    assert ref.dtype == torch.float64
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = masked_whiten(x.to(dtype), mask)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, atol=0.05, rtol=0.02)
    # whitened valid entries: mean 0, biased std 1
    assert masked_mean(ref, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(ref, mask, unbiased=False).item() == pytest.approx(1.0, abs=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="no element"):
        masked_whiten(VALUES, torch.zeros_like(MASK))
    with pytest.raises(ValueError, match="no element"):
        masked_mean(VALUES, torch.zeros_like(MASK))
    with pytest.raises(ValueError, match="values and mask must have the same shape"):
        masked_sum(VALUES, MASK[:, :3])
    with pytest.raises(TypeError, match="values must be a floating-point tensor"):
        masked_mean(torch.ones(2, 4, dtype=torch.long), MASK)
    with pytest.raises(RuntimeError, match="not initialized"):
        masked_whiten(VALUES, MASK, group=object())


# ---------------------------------------------------------------- data-parallel whitening (gloo)

RANK_BATCHES = [
    # rank 0: 2 rows of different lengths
    (torch.tensor([[1.0, -2.0, 3.5], [0.5, 9.0, 9.0]]), torch.tensor([[1, 1, 1], [1, 0, 0]])),
    # rank 1: 3 rows, one empty
    (torch.tensor([[4.0, 4.0, 0.0], [-1.0, 2.0, 6.0], [7.0, 7.0, 7.0]]),
     torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _whiten_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        values, mask = RANK_BATCHES[rank]
        group = dist.new_group(ranks=list(range(world_size)))
        results = {
            "whiten": masked_whiten(values, mask, group=group),
            "whiten_noshift": masked_whiten(values, mask, shift_mean=False, group=group),
            # rank 1 contributes nothing: the global statistics are rank 0's alone
            "rank0_only": masked_whiten(values, mask if rank == 0 else torch.zeros_like(mask), group=group),
        }
        try:  # globally empty: every rank must raise (and none hang)
            masked_whiten(values, torch.zeros_like(mask), group=group)
            results["empty_raised"] = False
        except ValueError:
            results["empty_raised"] = True
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parallel
def test_masked_whiten_over_group_equals_concatenated_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    world_size = 2
    mp.spawn(_whiten_worker, args=(world_size, _free_port(), str(tmp_path)), nprocs=world_size, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]

    # Reference: one process whitening the concatenated (right-padded to T=3) batch.
    all_values = torch.cat([v for v, _ in RANK_BATCHES])
    all_mask = torch.cat([m for _, m in RANK_BATCHES])
    ref = masked_whiten(all_values, all_mask)
    ref_noshift = masked_whiten(all_values, all_mask, shift_mean=False)
    rank0_alone = masked_whiten(*RANK_BATCHES[0])
    for r in range(world_size):
        rows = slice(0, 2) if r == 0 else slice(2, 5)
        torch.testing.assert_close(results[r]["whiten"], ref[rows])
        torch.testing.assert_close(results[r]["whiten_noshift"], ref_noshift[rows])
        assert results[r]["empty_raised"] is True
    torch.testing.assert_close(results[0]["rank0_only"], rank0_alone)
    assert torch.equal(results[1]["rank0_only"], torch.zeros(3, 3))

    # Hand check of the global statistics: valid values 1,-2,3.5,0.5,4,4,-1,2,6 (n=9).
    valid = torch.tensor([1.0, -2.0, 3.5, 0.5, 4.0, 4.0, -1.0, 2.0, 6.0])
    mean, var = valid.mean(), valid.var(unbiased=False)
    torch.testing.assert_close(results[0]["whiten"][0, 0], (1.0 - mean) / torch.sqrt(var + 1e-8))
