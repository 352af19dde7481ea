"""Offline RL data: ``{"prompt", "response", "reward"}`` JSONL rows (issue 14 §3: ILQL's data,
e.g. randomwalks' ``offline.jsonl`` from :func:`nemo_rlhf.data.randomwalks.write_task`, or any
file of that shape), IMDB reviews cut into (opening, continuation) rewarded by their label
(:func:`imdb_offline_rows`, trlX's ``ilql_sentiments``), and the tokenized data set ILQL trains on.

Bad rows: a row that is not JSON, lacks a ``prompt`` / ``response`` string or has an empty one
follows ``data.on_error`` (skipped and counted, or :class:`~nemo_rlhf.data.hh.DataFormatError`),
as every loader here. A row whose ``reward`` is missing, not a number, or not finite (JSON
``NaN`` / ``Infinity``) is always an error naming the file and line: a silently dropped reward
would bias the offline return distribution the value functions learn.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import random
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from nemo_rlhf.data.datasets import _check_lengths, _fit_prompt, _fit_response, _pad_right
from nemo_rlhf.data.hh import DataFormatError, LoadStats, check_fields, load_jsonl
from nemo_rlhf.data.imdb import ImdbReview, clean_review
from nemo_rlhf.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class OfflineRow:
    """One offline sample: ``prompt`` and ``response`` verbatim, its scalar ``reward``, and
    ``source`` = ``"<file name>:<line>"`` (1-based)."""

    prompt: str
    response: str
    reward: float
    source: str


def _parse(obj: dict):
    bad = check_fields(obj, (("prompt", str), ("response", str)))
    if bad is not None:
        return bad
    reward = obj.get("reward", None)
    if "reward" not in obj:
        problem = "field 'reward' missing"
    elif isinstance(reward, bool) or not isinstance(reward, (int, float)):
        problem = f"field 'reward' is {reward!r:.40}, expected a number"
    elif not math.isfinite(float(reward)):
        problem = f"field 'reward' is not finite ({reward!r})"
    else:
        problem = None
    return obj["prompt"], obj["response"], (float(reward) if problem is None else None), problem


def load_offline_rows(paths: str | Path | Sequence[str | Path], on_error: str = "skip",
                      max_rows: int | None = None) -> tuple[list[OfflineRow], LoadStats]:
    """Read offline ``{"prompt", "response", "reward"}`` rows (``.jsonl`` / ``.jsonl.gz``).

    Returns:
        ``(rows, stats)`` (stats over all files).

    Raises:
        FileNotFoundError: a path does not exist.
        DataFormatError: a missing / non-numeric / non-finite reward (always; message
            ``"<path>:<line>: bad_reward: ..."``), or any other bad row under ``on_error="error"``.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    rows: list[OfflineRow] = []
    total = LoadStats()
    for path in map(Path, paths):
        left = None if max_rows is None else max_rows - len(rows)
        if left is not None and left <= 0:
            break
        items, stats = load_jsonl(path, _parse, lambda v, src: (v, src), on_error=on_error, max_rows=left,
                                  kind="offline")
        for (prompt, response, reward, problem), src in items:
            if problem is not None:
                line = int(src.rpartition(":")[2])
                raise DataFormatError(f"{path}:{line}: bad_reward: {problem} (offline RL rows need a finite "
                                      f"numeric 'reward')", path=path, line=line, reason="bad_reward")
            rows.append(OfflineRow(prompt, response, reward, src))
        total.rows += stats.rows
        total.kept += stats.kept
        total.skipped.update(stats.skipped)
        for k, v in stats.first.items():
            total.first.setdefault(k, v)
    return rows, total


IMDB_WINDOWS = ("opening", "ending")  # imdb_offline_rows(window=...)


