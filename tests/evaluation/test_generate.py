"""nemo_rlhf/evaluation (generate and evaluate) and launchers/generate.py, on the tiny SFT policy and
reward model the session trains once (tests/conftest.py ``sft_run`` / ``rm_run``).

What is checked against an independent computation: the reward-model score of each row equals
``GPTRewardModel.score`` of its token ids, the KL equals the summed log-prob difference of policy and
reference computed row by row, the VADER compound equals ``vader_compound(prompt + completion)``;
and determinism (same seed and batch size: the same completions; another seed: others).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import fork_server
import numpy as np
import pytest
import torch
from stage_runs import ENV, MODEL, MODEL_CFG, REPO

pytestmark = pytest.mark.usefixtures("megatron_world")

PROMPTS = ["\n\nHuman: How do I bake bread?\n\nAssistant:", "\n\nHuman: hello\n\nAssistant:",
           "\n\nHuman: What is a good movie for tonight? I like comedies.\n\nAssistant:",
           "\n\nHuman: Tell me about cats.\n\nAssistant:", "\n\nHuman: Why?\n\nAssistant:"]
NEW = 6


def _source(run: Path, weights: str) -> dict:
    return {"path": str(run / weights), "format": "weights"}


@pytest.fixture(scope="module")
def models(megatron_world, sft_run, rm_run):
    """(policy, tokenizer, reward model, reference = a second copy of the policy's weights)."""
    from nemo_rlhf.evaluation.sources import load_policy, load_reward_model

    policy, tok = load_policy(_source(sft_run, "sft_weights"), model=MODEL_CFG, micro_batch_size=2)
    reference, _ = load_policy(_source(sft_run, "sft_weights"), model=MODEL_CFG, tokenizer=tok, micro_batch_size=2,
                               section="reference")
    rm = load_reward_model(_source(rm_run, "rm_weights"), tok, model=MODEL_CFG)
    return policy, tok, rm, reference


def _evaluate(models, **kwargs):
    from nemo_rlhf.evaluation.generate import evaluate_policy

    policy, tok, _, _ = models
    kwargs = {"seed": 3, "batch_size": 2, "judges": (), "progress": False, "keep_token_ids": True, **kwargs}
    return evaluate_policy(policy, tok, PROMPTS, {"max_new_tokens": NEW}, **kwargs)


def _padded(rows):
    lengths = torch.tensor([len(r["token_ids"]) for r in rows])
    tokens = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r["token_ids"])] = torch.tensor(r["token_ids"])
    return tokens, lengths


def test_rows_scores_and_summary(models):
    from nemo_rlhf.rewards.sentiment import judge_agreement, vader_compound

    _, tok, rm, reference = models
    rows, summary = _evaluate(models, reward=rm, reference=reference, judges=("vader",))
    assert [r["index"] for r in rows] == list(range(len(PROMPTS)))
    for r, prompt in zip(rows, PROMPTS):
        assert set(r) == {"index", "prompt", "completion", "prompt_tokens", "completion_tokens", "finish",
                          "rm_score", "kl", "vader_compound", "token_ids"}
        p, n, ids = r["prompt_tokens"], r["completion_tokens"], r["token_ids"]
        assert r["prompt"] == prompt and ids[:p] == tok.encode(prompt) and p == len(tok.encode(prompt))
        assert r["finish"] in ("eos", "length") and 0 <= n <= NEW
        assert len(ids) == p + n + (r["finish"] == "eos")  # the EOS is scored, not decoded
        assert (ids[-1] == tok.eos_id) == (r["finish"] == "eos") and tok.eos_id not in ids[p:p + n]
        assert r["finish"] == "eos" or n == NEW
        assert r["completion"] == tok.decode(ids[p:p + n])
        assert r["kl"] == 0.0  # the reference holds the same weights: identical log-probs
    # the reward model's score of exactly the scored token ids (another batch: float rounding only)
    tokens, lengths = _padded(rows)
    np.testing.assert_allclose([r["rm_score"] for r in rows], rm.score(tokens, lengths).numpy(), atol=1e-5)
    compound = vader_compound([r["prompt"] + r["completion"] for r in rows])
    assert [r["vader_compound"] for r in rows] == compound.tolist()
    scores = np.array([r["rm_score"] for r in rows])
    assert summary["count"] == len(PROMPTS) and summary["prompts_given"] == len(PROMPTS)
    assert sum(summary["finish"].values()) == len(PROMPTS)
    assert summary["finish"]["eos"] == sum(r["finish"] == "eos" for r in rows)
    assert summary["completion_tokens_mean"] == pytest.approx(np.mean([r["completion_tokens"] for r in rows]))
    assert summary["rm_score_mean"] == pytest.approx(scores.mean())
    assert summary["kl_mean"] == 0.0
    assert summary["vader_positive_fraction"] == pytest.approx(float((compound > 0.05).mean()))
    assert summary["vader_compound_mean"] == pytest.approx(compound.mean())
    assert summary["judge_agreement"] == pytest.approx(judge_agreement(compound, scores))
    assert summary["seed"] == 3 and summary["batch_size"] == 2 and summary["sampling"]["max_new_tokens"] == NEW


