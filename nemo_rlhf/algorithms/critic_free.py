"""Critic-free online RL (GRPO, Dr.GRPO, RLOO, REINFORCE++): the step shared by their trainers.

One step (:meth:`CriticFreeTrainer.train_step`), as data, on one data-parallel rank holding
``n`` prompts (whole groups: a group never crosses a rank)::

    prompts [n, P] -> repeat each num_generations (G) times, groups contiguous -> [B = n*G, P]
      -> policy.generate ................................ tokens [B, L], lengths [B]
      -> decode -> reward functions (this process) + reward-model server ... scores [B], terms
         (+ DAPO overlong penalty; DAPO dynamic sampling: drop groups of equal rewards, refill
          from further prompts, at most grpo.dynamic_sampling_max_rounds extra rounds)
      -> policy.logprobs (old) [B, L-1]; reference.logprobs only when a KL term needs it
      -> advantages [B, L-1]  (the subclass: rl.group.grpo_advantages / rloo_advantages /
                               reinforce_pp_advantages)
      -> for each epoch and mini-batch: policy.train_on(rl.grpo_policy_loss -> rl.aggregate_loss)
      -> metrics

Each algorithm is a small subclass in its own file (``grpo.py``, ``rloo.py``,
``reinforce_pp.py``) that defines :meth:`CriticFreeTrainer.advantages`; the maths is in
:mod:`nemo_rlhf.rl.group` and :mod:`nemo_rlhf.rl.losses`. ``launchers/train_grpo.py`` (config
``conf/gpt_grpo.yaml``) calls :func:`run_critic_free`, which picks the class by ``grpo.algorithm``.

Resume: the prompts of step k (and of its refill rounds) and the sampling seeds are pure
functions of (seed, k, round, DP rank), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from nemo_rlhf.algorithms.base import (Trainer, connect_critic, decode_rollouts, dp_mean, dp_shard_batches,
                                      generate_repeated, prompt_datasets, score_responses, step_loader, write_result)
from nemo_rlhf.checkpoint.training_state import latest_checkpoint
from nemo_rlhf.checkpoint.weights import load_weights, save_model_weights
from nemo_rlhf.config import (ConfigError, GRPOStageConfig, check_grpo_sizes, check_sizes, load_stage_config,
                              to_plain)
from nemo_rlhf.data import PromptDataset, collate_prompts
from nemo_rlhf.data.tokenizer import tokenizer_from_config
from nemo_rlhf.generation.sampling import SamplingParams
from nemo_rlhf.models.megatron_module import NonFiniteError
from nemo_rlhf.models.policy import GPTPolicyModel
from nemo_rlhf.models.vocab_parallel import token_logprobs
from nemo_rlhf.parallel.state import any_rank, is_rank_zero, setup_parallel
from nemo_rlhf.rewards.functions import RewardFunctionError, RewardSum, build_reward
from nemo_rlhf.rewards.sentiment import vader_judge
from nemo_rlhf.rl.advantages import response_mask
from nemo_rlhf.rl.group import dynamic_sampling_mask, overlong_penalty
from nemo_rlhf.rl.kl import kl_penalty
from nemo_rlhf.rl.losses import aggregate_loss, grpo_policy_loss
from nemo_rlhf.servers.critic_handle import CriticHandle

LOG = logging.getLogger("nemo_rlhf")

# grpo.algorithm -> "module:class" (imported on demand: each algorithm file imports this one)
TRAINERS = {"grpo": "nemo_rlhf.algorithms.grpo:GRPOTrainer", "dr_grpo": "nemo_rlhf.algorithms.grpo:GRPOTrainer",
            "rloo": "nemo_rlhf.algorithms.rloo:RLOOTrainer",
            "reinforce_pp": "nemo_rlhf.algorithms.reinforce_pp:ReinforcePPTrainer"}


@dataclass
class GroupRollout:
    """The responses of one step on this data-parallel rank: ``B = n_groups * G`` rows, the ``G``
    responses to one prompt contiguous (rows ``g*G .. g*G+G-1``). L = prompt + response length.

    Attributes:
        tokens: ``[B, L]`` int64 prompt + response, right padded.
        lengths, prompt_lengths: ``[B]`` int64 (tokens).
        scores: ``[B]`` float32 total reward (weighted reward terms + overlong penalty).
        terms: ``{name: [B] float32}`` each reward term, unweighted (logging).
        num_generations: G.
        mask: ``[B, L-1]`` float32 response positions (:func:`~nemo_rlhf.rl.advantages.response_mask`).
        logprobs: ``[B, L-1]`` float32 log-probs under the policy that sampled (the "old" policy).
        ref_logprobs: ``[B, L-1]`` float32 reference log-probs, or None (no KL term).
        kl: ``[B, L-1]`` float32 per-token KL estimate (``grpo.kl_estimator``) times ``mask``, or None.
        advantages: ``[B, L-1]`` float32 token advantages, 0 off the response.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    prompt_lengths: torch.Tensor
    scores: torch.Tensor
    terms: dict[str, torch.Tensor]
    num_generations: int
    mask: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    info: dict[str, float] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    def groups(self, index: torch.Tensor) -> "GroupRollout":
        """The rollout of the groups ``index`` (``[k]`` group numbers), in that order."""
        g = self.num_generations
        rows = (index.unsqueeze(1) * g + torch.arange(g, device=index.device)).reshape(-1)
        return GroupRollout(self.tokens[rows], self.lengths[rows], self.prompt_lengths[rows], self.scores[rows],
                            {k: v[rows] for k, v in self.terms.items()}, g)

    @staticmethod
    def cat(parts: list["GroupRollout"], pad_id: int) -> "GroupRollout":
        """Rollouts of several generation rounds concatenated (tokens right-padded with ``pad_id``
        to the longest ``L``)."""
        width = max(int(p.tokens.shape[1]) for p in parts)
        tokens = torch.cat([torch.nn.functional.pad(p.tokens, (0, width - p.tokens.shape[1]), value=pad_id)
                            for p in parts])
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        terms = {k: torch.cat([p.terms[k] for p in parts]) for k in parts[0].terms}
        return GroupRollout(tokens, cat("lengths"), cat("prompt_lengths"), cat("scores"), terms,
                            parts[0].num_generations)

    def minibatch_indices(self, num_minibatches: int, generator: torch.Generator) -> list[torch.Tensor]:
        """A random split of the B rows into ``num_minibatches`` equal index tensors (CPU
        permutation from ``generator``).

        Raises:
            ValueError: ``num_minibatches`` does not divide B.
        """
        b = self.batch_size
        if num_minibatches < 1 or b % num_minibatches:
            raise ValueError(f"grpo.num_minibatches={num_minibatches} does not divide the rollout batch {b}")
        return list(torch.randperm(b, generator=generator).to(self.tokens.device).chunk(num_minibatches))

    def first_nonfinite(self) -> str | None:
        """The first field holding a NaN/Inf on this rank, or None (agree with ``any_rank``)."""
        for name in ("scores", "logprobs", "ref_logprobs", "advantages"):
            t = getattr(self, name)
            if t is not None and not bool(torch.isfinite(t).all()):
                return name
        return None