def imdb_offline_rows(reviews: Sequence[ImdbReview], tokenizer: Tokenizer, min_tokens: int, max_tokens: int,
                      response_tokens: int, seed: int, window: str = "opening") -> list[OfflineRow]:
    """Offline rows from labelled IMDB reviews (trlX's ``ilql_sentiments``: reward = the label),
    one per review, both texts decoded from the cleaned review's own tokens.

    ``window="opening"``: prompt = the first k tokens (k uniform in ``[min_tokens, max_tokens]``,
    drawn by ``random.Random(seed)``, as :func:`~nemo_rlhf.data.imdb.review_prompts` cuts the
    online prompts), response = the next ``response_tokens`` tokens. ``window="ending"``: response
    = the review's last ``response_tokens`` tokens (where its verdict usually is), prompt = the k
    tokens before them. Reward = ``label`` (1.0 positive, 0.0 negative); source = the review's
    ``"<file>:<line>"``. A review too short for a prompt and one response token is left out.

    Raises:
        ValueError: ``min_tokens < 1``, ``min_tokens > max_tokens``, ``response_tokens < 1`` or an
            unknown ``window``.
    """
    if not 1 <= min_tokens <= max_tokens or response_tokens < 1:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens and response_tokens >= 1, got {min_tokens}, "
                         f"{max_tokens}, {response_tokens}")
    if window not in IMDB_WINDOWS:
        raise ValueError(f"window must be one of {IMDB_WINDOWS}, got {window!r}")
    rng = random.Random(seed)
    ids = tokenizer.encode_batch([clean_review(r.text) for r in reviews])
    rows = []
    for review, toks in zip(reviews, ids):
        k = rng.randint(min_tokens, max_tokens)
        if len(toks) <= k:
            continue
        start = k if window == "opening" else max(k, len(toks) - response_tokens)
        rows.append(OfflineRow(tokenizer.decode(toks[start - k: start]),
                               tokenizer.decode(toks[start: start + response_tokens]), float(review.label),
                               review.source))
    return rows


class OfflineDataset(Dataset):
    """Tokenized offline samples ``prompt + response + eos`` with their rewards.

    Prompts longer than ``max_prompt_len`` are left-truncated or skipped (``overlong``); the
    response (then eos) is right-truncated to fit ``max_seq_len`` (as :class:`~nemo_rlhf.data.SFTDataset`);
    a sample with no response token left is skipped. Counters in ``self.stats``.

    Item: ``tokens [S_i]`` int64, ``prompt_length`` / ``length`` ``[]`` int64, ``reward`` ``[]``
    float32 (the value given, e.g. standardised by the trainer).

    Raises:
        ValueError: bad lengths / ``overlong``, or ``rewards`` of another length than ``rows``.
    """

    def __init__(self, rows: Sequence[OfflineRow], tokenizer: Tokenizer, max_seq_len: int, max_prompt_len: int,
                 overlong: str = "truncate", rewards: Sequence[float] | None = None):
        _check_lengths(max_prompt_len, max_seq_len, overlong)
        rewards = [r.reward for r in rows] if rewards is None else list(rewards)
        if len(rewards) != len(rows):
            raise ValueError(f"OfflineDataset: {len(rewards)} rewards for {len(rows)} rows")
        self.stats: collections.Counter[str] = collections.Counter()
        self.samples: list[tuple[list[int], int, float]] = []
        prompts = tokenizer.encode_batch([r.prompt for r in rows])
        responses = tokenizer.encode_batch([r.response for r in rows])
        for prompt, response, reward in zip(prompts, responses, rewards):
            prompt = _fit_prompt(prompt, max_prompt_len, overlong, self.stats)
            if prompt is None:
                continue
            if not prompt:
                self.stats["skipped_empty_prompt"] += 1
                continue
            fitted = _fit_response(response, tokenizer.eos_id, max_seq_len - len(prompt), self.stats)
            if fitted is None:
                self.stats["skipped_overlong"] += 1
                continue
            self.samples.append((prompt + fitted, len(prompt), float(reward)))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        tokens, p, reward = self.samples[idx]
        return {"tokens": torch.tensor(tokens, dtype=torch.int64),
                "prompt_length": torch.tensor(p, dtype=torch.int64),
                "length": torch.tensor(len(tokens), dtype=torch.int64),
                "reward": torch.tensor(reward, dtype=torch.float32)}


def collate_offline(batch: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Collate :class:`OfflineDataset` items: ``tokens [B, S]`` right-padded with ``pad_id``;
    ``prompt_lengths``, ``lengths`` ``[B]`` int64; ``rewards [B]`` float32."""
    return {"tokens": _pad_right([b["tokens"] for b in batch], pad_id, 1),
            "prompt_lengths": torch.stack([b["prompt_length"] for b in batch]),
            "lengths": torch.stack([b["length"] for b in batch]),
            "rewards": torch.stack([b["reward"] for b in batch])}
