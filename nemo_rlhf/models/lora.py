"""LoRA: low-rank adapters on megatron-core's tensor-parallel linears.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3::

    h = W0 x + (alpha / r) * B A x,    A [r, in] (Kaiming-uniform), B [out, r] = 0

so a model with fresh adapters computes exactly what its base computes. The adapters sit on the
attention and MLP linears of every transformer layer (``model.lora.target_modules``: ``qkv`` =
``linear_qkv``, ``proj`` = ``linear_proj``, ``fc1`` = ``linear_fc1``, ``fc2`` = ``linear_fc2``) through
megatron's module spec (:func:`lora_layer_spec`): the layers are :class:`LoRAColumnParallelLinear` /
:class:`LoRARowParallelLinear`, subclasses of megatron's ``ColumnParallelLinear`` /
``RowParallelLinear`` that keep the base weight's name, shape and checkpoint layout and add two
parameters, ``lora_a`` and ``lora_b``.

Tensor parallelism: each adapter is split like its base weight, and the adapter's output joins the
base layer's own output *before* the base layer's communication:

* ColumnParallel base (``W0 [out/TP, in]``, output split): ``A [r, in]`` is replicated,
  ``B [out/TP, r]`` split by output rows. Rank j adds ``B_j A x`` to its output slice. Under
  sequence parallelism the base all-gathers its ``[S/TP, b, in]`` input along the sequence inside
  its matmul; the adapter gathers the same input itself, so both see ``[S, b, in]``. ``u = A x``
  is the same on every rank; its gradient ``sum_j B_j^T g_j`` needs every rank's output slice, so
  ``u`` passes through megatron's ``copy_to_tensor_model_parallel_region`` (identity forward,
  all-reduce of ``du`` backward; ``r`` numbers per token). ``dA`` and the adapter's input gradient
  are then complete and identical on every rank.
* RowParallel base (``W0 [out, in/TP]``, input split): ``A [r, in/TP]`` split by input columns,
  ``B [out, r]`` replicated. Rank i adds the partial product ``B A_i x_i`` to its partial output,
  and the base layer's all-reduce (or, under sequence parallelism, reduce-scatter) sums them:
  ``sum_i B A_i x_i = B A x``. The replicated ``B`` passes through
  ``copy_to_tensor_model_parallel_region`` so its gradient ``sum_i g (A_i x_i)^T`` is all-reduced
  (``[out, r]`` per layer and micro-batch).

With ``swiglu``/``geglu`` (``linear_fc1`` holds ``[gate; up]`` per TP rank) ``lora_b`` of ``fc1``
is saved with megatron's swiglu sharded factory, exactly as the base weight, so adapter
checkpoints reshard across TP sizes. Split adapter tensors carry megatron's
``tensor_model_parallel`` attributes (gradient-norm clipping counts them on every rank, replicated
ones on TP rank 0 only).

Only the adapters (and, with ``model.lora.train_head``, the output head) train:
:func:`freeze_for_lora` sets ``requires_grad=False`` on everything else before megatron's DDP and
optimizer are built, so base weights get no gradient buffer and no optimizer state.

Merging (:func:`merge_lora`, :func:`merged_lora`) adds ``(alpha/r) B A`` into each TP shard's base
weight (``B_j A`` or ``B A_i``: no communication) for export and fast generation; :func:`unmerge_lora`
restores the base weights bitwise from the copy kept by the merge. :func:`adapters_disabled` runs the
model as its base -- the reference policy of RLHF without a second copy of the weights.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F

from nemo_rlhf.config import LORA_TARGETS, LoRAConfig, parse_config, to_plain

ADAPTER_PARAMS = ("lora_a", "lora_b")
# model.lora.target_modules name -> (transformer-layer submodule, linear)
TARGET_LINEARS = {"qkv": ("self_attention", "linear_qkv"), "proj": ("self_attention", "linear_proj"),
                  "fc1": ("mlp", "linear_fc1"), "fc2": ("mlp", "linear_fc2")}
CONFIG_FILE = "lora_config.json"  # written next to standalone adapter checkpoints


def lora_config(model_cfg: Mapping[str, Any] | None) -> LoRAConfig | None:
    """The :class:`~nemo_rlhf.config.LoRAConfig` of a ``model:`` config (its ``lora`` entry: a
    mapping or a LoRAConfig), or None when LoRA is off (no entry, ``rank`` 0 or None).

    Raises:
        ConfigError: a bad ``model.lora`` value (naming the field).
    """
    node = (model_cfg or {}).get("lora")
    cfg = node if isinstance(node, LoRAConfig) else parse_config(LoRAConfig, node)
    return cfg if cfg.enabled else None


def is_adapter_name(name: str) -> bool:
    """True for the name (parameter, state-dict or sharded-state-dict key) of an adapter tensor."""
    return name.rsplit(".", 1)[-1] in ADAPTER_PARAMS


# ----------------------------------------------------------------------------- layers
class _LoRAMixin:
    """What both LoRA linears share: parameters, scale, dropout, merge state.

    Attributes:
        lora_a: ``[r, in_local]`` (in_local = in, or in/TP for RowParallel).
        lora_b: ``[out_local, r]`` (out_local = out/TP for ColumnParallel, or out).
        lora_scale: ``alpha / r`` (Hu et al. 2021, sec. 4.1).
        lora_disabled: True inside :func:`adapters_disabled` (the layer computes its base only).
        lora_merged: True while ``(alpha/r) B A`` is added into ``weight`` (:func:`merge_lora`).
    """

    def _setup_lora(self, lora: LoRAConfig, in_local: int, out_local: int, split_dim: tuple[str, int]) -> None:
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        r = int(lora.rank)
        if r < 1:
            raise ValueError(f"model.lora.rank must be >= 1 to build an adapter, got {lora.rank!r}")
        dtype, device = self.weight.dtype, self.weight.device
        self.lora_rank = r
        self.lora_alpha = float(lora.alpha)
        self.lora_scale = float(lora.alpha) / r
        self.lora_a = torch.nn.Parameter(torch.empty(r, in_local, dtype=dtype, device=device))
        self.lora_b = torch.nn.Parameter(torch.zeros(out_local, r, dtype=dtype, device=device))
        name, dim = split_dim  # the adapter tensor split over TP like the base weight
        set_tensor_model_parallel_attributes(getattr(self, name), True, dim, 1)
        self.lora_dropout = torch.nn.Dropout(float(lora.dropout)) if lora.dropout else torch.nn.Identity()
        self.lora_disabled = False
        self.lora_merged = False
        self._lora_base_weight: torch.Tensor | None = None
        # Valid values until init_lora_weights gives each layer its own (seeded by its layer number).
        self.reset_lora_parameters(torch.Generator(device="cpu").manual_seed(0))

    def _tp(self) -> tuple[int, int]:
        from megatron.core.utils import get_pg_rank, get_pg_size

        return get_pg_size(self.tp_group), get_pg_rank(self.tp_group)

    def full_lora_a(self, generator: torch.Generator) -> torch.Tensor:
        """``[r, in]`` float32 Kaiming-uniform (a = sqrt(5), ``torch.nn.Linear``'s and PEFT's init of
        A) drawn from ``generator`` on the CPU, the same for every TP layout."""
        a = torch.empty(self.lora_rank, self.input_size, dtype=torch.float32)
        bound = math.sqrt(6.0 / ((1 + 5.0) * self.input_size))  # kaiming_uniform_(a=sqrt(5)): 1/sqrt(fan_in)
        return a.uniform_(-bound, bound, generator=generator)

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator) -> None:
        """A: Kaiming-uniform from ``generator`` (this TP rank's columns of the full ``[r, in]`` draw
        for RowParallel); B: zeros, so the layer computes its base exactly (Hu et al. 2021, sec. 4.1)."""
        a = self.full_lora_a(generator)
        if self.lora_a.shape[1] != a.shape[1]:  # RowParallel: this rank's input columns
            _, rank = self._tp()
            n = self.lora_a.shape[1]
            a = a[:, rank * n : (rank + 1) * n]
        self.lora_a.copy_(a)
        self.lora_b.zero_()

    def _lora_active(self) -> bool:
        if self.lora_merged:
            if torch.is_grad_enabled() and (self.lora_a.requires_grad or self.lora_b.requires_grad):
                raise RuntimeError("LoRA adapters are merged into the base weights (merge_lora): unmerge them "
                                   "(unmerge_lora) before a forward that trains them")
            return False
        return not self.lora_disabled

    def lora_delta(self) -> torch.Tensor:
        """``(alpha/r) B A`` for this TP shard of the base weight: ``[out_local, in_local]``, in the
        weight's dtype (computed in float32)."""
        delta = self.lora_scale * (self.lora_b.detach().float() @ self.lora_a.detach().float())
        return delta.to(self.weight.dtype)

    @torch.no_grad()
    def merge_lora_(self, keep_base: bool = True) -> None:
        """``weight += (alpha/r) B A`` (this shard, no communication); the adapter is then skipped
        in the forward. ``keep_base`` keeps a copy of the base weight so :meth:`unmerge_lora_`
        restores it bitwise (without it, the unmerge subtracts the delta again: ~1 ulp off)."""
        if self.lora_merged:
            raise RuntimeError("LoRA adapter already merged")
        self._lora_base_weight = self.weight.detach().clone() if keep_base else None
        self.weight.add_(self.lora_delta())
        self.lora_merged = True

    @torch.no_grad()
    def unmerge_lora_(self) -> None:
        """Undo :meth:`merge_lora_` (bitwise when the merge kept the base weight)."""
        if not self.lora_merged:
            raise RuntimeError("LoRA adapter is not merged")
        if self._lora_base_weight is not None:
            self.weight.copy_(self._lora_base_weight)
        else:
            self.weight.sub_(self.lora_delta())
        self._lora_base_weight = None
        self.lora_merged = False

    def _adapter_sharded_state_dict(self, sd: dict, prefix: str, sharded_offsets, metadata, axis: dict) -> dict:
        """``sd`` (the base layer's sharded state dict) plus this layer's adapter tensors, split
        over TP along ``axis`` (``{"lora_b": 0}`` or ``{"lora_a": 1}``), replicated otherwise."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        own = {name: getattr(self, name) for name in ADAPTER_PARAMS}
        sd.update(make_sharded_tensors_for_checkpoint(own, prefix, axis, sharded_offsets, tp_group=self.tp_group,
                                                      dp_cp_group=(metadata or {}).get("dp_cp_group")))
        return sd


def _column_class():
    from megatron.core import tensor_parallel

    class LoRAColumnParallelLinear(_LoRAMixin, tensor_parallel.ColumnParallelLinear):
        """Megatron ``ColumnParallelLinear`` (``weight [out/TP, in]``) + LoRA adapter
        (``lora_a [r, in]`` replicated, ``lora_b [out/TP, r]`` split like the weight).

        Forward: input ``[S(/TP under SP), b, in]`` -> ``([S, b, out/TP] (or gathered), bias)``,
        output ``W0_j x + (alpha/r) B_j A x``; see the module docstring for the communication.

        Args:
            input_size, output_size, **kwargs: those of ``ColumnParallelLinear``.
            lora: the adapter's :class:`~nemo_rlhf.config.LoRAConfig` (``rank`` >= 1).
        """

        def __init__(self, input_size: int, output_size: int, *, lora: LoRAConfig, **kwargs):
            super().__init__(input_size, output_size, **kwargs)
            self.lora_swiglu = int(getattr(self.weight, "partition_stride", 1)) == 2  # fc1 = [gate; up] per rank
            self._setup_lora(lora, input_size, self.output_size_per_partition, ("lora_b", 0))

        def _forward_impl(self, input, weight, *args, **kwargs):
            out = super()._forward_impl(input, weight, *args, **kwargs)
            if not self._lora_active():
                return out
            from megatron.core import tensor_parallel

            tp, _ = self._tp()
            x = input
            if kwargs.get("sequence_parallel"):
                # the base gathered [S/TP, b, in] inside its matmul; the adapter needs the same [S, b, in].
                # Its input gradient is complete on every rank (du is all-reduced below): split it back.
                x = tensor_parallel.gather_from_sequence_parallel_region(
                    x, tensor_parallel_output_grad=False, group=self.tp_group)
            if tp > 1 and isinstance(self.lora_dropout, torch.nn.Dropout) and self.training:
                # x is the same on every TP rank: so must the dropout mask be
                from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_data_parallel_rng_tracker_name

                with get_cuda_rng_tracker().fork(get_data_parallel_rng_tracker_name()):
                    x = self.lora_dropout(x)
            else:
                x = self.lora_dropout(x)
            u = F.linear(x, self.lora_a)  # [S, b, r], identical on every TP rank
            if tp > 1:
                u = tensor_parallel.copy_to_tensor_model_parallel_region(u, group=self.tp_group)
            return out + self.lora_scale * F.linear(u, self.lora_b)

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            """The base layer's (weight, bias split on axis 0) plus ``lora_a`` (replicated) and
            ``lora_b`` (split on axis 0; with the swiglu factory for a gated ``fc1``)."""
            sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
            sd = self._adapter_sharded_state_dict(sd, prefix, sharded_offsets, metadata, {"lora_b": 0})
            if self.lora_swiglu:
                from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

                key = f"{prefix}lora_b"
                sd[key] = apply_swiglu_sharded_factory(
                    sd[key], sharded_offsets, (metadata or {}).get("singleton_local_shards", False))
            return sd

    return LoRAColumnParallelLinear


def _row_class():
    from megatron.core import tensor_parallel

    class LoRARowParallelLinear(_LoRAMixin, tensor_parallel.RowParallelLinear):
        """Megatron ``RowParallelLinear`` (``weight [out, in/TP]``) + LoRA adapter
        (``lora_a [r, in/TP]`` split like the weight, ``lora_b [out, r]`` replicated).

        Forward: input ``[S, b, in/TP]`` -> ``([S(/TP under SP), b, out], bias)``: each rank adds
        ``(alpha/r) B A_i x_i`` to its partial output before the base layer's all-reduce /
        reduce-scatter; see the module docstring.

        Args:
            input_size, output_size, **kwargs: those of ``RowParallelLinear``.
            lora: the adapter's :class:`~nemo_rlhf.config.LoRAConfig` (``rank`` >= 1).
        """

        def __init__(self, input_size: int, output_size: int, *, lora: LoRAConfig, **kwargs):
            super().__init__(input_size, output_size, **kwargs)
            self._setup_lora(lora, self.input_size_per_partition, output_size, ("lora_a", 1))

        def _forward_impl(self, input, weight, *args, **kwargs):
            out = super()._forward_impl(input, weight, *args, **kwargs)  # partial sums [S, b, out]
            if not self._lora_active():
                return out
            from megatron.core import tensor_parallel

            tp, _ = self._tp()
            if tp > 1 and isinstance(self.lora_dropout, torch.nn.Dropout) and self.training:
                # each rank holds different input columns: independent masks (megatron's TP RNG)
                from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

                with get_cuda_rng_tracker().fork():
                    x = self.lora_dropout(input)
            else:
                x = self.lora_dropout(input)
            b = self.lora_b
            if tp > 1:  # replicated B: its gradient sum_i g (A_i x_i)^T is all-reduced
                b = tensor_parallel.copy_to_tensor_model_parallel_region(b, group=self.tp_group)
            return out + self.lora_scale * F.linear(F.linear(x, self.lora_a), b)

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            """The base layer's (weight split on axis 1) plus ``lora_a`` (split on axis 1) and
            ``lora_b`` (replicated)."""
            sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
            return self._adapter_sharded_state_dict(sd, prefix, sharded_offsets, metadata, {"lora_a": 1})

    return LoRARowParallelLinear


_CLASSES: dict[str, type] = {}


def lora_linear_classes() -> tuple[type, type]:
    """``(LoRAColumnParallelLinear, LoRARowParallelLinear)`` (built once, on first use, so that
    importing this module does not import megatron)."""
    if not _CLASSES:
        _CLASSES["column"], _CLASSES["row"] = _column_class(), _row_class()
    return _CLASSES["column"], _CLASSES["row"]


def lora_layer_spec(layer_spec, lora: LoRAConfig):
    """A copy of megatron's transformer-layer ``ModuleSpec`` whose target linears are LoRA linears.

    Args:
        layer_spec: the spec of ``get_gpt_layer_local_spec`` (``linear_qkv`` / ``linear_fc1``
            ``ColumnParallelLinear``, ``linear_proj`` / ``linear_fc2`` ``RowParallelLinear``).
        lora: :class:`~nemo_rlhf.config.LoRAConfig` with ``rank`` >= 1.

    Raises:
        ValueError: a target linear is not megatron's plain Column/RowParallelLinear (e.g. a
            Transformer Engine spec), naming it.
    """
    from megatron.core import tensor_parallel
    from megatron.core.transformer.spec_utils import ModuleSpec

    column, row = lora_linear_classes()
    spec = copy.deepcopy(layer_spec)
    for target in lora.target_modules:
        parent, linear = TARGET_LINEARS[target]
        subs = getattr(spec.submodules, parent).submodules
        base = getattr(subs, linear)
        if base is tensor_parallel.ColumnParallelLinear:
            cls = column
        elif base is tensor_parallel.RowParallelLinear:
            cls = row
        else:
            raise ValueError(f"model.lora.target_modules: {target!r} ({parent}.{linear}) is {base!r}, not megatron's "
                             f"ColumnParallelLinear/RowParallelLinear: LoRA supports the local layer spec only")
        setattr(subs, linear, ModuleSpec(module=cls, params={"lora": lora}))
    return spec


# ----------------------------------------------------------------------------- model-level
def _unwrap(model):
    """The megatron GPTModel of a role (``.gpt``), under a DDP wrapper (``.module``), or itself."""
    gpt = getattr(model, "gpt", None)
    if isinstance(gpt, torch.nn.Module):
        return gpt
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def lora_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """``(name, layer)`` of every LoRA linear of ``model`` (GPTModel, its DDP wrapper or a role),
    in ``named_modules`` order (empty when LoRA is off)."""
    column, row = lora_linear_classes()
    return [(n, m) for n, m in _unwrap(model).named_modules() if isinstance(m, (column, row))]


def adapter_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of every adapter tensor (``*.lora_a``, ``*.lora_b``) of ``model``."""
    return [(n, p) for n, p in _unwrap(model).named_parameters() if is_adapter_name(n)]


