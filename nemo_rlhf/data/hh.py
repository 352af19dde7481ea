"""Loader for Anthropic HH-RLHF preference data (Bai et al. 2022, "Training a Helpful and
Harmless Assistant with RLHF", https://github.com/anthropics/hh-rlhf), and the JSONL reading
policy shared with the other loaders (see ``nemo_rlhf.data.imdb``).

Each JSONL row is ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}``. The two
transcripts share the dialogue up to the last ``"\\n\\nAssistant:"`` and differ in the final
assistant turn. Awkward rows (bad JSON, empty final turn, chosen == rejected, transcripts whose
prompts differ because of stray role tags) are skipped and counted by reason, never kept silently.

Bad-data policy (``on_error``, config key ``data.on_error``): ``"skip"`` counts every bad row by
reason in :class:`LoadStats` (with the ``file:line`` of the first row of each reason) and logs one
summary line per file; ``"error"`` raises :class:`DataFormatError` naming ``file:line``, the reason
and the field at the first bad row. Files are split into lines on ``b"\\n"`` only, so U+2028,
U+2029, U+0085, ``\\r``, ``\\x0b`` and ``\\x0c`` inside a JSON string are kept in the text and
never shift line numbers. A file that cannot be read to the end (truncated or corrupt gzip) raises
:class:`DataFormatError` under both policies: a half-read file is never used.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import json
import logging
import os
import re
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

logger = logging.getLogger("nemo_rlhf.data")

ASSISTANT_TAG = "\n\nAssistant:"
DATA_DIR_ENV = "NEMO_RLHF_DATA_DIR"

# Skip reasons, in the order they are checked. The first six are shared by every JSONL loader.
JSONL_REASONS = ("invalid_utf8", "bad_json", "not_an_object", "missing_field", "wrong_type", "empty_field")
SKIP_REASONS = (
    *JSONL_REASONS,
    "no_assistant_turn",
    "no_shared_prompt",
    "empty_response",
    "identical",
    "bad_dialogue",  # only with chat=True (data.chat_template): see dialogue_messages
)


class DataFormatError(ValueError):
    """A data row (or file) is malformed; the message names ``file:line`` and the reason.

    Attributes:
        path: the file (str).
        line: 1-based line number, or None for a file-level error (e.g. truncated gzip).
        reason: the reason code (e.g. ``"bad_json"``, ``"truncated_file"``).
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.line = line
        self.reason = reason


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


# A turn tag of an HH transcript; the speaker maps to a chat-template role.
_TURN_TAG = re.compile(r"\n\n(Human|Assistant):")
_CHAT_ROLES = {"Human": "user", "Assistant": "assistant"}


def dialogue_messages(prompt: str) -> list[dict[str, str]]:
    """The turns of an HH prompt as chat messages, for a chat template.

    ``"\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant:"`` ->
    ``[{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
    {"role": "user", "content": "C"}]``: turns are cut at ``"\n\nHuman:"`` / ``"\n\nAssistant:"``
    (the tags :func:`split_dialogue` cuts at), each content stripped of surrounding whitespace;
    the final empty ``"\n\nAssistant:"`` (the turn to generate) is dropped.

    Raises:
        TypeError: ``prompt`` is not a str.
        ValueError: the prompt does not split into alternating turns: text before the first tag,
            a first turn that is not Human's, two turns of one speaker in a row, an empty turn, or
            no final empty ``"\n\nAssistant:"``. The message names the turn (0-based).
    """
    if not isinstance(prompt, str):
        raise TypeError(f"dialogue_messages expects str, got {type(prompt).__name__}")
    parts = _TURN_TAG.split(prompt)  # [head, speaker0, text0, speaker1, text1, ...]
    if parts[0].strip():
        raise ValueError(f"text before the first Human/Assistant turn: {parts[0][:40]!r}")
    speakers, texts = parts[1::2], parts[2::2]
    if not speakers or speakers[-1] != "Assistant" or texts[-1] != "":
        raise ValueError(f"the dialogue does not end with an empty {ASSISTANT_TAG!r} turn to answer")
    messages: list[dict[str, str]] = []
    for i, (speaker, text) in enumerate(zip(speakers[:-1], texts[:-1])):
        expected = "Human" if i % 2 == 0 else "Assistant"
        if speaker != expected:
            raise ValueError(f"turn {i} is {speaker}'s, expected {expected}'s (turns must alternate, Human first)")
        if not text.strip():
            raise ValueError(f"turn {i} ({speaker}) is empty")
        messages.append({"role": _CHAT_ROLES[speaker], "content": text.strip()})
    if len(speakers) % 2:  # the final Assistant tag must follow a Human turn
        raise ValueError(f"turn {len(speakers) - 1} is Assistant's, expected Human's (turns must alternate, "
                         "Human first)")
    return messages


