"""The main job: a reward model, a PyTriton critic server and PPO on CPU, in one command.

    python launchers/run_demo.py [overrides]                          (conf/demo.yaml)
    python launchers/run_demo.py --config-name demo_tiny [overrides]  (the from-scratch smoke path)

``conf/demo.yaml`` aligns SmolLM2-135M-Instruct toward positive IMDB movie-review continuations:
a Bradley-Terry reward model on (positive, negative) reviews, then PPO against it, judged before
and after by VADER (a lexicon sentiment analyser the policy never trained against).
``conf/demo_tiny.yaml`` runs SFT -> reward model -> PPO on HH-RLHF with a tiny model from scratch.
``algorithm=grpo|dr_grpo|rloo|reinforce_pp`` runs that critic-free trainer in place of PPO, rewarded
by the same reward-model server (its ``grpo:`` section: a partial ``conf/gpt_grpo.yaml``-style
stage config over the schema's defaults; ``grpo_samples.jsonl`` instead of ``ppo_samples.jsonl``);
``algorithm=rs`` runs rejection-sampling rounds (``rs:`` section, ``conf/gpt_rs_rm.yaml``).
A ``dpo`` stage (``stages=[sft,rm,dpo]``; ``dpo:`` section over ``conf/gpt_dpo.yaml``) trains DPO from the
pipeline's policy (the SFT weights, or the base model) against a frozen copy of it on the data set's
preference pairs, then judges it (``dpo_judge:``, :func:`nemo_rlhf.evaluation.judge.judge_checkpoints`):
one response per held-out prompt from the start policy and one from the DPO policy, same sampling seed,
both scored by the ``rm`` stage's reward model (win rate, ties 1/2; without an ``rm`` stage no win rate)
and the DPO policy's KL to the start policy (nats/response); the pairs go to ``dpo_samples.jsonl``.
An ``ilql`` stage (``ilql:`` section over ``conf/gpt_ilql.yaml``; ``conf/examples/imdb_ilql.yaml``:
``stages: [ilql]``) trains ILQL from the pipeline's policy on the data set's offline rows (IMDB:
review windows rewarded by their label) and reports its held-out decodings before and after
(``ilql.val_judge: vader``; ``ilql_samples.jsonl``).

The stages (``stages``) run in this process, except the critic/reward server, a separate process
(``launchers/serve_critic.py``) that this launcher starts, health-checks and always stops. The run
directory gets every stage's checkpoint, ``metrics.jsonl``, ``ppo_samples.jsonl``,
``ppo_reward_kl.png`` and ``report.json``; the report is printed.
"""

import json
import logging
import os
import secrets
import sys
import time
from pathlib import Path

from nemo_rlhf.config import register_configs
from nemo_rlhf.utils.hydra import dotted_leaves, hydra_entry

register_configs()  # the typed schemas the YAMLs in conf/ extend

REPO = Path(__file__).resolve().parents[1]
LOG = logging.getLogger("nemo_rlhf")


def stage_config(name: str, demo_cfg, section: str, base=None, **extra):
    """conf/<name>.yaml merged with the base model's sections, the demo's `common` (the sections
    that stage has), the demo's stage section and `extra` (see nemo_rlhf.config.demo_stage_node)."""
    from hydra import compose

    from nemo_rlhf.config import demo_stage_node

    return demo_stage_node(compose(config_name=name), demo_cfg, section, base=base, **extra)


def prepare_base_models(cfg) -> dict:
    """The converted base model for the policy (and, with ``rm_num_layers``, a truncated copy for
    the reward model / critic), from the cache or converted now; {} without ``base_model``."""
    if not cfg.base_model:
        return {}
    from nemo_rlhf.checkpoint.cache import converted_models
    from nemo_rlhf.checkpoint.hf import read_model_config

    n_policy = int(cfg.policy_num_layers) if cfg.policy_num_layers else None
    variants = [("policy", n_policy)] + ([("reward", int(cfg.rm_num_layers))] if cfg.rm_num_layers else [])
    dirs = converted_models(str(cfg.base_model), variants, cache_dir=cfg.cache_dir)
    policy, rm = dirs[0], dirs[-1]
    tokenizer = {"type": "hf", "path": str(policy)}
    return {
        "policy_weights": str(policy / "weights"), "rm_weights": str(rm / "weights"),
        "policy": {"model": read_model_config(policy / "model_config.yaml"), "tokenizer": tokenizer},
        "rm": {"model": read_model_config(rm / "model_config.yaml"), "tokenizer": tokenizer},
    }