def _layer_seed(base: int, layer_number: int, target: int) -> int:
    return (int(base) * 1_000_003 + int(layer_number) * 16 + target) % (2**63 - 1)


def init_lora_weights(gpt, seed: int | None = None) -> None:
    """Initialise every adapter: A Kaiming-uniform, B zero (Hu et al. 2021, sec. 4.1).

    Each (global layer number, target) draws its full ``A [r, in]`` from its own generator seeded
    from ``seed`` (default: ``torch.initial_seed()``, which :func:`~nemo_rlhf.parallel.state.seed_everything`
    sets per pipeline stage), so the base weights' initialisation does not change when LoRA is on,
    and every TP rank holds its slice of the same ``A``.
    """
    base = torch.initial_seed() if seed is None else int(seed)
    column, row = lora_linear_classes()
    for layer in getattr(getattr(gpt, "decoder", None), "layers", []):
        for index, target in enumerate(LORA_TARGETS):
            parent, linear = TARGET_LINEARS[target]
            module = getattr(getattr(layer, parent, None), linear, None)
            if isinstance(module, (column, row)):
                g = torch.Generator(device="cpu").manual_seed(_layer_seed(base, layer.layer_number, index))
                module.reset_lora_parameters(g)


def head_parameter_names(gpt) -> list[str]:
    """Names of the output head's parameters on this rank: ``output_layer.*`` (the LM head, or the
    reward/value head), and with tied embeddings the word embedding (the same matrix)."""
    names = [n for n, _ in gpt.named_parameters() if n.startswith("output_layer.")]
    if getattr(gpt, "share_embeddings_and_output_weights", False):
        names += [n for n, _ in gpt.named_parameters() if n == "embedding.word_embeddings.weight"]
    return names


