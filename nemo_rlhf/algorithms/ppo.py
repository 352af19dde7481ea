"""PPO for RLHF (Ziegler et al. 2019; Ouyang et al. 2022), actor side.

One PPO step, as data (every line below is one call in :meth:`PPOActorModule.training_step`)::

    prompts [B, P] -> actor.generate -> tokens [B, L], lengths [B]
      -> critic.infer_async (remote, a future)      : values [B, L], scores [B]
      -> actor.logprobs / reference.logprobs (local, overlapping the remote call): [B, L-1]
      -> kl_penalty -> per_token_rewards -> compute_gae -> masked_whiten (over DP)
      -> critic.train (remote, in a background thread) || actor.ppo_step x mini-batches (local)
      -> KL controller update -> metrics

The critic and reward model live in a separate server process (PyTriton); this module only talks
to it through a client with ``infer_async`` / ``train`` / ``save``. Only the first rank of each
model-parallel (TP x PP) group calls the server; results are broadcast to the rest of the group.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from nemo_rlhf.generation.sampling import SamplingParams
from nemo_rlhf.models.actor import GPTActorModel
from nemo_rlhf.rl.advantages import compute_gae, per_token_rewards
from nemo_rlhf.rl.kl import build_kl_controller, kl_penalty
from nemo_rlhf.rl.masked import masked_whiten

PPO_DEFAULTS: dict[str, Any] = dict(
    rollout_micro_batch_size=8,  # sequences per forward when computing log-probs
    ppo_epochs=1,
    num_minibatches=1,  # optimizer steps per epoch over the rollout batch
    clip_eps=0.2,
    clip_eps_high=None,
    entropy_coef=0.0,
    gamma=1.0,
    lam=0.95,
    kl_estimator="k1",
    kl_controller=dict(type="adaptive", init_kl_coef=0.05, target=6.0, horizon=10000),
    whiten_advantages=True,
    reference_offload=False,  # keep the reference policy on the CPU between uses (GPU runs)
    sampling=dict(max_new_tokens=32, temperature=1.0, top_k=0, top_p=1.0),
    val_sampling=dict(),  # overrides of `sampling` for held-out evaluation (seeded identically)
    seed=1234,
)


def response_mask(prompt_lengths: torch.Tensor, lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[B, L-1]`` float32 mask of log-prob positions that score response tokens.

    Position t scores token t+1, so a row with prompt length P and total length Lr has response
    positions ``P-1 <= t <= Lr-2``.
    """
    t = torch.arange(seq_len - 1, device=lengths.device).unsqueeze(0)
    return ((t >= prompt_lengths.unsqueeze(1) - 1) & (t <= lengths.unsqueeze(1) - 2)).float()


