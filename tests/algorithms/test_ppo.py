"""A short PPO run in which the mean reward rises.

The reward model is a real megatron GPT reward model trained (Bradley-Terry) on synthetic
preference pairs in which the chosen sequence contains a target token and the rejected one does
not; the actor starts from random weights, so it emits the target token at chance rate. PPO must
raise the reward-model score of its samples while staying near the reference policy.
"""

import json

import numpy as np
import torch

TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
            max_position_embeddings=64)

TARGET = 7
VOCAB = 64


def synthetic_pairs(n: int, length: int, gen: torch.Generator):
    chosen = torch.randint(10, VOCAB, (n, length), generator=gen)
    rejected = chosen.clone()
    hits = torch.rand(n, length, generator=gen) < 0.5
    chosen[hits] = TARGET
    return chosen, rejected


def train_reward_model(steps: int = 60):
    from nemo_rlhf.algorithms.reward_model import bradley_terry_step_loss, pair_microbatches
    from nemo_rlhf.models.reward_model import GPTRewardModel

    rm = GPTRewardModel(TINY, dict(lr=3e-3, clip_grad=1.0), VOCAB, micro_batch_size=8)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.full((16,), 12)
    for _ in range(steps):
        c, r = synthetic_pairs(16, 12, gen)
        rm.train_on(bradley_terry_step_loss,
                    pair_microbatches({"tokens": torch.cat([c, r]), "lengths": torch.cat([lengths, lengths])}, 8))
    c, r = synthetic_pairs(64, 12, gen)
    lengths = torch.full((128,), 12)
    acc = rm.evaluate_on(bradley_terry_step_loss,
                         pair_microbatches({"tokens": torch.cat([c, r]), "lengths": lengths}, 8))["accuracy"]
    return rm, acc


def test_ppo_mean_reward_rises(megatron_world, tmp_path):
    from nemo_rlhf.algorithms.ppo import PPOTrainer
    from nemo_rlhf.config import PPOActorStageConfig, parse_config
    from nemo_rlhf.models.critic import GPTCriticModel
    from nemo_rlhf.models.policy import GPTPolicyModel
    from nemo_rlhf.parallel.state import seed_everything
    from nemo_rlhf.servers.local import LocalCriticClient
    from nemo_rlhf.servers.megatron_backend import MegatronCriticBackend

    seed_everything(1)
    rm, acc = train_reward_model()
    assert acc > 0.9, f"synthetic reward model did not learn the preference (accuracy {acc})"
    rm.requires_grad_(False)
    critic = GPTCriticModel(TINY, dict(lr=1e-3), VOCAB, micro_batch_size=8)
    backend = MegatronCriticBackend(critic, rm, max_seq_len=64, save_fn=lambda p: None)
    ref = GPTPolicyModel(TINY, None, VOCAB, micro_batch_size=8, eos_id=0, pad_id=0)
    cfg = parse_config(PPOActorStageConfig, {
        "run_dir": str(tmp_path), "init_from": "unused", "tokenizer": {"path": "unused"},
        "batch": {"global_batch_size": 16, "micro_batch_size": 8},
        "ppo": {"ppo_epochs": 2, "num_minibatches": 2, "kl_controller": {"type": "fixed", "init_kl_coef": 0.01},
                "sampling": {"max_new_tokens": 8}, "seed": 3}})
    actor = GPTPolicyModel(TINY, dict(lr=2e-3, clip_grad=1.0), VOCAB, 8, eos_id=0, pad_id=0)
    trainer = PPOTrainer.from_models(cfg, actor, ref, LocalCriticClient(backend))
    actor.gpt.load_state_dict(ref.gpt.state_dict())
    gen = torch.Generator().manual_seed(5)
    rewards, critic_losses = [], []
    for step in range(20):
        prompts = torch.randint(10, VOCAB, (16, 4), generator=gen)
        m = trainer.train_step({"prompts": prompts, "prompt_lengths": torch.full((16,), 4)})
        trainer.step += 1
        rewards.append(m["reward"])
        critic_losses.append(m["critic_loss"])
        assert np.isfinite(m["loss"]) and np.isfinite(m["kl"])
    first, last = float(np.mean(rewards[:4])), float(np.mean(rewards[-4:]))
    assert last > first + 0.5, f"mean reward did not rise: first {first:.3f}, last {last:.3f}: {rewards}"


def test_ppo_reward_combines_reward_model_and_functions(tmp_path):
    """``PPOTrainer.reward``: ``reward_model_weight * rm + sum_k w_k f_k`` on the decoded texts;
    ``reward.reward_model: false`` drops the server's scores; a failing function names itself."""
    import pytest

    from nemo_rlhf.algorithms.ppo import PPOTrainer
    from nemo_rlhf.config import ConfigError, PPOActorStageConfig, parse_config
    from nemo_rlhf.data.randomwalks import write_task
    from nemo_rlhf.data.tokenizer import tokenizer_from_config
    from nemo_rlhf.rewards.functions import RewardFunctionError, build_reward

    write_task(tmp_path, n_sft_walks=4, n_offline_walks=1)
    tok = tokenizer_from_config({"type": "tokenizer_json", "path": str(tmp_path / "tokenizer.json")})
    fn = [{"_target_": "nemo_rlhf.data.randomwalks.RandomWalkReward", "weight": 2.0}]

    def trainer(reward):
        cfg = parse_config(PPOActorStageConfig, {"init_from": "x", "tokenizer": {"path": "t"}, "reward": reward})
        t = PPOTrainer(cfg)
        t.tokenizer, t.reward_fn = tok, build_reward(cfg.reward.functions) if cfg.reward.functions else None
        return t

    # prompts "b", "b"; responses "a" (b->a is an edge iff distance 1) and "b" (never reaches a)
    graph = json.loads((tmp_path / "graph.json").read_text())
    start = next(k for k, d in graph["distance"].items() if d == 1)
    ids = lambda s: tok.encode(s)  # noqa: E731
    tokens = torch.tensor([ids(start) + ids("a"), ids(start) + ids(start)])
    lengths, plens = torch.tensor([2, 2]), torch.tensor([1, 1])
    rm = torch.tensor([0.5, -1.0])
    both = trainer({"functions": fn, "reward_model_weight": 0.5}).reward(tokens, lengths, plens, rm)
    assert torch.allclose(both, torch.tensor([0.25 + 2.0, -0.5]))
    only_fn = trainer({"functions": fn, "reward_model": False}).reward(tokens, lengths, plens, rm)
    assert torch.allclose(only_fn, torch.tensor([2.0, 0.0]))
    only_rm = trainer({}).reward(tokens, lengths, plens, rm)
    assert torch.equal(only_rm, rm)
    bad = trainer({"functions": [{"_target_": "math.sqrt"}], "reward_model": False})
    with pytest.raises(RewardFunctionError, match="math.sqrt"):
        bad.reward(tokens, lengths, plens, rm)
    with pytest.raises(ConfigError, match="reward.reward_model=true"):
        trainer({"reward_model": False})