def grpo_loss_fn(policy: GPTPolicyModel, clip_eps_low: float, clip_eps_high: float | None, beta: float,
                 aggregation: str, max_len: int | None):
    """The policy loss for :meth:`GPTPolicyModel.train_on`: the per-token clipped surrogate with
    the k3 KL term (:func:`~nemo_rlhf.rl.losses.grpo_policy_loss`; Shao et al. 2024, eq. 3;
    DAPO's asymmetric clip) reduced by :func:`~nemo_rlhf.rl.losses.aggregate_loss` (``aggregation``).

    The micro-batch holds ``tokens [b, L]``, ``old_logprobs``, ``advantages``, ``mask``
    (``ref_logprobs`` when ``beta > 0``) ``[b, L-1]``, or — with ``logit_positions``
    (:meth:`GPTPolicyModel.response_microbatch`) — the same at the response positions, ``[b, R]``.
    The aggregation runs per micro-batch and ``train_on`` averages the micro-batches: exact for the
    ``seq_mean_*`` modes when every micro-batch has the same number of rows with a response
    (always, here), a mean of micro-batch token means for ``token_mean``.
    Metrics: ``loss``, ``clipfrac``, ``clip_low_frac``, ``clip_high_frac``, ``ratio_mean``, and
    ``kl_k3`` (the loss's KL estimate) when a reference is given.
    """

    def loss_fn(mb, logits):
        lp = token_logprobs(*policy.scored_logits(mb, logits))
        per_token, stats = grpo_policy_loss(lp, mb["old_logprobs"], mb["advantages"], mb["mask"],
                                            clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high, beta=beta,
                                            ref_logprobs=mb.get("ref_logprobs"))
        loss = aggregate_loss(per_token, mb["mask"], aggregation, max_len)
        metrics = {"loss": loss, **{k: v for k, v in stats.items() if k != "kl"}}
        if "kl" in stats:
            metrics["kl_k3"] = stats["kl"]
        return loss, metrics

    return loss_fn


