"""The data of a stage, by ``data.dataset``: preference pairs and PPO prompts, train and held out.

Every trainer reads its data through this module, so one config switch (``data.dataset``) moves
a stage between the HH-RLHF dialogues and the IMDB reviews:

=========  ===============================================  =========================================
dataset    preference pairs (reward model, SFT: ``chosen``)  PPO prompts
=========  ===============================================  =========================================
``hh``     the HH pairs (prompt = the dialogue so far)       the distinct HH prompts
``imdb``   (positive review, negative review), prompt ``""``  the first k tokens of each review,
           (:func:`nemo_rlhf.data.imdb.review_pairs`)        k in [prompt_tokens_min, prompt_tokens_max]
``jsonl``  SFT pairs ``prompt`` + ``response`` (rows            the distinct ``prompt`` fields, in
           ``{"prompt": str, "response": str}``; no          file order (``response`` optional)
           ``rejected``: SFT only)
=========  ===============================================  =========================================

``jsonl`` (:func:`load_prompt_rows`) is the generic format, e.g. the randomwalks task files of
:func:`nemo_rlhf.data.randomwalks.write_task` (``sft.jsonl`` for SFT, ``prompts.jsonl`` /
``heldout.jsonl`` for the online trainers); without ``heldout_files`` its held-out rows are a hash
split by prompt (all rows of one prompt on the same side).

With ``data.chat_template: true`` (HH only) the dialogues are formatted as the model was
fine-tuned (:func:`format_pairs`, :func:`chat_prompt`): each prompt becomes the tokenizer's chat
template over its turns with the assistant header appended, each response its final assistant
turn stripped, closed by the template's turn-closing token (the tokenizer's eos, which the datasets
append). The datasets are the same; only their input strings change.

Held-out rows come from ``data.heldout_files`` when set (IMDB: ``valid.jsonl.gz``), else from a
deterministic hash split of ``data.files`` (:func:`nemo_rlhf.data.hh.split_heldout` for HH; by
review id for IMDB). No training step ever sees a held-out row.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from nemo_rlhf.data.datasets import PreferenceDataset, ReviewPairDataset
from nemo_rlhf.data.hh import (Bad, DataFormatError, LoadStats, PreferencePair, check_fields, default_data_dir,
                               dialogue_messages, load_hh_pairs, load_jsonl, split_heldout)
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


@dataclasses.dataclass(frozen=True)
class PromptRow:
    """One row of a ``data.dataset: jsonl`` file.

    Attributes:
        prompt: the ``prompt`` field, verbatim.
        response: the ``response`` field, verbatim (e.g. with its leading space), or None when the
            row has none (a prompt-only row: usable by the online trainers, not by SFT).
        source: ``"<file name>:<line>"``, line numbers 1-based.
    """

    prompt: str
    response: str | None
    source: str


def _parse_prompt_row(obj: dict) -> tuple[str, str | None] | Bad:
    bad = check_fields(obj, (("prompt", str),))
    if bad is not None:
        return bad
    if "response" not in obj:
        return obj["prompt"], None
    bad = check_fields(obj, (("response", str),))
    return bad if bad is not None else (obj["prompt"], obj["response"])


def load_prompt_rows(paths, on_error: str = "skip", max_rows: int | None = None) -> tuple[list[PromptRow], LoadStats]:
    """Rows ``{"prompt": str, "response": str}`` (``response`` optional; other fields, e.g.
    randomwalks' ``reward``, ignored) from ``.jsonl`` / ``.jsonl.gz`` files.

    A row is bad (``data.on_error``: skipped and counted, or raised) when it is not UTF-8, not
    JSON, not an object, has no ``prompt``, a ``prompt`` / ``response`` that is not a string
    (``wrong_type``) or is empty / whitespace only (``empty_field``); see
    :func:`nemo_rlhf.data.hh.load_jsonl`.

    Returns:
        ``(rows, stats)``.

    Raises:
        FileNotFoundError: a path does not exist.
        DataFormatError: ``on_error="error"`` and a bad row (``"<path>:<line>: <reason>: <detail>"``),
            or an unreadable file.
    """
    return load_jsonl(paths, _parse_prompt_row, lambda v, src: PromptRow(v[0], v[1], src),
                      on_error=on_error, max_rows=max_rows, kind="jsonl")


def _sft_pairs(rows: Sequence[PromptRow], on_error: str, stats: LoadStats) -> list[PreferencePair]:
    """SFT pairs (``chosen`` = the response, ``rejected`` = ``""``) of the rows that have a
    response; a prompt-only row is bad (``missing_field``): skipped and counted, or
    :class:`DataFormatError` naming its ``file:line`` under ``on_error="error"``."""
    out = []
    for r in rows:
        if r.response is None:
            if on_error == "error":
                path, _, line = r.source.rpartition(":")
                raise DataFormatError(f"{r.source}: missing_field: field 'response' missing (SFT needs prompt + "
                                      f"response)", path=path, line=int(line), reason="missing_field")
            stats.kept -= 1
            stats.skipped["missing_field"] += 1
            stats.first.setdefault("missing_field", r.source)
            continue
        out.append(PreferencePair(r.prompt, r.response, "", r.source))
    return out


def load_split_rows(data_cfg) -> tuple[list[Any], list[Any], LoadStats]:
    """The rows of ``data.files`` split into (train, held-out): :class:`PreferencePair` for
    ``hh``, :class:`~nemo_rlhf.data.imdb.ImdbReview` for ``imdb``, :class:`PromptRow` for ``jsonl``.

    Bad rows follow ``data.on_error`` (skip with a count, or raise ``DataFormatError`` naming
    ``<file>:<line>``; with ``data.chat_template`` an HH prompt that does not split into
    alternating turns is bad too, ``bad_dialogue``); ``data.max_rows`` bounds the training files' rows and
    ``data.max_heldout_rows`` the held-out files' rows.

    Returns:
        ``(train_rows, heldout_rows, stats)``, stats summed over every file read.
    """
    kind = data_cfg.dataset
    load = {"hh": functools.partial(load_hh_pairs, chat=bool(data_cfg.chat_template)), "imdb": load_imdb,
            "jsonl": load_prompt_rows}[kind]
    rows, stats = load(data_files(data_cfg), on_error=data_cfg.on_error, max_rows=data_cfg.max_rows)
    heldout_paths = data_files(data_cfg, "heldout_files")
    if heldout_paths:
        heldout, hstats = load(heldout_paths, on_error=data_cfg.on_error, max_rows=data_cfg.max_heldout_rows)
        stats.merge(hstats)
        train = list(rows)
    elif kind == "hh":
        train, heldout = split_heldout(rows, float(data_cfg.heldout_fraction), seed=int(data_cfg.split_seed))
    else:  # imdb by review id, jsonl by prompt
        frac, seed = float(data_cfg.heldout_fraction), int(data_cfg.split_seed)
        key = (lambda r: r.id) if kind == "imdb" else (lambda r: r.prompt)  # noqa: E731
        train = [r for r in rows if not _hash_heldout(key(r), frac, seed)]
        heldout = [r for r in rows if _hash_heldout(key(r), frac, seed)]
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
    if data_cfg.dataset == "jsonl":
        return _sft_pairs(train, data_cfg.on_error, stats), _sft_pairs(heldout, data_cfg.on_error, stats), stats
    return train, heldout, stats


def load_split_prompts(data_cfg, tokenizer: Tokenizer) -> tuple[list[str], list[str], LoadStats]:
    """PPO prompts (train, held-out) of ``data.dataset``: the distinct HH prompts (sorted; with
    ``data.chat_template`` each rendered by :func:`chat_prompt`), the
    IMDB review beginnings (:func:`~nemo_rlhf.data.imdb.review_prompts`, in file order), or the
    distinct ``prompt`` fields of ``jsonl`` rows (first-occurrence order). The
    held-out list is cut to ``data.max_heldout_prompts``.

    Returns:
        ``(train_prompts, heldout_prompts, stats)``.

    Raises:
        ValueError: ``data.chat_template`` with a tokenizer without a chat template
            (:func:`check_chat_tokenizer`).
    """
    train, heldout, stats = load_split_rows(data_cfg)
    if data_cfg.dataset == "imdb":
        k = (int(data_cfg.prompt_tokens_min), int(data_cfg.prompt_tokens_max))
        seed = int(data_cfg.split_seed)
        train_p = review_prompts(train, tokenizer, *k, seed=seed)
        heldout_p = review_prompts(heldout, tokenizer, *k, seed=seed + 1)
    elif data_cfg.dataset == "jsonl":  # distinct prompts, first occurrence order
        train_p = list(dict.fromkeys(r.prompt for r in train))
        heldout_p = list(dict.fromkeys(r.prompt for r in heldout))
    elif data_cfg.chat_template:  # distinct dialogues (sorted by their HH text), chat-formatted
        check_chat_tokenizer(tokenizer)
        train_p = [chat_prompt(p, tokenizer) for p in sorted({p.prompt for p in train})]
        heldout_p = [chat_prompt(p, tokenizer) for p in sorted({p.prompt for p in heldout})]
    else:
        train_p = sorted({p.prompt for p in train})
        heldout_p = sorted({p.prompt for p in heldout})
    if data_cfg.max_heldout_prompts:
        heldout_p = heldout_p[: int(data_cfg.max_heldout_prompts)]
    return train_p, heldout_p, stats


def check_chat_tokenizer(tokenizer: Tokenizer) -> None:
    """Check that ``tokenizer`` can format HH dialogues for ``data.chat_template: true``: it has a
    chat template, and the template closes an assistant turn with the tokenizer's eos token (the
    token the datasets append to every response, and where generation stops).

    Raises:
        ValueError: no chat template (names ``data.chat_template`` and ``tokenizer.type``), or a
            template whose assistant turns end with something other than the eos token.
    """
    if not tokenizer.chat_template:
        raise ValueError("data.chat_template=true formats HH dialogues with the tokenizer's chat template, but this "
                         "tokenizer has none: set tokenizer.type=hf and tokenizer.path=<a Hugging Face tokenizer "
                         "directory with a chat template> (e.g. the output of python -m nemo_rlhf.convert "
                         "gguf-to-megatron --smollm2 --out DIR), or data.chat_template=false")
    marker = "\x00RESPONSE\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": marker}], tokenize=False)
    after = text[text.index(marker) + len(marker):]
    if not after.startswith(tokenizer.eos_token):
        raise ValueError(f"data.chat_template=true: the tokenizer's chat template closes an assistant turn with "
                         f"{after[:20]!r}, not its eos token {tokenizer.eos_token!r}; responses are closed with eos, "
                         "so this template cannot be used (set data.chat_template=false)")


def chat_prompt(prompt: str, tokenizer: Tokenizer) -> str:
    """An HH prompt rendered by the tokenizer's chat template: its turns
    (:func:`~nemo_rlhf.data.hh.dialogue_messages`) followed by the header of the assistant turn to
    generate (``add_generation_prompt=True``). SmolLM2-Instruct:
    ``"<|im_start|>system\n...<|im_end|>\n<|im_start|>user\nA<|im_end|>\n<|im_start|>assistant\n"``.
    The text holds the special tokens literally; :meth:`Tokenizer.encode` turns them into their
    ids, the ids ``transformers``' ``apply_chat_template(tokenize=True)`` gives.

    Raises:
        ValueError: the prompt does not split into alternating turns, or the tokenizer has no
            chat template.
    """
    return tokenizer.apply_chat_template(dialogue_messages(prompt), add_generation_prompt=True, tokenize=False)


def format_pairs(data_cfg, pairs: Sequence[PreferencePair], tokenizer: Tokenizer) -> list[PreferencePair]:
    """The pairs as a stage's datasets take them: unchanged with ``data.chat_template: false``;
    with ``true``, each prompt rendered by :func:`chat_prompt` and each response stripped of
    surrounding whitespace (the datasets close it with ``tokenizer.eos_id``, the template's
    turn-closing token, so ``prompt + response + eos`` tokenizes as the whole dialogue rendered by
    the template, less its final newline).

    Raises:
        ValueError: ``data.chat_template`` with an unusable tokenizer (:func:`check_chat_tokenizer`),
            or a prompt that does not split into turns (the loader skips those as ``bad_dialogue``
            first; the message names the pair's ``file:line``).
    """
    if not data_cfg.chat_template:
        return list(pairs)
    check_chat_tokenizer(tokenizer)
    out = []
    for p in pairs:
        try:
            prompt = chat_prompt(p.prompt, tokenizer)
        except ValueError as e:
            raise ValueError(f"{p.source}: bad_dialogue: {e}") from e
        out.append(dataclasses.replace(p, prompt=prompt, chosen=p.chosen.strip(), rejected=p.rejected.strip()))
    return out


def preference_dataset(data_cfg, pairs: Sequence[PreferencePair], tokenizer: Tokenizer):
    """The reward model's and DPO's torch dataset of ``pairs``: :class:`PreferenceDataset` (HH: prompt +
    response + eos, cut by ``max_prompt_len`` / ``max_seq_len`` / ``overlong``; with ``overlong: skip``
    an overlong pair follows ``data.on_error``: counted in ``skipped_overlong``, or
    :class:`DataFormatError` naming its ``file:line``) or
    :class:`ReviewPairDataset` (IMDB: the last ``max_seq_len`` tokens of each review, no eos)."""
    d = data_cfg
    if d.dataset == "imdb":
        return ReviewPairDataset(pairs, tokenizer, int(d.max_seq_len))
    return PreferenceDataset(pairs, tokenizer, int(d.max_seq_len), int(d.max_prompt_len), d.overlong, d.on_error)


__all__ = ["ImdbReview", "PromptRow", "load_prompt_rows", "chat_prompt", "check_chat_tokenizer", "data_files", "format_pairs", "load_split_pairs",
           "load_split_prompts", "load_split_rows", "preference_dataset"]
