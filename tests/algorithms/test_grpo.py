"""nemo_rlhf/algorithms/critic_free.py, grpo.py, rloo.py, reinforce_pp.py: critic-free steps on a
tiny GPT against the randomwalks reward (issue 13 §1-3).

In-process (one gloo rank, TP = PP = DP = 1), tiny models, seconds per test; the learning check
SFT-trains a tiny GPT on randomwalks' sampled walks and then runs GRPO.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nemo_rlhf.config import ConfigError, GRPOStageConfig, parse_config

TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, max_position_embeddings=32)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from nemo_rlhf.data.randomwalks import write_task
    from nemo_rlhf.data.tokenizer import tokenizer_from_config

    out = tmp_path_factory.mktemp("randomwalks")
    write_task(out, n_sft_walks=2000, n_offline_walks=10)
    tok = tokenizer_from_config({"type": "tokenizer_json", "path": str(out / "tokenizer.json")})
    return out, tok


def stage_cfg(task_dir, tmp_path, **grpo):
    batch = grpo.pop("batch", {"global_batch_size": 16, "micro_batch_size": 8})
    node = {"run_dir": str(tmp_path), "init_from": "unused",
            "tokenizer": {"type": "tokenizer_json", "path": str(task_dir / "tokenizer.json")},
            "data": {"dataset": "jsonl", "data_dir": str(task_dir), "files": ["prompts.jsonl"],
                     "heldout_files": ["heldout.jsonl"], "max_seq_len": 32, "max_prompt_len": 4},
            "model": TINY, "batch": batch,
            "reward": {"functions": [{"_target_": "nemo_rlhf.data.randomwalks.RandomWalkReward"}]},
            "grpo": {"num_generations": 4, "sampling": {"max_new_tokens": 10}, "seed": 3, **grpo}}
    return parse_config(GRPOStageConfig, node)


def prompt_sets(task_dir, tok):
    from nemo_rlhf.data import PromptDataset
    from nemo_rlhf.data.tasks import load_prompt_rows

    train = [r.prompt for r in load_prompt_rows(task_dir / "prompts.jsonl")[0]]
    held = [r.prompt for r in load_prompt_rows(task_dir / "heldout.jsonl")[0]]
    return PromptDataset(train, tok, 4), PromptDataset(held, tok, 4)


def make_trainer(cfg, tok, task_dir, lr=1e-3, reward_fn=None, policy=None):
    from nemo_rlhf.algorithms.critic_free import trainer_class
    from nemo_rlhf.models.policy import GPTPolicyModel

    mbs = int(cfg.batch.micro_batch_size)
    optim = dict(lr=lr, clip_grad=1.0)
    if policy is None:
        policy = GPTPolicyModel(TINY, optim, tok.vocab_size, mbs, tok.eos_id, tok.pad_id)
    reference = None
    if cfg.grpo.uses_reference:
        reference = GPTPolicyModel(TINY, None, tok.vocab_size, mbs, tok.eos_id, tok.pad_id)
        reference.gpt.load_state_dict(policy.gpt.state_dict())
    train_ds, val_ds = prompt_sets(task_dir, tok)
    trainer = trainer_class(cfg.grpo.algorithm).from_models(cfg, policy, reference, tok, reward_fn=reward_fn,
                                                            train_prompts=train_ds)
    trainer.val_ds = val_ds
    return trainer


def batch_of(trainer, step, n):
    idx = [(step * n + i) % len(trainer.train_ds) for i in range(n)]
    return trainer.collate([trainer.train_ds[i] for i in idx])


@pytest.mark.parametrize("algorithm,extra", [
    ("grpo", {}),
    ("dr_grpo", {}),
    ("grpo", {"beta": 0.05, "ppo_epochs": 2, "num_minibatches": 2, "clip_eps_high": 0.28,
              "overlong_penalty": {"max_len": 8, "cache_len": 4}, "dynamic_sampling": True,
              "batch": {"global_batch_size": 16, "micro_batch_size": 4}}),
    ("rloo", {"kl_coef": 0.05, "val_judge": "vader"}),
    ("reinforce_pp", {"kl_coef": 0.05}),
    ("reinforce_pp", {}),
])
def test_step_runs_with_finite_metrics(megatron_world, task, tmp_path, algorithm, extra):
    task_dir, tok = task
    cfg = stage_cfg(task_dir, tmp_path, algorithm=algorithm, **extra)
    trainer = make_trainer(cfg, tok, task_dir)
    assert (trainer.reference is None) == (not cfg.grpo.uses_reference)
    for step in range(2):
        m = trainer.train_step(batch_of(trainer, step, 4))
        trainer.step += 1
        for key in ("reward", "reward_std", "loss", "clipfrac", "response_length", "reward_RandomWalkReward"):
            assert key in m and np.isfinite(m[key]), (key, m)
        assert m["skipped"] == 0.0
        if cfg.grpo.uses_reference:
            assert np.isfinite(m["kl"])
        if cfg.grpo.dynamic_sampling:
            assert "dropped_groups" in m and "refill_rounds" in m
    ev = trainer.evaluate()
    assert 0.0 <= ev["reward_RandomWalkReward"] <= 1.0 and ev["response_length"] > 0 and np.isfinite(ev["reward"])
    assert ("kl" in ev) == cfg.grpo.uses_reference and np.isfinite(ev.get("kl", 0.0))
    if cfg.grpo.val_judge:  # VADER on prompt + response texts (some node letters are lexicon entries)
        assert -1.0 <= ev["vader_compound"] <= 1.0 and 0.0 <= ev["vader_positive"] <= 1.0
        saved = [json.loads(line) for line in (tmp_path / "grpo_samples.jsonl").read_text().splitlines()]
        assert saved and all(-1.0 <= r["vader_compound"] <= 1.0 for r in saved)
    else:
        assert "vader_positive" not in ev


def test_groups_are_contiguous_and_whole(megatron_world, task, tmp_path):
    task_dir, tok = task
    cfg = stage_cfg(task_dir, tmp_path)
    trainer = make_trainer(cfg, tok, task_dir)
    b = batch_of(trainer, 0, 4)
    ro = trainer.collect(b)
    assert ro.batch_size == 16
    starts = ro.tokens[:, 0].view(4, 4)
    assert torch.equal(starts, b["prompts"][:, 0:1].expand(4, 4))  # rows g*G .. g*G+G-1: prompt g
    # a dynamic-sampling batch keeps whole groups too
    cfg = stage_cfg(task_dir, tmp_path, dynamic_sampling=True)
    trainer = make_trainer(cfg, tok, task_dir)
    ro = trainer.collect(b)
    assert ro.batch_size == 16
    starts = ro.tokens[:, 0].view(4, 4)
    assert bool((starts == starts[:, :1]).all())


def test_beta_zero_builds_no_reference(megatron_world, task, tmp_path, monkeypatch):
    """With beta = 0 and kl_coef = 0, setup() builds exactly one model (the policy)."""
    from nemo_rlhf.algorithms import critic_free
    from nemo_rlhf.algorithms.grpo import GRPOTrainer

    task_dir, _ = task
    built = []
    real = critic_free.GPTPolicyModel

    def counting(*args, **kwargs):
        built.append(args[1])  # optim_cfg: None for a frozen reference
        return real(*args, **kwargs)

    monkeypatch.setattr(critic_free, "GPTPolicyModel", counting)
    monkeypatch.setattr(critic_free, "load_weights", lambda *a, **k: None)
    monkeypatch.setattr(critic_free, "setup_parallel", lambda *a, **k: 1)
    cfg = stage_cfg(task_dir, tmp_path)
    trainer = GRPOTrainer(cfg)
    trainer.setup()
    assert trainer.reference is None and len(built) == 1 and built[0] is not None
    cfg = stage_cfg(task_dir, tmp_path, beta=0.1)
    trainer = GRPOTrainer(cfg)
    trainer.setup()
    assert trainer.reference is not None and len(built) == 3


def nan_reward(prompts, responses):
    out = np.zeros(len(responses))
    out[2] = float("nan")
    return out


def test_nan_reward_function_fails_the_step_with_the_named_error(megatron_world, task, tmp_path):
    from nemo_rlhf.models.megatron_module import NonFiniteError
    from nemo_rlhf.rewards.functions import RewardFunctionError

    task_dir, tok = task
    cfg = stage_cfg(task_dir, tmp_path)
    cfg.reward.functions.append({"_target_": f"{__name__}.nan_reward", "weight": 0.5})
    trainer = make_trainer(cfg, tok, task_dir)
    before = {k: v.clone() for k, v in trainer.policy.gpt.state_dict().items() if torch.is_tensor(v)}
    m = trainer.train_step(batch_of(trainer, 0, 4))
    assert m["skipped"] == 1.0 and m["nonfinite_total"] == 1.0
    after = trainer.policy.gpt.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update
    trainer.policy.optim_cfg["max_nonfinite_in_a_row"] = 2
    with pytest.raises(NonFiniteError) as err:
        trainer.train_step(batch_of(trainer, 1, 4))
    cause = err.value.__cause__
    assert isinstance(cause, RewardFunctionError)
    for fragment in (f"{__name__}.nan_reward", "non-finite score nan", "batch index 2"):
        assert fragment in str(cause) and fragment in str(err.value)


def test_config_errors(task, tmp_path):
    task_dir, _ = task
    with pytest.raises(ConfigError, match=r"grpo.algorithm must be one of"):
        stage_cfg(task_dir, tmp_path, algorithm="ppo")
    with pytest.raises(ConfigError, match=r"grpo.num_generations must be >= 2"):
        stage_cfg(task_dir, tmp_path, num_generations=1)
    with pytest.raises(ConfigError, match=r"grpo.kl_coef=0.1 .*set grpo.beta instead"):
        stage_cfg(task_dir, tmp_path, kl_coef=0.1)
    with pytest.raises(ConfigError, match=r"batch.global_batch_size=16 .* not a multiple of grpo.num_generations=3"):
        stage_cfg(task_dir, tmp_path, num_generations=3)
    with pytest.raises(ConfigError, match=r"grpo.loss_aggregation must be one of"):
        stage_cfg(task_dir, tmp_path, loss_aggregation="sum")
    with pytest.raises(ConfigError, match=r"unknown key 'num_generation' in section 'grpo'.*'num_generations'"):
        stage_cfg(task_dir, tmp_path, num_generation=4)
    with pytest.raises(ConfigError, match=r"reward.functions\[0\] needs a '_target_'"):
        parse_config(GRPOStageConfig, {"init_from": "x", "tokenizer": {"path": "t"},
                                       "reward": {"functions": [{"weight": 1.0}]}, "batch": {"global_batch_size": 16,
                                                                                              "micro_batch_size": 8}})
    with pytest.raises(ConfigError, match=r"reward: set reward.functions"):
        parse_config(GRPOStageConfig, {"init_from": "x", "tokenizer": {"path": "t"},
                                       "batch": {"global_batch_size": 16, "micro_batch_size": 8}})
    cfg = stage_cfg(task_dir, tmp_path, algorithm="dr_grpo")
    assert cfg.grpo.effective_loss_aggregation == "seq_mean_token_sum_norm" and not cfg.grpo.effective_scale_rewards


def test_gpt_grpo_yaml_composes(task):
    """conf/gpt_grpo.yaml against its schema, as launchers/train_grpo.py composes it."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from nemo_rlhf.config import load_stage_config, register_configs

    task_dir, _ = task
    register_configs()
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        node = compose("gpt_grpo", [f"init_from={task_dir}", f"data.data_dir={task_dir}",
                                    f"tokenizer.path={task_dir / 'tokenizer.json'}", "grpo.algorithm=rloo"])
    cfg = load_stage_config(GRPOStageConfig, node)
    assert cfg.grpo.algorithm == "rloo" and cfg.data.dataset == "jsonl"
    assert cfg.reward.functions[0]["_target_"] == "nemo_rlhf.data.randomwalks.RandomWalkReward"


