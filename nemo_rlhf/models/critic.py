"""Critic: GPT trunk + per-token value head, clipped value loss; and the server backend for it."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch

from nemo_rlhf.models.megatron_module import (
    MegatronGPTModule,
    position_ids_like,
    split_microbatches,
)
from nemo_rlhf.models.pipeline_utils import broadcast_from_last_stage
from nemo_rlhf.rl.losses import clipped_value_loss


class GPTCriticModel(MegatronGPTModule):
    """Value function V(s_t) for every token position: ``tokens [B, S] -> values [B, S]`` float32.

    ``values[:, t]`` is the value of the state after reading ``tokens[:, : t + 1]``, i.e. it aligns
    with the actor's log-prob of ``tokens[:, t + 1]``. Trained with the clipped value loss
    (:func:`nemo_rlhf.rl.losses.clipped_value_loss`).
    """

    def __init__(self, model_cfg: Mapping[str, Any], optim_cfg: Mapping[str, Any] | None,
                 vocab_size: int, micro_batch_size: int, value_clip: float | None = 0.2):
        super().__init__(model_cfg, optim_cfg, vocab_size, scalar_head=True)
        self.micro_batch_size = int(micro_batch_size)
        self.value_clip = value_clip

    @staticmethod
    def _forward(model, mb):
        return model(mb["tokens"], position_ids_like(mb["tokens"]), None)

    @torch.no_grad()
    def values(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, S]`` int64 -> ``values [B, S]`` float32 on every rank (forward only)."""
        self.model.eval()
        mbs = split_microbatches({"tokens": tokens}, self.microbatch_size_for(tokens.shape[0]))
        outs = self.forward_backward(mbs, self._forward,
                                     lambda mb, out: (out.sum() * 0, {"v": out[..., 0].float()}),
                                     forward_only=True)
        v = torch.cat([o["v"] for o in outs]) if outs else None
        return broadcast_from_last_stage(v, tuple(tokens.shape), torch.float32)

    def train_step(self, tokens: torch.Tensor, returns: torch.Tensor, prev_values: torch.Tensor,
                   mask: torch.Tensor) -> dict[str, float]:
        """One optimizer step of the clipped value loss on ``[B, S]`` inputs; returns metrics."""
        batch = {"tokens": tokens, "returns": returns.float(), "prev_values": prev_values.float(),
                 "mask": mask.float()}
        clip = self.value_clip

        def loss_fn(mb, out):
            loss, stats = clipped_value_loss(out[..., 0].float(), mb["prev_values"], mb["returns"],
                                             mb["mask"], clip_eps=clip)
            return loss, {"loss": loss.detach(), **{k: v.detach() for k, v in stats.items()}}

        return self.train_global_batch(batch, self.microbatch_size_for(tokens.shape[0]), self._forward, loss_fn)


class MegatronCriticBackend:
    """The critic server's model: a trainable critic and a frozen reward model.

    Implements :class:`nemo_rlhf.servers.protocol.CriticBackend` on numpy arrays.

    Args:
        critic: the value model (trained by ``train``).
        reward_model: the frozen reward model (scores at the last token).
        max_seq_len: longest accepted sequence (the models' ``max_position_embeddings``).
        save_fn: ``(path) -> None`` that writes the critic checkpoint instead of the default
            (a full training checkpoint: weights, optimizer, LR schedule, step, RNG, written
            atomically with :func:`nemo_rlhf.checkpoint.training_state.save_checkpoint_dir`,
            which :meth:`load` restores).
    """

    def __init__(self, critic: GPTCriticModel, reward_model, max_seq_len: int,
                 save_fn: Callable[[str], None] | None = None):
        self.critic = critic
        self.reward_model = reward_model
        self.max_seq_len = int(max_seq_len)
        self._save_fn = save_fn
        self.train_steps = 0

    def infer(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dev = self.critic.model_device
        t = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(dev)
        lens = torch.from_numpy(np.ascontiguousarray(lengths, dtype=np.int64)).reshape(-1).to(dev)
        values = self.critic.values(t)
        rewards = self.reward_model.score(t, lens)
        return values.cpu().numpy().astype(np.float32), rewards.cpu().numpy().astype(np.float32)

    def train(self, tokens: np.ndarray, returns: np.ndarray, prev_values: np.ndarray,
              mask: np.ndarray) -> dict[str, float]:
        dev = self.critic.model_device

        def tensor(a, dtype):
            return torch.from_numpy(np.array(a, dtype=dtype, copy=True)).to(dev)

        m = self.critic.train_step(tensor(tokens, np.int64), tensor(returns, np.float32),
                                   tensor(prev_values, np.float32), tensor(mask, np.float32))
        self.train_steps += 1
        self.critic.completed_steps += 1
        return m

    def save(self, path: str) -> None:
        """Write the critic's training checkpoint at ``path`` (collective over the server's ranks)."""
        if self._save_fn is not None:
            self._save_fn(path)
            return
        from nemo_rlhf.checkpoint.training_state import save_checkpoint_dir

        save_checkpoint_dir(path, self.critic)

    def load(self, path: str) -> dict[str, float]:
        """Restore weights, optimizer, LR schedule, step and RNG from a :meth:`save` checkpoint.

        Returns:
            ``{"step": critic optimizer steps taken}``.

        Raises:
            CheckpointError: no complete checkpoint at ``path`` (the message names it).
        """
        from nemo_rlhf.checkpoint.training_state import load_training_checkpoint

        load_training_checkpoint(path, self.critic)
        self.train_steps = self.critic.completed_steps
        return {"step": float(self.critic.completed_steps)}
