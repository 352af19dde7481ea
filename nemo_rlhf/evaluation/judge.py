"""Head-to-head judging of two policies: the same prompts, the same sampling seed, one reward model.

Behind the DPO stage's judge in ``launchers/run_demo.py`` (``dpo_judge:``, issue 14 section 1: "its
held-out responses win against the SFT policy's under the reward model in >= 60 % of prompts (same
sampling seed), with the KL to the reference reported")::

    prompts (N strings) --evaluate_policy(reference, seed s)--> reference responses, rm_score [N]
                        --evaluate_policy(policy, seed s, reference)--> policy responses, rm_score [N],
                                                                        kl [N] (k1, nats per response)
      -> win_rate(policy rm_score, reference rm_score): wins + ties / 2 over N

Both policies sample with the same seed, batch size and sampling parameters
(:func:`~nemo_rlhf.evaluation.generate.evaluate_policy`: batch k is seeded ``seed + 1000003 k``), so
two policies with the same weights give the same responses token for token (win rate 1/2, KL 0), and
where the policies differ the responses differ because of the weights, not the random stream.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nemo_rlhf.config import DPOJudgeConfig, parse_config, to_plain
from nemo_rlhf.data.tasks import load_split_prompts
from nemo_rlhf.data.tokenizer import Tokenizer
from nemo_rlhf.evaluation.generate import evaluate_policy, write_outputs

__all__ = ["compare_policies", "heldout_judge_prompts", "judge_checkpoints", "win_rate"]


def win_rate(scores: Sequence[float] | np.ndarray | torch.Tensor,
             baseline: Sequence[float] | np.ndarray | torch.Tensor) -> dict[str, Any]:
    """How often ``scores`` beat ``baseline``, prompt by prompt (ties count one half).

    Args:
        scores: ``[N]`` the challenger's scores (e.g. reward-model scores of the DPO policy's
            responses), any float dtype.
        baseline: ``[N]`` the baseline's scores of the same ``N`` prompts, same order.

    Returns:
        ``{"win_rate": (wins + ties / 2) / N, "win_rate_se", "wins", "ties", "losses", "prompts": N}``;
        a tie is an exactly equal score (the same response scores the same). ``win_rate_se`` is the
        standard error of that mean over the prompts: the sample standard deviation (ddof 1) of the
        per-prompt outcomes (1 win, 1/2 tie, 0 loss) over sqrt(N); 0.0 for one prompt. It says how
        far a second draw of N prompts may land (e.g. 0.035 at N = 192 near 0.6).

    Raises:
        ValueError: different lengths, no prompt, or a non-finite score (naming the first index).
    """
    a = np.asarray(torch.as_tensor(scores, dtype=torch.float64).reshape(-1))
    b = np.asarray(torch.as_tensor(baseline, dtype=torch.float64).reshape(-1))
    if a.shape != b.shape:
        raise ValueError(f"win_rate: {a.shape[0]} scores but {b.shape[0]} baseline scores")
    if a.size == 0:
        raise ValueError("win_rate: no scores")
    for name, x in (("scores", a), ("baseline", b)):
        bad = np.flatnonzero(~np.isfinite(x))
        if bad.size:
            raise ValueError(f"win_rate: {name}[{int(bad[0])}] = {x[bad[0]]} is not finite")
    win, tie = a > b, a == b
    wins, ties, n = int(win.sum()), int(tie.sum()), int(a.size)
    outcome = win + 0.5 * tie  # [N] float64: 1 win, 1/2 tie, 0 loss
    se = float(outcome.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    return {"win_rate": (wins + 0.5 * ties) / n, "win_rate_se": se, "wins": wins, "ties": ties,
            "losses": n - wins - ties, "prompts": n}


@torch.no_grad()
def compare_policies(policy, reference, tokenizer: Tokenizer, prompts: Sequence[str], sampling: Any = None, *,
                     seed: int = 1234, batch_size: int = 16, reward: Any = None, max_prompt_len: int | None = None,
                     overlong: str = "truncate", chat_template: bool = False,
                     progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One response per prompt from ``reference`` and from ``policy`` with the same sampling seed;
    both scored by ``reward``; the policy's KL to the reference on its own responses.

    Args:
        policy: the challenger (e.g. the DPO policy), a
            :class:`~nemo_rlhf.models.policy.GPTPolicyModel`.
        reference: the baseline and KL reference (e.g. the SFT policy DPO started from), same tokenizer.
        tokenizer: the policies' tokenizer.
        prompts: ``N`` prompt strings (already chat-formatted, or see ``chat_template``).
        sampling: :class:`~nemo_rlhf.config.SamplingConfig` or its mapping (None: its defaults);
            ``max_new_tokens`` bounds each response (tokens).
        seed, batch_size: the sampling seed and prompts per ``generate`` call, the same for both
            policies (see :func:`~nemo_rlhf.evaluation.generate.evaluate_policy`).
        reward: the judge (anything :func:`~nemo_rlhf.evaluation.generate.reward_scorer` takes: a
            reward model in process, a critic client, a callable ``(tokens [B, S], lengths [B]) ->
            [B]``); None: no scores and no win rate (the KL is still measured).
        max_prompt_len, overlong, chat_template: as :func:`~nemo_rlhf.evaluation.generate.evaluate_policy`.
        progress: progress bars.

    Returns:
        ``(rows, summary)``. One row per kept prompt, in prompt order: ``index``, ``prompt``,
        ``reference_response``, ``policy_response`` (decoded, EOS stripped),
        ``reference_tokens``, ``policy_tokens`` (generated tokens, EOS not counted), ``kl``
        (sum over the policy response's tokens, EOS included, of ``log pi - log pi_ref``: the k1
        estimate of KL(policy || reference), nats, as the PPO / GRPO held-out evaluations), and with
        a ``reward``: ``reference_rm_score``, ``policy_rm_score``, ``outcome`` (``win`` / ``tie`` /
        ``loss`` for the policy). The summary: ``prompts``, ``seed``, ``batch_size``, ``sampling``,
        ``kl_mean`` (nats / response), ``kl_std``, ``completion_tokens_mean`` and ``finish`` per
        policy (``{"policy": ..., "reference": ...}``), ``identical_responses`` (count), and with a
        ``reward``: ``rm_score_mean`` per policy and the :func:`win_rate` figures (``win_rate``,
        ``win_rate_se``, ``wins``, ``ties``, ``losses``); without one ``win_rate`` is None.

    Raises:
        ValueError / TypeError: see :func:`~nemo_rlhf.evaluation.generate.evaluate_policy`.
        RuntimeError: the two evaluations kept different prompts (cannot happen with one tokenizer).
    """
    t0 = time.monotonic()
    common = dict(seed=int(seed), batch_size=int(batch_size), reward=reward, judges=(), max_prompt_len=max_prompt_len,
                  overlong=overlong, chat_template=chat_template, progress=progress)
    ref_rows, ref_sum = evaluate_policy(reference, tokenizer, prompts, sampling, **common)
    pol_rows, pol_sum = evaluate_policy(policy, tokenizer, prompts, sampling, reference=reference, **common)
    if [r["index"] for r in ref_rows] != [r["index"] for r in pol_rows]:
        raise RuntimeError("compare_policies: the two evaluations kept different prompts")
    rows: list[dict[str, Any]] = []
    for r, p in zip(ref_rows, pol_rows):
        row = {"index": p["index"], "prompt": p["prompt"], "reference_response": r["completion"],
               "policy_response": p["completion"], "reference_tokens": r["completion_tokens"],
               "policy_tokens": p["completion_tokens"], "kl": p["kl"]}
        if reward is not None:
            row.update(reference_rm_score=r["rm_score"], policy_rm_score=p["rm_score"],
                       outcome="win" if p["rm_score"] > r["rm_score"] else
                       "tie" if p["rm_score"] == r["rm_score"] else "loss")
        rows.append(row)
    kl = np.array([r["kl"] for r in rows], dtype=np.float64)
    summary: dict[str, Any] = {
        "prompts": len(rows), "seed": int(seed), "batch_size": int(batch_size), "sampling": pol_sum["sampling"],
        "kl_mean": float(kl.mean()), "kl_std": float(kl.std()),
        "completion_tokens_mean": {"policy": pol_sum["completion_tokens_mean"],
                                   "reference": ref_sum["completion_tokens_mean"]},
        "finish": {"policy": pol_sum["finish"], "reference": ref_sum["finish"]},
        "identical_responses": sum(r["policy_response"] == r["reference_response"] for r in rows),
        "win_rate": None,
    }
    if reward is not None:
        summary["rm_score_mean"] = {"policy": pol_sum["rm_score_mean"], "reference": ref_sum["rm_score_mean"]}
        summary.update(win_rate([r["policy_rm_score"] for r in rows], [r["reference_rm_score"] for r in rows]))
    summary["wall_s"] = round(time.monotonic() - t0, 3)
    return rows, summary


