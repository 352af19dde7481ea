"""Parallel-layout validation (``nemo_rlhf.parallel.layout``) and the launcher environment reader."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.parallel

from nemo_rlhf.parallel.layout import LayoutError, validate_layout
from nemo_rlhf.parallel.state import initialize_distributed, read_dist_env

MODEL = dict(num_layers=4, num_attention_heads=8, num_query_groups=4)


def _cfg(**kw):
    return {**MODEL, **kw}


@pytest.mark.parametrize(
    "model_cfg, world, gbs, mbs, fragments",
    [
        (_cfg(num_attention_heads=6, num_query_groups=6, tensor_model_parallel_size=4), 4, None, None,
         ["model.num_attention_heads=6", "model.tensor_model_parallel_size=4"]),
        (_cfg(num_query_groups=2, tensor_model_parallel_size=4), 4, None, None,
         ["model.num_query_groups=2", "model.tensor_model_parallel_size=4"]),
        (_cfg(num_layers=3, pipeline_model_parallel_size=2), 2, None, None,
         ["model.num_layers=3", "model.pipeline_model_parallel_size=2"]),
        (_cfg(tensor_model_parallel_size=2, pipeline_model_parallel_size=2), 6, None, None,
         ["world size 6", "= 4"]),
        (_cfg(sequence_parallel=True), 2, None, None,
         ["model.sequence_parallel=true", "(got 1)"]),
        (_cfg(tensor_model_parallel_size=2), 4, 6, 2, ["batch.global_batch_size=6",
                                                      "batch.micro_batch_size=2", "data-parallel size 2"]),
        (_cfg(), 1, 8, 0, ["batch.micro_batch_size=0", ">= 1"]),
        (_cfg(num_query_groups=3), 1, None, None, ["model.num_attention_heads=8",
                                                   "model.num_query_groups=3"]),
        (_cfg(tensor_model_parallel_size=0), 1, None, None, ["model.tensor_model_parallel_size=0"]),
    ],
    ids=["heads%tp", "groups%tp", "layers%pp", "world!=tp*pp*dp", "sp-without-tp",
         "gbs%(mbs*dp)", "mbs<1", "heads%groups", "tp<1"],
)
def test_invalid_layout_names_fields_and_values(model_cfg, world, gbs, mbs, fragments):
    with pytest.raises(LayoutError) as err:
        validate_layout(model_cfg, world, global_batch_size=gbs, micro_batch_size=mbs)
    msg = str(err.value)
    for f in fragments:
        assert f in msg, (f, msg)
    assert isinstance(err.value, ValueError)


def test_every_violation_is_listed_with_custom_prefixes():
    cfg = _cfg(num_layers=3, num_attention_heads=6, num_query_groups=6, tensor_model_parallel_size=4,
               pipeline_model_parallel_size=2)
    with pytest.raises(LayoutError) as err:
        validate_layout(cfg, 12, global_batch_size=3, micro_batch_size=2,
                        prefix="actor.model", batch_prefix="ppo")
    msg = str(err.value)
    assert "actor.model.num_attention_heads=6" in msg
    assert "actor.model.num_query_groups=6" in msg
    assert "actor.model.num_layers=3" in msg
    assert "world size 12" in msg
    assert "ppo.global_batch_size=3" in msg and "data-parallel size 1" in msg
    assert msg.count("\n  - ") == 5


@pytest.mark.parametrize(
    "model_cfg, world, gbs, mbs, dp",
    [
        (_cfg(), 1, None, None, 1),
        (_cfg(), 4, 16, 2, 4),
        (_cfg(tensor_model_parallel_size=2, pipeline_model_parallel_size=2), 8, 8, 2, 2),
        (_cfg(tensor_model_parallel_size=4, sequence_parallel=True), 8, 4, 2, 2),
        ({"num_layers": 2, "num_attention_heads": 4}, 2, 2, 1, 2),  # query groups default to heads
    ],
)
def test_valid_layout_returns_dp_size(model_cfg, world, gbs, mbs, dp):
    assert validate_layout(model_cfg, world, global_batch_size=gbs, micro_batch_size=mbs) == dp


def test_initialize_distributed_rejects_unknown_accelerator():
    with pytest.raises(ValueError, match="'tpu'"):
        initialize_distributed(1, 1, "tpu")


def test_initialize_distributed_rejects_world_smaller_than_model_parallel(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match=r"world size 1 .*tensor_model_parallel_size \(2\)"):
        initialize_distributed(2, 1, "cpu")


def test_read_dist_env_torchrun_slurm_and_single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    single = read_dist_env()
    assert (single.rank, single.world_size, single.local_rank, single.master_addr) == (0, 1, 0, "127.0.0.1")

    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[003-004,007],login1")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    slurm = read_dist_env()
    assert (slurm.rank, slurm.world_size, slurm.local_rank) == (5, 8, 1)
    assert slurm.master_addr == "gpu003"
    assert slurm.master_port == 29500 + 123456 % 10000

    monkeypatch.setenv("RANK", "3")  # torchrun variables win over SLURM's
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1234")
    env = read_dist_env()
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (3, 4, 3, "10.0.0.1", 1234)
