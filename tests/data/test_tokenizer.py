"""Tokenizers: GPT-2 BPE parity with transformers, round trips, trained byte-level BPE."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from nemo_rlhf.data import default_data_dir, load_hh_pairs, load_tokenizer, train_bpe_tokenizer

UNICODE_TEXTS = [
    "line\u2028separator and next\u0085line",
    "caf\u00e9 na\u00efve \u6f22\u5b57 \U0001f916 \u00a0nbsp",
    "  leading spaces, trailing tab\t\r\n\n\nnewlines",
    "nul\x00byte and <|endoftext|> in text",
    "",
]


@pytest.fixture(scope="module")
def gpt2_cfg() -> dict:
    d = default_data_dir() / "gpt2-tokenizer"
    return {"type": "gpt2_bpe", "vocab_file": str(d / "vocab.json"), "merges_file": str(d / "merges.txt")}


@pytest.fixture(scope="module")
def gpt2(gpt2_cfg):
    return load_tokenizer(gpt2_cfg)


@pytest.fixture(scope="module")
def hh_texts() -> list[str]:
    pairs, _ = load_hh_pairs(default_data_dir() / "hh-rlhf" / "helpful-base_test.jsonl.gz")
    return [p.prompt + p.chosen for p in pairs]


def test_gpt2_special_ids_and_known_encoding(gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.eos_id == 50256 and gpt2.pad_id == 50256
    # ids from the GPT-2 model card / transformers docs
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" Hello world") == [18435, 995]
    assert gpt2.encode("<|endoftext|>") == [50256]
    assert gpt2.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"


def test_gpt2_matches_transformers(gpt2, gpt2_cfg, hh_texts):
    transformers = pytest.importorskip("transformers")
    # transformers 5 takes `vocab`/`merges` (vocab_file=/merges_file= are silently ignored there)
    ref = transformers.GPT2TokenizerFast(vocab=gpt2_cfg["vocab_file"], merges=gpt2_cfg["merges_file"])
    assert len(ref) == 50257, "reference tokenizer did not load the vocabulary"
    texts = hh_texts[::40] + UNICODE_TEXTS
    ids = gpt2.encode_batch(texts)
    for text, got in zip(texts, ids):
        assert got == ref.encode(text, add_special_tokens=False), text[:80]
        assert got == gpt2.encode(text)
        assert gpt2.decode(got) == text


def test_load_from_omegaconf_and_tokenizer_json(gpt2, gpt2_cfg, tmp_path, hh_texts):
    tok = load_tokenizer(OmegaConf.create(gpt2_cfg))
    assert tok.encode(hh_texts[0]) == gpt2.encode(hh_texts[0])
    saved = gpt2.save(tmp_path)
    assert saved == tmp_path / "tokenizer.json" and saved.is_file()
    reloaded = load_tokenizer({"type": "tokenizer_json", "path": str(saved)})
    assert reloaded.eos_id == 50256 and reloaded.vocab_size == 50257
    for text in hh_texts[:20] + UNICODE_TEXTS:
        assert reloaded.encode(text) == gpt2.encode(text)


def test_load_tokenizer_errors(gpt2_cfg, tmp_path):
    missing = str(tmp_path / "vocab_missing.json")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.vocab_file.*vocab_missing\.json"):
        load_tokenizer({**gpt2_cfg, "vocab_file": missing})
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.merges_file"):
        load_tokenizer({**gpt2_cfg, "merges_file": missing})
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.path"):
        load_tokenizer({"type": "tokenizer_json", "path": missing})
    with pytest.raises(ValueError, match=r"tokenizer\.type.*sentencepiece"):
        load_tokenizer({"type": "sentencepiece"})
    with pytest.raises(ValueError, match=r"tokenizer\.merges_file"):
        load_tokenizer({"type": "gpt2_bpe", "vocab_file": gpt2_cfg["vocab_file"]})
    with pytest.raises(TypeError):
        load_tokenizer(gpt2_cfg).encode(b"bytes")  # type: ignore[arg-type]


def test_trained_bpe_round_trips_and_has_vocab_size(hh_texts, tmp_path):
    save = tmp_path / "small" / "tokenizer.json"
    tok = train_bpe_tokenizer(hh_texts[:1500], vocab_size=2048, save_path=save)
    assert tok.vocab_size == 2048
    assert tok.backend.id_to_token(tok.eos_id) == "<|endoftext|>"
    assert tok.pad_id == tok.eos_id
    for text in UNICODE_TEXTS + hh_texts[1500:1600]:
        assert tok.decode(tok.encode(text)) == text
    # merges learned from the corpus compress English text well below 1 token per byte
    sample = hh_texts[1600]
    assert len(tok.encode(sample)) < 0.5 * len(sample.encode("utf-8"))
    # bytes never seen in training still round-trip (byte alphabet is always in the vocabulary)
    assert all(i < 2048 for i in tok.encode("\u2028\U0001f916"))
    reloaded = load_tokenizer({"type": "tokenizer_json", "path": str(save)})
    assert reloaded.encode(sample) == tok.encode(sample)


def test_train_bpe_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(["abc"], vocab_size=100)
