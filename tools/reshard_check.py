"""Checkpoint resharding and exact-resume check for the SFT role (run under torchrun).

``save`` mode: build the tiny parity model (:data:`tools.parity.MODEL`) in this
TP x PP x DP layout with a fixed seed, train ``--save-at`` Adam steps on fixed per-step data, write
a training checkpoint with :func:`~nemo_rlhf.checkpoint.training_state.save_training_checkpoint`,
record what was saved (full logits on fixed probe tokens, full weights, full Adam moments), then
keep training to ``--steps``. ``load`` mode: build the model in (possibly) another layout, restore
the checkpoint with :func:`~nemo_rlhf.checkpoint.training_state.load_training_checkpoint`, record
the same things, and train from the restored step to ``--steps``. ``ref`` mode: train ``--steps``
steps without saving (the uninterrupted run). Every mode records the per-step losses and the full
weights at the end; global rank 0 writes ``<out>/result.pt``. ``--lora`` (adapters of
:data:`tools.parity.LORA` on every linear, random non-zero B) and ``--num-layers-unfrozen k`` run
the memory savers (pass the same flags to the load run)::

    python -m torch.distributed.run --nproc-per-node 2 tools/reshard_check.py \\
        --mode save --tp 2 --ckpt ckpt_tp2 --out save_tp2
    python -m torch.distributed.run --nproc-per-node 1 tools/reshard_check.py \\
        --mode load --ckpt ckpt_tp2 --out load_tp1

"Full" tensors are gathered in memory from megatron's sharding metadata (the ``ShardedTensor``
global offsets of ``sharded_state_dict()``), independently of checkpoint I/O, so they have the same
keys and shapes in every layout (``decoder.layers.<i>.mlp.linear_fc1.weight`` is ``cat(gate, up)``
whatever the TP size).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script (torchrun tools/reshard_check.py): make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OPTIM = dict(optimizer="adam", lr=1e-3, eps=1e-3, clip_grad=1.0, weight_decay=0.0)
PROBE_SEED = 999  # fixed tokens whose logits are compared across layouts
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def step_batch(step: int) -> dict[str, torch.Tensor]:
    """The global batch of optimizer step ``step`` (0-based), identical in every layout."""
    from tools.parity import fixed_data

    d = fixed_data(seed=100 + step)
    return {"tokens": d["tokens"], "loss_mask": d["loss_mask"]}


def gather_full(sharded_state_dict: dict) -> dict[str, torch.Tensor]:
    """Every ``ShardedTensor`` of a (model or optimizer) sharded state dict, assembled to its global
    shape on every rank: the main replica of each shard is placed at its global offset and the
    zero-filled buffers are summed over the world (exact: x + 0 = x). Collective on all ranks."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, is_main_replica

    apply_factories(sharded_state_dict)  # e.g. SwiGLU fc1 -> separate gate and up shards
    local = [x for x in nested_values(sharded_state_dict) if isinstance(x, ShardedTensor)]
    meta = {t.key: (tuple(t.global_shape), t.dtype) for t in local}
    if torch.distributed.is_initialized():
        every: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every, meta)
        for m in every:
            meta.update(m)
    full = {k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in sorted(meta.items())}
    for t in local:
        if is_main_replica(t.replica_id):
            assert t.flattened_range is None, t.key
            full[t.key][t.global_slice()] = t.data.detach().to("cpu")
    if torch.distributed.is_initialized():
        for k in sorted(full):
            torch.distributed.all_reduce(full[k])
    return full


def full_weights(module) -> dict[str, torch.Tensor]:
    """The whole model's weights, keys as in the checkpoint (collective)."""
    return gather_full(module.gpt.sharded_state_dict())


def full_adam_moments(module) -> dict[str, torch.Tensor]:
    """``exp_avg`` / ``exp_avg_sq`` of every parameter in model space (collective)."""
    osd = module.optimizer.sharded_state_dict(module.gpt.sharded_state_dict(), is_loading=False,
                                              metadata=_OPTIM_METADATA)
    return {k: v for k, v in gather_full(osd).items() if ".exp_avg" in k}