class GoalCountingRewardModel:
    """An in-process stand-in for the reward-model server: score = how often the response writes
    the goal node (token 0); values are returned and must be ignored."""

    in_process = True

    def infer_async(self, tokens, lengths):
        from concurrent.futures import Future

        fut = Future()
        values = np.full(tokens.shape, 123.0, dtype=np.float32)
        scores = np.array([(row[1:n] == 0).sum() for row, n in zip(tokens, lengths)], dtype=np.float32)
        fut.set_result((values, scores))
        return fut

    def close(self):
        pass


def test_reward_model_server_and_functions_are_summed_with_weights(megatron_world, task, tmp_path):
    from nemo_rlhf.algorithms.critic_free import trainer_class
    from nemo_rlhf.models.policy import GPTPolicyModel

    task_dir, tok = task
    cfg = stage_cfg(task_dir, tmp_path)
    cfg.reward.reward_model = True
    cfg.reward.reward_model_weight = 0.5
    cfg.reward.functions[0]["weight"] = 2.0
    policy = GPTPolicyModel(TINY, {"lr": 1e-3}, tok.vocab_size, 8, tok.eos_id, tok.pad_id)
    trainer = trainer_class("grpo").from_models(cfg, policy, None, tok, critic_client=GoalCountingRewardModel())
    trainer.train_ds, trainer.val_ds = prompt_sets(task_dir, tok)
    ro = trainer.collect(batch_of(trainer, 0, 4))
    assert set(ro.terms) == {"RandomWalkReward", "reward_model"}
    want = 2.0 * ro.terms["RandomWalkReward"] + 0.5 * ro.terms["reward_model"]
    assert torch.allclose(ro.scores, want)
    m = trainer.train_step(batch_of(trainer, 1, 4))
    assert np.isfinite(m["reward_reward_model"]) and m["skipped"] == 0.0
