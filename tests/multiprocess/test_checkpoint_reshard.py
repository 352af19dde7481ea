"""Training checkpoints reshard across layouts and resume exactly (SFT role, tiny parity model).

Each run is ``tools/reshard_check.py`` under torchrun (gloo, CPU, fp32, Adam): 2
optimizer steps, a training checkpoint (torch_dist; distributed-optimizer state as
``fully_reshardable``), then 2 more steps. A load run restores the checkpoint in another layout
and trains the same 2 steps. "Full" weights, Adam moments and logits are assembled in memory from
each layout's shards, so they compare key by key across layouts.

- TP=2 -> TP=1 and PP=2 -> PP=1: the loaded weights and Adam moments are bitwise the saved ones;
  the logits on fixed tokens equal those the saving layout computed (PP: bitwise; TP: the TP=2
  row-parallel layers sum partial products in another order, measured max |diff| 4.6e-6);
  continuing gives the saving layout's losses and weights within reduction-order noise.
- PP=2 -> PP=1 with the memory savers (LoRA adapters on every linear, ``num_layers_unfrozen=2`` of
  4: the first stage has nothing to train and no optimizer state): the same, and Adam state exists
  only for the unfrozen layers' adapters, which are the only weights the continued steps change.
  (Before the fix in ``checkpoint/training_state.py``, such a checkpoint had no Adam step at all and
  resumed in no layout: ``KeyError: 'step'``.) With the distributed optimizer that layout is refused
  up front.
- Distributed optimizer, DP=2: resumed in a fresh DP=2 world, steps 3-4 are bitwise those of an
  uninterrupted 4-step DP=2 run (losses and weights). Loaded at DP=1, weights and moments are
  bitwise the saved ones and continuing matches the DP=2 run within reduction-order noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from torchrun_helper import REPO, torchrun

pytestmark = [pytest.mark.parallel, pytest.mark.checkpoint]

SCRIPT = [str(REPO / "tools" / "reshard_check.py")]
CKPT = "step_00000002"
# Cross-layout tolerances (fp32; differences come only from the order of reductions: TP
# all-reduce of row-parallel partial sums, PP/DP gradient all-reduces, grad-norm sums).
# Measured on the 2-core CPU box: TP logits 4.6e-6; losses <= 1.2e-7; weights after the two
# continued Adam steps <= 1.2e-7 (TP, DP) and 3.0e-8 (PP).
LOGITS_TOL = 1e-5
LOSS_TOL = 1e-6
WEIGHTS_TOL = 1e-5
REPORT: dict[str, dict[str, float]] = {}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys() and a, what
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{what} differ: {bad[:4]} (max |diff| {max_diff(a, b)})"


def run(workdir: Path, nproc: int, out: str, *args: str) -> dict:
    torchrun(nproc, [*SCRIPT, *args, "--out", out], workdir)
    return torch.load(workdir / out / "result.pt", weights_only=False)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("reshard")
    yield d
    if REPORT:
        (d / "reshard_report.json").write_text(json.dumps(REPORT, indent=2, sort_keys=True))
        print("\nlargest |difference| per case:\n" + json.dumps(REPORT, indent=2, sort_keys=True))


@pytest.fixture(scope="module")
def dp2_saved(workdir) -> dict:
    """DP=2 with the distributed optimizer: 2 steps, checkpoint, 2 more steps."""
    return run(workdir, 2, "save_dp2", "--mode", "save", "--distributed-optimizer", "--ckpt", "ckpt_dp2")


def check_loaded(saved: dict, loaded: dict) -> None:
    """What the load run restored is bitwise what the save run had at the checkpoint."""
    assert saved["saved"]["step"] == loaded["loaded"]["step"] == 2
    assert_bitwise(saved["saved"]["weights"], loaded["loaded"]["weights"], "loaded weights")
    assert_bitwise(saved["saved"]["moments"], loaded["loaded"]["moments"], "loaded Adam moments")
    # resumed at the data position of the checkpoint: steps 2 and 3 (0-based) of the same data
    assert sorted(loaded["losses"]) == [2, 3] and sorted(saved["losses"]) == [0, 1, 2, 3]


# the memory savers: LoRA adapters on every linear and num_layers_unfrozen=2 of 4, so at PP=2 the
# first stage holds no trainable parameter (no optimizer state) and only layers 2-3's adapters train
SAVERS = ["--lora", "--num-layers-unfrozen", "2"]
RESHARD_CASES = {"tp2_to_tp1": (["--tp", "2"], []), "pp2_to_pp1": (["--pp", "2"], []),
                 "pp2_to_pp1_lora_frozen": (["--pp", "2"], SAVERS)}


@pytest.mark.parametrize("layout", sorted(RESHARD_CASES))
def test_checkpoint_reshards_to_one_process(layout, workdir):
    args, savers = RESHARD_CASES[layout]
    saved = run(workdir, 2, f"save_{layout}", "--mode", "save", *args, *savers, "--ckpt", f"ckpt_{layout}")
    loaded = run(workdir, 1, f"load_{layout}", "--mode", "load", *savers, "--ckpt", f"ckpt_{layout}/{CKPT}")
    assert saved["layout"]["world"] == 2 and loaded["layout"]["world"] == 1
    check_loaded(saved, loaded)
    d_logits = (saved["saved"]["logits"] - loaded["loaded"]["logits"]).abs().max().item()
    if layout.startswith("pp"):
        # the same operations on the same data, only split over two processes
        assert torch.equal(saved["saved"]["logits"], loaded["loaded"]["logits"]), d_logits
    else:
        assert d_logits <= LOGITS_TOL, f"logits after resharding differ by {d_logits}"
    d_loss = max(abs(saved["losses"][k] - loaded["losses"][k]) for k in loaded["losses"])
    assert d_loss <= LOSS_TOL, f"continued losses differ by {d_loss}: {saved['losses']} vs {loaded['losses']}"
    d_w = max_diff(saved["final_weights"], loaded["final_weights"])
    assert d_w <= WEIGHTS_TOL, f"weights after two continued steps differ by {d_w}"
    REPORT[layout] = {"logits": d_logits, "losses": d_loss, "final_weights": d_w}
    if savers:
        # Adam state exists for the adapters only, and only in the unfrozen layers 2-3 (per-layer
        # tensors are stacked [num_layers, ...] in these full views); every other weight, base or
        # adapter, is bitwise the checkpoint's after the two continued steps in both layouts
        moments = saved["saved"]["moments"]  # keys optimizer.state.exp_avg[_sq].<parameter>
        assert moments and all("lora_" in k for k in moments), sorted(moments)
        for k, m in moments.items():
            assert m.shape[0] == 4 and not m[:2].any() and m[2:].all(dim=0).any(), k
        w0 = saved["saved"]["weights"]
        for run_ in (saved, loaded):
            changed = {k for k, w in run_["final_weights"].items() if not torch.equal(w, w0[k])}
            assert changed and all("lora_" in k for k in changed), sorted(changed)
            assert all(torch.equal(run_["final_weights"][k][:2], w0[k][:2]) for k in changed)

def test_distributed_optimizer_resume_is_bitwise_exact(dp2_saved, workdir):
    ref = run(workdir, 2, "ref_dp2", "--mode", "ref", "--distributed-optimizer")
    resumed = run(workdir, 2, "load_dp2", "--mode", "load", "--distributed-optimizer",
                  "--ckpt", f"ckpt_dp2/{CKPT}")
    assert resumed["layout"]["world"] == 2 and resumed["layout"]["distributed_optimizer"]
    check_loaded(dp2_saved, resumed)
    assert torch.equal(dp2_saved["saved"]["logits"], resumed["loaded"]["logits"])
    # writing the checkpoint changed nothing, and the resumed run continues the uninterrupted one
    assert sorted(ref["losses"]) == [0, 1, 2, 3]
    assert dp2_saved["losses"] == ref["losses"]
    assert_bitwise(ref["final_weights"], dp2_saved["final_weights"], "weights of the saving run")
    assert resumed["losses"] == {k: ref["losses"][k] for k in (2, 3)}
    assert_bitwise(ref["final_weights"], resumed["final_weights"], "weights after resume")
    REPORT["dp2_distributed_optimizer_resume"] = {
        "losses": max(abs(ref["losses"][k] - resumed["losses"][k]) for k in (2, 3)),
        "final_weights": max_diff(ref["final_weights"], resumed["final_weights"])}


def test_distributed_optimizer_reshards_from_dp2_to_dp1(dp2_saved, workdir):
    loaded = run(workdir, 1, "load_dp1", "--mode", "load", "--distributed-optimizer",
                 "--ckpt", f"ckpt_dp2/{CKPT}")
    assert loaded["layout"]["world"] == 1
    check_loaded(dp2_saved, loaded)  # Adam moments of both DP shards, bitwise
    d_logits = (dp2_saved["saved"]["logits"] - loaded["loaded"]["logits"]).abs().max().item()
    assert d_logits == 0.0  # DP does not change the forward computation
    d_loss = max(abs(dp2_saved["losses"][k] - loaded["losses"][k]) for k in loaded["losses"])
    assert d_loss <= LOSS_TOL, f"continued losses differ by {d_loss}: {dp2_saved['losses']} vs {loaded['losses']}"
    d_w = max_diff(dp2_saved["final_weights"], loaded["final_weights"])
    assert d_w <= WEIGHTS_TOL, f"weights after two continued steps differ by {d_w}"
    REPORT["dp2_to_dp1_distributed_optimizer"] = {"logits": d_logits, "losses": d_loss, "final_weights": d_w}


def test_distributed_optimizer_refuses_an_all_frozen_stage_up_front(workdir):
    """num_layers_unfrozen=2 of 4 at PP=2 leaves the first stage nothing to train; megatron-core's
    distributed optimizer without Transformer Engine/Apex would crash at the first checkpoint
    (``assert len(steps) == 1`` in its ``state_dict``), after the steps it meant to save. The model
    refuses at construction, on every rank, naming the keys."""
    with pytest.raises(AssertionError) as err:
        run(workdir, 2, "frozen_stage_dist", "--mode", "save", "--pp", "2", "--distributed-optimizer",
            "--num-layers-unfrozen", "2", "--ckpt", "ckpt_frozen_stage_dist")
    msg = str(err.value)
    assert "LayoutError: optim.distributed_optimizer=true, but a pipeline stage holds no trainable" in msg
    assert "model.num_layers_unfrozen=2 of model.num_layers=4, model.pipeline_model_parallel_size=2" in msg
    assert not (workdir / "ckpt_frozen_stage_dist").exists()
