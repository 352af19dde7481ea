"""nemo_rlhf/config.py: typed sections, unknown keys, type/range errors, size checks, round trips,
and the effective values of every stage (launchers and demo) kept exactly as before.

``tests/config_effective_values.json`` holds the effective values the code read at commit 214b4b6
(conf/ YAMLs + the code defaults ``MODEL_DEFAULTS``, ``OPTIM_DEFAULTS``, ``PPO_DEFAULTS`` and the
``.get(key, default)`` calls of stages.py / serve.py / run_demo.py), recorded with
``python tests/test_config.py --record <dir with the old conf/ tree>``. The YAMLs in ``conf/``
(schema-based: every default from the dataclasses) must parse to those values. One change since:
issue 12 moved that from-scratch demo to ``conf/demo_tiny.yaml`` with ``run_dir: runs/demo_tiny``
(``demo/top``), so it never resumes the checkpoints of the main job (``conf/demo.yaml``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from nemo_rlhf.utils.hydra import dotted_leaves
from nemo_rlhf.config import (
    BatchConfig,
    CheckpointConfig,
    ConfigError,
    ConfigTypeError,
    CriticClientConfig,
    CriticServerStageConfig,
    DataConfig,
    DemoConfig,
    GenerateConfig,
    KLControllerConfig,
    ModelConfig,
    OptimConfig,
    PPOActorStageConfig,
    PPOConfig,
    RewardModelStageConfig,
    SamplingConfig,
    ServerConfig,
    SFTStageConfig,
    TokenizerConfig,
    TrainerConfig,
    ValSamplingConfig,
    check_heldout_size,
    check_sizes,
    demo_stage_node,
    explain_unknown_key,
    load_stage_config,
    parse_config,
    register_configs,
    to_plain,
)

REPO = Path(__file__).resolve().parents[1]
EXPECTED_FILE = Path(__file__).with_name("config_effective_values.json")
CONF_DIRS = {"conf": REPO / "conf"}

# Placeholders for the paths and port the demo / the user pass on the command line.
RUN, SFT_W, RM_W, TOK, PORT = "/runs/demo", "/runs/demo/sft_weights", "/runs/demo/rm_weights", "/runs/demo/tokenizer.json", 6100

# ----------------------------------------------------------------------------- effective values
# The code defaults at 214b4b6 (models/builder.py, models/megatron_module.py, algorithms/ppo.py,
# servers/client.py CriticClient): what the code used for a key that the composed config lacked.
MODEL_DEFAULTS = dict(
    num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=None, ffn_hidden_size=None,
    kv_channels=None, max_position_embeddings=256, vocab_size=None, make_vocab_size_divisible_by=128,
    position_embedding_type="rope", rotary_base=10000, rotary_percent=1.0, normalization="LayerNorm",
    layernorm_epsilon=1e-5, activation="gelu", add_bias_linear=True, add_qkv_bias=False, hidden_dropout=0.0,
    attention_dropout=0.0, init_method_std=0.02, share_embeddings_and_output_weights=True, params_dtype="fp32",
    tensor_model_parallel_size=1, pipeline_model_parallel_size=1, sequence_parallel=False,
    use_cpu_initialization=None)
OPTIM_DEFAULTS = dict(
    optimizer="adam", sgd_momentum=0.0, lr=1e-4, min_lr=None, weight_decay=0.0, betas=[0.9, 0.95], eps=1e-8,
    clip_grad=1.0, warmup_steps=0, decay_steps=None, decay_style="cosine", distributed_optimizer=False,
    max_nonfinite_in_a_row=5)
PPO_DEFAULTS = dict(
    rollout_micro_batch_size=8, ppo_epochs=1, num_minibatches=1, clip_eps=0.2, clip_eps_high=None,
    entropy_coef=0.0, gamma=1.0, lam=0.95, kl_estimator="k1",
    kl_controller=dict(type="adaptive", init_kl_coef=0.05, target=6.0, horizon=10000),
    whiten_advantages=True, reference_offload=False,
    sampling=dict(max_new_tokens=32, temperature=1.0, top_k=0, top_p=1.0), val_sampling=dict(), seed=1234)
ADDED_MODEL_KEYS = {"lora"}  # model keys added after 214b4b6 (the old code had none of them)
# keys added by issue 11 (frozen layers, layer-wise learning rates, hydra reference; defaults: off)
ADDED_MODEL_KEYS = ADDED_MODEL_KEYS | {"num_layers_unfrozen"}
ADDED_MODEL_KEYS = ADDED_MODEL_KEYS | {"reward_pooling"}  # issue 12: mean-pooled reward models
ADDED_OPTIM_KEYS = {"layer_lr_decay", "lr_mult"}
ADDED_PPO_KEYS = {"reference"}
ADDED_PPO_KEYS = ADDED_PPO_KEYS | {"val_judge", "val_samples_saved"}  # issue 12: held-out judge, saved samples
SAMPLING_PARAMS_DEFAULTS = dict(greedy=False)  # SamplingParams fields PPO_DEFAULTS["sampling"] lacks
CLIENT_RETRY_DEFAULTS = dict(retry_limit_s=300.0, retry_backoff_s=1.0, retry_backoff_max_s=30.0)


def effective(cfg: dict, stage: str) -> dict:
    """The values the stage's code reads from a composed config ``cfg`` (plain dict), with the code
    defaults applied as 214b4b6 applied them (``{**DEFAULTS, **section}``, ``.get(key, default)``)."""
    out: dict = {"run_dir": cfg["run_dir"], "seed": cfg["seed"]}
    m = {**MODEL_DEFAULTS, **cfg["model"]}
    out["model"] = m
    t = cfg["trainer"]
    o = {**OPTIM_DEFAULTS, **cfg["optim"]}
    o["min_lr"] = o["min_lr"] if o["min_lr"] is not None else o["lr"] / 10
    o["betas"] = list(o["betas"])
    if o["decay_steps"] is None:
        o["decay_style"] = "constant"  # megatron_module: no decay_steps -> constant schedule
    out["optim"] = o
    out["batch"] = dict(cfg["batch"])
    tok = cfg["tokenizer"]
    read = {"train_bpe": ("type", "vocab_size"), "tokenizer_json": ("type", "path"),
            "gpt2_bpe": ("type", "vocab_file", "merges_file")}[tok["type"]]
    out["tokenizer"] = {k: tok.get(k) for k in read}
    if stage == "critic":
        out.update(reward_model_path=cfg["reward_model_path"], critic_init_path=cfg.get("critic_init_path"),
                   value_clip=cfg.get("value_clip", 0.2))
        out["trainer"] = {"accelerator": t["accelerator"]}
        s = cfg["server"]
        out["server"] = {"host": s["host"], "port": s["port"], "grpc_port": s.get("grpc_port") or s["port"] + 1,
                         "metrics_port": s.get("metrics_port") or s["port"] + 2,
                         "max_batch_size": s.get("max_batch_size", 64)}
        return out
    out["init_from"] = cfg.get("init_from")
    out["trainer"] = {"accelerator": t["accelerator"], "max_steps": t["max_steps"],
                      "val_check_interval": t.get("val_check_interval"),
                      "log_every_n_steps": t.get("log_every_n_steps", 1)}
    if stage in ("sft", "ppo"):  # the RM evaluates every held-out batch
        out["trainer"]["limit_val_batches"] = t.get("limit_val_batches")
    d = cfg["data"]
    out["data"] = {"data_dir": d.get("data_dir"), "files": list(d["files"]), "on_error": d.get("on_error", "skip"),
                   "max_rows": d.get("max_rows"), "heldout_fraction": d["heldout_fraction"],
                   "split_seed": d.get("split_seed", 1234), "max_prompt_len": d["max_prompt_len"],
                   "overlong": d["overlong"]}
    if stage == "ppo":
        out["data"]["max_heldout_prompts"] = d.get("max_heldout_prompts")
    else:
        out["data"]["max_seq_len"] = d["max_seq_len"]
    ck = cfg.get("checkpoint") or {}
    out["checkpoint"] = {"dir": ck.get("dir"), "every_n_steps": ck.get("every_n_steps", 0) or 0,
                         "keep_last": ck.get("keep_last", 2), "resume": ck.get("resume", True)}
    if stage == "ppo":
        p = {**PPO_DEFAULTS, **cfg["ppo"]}
        p["sampling"] = {**PPO_DEFAULTS["sampling"], **SAMPLING_PARAMS_DEFAULTS, **p["sampling"]}
        p["val_sampling"] = {**p["sampling"], **p["val_sampling"]}
        p["kl_controller"] = dict(p["kl_controller"])
        out["ppo"] = p
        c = cfg["critic"]
        out["critic"] = {k: c[k] for k in ("host", "port", "infer_timeout_s", "train_timeout_s", "init_timeout_s")}
        out["critic"].update({k: c.get(k) if c.get(k) is not None else v for k, v in CLIENT_RETRY_DEFAULTS.items()})
    return out


# ----------------------------------------------------------------------------- composition
def _compose_all(conf_dir: Path, schema: bool) -> dict:
    """Plain dicts of every stage config: the launchers' (required values filled in) and the demo's,
    composed exactly as launchers/run_demo.py composes them."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    if schema:
        register_configs()
    out = {}
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        plain = lambda c: OmegaConf.to_container(c, resolve=True)  # noqa: E731
        out["launcher/sft"] = plain(compose("gpt_sft"))
        out["launcher/sft_llama2_70b"] = plain(compose("gpt_sft", ["model=llama2_70b"]))
        out["launcher/rm"] = plain(compose("gpt_rm", [f"init_from={SFT_W}", f"tokenizer.path={TOK}"]))
        out["launcher/ppo"] = plain(compose("gpt_ppo_actor", [f"init_from={SFT_W}", f"tokenizer.path={TOK}"]))
        out["launcher/critic"] = plain(compose("gpt_ppo_critic", [f"reward_model_path={RM_W}", f"tokenizer.path={TOK}"]))

        demo = compose("demo_tiny")  # the from-scratch HH demo (conf/demo.yaml before issue 12)
        out["demo/top"] = plain(demo)

        def stage_config(name, section, **extra):  # launchers/run_demo.py stage_config
            cfg = compose(config_name=name)
            OmegaConf.set_struct(cfg, False)
            return OmegaConf.merge(cfg, demo.common, demo[section], extra)  # no base model

        tokenizer = {"type": "tokenizer_json", "path": TOK}
        out["demo/sft"] = plain(stage_config("gpt_sft", "sft", run_dir=RUN))
        out["demo/rm"] = plain(stage_config("gpt_rm", "rm", run_dir=RUN, init_from=SFT_W, tokenizer=tokenizer))
        critic_cfg = stage_config("gpt_ppo_critic", "critic")
        overrides = [f"reward_model_path={RM_W}", f"tokenizer.path={TOK}", f"server.port={PORT}",
                     f"server.grpc_port={PORT + 1}", f"server.metrics_port={PORT + 2}", f"run_dir={RUN}",
                     f"trainer.accelerator={critic_cfg.trainer.accelerator}"]
        for key, value in dotted_leaves(critic_cfg.model, "model"):  # forwarded to the server process
            overrides.append(f"{key}={'null' if value is None else value}")
        out["demo/critic_server"] = plain(compose("gpt_ppo_critic", overrides))
        out["demo/ppo"] = plain(stage_config("gpt_ppo_actor", "ppo", run_dir=RUN, init_from=SFT_W,
                                             tokenizer=tokenizer, critic={"host": "127.0.0.1", "port": PORT}))
    return out


