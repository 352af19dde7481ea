"""Loader for Anthropic HH-RLHF preference data (Bai et al. 2022, "Training a Helpful and
Harmless Assistant with RLHF", https://github.com/anthropics/hh-rlhf).

Each JSONL row is ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}``. The two
transcripts share the dialogue up to the last ``"\\n\\nAssistant:"`` and differ in the final
assistant turn. Awkward rows (bad JSON, empty final turn, chosen == rejected, transcripts whose
prompts differ because of stray role tags) are skipped and counted by reason, never kept silently.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

logger = logging.getLogger("nemo_rlhf.data")

ASSISTANT_TAG = "\n\nAssistant:"
DATA_DIR_ENV = "NEMO_RLHF_DATA_DIR"

# Skip reasons, in the order they are checked.
SKIP_REASONS = (
    "invalid_utf8",
    "bad_json",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "no_assistant_turn",
    "no_shared_prompt",
    "empty_response",
    "identical",
)


class DataFormatError(ValueError):
    """A data row (or file) is malformed; the message names ``file:line`` and the reason."""


def default_data_dir() -> Path:
    """Return the shared data directory.

    Resolution: the environment variable ``NEMO_RLHF_DATA_DIR`` if set (and non-empty), else
    ``<repo root>/../shared/data`` where the repo root is the directory holding the ``nemo_rlhf``
    package.

    Raises:
        FileNotFoundError: the resolved directory does not exist; the message names the path and
            the environment variable.
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        path = Path(env).expanduser()
    else:
        repo_root = Path(__file__).resolve().parents[2]
        path = repo_root.parent / "shared" / "data"
    if not path.is_dir():
        raise FileNotFoundError(
            f"data directory {str(path)!r} does not exist; set the environment variable "
            f"{DATA_DIR_ENV} to the directory holding hh-rlhf/ and gpt2-tokenizer/"
        )
    return path


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """One human preference comparison.

    Attributes:
        prompt: shared dialogue up to and including the last ``"\\n\\nAssistant:"``.
        chosen: the preferred final assistant turn (keeps its leading space).
        rejected: the dispreferred final assistant turn (keeps its leading space).
        source: ``"<file name>:<line>"``, line numbers 1-based.
    """

    prompt: str
    chosen: str
    rejected: str
    source: str


def split_dialogue(text: str) -> tuple[str, str]:
    """Split a transcript at its LAST ``"\\n\\nAssistant:"``.

    Returns:
        ``(prompt, response)``: the prompt keeps everything up to and including the tag; the
        response is the remainder verbatim (including its leading space, which GPT-2 BPE folds
        into the first word token).

    Raises:
        TypeError: ``text`` is not a str.
        ValueError: ``text`` contains no ``"\\n\\nAssistant:"``.
    """
    if not isinstance(text, str):
        raise TypeError(f"split_dialogue expects str, got {type(text).__name__}")
    idx = text.rfind(ASSISTANT_TAG)
    if idx < 0:
        raise ValueError(f"no {ASSISTANT_TAG!r} turn in dialogue starting {text[:60]!r}")
    cut = idx + len(ASSISTANT_TAG)
    return text[:cut], text[cut:]


@dataclasses.dataclass
class LoadStats:
    """Row counts of a :func:`load_hh_pairs` call.

    Attributes:
        rows: non-blank lines read.
        kept: rows turned into a :class:`PreferencePair`.
        skipped: skipped rows by reason (see ``SKIP_REASONS``); ``kept + sum(skipped) == rows``.
    """

    rows: int = 0
    kept: int = 0
    skipped: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    def summary(self) -> str:
        """One-line human-readable summary, e.g. ``rows=10 kept=8 skipped=2 (identical=2)``."""
        total = sum(self.skipped.values())
        text = f"rows={self.rows} kept={self.kept} skipped={total}"
        if total:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()) if v)
            text += f" ({reasons})"
        return text

    def merge(self, other: LoadStats) -> None:
        """Add ``other``'s counts into this object in place."""
        self.rows += other.rows
        self.kept += other.kept
        self.skipped.update(other.skipped)


