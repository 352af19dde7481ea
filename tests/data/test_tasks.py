"""nemo_rlhf/data/tasks.py and the IMDB pieces behind it (clean_review, review_pairs,
review_prompts, ReviewPairDataset): what each ``data.dataset`` gives a stage, on the shipped files."""

from __future__ import annotations

import gzip
import json

import pytest

from nemo_rlhf.config import ConfigError, DataConfig
from nemo_rlhf.data import PreferenceDataset, default_data_dir, load_tokenizer
from nemo_rlhf.data.datasets import ReviewPairDataset
from nemo_rlhf.data.hh import DataFormatError
from nemo_rlhf.data.imdb import ImdbReview, clean_review, review_pairs, review_prompts
from nemo_rlhf.data.tasks import load_split_pairs, load_split_prompts, load_split_rows, preference_dataset


@pytest.fixture(scope="module")
def gpt2():
    data = default_data_dir()
    return load_tokenizer({"type": "gpt2_bpe", "vocab_file": str(data / "gpt2-tokenizer" / "vocab.json"),
                           "merges_file": str(data / "gpt2-tokenizer" / "merges.txt")})


def imdb_cfg(**kw) -> DataConfig:
    base = dict(dataset="imdb", files=["imdb/train.jsonl.gz"], heldout_files=["imdb/valid.jsonl.gz"],
                max_rows=200, max_heldout_rows=60, max_seq_len=64, max_prompt_len=16)
    return DataConfig(**{**base, **kw})


def review(i: int, label: int, text: str = "") -> ImdbReview:
    return ImdbReview(f"train/{'pos' if label else 'neg'}/{i}_{8 if label else 2}",
                      text or f"review {i} is {'great' if label else 'awful'}", label, 8 if label else 2, f"f:{i}")


def test_clean_review_removes_markup_and_collapses_space():
    raw = "Great film.<br /><br />Loved it &amp; the cast\u2028 too.<BR/>  10/10 \x85"
    assert clean_review(raw) == "Great film. Loved it & the cast too. 10/10"


def test_review_pairs_are_balanced_deterministic_and_labelled():
    reviews = [review(i, i % 3 == 0) for i in range(30)]  # 10 positive, 20 negative
    pairs = review_pairs(reviews, seed=5)
    assert len(pairs) == 10
    assert pairs == review_pairs(reviews, seed=5)
    assert pairs != review_pairs(reviews, seed=6)
    assert all(p.prompt == "" and "great" in p.chosen and "awful" in p.rejected for p in pairs)
    assert len({p.chosen for p in pairs}) == 10 and len({p.rejected for p in pairs}) == 10


def test_review_prompts_are_review_beginnings_of_k_tokens(gpt2):
    texts = ["I watched this movie last night with my friends and we all thought it was a masterpiece.",
             "Short one.", "What a waste<br />of two hours of my life, honestly the worst film of the year."]
    reviews = [review(i, 1, t) for i, t in enumerate(texts * 10)]
    prompts = review_prompts(reviews, gpt2, 4, 8, seed=0)
    assert prompts == review_prompts(reviews, gpt2, 4, 8, seed=0)
    lengths = set()
    for r, p in zip(reviews, prompts):
        full = gpt2.encode(clean_review(r.text))
        n = len(gpt2.encode(p))
        lengths.add(n)
        assert clean_review(r.text).startswith(p)
        assert n == min(len(full), n) and (4 <= n <= 8 or n == len(full))
    assert len(lengths) > 2  # k varies
    with pytest.raises(ValueError, match="min_tokens"):
        review_prompts(reviews, gpt2, 5, 4, seed=0)


def test_imdb_offline_rows_are_opening_continuation_and_label(gpt2):
    from nemo_rlhf.data.offline import imdb_offline_rows

    texts = ["I watched this movie last night with my friends and we all thought it was a masterpiece of the genre.",
             "Too short.", "What a waste<br />of two hours of my life, honestly the worst film of the year by far."]
    reviews = [review(i, i % 3 != 2, t) for i, t in enumerate(texts * 4)]
    rows = imdb_offline_rows(reviews, gpt2, 4, 6, response_tokens=5, seed=0)
    assert rows == imdb_offline_rows(reviews, gpt2, 4, 6, response_tokens=5, seed=0)
    assert len(rows) == 8  # "Too short." (3 tokens) has no continuation after a 4-6 token opening
    for row in rows:
        src = next(r for r in reviews if r.source == row.source)
        full = gpt2.encode(clean_review(src.text))
        k = len(gpt2.encode(row.prompt))
        assert 4 <= k <= 6 and row.prompt + row.response == gpt2.decode(full[: k + 5])
        assert row.reward == float(src.label)
    assert {r.reward for r in rows} == {0.0, 1.0}
    ends = imdb_offline_rows(reviews, gpt2, 4, 6, response_tokens=5, seed=0, window="ending")
    assert len(ends) == 8
    for row in ends:  # the review's last 5 tokens, after the k tokens before them
        full = gpt2.encode(clean_review(next(r for r in reviews if r.source == row.source).text))
        k = len(gpt2.encode(row.prompt))
        assert 4 <= k <= 6 and row.prompt + row.response == gpt2.decode(full[-5 - k:])
        assert row.response == gpt2.decode(full[-5:])
    with pytest.raises(ValueError, match="response_tokens"):
        imdb_offline_rows(reviews, gpt2, 4, 6, response_tokens=0, seed=0)
    with pytest.raises(ValueError, match="window"):
        imdb_offline_rows(reviews, gpt2, 4, 6, response_tokens=5, seed=0, window="middle")


