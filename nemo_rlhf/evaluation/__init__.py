"""Generate-and-score evaluation of policies: prompts -> completions -> reward-model score and
judges (VADER), as rows and summaries; behind ``launchers/generate.py`` and the examples'
before/after reports.

* :mod:`nemo_rlhf.evaluation.sources`: where a model comes from (a converted directory, a trainer's
  weights directory, an HF directory or a GGUF file) -> :func:`load_policy`,
  :func:`load_reward_model`.
* :mod:`nemo_rlhf.evaluation.generate`: :func:`evaluate_policy` (rows + summary),
  :func:`load_prompts_file`, :func:`write_outputs`, and :func:`run_generate` (the launcher's job).
* :mod:`nemo_rlhf.evaluation.judge`: :func:`compare_policies` (two policies, one sampling seed, one
  reward model: win rate with ties 1/2, mean scores, KL to the reference), :func:`win_rate`, and
  :func:`judge_checkpoints` (the DPO stage's judge in ``launchers/run_demo.py``).
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
from nemo_rlhf.evaluation.judge import compare_policies, judge_checkpoints, win_rate
from nemo_rlhf.evaluation.sources import (
    detect_format,
    ensure_world,
    load_policy,
    load_reward_model,
    resolve_source,
)

__all__ = ["compare_policies", "detect_format", "ensure_world", "evaluate_policy", "judge_checkpoints", "load_policy",
           "load_prompts", "load_prompts_file", "load_reward_model", "resolve_source", "reward_scorer", "run_generate",
           "summarize", "summary_path_for", "win_rate", "write_outputs"]
