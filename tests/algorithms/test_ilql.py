"""nemo_rlhf/algorithms/ilql.py, models/ilql.py, data/offline.py: ILQL on randomwalks' offline walks
with a tiny GPT (issue 14 §3).

In-process (one gloo rank, TP = PP = DP = 1). The model of the ``trained`` fixture (STEPS steps
of batch 100 from the random init, ~6 s on an idle core) is shared by the step, Polyak and decoding tests.

The learning check (held-out optimality of ILQL decoding above the behaviour data's) needs ~300
steps to be stable and is marked ``extended`` (~40 s). Measured (benchmarks/bench_ilql_randomwalks.py,
conf/gpt_ilql.yaml's recipe): held-out optimality at beta = 100 is 0.95 after 100 steps, 0.87 at
200, 1.0 at every evaluation from 300 to 1000 steps, against the behaviour data's 0.74 (0.71 on the
held-out start nodes); beta = 0 (the LM head alone) 0.46 -> 0.65, beta = 1 0.56 -> 0.79. Between
100 and 200 steps the beta = 100 figure still swings (0.43 - 1.0 across seeds and alpha), hence
the extended test's 400 steps.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from nemo_rlhf.config import ConfigError, ILQLStageConfig, parse_config

MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, max_position_embeddings=32)
REWARD = [{"_target_": "nemo_rlhf.data.randomwalks.RandomWalkReward"}]
STEPS = 40


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from nemo_rlhf.data.randomwalks import write_task
    from nemo_rlhf.data.tokenizer import tokenizer_from_config

    out = tmp_path_factory.mktemp("randomwalks_ilql")
    summary = write_task(out)  # the benchmark's task: its offline.jsonl is the same 1,000 walks
    tok = tokenizer_from_config({"type": "tokenizer_json", "path": str(out / "tokenizer.json")})
    return out, tok, summary


def node(task_dir, run_dir, **over):
    n = {"run_dir": str(run_dir), "model": MODEL, "init_from": None,
         "tokenizer": {"type": "tokenizer_json", "path": str(task_dir / "tokenizer.json")},
         "data": {"dataset": "jsonl", "data_dir": str(task_dir), "files": ["offline.jsonl"],
                  "heldout_files": ["heldout.jsonl"], "max_seq_len": 16, "max_prompt_len": 4},
         "batch": {"global_batch_size": 100, "micro_batch_size": 50},
         "optim": {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 1e-6},
         "trainer": {"max_steps": 4, "val_check_interval": None, "log_every_n_steps": 1, "limit_val_batches": None},
         "checkpoint": {"every_n_steps": 0, "resume": False}, "reward": {"functions": REWARD},
         "ilql": {"val_samples_per_prompt": 2, "eval_betas": [0.0]}}
    for section, values in over.items():
        n[section] = {**n.get(section, {}), **values} if isinstance(values, dict) else values
    return n


def heads_state(model):
    return {k: v.detach().clone() for k, v in model.heads.state_dict().items() if torch.is_tensor(v)}


@pytest.fixture(scope="module")
def trained(megatron_world, task, tmp_path_factory):
    """An ILQLTrainer (from_models) after STEPS steps; its per-step metrics and, for the first 12
    steps, the heads' state before and after: ``(trainer, metrics, polyak_checks)``."""
    from nemo_rlhf.algorithms.ilql import ILQLTrainer
    from nemo_rlhf.data import PromptDataset
    from nemo_rlhf.data.offline import collate_offline
    from nemo_rlhf.data.tasks import load_prompt_rows
    from nemo_rlhf.models.ilql import GPTILQLModel
    from nemo_rlhf.parallel.state import seed_everything

    task_dir, tok, _ = task
    cfg = parse_config(ILQLStageConfig, node(task_dir, tmp_path_factory.mktemp("ilql_steps"),
                                             ilql={"steps_for_target_q_sync": 3, "alpha": 0.25}))
    seed_everything(7)
    model = GPTILQLModel(MODEL, dict(lr=1e-3, betas=[0.9, 0.95]), tok.vocab_size, 100, tok.eos_id, tok.pad_id)
    train_ds, behaviour, rows = ILQLTrainer.offline_dataset(cfg, tok)
    held = PromptDataset([r.prompt for r in load_prompt_rows(task_dir / "heldout.jsonl")[0]], tok, 4)
    trainer = ILQLTrainer.from_models(cfg, model, tok, train_ds, held)
    trainer.behaviour = {**behaviour, **trainer.behaviour_on_heldout(rows)}
    g = torch.Generator().manual_seed(0)
    metrics, checks = [], []
    for step in range(STEPS):
        idx = torch.randint(len(train_ds), (100,), generator=g).tolist()
        batch = collate_offline([train_ds[i] for i in idx], tok.pad_id)
        watch = step < 12  # the Polyak checks: four sync periods
        before = heads_state(model) if watch else None
        m = trainer.train_step(batch)
        trainer.step += 1
        metrics.append(m)
        if watch:
            checks.append((step, m["target_synced"], before, heads_state(model)))
    return trainer, metrics, checks


