"""Torch datasets for SFT, reward-model (preference) and PPO-rollout (prompt) data, and their
collate functions. Items are dicts of tensors; token ids are int64. Padding is always on the
right with ``pad_id``; ``lengths`` give the number of real tokens per row."""

from __future__ import annotations

import collections
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from nemo_rlhf.data.hh import DataFormatError, PreferencePair
from nemo_rlhf.data.tokenizer import Tokenizer

_OVERLONG = ("truncate", "skip")


def _check_lengths(max_prompt_len: int, max_seq_len: int | None, overlong: str) -> None:
    if overlong not in _OVERLONG:
        raise ValueError(f"overlong must be 'truncate' or 'skip', got {overlong!r}")
    if max_prompt_len < 1:
        raise ValueError(f"max_prompt_len must be >= 1, got {max_prompt_len}")
    if max_seq_len is not None and max_seq_len < max_prompt_len:
        raise ValueError(f"max_seq_len ({max_seq_len}) must be >= max_prompt_len ({max_prompt_len})")


def _fit_prompt(
    prompt: list[int], max_prompt_len: int, overlong: str, stats: collections.Counter[str]
) -> list[int] | None:
    """Left-truncate (keep the latest turns) or return None (skip) when too long."""
    if len(prompt) <= max_prompt_len:
        return prompt
    if overlong == "skip":
        stats["skipped_overlong"] += 1
        return None
    stats["prompt_truncated"] += 1
    return prompt[-max_prompt_len:]


def _fit_response(
    response: list[int], eos_id: int, budget: int, stats: collections.Counter[str]
) -> list[int] | None:
    """``response + [eos]`` right-truncated to ``budget`` tokens; None if < 1 response token fits."""
    if budget < 1:
        return None
    if len(response) + 1 <= budget:
        return response + [eos_id]
    stats["response_truncated"] += 1
    return response[:budget]


def _raise_overlong(pair: PreferencePair, max_seq_len: int, max_prompt_len: int) -> None:
    """``data.on_error=error`` for a pair that ``overlong="skip"`` would drop: raise naming its row."""
    path, _, line = pair.source.rpartition(":")
    raise DataFormatError(f"{pair.source}: overlong: the prompt exceeds data.max_prompt_len={max_prompt_len} tokens or "
                          f"leaves no response token within data.max_seq_len={max_seq_len} (data.overlong=skip, "
                          f"data.on_error=error; data.overlong=truncate cuts it instead)",
                          path=path or None, line=int(line) if line.isdigit() else None, reason="overlong")


