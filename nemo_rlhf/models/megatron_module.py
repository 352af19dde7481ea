"""The LightningModule base every role shares: one megatron GPT chunk, megatron DDP, optimizer, schedule.

Lightning drives the loop (epochs, validation, logging, callbacks); megatron-core does everything
parallel: the model is this rank's TP shard / PP stage, wrapped in megatron's
``DistributedDataParallel`` (grads in ``param.main_grad``, reduced over DP, SP norm grads reduced
over TP by ``finalize_model_grads``), stepped by megatron's optimizer, and every forward/backward
goes through ``get_forward_backward_func()`` so PP schedules and micro-batching are the same code
path for every role. Optimization is manual (``automatic_optimization = False``): one call of
:meth:`train_global_batch` is one optimizer step over ``num_microbatches`` micro-batches.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping

import lightning.pytorch as pl
import torch

from nemo_rlhf.config import OptimConfig, parse_config, to_plain
from nemo_rlhf.models.builder import build_gpt_model, model_cfg_with_defaults
from nemo_rlhf.models.heads import attach_scalar_head
from nemo_rlhf.models.lora import freeze_for_lora
from nemo_rlhf.models.trainable import freeze_bottom_layers, lr_config_overrides
from nemo_rlhf.parallel.layout import LayoutError
from nemo_rlhf.parallel.state import any_rank, comm_device

class NonFiniteError(FloatingPointError):
    """Raised after ``optim.max_nonfinite_in_a_row`` consecutive updates had a non-finite loss,
    gradient, reward or advantage (each was skipped). The run stops without writing a checkpoint,
    so the newest complete checkpoint is the last good state."""

# (micro-batch dict, model output on the last stage) -> (loss scalar, metrics dict)
LossFn = Callable[[Mapping[str, torch.Tensor], torch.Tensor], tuple[torch.Tensor, dict]]


def position_ids_like(tokens: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` int64 positions 0..S-1 for right-padded ``tokens [B, S]``."""
    b, s = tokens.shape
    return torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)


def split_microbatches(batch: Mapping[str, torch.Tensor], micro_batch_size: int) -> list[dict]:
    """Split every ``[N, ...]`` tensor of a batch into ``N / micro_batch_size`` micro-batches.

    Raises:
        ValueError: if ``micro_batch_size`` does not divide the batch size N.
    """
    n = next(iter(batch.values())).shape[0]
    if micro_batch_size < 1 or n % micro_batch_size:
        raise ValueError(f"batch of {n} samples is not divisible by micro_batch_size={micro_batch_size}")
    return [{k: v[i : i + micro_batch_size] for k, v in batch.items()}
            for i in range(0, n, micro_batch_size)]


