"""Reward model: Bradley-Terry on preference pairs (Ouyang et al. 2022, eq. 1).

``launchers/train_reward_model.py`` (config ``conf/gpt_rm.yaml``) calls :func:`run_reward_model`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from nemo_rlhf.algorithms.supervised import SupervisedTrainer
from nemo_rlhf.config import RewardModelStageConfig, load_stage_config, to_plain
from nemo_rlhf.data import PreferenceDataset, collate_preference
from nemo_rlhf.data.tasks import preference_dataset
from nemo_rlhf.models.megatron_module import split_microbatches
from nemo_rlhf.models.reward_model import GPTRewardModel, pool_scores
from nemo_rlhf.rl.losses import bradley_terry_loss


def pair_microbatches(batch: Mapping[str, torch.Tensor], micro_batch_size: int) -> list[dict]:
    """Split a ``collate_preference`` batch (``tokens [2B, S]``: B chosen rows then their B
    rejected rows, ``lengths [2B]``, and any other ``[2B, ...]`` tensor in the same order, e.g.
    DPO's ``prompt_lengths`` and ``ref_logps``) into micro-batches that keep each pair together.

    Returns:
        dicts with every key of ``batch``: ``tokens [2m, S]`` (m chosen rows, then their m rejected
        rows), ``lengths [2m]``, ..., m = ``micro_batch_size`` pairs.

    Raises:
        ValueError: ``micro_batch_size`` does not divide B.
    """
    n = batch["tokens"].shape[0] // 2
    halves = {f"{k}\0{half}": v[:n] if half == "chosen" else v[n:]
              for k, v in batch.items() for half in ("chosen", "rejected")}
    return [
        {k: torch.cat([mb[f"{k}\0chosen"], mb[f"{k}\0rejected"]]) for k in batch}
        for mb in split_microbatches(halves, micro_batch_size)
    ]


def bradley_terry_step_loss(mb, out, pooling: str = "last"):
    """Bradley-Terry loss of one pair micro-batch (:func:`pair_microbatches`): the head output
    ``out [2m, S, 1]`` read at each row's last token (``pooling="mean"``: averaged over its
    tokens, :func:`~nemo_rlhf.models.reward_model.pool_scores`); metrics ``loss``, ``accuracy``,
    ``reward_chosen``, ``reward_rejected``."""
    r = pool_scores(out, mb["lengths"], pooling)
    m = r.shape[0] // 2
    loss, acc = bradley_terry_loss(r[:m], r[m:])
    return loss, {"loss": loss.detach(), "accuracy": acc.detach(),
                  "reward_chosen": r[:m].mean().detach(), "reward_rejected": r[m:].mean().detach()}


class RewardModelTrainer(SupervisedTrainer):
    """Trains a :class:`~nemo_rlhf.models.reward_model.GPTRewardModel` (initialised from
    ``init_from``, usually SFT; the head is new). Held-out metrics: pairwise ``accuracy`` and
    Bradley-Terry ``loss`` over every held-out pair that fills a batch, and the number of ``pairs``."""

    dataset_cls = PreferenceDataset
    collate_fn = staticmethod(collate_preference)
    skip_prefixes = ("output_layer.",)

    def __init__(self, cfg: RewardModelStageConfig):
        super().__init__(cfg, "rm")

    def make_dataset(self, pairs, tokenizer):
        """HH: :class:`PreferenceDataset`; IMDB: the reviews' last ``data.max_seq_len`` tokens
        (:func:`nemo_rlhf.data.tasks.preference_dataset`)."""
        return preference_dataset(self.cfg.data, pairs, tokenizer)

    def build_model(self, tokenizer) -> GPTRewardModel:
        c = self.cfg
        return GPTRewardModel(to_plain(c.model), to_plain(c.optim), tokenizer.vocab_size,
                              int(c.batch.micro_batch_size))

    def _loss_fn(self, mb, out):
        return bradley_terry_step_loss(mb, out, self.model.pooling)

    def train_step(self, batch) -> dict[str, float]:
        return self.model.train_on(self._loss_fn,
                                   pair_microbatches(batch, self.model.micro_batch_size))

    def evaluate(self, limit: int | None = None) -> dict[str, float]:
        from megatron.core import parallel_state

        mbs = self.model.micro_batch_size
        ms = [self.model.evaluate_on(self._loss_fn, pair_microbatches(b, mbs)) for b in self.val_loader]
        pairs = (sum(int(b["tokens"].shape[0]) // 2 for b in self.val_loader)
                 * parallel_state.get_data_parallel_world_size())
        return {"accuracy": sum(m["accuracy"] for m in ms) / len(ms),
                "loss": sum(m["loss"] for m in ms) / len(ms), "pairs": pairs}


def run_reward_model(cfg) -> dict[str, Any]:
    """Run the reward-model stage from a Hydra config (see :class:`RewardModelTrainer`)."""
    trainer = RewardModelTrainer(load_stage_config(RewardModelStageConfig, cfg))
    return trainer.run_logged()
