"""The pipeline stages (SFT, reward model, critic server, PPO actor) as functions of a Hydra config.

Launchers in ``launchers/`` are thin wrappers around these; the demo chains them. Each stage
writes into ``cfg.run_dir``: ``metrics.jsonl`` (all stages append), its checkpoint directory and a
``result.json`` summary.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from nemo_rlhf.data import (
    PreferenceDataset,
    PromptDataset,
    SFTDataset,
    collate_preference,
    collate_prompts,
    collate_sft,
    default_data_dir,
    load_hh_pairs,
    split_heldout,
)
from lightning.pytorch.utilities.exceptions import SIGTERMException

from nemo_rlhf.checkpoint.training_state import (
    Preemption,
    latest_checkpoint,
    load_training_checkpoint,
    make_checkpoint_callback,
    save_training_checkpoint,
)
from nemo_rlhf.data.tokenizer import tokenizer_from_config as get_tokenizer
from nemo_rlhf.parallel.state import is_rank_zero, setup_parallel
from nemo_rlhf.utils.hydra import to_dict

LOG = logging.getLogger("nemo_rlhf")


# ---------------------------------------------------------------------------- config helpers
def write_result(run_dir: str | os.PathLike, name: str, result: Mapping[str, Any]) -> None:
    """Write ``<run_dir>/<name>`` (JSON) atomically on rank 0."""
    if not is_rank_zero():
        return
    path = Path(run_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True))
    tmp.replace(path)


# ---------------------------------------------------------------------------- data
def data_files(data_cfg) -> list[Path]:
    """Absolute paths of ``data.files`` under ``data.data_dir`` (default: ``../shared/data``)."""
    root = Path(data_cfg.data_dir) if data_cfg.get("data_dir") else default_data_dir()
    return [Path(f) if os.path.isabs(f) else root / f for f in data_cfg.files]


def load_split_pairs(data_cfg):
    """Load HH pairs and split them into (train, held-out) by prompt hash."""
    pairs, stats = load_hh_pairs(data_files(data_cfg), on_error=data_cfg.get("on_error", "skip"),
                                 max_rows=data_cfg.get("max_rows"))
    LOG.info("HH data: %s", stats.summary())
    train, heldout = split_heldout(pairs, float(data_cfg.heldout_fraction), seed=int(data_cfg.get("split_seed", 1234)))
    return train, heldout, stats


def dp_loader(dataset, batch_size: int, collate, shuffle: bool, seed: int, drop_last: bool = True):
    """DataLoader over this DP rank's shard (every TP/PP rank of a DP replica sees the same data)."""
    from megatron.core import parallel_state
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=parallel_state.get_data_parallel_world_size(),
                                 rank=parallel_state.get_data_parallel_rank(), shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                      drop_last=drop_last, num_workers=0)


def make_trainer(cfg: DictConfig, stage: str, module, callbacks: list | None = None, evaluate=None):
    """A Lightning Trainer for one stage: manual megatron optimization, JSONL metrics.

    Lightning's ``max_steps`` counts only optimizers Lightning owns; a :class:`StepCounter`
    callback (first in the list, so later callbacks see the updated count) counts training batches
    in ``module.completed_steps`` and stops at ``trainer.max_steps``.

    Validation: Lightning's own loop is off (its ``val_check_interval`` counts batches since the
    process started, so a resumed run would validate at shifted steps). Instead ``evaluate()``
    (a dict of held-out metrics) runs every ``trainer.val_check_interval`` optimizer steps, counted
    from the start of the run, and is logged as ``val/<name>`` at that global step.

    Raises:
        ValueError: ``trainer.val_check_interval`` is not a positive integer (or null).
    """
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from nemo_rlhf.parallel.state import read_dist_env
    from nemo_rlhf.utils.logging import JSONLLogger

    if cfg.trainer.accelerator == "gpu":
        device = torch.device("cuda", read_dist_env().local_rank)
    else:
        device = torch.device("cpu")
    t = cfg.trainer
    module.max_train_steps = int(t.max_steps)
    every = t.get("val_check_interval")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"trainer.val_check_interval must be a positive integer number of optimizer steps "
                         f"(or null for none), got {every!r}")
    logger = JSONLLogger(cfg.run_dir, stage, step_offset=module.completed_steps)
    extra = [PeriodicEvaluation(int(every), evaluate, cfg.run_dir, stage)] if evaluate is not None and every else []
    return pl.Trainer(
        strategy=SingleDeviceStrategy(device),
        max_steps=-1,
        logger=logger,
        log_every_n_steps=int(t.get("log_every_n_steps", 1)),
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        max_epochs=-1,
        callbacks=[StepCounter(), *extra, *(callbacks or [])],
    )


