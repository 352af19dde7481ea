"""Bad-data policy on corrupted copies of every shipped data file (issue 5, item 5).

Each test reads the first rows of a real file from ``default_data_dir()``, writes a copy with
corruptions injected at known line numbers into ``tmp_path`` (never into the repo) and checks:
skip policy -> exact counts per reason, every good row kept with its text and line number;
error policy -> DataFormatError naming ``<file>:<line>`` and the reason of the first bad row (and
of every next one, as the bad lines are repaired one by one). Also truncated / corrupt gzip copies
and corrupted GPT-2 ``vocab.json`` / ``merges.txt``.
"""

from __future__ import annotations

import collections
import gzip
import json
import logging
import re
from pathlib import Path

import pytest

from nemo_rlhf.data import DataFormatError, default_data_dir, load_hh_pairs, load_imdb, load_tokenizer
from nemo_rlhf.data.tokenizer import read_gpt2_merges, read_gpt2_vocab

pytestmark = pytest.mark.faults

N_ROWS = 300  # rows of each shipped file used (keeps the file fast)
SEP = "[\u2028|\u2029|\u0085|\r|\x0b|\x0c|\t]"  # Unicode / ASCII line separators a loader must keep
MARK = "@@SEPARATORS@@"

JSONL_FILES = {
    "hh-rlhf/helpful-base_test.jsonl.gz": "hh",
    "hh-rlhf/harmless-base_test.jsonl.gz": "hh",
    "hh-rlhf/helpful-rejection-sampled_test.jsonl.gz": "hh",
    "imdb/train.jsonl.gz": "imdb",
    "imdb/valid.jsonl.gz": "imdb",
}
LOADERS = {"hh": load_hh_pairs, "imdb": load_imdb}
TEXT_FIELD = {"hh": "chosen", "imdb": "text"}
LAST_FIELD = {"hh": "rejected", "imdb": "rating"}


def _head(path: Path, n: int = N_ROWS) -> list[bytes]:
    """The first ``n`` lines of a shipped .jsonl.gz file, without their b"\\n"."""
    out = []
    with gzip.open(path, "rb") as f:
        for _ in range(n):
            out.append(f.readline().rstrip(b"\n"))
    assert all(out) and len(out) == n
    return out


def _write(path: Path, lines: list[bytes], final_newline: bool = True) -> Path:
    data = b"\n".join(lines) + (b"\n" if final_newline else b"")
    path.write_bytes(gzip.compress(data, compresslevel=1) if path.suffix == ".gz" else data)
    return path


def _dumps(obj, ascii_only: bool = False) -> bytes:
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8")


def _with_separators(obj: dict, kind: str, sep: str) -> dict:
    """Put ``sep`` into the text: for HH into the shared prompt and the chosen final turn."""
    obj = dict(obj)
    if kind == "hh":
        for field in ("chosen", "rejected"):
            obj[field] = obj[field].replace("\n\nHuman: ", f"\n\nHuman: {sep}", 1)
        obj["chosen"] += sep
    else:
        obj["text"] = sep + obj["text"].replace(" ", sep, 1)
    return obj