def freeze_for_lora(gpt) -> list[str]:
    """With LoRA on (``gpt.lora_config``), set ``requires_grad=False`` on every parameter that is
    not an adapter (nor, with ``model.lora.train_head``, a head parameter: :func:`head_parameter_names`).
    Only freezes (never unfreezes), so it composes with ``model.num_layers_unfrozen``. Call before
    megatron's DDP and optimizer are built. No-op when LoRA is off.

    Returns:
        names of the parameters left trainable on this rank.
    """
    lora = getattr(gpt, "lora_config", None)
    if lora is None:
        return [n for n, p in gpt.named_parameters() if p.requires_grad]
    keep = set(head_parameter_names(gpt)) if lora.train_head else set()
    for name, p in gpt.named_parameters():
        if not (is_adapter_name(name) or name in keep):
            p.requires_grad_(False)
    return [n for n, p in gpt.named_parameters() if p.requires_grad]


def merge_lora(model, keep_base: bool = True) -> int:
    """Add ``(alpha/r) B A`` into every targeted base weight (each TP shard its own; no
    communication); the adapters are skipped until :func:`unmerge_lora`. Forward outputs equal the
    unmerged model's up to float rounding (a training forward raises while merged).

    Args:
        keep_base: keep a copy of each targeted base weight so the unmerge is bitwise (costs the
            memory of those weights while merged).

    Returns:
        the number of layers merged.

    Raises:
        RuntimeError: already merged.
    """
    mods = lora_modules(model)
    for _, m in mods:
        m.merge_lora_(keep_base=keep_base)
    return len(mods)


