"""Time per DPO step with the reference as a full frozen copy vs a hydra branch (one process, CPU or GPU).

    OMP_NUM_THREADS=1 python benchmarks/bench_dpo_reference.py [--pairs 8] [--seq 192] [--prompt 128] [--steps 3]
        [--logits response|all]

SmolLM2-135M's shape with random weights, ``model.num_layers_unfrozen=4``; one optimizer step on
``--pairs`` random pairs (``2 x pairs`` sequences of ``--seq`` tokens, the first ``--prompt`` of them
the prompt), micro-batches of 4 pairs. ``full`` (``dpo.reference=full``) runs the frozen copy's
forward on the batch, then the policy's training forward and backward; ``hydra``
(``dpo.reference=hydra``) runs only the policy's, the reference branch (the top 4 layers and the LM
head) inside it. The first step is a warm-up; the median of the others is reported, with the first
step's loss (ln 2 = 0.6931 for both: the policy starts as its reference). ``--logits all`` times the
LM head over every position (``[b, S, V]``) instead of the response positions the trainer uses
(``DPOTrainer.response_only``), for comparison. Prints one JSON object;
BENCHMARKS.md records the figures with date, machine and command.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from bench_hydra_memory import SMOLLM2, VOCAB


def measure(reference: str, pairs: int, seq: int, prompt: int, steps: int, k: int = 4, logits: str = "response") -> dict:
    """Seconds per :meth:`DPOTrainer.train_step` (median after a warm-up) and the first step's loss."""
    from nemo_rlhf.algorithms.dpo import DPOTrainer, dpo_loss_fn, response_logps
    from nemo_rlhf.config import DPOStageConfig, parse_config
    from nemo_rlhf.models.hydra import HydraReference
    from nemo_rlhf.models.policy import GPTPolicyModel

    torch.manual_seed(0)
    cfg = dict(SMOLLM2, num_layers_unfrozen=k)
    # The trainer's own step without its data set-up (as tools/parity.py's dpo role): models set here.
    trainer = DPOTrainer(parse_config(DPOStageConfig, {"init_from": "unused", "tokenizer": {"path": "unused"}}))
    trainer.model = policy = GPTPolicyModel(cfg, dict(lr=1e-5), VOCAB, 4, eos_id=2, pad_id=0)
    if reference == "hydra":
        trainer.reference = HydraReference(policy)
    else:
        trainer.reference = GPTPolicyModel(cfg, None, VOCAB, 4, eos_id=2, pad_id=0)
        trainer.reference.gpt.load_state_dict(policy.gpt.state_dict())
    trainer.loss_fn = dpo_loss_fn(policy, trainer.cfg.dpo, trainer.reference if reference == "hydra" else None)
    if logits == "all":  # the [b, S, V] logits, the policy's and the reference's
        trainer.response_only = lambda mbs: mbs
        trainer.reference_logps = lambda b: response_logps(trainer.reference.logprobs(b["tokens"]),
                                                           b["prompt_lengths"], b["lengths"])[0]
    gen = torch.Generator().manual_seed(1)
    batch = {"tokens": torch.randint(3, VOCAB, (2 * pairs, seq), generator=gen),
             "lengths": torch.full((2 * pairs,), seq), "prompt_lengths": torch.full((2 * pairs,), prompt)}
    times, losses = [], []
    for _ in range(steps + 1):
        t = time.perf_counter()
        m = trainer.train_step(batch)
        times.append(time.perf_counter() - t)
        losses.append(float(m["loss"]))
    return {"s_per_step": statistics.median(times[1:]), "steps_timed": steps, "first_loss": losses[0]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--seq", type=int, default=192)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--logits", choices=("response", "all"), default="response")
    args = p.parse_args()
    from nemo_rlhf.parallel.state import destroy_distributed, initialize_distributed

    out = {"machine": platform.machine(), "threads": torch.get_num_threads(), **vars(args)}
    for reference in ("full", "hydra"):
        initialize_distributed(1, 1, "cpu")
        try:
            out[reference] = measure(reference, args.pairs, args.seq, args.prompt, args.steps, logits=args.logits)
        finally:
            destroy_distributed()
    out["hydra_speedup"] = out["full"]["s_per_step"] / out["hydra"]["s_per_step"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
