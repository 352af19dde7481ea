"""Tokenizers wrapping Hugging Face ``tokenizers``: byte-level BPE (GPT-2 vocabulary or a small one
trained on the fly), a saved ``tokenizer.json``, or a Hugging Face tokenizer directory with a chat
template (e.g. SmolLM2-135M-Instruct's, written by ``python -m nemo_rlhf.convert gguf-to-megatron``).
GPT-2 BPE: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners", section 2.2."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from nemo_rlhf.data.hh import DataFormatError

EOS_TOKEN = "<|endoftext|>"
HF_INSTALL = "pip install -e .[hf]"


class Tokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer`` with an end-of-sequence token.

    No special tokens are added by :meth:`encode`; callers append ``eos_id`` themselves. Special
    tokens written literally in text (``<|endoftext|>``, ``<|im_end|>``, ...) are encoded as their
    ids (as ``transformers``' fast tokenizers do).

    End of sequence and padding: the GPT-2 BPE and trained tokenizers end a sequence with
    ``<|endoftext|>`` and pad with it too. A Hugging Face tokenizer (``tokenizer.type: hf``) uses
    the ``eos_token`` and ``pad_token`` of its ``tokenizer_config.json``, i.e. the way the model
    was trained: for SmolLM2-135M-Instruct both are ``<|im_end|>`` (id 2), the token that closes
    every turn of its chat template and the one its generation config stops at; ``<|endoftext|>``
    (id 0, the pretraining document separator) and ``<|im_start|>`` (id 1, which opens a turn)
    are ordinary special tokens. Padding is always masked out, so ``pad_id == eos_id`` is safe.

    Args:
        tokenizer: the ``tokenizers.Tokenizer`` that encodes and decodes.
        eos_token: the end-of-sequence token (must be in the vocabulary).
        pad_token: the padding token (default: ``eos_token``).
        hf_tokenizer: the ``transformers`` tokenizer whose chat template
            :meth:`apply_chat_template` renders (``tokenizer`` is its ``backend_tokenizer``), or None.

    Attributes:
        vocab_size: number of ids, added special tokens included.
        eos_id: id of ``eos_token``.
        pad_id: id of ``pad_token``.
        chat_template: the Jinja chat template, or None.

    Raises:
        ValueError: ``eos_token`` or ``pad_token`` is not in the vocabulary.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_token: str = EOS_TOKEN,
                 pad_token: str | None = None, hf_tokenizer: Any = None):
        self.backend = tokenizer
        self.hf_tokenizer = hf_tokenizer
        ids = {}
        for name, token in (("eos", eos_token), ("pad", pad_token or eos_token)):
            ids[name] = tokenizer.token_to_id(token)
            if ids[name] is None:
                raise ValueError(f"tokenizer has no {token!r} token (its {name} token)")
        self.eos_token: str = eos_token
        self.eos_id: int = ids["eos"]
        self.pad_id: int = ids["pad"]
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        return getattr(self.hf_tokenizer, "chat_template", None)

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

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False,
                            tokenize: bool = True) -> list[int] | str:
        """Format a dialogue with the model's own chat template (as it was fine-tuned).

        The template is rendered by ``transformers`` (``apply_chat_template(tokenize=False)``:
        its Jinja environment, default system prompt and special tokens) and the text encoded by
        :meth:`encode`; the ids equal ``transformers``' ``apply_chat_template(tokenize=True)``.
        SmolLM2-Instruct: ``<|im_start|>{role}\n{content}<|im_end|>\n`` per message, with a
        default system message first when the dialogue has none.

        Args:
            messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
            add_generation_prompt: append the header of an assistant turn
                (``<|im_start|>assistant\n``), for prompting generation.
            tokenize: return ids (True) or the rendered text (False).

        Returns:
            ``list[int]`` ids, or the text.

        Raises:
            ValueError: the tokenizer has no chat template (only ``tokenizer.type: hf`` directories
                with one do), or a message is not a ``{"role", "content"}`` mapping.
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template: use tokenizer.type=hf with a Hugging Face "
                             "tokenizer directory that has one (e.g. python -m nemo_rlhf.convert "
                             "gguf-to-megatron --smollm2 --out DIR)")
        for i, m in enumerate(messages):
            if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f"messages[{i}] must be a mapping with str 'role' and 'content', got {m!r}")
        text = self.hf_tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                                     add_generation_prompt=add_generation_prompt)
        return self.encode(text) if tokenize else text

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` to ``path`` (a file path, or an existing directory to write
        ``<dir>/tokenizer.json`` into). Returns the file written. A Hugging Face tokenizer
        (with a chat template) is saved whole into the directory ``path`` (``save_pretrained``:
        ``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``), loadable again as
        ``tokenizer.type: hf``."""
        path = Path(path)
        if self.hf_tokenizer is not None:
            path.mkdir(parents=True, exist_ok=True)
            self.hf_tokenizer.save_pretrained(str(path))
            return path / "tokenizer.json"
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


def _line_of(data: bytes, offset: int) -> tuple[int, int]:
    """1-based ``(line, column)`` of byte ``offset`` in ``data``."""
    line = data.count(b"\n", 0, offset) + 1
    return line, offset - (data.rfind(b"\n", 0, offset) + 1) + 1


def _decode_utf8(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, col = _line_of(data, e.start)
        raise DataFormatError(f"{path}:{line}:{col}: invalid_utf8: byte {data[e.start:e.start + 1]!r} "
                              "is not valid UTF-8", path=path, line=line, reason="invalid_utf8") from e


def read_gpt2_vocab(path: str | os.PathLike) -> dict[str, int]:
    """Read and validate a GPT-2 ``vocab.json``: one JSON object ``{token: id}``.

    Checks: UTF-8; valid JSON; a JSON object; no token twice; every id a non-negative integer
    (``true``, ``1.0`` and ``"1"`` are not); no id used twice; no token with a lone surrogate.

    Raises:
        DataFormatError: the first violation; the message starts with ``"<path>:<line>:<column>"``
            where a position is known (JSON syntax, UTF-8), else ``"<path>"``, and names the token.
    """
    path = Path(path)
    data = path.read_bytes()
    text = _decode_utf8(path, data)

    def pairs_hook(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise DataFormatError(f"{path}: duplicate_token: token {key!r} appears twice",
                                      path=path, reason="duplicate_token")
            out[key] = value
        return out

    try:
        vocab = json.loads(text, object_pairs_hook=pairs_hook)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}:{e.colno}: bad_json: {e.msg} (truncated or not "
                              "JSON?)", path=path, line=e.lineno, reason="bad_json") from e
    except (ValueError, RecursionError) as e:
        if isinstance(e, DataFormatError):
            raise
        raise DataFormatError(f"{path}: bad_json: {e}", path=path, reason="bad_json") from e
    if not isinstance(vocab, dict):
        raise DataFormatError(f"{path}: not_an_object: vocab.json must be a JSON object "
                              f"{{token: id}}, got a {type(vocab).__name__}", path=path, reason="not_an_object")
    if not vocab:
        raise DataFormatError(f"{path}: empty_field: the vocabulary is empty", path=path, reason="empty_field")
    seen: dict[int, str] = {}
    for token, idx in vocab.items():
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            raise DataFormatError(f"{path}: wrong_type: token {token!r} has id {idx!r}, expected a "
                                  "non-negative integer", path=path, reason="wrong_type")
        if idx in seen:
            raise DataFormatError(f"{path}: duplicate_id: id {idx} is used by {seen[idx]!r} and {token!r}",
                                  path=path, reason="duplicate_id")
        seen[idx] = token
        try:
            token.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataFormatError(f"{path}: invalid_utf8: token {token!r} holds a lone surrogate",
                                  path=path, reason="invalid_utf8") from e
    return vocab


def read_gpt2_merges(path: str | os.PathLike, vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """Read and validate a GPT-2 ``merges.txt`` against ``vocab``.

    Format: an optional first line starting with ``#version``, then one merge per line: exactly two
    non-empty tokens separated by one space (lines split on ``b"\\n"`` only; a trailing ``\\r`` is
    dropped). Both tokens and their concatenation must be in ``vocab`` (the Rust BPE builder
    panics on an unknown merged token).

    Raises:
        DataFormatError: the first bad line, message ``"<path>:<line>: <reason>: ..."`` with reason
            ``invalid_utf8``, ``bad_merge`` (not two tokens) or ``unknown_token``.
    """
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline ends the last line, it does not start a new one
    merges: list[tuple[str, str]] = []
    for lineno, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataFormatError(f"{path}:{lineno}:{e.start + 1}: invalid_utf8: byte "
                                  f"{raw[e.start:e.start + 1]!r} is not valid UTF-8", path=path,
                                  line=lineno, reason="invalid_utf8") from e
        if line.endswith("\r"):
            line = line[:-1]
        if lineno == 1 and line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise DataFormatError(f"{path}:{lineno}: bad_merge: expected two tokens separated by one "
                                  f"space, got {line[:60]!r}", path=path, line=lineno, reason="bad_merge")
        a, b = parts
        for token in (a, b, a + b):
            if token not in vocab:
                raise DataFormatError(f"{path}:{lineno}: unknown_token: merge {a!r} {b!r} uses token "
                                      f"{token!r}, which is not in the vocabulary", path=path,
                                      line=lineno, reason="unknown_token")
        merges.append((a, b))
    return merges


def load_tokenizer(cfg: Mapping[str, Any]) -> Tokenizer:
    """Build a :class:`Tokenizer` from a config mapping (dict or OmegaConf DictConfig).

    ``type: gpt2_bpe`` with ``vocab_file`` and ``merges_file`` (GPT-2 ``vocab.json`` /
    ``merges.txt``): BPE model, ByteLevel pre-tokenizer (no prefix space) and decoder; gives the
    same ids as ``transformers.GPT2TokenizerFast``. ``type: tokenizer_json`` with ``path``: a saved
    ``tokenizer.json`` (EOS and padding ``<|endoftext|>``). ``type: hf`` with ``path``: a Hugging
    Face tokenizer directory with its chat template (:func:`load_hf_tokenizer`).

    The GPT-2 files are validated first (:func:`read_gpt2_vocab`, :func:`read_gpt2_merges`);
    there is no skip policy for a vocabulary: any defect is an error.

    Raises:
        FileNotFoundError: a configured file is missing (message names the field and path).
        DataFormatError: (a ``ValueError``) a corrupt ``vocab.json`` / ``merges.txt`` /
            ``tokenizer.json``; the message names the file (and the line for merges).
        ValueError: unknown ``tokenizer.type``, a required field is missing, or the vocabulary
            has no ``<|endoftext|>``.
        ImportError: ``type: hf`` without ``transformers``.
    """
    kind = cfg.get("type")
    if kind == "gpt2_bpe":
        vocab_file = _existing_file(cfg, "vocab_file")
        merges_file = _existing_file(cfg, "merges_file")
        vocab = read_gpt2_vocab(vocab_file)
        merges = read_gpt2_merges(merges_file, vocab)
        if EOS_TOKEN not in vocab:
            raise ValueError(f"tokenizer.vocab_file {vocab_file!r} has no {EOS_TOKEN!r} token")
        tok = _byte_level(tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges)))
        tok.add_special_tokens([EOS_TOKEN])
        return Tokenizer(tok)
    if kind == "tokenizer_json":
        path = _existing_file(cfg, "path")
        try:
            backend = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust error names neither the file nor, often, the position
            raise DataFormatError(f"{path}: cannot load tokenizer.json: {e}", path=path,
                                  reason="bad_tokenizer_json") from e
        return Tokenizer(backend)
    if kind == "hf":
        return load_hf_tokenizer(cfg.get("path"))
    raise ValueError(f"unknown tokenizer.type {kind!r}; expected 'gpt2_bpe', 'tokenizer_json' or 'hf'")


def load_hf_tokenizer(path: str | os.PathLike | None) -> Tokenizer:
    """A :class:`Tokenizer` from a Hugging Face tokenizer directory (``tokenizer.type: hf``).

    Loads ``<path>`` with ``transformers.AutoTokenizer.from_pretrained`` (local files only) and
    wraps its fast ``backend_tokenizer``; ``eos_id`` / ``pad_id`` are its ``eos_token`` /
    ``pad_token`` (pad defaults to EOS), and its chat template serves
    :meth:`Tokenizer.apply_chat_template`.

    Raises:
        ValueError: ``tokenizer.path`` not set, or the tokenizer has no ``eos_token`` or is not a
            fast (``tokenizers``-backed) tokenizer.
        FileNotFoundError: ``tokenizer.path`` is not a directory with ``tokenizer.json``.
        ImportError: ``transformers`` is not installed (names ``pip install -e .[hf]``).
        DataFormatError: the files exist but do not load (names the directory).
    """
    if path is None:
        raise ValueError("tokenizer.path is required for tokenizer.type='hf' (a Hugging Face tokenizer directory)")
    path = Path(str(path)).expanduser()
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer.path: {str(path)!r} is not a Hugging Face tokenizer directory "
                                "(no tokenizer.json in it)")
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"tokenizer.type=hf needs transformers: `{HF_INSTALL}`") from e
    try:
        hf = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers' errors rarely name the file
        raise DataFormatError(f"{path}: cannot load the Hugging Face tokenizer: {e}", path=path,
                              reason="bad_tokenizer_json") from e
    backend = getattr(hf, "backend_tokenizer", None)
    if not isinstance(backend, tokenizers.Tokenizer):
        raise ValueError(f"tokenizer.path {str(path)!r}: {type(hf).__name__} is not a fast (tokenizers) tokenizer")
    if not hf.eos_token:
        raise ValueError(f"tokenizer.path {str(path)!r}: tokenizer_config.json sets no eos_token")
    return Tokenizer(backend, eos_token=str(hf.eos_token), pad_token=str(hf.pad_token or hf.eos_token),
                     hf_tokenizer=hf)


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


def tokenizer_from_config(tok_cfg: Mapping[str, Any], train_texts: Iterable[str] | None = None,
                          save_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The ``tokenizer:`` config section -> :class:`Tokenizer`.

    ``type: train_bpe`` trains a byte-level BPE of ``vocab_size`` ids on ``train_texts`` (the
    training split) and saves it as ``<save_dir>/tokenizer.json`` when ``save_dir`` is given (pass
    it on one rank only); any other type is :func:`load_tokenizer`.

    Raises:
        ValueError: ``train_bpe`` without ``train_texts``; see also :func:`load_tokenizer`.
    """
    if tok_cfg.get("type") == "train_bpe":
        if train_texts is None:
            raise ValueError("tokenizer.type=train_bpe needs the training split to train on")
        path = Path(save_dir) / "tokenizer.json" if save_dir else None
        return train_bpe_tokenizer(train_texts, int(tok_cfg["vocab_size"]), save_path=path)
    return load_tokenizer(tok_cfg)
