"""nemo_rlhf/algorithms/rejection_sampling.py: rejection-sampling fine-tuning on randomwalks (issue 14 §2).

In-process (one gloo rank). A tiny GPT is SFT-trained once per module on randomwalks' sampled
walks (``sft.jsonl``); then: selection through the trainer (best = the argmax of each prompt's
samples, threshold = every sample at or above it), a raising reward function named in the error,
two rounds raising held-out mean optimality above the SFT start, and a run preempted in the middle
of round 1's SFT and resumed: round 1's samples read back (not generated again), the same round
metrics and bitwise equal weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch

from nemo_rlhf.config import ConfigError, RejectionSamplingStageConfig, parse_config

MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, max_position_embeddings=32)
REWARD = {"_target_": "nemo_rlhf.data.randomwalks.RandomWalkReward"}


@pytest.fixture(scope="module")
def sft_run(megatron_world, tmp_path_factory):
    """The randomwalks task, its tokenizer and an SFT run on its sampled walks:
    ``(task_dir, tokenizer, sft weights, sft result)``."""
    from nemo_rlhf.algorithms.sft import SFTTrainer
    from nemo_rlhf.config import SFTStageConfig
    from nemo_rlhf.data.randomwalks import sft_stage_node, write_task
    from nemo_rlhf.data.tokenizer import tokenizer_from_config

    tmp = tmp_path_factory.mktemp("rs_randomwalks")
    task = tmp / "task"
    write_task(task, n_offline_walks=10)
    cfg = parse_config(SFTStageConfig, sft_stage_node(task, tmp / "sft", max_steps=60, model=MODEL))
    result = SFTTrainer(cfg).run()
    assert result["val_after"]["nll"] < 1.0, result
    tok = tokenizer_from_config({"type": "tokenizer_json", "path": str(task / "tokenizer.json")})
    return task, tok, result["checkpoint"]


def rs_node(task, init_from, run_dir, **over):
    node = {"run_dir": str(run_dir), "init_from": init_from, "model": MODEL,
            "tokenizer": {"type": "tokenizer_json", "path": str(task / "tokenizer.json")},
            "data": {"dataset": "jsonl", "data_dir": str(task), "files": ["prompts.jsonl"],
                     "heldout_files": ["heldout.jsonl"], "max_seq_len": 16, "max_prompt_len": 4},
            "batch": {"global_batch_size": 16, "micro_batch_size": 16}, "optim": {"lr": 1e-3},
            "trainer": {"max_steps": 50, "val_check_interval": None, "log_every_n_steps": 1},
            "checkpoint": {"every_n_steps": 0, "resume": False},
            "reward": {"functions": [REWARD]},
            "rs": {"num_rounds": 2, "num_samples": 8, "prompts_per_round": 32, "sft_epochs": 1,
                   "generation_batch_size": 256, "val_samples_per_prompt": 16, "sampling": {"max_new_tokens": 10},
                   "best_of_n": {"enabled": False}}}
    for section, values in over.items():
        node[section] = {**node.get(section, {}), **values} if isinstance(values, dict) else values
    return node


def make_trainer(sft_run, tmp_path, reward_fn=None, **over):
    """A trainer around the SFT policy (no setup(): in-process prompt sets)."""
    from nemo_rlhf.algorithms.rejection_sampling import RejectionSamplingTrainer
    from nemo_rlhf.checkpoint.weights import load_weights
    from nemo_rlhf.data import PromptDataset
    from nemo_rlhf.data.tasks import load_prompt_rows
    from nemo_rlhf.models.policy import GPTPolicyModel

    task, tok, weights = sft_run
    cfg = parse_config(RejectionSamplingStageConfig, rs_node(task, weights, tmp_path, **over))
    policy = GPTPolicyModel(MODEL, {"lr": 1e-3}, tok.vocab_size, 16, tok.eos_id, tok.pad_id)
    load_weights(policy, weights)
    prompts = lambda f: PromptDataset([r.prompt for r in load_prompt_rows(task / f)[0]], tok, 4)  # noqa: E731
    return RejectionSamplingTrainer.from_models(cfg, policy, tok, prompts("prompts.jsonl"), prompts("heldout.jsonl"),
                                                reward_fn=reward_fn)


def test_best_selection_keeps_the_argmax_of_each_prompt(sft_run, tmp_path):
    trainer = make_trainer(sft_run, tmp_path, rs={"prompts_per_round": 12, "num_samples": 4})
    rows = trainer.generate_round(0)
    assert len(rows) == 12 * 4 and [r["sample"] for r in rows[:8]] == [0, 1, 2, 3] * 2
    rewards = np.array([r["reward"] for r in rows]).reshape(12, 4)
    kept = np.array([r["kept"] for r in rows]).reshape(12, 4)
    assert (kept.sum(axis=1) == 1).all()
    assert (kept.argmax(axis=1) == rewards.argmax(axis=1)).all()  # the first maximum on ties, as np.argmax
    assert len({r["prompt_index"] for r in rows[:4]}) == 1  # a prompt's n samples are contiguous
    for r in rows[:4]:  # the stored ids are what was scored
        assert trainer.tokenizer.decode(r["prompt_ids"]) == r["prompt"]
        assert r["reward"] == pytest.approx(r["terms"]["RandomWalkReward"])
    m = trainer.sample_metrics(rows, 4)
    assert m["kept"] == 12 and m["kept_prompts"] == 12
    assert m["kept_reward_mean"] == pytest.approx(rewards.max(axis=1).mean()) == pytest.approx(m["best_reward_mean"])
    assert m["reward_max"] == pytest.approx(rewards.max()) and m["kept_reward_mean"] >= m["reward_mean"]


def test_threshold_selection_keeps_every_sample_at_or_above(sft_run, tmp_path):
    trainer = make_trainer(sft_run, tmp_path, rs={"prompts_per_round": 12, "num_samples": 4,
                                                  "selection": "threshold", "threshold": 0.5})
    rows = trainer.generate_round(0)
    assert all(r["kept"] == (r["reward"] >= 0.5) for r in rows)
    assert 0 < sum(r["kept"] for r in rows) < len(rows)  # the SFT policy's walks: some optimal, some not
    assert trainer.sft_steps(0) == 0 and trainer.sft_steps(5) == 1 and trainer.sft_steps(40) == 2


def test_samples_of_another_run_are_not_reused(sft_run, tmp_path):
    """round_<k>/samples.jsonl is read back only by a resumed run and only if it was sampled at the
    round's starting step; a stale file in the run directory is sampled again and replaced."""
    trainer = make_trainer(sft_run, tmp_path, rs={"prompts_per_round": 4, "num_samples": 2})
    stale = tmp_path / "round_0" / "samples.jsonl"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"round": 0, "policy_step": 0, "kept": True, "reward": 9.0}) + "\n")
    rows = trainer.round_samples(0)  # a fresh run: generates
    assert trainer.generated_rounds == [0] and len(rows) == 8 and all(r["policy_step"] == 0 for r in rows)
    assert [json.loads(line) for line in stale.read_text().splitlines()] == rows
    trainer.resumed = True
    assert trainer.round_samples(0) == rows and trainer.generated_rounds == [0]  # read back
    trainer.step = 3  # a checkpoint of another step: sampled again
    assert trainer.round_samples(0)[0]["policy_step"] == 3 and trainer.generated_rounds == [0, 0]