ONLINE_ALGORITHMS = ("ppo", "grpo", "dr_grpo", "rloo", "reinforce_pp", "rs")  # the report's key of the online stage


def _fmt(before, after, spec="{:.3f}") -> str:
    return f"{spec.format(before)} -> {spec.format(after)}"


def format_report(rep: dict) -> str:
    """The printed report of a pipeline run (``report.json`` holds every figure)."""
    wall = rep["wall_s"]
    lines = ["=" * 78, "nemo-rlhf demo report", f"  run dir: {rep['run_dir']}"]
    if rep.get("base_model"):
        lines.append(f"  base model: {rep['base_model']}")
    if "sft" in rep:
        s = rep["sft"]
        lines.append(f"  SFT   validation loss (nats/token, held-out): {_fmt(s['val_before']['nll'], s['val_after']['nll'])}"
                     f"   [{s['steps']} steps, {wall['sft']:.0f} s]")
    if "rm" in rep:
        r = rep["rm"]
        lines.append(f"  RM    pairwise accuracy on {r['val_after']['pairs']} held-out pairs: "
                     f"{_fmt(r['val_before']['accuracy'], r['val_after']['accuracy'])}   [{r['steps']} steps, {wall['rm']:.0f} s]")
    online = next((k for k in ONLINE_ALGORITHMS if k in rep), None)
    if online:
        p = rep[online]
        b, a = p["heldout_before"], p["heldout_after"]
        lines.append(f"  {online.upper():<5} {p['heldout_prompts_evaluated']} held-out prompts, same sampling seed "
                     f"before/after [{p['steps']} steps, {wall[online]:.0f} s]")
        kl = f";  KL to reference {_fmt(b['kl'], a['kl'])} nats/response" if "kl" in a else ""
        lines.append(f"        reward-model score {b['reward']:+.3f} -> {a['reward']:+.3f}{kl}")
        for r in p.get("rounds", []):  # rejection sampling: the held-out evaluation after each round
            h = r.get("heldout", {})
            lines.append(f"        round {r.get('round')}: held-out reward-model score {h.get('reward', float('nan')):+.3f}"
                         + (f", VADER positive {h['vader_positive']:.3f}" if "vader_positive" in h else ""))
        for when, curve in (p.get("best_of_n") or {}).items():
            if curve:
                lines.append(f"        best-of-n ({when}): {json.dumps(curve)}")
        if "vader_positive" in a:
            lines.append(f"        VADER (independent judge): positive fraction {_fmt(b['vader_positive'], a['vader_positive'])}"
                         f";  mean compound {b['vader_compound']:+.3f} -> {a['vader_compound']:+.3f}")
        if "vader_rm_agreement" in a:
            lines.append(f"        VADER / reward-model agreement on the same samples (sign; RM cut at its median): "
                         f"{b['vader_rm_agreement']:.2f} before, {a['vader_rm_agreement']:.2f} after")
        for i, (sb, sa) in enumerate(rep.get("samples", [])):
            lines.append(f"  sample {i + 1}: prompt {sb['prompt']!r}")
            for label, row in (("before", sb), ("after: ", sa)):
                text, score = row.get("completion", row.get("response")), row.get("rm_score", row.get("reward"))
                lines.append(f"     {label} {text!r}  (RM {score:+.2f}"
                             + (f", VADER {row['vader_compound']:+.2f})" if row.get("vader_compound") is not None
                                else ")"))
        lines.append(f"  critic server start: {wall['server_start']:.0f} s")
        for failure in p.get("server_restarts", []):
            lines.append(f"  critic server restarted after: {failure}")
    if "dpo" in rep:
        lines.extend(format_dpo(rep["dpo"], wall, rep.get("dpo_samples", [])))
    if "ilql" in rep:
        lines.extend(format_ilql(rep["ilql"], wall["ilql"], rep.get("ilql_samples", [])))
    if rep.get("plot"):
        lines.append(f"  plot: {rep['plot']}")
    lines.append(f"  total wall time: {wall['total']:.0f} s")
    lines.append("=" * 78)
    return "\n".join(lines)


