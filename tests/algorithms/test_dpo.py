"""nemo_rlhf/algorithms/dpo.py: DPO-family training on HH pairs from the shared tiny SFT run (issue 14 §1).

In-process (one gloo rank, TP = PP = DP = 1), the launchers' smallest model (1 layer, H = 32) and
its tokenizer from ``tests/conftest.py``'s ``sft_run``, 160 HH rows. Checks: the policy starts equal
to the reference (loss ln 2, zero rewards); DPO steps on a fixed batch lower its loss and raise its
implicit-reward margin; ``dpo.reference=precomputed`` gives the live reference's losses step by step
and on the held-out pairs, with the reference freed; ``dpo.reference=hydra`` (the top layer copied,
run inside the policy's forward) gives the full copy's; SimPO builds no reference; a run stopped and
resumed equals an uninterrupted one bitwise; config errors.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from stage_runs import MODEL_CFG, VOCAB

from nemo_rlhf.config import ConfigError, DPOStageConfig, parse_config

DATA = {"max_rows": 160, "heldout_fraction": 0.2, "max_seq_len": 128, "max_prompt_len": 96}


def dpo_node(sft_run, run_dir, dpo=None, **over):
    node = {"run_dir": str(run_dir), "init_from": str(sft_run / "sft_weights"),
            "tokenizer": {"type": "tokenizer_json", "path": str(sft_run / "tokenizer.json")},
            "model": MODEL_CFG, "data": DATA, "batch": {"global_batch_size": 8, "micro_batch_size": 4},
            "optim": {"lr": 1e-3}, "dpo": dpo or {},
            "trainer": {"max_steps": 4, "val_check_interval": None, "log_every_n_steps": 1},
            "checkpoint": {"every_n_steps": 0, "resume": False}}
    for section, values in over.items():
        node[section] = {**node.get(section, {}), **values} if isinstance(values, dict) else values
    return node


def built(sft_run, tmp_path, **dpo):
    """A set-up DPOTrainer with the policy loaded from the SFT weights (what ``run`` does before fitting)."""
    from nemo_rlhf.algorithms.base import heldout_loader
    from nemo_rlhf.algorithms.dpo import DPOTrainer
    from nemo_rlhf.checkpoint.weights import load_weights

    trainer = DPOTrainer(parse_config(DPOStageConfig, dpo_node(sft_run, tmp_path, dpo)))
    trainer.setup()
    load_weights(trainer.model, trainer.cfg.init_from)
    trainer.val_loader = heldout_loader(trainer.val_ds, 8, trainer.collate, 0)
    return trainer


@pytest.fixture(scope="module")
def live_and_precomputed(megatron_world, sft_run, tmp_path_factory):
    """Two trainers from the same SFT weights, live and precomputed reference, 6 steps each on one
    fixed batch of 8 pairs: ``(live, precomputed, live metrics, precomputed metrics)``."""
    tmp = tmp_path_factory.mktemp("dpo")
    live = built(sft_run, tmp / "live")
    pre = built(sft_run, tmp / "pre", reference="precomputed")
    idx = list(range(8))
    batch_live = live.collate([live.train_ds[i] for i in idx])
    batch_pre = pre.collate([pre.train_ds[i] for i in idx])
    m_live = [live.train_step(batch_live) for _ in range(6)]
    m_pre = [pre.train_step(batch_pre) for _ in range(6)]
    return live, pre, m_live, m_pre


def test_first_step_starts_at_ln2_and_fixed_batch_loss_falls(live_and_precomputed):
    _, _, m, _ = live_and_precomputed
    # policy == reference at the start: Δ = 0, loss = -log σ(0) = ln 2, rewards 0
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert m[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    losses = [x["loss"] for x in m]
    margins = [x["rewards/margins"] for x in m]
    assert losses[-1] < losses[0] - 0.05, losses
    assert margins[-1] > margins[0] + 0.1, margins
    assert m[-1]["rewards/accuracies"] > 0.5
    assert all(x["skipped"] == 0.0 for x in m)


def test_precomputed_reference_equals_live(live_and_precomputed):
    live, pre, m_live, m_pre = live_and_precomputed
    assert live.reference is not None and pre.reference is None  # freed after precomputing
    assert len(pre.train_ds) == len(live.train_ds) and "ref_logps" in pre.collate([pre.train_ds[0]])
    for a, b in zip(m_live, m_pre):
        for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert b[k] == pytest.approx(a[k], abs=1e-5), (k, a[k], b[k])
    # held-out: the live reference scored per batch vs the values computed once at start
    ev_live, ev_pre = live.evaluate(), pre.evaluate()
    assert ev_live.keys() == ev_pre.keys() and ev_live["pairs"] == ev_pre["pairs"] >= 16
    for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert ev_pre[k] == pytest.approx(ev_live[k], abs=1e-5), k
    assert ev_live["rewards/chosen"] != 0.0  # the policy moved, so the reference matters


def test_hydra_reference_equals_full(megatron_world, sft_run, tmp_path):
    """dpo.reference=hydra (the top layer copied, run on the policy's own frozen trunk inside its
    training forward) gives the full frozen copy's losses step by step and on the held-out pairs,
    with a branch smaller than a whole model."""
    from nemo_rlhf.algorithms.base import heldout_loader
    from nemo_rlhf.algorithms.dpo import DPOTrainer
    from nemo_rlhf.checkpoint.weights import load_weights
    from nemo_rlhf.models.hydra import HydraReference

    def make(run_dir, reference):
        node = dpo_node(sft_run, run_dir, {"reference": reference}, model={**MODEL_CFG, "num_layers_unfrozen": 1})
        trainer = DPOTrainer(parse_config(DPOStageConfig, node))
        trainer.setup()
        load_weights(trainer.model, trainer.cfg.init_from)
        trainer.val_loader = heldout_loader(trainer.val_ds, 8, trainer.collate, 0)
        return trainer

    full, hydra = make(tmp_path / "full", "full"), make(tmp_path / "hydra", "hydra")
    assert isinstance(hydra.reference, HydraReference)
    whole = sum(p.numel() * p.element_size() for p in full.reference.gpt.parameters())
    assert 0 < hydra.reference.parameter_bytes() < whole
    batch_full = full.collate([full.train_ds[i] for i in range(8)])
    batch_hydra = hydra.collate([hydra.train_ds[i] for i in range(8)])
    assert "ref_logps" not in hydra._with_reference(batch_hydra)  # no separate reference forward
    # the branch's summed response log-probs (what dpo.reference=precomputed would store) = the copy's
    torch.testing.assert_close(hydra.reference_logps(batch_hydra), full.reference_logps(batch_full),
                               rtol=1e-6, atol=1e-5)
    m_full = [full.train_step(batch_full) for _ in range(4)]
    m_hydra = [hydra.train_step(batch_hydra) for _ in range(4)]
    assert m_hydra[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert m_full[-1]["rewards/margins"] > m_full[0]["rewards/margins"] + 0.05  # the policy moved
    for a, b in zip(m_full, m_hydra):
        for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert b[k] == pytest.approx(a[k], abs=1e-5), (k, a[k], b[k])
    ev_full, ev_hydra = full.evaluate(), hydra.evaluate()
    assert ev_full["rewards/chosen"] != 0.0
    for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "pairs"):
        assert ev_hydra[k] == pytest.approx(ev_full[k], abs=1e-5), k
    with pytest.raises(RuntimeError, match=r"no actor forward recorded"):
        hydra.reference.captured_logprobs(batch_hydra["tokens"])  # outside capture()


def test_response_only_logits_equal_the_full_logits(megatron_world, sft_run, tmp_path):
    """The LM head run at the response positions only (``logit_positions``: what DPO's steps use)
    gives the log-probs, the losses and the updates of the full ``[b, S, V]`` logits, for the
    policy and the hydra reference branch; with fewer positions than S - 1."""
    from nemo_rlhf.algorithms.base import heldout_loader
    from nemo_rlhf.algorithms.dpo import DPOTrainer, response_logps
    from nemo_rlhf.algorithms.reward_model import pair_microbatches
    from nemo_rlhf.checkpoint.weights import load_weights

    def make(run_dir):
        node = dpo_node(sft_run, run_dir, {"reference": "hydra"}, model={**MODEL_CFG, "num_layers_unfrozen": 1})
        trainer = DPOTrainer(parse_config(DPOStageConfig, node))
        trainer.setup()
        load_weights(trainer.model, trainer.cfg.init_from)
        trainer.val_loader = heldout_loader(trainer.val_ds, 8, trainer.collate, 0)
        return trainer

    windowed, full = make(tmp_path / "windowed"), make(tmp_path / "full")
    full.response_only = lambda mbs: mbs  # the [b, S, V] path
    batch = windowed.collate([windowed.train_ds[i] for i in range(8)])
    mbs = windowed.response_only(pair_microbatches(batch, 4))
    positions, mask = mbs[0]["logit_positions"], mbs[0]["response_mask"]
    assert positions.shape[1] < batch["tokens"].shape[1] - 1  # the prompts are left out
    assert torch.equal(mask.sum(1), (mbs[0]["lengths"] - mbs[0]["prompt_lengths"]).float())
    # per-sequence response log-probs: positions vs all positions, policy and the full reference
    model = windowed.model
    sums = model.response_logps(batch["tokens"], batch["prompt_lengths"], batch["lengths"])
    want = response_logps(model.logprobs(batch["tokens"]), batch["prompt_lengths"], batch["lengths"])[0]
    torch.testing.assert_close(sums, want, rtol=1e-6, atol=1e-5)  # float32 sums of ~-270 nats
    for _ in range(3):
        a, b = windowed.train_step(batch), full.train_step(batch)
        for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-5), (k, a[k], b[k])
    assert a["rewards/margins"] != 0.0
    for (name, p), q in zip(windowed.model.gpt.named_parameters(), full.model.gpt.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=name)
    ev_w, ev_f = windowed.evaluate(limit=1), full.evaluate(limit=1)
    for k in ("loss", "rewards/margins", "rewards/accuracies"):
        assert ev_w[k] == pytest.approx(ev_f[k], abs=1e-5), k


def test_simpo_builds_no_reference(megatron_world, sft_run, tmp_path):
    trainer = built(sft_run, tmp_path, loss_type="simpo", beta=2.0, simpo_gamma=0.5)
    assert trainer.reference is None and trainer.cfg.dpo.effective_reference is None
    batch = trainer.collate([trainer.train_ds[i] for i in range(8)])
    assert "ref_logps" not in batch
    m = trainer.train_step(batch)
    assert math.isfinite(m["loss"]) and m["loss"] > 0.0 and m["skipped"] == 0.0
    # SimPO's implicit reward is β x the average log-prob (negative: log-probs are)
    assert m["rewards/chosen"] < 0.0


def test_resume_equals_uninterrupted_bitwise(megatron_world, sft_run, tmp_path):
    """4 steps in one go vs 2 steps, stop, the same run with max_steps=4: same per-step metrics,
    same held-out result, bitwise equal weights."""
    from nemo_rlhf.algorithms.dpo import run_dpo
    from nemo_rlhf.checkpoint.weights import load_weights
    from nemo_rlhf.models.policy import GPTPolicyModel

    full, part = tmp_path / "full", tmp_path / "part"
    ck = {"every_n_steps": 0, "resume": True}  # a checkpoint at each run's end (step 2, then 4)
    res_full = run_dpo(dpo_node(sft_run, full, trainer={"max_steps": 4}, checkpoint=ck))
    run_dpo(dpo_node(sft_run, part, trainer={"max_steps": 2}, checkpoint=ck))
    res = run_dpo(dpo_node(sft_run, part, trainer={"max_steps": 4}, checkpoint=ck))
    assert res["steps"] == 4 and res["reference"] == "full" and res["loss_type"] == "sigmoid"

    def train_rows(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: {k: v for k, v in r.items() if k.startswith("train/")} for r in rows if "train/loss" in r}

    got, want = train_rows(part), train_rows(full)
    assert sorted(want) == [0, 1, 2, 3] and got == want
    assert "train/rewards/accuracies" in want[3]
    assert res["val_after"] == res_full["val_after"]
    assert json.loads((full / "dpo_result.json").read_text())["val_after"] == res_full["val_after"]

    def load(run):
        model = GPTPolicyModel(MODEL_CFG, None, VOCAB, 4, 0, 0)
        load_weights(model, run / "dpo_weights")
        return {k: v.clone() for k, v in model.gpt.state_dict().items() if torch.is_tensor(v)}

    a, b = load(full), load(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dpo,match", [
    ({"loss_type": "kto"}, r"dpo.loss_type must be one of \['sigmoid', 'robust', 'ipo', 'rpo', 'simpo'\]"),
    ({"label_smoothing": 0.5}, r"dpo.label_smoothing must be in \[0, 0.5\), got 0.5"),
    ({"label_smoothing": -0.1}, r"dpo.label_smoothing must be in \[0, 0.5\)"),
    ({"beta": 0.0}, r"dpo.beta must be > 0"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, r"dpo.label_smoothing=0.1 has no meaning for dpo.loss_type=ipo"),
    ({"loss_type": "simpo", "reference": "precomputed"}, r"dpo.reference=precomputed: dpo.loss_type=simpo is "
                                                         r"reference-free"),
    ({"loss_type": "simpo", "reference": "full"}, r"remove dpo.reference"),
    ({"rpo_alpha": 0.5}, r"dpo.rpo_alpha=0.5 .* read only with dpo.loss_type=rpo \(got sigmoid\)"),
    ({"simpo_gamma": 1.0, "loss_type": "ipo"}, r"dpo.simpo_gamma=1.0 .* read only with dpo.loss_type=simpo"),
    ({"reference": "frozen"}, r"dpo.reference must be one of \['full', 'precomputed', 'hydra'\]"),
    ({"reference": "hydra"}, r"dpo.reference=hydra branches the reference off the policy's frozen trunk: set "
                             r"model.num_layers_unfrozen >= 0 \(got -1"),
    ({"beta_": 0.1}, r"unknown key 'beta_' in section 'dpo'"),
])
def test_config_errors(dpo, match, tmp_path):
    node = {"init_from": "x", "tokenizer": {"path": "t"}, "run_dir": str(tmp_path), "dpo": dpo}
    with pytest.raises(ConfigError, match=match):
        parse_config(DPOStageConfig, node)


def test_config_defaults_and_jsonl_refused(tmp_path):
    cfg = parse_config(DPOStageConfig, {"init_from": "x", "tokenizer": {"path": "t"}})
    assert (cfg.dpo.loss_type, cfg.dpo.effective_reference, cfg.dpo.beta) == ("sigmoid", "full", 0.1)
    cfg = parse_config(DPOStageConfig, {"init_from": "x", "tokenizer": {"path": "t"}, "dpo": {"loss_type": "rpo"}})
    assert cfg.dpo.effective_rpo_alpha == 1.0
    with pytest.raises(ConfigError, match=r"data.dataset=jsonl .* DPO needs preference pairs"):
        parse_config(DPOStageConfig, {"init_from": "x", "tokenizer": {"path": "t"}, "data": {"dataset": "jsonl"}})
    with pytest.raises(ConfigError, match=r"missing required value\(s\): init_from"):
        parse_config(DPOStageConfig, {"tokenizer": {"path": "t"}})


def test_gpt_dpo_yaml_composes():
    """conf/gpt_dpo.yaml against its schema, as launchers/train_dpo.py composes it."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from nemo_rlhf.config import STAGE_CONFIGS, load_stage_config, register_configs

    assert STAGE_CONFIGS["gpt_dpo"] is DPOStageConfig
    register_configs()
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        node = compose("gpt_dpo", ["init_from=w", "tokenizer.path=t.json", "dpo.loss_type=ipo", "dpo.beta=0.5"])
    cfg = load_stage_config(DPOStageConfig, node)
    assert cfg.dpo.loss_type == "ipo" and cfg.dpo.beta == 0.5 and cfg.optim.lr == 1e-5