def test_losses_fall_and_are_finite(trained):
    _, metrics, _ = trained
    for key in ("loss", "loss_q", "loss_v", "loss_cql", "loss_awac", "q_mean", "v_mean", "grad_norm"):
        assert all(math.isfinite(m[key]) for m in metrics), key
    first = lambda k: sum(m[k] for m in metrics[:3]) / 3  # noqa: E731
    last = lambda k: sum(m[k] for m in metrics[-3:]) / 3  # noqa: E731
    assert last("loss") < 0.8 * first("loss"), (first("loss"), last("loss"))
    assert last("loss_awac") < first("loss_awac") - 0.5  # the LM head learns the walks
    assert last("loss_cql") < first("loss_cql")
    assert all(m["skipped"] == 0.0 for m in metrics)


def test_target_heads_move_by_polyak_exactly_on_sync_steps(trained):
    """Every 3rd step (steps_for_target_q_sync=3): target <- 0.25 * online + 0.75 * target, with the
    online head after that step's update; other steps leave the targets bitwise unchanged."""
    _, _, checks = trained
    synced = [step for step, s, _, _ in checks if s]
    assert synced == [2, 5, 8, 11]
    for step, s, before, after in checks:
        for name in after:
            if not name.startswith("target_"):
                continue
            online = after[name[len("target_"):]]
            if s:
                assert torch.equal(after[name], 0.25 * online + 0.75 * before[name]), (step, name)
                assert not torch.equal(after[name], before[name])
            else:
                assert torch.equal(after[name], before[name]), (step, name)
    # the targets lag the online heads (alpha < 1): not equal after training
    last = checks[-1][3]
    assert not torch.equal(last["target_q1.fc2.weight"], last["q1.fc2.weight"])


def test_target_heads_get_no_gradient_buffer_or_optimizer_state(trained):
    trainer, _, _ = trained
    heads = trainer.model.heads
    assert all(not p.requires_grad for h in heads.target_heads() for p in h.parameters())
    assert all(p.requires_grad for h in heads.q_heads() + [heads.v] for p in h.parameters())
    ddp_params = {id(p) for p in trainer.model.model.parameters() if p.requires_grad}
    assert not any(id(p) in ddp_params for h in heads.target_heads() for p in h.parameters())


def test_target_heads_give_the_full_q_at_the_taken_actions(trained):
    """The loss reads the target heads' Q only at the taken actions (``at_actions``, no vocabulary-wide
    matmul): it equals the vocabulary-wide Q gathered there, for trlX's heads and the LM-head ones."""
    trainer, _, _ = trained
    torch.manual_seed(3)
    hidden = torch.randn(7, 3, MODEL["hidden_size"])
    actions = torch.randint(0, trainer.model.gpt.vocab_size, (3, 6))
    heads = trainer.model.heads
    for head in heads.target_heads() + heads.q_heads():
        full = head(hidden).transpose(0, 1)[:, :6].float()
        got = head.at_actions(hidden.transpose(0, 1), actions)  # batch-first, as ILQLHeads.forward calls it
        torch.testing.assert_close(got, full.gather(-1, actions.unsqueeze(-1))[..., 0])
    _, tqs, _ = heads(hidden, actions)
    assert all(t.shape == (3, 6) and not t.requires_grad for t in tqs)


