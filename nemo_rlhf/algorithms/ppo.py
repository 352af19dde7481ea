"""PPO for RLHF (Ziegler et al. 2019; Ouyang et al. 2022): the actor's trainer.

One PPO step (:meth:`PPOTrainer.train_step`), as data::

    prompts [B, P] -> policy.generate ................. tokens [B, L], lengths [B]
      -> critic.infer_async (remote, a future) ......... values [B, L], scores [B]
      -> policy.logprobs / reference.logprobs (local, overlapping the remote call): [B, L-1]
      -> rl.kl_penalty -> rl.ppo_advantages (per-token rewards, GAE, whitening over DP)
      -> for each epoch and mini-batch: critic.train_async (remote, background thread)
                                        || policy.train_on(rl.ppo_policy_loss) (local)
      -> KL controller update -> metrics

The critic and reward model live in a separate server process (PyTriton) behind
:class:`~nemo_rlhf.servers.critic_handle.CriticHandle`; ``launchers/train_ppo_actor.py``
(config ``conf/gpt_ppo_actor.yaml``) calls :func:`run_ppo`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from nemo_rlhf.algorithms.base import (
    Trainer,
    connect_critic,
    decode_rollouts,
    dp_mean,
    function_rewards,
    heldout_loader,
    prompt_datasets,
    step_loader,
    write_result,
)
from nemo_rlhf.checkpoint.training_state import latest_checkpoint, save_checkpoint_dir
from nemo_rlhf.checkpoint.weights import load_weights, save_model_weights
from nemo_rlhf.config import PPOActorStageConfig, check_heldout_size, check_sizes, load_stage_config, to_plain
from nemo_rlhf.data.tokenizer import tokenizer_from_config
from nemo_rlhf.generation.sampling import SamplingParams
from nemo_rlhf.models.hydra import HydraReference
from nemo_rlhf.models.lora import LoRAReference
from nemo_rlhf.models.policy import GPTPolicyModel
from nemo_rlhf.models.vocab_parallel import token_logprobs
from nemo_rlhf.parallel.state import any_rank, is_rank_zero, setup_parallel
from nemo_rlhf.rl.advantages import ppo_advantages, response_mask
from nemo_rlhf.rl.kl import build_kl_controller, kl_penalty
from nemo_rlhf.rl.losses import ppo_policy_loss
from nemo_rlhf.rewards.functions import RewardSum, build_reward
from nemo_rlhf.rewards.sentiment import judge_agreement, positive_fraction, vader_compound
from nemo_rlhf.rl.masked import masked_mean
from nemo_rlhf.servers.critic_handle import CriticHandle
from nemo_rlhf.servers.protocol import CriticServerError

LOG = logging.getLogger("nemo_rlhf")


@dataclass
class Rollout:
    """One batch of rollouts on this data-parallel rank. B rollouts, L = prompt + response length.

    Attributes:
        tokens: ``[B, L]`` int64 prompt + response, right padded.
        lengths, prompt_lengths: ``[B]`` int64 (tokens).
        scores: ``[B]`` float32 reward-model scores.
        values: ``[B, L]`` float32 critic values in the server's layout (``values[:, t]`` is the
            value after reading ``tokens[:, :t+1]``; ``values[:, :-1]`` aligns with log-probs).
        logprobs, ref_logprobs: ``[B, L-1]`` float32 actor / reference-policy log-probs.
        mask: ``[B, L-1]`` float32 response positions (:func:`~nemo_rlhf.rl.advantages.response_mask`).
        kl, rewards, advantages, returns: ``[B, L-1]`` float32, filled by the trainer.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    prompt_lengths: torch.Tensor
    scores: torch.Tensor
    values: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    mask: torch.Tensor
    kl: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    def minibatch_indices(self, num_minibatches: int, generator: torch.Generator) -> list[torch.Tensor]:
        """A random split of the B rows into ``num_minibatches`` equal index tensors ``[B / n]``
        (a fresh permutation from ``generator`` on the CPU, moved to the rollout's device).

        Raises:
            ValueError: ``num_minibatches`` does not divide B.
        """
        b = self.batch_size
        if num_minibatches < 1 or b % num_minibatches:
            raise ValueError(f"ppo.num_minibatches={num_minibatches} does not divide the rollout batch {b} "
                             f"(batch.global_batch_size / data-parallel size)")
        order = torch.randperm(b, generator=generator).to(self.tokens.device)
        return list(order.chunk(num_minibatches))

    def select(self, index: torch.Tensor, *names: str) -> dict[str, torch.Tensor]:
        """``{name: tensor[index]}`` for the given fields (a mini-batch)."""
        return {n: getattr(self, n)[index] for n in names}

    def first_nonfinite(self, names: tuple[str, ...] = ("scores", "values", "logprobs", "ref_logprobs",
                                                          "advantages", "returns")) -> str | None:
        """The first of the named fields that holds a NaN/Inf on this rank, or None (local: the
        trainer agrees across ranks with :func:`nemo_rlhf.parallel.state.any_rank`)."""
        names_set = {f.name for f in fields(self)}
        bad = next((n for n in names if n in names_set and getattr(self, n) is not None
                    and not bool(torch.isfinite(getattr(self, n)).all())), None)
        return bad