def _corruptions(kind: str) -> list[tuple[str, object]]:
    """``(name, fn)``: ``fn(line, obj) -> (bytes, reason or None)``; None means the row is kept."""
    text, last = TEXT_FIELD[kind], LAST_FIELD[kind]

    def raw_separators(line, obj):  # raw bytes of U+2028 etc. and raw control chars in the string
        return _dumps(_with_separators(obj, kind, MARK)).replace(MARK.encode(), SEP.encode("utf-8")), None

    def escaped_separators(line, obj):  # the same characters as \u2028-style JSON escapes
        return _dumps(_with_separators(obj, kind, SEP), ascii_only=True), None

    common = [
        ("raw_separators", raw_separators),
        ("escaped_separators", escaped_separators),
        ("crlf_line_end", lambda line, obj: (line + b"\r", None)),
        ("malformed_json", lambda line, obj: (line[: len(line) // 2], "bad_json")),
        ("not_an_object", lambda line, obj: (_dumps([obj]), "not_an_object")),
        ("missing_field", lambda line, obj: (_dumps({k: v for k, v in obj.items() if k != last}), "missing_field")),
        ("null_field", lambda line, obj: (_dumps({**obj, text: None}), "wrong_type")),
        ("number_for_string", lambda line, obj: (_dumps({**obj, text: 42}), "wrong_type")),
        ("empty_string", lambda line, obj: (_dumps({**obj, text: ""}), "empty_field")),
        ("invalid_utf8", lambda line, obj: (line.replace(f'"{text}": "'.encode(), f'"{text}": "'.encode() + b"\xff\xfe", 1),
                                            "invalid_utf8")),
        ("lone_surrogate", lambda line, obj: (_dumps({**obj, text: obj[text] + "\ud800"}, ascii_only=True), "invalid_utf8")),
    ]
    if kind == "imdb":
        common += [
            ("bool_label", lambda line, obj: (_dumps({**obj, "label": bool(obj["label"])}), "wrong_type")),
            ("float_rating", lambda line, obj: (_dumps({**obj, "rating": float(obj["rating"])}), "wrong_type")),
            ("rating_out_of_range", lambda line, obj: (_dumps({**obj, "rating": 11}), "bad_value")),
            ("label_mismatch", lambda line, obj: (_dumps({**obj, "label": 1 - obj["label"]}), "label_mismatch")),
        ]
    return common


def _text_of(item, kind: str) -> str:
    return item.prompt + item.chosen if kind == "hh" else item.text


def _line_of(item) -> int:
    return int(item.source.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def data_dir() -> Path:
    return default_data_dir()


# ---------------------------------------------------------------- JSONL files (HH-RLHF, IMDB)


@pytest.mark.parametrize("rel", list(JSONL_FILES))
def test_corrupted_jsonl_copy(rel, data_dir, tmp_path, caplog):
    kind = JSONL_FILES[rel]
    load = LOADERS[kind]
    name = Path(rel).name
    orig = _head(data_dir / rel)

    # Baseline: the clean copy (HH files have a few naturally awkward rows in the first 300).
    (tmp_path / "clean").mkdir()
    clean = _write(tmp_path / "clean" / name, orig)
    base_items, base_stats = load(clean)
    base_good = {_line_of(it) for it in base_items}
    natural_bad = sorted(set(range(1, N_ROWS + 1)) - base_good)
    assert base_stats.rows == N_ROWS and len(natural_bad) == sum(base_stats.skipped.values())
    assert 1 in base_good and N_ROWS in base_good  # line 1 repairs bad lines below; line 300 is cut

    # Inject one corruption of each kind into good rows, every third line from line 2; the
    # separator rows come first so every later line number is checked against them.
    kinds = _corruptions(kind)
    targets = [n for n in range(2, N_ROWS, 3) if n in base_good][: len(kinds)]
    assert len(targets) == len(kinds)
    lines = list(orig)
    injected: dict[int, str | None] = {}
    for (kname, fn), lineno in zip(kinds, targets):
        lines[lineno - 1], injected[lineno] = fn(orig[lineno - 1], json.loads(orig[lineno - 1]))
        assert lines[lineno - 1] != orig[lineno - 1], kname
    # and a last line cut in the middle with no final newline (a plain copy cut while writing)
    lines[-1] = orig[-1][: len(orig[-1]) // 3]
    injected[N_ROWS] = "bad_json"
    bad_injected = {n: r for n, r in injected.items() if r is not None}
    assert set(collections.Counter(bad_injected.values())) >= {
        "bad_json", "not_an_object", "missing_field", "wrong_type", "empty_field", "invalid_utf8"}

    for suffix in (".gz", ""):  # the gzip copy and a plain .jsonl copy
        path = _write(tmp_path / (name if suffix else name[: -len(".gz")]), lines, final_newline=False)
        fname = path.name

        # ---- skip policy: exact counts per reason, all good rows kept, texts and lines intact
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="nemo_rlhf.data"):
            items, stats = load(path, on_error="skip")
        expected = collections.Counter(base_stats.skipped)
        expected.update(bad_injected.values())
        assert stats.rows == N_ROWS
        assert stats.skipped == expected
        assert stats.kept == len(items) == N_ROWS - len(natural_bad) - len(bad_injected)
        assert [_line_of(it) for it in items] == sorted(base_good - set(bad_injected))
        assert all(it.source.startswith(fname + ":") for it in items)
        by_line = {_line_of(it): it for it in items}
        for n, it in by_line.items():
            if n in injected:  # kept corrupted rows: separators, CRLF
                continue
            assert _text_of(it, kind) == json.loads(orig[n - 1])[TEXT_FIELD[kind]]
        # separators kept verbatim (raw and escaped), not split, not normalised
        assert "\u2028".encode() in lines[targets[0] - 1] and b"\r" in lines[targets[0] - 1]
        assert lines[targets[1] - 1].isascii() and b"\\u2028" in lines[targets[1] - 1]
        for n in targets[:2]:
            want = json.loads(lines[n - 1], strict=False)[TEXT_FIELD[kind]]
            assert SEP in want and _text_of(by_line[n], kind) == want
        assert _text_of(by_line[targets[2]], kind) == json.loads(orig[targets[2] - 1])[TEXT_FIELD[kind]]
        # real texts with U+0085 (IMDB) survive too
        real_nel = [n for n in base_good - set(injected) if "\u0085".encode() in orig[n - 1]]
        for n in real_nel:
            assert "\u0085" in _text_of(by_line[n], kind)
        # one summary line for the file, naming the first line of each reason
        msgs = [r.getMessage() for r in caplog.records if r.name == "nemo_rlhf.data" and r.levelno == logging.INFO]
        assert len(msgs) == 1 and fname in msgs[0] and f"rows={N_ROWS}" in msgs[0]
        first = min(bad_injected)
        assert f"{bad_injected[first]}@{fname}:{first}" in msgs[0]
        assert stats.first[bad_injected[first]] == f"{fname}:{first}"

        # ---- error policy: the first bad row, then (repairing each) every next one in order
        seen = []
        work = list(lines)
        while True:
            _write(path, work, final_newline=False)
            try:
                load(path, on_error="error")
            except DataFormatError as e:
                assert re.search(rf"{re.escape(fname)}:{e.line}: {e.reason}\b", str(e)), str(e)
                assert str(path) in str(e)
                if e.reason in ("missing_field", "wrong_type", "empty_field"):
                    assert "field '" in str(e)
                seen.append((e.line, e.reason))
                work[e.line - 1] = orig[0]  # repair with a known good row
                assert len(seen) <= N_ROWS
                continue
            break
        assert seen[0] == (min(bad_injected), bad_injected[min(bad_injected)])
        assert [s for s in seen if s[0] in bad_injected] == sorted(bad_injected.items())
        natural = [s for s in seen if s[0] not in bad_injected]
        assert [n for n, _ in natural] == natural_bad
        assert collections.Counter(r for _, r in natural) == base_stats.skipped


@pytest.mark.parametrize("rel", list(JSONL_FILES))
@pytest.mark.parametrize("damage", ["cut_in_half", "no_trailer", "flipped_bytes"])
def test_truncated_or_corrupt_gzip_copy(rel, damage, data_dir, tmp_path):
    kind = JSONL_FILES[rel]
    name = Path(rel).name
    orig = _head(data_dir / rel)
    # only rows the loader keeps, so under "error" nothing but the damage can stop it
    good, _ = LOADERS[kind](_write(tmp_path / "clean.jsonl", orig))
    rows = [orig[_line_of(it) - 1] for it in good]
    blob = gzip.compress(b"\n".join(rows) + b"\n")
    if damage == "cut_in_half":
        blob = blob[: len(blob) // 2]
    elif damage == "no_trailer":  # deflate data complete, CRC32/ISIZE trailer missing
        blob = blob[:-8]
    else:
        mid = len(blob) // 2
        blob = blob[:mid] + bytes(b ^ 0x5A for b in blob[mid: mid + 16]) + blob[mid + 16:]
    path = tmp_path / name
    path.write_bytes(blob)
    for policy in ("skip", "error"):  # a file not readable to its end is never half-used
        with pytest.raises(DataFormatError) as exc:
            LOADERS[kind](path, on_error=policy)
        msg = str(exc.value)
        if damage != "flipped_bytes" or exc.value.reason == "truncated_file":
            assert exc.value.reason == "truncated_file" and exc.value.line is None
            assert msg.startswith(f"{path}: truncated_file"), msg
        else:  # garbage decompressed before the CRC check: under "error" a bad row names it first
            assert policy == "error" and re.search(rf"{re.escape(name)}:\d+: ", msg), msg


def test_imdb_real_files_are_clean(data_dir):
    reviews, stats = load_imdb(data_dir / "imdb" / "valid.jsonl.gz", on_error="error")
    assert stats.rows == stats.kept == len(reviews) == 5000 and not stats.skipped
    assert sum(r.label for r in reviews) == 2483
    assert sum("\u0085" in r.text for r in reviews) == 71
    assert reviews[0].source == "valid.jsonl.gz:1" and reviews[0].id.startswith("test/")


def test_imdb_rating_label_edges(tmp_path):
    rows = [{"id": f"x/{r}_{lab}", "text": "t", "label": lab, "rating": r} for r in range(0, 12) for lab in (0, 1)]
    path = _write(tmp_path / "edges.jsonl", [_dumps(r) for r in rows])
    reviews, stats = load_imdb(path)
    assert sorted((r.rating, r.label) for r in reviews) == [(r, 0) for r in range(1, 5)] + [(r, 1) for r in range(7, 11)]
    # rating 0 and 11: bad_value (x2 labels); ratings 1-4 and 7-10 with the other label, 5, 6: mismatch
    assert stats.skipped == collections.Counter(bad_value=4, label_mismatch=12)
    with pytest.raises(DataFormatError, match=r"edges\.jsonl:1: bad_value: field 'rating' is 0"):
        load_imdb(path, on_error="error")


# ---------------------------------------------------------------- GPT-2 tokenizer files


@pytest.fixture(scope="module")
def gpt2_files(data_dir) -> tuple[bytes, list[bytes]]:
    d = data_dir / "gpt2-tokenizer"
    merges = (d / "merges.txt").read_bytes().split(b"\n")[: N_ROWS + 1]  # header + 300 merges
    return (d / "vocab.json").read_bytes(), merges


def _cfg(vocab: Path, merges: Path) -> dict:
    return {"type": "gpt2_bpe", "vocab_file": str(vocab), "merges_file": str(merges)}


VOCAB_CASES = ["truncated", "empty_file", "not_an_object", "string_id", "float_id", "bool_id", "negative_id",
               "invalid_utf8", "lone_surrogate", "duplicate_id", "duplicate_token"]


def _vocab_corruptions(vocab: bytes) -> dict[str, tuple[bytes, str, str]]:
    """name -> ``(corrupted bytes, reason, regex the message must match after the path)``."""
    bad_byte_at = vocab.index(b'"!": 0') + 1
    cases = [
        ("truncated", vocab[: len(vocab) // 2], "bad_json", r":1:\d+: bad_json"),
        ("empty_file", b"", "bad_json", r":1:1: bad_json"),
        ("not_an_object", b'["!", "\\""]', "not_an_object", r": not_an_object"),
        ("string_id", vocab.replace(b'"!": 0', b'"!": "0"', 1), "wrong_type", r": wrong_type: token '!' has id '0'"),
        ("float_id", vocab.replace(b'"!": 0', b'"!": 0.0', 1), "wrong_type", r": wrong_type: token '!' has id 0\.0"),
        ("bool_id", vocab.replace(b'"!": 0', b'"!": true', 1), "wrong_type", r": wrong_type: token '!' has id True"),
        ("negative_id", vocab.replace(b'"!": 0', b'"!": -1', 1), "wrong_type", r": wrong_type: token '!' has id -1"),
        ("invalid_utf8", vocab.replace(b'"!": 0', b'"\xff": 0', 1), "invalid_utf8", rf":1:{bad_byte_at + 1}: invalid_utf8"),
        ("lone_surrogate", vocab.replace(b'"!": 0', b'"\\ud800": 0', 1), "invalid_utf8", r": invalid_utf8: token"),
        ("duplicate_id", vocab.replace(b'"\\"": 1', b'"\\"": 0', 1), "duplicate_id", r": duplicate_id: id 0"),
        ("duplicate_token", vocab.replace(b'"\\"": 1', b'"!": 1', 1), "duplicate_token", r": duplicate_token: token '!'"),
    ]
    assert [c[0] for c in cases] == VOCAB_CASES
    return {c[0]: c[1:] for c in cases}


def test_gpt2_prefix_loads_and_crlf_merges_match(gpt2_files, tmp_path):
    vocab, merges = gpt2_files
    v = tmp_path / "vocab.json"
    v.write_bytes(vocab)
    m = _write(tmp_path / "merges.txt", merges)
    crlf = tmp_path / "merges_crlf.txt"
    crlf.write_bytes(b"\r\n".join(merges) + b"\r\n")
    assert len(read_gpt2_merges(m, read_gpt2_vocab(v))) == N_ROWS
    tok, tok_crlf = load_tokenizer(_cfg(v, m)), load_tokenizer(_cfg(v, crlf))
    text = "Hello world, the tokenizer\u2028keeps line\u0085separators."
    assert tok.encode(text) == tok_crlf.encode(text) and tok.decode(tok.encode(text)) == text
    assert tok.eos_id == 50256 and tok.vocab_size == 50257


@pytest.mark.parametrize("name", VOCAB_CASES)
def test_corrupted_vocab_json(name, gpt2_files, tmp_path):
    vocab, merges = gpt2_files
    data, reason, pattern = _vocab_corruptions(vocab)[name]
    assert data != vocab
    v = tmp_path / "vocab.json"
    v.write_bytes(data)
    m = _write(tmp_path / "merges.txt", merges)
    with pytest.raises(DataFormatError) as exc:
        load_tokenizer(_cfg(v, m))
    assert exc.value.reason == reason, name
    assert re.match(re.escape(str(v)) + pattern, str(exc.value)), (name, str(exc.value))


def _merges_corruptions(merges: list[bytes]) -> dict[int, tuple[bytes, str]]:
    """line number -> (corrupted line, reason)."""
    return {
        5: (merges[4] + b" extra", "bad_merge"),  # three tokens
        9: (merges[8].replace(b" ", b""), "bad_merge"),  # one token
        14: (b"", "bad_merge"),  # blank line inside the list
        20: (merges[19].replace(b" ", b"  "), "bad_merge"),  # two spaces
        33: (b"\xc4 \xa0t", "invalid_utf8"),  # a UTF-8 sequence split by the space
        47: ("\u0120t zzqx".encode(), "unknown_token"),  # second token not in the vocabulary
        60: (b"ab cd", "unknown_token"),  # both known, "abcd" is not (tokenizers' Rust builder panics)
    }


def test_corrupted_merges_txt(gpt2_files, tmp_path):
    vocab, merges = gpt2_files
    v = tmp_path / "vocab.json"
    v.write_bytes(vocab)
    parsed = read_gpt2_vocab(v)
    assert "ab" in parsed and "cd" in parsed and "abcd" not in parsed
    bad = _merges_corruptions(merges)
    lines = list(merges)
    for n, (line, _) in bad.items():
        lines[n - 1] = line
    m = tmp_path / "merges.txt"
    seen = []
    while True:  # the first bad line, then each next one as the previous is repaired
        _write(m, lines)
        try:
            load_tokenizer(_cfg(v, m))
        except DataFormatError as e:
            assert str(e).startswith(f"{m}:{e.line}"), str(e)
            assert f": {e.reason}" in str(e)
            seen.append((e.line, e.reason))
            lines[e.line - 1] = merges[e.line - 1]
            assert len(seen) <= len(bad)
            continue
        break
    assert seen == [(n, r) for n, (_, r) in sorted(bad.items())]


def test_corrupted_tokenizer_json_names_file(tmp_path, gpt2_files):
    vocab, merges = gpt2_files
    v = tmp_path / "vocab.json"
    v.write_bytes(vocab)
    saved = load_tokenizer(_cfg(v, _write(tmp_path / "merges.txt", merges))).save(tmp_path / "tokenizer.json")
    saved.write_bytes(saved.read_bytes()[:1000])
    with pytest.raises(DataFormatError, match=re.escape(str(saved))):
        load_tokenizer({"type": "tokenizer_json", "path": str(saved)})
