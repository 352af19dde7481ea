"""nemo_rlhf/checkpoint/cache.py: a base model converted once, reused, re-converted when the
source changes; truncated variants; clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.checkpoint, pytest.mark.usefixtures("megatron_world")]
transformers = pytest.importorskip("transformers")


def _hf_dir(path: Path) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=True, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_converted_once_reused_and_refreshed(tmp_path):
    from nemo_rlhf.checkpoint.cache import converted_model, is_converted_dir
    from nemo_rlhf.checkpoint.hf import read_model_config

    src = _hf_dir(tmp_path / "hf")
    cache = tmp_path / "cache"
    a = converted_model(str(src), "policy", cache_dir=cache)
    assert is_converted_dir(a) and read_model_config(a / "model_config.yaml")["num_layers"] == 3
    stamp = (a / "model_config.yaml").stat().st_mtime_ns
    assert converted_model(str(src), "policy", cache_dir=cache) == a  # reused, not rewritten
    assert (a / "model_config.yaml").stat().st_mtime_ns == stamp
    rm = converted_model(str(src), "reward", num_layers=2, cache_dir=cache)
    assert rm != a and read_model_config(rm / "model_config.yaml")["num_layers"] == 2
    assert converted_model(str(a)) == a  # a converted directory is used as is
    os.utime(src / "config.json", ns=(1, 1))  # the source changed: a new entry
    assert converted_model(str(src), "policy", cache_dir=cache) != a
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_errors_name_the_source(tmp_path):
    from nemo_rlhf.checkpoint.cache import converted_model

    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        converted_model(str(tmp_path / "missing.gguf"), cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither an HF save_pretrained directory"):
        converted_model(str(tmp_path / "empty"), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="role='judge'"):
        converted_model("smollm2", "judge")
    src = _hf_dir(tmp_path / "hf")
    a = converted_model(str(src), cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="already converted"):
        converted_model(str(a), "reward", num_layers=1)


def test_several_variants_read_the_source_once(tmp_path, monkeypatch):
    from nemo_rlhf.checkpoint import hf
    from nemo_rlhf.checkpoint.cache import converted_models
    from nemo_rlhf.checkpoint.hf import read_model_config

    src = _hf_dir(tmp_path / "hf")
    reads = []
    real = hf._load_hf_dir
    monkeypatch.setattr(hf, "_load_hf_dir", lambda p: reads.append(p) or real(p))
    dirs = converted_models(str(src), [("policy", None), ("reward", 1), ("critic", 2)], cache_dir=tmp_path / "c")
    assert len(reads) == 1 and len(set(dirs)) == 3
    assert [read_model_config(d / "model_config.yaml")["num_layers"] for d in dirs] == [3, 1, 2]
    assert converted_models(str(src), [("reward", 1)], cache_dir=tmp_path / "c") == [dirs[1]] and len(reads) == 1
