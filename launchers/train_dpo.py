"""Entry point: `python launchers/train_dpo.py [hydra overrides]` (config: conf/gpt_dpo.yaml).

DPO, conservative DPO (label smoothing), robust DPO, IPO, RPO or SimPO
(`dpo.loss_type=sigmoid|robust|ipo|rpo|simpo`) from the SFT weights (`init_from`). Runs under a
single process, `torchrun --nproc-per-node N` or SLURM `srun` (rank/world from the environment);
set `model.tensor_model_parallel_size` / `model.pipeline_model_parallel_size` and
`trainer.accelerator=gpu` on GPU clusters.
"""

from nemo_rlhf.config import register_configs
from nemo_rlhf.utils.hydra import hydra_entry

register_configs()  # the typed schemas the YAMLs in conf/ extend


@hydra_entry("gpt_dpo")
def main(cfg) -> None:
    from nemo_rlhf.algorithms.dpo import run_dpo
    from nemo_rlhf.parallel.state import destroy_distributed

    try:
        run_dpo(cfg)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