STAGE_OF = {"sft": ("sft", SFTStageConfig), "sft_llama2_70b": ("sft", SFTStageConfig),
            "rm": ("rm", RewardModelStageConfig), "ppo": ("ppo", PPOActorStageConfig),
            "critic": ("critic", CriticServerStageConfig), "critic_server": ("critic", CriticServerStageConfig)}


def _demo_top(d: dict) -> dict:
    return {"run_dir": d.get("run_dir", "runs/demo"), "server_ready_timeout_s": float(d["server_ready_timeout_s"]),
            "server_port": d.get("server_port"), "common": d["common"],
            **{s: d[s] for s in ("sft", "rm", "critic", "ppo")}}


def record(old_conf_dir: Path) -> None:
    """Write EXPECTED_FILE from an old conf/ tree (no schemas)."""
    composed = _compose_all(old_conf_dir, schema=False)
    expected = {}
    for key, cfg in composed.items():
        name = key.split("/")[1]
        expected[key] = _demo_top(cfg) if name == "top" else effective(cfg, STAGE_OF[name][0])
    EXPECTED_FILE.write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads(EXPECTED_FILE.read_text())


@pytest.mark.parametrize("conf", sorted(CONF_DIRS))
def test_every_stage_keeps_its_effective_values(conf, expected):
    """Parsing each composed stage config (launchers and demo, old or slimmed YAMLs) gives exactly
    the values the code read before: the demo's printed numbers cannot move through the config."""
    conf_dir = CONF_DIRS[conf]
    schema = (conf_dir / "gpt_sft.yaml").read_text().find("gpt_sft_schema") >= 0
    composed = _compose_all(conf_dir, schema=schema)
    assert set(composed) == set(expected)
    for key, node in composed.items():
        name = key.split("/")[1]
        if name == "top":
            demo = parse_config(DemoConfig, node)
            assert _demo_top(to_plain(demo)) == expected[key], key
            continue
        stage, cls = STAGE_OF[name]
        typed = load_stage_config(cls, node, stage=key)
        got = effective(to_plain(typed), stage)
        assert got == expected[key], (key, _diff(got, expected[key]))


