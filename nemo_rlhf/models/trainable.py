"""Which parameters of a GPT train, and at which learning rate.

Two knobs, both applied before megatron's ``DistributedDataParallel`` and optimizer are built:

* ``model.num_layers_unfrozen = k`` (trlX's name; -1 = everything trains). With k >= 0 only the top k
  transformer layers (global index >= ``num_layers - k``), the final norm and the output head train.
  The embeddings are frozen, and so is an LM head *tied* to them (it is the same matrix: trlX's
  ``freeze_bottom_causal_layers`` freezes it too); an untied LM head and the reward/value heads
  train. Frozen parameters get ``requires_grad=False``, so megatron DDP gives them no ``main_grad``
  buffer, the optimizer no state, and autograd computes no weight gradient for them: a pipeline
  stage holding only frozen layers runs no weight backward (it still passes activation gradients
  down when a stage below has something to train; when nothing below it does, its output is a
  leaf and its backward is empty, see ``MegatronGPTModule.forward_backward``).
  (trlX at k = 0 also freezes an untied LM head; here k = 0 trains the final norm and every head.)

* Per-parameter learning-rate multipliers as megatron optimizer parameter groups:
  ``lr_mult[module] * layer_lr_decay ** depth``. Layer-wise LR decay follows ELECTRA (Clark et al.
  2020, app. A) and BEiT (Bao et al. 2022, sec. 2.6; BEiT's ``get_num_layer_for_vit``): depth 0 is
  the output head and the final norm, the top transformer layer is depth 1, transformer layer i
  (global, 0-based) is depth ``num_layers - i``, the embeddings are depth ``num_layers + 1``.
  ``module`` is one of :data:`MODULES`. Each distinct multiplier m becomes one group (megatron's
  ``config_overrides``) with ``max_lr = lr * m`` and ``min_lr = min_lr * m``; megatron's
  ``OptimizerParamScheduler`` reads both per group, so warm-up (from 0), the constant phase and
  the decay of every group are exactly m times the base schedule.

Parameter classes (names as in ``GPTModel.named_parameters()``, a ``module.`` prefix of the DDP
wrapper ignored): ``embedding.*`` -> embedding; ``decoder.layers.<j>.*`` -> layers (j is the index
on this pipeline stage; the global index comes from megatron's ``layer_number``);
``decoder.final_layernorm.*`` -> final_norm; ``output_layer.*`` -> head, or embedding when the GPT
ties its output layer to the embedding (under PP the last stage holds a synchronised copy of the
embedding: it must be frozen and scaled exactly like the first stage's, or the copies diverge).
"""

from __future__ import annotations

from typing import Any, Mapping

MODULES = ("embedding", "layers", "final_norm", "head")


def classify_parameter(name: str, gpt) -> tuple[str, int | None]:
    """``(module, global layer index)`` of a parameter of this rank's ``GPTModel`` chunk.

    Args:
        name: the parameter's name in ``gpt.named_parameters()`` (a leading ``module.`` of the
            DDP wrapper is ignored).
        gpt: the unwrapped megatron ``GPTModel``.

    Returns:
        ``module`` in :data:`MODULES`; the 0-based global transformer-layer index for ``layers``,
        else None.

    Raises:
        ValueError: a parameter outside the embedding, the layers, the final norm and the output
            layer (this module would not know its depth).
    """
    if name.startswith("module."):
        name = name[len("module."):]
    if name.startswith("embedding."):
        return "embedding", None
    if name.startswith("decoder.layers."):
        local = int(name.split(".")[2])
        return "layers", int(gpt.decoder.layers[local].layer_number) - 1
    if name.startswith("decoder.final_layernorm."):
        return "final_norm", None
    if name.startswith("output_layer."):
        return ("embedding" if gpt.share_embeddings_and_output_weights else "head"), None
    if name.startswith("ilql_heads."):  # models/ilql.py: Q / target Q / V heads beside the LM head
        return "head", None
    raise ValueError(f"parameter {name!r} is not in the embedding, a transformer layer, the final norm or the "
                     f"output layer: model.num_layers_unfrozen / optim.layer_lr_decay / optim.lr_mult cannot "
                     f"place it")


