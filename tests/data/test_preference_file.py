"""A preference file (any file in the HH format) through the path the reward model and DPO read it
(issue 14 §4): ``tasks.load_split_pairs(data)`` then ``tasks.preference_dataset(data, ...)``.

Each bad row — a missing field, an empty response, identical responses, a pair too long for
``data.max_prompt_len`` / ``data.max_seq_len`` — follows ``data.on_error``: skipped and counted by
reason (the loader's ``LoadStats.skipped``, the dataset's ``skipped_overlong``), or a
``DataFormatError`` naming ``file:line`` and the reason.
"""

from __future__ import annotations

import json

import pytest

from nemo_rlhf.config import DataConfig
from nemo_rlhf.data.hh import DataFormatError
from nemo_rlhf.data.tasks import load_split_pairs, preference_dataset


class CharTokenizer:
    """One token per character, eos 0: token counts are string lengths."""

    eos_id = 0
    pad_id = 0

    def encode_batch(self, texts):
        return [[ord(c) for c in t] for t in texts]


def row(prompt: str, chosen: str, rejected: str) -> str:
    return json.dumps({"chosen": f"\n\nHuman: {prompt}\n\nAssistant: {chosen}",
                       "rejected": f"\n\nHuman: {prompt}\n\nAssistant: {rejected}"})


GOOD = row("hi", "good", "bad")
BAD = {  # reason -> the row, written at line 2 of its file
    "missing_field": json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: good"}),
    "empty_field": json.dumps({"chosen": "", "rejected": "\n\nHuman: hi\n\nAssistant: bad"}),
    "empty_response": row("hi", "   ", "bad"),
    "identical": row("hi", "same", "same"),
}
LONG = row("x" * 200, "good", "bad")  # prompt of ~215 characters > data.max_prompt_len=64


def data_cfg(path, on_error="skip", overlong="skip"):
    # heldout_fraction 1e-9: every row on the training side (the split itself is tested elsewhere)
    return DataConfig(files=[str(path)], heldout_fraction=1e-9, on_error=on_error, overlong=overlong,
                      max_seq_len=96, max_prompt_len=64)


def write(tmp_path, *lines: str):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_row_is_skipped_and_counted_by_reason(tmp_path, reason):
    path = write(tmp_path, GOOD, BAD[reason], GOOD)
    train, heldout, stats = load_split_pairs(data_cfg(path))
    assert len(train) == 2 and heldout == []
    assert (stats.rows, stats.kept, dict(stats.skipped)) == (3, 2, {reason: 1})
    assert stats.first[reason] == "prefs.jsonl:2"
    assert [p.source for p in train] == ["prefs.jsonl:1", "prefs.jsonl:3"]


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_row_raises_naming_file_and_line_under_on_error_error(tmp_path, reason):
    path = write(tmp_path, GOOD, BAD[reason], GOOD)
    with pytest.raises(DataFormatError, match=rf"prefs\.jsonl:2: {reason}") as err:
        load_split_pairs(data_cfg(path, on_error="error"))
    assert (err.value.line, err.value.reason) == (2, reason)


def test_overlong_pair_is_skipped_and_counted(tmp_path):
    path = write(tmp_path, GOOD, LONG, GOOD)
    cfg = data_cfg(path)
    pairs, _, stats = load_split_pairs(cfg)
    assert len(pairs) == 3 and not stats.skipped  # the loader keeps it: length is the dataset's business
    ds = preference_dataset(cfg, pairs, CharTokenizer())
    assert len(ds) == 2 and ds.stats == {"skipped_overlong": 1}
    item = ds[0]
    assert item["prompt_length"].item() == len("\n\nHuman: hi\n\nAssistant:")


def test_overlong_pair_raises_naming_file_and_line_under_on_error_error(tmp_path):
    path = write(tmp_path, GOOD, GOOD, LONG)
    cfg = data_cfg(path, on_error="error")
    pairs, _, _ = load_split_pairs(cfg)
    with pytest.raises(DataFormatError, match=r"prefs\.jsonl:3: overlong: .*data.max_prompt_len=64") as err:
        preference_dataset(cfg, pairs, CharTokenizer())
    assert (err.value.line, err.value.reason) == (3, "overlong")


def test_overlong_pair_is_truncated_and_counted_with_overlong_truncate(tmp_path):
    # data.overlong=truncate keeps the latest turns whatever data.on_error says: not an error
    path = write(tmp_path, GOOD, LONG)
    cfg = data_cfg(path, on_error="error", overlong="truncate")
    pairs, _, _ = load_split_pairs(cfg)
    ds = preference_dataset(cfg, pairs, CharTokenizer())
    assert len(ds) == 2 and ds.stats["prompt_truncated"] == 1
    assert ds[1]["prompt_length"].item() == 64