def unmerge_lora(model) -> int:
    """Undo :func:`merge_lora` (restores the base weights bitwise when it kept them).

    Raises:
        RuntimeError: not merged.
    """
    mods = lora_modules(model)
    for _, m in mods:
        m.unmerge_lora_()
    return len(mods)


def is_merged(model) -> bool:
    """True when the adapters of ``model`` are merged into its base weights."""
    return any(m.lora_merged for _, m in lora_modules(model))


@contextlib.contextmanager
def merged_lora(model, keep_base: bool = True) -> Iterator[None]:
    """Run ``model`` with the adapters merged inside the block (fast generation: one matmul per
    linear); unmerged on exit, also on error. A no-op when LoRA is off."""
    if not lora_modules(model):
        yield
        return
    merge_lora(model, keep_base=keep_base)
    try:
        yield
    finally:
        unmerge_lora(model)


@contextlib.contextmanager
def adapters_disabled(model) -> Iterator[None]:
    """Run ``model`` as its base model inside the block: every LoRA linear computes ``W0 x`` only.
    The base weights are frozen, so this is exactly the model before LoRA training -- the reference
    policy of RLHF without a second copy of the weights. Restored on exit, also on error.

    Raises:
        RuntimeError: the adapters are merged (the base weights hold them), or the head trains
            (``model.lora.train_head``: the base is no longer the initial model).
    """
    mods = lora_modules(model)
    if any(m.lora_merged for _, m in mods):
        raise RuntimeError("adapters_disabled: the LoRA adapters are merged into the base weights; unmerge first")
    lora = getattr(_unwrap(model), "lora_config", None)
    if lora is not None and lora.train_head:
        raise RuntimeError("adapters_disabled is not the initial model with model.lora.train_head=true (the head "
                           "trains); use a separate reference model")
    before = [m.lora_disabled for _, m in mods]
    for _, m in mods:
        m.lora_disabled = True
    try:
        yield
    finally:
        for (_, m), was in zip(mods, before):
            m.lora_disabled = was


