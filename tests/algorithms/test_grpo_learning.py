"""The online stages end to end on randomwalks (issue 13 §3-4): a tiny GPT SFT-trained on the
task's sampled walks (``data.dataset: jsonl``, ``sft.jsonl``), then trained online by each
critic-free algorithm through :func:`~nemo_rlhf.algorithms.critic_free.run_critic_free` and by PPO
(reward function instead of a reward model, in-process critic), raises the held-out mean
optimality above its SFT start point; and a run stopped and resumed equals an uninterrupted one
bitwise.

In-process (one gloo rank). On one thread: SFT ~10 s once per module, each online run ~3 s. The
held-out start nodes are never RL prompts (the SFT walks start everywhere, as trlX's).
The full gate (>= 0.95 held-out optimality, from a 1,000-step SFT) is benchmarks/bench_randomwalks.py;
here 60 SFT steps and 20 online steps only check that each algorithm learns.
"""

from __future__ import annotations

import json

import pytest
import torch

MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, max_position_embeddings=32)


@pytest.fixture(scope="module")
def sft_run(megatron_world, tmp_path_factory):
    """The randomwalks task and an SFT run on its sampled walks: ``(task_dir, sft weights)``."""
    from nemo_rlhf.algorithms.sft import SFTTrainer
    from nemo_rlhf.config import SFTStageConfig, parse_config
    from nemo_rlhf.data.randomwalks import sft_stage_node, write_task

    tmp = tmp_path_factory.mktemp("randomwalks_learning")
    task = tmp / "task"
    write_task(task, n_offline_walks=10)
    cfg = parse_config(SFTStageConfig, sft_stage_node(task, tmp / "sft", max_steps=60, model=MODEL))
    result = SFTTrainer(cfg).run()
    assert result["val_after"]["nll"] < 1.0, result  # it learnt the walks
    return task, result["checkpoint"]


def grpo_node(task, init_from, run_dir, **over):
    node = {"run_dir": str(run_dir), "init_from": init_from, "model": MODEL,
            "tokenizer": {"type": "tokenizer_json", "path": str(task / "tokenizer.json")},
            "data": {"dataset": "jsonl", "data_dir": str(task), "files": ["prompts.jsonl"],
                     "heldout_files": ["heldout.jsonl"], "max_seq_len": 16, "max_prompt_len": 4},
            "batch": {"global_batch_size": 64, "micro_batch_size": 64}, "optim": {"lr": 1e-3},
            "trainer": {"max_steps": 20, "val_check_interval": None, "log_every_n_steps": 1},
            "checkpoint": {"every_n_steps": 0, "resume": False},
            "reward": {"functions": [{"_target_": "nemo_rlhf.data.randomwalks.RandomWalkReward"}]},
            "grpo": {"num_generations": 8, "sampling": {"max_new_tokens": 10}, "val_samples_per_prompt": 16}}
    for section, values in over.items():
        node[section] = {**node.get(section, {}), **values} if isinstance(values, dict) else values
    return node


