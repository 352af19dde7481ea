"""randomwalks learning benchmark (issue 13 §3): SFT on sampled walks, then each online algorithm.

    python benchmarks/bench_randomwalks.py [--algorithms grpo rloo reinforce_pp dr_grpo ppo]
        [--max-steps 120] [--eval-every 5] [--budget-s 600] [--out runs/bench_randomwalks]

One process, one gloo rank, one OpenMP thread. Writes the randomwalks task
(:func:`nemo_rlhf.data.randomwalks.write_task`: 21 nodes, 15 training start nodes = the online
prompts, 5 held-out start nodes never prompted during RL), SFT-trains a tiny GPT on the 2,000
sampled walks, then runs each algorithm from those weights, evaluating the held-out start nodes
every ``--eval-every`` steps (16 sampled walks per start node, the evaluation seed fixed) and the
training start nodes at the end. The gate: held-out mean optimality >= 0.95 within ``--budget-s``
seconds of training wall time (evaluation time excluded from the clock, set-up included).

PPO runs with an in-process critic (:class:`~nemo_rlhf.servers.local.LocalCriticClient` around
:class:`~nemo_rlhf.servers.megatron_backend.MegatronCriticBackend` with no reward model: the
reward is the same optimality function, ``reward.functions``).

Prints one JSON line per evaluation and a summary JSON object; BENCHMARKS.md records the figures.
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
REWARD = [{"_target_": "nemo_rlhf.data.randomwalks.RandomWalkReward"}]


def common(task: Path, run_dir: Path, init_from: str | None = None) -> dict:
    node = {"run_dir": str(run_dir), "model": MODEL,
            "tokenizer": {"type": "tokenizer_json", "path": str(task / "tokenizer.json")},
            "checkpoint": {"every_n_steps": 0, "resume": False}}
    if init_from:
        node["init_from"] = init_from
    return node


def sft(task: Path, out: Path, steps: int) -> tuple[str, float]:
    from nemo_rlhf.algorithms.sft import SFTTrainer
    from nemo_rlhf.config import SFTStageConfig, parse_config
    from nemo_rlhf.data.randomwalks import sft_stage_node

    cfg = parse_config(SFTStageConfig, sft_stage_node(task, out / "sft", max_steps=steps, model=MODEL))
    t0 = time.perf_counter()
    result = SFTTrainer(cfg).run()
    return result["checkpoint"], time.perf_counter() - t0


def grpo_cfg(task: Path, run_dir: Path, weights: str, algorithm: str, args) -> dict:
    return {**common(task, run_dir, weights),
            "data": {"dataset": "jsonl", "data_dir": str(task), "files": ["prompts.jsonl"],
                     "heldout_files": ["heldout.jsonl"], "max_seq_len": 16, "max_prompt_len": 4},
            "batch": {"global_batch_size": args.prompts_per_step * args.num_generations,
                      "micro_batch_size": args.prompts_per_step * args.num_generations},
            "optim": {"lr": args.lr},
            "trainer": {"max_steps": args.max_steps, "val_check_interval": args.eval_every, "log_every_n_steps": 1},
            "reward": {"functions": REWARD},
            "grpo": {"algorithm": algorithm, "num_generations": args.num_generations, "beta": args.beta,
                     "sampling": {"max_new_tokens": 10, "temperature": args.temperature},
                     "val_sampling": {"temperature": 1.0}, "val_samples_per_prompt": 16}}


def ppo_trainer(task: Path, run_dir: Path, weights: str, args):
    """PPO with an in-process critic initialised from the SFT trunk (value head fresh)."""
    from nemo_rlhf.algorithms.ppo import PPOTrainer
    from nemo_rlhf.checkpoint.weights import load_weights
    from nemo_rlhf.config import PPOActorStageConfig, parse_config
    from nemo_rlhf.data.tokenizer import tokenizer_from_config
    from nemo_rlhf.models.critic import GPTCriticModel
    from nemo_rlhf.servers.local import LocalCriticClient
    from nemo_rlhf.servers.megatron_backend import MegatronCriticBackend

    # PPO draws one response per prompt and its prompt sets hold distinct prompt strings: the same
    # 16 samples per held-out start node as the critic-free runs come from 16 copies of each start
    # that differ only in trailing spaces (the same tokens), and 8 copies of each training start
    # fill the batches. One evaluation batch = the 80 held-out rollouts; 80 rollouts per step.
    for name, k in (("heldout", 16), ("prompts", 8)):
        starts = [json.loads(r)["prompt"] for r in (task / f"{name}.jsonl").read_text().splitlines()]
        (task / f"{name}_x{k}.jsonl").write_text(
            "".join(json.dumps({"prompt": s + " " * i}) + "\n" for s in starts for i in range(k)))
    n = 16 * len((task / "heldout.jsonl").read_text().splitlines())
    cfg = parse_config(PPOActorStageConfig, {
        **common(task, run_dir, weights),
        "data": {"dataset": "jsonl", "data_dir": str(task), "files": ["prompts_x8.jsonl"],
                 "heldout_files": ["heldout_x16.jsonl"], "max_seq_len": 16, "max_prompt_len": 4},
        "batch": {"global_batch_size": n, "micro_batch_size": n}, "optim": {"lr": args.lr},
        "trainer": {"max_steps": args.max_steps, "val_check_interval": args.eval_every, "log_every_n_steps": 1},
        "reward": {"functions": REWARD, "reward_model": False},
        "ppo": {"sampling": {"max_new_tokens": 10, "temperature": args.temperature},
                "val_sampling": {"temperature": 1.0}, "ppo_epochs": args.ppo_epochs, "num_minibatches": 1,
                "kl_controller": {"type": "fixed", "init_kl_coef": args.beta}}})
    tok = tokenizer_from_config({"type": "tokenizer_json", "path": str(task / "tokenizer.json")})
    critic = GPTCriticModel(MODEL, {"lr": args.critic_lr}, tok.vocab_size, n)
    load_weights(critic, weights, skip_prefixes=("output_layer.",))
    backend = MegatronCriticBackend(critic, None, max_seq_len=16, save_fn=lambda p: None)
    return PPOTrainer(cfg, LocalCriticClient(backend))


def run_one(task: Path, out: Path, weights: str, algorithm: str, args) -> dict:
    from nemo_rlhf.algorithms.critic_free import trainer_class
    from nemo_rlhf.config import GRPOStageConfig, parse_config

    run_dir = out / algorithm
    if algorithm == "ppo":
        trainer = ppo_trainer(task, run_dir, weights, args)
    else:
        cfg = parse_config(GRPOStageConfig, grpo_cfg(task, run_dir, weights, algorithm, args))
        trainer = trainer_class(algorithm)(cfg)
    clock = {"eval_s": 0.0, "t0": time.perf_counter()}
    curve: list[dict] = []
    evaluate = trainer.run_evaluation

    def timed_evaluation(limit=None):
        t = time.perf_counter()
        train_s = t - clock["t0"] - clock["eval_s"]  # wall time so far, evaluations excluded
        m = evaluate(limit)
        clock["eval_s"] += time.perf_counter() - t
        row = {"algorithm": algorithm, "step": trainer.step, "train_s": round(train_s, 1),
               "heldout_optimality": round(float(m["reward"]), 4)}
        curve.append(row)
        print(json.dumps(row), flush=True)
        if row["heldout_optimality"] >= args.target and "reached_s" not in clock:
            clock["reached_s"], clock["reached_step"] = row["train_s"], trainer.step
        if train_s > args.budget_s:
            trainer.max_steps = trainer.step  # out of budget: stop after this step
        return m

    trainer.run_evaluation = timed_evaluation
    result = trainer.run()
    train_starts = None
    if algorithm != "ppo":  # the training start nodes, same evaluation
        trainer.val_ds = trainer.train_ds
        train_starts = round(float(trainer.evaluate()["reward"]), 4)
    return {"algorithm": algorithm, "heldout_before": curve[0]["heldout_optimality"],
            "heldout_after": curve[-1]["heldout_optimality"], "best": max(r["heldout_optimality"] for r in curve),
            "steps": result.get("steps"), "reached_target_s": clock.get("reached_s"),
            "reached_target_step": clock.get("reached_step"), "train_starts_after": train_starts,
            "wall_s": round(time.perf_counter() - clock["t0"], 1), "curve": curve}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--algorithms", nargs="+", default=["grpo", "dr_grpo", "rloo", "reinforce_pp", "ppo"])
    p.add_argument("--out", default="runs/bench_randomwalks")
    p.add_argument("--sft-steps", type=int, default=1000)
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=600.0)
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--critic-lr", type=float, default=1e-3)
    p.add_argument("--sft-from-heldout", type=int, default=1)
    p.add_argument("--beta", type=float, default=0.0, help="grpo.beta; PPO: the fixed KL coefficient")
    p.add_argument("--ppo-epochs", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--position-embedding", default=None, help="model.position_embedding_type override")
    args = p.parse_args()
    if args.position_embedding:
        MODEL["position_embedding_type"] = args.position_embedding

    import torch

    from nemo_rlhf.data.randomwalks import write_task
    from nemo_rlhf.parallel.state import initialize_distributed
    from nemo_rlhf.utils.hydra import quiet_warnings

    quiet_warnings()
    torch.set_num_threads(1)
    initialize_distributed(1, 1, "cpu", seed=1234)
    out = Path(args.out)
    task = out / "task"
    summary = write_task(task, sft_from_heldout=bool(args.sft_from_heldout))
    weights, sft_s = sft(task, out, args.sft_steps)
    results = [run_one(task, out, weights, a, args) for a in args.algorithms]
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "python": sys.version.split()[0], "torch": torch.__version__, "task": summary,
              "sft_s": round(sft_s, 1), "args": vars(args),
              "results": [{k: v for k, v in r.items() if k != "curve"} for r in results]}
    (out / "summary.json").write_text(json.dumps({**report, "curves": {r["algorithm"]: r["curve"] for r in results}},
                                                 indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
