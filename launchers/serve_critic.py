"""Entry point: `python launchers/serve_critic.py reward_model_path=... tokenizer.path=... [server.port=...]`.

Serves the critic (trained by the actor's requests) and the frozen reward model over PyTriton
(config: conf/gpt_ppo_critic.yaml) until SIGTERM/SIGINT. PyTriton has no authentication: keep
`server.host` on loopback or the cluster's private network.
"""

from nemo_rlhf.utils.hydra import hydra_entry


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
