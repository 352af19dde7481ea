"""DPO and its variants (``dpo.loss_type``: sigmoid / cDPO, robust, IPO, RPO, SimPO) on preference pairs.

``launchers/train_dpo.py`` (config ``conf/gpt_dpo.yaml``) calls :func:`run_dpo`.

One step, as data::

    pairs -> collate_preference: tokens [2B, S] (B chosen rows, then their B rejected rows),
             lengths, prompt_lengths [2B]
      -> reference.logprobs (frozen, no grad) [2B, S-1] -> masked sum over response positions
         = ref_logps [2B]                           (dpo.reference=full: every step;
                                                     precomputed: once per data set at start)
      -> policy.train_on(dpo_loss_fn): per pair micro-batch, policy log-probs [2m, S-1] -> masked
         sums [2m] -> rl.preference_loss(loss_type) -> loss, rewards/* metrics
                                                    (dpo.reference=hydra: no separate reference
                                                     forward; inside this one the frozen branch runs
                                                     on the policy's trunk -> ref_logps [2m])

The response mask is the rollout one (:func:`~nemo_rlhf.rl.advantages.response_mask`): positions
``P-1 <= t <= L-2`` score the response tokens and the closing eos, never the prompt (the tokens the
SFT loss trains on). The reference is a frozen copy of ``init_from`` (the SFT policy), whole or (hydra)
its top layers only; SimPO builds none.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from typing import Any, Mapping

import torch
from torch.utils.data import Dataset

from nemo_rlhf.algorithms.reward_model import pair_microbatches
from nemo_rlhf.algorithms.supervised import SupervisedTrainer
from nemo_rlhf.checkpoint.weights import load_weights
from nemo_rlhf.config import DPOStageConfig, load_stage_config, to_plain
from nemo_rlhf.data import collate_preference
from nemo_rlhf.data.tasks import preference_dataset
from nemo_rlhf.models.hydra import HydraReference
from nemo_rlhf.models.policy import GPTPolicyModel
from nemo_rlhf.rl.advantages import response_mask
from nemo_rlhf.rl.masked import masked_sum
from nemo_rlhf.rl.preference import preference_loss

LOG = logging.getLogger("nemo_rlhf")


def response_logps(logprobs: torch.Tensor, prompt_lengths: torch.Tensor,
                   lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence response log-probs from per-token ones.

    Args:
        logprobs: float ``[N, S-1]`` (``logprobs[:, t] = log pi(tokens[:, t+1] | tokens[:, :t+1])``).
        prompt_lengths, lengths: ``[N]`` int64 prompt and prompt + response lengths (tokens).

    Returns:
        ``(sums, counts)``: ``[N]`` summed log-probs of the response tokens (nats) and ``[N]``
        float32 response token counts.
    """
    mask = response_mask(prompt_lengths, lengths, logprobs.shape[1] + 1)
    return masked_sum(logprobs, mask, dim=1), mask.sum(1)


def dpo_loss_fn(policy: GPTPolicyModel, dpo_cfg, hydra: HydraReference | None = None):
    """The loss for :meth:`GPTPolicyModel.train_on` / ``evaluate_on`` on a pair micro-batch
    (:func:`~nemo_rlhf.algorithms.reward_model.pair_microbatches`): ``tokens [2m, S]`` (m chosen rows,
    then their m rejected rows), ``lengths``, ``prompt_lengths [2m]`` and, unless the loss is
    reference-free, ``ref_logps [2m]`` (summed reference log-probs, same order). With ``hydra``
    (``dpo.reference=hydra``; the forward must run inside ``hydra.capture()``), ``ref_logps`` comes
    from the reference branch run on the trunk of the same forward instead. With
    ``logit_positions`` and ``response_mask [2m, R]`` in the micro-batch
    (:meth:`DPOTrainer.response_only`), the logits are those of the response positions only
    (``[2m, R, V/TP]``), for the policy and the hydra branch alike.

    Returns the ``(loss, metrics)`` of :func:`~nemo_rlhf.rl.preference.preference_loss` with
    ``dpo.loss_type``; metrics ``loss``, ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected`` (``nll`` for rpo).
    """
    kwargs = {"beta": float(dpo_cfg.beta), "label_smoothing": float(dpo_cfg.label_smoothing),
              "rpo_alpha": dpo_cfg.effective_rpo_alpha, "simpo_gamma": dpo_cfg.effective_simpo_gamma}

    def loss_fn(mb, logits):
        positions = mb.get("logit_positions")
        if positions is not None:  # logits [2m, R, V/TP] at the response positions only
            mask = mb["response_mask"]
            lp = policy.logprobs_at(logits, mb["tokens"], positions, inplace=True)
        else:
            mask = response_mask(mb["prompt_lengths"], mb["lengths"], mb["tokens"].shape[1])
            lp = policy.response_logprobs(policy.masked_logits(logits), mb["tokens"])
        sums, counts = masked_sum(lp, mask, dim=1), mask.sum(1)
        m = sums.shape[0] // 2
        if hydra is not None:
            ref = masked_sum(hydra.captured_logprobs(mb["tokens"], positions), mask, dim=1)
        else:
            ref = mb.get("ref_logps")
        loss, metrics = preference_loss(dpo_cfg.loss_type, sums[:m], sums[m:],
                                        None if ref is None else ref[:m], None if ref is None else ref[m:],
                                        counts[:m], counts[m:], **kwargs)
        return loss, {"loss": loss.detach(), **metrics}

    return loss_fn


