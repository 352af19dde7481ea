"""The body SFT and the reward model share: HH pairs -> tokenizer -> datasets -> model -> fit -> save.

:class:`SupervisedTrainer` is subclassed by :class:`nemo_rlhf.algorithms.sft.SFTTrainer` and
:class:`nemo_rlhf.algorithms.reward_model.RewardModelTrainer`, which add their model, dataset,
loss and held-out metrics.
"""

from __future__ import annotations

import logging
from typing import Any

from nemo_rlhf.algorithms.base import Trainer, heldout_loader, step_loader, write_result
from nemo_rlhf.checkpoint.weights import load_weights, save_model_weights
from nemo_rlhf.config import check_heldout_size, check_sizes, to_plain
from nemo_rlhf.data.tasks import format_pairs, load_split_pairs
from nemo_rlhf.data.tokenizer import tokenizer_from_config
from nemo_rlhf.parallel.state import is_rank_zero, setup_parallel

LOG = logging.getLogger("nemo_rlhf")


class SupervisedTrainer(Trainer):
    """A trainer of one model on a fixed data set (SFT samples or preference pairs).

    Subclasses set ``dataset_cls`` and ``collate_fn`` and implement :meth:`build_model`,
    :meth:`train_step` and :meth:`evaluate`. ``skip_prefixes`` names parameters not loaded from
    ``init_from`` (a new head).

    Resumes from the newest complete checkpoint in ``checkpoint.dir`` (default
    ``<run_dir>/checkpoints/<name>``) when ``checkpoint.resume`` is true, checkpoints every
    ``checkpoint.every_n_steps`` steps and at the end, and on SIGTERM/SIGUSR1 checkpoints at the
    next step boundary and returns ``{"preempted": True, ...}``.
    """

    dataset_cls: Any = None
    collate_fn: Any = None
    skip_prefixes: tuple[str, ...] = ()

    def __init__(self, cfg, name: str):
        super().__init__(cfg, name)
        self.val_before: dict[str, float] | None = None
        self.init_loaded = False  # set by a setup() that already loaded init_from (no second read in run)

    def make_dataset(self, pairs, tokenizer):
        """The torch dataset of ``pairs`` (``dataset_cls`` cut by ``data.max_seq_len`` /
        ``max_prompt_len`` / ``overlong``)."""
        d = self.cfg.data
        return self.dataset_cls(pairs, tokenizer, int(d.max_seq_len), int(d.max_prompt_len), d.overlong)

    def build_model(self, tokenizer):
        """The model to train (``MegatronGPTModule``), built after the data and tokenizer."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "val_before": self.val_before}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.val_before = state.get("val_before")

    def setup(self) -> None:
        """Parallel groups, data split, tokenizer, datasets, model and loaders (in this order:
        the model's initialisation draws from the RNG seeded here)."""
        cfg = self.cfg
        gbs, mbs = int(cfg.batch.global_batch_size), int(cfg.batch.micro_batch_size)
        self.dp = setup_parallel(to_plain(cfg.model), (gbs, mbs), cfg.trainer.accelerator, int(cfg.seed))
        check_sizes(cfg, self.dp)
        train_pairs, heldout, self.data_stats = load_split_pairs(cfg.data)
        texts = [p.prompt + p.chosen for p in train_pairs] + [p.rejected for p in train_pairs]
        self.tokenizer = tok = tokenizer_from_config(to_plain(cfg.tokenizer), texts,
                                                     save_dir=self.run_dir if is_rank_zero() else None)
        self.train_ds = self.make_dataset(format_pairs(cfg.data, train_pairs, tok), tok)  # data.chat_template
        self.val_ds = self.make_dataset(format_pairs(cfg.data, heldout, tok), tok)
        LOG.info("%s samples: train %d (%s), held-out %d (%s)", self.name, len(self.train_ds),
                 dict(self.train_ds.stats), len(self.val_ds), dict(self.val_ds.stats))
        check_heldout_size(len(self.val_ds), gbs, self.dp, data=cfg.data)
        # Equal-length micro-batches for the pipeline; S divisible by TP for sequence parallelism.
        pad_multiple = int(cfg.model.tensor_model_parallel_size) * 8
        self.collate = lambda b: type(self).collate_fn(b, tok.pad_id, pad_to_multiple_of=pad_multiple)  # noqa: E731
        self.model = self.build_model(tok)

    def run(self) -> dict[str, Any]:
        """Resume or initialise, evaluate, fit, evaluate, save ``<run_dir>/<name>_weights``.

        Returns:
            the stage result (also ``<run_dir>/<name>_result.json``): held-out metrics before and
            after, weights path, tokenizer path, sizes, skipped-row counts and steps; or the
            preemption result of :meth:`Trainer.fit`.
        """
        cfg = self.cfg
        self.setup()
        if self.resume() is None and cfg.init_from and not self.init_loaded:
            load_weights(self.model, cfg.init_from, skip_prefixes=self.skip_prefixes)
        gbs = int(cfg.batch.global_batch_size)
        self.train_loader = step_loader(self.train_ds, gbs, int(cfg.seed), self.step, self.max_steps, self.collate)
        self.val_loader = heldout_loader(self.val_ds, gbs // self.dp, self.collate, int(cfg.seed))
        if self.val_before is None:
            self.val_before = self.evaluate()
        preempted = self.fit()
        if preempted:
            return preempted
        after = self.evaluate()
        ckpt = save_model_weights(self.model.gpt, self.run_dir / f"{self.name}_weights")
        result = {"val_before": self.val_before, "val_after": after, "checkpoint": str(ckpt),
                  "tokenizer": str(self.run_dir / "tokenizer.json") if cfg.tokenizer.type == "train_bpe" else None,
                  "vocab_size": self.tokenizer.vocab_size, "num_layers": int(cfg.model.num_layers),
                  "train_samples": len(self.train_ds),
                  "heldout_samples": len(self.val_ds), "data_skipped": dict(self.data_stats.skipped),
                  "steps": self.step}
        write_result(self.run_dir, f"{self.name}_result.json", result)
        return result
