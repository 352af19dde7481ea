"""The main job: SFT -> reward model -> PPO with a PyTriton critic server, on CPU, in one command.

    python launchers/run_demo.py [overrides]        (config: conf/demo.yaml)

SFT and reward-model training run in this process; the critic/reward server runs as a separate
process (``launchers/serve_critic.py``) that this launcher starts, health-checks and always stops;
then the PPO actor trains against it. The run directory gets every stage's checkpoint,
``metrics.jsonl``, ``ppo_reward_kl.png`` and ``report.json``; a short report is printed.
"""

import json
import os
import secrets
import sys
import time
from pathlib import Path

from nemo_rlhf.config import register_configs
from nemo_rlhf.utils.hydra import dotted_leaves, hydra_entry

register_configs()  # the typed schemas the YAMLs in conf/ extend

REPO = Path(__file__).resolve().parents[1]


def stage_config(name: str, demo_cfg, section: str, **extra):
    """conf/<name>.yaml merged with the demo's `common` (the sections that stage has), the demo's
    stage section and `extra` (see nemo_rlhf.config.demo_stage_node)."""
    from hydra import compose

    from nemo_rlhf.config import demo_stage_node

    return demo_stage_node(compose(config_name=name), demo_cfg, section, **extra)


def format_report(rep: dict) -> str:
    s, r, p = rep["sft"], rep["rm"], rep["ppo"]
    lines = [
        "=" * 72,
        "nemo-rlhf demo report",
        f"  run dir: {rep['run_dir']}",
        f"  SFT   validation loss (nats/token, held-out HH): {s['val_before']['nll']:.3f} -> {s['val_after']['nll']:.3f}"
        f"   [{s['steps']} steps, {rep['wall_s']['sft']:.0f} s]",
        f"  RM    accuracy on {r['val_after']['pairs']} held-out HH pairs: {r['val_before']['accuracy']:.3f} -> "
        f"{r['val_after']['accuracy']:.3f}   [{r['steps']} steps, {rep['wall_s']['rm']:.0f} s]",
        f"  PPO   held-out prompts ({p['heldout_prompts_evaluated']}): mean RM score "
        f"{p['heldout_before']['reward']:+.3f} -> {p['heldout_after']['reward']:+.3f};  "
        f"KL to reference {p['heldout_before']['kl']:.3f} -> {p['heldout_after']['kl']:.3f} nats"
        f"   [{p['steps']} steps, {rep['wall_s']['ppo']:.0f} s]",
        f"  critic server start: {rep['wall_s']['server_start']:.0f} s;  total wall time: {rep['wall_s']['total']:.0f} s",
        f"  plot: {rep['plot']}",
        "=" * 72,
    ]
    return "\n".join(lines)


@hydra_entry("demo")
def main(cfg) -> None:
    from nemo_rlhf.algorithms.ppo import run_ppo
    from nemo_rlhf.algorithms.reward_model import run_reward_model
    from nemo_rlhf.algorithms.sft import run_sft
    from nemo_rlhf.parallel.state import destroy_distributed
    from nemo_rlhf.servers.client import CriticClient
    from nemo_rlhf.servers.process import find_free_ports, start_server_process
    from nemo_rlhf.utils.plot import plot_ppo_metrics

    t0 = time.time()
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    wall = {}
    try:
        t = time.time()
        sft = run_sft(stage_config("gpt_sft", cfg, "sft", run_dir=str(run_dir)))
        wall["sft"] = time.time() - t
        tok_path = sft["tokenizer"]
        t = time.time()
        rm = run_reward_model(stage_config("gpt_rm", cfg, "rm", run_dir=str(run_dir), init_from=sft["checkpoint"],
                                           tokenizer={"type": "tokenizer_json", "path": tok_path}))
        wall["rm"] = time.time() - t

        port = int(cfg.server_port) if cfg.server_port else find_free_ports(3)[0]
        critic_cfg = stage_config("gpt_ppo_critic", cfg, "critic")
        overrides = [f"reward_model_path={rm['checkpoint']}", f"tokenizer.path={tok_path}",
                     f"server.port={port}", f"server.grpc_port={port + 1}", f"server.metrics_port={port + 2}",
                     f"run_dir={run_dir}", f"trainer.accelerator={critic_cfg.trainer.accelerator}"]
        if cfg.common.data.get("data_dir"):
            overrides.append(f"data.data_dir={cfg.common.data.data_dir}")
        # Forward the demo's critic/common model settings to the server process.
        for key, value in dotted_leaves(critic_cfg.model, "model"):
            overrides.append(f"{key}={'null' if value is None else value}")
        cmd = [sys.executable, str(REPO / "launchers" / "serve_critic.py"), *overrides]
        # One access token per demo run (inherited by the server process, read by the client).
        os.environ.setdefault("NEMO_RLHF_CRITIC_TOKEN", secrets.token_urlsafe(32))
        t = time.time()
        server = start_server_process(cmd, "127.0.0.1", port, float(cfg.server_ready_timeout_s),
                                      run_dir / "critic_server.log")
        wall["server_start"] = time.time() - t
        try:
            ppo_cfg = stage_config("gpt_ppo_actor", cfg, "ppo", run_dir=str(run_dir), init_from=sft["checkpoint"],
                                   tokenizer={"type": "tokenizer_json", "path": tok_path},
                                   critic={"host": "127.0.0.1", "port": port})
            t = time.time()
            with CriticClient.from_config(ppo_cfg.critic) as client:
                ppo = run_ppo(ppo_cfg, critic=client)
            wall["ppo"] = time.time() - t
        finally:
            server.stop()
        plot = plot_ppo_metrics(run_dir / "metrics.jsonl", run_dir / "ppo_reward_kl.png")
        wall["total"] = time.time() - t0
        ppo["heldout_prompts_evaluated"] = min(ppo["heldout_prompts"],
                                               int(ppo_cfg.data.get("max_heldout_prompts") or ppo["heldout_prompts"]))
        report = {"run_dir": str(run_dir), "sft": sft, "rm": rm, "ppo": ppo, "wall_s": wall, "plot": str(plot)}
        (run_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
        print(format_report(report), flush=True)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
