"""SFT / preference / prompt datasets and their collate functions."""

from __future__ import annotations

import pytest
import torch

from nemo_rlhf.data import (
    PreferenceDataset,
    PreferencePair,
    PromptDataset,
    SFTDataset,
    collate_preference,
    collate_prompts,
    collate_sft,
    default_data_dir,
    load_hh_pairs,
    load_tokenizer,
)


class CharTokenizer:
    """One token per character (id = code point), eos 0: token counts are the string lengths."""

    eos_id = 0
    pad_id = 0

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def pair(prompt: str, chosen: str, rejected: str = "zz") -> PreferencePair:
    return PreferencePair(prompt, chosen, rejected, "hand:1")


TOK = CharTokenizer()
PAIRS = [
    pair("PPPP", "ab", "xyz"),  # fits: 4 + 2 + eos = 7 <= 8
    pair("123456", "cdefg", "r"),  # prompt 6 > 4: left-truncated to "3456"; response cut to 4
    pair("QQQQ", "hijk", "s"),  # 4 + 4 + eos = 9 > 8: eos dropped
]


# ---------------------------------------------------------------- SFT


def test_sft_truncation_and_loss_mask():
    ds = SFTDataset(PAIRS, TOK, max_seq_len=8, max_prompt_len=4)
    assert len(ds) == 3
    assert ds.stats == {"prompt_truncated": 1, "response_truncated": 2}

    item = ds[0]
    assert item["tokens"].dtype == torch.int64 and item["loss_mask"].dtype == torch.float32
    assert item["tokens"].tolist() == ids("PPPPab") + [0]
    assert item["loss_mask"].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert item["length"].dtype == torch.int64 and item["length"].item() == 7 and item["length"].dim() == 0

    item = ds[1]
    assert item["tokens"].tolist() == ids("3456cdef")  # latest prompt tokens kept, no eos
    assert item["loss_mask"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]

    assert ds[2]["tokens"].tolist() == ids("QQQQhijk")
    assert ds[2]["length"].item() == 8


def test_sft_skip_mode():
    ds = SFTDataset(PAIRS, TOK, max_seq_len=8, max_prompt_len=4, overlong="skip")
    assert len(ds) == 2
    # the overlong prompt is skipped; responses are still right-truncated
    assert ds.stats == {"skipped_overlong": 1, "response_truncated": 1}
    assert [ds[i]["tokens"].tolist() for i in range(2)] == [ids("PPPPab") + [0], ids("QQQQhijk")]


def test_sft_skips_when_no_response_token_fits():
    # max_prompt_len == max_seq_len: a prompt filling the whole sequence leaves no response token
    ds = SFTDataset([pair("PPPP", "ab"), pair("PPP", "ab")], TOK, max_seq_len=4, max_prompt_len=4)
    assert len(ds) == 1
    assert ds.stats == {"skipped_overlong": 1, "response_truncated": 1}
    assert ds[0]["tokens"].tolist() == ids("PPPa")
    assert ds[0]["loss_mask"].tolist() == [0, 0, 0, 1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_seq_len": 8, "max_prompt_len": 4, "overlong": "drop"}, "overlong"),
        ({"max_seq_len": 8, "max_prompt_len": 0}, "max_prompt_len"),
        ({"max_seq_len": 3, "max_prompt_len": 4}, "max_seq_len"),
    ],
)
def test_dataset_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SFTDataset(PAIRS, TOK, **kwargs)
    with pytest.raises(ValueError, match=match):
        PreferenceDataset(PAIRS, TOK, **kwargs)


# ---------------------------------------------------------------- preference


def test_preference_dataset_truncation():
    ds = PreferenceDataset(PAIRS, TOK, max_seq_len=8, max_prompt_len=4)
    assert len(ds) == 3
    # pair 1: prompt truncated once; its chosen is cut; pair 2: chosen loses eos
    assert ds.stats == {"prompt_truncated": 1, "response_truncated": 2}
    item = ds[0]
    assert item["chosen"].tolist() == ids("PPPPab") + [0]
    assert item["rejected"].tolist() == ids("PPPPxyz") + [0]
    assert item["chosen_length"].item() == 7 and item["rejected_length"].item() == 8
    assert item["chosen"].dtype == torch.int64 and item["rejected_length"].dtype == torch.int64
    assert ds[1]["chosen"].tolist() == ids("3456cdef")
    assert ds[1]["rejected"].tolist() == ids("3456r") + [0]

    ds = PreferenceDataset(PAIRS, TOK, max_seq_len=8, max_prompt_len=4, overlong="skip")
    assert len(ds) == 2 and ds.stats == {"skipped_overlong": 1, "response_truncated": 1}


# ---------------------------------------------------------------- prompts


