"""nemo_rlhf/rl/rejection.py: rejection-sampling selection and the best-of-n curve, on fixed scores."""

from __future__ import annotations

import pytest
import torch

from nemo_rlhf.rl.rejection import best_of_n_curve, best_of_n_index, select_best, select_threshold

SCORES = torch.tensor([[0.1, 0.9, 0.3, 0.9],    # tie: the first maximum (column 1)
                       [-2.0, -1.0, -3.0, -5.0],
                       [0.5, 0.5, 0.5, 0.5]])  # all equal: column 0


def test_select_best_keeps_the_argmax_of_each_prompt():
    keep = select_best(SCORES)
    assert keep.dtype == torch.bool and keep.shape == (3, 4)
    assert keep.sum(dim=1).tolist() == [1, 1, 1]
    assert keep.nonzero().tolist() == [[0, 1], [1, 1], [2, 0]]


def test_select_threshold_keeps_every_score_at_or_above():
    keep = select_threshold(SCORES, 0.5)
    assert keep.tolist() == [[False, True, False, True], [False] * 4, [True] * 4]
    assert not select_threshold(SCORES, 10.0).any()


def test_best_of_n_curve_by_hand():
    # prompt 0: blocks of 2 -> max(0.1, 0.9), max(0.3, 0.9) = 0.9, 0.9; prompt 1: -1, -3; prompt 2: 0.5, 0.5
    curve = best_of_n_curve(SCORES, [1, 2, 4])
    assert curve[1] == pytest.approx(SCORES.double().mean().item())
    assert curve[2] == pytest.approx((0.9 + 0.9 - 1.0 - 3.0 + 0.5 + 0.5) / 6)
    assert curve[4] == pytest.approx((0.9 - 1.0 + 0.5) / 3)
    assert curve[1] <= curve[2] <= curve[4]
    assert best_of_n_index(SCORES, 2).tolist() == [[1, 3], [1, 2], [0, 2]]


def test_errors():
    with pytest.raises(ValueError, match=r"n=3 must be >= 1 and divide the 4 samples"):
        best_of_n_curve(SCORES, [3])
    with pytest.raises(ValueError, match=r"non-finite"):
        select_best(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"\[P, N\]"):
        select_threshold(torch.zeros(4), 0.0)
    with pytest.raises(ValueError, match=r"threshold must be finite"):
        select_threshold(SCORES, float("inf"))