def heldout_judge_prompts(data_cfg, tokenizer: Tokenizer, max_prompts: int) -> list[str]:
    """The judge's prompts: the distinct prompts of ``data_cfg``'s held-out split
    (:func:`~nemo_rlhf.data.tasks.load_split_prompts`: HH dialogues sorted by text and chat-formatted
    with ``data.chat_template``; IMDB review openings), the first ``max_prompts`` of them.

    Raises:
        ValueError: no held-out prompt.
    """
    _, heldout, stats = load_split_prompts(data_cfg, tokenizer)
    if not heldout:
        raise ValueError(f"the judge has no held-out prompt (data.dataset={data_cfg.dataset}, "
                         f"data.heldout_fraction={data_cfg.heldout_fraction}; {stats.summary()})")
    return heldout[: int(max_prompts)]


def judge_checkpoints(policy_weights: str, reference_weights: str, model_cfg: Any, tokenizer_cfg: Any, data_cfg: Any,
                      judge: DPOJudgeConfig | Any = None, *, reward_weights: str | None = None,
                      reward_model_cfg: Any = None, out: str | Path | None = None,
                      accelerator: str = "cpu") -> dict[str, Any]:
    """:func:`compare_policies` on weights directories (the DPO stage's judge in
    ``launchers/run_demo.py``): loads the policy and the reference (``model_cfg``, frozen), the
    reward model when ``reward_weights`` is given (``reward_model_cfg``: its ``model:`` section,
    ``reward_pooling`` included), the prompts (:func:`heldout_judge_prompts` of ``data_cfg``, cut to
    ``judge.max_prompts`` and to ``data.max_prompt_len`` tokens by ``data.overlong``), runs the
    comparison and writes the rows to ``out`` (JSONL) and the summary beside it
    (:func:`~nemo_rlhf.evaluation.generate.write_outputs`).

    Args:
        judge: a :class:`~nemo_rlhf.config.DPOJudgeConfig` or its mapping (None: its defaults).
        model_cfg, reward_model_cfg: ``model:`` sections (typed or mappings).
        tokenizer_cfg: the ``tokenizer:`` section of the stage that trained the policy.

    Returns:
        the summary of :func:`compare_policies`, plus ``reward_model`` (the weights, or None) and
        ``samples_file`` (``out``, or None).

    Raises:
        ConfigError: a bad ``judge`` value; see :func:`~nemo_rlhf.evaluation.sources.load_policy`.
        CheckpointError: weights that do not load.
    """
    from nemo_rlhf.data.tokenizer import load_tokenizer
    from nemo_rlhf.evaluation.sources import ensure_world, load_policy, load_reward_model

    judge = parse_config(DPOJudgeConfig, judge, "dpo_judge") if not isinstance(judge, DPOJudgeConfig) else judge
    model = to_plain(model_cfg)
    ensure_world(accelerator, int(judge.seed))
    tok = load_tokenizer(to_plain(tokenizer_cfg))
    mbs = int(judge.batch_size)
    src = (lambda path: {"path": str(path), "format": "weights"})  # noqa: E731
    policy, _ = load_policy(src(policy_weights), model=model, tokenizer=tok, micro_batch_size=mbs,
                            accelerator=accelerator, seed=int(judge.seed))
    reference, _ = load_policy(src(reference_weights), model=model, tokenizer=tok, micro_batch_size=mbs,
                               accelerator=accelerator, seed=int(judge.seed), section="reference")
    rm = None
    if reward_weights:
        rm = load_reward_model(src(reward_weights), tok, model=to_plain(reward_model_cfg), micro_batch_size=mbs,
                               accelerator=accelerator, seed=int(judge.seed))
    prompts = heldout_judge_prompts(data_cfg, tok, int(judge.max_prompts))
    rows, summary = compare_policies(policy, reference, tok, prompts, judge.sampling, seed=int(judge.seed),
                                     batch_size=mbs, reward=rm, max_prompt_len=int(data_cfg.max_prompt_len),
                                     overlong=str(data_cfg.overlong))
    summary.update(reward_model=str(reward_weights) if reward_weights else None, samples_file=None)
    if out is not None:
        summary["samples_file"] = str(out)
        write_outputs(rows, summary, out)
    return summary
