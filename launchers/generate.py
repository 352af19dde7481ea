"""Entry point: `python launchers/generate.py policy.path=<source> out=<file.jsonl> [overrides]`
(config: conf/generate.yaml; every key: nemo_rlhf/config.py GenerateConfig).

Generates one completion per prompt and writes one JSONL row per prompt (prompt, completion, token
counts, finish reason, and when asked the reward-model score, KL to a reference policy and the
VADER compound) plus ``<out>.summary.json``. Examples::

    # a converted model (python -m nemo_rlhf.convert gguf-to-megatron --smollm2 --out /tmp/smol)
    python launchers/generate.py policy.path=/tmp/smol prompts.file=prompts.jsonl out=gen.jsonl \\
        sampling.max_new_tokens=32 score.vader=true
    # a trained actor against its reference, scored by the reward model, on IMDB held-out prompts
    python launchers/generate.py policy.path=runs/demo/ppo_actor_weights reference.path=/tmp/smol \\
        model=smollm2_135m tokenizer.type=hf tokenizer.path=/tmp/smol score.reward.path=runs/demo/rm_weights \\
        data.dataset=imdb 'data.files=[imdb/train.jsonl.gz]' 'data.heldout_files=[imdb/valid.jsonl.gz]' \\
        prompts.max_prompts=64 out=runs/demo/after.jsonl score.vader=true

A misspelt key stops before anything is loaded, naming the nearest valid key (ConfigError).
"""

import sys

from nemo_rlhf.config import (
    ConfigError,
    GenerateConfig,
    explain_unknown_key,
    register_configs,
)
from nemo_rlhf.utils.hydra import CONF_DIR, hydra_entry

register_configs()  # the typed schemas the YAMLs in conf/ extend

CONFIG_NAME = "generate"


def check_overrides(overrides: list[str]) -> None:
    """Compose ``conf/generate.yaml`` with the command-line ``overrides`` (no model is loaded).

    Raises:
        ConfigError: an unknown key (``unknown key 'temprature' in section 'sampling' (did you
            mean 'temperature'?)``) or a value Hydra cannot assign (its message).
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        try:
            compose(CONFIG_NAME, [o for o in overrides if not o.startswith("hydra.")])
        except ConfigCompositionException as exc:
            raise ConfigError(explain_unknown_key(exc, GenerateConfig) or str(exc.__cause__ or exc)) from None


@hydra_entry(CONFIG_NAME)
def main(cfg) -> None:
    """Run :func:`nemo_rlhf.evaluation.generate.run_generate`; a bad input (config value, missing or
    malformed file, checkpoint that does not load, unreachable critic server) prints one
    ``error: <type>: <message>`` line and exits with status 2 (``log_level=DEBUG``: the traceback)."""
    import logging

    from nemo_rlhf.checkpoint.weights import CheckpointError
    from nemo_rlhf.evaluation.generate import run_generate
    from nemo_rlhf.servers.protocol import CriticServerError

    try:
        run_generate(cfg)
    except (ValueError, FileNotFoundError, ImportError, CheckpointError, CriticServerError) as exc:
        if logging.getLogger("nemo_rlhf").isEnabledFor(logging.DEBUG):
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    try:
        check_overrides([a for a in sys.argv[1:] if "=" in a and not a.startswith("-")])
    except ConfigError as exc:
        print(f"error: ConfigError: {exc}", file=sys.stderr)
        sys.exit(2)
    main()