def ppo_loss_fn(policy: GPTPolicyModel, clip_eps: float, entropy_coef: float, clip_eps_high: float | None):
    """The actor's loss for :meth:`GPTPolicyModel.train_on`: PPO clipped surrogate (Schulman et
    al. 2017, eq. 7; :func:`~nemo_rlhf.rl.losses.ppo_policy_loss`) minus ``entropy_coef`` times
    the mean response entropy.

    The micro-batch holds ``tokens [b, L]``, ``old_logprobs``, ``advantages``, ``mask`` ``[b, L-1]``,
    or — with ``logit_positions`` (:meth:`GPTPolicyModel.response_microbatch`) — the same at the
    response positions only, ``[b, R]`` (the logits then ``[b, R, V/TP]``).
    Metrics: ``loss``, ``pg_loss``, the policy-loss statistics (``clipfrac``, ``approx_kl``,
    ``ratio_mean``, ...) and ``entropy`` when ``entropy_coef`` is set.
    """

    def loss_fn(mb, logits):
        logits, targets = policy.scored_logits(mb, logits)
        entropy = policy.entropy(logits) if entropy_coef else None
        lp = token_logprobs(logits, targets)
        pg_loss, stats = ppo_policy_loss(lp, mb["old_logprobs"], mb["advantages"], mb["mask"],
                                         clip_eps=clip_eps, clip_eps_high=clip_eps_high)
        loss = pg_loss
        metrics = {"pg_loss": pg_loss, **stats}
        if entropy is not None:
            ent = masked_mean(entropy, mb["mask"])
            loss = loss - entropy_coef * ent
            metrics["entropy"] = ent
        metrics["loss"] = loss
        return loss, metrics

    return loss_fn


class CriticServerFailure(RuntimeError):
    """The PPO actor stopped because the critic server failed (gone past ``critic.retry_limit_s``,
    restarted with its state lost, or erroring). Raised on every rank after the actor-only
    emergency checkpoint was written; the launcher exits non-zero."""


