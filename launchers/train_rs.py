"""Entry point: `python launchers/train_rs.py [hydra overrides]` (config: conf/gpt_rs.yaml).

Rejection-sampling fine-tuning (best-of-n SFT): `rs.num_rounds` rounds of sampling `rs.num_samples`
responses per prompt, keeping the best (`rs.selection=best`) or those above `rs.threshold`, and SFT
on them. Runs under a single process, `torchrun --nproc-per-node N` or SLURM `srun` (rank/world
from the environment); set `model.tensor_model_parallel_size` / `model.pipeline_model_parallel_size`
and `trainer.accelerator=gpu` on GPU clusters. With `reward.reward_model=true` a reward-model server
(launchers/serve_critic.py) must be running at `critic.host:critic.port`.
"""

from nemo_rlhf.config import register_configs
from nemo_rlhf.utils.hydra import hydra_entry

register_configs()  # the typed schemas the YAMLs in conf/ extend


@hydra_entry("gpt_rs")
def main(cfg) -> None:
    from nemo_rlhf.algorithms.rejection_sampling import run_rejection_sampling
    from nemo_rlhf.parallel.state import destroy_distributed

    try:
        run_rejection_sampling(cfg)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
