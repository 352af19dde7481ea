"""ILQL (Snell et al. 2022, "Offline RL for Natural Language Generation with Implicit Language Q
Learning"; trlX's ``AccelerateILQLTrainer``): offline RL from ``{prompt, response, reward}`` rows.

One step (:meth:`ILQLTrainer.train_step`), as data, on one data-parallel rank::

    offline rows -> tokens [B, S] (prompt + response + eos), prompt_lengths, lengths [B],
                    rewards [B] (standardised over the data set, ilql.normalize_rewards)
      -> rl.advantages.response_mask ......... mask [B, S-1] (actions: response tokens + eos)
      -> rl.ilql.terminal_rewards ............ per-token rewards [B, S-1] (reward at the last action)
      -> model.train_with_heads(ilql_loss_fn): one trunk forward -> LM logits [B, S, V] and the
         heads' Q [B, S, V], target Q of the taken actions [B, S-1], V [B, S]  (models/ilql.py)
         -> rl.ilql.ilql_loss: L_Q + L_V(tau) + cql_scale L_CQL + awac_scale L_AWAC -> one
            optimizer step (trunk, LM head, Q and V heads)
      -> every ilql.steps_for_target_q_sync steps: target Q heads <- alpha Q + (1 - alpha) target

Evaluation (:meth:`ILQLTrainer.evaluate`) decodes the held-out prompts with the shifted logits
``log_softmax(logits) + beta (min target Q - V)`` and ``ilql.sampling.top_k``
(:meth:`~nemo_rlhf.models.ilql.GPTILQLModel.generate_ilql`) and scores the responses with
``reward.functions`` (randomwalks: ``RandomWalkReward``, the optimality) and, with
``ilql.val_judge: vader``, VADER (IMDB: the positive fraction of prompt + response, never a
training signal); ``ilql.eval_betas``
adds the same at other betas (0: the trained LM head alone, i.e. behaviour cloning through the
AWAC term). The result sets these beside the behaviour data's own mean reward.

Resume: the rows of step k are a pure function of (seed, k) (``StepBatchSampler``), the target
heads are part of the model's checkpoint, and their sync cadence counts global steps, so a resumed
run repeats an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping

import numpy as np
import torch

from nemo_rlhf.algorithms.base import Trainer, decode_rollouts, dp_mean, step_loader, write_result
from nemo_rlhf.checkpoint.training_state import latest_checkpoint
from nemo_rlhf.checkpoint.weights import load_weights, save_model_weights
from nemo_rlhf.config import ConfigError, ILQLStageConfig, check_sizes, load_stage_config, to_plain
from nemo_rlhf.data import PromptDataset, collate_prompts
from nemo_rlhf.data.imdb import review_prompts
from nemo_rlhf.data.offline import OfflineDataset, collate_offline, imdb_offline_rows, load_offline_rows
from nemo_rlhf.data.tasks import data_files, load_prompt_rows, load_split_rows
from nemo_rlhf.data.tokenizer import tokenizer_from_config
from nemo_rlhf.generation.sampling import SamplingParams
from nemo_rlhf.models.ilql import HEADS_PREFIX, GPTILQLModel
from nemo_rlhf.models.policy import mask_padded_vocab
from nemo_rlhf.models.vocab_parallel import token_logprobs, vocab_parallel_gather
from nemo_rlhf.parallel.state import is_rank_zero, setup_parallel
from nemo_rlhf.rewards.functions import RewardSum, build_reward
from nemo_rlhf.rewards.sentiment import vader_judge
from nemo_rlhf.rl.advantages import response_mask
from nemo_rlhf.rl.ilql import gather_actions, ilql_loss, standardize_rewards, terminal_rewards

LOG = logging.getLogger("nemo_rlhf")


def ilql_loss_fn(model: GPTILQLModel, tau: float, gamma: float, cql_scale: float, awac_scale: float,
                 awac_beta: float = 0.0):
    """The loss for :meth:`GPTILQLModel.train_with_heads`: :func:`~nemo_rlhf.rl.ilql.ilql_loss` of
    the micro-batch ``tokens [b, S]``, ``mask`` and ``token_rewards`` ``[b, S-1]`` (float32).

    Q over the vocabulary has its padding columns set to -1e9 (so CQL's softmax ignores them).
    Under tensor parallelism the logits and Q arrive as ``[b, S, V/TP]`` vocabulary slices: the
    log-probs (AWAC), the CQL cross-entropy (:func:`~nemo_rlhf.models.vocab_parallel.token_logprobs`
    of Q) and Q(s, a) (:func:`~nemo_rlhf.models.vocab_parallel.vocab_parallel_gather`) are computed
    vocabulary-parallel, without gathering the vocabulary; with TP = 1, the whole-vocabulary maths
    of :mod:`nemo_rlhf.rl.ilql` (the same values up to float rounding, tools/parity.py role ``ilql``).
    Metrics: ``loss``, ``loss_q``, ``loss_v``, ``loss_cql``, ``loss_awac``, ``q_mean``, ``v_mean``,
    ``target_q_mean``."""
    from megatron.core import parallel_state

    vocab = model.gpt.unpadded_vocab_size if hasattr(model.gpt, "unpadded_vocab_size") else None
    tp = parallel_state.get_tensor_model_parallel_world_size()

    def loss_fn(mb, logits, heads):
        qs_all, target_all, values = heads
        tokens = mb["tokens"]
        actions = tokens[:, 1:]
        logprobs = model.response_logprobs(model.masked_logits(logits), tokens)
        q_vocab = [mask_padded_vocab(q[:, :-1], vocab) for q in qs_all]
        target_qs = list(target_all)  # [b, S-1]: the target heads give Q of the taken actions only
        if tp == 1:
            qs = [gather_actions(q, actions) for q in q_vocab]
            cql_ce = None
        else:
            qs = [vocab_parallel_gather(q, actions) for q in q_vocab]
            cql_ce = [-token_logprobs(q.contiguous(), actions) for q in q_vocab]
        loss, stats = ilql_loss(logprobs, qs, target_qs, q_vocab, values, actions, mb["token_rewards"], mb["mask"],
                                tau=tau, gamma=gamma, cql_scale=cql_scale, awac_scale=awac_scale,
                                awac_beta=awac_beta, cql_ce=cql_ce)
        return loss, {"loss": loss, **stats}

    return loss_fn


class ILQLTrainer(Trainer):
    """Offline ILQL on ``{prompt, response, reward}`` rows (module docstring).

    Holds the ILQL policy (:class:`~nemo_rlhf.models.ilql.GPTILQLModel`: trunk, LM head, Q / target
    Q / V heads), the offline data set, the held-out prompts and the reward functions that score
    held-out responses. Checkpoints (``checkpoint.dir``, default ``<run_dir>/checkpoints/ilql``)
    hold the model (heads and target heads included), optimizer, LR schedule, RNG, the step and the
    held-out start point.
    """

    def __init__(self, cfg: ILQLStageConfig):
        super().__init__(cfg, "ilql", metric_prefix="ilql", progress_metrics=("loss", "loss_awac"))
        p = cfg.ilql
        self.val_sampling = SamplingParams(**to_plain(p.sampling), seed=int(p.seed) + 1)
        self.heldout_before: dict[str, float] | None = None
        self.behaviour: dict[str, float] = {}
        self.model: GPTILQLModel | None = None
        self.reward_fn: RewardSum | None = None
        self.tokenizer = None
        self.train_ds: OfflineDataset | None = None
        self.val_ds: PromptDataset | None = None
        self.collate = None
        self.dp = 1

    # -------------------------------------------------------------- set-up
    @staticmethod
    def load_rows(cfg: ILQLStageConfig, tokenizer) -> tuple[list, list[str]]:
        """The offline rows and the held-out prompts of ``data.dataset``.

        ``jsonl``: ``{prompt, response, reward}`` rows of ``data.files``
        (:func:`~nemo_rlhf.data.offline.load_offline_rows`) and the prompts of
        ``data.heldout_files``. ``imdb``: the train reviews of ``data.files`` cut into (prompt,
        response of ``ilql.sampling.max_new_tokens`` tokens) windows (``ilql.imdb_window``)
        rewarded by their label (:func:`~nemo_rlhf.data.offline.imdb_offline_rows`), and the
        openings of the held-out reviews (:func:`~nemo_rlhf.data.imdb.review_prompts`, as the online
        stages cut them). Both: at most ``data.max_heldout_prompts`` held-out prompts.

        Raises:
            DataFormatError: a bad row (a bad reward always; others under ``data.on_error=error``).
            ConfigError: no usable offline row.
        """
        d = cfg.data
        if d.dataset == "imdb":
            train, heldout, stats = load_split_rows(d)
            k = (int(d.prompt_tokens_min), int(d.prompt_tokens_max))
            rows = imdb_offline_rows(train, tokenizer, *k, int(cfg.ilql.sampling.max_new_tokens),
                                     seed=int(d.split_seed), window=cfg.ilql.imdb_window)
            prompts = review_prompts(heldout, tokenizer, *k, seed=int(d.split_seed) + 1)
        else:
            rows, stats = load_offline_rows(data_files(d), on_error=d.on_error, max_rows=d.max_rows)
            held, _ = load_prompt_rows(data_files(d, "heldout_files"), on_error=d.on_error,
                                       max_rows=d.max_heldout_rows)
            prompts = [r.prompt for r in held]
        if not rows:
            raise ConfigError(f"data.files {list(d.files)} hold no usable offline row ({stats.summary()})")
        if d.max_heldout_prompts:
            prompts = prompts[: int(d.max_heldout_prompts)]
        return rows, prompts

    @staticmethod
    def offline_dataset(cfg: ILQLStageConfig, tokenizer, rows: list | None = None
                        ) -> tuple[OfflineDataset, dict[str, float], list]:
        """The offline rows (``rows``, or those of ``data.files``: :meth:`load_rows`) tokenized,
        rewards standardised when ``ilql.normalize_rewards``; and the behaviour data's reward
        summary (``mean``, ``std``, rows).

        Raises:
            DataFormatError: a row with a missing / non-finite reward (file and line), or another bad
                row under ``data.on_error=error``.
            ConfigError: no usable row.
        """
        d = cfg.data
        if rows is None:
            rows = ILQLTrainer.load_rows(cfg, tokenizer)[0]
        raw = torch.tensor([r.reward for r in rows], dtype=torch.float64)
        rewards = standardize_rewards(raw) if cfg.ilql.normalize_rewards else raw
        ds = OfflineDataset(rows, tokenizer, int(d.max_seq_len), int(d.max_prompt_len), d.overlong,
                            rewards=rewards.tolist())
        if not len(ds):
            raise ConfigError(f"no offline row fits data.max_seq_len={d.max_seq_len} / data.max_prompt_len="
                              f"{d.max_prompt_len} ({dict(ds.stats)})")
        summary = {"mean": float(raw.mean()), "std": float(raw.std()) if raw.numel() > 1 else 0.0,
                   "rows": float(len(rows))}
        LOG.info("ilql offline rows: %d read, %d kept after tokenizing (%s); behaviour reward mean %.4f",
                 len(rows), len(ds), dict(ds.stats), summary["mean"])
        return ds, summary, rows

    def setup(self) -> None:
        """Parallel groups, tokenizer, offline data, held-out prompts, reward functions, the model."""
        cfg = self.cfg
        gbs, mbs = int(cfg.batch.global_batch_size), int(cfg.batch.micro_batch_size)
        self.dp = setup_parallel(to_plain(cfg.model), (gbs, mbs), cfg.trainer.accelerator, int(cfg.seed))
        check_sizes(cfg, self.dp)
        self.tokenizer = tok = tokenizer_from_config(to_plain(cfg.tokenizer))
        rows, prompts = self.load_rows(cfg, tok)
        self.train_ds, self.behaviour, rows = self.offline_dataset(cfg, tok, rows)
        self.val_ds = PromptDataset(prompts, tok, int(cfg.data.max_prompt_len), cfg.data.overlong)
        if len(self.val_ds) < self.dp:
            raise ConfigError(f"data.heldout_files hold {len(self.val_ds)} prompts, fewer than the data-parallel "
                              f"size {self.dp}")
        self.behaviour.update(self.behaviour_on_heldout(rows))
        self.reward_fn = build_reward(cfg.reward.functions) if cfg.reward.functions else None
        self.collate = lambda b: collate_prompts(b, tok.pad_id)  # noqa: E731
        p = cfg.ilql
        self.model = GPTILQLModel(to_plain(cfg.model), to_plain(cfg.optim), tok.vocab_size, mbs, tok.eos_id,
                                  tok.pad_id, two_qs=bool(p.two_qs), head_init_std=p.head_init_std,
                                  q_head=p.q_head, q_zero_start=bool(p.q_zero_start))

    def behaviour_on_heldout(self, rows) -> dict[str, float]:
        """``{"mean_heldout_prompts": ...}``: the behaviour data's mean reward over its rows whose
        prompt is a held-out prompt (``self.val_ds``), the figure the held-out decoding is compared
        with; empty when no row starts there."""
        held = set(self.val_ds.texts)
        on_held = [r.reward for r in rows if r.prompt in held]
        return {"mean_heldout_prompts": float(np.mean(on_held))} if on_held else {}

    @classmethod
    def from_models(cls, cfg: ILQLStageConfig, model: GPTILQLModel, tokenizer, train_ds: OfflineDataset,
                    val_ds: PromptDataset, reward_fn: RewardSum | None = None) -> "ILQLTrainer":
        """A trainer around a model and data built elsewhere (tests): :meth:`train_step` and
        :meth:`evaluate` work without :meth:`setup`."""
        trainer = cls(cfg)
        trainer.model = model
        trainer.tokenizer = tokenizer
        trainer.train_ds, trainer.val_ds = train_ds, val_ds
        trainer.reward_fn = reward_fn if reward_fn is not None else (
            build_reward(cfg.reward.functions) if cfg.reward.functions else None)
        trainer.collate = lambda b: collate_prompts(b, tokenizer.pad_id)  # noqa: E731
        return trainer

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "heldout_before": self.heldout_before}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.heldout_before = state.get("heldout_before")

    # -------------------------------------------------------------- one step
    def train_step(self, batch) -> dict[str, float]:
        """One optimizer step of the ILQL loss on ``batch`` (:func:`collate_offline`), then the
        target-head sync when ``(step + 1) % ilql.steps_for_target_q_sync == 0`` (not after a step
        skipped by the non-finite guard). Metrics: the loss terms, ``reward`` (mean of the batch's
        rewards as trained on), ``response_length``, ``target_synced``, ``grad_norm``, ``lr``."""
        p = self.cfg.ilql
        tokens = batch["tokens"].to(self.model.model_device)
        mask = response_mask(batch["prompt_lengths"].to(tokens.device), batch["lengths"].to(tokens.device),
                             tokens.shape[1])
        token_rewards = terminal_rewards(batch["rewards"].to(tokens.device), mask)
        loss_fn = ilql_loss_fn(self.model, float(p.tau), float(p.gamma), float(p.cql_scale), float(p.awac_scale),
                               float(p.awac_beta))
        metrics = self.model.train_with_heads(loss_fn, {"tokens": tokens, "mask": mask,
                                                        "token_rewards": token_rewards})
        synced = 0.0
        if not metrics.get("skipped") and (self.step + 1) % int(p.steps_for_target_q_sync) == 0:
            self.model.sync_target_heads(float(p.alpha))
            synced = 1.0
        extra = dp_mean({"reward": batch["rewards"].double().mean().item(),
                         "response_length": mask.sum(dim=1).mean().item()})
        return {**metrics, **extra, "target_synced": synced,
                "nonfinite_total": float(self.model.nonfinite_skipped)}

    # -------------------------------------------------------------- evaluation
    def _val_batches(self, limit: int | None) -> list[list[int]]:
        """This DP rank's shard of the held-out prompts in batches of at most
        ``batch.global_batch_size / (dp * ilql.val_samples_per_prompt)`` prompts."""
        from megatron.core import parallel_state

        dp = parallel_state.get_data_parallel_world_size() if parallel_state.is_initialized() else 1
        rank = parallel_state.get_data_parallel_rank() if parallel_state.is_initialized() else 0
        n = len(self.val_ds) // dp * dp
        mine = list(range(rank, n, dp))
        size = max(1, int(self.cfg.batch.global_batch_size) // (dp * int(self.cfg.ilql.val_samples_per_prompt)))
        batches = [mine[i: i + size] for i in range(0, len(mine), size)]
        return batches[:limit] if limit else batches

    def _score(self, tokens: torch.Tensor, lengths: torch.Tensor, prompt_lengths: torch.Tensor):
        """Per-sample scores ``{name: [b] float64}`` of decoded responses: ``reward`` and
        ``reward_<term>`` (``reward.functions``, when set), ``vader_compound`` / ``vader_positive``
        of prompt + response (``ilql.val_judge: vader``); and the decoded prompts, responses."""
        prompts, responses = decode_rollouts(self.tokenizer, tokens, prompt_lengths, lengths)
        rows: dict[str, np.ndarray] = {}
        if self.reward_fn is not None and self.reward_fn.functions:
            total, terms = self.reward_fn.weighted(prompts, responses)
            rows["reward"] = total
            rows.update({f"reward_{name.rsplit('.', 1)[-1]}": np.asarray(v, dtype=np.float64)
                         for name, v in terms.items()})
        if self.cfg.ilql.val_judge == "vader":
            rows.update(vader_judge(prompts, responses))
        return rows, prompts, responses

    @torch.no_grad()
    def heldout_rewards(self, beta: float, limit: int | None = None, save: bool = False) -> dict[str, float]:
        """Means over the held-out responses (:meth:`_score`'s ``reward``, ``reward_<term>``,
        ``vader_*``; ``response_length`` in tokens) of ``ilql.val_samples_per_prompt`` responses per
        held-out prompt decoded at ``beta`` (seeded ``ilql.seed + 1``: every evaluation draws the
        same way), averaged over DP."""
        k = int(self.cfg.ilql.val_samples_per_prompt)
        keep = int(self.cfg.ilql.val_samples_saved) if (save and is_rank_zero()) else 0
        sums: dict[str, float] = {}
        count, samples = 0, []
        for idx in self._val_batches(limit):
            b = self.collate([self.val_ds[i] for i in idx])
            rep = lambda t: t.repeat_interleave(k, dim=0)  # noqa: E731
            gen = self.model.generate_ilql(rep(b["prompts"]), rep(b["prompt_lengths"]), self.val_sampling, beta)
            scores, prompts, responses = self._score(gen.tokens, gen.lengths, gen.prompt_lengths)
            rows = {**scores, "response_length": (gen.lengths - gen.prompt_lengths).double().cpu().numpy()}
            for name, v in rows.items():
                sums[name] = sums.get(name, 0.0) + float(np.sum(v))
            count += len(prompts)
            for i in range(min(keep - len(samples), len(prompts))):
                samples.append({"step": self.step, "beta": beta, "prompt": prompts[i], "response": responses[i],
                                **{name: float(scores[name][i]) for name in ("reward", "vader_compound")
                                   if name in scores}})
        if samples:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "ilql_samples.jsonl", "a", encoding="utf-8") as f:
                f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        return dp_mean({name: s / max(count, 1) for name, s in sums.items()})

    def evaluate(self, limit: int | None = None) -> dict[str, float]:
        """Held-out decoding at ``ilql.beta`` (:meth:`heldout_rewards`) and, for each other beta
        of ``ilql.eval_betas``, ``reward_beta<b>`` (with ``reward.functions``) and
        ``vader_positive_beta<b>`` (with ``ilql.val_judge: vader``). Samples (``ilql_samples.jsonl``,
        each with its ``beta``) are kept at ``ilql.beta`` and at beta 0."""
        p = self.cfg.ilql
        out = self.heldout_rewards(float(p.beta), limit, save=True)
        for b in p.eval_betas:
            if float(b) != float(p.beta):
                other = self.heldout_rewards(float(b), limit, save=float(b) == 0.0)  # beta 0: the policy alone
                for name in ("reward", "vader_positive"):
                    if name in other:
                        out[f"{name}_beta{b:g}"] = other[name]
        return out

    # -------------------------------------------------------------- the stage
    def run(self) -> dict[str, Any]:
        """Set up, resume or start (from ``init_from`` or a random init), evaluate, train, evaluate,
        save the weights (``<run_dir>/ilql_weights``, heads included).

        Returns:
            the result (also ``<run_dir>/ilql_result.json``): the behaviour data's reward, held-out
            rewards before and after, weights path, steps; or the preemption result.

        Raises:
            DataFormatError: a bad offline row (see :meth:`offline_dataset`).
            NonFiniteError: ``optim.max_nonfinite_in_a_row`` skipped steps in a row.
            CheckpointError: the checkpoint to resume from is unreadable.
        """
        cfg = self.cfg
        self.setup()
        if self.resume() is None and cfg.init_from:
            load_weights(self.model, cfg.init_from, skip_prefixes=(HEADS_PREFIX,))
        collate = lambda b: collate_offline(b, self.tokenizer.pad_id)  # noqa: E731
        self.train_loader = step_loader(self.train_ds, int(cfg.batch.global_batch_size), int(cfg.seed), self.step,
                                        self.max_steps, collate)
        if self.heldout_before is None:
            self.heldout_before = self.run_evaluation()
        preempted = self.fit()
        if preempted:
            return preempted
        after = self.run_evaluation()
        ckpt = save_model_weights(self.model.gpt, self.run_dir / "ilql_weights")
        result = {"behaviour_reward": self.behaviour, "heldout_before": self.heldout_before, "heldout_after": after,
                  "beta": float(cfg.ilql.beta), "checkpoint": str(ckpt),
                  "resume_checkpoint": str(latest_checkpoint(self.checkpoint_root)), "steps": self.step,
                  "offline_rows": len(self.train_ds), "heldout_prompts": len(self.val_ds)}
        write_result(self.run_dir, "ilql_result.json", result)
        return result


def run_ilql(cfg) -> dict[str, Any]:
    """Run the stage of ``conf/gpt_ilql.yaml``."""
    typed = load_stage_config(ILQLStageConfig, cfg)
    return ILQLTrainer(typed).run_logged()