@torch.no_grad()
def full_logits(module, tokens: torch.Tensor) -> torch.Tensor:
    """``[B, S, V_padded]`` fp32 logits of ``tokens`` (TP-gathered, broadcast from the last PP
    stage), computed through the pipeline schedule in eval mode."""
    from megatron.core import tensor_parallel

    from nemo_rlhf.models.megatron_module import position_ids_like, split_microbatches
    from nemo_rlhf.models.pipeline_utils import broadcast_from_last_stage
    from tools.parity import MICRO_BATCH

    module.model.eval()

    def forward(model, mb):
        return model(mb["tokens"], position_ids_like(mb["tokens"]), None)

    def loss(mb, out):
        return out.sum() * 0, {"logits": tensor_parallel.gather_from_tensor_model_parallel_region(out).float()}

    outs = module.forward_backward(split_microbatches({"tokens": tokens}, MICRO_BATCH), forward, loss,
                                   forward_only=True)
    logits = torch.cat([o["logits"] for o in outs]) if outs else None
    vocab = module.gpt.vocab_size
    return broadcast_from_last_stage(logits, (tokens.shape[0], tokens.shape[1], vocab), torch.float32)


def train(module, start: int, end: int) -> dict[int, float]:
    """Optimizer steps ``start .. end-1`` on :func:`step_batch` (this DP rank's share); the loss
    of each step (averaged over micro-batches and DP ranks)."""
    from nemo_rlhf.algorithms.sft import sft_loss
    from nemo_rlhf.models.policy import shift_labels
    from tools.parity import MICRO_BATCH, _dp_slice

    losses = {}
    for step in range(start, end):
        b = step_batch(step)
        labels, label_mask = shift_labels(b["tokens"], b["loss_mask"], 0)
        batch = {"tokens": b["tokens"], "labels": labels, "label_mask": label_mask}
        shard = {k: _dp_slice(v) for k, v in batch.items()}
        metrics = module.train_on(sft_loss, shard, MICRO_BATCH)
        assert metrics["skipped"] == 0.0, metrics
        losses[step] = metrics["loss"]
        module.completed_steps += 1
    return losses


def snapshot(module) -> dict[str, Any]:
    from tools.parity import fixed_data

    return {"logits": full_logits(module, fixed_data(seed=PROBE_SEED)["tokens"]),
            "weights": full_weights(module), "moments": full_adam_moments(module),
            "step": module.completed_steps}


def main(argv: list[str] | None = None) -> None:
    from tools.parity import (GLOBAL_BATCH, add_saver_args, build_role, init_layout, layout_parser,
                              randomize_adapters, with_lora)

    p = layout_parser(__doc__)
    p.add_argument("--mode", required=True, choices=("save", "load", "ref"))
    p.add_argument("--ckpt", help="checkpoint root (save) or checkpoint directory (load)")
    p.add_argument("--save-at", type=int, default=2, help="save mode: steps before the checkpoint")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps at the end of the run")
    add_saver_args(p)
    args = p.parse_args(argv)
    model_cfg, world = init_layout(args)
    model_cfg["num_layers_unfrozen"] = args.num_layers_unfrozen
    if args.lora:
        model_cfg = with_lora(model_cfg, "sft")
    from nemo_rlhf.checkpoint.training_state import load_training_checkpoint, save_training_checkpoint
    from nemo_rlhf.parallel.state import destroy_distributed, is_rank_zero
    result: dict[str, Any] = {"layout": dict(tp=args.tp, pp=args.pp, sp=args.sp, world=world,
                                             distributed_optimizer=args.distributed_optimizer)}
    try:
        module = build_role("sft", model_cfg, dict(OPTIM, distributed_optimizer=args.distributed_optimizer))
        if args.lora and args.mode != "load":
            randomize_adapters(module)  # B = 0 would make the first steps' adapters meaningless
        losses: dict[int, float] = {}
        if args.mode == "save":
            losses.update(train(module, 0, args.save_at))
            path = save_training_checkpoint(args.ckpt, module, {"consumed_samples": args.save_at * GLOBAL_BATCH})
            result["checkpoint"] = str(path)
            result["saved"] = snapshot(module)
        elif args.mode == "load":
            state = load_training_checkpoint(args.ckpt, module)
            assert module.completed_steps == state["step"]
            result["loaded"] = snapshot(module)
        losses.update(train(module, module.completed_steps, args.steps))
        result["losses"] = losses
        result["final_weights"] = full_weights(module)
        if is_rank_zero():
            Path(args.out).mkdir(parents=True, exist_ok=True)
            torch.save(result, Path(args.out) / "result.pt")
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
