"""A tiny pure-torch critic implementing :class:`nemo_rlhf.servers.protocol.CriticBackend` (tests only)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from nemo_rlhf.checkpoint.weights import COMPLETE_MARKER, begin_atomic_dir, commit_atomic_dir


class TinyCriticBackend:
    """Embedding + linear value head; reward = value at the last valid token.

    ``values[b, t] = w . E[tokens[b, t]] + c``; ``rewards[b] = values[b, lengths[b] - 1]``.
    Training: one Adam step on the masked mean squared error
    ``sum(mask * (values - returns)^2) / max(sum(mask), 1)`` (no value clipping; ``prev_values``
    is only checked for shape).

    ``save(path)`` writes a checkpoint directory in the project's layout (``model.pt``,
    ``state.json`` with ``"step"``, ``COMPLETE`` last, atomically through ``path.tmp`` with
    :func:`begin_atomic_dir`/:func:`commit_atomic_dir`), as the megatron backend does.
    """

    def __init__(self, vocab_size: int = 32, hidden: int = 8, max_seq_len: int = 256, lr: float = 1e-2, seed: int = 0):
        torch.manual_seed(seed)
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.model = torch.nn.Sequential(torch.nn.Embedding(vocab_size, hidden), torch.nn.Linear(hidden, 1))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.train_calls = 0
        self.raise_next: Exception | None = None  # tests: infer raises this once
        self.delay_next_s = 0.0  # tests: infer sleeps this long once
        # tests (fault injection): the first ``*_delay_calls`` calls (-1: every call) sleep ``*_delay_s``.
        self.infer_delay_s, self.infer_delay_calls = 0.0, 0
        self.train_delay_s, self.train_delay_calls = 0.0, 0
        self.save_delay_s, self.save_delay_calls = 0.0, 0

    def _injected_delay(self, kind: str) -> None:
        calls = getattr(self, f"{kind}_delay_calls")
        if calls:
            setattr(self, f"{kind}_delay_calls", calls - 1 if calls > 0 else calls)
            time.sleep(getattr(self, f"{kind}_delay_s"))

    def _values(self, tokens: np.ndarray) -> torch.Tensor:
        return self.model(torch.from_numpy(tokens)).squeeze(-1)  # [B, S]

    def infer(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.raise_next is not None:
            error, self.raise_next = self.raise_next, None
            raise error
        if self.delay_next_s:
            delay, self.delay_next_s = self.delay_next_s, 0.0
            time.sleep(delay)
        self._injected_delay("infer")
        with torch.no_grad():
            values = self._values(tokens).numpy().astype(np.float32)
        rewards = values[np.arange(tokens.shape[0]), lengths - 1].astype(np.float32)
        return values, rewards

    def train(
        self, tokens: np.ndarray, returns: np.ndarray, prev_values: np.ndarray, mask: np.ndarray
    ) -> dict[str, float]:
        assert prev_values.shape == tokens.shape
        self._injected_delay("train")
        values = self._values(tokens)
        mask_t = torch.from_numpy(mask)
        loss = (mask_t * (values - torch.from_numpy(returns)) ** 2).sum() / mask_t.sum().clamp(min=1.0)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.train_calls += 1
        return {"loss": float(loss.item()), "num_tokens": float(mask.sum())}

    def save(self, path: str) -> None:
        self._injected_delay("save")
        final = Path(path)
        tmp = begin_atomic_dir(final)
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "train_calls": self.train_calls}, tmp / "model.pt")
        (tmp / "state.json").write_text(json.dumps({"step": self.train_calls}))
        commit_atomic_dir(tmp, final)

    def load(self, path: str) -> dict[str, float]:
        if not (Path(path) / COMPLETE_MARKER).exists():
            raise FileNotFoundError(f"no complete checkpoint at {path} (missing {COMPLETE_MARKER} marker)")
        state = torch.load(Path(path) / "model.pt", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.train_calls = int(state["train_calls"])
        return {"step": float(self.train_calls)}


def main(argv: list[str] | None = None) -> None:
    """Serve a TinyCriticBackend: ``python tests/servers/tiny_backend.py HTTP GRPC METRICS [options]``.

    Test-only fault-injection options: ``--delay-{infer,train,save}-s SECONDS`` makes the first
    ``--delay-{infer,train,save}-calls N`` calls of that kind (default -1: every call) sleep that
    long; ``--max-batch-size``, ``--max-seq-len`` size the server; ``--checkpoint-root`` confines
    save/load; ``--auth-token-env NAME`` turns authentication on with the token in that environment
    variable; ``--debug-log`` logs ``nemo_rlhf.servers`` at DEBUG (error tracebacks).
    """
    import argparse
    import logging

    from nemo_rlhf.servers.critic_server import CriticServer

    parser = argparse.ArgumentParser()
    parser.add_argument("ports", type=int, nargs=3, metavar="PORT", help="HTTP, gRPC and metrics ports")
    for kind in ("infer", "train", "save"):
        parser.add_argument(f"--delay-{kind}-s", type=float, default=0.0)
        parser.add_argument(f"--delay-{kind}-calls", type=int, default=-1)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--checkpoint-root", default=None)
    parser.add_argument("--auth-token-env", default=None)
    parser.add_argument("--debug-log", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.debug_log:
        logging.getLogger("nemo_rlhf.servers").setLevel(logging.DEBUG)
    token = None
    if args.auth_token_env:
        import os

        from nemo_rlhf.servers.protocol import resolve_auth_token

        token = resolve_auth_token(None, args.auth_token_env)
        os.environ.pop(args.auth_token_env, None)  # not inherited by tritonserver, not in its env dump
    backend = TinyCriticBackend(max_seq_len=args.max_seq_len)
    for kind in ("infer", "train", "save"):
        delay = getattr(args, f"delay_{kind}_s")
        if delay > 0:
            setattr(backend, f"{kind}_delay_s", delay)
            setattr(backend, f"{kind}_delay_calls", getattr(args, f"delay_{kind}_calls"))
    http_port, grpc_port, metrics_port = args.ports
    CriticServer(
        backend,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        max_batch_size=args.max_batch_size,
        checkpoint_root=args.checkpoint_root,
        auth_token=token,
    ).run()


if __name__ == "__main__":
    main()