class MegatronGPTModule(pl.LightningModule):
    """Base LightningModule: a megatron ``GPTModel`` chunk (+ optional scalar head) and its optimizer.

    Args:
        model_cfg: the ``model:`` section (mapping or :class:`~nemo_rlhf.config.ModelConfig`).
        optim_cfg: the ``optim:`` section (mapping or :class:`~nemo_rlhf.config.OptimConfig`,
            defaults from the latter); None builds no optimizer
            (frozen or inference-only models such as the reference policy).
        vocab_size: tokenizer vocabulary size (unpadded).
        micro_batch_size: rows per micro-batch of the pipeline schedule (the default split of
            :meth:`train_on` / :meth:`evaluate_on`).
        scalar_head: replace the vocabulary projection by a ``[B, S, 1]`` head (reward, value).
    """

    def __init__(self, model_cfg: Mapping[str, Any], optim_cfg: Mapping[str, Any] | None,
                 vocab_size: int, micro_batch_size: int, scalar_head: bool = False):
        super().__init__()
        self.micro_batch_size = int(micro_batch_size)
        self.automatic_optimization = False
        self.model_cfg = model_cfg_with_defaults(model_cfg)
        self.optim_cfg = to_plain(optim_cfg if isinstance(optim_cfg, OptimConfig)
                                  else parse_config(OptimConfig, dict(optim_cfg or {}), "optim"))
        self.vocab_size = int(vocab_size)
        gpt = build_gpt_model(self.model_cfg, vocab_size,
                              share_embeddings_and_output_weights=False if scalar_head else None)
        if scalar_head:
            attach_scalar_head(gpt)
        self.extend_model(gpt)  # a role's extra submodules (ILQL heads), before freezing / DDP / optimizer
        self.trainable = optim_cfg is not None
        self.completed_steps = 0  # training steps taken (set by the trainer that owns this model)
        self.optimizer = None
        self.lr_scheduler = None
        self.nonfinite_skipped = 0  # updates skipped because something was NaN/Inf (this process)
        self.nonfinite_in_a_row = 0
        if self.trainable:
            # model.num_layers_unfrozen: frozen before DDP/optimizer, so no grad buffer or state
            freeze_bottom_layers(gpt, int(self.model_cfg["num_layers_unfrozen"]))
            freeze_for_lora(gpt)  # model.lora: only the adapters (and with lora.train_head the head) train
            self._check_distributed_optimizer_stages(gpt)
            self.model = self._wrap_ddp(gpt)
            self._build_optimizer()
        else:
            gpt.requires_grad_(False)
            self.model = gpt

    # ------------------------------------------------------------------ construction
    def _check_distributed_optimizer_stages(self, gpt) -> None:
        """Refuse ``optim.distributed_optimizer`` when some rank holds no trainable parameter and
        megatron-core runs its torch-Adam fallback (no Transformer Engine or Apex: always on CPU).
        That optimizer's ``state_dict`` asserts one Adam step among the rank's parameters, so the
        first checkpoint of such a run would crash after the steps it saves; e.g.
        ``model.num_layers_unfrozen`` = 2 of 4 layers at PP=2 freezes the whole first stage.
        Collective over the world (every rank raises the same error).

        Raises:
            LayoutError: naming the keys to change.
        """
        if not self.optim_cfg["distributed_optimizer"]:
            return
        from megatron.core.optimizer import distrib_optimizer

        if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
            return
        if any_rank(not any(p.requires_grad for p in gpt.parameters())):
            cfg = self.model_cfg
            raise LayoutError(
                f"optim.distributed_optimizer=true, but a pipeline stage holds no trainable parameter "
                f"(model.num_layers_unfrozen={cfg['num_layers_unfrozen']} of model.num_layers={cfg['num_layers']}, "
                f"model.pipeline_model_parallel_size={cfg['pipeline_model_parallel_size']}"
                f"{', model.lora on' if cfg.get('lora') else ''}): megatron-core's distributed optimizer without "
                f"Transformer Engine or Apex cannot checkpoint such a stage. Set optim.distributed_optimizer=false, "
                f"raise model.num_layers_unfrozen, or lower model.pipeline_model_parallel_size")

    def _wrap_ddp(self, gpt):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=bool(self.optim_cfg["distributed_optimizer"]),
        )
        model = DistributedDataParallel(config=gpt.config, ddp_config=ddp_config, module=gpt)
        gpt.config.no_sync_func = model.no_sync
        gpt.config.finalize_model_grads_func = finalize_model_grads
        return model

    def _build_optimizer(self) -> None:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        o = self.optim_cfg
        cfg = self.gpt.config
        lr = float(o["lr"])
        min_lr = float(o["min_lr"]) if o["min_lr"] is not None else lr / 10
        betas = tuple(o["betas"])
        optimizer_config = OptimizerConfig(
            optimizer=str(o["optimizer"]), sgd_momentum=float(o["sgd_momentum"]), lr=lr, min_lr=min_lr, weight_decay=float(o["weight_decay"]),
            adam_beta1=float(betas[0]), adam_beta2=float(betas[1]), adam_eps=float(o["eps"]),
            clip_grad=float(o["clip_grad"]), bf16=cfg.bf16, fp16=cfg.fp16,
            params_dtype=cfg.params_dtype,
            use_distributed_optimizer=bool(o["distributed_optimizer"]),
        )
        # optim.layer_lr_decay / optim.lr_mult: parameter groups with scaled max_lr/min_lr (None: default groups)
        self.optimizer = get_megatron_optimizer(
            optimizer_config, [self.model],
            config_overrides=lr_config_overrides(self.model, optimizer_config, o))
        warmup = int(o["warmup_steps"])
        decay = o["decay_steps"]
        self.lr_scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if warmup else lr, max_lr=lr, min_lr=min_lr,
            lr_warmup_steps=warmup,
            lr_decay_steps=int(decay) if decay else 10**12,
            lr_decay_style=o["decay_style"] if decay else "constant",
            start_wd=float(o["weight_decay"]), end_wd=float(o["weight_decay"]),
            wd_incr_steps=1, wd_incr_style="constant",
        )
        if warmup:
            self.lr_scheduler.step(0)

    def extend_model(self, gpt) -> None:
        """Add a role's own submodules to the freshly built ``gpt`` (this rank's chunk) before the
        bottom layers are frozen and megatron DDP and the optimizer are built, so they train,
        reduce and checkpoint with the model (``models/ilql.py``: the ILQL heads). Default: nothing."""

    # ------------------------------------------------------------------ accessors
    @property
    def gpt(self):
        """The unwrapped megatron ``GPTModel`` of this rank."""
        return self.model.module if hasattr(self.model, "module") else self.model

    @property
    def model_device(self) -> torch.device:
        """Device of this rank's parameters."""
        return next(self.gpt.parameters()).device

    def microbatch_size_for(self, n: int) -> int:
        """``self.micro_batch_size`` when it divides a batch of ``n`` rows, else the whole batch."""
        return self.micro_batch_size if n % self.micro_batch_size == 0 else n

    def unwrapped_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's ``GPTModel`` weights (TP shard / PP stage), keys as in ``GPTModel``."""
        return self.gpt.state_dict()

    # ------------------------------------------------------------------ schedules
    def forward_backward(
        self,
        microbatches: list[dict],
        forward_fn: Callable[[Any, dict], torch.Tensor],
        loss_fn: LossFn,
        forward_only: bool,
    ) -> list[dict]:
        """Run megatron's pipeline schedule over ``microbatches``.

        Args:
            microbatches: list of dicts of ``[b, ...]`` tensors; every micro-batch must have the
                same batch size b and sequence length S (``tokens [b, S]``).
            forward_fn: ``(gpt_or_ddp_model, micro_batch) -> output`` (logits ``[b, S, V/TP]``,
                head outputs ``[b, S, 1]``, or hidden states on non-last stages).
            loss_fn: ``(micro_batch, output) -> (loss, metrics)`` evaluated on the last stage;
                ``loss`` is a per-micro-batch mean (the schedule divides by the micro-batch count).
            forward_only: no backward (evaluation, log-prob computation).

        Returns:
            the metrics dicts of every micro-batch on the last PP stage; ``[]`` on other stages.
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if not microbatches:
            return []
        tokens = microbatches[0]["tokens"]
        mbs, seq = tokens.shape

        def loss_and_metrics(mb, out):
            loss, metrics = loss_fn(mb, out)
            # Copies: the schedule divides the returned loss in place by the micro-batch count.
            return loss, {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in metrics.items()}

        def step(data_iterator, model):
            mb = next(data_iterator)
            out = forward_fn(model, mb)
            if not forward_only and not out.requires_grad:
                # Only frozen parameters up to here and no gradient-carrying input (the first
                # pipeline stages under model.num_layers_unfrozen): a leaf makes this stage's
                # backward empty instead of an autograd error.
                out = out.detach().requires_grad_(True)
            return out, functools.partial(loss_and_metrics, mb)

        if not forward_only:
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
        fb = get_forward_backward_func()
        context = torch.no_grad() if forward_only else torch.enable_grad()
        with context:
            return fb(
                forward_step_func=step,
                data_iterator=iter(microbatches),
                model=[self.model],
                num_microbatches=len(microbatches),
                seq_length=seq,
                micro_batch_size=mbs,
                forward_only=forward_only,
            )

    def optimizer_step_(self) -> dict[str, float]:
        """One megatron optimizer step + LR schedule step; returns ``grad_norm`` and ``lr``.

        A step whose gradients are not finite is skipped by the megatron optimizer
        (``update_successful=False``) and reported as ``skipped=1``.
        """
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.lr_scheduler.step(increment=1)
        lr = self.base_lr()
        return {"grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "lr": float(lr), "skipped": 0.0 if ok else 1.0}

    def base_lr(self) -> float:
        """The learning rate of the base schedule (``optim.lr``'s) at the current step; parameter
        groups of ``optim.layer_lr_decay`` / ``optim.lr_mult`` train at multiples of it."""
        return float(self.lr_scheduler.get_lr({}))

    def _grads_finite(self) -> bool:
        """True on every rank iff every gradient of every rank is finite (one all-reduce)."""
        bad = any(not bool(torch.isfinite(p.main_grad).all())
                  for p in self.model.parameters() if getattr(p, "main_grad", None) is not None)
        return not any_rank(bad)

    def record_nonfinite(self, what: str) -> None:
        """Count one skipped update (``what`` names the culprit for the log); call on every rank.

        Raises:
            NonFiniteError: the ``optim.max_nonfinite_in_a_row``-th skip in a row.
        """
        import logging

        self.nonfinite_skipped += 1
        self.nonfinite_in_a_row += 1
        limit = int(self.optim_cfg.get("max_nonfinite_in_a_row") or 0)
        logging.getLogger("nemo_rlhf").warning(
            "non-finite %s at step %d: update skipped (%d in a row, %d in total; limit %s in a row)",
            what, self.completed_steps, self.nonfinite_in_a_row, self.nonfinite_skipped, limit or "none")
        if limit and self.nonfinite_in_a_row >= limit:
            raise NonFiniteError(
                f"{self.nonfinite_in_a_row} updates in a row had a non-finite {what} (last at step "
                f"{self.completed_steps}; optim.max_nonfinite_in_a_row={limit}): aborting without writing a "
                f"checkpoint, so the newest complete checkpoint is the last good state. Lower the learning "
                f"rate or check the data/reward model before resuming.")

    @staticmethod
    def forward_step(model, mb: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(gpt_or_ddp_model, micro_batch) -> output``: logits ``[b, S, V/TP]`` (or head outputs
        ``[b, S, 1]``) of ``mb["tokens"] [b, S]`` at positions 0..S-1, no attention mask (causal).
        Roles override it for other inputs (the policy: per-token log-probs of ``labels``)."""
        return model(mb["tokens"], position_ids_like(mb["tokens"]), None)

    def _microbatches(self, batch, micro_batch_size: int | None) -> list[dict]:
        if isinstance(batch, list):
            return batch
        n = batch["tokens"].shape[0]
        return split_microbatches(batch, micro_batch_size or self.microbatch_size_for(n))

    def train_on(self, loss_fn: LossFn, batch: Mapping[str, torch.Tensor] | list[dict],
                 micro_batch_size: int | None = None) -> dict[str, float]:
        """One optimizer step of ``loss_fn`` on ``batch`` (the trainer's loss; this model only runs
        forward, backward, gradient reduction and the optimizer).

        Args:
            loss_fn: ``(micro_batch, output) -> (loss, metrics)`` on the last PP stage, with
                ``output`` from :meth:`forward_step`; ``loss`` is the micro-batch mean.
            batch: ``{name: [N, ...]}`` with ``tokens [N, S]`` (split into micro-batches of
                ``micro_batch_size``, default :meth:`microbatch_size_for`), or a list of
                micro-batch dicts already split by the caller (e.g. preference pairs kept together).

        Returns:
            the metrics of :meth:`train_global_batch`.
        """
        return self.train_global_batch(self._microbatches(batch, micro_batch_size), loss_fn)

    @torch.no_grad()
    def evaluate_on(self, loss_fn: LossFn, batch: Mapping[str, torch.Tensor] | list[dict],
                    micro_batch_size: int | None = None) -> dict[str, float]:
        """Forward-only ``loss_fn`` over ``batch`` (as :meth:`train_on`); metrics averaged over
        micro-batches and DP ranks (:func:`average_metrics`), identical on every rank."""
        self.model.eval()
        outs = self.forward_backward(self._microbatches(batch, micro_batch_size), self.forward_step,
                                     loss_fn, forward_only=True)
        return average_metrics(outs)

    def train_global_batch(self, microbatches: list[dict], loss_fn: LossFn) -> dict[str, float]:
        """Forward/backward over ``microbatches`` then one optimizer step.

        Non-finite guard: when the loss (averaged over micro-batches and ranks) or any gradient is
        NaN/Inf, the optimizer step is skipped on every rank (weights, optimizer state and LR
        schedule untouched), counted (:meth:`record_nonfinite`) and reported as ``skipped=1``,
        ``nonfinite=1``.

        Returns:
            metrics averaged over micro-batches (broadcast from the last PP stage) plus
            ``grad_norm``, ``lr``, ``skipped`` and ``nonfinite``.

        Raises:
            NonFiniteError: ``optim.max_nonfinite_in_a_row`` skipped steps in a row.
        """
        import math

        if self.optimizer is None:
            raise RuntimeError("this model was built without an optimizer (optim_cfg=None): it is frozen")
        self.model.train()
        outs = self.forward_backward(microbatches, self.forward_step, loss_fn, forward_only=False)
        metrics = average_metrics(outs)
        loss_ok = math.isfinite(metrics.get("loss", 0.0))
        if not (loss_ok and self._grads_finite()):
            self.record_nonfinite("loss" if not loss_ok else "gradient")
            metrics.update(grad_norm=float("nan"), lr=self.base_lr(),
                           skipped=1.0, nonfinite=1.0)
            return metrics
        self.nonfinite_in_a_row = 0
        metrics.update(self.optimizer_step_())
        metrics["nonfinite"] = 0.0
        return metrics


def average_metrics(outs: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """Average per-micro-batch scalar metrics over micro-batches, DP ranks and PP stages.

    Keys ending in ``_sum`` / ``_count`` pairs are combined as sum/sum (token-weighted means).
    Every rank returns the same dict (the last PP stage's values are all-reduced over the PP
    group, the only stage that has them, and averaged over DP).
    """
    from megatron.core import parallel_state

    outs = list(outs)
    keys = sorted(outs[0].keys()) if outs else []
    # Agree on the keys across PP: only the last stage has them.
    if torch.distributed.is_initialized() and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        obj = [keys]
        src = parallel_state.get_pipeline_model_parallel_last_rank()
        torch.distributed.broadcast_object_list(obj, src=src,
                                                group=parallel_state.get_pipeline_model_parallel_group())
        keys = obj[0]
    if not keys:
        return {}
    vec = torch.zeros(len(keys), dtype=torch.float64, device=comm_device())
    for o in outs:
        for i, k in enumerate(keys):
            vec[i] += float(o[k])
    n = torch.tensor([float(len(outs))], dtype=torch.float64, device=comm_device())
    if torch.distributed.is_initialized():
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(vec, group=parallel_state.get_pipeline_model_parallel_group())
            torch.distributed.all_reduce(n, group=parallel_state.get_pipeline_model_parallel_group())
        dp = parallel_state.get_data_parallel_group()
        torch.distributed.all_reduce(vec, group=dp)
        torch.distributed.all_reduce(n, group=dp)
    result: dict[str, float] = {}
    values = dict(zip(keys, vec.cpu().tolist()))
    for k in keys:
        if k.endswith("_sum"):
            base = k[: -len("_sum")]
            count = values.get(base + "_count")
            if count:
                result[base] = values[k] / count
            continue
        if k.endswith("_count"):
            continue
        result[k] = values[k] / float(n.cpu().item())
    return result
