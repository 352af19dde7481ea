"""Rejection-sampling fine-tuning (best-of-n SFT): trlX's RFT, Llama 2's rejection sampling
(Touvron et al. 2023, §3.2.3), RAFT (Dong et al. 2023, Alg. 1).

One round ``k`` (:meth:`RejectionSamplingTrainer.run`), as data, on one data-parallel rank::

    round k's prompts (rs.prompts_per_round, a permutation seeded by (rs.seed, k)), this rank's share
      -> repeat each rs.num_samples (n) times, contiguous -> policy.generate (KV cache) -> tokens [b*n, L]
      -> decode -> reward functions (this process) + reward-model server ......... scores [b*n]
      -> rl.rejection.select_best / select_threshold on scores [b, n] ........... keep [b, n]
      -> all ranks' rows gathered -> <run_dir>/round_<k>/samples.jsonl (every sample, kept flagged,
         token ids included: a resumed round reads them instead of generating again)
      -> SFT on the kept (prompt, response) pairs: rs.sft_epochs epochs of sft.sft_loss
         (batch.global_batch_size samples per step, the Trainer's step loop and checkpoints)
      -> held-out evaluation (rs.val_samples_per_prompt samples per held-out prompt, seeded
         rs.seed + 1, the same draws every round) -> round metrics (round_<k>/result.json)

Best-of-n evaluation (:meth:`RejectionSamplingTrainer.best_of_n`) samples ``max(rs.best_of_n.ns)``
responses per held-out prompt and reports the mean reward of the best of ``n`` for each ``n``
(:func:`~nemo_rlhf.rl.rejection.best_of_n_curve`), and optionally the VADER positive fraction of
those best responses, before the first round and after the last (``<run_dir>/best_of_n.json``).

Resume: the training checkpoint (``checkpoint.every_n_steps``, the end of each round's SFT, and on
SIGTERM/SIGUSR1) holds the round, the round's first SFT step and length, the SFT loss so far and
the finished rounds' metrics; the round's samples come from its ``samples.jsonl``; the SFT batch of
a step is a pure function of (seed, round, step) and the generation seeds of (rs.seed, round,
batch, DP rank), so a resumed run repeats an uninterrupted one.

``launchers/train_rs.py`` (config ``conf/gpt_rs.yaml``) calls :func:`run_rejection_sampling`.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from nemo_rlhf.algorithms.base import (Trainer, connect_critic, decode_rollouts, dp_mean, dp_shard_batches,
                                      generate_repeated, prompt_datasets, score_responses, step_loader, write_result)
from nemo_rlhf.algorithms.sft import sft_loss
from nemo_rlhf.checkpoint.training_state import latest_checkpoint
from nemo_rlhf.checkpoint.weights import barrier, load_weights, save_model_weights
from nemo_rlhf.config import ConfigError, RejectionSamplingStageConfig, check_sizes, load_stage_config, to_plain
from nemo_rlhf.data import PromptDataset, collate_prompts, collate_sft
from nemo_rlhf.data.tokenizer import tokenizer_from_config
from nemo_rlhf.generation.sampling import SamplingParams
from nemo_rlhf.models.policy import GPTPolicyModel, shift_labels
from nemo_rlhf.parallel.state import is_rank_zero, setup_parallel
from nemo_rlhf.rewards.functions import RewardSum, build_reward
from nemo_rlhf.rl.rejection import best_of_n_curve, best_of_n_index, select_best, select_threshold
from nemo_rlhf.servers.critic_handle import CriticHandle

LOG = logging.getLogger("nemo_rlhf")


class KeptSamples(torch.utils.data.Dataset):
    """The kept (prompt, response) samples of a round as SFT items (the items of
    :class:`~nemo_rlhf.data.SFTDataset`, built from token ids, so nothing is re-tokenized).

    Rows are repeated (in order) until there are at least ``min_size`` (one global batch), so a
    round that kept fewer samples than a batch still trains on all of them.

    Item: ``tokens [S_i]`` int64 (prompt ids + response ids as generated: with the eos when the
    response ended, without when it hit ``max_new_tokens``), ``loss_mask [S_i]`` float32 (1 on the
    response), ``length []`` int64.

    Raises:
        ValueError: no rows, or a row with an empty prompt or response.
    """

    def __init__(self, rows: Sequence[Mapping[str, Any]], min_size: int = 1):
        if not rows:
            raise ValueError("KeptSamples: no kept samples")
        self.samples = []
        for i, r in enumerate(rows):
            if not r["prompt_ids"] or not r["response_ids"]:
                raise ValueError(f"KeptSamples: row {i} (prompt {r.get('prompt')!r}) has an empty prompt or response")
            self.samples.append((list(r["prompt_ids"]) + list(r["response_ids"]), len(r["prompt_ids"])))
        self.unique = len(self.samples)
        self.samples = self.samples * max(1, math.ceil(int(min_size) / self.unique))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        tokens, prompt_len = self.samples[idx]
        mask = torch.ones(len(tokens), dtype=torch.float32)
        mask[:prompt_len] = 0.0
        return {"tokens": torch.tensor(tokens, dtype=torch.int64), "loss_mask": mask,
                "length": torch.tensor(len(tokens), dtype=torch.int64)}


def select(scores: torch.Tensor, selection: str, threshold: float | None) -> torch.Tensor:
    """``rs.selection`` on ``scores [P, n]``: ``best`` -> :func:`~nemo_rlhf.rl.rejection.select_best`,
    ``threshold`` -> :func:`~nemo_rlhf.rl.rejection.select_threshold`; ``[P, n]`` bool.

    Raises:
        ConfigError: unknown ``selection``, or ``threshold`` None with ``selection="threshold"``.
    """
    if selection == "best":
        return select_best(scores)
    if selection == "threshold":
        if threshold is None:
            raise ConfigError("rs.selection=threshold needs rs.threshold")
        return select_threshold(scores, float(threshold))
    raise ConfigError(f"rs.selection must be one of ['best', 'threshold'], got {selection!r}")


def _dp() -> tuple[int, int]:
    from megatron.core import parallel_state

    if not parallel_state.is_initialized():
        return 0, 1
    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def _gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every DP rank's rows (each TP/PP rank of a replica holds the same ones), in rank order."""
    from megatron.core import parallel_state

    _, dp = _dp()
    if dp == 1:
        return rows
    parts: list[Any] = [None] * dp
    torch.distributed.all_gather_object(parts, rows, group=parallel_state.get_data_parallel_group())
    return [r for part in parts for r in part]


