"""SFT: causal-LM loss on response tokens only (prompt tokens masked)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from nemo_rlhf.models.megatron_module import MegatronGPTModule, position_ids_like, split_microbatches


def shift_labels(tokens: torch.Tensor, loss_mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token labels: ``labels[:, t] = tokens[:, t+1]``; the mask moves with them.

    Args:
        tokens: ``[B, S]`` int64.
        loss_mask: ``[B, S]`` float, 1 on tokens that count (response tokens and EOS).

    Returns:
        labels ``[B, S]`` int64 (last column = pad_id) and label mask ``[B, S]`` float32 (last
        column 0): position t is trained to predict token t+1 when token t+1 is a response token.
    """
    labels = torch.full_like(tokens, pad_id)
    labels[:, :-1] = tokens[:, 1:]
    mask = torch.zeros_like(loss_mask, dtype=torch.float32)
    mask[:, :-1] = loss_mask[:, 1:].float()
    return labels, mask


class GPTSFTModel(MegatronGPTModule):
    """Supervised fine-tuning of a megatron GPT on prompt + response samples.

    Batches are ``{"tokens": [B, S] int64, "loss_mask": [B, S] float}`` (right padded), with B the
    per-DP-rank global batch; ``micro_batch_size`` splits it for the pipeline schedule.
    The loss is the mean token NLL (nats/token) over masked response tokens of each micro-batch.
    """

    def __init__(self, model_cfg: Mapping[str, Any], optim_cfg: Mapping[str, Any] | None,
                 vocab_size: int, micro_batch_size: int, pad_id: int):
        super().__init__(model_cfg, optim_cfg, vocab_size)
        self.micro_batch_size = int(micro_batch_size)
        self.pad_id = int(pad_id)

    def _prepare(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labels, mask = shift_labels(batch["tokens"], batch["loss_mask"], self.pad_id)
        return {"tokens": batch["tokens"], "labels": labels, "label_mask": mask}

    @staticmethod
    def _forward(model, mb):
        return model(mb["tokens"], position_ids_like(mb["tokens"]), None, labels=mb["labels"])

    @staticmethod
    def _loss(mb, nll):
        mask = mb["label_mask"]
        total = (nll.float() * mask).sum()
        count = mask.sum()
        loss = total / count.clamp(min=1.0)
        return loss, {"loss": loss.detach(), "nll_sum": total.detach(), "nll_count": count.detach()}

    def training_step(self, batch, batch_idx):
        metrics = self.train_global_batch(self._prepare(batch), self.micro_batch_size,
                                          self._forward, self._loss)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, on_step=True, batch_size=1)
        return None

    @torch.no_grad()
    def evaluate_batch(self, batch) -> dict[str, float]:
        """Token-weighted NLL of a batch (forward only); keys ``nll`` and ``loss``."""
        from nemo_rlhf.models.megatron_module import average_metrics

        self.model.eval()
        mbs = split_microbatches(self._prepare(batch), self.micro_batch_size)
        return average_metrics(self.forward_backward(mbs, self._forward, self._loss, forward_only=True))

    def validation_step(self, batch, batch_idx):
        m = self.evaluate_batch(batch)
        self.log("val/loss", m["nll"], on_epoch=True, batch_size=int(batch["tokens"].shape[0]))