def test_kl_is_the_summed_logprob_difference_over_the_completion(models):
    from nemo_rlhf.models.policy import GPTPolicyModel

    policy, tok, _, _ = models
    other = GPTPolicyModel(MODEL_CFG, None, tok.vocab_size, 2, tok.eos_id, tok.pad_id)  # random weights
    rows, summary = _evaluate(models, reference=other)
    for r in rows:  # one row at a time: no padding, no batching shared with the evaluation
        t = torch.tensor([r["token_ids"]])
        diff = (policy.logprobs(t) - other.logprobs(t))[0]
        expected = diff[r["prompt_tokens"] - 1:].sum().item()  # log-prob t scores token t+1
        assert r["kl"] == pytest.approx(expected, abs=1e-4)
    assert any(abs(r["kl"]) > 1e-3 for r in rows)  # other weights: not trivially 0
    assert summary["kl_mean"] == pytest.approx(np.mean([r["kl"] for r in rows]))


def test_same_seed_same_completions_other_seed_others(models):
    def completions(**kw):
        rows, _ = _evaluate(models, **kw)
        return [r["token_ids"] for r in rows]

    first = completions(seed=5)
    assert completions(seed=5) == first
    assert completions(seed=6) != first
    greedy = {"max_new_tokens": NEW, "greedy": True}
    from nemo_rlhf.evaluation.generate import evaluate_policy

    policy, tok, _, _ = models
    a, _ = evaluate_policy(policy, tok, PROMPTS, greedy, seed=1, batch_size=2, judges=(), progress=False)
    b, _ = evaluate_policy(policy, tok, PROMPTS, greedy, seed=2, batch_size=2, judges=(), progress=False)
    assert [r["completion"] for r in a] == [r["completion"] for r in b]


def test_critic_client_scores_equal_the_in_process_reward_model(models):
    from nemo_rlhf.models.critic import GPTCriticModel
    from nemo_rlhf.servers.local import LocalCriticClient
    from nemo_rlhf.servers.megatron_backend import MegatronCriticBackend

    _, tok, rm, _ = models
    critic = GPTCriticModel(MODEL_CFG, None, tok.vocab_size, 2)
    client = LocalCriticClient(MegatronCriticBackend(critic, rm, max_seq_len=MODEL_CFG["max_position_embeddings"]))
    in_process, _ = _evaluate(models, reward=rm)
    served, _ = _evaluate(models, reward=client)
    assert [r["rm_score"] for r in served] == [r["rm_score"] for r in in_process]


def test_overlong_prompts_are_cut_or_dropped_by_data_overlong(models):
    long = "\n\nHuman: " + "tell me more about bread " * 40 + "\n\nAssistant:"
    rows, summary = _evaluate(models, max_prompt_len=24, overlong="skip", judges=())
    kept = [p for p in PROMPTS if len(models[1].encode(p)) <= 24]
    assert [r["prompt"] for r in rows] == kept
    from nemo_rlhf.evaluation.generate import evaluate_policy

    policy, tok, _, _ = models
    rows, summary = evaluate_policy(policy, tok, [long, PROMPTS[1]], {"max_new_tokens": NEW}, batch_size=2,
                                    judges=(), progress=False, max_prompt_len=24)
    assert [r["prompt_tokens"] for r in rows] == [24, len(tok.encode(PROMPTS[1]))]
    assert summary["overlong"] == {"prompt_truncated": 1} and rows[0]["prompt"] == long


def test_prompts_file_bad_rows_skipped_with_counts_or_named(tmp_path):
    from nemo_rlhf.data.hh import DataFormatError
    from nemo_rlhf.evaluation.generate import load_prompts_file

    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join(['{"prompt": "a"}', "not json", '{"text": "b"}', '{"prompt": ""}', '{"prompt": 3}',
                            "[1]", '{"prompt": "c", "extra": 1}', "", '{"prompt": "d"}']) + "\n")
    prompts, sources, stats = load_prompts_file(f)
    assert prompts == ["a", "c", "d"] and sources == ["prompts.jsonl:1", "prompts.jsonl:7", "prompts.jsonl:9"]
    assert dict(stats.skipped) == {"bad_json": 1, "missing_field": 1, "empty_field": 1, "wrong_type": 1,
                                   "not_an_object": 1}
    assert stats.first["missing_field"] == "prompts.jsonl:3" and stats.rows == 8
    assert load_prompts_file(f, max_prompts=2)[0] == ["a", "c"]
    assert load_prompts_file(f, field="text")[0] == ["b"]
    with pytest.raises(DataFormatError, match=rf"{f}:2: bad_json"):
        load_prompts_file(f, on_error="error")


