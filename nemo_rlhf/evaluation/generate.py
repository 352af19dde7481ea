"""Generate and evaluate: a policy's completions of a list of prompts, one row per prompt, scored.

The Python API the examples' before/after reports call::

    policy, tok = load_policy("/tmp/smol")                      # or a weights dir + model / tokenizer
    rows, summary = evaluate_policy(policy, tok, prompts, SamplingConfig(max_new_tokens=32), seed=7,
                                    batch_size=16, reward=rm, reference=ref, judges=("vader",))
    write_outputs(rows, summary, "runs/eval/after.jsonl")      # + after.summary.json

and ``launchers/generate.py`` (config ``conf/generate.yaml``, :class:`~nemo_rlhf.config.GenerateConfig`)
calls :func:`run_generate`. Per batch of prompts::

    prompts [B, P] -> policy.generate (KV cache, seeded) ...... tokens [B, L], lengths [B]
      -> cut each completion to sampling.max_new_tokens ...... tokens [B, L'], lengths [B]
      -> reward(tokens, lengths) ............................. rm_score [B]   (in process or critic server)
      -> policy.logprobs - reference.logprobs, summed over the completion: kl [B] (k1, nats)
      -> VADER compound of prompt + completion ............... vader_compound [B]

Completions are a deterministic function of the weights, the prompts, ``seed`` and ``batch_size``
(batch k is sampled with seed ``seed + 1000003 * k``; each batch's random stream depends on
which prompts share it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nemo_rlhf.config import (
    GenerateConfig,
    SamplingConfig,
    load_stage_config,
    parse_config,
    to_plain,
)
from nemo_rlhf.data.datasets import PromptDataset, collate_prompts
from nemo_rlhf.data.hh import Bad, LoadStats, check_fields, load_jsonl
from nemo_rlhf.data.tasks import load_split_prompts
from nemo_rlhf.data.tokenizer import Tokenizer
from nemo_rlhf.evaluation.sources import ensure_world, load_policy, load_reward_model
from nemo_rlhf.generation.sampling import SamplingParams
from nemo_rlhf.rewards.sentiment import (
    judge_agreement,
    positive_fraction,
    vader_compound,
)
from nemo_rlhf.rl.advantages import response_mask
from nemo_rlhf.utils.progress import StageProgress

LOG = logging.getLogger("nemo_rlhf.evaluation")

JUDGES = ("vader",)
FINISH_REASONS = ("eos", "length")
SEED_STRIDE = 1000003  # batch k is sampled with seed + SEED_STRIDE * k

__all__ = ["JUDGES", "evaluate_policy", "load_prompts", "load_prompts_file", "reward_scorer", "run_generate",
           "summarize", "summary_path_for", "write_outputs"]


# ----------------------------------------------------------------------------- prompts
def load_prompts_file(path: str | os.PathLike, field: str = "prompt", *, on_error: str = "skip",
                      max_prompts: int | None = None) -> tuple[list[str], list[str], LoadStats]:
    """Prompts from a JSONL file (``.jsonl`` or ``.jsonl.gz``) whose rows hold a string ``field``;
    other fields are ignored. Read by :func:`nemo_rlhf.data.hh.load_jsonl` (the project's one
    JSONL reader): a bad row (not JSON, not an object, no ``field``, not a string, empty) is
    skipped and counted by reason (``on_error="skip"``) or raises (``"error"``).

    Args:
        max_prompts: keep the first this many good prompts (None: all).

    Returns:
        ``(prompts, sources, stats)``: the prompt strings, their ``"<file name>:<line>"``, and the
        row counts (``stats.skipped`` by reason, ``stats.first`` the first ``file:line`` of each).

    Raises:
        FileNotFoundError: no such file.
        DataFormatError: ``on_error="error"`` and a bad row (``"<path>:<line>: <reason>: field ..."``),
            or a truncated gzip file.
    """
    spec = ((field, str),)

    def parse(obj: dict) -> str | Bad:
        bad = check_fields(obj, spec)
        return bad if bad is not None else obj[field]

    items, stats = load_jsonl(path, parse, lambda text, src: (text, src), on_error=on_error, kind="prompts")
    if max_prompts is not None:
        items = items[: int(max_prompts)]
    return [t for t, _ in items], [s for _, s in items], stats


def load_prompts(cfg: GenerateConfig, tokenizer: Tokenizer) -> tuple[list[str], list[str] | None, dict[str, Any]]:
    """The prompts of a :class:`~nemo_rlhf.config.GenerateConfig`: ``prompts.file``
    (:func:`load_prompts_file` with ``data.on_error``), or the ``prompts.split`` split of
    ``data.dataset`` (:func:`nemo_rlhf.data.tasks.load_split_prompts`: held-out by default), cut
    to ``prompts.max_prompts``.

    Returns:
        ``(prompts, sources or None, description)``; the description (for the summary) names the
        file or data set and the row counts.

    Raises:
        FileNotFoundError / DataFormatError: see :func:`load_prompts_file` and the data loaders.
        ValueError: no prompt left.
    """
    p, d = cfg.prompts, cfg.data
    if p.file:
        prompts, sources, stats = load_prompts_file(p.file, p.field, on_error=d.on_error, max_prompts=p.max_prompts)
        what: dict[str, Any] = {"file": str(p.file), "field": p.field}
    else:
        train, heldout, stats = load_split_prompts(d, tokenizer)
        prompts = heldout if p.split == "heldout" else train
        if p.max_prompts is not None:
            prompts = prompts[: int(p.max_prompts)]
        sources = None
        what = {"dataset": d.dataset, "split": p.split, "files": list(d.heldout_files or d.files)
                if p.split == "heldout" else list(d.files)}
    what.update(rows=stats.rows, kept=stats.kept, skipped=dict(stats.skipped), first_skipped=dict(stats.first))
    if not prompts:
        where = f"prompts.file={p.file}" if p.file else f"data.dataset={d.dataset} ({p.split} split)"
        raise ValueError(f"{where} gave no prompt ({stats.summary()}; {stats.where() or 'no bad rows'})")
    return prompts, sources, what


# ----------------------------------------------------------------------------- scoring adapters
def reward_scorer(reward: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """``(tokens [B, S] int64, lengths [B] int64) -> scores [B] float32`` from ``reward``:

    * a :class:`~nemo_rlhf.models.reward_model.GPTRewardModel` (anything with ``score``): in process;
    * a :class:`~nemo_rlhf.servers.client.CriticClient` or ``LocalCriticClient`` (anything with
      ``infer``): the reward model of a critic server (its second output);
    * a callable with that signature; None gives None.

    Raises:
        TypeError: anything else.
    """
    if reward is None:
        return None
    if hasattr(reward, "score"):
        return lambda t, n: reward.score(t, n).float().cpu()
    if hasattr(reward, "infer"):
        def through_server(t: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
            _, scores = reward.infer(t.cpu().numpy().astype(np.int64), n.cpu().numpy().astype(np.int64))
            return torch.as_tensor(np.asarray(scores, dtype=np.float32).reshape(-1))
        return through_server
    if callable(reward):
        return lambda t, n: torch.as_tensor(reward(t, n), dtype=torch.float32).reshape(-1).cpu()
    raise TypeError(f"reward must be a reward model (score), a critic client (infer) or a callable, "
                    f"got {type(reward).__name__}")


def _sampling_params(sampling: Any, seed: int | None) -> SamplingParams:
    if isinstance(sampling, SamplingParams):
        return SamplingParams(**{**vars(sampling), **({"seed": int(seed)} if seed is not None else {})})
    cfg = sampling if isinstance(sampling, SamplingConfig) else parse_config(SamplingConfig, dict(sampling or {}),
                                                                                "sampling")
    return SamplingParams(**to_plain(cfg), seed=1234 if seed is None else int(seed))


def _kept_indices(prompts: Sequence[str], kept: Sequence[str]) -> list[int]:
    """Indices into ``prompts`` of the subsequence ``kept`` (prompts a dataset did not skip)."""
    out, j = [], 0
    for i, text in enumerate(prompts):
        if j < len(kept) and text == kept[j]:
            out.append(i)
            j += 1
    return out


# ----------------------------------------------------------------------------- the evaluation
@torch.no_grad()
def evaluate_policy(policy, tokenizer: Tokenizer, prompts: Sequence[str], sampling: Any = None, *,
                    seed: int | None = None, batch_size: int = 16, reward: Any = None, reference: Any = None,
                    judges: Sequence[str] = ("vader",), max_prompt_len: int | None = None,
                    overlong: str = "truncate", chat_template: bool = False,
                    sources: Sequence[str] | None = None, keep_token_ids: bool = False,
                    progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate one completion per prompt with ``policy`` and score it.

    Args:
        policy: a :class:`~nemo_rlhf.models.policy.GPTPolicyModel` (e.g. from
            :func:`~nemo_rlhf.evaluation.sources.load_policy`, or a trainer's actor).
        tokenizer: the policy's tokenizer.
        prompts: ``N`` prompt strings, in order.
        sampling: :class:`~nemo_rlhf.config.SamplingConfig` (or its mapping; None: its defaults) or
            :class:`~nemo_rlhf.generation.sampling.SamplingParams`; ``max_new_tokens`` is the
            completion budget of every row (tokens).
        seed: base sampling seed (None: a ``SamplingParams``' own seed, else 1234).
        batch_size: prompts per ``generate`` call (the last batch may be smaller).
        reward: scores ``rm_score`` (see :func:`reward_scorer`); None: no reward-model score.
        reference: a reference policy (anything with ``logprobs(tokens [B, S]) -> [B, S-1]``);
            each row gets ``kl`` = sum over its completion tokens (EOS included) of
            ``log pi(y_t) - log pi_ref(y_t)`` (the k1 estimator of KL(policy || reference), nats;
            Schulman 2020, "Approximating KL divergence"). None: no KL.
        judges: independent judges to run on ``prompt + completion``: ``"vader"`` (VADER compound,
            :func:`nemo_rlhf.rewards.sentiment.vader_compound`).
        max_prompt_len: prompts longer than this many tokens are cut (``overlong="truncate"``: their
            last tokens kept) or dropped (``"skip"``; their rows are missing). Always at most the
            model's positions - 1, so every row has room to generate.
        chat_template: feed each prompt as one user turn of the tokenizer's chat template, with
            the assistant header appended (the rows and the judges keep the plain prompt).
        sources: ``N`` origins of the prompts (``"file:line"``), copied into the rows.
        keep_token_ids: add ``token_ids`` (prompt + completion ids as scored, EOS included) to
            every row.
        progress: show a progress bar / progress lines (:class:`~nemo_rlhf.utils.progress.StageProgress`).

    Returns:
        ``(rows, summary)``. One row per kept prompt, in prompt order: ``index`` (into
        ``prompts``), ``prompt``, ``completion`` (decoded, EOS stripped, special tokens kept as
        text), ``prompt_tokens`` (tokens fed), ``completion_tokens`` (generated tokens, EOS not
        counted), ``finish`` (``"eos"``: the policy ended it; ``"length"``: it hit
        ``max_new_tokens`` or the model's positions), and when asked ``rm_score`` (float),
        ``kl`` (nats), ``vader_compound`` (in [-1, 1]), ``source``, ``token_ids``. The summary:
        see :func:`summarize`.

    Raises:
        ValueError: no prompt, a prompt that encodes to no token, an unknown judge,
            ``batch_size`` < 1, or ``chat_template`` with a tokenizer that has none.
        TypeError: see :func:`reward_scorer`.
    """
    t0 = time.monotonic()
    judges = tuple(judges or ())
    for j in judges:
        if j not in JUDGES:
            raise ValueError(f"unknown judge {j!r}; known: {list(JUDGES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("evaluate_policy: no prompts")
    if sources is not None and len(sources) != len(prompts):
        raise ValueError(f"evaluate_policy: {len(sources)} sources for {len(prompts)} prompts")
    params = _sampling_params(sampling, seed)
    score = reward_scorer(reward)
    limit = int(policy.gpt.max_sequence_length) - 1
    max_prompt_len = limit if max_prompt_len is None else min(int(max_prompt_len), limit)
    fed = prompts
    if chat_template:
        fed = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=False) for p in prompts]
    ds = PromptDataset(fed, tokenizer, max_prompt_len, overlong)
    if not len(ds):
        raise ValueError(f"evaluate_policy: all {len(prompts)} prompts are longer than max_prompt_len={max_prompt_len} "
                         f"tokens and overlong={overlong!r} drops them (use overlong='truncate' or a larger limit)")
    index = _kept_indices(fed, ds.texts)
    n_batches = math.ceil(len(ds) / batch_size)
    rows: list[dict[str, Any]] = []
    shown = {"rm_score": "rm_score", "kl": "kl", "vader_compound": "vader"}
    bar = StageProgress("generate", total_steps=max(n_batches, 1), enabled=progress,
                        metrics_to_show=tuple(shown.values()))
    with bar:
        for b in range(n_batches):
            ids = list(range(b * batch_size, min((b + 1) * batch_size, len(ds))))
            batch = collate_prompts([ds[i] for i in ids], tokenizer.pad_id)
            params.seed = int(_base_seed(seed, sampling)) + SEED_STRIDE * b
            new = _generate_batch(policy, tokenizer, batch, params, score, reference)
            for k, i in enumerate(ids):
                row = {"index": index[i], "prompt": prompts[index[i]], **{n: v[k] for n, v in new.items()}}
                if sources is not None:
                    row["source"] = sources[index[i]]
                if not keep_token_ids:
                    row.pop("token_ids")
                rows.append(row)
            if "vader" in judges:
                batch_rows = rows[-len(ids):]
                compound = vader_compound([r["prompt"] + r["completion"] for r in batch_rows])
                for r, c in zip(batch_rows, compound):
                    r["vader_compound"] = float(c)
            bar.update(b + 1, {label: float(np.mean([r[key] for r in rows])) for key, label in shown.items()
                               if key in rows[-1]})
    summary = summarize(rows)
    summary.update(prompts_given=len(prompts), overlong=dict(ds.stats), batch_size=int(batch_size),
                   seed=int(_base_seed(seed, sampling)),
                   sampling={k: getattr(params, k) for k in ("max_new_tokens", "temperature", "top_k", "top_p",
                                                            "greedy")},
                   wall_s=round(time.monotonic() - t0, 3))
    return _reorder(rows), summary


