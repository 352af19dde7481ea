"""Model-weight checkpoints (``nemo_rlhf.checkpoint.weights``): round trip, role changes, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nemo_rlhf.algorithms.sft import sft_loss
from nemo_rlhf.checkpoint.weights import (
    COMPLETE_MARKER,
    CheckpointError,
    load_model_weights,
    load_weights,
    save_model_weights,
)
from nemo_rlhf.models.policy import GPTPolicyModel, shift_labels
from nemo_rlhf.models.reward_model import GPTRewardModel

pytestmark = pytest.mark.checkpoint


def _weights(gpt) -> dict[str, torch.Tensor]:
    """Cloned tensor state (``_extra_state`` entries are not weights)."""
    return {k: v.detach().clone() for k, v in gpt.state_dict().items()
            if torch.is_tensor(v) and not k.endswith("_extra_state")}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys=None) -> None:
    for k in keys if keys is not None else a:
        assert torch.equal(a[k], b[k]), k


def _sft(build, tiny, seed: int):
    return build(GPTPolicyModel, seed=seed, micro_batch_size=1, eos_id=tiny.eos_id, pad_id=tiny.pad_id)


@pytest.fixture
def sft_checkpoint(build, tiny, tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """An SFT model (seed 1) saved to ``tmp_path/sft``; returns the path and its weights."""
    model = _sft(build, tiny, seed=1)
    path = save_model_weights(model.gpt, tmp_path / "sft")
    return path, _weights(model.gpt)


def test_round_trip_into_a_differently_seeded_model(build, tiny, sft_checkpoint, tmp_path):
    path, saved = sft_checkpoint
    assert path == tmp_path / "sft"
    assert (path / COMPLETE_MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]  # no sft.tmp / sft.old left

    fresh = _sft(build, tiny, seed=2)
    before = _weights(fresh.gpt)
    assert set(before) == set(saved)
    assert not torch.equal(before["embedding.word_embeddings.weight"], saved["embedding.word_embeddings.weight"])
    skipped = load_model_weights(fresh.gpt, path)
    assert skipped == []
    _assert_same(_weights(fresh.gpt), saved)


def test_save_replaces_an_existing_checkpoint(build, tiny, sft_checkpoint, tmp_path):
    path, first = sft_checkpoint
    other = _sft(build, tiny, seed=3)
    save_model_weights(other.gpt, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]
    target = _sft(build, tiny, seed=4)
    key = "embedding.word_embeddings.weight"
    assert not torch.equal(_weights(other.gpt)[key], first[key])
    load_model_weights(target.gpt, path)
    _assert_same(_weights(target.gpt), _weights(other.gpt))  # the second save, not the first


def test_sft_checkpoint_into_reward_model_skips_the_head(build, tiny, sft_checkpoint):
    path, saved = sft_checkpoint
    rm = build(GPTRewardModel, seed=5, micro_batch_size=1)
    head_before = {k: v for k, v in _weights(rm.gpt).items() if k.startswith("output_layer.")}
    assert sorted(head_before) == ["output_layer.bias", "output_layer.weight"]
    assert head_before["output_layer.weight"].shape == (1, tiny.model["hidden_size"])

    skipped = load_model_weights(rm.gpt, path, skip_prefixes=("output_layer.",))
    assert sorted(skipped) == ["output_layer.bias", "output_layer.weight"]
    after = _weights(rm.gpt)
    trunk = [k for k in after if not k.startswith("output_layer.")]
    assert "embedding.word_embeddings.weight" in trunk and len(trunk) == len(saved)
    _assert_same(after, saved, trunk)  # the tied SFT embedding becomes the RM's (untied) embedding
    _assert_same(after, head_before, list(head_before))


def test_sft_checkpoint_into_reward_model_without_skip_names_the_head(build, tiny, sft_checkpoint):
    path, _ = sft_checkpoint
    rm = build(GPTRewardModel, seed=5, micro_batch_size=1)
    with pytest.raises(CheckpointError, match="output_layer.weight") as err:
        load_model_weights(rm.gpt, path)
    assert str(path) in str(err.value)


def test_shape_mismatch_raises_checkpoint_error(build, tiny, sft_checkpoint):
    path, _ = sft_checkpoint
    wider = build(GPTPolicyModel, model_cfg=dict(hidden_size=64), micro_batch_size=1, eos_id=tiny.eos_id,
                  pad_id=tiny.pad_id)
    with pytest.raises(CheckpointError, match="shape mismatch") as err:
        load_model_weights(wider.gpt, path)
    assert str(path) in str(err.value)


def test_directory_without_complete_marker_is_refused(build, tiny, sft_checkpoint):
    path, _ = sft_checkpoint
    (path / COMPLETE_MARKER).unlink()
    with pytest.raises(CheckpointError, match=COMPLETE_MARKER) as err:
        load_model_weights(_sft(build, tiny, seed=2).gpt, path)
    assert str(path) in str(err.value)


def test_missing_path_is_refused(build, tiny, tmp_path):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(CheckpointError) as err:
        load_model_weights(_sft(build, tiny, seed=2).gpt, missing)
    assert str(missing) in str(err.value)


def _data_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.distcp"))
    assert files, sorted(p.name for p in path.iterdir())
    return files


@pytest.mark.parametrize("damage", ["delete_data", "truncate_data", "delete_metadata"])
def test_damaged_checkpoint_raises_checkpoint_error(build, tiny, sft_checkpoint, damage):
    """torch's ``CheckpointException`` (a ``BaseException``) must come out as a ``CheckpointError``."""
    path, _ = sft_checkpoint
    if damage == "delete_data":
        data_files = _data_files(path)
        for f in data_files:
            f.unlink()
        detail = data_files[0].name
    elif damage == "truncate_data":
        for f in _data_files(path):
            data = f.read_bytes()
            f.write_bytes(data[: len(data) // 3])
        detail = "failed to load checkpoint"
    else:
        (path / ".metadata").unlink()
        detail = "cannot read checkpoint metadata"
    target = _sft(build, tiny, seed=2)
    with pytest.raises(CheckpointError) as err:
        load_model_weights(target.gpt, path)
    assert str(path) in str(err.value)
    assert detail in str(err.value)


def _bf16_step_after_load(build, tiny, tmp_path, via_module: bool) -> float:
    """Load seed-1 bf16 weights into a trainable seed-2 bf16 model, take one lr=1e-6 step, and
    return the largest distance of the embedding from the loaded one."""
    bf16 = dict(params_dtype="bf16")
    src = build(GPTPolicyModel, seed=1, model_cfg=bf16, micro_batch_size=2, eos_id=tiny.eos_id,
                pad_id=tiny.pad_id)
    path = save_model_weights(src.gpt, tmp_path / "bf16")
    model = build(GPTPolicyModel, seed=2, model_cfg=bf16, optim_cfg=dict(lr=1e-6), micro_batch_size=2,
                  eos_id=tiny.eos_id, pad_id=tiny.pad_id)
    if via_module:
        load_weights(model, path)  # loads and refreshes the optimizer's fp32 main copies
    else:
        load_model_weights(model.gpt, path)  # bare load: the optimizer still holds stale copies
    key = "embedding.word_embeddings.weight"
    loaded = src.gpt.state_dict()[key].float()
    assert torch.equal(model.gpt.state_dict()[key].float(), loaded)
    tokens = tiny.tokens(2, 8, seed=12)
    labels, label_mask = shift_labels(tokens, torch.ones(2, 8), tiny.pad_id)
    batch = {"tokens": tokens, "labels": labels, "label_mask": label_mask}
    assert model.train_on(sft_loss, batch, 2)["skipped"] == 0.0
    return (model.gpt.state_dict()[key].float() - loaded).abs().max().item()


def test_bf16_loaded_weights_survive_a_step_via_module_load_weights(build, tiny, tmp_path):
    # bf16 params: the megatron optimizer steps fp32 main copies made when it was built;
    # checkpoint.weights.load_weights refreshes them (what every stage uses).
    assert _bf16_step_after_load(build, tiny, tmp_path, via_module=True) < 1e-3


def test_bf16_bare_load_without_refresh_is_undone_by_the_optimizer(build, tiny, tmp_path):
    # Why load_weights exists: a bare load into .gpt is overwritten by the stale fp32 copies.
    assert _bf16_step_after_load(build, tiny, tmp_path, via_module=False) > 1e-2