@pytest.mark.parametrize("algorithm", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_online_training_raises_heldout_optimality_above_sft(sft_run, tmp_path, algorithm):
    from nemo_rlhf.algorithms.critic_free import run_critic_free

    task, weights = sft_run
    result = run_critic_free(grpo_node(task, weights, tmp_path, grpo={"algorithm": algorithm}))
    before = result["heldout_before"]["reward_RandomWalkReward"]
    after = result["heldout_after"]["reward_RandomWalkReward"]
    assert after > before + 0.05, (algorithm, before, after)
    assert result["reference_built"] is False  # beta = kl_coef = 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("grpo/reward" in r for r in rows)
    assert (tmp_path / "grpo_result.json").exists() and (tmp_path / "grpo_samples.jsonl").exists()


def test_resume_equals_uninterrupted_bitwise(sft_run, tmp_path):
    """4 steps in one go vs 2 steps, stop, the same command with max_steps=4: same per-step metrics,
    same held-out results and bitwise equal weights (dynamic sampling and a KL reference on, so the
    refill draws and the reference are part of what is resumed)."""
    from nemo_rlhf.algorithms.critic_free import run_critic_free
    from nemo_rlhf.checkpoint.weights import load_weights
    from nemo_rlhf.models.policy import GPTPolicyModel

    task, weights = sft_run
    over = {"grpo": {"algorithm": "grpo", "beta": 0.02, "dynamic_sampling": True, "ppo_epochs": 2,
                     "num_minibatches": 2, "val_samples_per_prompt": 2},
            "batch": {"global_batch_size": 32, "micro_batch_size": 16},
            "checkpoint": {"every_n_steps": 2, "resume": True}}
    full, part = tmp_path / "full", tmp_path / "part"
    steps = lambda n: {"max_steps": n, "val_check_interval": None, "log_every_n_steps": 1}  # noqa: E731
    run_critic_free(grpo_node(task, weights, full, trainer=steps(4), **over))
    run_critic_free(grpo_node(task, weights, part, trainer=steps(2), **over))
    res = run_critic_free(grpo_node(task, weights, part, trainer=steps(4), **over))
    assert res["steps"] == 4

    def train_rows(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: {k: v for k, v in r.items() if k.startswith("grpo/")} for r in rows if "grpo/loss" in r}

    got, want = train_rows(part), train_rows(full)
    assert sorted(want) == [0, 1, 2, 3] and got == want
    assert json.loads((full / "grpo_result.json").read_text())["heldout_after"] == res["heldout_after"]

    def load(run):
        tok_vocab = 22  # 21 nodes + <|endoftext|>
        model = GPTPolicyModel(MODEL, None, tok_vocab, 8, 21, 21)
        load_weights(model, run / "grpo_weights")
        return {k: v.clone() for k, v in model.gpt.state_dict().items() if torch.is_tensor(v)}

    a, b = load(full), load(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ppo_with_reward_function_raises_heldout_optimality(sft_run, tmp_path):
    """PPO (critic in process, initialised from the SFT trunk) rewarded by the optimality function
    only (``reward.reward_model: false``: the backend has no reward model and returns 0 scores)."""
    from nemo_rlhf.algorithms.ppo import PPOTrainer
    from nemo_rlhf.checkpoint.weights import load_weights
    from nemo_rlhf.config import PPOActorStageConfig, parse_config
    from nemo_rlhf.models.critic import GPTCriticModel
    from nemo_rlhf.servers.local import LocalCriticClient
    from nemo_rlhf.servers.megatron_backend import MegatronCriticBackend

    task, weights = sft_run
    # PPO samples one response per (distinct) prompt: k copies of each start that differ only in
    # trailing spaces (the same tokens): 16 per held-out start as the critic-free evaluation, 8 per
    # training start to fill 80-rollout batches.
    def copies(name: str, k: int) -> int:
        starts = [json.loads(r)["prompt"] for r in (task / f"{name}.jsonl").read_text().splitlines()]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": s + " " * i}) + "\n"
                                                        for s in starts for i in range(k)))
        return len(starts) * k

    n = copies("heldout", 16)
    copies("prompts", 8)
    cfg = parse_config(PPOActorStageConfig, {
        "run_dir": str(tmp_path / "run"), "init_from": weights, "model": MODEL,
        "tokenizer": {"type": "tokenizer_json", "path": str(task / "tokenizer.json")},
        "data": {"dataset": "jsonl", "data_dir": str(tmp_path), "files": ["prompts.jsonl"],
                 "heldout_files": ["heldout.jsonl"], "max_seq_len": 16, "max_prompt_len": 4},
        "batch": {"global_batch_size": n, "micro_batch_size": n}, "optim": {"lr": 1e-3},
        "trainer": {"max_steps": 20, "val_check_interval": None, "log_every_n_steps": 1},
        "checkpoint": {"every_n_steps": 0, "resume": False},
        "reward": {"functions": [{"_target_": "nemo_rlhf.data.randomwalks.RandomWalkReward"}], "reward_model": False},
        "ppo": {"sampling": {"max_new_tokens": 10}, "ppo_epochs": 1, "num_minibatches": 1,
                "kl_controller": {"type": "fixed", "init_kl_coef": 0.0}}})
    critic = GPTCriticModel(MODEL, {"lr": 1e-3}, 22, n)
    load_weights(critic, weights, skip_prefixes=("output_layer.",))
    backend = MegatronCriticBackend(critic, None, max_seq_len=16, save_fn=lambda p: None)
    result = PPOTrainer(cfg, LocalCriticClient(backend)).run()
    before, after = result["heldout_before"]["reward"], result["heldout_after"]["reward"]
    assert after > before + 0.05, (before, after)
    assert 0.0 <= before and after <= 1.0  # optimality only: the backend's zero scores add nothing
