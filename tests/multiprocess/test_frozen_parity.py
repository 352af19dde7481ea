"""Frozen layers and the hydra reference under pipeline parallelism (tools/parity.py).

Every role trains with ``model.num_layers_unfrozen=2`` of the parity model's 4 layers (tied
embeddings), so at PP=2 the first stage (embedding + layers 0, 1) holds only frozen parameters:
it must run no weight backward and still take part in the schedule, and the last stage trains
layers 2, 3 and the final norm. The ``ppo`` and ``dpo`` roles use a hydra reference policy (its
branch, layers 2, 3 + final norm, on the last stage; DPO runs it inside the policy's training
forward). DP=2 x PP=2 (every role; the gradient all-reduce over DP sees only the last stage's
trainable buffers) and TP=2 + SP (the actor, PPO and DPO roles, where the hydra branch runs on
sequence-split hidden states) against one process from the same initial weights: forward outputs,
step metrics and weights after the step within 1e-5 (two DPO steps included), two whole PPO steps
within 1e-4; and in every layout each frozen weight is bitwise equal to its initial value.
The ``ilql`` role reads its Q heads through the LM head's (frozen, tied) output matrix
(``--ilql-q-head lm_head``; ``ilql.q_head``): its Q, target Q and V after two steps match too,
relative to their scale, and greedy decoding with the shifted logits gives the same tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from torchrun_helper import REPO, torchrun

pytestmark = pytest.mark.parallel

PARITY = str(REPO / "tools" / "parity.py")
FROZEN_ARGS = ["--num-layers-unfrozen", "2", "--reference", "hydra", "--ilql-q-head", "lm_head"]
ROLES = ("sft", "rm", "critic", "actor", "ppo", "dpo", "ilql")
LAYOUTS = {  # name: (processes, parity args, roles)
    "dp2_pp2": (4, ["--pp", "2"], ROLES),  # DP=2 x PP=2: each DP replica's first stage is all frozen
    "tp2_sp": (2, ["--tp", "2", "--sp"], ("actor", "ppo", "dpo", "ilql")),
}
FROM_ACTOR = ("ppo", "dpo")  # roles that start from the actor's initial weights
TOL, PPO_TOL = 1e-5, 1e-4
DISCRETE = {"clipfrac", "vf_clipfrac", "accuracy", "lr", "skipped"}
# frozen at num_layers_unfrozen=2 of 4: embedding (and the policy's tied LM head) and layers 0, 1;
# the reward/value heads of "rm" and "critic" (untied output_layer) train
FROZEN_PREFIXES = ("embedding.", "decoder.layers.0.", "decoder.layers.1.")
SCALAR_HEAD_ROLES = ("rm", "critic")


def _weights(role: str, path: Path) -> dict[str, torch.Tensor]:
    """A weights checkpoint loaded into a TP=PP=1 model in a fresh one-process world."""
    from nemo_rlhf.checkpoint.weights import load_weights
    from nemo_rlhf.parallel.state import destroy_distributed, initialize_distributed
    from tools.parity import MODEL, build_role

    initialize_distributed(1, 1, "cpu")
    try:
        model = build_role("actor" if role in FROM_ACTOR else role, MODEL, None, ilql_q_head="lm_head")
        load_weights(model, path)
        return {k: v.clone() for k, v in model.gpt.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()}
    finally:
        destroy_distributed()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("frozen_parity")
    torchrun(1, [PARITY, *FROZEN_ARGS, "--roles", ",".join(ROLES), "--out", "ref", "--init", "init", "--save-init"], d)
    return d


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_frozen_roles_and_hydra_reference_match_single_process(layout, workdir):
    nproc, args, roles = LAYOUTS[layout]
    torchrun(nproc, [PARITY, *args, *FROZEN_ARGS, "--roles", ",".join(roles), "--out", layout, "--init", "init"],
             workdir)
    for role in roles:
        ref = torch.load(workdir / "ref" / role / "result.pt", weights_only=False)
        got = torch.load(workdir / layout / role / "result.pt", weights_only=False)
        tol = PPO_TOL if role == "ppo" else TOL
        init = _weights(role, workdir / "init" / ("actor" if role in FROM_ACTOR else role))
        if role == "ppo":  # the hydra reference's log-probs on the fixed batch, before any step
            d_ref = (ref["reference"] - got["reference"]).abs().max().item()
            assert d_ref <= TOL, f"hydra reference log-probs differ by {d_ref}"
        if role == "ppo" and layout.startswith("dp"):
            # each DP rank samples its own rollouts (see test_layout_parity): the steps only run, finite,
            # and train nothing below the unfrozen layers
            assert all(math.isfinite(v) for step in got["steps"] for v in step.values()), got["steps"]
            after = _weights(role, workdir / layout / role / "after")
            assert all(torch.equal(after[k], init[k]) for k in init if k.startswith(FROZEN_PREFIXES))
            continue
        if role == "ilql":
            for k in ("q1", "q2", "target_q1", "target_q2", "v"):
                d_head = ((ref["heads"][k] - got["heads"][k]).abs().max() / ref["heads"][k].abs().max().clamp(min=1.0))
                assert d_head.item() <= TOL, f"ilql: head {k} differs by {d_head.item()} (relative)"
            assert torch.equal(ref["generation"], got["generation"]), "ilql: shifted greedy decoding differs"
        d_out = (ref["outputs"] - got["outputs"]).abs().max().item()
        assert d_out <= tol, f"{role}: forward outputs differ by {d_out}"
        steps = zip(ref.get("steps", [ref["metrics"]]), got.get("steps", [got["metrics"]]))
        d_metrics = max(abs(a[k] - b[k]) for a, b in steps for k in a if k not in DISCRETE)
        assert d_metrics <= tol, f"{role}: metrics differ by {d_metrics}: {ref['metrics']} vs {got['metrics']}"

        w_ref, w_got = _weights(role, workdir / "ref" / role / "after"), _weights(role, workdir / layout / role / "after")
        assert w_ref.keys() == w_got.keys() == init.keys()
        d_w = max((w_ref[k] - w_got[k]).abs().max().item() for k in w_ref)
        assert d_w <= tol, f"{role}: weights after the step differ by {d_w}"
        frozen_prefixes = FROZEN_PREFIXES + (() if role in SCALAR_HEAD_ROLES else ("output_layer.",))
        frozen = [k for k in init if k.startswith(frozen_prefixes)]
        assert any(k.startswith("decoder.layers.1.") for k in frozen)
        for k in frozen:
            assert torch.equal(w_ref[k], init[k]) and torch.equal(w_got[k], init[k]), f"{role}: frozen {k} changed"
        trained_prefixes = ("decoder.layers.3.", "decoder.final_layernorm.") + (
            ("output_layer.",) if role in SCALAR_HEAD_ROLES else ())
        # (the Bradley-Terry loss depends on score differences only: the reward head's bias gets no gradient)
        trained = [k for k in init if k.startswith(trained_prefixes) and not (role == "rm" and k == "output_layer.bias")]
        assert trained and all(not torch.equal(w_got[k], init[k]) for k in trained), f"{role}: top layers did not train"
    ppo = torch.load(workdir / layout / "ppo" / "result.pt", weights_only=False)
    assert ppo["steps"][-1]["kl"] > 0.0  # the second rollout is scored against a reference it moved away from