def _diff(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{path}.{k}")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


REQUIRED = {SFTStageConfig: {}, RewardModelStageConfig: {"init_from": "x", "tokenizer": {"path": "t"}},
            PPOActorStageConfig: {"init_from": "x", "tokenizer": {"path": "t"}},
            CriticServerStageConfig: {"reward_model_path": "x", "tokenizer": {"path": "t"}}}


def test_slim_yamls_hold_no_copy_of_a_default():
    """A key in a slimmed YAML that only repeats the dataclass default is a second copy of it."""
    from omegaconf import OmegaConf

    slim = CONF_DIRS["conf"]
    for name, cls in (("gpt_sft", SFTStageConfig), ("gpt_rm", RewardModelStageConfig),
                      ("gpt_ppo_actor", PPOActorStageConfig), ("gpt_ppo_critic", CriticServerStageConfig)):
        node = OmegaConf.to_container(OmegaConf.load(slim / f"{name}.yaml"))
        node.pop("defaults")
        defaults = to_plain(parse_config(cls, REQUIRED[cls]))
        for section, values in node.items():
            for k, v in values.items():
                assert defaults[section][k] != v, f"{name}.yaml repeats the default {section}.{k}={v!r}"
    for name in ("tiny", "llama2_70b"):
        node = OmegaConf.to_container(OmegaConf.load(slim / "model" / f"{name}.yaml")) or {}
        for k, v in node.items():
            assert getattr(ModelConfig(), k) != v, f"model/{name}.yaml repeats the default {k}={v!r}"


def test_slim_schema_accepts_overrides_without_plus_and_rejects_typos():
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIRS["conf"]), version_base="1.3"):
        cfg = compose("gpt_sft", ["trainer.max_steps=2", "data.max_rows=200"])
        assert cfg.trainer.max_steps == 2 and cfg.data.max_rows == 200
        assert cfg.trainer.limit_val_batches == 4  # from TrainerConfig, not the YAML
        ppo = compose("gpt_ppo_actor", ["ppo.kl_controller.target=3", "critic.port=7000", "init_from=x",
                                        "tokenizer.path=y"])
        typed = load_stage_config(PPOActorStageConfig, ppo)
        assert typed.ppo.kl_controller.target == 3.0 and typed.critic.port == 7000
        with pytest.raises(ConfigCompositionException, match="lrr") as err:
            compose("gpt_sft", ["optim.lrr=1"])
        assert explain_unknown_key(err.value, SFTStageConfig) == \
            "unknown key 'lrr' in section 'optim' (did you mean 'lr'?)"
        with pytest.raises(ConfigCompositionException) as err:
            compose("gpt_ppo_actor", ["ppo.kl_controller.horizn=1"])
        assert explain_unknown_key(err.value, PPOActorStageConfig) == \
            "unknown key 'horizn' in section 'ppo.kl_controller' (did you mean 'horizon'?)"
        with pytest.raises(ConfigCompositionException) as err:
            compose("gpt_sft", ["trainr.max_steps=1"])
        assert "unknown key 'trainr' at the top level (did you mean 'trainer'?)" == \
            explain_unknown_key(err.value, SFTStageConfig)
        # `+key=value` gets past Hydra; the parser still refuses it
        with pytest.raises(ConfigError, match=r"unknown key 'lrr' in section 'optim' \(did you mean 'lr'\?\)"):
            load_stage_config(SFTStageConfig, compose("gpt_sft", ["+optim.lrr=1"]))
        with pytest.raises(ConfigCompositionException, match="max_steps"):
            compose("gpt_sft", ["trainer.max_steps=two"])
        demo = compose("demo_tiny", ["+common.data.max_rows=3000", "sft.trainer.max_steps=30"])
        assert demo.common.data.max_rows == 3000


