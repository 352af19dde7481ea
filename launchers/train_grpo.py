"""Entry point: `python launchers/train_grpo.py [hydra overrides]` (config: conf/gpt_grpo.yaml).

GRPO, Dr.GRPO, RLOO or REINFORCE++ (`grpo.algorithm=grpo|dr_grpo|rloo|reinforce_pp`). Runs under a
single process, `torchrun --nproc-per-node N` or SLURM `srun` (rank/world from the environment);
set `model.tensor_model_parallel_size` / `model.pipeline_model_parallel_size` and
`trainer.accelerator=gpu` on GPU clusters. With `reward.reward_model=true` a reward-model server
(launchers/serve_critic.py) must be running at `critic.host:critic.port`.
"""

from nemo_rlhf.config import register_configs
from nemo_rlhf.utils.hydra import hydra_entry

register_configs()  # the typed schemas the YAMLs in conf/ extend


@hydra_entry("gpt_grpo")
def main(cfg) -> None:
    from nemo_rlhf.algorithms.critic_free import run_critic_free
    from nemo_rlhf.parallel.state import destroy_distributed

    try:
        run_critic_free(cfg)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
