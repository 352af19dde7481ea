"""Generate-and-score evaluation of policies: prompts -> completions -> reward-model score and
judges (VADER), as rows and summaries; behind ``launchers/generate.py`` and the examples'
before/after reports.

* :mod:`nemo_rlhf.evaluation.sources`: where a model comes from (a converted directory, a trainer's
  weights directory, an HF directory or a GGUF file) -> :func:`load_policy`,
  :func:`load_reward_model`.
* :mod:`nemo_rlhf.evaluation.generate`: :func:`evaluate_policy` (rows + summary),
  :func:`load_prompts_file`, :func:`write_outputs`, and :func:`run_generate` (the launcher's job).
"""

from nemo_rlhf.evaluation.generate import (
    evaluate_policy,
    load_prompts,
    load_prompts_file,
    reward_scorer,
    run_generate,
    summarize,
    summary_path_for,
    write_outputs,
)
from nemo_rlhf.evaluation.sources import (
    detect_format,
    ensure_world,
    load_policy,
    load_reward_model,
    resolve_source,
)

__all__ = ["detect_format", "ensure_world", "evaluate_policy", "load_policy", "load_prompts", "load_prompts_file",
           "load_reward_model", "resolve_source", "reward_scorer", "run_generate", "summarize", "summary_path_for",
           "write_outputs"]
