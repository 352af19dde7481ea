"""PNG plot of PPO reward and KL per step from ``metrics.jsonl``."""

from __future__ import annotations

import os
from pathlib import Path

from nemo_rlhf.utils.logging import read_jsonl


def plot_ppo_metrics(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Plot ``ppo/reward`` and ``ppo/kl`` (train, per PPO step) and ``val/reward``/``val/kl``.

    Raises:
        ValueError: if the file has no PPO training records.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_jsonl(metrics_path) if r.get("stage") == "ppo"]
    train = [r for r in rows if "ppo/reward" in r]
    val = [r for r in rows if "val/reward" in r]
    if not train:
        raise ValueError(f"{metrics_path} has no ppo/reward records")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [r["step"] for r in train]
    ax1.plot(steps, [r["ppo/reward"] for r in train], label="rollout reward (train)")
    ax2.plot(steps, [r["ppo/kl"] for r in train], label="KL to reference (train)")
    if val:
        vs = [r["step"] for r in val]
        ax1.plot(vs, [r["val/reward"] for r in val], "o-", label="held-out reward")
        ax2.plot(vs, [r["val/kl"] for r in val], "o-", label="held-out KL")
    ax1.set_xlabel("PPO step")
    ax1.set_ylabel("reward-model score")
    ax2.set_xlabel("PPO step")
    ax2.set_ylabel("KL (nats / sequence)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