def raising_reward(prompts, responses):
    raise RuntimeError("judge offline")


def test_a_raising_reward_function_fails_with_its_name(sft_run, tmp_path):
    from nemo_rlhf.rewards.functions import RewardFunctionError

    trainer = make_trainer(sft_run, tmp_path, rs={"prompts_per_round": 4, "num_samples": 2},
                           reward={"functions": [REWARD, {"_target_": f"{__name__}.raising_reward"}]})
    with pytest.raises(RewardFunctionError, match=rf"{__name__}.raising_reward raised .*judge offline"):
        trainer.generate_round(0)


class GoalCountingRewardModel:
    """An in-process stand-in for the reward-model server: score = how often the response writes the
    goal node (token 0); its values must be ignored."""

    in_process = True

    def infer_async(self, tokens, lengths):
        from concurrent.futures import Future

        fut = Future()
        scores = np.array([(row[1:n] == 0).sum() for row, n in zip(tokens, lengths)], dtype=np.float32)
        fut.set_result((np.full(tokens.shape, 123.0, dtype=np.float32), scores))
        return fut

    def close(self):
        pass


def test_reward_model_server_scores_are_weighted_into_the_selection(sft_run, tmp_path):
    from nemo_rlhf.algorithms.rejection_sampling import RejectionSamplingTrainer

    task, tok, weights = sft_run
    cfg = parse_config(RejectionSamplingStageConfig, rs_node(
        task, weights, tmp_path, rs={"prompts_per_round": 4, "num_samples": 4},
        reward={"functions": [{**REWARD, "weight": 2.0}], "reward_model": True, "reward_model_weight": 0.5}))
    base = make_trainer(sft_run, tmp_path)
    trainer = RejectionSamplingTrainer.from_models(cfg, base.policy, tok, base.train_ds, base.val_ds,
                                                   critic_client=GoalCountingRewardModel())
    rows = trainer.generate_round(0)
    for r in rows:
        assert set(r["terms"]) == {"RandomWalkReward", "reward_model"}
        assert r["reward"] == pytest.approx(2.0 * r["terms"]["RandomWalkReward"] + 0.5 * r["terms"]["reward_model"])
    total = np.array([r["reward"] for r in rows]).reshape(4, 4)
    assert (np.array([r["kept"] for r in rows]).reshape(4, 4).argmax(axis=1) == total.argmax(axis=1)).all()