def test_prompt_dataset():
    texts = ["abc", "0123456789", "xy"]
    ds = PromptDataset(texts, TOK, max_prompt_len=4)
    assert len(ds) == 3 and ds.texts == texts
    assert ds.stats == {"prompt_truncated": 1}
    assert ds[1]["prompt"].tolist() == ids("6789")
    assert ds[1]["prompt_length"].item() == 4 and ds[1]["prompt"].dtype == torch.int64

    ds = PromptDataset(texts, TOK, max_prompt_len=4, overlong="skip")
    assert ds.texts == ["abc", "xy"] and ds.stats == {"skipped_overlong": 1}
    assert ds[1]["prompt"].tolist() == ids("xy")

    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        PromptDataset(["a", ""], TOK, max_prompt_len=4)


# ---------------------------------------------------------------- collate


def test_collate_sft_pads_right():
    ds = SFTDataset(PAIRS[:1] + [pair("P", "q")], TOK, max_seq_len=8, max_prompt_len=4)
    batch = collate_sft([ds[0], ds[1]], pad_id=-1)
    assert batch["tokens"].shape == (2, 7) and batch["tokens"].dtype == torch.int64
    assert batch["tokens"][1].tolist() == ids("Pq") + [0, -1, -1, -1, -1]
    assert batch["loss_mask"].dtype == torch.float32
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0, 0]]
    assert batch["lengths"].tolist() == [7, 3] and batch["lengths"].dtype == torch.int64

    batch = collate_sft([ds[0], ds[1]], pad_id=-1, pad_to_multiple_of=4)
    assert batch["tokens"].shape == (2, 8) and batch["loss_mask"].shape == (2, 8)
    assert batch["tokens"][0, 7].item() == -1 and batch["loss_mask"][0, 7].item() == 0.0

    with pytest.raises(ValueError, match="empty"):
        collate_sft([], pad_id=0)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        collate_sft([ds[0]], pad_id=0, pad_to_multiple_of=0)


def test_collate_preference_chosen_then_rejected():
    ds = PreferenceDataset(PAIRS, TOK, max_seq_len=8, max_prompt_len=4)
    batch = collate_preference([ds[0], ds[1]], pad_id=-1, pad_to_multiple_of=3)
    tokens = batch["tokens"]
    assert tokens.shape == (4, 9) and tokens.dtype == torch.int64
    assert batch["lengths"].tolist() == [7, 8, 8, 6]
    assert tokens[0].tolist() == ids("PPPPab") + [0, -1, -1]
    assert tokens[1].tolist() == ids("3456cdef") + [-1]
    assert tokens[2].tolist() == ids("PPPPxyz") + [0, -1]
    assert tokens[3].tolist() == ids("3456r") + [0, -1, -1, -1]


def test_collate_prompts():
    ds = PromptDataset(["abc", "0123456789", "xy"], TOK, max_prompt_len=4)
    batch = collate_prompts([ds[i] for i in range(3)], pad_id=7)
    assert batch["prompts"].tolist() == [ids("abc") + [7], ids("6789"), ids("xy") + [7, 7]]
    assert batch["prompt_lengths"].tolist() == [3, 4, 2]
    assert batch["prompts"].dtype == torch.int64 and batch["prompt_lengths"].dtype == torch.int64


# ---------------------------------------------------------------- real data, GPT-2 BPE


@pytest.fixture(scope="module")
def real():
    data = default_data_dir()
    tok = load_tokenizer(
        {
            "type": "gpt2_bpe",
            "vocab_file": str(data / "gpt2-tokenizer" / "vocab.json"),
            "merges_file": str(data / "gpt2-tokenizer" / "merges.txt"),
        }
    )
    pairs, _ = load_hh_pairs(data / "hh-rlhf" / "harmless-base_test.jsonl.gz", max_rows=300)
    return tok, pairs


def test_sft_on_real_pairs(real):
    tok, pairs = real
    max_seq_len, max_prompt_len = 128, 64
    ds = SFTDataset(pairs, tok, max_seq_len=max_seq_len, max_prompt_len=max_prompt_len)
    assert len(ds) + ds.stats["skipped_overlong"] == len(pairs)
    assert ds.stats["prompt_truncated"] > 0 and ds.stats["response_truncated"] > 0
    n_with_eos = 0
    for i in range(len(ds)):
        item = ds[i]
        tokens, mask = item["tokens"].tolist(), item["loss_mask"]
        assert len(tokens) == item["length"].item() <= max_seq_len
        n_prompt = int((mask == 0).sum())
        assert mask[:n_prompt].sum() == 0 and bool((mask[n_prompt:] == 1).all())
        assert 1 <= n_prompt <= max_prompt_len
        p = pairs[i]  # nothing is skipped in truncate mode here, so items align with pairs
        assert tokens[:n_prompt] == tok.encode(p.prompt)[-n_prompt:]
        response = tok.encode(p.chosen)
        if tokens[-1] == tok.eos_id:
            n_with_eos += 1
            assert tokens[n_prompt:-1] == response
        else:
            assert tokens[n_prompt:] == response[: len(tokens) - n_prompt]
    assert n_with_eos > 0
    batch = collate_sft([ds[i] for i in range(8)], pad_id=tok.pad_id, pad_to_multiple_of=8)
    assert batch["tokens"].shape[0] == 8 and batch["tokens"].shape[1] % 8 == 0
    assert batch["loss_mask"].sum() == sum(ds[i]["loss_mask"].sum() for i in range(8))
