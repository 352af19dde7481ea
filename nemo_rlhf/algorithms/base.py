"""What every trainer shares: the step loop with checkpoints, preemption, evaluation cadence and
logging, plus the data plumbing of a stage (DP-sharded loaders, result files; the data sets
themselves come from :mod:`nemo_rlhf.data.tasks`).

A trainer (one file per algorithm) subclasses :class:`Trainer` and implements ``train_step``
(one optimizer/PPO step on a batch), ``evaluate`` (held-out metrics) and, when it has state of
its own, ``state_dict`` / ``load_state_dict``. :meth:`Trainer.fit` is a plain loop, as in
NeMo-Aligner's trainers: Lightning's fit loop does not fit hand-stepped megatron optimizers and
RL steps, so it is not used; Lightning's loggers are (:mod:`nemo_rlhf.utils.loggers`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from nemo_rlhf.checkpoint.training_state import (
    Preemption,
    latest_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
from nemo_rlhf.data.samplers import StepBatchSampler
from nemo_rlhf.parallel.state import is_rank_zero
from nemo_rlhf.utils.loggers import MetricLogger
from nemo_rlhf.utils.progress import StageProgress

LOG = logging.getLogger("nemo_rlhf")


# ---------------------------------------------------------------------------- stage data
def step_loader(dataset, global_batch_size: int, seed: int, start_step: int, max_steps: int, collate):
    """DataLoader of this DP rank's share of global steps ``start_step .. max_steps - 1``; the batch
    of step k depends only on (seed, k), so a resumed run sees what an uninterrupted one would."""
    from megatron.core import parallel_state

    sampler = StepBatchSampler(len(dataset), int(global_batch_size), parallel_state.get_data_parallel_rank(),
                               parallel_state.get_data_parallel_world_size(), int(seed), int(start_step),
                               int(max_steps))
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)


def heldout_loader(dataset, batch_size: int, collate, seed: int):
    """DataLoader over this DP rank's shard of a held-out set, in order, full batches of
    ``batch_size`` (per DP rank) only; every TP/PP rank of a replica sees the same data."""
    from megatron.core import parallel_state
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=parallel_state.get_data_parallel_world_size(),
                                 rank=parallel_state.get_data_parallel_rank(), shuffle=False, seed=seed,
                                 drop_last=True)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=True,
                      num_workers=0)


def dp_mean(metrics: Mapping[str, float]) -> dict[str, float]:
    """Average scalar metrics over the data-parallel group (identical dict on every rank)."""
    from megatron.core import parallel_state

    from nemo_rlhf.parallel.state import comm_device

    keys = sorted(metrics)
    vec = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=comm_device())
    if torch.distributed.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(vec, group=parallel_state.get_data_parallel_group())
        vec /= parallel_state.get_data_parallel_world_size()
    return dict(zip(keys, vec.cpu().tolist()))


def write_result(run_dir: str | os.PathLike, name: str, result: Mapping[str, Any]) -> None:
    """Write ``<run_dir>/<name>`` (JSON) atomically on rank 0."""
    if not is_rank_zero():
        return
    path = Path(run_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True))
    tmp.replace(path)


# ---------------------------------------------------------------------------- the loop
class Trainer:
    """Base of every trainer: owns the step counter, the loop, checkpoints and logging.

    Subclasses set ``self.model`` (the module whose weights/optimizer are checkpointed) and
    ``self.train_loader`` before :meth:`fit`, and implement :meth:`train_step` and
    :meth:`evaluate`.

    Args:
        cfg: the stage config (sections ``trainer``, ``checkpoint``, ``logger``; ``run_dir``).
        name: the stage name: metric records' ``stage``, ``checkpoints/<name>``,
            ``<name>_result.json``, metric prefix ``train/`` (``ppo/`` for PPO).
        metric_prefix: prefix of the per-step metrics.
        progress_metrics: the step metrics shown in the progress bar.
    """

    def __init__(self, cfg, name: str, metric_prefix: str = "train",
                 progress_metrics: tuple[str, ...] = ("loss",)):
        self.cfg = cfg
        self.name = name
        self.metric_prefix = metric_prefix
        self.progress_metrics = progress_metrics
        self.run_dir = Path(cfg.run_dir)
        self.max_steps = int(cfg.trainer.max_steps)
        self.step = 0  # training steps done (optimizer steps for SFT/RM, PPO steps for PPO)
        ck = cfg.checkpoint
        self.checkpoint_root = Path(ck.dir or self.run_dir / "checkpoints" / name).resolve()
        self.model = None  # set by the subclass: the module that is checkpointed
        self.train_loader: Iterable | None = None
        self.preempted_by: str | None = None
        self.logger: MetricLogger | None = None

    # -------------------------------------------------------------- to implement
    def train_step(self, batch) -> dict[str, float]:
        """One training step on ``batch``; returns scalar metrics (identical on every rank)."""
        raise NotImplementedError

    def evaluate(self, limit: int | None = None) -> dict[str, float]:
        """Held-out metrics (collective: every rank calls it); ``limit`` caps the batches."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable trainer state saved with each checkpoint (``state.json``)."""
        return {"consumed_samples": self.step * int(self.cfg.batch.global_batch_size),
                "nonfinite_skipped": self.model.nonfinite_skipped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (the step comes from the checkpoint itself)."""
        self.model.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))

    def before_checkpoint_complete(self, tmp: Path) -> None:
        """Called on every rank with a checkpoint's temporary directory before its ``COMPLETE``
        marker (PPO saves the critic there). Default: nothing."""

    # -------------------------------------------------------------- checkpoints
    def resume(self) -> dict[str, Any] | None:
        """Load the newest complete checkpoint of ``checkpoint.dir`` when ``checkpoint.resume``
        is set; returns its trainer state, or None when starting fresh.

        Raises:
            CheckpointError: the checkpoint is unreadable (the message names it).
        """
        path = latest_checkpoint(self.checkpoint_root) if self.cfg.checkpoint.resume else None
        if path is None:
            return None
        state = load_training_checkpoint(path, self.model)
        self.step = int(state["step"])
        self.load_state_dict(state)
        dropped = self.logger.forget(self._redone_after_resume) if self.logger is not None else 0
        LOG.info("%s: resumed from %s at step %d%s", self.name, path, self.step,
                 f" ({dropped} metrics.jsonl records of later steps dropped: they are redone)" if dropped else "")
        return state

    def _redone_after_resume(self, record: Mapping[str, Any]) -> bool:
        """Whether a metrics record logged before the interruption describes work the resumed run
        does again: a training row (``<metric_prefix>/...``) is logged at its step's index (the
        update from state k to k + 1 is row k), every other row (``val/``, ``rs_round/``) at the
        state it describes. Resumed at state k: training rows k and later, other rows after k."""
        k, step = self.step, int(record["step"])
        return step > k or (step == k and any(str(key).startswith(f"{self.metric_prefix}/") for key in record))

    def save_checkpoint(self, reason: str = "") -> Path:
        """Write ``checkpoint.dir/step_<k>`` (collective) and prune to ``checkpoint.keep_last``."""
        self.model.completed_steps = self.step
        path = save_training_checkpoint(self.checkpoint_root, self.model, self.state_dict(),
                                        keep_last=int(self.cfg.checkpoint.keep_last),
                                        before_complete=self.before_checkpoint_complete)
        LOG.info("%s: saved checkpoint %s%s", self.name, path, reason)
        return path

    # -------------------------------------------------------------- logging
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Send ``metrics`` to every configured logger (rank 0 only) at ``step``."""
        if self.logger is not None:
            self.logger.log(metrics, step, force=True)  # the cadence is trainer.log_every_n_steps

    def run_evaluation(self, limit: int | None = None) -> dict[str, float]:
        """:meth:`evaluate`, logged as ``val/<name>`` at the current step."""
        metrics = self.evaluate(limit)
        LOG.info("%s step %d: held-out %s", self.name, self.step,
                 {k: round(float(v), 4) for k, v in metrics.items()})
        self.log_metrics({f"val/{k}": v for k, v in metrics.items()}, self.step)
        return metrics

    # -------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any] | None:
        """Train from ``self.step`` to ``trainer.max_steps``.

        After each step: evaluate every ``trainer.val_check_interval`` steps (global step count,
        so a resumed run evaluates at the same steps; not at the last step, which the caller
        evaluates in full), checkpoint every ``checkpoint.every_n_steps`` and at the last step
        (never right after a step skipped for non-finite values), then log the step's metrics
        (every ``trainer.log_every_n_steps`` and at the last step); on SIGTERM/SIGUSR1 checkpoint
        and stop.

        Returns:
            None when training reached ``trainer.max_steps``; after a preemption
            ``{"preempted": True, "signal", "steps", "resume_from"}`` (also written to
            ``<run_dir>/<name>_result.json``).
        """
        t = self.cfg.trainer
        every_val = int(t.val_check_interval or 0)
        every_log = max(int(t.log_every_n_steps), 1)
        every_ckpt = int(self.cfg.checkpoint.every_n_steps or 0)
        if self.step >= self.max_steps:
            return None
        preemption = Preemption().install()
        try:
            with StageProgress(self.name, self.max_steps, self.step, self.progress_metrics,
                               enabled=is_rank_zero()) as progress:
                for batch in self.train_loader:
                    if self.step >= self.max_steps:
                        break
                    metrics = self.train_step(batch)
                    index = self.step
                    self.step += 1
                    last = self.step >= self.max_steps
                    progress.update(self.step, metrics)
                    if every_val and self.step % every_val == 0 and not last:
                        self.run_evaluation(int(t.limit_val_batches) if t.limit_val_batches else None)
                    preempted = preemption.agreed()
                    # No checkpoint in the middle of a non-finite streak (that step was skipped):
                    # the newest checkpoint stays the last one that followed a real update.
                    suspect = self.model.nonfinite_in_a_row > 0
                    periodic = every_ckpt > 0 and self.step % every_ckpt == 0
                    if preempted or ((periodic or last) and not suspect):
                        self.save_checkpoint(f" (preempted by {preemption.requested})" if preempted else "")
                    # Logged after the step's checkpoint: a step's metrics row implies its state is saved
                    # whenever that step was due for a checkpoint.
                    if (index + 1) % every_log == 0 or last:
                        self.log_metrics({f"{self.metric_prefix}/{k}": v for k, v in metrics.items()}, index)
                    if preempted:
                        self.preempted_by = preemption.requested or "signal on another rank"
                        break
        finally:
            preemption.uninstall()
        if self.preempted_by is None:
            return None
        result = {"preempted": True, "signal": self.preempted_by, "steps": self.step,
                  "resume_from": str(latest_checkpoint(self.checkpoint_root))}
        write_result(self.run_dir, f"{self.name}_result.json", result)
        LOG.warning("%s: stopped by %s at step %d; resume by running the same command",
                    self.name, self.preempted_by, self.step)
        return result

    def run(self) -> dict[str, Any]:
        """The whole stage (set-up, resume, evaluation, :meth:`fit`, saving); see subclasses."""
        raise NotImplementedError

    def run_logged(self) -> dict[str, Any]:
        """:meth:`run` with the configured loggers (``logger`` section) open, closed afterwards."""
        self.logger = MetricLogger.from_config(self.cfg.logger, self.run_dir, self.name, is_rank_zero=is_rank_zero)
        LOG.info("%s: starting (trainer.max_steps=%d, run_dir=%s)", self.name, self.max_steps, self.run_dir)
        try:
            return self.run()
        finally:
            self.logger.finalize()
            self.logger = None