def format_ilql(r: dict, wall_s: float, samples: list) -> list[str]:
    """The report lines of the ILQL stage: held-out figures before -> after at ``ilql.beta`` (and
    the other ``ilql.eval_betas``), the behaviour data's reward, sample continuations."""
    b, a = r["heldout_before"], r["heldout_after"]
    lines = [f"  ILQL  {r['offline_rows']} offline rows, {r['heldout_prompts']} held-out prompts, same sampling seed "
             f"before/after [{r['steps']} steps, {wall_s:.0f} s]; decoding beta {r['beta']:g}"]
    if "reward" in a:
        lines.append(f"        held-out reward {_fmt(b['reward'], a['reward'], '{:+.3f}')}  (behaviour data: "
                     f"{r['behaviour_reward']['mean']:+.3f})")
    if "vader_positive" in a:
        lines.append(f"        VADER (independent judge), positive fraction at beta {r['beta']:g}: "
                     f"{_fmt(b['vader_positive'], a['vader_positive'])};  mean compound {b['vader_compound']:+.3f} -> "
                     f"{a['vader_compound']:+.3f}")
    if "vader_positive_beta0" in a and r["beta"] != 0:
        lines.append(f"        base policy (before, beta 0: the heads unused) {b['vader_positive_beta0']:.3f} -> ILQL "
                     f"(after, beta {r['beta']:g}) {a['vader_positive']:.3f};  after at beta 0 (the trained LM "
                     f"alone): {a['vader_positive_beta0']:.3f}")
    for key in sorted(k for k in a if "_beta" in k and not k.startswith("vader_positive")):
        lines.append(f"        {key}: {_fmt(b.get(key, float('nan')), a[key])}")
    for i, (sb, sa) in enumerate(samples):
        lines.append(f"  sample {i + 1}: prompt {sb['prompt']!r}")
        for label, row in ((f"before (beta {sb.get('beta', r['beta']):g}):", sb),
                           (f"after (beta {sa.get('beta', r['beta']):g}): ", sa)):
            judged = f"  (VADER {row['vader_compound']:+.2f})" if row.get("vader_compound") is not None else ""
            lines.append(f"     {label} {row['response']!r}{judged}")
    return lines


def format_dpo(d: dict, wall: dict, samples: list) -> list[str]:
    """The report lines of the DPO stage: held-out implicit-reward accuracy and margin before -> after,
    then the judge (win rate against the start policy under the reward model, mean scores, KL) and
    the first judged samples (rows of ``dpo_samples.jsonl``)."""
    b, a, j = d["val_before"], d["val_after"], d.get("judge") or {}
    lines = [f"  DPO   held-out implicit-reward accuracy on {a['pairs']} pairs: "
             f"{_fmt(b['rewards/accuracies'], a['rewards/accuracies'])};  margin "
             f"{_fmt(b['rewards/margins'], a['rewards/margins'], '{:+.3f}')}   "
             f"[{d['steps']} steps, {wall['dpo']:.0f} s]"]
    if j:
        lines.append(f"        judge: {j['prompts']} held-out prompts, one response each from the start policy and "
                     f"the DPO policy, same sampling seed [{wall.get('dpo_judge', 0.0):.0f} s]")
        if j.get("win_rate") is not None:
            lines.append(f"        DPO wins under the reward model: {j['win_rate']:.3f} (standard error "
                         f"{j['win_rate_se']:.3f}; {j['wins']} wins, "
                         f"{j['ties']} ties, {j['losses']} losses);  RM score "
                         f"{j['rm_score_mean']['reference']:+.3f} (start) vs {j['rm_score_mean']['policy']:+.3f} (DPO)")
        else:
            lines.append(f"        win rate: not measured ({j.get('win_rate_skipped', 'no reward model')})")
        lines.append(f"        KL(DPO || start policy) on the DPO samples: {j['kl_mean']:.3f} nats/response;  "
                     f"samples: {j.get('samples_file')}")
    for i, row in enumerate(samples):
        lines.append(f"  DPO sample {i + 1}: prompt {row['prompt'][-200:]!r}")
        for label, who in (("start:", "reference"), ("DPO:  ", "policy")):
            score = row.get(f"{who}_rm_score")
            lines.append(f"     {label} {row[f'{who}_response']!r}"
                         + (f"  (RM {score:+.2f})" if score is not None else ""))
    return lines


