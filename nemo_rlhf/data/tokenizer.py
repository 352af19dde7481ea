"""Byte-level BPE tokenizers (GPT-2 vocabulary or a small one trained on the fly), wrapping
Hugging Face ``tokenizers``. GPT-2 BPE: Radford et al. 2019, "Language Models are Unsupervised
Multitask Learners", section 2.2."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"


class Tokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer`` with an ``<|endoftext|>`` token.

    No special tokens are added by :meth:`encode`; callers append ``eos_id`` themselves.
    ``<|endoftext|>`` written literally in text is encoded as ``eos_id`` (as GPT2TokenizerFast does).

    Attributes:
        vocab_size: number of ids, added special tokens included.
        eos_id: id of ``"<|endoftext|>"``.
        pad_id: padding id, equal to ``eos_id`` (padding is always masked out).

    Raises:
        ValueError: the wrapped tokenizer has no ``"<|endoftext|>"`` token.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self.backend = tokenizer
        eos = tokenizer.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(f"tokenizer has no {EOS_TOKEN!r} token")
        self.eos_id: int = eos
        self.pad_id: int = eos
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added). Raises TypeError if not a str."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (parallel in Rust); same ids as :meth:`encode` per text."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"Tokenizer.encode_batch: texts[{i}] is {type(t).__name__}, not str")
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (a list or a 1-D tensor of int); special tokens are kept as text."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.backend.decode(ids, skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` to ``path`` (a file path, or an existing directory to write
        ``<dir>/tokenizer.json`` into). Returns the file written."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path))
        return path


def _byte_level(tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _existing_file(cfg: Mapping[str, Any], key: str) -> str:
    value = cfg.get(key)
    if value is None:
        raise ValueError(f"tokenizer.{key} is required for tokenizer.type={cfg.get('type')!r}")
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer.{key}: file not found: {str(path)!r}")
    return str(path)


def load_tokenizer(cfg: Mapping[str, Any]) -> Tokenizer:
    """Build a :class:`Tokenizer` from a config mapping (dict or OmegaConf DictConfig).

    ``type: gpt2_bpe`` with ``vocab_file`` and ``merges_file`` (GPT-2 ``vocab.json`` /
    ``merges.txt``): BPE model, ByteLevel pre-tokenizer (no prefix space) and decoder; gives the
    same ids as ``transformers.GPT2TokenizerFast``. ``type: tokenizer_json`` with ``path``: a saved
    ``tokenizer.json``.

    Raises:
        FileNotFoundError: a configured file is missing (message names the field and path).
        ValueError: unknown ``tokenizer.type`` or a required field is missing.
    """
    kind = cfg.get("type")
    if kind == "gpt2_bpe":
        vocab = _existing_file(cfg, "vocab_file")
        merges = _existing_file(cfg, "merges_file")
        tok = _byte_level(tokenizers.Tokenizer(models.BPE.from_file(vocab, merges)))
        if tok.token_to_id(EOS_TOKEN) is None:
            raise ValueError(f"tokenizer.vocab_file {vocab!r} has no {EOS_TOKEN!r} token")
        tok.add_special_tokens([EOS_TOKEN])
        return Tokenizer(tok)
    if kind == "tokenizer_json":
        return Tokenizer(tokenizers.Tokenizer.from_file(_existing_file(cfg, "path")))
    raise ValueError(f"unknown tokenizer.type {kind!r}; expected 'gpt2_bpe' or 'tokenizer_json'")


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, save_path: str | os.PathLike | None = None
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts``.

    The 256 byte symbols are always in the vocabulary, so ``decode(encode(x)) == x`` for any
    text. ``"<|endoftext|>"`` is id 0. The result has exactly ``vocab_size`` ids when the corpus
    allows that many merges (fewer otherwise). Optionally saved to ``save_path`` (tokenizer.json).

    Raises:
        ValueError: ``vocab_size`` < 257 (256 bytes + EOS).
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 byte symbols + EOS), got {vocab_size}")
    tok = _byte_level(tokenizers.Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out = Tokenizer(tok)
    if save_path is not None:
        out.save(save_path)
    return out
