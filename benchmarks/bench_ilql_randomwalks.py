"""ILQL on randomwalks (issue 14 §3 gate): offline ILQL from a tiny GPT's random init on the task's
1,000 sampled walks with their optimality rewards, evaluated on the held-out start nodes.

    python benchmarks/bench_ilql_randomwalks.py [--max-steps 400] [--eval-every 100] [--out runs/bench_ilql]
        [--beta 100] [--eval-betas 0 1] [--lr 1e-3]

One process, one gloo rank, one OpenMP thread. Writes the randomwalks task
(:func:`nemo_rlhf.data.randomwalks.write_task`; its ``offline.jsonl`` = the behaviour data and
``heldout.jsonl`` = the held-out start nodes, whatever split that function makes), runs
``conf/gpt_ilql.yaml``'s recipe through :func:`nemo_rlhf.algorithms.ilql.run_ilql` and prints one
JSON object: the behaviour data's mean optimality (all rows, and the rows starting at a held-out
node), the held-out optimality of ILQL decoding at ``ilql.beta`` and at the other betas
(``--eval-betas``; beta 0 = the trained LM head alone) before and after training, and the wall
time. The gate: held-out optimality >= 0.90, beyond the behaviour policy's, in <= 10 minutes.
BENCHMARKS.md records the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, max_position_embeddings=32)


def ilql_node(task: Path, run_dir: Path, max_steps: int, eval_every: int | None, beta: float,
              eval_betas: list[float], lr: float, batch: int = 100, samples: int = 16) -> dict:
    """The stage config of conf/gpt_ilql.yaml's randomwalks recipe (tiny model, random init)."""
    return {"run_dir": str(run_dir), "model": MODEL, "init_from": None,
            "tokenizer": {"type": "tokenizer_json", "path": str(task / "tokenizer.json")},
            "data": {"dataset": "jsonl", "data_dir": str(task), "files": ["offline.jsonl"],
                     "heldout_files": ["heldout.jsonl"], "max_seq_len": 16, "max_prompt_len": 4},
            "batch": {"global_batch_size": batch, "micro_batch_size": batch},
            "optim": {"lr": lr, "betas": [0.9, 0.95], "weight_decay": 1e-6},
            "trainer": {"max_steps": max_steps, "val_check_interval": eval_every, "log_every_n_steps": 10,
                        "limit_val_batches": None},
            "checkpoint": {"every_n_steps": 0, "resume": False},
            "reward": {"functions": [{"_target_": "nemo_rlhf.data.randomwalks.RandomWalkReward"}]},
            "ilql": {"beta": beta, "eval_betas": eval_betas, "val_samples_per_prompt": samples}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-steps", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--beta", type=float, default=100.0)
    ap.add_argument("--eval-betas", type=float, nargs="*", default=[0.0, 1.0])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default="runs/bench_ilql")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from nemo_rlhf.algorithms.ilql import run_ilql
    from nemo_rlhf.data.randomwalks import write_task
    from nemo_rlhf.parallel.state import destroy_distributed

    out = Path(args.out)
    task = out / "task"
    summary = write_task(task)
    t0 = time.perf_counter()
    try:
        result = run_ilql(ilql_node(task, out / "ilql", args.max_steps, args.eval_every, args.beta, args.eval_betas,
                                    args.lr))
    finally:
        destroy_distributed()
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "ilql" / "metrics.jsonl").read_text().splitlines()]
    curve = [{"step": r["step"], **{k[4:]: round(v, 4) for k, v in r.items() if k.startswith("val/reward")}}
             for r in rows if any(k.startswith("val/reward") for k in r)]
    print(json.dumps({
        "benchmark": "ilql_randomwalks", "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "steps": result["steps"], "beta": args.beta, "lr": args.lr,
        "behaviour_optimality": result["behaviour_reward"], "offline_rows": summary["offline_walks"],
        "heldout_starts": summary["heldout_starts"],
        "heldout_before": result["heldout_before"], "heldout_after": result["heldout_after"],
        "curve": curve, "wall_s": round(wall, 1),
        "gate_ok": bool(result["heldout_after"]["reward"] >= 0.90
                        and result["heldout_after"]["reward"] > result["behaviour_reward"]["mean"] and wall <= 600)},
        indent=2))


if __name__ == "__main__":
    main()