def before_after_samples(run_dir: Path, n: int, algorithm: str = "ppo",
                         beta: float | None = None) -> list[tuple[dict, dict]]:
    """The first ``n`` held-out samples of the first and the last evaluation in
    ``ppo_samples.jsonl`` (critic-free algorithms: ``grpo_samples.jsonl``; ILQL:
    ``ilql_samples.jsonl``; the same prompts: held-out batches are in order, sampled with one seed).
    ILQL (``beta``: its decoding beta): after = the samples at ``beta``; before = the first
    evaluation's beta-0 samples (the base policy, the gate's baseline) when it has them, else its
    samples at ``beta``."""
    from nemo_rlhf.utils.logging import read_jsonl

    path = run_dir / {"ppo": "ppo_samples.jsonl", "ilql": "ilql_samples.jsonl"}.get(algorithm, "grpo_samples.jsonl")
    if not path.exists():
        return []
    rows = list(read_jsonl(path))
    first, last = min(r["step"] for r in rows), max(r["step"] for r in rows)
    before = [r for r in rows if r["step"] == first]
    after = [r for r in rows if r["step"] == last]
    if beta is not None:
        base = [r for r in before if r.get("beta") == 0.0]
        before = base or [r for r in before if r.get("beta", beta) == beta]
        after = [r for r in after if r.get("beta", beta) == beta]
    return list(zip(before, after))[:n]


def _preempted(stage: str, result: dict) -> bool:
    """True (and a log line saying how to go on) when ``stage`` stopped on SIGTERM/SIGUSR1: its
    checkpoint is written, the later stages do not run, the same command resumes the pipeline."""
    if not result.get("preempted"):
        return False
    LOG.warning("pipeline stopped: stage %s preempted by %s at step %s (checkpoint %s); run the same command "
                "to resume", stage, result.get("signal"), result.get("steps"), result.get("resume_from"))
    return True