def test_beta_zero_decoding_equals_the_plain_policy(trained, task):
    """beta = 0: log_softmax(logits) + 0 samples what the policy's own generate samples (same seed,
    top-k and temperature); a large beta changes the walks."""
    from nemo_rlhf.generation.sampling import SamplingParams

    trainer, _, _ = trained
    model = trainer.model
    b = trainer.collate([trainer.val_ds[i] for i in range(len(trainer.val_ds))])
    prompts, lengths = b["prompts"].repeat_interleave(8, 0), b["prompt_lengths"].repeat_interleave(8, 0)
    for params in (SamplingParams(max_new_tokens=9, top_k=10, seed=5), SamplingParams(max_new_tokens=9, greedy=True)):
        plain = model.generate(prompts, lengths, params)
        ilql = model.generate_ilql(prompts, lengths, params, beta=0.0)
        assert torch.equal(plain.tokens, ilql.tokens) and torch.equal(plain.lengths, ilql.lengths)
    shifted = model.generate_ilql(prompts, lengths, SamplingParams(max_new_tokens=9, top_k=10, seed=5), beta=100.0)
    assert not torch.equal(shifted.tokens, model.generate(prompts, lengths,
                                                          SamplingParams(max_new_tokens=9, top_k=10, seed=5)).tokens)


@pytest.mark.extended
def test_ilql_from_random_init_beats_the_behaviour_data_on_heldout_starts(megatron_world, task, tmp_path):
    """The learning check, through the whole stage (run_ilql): 400 offline steps from the tiny GPT's
    random init (conf/gpt_ilql.yaml's recipe); decoding with beta = 100 on the held-out start nodes
    (16 walks each) reaches mean optimality >= 0.9, above the behaviour data's walks overall and from
    those start nodes; the LM head alone (beta = 0) is reported beside it."""
    from nemo_rlhf.algorithms.ilql import run_ilql

    task_dir, _, _ = task
    res = run_ilql(node(task_dir, tmp_path, batch={"global_batch_size": 100, "micro_batch_size": 100},
                        trainer={"max_steps": 400},
                        ilql={"beta": 100.0, "eval_betas": [0.0], "val_samples_per_prompt": 16}))
    behaviour, after = res["behaviour_reward"], res["heldout_after"]
    assert after["reward"] >= 0.9, res
    assert after["reward"] > behaviour["mean"] + 0.05 and after["reward"] > behaviour["mean_heldout_prompts"] + 0.05
    assert res["heldout_before"]["reward"] < 0.2  # the random init does not walk the graph


def test_evaluate_reports_rewards_at_each_beta(trained, tmp_path):
    trainer, _, _ = trained
    trainer.run_dir = tmp_path
    ev = trainer.evaluate()
    for key in ("reward", "reward_RandomWalkReward", "response_length", "reward_beta0"):
        assert key in ev and math.isfinite(ev[key]), (key, ev)
    assert 0.0 <= ev["reward"] <= 1.0 and 0.0 <= ev["reward_beta0"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "ilql_samples.jsonl").read_text().splitlines()]
    assert rows and {"prompt", "response", "reward", "beta", "step"} <= set(rows[0])