class PPOTrainer(Trainer):
    """PPO actor training against a critic/reward server (``critic.host``/``critic.port``) or a
    given client (e.g. an in-process ``LocalCriticClient``).

    Holds the policy (trained), the frozen reference policy, the critic handle, the prompt loaders
    and the adaptive KL controller. Checkpoints (``checkpoint.dir``, default
    ``<run_dir>/checkpoints/ppo``) pair the actor with the critic: each ``step_<k>`` holds the
    actor's weights, optimizer, LR schedule, RNG, the PPO step, the KL-controller state and the
    prompt position, and ``critic/`` — the critic server's own training checkpoint, written by the
    server into the actor's temporary directory before the ``COMPLETE`` marker. The path is
    absolute and must be visible to the server. A resumed run tells the server to load the paired
    critic (``critic_load``), so actor and critic continue from the same step.
    """

    def __init__(self, cfg: PPOActorStageConfig, critic_client=None):
        super().__init__(cfg, "ppo", metric_prefix="ppo", progress_metrics=("reward", "kl"))
        self.critic_client = critic_client
        p = cfg.ppo
        self.sampling = SamplingParams(**to_plain(p.sampling), seed=int(p.seed))
        # held-out evaluation: the same sampling unless val_sampling overrides it, fixed seed
        self.val_sampling = SamplingParams(**to_plain(p.val_sampling.resolve(p.sampling)), seed=int(p.seed) + 1)
        self.kl_ctl = build_kl_controller(to_plain(p.kl_controller))
        self.heldout_before: dict[str, float] | None = None
        self.tokenizer = None  # set by setup(); from_models(..., tokenizer=) for judged evaluations
        self.reward_fn: RewardSum | None = None  # reward.functions (built by setup / from_models)

    @classmethod
    def from_models(cls, cfg: PPOActorStageConfig, policy: GPTPolicyModel,
                    reference: GPTPolicyModel | HydraReference, critic_client, tokenizer=None) -> "PPOTrainer":
        """A trainer around models built elsewhere (tests, benchmarks, the layout-parity tool):
        :meth:`train_step`, :meth:`rollout` and :meth:`evaluate` work without :meth:`setup`
        (``val_loader`` must be set for :meth:`evaluate`). ``reference``: a frozen full copy, or a
        :class:`~nemo_rlhf.models.hydra.HydraReference` branching off ``policy``'s trunk.

        Raises:
            ValueError: ``ppo.val_judge`` or ``reward.functions`` without ``tokenizer``.
        """
        trainer = cls(cfg, critic_client)
        trainer.policy = trainer.model = policy
        trainer.reference = reference
        trainer.critic = CriticHandle(critic_client)
        trainer.tokenizer = tokenizer
        if tokenizer is None and (cfg.ppo.val_judge or cfg.reward.functions):
            raise ValueError("PPOTrainer.from_models: ppo.val_judge / reward.functions need the tokenizer "
                             "(tokenizer=...)")
        trainer.reward_fn = build_reward(cfg.reward.functions) if cfg.reward.functions else None
        return trainer

    # -------------------------------------------------------------- set-up
    def setup(self) -> None:
        """Parallel groups, prompts, tokenizer, critic handle, reference policy, then the policy."""
        cfg = self.cfg
        gbs, mbs = int(cfg.batch.global_batch_size), int(cfg.batch.micro_batch_size)
        self.dp = setup_parallel(to_plain(cfg.model), (gbs, mbs), cfg.trainer.accelerator, int(cfg.seed))
        check_sizes(cfg, self.dp)
        self.tokenizer = tok = tokenizer_from_config(to_plain(cfg.tokenizer))
        self.train_ds, self.val_ds, self.collate = prompt_datasets(cfg.data, tok, "PPO")
        check_heldout_size(len(self.val_ds), gbs, self.dp, data=cfg.data, unit="prompts")
        self.critic = CriticHandle(connect_critic(self.critic_client, cfg.critic))
        self.reward_fn = build_reward(cfg.reward.functions) if cfg.reward.functions else None
        model_cfg = to_plain(cfg.model)
        if cfg.ppo.reference == "lora_disabled":  # the actor itself with its LoRA adapters off: no copy
            self.policy = self.model = GPTPolicyModel(model_cfg, to_plain(cfg.optim), tok.vocab_size, mbs,
                                                      tok.eos_id, tok.pad_id)
            self.reference = LoRAReference(self.policy)
        elif cfg.ppo.reference == "hydra":  # the actor's frozen trunk + a frozen copy of its initial top layers
            self.policy = self.model = GPTPolicyModel(model_cfg, to_plain(cfg.optim), tok.vocab_size, mbs,
                                                      tok.eos_id, tok.pad_id)
            load_weights(self.policy, cfg.init_from)  # before resume() may load a trained actor
            self.reference = HydraReference(self.policy)
        else:
            self.reference = GPTPolicyModel(model_cfg, None, tok.vocab_size, mbs, tok.eos_id, tok.pad_id)
            load_weights(self.reference, cfg.init_from)
            self.policy = self.model = GPTPolicyModel(model_cfg, to_plain(cfg.optim), tok.vocab_size, mbs,
                                                      tok.eos_id, tok.pad_id)

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "ppo_step": self.step, "kl_controller": self.kl_ctl.state_dict(),
                "heldout_before": self.heldout_before}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.heldout_before = state["heldout_before"]

    def before_checkpoint_complete(self, tmp: Path) -> None:
        self.critic.save(str(tmp / "critic"))

    def resume(self) -> dict[str, Any] | None:
        state = super().resume()
        if state is not None:
            path = latest_checkpoint(self.checkpoint_root)
            critic_state = self.critic.load(str(path / "critic"))
            LOG.info("ppo: critic loaded from %s (critic at its step %s, KL coefficient %.4g)", path / "critic",
                     critic_state["step"] if critic_state else None, self.kl_ctl.value)
        return state

    # -------------------------------------------------------------- rollouts
    def _rollout_logprobs(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Actor and reference-policy log-probs ``[B, L-1]`` of ``tokens [B, L]`` (a hydra reference:
        one trunk forward for both)."""
        if isinstance(self.reference, HydraReference):
            return self.reference.actor_and_reference_logprobs(tokens)
        return self.policy.logprobs(tokens), self._reference_logprobs(tokens)

    def _reference_logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        offload = bool(self.cfg.ppo.reference_offload) and torch.cuda.is_available()
        if offload:
            self.reference.to(torch.cuda.current_device())
        try:
            return self.reference.logprobs(tokens)
        finally:
            if offload:
                self.reference.to("cpu")

    @torch.no_grad()
    def rollout(self, prompts: torch.Tensor, prompt_lengths: torch.Tensor, params: SamplingParams) -> Rollout:
        """Generate, then score with the critic server while computing actor/reference log-probs."""
        gen = self.policy.generate(prompts, prompt_lengths, params)
        tokens, lengths = gen.tokens, gen.lengths
        future = self.critic.infer_async(tokens, lengths)  # overlaps the two forwards below
        logprobs, ref_logprobs = self._rollout_logprobs(tokens)
        values, scores = self.critic.infer_result(future, tuple(tokens.shape), self.policy.model_device)
        scores = self.reward(tokens, lengths, gen.prompt_lengths, scores)
        mask = response_mask(gen.prompt_lengths, lengths, tokens.shape[1])
        return Rollout(tokens, lengths, gen.prompt_lengths, scores, values, logprobs, ref_logprobs, mask)

    def reward(self, tokens: torch.Tensor, lengths: torch.Tensor, prompt_lengths: torch.Tensor,
               rm_scores: torch.Tensor) -> torch.Tensor:
        """The sequence reward ``[B]`` float32 of each rollout: ``reward.reward_model_weight *
        rm_scores`` (the server's reward model; left out with ``reward.reward_model: false``) +
        ``sum_k w_k f_k(prompt, response)`` over ``reward.functions`` (on the decoded texts).

        Raises:
            RewardFunctionError: a reward function raised or returned a bad shape / non-finite value.
        """
        r = self.cfg.reward
        total = rm_scores * float(r.reward_model_weight) if r.reward_model else torch.zeros_like(rm_scores)
        if self.reward_fn is not None:
            fn_total, _ = function_rewards(self.tokenizer, self.reward_fn, tokens, lengths, prompt_lengths)
            total = total + torch.as_tensor(fn_total, dtype=total.dtype, device=total.device)
        return total

    def compute_advantages(self, ro: Rollout) -> Rollout:
        """KL-penalised per-token rewards, GAE advantages and returns (whitened over DP)."""
        from megatron.core import parallel_state

        p = self.cfg.ppo
        group = (parallel_state.get_data_parallel_group()
                 if parallel_state.get_data_parallel_world_size() > 1 else None)
        ro.kl = kl_penalty(ro.logprobs, ro.ref_logprobs, estimator=p.kl_estimator) * ro.mask
        ro.rewards, ro.advantages, ro.returns = ppo_advantages(
            ro.scores, ro.values[:, :-1], ro.kl, ro.mask, float(self.kl_ctl.value), float(p.gamma), float(p.lam),
            whiten=bool(p.whiten_advantages), group=group)
        return ro

    # -------------------------------------------------------------- one PPO step
    def train_step(self, batch) -> dict[str, float]:
        p = self.cfg.ppo
        self.sampling.seed = int(p.seed) + 7919 * self.step
        ro = self.compute_advantages(self.rollout(batch["prompts"], batch["prompt_lengths"], self.sampling))
        bad = ro.first_nonfinite()
        if any_rank(bad is not None):
            # Skip the whole PPO step: no actor update, no critic training, no KL-controller update.
            self.policy.record_nonfinite(f"rollout {bad or 'elsewhere'} (reward/value/advantage)")
            return {"nonfinite": 1.0, "skipped": 1.0, "nonfinite_total": float(self.policy.nonfinite_skipped)}
        loss_fn = ppo_loss_fn(self.policy, float(p.clip_eps), float(p.entropy_coef), p.clip_eps_high)
        generator = torch.Generator().manual_seed(int(p.seed) + self.step)  # CPU permutation
        actor_metrics: list[dict[str, float]] = []
        critic_futures = []
        for epoch in range(int(p.ppo_epochs)):
            for index in ro.minibatch_indices(int(p.num_minibatches), generator):
                if epoch == 0:  # the critic sees each rollout once per PPO step
                    critic_futures.append(self.critic.train_async(ro.tokens[index], ro.returns[index],
                                                                  ro.values[index], ro.mask[index]))
                mb = ro.select(index, "tokens", "advantages", "mask")
                mb["old_logprobs"] = ro.logprobs[index]
                mb = self.policy.response_microbatch(mb, ro.prompt_lengths[index], ro.lengths[index],
                                                     ("advantages", "old_logprobs"))
                actor_metrics.append(self.policy.train_on(loss_fn, mb))
        critic_losses = self.critic.train_results(critic_futures)
        b = ro.batch_size
        metrics = {
            "reward": ro.scores.mean().item(),
            "kl": ro.kl.sum(dim=1).mean().item(),
            "response_length": ro.mask.sum(dim=1).mean().item(),
            "advantage_abs": ro.advantages.abs().sum().item() / ro.mask.sum().item(),
            "critic_loss": float(np.mean(critic_losses)) if critic_losses else 0.0,
        }
        for k in actor_metrics[0]:
            metrics[k] = float(np.mean([m[k] for m in actor_metrics]))
        metrics = dp_mean(metrics)
        metrics["kl_coef"] = float(self.kl_ctl.value)
        metrics["nonfinite_total"] = float(self.policy.nonfinite_skipped)
        self.kl_ctl.update(metrics["kl"], n_steps=b)
        return metrics

    # -------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, limit: int | None = None) -> dict[str, float]:
        """Mean reward-model score, sequence KL(actor || reference) (k1 estimate, nats per
        response) and response length of responses sampled with a fixed seed for the held-out
        prompts (the first ``limit`` batches), averaged over DP.

        With ``ppo.val_judge: vader`` also ``vader_compound`` (mean VADER compound of prompt +
        completion, in [-1, 1]), ``vader_positive`` (fraction with compound > 0.05) and
        ``vader_rm_agreement`` (fraction of samples where VADER and the reward model agree on the
        sign, the reward model's cut at its median score over the evaluation), from
        :mod:`nemo_rlhf.rewards.sentiment`. Rank 0 appends its first ``ppo.val_samples_saved``
        samples (step, prompt, completion, rm_score, vader_compound) to
        ``<run_dir>/ppo_samples.jsonl``.
        """
        p = self.cfg.ppo
        keep = int(p.val_samples_saved) if is_rank_zero() and self.tokenizer is not None else 0
        ms, samples, judged = [], [], ([], [])
        for _, b in zip(range(limit if limit else len(self.val_loader)), self.val_loader):
            ro = self.rollout(b["prompts"], b["prompt_lengths"], self.val_sampling)
            kl = (kl_penalty(ro.logprobs, ro.ref_logprobs, estimator="k1") * ro.mask).sum(dim=1)
            m = {"reward": ro.scores.mean().item(), "kl": kl.mean().item(),
                 "response_length": ro.mask.sum(dim=1).mean().item()}
            if p.val_judge or len(samples) < keep:
                prompts, completions = decode_rollouts(self.tokenizer, ro.tokens, ro.prompt_lengths, ro.lengths)
                compound = None
                if p.val_judge == "vader":
                    compound = vader_compound([a + c for a, c in zip(prompts, completions)])
                    m["vader_compound"] = float(compound.mean())
                    m["vader_positive"] = positive_fraction(compound)
                    judged[0].extend(compound.tolist())
                    judged[1].extend(ro.scores.tolist())
                for i in range(min(keep - len(samples), len(prompts))):
                    samples.append({"step": self.step, "prompt": prompts[i], "completion": completions[i],
                                    "rm_score": float(ro.scores[i]), "kl": float(kl[i]),
                                    "vader_compound": None if compound is None else float(compound[i])})
            ms.append(m)
        if samples:
            self.run_dir.mkdir(parents=True, exist_ok=True)  # a fresh run may not have written it yet
            with open(self.run_dir / "ppo_samples.jsonl", "a", encoding="utf-8") as f:
                f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        metrics = {k: sum(m[k] for m in ms) / len(ms) for k in ms[0]}
        if judged[0]:  # do VADER and the reward model call the same samples positive? (this rank's)
            metrics["vader_rm_agreement"] = judge_agreement(np.array(judged[0]), np.array(judged[1]))
        return dp_mean(metrics)

    # -------------------------------------------------------------- the stage
    def run(self) -> dict[str, Any]:
        """Set up, resume or start from ``init_from``, evaluate, train, evaluate, save.

        Returns:
            the result (also ``<run_dir>/ppo_result.json``): held-out reward/KL before and after,
            actor and critic checkpoint paths, steps, prompt counts; or the preemption result.

        Raises:
            CriticServerFailure: the critic server failed mid-run (after the emergency checkpoint).
            CriticServerError / CriticServerUnavailable: the server failed before training.
            CheckpointError: the checkpoint to resume from is unreadable (the message names it).
        """
        cfg = self.cfg
        self.setup()
        try:
            if self.resume() is None:
                load_weights(self.policy, cfg.init_from)
            gbs = int(cfg.batch.global_batch_size)
            self.train_loader = step_loader(self.train_ds, gbs, int(cfg.seed), self.step, self.max_steps,
                                            self.collate)
            self.val_loader = heldout_loader(self.val_ds, gbs // self.dp, self.collate, int(cfg.seed))
            if self.heldout_before is None:
                self.heldout_before = self.run_evaluation()
            try:
                preempted = self.fit()
            except CriticServerError as exc:
                raise self._critic_failure(exc) from exc
            if preempted:
                return preempted
            after = self.run_evaluation()
            ckpt = save_model_weights(self.policy.gpt, self.run_dir / "ppo_actor_weights")
            critic_ckpt = str((self.run_dir / "ppo_critic_weights").resolve())
            self.critic.save(critic_ckpt)  # the critic's training checkpoint; load_weights() reads its weights
        finally:
            self.critic.close()
        result = {"heldout_before": self.heldout_before, "heldout_after": after, "checkpoint": str(ckpt),
                  "critic_checkpoint": critic_ckpt, "resume_checkpoint": str(latest_checkpoint(self.checkpoint_root)),
                  "steps": self.step, "heldout_prompts": len(self.val_ds), "train_prompts": len(self.train_ds)}
        write_result(self.run_dir, "ppo_result.json", result)
        return result

    def _critic_failure(self, exc: BaseException) -> CriticServerFailure:
        """Save the actor's state (collective) as ``<checkpoint.dir>/emergency_step_<k>`` and build
        the error.

        The emergency checkpoint holds the actor only: the critic's state since the last paired
        checkpoint died with the server. It is never resumed from automatically (its name is not
        ``step_<k>``), because actor and critic would no longer match; resume continues from the
        newest paired checkpoint. The actor weights in it may include part of step k+1's updates.
        """
        server = f"{self.cfg.critic.host}:{self.cfg.critic.port}"
        path = None
        try:
            self.policy.completed_steps = self.step
            path = save_checkpoint_dir(self.checkpoint_root / f"emergency_step_{self.step:08d}", self.policy,
                                       {**self.state_dict(), "critic": None, "reason": str(exc)[:2000]})
        except Exception as save_exc:  # noqa: BLE001 - report both, the server failure first
            LOG.error("could not write the emergency actor checkpoint: %s", save_exc)
        paired = latest_checkpoint(self.checkpoint_root)
        msg = (f"critic server {server} failed at PPO step {self.step}: {exc}\n"
               f"  actor-only emergency checkpoint: {path or 'NOT WRITTEN (see the log)'}\n"
               f"  the run resumes (same command, with a running critic server) from the newest paired "
               f"actor+critic checkpoint: {paired or 'none yet: it would restart from init_from'}")
        LOG.error(msg)
        return CriticServerFailure(msg)


def run_ppo(cfg, critic=None) -> dict[str, Any]:
    """Run the PPO actor stage from a Hydra config (see :class:`PPOTrainer`); ``critic`` is an
    optional client to use instead of connecting to ``critic.host:critic.port``."""
    return PPOTrainer(load_stage_config(PPOActorStageConfig, cfg), critic).run_logged()