def depth_from_top(module: str, layer: int | None, num_layers: int) -> int:
    """Depth of a parameter for layer-wise LR decay (BEiT's convention): head and final norm 0,
    transformer layer i (0-based, global) ``num_layers - i``, embeddings ``num_layers + 1``."""
    if module in ("head", "final_norm"):
        return 0
    if module == "layers":
        return num_layers - int(layer)
    return num_layers + 1


def freeze_bottom_layers(gpt, num_layers_unfrozen: int) -> list[str]:
    """Set ``requires_grad=False`` on what ``model.num_layers_unfrozen`` freezes (see the module
    docstring): the embeddings (with a tied LM head) and the transformer layers of global index
    ``< num_layers - num_layers_unfrozen``. Call before megatron DDP and the optimizer are built.

    Args:
        gpt: this rank's megatron ``GPTModel`` chunk (TP shard / PP stage).
        num_layers_unfrozen: k in [-1, num_layers]; -1 freezes nothing.

    Returns:
        the names of the parameters frozen on this rank.

    Raises:
        ValueError: k < -1 or k > ``num_layers`` (naming both), or an unplaceable parameter.
    """
    k = int(num_layers_unfrozen)
    total = int(gpt.config.num_layers)
    if k < -1 or k > total:
        raise ValueError(f"model.num_layers_unfrozen={k} must be in [-1, model.num_layers={total}]")
    if k < 0:
        return []
    frozen = []
    for name, p in gpt.named_parameters():
        module, layer = classify_parameter(name, gpt)
        if module == "embedding" or (module == "layers" and layer < total - k):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def lr_multipliers(model, optim_cfg: Mapping[str, Any]) -> dict[str, float]:
    """``{parameter name: lr multiplier}`` for the trainable parameters of ``model`` (a GPTModel
    or its DDP wrapper; names as ``model.named_parameters()`` gives them):
    ``optim.lr_mult[module] * optim.layer_lr_decay ** depth`` (see the module docstring)."""
    gpt = model.module if hasattr(model, "module") else model
    total = int(gpt.config.num_layers)
    decay = float(optim_cfg.get("layer_lr_decay", 1.0))
    mult = {m: 1.0 for m in MODULES}
    mult.update({k: float(v) for k, v in dict(optim_cfg.get("lr_mult") or {}).items()})
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module, layer = classify_parameter(name, gpt)
        out[name] = mult[module] * decay ** depth_from_top(module, layer, total)
    return out


def lr_config_overrides(model, optimizer_config, optim_cfg: Mapping[str, Any]):
    """megatron ``config_overrides`` for ``get_megatron_optimizer`` that give each parameter its
    :func:`lr_multipliers` learning rate, or None when every multiplier is 1 (megatron's default
    groups, unchanged).

    The overrides keep megatron's standard ones (no weight decay on biases and 1-D parameters,
    ``get_standard_config_overrides``) and add one ``ParamKey(name=...)`` per distinct multiplier m
    with ``{"max_lr": lr * m, "min_lr": min_lr * m, "lr_mult": m}``. megatron 0.16's scheduler reads
    only ``max_lr``/``min_lr``; ``lr_mult`` records m and is part of the key by which megatron
    matches a checkpoint's parameter groups to the optimizer's on load (``wd_mult``, ``lr_mult``,
    ...): without it, groups differing only in ``max_lr`` would be confused on resume.

    Args:
        model: the model chunk handed to ``get_megatron_optimizer`` (the DDP wrapper).
        optimizer_config: megatron ``OptimizerConfig`` (``lr``, ``min_lr``).
        optim_cfg: the ``optim:`` section (``layer_lr_decay``, ``lr_mult``).
    """
    from megatron.core.optimizer import ParamKey, get_standard_config_overrides

    by_mult: dict[float, list[str]] = {}
    for name, m in lr_multipliers(model, optim_cfg).items():
        by_mult.setdefault(m, []).append(name)
    if set(by_mult) <= {1.0}:
        return None
    overrides = dict(get_standard_config_overrides(optimizer_config))
    for m, names in sorted(by_mult.items()):
        if m == 1.0:
            continue
        overrides[ParamKey(name=tuple(names))] = {"max_lr": optimizer_config.lr * m,
                                                  "min_lr": optimizer_config.min_lr * m, "lr_mult": m}
    return overrides
