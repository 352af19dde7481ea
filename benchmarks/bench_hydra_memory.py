"""Parameter / gradient-buffer / optimizer-state memory of a policy + reference pair: full fine-tuning
with a full reference copy vs ``model.num_layers_unfrozen = k`` with a hydra reference (one process).

    python benchmarks/bench_hydra_memory.py [--unfrozen 4]   # SmolLM2-135M's shape, random weights

Measured (bytes, fp32), not computed: the parameters of the actor, of a full frozen reference copy
and of the hydra branch (``HydraReference.parameter_bytes``); megatron DDP's gradient buffers; the
Adam moments after one optimizer step (``exp_avg`` + ``exp_avg_sq``). Prints one JSON object;
BENCHMARKS.md records the figures with date and machine.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

# SmolLM2-135M-Instruct (Llama): 30 layers, hidden 576, 9 heads, 3 KV groups, FFN 1536, vocab 49152, tied
SMOLLM2 = dict(num_layers=30, hidden_size=576, num_attention_heads=9, num_query_groups=3, ffn_hidden_size=1536,
               max_position_embeddings=2048, normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
               rotary_base=100000.0, layernorm_epsilon=1e-5, share_embeddings_and_output_weights=True)
VOCAB = 49152


def _bytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def measure(k: int, reference: str) -> dict[str, int]:
    """Build actor (+ reference), take one Adam step on a [1, 16] batch, return the byte counts."""
    from nemo_rlhf.algorithms.sft import sft_loss
    from nemo_rlhf.models.hydra import HydraReference
    from nemo_rlhf.models.policy import GPTPolicyModel, shift_labels

    cfg = dict(SMOLLM2, num_layers_unfrozen=k)
    actor = GPTPolicyModel(cfg, dict(lr=1e-5), VOCAB, 1, eos_id=2, pad_id=0)
    if reference == "hydra":
        ref_bytes = HydraReference(actor).parameter_bytes()
    else:
        ref_bytes = _bytes(GPTPolicyModel(cfg, None, VOCAB, 1, eos_id=2, pad_id=0).gpt.parameters())
    tokens = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    labels, mask = shift_labels(tokens, torch.ones(1, 16), 0)
    actor.train_on(sft_loss, {"tokens": tokens, "labels": labels, "label_mask": mask})
    state = actor.optimizer.optimizer.state
    return {
        "actor_params": _bytes(actor.gpt.parameters()),
        "trainable_params": _bytes(p for p in actor.gpt.parameters() if p.requires_grad),
        "reference_params": ref_bytes,
        "grad_buffers": _bytes(buf.grad_data for buf in actor.model.buffers),
        "adam_moments": _bytes(s[n] for s in state.values() for n in ("exp_avg", "exp_avg_sq")),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--unfrozen", type=int, default=4, help="model.num_layers_unfrozen of the hydra run")
    args = p.parse_args()
    from nemo_rlhf.parallel.state import destroy_distributed, initialize_distributed
    from nemo_rlhf.utils.hydra import quiet_warnings

    quiet_warnings()
    initialize_distributed(1, 1, "cpu", seed=1234)
    try:
        out = {"model": "SmolLM2-135M shape (random weights), fp32", "machine": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(),
               "full_finetune+full_reference": measure(-1, "full"),
               f"num_layers_unfrozen={args.unfrozen}+hydra_reference": measure(args.unfrozen, "hydra")}
    finally:
        destroy_distributed()
    for v in out.values():
        if isinstance(v, dict):
            v["total"] = v["actor_params"] + v["reference_params"] + v["grad_buffers"] + v["adam_moments"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