def test_best_of_n_judge_scores_the_picked_responses(sft_run, tmp_path):
    """With the VADER compound itself as the reward, the best of a block of n is VADER-positive iff
    any of its n is, so the judge's positive fraction cannot fall as n grows."""
    from nemo_rlhf.rewards.functions import build_reward

    vader = build_reward([{"_target_": "nemo_rlhf.rewards.sentiment.vader_reward"}])
    trainer = make_trainer(sft_run, tmp_path, reward_fn=vader, rs={"best_of_n": {"ns": [1, 2, 8]}, "judge": "vader"})
    curve = trainer.best_of_n()
    assert curve["ns"] == [1, 2, 8] and curve["prompts"] == 5 and curve["samples_per_prompt"] == 8
    assert curve["reward"] == sorted(curve["reward"]) and curve["vader_positive"] == sorted(curve["vader_positive"])
    assert all(0.0 <= v <= 1.0 for v in curve["vader_positive"])
    ev = trainer.evaluate()  # the held-out evaluation's judge: the reward here is the compound itself
    assert ev["vader_compound"] == pytest.approx(ev["reward"]) and 0.0 <= ev["vader_positive"] <= 1.0


def test_two_rounds_raise_heldout_optimality_above_sft(sft_run, tmp_path):
    from nemo_rlhf.algorithms.rejection_sampling import run_rejection_sampling

    task, _, weights = sft_run
    res = run_rejection_sampling(rs_node(task, weights, tmp_path, rs={"best_of_n": {"ns": [1, 4], "max_prompts": 5}}))
    before = res["heldout_before"]["reward_RandomWalkReward"]
    after = [r["heldout"]["reward_RandomWalkReward"] for r in res["rounds"]]
    # Measured (this seed): 0.53 -> 0.61 -> 0.66 with SFT walks from every start node (write_task's
    # default); 0.43 -> 0.50 -> 0.47 when the SFT walks skip the held-out starts (sft_from_heldout=False).
    assert max(after) > before + 0.05 and after[-1] > before, (before, after)
    for r in res["rounds"]:
        assert r["kept"] == 32 and r["kept_reward_mean"] >= r["reward_mean"] and np.isfinite(r["sft_loss"])
        assert (tmp_path / f"round_{r['round']}" / "samples.jsonl").exists()
    bon = json.loads((tmp_path / "best_of_n.json").read_text())
    for when in ("start", "final"):
        assert bon[when]["ns"] == [1, 4] and bon[when]["reward"][1] >= bon[when]["reward"][0]
    assert res["best_of_n"]["final"]["reward"][0] > res["best_of_n"]["start"]["reward"][0]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("rs_round/kept_reward_mean" in r for r in rows) and any("rs/loss" in r for r in rows)