@dataclasses.dataclass
class LoadStats:
    """Row counts of a :func:`load_hh_pairs` call.

    Attributes:
        rows: non-blank lines read.
        kept: rows turned into an item (:class:`PreferencePair`, ``ImdbReview``).
        skipped: skipped rows by reason (see ``SKIP_REASONS``); ``kept + sum(skipped) == rows``.
        first: for each skip reason, ``"<file name>:<line>"`` of its first occurrence.
    """

    rows: int = 0
    kept: int = 0
    skipped: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    first: dict[str, str] = dataclasses.field(default_factory=dict)

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
        for reason, where in other.first.items():
            self.first.setdefault(reason, where)

    def where(self) -> str:
        """``"first: <reason>@<file>:<line>, ..."`` for the skipped reasons ('' if none)."""
        if not self.first:
            return ""
        return "first: " + ", ".join(f"{k}@{v}" for k, v in sorted(self.first.items()))


class Bad(NamedTuple):
    """A rejected row: reason code and a human-readable detail (field, value, position)."""

    reason: str
    detail: str = ""


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def decode_json_object(raw: bytes) -> dict | Bad:
    """Decode one JSONL line (``bytes``, without the ``b"\\n"``) into a dict or a :class:`Bad`.

    Raw control characters inside strings (``\\r``, ``\\x0b``, ``\\x0c``, tab) are accepted and kept
    (``json.loads(strict=False)``), as are U+2028/U+2029/U+0085. Reasons: ``invalid_utf8``,
    ``bad_json`` (also for numbers too long to parse or nesting too deep), ``not_an_object``.
    """
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Bad("invalid_utf8", f"byte {raw[e.start:e.start + 1]!r} at byte offset {e.start}")
    try:
        obj = json.loads(line, strict=False)
    except json.JSONDecodeError as e:
        return Bad("bad_json", f"{e.msg} at column {e.colno}")
    except (ValueError, RecursionError) as e:  # int too long to convert, absurd nesting
        return Bad("bad_json", str(e)[:200])
    if not isinstance(obj, dict):
        return Bad("not_an_object", f"the line is a JSON {_json_type(obj)}, expected an object")
    return obj


def check_fields(obj: dict, spec: Sequence[tuple[str, type]]) -> Bad | None:
    """Check that ``obj`` has every field of ``spec`` (``(name, type)`` pairs) with that type.

    Order: all fields present (``missing_field``, naming every missing one), then each field's
    type in ``spec`` order (``wrong_type``; ``bool`` is never an ``int``), then strings: lone
    surrogates from ``\\ud800``-style escapes (``invalid_utf8``) and empty or whitespace-only
    strings (``empty_field``). Returns None when every check passes.
    """
    missing = [name for name, _ in spec if name not in obj]
    if missing:
        return Bad("missing_field", "field " + ", ".join(repr(m) for m in missing) + " missing")
    for name, typ in spec:
        value = obj[name]
        ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
        if not ok:
            expected = {str: "string", int: "integer"}.get(typ, typ.__name__)
            return Bad("wrong_type", f"field {name!r} is a JSON {_json_type(value)} ({value!r:.40}), "
                                     f"expected {expected}")
    for name, typ in spec:
        if typ is not str:
            continue
        value = obj[name]
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return Bad("invalid_utf8", f"field {name!r} holds a lone surrogate (\\ud800-style escape)")
        if not value.strip():
            return Bad("empty_field", f"field {name!r} is empty or whitespace only ({value!r:.20})")
    return None


