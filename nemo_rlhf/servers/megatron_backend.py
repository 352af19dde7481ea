"""The critic server's model pair on megatron: a trainable critic and a frozen reward model.

Implements :class:`nemo_rlhf.servers.protocol.CriticBackend` on numpy arrays; the PyTriton server
(:mod:`nemo_rlhf.servers.critic_server`) validates every request before it reaches this class.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from nemo_rlhf.models.critic import GPTCriticModel
from nemo_rlhf.rl.losses import clipped_value_loss


def critic_loss_fn(value_clip: float | None):
    """The critic's loss for :meth:`GPTCriticModel.train_on`: the clipped value loss
    (:func:`~nemo_rlhf.rl.losses.clipped_value_loss`, ε = ``value_clip``) of the value head's
    ``[b, S, 1]`` output against ``returns [b, S]`` around ``prev_values [b, S]`` over ``mask``."""

    def loss_fn(mb, out):
        loss, stats = clipped_value_loss(out[..., 0].float(), mb["prev_values"], mb["returns"], mb["mask"],
                                         clip_eps=value_clip)
        return loss, {"loss": loss.detach(), **{k: v.detach() for k, v in stats.items()}}

    return loss_fn


class MegatronCriticBackend:
    """The critic server's model: a trainable critic and a frozen reward model.

    Implements :class:`nemo_rlhf.servers.protocol.CriticBackend` on numpy arrays.

    Args:
        critic: the value model (trained by ``train``).
        reward_model: the frozen reward model (scores at the last token); None when the actor's
            rewards come from reward functions only (``reward.reward_model: false``): ``infer``
            then returns zero scores.
        max_seq_len: longest accepted sequence (the models' ``max_position_embeddings``).
            ``vocab_size`` (the critic's unpadded vocabulary) bounds the accepted token ids.
        save_fn: ``(path) -> None`` that writes the critic checkpoint instead of the default
            (a full training checkpoint: weights, optimizer, LR schedule, step, RNG, written
            atomically with :func:`nemo_rlhf.checkpoint.training_state.save_checkpoint_dir`,
            which :meth:`load` restores).
        value_clip: ε of the clipped value loss (:func:`nemo_rlhf.rl.losses.clipped_value_loss`,
            PPO2-style value clipping around the rollout's values); None: no clipping.
    """

    def __init__(self, critic: GPTCriticModel, reward_model, max_seq_len: int,
                 save_fn: Callable[[str], None] | None = None, value_clip: float | None = 0.2):
        self.critic = critic
        self.value_clip = value_clip
        self.reward_model = reward_model
        self.vocab_size = int(critic.vocab_size)  # unpadded: token ids must be < this
        self.max_seq_len = int(max_seq_len)
        self._save_fn = save_fn
        self.train_steps = 0

    def infer(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dev = self.critic.model_device
        t = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(dev)
        lens = torch.from_numpy(np.ascontiguousarray(lengths, dtype=np.int64)).reshape(-1).to(dev)
        values = self.critic.values(t)
        rewards = (self.reward_model.score(t, lens) if self.reward_model is not None
                   else torch.zeros(t.shape[0], dtype=torch.float32))
        return values.cpu().numpy().astype(np.float32), rewards.cpu().numpy().astype(np.float32)

    def train(self, tokens: np.ndarray, returns: np.ndarray, prev_values: np.ndarray,
              mask: np.ndarray) -> dict[str, float]:
        dev = self.critic.model_device

        def tensor(a, dtype):
            return torch.from_numpy(np.array(a, dtype=dtype, copy=True)).to(dev)

        batch = {"tokens": tensor(tokens, np.int64), "returns": tensor(returns, np.float32),
                 "prev_values": tensor(prev_values, np.float32), "mask": tensor(mask, np.float32)}
        m = self.critic.train_on(critic_loss_fn(self.value_clip), batch)
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