# ----------------------------------------------------------------------------- unknown keys
@pytest.mark.parametrize(
    "cls, node, fragment",
    [
        (OptimConfig, {"lrr": 1}, "unknown key 'lrr' in section 'optim' (did you mean 'lr'?)"),
        (SFTStageConfig, {"optim": {"warmup_step": 1}}, "unknown key 'warmup_step' in section 'optim' (did you mean 'warmup_steps'?)"),
        (SFTStageConfig, {"trainr": {}}, "unknown key 'trainr' at the top level (did you mean 'trainer'?)"),
        (PPOActorStageConfig, {"init_from": "x", "tokenizer": {"path": "t"}, "ppo": {"kl_controller": {"horizn": 5}}},
         "unknown key 'horizn' in section 'ppo.kl_controller' (did you mean 'horizon'?)"),
        (PPOActorStageConfig, {"init_from": "x", "tokenizer": {"path": "t"}, "ppo": {"val_sampling": {"temprature": 0.5}}},
         "unknown key 'temprature' in section 'ppo.val_sampling' (did you mean 'temperature'?)"),
        (PPOActorStageConfig, {"init_from": "x", "tokenizer": {"path": "t"}, "critic": {"retry_limit": 5}},
         "unknown key 'retry_limit' in section 'critic' (did you mean 'retry_limit_s'?)"),
        (CriticServerStageConfig, {"reward_model_path": "x", "tokenizer": {"path": "t"}, "server": {"grpc": 1}},
         "unknown key 'grpc' in section 'server' (did you mean 'grpc_port'?)"),
        (DataConfig, {"zzz": 1}, "unknown key 'zzz' in section 'data'; valid keys: data_dir, files"),
        (DemoConfig, {"sft": {"optim": {"lrr": 1}}}, "unknown key 'lrr' in section 'sft.optim' (did you mean 'lr'?)"),
        (DemoConfig, {"common": {"modell": {}}}, "unknown key 'modell' in section 'common' (did you mean 'model'?)"),
        (DemoConfig, {"common": {"checkpoint": {"keep_lst": 1}}},
         "unknown key 'keep_lst' in section 'common.checkpoint' (did you mean 'keep_last'?)"),
        (SFTStageConfig, {"ppo": {}}, "unknown key 'ppo' at the top level"),  # PPO keys are no SFT keys
    ],
)
def test_unknown_key_names_key_section_and_nearest(cls, node, fragment):
    with pytest.raises(ConfigError) as err:
        parse_config(cls, node)
    assert fragment in str(err.value)