def test_nonfinite_or_missing_reward_is_an_error_naming_file_and_line(task, tmp_path):
    from nemo_rlhf.algorithms.ilql import ILQLTrainer
    from nemo_rlhf.data.hh import DataFormatError
    from nemo_rlhf.data.offline import load_offline_rows

    task_dir, tok, _ = task
    good = '{"prompt": "c", "response": " h a", "reward": 0.5}\n'
    cases = {r"not finite \(nan\)": '{"prompt": "c", "response": " a", "reward": NaN}\n',
             r"not finite \(-inf\)": '{"prompt": "c", "response": " a", "reward": -Infinity}\n',
             "'reward' missing": '{"prompt": "c", "response": " a"}\n',
             "expected a number": '{"prompt": "c", "response": " a", "reward": "high"}\n'}
    for i, (what, bad) in enumerate(cases.items()):
        path = tmp_path / f"offline_{i}.jsonl"
        path.write_text(good + "\n" + good + bad + good)  # the bad row is on line 4 (blank line 2)
        with pytest.raises(DataFormatError, match=rf"{path}:4: bad_reward: .*{what}") as err:
            load_offline_rows(path, on_error="skip")  # even when other bad rows would be skipped
        assert err.value.line == 4 and err.value.path == str(path)
    # through the stage's data path, with data.files naming the file
    cfg = parse_config(ILQLStageConfig, node(task_dir, tmp_path, data={"data_dir": str(tmp_path),
                                                                       "files": [path.name]}))
    with pytest.raises(DataFormatError, match=rf"{path.name}:4: bad_reward"):
        ILQLTrainer.offline_dataset(cfg, tok)
    # other bad rows follow data.on_error
    path.write_text(good + '{"prompt": "c"}\n' + good)
    rows, stats = load_offline_rows(path, on_error="skip")
    assert len(rows) == 2 and stats.skipped["missing_field"] == 1 and rows[0].reward == 0.5


def test_offline_dataset_standardises_rewards_and_appends_eos(task, tmp_path):
    from nemo_rlhf.algorithms.ilql import ILQLTrainer

    task_dir, tok, summary = task
    cfg = parse_config(ILQLStageConfig, node(task_dir, tmp_path))
    ds, behaviour, rows = ILQLTrainer.offline_dataset(cfg, tok)
    assert len(ds) == len(rows) == summary["offline_walks"]
    assert math.isclose(behaviour["mean"], summary["offline_mean_optimality"], rel_tol=1e-9)
    rewards = torch.tensor([s[2] for s in ds.samples], dtype=torch.float64)
    assert abs(rewards.mean().item()) < 1e-6 and math.isclose(rewards.std().item(), 1.0, rel_tol=1e-5)
    item = ds[0]
    assert item["tokens"][-1].item() == tok.eos_id and item["prompt_length"].item() == 1


