"""Rollout-generation and PPO-step benchmark (single process; CPU or one GPU).

    python benchmarks/bench_rollout.py [--accelerator cpu|gpu] [--layers 2 --hidden 128 ...]

Measures, for a GPT of the given shape with random weights:
  * KV-cache sampling throughput (generated tokens / s) against a no-cache baseline that re-runs the
    whole sequence for every new token (what a naive rollout loop does);
  * the phases of one PPO step with an in-process critic (generation, actor + reference log-probs,
    critic inference, the whole step), and the actor's PPO update on one rollout with the LM head
    over all positions vs over the response positions only (what the trainer runs).
Prints one JSON object; BENCHMARKS.md records the figures with date and machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=96)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from nemo_rlhf.utils.hydra import quiet_warnings

    quiet_warnings()
    from nemo_rlhf.algorithms.ppo import PPOTrainer, ppo_loss_fn
    from nemo_rlhf.config import PPOActorStageConfig, parse_config
    from nemo_rlhf.generation.sampling import SamplingParams
    from nemo_rlhf.models.critic import GPTCriticModel
    from nemo_rlhf.models.policy import GPTPolicyModel
    from nemo_rlhf.models.reward_model import GPTRewardModel
    from nemo_rlhf.parallel.state import initialize_distributed
    from nemo_rlhf.servers.local import LocalCriticClient
    from nemo_rlhf.servers.megatron_backend import MegatronCriticBackend

    initialize_distributed(1, 1, args.accelerator, seed=1)
    dev = torch.device("cuda") if args.accelerator == "gpu" else torch.device("cpu")
    mc = dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
              ffn_hidden_size=4 * args.hidden, max_position_embeddings=args.prompt + args.new_tokens)
    mbs = args.batch
    actor_ref = GPTPolicyModel(mc, None, args.vocab, mbs, eos_id=0, pad_id=0).to(dev)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, args.vocab, (args.batch, args.prompt), generator=gen).to(dev)
    plens = torch.full((args.batch,), args.prompt, device=dev)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=1)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn, repeats=args.repeats):
        fn()  # warm-up
        sync()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return (time.perf_counter() - t) / repeats

    # KV cache vs recomputing the full sequence for each token (greedy, same work otherwise).
    greedy = SamplingParams(max_new_tokens=args.new_tokens, greedy=True)
    t_cache = timed(lambda: actor_ref.generate(prompts, plens, greedy))

    @torch.no_grad()
    def no_cache():
        tokens = prompts
        for _ in range(args.new_tokens):
            pos = torch.arange(tokens.shape[1], device=dev).expand(tokens.shape[0], -1)
            logits = actor_ref.gpt(tokens, pos, None)
            tokens = torch.cat([tokens, logits[:, -1, : args.vocab].argmax(-1, keepdim=True)], dim=1)
        return tokens

    actor_ref.model.eval()
    t_nocache = timed(no_cache)
    new_tokens = args.batch * args.new_tokens

    # One PPO step, by phase.
    critic = GPTCriticModel(mc, dict(lr=1e-4), args.vocab, mbs).to(dev)
    rm = GPTRewardModel(mc, None, args.vocab, mbs).to(dev)
    backend = MegatronCriticBackend(critic, rm, args.prompt + args.new_tokens, lambda path: None)
    actor = GPTPolicyModel(mc, dict(lr=1e-5), args.vocab, mbs, eos_id=0, pad_id=0).to(dev)
    cfg = parse_config(PPOActorStageConfig, {
        "run_dir": ".", "init_from": "none", "tokenizer": {"path": "unused"}, "batch": {"global_batch_size": args.batch, "micro_batch_size": mbs},
        "ppo": {"ppo_epochs": 1, "num_minibatches": 1, "sampling": {"max_new_tokens": args.new_tokens}}})
    trainer = PPOTrainer.from_models(cfg, actor, actor_ref, LocalCriticClient(backend))
    phases: dict[str, float] = {}
    ro = actor.generate(prompts, plens, params)
    phases["generate_s"] = timed(lambda: actor.generate(prompts, plens, params))
    phases["actor_logprobs_s"] = timed(lambda: actor.logprobs(ro.tokens))
    phases["reference_logprobs_s"] = timed(lambda: actor_ref.logprobs(ro.tokens))
    phases["critic_infer_s"] = timed(lambda: backend.infer(ro.tokens.cpu().numpy(), ro.lengths.cpu().numpy()))
    # The actor's PPO update on one rollout: the LM head over all S - 1 positions vs the response
    # positions only (what PPOTrainer.train_step hands the policy: GPTPolicyModel.response_microbatch).
    r = trainer.compute_advantages(trainer.rollout(prompts, plens, params))
    mb = {"tokens": r.tokens, "advantages": r.advantages, "mask": r.mask, "old_logprobs": r.logprobs}
    loss_fn = ppo_loss_fn(actor, 0.2, 0.0, None)
    phases["actor_update_all_positions_s"] = timed(lambda: actor.train_on(loss_fn, mb))
    windowed = actor.response_microbatch(mb, r.prompt_lengths, r.lengths, ("advantages", "old_logprobs"))
    phases["actor_update_response_positions_s"] = timed(lambda: actor.train_on(loss_fn, windowed))
    batch = {"prompts": prompts, "prompt_lengths": plens}
    phases["full_ppo_step_s"] = timed(lambda: trainer.train_step(batch), repeats=max(1, args.repeats - 1))

    print(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "device": str(dev),
        "model": mc, "vocab": args.vocab, "batch": args.batch, "prompt_tokens": args.prompt,
        "new_tokens": args.new_tokens,
        "generate_kv_cache_tokens_per_s": new_tokens / t_cache,
        "generate_no_cache_tokens_per_s": new_tokens / t_nocache,
        "kv_cache_speedup": t_nocache / t_cache,
        **phases,
    }, indent=2))


if __name__ == "__main__":
    main()
