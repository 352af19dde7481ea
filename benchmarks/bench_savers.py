"""Memory savers on SmolLM2-135M-Instruct: per-step time and parameter + optimizer memory of SFT,
reward-model and PPO-actor steps, full fine-tuning vs ``num_layers_unfrozen=4`` vs hydra vs LoRA.

    python benchmarks/bench_savers.py [--ckpt DIR] [--stages sft,rm,ppo]
        [--modes full,frozen4,hydra,lora16] [--batch 4] [--seq 128] [--steps 2] [--threads 2]

``--ckpt``: a ``gguf-to-megatron`` policy directory (``weights/``, ``model_config.yaml``); without
it SmolLM2-135M-Instruct is converted once into ``--cache`` (default ``/tmp/nemo_rlhf_bench``).
Each (stage, mode) runs in a fresh process (its peak RSS is its own) on one CPU rank, TP = PP = 1,
Adam, fp32, random token batches (time and memory do not depend on the text):

* ``sft``: one optimizer step of the SFT loss on ``[batch, seq]`` tokens;
* ``rm``: one Bradley-Terry step on ``batch`` pairs of ``seq`` tokens (scalar head; the head
  always trains);
* ``ppo``: one actor step without the critic (a separate server): sample ``ppo_new`` tokens after
  ``seq / 2``-token prompts, the actor's and the reference policy's log-probs, one PPO clipped
  update. The reference is a full frozen copy (``full``, ``frozen4``, ``lora16`` use the adapters
  switched off instead: no copy), or the hydra branch (``hydra``: ``num_layers_unfrozen=4`` and a
  frozen copy of the top 4 layers + head only).

Modes: ``full`` (every parameter trains), ``frozen4`` (``model.num_layers_unfrozen=4``), ``hydra``
(= ``frozen4`` for SFT/RM, hydra reference for PPO), ``lora16`` (``model.lora.rank=16``, alpha 32,
on qkv/proj/fc1/fc2; head frozen for SFT/PPO, trained for RM).

Memory columns (bytes): ``param_bytes`` (every parameter the step needs: actor + reference for
PPO), ``trainable``, ``grad_bytes`` (megatron DDP's gradient buffers), ``optim_state_bytes`` (Adam's
moments), ``peak_rss``. Times: mean seconds per step after one warm-up step. Prints one JSON line
per (stage, mode), then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

MODES = ("full", "frozen4", "hydra", "lora16")
STAGES = ("sft", "rm", "ppo")
OPTIM = dict(lr=1e-5, clip_grad=1.0, weight_decay=0.0)


def _mode_overrides(mode: str, stage: str) -> dict:
    if mode == "full":
        return {}
    if mode in ("frozen4", "hydra"):
        return {"num_layers_unfrozen": 4}
    if mode == "lora16":
        return {"lora": {"rank": 16, "alpha": 32.0, "train_head": stage == "rm"}}
    raise ValueError(f"unknown mode {mode!r}; one of {MODES}")


def _bytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def _memory(module) -> dict:
    params = list(module.gpt.parameters())
    grads = 0
    for buf in getattr(module.model, "buffers", []) or []:
        grads += _bytes([buf.grad_data])
    state = []
    opt = module.optimizer
    inner = getattr(opt, "optimizer", opt)
    for s in inner.state.values():
        state += [v for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return dict(param_bytes=_bytes(params), trainable=int(sum(p.numel() for p in params if p.requires_grad)),
                params=int(sum(p.numel() for p in params)), grad_bytes=grads, optim_state_bytes=_bytes(state))


def _timed(fn, steps: int) -> float:
    fn()  # warm-up (also creates Adam's state)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def run_one(args) -> dict:
    """One (stage, mode) in this process; returns the JSON record."""
    from nemo_rlhf.checkpoint.hf import read_model_config
    from nemo_rlhf.checkpoint.weights import load_weights
    from nemo_rlhf.parallel.state import initialize_distributed
    from nemo_rlhf.utils.hydra import quiet_warnings

    quiet_warnings()
    torch.set_num_threads(args.threads)
    initialize_distributed(seed=1234)
    ckpt = Path(args.ckpt)
    base_cfg = read_model_config(ckpt / "model_config.yaml")
    cfg = {**base_cfg, **_mode_overrides(args.mode, args.stage)}
    vocab = int(base_cfg.get("vocab_size") or 49152)
    g = torch.Generator().manual_seed(0)
    b, s = args.batch, args.seq
    rec = dict(stage=args.stage, mode=args.mode, batch=b, seq=s, threads=torch.get_num_threads())

    if args.stage == "sft":
        from nemo_rlhf.algorithms.sft import sft_loss
        from nemo_rlhf.models.policy import GPTPolicyModel

        m = GPTPolicyModel(cfg, OPTIM, vocab, micro_batch_size=b, eos_id=0, pad_id=0)
        load_weights(m, ckpt / "weights")
        tokens = torch.randint(1, vocab, (b, s), generator=g)
        labels = torch.cat([tokens[:, 1:], torch.zeros(b, 1, dtype=torch.long)], dim=1)
        mask = torch.ones(b, s)
        mask[:, -1] = 0
        batch = {"tokens": tokens, "labels": labels, "label_mask": mask}
        rec["step_s"] = _timed(lambda: m.train_on(sft_loss, batch), args.steps)
        rec.update(_memory(m))
    elif args.stage == "rm":
        from nemo_rlhf.algorithms.reward_model import bradley_terry_step_loss, pair_microbatches
        from nemo_rlhf.models.reward_model import GPTRewardModel

        m = GPTRewardModel(cfg, OPTIM, vocab, micro_batch_size=b)
        load_weights(m, ckpt / "weights", skip_prefixes=("output_layer.",))
        tokens = torch.randint(1, vocab, (2 * b, s), generator=g)
        batch = {"tokens": tokens, "lengths": torch.full((2 * b,), s)}
        mbs = pair_microbatches(batch, b)
        rec["step_s"] = _timed(lambda: m.train_on(bradley_terry_step_loss, mbs), args.steps)
        rec.update(_memory(m))
    else:
        from nemo_rlhf.algorithms.ppo import ppo_loss_fn
        from nemo_rlhf.generation.sampling import SamplingParams
        from nemo_rlhf.models.policy import GPTPolicyModel

        actor = GPTPolicyModel(cfg, OPTIM, vocab, micro_batch_size=b, eos_id=-1, pad_id=0)
        load_weights(actor, ckpt / "weights")
        ref_bytes = 0
        if args.mode == "hydra":
            from nemo_rlhf.models.hydra import HydraReference

            hydra = HydraReference(actor)
            ref_bytes = hydra.parameter_bytes()

            def both_logprobs(tokens):
                return hydra.actor_and_reference_logprobs(tokens)
        elif args.mode == "lora16":
            from nemo_rlhf.models.lora import adapters_disabled

            def both_logprobs(tokens):
                lp = actor.logprobs(tokens)
                with adapters_disabled(actor.model):
                    return lp, actor.logprobs(tokens)
        else:
            reference = GPTPolicyModel(base_cfg, None, vocab, micro_batch_size=b, eos_id=-1, pad_id=0)
            load_weights(reference, ckpt / "weights")
            ref_bytes = _bytes(reference.gpt.parameters())

            def both_logprobs(tokens):
                return actor.logprobs(tokens), reference.logprobs(tokens)

        p = s // 2
        prompts = torch.randint(1, vocab, (b, p), generator=g)
        params = SamplingParams(max_new_tokens=args.ppo_new, seed=0)
        loss_fn = ppo_loss_fn(actor, clip_eps=0.2, entropy_coef=0.0, clip_eps_high=None)
        phases = {"generate_s": 0.0, "logprobs_s": 0.0, "update_s": 0.0}

        def step():
            t0 = time.perf_counter()
            out = actor.generate(prompts, torch.full((b,), p), params)
            t1 = time.perf_counter()
            old, ref = both_logprobs(out.tokens)
            t2 = time.perf_counter()
            pos = torch.arange(out.tokens.shape[1] - 1)
            mask = ((pos[None] >= p - 1) & (pos[None] < out.lengths[:, None] - 1)).float()
            adv = torch.randn(old.shape, generator=g) * mask  # stands in for GAE on critic values
            actor.train_on(loss_fn, {"tokens": out.tokens, "old_logprobs": old, "advantages": adv, "mask": mask})
            t3 = time.perf_counter()
            for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
                phases[k] += dt
            assert torch.isfinite(ref).all()

        step()
        phases = dict.fromkeys(phases, 0.0)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        rec["step_s"] = (time.perf_counter() - t0) / args.steps
        rec.update({k: v / args.steps for k, v in phases.items()})
        rec.update(_memory(actor))
        rec["reference_param_bytes"] = ref_bytes
        rec["param_bytes"] += ref_bytes
    rec["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return rec


def _ensure_ckpt(cache: Path) -> Path:
    out = cache / "smollm2_policy"
    if not (out / "model_config.yaml").exists():
        from nemo_rlhf.checkpoint.gguf import import_gguf, smollm2_gguf_path

        import_gguf(smollm2_gguf_path(), out, role="policy")
    return out


def _table(records: list[dict]) -> str:
    mib = 1 << 20
    lines = ["| stage | mode | trainable params | param MiB | grad MiB | Adam state MiB | peak RSS MiB | s/step |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['stage']} | {r['mode']} | {r['trainable']:,} | {r['param_bytes'] / mib:.0f} | "
                     f"{r['grad_bytes'] / mib:.0f} | {r['optim_state_bytes'] / mib:.0f} | {r['peak_rss'] / mib:.0f} | "
                     f"{r['step_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--cache", default="/tmp/nemo_rlhf_bench")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--ppo-new", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", nargs=2, metavar=("STAGE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        args.stage, args.mode = args.one
        print(json.dumps(run_one(args)), flush=True)
        return
    ckpt = Path(args.ckpt) if args.ckpt else _ensure_ckpt(Path(args.cache))
    records = []
    for stage in args.stages.split(","):
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--one", stage, mode, "--ckpt", str(ckpt)]
            for k in ("batch", "seq", "ppo_new", "steps", "threads"):
                cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"{stage}/{mode} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
            records.append(rec)
            print(json.dumps(rec), flush=True)
    print(_table(records))


if __name__ == "__main__":
    main()