def test_resume_equals_uninterrupted_bitwise(megatron_world, task, tmp_path):
    """4 steps in one go vs 2 steps, stop, the same command with max_steps=4 (a target sync at step 3,
    after the resume): same per-step metrics, held-out results and bitwise equal weights, target
    heads included."""
    from nemo_rlhf.algorithms.ilql import run_ilql
    from nemo_rlhf.checkpoint.weights import load_weights
    from nemo_rlhf.models.ilql import GPTILQLModel

    task_dir, tok, _ = task
    over = {"checkpoint": {"every_n_steps": 2, "resume": True}, "ilql": {"steps_for_target_q_sync": 3},
            "batch": {"global_batch_size": 32, "micro_batch_size": 16}}
    steps = lambda n: {"max_steps": n}  # noqa: E731
    full, part = tmp_path / "full", tmp_path / "part"
    run_ilql(node(task_dir, full, trainer=steps(4), **over))
    run_ilql(node(task_dir, part, trainer=steps(2), **over))
    res = run_ilql(node(task_dir, part, trainer=steps(4), **over))
    assert res["steps"] == 4

    def train_rows(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: {k: v for k, v in r.items() if k.startswith("ilql/")} for r in rows if "ilql/loss" in r}

    got, want = train_rows(part), train_rows(full)
    assert sorted(want) == [0, 1, 2, 3] and got == want
    assert want[2]["ilql/target_synced"] == 1.0
    assert json.loads((full / "ilql_result.json").read_text())["heldout_after"] == res["heldout_after"]

    def load(run):
        model = GPTILQLModel(MODEL, None, tok.vocab_size, 8, tok.eos_id, tok.pad_id)
        load_weights(model, run / "ilql_weights")
        return {k: v.clone() for k, v in model.gpt.state_dict().items() if torch.is_tensor(v)}

    a, b = load(full), load(part)
    assert any(k.startswith("ilql_heads.target_q1.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_errors_and_yaml_composes(task, tmp_path):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from nemo_rlhf.config import load_stage_config, register_configs

    task_dir, _, _ = task
    with pytest.raises(ConfigError, match=r"ilql.tau must be in \(0, 1\)"):
        parse_config(ILQLStageConfig, node(task_dir, tmp_path, ilql={"tau": 1.0}))
    with pytest.raises(ConfigError, match="ilql.alpha"):
        parse_config(ILQLStageConfig, node(task_dir, tmp_path, ilql={"alpha": 1.5}))
    with pytest.raises(ConfigError, match="data.dataset=jsonl"):
        parse_config(ILQLStageConfig, node(task_dir, tmp_path, data={"dataset": "hh"}))
    with pytest.raises(ConfigError, match="data.heldout_files"):
        parse_config(ILQLStageConfig, node(task_dir, tmp_path, data={"heldout_files": []}))
    with pytest.raises(ConfigError, match="reward.functions"):
        parse_config(ILQLStageConfig, node(task_dir, tmp_path, reward={"functions": []}))
    register_configs()
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        n = compose("gpt_ilql", [f"data.data_dir={task_dir}", f"tokenizer.path={task_dir / 'tokenizer.json'}",
                                 "ilql.beta=1"])
    cfg = load_stage_config(ILQLStageConfig, n)
    assert cfg.ilql.beta == 1.0 and cfg.ilql.tau == 0.8 and cfg.ilql.sampling.top_k == 10
    assert cfg.init_from is None and cfg.data.files == ["offline.jsonl"]


def test_sft_weights_load_into_the_trunk_and_heads_start_fresh(megatron_world, task, tmp_path):
    """init_from = a plain policy's weights (e.g. SFT): trunk and LM head load, the ILQL heads keep
    their init (the checkpoint has none); ILQL weights load back into a plain policy."""
    from nemo_rlhf.checkpoint.weights import load_weights, save_model_weights
    from nemo_rlhf.models.ilql import HEADS_PREFIX, GPTILQLModel
    from nemo_rlhf.models.policy import GPTPolicyModel
    from nemo_rlhf.parallel.state import seed_everything

    _, tok, _ = task
    seed_everything(11)
    sft = GPTPolicyModel(MODEL, None, tok.vocab_size, 8, tok.eos_id, tok.pad_id)
    save_model_weights(sft.gpt, tmp_path / "sft")
    seed_everything(12)
    model = GPTILQLModel(MODEL, dict(lr=1e-3), tok.vocab_size, 8, tok.eos_id, tok.pad_id)
    heads = heads_state(model)
    skipped = load_weights(model, tmp_path / "sft", skip_prefixes=(HEADS_PREFIX,))
    assert skipped and all(name.startswith(HEADS_PREFIX) for name in skipped)
    mine = model.gpt.state_dict()
    for k, v in sft.gpt.state_dict().items():
        if torch.is_tensor(v) and not k.endswith("_extra_state"):
            assert torch.equal(mine[k], v), k
    assert all(torch.equal(heads[k], v) for k, v in heads_state(model).items())
    save_model_weights(model.gpt, tmp_path / "ilql")
    plain = GPTPolicyModel(MODEL, None, tok.vocab_size, 8, tok.eos_id, tok.pad_id)
    load_weights(plain, tmp_path / "ilql")
    theirs = plain.gpt.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in model.gpt.state_dict().items()
               if torch.is_tensor(v) and not k.startswith(HEADS_PREFIX) and not k.endswith("_extra_state"))


def test_one_q_head_without_two_qs(megatron_world, task, tmp_path):
    """ilql.two_qs=false: one Q head and one target (no q2 parameters); a step trains and decodes."""
    from nemo_rlhf.algorithms.ilql import ILQLTrainer
    from nemo_rlhf.data import PromptDataset
    from nemo_rlhf.data.offline import collate_offline
    from nemo_rlhf.generation.sampling import SamplingParams
    from nemo_rlhf.models.ilql import GPTILQLModel

    task_dir, tok, _ = task
    cfg = parse_config(ILQLStageConfig, node(task_dir, tmp_path, ilql={"two_qs": False, "steps_for_target_q_sync": 1,
                                                                       "alpha": 1.0}))
    model = GPTILQLModel(MODEL, dict(lr=1e-3), tok.vocab_size, 20, tok.eos_id, tok.pad_id, two_qs=False)
    assert not any(".q2." in n or "target_q2" in n for n, _ in model.gpt.named_parameters())
    train_ds, _, _ = ILQLTrainer.offline_dataset(cfg, tok)
    trainer = ILQLTrainer.from_models(cfg, model, tok, train_ds, PromptDataset(["c", "h"], tok, 4))
    m = trainer.train_step(collate_offline([train_ds[i] for i in range(20)], tok.pad_id))
    assert math.isfinite(m["loss"]) and m["target_synced"] == 1.0
    assert torch.equal(model.heads.target_q1.fc2.weight, model.heads.q1.fc2.weight)  # alpha = 1 copies
    out = model.generate_ilql(torch.tensor([[2], [7]]), torch.tensor([1, 1]), SamplingParams(max_new_tokens=4), 1.0)
    assert out.tokens.shape[0] == 2


def test_lm_head_q_heads_read_the_lm_heads_matrix(megatron_world, task, tmp_path):
    """ilql.q_head=lm_head: Q over the vocabulary is ``W_lm g(h)`` (the LM head's own output matrix,
    not a parameter of the heads, so not in their state dict; Q's gradient does not reach it), with
    an ``H -> 2H -> H`` MLP of its own; a step trains it, a sync copies it, decoding runs; a bad
    ``q_head`` is a config error naming the field; ``ilql.q_zero_start=false`` starts Q random."""
    from nemo_rlhf.algorithms.ilql import ILQLTrainer
    from nemo_rlhf.data import PromptDataset
    from nemo_rlhf.data.offline import collate_offline
    from nemo_rlhf.generation.sampling import SamplingParams
    from nemo_rlhf.models.ilql import GPTILQLModel

    task_dir, tok, _ = task
    with pytest.raises(ConfigError, match="q_head"):
        parse_config(ILQLStageConfig, node(task_dir, tmp_path, ilql={"q_head": "linear"}))
    cfg = parse_config(ILQLStageConfig, node(task_dir, tmp_path, ilql={"q_head": "lm_head", "two_qs": False,
                                                                       "steps_for_target_q_sync": 1, "alpha": 1.0}))
    model = GPTILQLModel(MODEL, dict(lr=1e-3), tok.vocab_size, 20, tok.eos_id, tok.pad_id, two_qs=False,
                         q_head="lm_head")
    heads = model.heads
    h = MODEL["hidden_size"]
    assert heads.q1.fc2.weight.shape == (h, 2 * h)  # H -> 2H -> H: no vocabulary-wide matrix of its own
    assert sorted(n for n, _ in heads.q1.named_parameters()) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    w_lm = model.gpt.shared_embedding_or_output_weight()
    hidden = torch.randn(5, 2, h)
    assert not heads.q1(hidden).any() and not heads.target_q1(hidden).any()  # fc2 starts at 0: Q = 0
    with torch.no_grad():  # a non-zero fc2 for the gradient check, put back after it
        heads.q1.fc2.weight.normal_()
    hidden.requires_grad_(True)
    heads.q1(hidden).square().sum().backward()
    assert hidden.grad.abs().sum() > 0 and (w_lm.grad is None or not w_lm.grad.any())  # W_lm detached
    model.gpt.zero_grad(set_to_none=True)
    hidden = hidden.detach()
    with torch.no_grad():
        heads.q1.fc2.weight.zero_()
    train_ds, _, _ = ILQLTrainer.offline_dataset(cfg, tok)
    trainer = ILQLTrainer.from_models(cfg, model, tok, train_ds, PromptDataset(["c", "h"], tok, 4))
    m = trainer.train_step(collate_offline([train_ds[i] for i in range(20)], tok.pad_id))
    assert math.isfinite(m["loss"]) and m["target_synced"] == 1.0
    assert heads.q1.fc2.weight.abs().sum() > 0  # the Q head trains
    g = heads.q1.fc2(torch.relu(heads.q1.fc1(hidden)[0]))[0]
    torch.testing.assert_close(heads.q1(hidden), g @ w_lm.t())
    ids = torch.randint(0, w_lm.shape[0], (2, 5))
    full = (g @ w_lm.t()).transpose(0, 1)  # [b, S, V]
    got = heads.q1.at_actions(hidden.transpose(0, 1), ids)
    torch.testing.assert_close(got, full.gather(-1, ids[..., None])[..., 0])
    assert torch.equal(heads.target_q1.fc2.weight, heads.q1.fc2.weight)  # alpha = 1 copies
    out = model.generate_ilql(torch.tensor([[2], [7]]), torch.tensor([1, 1]), SamplingParams(max_new_tokens=4), 1.0)
    assert out.tokens.shape[0] == 2
    # ilql.q_zero_start=false: fc2 starts random (trlX's heads), the target a copy of it
    cfg = parse_config(ILQLStageConfig, node(task_dir, tmp_path, ilql={"q_head": "lm_head", "q_zero_start": False}))
    assert cfg.ilql.q_zero_start is False
    random_start = GPTILQLModel(MODEL, dict(lr=1e-3), tok.vocab_size, 20, tok.eos_id, tok.pad_id, two_qs=False,
                                q_head="lm_head", q_zero_start=False).heads
    assert random_start.q1(hidden).abs().sum() > 0
    torch.testing.assert_close(random_start.target_q1(hidden), random_start.q1(hidden), rtol=0, atol=0)


def test_trained_policy_exports_to_hf_without_its_heads(megatron_world, task, tmp_path):
    """Issue 14 §4: an ILQL checkpoint exports like the rest (``export_hf``): the policy trunk and LM
    head, the Q / target-Q / V heads left out; re-imported, it computes the trained model's
    log-probs (a Llama-shaped tiny model, the architecture the HF exporter writes)."""
    from nemo_rlhf.algorithms.ilql import ILQLTrainer
    from nemo_rlhf.checkpoint.hf import export_hf, import_hf
    from nemo_rlhf.checkpoint.weights import load_weights, save_model_weights
    from nemo_rlhf.data.offline import collate_offline
    from nemo_rlhf.models.ilql import GPTILQLModel
    from nemo_rlhf.models.policy import GPTPolicyModel

    task_dir, tok, _ = task
    llama = dict(MODEL, normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
                 num_query_groups=2, vocab_size=tok.vocab_size)
    cfg = parse_config(ILQLStageConfig, node(task_dir, tmp_path / "run", model=llama))
    model = GPTILQLModel(llama, dict(lr=1e-2), tok.vocab_size, 100, tok.eos_id, tok.pad_id)
    train_ds, _, _ = ILQLTrainer.offline_dataset(cfg, tok)
    trainer = ILQLTrainer.from_models(cfg, model, tok, train_ds, None)
    trainer.train_step(collate_offline([train_ds[i] for i in range(100)], tok.pad_id))  # heads and trunk move
    save_model_weights(model.gpt, tmp_path / "ilql")
    assert any("ilql_heads" in k for k in model.gpt.state_dict())
    export_hf(tmp_path / "ilql", llama, tmp_path / "hf", arch="llama", role="policy")
    imported = import_hf(tmp_path / "hf", tmp_path / "back")
    assert imported["num_layers"] == 2
    plain = GPTPolicyModel(imported, None, tok.vocab_size, 100, tok.eos_id, tok.pad_id)
    load_weights(plain, tmp_path / "back" / "weights")
    tokens = collate_offline([train_ds[i] for i in range(8)], tok.pad_id)["tokens"]
    assert (plain.logprobs(tokens) - model.logprobs(tokens)).abs().max().item() < 1e-5
