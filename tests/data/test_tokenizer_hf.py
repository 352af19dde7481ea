"""Hugging Face tokenizers (``tokenizer.type: hf``): SmolLM2-135M-Instruct's tokenizer as converted
from its GGUF file, its EOS/pad ids and chat template against transformers' own
``apply_chat_template`` on the GGUF tokenizer (reference from the ``smollm2`` session fixture)."""

from __future__ import annotations

import pytest
import torch

from nemo_rlhf.config import ConfigError, TokenizerConfig, parse_config, to_plain
from nemo_rlhf.data import default_data_dir, load_tokenizer
from nemo_rlhf.data.tokenizer import tokenizer_from_config

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def smol(smollm2):
    ref = torch.load(smollm2 / "reference.pt", weights_only=False)
    return smollm2 / "policy", ref


def test_smollm2_special_ids(smol):
    d, ref = smol
    tok = load_tokenizer({"type": "hf", "path": str(d)})
    assert tok.vocab_size == 49152
    # eos = pad = <|im_end|> (2): what closes every chat turn and what the model's generation stops at
    assert (tok.eos_id, tok.pad_id) == (ref["eos_id"], ref["pad_id"]) == (2, 2)
    assert [tok.backend.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tok.encode("<|im_start|>user\nHi<|im_end|>") == [1, 4093, 198, 26843, 2]
    assert tok.decode([1, 4093, 198, 26843, 2]) == "<|im_start|>user\nHi<|im_end|>"


def test_smollm2_chat_template_ids_equal_transformers(smol):
    d, ref = smol
    tok = tokenizer_from_config(to_plain(parse_config(TokenizerConfig, {"type": "hf", "path": str(d)}, "tokenizer")))
    assert tok.chat_template == ref["chat_template"]
    for question, ids in zip(ref["questions"], ref["prompts"]):
        assert tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True) == ids
    for generation_prompt, ids in ref["dialogue_ids"].items():
        assert tok.apply_chat_template(ref["dialogue"], add_generation_prompt=generation_prompt) == ids
    text = tok.apply_chat_template(ref["dialogue"], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a concise assistant.<|im_end|>\n<|im_start|>user\n")
    assert tok.encode(text) == ref["dialogue_ids"][False] and tok.decode(tok.encode(text)) == text
    # no system message: the template inserts SmolLM's default one
    first = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert first.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_hf_tokenizer_saves_and_reloads_whole(smol, tmp_path):
    d, ref = smol
    tok = load_tokenizer({"type": "hf", "path": str(d)})
    assert tok.save(tmp_path / "tok") == tmp_path / "tok" / "tokenizer.json"
    again = load_tokenizer({"type": "hf", "path": str(tmp_path / "tok")})
    assert (again.eos_id, again.pad_id, again.chat_template) == (tok.eos_id, tok.pad_id, tok.chat_template)
    assert again.apply_chat_template(ref["dialogue"]) == ref["dialogue_ids"][False]


def test_hf_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"tokenizer\.path is required for tokenizer\.type='hf'"):
        parse_config(TokenizerConfig, {"type": "hf"}, "tokenizer")
    with pytest.raises(ValueError, match=r"tokenizer\.path is required"):
        load_tokenizer({"type": "hf"})
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.path.*no tokenizer\.json"):
        load_tokenizer({"type": "hf", "path": str(tmp_path)})
    gpt2 = load_tokenizer({"type": "gpt2_bpe", "vocab_file": str(default_data_dir() / "gpt2-tokenizer" / "vocab.json"),
                           "merges_file": str(default_data_dir() / "gpt2-tokenizer" / "merges.txt")})
    assert gpt2.chat_template is None
    with pytest.raises(ValueError, match="no chat template.*tokenizer.type=hf"):
        gpt2.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_messages_are_checked(smol):
    d, _ = smol
    tok = load_tokenizer({"type": "hf", "path": str(d)})
    with pytest.raises(ValueError, match=r"messages\[1\] must be a mapping with str 'role' and 'content'"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant"}])

