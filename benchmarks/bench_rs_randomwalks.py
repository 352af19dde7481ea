"""Rejection-sampling fine-tuning on randomwalks (issue 14 §2): SFT on sampled walks, then rounds of
best-of-n sampling and SFT on the kept walks.

    python benchmarks/bench_rs_randomwalks.py [--rounds 6] [--num-samples 16] [--selection best|threshold]
        [--threshold 1.0] [--prompts-per-round 64] [--sft-epochs 2] [--out runs/bench_rs_randomwalks]

One process, one gloo rank, one OpenMP thread. Writes the randomwalks task
(:func:`nemo_rlhf.data.randomwalks.write_task`; its training start nodes are the prompts, its
held-out start nodes are never sampled for training), SFT-trains the tiny GPT of the tests on the
sampled walks, then runs :class:`~nemo_rlhf.algorithms.rejection_sampling.RejectionSamplingTrainer`
from those weights: held-out mean optimality (16 sampled walks per held-out start, the evaluation
seed fixed) before and after each round, the round's sample / kept rewards and SFT loss, and the
best-of-n curve (n = 1, 4, 16) on the held-out starts before the first round and after the last.

Prints one JSON line per round and a summary JSON object (also ``<out>/summary.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, max_position_embeddings=32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench_rs_randomwalks")
    p.add_argument("--sft-steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--prompts-per-round", type=int, default=64)
    p.add_argument("--selection", default="best")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--sft-epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sft-from-heldout", type=int, default=1)
    args = p.parse_args()

    import torch

    from nemo_rlhf.algorithms.rejection_sampling import RejectionSamplingTrainer
    from nemo_rlhf.algorithms.sft import SFTTrainer
    from nemo_rlhf.config import RejectionSamplingStageConfig, SFTStageConfig, parse_config
    from nemo_rlhf.data.randomwalks import sft_stage_node, write_task
    from nemo_rlhf.parallel.state import initialize_distributed
    from nemo_rlhf.utils.hydra import quiet_warnings

    quiet_warnings()
    torch.set_num_threads(1)
    initialize_distributed(1, 1, "cpu", seed=1234)
    out = Path(args.out)
    task = out / "task"
    summary = write_task(task, sft_from_heldout=bool(args.sft_from_heldout))
    tok = {"type": "tokenizer_json", "path": str(task / "tokenizer.json")}
    t0 = time.perf_counter()
    sft = SFTTrainer(parse_config(SFTStageConfig, sft_stage_node(task, out / "sft", args.sft_steps, MODEL))).run()
    sft_s = time.perf_counter() - t0
    rs = {"num_rounds": args.rounds, "num_samples": args.num_samples, "prompts_per_round": args.prompts_per_round,
          "selection": args.selection, "sft_epochs": args.sft_epochs,
          "generation_batch_size": args.num_samples * 16, "val_samples_per_prompt": 16,
          "sampling": {"max_new_tokens": 10}, "best_of_n": {"ns": [1, 4, 16]}}
    if args.threshold is not None:
        rs["threshold"] = args.threshold
    cfg = parse_config(RejectionSamplingStageConfig, {
        "run_dir": str(out / "rs"), "init_from": sft["checkpoint"], "model": MODEL, "tokenizer": tok,
        "data": {"dataset": "jsonl", "data_dir": str(task), "files": ["prompts.jsonl"],
                 "heldout_files": ["heldout.jsonl"], "max_seq_len": 16, "max_prompt_len": 4},
        "batch": {"global_batch_size": args.batch, "micro_batch_size": args.batch}, "optim": {"lr": args.lr},
        "trainer": {"max_steps": 200, "val_check_interval": None, "log_every_n_steps": 1},
        "checkpoint": {"every_n_steps": 0, "resume": False},
        "reward": {"functions": [{"_target_": "nemo_rlhf.data.randomwalks.RandomWalkReward"}]}, "rs": rs})
    trainer = RejectionSamplingTrainer(cfg)
    round_end = trainer.run_round

    def timed_round():
        t = time.perf_counter()
        r = round_end()
        m = trainer.rounds[-1]
        print(json.dumps({"round": m["round"], "heldout_optimality": round(m["heldout"]["reward"], 4),
                          "samples_reward_mean": round(m["reward_mean"], 4),
                          "kept": m["kept"], "kept_reward_mean": round(m["kept_reward_mean"], 4),
                          "sft_steps": m["sft_steps"], "sft_loss": round(m["sft_loss"], 4),
                          "round_s": round(time.perf_counter() - t, 1)}), flush=True)
        return r

    trainer.run_round = timed_round
    t0 = time.perf_counter()
    result = trainer.run()
    rs_s = time.perf_counter() - t0
    trainer.val_ds = trainer.train_ds  # the training start nodes, same evaluation
    train_starts = trainer.evaluate()["reward"]
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "python": sys.version.split()[0], "torch": torch.__version__, "task": summary, "args": vars(args),
              "sft_s": round(sft_s, 1), "rs_s": round(rs_s, 1),
              "heldout_before": round(result["heldout_before"]["reward"], 4),
              "heldout_after_round": [round(r["heldout"]["reward"], 4) for r in result["rounds"]],
              "train_starts_after": round(train_starts, 4), "best_of_n": result["best_of_n"]}
    (out / "summary.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
