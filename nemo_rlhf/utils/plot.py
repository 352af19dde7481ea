"""PNG plot of PPO reward, KL (and the VADER judge, when logged) per step from ``metrics.jsonl``."""

from __future__ import annotations

import os
from pathlib import Path

from nemo_rlhf.utils.logging import read_jsonl


def plot_ppo_metrics(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Plot ``ppo/reward`` and ``ppo/kl`` (train, per PPO step) and ``val/reward``/``val/kl``;
    with ``val/vader_positive`` records (``ppo.val_judge: vader``) a third panel shows the held-out
    VADER positive fraction and mean compound per evaluation step.

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
    judged = [r for r in val if "val/vader_positive" in r]
    fig, axes = plt.subplots(1, 3 if judged else 2, figsize=(15 if judged else 10, 4))
    ax1, ax2 = axes[0], axes[1]
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
    if judged:
        ax3, js = axes[2], [r["step"] for r in judged]
        ax3.plot(js, [r["val/vader_positive"] for r in judged], "o-", label="VADER positive fraction")
        ax3.plot(js, [r["val/vader_compound"] for r in judged], "s--", label="VADER mean compound")
        ax3.set_xlabel("PPO step")
        ax3.set_ylabel("held-out VADER (independent judge)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
