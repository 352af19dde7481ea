"""Generate-and-score evaluation of policies: prompts -> completions -> reward-model score and
judges (VADER), as rows and summaries; behind ``launchers/generate.py`` and the examples'
before/after reports."""