def _parse_hh(obj: dict) -> tuple[str, str, str] | Bad:
    """Return ``(prompt, chosen_response, rejected_response)`` or a :class:`Bad`."""
    bad = check_fields(obj, (("chosen", str), ("rejected", str)))
    if bad is not None:
        return bad
    chosen, rejected = obj["chosen"], obj["rejected"]
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if ASSISTANT_TAG not in text:
            return Bad("no_assistant_turn", f"field {name!r} has no {ASSISTANT_TAG!r}")
    prompt_c, resp_c = split_dialogue(chosen)
    prompt_r, resp_r = split_dialogue(rejected)
    if prompt_c != prompt_r:
        return Bad("no_shared_prompt", "'chosen' and 'rejected' differ before their last Assistant turn")
    for name, resp in (("chosen", resp_c), ("rejected", resp_r)):
        if not resp.strip():
            return Bad("empty_response", f"field {name!r} has an empty final Assistant turn")
    if resp_c == resp_r:
        return Bad("identical", "'chosen' and 'rejected' have the same final Assistant turn")
    return prompt_c, resp_c, resp_r


def _parse_hh_chat(obj: dict) -> tuple[str, str, str] | Bad:
    """:func:`_parse_hh`, and the prompt must split into chat turns (:func:`dialogue_messages`)."""
    parsed = _parse_hh(obj)
    if isinstance(parsed, Bad):
        return parsed
    try:
        dialogue_messages(parsed[0])
    except ValueError as e:
        return Bad("bad_dialogue", f"field 'chosen': {e}")
    return parsed


GZIP_MAGIC = b"\x1f\x8b"


def _open_lines(path: Path):
    """Binary file object; iterating it splits on b"\\n" only (never on U+2028/U+0085/\\r).

    Gzip is used for a ``.gz`` name or when the file starts with the gzip magic bytes.
    """
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == GZIP_MAGIC else open(path, "rb")


T = TypeVar("T")