def test_resume_mid_round_reads_samples_and_equals_uninterrupted(sft_run, tmp_path):
    """2 rounds of 2 SFT steps in one go vs a run preempted (SIGTERM) after round 1's first SFT
    step and run again: the second process reads round 1's samples.jsonl instead of generating,
    and the round metrics, held-out results and final weights equal the uninterrupted run's."""
    from nemo_rlhf.algorithms.rejection_sampling import RejectionSamplingTrainer
    from nemo_rlhf.checkpoint.weights import load_weights
    from nemo_rlhf.config import load_stage_config
    from nemo_rlhf.models.policy import GPTPolicyModel

    task, tok, weights = sft_run
    over = dict(rs={"sft_epochs": 2, "val_samples_per_prompt": 2},
                checkpoint={"every_n_steps": 0, "resume": True})
    full, part = tmp_path / "full", tmp_path / "part"
    cfg = lambda run: load_stage_config(RejectionSamplingStageConfig, rs_node(task, weights, run, **over))  # noqa: E731
    want = RejectionSamplingTrainer(cfg(full)).run()
    assert [r["sft_steps"] for r in want["rounds"]] == [4, 4]

    class Preempted(RejectionSamplingTrainer):
        def train_step(self, batch):
            metrics = super().train_step(batch)
            if self.round == 1 and self.step == self.round_start:  # after this step: step = round_start + 1
                os.kill(os.getpid(), signal.SIGTERM)
            return metrics

    first = Preempted(cfg(part))
    stopped = first.run()
    assert stopped["preempted"] and stopped["steps"] == 5 and first.generated_rounds == [0, 1]
    samples = (part / "round_1" / "samples.jsonl").read_bytes()
    second = RejectionSamplingTrainer(cfg(part))
    got = second.run()
    assert second.generated_rounds == []  # round 1 resumed from its samples.jsonl
    assert (part / "round_1" / "samples.jsonl").read_bytes() == samples
    assert got["rounds"] == want["rounds"] and got["steps"] == want["steps"] == 8

    def load(run):
        model = GPTPolicyModel(MODEL, None, tok.vocab_size, 16, tok.eos_id, tok.pad_id)
        load_weights(model, run / "rs_weights")
        return {k: v.clone() for k, v in model.gpt.state_dict().items() if torch.is_tensor(v)}

    a, b = load(full), load(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_errors(sft_run, tmp_path):
    task, _, weights = sft_run
    with pytest.raises(ConfigError, match=r"rs.selection=threshold needs rs.threshold"):
        parse_config(RejectionSamplingStageConfig, rs_node(task, weights, tmp_path, rs={"selection": "threshold"}))
    with pytest.raises(ConfigError, match=r"rs.threshold=0.5 is read only with rs.selection=threshold"):
        parse_config(RejectionSamplingStageConfig, rs_node(task, weights, tmp_path, rs={"threshold": 0.5}))
    with pytest.raises(ConfigError, match=r"rs.selection must be one of"):
        parse_config(RejectionSamplingStageConfig, rs_node(task, weights, tmp_path, rs={"selection": "top"}))
    with pytest.raises(ConfigError, match=r"rs.best_of_n.ns\[1\]=3 must be >= 1 and divide"):
        parse_config(RejectionSamplingStageConfig,
                     rs_node(task, weights, tmp_path, rs={"best_of_n": {"ns": [1, 3, 16]}}))
    with pytest.raises(ConfigError, match=r"unknown key 'num_sample' in section 'rs'.*'num_samples'"):
        parse_config(RejectionSamplingStageConfig, rs_node(task, weights, tmp_path, rs={"num_sample": 4}))
    with pytest.raises(ConfigError, match=r"rs.generation_batch_size=12 must be a multiple of rs.num_samples=8"):
        parse_config(RejectionSamplingStageConfig, rs_node(task, weights, tmp_path, rs={"generation_batch_size": 12}))
    with pytest.raises(ConfigError, match=r"reward: set reward.functions"):
        parse_config(RejectionSamplingStageConfig, rs_node(task, weights, tmp_path, reward={"functions": []}))


def test_gpt_rs_yaml_composes(sft_run):
    """conf/gpt_rs.yaml against its schema, as launchers/train_rs.py composes it."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from nemo_rlhf.config import load_stage_config, register_configs

    task, _, weights = sft_run
    register_configs()
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        node = compose("gpt_rs", [f"init_from={weights}", f"data.data_dir={task}",
                                  f"tokenizer.path={task / 'tokenizer.json'}", "rs.selection=threshold",
                                  "rs.threshold=1.0"])
    cfg = load_stage_config(RejectionSamplingStageConfig, node)
    assert cfg.rs.selection == "threshold" and cfg.rs.threshold == 1.0 and cfg.data.dataset == "jsonl"
    assert cfg.reward.functions[0]["_target_"] == "nemo_rlhf.data.randomwalks.RandomWalkReward"
