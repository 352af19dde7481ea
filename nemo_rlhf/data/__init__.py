"""Data layer: HH-RLHF and IMDB loading, tokenizers, torch datasets and collate functions."""

from __future__ import annotations

from nemo_rlhf.data.datasets import (
    PreferenceDataset,
    PromptDataset,
    SFTDataset,
    collate_preference,
    collate_prompts,
    collate_sft,
)
from nemo_rlhf.data.hh import (
    DataFormatError,
    LoadStats,
    PreferencePair,
    default_data_dir,
    load_hh_pairs,
    split_dialogue,
    split_heldout,
)
from nemo_rlhf.data.imdb import ImdbReview, load_imdb
from nemo_rlhf.data.tokenizer import Tokenizer, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "DataFormatError",
    "ImdbReview",
    "LoadStats",
    "PreferenceDataset",
    "PreferencePair",
    "PromptDataset",
    "SFTDataset",
    "Tokenizer",
    "collate_preference",
    "collate_prompts",
    "collate_sft",
    "default_data_dir",
    "load_hh_pairs",
    "load_imdb",
    "load_tokenizer",
    "split_dialogue",
    "split_heldout",
    "train_bpe_tokenizer",
]