def adapter_sharded_state_dict(gpt) -> dict:
    """The adapter entries of ``gpt.sharded_state_dict()`` (``*.lora_a``, ``*.lora_b``, with their
    TP/PP sharding): what a standalone adapter checkpoint holds."""
    return {k: v for k, v in gpt.sharded_state_dict().items() if is_adapter_name(k)}


def lora_config_dict(gpt) -> dict[str, Any] | None:
    """The model's ``model.lora`` as a plain dict (written with adapter checkpoints), or None."""
    lora = getattr(gpt, "lora_config", None)
    return to_plain(lora) if lora is not None else None


class LoRAReference:
    """The reference policy of RLHF as the actor itself with its LoRA adapters disabled
    (``ppo.reference: lora_disabled``): with every base weight frozen and B = 0 at the start, the
    adapter-free model *is* the initial policy, so no second copy of the weights is held.

    What a trainer may call: :meth:`logprobs` (as ``GPTPolicyModel.logprobs``).

    Args:
        actor: the trainable policy (a ``GPTPolicyModel``) built with ``model.lora.rank`` >= 1 and
            ``model.lora.train_head`` false.

    Raises:
        ValueError: the actor has no LoRA adapters, or its head trains.
    """

    def __init__(self, actor):
        lora = getattr(actor.gpt, "lora_config", None)
        if lora is None or lora.train_head:
            raise ValueError("ppo.reference=lora_disabled needs an actor with LoRA adapters (model.lora.rank >= 1) "
                             "and a frozen head (model.lora.train_head=false)")
        self.actor = actor

    @torch.no_grad()
    def logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, S]`` int64 -> ``[B, S-1]`` float32 reference log-probs (the actor's forward
        with adapters disabled), on every rank."""
        with adapters_disabled(self.actor):
            return self.actor.logprobs(tokens)