# ----------------------------------------------------------------------------- types and ranges
@pytest.mark.parametrize(
    "cls, node, exc, fragment",
    [
        (OptimConfig, {"lr": -1}, ConfigError, "optim.lr must be > 0, got -1"),
        (OptimConfig, {"lr": "fast"}, ConfigTypeError, "optim.lr must be a number, got 'fast' (str)"),
        (OptimConfig, {"lr": float("inf")}, ConfigError, "optim.lr must be finite"),
        (OptimConfig, {"decay_style": "cosin"}, ConfigError, "optim.decay_style must be one of"),
        (OptimConfig, {"betas": [0.9]}, ConfigError, "optim.betas must be two numbers"),
        (OptimConfig, {"min_lr": 1.0}, ConfigError, "optim.min_lr=1 must be <= optim.lr=0.0001"),
        (OptimConfig, {"warmup_steps": 50, "decay_steps": 10}, ConfigError, "optim.warmup_steps=50"),
        (TrainerConfig, {"max_steps": 2.5}, ConfigTypeError, "trainer.max_steps must be an integer, got 2.5"),
        (TrainerConfig, {"max_steps": True}, ConfigTypeError, "trainer.max_steps must be an integer, got True"),
        (TrainerConfig, {"val_check_interval": 0}, ConfigError, "trainer.val_check_interval must be >= 1, got 0"),
        (TrainerConfig, {"accelerator": "tpu"}, ConfigError, "trainer.accelerator must be one of ['cpu', 'gpu'], got 'tpu'"),
        (DataConfig, {"overlong": "cut"}, ConfigError, "data.overlong must be one of ['truncate', 'skip']"),
        (DataConfig, {"on_error": "ignore"}, ConfigError, "data.on_error must be one of ['skip', 'error']"),
        (DataConfig, {"heldout_fraction": 1.5}, ConfigError, "data.heldout_fraction must be in (0, 1)"),
        (DataConfig, {"files": "a.jsonl"}, ConfigTypeError, "data.files must be a list"),
        (DataConfig, {"max_prompt_len": 300}, ConfigError, "data.max_prompt_len=300 must be < data.max_seq_len=256"),
        (TokenizerConfig, {"type": "sentencepiece"}, ConfigError, "tokenizer.type must be one of"),
        (TokenizerConfig, {"type": "tokenizer_json"}, ConfigError, "tokenizer.path is required for tokenizer.type='tokenizer_json'"),
        (TokenizerConfig, {"vocab_size": 100}, ConfigError, "tokenizer.vocab_size must be >= 257, got 100"),
        (ModelConfig, {"activation": "swish"}, ConfigError, "model.activation must be one of"),
        (ModelConfig, {"normalization": "layernorm"}, ConfigError, "model.normalization must be one of"),
        (ModelConfig, {"hidden_size": 130}, ConfigError, "model.hidden_size=130 is not divisible by model.num_attention_heads=4"),
        (ModelConfig, {"num_query_groups": 3}, ConfigError, "model.num_attention_heads=4 is not divisible by model.num_query_groups=3"),
        (ModelConfig, {"tensor_model_parallel_size": 0}, ConfigError, "model.tensor_model_parallel_size must be >= 1, got 0"),
        (ModelConfig, {"sequence_parallel": "yes"}, ConfigTypeError, "model.sequence_parallel must be true or false"),
        (KLControllerConfig, {"type": "pid"}, ConfigError, "ppo.kl_controller.type must be one of ['fixed', 'adaptive']"),
        (KLControllerConfig, {"horizon": 0}, ConfigError, "ppo.kl_controller.horizon must be > 0"),
        (PPOConfig, {"kl_estimator": "k4"}, ConfigError, "ppo.kl_estimator must be one of ['k1', 'k2', 'k3', 'abs']"),
        (PPOConfig, {"gamma": 1.1}, ConfigError, "ppo.gamma must be in [0, 1], got 1.1"),
        (PPOConfig, {"sampling": {"top_p": 0}}, ConfigError, "ppo.sampling.top_p must be in (0, 1]"),
        (PPOConfig, {"val_sampling": {"temperature": -1}}, ConfigError, "ppo.val_sampling.temperature must be >= 0"),
        (CriticClientConfig, {"port": 70000}, ConfigError, "critic.port must be in [1, 65535], got 70000"),
        (CriticClientConfig, {"infer_timeout_s": 0}, ConfigError, "critic.infer_timeout_s must be > 0"),
        (ServerConfig, {"max_batch_size": 0}, ConfigError, "server.max_batch_size must be >= 1"),
        (CheckpointConfig, {"keep_last": 0}, ConfigError, "checkpoint.keep_last must be >= 1"),
        (SFTStageConfig, {"optim": None}, ConfigTypeError, "optim must be a mapping, got None"),
        (SFTStageConfig, {"seed": "1234"}, ConfigTypeError, "seed must be an integer"),
        (RewardModelStageConfig, {}, ConfigError, "missing required value(s): init_from, tokenizer.path"),
        (CriticServerStageConfig, {"reward_model_path": "x", "tokenizer": {"path": "t"}, "value_clip": -0.1},
         ConfigError, "value_clip must be > 0"),
        (GenerateConfig, {}, ConfigError, "missing required value(s): out, policy.path"),
        (GenerateConfig, {"out": "o", "policy": {"path": "p", "format": "onnx"}}, ConfigError,
         "policy.format must be one of"),
        (GenerateConfig, {"out": "o", "policy": {"path": "p"}, "score": {"critic_server": True, "reward": {"path": "r"}}},
         ConfigError, "score.reward.path and score.critic_server=true both"),
        (GenerateConfig, {"out": "o", "policy": {"path": "p"}, "sampling": {"top_p": 0}}, ConfigError,
         "sampling.top_p must be in (0, 1]"),
    ],
)
def test_wrong_type_or_range_names_the_field(cls, node, exc, fragment):
    with pytest.raises(exc) as err:
        parse_config(cls, node)
    assert fragment in str(err.value)


def test_type_errors_are_also_type_errors_and_value_errors():
    with pytest.raises(TypeError):
        parse_config(TrainerConfig, {"max_steps": "ten"})
    with pytest.raises(ValueError):
        parse_config(TrainerConfig, {"max_steps": 0})


def test_direct_construction_validates_too():
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        OptimConfig(lr=0)
    assert OptimConfig(lr=1).lr == 1.0 and isinstance(OptimConfig(lr=1).lr, float)


def test_demo_stage_errors_name_the_stage():
    with pytest.raises(ConfigError, match=r"^\[ppo\] optim.lr must be > 0"):
        load_stage_config(PPOActorStageConfig, {"init_from": "x", "tokenizer": {"path": "t"}, "optim": {"lr": 0}},
                          stage="ppo")


# ----------------------------------------------------------------------------- sizes
def test_batch_sizes_must_fit():
    with pytest.raises(ConfigError, match=r"batch.global_batch_size=16 is not a multiple of batch.micro_batch_size=6"):
        parse_config(SFTStageConfig, {"batch": {"micro_batch_size": 6}})
    cfg = parse_config(SFTStageConfig, {})
    check_sizes(cfg, dp=2)
    with pytest.raises(ConfigError, match=r"global_batch_size=16 is not a multiple of batch.micro_batch_size=8 "
                                          r"\* data-parallel size 4"):
        check_sizes(cfg, dp=4)


