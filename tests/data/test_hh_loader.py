"""HH-RLHF loader: real shipped files, hand-made malformed rows, held-out split."""

from __future__ import annotations

import collections
import gzip
import json
import logging
from pathlib import Path

import pytest

from nemo_rlhf.data import (
    DataFormatError,
    PreferencePair,
    default_data_dir,
    load_hh_pairs,
    split_dialogue,
    split_heldout,
)

# Row counts from shared/data/README.md; skip reasons found by reading every row of the files.
REAL_FILES = {
    "helpful-base_test.jsonl.gz": (2354, {"no_shared_prompt": 9, "empty_response": 4, "identical": 2}),
    "harmless-base_test.jsonl.gz": (2312, {"no_shared_prompt": 5, "empty_response": 4}),
    "helpful-rejection-sampled_test.jsonl.gz": (2749, {"identical": 32, "no_shared_prompt": 3}),
}


@pytest.fixture(scope="module")
def hh_dir() -> Path:
    return default_data_dir() / "hh-rlhf"


@pytest.fixture(scope="module")
def all_pairs(hh_dir) -> list[PreferencePair]:
    pairs, _ = load_hh_pairs([hh_dir / name for name in REAL_FILES])
    return pairs


# ---------------------------------------------------------------- split_dialogue


def test_split_dialogue_uses_last_assistant_tag():
    text = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: see you"
    prompt, response = split_dialogue(text)
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"
    assert response == " see you"
    assert split_dialogue("\n\nHuman: x\n\nAssistant:") == ("\n\nHuman: x\n\nAssistant:", "")


def test_split_dialogue_errors():
    with pytest.raises(ValueError, match="Assistant"):
        split_dialogue("\n\nHuman: no answer\n\nAssistant :")
    with pytest.raises(TypeError):
        split_dialogue(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------- real files


@pytest.mark.parametrize("name", list(REAL_FILES))
def test_real_file_counts(hh_dir, name, caplog):
    rows, reasons = REAL_FILES[name]
    with caplog.at_level(logging.INFO, logger="nemo_rlhf.data"):
        pairs, stats = load_hh_pairs(hh_dir / name)
    assert stats.rows == rows
    assert stats.kept == len(pairs) == rows - sum(reasons.values())
    assert stats.kept + sum(stats.skipped.values()) == stats.rows
    assert dict(stats.skipped) == reasons
    # one INFO line for the file, carrying the counts
    lines = [r.getMessage() for r in caplog.records if r.name == "nemo_rlhf.data"]
    assert len(lines) == 1 and name in lines[0] and f"rows={rows}" in lines[0]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "nemo_rlhf.data")
    for p in pairs:
        assert p.prompt.endswith("\n\nAssistant:") and p.prompt.startswith("\n\nHuman:")
        assert p.chosen.strip() and p.rejected.strip() and p.chosen != p.rejected
        assert p.source.startswith(name + ":")


def test_real_file_first_pair_and_source(hh_dir):
    pairs, _ = load_hh_pairs(hh_dir / "helpful-base_test.jsonl.gz", max_rows=1)
    (p,) = pairs
    with gzip.open(hh_dir / "helpful-base_test.jsonl.gz", "rb") as f:
        row = json.loads(f.readline())
    assert p.source == "helpful-base_test.jsonl.gz:1"
    assert p.prompt + p.chosen == row["chosen"]
    assert p.prompt + p.rejected == row["rejected"]
    assert p.chosen.startswith(" ")  # leading space kept for GPT-2 BPE


def test_real_file_error_mode_names_first_bad_line(hh_dir):
    # Line 121 of helpful-base_test has an empty rejected final turn (" ").
    with pytest.raises(DataFormatError, match=r"helpful-base_test\.jsonl\.gz:121: empty_response"):
        load_hh_pairs(hh_dir / "helpful-base_test.jsonl.gz", on_error="error")


def test_max_rows_spans_files(hh_dir):
    files = [hh_dir / name for name in REAL_FILES]
    pairs, stats = load_hh_pairs(files, max_rows=2354 + 10)
    assert stats.rows == 2354 + 10
    assert pairs[-1].source.startswith("harmless-base_test.jsonl.gz:")
    assert load_hh_pairs(files, max_rows=0)[1].rows == 0


def test_missing_file_and_bad_args(tmp_path):
    missing = tmp_path / "nope.jsonl.gz"
    with pytest.raises(FileNotFoundError, match="nope.jsonl.gz"):
        load_hh_pairs(missing)
    with pytest.raises(ValueError, match="on_error"):
        load_hh_pairs([], on_error="ignore")


def test_corrupt_gzip_raises(tmp_path):
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(b"this is not gzip")
    with pytest.raises(DataFormatError, match="broken.jsonl.gz"):
        load_hh_pairs(path)


# ---------------------------------------------------------------- malformed rows


def _dump(chosen, rejected) -> bytes:
    return json.dumps({"chosen": chosen, "rejected": rejected}, ensure_ascii=False).encode("utf-8")


