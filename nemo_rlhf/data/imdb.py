"""Loader for the IMDB Large Movie Review Dataset v1.0 (Maas et al. 2011, "Learning Word Vectors
for Sentiment Analysis", ACL), as shipped in ``shared/data/imdb/{train,valid}.jsonl.gz``.

Each JSONL row is ``{"id": "train/pos/123_9", "text": "...", "label": 1, "rating": 9}``: ``label``
is 1 for a rating >= 7 and 0 for a rating <= 4 (the dataset has no 5 or 6). Texts keep the original
``<br /><br />`` markup and may contain U+2028 / U+0085, which are kept (lines are split on
``b"\\n"`` only). The bad-data policy is the one of :func:`nemo_rlhf.data.hh.load_jsonl`.
"""

from __future__ import annotations

import dataclasses
import html
import os
import random
import re
from collections.abc import Iterable, Sequence

from nemo_rlhf.data.hh import JSONL_REASONS, Bad, LoadStats, PreferencePair, check_fields, load_jsonl

# Skip reasons, in the order they are checked.
IMDB_SKIP_REASONS = (*JSONL_REASONS, "bad_value", "label_mismatch")

_FIELDS = (("id", str), ("text", str), ("label", int), ("rating", int))


@dataclasses.dataclass(frozen=True)
class ImdbReview:
    """One IMDB review.

    Attributes:
        id: the dataset id, e.g. ``"train/pos/123_9"``.
        text: the review text, verbatim (markup and Unicode separators kept).
        label: 1 (positive, rating >= 7) or 0 (negative, rating <= 4).
        rating: the reviewer's rating, 1..10.
        source: ``"<file name>:<line>"``, line numbers 1-based.
    """

    id: str
    text: str
    label: int
    rating: int
    source: str


def _parse_imdb(obj: dict) -> tuple[str, str, int, int] | Bad:
    bad = check_fields(obj, _FIELDS)
    if bad is not None:
        return bad
    label, rating = obj["label"], obj["rating"]
    if label not in (0, 1):
        return Bad("bad_value", f"field 'label' is {label}, expected 0 or 1")
    if not 1 <= rating <= 10:
        return Bad("bad_value", f"field 'rating' is {rating}, expected 1..10")
    expected = 1 if rating >= 7 else 0 if rating <= 4 else None
    if expected != label:
        return Bad("label_mismatch", f"field 'label' is {label} but field 'rating' is {rating} "
                                     "(label 1 iff rating >= 7, 0 iff rating <= 4)")
    return obj["id"], obj["text"], label, rating


def load_imdb(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    on_error: str = "skip",
    max_rows: int | None = None,
) -> tuple[list[ImdbReview], LoadStats]:
    """Load IMDB reviews from ``.jsonl`` or ``.jsonl.gz`` files.

    Lines are split on ``b"\\n"`` only; blank lines are ignored and not counted. A row is bad
    (counted in ``LoadStats.skipped`` under the first matching reason, in this order) when it is:
    not UTF-8 (``invalid_utf8``, also for JSON escapes of lone surrogates), not JSON
    (``bad_json``), not a JSON object (``not_an_object``), lacking one of ``id``, ``text``,
    ``label``, ``rating`` (``missing_field``), of the wrong JSON type (``wrong_type``: ``id`` and
    ``text`` strings, ``label`` and ``rating`` integers; ``true``/``false`` and ``7.0`` are not
    integers), with an empty or whitespace-only ``id``/``text`` (``empty_field``), with ``label``
    not 0/1 or ``rating`` outside 1..10 (``bad_value``), or with a label that disagrees with the
    rating (``label_mismatch``: label 1 iff rating >= 7, 0 iff rating <= 4; ratings 5 and 6 fit
    neither). Other fields are ignored. One INFO summary line per file is logged to logger
    ``nemo_rlhf.data``.

    Args:
        paths: one path or several.
        on_error: ``"skip"`` (count and continue) or ``"error"`` (raise on the first bad row).
        max_rows: stop after this many non-blank rows in total over all files (None: no limit).

    Returns:
        ``(reviews, stats)`` with stats summed over all files.

    Raises:
        FileNotFoundError: a path does not exist (message names it).
        DataFormatError: ``on_error="error"`` and a row is bad (message
            ``"<path>:<line>: <reason>: <detail>"``, the detail naming the field); or, under either
            policy, a file cannot be read to its end (truncated or corrupt gzip; message
            ``"<path>: truncated_file: ..."``).
        ValueError: bad ``on_error`` or negative ``max_rows``.
    """
    return load_jsonl(paths, _parse_imdb, lambda v, src: ImdbReview(*v, src),
                      on_error=on_error, max_rows=max_rows, kind="imdb")


_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def clean_review(text: str) -> str:
    """A review as plain text: ``<br />`` line breaks become spaces, HTML entities are unescaped
    (``&amp;`` -> ``&``), and every run of whitespace (U+2028 and U+0085 included) becomes one
    space; leading and trailing space is removed."""
    return _SPACE.sub(" ", html.unescape(_BREAK.sub(" ", text))).strip()


def review_pairs(reviews: Sequence[ImdbReview], seed: int) -> list[PreferencePair]:
    """Reward-model pairs from labelled reviews: (a positive review, a negative review).

    The positive and the negative reviews are each shuffled with ``random.Random(seed)`` and
    paired in order; ``min(#positive, #negative)`` pairs, texts cleaned (:func:`clean_review`),
    prompt ``""``, source ``"<pos source>|<neg source>"``. Deterministic in (reviews, seed).
    """
    rng = random.Random(seed)
    pos = [r for r in reviews if r.label == 1]
    neg = [r for r in reviews if r.label == 0]
    rng.shuffle(pos)
    rng.shuffle(neg)
    return [PreferencePair("", clean_review(p.text), clean_review(n.text), f"{p.source}|{n.source}")
            for p, n in zip(pos, neg)]


def review_prompts(reviews: Sequence[ImdbReview], tokenizer, min_tokens: int, max_tokens: int,
                   seed: int) -> list[str]:
    """PPO prompts: the first k tokens of each (cleaned) review, decoded back to text, with k
    drawn uniformly from ``[min_tokens, max_tokens]`` by ``random.Random(seed)`` (trlX's IMDB
    sentiment task). A review shorter than k tokens is used whole. Order: the reviews' order.

    Raises:
        ValueError: ``min_tokens < 1`` or ``min_tokens > max_tokens``.
    """
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    rng = random.Random(seed)
    ids = tokenizer.encode_batch([clean_review(r.text) for r in reviews])
    return [tokenizer.decode(t[: rng.randint(min_tokens, max_tokens)]) for t in ids]