class _PairDataset(Dataset):
    """Shared construction of :class:`SFTDataset` and :class:`PreferenceDataset`: checks the
    lengths, tokenizes the prompts in one batch, fits each prompt (``_fit_prompt``) and hands the
    kept ones to :meth:`_add` with the pair and the response budget ``max_seq_len - len(prompt)``."""

    def __init__(
        self,
        pairs: Sequence[PreferencePair],
        tokenizer: Tokenizer,
        max_seq_len: int,
        max_prompt_len: int,
        overlong: str = "truncate",
        on_error: str = "skip",
    ):
        _check_lengths(max_prompt_len, max_seq_len, overlong)
        if on_error not in ("skip", "error"):
            raise ValueError(f"on_error must be 'skip' or 'error', got {on_error!r}")
        self.stats: collections.Counter[str] = collections.Counter()
        self.samples: list = []
        prompts = tokenizer.encode_batch([p.prompt for p in pairs])
        encoded = self._encode(pairs, tokenizer)
        for pair, prompt, responses in zip(pairs, prompts, encoded):
            skipped = self.stats["skipped_overlong"]
            prompt = _fit_prompt(prompt, max_prompt_len, overlong, self.stats)
            if prompt is not None:
                self._add(prompt, responses, tokenizer.eos_id, max_seq_len - len(prompt))
            if on_error == "error" and self.stats["skipped_overlong"] > skipped:
                _raise_overlong(pair, max_seq_len, max_prompt_len)

    def _encode(self, pairs: Sequence[PreferencePair], tokenizer: Tokenizer) -> list:
        """The responses of every pair, tokenized (one entry per pair)."""
        raise NotImplementedError

    def _add(self, prompt: list[int], responses, eos_id: int, budget: int) -> None:
        """Fit the responses into ``budget`` tokens and append the sample (or count a skip)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.samples)


class SFTDataset(_PairDataset):
    """Supervised fine-tuning samples: ``prompt + chosen response + eos``.

    Truncation: a prompt longer than ``max_prompt_len`` tokens is left-truncated (keeps the latest
    turns; ``overlong="truncate"``) or the sample is skipped (``overlong="skip"``). Then, whatever
    ``overlong`` is, the response is right-truncated so the total fits ``max_seq_len`` (eos
    dropped first); a sample keeping no response token (possible only when the prompt fills
    ``max_seq_len``, i.e. ``max_prompt_len == max_seq_len``) is skipped. Counters in ``self.stats``:
    ``prompt_truncated``, ``response_truncated``, ``skipped_overlong``. Tokenized eagerly.

    Item (``S_i`` = sample length <= max_seq_len):
        ``tokens``: ``[S_i]`` int64 token ids.
        ``loss_mask``: ``[S_i]`` float32, 1.0 on response tokens and eos, 0.0 on prompt tokens
            (a mask over the *target* tokens; the trainer shifts it with the labels).
        ``length``: ``[]`` int64, ``S_i``.

    Raises:
        ValueError: ``overlong`` not in {"truncate", "skip"}, ``max_prompt_len < 1`` or
            ``max_seq_len < max_prompt_len``.
    """

    def _encode(self, pairs, tokenizer):
        return tokenizer.encode_batch([p.chosen for p in pairs])

    def _add(self, prompt, response, eos_id, budget):
        response = _fit_response(response, eos_id, budget, self.stats)
        if response is None:
            self.stats["skipped_overlong"] += 1
            return
        self.samples.append((prompt + response, len(prompt)))  # (tokens, prompt length)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        tokens, prompt_len = self.samples[idx]
        loss_mask = torch.ones(len(tokens), dtype=torch.float32)
        loss_mask[:prompt_len] = 0.0
        return {
            "tokens": torch.tensor(tokens, dtype=torch.int64),
            "loss_mask": loss_mask,
            "length": torch.tensor(len(tokens), dtype=torch.int64),
        }


class PreferenceDataset(_PairDataset):
    """Reward-model pairs: ``prompt + chosen + eos`` and ``prompt + rejected + eos``.

    Same truncation rules as :class:`SFTDataset` (the prompt is fitted once and shared; each
    response is fitted independently; the pair is skipped if either keeps no response token).
    ``self.stats["response_truncated"]`` counts sequences (up to 2 per pair); the other counters
    count pairs.

    Item:
        ``chosen``: ``[Sc]`` int64; ``rejected``: ``[Sr]`` int64;
        ``chosen_length``, ``rejected_length``, ``prompt_length`` (tokens of the shared, fitted
        prompt; DPO masks them): ``[]`` int64.

    ``on_error="error"`` (``data.on_error``) with ``overlong="skip"``: a pair that would be skipped
    for its length raises :class:`~nemo_rlhf.data.hh.DataFormatError` naming its ``file:line``
    (reason ``overlong``) instead of being counted in ``skipped_overlong``.

    Raises:
        ValueError: as :class:`SFTDataset`, or a bad ``on_error``.
        DataFormatError: see ``on_error``.
    """

    def _encode(self, pairs, tokenizer):
        return list(zip(tokenizer.encode_batch([p.chosen for p in pairs]),
                        tokenizer.encode_batch([p.rejected for p in pairs])))

    def _add(self, prompt, responses, eos_id, budget):
        chosen = _fit_response(responses[0], eos_id, budget, self.stats)
        rejected = _fit_response(responses[1], eos_id, budget, self.stats)
        if chosen is None or rejected is None:
            self.stats["skipped_overlong"] += 1
            return
        self.samples.append((prompt + chosen, prompt + rejected, len(prompt)))

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        chosen, rejected, prompt_length = self.samples[idx]
        return {
            "chosen": torch.tensor(chosen, dtype=torch.int64),
            "rejected": torch.tensor(rejected, dtype=torch.int64),
            "chosen_length": torch.tensor(len(chosen), dtype=torch.int64),
            "rejected_length": torch.tensor(len(rejected), dtype=torch.int64),
            "prompt_length": torch.tensor(prompt_length, dtype=torch.int64),
        }


class ReviewPairDataset(Dataset):
    """Reward-model pairs of whole texts cut to their LAST ``max_seq_len`` tokens (no eos added):
    for IMDB, where a review's verdict is usually at its end. ``pairs`` come from
    :func:`nemo_rlhf.data.imdb.review_pairs` (``prompt`` must be empty). ``self.stats`` counts
    ``response_truncated`` (texts cut, up to 2 per pair) and ``skipped_empty`` (pairs with an
    empty text).

    Item (same keys as :class:`PreferenceDataset`): ``chosen [Sc]``, ``rejected [Sr]`` int64,
    ``chosen_length``, ``rejected_length``, ``prompt_length`` (always 0: whole texts) ``[]`` int64.

    Raises:
        ValueError: ``max_seq_len < 1``, or a pair with a non-empty prompt (its source named).
    """

    def __init__(self, pairs: Sequence[PreferencePair], tokenizer: Tokenizer, max_seq_len: int):
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        for p in pairs:
            if p.prompt:
                raise ValueError(f"ReviewPairDataset: pair {p.source} has a prompt; it takes whole texts")
        self.stats: collections.Counter[str] = collections.Counter()
        self.samples: list[tuple[list[int], list[int]]] = []
        chosen = tokenizer.encode_batch([p.chosen for p in pairs])
        rejected = tokenizer.encode_batch([p.rejected for p in pairs])
        for c, r in zip(chosen, rejected):
            if not c or not r:
                self.stats["skipped_empty"] += 1
                continue
            self.stats["response_truncated"] += (len(c) > max_seq_len) + (len(r) > max_seq_len)
            self.samples.append((c[-max_seq_len:], r[-max_seq_len:], 0))  # no prompt

    def __len__(self) -> int:
        return len(self.samples)

    __getitem__ = PreferenceDataset.__getitem__


class PromptDataset(Dataset):
    """Prompts for PPO rollouts.

    Prompts longer than ``max_prompt_len`` tokens are left-truncated (``overlong="truncate"``,
    counted in ``self.stats["prompt_truncated"]``) or skipped (``"skip"``,
    ``self.stats["skipped_overlong"]``). ``self.texts`` holds the kept prompt strings (untruncated),
    aligned with the items.

    Item: ``prompt``: ``[P_i]`` int64; ``prompt_length``: ``[]`` int64.

    Raises:
        ValueError: bad ``overlong``/``max_prompt_len``, or a prompt that encodes to no token
            (message names its index).
    """

    def __init__(
        self,
        prompts: Sequence[str],
        tokenizer: Tokenizer,
        max_prompt_len: int,
        overlong: str = "truncate",
    ):
        _check_lengths(max_prompt_len, None, overlong)
        self.stats: collections.Counter[str] = collections.Counter()
        self.texts: list[str] = []
        self.samples: list[list[int]] = []
        for i, (text, ids) in enumerate(zip(prompts, tokenizer.encode_batch(prompts))):
            if not ids:
                raise ValueError(f"PromptDataset: prompts[{i}] is empty (encodes to no token)")
            ids = _fit_prompt(ids, max_prompt_len, overlong, self.stats)
            if ids is None:
                continue
            self.texts.append(text)
            self.samples.append(ids)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        ids = self.samples[idx]
        return {
            "prompt": torch.tensor(ids, dtype=torch.int64),
            "prompt_length": torch.tensor(len(ids), dtype=torch.int64),
        }


def _pad_right(seqs: Sequence[torch.Tensor], pad_value: float | int, pad_to_multiple_of: int) -> torch.Tensor:
    """Stack 1-D tensors ``[S_i]`` into ``[N, S]``, ``S = max S_i`` rounded up to the multiple."""
    if not seqs:
        raise ValueError("cannot collate an empty batch")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    longest = max(len(s) for s in seqs)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    out = torch.full((len(seqs), width), pad_value, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def collate_sft(
    batch: Sequence[dict[str, torch.Tensor]], pad_id: int, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """Collate :class:`SFTDataset` items.

    Returns:
        ``tokens``: ``[B, S]`` int64, right-padded with ``pad_id``;
        ``loss_mask``: ``[B, S]`` float32, 0.0 on padding;
        ``lengths``: ``[B]`` int64.
        ``S`` = longest sample rounded up to a multiple of ``pad_to_multiple_of``.

    Raises:
        ValueError: empty batch or ``pad_to_multiple_of < 1``.
    """
    return {
        "tokens": _pad_right([b["tokens"] for b in batch], pad_id, pad_to_multiple_of),
        "loss_mask": _pad_right([b["loss_mask"] for b in batch], 0.0, pad_to_multiple_of),
        "lengths": torch.stack([b["length"] for b in batch]).to(torch.int64),
    }


def collate_preference(
    batch: Sequence[dict[str, torch.Tensor]], pad_id: int, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """Collate :class:`PreferenceDataset` items into one reward-model forward batch.

    Returns:
        ``tokens``: ``[2B, S]`` int64, rows ``0..B-1`` chosen, rows ``B..2B-1`` the matching
            rejected sequences, right-padded with ``pad_id``;
        ``lengths``: ``[2B]`` int64, same order;
        ``prompt_lengths``: ``[2B]`` int64, same order (when the items have ``prompt_length``).

    Raises:
        ValueError: empty batch or ``pad_to_multiple_of < 1``.
    """
    seqs = [b["chosen"] for b in batch] + [b["rejected"] for b in batch]
    lengths = [b["chosen_length"] for b in batch] + [b["rejected_length"] for b in batch]
    out = {
        "tokens": _pad_right(seqs, pad_id, pad_to_multiple_of),
        "lengths": torch.stack(lengths).to(torch.int64),
    }
    if all("prompt_length" in b for b in batch):
        out["prompt_lengths"] = torch.stack([b["prompt_length"] for b in batch] * 2).to(torch.int64)
    return out


def collate_prompts(
    batch: Sequence[dict[str, torch.Tensor]], pad_id: int, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """Collate :class:`PromptDataset` items.

    Returns:
        ``prompts``: ``[B, P]`` int64, right-padded with ``pad_id``;
        ``prompt_lengths``: ``[B]`` int64.

    Raises:
        ValueError: empty batch or ``pad_to_multiple_of < 1``.
    """
    return {
        "prompts": _pad_right([b["prompt"] for b in batch], pad_id, pad_to_multiple_of),
        "prompt_lengths": torch.stack([b["prompt_length"] for b in batch]).to(torch.int64),
    }