def load_jsonl(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    parse: Callable[[dict], Any],
    make: Callable[[Any, str], T],
    *,
    on_error: str = "skip",
    max_rows: int | None = None,
    kind: str = "jsonl",
) -> tuple[list[T], LoadStats]:
    """Read JSONL files with the bad-data policy; the engine behind every loader here.

    Each non-blank line (split on ``b"\\n"`` only) is decoded by :func:`decode_json_object`, then
    ``parse(obj)`` returns a value or a :class:`Bad`; ``make(value, "<file name>:<line>")`` builds
    the kept item. One INFO line per file (``"<kind> <path>: rows=.. kept=.. skipped=.. (..);
    first: reason@file:line"``) is logged to logger ``nemo_rlhf.data``; each skipped row is logged
    at DEBUG.

    Raises:
        FileNotFoundError: a path does not exist (checked for all paths before reading any).
        DataFormatError: ``on_error="error"`` and a row is bad (``"<path>:<line>: <reason>: <detail>"``);
            or, under both policies, a file cannot be read to the end (truncated/corrupt gzip,
            I/O error: ``"<path>: truncated_file: ..."``). Rows already read from that file are
            dropped with it (the exception is raised, nothing is returned).
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
            raise FileNotFoundError(f"{kind} file not found: {str(path)!r}")

    items: list[T] = []
    total = LoadStats()
    for path in paths:
        if max_rows is not None and total.rows >= max_rows:
            break
        stats = LoadStats()
        lineno = 0
        try:
            with _open_lines(path) as f:
                for lineno, raw in enumerate(f, start=1):
                    if not raw.strip():
                        continue
                    if max_rows is not None and total.rows + stats.rows >= max_rows:
                        break
                    stats.rows += 1
                    if raw.endswith(b"\n"):
                        raw = raw[:-1]
                    parsed = decode_json_object(raw)
                    if not isinstance(parsed, Bad):
                        parsed = parse(parsed)
                    if isinstance(parsed, Bad):
                        reason, detail = parsed
                        where = f"{path.name}:{lineno}"
                        if on_error == "error":
                            raise DataFormatError(
                                f"{path}:{lineno}: {reason}" + (f": {detail}" if detail else ""),
                                path=path, line=lineno, reason=reason)
                        stats.skipped[reason] += 1
                        stats.first.setdefault(reason, where)
                        logger.debug("%s %s:%d skipped: %s: %s", kind, path, lineno, reason, detail)
                        continue
                    items.append(make(parsed, f"{path.name}:{lineno}"))
                    stats.kept += 1
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise DataFormatError(
                f"{path}: truncated_file: cannot read the file to the end (stopped after line "
                f"{lineno}): {type(e).__name__}: {e}; nothing from this file is used",
                path=path, line=None, reason="truncated_file") from e
        summary = stats.summary()
        if stats.first:
            summary += "; " + stats.where()
        logger.info("%s %s: %s", kind, path, summary)
        total.merge(stats)
    return items, total


def load_hh_pairs(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    on_error: str = "skip",
    max_rows: int | None = None,
    chat: bool = False,
) -> tuple[list[PreferencePair], LoadStats]:
    """Load HH-RLHF preference pairs from ``.jsonl`` or ``.jsonl.gz`` files.

    Lines are split on ``b"\\n"`` only (U+2028, U+2029, U+0085, ``\\r``, ``\\x0b``, ``\\x0c`` in
    strings are kept, raw or escaped); blank lines are ignored and not counted. A row is bad
    (counted in ``LoadStats.skipped`` under the first matching reason, in this order) when it is:
    not UTF-8 (``invalid_utf8``, also for JSON escapes of lone surrogates), not JSON
    (``bad_json``), not a JSON object (``not_an_object``), lacking ``chosen``/``rejected``
    (``missing_field``), not strings (``wrong_type``), empty or whitespace-only strings
    (``empty_field``), without ``"\\n\\nAssistant:"`` (``no_assistant_turn``), with different
    prompts in chosen and rejected (``no_shared_prompt``), with an empty/whitespace final turn
    (``empty_response``), with equal final turns (``identical``), or, with ``chat=True``, with a
    prompt that does not split into alternating Human/Assistant turns (``bad_dialogue``,
    :func:`dialogue_messages`). Other fields are ignored. One
    INFO summary line per file is logged to logger ``nemo_rlhf.data``, naming the ``file:line`` of
    the first row of each skip reason.

    Args:
        paths: one path or several.
        on_error: ``"skip"`` (count and continue) or ``"error"`` (raise on the first bad row).
        max_rows: stop after this many non-blank rows in total over all files (None: no limit;
            a file is then not read to its end, so a truncated tail is not noticed).
        chat: also check that each prompt splits into chat turns (``data.chat_template``).

    Returns:
        ``(pairs, stats)`` with stats summed over all files.

    Raises:
        FileNotFoundError: a path does not exist (message names it).
        DataFormatError: ``on_error="error"`` and a row is bad (message
            ``"<path>:<line>: <reason>: <detail>"``, the detail naming the field where there is
            one); or, under either policy, a file cannot be read to its end (truncated or corrupt
            gzip; message ``"<path>: truncated_file: ..."``).
        ValueError: bad ``on_error`` or negative ``max_rows``.
    """
    return load_jsonl(paths, _parse_hh_chat if chat else _parse_hh, lambda v, src: PreferencePair(*v, src),
                      on_error=on_error, max_rows=max_rows, kind="hh-rlhf")


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