MALFORMED_LINES = [
    _dump("\n\nHuman: hi\n\nAssistant: good", "\n\nHuman: hi\n\nAssistant: bad"),  # 1 kept
    b"",  # 2 blank: ignored, not counted
    b'{"chosen": "\n\nHuman: \xff\xfe", "rejected": "x"}'.replace(b"\n", b"\\n"),  # 3 invalid_utf8
    b'{"chosen": "unterminated',  # 4 bad_json
    b'["\\n\\nHuman: a\\n\\nAssistant: b", "c"]',  # 5 not_an_object (JSON array)
    json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b"}).encode(),  # 6 missing_field
    json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": 3}).encode(),  # 7 wrong_type
    _dump("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a Assistant: c"),  # 8 no_assistant_turn
    _dump("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: z\n\nAssistant: c"),  # 9 no_shared_prompt
    _dump("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a\n\nAssistant:  \n"),  # 10 empty_response
    _dump("\n\nHuman: a\n\nAssistant: same", "\n\nHuman: a\n\nAssistant: same"),  # 11 identical
    b"   ",  # 12 whitespace-only: ignored
    # 13 kept: raw U+2028 and U+0085 inside the strings must not split the line
    _dump("\n\nHuman: line\u2028sep\n\nAssistant: ok\u0085yes", "\n\nHuman: line\u2028sep\n\nAssistant: no"),
]
REASONS = [
    "invalid_utf8", "bad_json", "not_an_object", "missing_field", "wrong_type",
    "no_assistant_turn", "no_shared_prompt", "empty_response", "identical",
]


@pytest.fixture(params=["jsonl", "jsonl.gz"])
def malformed_file(tmp_path, request) -> Path:
    data = b"\n".join(MALFORMED_LINES) + b"\n"
    assert "\u2028".encode() in data and b"\xff" in data
    path = tmp_path / f"bad.{request.param}"
    path.write_bytes(gzip.compress(data) if request.param.endswith("gz") else data)
    return path


def test_malformed_rows_counted_by_reason(malformed_file):
    pairs, stats = load_hh_pairs(malformed_file)
    assert stats.rows == 11
    assert stats.kept == 2
    assert stats.skipped == collections.Counter({r: 1 for r in REASONS})
    assert [p.source for p in pairs] == [f"{malformed_file.name}:1", f"{malformed_file.name}:13"]
    assert pairs[0] == PreferencePair("\n\nHuman: hi\n\nAssistant:", " good", " bad", f"{malformed_file.name}:1")
    assert pairs[1].prompt == "\n\nHuman: line\u2028sep\n\nAssistant:"
    assert pairs[1].chosen == " ok\u0085yes"
    summary = stats.summary()
    assert "rows=11" in summary and "kept=2" in summary and "identical=1" in summary


def test_malformed_rows_error_mode_names_file_and_line(malformed_file):
    with pytest.raises(DataFormatError, match=rf"{malformed_file.name}:3: invalid_utf8"):
        load_hh_pairs(malformed_file, on_error="error")
    # the error mode keeps going past good rows: drop line 3 and the next bad one is line 4
    lines = list(MALFORMED_LINES)
    lines[2] = lines[0]
    path = malformed_file.with_name("bad2.jsonl")
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataFormatError, match=r"bad2\.jsonl:4: bad_json"):
        load_hh_pairs(path, on_error="error")


def test_lone_surrogate_escape_is_invalid_utf8(tmp_path):
    path = tmp_path / "surrogate.jsonl"
    path.write_bytes(b'{"chosen": "\\n\\nHuman: \\ud800\\n\\nAssistant: a", "rejected": "\\n\\nHuman: \\ud800\\n\\nAssistant: b"}\n')
    pairs, stats = load_hh_pairs(path)
    assert pairs == [] and stats.skipped == collections.Counter(invalid_utf8=1)


# ---------------------------------------------------------------- held-out split


def test_split_heldout_disjoint_deterministic(all_pairs):
    train, heldout = split_heldout(all_pairs, 0.1, seed=7)
    assert len(train) + len(heldout) == len(all_pairs)
    train_prompts = {p.prompt for p in train}
    held_prompts = {p.prompt for p in heldout}
    assert not train_prompts & held_prompts
    # the real data repeats prompts, so the by-prompt property is actually exercised
    counts = collections.Counter(p.prompt for p in all_pairs)
    assert max(counts.values()) > 1
    assert 0.07 < len(heldout) / len(all_pairs) < 0.13
    # deterministic and independent of input order
    assert split_heldout(all_pairs, 0.1, seed=7) == (train, heldout)
    train_r, held_r = split_heldout(list(reversed(all_pairs)), 0.1, seed=7)
    assert {p.source for p in held_r} == {p.source for p in heldout}
    # another seed gives another split
    assert {p.source for p in split_heldout(all_pairs, 0.1, seed=8)[1]} != {p.source for p in heldout}


def test_split_heldout_edges():
    pairs = [PreferencePair(f"\n\nHuman: {i}\n\nAssistant:", " a", " b", f"f:{i}") for i in range(50)]
    assert split_heldout(pairs, 0.0) == (pairs, [])
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="heldout_fraction"):
            split_heldout(pairs, bad)


# ---------------------------------------------------------------- data dir


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("NEMO_RLHF_DATA_DIR", raising=False)
    expected = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()
    if expected.is_dir():
        assert default_data_dir().resolve() == expected
    else:  # data supplied through the env var only
        with pytest.raises(FileNotFoundError, match="NEMO_RLHF_DATA_DIR"):
            default_data_dir()
    monkeypatch.setenv("NEMO_RLHF_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.setenv("NEMO_RLHF_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="NEMO_RLHF_DATA_DIR") as exc:
        default_data_dir()
    assert "missing" in str(exc.value)