class RejectionSamplingTrainer(Trainer):
    """Rejection-sampling fine-tuning for ``rs.num_rounds`` rounds (module docstring).

    Holds the policy (trained), the reward functions (``reward.functions``) and/or the
    reward-model server handle (``reward.reward_model``), the training and held-out prompts.
    ``self.step`` counts SFT optimizer steps over all rounds; checkpoints (``checkpoint.dir``,
    default ``<run_dir>/checkpoints/rs``) add the round state to the policy's training state.
    ``generated_rounds`` lists the rounds whose samples this process generated (a resumed round's
    come from its ``samples.jsonl``).
    """

    def __init__(self, cfg: RejectionSamplingStageConfig, critic_client=None):
        super().__init__(cfg, "rs", metric_prefix="rs", progress_metrics=("loss",))
        p = cfg.rs
        self.critic_client = critic_client
        self.sampling = SamplingParams(**to_plain(p.sampling), seed=int(p.seed))
        self.val_sampling = SamplingParams(**to_plain(p.val_sampling.resolve(p.sampling)), seed=int(p.seed) + 1)
        self.policy: GPTPolicyModel | None = None
        self.reward_fn: RewardSum | None = None
        self.critic: CriticHandle | None = None
        self.tokenizer = None
        self.train_ds: PromptDataset | None = None
        self.val_ds: PromptDataset | None = None
        self.collate = None
        self.sft_collate = None
        # round state (checkpointed)
        self.round = 0
        self.round_start: int | None = None  # global SFT step at which this round's SFT began
        self.round_steps = 0
        self.loss_sum, self.loss_count = 0.0, 0
        self.rounds: list[dict[str, float]] = []
        self.heldout_before: dict[str, float] | None = None
        self.best_of_n_start: dict[str, Any] | None = None
        self.generated_rounds: list[int] = []
        self.resumed = False  # this process continued a checkpoint (round_<k>/samples.jsonl may be reused)

    # -------------------------------------------------------------- set-up
    @classmethod
    def from_models(cls, cfg: RejectionSamplingStageConfig, policy: GPTPolicyModel, tokenizer,
                    train_prompts: PromptDataset, heldout_prompts: PromptDataset, reward_fn: RewardSum | None = None,
                    critic_client=None) -> "RejectionSamplingTrainer":
        """A trainer around a policy built elsewhere (tests, benchmarks): :meth:`generate_round`,
        :meth:`train_step`, :meth:`evaluate` and :meth:`best_of_n` work without :meth:`setup`
        (:meth:`run` calls :meth:`setup` itself). ``reward_fn`` None: built from ``reward.functions``."""
        trainer = cls(cfg, critic_client)
        trainer.policy = trainer.model = policy
        trainer.tokenizer = tokenizer
        trainer.reward_fn = reward_fn if reward_fn is not None else (
            build_reward(cfg.reward.functions) if cfg.reward.functions else None)
        trainer.critic = CriticHandle(critic_client) if cfg.reward.reward_model else None
        trainer.train_ds, trainer.val_ds = train_prompts, heldout_prompts
        trainer._set_collates()
        return trainer

    def _set_collates(self) -> None:
        pad = int(self.tokenizer.pad_id)
        multiple = int(self.cfg.model.tensor_model_parallel_size) * 8  # as supervised.py: S divisible by TP
        self.collate = lambda b: collate_prompts(b, pad)  # noqa: E731
        self.sft_collate = lambda b: collate_sft(b, pad, pad_to_multiple_of=multiple)  # noqa: E731

    def setup(self) -> None:
        """Parallel groups, prompts, tokenizer, rewards, the policy."""
        cfg = self.cfg
        gbs, mbs = int(cfg.batch.global_batch_size), int(cfg.batch.micro_batch_size)
        self.dp = setup_parallel(to_plain(cfg.model), (gbs, mbs), cfg.trainer.accelerator, int(cfg.seed))
        check_sizes(cfg, self.dp)
        self.tokenizer = tok = tokenizer_from_config(to_plain(cfg.tokenizer))
        self.train_ds, self.val_ds, _ = prompt_datasets(cfg.data, tok, "rs")
        for name, ds in (("training", self.train_ds), ("held-out", self.val_ds)):
            if len(ds) < self.dp:
                raise ConfigError(f"{name} split has {len(ds)} prompts, fewer than the data-parallel size {self.dp}: "
                                  "add prompts (data.files / data.heldout_files / data.heldout_fraction)")
        self._set_collates()
        self.reward_fn = build_reward(cfg.reward.functions) if cfg.reward.functions else None
        if cfg.reward.reward_model:
            self.critic = CriticHandle(connect_critic(self.critic_client, cfg.critic))
        self.policy = self.model = GPTPolicyModel(to_plain(cfg.model), to_plain(cfg.optim), tok.vocab_size, mbs,
                                                  tok.eos_id, tok.pad_id)

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "round": self.round, "round_start": self.round_start,
                "round_steps": self.round_steps, "loss_sum": self.loss_sum, "loss_count": self.loss_count,
                "rounds": self.rounds, "heldout_before": self.heldout_before,
                "best_of_n_start": self.best_of_n_start}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.round = int(state["round"])
        self.round_start = state.get("round_start")
        self.round_steps = int(state.get("round_steps", 0))
        self.loss_sum, self.loss_count = float(state.get("loss_sum", 0.0)), int(state.get("loss_count", 0))
        self.rounds = list(state.get("rounds", []))
        self.heldout_before = state.get("heldout_before")
        self.best_of_n_start = state.get("best_of_n_start")

    # -------------------------------------------------------------- rewards
    def score(self, tokens: torch.Tensor, lengths: torch.Tensor,
              prompt_lengths: torch.Tensor) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(total [B] float64, {term: [B] float64})``: :func:`~nemo_rlhf.algorithms.base.score_responses`
        with ``reward.functions`` and ``reward.reward_model_weight`` x the reward-model server.

        Raises:
            RewardFunctionError: a reward function failed (named), or a non-finite reward-model score.
        """
        return score_responses(self.tokenizer, self.reward_fn, self.critic, float(self.cfg.reward.reward_model_weight),
                               tokens, lengths, prompt_lengths)

    # -------------------------------------------------------------- generation
    def round_prompts(self, round_: int) -> list[int]:
        """Indices into the training prompts of round ``round_`` (all DP ranks): ``rs.prompts_per_round``
        of them (None: each prompt once) from permutations seeded by (rs.seed, round, pass), cycled
        when more are asked than there are."""
        n_total = len(self.train_ds)
        want = int(self.cfg.rs.prompts_per_round or n_total)
        out: list[int] = []
        k = 0
        while len(out) < want:
            g = torch.Generator().manual_seed(int(self.cfg.rs.seed) * 1_000_003 + round_ * 7919 + k * 104_729)
            out += torch.randperm(n_total, generator=g).tolist()
            k += 1
        return out[:want]

    @torch.no_grad()
    def generate_round(self, round_: int) -> list[dict[str, Any]]:
        """Sample, score and select round ``round_`` on this DP rank (its share ``r, r + dp, ...`` of
        :meth:`round_prompts`, ``rs.generation_batch_size / rs.num_samples`` prompts per generate
        call, each call seeded by (rs.seed, round, call, DP rank)).

        Returns:
            this rank's rows, ``rs.num_samples`` per prompt in order: ``round``, ``prompt_index``,
            ``sample``, ``prompt``, ``response`` (texts; the response without its eos), ``reward``,
            ``terms`` ({name: value}), ``kept``, ``prompt_ids``, ``response_ids`` (token ids);
            :meth:`round_samples` adds ``policy_step``.

        Raises:
            RewardFunctionError: a reward function failed (its name, the batch index and value).
        """
        p = self.cfg.rs
        n = int(p.num_samples)
        rank, dp = _dp()
        prompts = self.round_prompts(round_)
        mine = prompts[rank: len(prompts) // dp * dp: dp]
        per_call = max(1, int(p.generation_batch_size) // n)
        rows: list[dict[str, Any]] = []
        for call, start in enumerate(range(0, len(mine), per_call)):
            idx = mine[start: start + per_call]
            b = self.collate([self.train_ds[i] for i in idx])
            seed = int(p.seed) + 7919 * (round_ + 1) + 104_729 * call + 15_485_863 * rank
            params = SamplingParams(**{**self.sampling.__dict__, "seed": seed})
            gen = generate_repeated(self.policy, b["prompts"], b["prompt_lengths"], params, n)
            total, terms = self.score(gen.tokens, gen.lengths, gen.prompt_lengths)
            keep = select(torch.as_tensor(total).view(len(idx), n), p.selection, p.threshold).reshape(-1)
            texts_p, texts_r = decode_rollouts(self.tokenizer, gen.tokens, gen.prompt_lengths, gen.lengths)
            for j, (row, pl, ln) in enumerate(zip(gen.tokens.tolist(), gen.prompt_lengths.tolist(),
                                                  gen.lengths.tolist())):
                rows.append({"round": round_, "prompt_index": idx[j // n], "sample": j % n,
                             "prompt": texts_p[j], "response": texts_r[j], "reward": float(total[j]),
                             "terms": {k: float(v[j]) for k, v in terms.items()}, "kept": bool(keep[j]),
                             "prompt_ids": row[:pl], "response_ids": row[pl:ln]})
        return rows

    def samples_path(self, round_: int):
        return self.run_dir / f"round_{round_}" / "samples.jsonl"

    def round_samples(self, round_: int) -> list[dict[str, Any]]:
        """Round ``round_``'s samples of every DP rank: read from ``round_<k>/samples.jsonl`` when
        this run resumed from a checkpoint and the file was sampled by the policy of the round's start
        (its rows' ``policy_step`` = the SFT step the round starts at), else :meth:`generate_round`,
        gathered over DP and written there (rank 0, atomically) before anything trains on them. A
        file left by another run in the same ``run_dir`` (a fresh start, ``checkpoint.resume:
        false``, or another step) is sampled again and replaced."""
        path = self.samples_path(round_)
        start = self.step if self.round_start is None else int(self.round_start)
        if self.resumed and path.exists():
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
            if rows and all(r.get("policy_step") == start and r.get("round") == round_ for r in rows):
                LOG.info("rs round %d: %d samples read from %s (not generated again)", round_, len(rows), path)
                return rows
            LOG.warning("rs round %d: %s was not sampled at step %d of this run: sampling again", round_, path,
                        start)
        rows = _gather_rows(self.generate_round(round_))
        for r in rows:
            r["policy_step"] = start
        self.generated_rounds.append(round_)
        if is_rank_zero():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            tmp.replace(path)
        barrier()
        return rows

    @staticmethod
    def sample_metrics(rows: Sequence[Mapping[str, Any]], num_samples: int) -> dict[str, float]:
        """Metrics of a round's samples: ``samples`` (count), ``reward_mean``, ``reward_max`` (over all
        samples), ``best_reward_mean`` (mean over prompts of the best of the n), ``kept``,
        ``kept_reward_mean`` (0 when none kept), ``kept_prompts`` (prompts with >= 1 kept)."""
        r = np.array([row["reward"] for row in rows], dtype=np.float64)
        kept = [row for row in rows if row["kept"]]
        groups = r.reshape(-1, int(num_samples)) if r.size else np.zeros((0, 1))
        kept_groups = {i // int(num_samples) for i, row in enumerate(rows) if row["kept"]}
        return {"samples": float(r.size), "reward_mean": float(r.mean()) if r.size else 0.0,
                "reward_max": float(r.max()) if r.size else 0.0,
                "best_reward_mean": float(groups.max(axis=1).mean()) if r.size else 0.0,
                "kept": float(len(kept)), "kept_prompts": float(len(kept_groups)),
                "kept_reward_mean": float(np.mean([row["reward"] for row in kept])) if kept else 0.0}

    # -------------------------------------------------------------- SFT
    def train_step(self, batch) -> dict[str, float]:
        """One SFT optimizer step on kept samples (:func:`~nemo_rlhf.algorithms.sft.sft_loss`)."""
        labels, mask = shift_labels(batch["tokens"], batch["loss_mask"], self.tokenizer.pad_id)
        metrics = self.policy.train_on(sft_loss, {"tokens": batch["tokens"], "labels": labels, "label_mask": mask})
        if math.isfinite(metrics["loss"]):
            self.loss_sum += float(metrics["loss"])
            self.loss_count += 1
        return metrics

    def sft_steps(self, n_kept_rows: int) -> int:
        """SFT steps of a round with ``n_kept_rows`` kept samples: ``rs.sft_epochs`` x the global
        batches in one pass (at least one; a round keeping fewer samples than a batch repeats them),
        at most ``trainer.max_steps``; 0 when nothing was kept."""
        if n_kept_rows == 0:
            return 0
        gbs = int(self.cfg.batch.global_batch_size)
        per_epoch = max(1, math.ceil(n_kept_rows / gbs) if n_kept_rows < gbs else n_kept_rows // gbs)
        return min(int(self.cfg.rs.sft_epochs) * per_epoch, int(self.cfg.trainer.max_steps))

    # -------------------------------------------------------------- evaluation
    def _heldout_batches(self, copies: int, limit: int | None = None, max_prompts: int | None = None):
        n = len(self.val_ds) if max_prompts is None else min(len(self.val_ds), int(max_prompts))
        return dp_shard_batches(n, int(self.cfg.rs.generation_batch_size) // max(int(copies), 1), limit)

    @torch.no_grad()
    def evaluate(self, limit: int | None = None) -> dict[str, float]:
        """Held-out mean reward: ``rs.val_samples_per_prompt`` responses per held-out prompt sampled
        with ``rs.val_sampling`` (seeded ``rs.seed + 1``: the same draws at every evaluation), scored
        as in training; also each reward term, the response length (tokens) and, with ``rs.judge:
        vader``, ``vader_compound`` and ``vader_positive`` (the fraction of prompt + response with
        compound > 0.05), averaged over DP."""
        k = int(self.cfg.rs.val_samples_per_prompt)
        sums: dict[str, float] = {}
        count = 0
        for idx in self._heldout_batches(k, limit):
            b = self.collate([self.val_ds[i] for i in idx])
            gen = generate_repeated(self.policy, b["prompts"], b["prompt_lengths"], self.val_sampling, k)
            total, terms = self.score(gen.tokens, gen.lengths, gen.prompt_lengths)
            rows = {"reward": total, **{f"reward_{t}": v for t, v in terms.items()},
                    "response_length": (gen.lengths - gen.prompt_lengths).double().numpy()}
            if self.cfg.rs.judge == "vader":
                from nemo_rlhf.rewards.sentiment import vader_judge

                rows.update(vader_judge(*decode_rollouts(self.tokenizer, gen.tokens, gen.prompt_lengths,
                                                         gen.lengths)))
            for name, v in rows.items():
                sums[name] = sums.get(name, 0.0) + float(np.sum(v))
            count += int(total.shape[0])
        return dp_mean({name: s / max(count, 1) for name, s in sums.items()})

    @torch.no_grad()
    def best_of_n(self) -> dict[str, Any]:
        """Best-of-n on the held-out prompts (``rs.best_of_n``): ``N = max(ns)`` responses per prompt
        (``rs.sampling``, seeded ``rs.seed + 2``), scored; for each ``n`` the mean reward of the best
        of each block of ``n`` (:func:`~nemo_rlhf.rl.rejection.best_of_n_curve`) and, with ``rs.judge:
        vader``, the VADER positive fraction of ``prompt + response`` of those best responses
        (:mod:`nemo_rlhf.rewards.sentiment`). Averaged over DP (equal shards).

        Returns:
            ``{"ns": [...], "reward": [...], "vader_positive": [...] (judge only), "prompts": P,
            "samples_per_prompt": N}``.
        """
        c = self.cfg.rs.best_of_n
        ns = sorted(int(n) for n in c.ns)
        big = max(ns)
        params = SamplingParams(**{**self.sampling.__dict__, "seed": int(self.cfg.rs.seed) + 2})
        scores, texts = [], []
        for call, idx in enumerate(self._heldout_batches(big, None, c.max_prompts)):
            b = self.collate([self.val_ds[i] for i in idx])
            params.seed = int(self.cfg.rs.seed) + 2 + 104_729 * call
            gen = generate_repeated(self.policy, b["prompts"], b["prompt_lengths"], params, big)
            total, _ = self.score(gen.tokens, gen.lengths, gen.prompt_lengths)
            scores.append(torch.as_tensor(total).view(len(idx), big))
            if self.cfg.rs.judge:
                ps, rs = decode_rollouts(self.tokenizer, gen.tokens, gen.prompt_lengths, gen.lengths)
                texts.extend(p + r for p, r in zip(ps, rs))
        s = torch.cat(scores) if scores else torch.zeros(0, big, dtype=torch.float64)
        curve = best_of_n_curve(s, ns) if s.numel() else {n: 0.0 for n in ns}
        metrics = {f"reward_{n}": v for n, v in curve.items()}
        if self.cfg.rs.judge == "vader":
            from nemo_rlhf.rewards.sentiment import positive_fraction, vader_compound

            compound = vader_compound(texts).reshape(-1, big) if texts else np.zeros((0, big))
            for n in ns:
                idx = best_of_n_index(s, n).numpy() if s.numel() else np.zeros((0, big // n), dtype=np.int64)
                metrics[f"vader_positive_{n}"] = positive_fraction(np.take_along_axis(compound, idx, axis=1).ravel())
        metrics = dp_mean(metrics)
        out: dict[str, Any] = {"ns": ns, "reward": [metrics[f"reward_{n}"] for n in ns],
                               "prompts": int(s.shape[0]) * _dp()[1], "samples_per_prompt": big}
        if self.cfg.rs.judge == "vader":
            out["vader_positive"] = [metrics[f"vader_positive_{n}"] for n in ns]
        return out

    # -------------------------------------------------------------- the stage
    def run(self) -> dict[str, Any]:
        """Set up, resume or start from ``init_from``, then the rounds (module docstring), best-of-n,
        save ``<run_dir>/rs_weights``.

        Returns:
            the result (also ``<run_dir>/rs_result.json``): held-out metrics before and after
            each round, the rounds' metrics, the best-of-n curves, the weights path, SFT steps,
            prompt counts; or the preemption result of :meth:`Trainer.fit`.

        Raises:
            RewardFunctionError: a reward function failed while sampling or evaluating (named).
            CheckpointError: the checkpoint to resume from is unreadable.
        """
        cfg = self.cfg
        self.setup()
        try:
            self.resumed = self.resume() is not None
            if not self.resumed:
                load_weights(self.policy, cfg.init_from)
            if self.heldout_before is None:
                self.heldout_before = self.run_evaluation()
            bon = cfg.rs.best_of_n
            if bon.enabled and bon.at_start and self.best_of_n_start is None:
                self.best_of_n_start = self.best_of_n()
                self._write_best_of_n(None)
            while self.round < int(cfg.rs.num_rounds):
                preempted = self.run_round()
                if preempted:
                    return preempted
            best_final = self.best_of_n() if bon.enabled else None
            if bon.enabled:
                self._write_best_of_n(best_final)
            ckpt = save_model_weights(self.policy.gpt, self.run_dir / "rs_weights")
        finally:
            if self.critic is not None:
                self.critic.close()
        result = {"heldout_before": self.heldout_before, "rounds": self.rounds,
                  "heldout_after": self.rounds[-1]["heldout"] if self.rounds else self.heldout_before,
                  "best_of_n": {"start": self.best_of_n_start, "final": best_final},
                  "checkpoint": str(ckpt), "resume_checkpoint": str(latest_checkpoint(self.checkpoint_root)),
                  "steps": self.step, "train_prompts": len(self.train_ds), "heldout_prompts": len(self.val_ds)}
        write_result(self.run_dir, "rs_result.json", result)
        return result

    def run_round(self) -> dict[str, Any] | None:
        """Round ``self.round``: samples (read or generated), SFT on the kept ones through
        :meth:`Trainer.fit` (resumed mid-round at ``self.step``), held-out evaluation, round metrics
        (logged as ``rs_round/*`` and written to ``round_<k>/result.json``). Returns the preemption
        result, or None when the round finished."""
        cfg = self.cfg
        k = self.round
        rows = self.round_samples(k)
        kept = [r for r in rows if r["kept"]]
        if self.round_start is None:
            self.round_start, self.round_steps = self.step, self.sft_steps(len(kept))
            self.loss_sum, self.loss_count = 0.0, 0
        self.max_steps = self.round_start + self.round_steps
        if self.round_steps:
            gbs = int(cfg.batch.global_batch_size)
            data = KeptSamples(kept, min_size=gbs)
            seed = int(cfg.seed) + 1_000_003 * (k + 1)  # a round's batches: pure in (seed, round, step)
            self.train_loader = step_loader(data, gbs, seed, self.step - self.round_start, self.round_steps,
                                            self.sft_collate)
            preempted = self.fit()
            if preempted:
                return preempted
        else:
            LOG.warning("rs round %d: no sample kept (rs.selection=%s, rs.threshold=%s): no SFT this round",
                        k, cfg.rs.selection, cfg.rs.threshold)
        heldout = self.run_evaluation()
        metrics = {"round": k, **self.sample_metrics(rows, int(cfg.rs.num_samples)),
                   "sft_steps": self.round_steps,
                   "sft_loss": self.loss_sum / self.loss_count if self.loss_count else float("nan"),
                   "heldout": heldout}
        LOG.info("rs round %d: %s", k, {m: (round(v, 4) if isinstance(v, float) else v) for m, v in metrics.items()
                                        if m != "heldout"})
        flat = {**{m: v for m, v in metrics.items() if m != "heldout"},
                **{f"heldout_{m}": v for m, v in heldout.items()}}
        self.log_metrics({f"rs_round/{m}": v for m, v in flat.items()}, self.step)
        write_result(self.run_dir, f"round_{k}/result.json", metrics)
        self.rounds.append(metrics)
        self.round += 1
        self.round_start, self.round_steps = None, 0
        return None

    def _write_best_of_n(self, final: dict[str, Any] | None) -> None:
        """``<run_dir>/best_of_n.json``: ``{"start": curve or null, "final": curve or null}``."""
        write_result(self.run_dir, "best_of_n.json", {"start": self.best_of_n_start, "final": final})


def run_rejection_sampling(cfg, critic=None) -> dict[str, Any]:
    """Run the stage of ``conf/gpt_rs.yaml``; ``critic`` is an optional reward-model client used
    instead of connecting to ``critic.host:critic.port``."""
    typed = load_stage_config(RejectionSamplingStageConfig, cfg)
    return RejectionSamplingTrainer(typed, critic).run_logged()