class CriticFreeTrainer(Trainer):
    """An online critic-free trainer: group sampling, rewards, the clipped policy loss; the
    subclass defines :meth:`advantages`.

    Holds the policy (trained), the frozen reference policy only when ``grpo.beta > 0`` or
    ``grpo.kl_coef > 0`` (else ``self.reference is None``: nothing is built), the reward
    functions (``reward.functions``) and/or the reward-model server handle
    (``reward.reward_model``), and the prompt data. Checkpoints (``checkpoint.dir``, default
    ``<run_dir>/checkpoints/grpo``) hold the policy's weights, optimizer, LR schedule and RNG, the
    step (= data position) and the held-out start point.
    """

    def __init__(self, cfg: GRPOStageConfig, critic_client=None):
        super().__init__(cfg, "grpo", metric_prefix="grpo", progress_metrics=("reward", "loss"))
        p = cfg.grpo
        self.critic_client = critic_client
        self.sampling = SamplingParams(**to_plain(p.sampling), seed=int(p.seed))
        self.val_sampling = SamplingParams(**to_plain(p.val_sampling.resolve(p.sampling)), seed=int(p.seed) + 1)
        self.heldout_before: dict[str, float] | None = None
        self.policy: GPTPolicyModel | None = None
        self.reference: GPTPolicyModel | None = None
        self.reward_fn: RewardSum | None = None
        self.critic: CriticHandle | None = None
        self.tokenizer = None
        self.train_ds = self.val_ds = None
        self.collate = None
        self.dp = 1

    # -------------------------------------------------------------- to implement
    def advantages(self, ro: GroupRollout) -> torch.Tensor:
        """Token advantages ``[B, L-1]`` float32 of ``ro`` (0 off the response), no grad."""
        raise NotImplementedError

    # -------------------------------------------------------------- set-up
    @classmethod
    def from_models(cls, cfg: GRPOStageConfig, policy: GPTPolicyModel, reference: GPTPolicyModel | None,
                    tokenizer, reward_fn: RewardSum | None = None, critic_client=None,
                    train_prompts: PromptDataset | None = None) -> "CriticFreeTrainer":
        """A trainer around models built elsewhere (tests, benchmarks): :meth:`train_step` and
        :meth:`evaluate` work without :meth:`setup` (``val_ds`` must be set for :meth:`evaluate`;
        ``train_prompts`` for dynamic-sampling refills). ``reward_fn`` None: built from
        ``reward.functions``.

        Raises:
            ValueError: ``reference`` missing while ``grpo.beta``/``grpo.kl_coef`` need one, or given
                while they do not.
        """
        if (reference is None) == cfg.grpo.uses_reference:
            raise ValueError(f"{cls.__name__}.from_models: a reference policy is needed iff grpo.beta > 0 or "
                             f"grpo.kl_coef > 0 (beta={cfg.grpo.beta}, kl_coef={cfg.grpo.kl_coef}, "
                             f"reference={'given' if reference is not None else 'None'})")
        trainer = cls(cfg, critic_client)
        trainer.policy = trainer.model = policy
        trainer.reference = reference
        trainer.tokenizer = tokenizer
        trainer.reward_fn = reward_fn if reward_fn is not None else (
            build_reward(cfg.reward.functions) if cfg.reward.functions else None)
        trainer.critic = CriticHandle(critic_client) if cfg.reward.reward_model else None
        trainer.train_ds = train_prompts
        trainer.collate = lambda b: collate_prompts(b, tokenizer.pad_id)  # noqa: E731
        return trainer

    def setup(self) -> None:
        """Parallel groups, prompts, tokenizer, rewards, the reference (only if needed), the policy."""
        cfg = self.cfg
        gbs, mbs = int(cfg.batch.global_batch_size), int(cfg.batch.micro_batch_size)
        self.dp = setup_parallel(to_plain(cfg.model), (gbs, mbs), cfg.trainer.accelerator, int(cfg.seed))
        check_sizes(cfg, self.dp)
        check_grpo_sizes(cfg, self.dp)
        self.tokenizer = tok = tokenizer_from_config(to_plain(cfg.tokenizer))
        self.train_ds, self.val_ds, self.collate = prompt_datasets(cfg.data, tok, "grpo")
        if len(self.val_ds) < self.dp:
            raise ConfigError(f"held-out split has {len(self.val_ds)} prompts, fewer than the data-parallel size "
                              f"{self.dp}: add held-out prompts (data.heldout_files / data.heldout_fraction)")
        prompts_per_step = gbs // int(cfg.grpo.num_generations)
        if len(self.train_ds) < prompts_per_step:
            raise ConfigError(f"{len(self.train_ds)} training prompts < {prompts_per_step} prompts per step "
                              f"(batch.global_batch_size={gbs} / grpo.num_generations={cfg.grpo.num_generations})")
        self.reward_fn = build_reward(cfg.reward.functions) if cfg.reward.functions else None
        if cfg.reward.reward_model:
            self.critic = CriticHandle(connect_critic(self.critic_client, cfg.critic))
        model_cfg = to_plain(cfg.model)
        if cfg.grpo.uses_reference:
            self.reference = GPTPolicyModel(model_cfg, None, tok.vocab_size, mbs, tok.eos_id, tok.pad_id)
            load_weights(self.reference, cfg.init_from)
        self.policy = self.model = GPTPolicyModel(model_cfg, to_plain(cfg.optim), tok.vocab_size, mbs,
                                                  tok.eos_id, tok.pad_id)

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "grpo_step": self.step, "heldout_before": self.heldout_before}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.heldout_before = state.get("heldout_before")

    # -------------------------------------------------------------- rewards
    def score(self, tokens: torch.Tensor, lengths: torch.Tensor,
              prompt_lengths: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The reward of each response: ``sum_k w_k * f_k(prompt, response)`` over
        ``reward.functions`` + ``reward.reward_model_weight * reward-model score``
        (:func:`~nemo_rlhf.algorithms.base.score_responses`) + the DAPO overlong penalty
        (``grpo.overlong_penalty``, eq. 13 of Yu et al. 2025, times its weight).

        Returns:
            ``(scores [B] float32, {term: [B] float32})`` on the policy's device; the terms are
            unweighted: each function by the last part of its import path, ``reward_model``,
            ``overlong_penalty``.

        Raises:
            RewardFunctionError: a reward function raised or returned a bad shape / non-finite
                value (naming it, the batch index and the value), or the reward model returned a
                non-finite score.
        """
        cfg = self.cfg
        device = tokens.device
        total, terms = score_responses(self.tokenizer, self.reward_fn, self.critic,
                                       float(cfg.reward.reward_model_weight), tokens, lengths, prompt_lengths)
        o = cfg.grpo.overlong_penalty
        if o.max_len is not None:
            pen = overlong_penalty((lengths - prompt_lengths).cpu(), int(o.max_len), int(o.cache_len)).double().numpy()
            total += float(o.weight) * pen
            terms["overlong_penalty"] = pen
        as_t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
        return as_t(total), {k: as_t(v) for k, v in terms.items()}

    # -------------------------------------------------------------- rollouts
    @torch.no_grad()
    def _generate_groups(self, prompts: torch.Tensor, prompt_lengths: torch.Tensor, params: SamplingParams,
                         num_generations: int) -> GroupRollout:
        """Generate ``num_generations`` responses per prompt (``[n, P]`` -> ``B = n*G`` rows, groups
        contiguous) and score them (:meth:`score`)."""
        gen = generate_repeated(self.policy, prompts, prompt_lengths, params, num_generations)
        scores, terms = self.score(gen.tokens, gen.lengths, gen.prompt_lengths)
        return GroupRollout(gen.tokens, gen.lengths, gen.prompt_lengths, scores, terms, num_generations)

    def _refill_prompts(self, round_: int, n: int) -> dict[str, torch.Tensor]:
        """``n`` further training prompts for dynamic-sampling round ``round_`` of this step: a
        permutation of the training prompts seeded by (seed, step, round, DP rank), so a resumed
        run draws the same ones."""
        from megatron.core import parallel_state

        rank = parallel_state.get_data_parallel_rank() if parallel_state.is_initialized() else 0
        g = torch.Generator().manual_seed(int(self.cfg.seed) * 1_000_003 + self.step * 7919 + round_ * 104_729
                                          + rank * 15_485_863)
        order = torch.randperm(len(self.train_ds), generator=g)[:n].tolist()
        order += order * ((n - len(order)) // max(len(order), 1) + 1)  # fewer prompts than asked: repeat
        return self.collate([self.train_ds[i] for i in order[:n]])

    @torch.no_grad()
    def collect(self, batch: Mapping[str, torch.Tensor]) -> GroupRollout:
        """The scored rollout of this step's prompts; with ``grpo.dynamic_sampling`` only groups
        whose rewards differ (DAPO §3.2, :func:`~nemo_rlhf.rl.group.dynamic_sampling_mask`), refilled
        from further prompts for at most ``grpo.dynamic_sampling_max_rounds`` rounds; if still short,
        the batch is filled up with dropped groups (zero group advantage, counted as
        ``filled_groups``). ``info``: ``dropped_groups`` (groups of equal rewards seen),
        ``refill_rounds``, ``filled_groups``.

        Raises:
            RewardFunctionError: from :meth:`score`.
        """
        p = self.cfg.grpo
        g = int(p.num_generations)
        n = int(batch["prompts"].shape[0])
        params = self.sampling
        ro = self._generate_groups(batch["prompts"], batch["prompt_lengths"], params, g)
        if not p.dynamic_sampling:
            return ro
        keep = dynamic_sampling_mask(ro.scores, g)
        kept, dropped = [ro.groups(torch.nonzero(keep).flatten())], [ro.groups(torch.nonzero(~keep).flatten())]
        n_kept, n_dropped, rounds = int(keep.sum()), int((~keep).sum()), 0
        while n_kept < n and rounds < int(p.dynamic_sampling_max_rounds):
            rounds += 1
            extra = self._refill_prompts(rounds, n - n_kept)
            params_r = SamplingParams(**{**params.__dict__, "seed": params.seed + 104_729 * rounds})
            more = self._generate_groups(extra["prompts"], extra["prompt_lengths"], params_r, g)
            keep = dynamic_sampling_mask(more.scores, g)
            kept.append(more.groups(torch.nonzero(keep).flatten()))
            dropped.append(more.groups(torch.nonzero(~keep).flatten()))
            n_kept += int(keep.sum())
            n_dropped += int((~keep).sum())
        filled = max(n - n_kept, 0)
        parts = [k for k in kept if k.batch_size] + [d for d in dropped if d.batch_size]
        out = GroupRollout.cat(parts, int(self.policy.pad_id)).groups(torch.arange(n))
        out.info = {"dropped_groups": float(n_dropped), "refill_rounds": float(rounds),
                    "filled_groups": float(filled)}
        return out

    @torch.no_grad()
    def add_logprobs(self, ro: GroupRollout) -> GroupRollout:
        """Response mask, old-policy and (when a reference exists) reference log-probs and the
        per-token KL ``[B, L-1]`` (``grpo.kl_estimator``, times the mask)."""
        ro.mask = response_mask(ro.prompt_lengths, ro.lengths, ro.tokens.shape[1])
        ro.logprobs = self.policy.logprobs(ro.tokens)
        if self.reference is not None:
            ro.ref_logprobs = self.reference.logprobs(ro.tokens)
            ro.kl = kl_penalty(ro.logprobs, ro.ref_logprobs, estimator=self.cfg.grpo.kl_estimator) * ro.mask
        return ro

    def _skip(self, what: str, cause: BaseException | None = None) -> dict[str, float]:
        """Skip this step's update on every rank and count it (the non-finite guard); raises
        ``NonFiniteError`` (chained from ``cause``) at ``optim.max_nonfinite_in_a_row``."""
        try:
            self.policy.record_nonfinite(what)
        except NonFiniteError as exc:
            raise exc from cause
        return {"nonfinite": 1.0, "skipped": 1.0, "nonfinite_total": float(self.policy.nonfinite_skipped)}

    # -------------------------------------------------------------- one step
    def train_step(self, batch) -> dict[str, float]:
        """One rollout batch and ``grpo.ppo_epochs x grpo.num_minibatches`` optimizer steps.

        A reward function that fails (:class:`RewardFunctionError`) or a non-finite reward /
        log-prob / advantage skips the step on every rank, counted by the non-finite guard
        (``optim.max_nonfinite_in_a_row`` in a row abort with ``NonFiniteError``, chained from the
        reward error); the error's message (function, batch index, value) is logged.
        """
        p = self.cfg.grpo
        self.sampling.seed = int(p.seed) + 7919 * self.step
        error = None
        try:
            ro = self.collect(batch)
        except RewardFunctionError as exc:
            error, ro = exc, None
        if any_rank(error is not None):
            return self._skip(f"reward ({error or 'on another rank'})", error)
        ro = self.add_logprobs(ro)
        ro.advantages = self.advantages(ro).to(torch.float32)
        bad = ro.first_nonfinite()
        if any_rank(bad is not None):
            return self._skip(f"rollout {bad or 'elsewhere'} (reward/log-prob/advantage)")
        max_len = int(p.max_len or p.sampling.max_new_tokens)
        loss_fn = grpo_loss_fn(self.policy, float(p.clip_eps_low), p.clip_eps_high, float(p.beta),
                               p.effective_loss_aggregation, max_len)
        generator = torch.Generator().manual_seed(int(p.seed) + self.step)
        names = ["tokens", "advantages", "mask"] + (["ref_logprobs"] if p.beta > 0 else [])
        step_metrics: list[dict[str, float]] = []
        for _ in range(int(p.ppo_epochs)):
            for index in ro.minibatch_indices(int(p.num_minibatches), generator):
                mb = {n: getattr(ro, n)[index] for n in names}
                mb["old_logprobs"] = ro.logprobs[index]
                mb = self.policy.response_microbatch(mb, ro.prompt_lengths[index], ro.lengths[index],
                                                     [n for n in mb if n not in ("tokens", "mask")])
                step_metrics.append(self.policy.train_on(loss_fn, mb))
        scores = ro.scores.double()
        metrics = {
            "reward": scores.mean().item(),
            "reward_std": scores.std().item() if scores.numel() > 1 else 0.0,
            "response_length": ro.mask.sum(dim=1).mean().item(),
            "advantage_abs": (ro.advantages.abs().sum() / ro.mask.sum()).item(),
            **{f"reward_{k}": v.double().mean().item() for k, v in ro.terms.items()},
            **ro.info,
        }
        if ro.kl is not None:
            metrics["kl"] = ro.kl.sum(dim=1).mean().item()
        for k in step_metrics[0]:
            metrics[k] = float(np.mean([m[k] for m in step_metrics]))
        metrics = dp_mean(metrics)
        metrics["nonfinite_total"] = float(self.policy.nonfinite_skipped)
        return metrics

    # -------------------------------------------------------------- evaluation
    def _val_batches(self, limit: int | None):
        """This DP rank's shard of the held-out prompts in batches of at most
        ``batch.global_batch_size / (dp * grpo.val_samples_per_prompt)`` prompts (the last batch may
        be smaller; every rank of a model-parallel group sees the same batches)."""
        from megatron.core import parallel_state

        dp = parallel_state.get_data_parallel_world_size() if parallel_state.is_initialized() else 1
        size = int(self.cfg.batch.global_batch_size) // (dp * int(self.cfg.grpo.val_samples_per_prompt))
        return dp_shard_batches(len(self.val_ds), size, limit)

    @torch.no_grad()
    def evaluate(self, limit: int | None = None) -> dict[str, float]:
        """Held-out mean reward: ``grpo.val_samples_per_prompt`` responses per held-out prompt,
        sampled with ``grpo.val_sampling`` over ``grpo.sampling`` (seeded ``grpo.seed + 1``, or
        greedy), scored as in training; also each reward term, the response length (tokens) and,
        when a reference policy exists, ``kl`` (sequence KL(policy || reference), k1 estimate,
        nats per response, as PPO's), averaged over DP. With ``grpo.val_judge: vader`` also
        ``vader_compound`` (mean VADER compound of prompt + response) and ``vader_positive``
        (fraction with compound > 0.05), as PPO's evaluation (:mod:`nemo_rlhf.rewards.sentiment`).
        Rank 0 appends its first ``grpo.val_samples_saved`` samples (step, prompt, response, reward) to
        ``<run_dir>/grpo_samples.jsonl``."""
        p = self.cfg.grpo
        k = int(p.val_samples_per_prompt)
        keep = int(p.val_samples_saved) if is_rank_zero() else 0
        sums: dict[str, float] = {}
        count, samples = 0, []
        for idx in self._val_batches(limit):
            b = self.collate([self.val_ds[i] for i in idx])
            gen = generate_repeated(self.policy, b["prompts"], b["prompt_lengths"], self.val_sampling, k)
            scores, terms = self.score(gen.tokens, gen.lengths, gen.prompt_lengths)
            n = int(scores.shape[0])
            rows = {"reward": scores, **{f"reward_{t}": v for t, v in terms.items()},
                    "response_length": (gen.lengths - gen.prompt_lengths).float()}
            if self.reference is not None:  # sequence KL(policy || reference), k1, nats per response (as PPO)
                mask = response_mask(gen.prompt_lengths, gen.lengths, gen.tokens.shape[1])
                lp, ref = self.policy.logprobs(gen.tokens), self.reference.logprobs(gen.tokens)
                rows["kl"] = (kl_penalty(lp, ref, estimator="k1") * mask).sum(dim=1)
            texts = None
            if p.val_judge or len(samples) < keep:
                texts = decode_rollouts(self.tokenizer, gen.tokens, gen.prompt_lengths, gen.lengths)
            compound = None
            if p.val_judge == "vader":
                judged = vader_judge(*texts)
                compound = judged["vader_compound"]
                rows.update({name: torch.as_tensor(v, dtype=torch.float64) for name, v in judged.items()})
            for name, v in rows.items():
                sums[name] = sums.get(name, 0.0) + v.double().sum().item()
            count += n
            if len(samples) < keep:
                prompts, responses = texts
                for i in range(min(keep - len(samples), n)):
                    samples.append({"step": self.step, "prompt": prompts[i], "response": responses[i],
                                    "reward": float(scores[i]),
                                    **({} if compound is None else {"vader_compound": float(compound[i])})})
        if samples:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "grpo_samples.jsonl", "a", encoding="utf-8") as f:
                f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        return dp_mean({name: s / max(count, 1) for name, s in sums.items()})

    # -------------------------------------------------------------- the stage
    def run(self) -> dict[str, Any]:
        """Set up, resume or start from ``init_from``, evaluate, train, evaluate, save.

        Returns:
            the result (also ``<run_dir>/grpo_result.json``): held-out reward before and after,
            the policy weights path, steps, prompt counts; or the preemption result.

        Raises:
            RewardFunctionError / NonFiniteError: see :meth:`train_step`.
            CheckpointError: the checkpoint to resume from is unreadable.
        """
        cfg = self.cfg
        self.setup()
        try:
            if self.resume() is None:
                load_weights(self.policy, cfg.init_from)
            g = int(cfg.grpo.num_generations)
            self.train_loader = step_loader(self.train_ds, int(cfg.batch.global_batch_size) // g, int(cfg.seed),
                                            self.step, self.max_steps, self.collate)
            if self.heldout_before is None:
                self.heldout_before = self.run_evaluation()
            preempted = self.fit()
            if preempted:
                return preempted
            after = self.run_evaluation()
            ckpt = save_model_weights(self.policy.gpt, self.run_dir / "grpo_weights")
        finally:
            if self.critic is not None:
                self.critic.close()
        result = {"algorithm": cfg.grpo.algorithm, "heldout_before": self.heldout_before, "heldout_after": after,
                  "checkpoint": str(ckpt), "resume_checkpoint": str(latest_checkpoint(self.checkpoint_root)),
                  "steps": self.step, "heldout_prompts": len(self.val_ds), "train_prompts": len(self.train_ds),
                  "reference_built": self.reference is not None}
        write_result(self.run_dir, "grpo_result.json", result)
        return result


def trainer_class(algorithm: str) -> type[CriticFreeTrainer]:
    """The trainer class of ``grpo.algorithm`` (see ``TRAINERS``).

    Raises:
        ConfigError: unknown algorithm.
    """
    if algorithm not in TRAINERS:
        raise ConfigError(f"grpo.algorithm must be one of {sorted(TRAINERS)}, got {algorithm!r}")
    module, _, name = TRAINERS[algorithm].partition(":")
    return getattr(importlib.import_module(module), name)


def run_critic_free(cfg, critic=None) -> dict[str, Any]:
    """Run the stage of ``conf/gpt_grpo.yaml`` (the trainer of ``grpo.algorithm``); ``critic`` is an
    optional reward-model client used instead of connecting to ``critic.host:critic.port``."""
    typed = load_stage_config(GRPOStageConfig, cfg)
    return trainer_class(typed.grpo.algorithm)(typed, critic).run_logged()
