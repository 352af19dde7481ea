"""A tiny pure-torch critic implementing :class:`nemo_rlhf.servers.protocol.CriticBackend` (tests only)."""

from __future__ import annotations

import time

import numpy as np
import torch


class TinyCriticBackend:
    """Embedding + linear value head; reward = value at the last valid token.

    ``values[b, t] = w . E[tokens[b, t]] + c``; ``rewards[b] = values[b, lengths[b] - 1]``.
    Training: one Adam step on the masked mean squared error
    ``sum(mask * (values - returns)^2) / max(sum(mask), 1)`` (no value clipping; ``prev_values``
    is only checked for shape).
    """

    def __init__(self, vocab_size: int = 32, hidden: int = 8, max_seq_len: int = 256, lr: float = 1e-2, seed: int = 0):
        torch.manual_seed(seed)
        self.max_seq_len = max_seq_len
        self.model = torch.nn.Sequential(torch.nn.Embedding(vocab_size, hidden), torch.nn.Linear(hidden, 1))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.train_calls = 0
        self.raise_next: Exception | None = None  # tests: infer raises this once
        self.delay_next_s = 0.0  # tests: infer sleeps this long once


    def _values(self, tokens: np.ndarray) -> torch.Tensor:
        return self.model(torch.from_numpy(tokens)).squeeze(-1)  # [B, S]

    def infer(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.raise_next is not None:
            error, self.raise_next = self.raise_next, None
            raise error
        if self.delay_next_s:
            delay, self.delay_next_s = self.delay_next_s, 0.0
            time.sleep(delay)
        with torch.no_grad():
            values = self._values(tokens).numpy().astype(np.float32)
        rewards = values[np.arange(tokens.shape[0]), lengths - 1].astype(np.float32)
        return values, rewards

    def train(
        self, tokens: np.ndarray, returns: np.ndarray, prev_values: np.ndarray, mask: np.ndarray
    ) -> dict[str, float]:
        assert prev_values.shape == tokens.shape
        values = self._values(tokens)
        mask_t = torch.from_numpy(mask)
        loss = (mask_t * (values - torch.from_numpy(returns)) ** 2).sum() / mask_t.sum().clamp(min=1.0)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.train_calls += 1
        return {"loss": float(loss.item()), "num_tokens": float(mask.sum())}

    def save(self, path: str) -> None:
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "train_calls": self.train_calls}, path)

    def load(self, path: str) -> dict[str, float]:
        state = torch.load(path, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.train_calls = int(state["train_calls"])
        return {"step": float(self.train_calls)}


def main() -> None:
    """Serve a TinyCriticBackend: ``python tests/servers/tiny_backend.py HTTP GRPC METRICS``."""
    import sys

    from nemo_rlhf.servers.critic_server import CriticServer

    http_port, grpc_port, metrics_port = (int(p) for p in sys.argv[1:4])
    CriticServer(TinyCriticBackend(), http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port).run()


if __name__ == "__main__":
    main()
