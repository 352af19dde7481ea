"""nemo_rlhf/algorithms/sft.py and supervised.py: the SFT trainer's loss and its start-up checks."""

from __future__ import annotations

import pytest
import torch

from nemo_rlhf.algorithms.sft import SFTTrainer, sft_loss
from nemo_rlhf.config import ConfigError, SFTStageConfig, parse_config


def test_sft_loss_is_the_token_mean_nll_of_the_masked_labels():
    nll = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    loss, metrics = sft_loss({"label_mask": mask}, nll)
    assert loss.item() == pytest.approx((2 + 3 + 5) / 3)
    assert metrics["nll_sum"].item() == 10.0 and metrics["nll_count"].item() == 3.0


def test_heldout_split_smaller_than_one_batch_is_refused_before_the_model(megatron_world, tmp_path):
    """The issue's example: `train_sft.py trainer.max_steps=2 data.max_rows=200` used to die with a
    ZeroDivisionError in evaluation after building the model; now set-up refuses it in one line
    naming both numbers and the keys to change."""
    cfg = parse_config(SFTStageConfig, {"run_dir": str(tmp_path), "trainer": {"max_steps": 2},
                                        "data": {"max_rows": 200}, "tokenizer": {"vocab_size": 300}})
    trainer = SFTTrainer(cfg)
    with pytest.raises(ConfigError, match=r"held-out split has \d+ samples but one evaluation batch needs "
                                          r"batch.global_batch_size=16.*data.max_rows \(now 200\)") as err:
        trainer.setup()
    assert "\n" not in str(err.value)
    assert trainer.model is None  # nothing was built
