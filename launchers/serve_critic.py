"""Entry point: `python launchers/serve_critic.py reward_model_path=... tokenizer.path=... [server.port=...]`.

Serves the critic (trained by the actor's requests) and the frozen reward model over PyTriton
(config: conf/gpt_ppo_critic.yaml) until SIGTERM/SIGINT. No TLS: keep `server.host` on loopback or
the cluster's private network. Authentication is on when the environment variable named by
`server.auth_token_env` (default NEMO_RLHF_CRITIC_TOKEN) or `server.auth_token` holds a token;
critic_save/critic_load are confined to `server.checkpoint_root` (default `run_dir`).
See docs/reliability.md ("Security").
"""

from nemo_rlhf.config import register_configs
from nemo_rlhf.utils.hydra import hydra_entry

register_configs()  # the typed schemas the YAMLs in conf/ extend


@hydra_entry("gpt_ppo_critic")
def main(cfg) -> None:
    from nemo_rlhf.servers.serve import serve_critic
    from nemo_rlhf.parallel.state import destroy_distributed

    try:
        serve_critic(cfg)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
