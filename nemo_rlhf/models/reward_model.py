"""Reward model: GPT trunk + scalar head read at the last non-pad token (or averaged over the tokens)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from nemo_rlhf.models.megatron_module import MegatronGPTModule, split_microbatches
from nemo_rlhf.models.pipeline_utils import broadcast_from_last_stage


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


def pool_scores(out: torch.Tensor, lengths: torch.Tensor, pooling: str = "last") -> torch.Tensor:
    """Read a scalar head's per-token outputs ``out [B, S, 1]`` as one score per sequence ``[B]``
    float32: ``last`` at index ``lengths - 1`` (:func:`gather_last_token`), ``mean`` averaged over
    positions ``< lengths`` (padding excluded).

    Raises:
        ValueError: a length < 1 or > S, or an unknown ``pooling``.
    """
    if pooling == "last":
        return gather_last_token(out, lengths)
    if pooling != "mean":
        raise ValueError(f"reward pooling must be 'last' or 'mean', got {pooling!r}")
    b, s = out.shape[0], out.shape[1]
    if bool((lengths < 1).any()) or bool((lengths > s).any()):
        raise ValueError(f"sequence lengths must be in [1, {s}], got {lengths.tolist()}")
    lengths = lengths.to(out.device)
    mask = (torch.arange(s, device=out.device)[None, :] < lengths[:, None]).to(out.dtype)
    return ((out[..., 0] * mask).sum(dim=1) / lengths.to(out.dtype)).float()


class GPTRewardModel(MegatronGPTModule):
    """Scalar reward model r(x, y) = head(h_{last token}) (Ouyang et al. 2022, eq. 1), or with
    ``model.reward_pooling: mean`` the head's outputs averaged over the sequence.

    What a trainer may call: :meth:`score`, :meth:`pool`, and :meth:`train_on` /
    :meth:`evaluate_on` with a pairwise loss (the Bradley-Terry trainer passes micro-batches of
    ``tokens [2m, S]``: m chosen rows then their m rejected rows, and reads :meth:`pool` of the
    ``[2m, S, 1]`` output). ``micro_batch_size`` counts pairs.
    """

    def __init__(self, model_cfg: Mapping[str, Any], optim_cfg: Mapping[str, Any] | None,
                 vocab_size: int, micro_batch_size: int):
        super().__init__(model_cfg, optim_cfg, vocab_size, micro_batch_size, scalar_head=True)
        self.pooling = str(model_cfg.get("reward_pooling") or "last")

    def pool(self, out: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Scores ``[B]`` from the head's ``out [B, S, 1]`` (:func:`pool_scores`, this model's pooling)."""
        return pool_scores(out, lengths, self.pooling)

    @torch.no_grad()
    def score(self, tokens: torch.Tensor, lengths: torch.Tensor, micro_batch_size: int | None = None) -> torch.Tensor:
        """Reward-model scores ``[B]`` float32 of right-padded ``tokens [B, S]`` (forward only).

        Every rank returns the scores (broadcast from the last pipeline stage).
        """
        self.model.eval()
        mbs = split_microbatches({"tokens": tokens, "lengths": lengths},
                                 micro_batch_size or tokens.shape[0])
        outs = self.forward_backward(
            mbs, self.forward_step, lambda mb, out: (out.sum() * 0, {"r": self.pool(out, mb["lengths"])}),
            forward_only=True)
        r = torch.cat([o["r"] for o in outs]) if outs else None
        return broadcast_from_last_stage(r, (tokens.shape[0],), torch.float32)