def test_ppo_minibatches_and_heldout_cap_must_fit_the_batch():
    base = {"init_from": "x", "tokenizer": {"path": "t"}}
    with pytest.raises(ConfigError, match=r"ppo.num_minibatches=3 does not divide the rollout batch of 16"):
        parse_config(PPOActorStageConfig, {**base, "ppo": {"num_minibatches": 3}})
    cfg = parse_config(PPOActorStageConfig, {**base, "batch": {"global_batch_size": 16, "micro_batch_size": 4},
                                             "ppo": {"num_minibatches": 4}})
    check_sizes(cfg, dp=2)  # 8 rollouts per rank, 4 mini-batches
    with pytest.raises(ConfigError, match=r"rollout batch of 4 per data-parallel rank"):
        check_sizes(parse_config(PPOActorStageConfig, {**base, "batch": {"micro_batch_size": 2},
                                                       "ppo": {"num_minibatches": 8}}), dp=4)
    with pytest.raises(ConfigError, match=r"data.max_heldout_prompts=8 < batch.global_batch_size=16"):
        parse_config(PPOActorStageConfig, {**base, "data": {"max_heldout_prompts": 8}})


def test_heldout_split_smaller_than_one_batch_is_refused_with_the_keys_to_change():
    """The issue's example: train_sft.py data.max_rows=200 -> 12 held-out samples, global batch 16."""
    data = parse_config(DataConfig, {"max_rows": 200})
    with pytest.raises(ConfigError) as err:
        check_heldout_size(12, 16, 1, data=data)
    msg = str(err.value)
    assert "\n" not in msg
    for fragment in ("12 samples", "batch.global_batch_size=16", "data.heldout_fraction (now 0.05)",
                     "data.max_rows (now 200)"):
        assert fragment in msg
    check_heldout_size(16, 16, 1)
    check_heldout_size(16, 16, 2)
    with pytest.raises(ConfigError, match="10 prompts"):
        check_heldout_size(10, 16, 2, unit="prompts")


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("cls, node", [
    (SFTStageConfig, {}),
    (SFTStageConfig, {"model": {"num_layers": 80, "hidden_size": 8192, "num_attention_heads": 64, "num_query_groups": 8}}),
    (RewardModelStageConfig, {"init_from": "a", "tokenizer": {"path": "t"}}),
    (PPOActorStageConfig, {"init_from": "a", "tokenizer": {"path": "t"}, "ppo": {"val_sampling": {"temperature": 0.5}}}),
    (CriticServerStageConfig, {"reward_model_path": "r", "tokenizer": {"path": "t"}, "value_clip": None}),
    (DemoConfig, {"sft": {"trainer": {"max_steps": 3}}}),
    (GenerateConfig, {"out": "o.jsonl", "policy": {"path": "p"}, "tokenizer": {"type": "hf", "path": "t"},
                      "score": {"vader": True, "reward": {"path": "r"}}}),
])
def test_round_trip_dataclass_dict_dataclass(cls, node):
    cfg = parse_config(cls, node)
    plain = to_plain(cfg)
    json.dumps(plain)  # plain containers only
    assert parse_config(cls, plain) == cfg
    from omegaconf import OmegaConf

    assert parse_config(cls, OmegaConf.create(plain)) == cfg


def test_to_plain_keeps_todays_mapping_shapes():
    cfg = parse_config(PPOActorStageConfig, {"init_from": "a", "tokenizer": {"path": "t"},
                                             "ppo": {"val_sampling": {"temperature": 0.5}}})
    plain = to_plain(cfg)
    assert plain["ppo"]["val_sampling"] == {"temperature": 0.5}  # overrides of sampling only
    assert cfg.ppo.val_sampling.resolve(cfg.ppo.sampling) == SamplingConfig(temperature=0.5)
    # builder.model_cfg_with_defaults accepts it; keys added after 214b4b6 (default: off) come on top
    assert set(plain["model"]) - ADDED_MODEL_KEYS == set(MODEL_DEFAULTS)
    assert set(plain["optim"]) - ADDED_OPTIM_KEYS == set(OPTIM_DEFAULTS)
    assert set(plain["ppo"]) - ADDED_PPO_KEYS == set(PPO_DEFAULTS)
    assert set(plain["ppo"]["sampling"]) - set(PPO_DEFAULTS["sampling"]) == {"greedy"}  # a SamplingParams field
    assert ValSamplingConfig().overrides() == {}


def test_interpolations_are_resolved():
    from omegaconf import OmegaConf

    node = OmegaConf.create({"trainer": {"max_steps": 30}, "optim": {"decay_steps": "${trainer.max_steps}"}})
    assert parse_config(SFTStageConfig, node).optim.decay_steps == 30


def test_demo_common_sections_go_to_the_stages_that_have_them():
    demo = parse_config(DemoConfig, {"common": {"checkpoint": {"keep_last": 5}, "trainer": {"accelerator": "cpu"}}})
    critic = load_stage_config(CriticServerStageConfig, demo_stage_node(
        to_plain(parse_config(CriticServerStageConfig, REQUIRED[CriticServerStageConfig])), to_plain(demo), "critic"))
    assert critic.trainer.accelerator == "cpu"
    ppo = load_stage_config(PPOActorStageConfig, demo_stage_node(
        to_plain(parse_config(PPOActorStageConfig, REQUIRED[PPOActorStageConfig])), to_plain(demo), "ppo"))
    assert ppo.checkpoint.keep_last == 5