def test_review_pair_dataset_keeps_the_last_tokens(gpt2):
    pairs = review_pairs([review(0, 1, "one two three four five six seven eight nine ten. Loved it"),
                          review(1, 0, "Hated it")], seed=0)
    ds = ReviewPairDataset(pairs, gpt2, max_seq_len=4)
    item = ds[0]
    assert item["chosen"].tolist() == gpt2.encode(pairs[0].chosen)[-4:]
    assert gpt2.decode(item["chosen"]).endswith(". Loved it")
    assert gpt2.decode(item["rejected"]) == "Hated it"  # short texts whole, no eos appended
    assert int(item["chosen_length"]) == 4 and int(item["rejected_length"]) == len(gpt2.encode("Hated it"))
    assert ds.stats["response_truncated"] == 1
    with pytest.raises(ValueError, match="f:9 has a prompt"):
        ReviewPairDataset([pairs[0].__class__("p", "a", "b", "f:9")], gpt2, 4)


def test_imdb_rows_pairs_and_prompts_from_the_shipped_files(gpt2):
    cfg = imdb_cfg()
    train, heldout, stats = load_split_rows(cfg)
    assert len(train) == 200 and len(heldout) == 60 and stats.rows == 260
    assert all(r.id.startswith("train/") for r in train) and all(r.id.startswith("test/") or r.source.startswith(
        "valid") for r in heldout)
    tp, hp, _ = load_split_pairs(cfg)
    assert len(tp) == min(sum(r.label for r in train), sum(1 - r.label for r in train))
    assert len(hp) == min(sum(r.label for r in heldout), sum(1 - r.label for r in heldout))
    ds = preference_dataset(cfg, tp, gpt2)
    assert isinstance(ds, ReviewPairDataset) and len(ds) == len(tp)
    assert max(int(ds[i]["chosen_length"]) for i in range(len(ds))) == 64
    trp, hdp, _ = load_split_prompts(imdb_cfg(max_heldout_prompts=16), gpt2)
    assert len(trp) == 200 and len(hdp) == 16
    assert all(4 <= len(gpt2.encode(p)) <= 12 for p in hdp)
    assert not set(trp) & set(hdp)


def test_imdb_hash_split_without_heldout_files(gpt2):
    train, heldout, _ = load_split_rows(imdb_cfg(heldout_files=[], heldout_fraction=0.25, max_heldout_rows=None))
    assert len(train) + len(heldout) == 200 and 25 <= len(heldout) <= 75
    assert not {r.id for r in train} & {r.id for r in heldout}


def test_hh_is_unchanged_and_can_take_heldout_files(gpt2):
    cfg = DataConfig(max_rows=300)
    train, heldout, _ = load_split_pairs(cfg)
    assert 0 < len(heldout) < len(train) and len(train) + len(heldout) <= 300
    assert isinstance(preference_dataset(cfg, train[:4], gpt2), PreferenceDataset)
    trp, hdp, _ = load_split_prompts(cfg, gpt2)
    assert trp == sorted({p.prompt for p in train}) and hdp == sorted({p.prompt for p in heldout})
    cfg2 = DataConfig(files=["hh-rlhf/helpful-base_test.jsonl.gz"], max_rows=50,
                      heldout_files=["hh-rlhf/harmless-base_test.jsonl.gz"], max_heldout_rows=20)
    train2, heldout2, _ = load_split_pairs(cfg2)
    assert len(heldout2) <= 20 and all(p.source.startswith("harmless") for p in heldout2)
    assert all(p.source.startswith("helpful") for p in train2)


def test_bad_imdb_rows_follow_on_error(tmp_path):
    rows = [{"id": "train/pos/1_9", "text": "good", "label": 1, "rating": 9}, {"id": "x", "text": "bad"}]
    path = tmp_path / "mini.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    train, _, stats = load_split_rows(imdb_cfg(files=[str(path)], heldout_files=[str(path)]))
    assert len(train) == 1 and stats.skipped["missing_field"] == 2
    with pytest.raises(DataFormatError, match=r"mini.jsonl.gz:2: missing_field"):
        load_split_rows(imdb_cfg(files=[str(path)], heldout_files=[str(path)], on_error="error"))


@pytest.mark.parametrize("kw, match", [
    (dict(dataset="squad"), r"data.dataset must be one of \['hh', 'imdb', 'jsonl'\]"),
    (dict(dataset="imdb", chat_template=True), "chat_template=true formats HH"),
    (dict(prompt_tokens_min=9, prompt_tokens_max=8), "prompt_tokens_min=9 must be <="),
    (dict(max_heldout_rows=0), "max_heldout_rows"),
])
def test_data_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        DataConfig(**kw)