def _parse_row(raw: bytes) -> tuple[str, str, str] | str:
    """Return ``(prompt, chosen_response, rejected_response)`` or a skip reason string."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return "bad_json"
    if not isinstance(obj, dict):
        return "not_an_object"
    if "chosen" not in obj or "rejected" not in obj:
        return "missing_field"
    chosen, rejected = obj["chosen"], obj["rejected"]
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        return "wrong_type"
    try:  # JSON "\ud800" escapes decode to lone surrogates, which are not valid UTF-8 text.
        chosen.encode("utf-8")
        rejected.encode("utf-8")
    except UnicodeEncodeError:
        return "invalid_utf8"
    try:
        prompt_c, resp_c = split_dialogue(chosen)
        prompt_r, resp_r = split_dialogue(rejected)
    except ValueError:
        return "no_assistant_turn"
    if prompt_c != prompt_r:
        return "no_shared_prompt"
    if not resp_c.strip() or not resp_r.strip():
        return "empty_response"
    if resp_c == resp_r:
        return "identical"
    return prompt_c, resp_c, resp_r


def _open_lines(path: Path):
    """Binary file object; iterating it splits on b"\\n" only (never on U+2028/U+0085)."""
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def load_hh_pairs(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    on_error: str = "skip",
    max_rows: int | None = None,
) -> tuple[list[PreferencePair], LoadStats]:
    """Load HH-RLHF preference pairs from ``.jsonl`` or ``.jsonl.gz`` files.

    Lines are split on ``b"\\n"`` only; blank lines are ignored and not counted. A row is skipped
    (counted in ``LoadStats.skipped`` under the first matching reason) when it is: not UTF-8
    (``invalid_utf8``, also for JSON escapes of lone surrogates), not JSON (``bad_json``), not a
    JSON object (``not_an_object``), lacking ``chosen``/``rejected`` (``missing_field``), not
    strings (``wrong_type``), without ``"\\n\\nAssistant:"`` (``no_assistant_turn``), with
    different prompts in chosen and rejected (``no_shared_prompt``), with an empty/whitespace final
    turn (``empty_response``), or with equal final turns (``identical``). One INFO line per file is
    logged to logger ``nemo_rlhf.data``.

    Args:
        paths: one path or several.
        on_error: ``"skip"`` (count and continue) or ``"error"`` (raise on the first bad row).
        max_rows: stop after this many non-blank rows in total over all files (None: no limit).

    Returns:
        ``(pairs, stats)`` with stats summed over all files.

    Raises:
        FileNotFoundError: a path does not exist (message names it).
        DataFormatError: ``on_error="error"`` and a row is bad (message ``"<path>:<line>: <reason>"``),
            or a ``.gz`` file is corrupt.
        ValueError: bad ``on_error`` or negative ``max_rows``.
    """
    if on_error not in ("skip", "error"):
        raise ValueError(f"on_error must be 'skip' or 'error', got {on_error!r}")
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"max_rows must be >= 0 or None, got {max_rows}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"HH-RLHF file not found: {str(path)!r}")

    pairs: list[PreferencePair] = []
    total = LoadStats()
    for path in paths:
        if max_rows is not None and total.rows >= max_rows:
            break
        stats = LoadStats()
        try:
            with _open_lines(path) as f:
                for lineno, raw in enumerate(f, start=1):
                    if not raw.strip():
                        continue
                    if max_rows is not None and total.rows + stats.rows >= max_rows:
                        break
                    stats.rows += 1
                    parsed = _parse_row(raw)
                    if isinstance(parsed, str):
                        if on_error == "error":
                            raise DataFormatError(f"{path}:{lineno}: {parsed}")
                        stats.skipped[parsed] += 1
                        continue
                    prompt, chosen, rejected = parsed
                    pairs.append(PreferencePair(prompt, chosen, rejected, f"{path.name}:{lineno}"))
                    stats.kept += 1
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
            raise DataFormatError(f"{path}: cannot read file: {e}") from e
        logger.info("hh-rlhf %s: %s", path, stats.summary())
        total.merge(stats)
    return pairs, total


def split_heldout(
    pairs: Sequence[PreferencePair], heldout_fraction: float, seed: int = 1234
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Deterministically split pairs into ``(train, heldout)`` by prompt.

    A pair goes to held-out iff ``int(sha256(f"{seed}\\0{prompt}")[:8]) / 2**64 < heldout_fraction``,
    so pairs with identical prompts always land on the same side, the split does not depend on
    input order, and the held-out size is ``heldout_fraction * len(pairs)`` only in expectation.
    Input order is preserved within each side.

    Raises:
        ValueError: ``heldout_fraction`` not in ``[0, 1)``.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    train: list[PreferencePair] = []
    heldout: list[PreferencePair] = []
    for pair in pairs:
        digest = hashlib.sha256(f"{seed}\0{pair.prompt}".encode("utf-8")).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0**64
        (heldout if u < heldout_fraction else train).append(pair)
    return train, heldout