def _base_seed(seed: int | None, sampling: Any) -> int:
    if seed is not None:
        return int(seed)
    return int(sampling.seed) if isinstance(sampling, SamplingParams) else 1234


def _reorder(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with their keys in the documented order."""
    order = ("index", "source", "prompt", "completion", "prompt_tokens", "completion_tokens", "finish", "rm_score",
             "kl", "vader_compound", "token_ids")
    return [{k: r[k] for k in order if k in r} for r in rows]


def _generate_batch(policy, tokenizer: Tokenizer, batch: Mapping[str, torch.Tensor], params: SamplingParams,
                    score, reference) -> dict[str, list]:
    """One batch: generate, cut to ``max_new_tokens``, decode, score. Returns per-row lists."""
    gen = policy.generate(batch["prompts"], batch["prompt_lengths"], params)
    tokens, lengths, plen = gen.tokens.cpu(), gen.lengths.cpu(), gen.prompt_lengths.cpu()
    # generate() runs every row to the batch's longest prompt + max_new_tokens: a shorter prompt
    # may have got more tokens. Each row keeps at most max_new_tokens of its own.
    lengths = torch.minimum(lengths, plen + int(params.max_new_tokens))
    width = int(lengths.max())
    cols = torch.arange(width).unsqueeze(0)
    tokens = torch.where(cols < lengths.unsqueeze(1), tokens[:, :width], torch.full_like(tokens[:, :width],
                                                                                          tokenizer.pad_id))
    out: dict[str, list] = {"completion": [], "prompt_tokens": [], "completion_tokens": [], "finish": [],
                            "token_ids": []}
    for k in range(tokens.shape[0]):
        p, n = int(plen[k]), int(lengths[k])
        new = tokens[k, p:n].tolist()
        ended = bool(new) and new[-1] == tokenizer.eos_id
        text_ids = new[:-1] if ended else new
        out["completion"].append(tokenizer.decode(text_ids))
        out["prompt_tokens"].append(p)
        out["completion_tokens"].append(len(text_ids))
        out["finish"].append("eos" if ended else "length")
        out["token_ids"].append(tokens[k, :n].tolist())
    dev = policy.model_device
    if score is not None:
        out["rm_score"] = [float(x) for x in score(tokens.to(dev), lengths.to(dev)).reshape(-1).tolist()]
    if reference is not None:
        t = tokens.to(dev)
        mask = response_mask(plen, lengths, width)
        diff = policy.logprobs(t).float().cpu() - reference.logprobs(t).float().cpu()
        out["kl"] = [float(x) for x in (diff * mask).sum(dim=1).tolist()]
    return out


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate figures of :func:`evaluate_policy` rows.

    Returns:
        ``count``; ``finish`` (``{"eos": n, "length": m}``); ``prompt_tokens_mean``,
        ``completion_tokens_mean`` (tokens); when the rows have them: ``rm_score_mean``,
        ``rm_score_std``; ``kl_mean`` (nats per completion); ``vader_positive_fraction``
        (compound > 0.05), ``vader_compound_mean``; ``judge_agreement`` (rows with both an RM
        score and a VADER compound: fraction where both call the text positive or both do not;
        the RM threshold is the median RM score, :func:`nemo_rlhf.rewards.sentiment.judge_agreement`).
        Means of an empty set are None.
    """

    def mean(key: str) -> float | None:
        vals = [float(r[key]) for r in rows if key in r]
        return float(np.mean(vals)) if vals else None

    out: dict[str, Any] = {
        "count": len(rows),
        "finish": {f: sum(1 for r in rows if r.get("finish") == f) for f in FINISH_REASONS},
        "prompt_tokens_mean": mean("prompt_tokens"),
        "completion_tokens_mean": mean("completion_tokens"),
    }
    if rows and "rm_score" in rows[0]:
        scores = np.array([r["rm_score"] for r in rows], dtype=np.float64)
        out.update(rm_score_mean=float(scores.mean()), rm_score_std=float(scores.std()))
    if rows and "kl" in rows[0]:
        out["kl_mean"] = mean("kl")
    if rows and "vader_compound" in rows[0]:
        compound = np.array([r["vader_compound"] for r in rows], dtype=np.float64)
        out.update(vader_positive_fraction=positive_fraction(compound), vader_compound_mean=float(compound.mean()))
        if "rm_score" in rows[0]:
            out["judge_agreement"] = judge_agreement(compound, np.array([r["rm_score"] for r in rows]))
    return out


# ----------------------------------------------------------------------------- files
def summary_path_for(out: str | os.PathLike) -> Path:
    """``<dir>/<name>.summary.json`` next to the rows file ``<dir>/<name>.jsonl`` (any other
    name: ``<out>.summary.json``)."""
    out = Path(out)
    stem = out.name.removesuffix(".jsonl")
    return out.with_name(stem + ".summary.json")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_outputs(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any],
                  out: str | os.PathLike) -> tuple[Path, Path]:
    """Write the rows (JSONL, one object per line, UTF-8) to ``out`` and the summary (JSON) to
    :func:`summary_path_for`, each atomically (a temporary file renamed over the target, so a
    reader never sees half a file).

    Returns:
        ``(rows path, summary path)``.
    """
    out = Path(out)
    _write_atomic(out, "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows))
    summary_path = summary_path_for(out)
    _write_atomic(summary_path, json.dumps(dict(summary), indent=1, ensure_ascii=False) + "\n")
    return out, summary_path


def _summary_line(summary: Mapping[str, Any]) -> str:
    parts = [f"{summary['count']} completions",
             f"{summary['completion_tokens_mean']:.1f} tokens (eos {summary['finish']['eos']}, "
             f"length {summary['finish']['length']})"]
    if "rm_score_mean" in summary:
        parts.append(f"RM score {summary['rm_score_mean']:.4g}")
    if "kl_mean" in summary:
        parts.append(f"KL {summary['kl_mean']:.4g} nats")
    if "vader_positive_fraction" in summary:
        parts.append(f"VADER positive {summary['vader_positive_fraction']:.3f} "
                     f"(mean compound {summary['vader_compound_mean']:.3f})")
    if "judge_agreement" in summary:
        parts.append(f"RM/VADER agreement {summary['judge_agreement']:.3f}")
    return " | ".join(parts)


# ----------------------------------------------------------------------------- the launcher's job
def run_generate(cfg: Any) -> dict[str, Any]:
    """``launchers/generate.py``: load the policy (and reference, reward model or critic client),
    the prompts, run :func:`evaluate_policy`, write the rows and the summary, log one summary line.

    Args:
        cfg: a composed ``conf/generate.yaml`` (DictConfig / mapping) or a
            :class:`~nemo_rlhf.config.GenerateConfig`.

    Returns:
        the summary (also written next to ``out``), with the sources, prompts and output paths.

    Raises:
        ConfigError: a bad config value (named), a layout with TP / PP > 1, no tokenizer.
        FileNotFoundError / DataFormatError / CheckpointError: missing or bad inputs (named).
        CriticServerUnavailable / CriticServerError: ``score.critic_server`` and the server
            cannot be reached or refuses.
    """
    from nemo_rlhf.parallel.state import destroy_distributed

    cfg = cfg if isinstance(cfg, GenerateConfig) else load_stage_config(GenerateConfig, cfg)
    t0 = time.monotonic()
    accelerator, bs = cfg.trainer.accelerator, int(cfg.batch_size)
    created = ensure_world(accelerator, int(cfg.seed))
    client = None
    try:
        policy, tok = load_policy(cfg.policy, model=cfg.model, tokenizer=cfg.tokenizer, micro_batch_size=bs,
                                  accelerator=accelerator, seed=int(cfg.seed))
        reference = None
        if cfg.reference.path:
            reference, _ = load_policy(cfg.reference, model=cfg.model, tokenizer=tok, micro_batch_size=bs,
                                       accelerator=accelerator, seed=int(cfg.seed), section="reference")
        reward = None
        if cfg.score.reward.path:
            reward = load_reward_model(cfg.score.reward, tok, model=cfg.model, micro_batch_size=bs,
                                       accelerator=accelerator, seed=int(cfg.seed))
        elif cfg.score.critic_server:
            from nemo_rlhf.servers.client import CriticClient

            client = reward = CriticClient.from_config(to_plain(cfg.critic))
            client.wait_until_ready(float(cfg.critic.init_timeout_s))
        prompts, sources, what = load_prompts(cfg, tok)
        LOG.info("generate: %d prompts (%s), batch %d, %d new tokens at most", len(prompts),
                 what.get("file") or f"{what['dataset']} {what['split']}", bs, cfg.sampling.max_new_tokens)
        rows, summary = evaluate_policy(
            policy, tok, prompts, cfg.sampling, seed=int(cfg.seed), batch_size=bs, reward=reward,
            reference=reference, judges=("vader",) if cfg.score.vader else (),
            max_prompt_len=int(cfg.data.max_prompt_len), overlong=cfg.data.overlong,
            chat_template=bool(cfg.prompts.chat_template), sources=sources)
    finally:
        if client is not None:
            client.close()
        if created:
            destroy_distributed()
    summary.update(
        out=str(cfg.out), policy=str(cfg.policy.path), reference=cfg.reference.path,
        reward=cfg.score.reward.path or (f"critic server {cfg.critic.host}:{cfg.critic.port}"
                                         if cfg.score.critic_server else None),
        prompts=what, total_wall_s=round(time.monotonic() - t0, 3))
    rows_path, summary_path = write_outputs(rows, summary, cfg.out)
    LOG.info("generate: %s", _summary_line(summary))
    LOG.info("generate: wrote %s and %s (%.1f s)", rows_path, summary_path, summary["total_wall_s"])
    return summary