@dataclass
class Rollout:
    """One batch of experience. Shapes: B rollouts, L = prompt + response budget.

    tokens ``[B, L]`` int64; lengths, prompt_lengths ``[B]`` int64; scores ``[B]`` reward-model
    scores; values ``[B, L]`` critic values (server layout); logprobs, ref_logprobs, mask, kl,
    rewards, advantages, returns ``[B, L-1]`` float32.
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


def _mp_group_info():
    from megatron.core import parallel_state

    group = parallel_state.get_model_parallel_group()
    size = torch.distributed.get_world_size(group) if torch.distributed.is_initialized() else 1
    src = torch.distributed.get_global_rank(group, 0) if size > 1 else 0
    return group, size, src


def _is_server_caller() -> bool:
    """True on the rank of each TP x PP group that talks to the critic server."""
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_pipeline_model_parallel_rank() == 0)


def _broadcast_mp(tensor: torch.Tensor) -> torch.Tensor:
    """Broadcast from the server-calling rank to its TP x PP group (on the collective device)."""
    from nemo_rlhf.parallel.state import comm_device

    group, size, src = _mp_group_info()
    if size > 1:
        buf = tensor.to(comm_device()).contiguous()
        torch.distributed.broadcast(buf, src=src, group=group)
        return buf.to(tensor.device)
    return tensor


def raise_if_any_rank_failed(error: BaseException | None, what: str) -> None:
    """Make a critic-server failure seen by one rank (the server caller) an error on every rank.

    Only the server-calling ranks talk to the server; without this, the others would block forever
    in the next collective. One all-reduce over the world.

    Raises:
        ``error`` on the rank that had it; :class:`CriticServerError` naming ``what`` elsewhere.
    """
    from nemo_rlhf.parallel.state import any_rank
    from nemo_rlhf.servers.protocol import CriticServerError

    failed = any_rank(error is not None)
    if error is not None:
        raise error
    if failed:
        raise CriticServerError(f"{what} failed on another rank (its log names the server and the cause); "
                                f"all ranks stop together")


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


class PPOActorModule(GPTActorModel):
    """The PPO actor as a LightningModule: each ``training_step`` is one PPO step on a batch of
    prompts (``{"prompts": [B, P], "prompt_lengths": [B]}``; B = rollout batch per DP rank).

    Args:
        model_cfg, optim_cfg, vocab_size, micro_batch_size, eos_id, pad_id: as
            :class:`~nemo_rlhf.models.actor.GPTActorModel`.
        ppo_cfg: keys of :data:`PPO_DEFAULTS`.
        critic: client of the critic/reward server (``infer_async``, ``infer``, ``train``,
            ``save``); used on the server-calling rank only (others may pass None).
        reference: the frozen reference policy (an ``optim_cfg=None`` actor with the SFT weights).
    """

    def __init__(self, model_cfg, optim_cfg, vocab_size: int, micro_batch_size: int, eos_id: int,
                 pad_id: int, ppo_cfg: Mapping[str, Any], critic, reference: GPTActorModel):
        super().__init__(model_cfg, optim_cfg, vocab_size, micro_batch_size, eos_id, pad_id)
        self.ppo_cfg = {**PPO_DEFAULTS, **dict(ppo_cfg)}
        self.sampling = SamplingParams(**{**PPO_DEFAULTS["sampling"], **dict(self.ppo_cfg["sampling"])},
                                       seed=int(self.ppo_cfg["seed"]))
        self.val_sampling = SamplingParams(**{**PPO_DEFAULTS["sampling"], **dict(self.ppo_cfg["sampling"]),
                                              **dict(self.ppo_cfg["val_sampling"])},
                                           seed=int(self.ppo_cfg["seed"]) + 1)
        self.kl_ctl = build_kl_controller(self.ppo_cfg["kl_controller"])
        self.critic = critic
        # Remote server: one rank per TP x PP group calls it and broadcasts. In-process critic:
        # every rank calls it (collectively), synchronously.
        self._critic_in_process = bool(getattr(critic, "in_process", False))
        self.reference = reference
        self.ppo_step_count = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="critic-train")
        self.last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers
    def _reference_logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        offload = bool(self.ppo_cfg["reference_offload"]) and torch.cuda.is_available()
        if offload:
            self.reference.to(torch.cuda.current_device())
        try:
            return self.reference.logprobs(tokens)
        finally:
            if offload:
                self.reference.to("cpu")

    def _critic_infer_async(self, tokens: torch.Tensor, lengths: torch.Tensor):
        if self._critic_in_process or _is_server_caller():
            return self.critic.infer_async(tokens.cpu().numpy(), lengths.cpu().numpy())
        return None

    def _critic_results(self, future, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        from nemo_rlhf.servers.protocol import CriticServerError

        b, length = shape
        dev = self.model_device
        error = None
        if future is not None:
            try:
                values_np, scores_np = future.result()
            except CriticServerError as exc:
                error = exc
        if self._critic_in_process and error is not None:
            raise error
        if not self._critic_in_process:
            raise_if_any_rank_failed(error, "critic_infer")
        if future is not None:
            values = torch.from_numpy(np.array(values_np, dtype=np.float32, copy=True)).to(dev)
            scores = torch.from_numpy(np.array(scores_np, dtype=np.float32, copy=True)).reshape(b).to(dev)
        else:
            values = torch.empty(b, length, dtype=torch.float32, device=dev)
            scores = torch.empty(b, dtype=torch.float32, device=dev)
        if self._critic_in_process:
            return values, scores
        return _broadcast_mp(values), _broadcast_mp(scores)

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def make_rollout(self, prompts: torch.Tensor, prompt_lengths: torch.Tensor,
                     params: SamplingParams) -> Rollout:
        """Generate, then score with the critic server while computing actor/reference log-probs."""
        gen = self.generate(prompts, prompt_lengths, params)
        tokens, lengths = gen.tokens, gen.lengths
        future = self._critic_infer_async(tokens, lengths)  # overlaps the two forwards below
        logprobs = self.logprobs(tokens)
        ref_logprobs = self._reference_logprobs(tokens)
        values, scores = self._critic_results(future, tuple(tokens.shape))
        mask = response_mask(gen.prompt_lengths, lengths, tokens.shape[1])
        return Rollout(tokens, lengths, gen.prompt_lengths, scores, values, logprobs, ref_logprobs, mask)

    def compute_advantages(self, ro: Rollout) -> Rollout:
        """KL-penalised per-token rewards, GAE advantages and returns (whitened over DP)."""
        from megatron.core import parallel_state

        c = self.ppo_cfg
        ro.kl = kl_penalty(ro.logprobs, ro.ref_logprobs, estimator=c["kl_estimator"]) * ro.mask
        ro.rewards = per_token_rewards(ro.scores, ro.kl, ro.mask, float(self.kl_ctl.value))
        ro.advantages, ro.returns = compute_gae(ro.rewards, ro.values[:, :-1], ro.mask,
                                                float(c["gamma"]), float(c["lam"]))
        if c["whiten_advantages"]:
            group = (parallel_state.get_data_parallel_group()
                     if parallel_state.get_data_parallel_world_size() > 1 else None)
            ro.advantages = masked_whiten(ro.advantages, ro.mask, group=group)
        return ro

    # ------------------------------------------------------------------ training
    def _critic_train_async(self, ro: Rollout, index: torch.Tensor):
        if not (self._critic_in_process or _is_server_caller()):
            return None
        b, length = ro.tokens.shape
        pad = torch.zeros(len(index), 1, device=ro.returns.device)
        returns = torch.cat([ro.returns[index], pad], dim=1).cpu().numpy()
        mask = torch.cat([ro.mask[index], pad], dim=1).cpu().numpy()
        args = (ro.tokens[index].cpu().numpy(), returns, ro.values[index].cpu().numpy(), mask)
        if not self._critic_in_process:
            return self._pool.submit(self.critic.train, *args)
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result(self.critic.train(*args))  # in-process critic: no overlap
        return done

    def _rollout_finite(self, ro: Rollout) -> str | None:
        """None if the rollout's rewards, values, log-probs and advantages are finite on every
        rank, else the name of the first non-finite one on this rank ("elsewhere" if only another
        rank's is). One all-reduce over the world, so every rank takes the same branch."""
        bad = next((name for name in ("scores", "values", "logprobs", "ref_logprobs", "advantages", "returns")
                    if not bool(torch.isfinite(getattr(ro, name)).all())), None)
        from nemo_rlhf.parallel.state import any_rank

        return (bad or "elsewhere") if any_rank(bad is not None) else None

    def training_step(self, batch, batch_idx):
        c = self.ppo_cfg
        self.sampling.seed = int(c["seed"]) + 7919 * self.ppo_step_count
        ro = self.compute_advantages(self.make_rollout(batch["prompts"], batch["prompt_lengths"],
                                                       self.sampling))
        bad = self._rollout_finite(ro)
        if bad is not None:
            # Skip the whole PPO step: no actor update, no critic training, no KL-controller update.
            self.ppo_step_count += 1
            self.record_nonfinite(f"rollout {bad} (reward/value/advantage)")
            self.last_metrics = {"nonfinite": 1.0, "skipped": 1.0}
            self.log_dict({"ppo/nonfinite": 1.0, "ppo/nonfinite_total": float(self.nonfinite_skipped)},
                          on_step=True, batch_size=1)
            return None
        b = ro.tokens.shape[0]
        n_mb = int(c["num_minibatches"])
        if b % n_mb:
            raise ValueError(f"ppo.num_minibatches={n_mb} does not divide the rollout batch {b}")
        gen = torch.Generator().manual_seed(int(c["seed"]) + self.ppo_step_count)  # CPU permutation
        actor_metrics: list[dict[str, float]] = []
        critic_futures = []
        for epoch in range(int(c["ppo_epochs"])):
            order = torch.randperm(b, generator=gen).to(ro.tokens.device)
            for index in order.chunk(n_mb):
                if epoch == 0:  # the critic sees each rollout once per PPO step
                    critic_futures.append(self._critic_train_async(ro, index))
                mb = {"tokens": ro.tokens[index], "old_logprobs": ro.logprobs[index],
                      "advantages": ro.advantages[index], "mask": ro.mask[index]}
                actor_metrics.append(self.ppo_step(mb, float(c["clip_eps"]), float(c["entropy_coef"]),
                                                   c["clip_eps_high"]))
        from nemo_rlhf.servers.protocol import CriticServerError

        critic_losses, error = [], None
        for f in critic_futures:
            if f is None:
                continue
            try:
                critic_losses.append(f.result()["loss"])
            except CriticServerError as exc:
                error = error or exc
        if self._critic_in_process and error is not None:
            raise error
        if not self._critic_in_process:
            raise_if_any_rank_failed(error, "critic_train")
        seq_kl = (ro.kl.sum(dim=1)).mean().item()
        metrics = {
            "reward": ro.scores.mean().item(),
            "kl": seq_kl,
            "response_length": ro.mask.sum(dim=1).mean().item(),
            "advantage_abs": ro.advantages.abs().sum().item() / ro.mask.sum().item(),
            "critic_loss": float(np.mean(critic_losses)) if critic_losses else 0.0,
        }
        for k in actor_metrics[0]:
            metrics[k] = float(np.mean([m[k] for m in actor_metrics]))
        metrics = dp_mean(metrics)
        metrics["kl_coef"] = float(self.kl_ctl.value)
        metrics["nonfinite_total"] = float(self.nonfinite_skipped)
        self.kl_ctl.update(metrics["kl"], n_steps=b)
        self.ppo_step_count += 1
        self.last_metrics = metrics
        self.log_dict({f"ppo/{k}": v for k, v in metrics.items()}, on_step=True, batch_size=1)
        return None

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate_prompts(self, prompts: torch.Tensor, prompt_lengths: torch.Tensor) -> dict[str, float]:
        """Mean reward-model score and mean sequence KL(actor || reference) (k1 estimate, nats per
        response) of responses sampled for held-out prompts with a fixed seed."""
        ro = self.make_rollout(prompts, prompt_lengths, self.val_sampling)
        kl = (kl_penalty(ro.logprobs, ro.ref_logprobs, estimator="k1") * ro.mask).sum(dim=1)
        return {"reward": ro.scores.mean().item(), "kl": kl.mean().item(),
                "response_length": ro.mask.sum(dim=1).mean().item(), "count": float(len(ro.scores))}

    def validation_step(self, batch, batch_idx):
        m = self.evaluate_prompts(batch["prompts"], batch["prompt_lengths"])
        n = int(m.pop("count"))
        for k, v in dp_mean(m).items():
            self.log(f"val/{k}", v, on_epoch=True, batch_size=n)

    def teardown(self, stage: str) -> None:
        self._pool.shutdown(wait=True)