@hydra_entry("demo")
def main(cfg) -> None:
    from nemo_rlhf.algorithms.ilql import run_ilql
    from nemo_rlhf.algorithms.reward_model import run_reward_model
    from nemo_rlhf.algorithms.sft import run_sft
    from nemo_rlhf.config import DemoConfig, parse_config
    from nemo_rlhf.parallel.state import destroy_distributed
    from nemo_rlhf.servers.client import CriticClient
    from nemo_rlhf.servers.process import find_free_ports, start_server_process
    from nemo_rlhf.utils.plot import plot_ppo_metrics

    parse_config(DemoConfig, cfg)  # stage order, sections, sizes: one clear error before any work
    t0 = time.time()
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    stages = list(cfg.stages)
    wall: dict = {}
    report: dict = {"run_dir": str(run_dir), "wall_s": wall}
    try:
        t = time.time()
        base = prepare_base_models(cfg)
        if base:
            wall["base_model"] = time.time() - t
            report["base_model"] = str(cfg.base_model) + (f" (reward model / critic: first {cfg.rm_num_layers} layers)"
                                                          if cfg.rm_num_layers else "")
        tokenizer = base.get("policy", {}).get("tokenizer")
        policy_init = base.get("policy_weights")
        if "sft" in stages:
            t = time.time()
            sft = run_sft(stage_config("gpt_sft", cfg, "sft", base=base.get("policy"), run_dir=str(run_dir),
                                       **({"init_from": policy_init} if policy_init else {})))
            wall["sft"] = time.time() - t
            report["sft"] = sft
            if _preempted("sft", sft):
                return
            policy_init = sft["checkpoint"]
            if tokenizer is None:
                tokenizer = {"type": "tokenizer_json", "path": sft["tokenizer"]}
        # The reward model starts from the SFT policy (InstructGPT), or from the base model when there
        # is no SFT stage or when ``rm_num_layers`` asks for a truncated (cheaper) scorer.
        rm_from_base = "sft" not in stages or bool(cfg.rm_num_layers)
        rm_base = base.get("rm") if rm_from_base else base.get("policy")
        rm = None
        if "rm" in stages:
            t = time.time()
            rm_cfg = stage_config("gpt_rm", cfg, "rm", base=rm_base, run_dir=str(run_dir),
                                  init_from=base["rm_weights"] if rm_from_base else policy_init, tokenizer=tokenizer)
            rm = run_reward_model(rm_cfg)
            wall["rm"] = time.time() - t
            report["rm"] = rm
            if _preempted("rm", rm):
                return
            # The server's reward model reads its head as the trained one did.
            rm["reward_pooling"] = str(rm_cfg.model.get("reward_pooling") or "last")
        if "ppo" in stages:  # the online RL stage: PPO or the critic-free cfg.algorithm
            online = run_online_stage(cfg, run_dir, base, rm_base, tokenizer, policy_init, rm, wall,
                                      CriticClient, find_free_ports, start_server_process)
            report.update(online)
            name = next(iter(online))
            if _preempted(name, online[name]):
                return
            if name == "ppo":
                report["plot"] = str(plot_ppo_metrics(run_dir / "metrics.jsonl", run_dir / "ppo_reward_kl.png"))
            if name != "rs":
                report["samples"] = before_after_samples(run_dir, int(cfg.report_samples), name)
        if "dpo" in stages:  # DPO from the pipeline's policy on the data set's preference pairs, then the judge
            from nemo_rlhf.algorithms.dpo import run_dpo
            from nemo_rlhf.config import DPOStageConfig, RewardModelStageConfig, load_stage_config
            from nemo_rlhf.evaluation.judge import judge_checkpoints
            from nemo_rlhf.utils.logging import read_jsonl

            t = time.time()
            dpo_cfg = stage_config("gpt_dpo", cfg, "dpo", base=base.get("policy"), run_dir=str(run_dir),
                                   init_from=policy_init, tokenizer=tokenizer)
            dpo = run_dpo(dpo_cfg)
            wall["dpo"] = time.time() - t
            report["dpo"] = dpo
            if _preempted("dpo", dpo):
                return
            # The judge: the start policy (DPO's reference) vs the DPO policy, same sampling seed, scored
            # by the rm stage's reward model (none: the KL alone).
            t = time.time()
            typed = load_stage_config(DPOStageConfig, dpo_cfg, stage="dpo")
            rm_model = load_stage_config(RewardModelStageConfig, rm_cfg, stage="rm").model if rm else None
            judge = judge_checkpoints(dpo["checkpoint"], policy_init, typed.model, typed.tokenizer, typed.data,
                                      cfg.dpo_judge, reward_weights=rm["checkpoint"] if rm else None,
                                      reward_model_cfg=rm_model, out=run_dir / "dpo_samples.jsonl",
                                      accelerator=typed.trainer.accelerator)
            if not rm:
                judge["win_rate_skipped"] = "no rm stage in stages: no reward model to judge with"
            dpo["judge"] = judge
            wall["dpo_judge"] = time.time() - t
            report["dpo_samples"] = read_jsonl(run_dir / "dpo_samples.jsonl")[: int(cfg.report_samples)]
        if "ilql" in stages:  # offline RL on the data set's {prompt, response, reward} rows
            t = time.time()
            ilql = run_ilql(stage_config("gpt_ilql", cfg, "ilql", base=base.get("policy"), run_dir=str(run_dir),
                                         tokenizer=tokenizer, **({"init_from": policy_init} if policy_init else {})))
            wall["ilql"] = time.time() - t
            report["ilql"] = ilql
            if _preempted("ilql", ilql):
                return
            report["ilql_samples"] = before_after_samples(run_dir, int(cfg.report_samples), "ilql",
                                                          beta=float(ilql["beta"]))
        wall["total"] = time.time() - t0
        (run_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
        print(format_report(report), flush=True)
    finally:
        destroy_distributed()


def run_online_stage(cfg, run_dir: Path, base: dict, rm_base, tokenizer, policy_init, rm: dict, wall: dict,
                     CriticClient, find_free_ports, start_server_process, run_stage=None) -> dict:
    """Start the critic/reward server on the trained reward model, run the online stage against
    it (``cfg.algorithm``: PPO, which also trains the server's critic; or a critic-free trainer
    rewarded by the server's reward model, ``grpo`` section), stop it. Returns
    ``{algorithm: result}``.

    A server that dies mid-run (PPO raises ``CriticServerFailure`` after its emergency checkpoint,
    or ``CriticServerError`` before its first step) is started again, at most ``server_restarts``
    times, and the stage resumes from its newest checkpoint (PPO: the paired actor+critic one;
    ``checkpoint.every_n_steps`` bounds the steps redone); the failures are listed in the report
    (``<algorithm>.server_restarts``). ``run_stage(cfg, critic=client)``: the stage's runner (None:
    ``run_ppo``, ``run_rejection_sampling`` or ``run_critic_free`` by ``cfg.algorithm``)."""
    from nemo_rlhf.algorithms.ppo import CriticServerFailure
    from nemo_rlhf.servers.protocol import CriticServerError

    port = int(cfg.server_port) if cfg.server_port else find_free_ports(3)[0]
    critic_cfg = stage_config("gpt_ppo_critic", cfg, "critic", base=rm_base,
                              model={"reward_pooling": rm["reward_pooling"]})
    overrides = [f"reward_model_path={rm['checkpoint']}", f"server.port={port}", f"server.grpc_port={port + 1}",
                 f"server.metrics_port={port + 2}", f"run_dir={run_dir}",
                 f"trainer.accelerator={critic_cfg.trainer.accelerator}"]
    for key, value in dotted_leaves({"tokenizer": dict(tokenizer)}, ""):
        overrides.append(f"{key.lstrip('.')}={value}")
    if cfg.common.data.get("data_dir"):
        overrides.append(f"data.data_dir={cfg.common.data.data_dir}")
    # Forward the model settings (base model, common, critic section) to the server process.
    for key, value in dotted_leaves(critic_cfg.model, "model"):
        overrides.append(f"{key}={'null' if value is None else value}")
    cmd = [sys.executable, str(REPO / "launchers" / "serve_critic.py"), *overrides]
    ppo_restarts: list[str] = []
    # One access token per demo run (inherited by the server process, read by the client).
    os.environ.setdefault("NEMO_RLHF_CRITIC_TOKEN", secrets.token_urlsafe(32))
    algorithm = str(cfg.algorithm)
    common = dict(base=base.get("policy"), run_dir=str(run_dir), init_from=policy_init, tokenizer=tokenizer,
                  critic={"host": "127.0.0.1", "port": port})
    if algorithm == "ppo":
        from nemo_rlhf.algorithms.ppo import run_ppo as default_runner

        ppo_cfg = stage_config("gpt_ppo_actor", cfg, "ppo", **common)
    elif algorithm == "rs":  # rejection-sampling rounds; the server's reward model scores the samples
        from nemo_rlhf.algorithms.rejection_sampling import run_rejection_sampling as default_runner

        ppo_cfg = stage_config("gpt_rs_rm", cfg, "rs", **common)
    else:  # the server's reward model rewards; its critic is never trained
        from nemo_rlhf.algorithms.critic_free import run_critic_free as default_runner

        ppo_cfg = stage_config("gpt_grpo_rm", cfg, "grpo",
                               grpo={"algorithm": algorithm}, **common)
    run_stage = run_stage or default_runner
    wall[algorithm] = 0.0
    for attempt in range(int(cfg.server_restarts) + 1):
        t = time.time()
        server = start_server_process(cmd, "127.0.0.1", port, float(cfg.server_ready_timeout_s),
                                      run_dir / "critic_server.log")
        wall.setdefault("server_start", time.time() - t)
        try:
            t = time.time()
            with CriticClient.from_config(ppo_cfg.critic) as client:
                ppo = run_stage(ppo_cfg, critic=client)
            wall[algorithm] += time.time() - t
            break
        except (CriticServerFailure, CriticServerError) as exc:
            # The server died under the actor (its state since the last paired checkpoint is lost):
            # a fresh server, and PPO resumes from the newest paired actor+critic checkpoint.
            wall[algorithm] += time.time() - t
            if attempt == int(cfg.server_restarts):
                raise
            LOG.warning("critic server failed (%s); restarting it (restart %d of %d) and resuming %s from its "
                        "newest checkpoint", str(exc).splitlines()[0], attempt + 1, int(cfg.server_restarts),
                        algorithm)
            ppo_restarts.append(str(exc).splitlines()[0])
        finally:
            server.stop()
    if ppo.get("preempted"):  # SIGTERM/SIGUSR1: checkpointed; the same command resumes
        return {algorithm: ppo}
    ppo["server_restarts"] = ppo_restarts
    ppo["heldout_prompts_evaluated"] = min(ppo["heldout_prompts"],
                                           int(ppo_cfg.data.get("max_heldout_prompts") or ppo["heldout_prompts"]))
    return {algorithm: ppo}


if __name__ == "__main__":
    main()
