"""Entry point: `python launchers/train_ppo_actor.py [hydra overrides]` (config: conf/gpt_ppo_actor.yaml).

Runs under a single process, `torchrun --nproc-per-node N` or SLURM `srun` (rank/world from the
environment); set `model.tensor_model_parallel_size` / `model.pipeline_model_parallel_size` and
`trainer.accelerator=gpu` on GPU clusters.
"""

from nemo_rlhf.config import register_configs
from nemo_rlhf.utils.hydra import hydra_entry

register_configs()  # the typed schemas the YAMLs in conf/ extend


@hydra_entry("gpt_ppo_actor")
def main(cfg) -> None:
    from nemo_rlhf.algorithms.ppo import run_ppo
    from nemo_rlhf.parallel.state import destroy_distributed

    try:
        run_ppo(cfg)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