def prompt_datasets(data_cfg, tokenizer, label: str):
    """Train and held-out :class:`~nemo_rlhf.data.PromptDataset` of an online stage (``data.dataset``'s
    prompts via :func:`~nemo_rlhf.data.tasks.load_split_prompts`, cut to ``data.max_prompt_len``),
    logged under ``label``; and the collate function padding with the tokenizer's pad id."""
    from nemo_rlhf.data import PromptDataset, collate_prompts
    from nemo_rlhf.data.tasks import load_split_prompts

    train_prompts, heldout_prompts, _ = load_split_prompts(data_cfg, tokenizer)
    n, overlong = int(data_cfg.max_prompt_len), data_cfg.overlong
    train_ds = PromptDataset(train_prompts, tokenizer, n, overlong)
    val_ds = PromptDataset(heldout_prompts, tokenizer, n, overlong)
    LOG.info("%s prompts: train %d (%s), held-out %d (%s)", label, len(train_ds), dict(train_ds.stats),
             len(val_ds), dict(val_ds.stats))
    return train_ds, val_ds, (lambda b: collate_prompts(b, tokenizer.pad_id))


def connect_critic(client, critic_cfg):
    """``client``, or (on the rank that calls the server) a :class:`~nemo_rlhf.servers.client.CriticClient`
    for ``critic_cfg`` once the server answers its health check (before anything else is built)."""
    from nemo_rlhf.config import to_plain
    from nemo_rlhf.servers.client import CriticClient
    from nemo_rlhf.servers.critic_handle import is_server_caller

    if client is None and is_server_caller():
        client = CriticClient.from_config(to_plain(critic_cfg))
        client.wait_until_ready(float(critic_cfg.init_timeout_s))
    return client


