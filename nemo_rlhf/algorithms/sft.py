"""Supervised fine-tuning (SFT): next-token NLL on response tokens of prompt + chosen response.

``launchers/train_sft.py`` (config ``conf/gpt_sft.yaml``) calls :func:`run_sft`.
"""

from __future__ import annotations

from typing import Any

from nemo_rlhf.algorithms.supervised import SupervisedTrainer
from nemo_rlhf.config import SFTStageConfig, load_stage_config, to_plain
from nemo_rlhf.data import SFTDataset, collate_sft
from nemo_rlhf.models.policy import GPTPolicyModel, shift_labels
from nemo_rlhf.rl.losses import masked_token_nll
from nemo_rlhf.rl.masked import masked_sum


def sft_loss(mb, nll):
    """SFT loss of one micro-batch: mean NLL (nats/token) of the masked label tokens.

    Args:
        mb: ``label_mask [b, S]`` float (1 where ``labels[:, t] = tokens[:, t+1]`` is a response token).
        nll: ``[b, S]`` per-token negative log-likelihood of the labels (the policy's labels forward).

    Returns:
        ``(loss, {"loss", "nll_sum", "nll_count"})``; ``nll`` = sum/count over micro-batches and
        ranks (token-weighted) in the averaged metrics.
    """
    mask = mb["label_mask"]
    nll = nll.float()
    loss = masked_token_nll(-nll, mask)
    return loss, {"loss": loss.detach(), "nll_sum": masked_sum(nll.detach(), mask), "nll_count": mask.sum()}


class SFTTrainer(SupervisedTrainer):
    """Trains a :class:`~nemo_rlhf.models.policy.GPTPolicyModel` on HH prompt + chosen response
    (prompt tokens masked from the loss). Held-out metric: ``nll`` (nats/token) over
    ``trainer.limit_val_batches`` batches."""

    dataset_cls = SFTDataset
    collate_fn = staticmethod(collate_sft)

    def __init__(self, cfg: SFTStageConfig):
        super().__init__(cfg, "sft")

    def build_model(self, tokenizer) -> GPTPolicyModel:
        c = self.cfg
        return GPTPolicyModel(to_plain(c.model), to_plain(c.optim), tokenizer.vocab_size,
                              int(c.batch.micro_batch_size), tokenizer.eos_id, tokenizer.pad_id)

    def _labelled(self, batch):
        labels, mask = shift_labels(batch["tokens"], batch["loss_mask"], self.tokenizer.pad_id)
        return {"tokens": batch["tokens"], "labels": labels, "label_mask": mask}

    def train_step(self, batch) -> dict[str, float]:
        return self.model.train_on(sft_loss, self._labelled(batch))

    def evaluate(self, limit: int | None = None) -> dict[str, float]:
        limit = int(self.cfg.trainer.limit_val_batches)
        vals = [self.model.evaluate_on(sft_loss, self._labelled(b))["nll"]
                for _, b in zip(range(limit), self.val_loader)]
        return {"nll": float(sum(vals) / len(vals))}


def run_sft(cfg) -> dict[str, Any]:
    """Run the SFT stage from a Hydra config (see :class:`SFTTrainer`, :meth:`SupervisedTrainer.run`)."""
    trainer = SFTTrainer(load_stage_config(SFTStageConfig, cfg))
    return trainer.run_logged()