class ReferenceLogpsDataset(Dataset):
    """A :class:`~nemo_rlhf.data.PreferenceDataset` whose items also carry the reference policy's
    summed response log-probs, computed once (``dpo.reference=precomputed``).

    Item: the base item plus ``ref_chosen_logps``, ``ref_rejected_logps`` (``[]`` float32, nats).
    """

    def __init__(self, base, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor):
        if not len(base) == ref_chosen.shape[0] == ref_rejected.shape[0]:
            raise ValueError(f"{len(base)} pairs but {ref_chosen.shape[0]} / {ref_rejected.shape[0]} reference values")
        self.base, self.ref_chosen, self.ref_rejected = base, ref_chosen, ref_rejected
        self.stats = base.stats

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return {**self.base[idx], "ref_chosen_logps": self.ref_chosen[idx], "ref_rejected_logps": self.ref_rejected[idx]}


def collate_with_reference(batch, pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """:func:`~nemo_rlhf.data.collate_preference` plus ``ref_logps [2B]`` (chosen, then rejected)
    when the items carry precomputed reference log-probs (:class:`ReferenceLogpsDataset`)."""
    out = collate_preference(batch, pad_id, pad_to_multiple_of)
    if batch and "ref_chosen_logps" in batch[0]:
        out["ref_logps"] = torch.stack([b["ref_chosen_logps"] for b in batch]
                                       + [b["ref_rejected_logps"] for b in batch])
    return out


class DPOTrainer(SupervisedTrainer):
    """Trains a :class:`~nemo_rlhf.models.policy.GPTPolicyModel` (from ``init_from``, the SFT
    weights) on preference pairs with the DPO-family loss ``dpo.loss_type`` against a frozen
    reference copy of ``init_from`` (``dpo.reference``: ``full`` runs it on every batch,
    ``precomputed`` scores the train and held-out pairs once in :meth:`setup` and frees it, ``hydra``
    copies only the top ``model.num_layers_unfrozen`` layers and runs them on the policy's frozen
    trunk inside the policy's own forward; SimPO has none). Held-out metrics over every held-out
    batch (``trainer.limit_val_batches`` batches in the periodic evaluations): ``loss``,
    ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
    ``logps/chosen``, ``logps/rejected`` and ``pairs``.

    Checkpoints hold the policy, its optimizer and the step (the reference is rebuilt from
    ``init_from``; precomputed values are recomputed, deterministically, on resume).
    """

    collate_fn = staticmethod(collate_with_reference)

    def __init__(self, cfg: DPOStageConfig):
        super().__init__(cfg, "dpo")
        self.reference: GPTPolicyModel | HydraReference | None = None

    def make_dataset(self, pairs, tokenizer):
        """:func:`~nemo_rlhf.data.tasks.preference_dataset` (``data.overlong`` / ``data.on_error``)."""
        return preference_dataset(self.cfg.data, pairs, tokenizer)

    def build_model(self, tokenizer) -> GPTPolicyModel:
        c = self.cfg
        return GPTPolicyModel(to_plain(c.model), to_plain(c.optim), tokenizer.vocab_size,
                              int(c.batch.micro_batch_size), tokenizer.eos_id, tokenizer.pad_id)

    def setup(self) -> None:
        """:meth:`SupervisedTrainer.setup`, then the frozen reference from ``init_from`` (not for
        SimPO); with ``dpo.reference=precomputed`` its log-probs of every train and held-out pair,
        after which it is freed."""
        super().setup()
        dpo = self.cfg.dpo
        self.loss_fn = dpo_loss_fn(self.model, dpo)
        if not dpo.uses_reference:
            return
        if dpo.effective_reference == "hydra":  # the branch copies the initial policy's top layers
            load_weights(self.model, self.cfg.init_from)  # before run() may resume a trained policy
            self.init_loaded = True
            self.reference = HydraReference(self.model)
            self.loss_fn = dpo_loss_fn(self.model, dpo, self.reference)
            return
        tok = self.tokenizer
        self.reference = GPTPolicyModel(to_plain(self.cfg.model), None, tok.vocab_size,
                                        int(self.cfg.batch.micro_batch_size), tok.eos_id, tok.pad_id)
        load_weights(self.reference, self.cfg.init_from)
        if dpo.effective_reference == "precomputed":
            self.train_ds = self.precompute_reference(self.train_ds)
            self.val_ds = self.precompute_reference(self.val_ds)
            self.reference = None
            gc.collect()
            LOG.info("dpo: reference log-probs precomputed for %d train and %d held-out pairs; reference freed",
                     len(self.train_ds), len(self.val_ds))

    def precompute_reference(self, dataset) -> ReferenceLogpsDataset:
        """``dataset`` with the reference's summed response log-probs of each pair, computed in
        chunks of ``batch.micro_batch_size`` pairs (every rank computes every pair: no collective
        beyond the reference's own TP/PP ones)."""
        n, step = len(dataset), int(self.cfg.batch.micro_batch_size)
        chosen, rejected = [], []
        for i in range(0, n, step):
            batch = self.collate([dataset[j] for j in range(i, min(i + step, n))])
            ref = self.reference_logps(batch)
            m = ref.shape[0] // 2
            chosen.append(ref[:m])
            rejected.append(ref[m:])
        cat = (lambda xs: torch.cat(xs) if xs else torch.zeros(0))  # noqa: E731
        return ReferenceLogpsDataset(dataset, cat(chosen), cat(rejected))

    def reference_logps(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[2B]`` float32 summed response log-probs of ``batch["tokens"]`` under the reference
        (its LM head run at the response positions only)."""
        return self.reference.response_logps(batch["tokens"], batch["prompt_lengths"], batch["lengths"])

    def response_only(self, mbs: list[dict]) -> list[dict]:
        """Each pair micro-batch with ``logit_positions`` and ``response_mask [2m, R]``
        (:meth:`GPTPolicyModel.response_positions`): the policy's (and the hydra branch's) LM head
        and log-softmax then run on the R response positions instead of all S - 1 (at the
        examples' shape about half: the prompts are half the tokens)."""
        out = []
        for mb in mbs:
            positions, mask = self.model.response_positions(mb["prompt_lengths"], mb["lengths"], mb["tokens"].shape[1])
            out.append({**mb, "logit_positions": positions, "response_mask": mask})
        return out

    def _with_reference(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = dict(batch)
        if isinstance(self.reference, GPTPolicyModel) and "ref_logps" not in batch:
            batch["ref_logps"] = self.reference_logps(batch)
        return batch

    def _capture(self):
        """``dpo.reference=hydra``: the reference branch records the trunk of the policy's forwards."""
        return self.reference.capture() if isinstance(self.reference, HydraReference) else contextlib.nullcontext()

    def train_step(self, batch) -> dict[str, float]:
        mbs = self.response_only(pair_microbatches(self._with_reference(batch), self.model.micro_batch_size))
        with self._capture():
            return self.model.train_on(self.loss_fn, mbs)

    def evaluate(self, limit: int | None = None) -> dict[str, float]:
        from megatron.core import parallel_state

        ms = []
        for i, b in enumerate(self.val_loader):
            if limit is not None and i >= limit:
                break
            mbs = self.response_only(pair_microbatches(self._with_reference(b), self.model.micro_batch_size))
            with self._capture():
                ms.append(self.model.evaluate_on(self.loss_fn, mbs))
        out = {k: sum(m[k] for m in ms) / len(ms) for k in ms[0]}
        out["pairs"] = (sum(int(b["tokens"].shape[0]) // 2 for _, b in zip(range(len(ms)), self.val_loader))
                        * parallel_state.get_data_parallel_world_size())
        return out

    def run(self) -> dict[str, Any]:
        """:meth:`SupervisedTrainer.run`; the result adds ``loss_type``, ``reference`` and the
        datasets' length counters (``dataset_stats``)."""
        from nemo_rlhf.algorithms.base import write_result

        result = super().run()
        if result.get("preempted"):
            return result
        result.update({"loss_type": self.cfg.dpo.loss_type, "reference": self.cfg.dpo.effective_reference,
                       "dataset_stats": {"train": dict(self.train_ds.stats), "heldout": dict(self.val_ds.stats)}})
        write_result(self.run_dir, f"{self.name}_result.json", result)
        return result


def run_dpo(cfg) -> dict[str, Any]:
    """Run the DPO stage from a Hydra config (see :class:`DPOTrainer`, :meth:`SupervisedTrainer.run`)."""
    trainer = DPOTrainer(load_stage_config(DPOStageConfig, cfg))
    return trainer.run_logged()