def decode_rollouts(tokenizer, tokens: torch.Tensor, prompt_lengths: torch.Tensor,
                    lengths: torch.Tensor) -> tuple[list[str], list[str]]:
    """The decoded prompts and responses of ``tokens [B, L]`` (``prompt_lengths``, ``lengths``: ``[B]``
    int64 tokens); a response's final eos is dropped."""
    prompts, responses = [], []
    for row, p, n in zip(tokens.tolist(), prompt_lengths.tolist(), lengths.tolist()):
        response = row[p:n]
        if response and response[-1] == tokenizer.eos_id:
            response = response[:-1]
        prompts.append(tokenizer.decode(row[:p]))
        responses.append(tokenizer.decode(response))
    return prompts, responses


# ---------------------------------------------------------------------------- sampling and scoring
def generate_repeated(policy, prompts: torch.Tensor, prompt_lengths: torch.Tensor, params, copies: int):
    """``copies`` sampled responses per prompt: ``prompts [n, P]`` (right padded), ``prompt_lengths
    [n]`` -> :meth:`GPTPolicyModel.generate` on ``B = n * copies`` rows, the copies of prompt ``g``
    contiguous (rows ``g*copies .. g*copies+copies-1``); ``params``: its
    :class:`~nemo_rlhf.generation.sampling.SamplingParams` (the seed fixes every row)."""
    rep = lambda t: t.repeat_interleave(int(copies), dim=0)  # noqa: E731
    return policy.generate(rep(prompts), rep(prompt_lengths), params)


