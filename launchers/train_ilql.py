"""Entry point: `python launchers/train_ilql.py [hydra overrides]` (config: conf/gpt_ilql.yaml).

ILQL (Snell et al. 2022) on offline {prompt, response, reward} rows (`data.files`), evaluated by
decoding the held-out prompts (`data.heldout_files`) with the heads' shifted logits and scoring them
with `reward.functions`. Runs under a single process, `torchrun --nproc-per-node N` or SLURM `srun`
(rank/world from the environment; any model.tensor_model_parallel_size / pipeline_model_parallel_size
/ sequence_parallel, as the other stages); set
`trainer.accelerator=gpu` on GPU clusters.
"""

from nemo_rlhf.config import register_configs
from nemo_rlhf.utils.hydra import hydra_entry

register_configs()  # the typed schemas the YAMLs in conf/ extend


@hydra_entry("gpt_ilql")
def main(cfg) -> None:
    from nemo_rlhf.algorithms.ilql import run_ilql
    from nemo_rlhf.parallel.state import destroy_distributed

    try:
        run_ilql(cfg)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