def test_demo_stage_node_merges_like_run_demo():
    base = to_plain(parse_config(SFTStageConfig, {}))
    demo = {"common": {"trainer": {"accelerator": "cpu"}}, "sft": {"trainer": {"max_steps": 7}}}
    cfg = load_stage_config(SFTStageConfig, demo_stage_node(base, demo, "sft", run_dir="/r"), stage="sft")
    assert cfg.trainer.max_steps == 7 and cfg.run_dir == "/r" and cfg.trainer.val_check_interval == 100


def test_every_section_has_the_documented_keys():
    assert [f.name for f in dataclasses.fields(BatchConfig)] == ["global_batch_size", "micro_batch_size"]
    assert [f.name for f in dataclasses.fields(TokenizerConfig)] == ["type", "vocab_size", "path", "vocab_file",
                                                                     "merges_file"]
    assert [f.name for f in dataclasses.fields(TrainerConfig)] == ["accelerator", "max_steps", "val_check_interval",
                                                                   "limit_val_batches", "log_every_n_steps"]
    assert [f.name for f in dataclasses.fields(CheckpointConfig)] == ["dir", "every_n_steps", "keep_last", "resume"]
    assert {f.name for f in dataclasses.fields(DataConfig)} == {
        "data_dir", "files", "heldout_fraction", "split_seed", "max_seq_len", "max_prompt_len", "overlong",
        "on_error", "max_rows", "max_heldout_prompts",
        # issue 12: the IMDB data set, held-out files, HH through the chat template
        "dataset", "heldout_files", "max_heldout_rows", "chat_template", "prompt_tokens_min", "prompt_tokens_max"}


if __name__ == "__main__":  # python tests/test_config.py --record <old conf dir>
    if len(sys.argv) == 3 and sys.argv[1] == "--record":
        record(Path(sys.argv[2]).resolve())
        print(f"wrote {EXPECTED_FILE}")
    else:
        sys.exit(__doc__)


@pytest.mark.parametrize(
    "node, fragment",
    [
        ({"rm_num_layers": 12}, "rm_num_layers truncates the base model for the reward model: it needs base_model"),
        ({"policy_num_layers": 2}, "policy_num_layers truncates the base model: set base_model"),
        ({"stages": ["rm", "sft"]}, "a non-empty, ordered subset of ['sft', 'rm', 'ppo', 'dpo', 'ilql']"),
        ({"stages": ["sft", "ppo"]}, "ppo needs the reward model stage (rm) before it"),
        ({"stages": ["rm", "ppo"]}, "rm without sft needs a base_model"),
        ({"stages": ["ilql"]}, "ilql without sft needs a base_model"),
        ({"stages": ["ilql", "dpo"]}, "a non-empty, ordered subset of"),
        # the dpo stage (issue 14 section 1): after ppo, before ilql; from the SFT policy or a base model
        ({"stages": ["dpo"]}, "dpo without sft needs a base_model"),
        ({"stages": ["rm", "dpo"]}, "rm without sft needs a base_model"),
        ({"stages": ["sft", "dpo", "rm"]}, "a non-empty, ordered subset of ['sft', 'rm', 'ppo', 'dpo', 'ilql']"),
        ({"stages": ["sft", "rm", "dpo", "ppo"]}, "a non-empty, ordered subset of"),
        ({"stages": ["sft", "dpo", "dpo"]}, "without repeats"),
        ({"dpo": {"dpo": {"betaa": 0.1}}}, "unknown key 'betaa' in section 'dpo.dpo' (did you mean 'beta'?)"),
        ({"dpo_judge": {"max_prompts": 0}}, "dpo_judge.max_prompts must be >= 1, got 0"),
        ({"dpo_judge": {"sampling": {"top_p": 0.0}}}, "dpo_judge.sampling.top_p must be in (0, 1]"),
    ],
)
def test_demo_stage_and_base_model_errors(node, fragment):
    with pytest.raises(ConfigError) as err:
        parse_config(DemoConfig, node)
    assert fragment in str(err.value)


def test_demo_dpo_stage_from_sft_or_base_model():
    """stages with dpo: after sft (and rm / ppo), or alone from a base model; the judge's defaults."""
    for stages in (["sft", "dpo"], ["sft", "rm", "dpo"], ["sft", "rm", "ppo", "dpo", "ilql"]):
        assert parse_config(DemoConfig, {"stages": stages}).stages == stages
    demo = parse_config(DemoConfig, {"stages": ["dpo"], "base_model": "smollm2"})
    assert demo.stages == ["dpo"]
    assert (demo.dpo_judge.max_prompts, demo.dpo_judge.batch_size, demo.dpo_judge.sampling.max_new_tokens) == (48, 16, 32)