def test_sources_refuse_what_they_cannot_load(sft_run, tmp_path):
    from nemo_rlhf.checkpoint.weights import CheckpointError
    from nemo_rlhf.config import ConfigError
    from nemo_rlhf.evaluation.sources import detect_format, load_policy

    (tmp_path / "junk").mkdir()
    with pytest.raises(ValueError, match="cannot tell what"):
        detect_format(tmp_path / "junk")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_format(tmp_path / "nothing")
    weights = str(sft_run / "sft_weights")
    with pytest.raises(ConfigError, match="weights directory without a model config"):
        load_policy(weights)
    with pytest.raises(CheckpointError, match=r"cannot load .*'hidden_size': 64.*model: section"):
        load_policy(weights, model={**MODEL_CFG, "hidden_size": 64})
    with pytest.raises(ConfigError, match="tensor_model_parallel_size=2"):
        load_policy(weights, model={**MODEL_CFG, "tensor_model_parallel_size": 2})
    with pytest.raises(ValueError, match="looks like a weights source"):
        load_policy({"path": weights, "format": "megatron"})


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_gguf_source_is_converted_once_into_the_cache(tmp_path):
    spec = importlib.util.spec_from_file_location("_tiny_gguf", REPO / "tests" / "checkpoint" / "test_gguf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    gguf = tmp_path / "tiny.gguf"
    module.write_tiny_gguf(gguf)
    from nemo_rlhf.evaluation.generate import evaluate_policy
    from nemo_rlhf.evaluation.sources import load_policy

    source = {"path": str(gguf), "cache_dir": str(tmp_path / "cache")}
    policy, tok = load_policy(source, micro_batch_size=2)
    assert tok.eos_id == tok.backend.token_to_id("<|im_end|>")  # the GGUF's own tokenizer (type hf)
    rows, _ = evaluate_policy(policy, tok, ["hello world", "the quick"], {"max_new_tokens": 4}, batch_size=2,
                              judges=(), progress=False, chat_template=True)
    assert [r["prompt"] for r in rows] == ["hello world", "the quick"]
    assert rows[0]["prompt_tokens"] == len(tok.apply_chat_template([{"role": "user", "content": "hello world"}],
                                                                   add_generation_prompt=True))
    [converted] = list((tmp_path / "cache").iterdir())
    stamp = (converted / "model_config.yaml").stat().st_mtime_ns
    again, _ = load_policy(source, micro_batch_size=2)
    assert (converted / "model_config.yaml").stat().st_mtime_ns == stamp  # reused, not converted again
    for a, b in zip(policy.gpt.state_dict().values(), again.gpt.state_dict().values()):
        if torch.is_tensor(a):
            assert torch.equal(a, b)
    assert list((tmp_path / "cache").iterdir()) == [converted]


def _launcher_module():
    spec = importlib.util.spec_from_file_location("_generate_launcher", REPO / "launchers" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def launcher(monkeypatch):
    """launchers/generate.py imported in this process. Importing it sets up console logging (its
    @hydra_entry does, on the root logger): put the root logger back afterwards, so that later test
    files in this worker (e.g. tests/utils/test_progress.py) see pytest's logging untouched."""
    import logging
    import warnings

    saved = {name: (lg.level, lg.handlers[:], lg.propagate)
             for name in [None, *logging.root.manager.loggerDict] for lg in [logging.getLogger(name)]}
    try:
        with warnings.catch_warnings():
            yield _launcher_module()
    finally:
        for name, (level, handlers, propagate) in saved.items():
            lg = logging.getLogger(name)
            lg.setLevel(level)
            lg.handlers[:] = handlers
            lg.propagate = propagate


def test_launcher_refuses_a_misspelt_key_with_the_nearest(launcher):
    from nemo_rlhf.config import ConfigError

    launcher.check_overrides(["policy.path=x", "out=y", "sampling.temperature=0.5", "model.num_layers=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'temprature' in section 'sampling' \(did you mean 'temperature'"):
        launcher.check_overrides(["sampling.temprature=0.5"])
    with pytest.raises(ConfigError, match=r"unknown key 'pth' in section 'score.reward' \(did you mean 'path'"):
        launcher.check_overrides(["score.reward.pth=x"])


def test_launcher_end_to_end(sft_run, rm_run, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:3]) + "{bad\n")
    out = tmp_path / "out" / "gen.jsonl"
    cmd = [sys.executable, str(REPO / "launchers" / "generate.py"), f"policy.path={sft_run / 'sft_weights'}",
           *MODEL, f"prompts.file={prompts}", f"out={out}", f"sampling.max_new_tokens={NEW}", "score.vader=true",
           f"score.reward.path={rm_run / 'rm_weights'}", f"reference.path={sft_run / 'sft_weights'}", "batch_size=2"]
    proc = fork_server.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    summary = json.loads((out.parent / "gen.summary.json").read_text())
    assert [r["prompt"] for r in rows] == PROMPTS[:3] and [r["source"] for r in rows] == [
        "prompts.jsonl:1", "prompts.jsonl:2", "prompts.jsonl:3"]
    assert all({"rm_score", "kl", "vader_compound"} <= set(r) and r["kl"] == 0.0 for r in rows)
    assert summary["count"] == 3 and summary["prompts"]["skipped"] == {"bad_json": 1}
    assert {"rm_score_mean", "kl_mean", "vader_positive_fraction", "judge_agreement"} <= set(summary)
    assert "generate: 3 completions" in proc.stderr and "RM/VADER agreement" in proc.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["gen.jsonl", "gen.summary.json"]  # no temporaries