class PeriodicEvaluation(pl.Callback):
    """Runs ``evaluate() -> {name: value}`` after every ``every``-th optimizer step (global step
    count, so resumed runs evaluate at the same steps) and appends ``val/<name>`` to
    ``<run_dir>/metrics.jsonl`` on rank 0. ``evaluate`` must be collective (all ranks call it)."""

    def __init__(self, every: int, evaluate, run_dir: str | os.PathLike, stage: str):
        self.every, self.evaluate, self.stage = int(every), evaluate, stage
        self.path = Path(run_dir) / "metrics.jsonl"

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = module.completed_steps
        if step % self.every:
            return
        metrics = self.evaluate()
        LOG.info("%s step %d: %s", self.stage, step, {k: round(float(v), 4) for k, v in metrics.items()})
        if is_rank_zero():
            from nemo_rlhf.utils.logging import append_jsonl

            append_jsonl(self.path, {"stage": self.stage, "step": step, "time": time.time(),
                                     **{f"val/{k}": float(v) for k, v in metrics.items()}})


class StepCounter(pl.Callback):
    """Counts completed training steps in ``module.completed_steps``; stops at ``max_train_steps``."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        module.completed_steps += 1
        if module.max_train_steps is not None and module.completed_steps >= module.max_train_steps:
            trainer.should_stop = True


def fit_with_checkpoints(cfg: DictConfig, name: str, model, train_dl, ckpt_root: Path, trainer_state,
                         evaluate=None, before_complete=None) -> dict[str, Any] | None:
    """``trainer.fit`` with periodic/final checkpoints and SLURM preemption handling.

    Checkpoints ``model`` (plus ``trainer_state()``, a JSON-able dict) into ``ckpt_root`` every
    ``checkpoint.every_n_steps`` steps, at ``trainer.max_steps``, and when SIGTERM/SIGUSR1 arrives
    (then at the next step boundary, after which fit stops).

    Returns:
        None when training ran to ``trainer.max_steps``; after a preemption the result dict
        ``{"preempted": True, "signal", "steps", "resume_from"}`` (also written to
        ``<run_dir>/<name>_result.json``).
    """
    ck = cfg.get("checkpoint") or {}
    keep_last = int(ck.get("keep_last", 2))
    preemption = Preemption().install()
    callback = make_checkpoint_callback(ckpt_root, int(ck.get("every_n_steps", 0) or 0), keep_last,
                                        trainer_state, preemption, before_complete=before_complete)
    trainer = make_trainer(cfg, name, model, [callback], evaluate=evaluate)
    try:
        if model.completed_steps < int(cfg.trainer.max_steps):
            trainer.fit(model, train_dataloaders=train_dl)
    except SIGTERMException:
        # Lightning's own SIGTERM handler ends fit() with this SystemExit at the next boundary; our
        # handler ran too. If the signal came outside a training step (e.g. during evaluation),
        # the checkpoint callback has not saved yet: save now.
        if not getattr(model, "preempted", False):
            save_training_checkpoint(ckpt_root, model, trainer_state(), keep_last=keep_last,
                                     before_complete=before_complete)
            model.preempted = True
        preemption.requested = preemption.requested or "SIGTERM"
    finally:
        preemption.uninstall()
    if not getattr(model, "preempted", False):
        return None
    result = {"preempted": True, "signal": preemption.requested, "steps": model.completed_steps,
              "resume_from": str(latest_checkpoint(ckpt_root))}
    write_result(cfg.run_dir, f"{name}_result.json", result)
    LOG.warning("%s: stopped by %s at step %d; resume by running the same command",
                name, preemption.requested, model.completed_steps)
    return result


# ---------------------------------------------------------------------------- SFT and reward model
def _supervised_stage(cfg: DictConfig, name: str, dataset_cls, collate_fn, build_model, evaluate,
                      skip_prefixes: tuple[str, ...] = ()) -> dict[str, Any]:
    """The shared body of the SFT and reward-model stages: data, tokenizer, model, fit, save.

    Resumes from the newest complete checkpoint in ``checkpoint.dir`` (default
    ``<run_dir>/checkpoints/<name>``) when ``checkpoint.resume`` is true, checkpoints every
    ``checkpoint.every_n_steps`` steps and at the end, and on SIGTERM/SIGUSR1 checkpoints at the
    next step boundary and returns ``{"preempted": True, ...}``.

    Args:
        name: stage name (metrics ``stage`` field, ``<name>_weights``, ``<name>_result.json``).
        dataset_cls: ``SFTDataset`` or ``PreferenceDataset``.
        collate_fn: its collate function ``(batch, pad_id, pad_to_multiple_of)``.
        build_model: ``(tokenizer) -> MegatronGPTModule``.
        evaluate: ``(model, val_loader) -> dict`` of held-out metrics (run before and after).
        skip_prefixes: parameters not loaded from ``init_from`` (a new head).
    """
    from nemo_rlhf.checkpoint.weights import save_model_weights

    dp = setup_parallel(to_dict(cfg.model), (int(cfg.batch.global_batch_size), int(cfg.batch.micro_batch_size)),
                        cfg.trainer.accelerator, int(cfg.seed))
    run_dir = Path(cfg.run_dir)
    train_pairs, heldout, stats = load_split_pairs(cfg.data)
    texts = [p.prompt + p.chosen for p in train_pairs] + [p.rejected for p in train_pairs]
    tok = get_tokenizer(to_dict(cfg.tokenizer), texts, save_dir=run_dir if is_rank_zero() else None)
    d = cfg.data
    train_ds = dataset_cls(train_pairs, tok, int(d.max_seq_len), int(d.max_prompt_len), d.overlong)
    val_ds = dataset_cls(heldout, tok, int(d.max_seq_len), int(d.max_prompt_len), d.overlong)
    LOG.info("%s samples: train %d (%s), held-out %d (%s)", name, len(train_ds), dict(train_ds.stats),
             len(val_ds), dict(val_ds.stats))
    # Equal-length micro-batches for the pipeline; S divisible by TP for sequence parallelism.
    pad_multiple = int(cfg.model.get("tensor_model_parallel_size", 1) or 1) * 8
    collate = lambda b: collate_fn(b, tok.pad_id, pad_to_multiple_of=pad_multiple)  # noqa: E731
    per_dp = int(cfg.batch.global_batch_size) // dp
    model = build_model(tok)
    ck = cfg.get("checkpoint") or {}
    ckpt_root = Path(ck.get("dir") or run_dir / "checkpoints" / name)
    resume_from = latest_checkpoint(ckpt_root) if ck.get("resume", True) else None
    resumed: dict[str, Any] = {}
    if resume_from is not None:
        resumed = load_training_checkpoint(resume_from, model)
        model.nonfinite_skipped = int(resumed.get("nonfinite_skipped", 0))
        LOG.info("%s: resumed from %s at step %d", name, resume_from, model.completed_steps)
    elif cfg.get("init_from"):
        model.load_weights(cfg.init_from, skip_prefixes=skip_prefixes)
    from megatron.core import parallel_state

    from nemo_rlhf.data.samplers import StepBatchSampler

    max_steps = int(cfg.trainer.max_steps)
    sampler = StepBatchSampler(len(train_ds), int(cfg.batch.global_batch_size), parallel_state.get_data_parallel_rank(),
                               dp, int(cfg.seed), model.completed_steps, max_steps)
    train_dl = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate)
    val_dl = dp_loader(val_ds, per_dp, collate, False, int(cfg.seed))

    before = resumed.get("val_before") or evaluate(model, val_dl)
    gbs = int(cfg.batch.global_batch_size)
    trainer_state = lambda: {"consumed_samples": model.completed_steps * gbs, "val_before": before,  # noqa: E731
                             "nonfinite_skipped": model.nonfinite_skipped}
    preempted = fit_with_checkpoints(
        cfg, name, model, train_dl, ckpt_root, trainer_state, evaluate=lambda: evaluate(model, val_dl))
    if preempted:
        return preempted
    after = evaluate(model, val_dl)
    ckpt = save_model_weights(model.gpt, run_dir / f"{name}_weights")
    result = {"val_before": before, "val_after": after, "checkpoint": str(ckpt),
              "tokenizer": str(run_dir / "tokenizer.json") if cfg.tokenizer.type == "train_bpe" else None,
              "vocab_size": tok.vocab_size, "train_samples": len(train_ds), "heldout_samples": len(val_ds),
              "data_skipped": dict(stats.skipped), "steps": model.completed_steps}
    write_result(run_dir, f"{name}_result.json", result)
    return result


def run_sft(cfg: DictConfig) -> dict[str, Any]:
    """Train the SFT policy on prompt + chosen response; held-out metric: ``nll`` (nats/token)
    on up to ``trainer.limit_val_batches`` batches."""
    from nemo_rlhf.models.gpt_sft import GPTSFTModel

    def evaluate(model, val_dl) -> dict[str, float]:
        vals = [model.evaluate_batch(b)["nll"] for _, b in zip(range(int(cfg.trainer.limit_val_batches)), val_dl)]
        return {"nll": float(sum(vals) / len(vals))}

    return _supervised_stage(
        cfg, "sft", SFTDataset, collate_sft,
        lambda tok: GPTSFTModel(to_dict(cfg.model), to_dict(cfg.optim), tok.vocab_size,
                                int(cfg.batch.micro_batch_size), tok.pad_id),
        evaluate)


def run_reward_model(cfg: DictConfig) -> dict[str, Any]:
    """Train the Bradley-Terry reward model (initialised from ``init_from``, usually SFT; the
    head is new). Held-out metrics: pairwise ``accuracy`` and BT ``loss`` over every held-out pair
    that fills a batch."""
    from nemo_rlhf.models.reward_model import GPTRewardModel

    def evaluate(model, val_dl) -> dict[str, float]:
        ms = [model.evaluate_batch(b) for b in val_dl]
        from megatron.core import parallel_state

        pairs = sum(int(b["tokens"].shape[0]) // 2 for b in val_dl) * parallel_state.get_data_parallel_world_size()
        return {"accuracy": sum(m["accuracy"] for m in ms) / len(ms),
                "loss": sum(m["loss"] for m in ms) / len(ms), "pairs": pairs}

    return _supervised_stage(
        cfg, "rm", PreferenceDataset, collate_preference,
        lambda tok: GPTRewardModel(to_dict(cfg.model), to_dict(cfg.optim), tok.vocab_size,
                                   int(cfg.batch.micro_batch_size)),
        evaluate, skip_prefixes=("output_layer.",))


# ---------------------------------------------------------------------------- PPO actor
def run_ppo(cfg: DictConfig, critic=None) -> dict[str, Any]:
    """PPO actor training against a critic/reward server (``critic.host``/``critic.port``) or the
    given client. Reports held-out reward and KL before and after training.

    Checkpoints (``checkpoint.dir``, default ``<run_dir>/checkpoints/ppo``) pair the actor with the
    critic: each ``step_<k>`` holds the actor's weights, optimizer, LR schedule, RNG, the PPO step,
    the KL-controller state and the prompt position, and ``critic/`` — the critic server's own
    training checkpoint (weights, optimizer, step), written by the server into the actor's
    temporary directory before the ``COMPLETE`` marker. The path is absolute and must be visible to
    the server (a shared filesystem on a cluster). On start, the newest complete checkpoint is
    resumed and the server is told to load the paired critic (``critic_load``), so actor and critic
    continue from the same step. SIGTERM/SIGUSR1 checkpoint at the next step boundary and return
    ``{"preempted": True, ...}``.

    Raises:
        CriticServerError / CriticServerUnavailable: the server failed or cannot be reached (the
            message names the URL, the model and the timeout).
        CheckpointError: the checkpoint to resume from is unreadable (the message names it).
    """
    from megatron.core import parallel_state

    from nemo_rlhf.algorithms.ppo import PPOActorModule, _is_server_caller, dp_mean
    from nemo_rlhf.checkpoint.weights import save_model_weights
    from nemo_rlhf.data.samplers import StepBatchSampler
    from nemo_rlhf.models.actor import GPTActorModel
    from nemo_rlhf.servers.client import CriticClient
    from nemo_rlhf.servers.protocol import CriticServerError

    dp = setup_parallel(to_dict(cfg.model), (int(cfg.batch.global_batch_size), int(cfg.batch.micro_batch_size)),
                        cfg.trainer.accelerator, int(cfg.seed))
    run_dir = Path(cfg.run_dir)
    train_pairs, heldout, _ = load_split_pairs(cfg.data)
    tok = get_tokenizer(to_dict(cfg.tokenizer))
    d = cfg.data
    train_prompts = sorted({p.prompt for p in train_pairs})
    heldout_prompts = sorted({p.prompt for p in heldout})
    if cfg.data.get("max_heldout_prompts"):
        heldout_prompts = heldout_prompts[: int(cfg.data.max_heldout_prompts)]
    train_ds = PromptDataset(train_prompts, tok, int(d.max_prompt_len), d.overlong)
    val_ds = PromptDataset(heldout_prompts, tok, int(d.max_prompt_len), d.overlong)
    LOG.info("PPO prompts: train %d (%s), held-out %d (%s)", len(train_ds), dict(train_ds.stats),
             len(val_ds), dict(val_ds.stats))
    collate = lambda b: collate_prompts(b, tok.pad_id)  # noqa: E731
    gbs = int(cfg.batch.global_batch_size)
    per_dp = gbs // dp
    if critic is None and _is_server_caller():
        c = cfg.critic
        retry = {k: float(c[k]) for k in ("retry_limit_s", "retry_backoff_s", "retry_backoff_max_s")
                 if c.get(k) is not None}
        critic = CriticClient(c.host, int(c.port), infer_timeout_s=float(c.infer_timeout_s),
                              train_timeout_s=float(c.train_timeout_s), init_timeout_s=float(c.init_timeout_s),
                              **retry)
        critic.wait_until_ready(float(c.init_timeout_s))  # health check before anything else
    in_process = bool(getattr(critic, "in_process", False))
    model_cfg, mbs = to_dict(cfg.model), int(cfg.batch.micro_batch_size)
    reference = GPTActorModel(model_cfg, None, tok.vocab_size, mbs, tok.eos_id, tok.pad_id)
    reference.load_weights(cfg.init_from)
    actor = PPOActorModule(model_cfg, to_dict(cfg.optim), tok.vocab_size, mbs, tok.eos_id, tok.pad_id,
                           to_dict(cfg.ppo), critic, reference)

    def critic_owner() -> bool:
        """The rank that saves/loads the critic: every rank for an in-process critic (collective),
        else global rank 0 only (one request to the server)."""
        return in_process or torch.distributed.get_rank() == 0

    def on_critic_owner(what: str, call):
        """Run ``call()`` on the critic owner(s); a failure there is raised on every rank."""
        from nemo_rlhf.algorithms.ppo import raise_if_any_rank_failed

        result, error = None, None
        if critic_owner():
            try:
                result = call()
            except CriticServerError as exc:
                error = exc
        if in_process and error is not None:
            raise error
        if not in_process:
            raise_if_any_rank_failed(error, what)
        return result

    ck = cfg.get("checkpoint") or {}
    ckpt_root = Path(ck.get("dir") or run_dir / "checkpoints" / "ppo").resolve()
    resume_from = latest_checkpoint(ckpt_root) if ck.get("resume", True) else None
    resumed: dict[str, Any] = {}
    if resume_from is not None:
        resumed = load_training_checkpoint(resume_from, actor)
        actor.kl_ctl.load_state_dict(resumed["kl_controller"])
        actor.ppo_step_count = int(resumed["ppo_step"])
        actor.nonfinite_skipped = int(resumed.get("nonfinite_skipped", 0))
        state = on_critic_owner("critic_load", lambda: critic.load(str(resume_from / "critic")))
        critic_step = state["step"] if state else None
        LOG.info("ppo: resumed from %s at step %d (critic at its step %s, KL coefficient %.4g)",
                 resume_from, actor.completed_steps, critic_step, actor.kl_ctl.value)
    else:
        actor.load_weights(cfg.init_from)
    sampler = StepBatchSampler(len(train_ds), gbs, parallel_state.get_data_parallel_rank(), dp, int(cfg.seed),
                               actor.completed_steps, int(cfg.trainer.max_steps))
    train_dl = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate)
    val_dl = dp_loader(val_ds, per_dp, collate, False, int(cfg.seed), drop_last=True)

    def evaluate(limit: int | None = None) -> dict[str, float]:
        ms = [actor.evaluate_prompts(b["prompts"], b["prompt_lengths"])
              for _, b in zip(range(limit if limit else len(val_dl)), val_dl)]
        agg = {k: sum(m[k] for m in ms) / len(ms) for k in ("reward", "kl", "response_length")}
        return dp_mean(agg)

    from nemo_rlhf.utils.logging import append_jsonl

    def record(step: int, m: Mapping[str, float]) -> None:
        if is_rank_zero():
            append_jsonl(run_dir / "metrics.jsonl", {"stage": "ppo", "step": step, "time": time.time(),
                                                     **{f"val/{k}": v for k, v in m.items()}})

    if resumed:
        before = resumed["heldout_before"]
    else:
        before = evaluate()
        record(0, before)

    def trainer_state() -> dict[str, Any]:
        return {"consumed_samples": actor.completed_steps * gbs, "ppo_step": actor.ppo_step_count,
                "kl_controller": actor.kl_ctl.state_dict(), "heldout_before": before,
                "nonfinite_skipped": actor.nonfinite_skipped}

    def save_critic(tmp: Path) -> None:
        on_critic_owner("critic_save", lambda: critic.save(str(tmp / "critic")))

    limit = cfg.trainer.get("limit_val_batches")
    try:
        preempted = fit_with_checkpoints(cfg, "ppo", actor, train_dl, ckpt_root, trainer_state,
                                         evaluate=lambda: evaluate(int(limit) if limit else None),
                                         before_complete=save_critic)
    except CriticServerError as exc:
        raise _critic_failure(cfg, actor, ckpt_root, trainer_state, exc) from exc
    if preempted:
        return preempted
    after = evaluate()
    record(actor.completed_steps, after)
    ckpt = save_model_weights(actor.gpt, run_dir / "ppo_actor_weights")
    critic_ckpt = str((run_dir / "ppo_critic_weights").resolve())
    # The critic's training checkpoint; load_weights() reads its weights.
    on_critic_owner("critic_save", lambda: critic.save(critic_ckpt))
    result = {"heldout_before": before, "heldout_after": after, "checkpoint": str(ckpt),
              "critic_checkpoint": critic_ckpt, "resume_checkpoint": str(latest_checkpoint(ckpt_root)),
              "steps": actor.completed_steps, "heldout_prompts": len(val_ds), "train_prompts": len(train_ds)}
    write_result(run_dir, "ppo_result.json", result)
    return result


class CriticServerFailure(RuntimeError):
    """The PPO actor stopped because the critic server failed (gone past ``critic.retry_limit_s``,
    restarted with its state lost, or erroring). Raised on every rank after the actor-only
    emergency checkpoint was written; the launcher exits non-zero."""


def _critic_failure(cfg: DictConfig, actor, ckpt_root: Path, trainer_state, exc: BaseException) -> CriticServerFailure:
    """Save the actor's state (collective) as ``<ckpt_root>/emergency_step_<k>`` and build the error.

    The emergency checkpoint holds the actor only: the critic's state since the last paired
    checkpoint died with the server. It is never resumed from automatically (its name is not
    ``step_<k>``), because actor and critic would no longer match; resume continues from the
    newest paired checkpoint. The actor weights in it may include part of step k+1's updates.
    """
    from nemo_rlhf.checkpoint.training_state import save_checkpoint_dir

    server = f"{cfg.critic.host}:{cfg.critic.port}"
    path = None
    try:
        path = save_checkpoint_dir(ckpt_root / f"emergency_step_{actor.completed_steps:08d}", actor,
                                   {**trainer_state(), "critic": None, "reason": str(exc)[:2000]})
    except Exception as save_exc:  # noqa: BLE001 - report both, the server failure first
        LOG.error("could not write the emergency actor checkpoint: %s", save_exc)
    paired = latest_checkpoint(ckpt_root)
    msg = (f"critic server {server} failed at PPO step {actor.completed_steps}: {exc}\n"
           f"  actor-only emergency checkpoint: {path or 'NOT WRITTEN (see the log)'}\n"
           f"  the run resumes (same command, with a running critic server) from the newest paired "
           f"actor+critic checkpoint: {paired or 'none yet: it would restart from init_from'}")
    LOG.error(msg)
    return CriticServerFailure(msg)