@pytest.mark.parametrize("config_name", ["demo_tiny", "examples/hh_helpful"])
def test_demo_dpo_section_parses(config_name):
    """run_demo's dpo stage: the config's dpo section over conf/gpt_dpo.yaml parses to DPOStageConfig;
    examples/hh_helpful's DPO held-out pairs lie inside the SFT / reward-model held-out split (a smaller
    cut of the same prompt hash and seed), so no stage trained on them."""
    from hydra import compose, initialize_config_dir

    from nemo_rlhf.config import DEMO_STAGES, DPOStageConfig, RewardModelStageConfig, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        demo = compose(config_name=config_name, overrides=["stages=[sft,rm,dpo]"])
        typed = parse_config(DemoConfig, demo)
        base = {"model": {"num_layers": 30}} if demo.base_model else None  # SmolLM2's depth
        extra = dict(run_dir="/r", init_from="/w", tokenizer={"type": "tokenizer_json", "path": "/t.json"})
        dpo = load_stage_config(DPOStageConfig, demo_stage_node(compose(config_name=DEMO_STAGES["dpo"][0]), demo,
                                                                "dpo", base=base, **extra), stage="dpo")
        rm = load_stage_config(RewardModelStageConfig, demo_stage_node(compose(config_name="gpt_rm"), demo, "rm",
                                                                       base=base, **extra), stage="rm")
    assert typed.stages == ["sft", "rm", "dpo"] and dpo.init_from == "/w" and dpo.dpo.loss_type == "sigmoid"
    assert dpo.data.files == rm.data.files and dpo.data.split_seed == rm.data.split_seed
    assert dpo.data.heldout_fraction <= rm.data.heldout_fraction


def test_imdb_example_stages_parse_with_their_sizes():
    """examples/imdb_sentiment over conf/demo.yaml: the reward model on a review's last 128 tokens and
    PPO's KL coefficient reach the typed stage configs."""
    from hydra import compose, initialize_config_dir

    from nemo_rlhf.config import RewardModelStageConfig, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        demo = compose(config_name="examples/imdb_sentiment")
        parse_config(DemoConfig, demo)
        base = {"model": {"num_layers": 30}}
        extra = dict(run_dir="/r", init_from="/w", tokenizer={"type": "tokenizer_json", "path": "/t.json"})
        rm = load_stage_config(RewardModelStageConfig, demo_stage_node(compose(config_name="gpt_rm"), demo, "rm",
                                                                       base=base, **extra), stage="rm")
        ppo = load_stage_config(PPOActorStageConfig, demo_stage_node(
            compose(config_name="gpt_ppo_actor"), demo, "ppo", base=base, critic={"host": "127.0.0.1", "port": 5555},
            **extra), stage="ppo")
    assert (rm.data.max_seq_len, rm.trainer.max_steps, rm.model.reward_pooling) == (128, 60, "mean")
    assert (ppo.ppo.kl_controller.type, ppo.ppo.kl_controller.init_kl_coef) == ("adaptive", 0.3)
    assert ppo.trainer.max_steps == 24 and ppo.ppo.reference == "hydra"


def test_demo_reward_model_may_be_truncated_after_sft():
    """examples/hh_helpful: SFT for the policy, the reward model from the base model's first layers."""
    demo = parse_config(DemoConfig, {"stages": ["sft", "rm", "ppo"], "base_model": "smollm2", "rm_num_layers": 12})
    assert demo.rm_num_layers == 12 and demo.stages == ["sft", "rm", "ppo"]


def test_critic_only_server_needs_its_initial_weights():
    """``reward_model_path: null`` (PPO rewarded by reward functions only) is a critic-only server;
    it must say where the critic starts from."""
    from nemo_rlhf.config import ConfigError, CriticServerStageConfig, parse_config

    node = {"reward_model_path": None, "tokenizer": {"path": "t.json"}}
    with pytest.raises(ConfigError, match="needs critic_init_path"):
        parse_config(CriticServerStageConfig, node)
    cfg = parse_config(CriticServerStageConfig, {**node, "critic_init_path": "sft/weights"})
    assert cfg.reward_model_path is None and cfg.critic_init_path == "sft/weights"


@pytest.mark.parametrize("config_name", ["demo", "demo_tiny", "examples/hh_helpful", "examples/imdb_sentiment"])
@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "rs"])
def test_demo_online_stage_for_every_algorithm_parses(config_name, algorithm):
    """run_demo's online stage with ``algorithm=...`` in place of PPO: its section merged over
    conf/gpt_grpo_rm.yaml (critic-free) or conf/gpt_rs_rm.yaml (rs) parses to the typed stage config,
    rewarded by the reward-model server."""
    from hydra import compose, initialize_config_dir

    from nemo_rlhf.config import (DEMO_STAGES, DemoConfig, GRPOStageConfig, RejectionSamplingStageConfig,
                                  register_configs)

    register_configs()
    section = "rs" if algorithm == "rs" else "grpo"
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        demo = compose(config_name=config_name, overrides=[f"algorithm={algorithm}"])
        parse_config(DemoConfig, demo)
        base = {"model": {"num_layers": 30}} if demo.base_model else None  # SmolLM2's depth (the base model's)
        node = demo_stage_node(compose(config_name=DEMO_STAGES[section][0]), demo, section, base=base, run_dir="/r",
                               init_from="/w", tokenizer={"type": "tokenizer_json", "path": "/t.json"},
                               critic={"host": "127.0.0.1", "port": 5555},
                               **({} if section == "rs" else {"grpo": {"algorithm": algorithm}}))
    cls = RejectionSamplingStageConfig if section == "rs" else GRPOStageConfig
    cfg = load_stage_config(cls, node, stage=section)
    assert cfg.reward.reward_model and not cfg.reward.functions and cfg.critic.port == 5555
    if section == "grpo":
        assert cfg.grpo.algorithm == algorithm
