"""The data of a stage, by ``data.dataset``: preference pairs and PPO prompts, train and held out.

Every trainer reads its data through this module, so one config switch (``data.dataset``) moves
a stage between the HH-RLHF dialogues and the IMDB reviews:

=========  ===============================================  =========================================
dataset    preference pairs (reward model, SFT: ``chosen``)  PPO prompts
=========  ===============================================  =========================================
``hh``     the HH pairs (prompt = the dialogue so far)       the distinct HH prompts
``imdb``   (positive review, negative review), prompt ``""``  the first k tokens of each review,
           (:func:`nemo_rlhf.data.imdb.review_pairs`)        k in [prompt_tokens_min, prompt_tokens_max]
=========  ===============================================  =========================================

Held-out rows come from ``data.heldout_files`` when set (IMDB: ``valid.jsonl.gz``), else from a
deterministic hash split of ``data.files`` (:func:`nemo_rlhf.data.hh.split_heldout` for HH; by
review id for IMDB). No training step ever sees a held-out row.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from nemo_rlhf.data.datasets import PreferenceDataset, ReviewPairDataset
from nemo_rlhf.data.hh import LoadStats, PreferencePair, default_data_dir, load_hh_pairs, split_heldout
from nemo_rlhf.data.imdb import ImdbReview, load_imdb, review_pairs, review_prompts
from nemo_rlhf.data.tokenizer import Tokenizer

LOG = logging.getLogger("nemo_rlhf.data")


def data_files(data_cfg, key: str = "files") -> list[Path]:
    """Absolute paths of ``data.<key>`` (``files`` or ``heldout_files``) under ``data.data_dir``
    (default: ``$NEMO_RLHF_DATA_DIR`` or ``<repo>/../shared/data``); absolute entries are kept."""
    names = list(getattr(data_cfg, key) or [])
    if not names:
        return []
    root = Path(data_cfg.data_dir) if data_cfg.data_dir else default_data_dir()
    return [Path(f) if os.path.isabs(f) else root / f for f in names]


def _hash_heldout(key: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}\0{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def load_split_rows(data_cfg) -> tuple[list[Any], list[Any], LoadStats]:
    """The rows of ``data.files`` split into (train, held-out): :class:`PreferencePair` for
    ``hh``, :class:`~nemo_rlhf.data.imdb.ImdbReview` for ``imdb``.

    Bad rows follow ``data.on_error`` (skip with a count, or raise ``DataFormatError`` naming
    ``<file>:<line>``); ``data.max_rows`` bounds the training files' rows and
    ``data.max_heldout_rows`` the held-out files' rows.

    Returns:
        ``(train_rows, heldout_rows, stats)``, stats summed over every file read.
    """
    kind = data_cfg.dataset
    load = load_hh_pairs if kind == "hh" else load_imdb
    rows, stats = load(data_files(data_cfg), on_error=data_cfg.on_error, max_rows=data_cfg.max_rows)
    heldout_paths = data_files(data_cfg, "heldout_files")
    if heldout_paths:
        heldout, hstats = load(heldout_paths, on_error=data_cfg.on_error, max_rows=data_cfg.max_heldout_rows)
        stats.merge(hstats)
        train = list(rows)
    elif kind == "hh":
        train, heldout = split_heldout(rows, float(data_cfg.heldout_fraction), seed=int(data_cfg.split_seed))
    else:
        frac, seed = float(data_cfg.heldout_fraction), int(data_cfg.split_seed)
        train = [r for r in rows if not _hash_heldout(r.id, frac, seed)]
        heldout = [r for r in rows if _hash_heldout(r.id, frac, seed)]
        if data_cfg.max_heldout_rows:
            heldout = heldout[: int(data_cfg.max_heldout_rows)]
    LOG.info("%s data: %s; train %d, held-out %d rows", kind, stats.summary(), len(train), len(heldout))
    return train, heldout, stats


def load_split_pairs(data_cfg) -> tuple[list[PreferencePair], list[PreferencePair], LoadStats]:
    """Preference pairs (train, held-out) of ``data.dataset`` (see the module docstring).

    Returns:
        ``(train_pairs, heldout_pairs, stats)``.
    """
    train, heldout, stats = load_split_rows(data_cfg)
    if data_cfg.dataset == "imdb":
        seed = int(data_cfg.split_seed)
        return review_pairs(train, seed), review_pairs(heldout, seed + 1), stats
    return train, heldout, stats


def load_split_prompts(data_cfg, tokenizer: Tokenizer) -> tuple[list[str], list[str], LoadStats]:
    """PPO prompts (train, held-out) of ``data.dataset``: the distinct HH prompts (sorted), or the
    IMDB review beginnings (:func:`~nemo_rlhf.data.imdb.review_prompts`, in file order). The
    held-out list is cut to ``data.max_heldout_prompts``.

    Returns:
        ``(train_prompts, heldout_prompts, stats)``.
    """
    train, heldout, stats = load_split_rows(data_cfg)
    if data_cfg.dataset == "imdb":
        k = (int(data_cfg.prompt_tokens_min), int(data_cfg.prompt_tokens_max))
        seed = int(data_cfg.split_seed)
        train_p = review_prompts(train, tokenizer, *k, seed=seed)
        heldout_p = review_prompts(heldout, tokenizer, *k, seed=seed + 1)
    else:
        train_p = sorted({p.prompt for p in train})
        heldout_p = sorted({p.prompt for p in heldout})
    if data_cfg.max_heldout_prompts:
        heldout_p = heldout_p[: int(data_cfg.max_heldout_prompts)]
    return train_p, heldout_p, stats


def preference_dataset(data_cfg, pairs: Sequence[PreferencePair], tokenizer: Tokenizer):
    """The reward model's torch dataset of ``pairs``: :class:`PreferenceDataset` (HH: prompt +
    response + eos, cut by ``max_prompt_len`` / ``max_seq_len`` / ``overlong``) or
    :class:`ReviewPairDataset` (IMDB: the last ``max_seq_len`` tokens of each review, no eos)."""
    d = data_cfg
    if d.dataset == "imdb":
        return ReviewPairDataset(pairs, tokenizer, int(d.max_seq_len))
    return PreferenceDataset(pairs, tokenizer, int(d.max_seq_len), int(d.max_prompt_len), d.overlong)


__all__ = ["ImdbReview", "data_files", "load_split_pairs", "load_split_prompts", "load_split_rows",
           "preference_dataset"]
