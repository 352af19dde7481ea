"""SmolLM2-135M-Instruct (converted, see tests/smollm2_run.py) in one TP x PP layout, under torchrun.

    python -m torch.distributed.run --nproc-per-node 2 tests/multiprocess/smollm2_layout.py \\
        --dir <smollm2 fixture dir> --pp 2 --out result.pt

Loads ``<dir>/policy`` (the dist-checkpoint is resharded to the layout) and, through the policy's
pipeline schedule, computes fp32 logits ``[S, V]`` of the first reference prompts (gathered over
TP) and greedy generation for the first ``--generate`` prompts; global rank 0 saves
``{"logits": [...], "generated": [...], "tp", "pp"}`` (logits travel from the last stage).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--generate", type=int, default=4, help="prompts to generate for (greedy)")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from nemo_rlhf.utils.hydra import quiet_warnings

    quiet_warnings()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from nemo_rlhf.checkpoint.hf import read_model_config
    from nemo_rlhf.checkpoint.weights import load_weights
    from nemo_rlhf.generation.sampling import SamplingParams
    from nemo_rlhf.models.builder import padded_vocab_size
    from nemo_rlhf.models.pipeline_utils import broadcast_from_last_stage
    from nemo_rlhf.models.policy import GPTPolicyModel
    from nemo_rlhf.parallel.layout import validate_layout
    from nemo_rlhf.parallel.state import destroy_distributed, initialize_distributed, read_dist_env

    torch.set_num_threads(1)
    root = Path(args.dir)
    ref = torch.load(root / "reference.pt", weights_only=False)
    cfg = {**read_model_config(root / "policy" / "model_config.yaml"),
           "tensor_model_parallel_size": args.tp, "pipeline_model_parallel_size": args.pp}
    validate_layout(cfg, read_dist_env().world_size)
    initialize_distributed(args.tp, args.pp, "cpu", seed=0)
    try:
        n = len(ref["logits"])
        rows = ref["prompts"][: max(n, args.generate)]
        lengths = torch.tensor([len(r) for r in rows])
        tokens = torch.full((len(rows), int(lengths.max())), 2, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r)
        policy = GPTPolicyModel(cfg, None, int(cfg["vocab_size"]), n, eos_id=-1, pad_id=2)
        load_weights(policy, root / "policy" / "weights")
        policy.eval()

        def loss_fn(mb, logits):
            full = gather_from_tensor_model_parallel_region(logits.float())
            return logits.sum() * 0, {"logits": full}

        outs = policy.forward_backward([{"tokens": tokens[:n]}], policy.forward_step, loss_fn, forward_only=True)
        vocab = padded_vocab_size(int(cfg["vocab_size"]), int(cfg["make_vocab_size_divisible_by"]), args.tp)
        logits = broadcast_from_last_stage(outs[0]["logits"] if outs else None, (n, tokens.shape[1], vocab),
                                           torch.float32)
        g = args.generate
        new = len(ref["generated"][0])
        out = policy.generate(tokens[:g], lengths[:g], SamplingParams(max_new_tokens=new, greedy=True))
        generated = [out.tokens[i, int(lengths[i]): int(lengths[i]) + new].tolist() for i in range(g)]
        if torch.distributed.get_rank() == 0:
            torch.save({"logits": [logits[i, : int(lengths[i])] for i in range(n)], "generated": generated,
                        "tp": parallel_state.get_tensor_model_parallel_world_size(),
                        "pp": parallel_state.get_pipeline_model_parallel_world_size()}, args.out)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
