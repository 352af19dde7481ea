"""Reward model: GPT trunk + scalar head read at the last non-pad token; Bradley-Terry loss."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from nemo_rlhf.models.megatron_module import (
    MegatronGPTModule,
    average_metrics,
    position_ids_like,
    split_microbatches,
)
from nemo_rlhf.rl.losses import bradley_terry_loss


def gather_last_token(out: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``out [B, S, 1]`` head outputs -> ``[B]`` float32 values at index ``lengths - 1``.

    Raises:
        ValueError: a length < 1 or > S.
    """
    b, s = out.shape[0], out.shape[1]
    if bool((lengths < 1).any()) or bool((lengths > s).any()):
        raise ValueError(f"sequence lengths must be in [1, {s}], got {lengths.tolist()}")
    idx = (lengths.long() - 1).to(out.device)
    return out[torch.arange(b, device=out.device), idx, 0].float()


def pair_microbatches(batch: Mapping[str, torch.Tensor], micro_batch_size: int) -> list[dict]:
    """Split a preference batch into micro-batches that keep each pair together.

    Args:
        batch: ``chosen [B, S]``, ``rejected [B, S]``, ``chosen_length [B]``, ``rejected_length [B]``
            (same S for both: the collate pads them jointly).
        micro_batch_size: pairs per micro-batch.

    Returns:
        dicts with ``tokens [2m, S]`` (m chosen rows, then their m rejected rows) and
        ``lengths [2m]``.
    """
    pairs = {k: batch[k] for k in ("chosen", "rejected", "chosen_length", "rejected_length")}
    return [
        {"tokens": torch.cat([mb["chosen"], mb["rejected"]]),
         "lengths": torch.cat([mb["chosen_length"], mb["rejected_length"]])}
        for mb in split_microbatches(pairs, micro_batch_size)
    ]


def split_preference_batch(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn ``collate_preference`` output (``tokens [2B, S]`` chosen rows then rejected rows,
    ``lengths [2B]``) into ``chosen``/``rejected``/``chosen_length``/``rejected_length``."""
    n = batch["tokens"].shape[0] // 2
    return {"chosen": batch["tokens"][:n], "rejected": batch["tokens"][n:],
            "chosen_length": batch["lengths"][:n], "rejected_length": batch["lengths"][n:]}


class GPTRewardModel(MegatronGPTModule):
    """Bradley-Terry reward model (Ouyang et al. 2022, eq. 1): r(x, y) = head(h_{last token}).

    ``micro_batch_size`` counts pairs (each micro-batch runs 2 * micro_batch_size sequences).
    """

    def __init__(self, model_cfg: Mapping[str, Any], optim_cfg: Mapping[str, Any] | None,
                 vocab_size: int, micro_batch_size: int):
        super().__init__(model_cfg, optim_cfg, vocab_size, scalar_head=True)
        self.micro_batch_size = int(micro_batch_size)

    @staticmethod
    def _forward(model, mb):
        return model(mb["tokens"], position_ids_like(mb["tokens"]), None)

    @staticmethod
    def _loss(mb, out):
        r = gather_last_token(out, mb["lengths"])
        m = r.shape[0] // 2
        loss, acc = bradley_terry_loss(r[:m], r[m:])
        return loss, {"loss": loss.detach(), "accuracy": acc.detach(),
                      "reward_chosen": r[:m].mean().detach(), "reward_rejected": r[m:].mean().detach()}

    def train_batch(self, batch) -> dict[str, float]:
        """One optimizer step on a ``collate_preference`` batch; returns averaged metrics."""
        self.model.train()
        mbs = pair_microbatches(split_preference_batch(batch), self.micro_batch_size)
        outs = self.forward_backward(mbs, self._forward, self._loss, forward_only=False)
        metrics = average_metrics(outs)
        metrics.update(self.optimizer_step_())
        return metrics

    def training_step(self, batch, batch_idx):
        metrics = self.train_batch(batch)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, on_step=True, batch_size=1)

    @torch.no_grad()
    def evaluate_batch(self, batch) -> dict[str, float]:
        """Mean BT loss and pairwise accuracy of a ``collate_preference`` batch (forward only)."""
        self.model.eval()
        mbs = pair_microbatches(split_preference_batch(batch), self.micro_batch_size)
        return average_metrics(self.forward_backward(mbs, self._forward, self._loss, forward_only=True))

    def validation_step(self, batch, batch_idx):
        m = self.evaluate_batch(batch)
        n = int(batch["tokens"].shape[0] // 2)
        self.log("val/accuracy", m["accuracy"], on_epoch=True, batch_size=n)
        self.log("val/loss", m["loss"], on_epoch=True, batch_size=n)

    @torch.no_grad()
    def score(self, tokens: torch.Tensor, lengths: torch.Tensor, micro_batch_size: int | None = None) -> torch.Tensor:
        """Reward-model scores ``[B]`` float32 of right-padded ``tokens [B, S]`` (forward only).

        Every rank returns the scores (broadcast from the last pipeline stage).
        """
        self.model.eval()
        mbs = split_microbatches({"tokens": tokens, "lengths": lengths},
                                 micro_batch_size or tokens.shape[0])
        outs = self.forward_backward(
            mbs, self._forward, lambda mb, out: (out.sum() * 0, {"r": gather_last_token(out, mb["lengths"])}),
            forward_only=True)
        from nemo_rlhf.models.pipeline_utils import broadcast_from_last_stage

        r = torch.cat([o["r"] for o in outs]) if outs else None
        return broadcast_from_last_stage(r, (tokens.shape[0],), torch.float32)