def function_rewards(tokenizer, reward_fn, tokens: torch.Tensor, lengths: torch.Tensor,
                     prompt_lengths: torch.Tensor) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``sum_k w_k * f_k(prompt, response)`` of the reward functions ``reward_fn`` (a
    :class:`~nemo_rlhf.rewards.functions.RewardSum`) on the decoded texts of ``tokens [B, L]``
    (``lengths``, ``prompt_lengths``: ``[B]`` int64 tokens).

    Returns:
        ``(total [B] float64, {term: [B] float64})`` numpy; each term unweighted, named by the last
        part of its function's import path.

    Raises:
        RewardFunctionError: a reward function raised or returned a bad shape / non-finite value.
    """
    prompts, responses = decode_rollouts(tokenizer, tokens, prompt_lengths, lengths)
    total, values = reward_fn.weighted(prompts, responses)
    return total, {name.rsplit(".", 1)[-1]: v for name, v in values.items()}


def score_responses(tokenizer, reward_fn, critic, reward_model_weight: float, tokens: torch.Tensor,
                    lengths: torch.Tensor, prompt_lengths: torch.Tensor) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The reward of each response: ``sum_k w_k * f_k(prompt, response)`` over the reward functions
    ``reward_fn`` (a :class:`~nemo_rlhf.rewards.functions.RewardSum`, or None) plus
    ``reward_model_weight * score`` of the reward-model server behind ``critic`` (a
    :class:`~nemo_rlhf.servers.critic_handle.CriticHandle`, or None; its values are ignored).

    Args:
        tokens: ``[B, L]`` int64 prompt + response, right padded; ``lengths``, ``prompt_lengths``:
            ``[B]`` int64 (tokens).

    Returns:
        ``(total [B] float64, {term: [B] float64})`` numpy; the terms are unweighted: each function
        by the last part of its import path, ``reward_model``.

    Raises:
        RewardFunctionError: a reward function raised or returned a bad shape / non-finite value
            (naming it, the batch index and the value), or the reward model returned a non-finite score.
    """
    from nemo_rlhf.rewards.functions import RewardFunctionError

    total = np.zeros(tokens.shape[0], dtype=np.float64)
    terms: dict[str, np.ndarray] = {}
    if reward_fn is not None:
        total, terms = function_rewards(tokenizer, reward_fn, tokens, lengths, prompt_lengths)
    if critic is not None:
        future = critic.infer_async(tokens, lengths)
        _, rm = critic.infer_result(future, tuple(tokens.shape), tokens.device)
        rm = rm.detach().double().cpu().numpy()
        bad = np.flatnonzero(~np.isfinite(rm))
        if bad.size:
            raise RewardFunctionError(f"reward model returned a non-finite score {rm[bad[0]]} at batch index "
                                      f"{int(bad[0])} ({bad.size} of {rm.size} non-finite)")
        total += float(reward_model_weight) * rm
        terms["reward_model"] = rm
    return total, terms


def dp_shard_batches(num_items: int, batch_size: int, limit: int | None = None) -> list[list[int]]:
    """This DP rank's share of ``num_items`` held-out items (rank r takes items r, r + dp, ...; the
    remainder ``num_items % dp`` is dropped so shards are equal) in batches of at most
    ``batch_size`` indices (the last may be smaller), at most ``limit`` batches (None: all); every
    TP/PP rank of a replica gets the same batches."""
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size() if parallel_state.is_initialized() else 1
    rank = parallel_state.get_data_parallel_rank() if parallel_state.is_initialized() else 0
    mine = list(range(rank, num_items // dp * dp, dp))
    size = max(1, int(batch_size))
    batches = [mine[i: i + size] for i in range(0, len(mine), size)]
    return batches[:limit] if limit else batches
