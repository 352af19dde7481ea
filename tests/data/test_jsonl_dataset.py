"""nemo_rlhf/data/tasks.py, ``data.dataset: jsonl``: rows ``{"prompt", "response"}`` as SFT pairs and
as online-RL prompts, the bad-row policy, and the randomwalks task files."""

from __future__ import annotations

import json

import pytest

from nemo_rlhf.config import DataConfig, parse_config
from nemo_rlhf.data.hh import DataFormatError
from nemo_rlhf.data.tasks import load_prompt_rows, load_split_pairs, load_split_prompts


def data_cfg(tmp_path, files, **kw):
    return parse_config(DataConfig, {"dataset": "jsonl", "data_dir": str(tmp_path), "files": files, **kw})


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def test_pairs_and_prompts_from_the_randomwalks_files(tmp_path):
    from nemo_rlhf.data.randomwalks import write_task

    write_task(tmp_path, n_sft_walks=50, n_offline_walks=5)
    cfg = data_cfg(tmp_path, ["sft.jsonl"], heldout_files=["sft.jsonl"], max_heldout_rows=10)
    train, held, stats = load_split_pairs(cfg)
    assert len(train) == 50 and len(held) == 10 and stats.kept == 60
    assert train[0].chosen.startswith(" ") and train[0].rejected == "" and train[0].source == "sft.jsonl:1"
    cfg = data_cfg(tmp_path, ["prompts.jsonl"], heldout_files=["heldout.jsonl"])
    graph = json.loads((tmp_path / "graph.json").read_text())
    tr, ho, _ = load_split_prompts(cfg, tokenizer=None)
    assert tr == graph["train_starts"] and ho == graph["heldout_starts"]
    # offline.jsonl's extra "reward" field is ignored
    rows, _ = load_prompt_rows(tmp_path / "offline.jsonl")
    assert len(rows) == 5 and all(r.response for r in rows)


def test_prompts_are_distinct_in_file_order_and_split_by_prompt_hash(tmp_path):
    write(tmp_path / "a.jsonl", [{"prompt": f"p{i % 40}", "response": f" r{i}"} for i in range(200)])
    tr, ho, _ = load_split_prompts(data_cfg(tmp_path, ["a.jsonl"], heldout_fraction=0.3), tokenizer=None)
    assert tr + ho and not set(tr) & set(ho) and len(tr) + len(ho) == 40
    assert tr == sorted(tr, key=lambda p: int(p[1:]))  # first-occurrence order
    pairs_tr, pairs_ho, _ = load_split_pairs(data_cfg(tmp_path, ["a.jsonl"], heldout_fraction=0.3))
    assert {p.prompt for p in pairs_ho} == set(ho) and {p.prompt for p in pairs_tr} == set(tr)


BAD = [
    ('{"prompt": "a", "response": " b"', "bad_json"),
    ('["a", "b"]', "not_an_object"),
    ({"response": " b"}, "missing_field"),
    ({"prompt": 3, "response": " b"}, "wrong_type"),
    ({"prompt": "a", "response": 7}, "wrong_type"),
    ({"prompt": "  ", "response": " b"}, "empty_field"),
    ({"prompt": "a", "response": "   "}, "empty_field"),
]


@pytest.mark.parametrize("row,reason", BAD)
def test_bad_rows_are_skipped_or_raised_naming_file_and_line(tmp_path, row, reason):
    write(tmp_path / "d.jsonl", [{"prompt": "x", "response": " y"}, row, {"prompt": "z", "response": " w"}])
    pairs, _, stats = load_split_pairs(data_cfg(tmp_path, ["d.jsonl"], heldout_files=["d.jsonl"]))
    assert [p.prompt for p in pairs] == ["x", "z"] and stats.skipped[reason] == 2  # train + held-out reads
    with pytest.raises(DataFormatError, match=rf"d.jsonl:2: {reason}") as err:
        load_split_pairs(data_cfg(tmp_path, ["d.jsonl"], heldout_files=["d.jsonl"], on_error="error"))
    assert err.value.line == 2 and err.value.reason == reason


def test_prompt_only_rows_serve_prompts_but_not_sft(tmp_path):
    write(tmp_path / "p.jsonl", [{"prompt": "x", "response": " y"}, {"prompt": "q"}])
    cfg = data_cfg(tmp_path, ["p.jsonl"], heldout_files=["p.jsonl"])
    assert load_split_prompts(cfg, tokenizer=None)[0] == ["x", "q"]
    pairs, _, stats = load_split_pairs(cfg)
    assert [p.prompt for p in pairs] == ["x"] and stats.skipped["missing_field"] == 2
    assert stats.first["missing_field"] == "p.jsonl:2"
    with pytest.raises(DataFormatError, match=r"p.jsonl:2: missing_field: field 'response' missing"):
        load_split_pairs(data_cfg(tmp_path, ["p.jsonl"], heldout_files=["p.jsonl"], on_error="error"))


def test_unknown_dataset_names_the_choices():
    from nemo_rlhf.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.dataset must be one of \['hh', 'imdb', 'jsonl'\]"):
        parse_config(DataConfig, {"dataset": "csv"})
