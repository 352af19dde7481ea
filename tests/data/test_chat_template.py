"""``data.chat_template: true``: HH dialogues split into chat turns (nemo_rlhf/data/hh.py
``dialogue_messages``, skip reason ``bad_dialogue``) and rendered by SmolLM2-135M-Instruct's chat
template (nemo_rlhf/data/tasks.py ``format_pairs`` / ``chat_prompt``) for the SFT, reward-model and
PPO-prompt datasets; ids against transformers' ``apply_chat_template(tokenize=True)`` on real HH rows."""

from __future__ import annotations

import gzip
import json

import pytest

from nemo_rlhf.config import DataConfig
from nemo_rlhf.data import (DataFormatError, PreferenceDataset, PromptDataset, SFTDataset, Tokenizer,
                            default_data_dir, load_hh_pairs, load_tokenizer)
from nemo_rlhf.data.hh import dialogue_messages
from nemo_rlhf.data.tasks import check_chat_tokenizer, format_pairs, load_split_pairs, load_split_prompts

transformers = pytest.importorskip("transformers")

IM_END = 2  # SmolLM2-Instruct: <|im_end|>, eos and pad


def test_dialogue_messages_splits_alternating_turns():
    prompt = "\n\nHuman: Hi there \n\nAssistant:  Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant:"
    assert dialogue_messages(prompt) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ]
    # a role word inside a turn (no blank line before it) is text, as split_dialogue treats it
    assert dialogue_messages("\n\nHuman: say Human: hi\n\nAssistant:") == [{"role": "user", "content": "say Human: hi"}]


@pytest.mark.parametrize("prompt, match", [
    ("intro\n\nHuman: a\n\nAssistant:", "text before the first"),
    ("\n\nAssistant: a\n\nHuman: b\n\nAssistant:", "turn 0 is Assistant's, expected Human's"),
    ("\n\nHuman: a\n\nHuman: b\n\nAssistant:", "turn 1 is Human's, expected Assistant's"),
    ("\n\nHuman: a\n\nAssistant: b\n\nAssistant:", "turn 2 is Assistant's, expected Human's"),
    ("\n\nHuman:  \n\nAssistant:", r"turn 0 \(Human\) is empty"),
    ("\n\nHuman: a\n\nAssistant: b", "does not end with an empty"),
    ("\n\nAssistant:", "turn 0 is Assistant's"),
])
def test_dialogue_messages_rejects_malformed_dialogues(prompt, match):
    with pytest.raises(ValueError, match=match):
        dialogue_messages(prompt)


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = {"chosen": "\n\nHuman: q\n\nAssistant: yes", "rejected": "\n\nHuman: q\n\nAssistant: no"}
TWO_HUMANS = {"chosen": "\n\nHuman: q\n\nHuman: again\n\nAssistant: yes",
              "rejected": "\n\nHuman: q\n\nHuman: again\n\nAssistant: no"}


def test_bad_dialogues_are_counted_or_raised_only_with_chat(tmp_path):
    f = _write_rows(tmp_path / "hh.jsonl", [GOOD, TWO_HUMANS, GOOD])
    pairs, stats = load_hh_pairs(f, chat=True)
    assert (len(pairs), stats.rows, dict(stats.skipped), stats.first) == (
        2, 3, {"bad_dialogue": 1}, {"bad_dialogue": "hh.jsonl:2"})
    with pytest.raises(DataFormatError, match=r"hh\.jsonl:2: bad_dialogue: field 'chosen': turn 1 is Human's") as e:
        load_hh_pairs(f, chat=True, on_error="error")
    assert (e.value.line, e.value.reason) == (2, "bad_dialogue")
    pairs, stats = load_hh_pairs(f)  # chat=False: today's loader, the row is kept
    assert len(pairs) == 3 and not stats.skipped
    # through the data config (the split's loader) the same
    cfg = DataConfig(data_dir=str(tmp_path), files=["hh.jsonl"], chat_template=True, heldout_fraction=0.5)
    train, heldout, stats = load_split_pairs(cfg)
    assert len(train) + len(heldout) == 2 and dict(stats.skipped) == {"bad_dialogue": 1}


@pytest.fixture(scope="module")
def smol(smollm2):
    d = smollm2 / "policy"
    return load_tokenizer({"type": "hf", "path": str(d)}), transformers.AutoTokenizer.from_pretrained(str(d))


def _hf_ids(hf, messages, **kw) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "input_ids") else out)


@pytest.fixture(scope="module")
def hh_rows():
    """Real HH pairs: the first 3 single-turn and the first 3 multi-turn ones of helpful-base."""
    pairs, _ = load_hh_pairs(default_data_dir() / "hh-rlhf" / "helpful-base_test.jsonl.gz", max_rows=60, chat=True)
    single = [p for p in pairs if p.prompt.count("\n\nHuman:") == 1][:3]
    multi = [p for p in pairs if p.prompt.count("\n\nHuman:") >= 3][:3]
    assert len(single) == len(multi) == 3
    return single + multi


def test_sft_ids_equal_transformers_chat_template_and_mask_the_response(smol, hh_rows):
    tok, hf = smol
    cfg = DataConfig(chat_template=True)
    ds = SFTDataset(format_pairs(cfg, hh_rows, tok), tok, max_seq_len=4096, max_prompt_len=2048)
    assert len(ds) == len(hh_rows) and not ds.stats
    for pair, item in zip(hh_rows, ds):
        turns = dialogue_messages(pair.prompt)
        prompt_ids = _hf_ids(hf, turns, add_generation_prompt=True)
        whole = _hf_ids(hf, turns + [{"role": "assistant", "content": pair.chosen.strip()}])
        tokens, mask = item["tokens"].tolist(), item["loss_mask"].tolist()
        # the whole dialogue as the template renders it, less the newline after the final <|im_end|>
        assert whole[-2:] == [IM_END] + hf.encode("\n", add_special_tokens=False)
        assert tokens == whole[:-1]
        assert tokens[:len(prompt_ids)] == prompt_ids
        assert prompt_ids[-4:] == hf.encode("<|im_start|>assistant\n", add_special_tokens=False)
        # the loss covers exactly the final assistant turn's text and its closing <|im_end|>
        response = hf.encode(pair.chosen.strip(), add_special_tokens=False)
        assert mask == [0.0] * len(prompt_ids) + [1.0] * (len(response) + 1)
        assert tokens[len(prompt_ids):] == response + [IM_END] and tok.eos_id == IM_END


def test_preference_and_prompt_datasets_use_the_template(smol, hh_rows, tmp_path):
    tok, hf = smol
    cfg = DataConfig(chat_template=True)
    ds = PreferenceDataset(format_pairs(cfg, hh_rows, tok), tok, max_seq_len=4096, max_prompt_len=2048)
    for pair, item in zip(hh_rows, ds):
        turns = dialogue_messages(pair.prompt)
        for key in ("chosen", "rejected"):
            whole = _hf_ids(hf, turns + [{"role": "assistant", "content": getattr(pair, key).strip()}])
            assert item[key].tolist() == whole[:-1] and int(item[f"{key}_length"]) == len(whole) - 1
    # PPO prompts: the distinct dialogues with the assistant header, as transformers renders them
    with gzip.open(default_data_dir() / "hh-rlhf" / "helpful-base_test.jsonl.gz", "rt") as f:
        lines = [next(f) for _ in range(40)]
    (tmp_path / "hh.jsonl").write_text("".join(lines))
    pcfg = DataConfig(data_dir=str(tmp_path), files=["hh.jsonl"], chat_template=True, heldout_fraction=0.25)
    train, heldout, _ = load_split_prompts(pcfg, tok)
    plain_train, plain_heldout, _ = load_split_prompts(DataConfig(**{**vars(pcfg), "chat_template": False}), tok)
    assert len(train) == len(plain_train) and len(heldout) == len(plain_heldout) and heldout
    prompts = PromptDataset(train + heldout, tok, max_prompt_len=4096)
    for text, item in zip(plain_train + plain_heldout, prompts):
        assert item["prompt"].tolist() == _hf_ids(hf, dialogue_messages(text), add_generation_prompt=True)


def test_chat_template_false_leaves_pairs_unchanged(hh_rows):
    assert format_pairs(DataConfig(chat_template=False), hh_rows, tokenizer=None) == hh_rows


def test_tokenizer_without_a_usable_template_is_refused(smol, hh_rows):
    data = default_data_dir()
    gpt2 = load_tokenizer({"type": "gpt2_bpe", "vocab_file": str(data / "gpt2-tokenizer" / "vocab.json"),
                           "merges_file": str(data / "gpt2-tokenizer" / "merges.txt")})
    cfg = DataConfig(chat_template=True)
    for call in (lambda: format_pairs(cfg, hh_rows, gpt2), lambda: load_split_prompts(
            DataConfig(chat_template=True, max_rows=20), gpt2)):
        with pytest.raises(ValueError, match=r"data\.chat_template=true .* has none: set tokenizer\.type=hf"):
            call()
    tok, hf = smol
    other = transformers.AutoTokenizer.from_pretrained(hf.name_or_path)
    other.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    odd = Tokenizer(tok.backend, eos_token=tok.eos_token, hf_tokenizer=other)
    with pytest.raises(ValueError, match=r"closes an assistant turn with '\\n', not its eos token '<\|im_end\|>'"):
        check_chat_tokenizer(odd)
    check_chat_tokenizer(tok)  # SmolLM2's template closes turns with its eos
