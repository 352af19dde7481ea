"""nemo_rlhf/models/hydra.py: the hydra reference policy (the actor's frozen trunk + a frozen copy
of its initial top k layers, final norm and LM head) against a full frozen copy of the initial
policy, at TP = PP = 1 on the tiny GPT; and through the PPO trainer (algorithms/ppo.py).
The PP = 2 case runs in tests/multiprocess/test_frozen_parity.py.
"""

from __future__ import annotations

import pytest
import torch

from nemo_rlhf.algorithms.sft import sft_loss
from nemo_rlhf.models.hydra import HydraReference
from nemo_rlhf.models.policy import GPTPolicyModel, shift_labels

B, S = 4, 16
TOL = 1e-5


def _actor_and_full_reference(build, tiny, k, tied, model_cfg=None):
    cfg = {"num_layers_unfrozen": k, "share_embeddings_and_output_weights": tied, **(model_cfg or {})}
    actor = build(GPTPolicyModel, model_cfg=cfg, optim_cfg=dict(tiny.optim, lr=1e-2), micro_batch_size=2,
                  eos_id=tiny.eos_id, pad_id=tiny.pad_id)
    full = build(GPTPolicyModel, model_cfg=cfg, micro_batch_size=2, eos_id=tiny.eos_id, pad_id=tiny.pad_id)
    full.gpt.load_state_dict(actor.gpt.state_dict())  # the initial policy, frozen
    return actor, full


def _train(actor, tiny, steps=3):
    tokens = tiny.tokens(B, S, seed=3)
    mask = torch.zeros(B, S)
    mask[:, 5:] = 1.0
    labels, label_mask = shift_labels(tokens, mask, tiny.pad_id)
    for _ in range(steps):
        assert actor.train_on(sft_loss, {"tokens": tokens, "labels": labels, "label_mask": label_mask})["skipped"] == 0


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


@pytest.mark.parametrize("k, tied", [(1, True), (2, True), (0, True), (1, False), (0, False)])
def test_hydra_logprobs_equal_full_frozen_copy(build, tiny, k, tied):
    actor, full = _actor_and_full_reference(build, tiny, k, tied)
    hydra = HydraReference(actor)  # branch copied from the initial actor
    _train(actor, tiny)  # the actor moves away from the reference
    tokens = tiny.tokens(B, S, seed=11)

    actor_lp, ref_lp = hydra.actor_and_reference_logprobs(tokens)
    want_ref = full.logprobs(tokens)
    want_actor = actor.logprobs(tokens)
    assert ref_lp.shape == (B, S - 1) and ref_lp.dtype == torch.float32
    d_ref = (ref_lp - want_ref).abs().max().item()
    print(f"\nk={k} tied={tied}: max |hydra - full reference| log-prob = {d_ref:.3g}")
    assert d_ref <= TOL, f"hydra reference log-probs differ from the full copy's by {d_ref}"
    assert torch.equal(actor_lp, want_actor)  # the same forward as GPTPolicyModel.logprobs
    assert (actor_lp - ref_lp).abs().max().item() > 1e-3  # the actor really moved: not a trivial equality
    torch.testing.assert_close(hydra.logprobs(tokens), ref_lp, atol=0, rtol=0)


def test_hydra_reference_parameter_memory(build, tiny):
    """One trunk instead of two: bytes of actor + reference parameters, full copy vs hydra branch."""
    k = 1
    for tied in (True, False):
        actor, full = _actor_and_full_reference(build, tiny, k, tied)
        hydra = HydraReference(actor)
        gpt = actor.gpt
        actor_bytes, full_bytes, branch_bytes = _bytes(gpt.parameters()), _bytes(full.gpt.parameters()), hydra.parameter_bytes()
        # the branch: the top k layers, the final norm, and the LM head unless it is the tied embedding
        want = _bytes(gpt.decoder.layers[-k:].parameters()) + _bytes(gpt.decoder.final_layernorm.parameters())
        if not tied:
            want += _bytes(gpt.output_layer.parameters())
        assert branch_bytes == want
        assert full_bytes == actor_bytes
        print(f"\ntiny GPT (2 layers, H=32, V=128, fp32), num_layers_unfrozen={k}, tied={tied}: actor {actor_bytes} B; "
              f"actor + full reference {actor_bytes + full_bytes} B; actor + hydra reference "
              f"{actor_bytes + branch_bytes} B ({branch_bytes} B for the branch)")
        assert actor_bytes + branch_bytes < actor_bytes + full_bytes


def test_hydra_trunk_runs_once_per_micro_batch(build, tiny):
    actor, _ = _actor_and_full_reference(build, tiny, 1, True)
    hydra = HydraReference(actor)
    calls = {"trunk": 0, "actor_top": 0, "branch": 0}
    hooks = [actor.gpt.decoder.layers[0].register_forward_hook(lambda *a: calls.__setitem__("trunk", calls["trunk"] + 1)),
             actor.gpt.decoder.layers[1].register_forward_hook(
                 lambda *a: calls.__setitem__("actor_top", calls["actor_top"] + 1)),
             hydra.branch.layers[0].register_forward_hook(lambda *a: calls.__setitem__("branch", calls["branch"] + 1))]
    try:
        hydra.actor_and_reference_logprobs(tiny.tokens(B, S, seed=2))  # 2 micro-batches of 2
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"trunk": 2, "actor_top": 2, "branch": 2}


def test_building_the_branch_leaves_the_rng_streams_alone(build, tiny):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    actor, _ = _actor_and_full_reference(build, tiny, 2, False)
    cpu = torch.get_rng_state()
    tracker = {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}
    HydraReference(actor)
    assert torch.equal(torch.get_rng_state(), cpu)
    after = get_cuda_rng_tracker().get_states()
    assert after.keys() == tracker.keys() and all(torch.equal(after[k], v) for k, v in tracker.items())


def test_hydra_needs_a_frozen_trunk(build, tiny):
    actor, _ = _actor_and_full_reference(build, tiny, -1, True)
    with pytest.raises(ValueError, match=r"model.num_layers_unfrozen >= 0 \(got -1\)"):
        HydraReference(actor)


def test_ppo_config_hydra_checks():
    from nemo_rlhf.config import ConfigError, PPOActorStageConfig, parse_config

    base = {"init_from": "x", "tokenizer": {"path": "t"}}
    with pytest.raises(ConfigError, match=r"ppo.reference=hydra .* model.num_layers_unfrozen >= 0 \(got -1"):
        parse_config(PPOActorStageConfig, {**base, "ppo": {"reference": "hydra"}})
    with pytest.raises(ConfigError, match=r"model.num_layers_unfrozen=3 > the 2 layers of the last stage"):
        parse_config(PPOActorStageConfig, {**base, "ppo": {"reference": "hydra"},
                                           "model": {"num_layers": 4, "num_layers_unfrozen": 3,
                                                     "pipeline_model_parallel_size": 2}})
    with pytest.raises(ConfigError, match=r"ppo.reference must be one of \['full', 'hydra'.*\], got 'copy'"):
        parse_config(PPOActorStageConfig, {**base, "ppo": {"reference": "copy"}})
    with pytest.raises(ConfigError, match=r"ppo.reference_offload"):
        parse_config(PPOActorStageConfig, {**base, "ppo": {"reference": "hydra", "reference_offload": True},
                                           "model": {"num_layers_unfrozen": 1}})
    ok = parse_config(PPOActorStageConfig, {**base, "ppo": {"reference": "hydra"}, "model": {"num_layers_unfrozen": 1}})
    assert ok.ppo.reference == "hydra"


def test_ppo_steps_with_hydra_reference_equal_full_reference(build, tiny, tmp_path):
    """Two whole PPO steps (rollout, in-process critic and reward model, KL, GAE, updates): a hydra
    reference gives the same metrics and the same actor as a full frozen copy of the initial policy."""
    from nemo_rlhf.algorithms.ppo import PPOTrainer
    from nemo_rlhf.config import PPOActorStageConfig, parse_config
    from nemo_rlhf.models.critic import GPTCriticModel
    from nemo_rlhf.models.reward_model import GPTRewardModel
    from nemo_rlhf.servers.local import LocalCriticClient
    from nemo_rlhf.servers.megatron_backend import MegatronCriticBackend

    model_cfg = {"num_layers_unfrozen": 1}
    cfg = parse_config(PPOActorStageConfig, {
        "run_dir": str(tmp_path), "init_from": "unused", "tokenizer": {"path": "unused"},
        "batch": {"global_batch_size": 4, "micro_batch_size": 2},
        "ppo": {"ppo_epochs": 1, "num_minibatches": 2, "kl_controller": {"type": "fixed", "init_kl_coef": 0.1},
                "sampling": {"max_new_tokens": 6}, "seed": 3}})
    init = {}
    results = {}
    for reference in ("full", "hydra"):
        critic = build(GPTCriticModel, seed=5, optim_cfg=tiny.optim, micro_batch_size=2)
        rm = build(GPTRewardModel, seed=6, micro_batch_size=2)
        actor = build(GPTPolicyModel, seed=7, model_cfg=model_cfg, optim_cfg=dict(tiny.optim, lr=1e-2),
                      micro_batch_size=2, eos_id=tiny.eos_id, pad_id=tiny.pad_id)
        if not init:
            init = {"actor": actor.gpt.state_dict(), "critic": critic.gpt.state_dict(), "rm": rm.gpt.state_dict()}
            init = {k: {n: t.clone() if torch.is_tensor(t) else t for n, t in v.items()} for k, v in init.items()}
        actor.gpt.load_state_dict(init["actor"])
        critic.gpt.load_state_dict(init["critic"])
        rm.gpt.load_state_dict(init["rm"])
        if reference == "hydra":
            ref = HydraReference(actor)
        else:
            ref = build(GPTPolicyModel, model_cfg=model_cfg, micro_batch_size=2, eos_id=tiny.eos_id, pad_id=tiny.pad_id)
            ref.gpt.load_state_dict(init["actor"])
        backend = MegatronCriticBackend(critic, rm, max_seq_len=64, save_fn=lambda p: None)
        trainer = PPOTrainer.from_models(cfg, actor, ref, LocalCriticClient(backend))
        steps = []
        for step in range(2):
            prompts = tiny.tokens(4, 5, seed=20 + step)
            steps.append(trainer.train_step({"prompts": prompts, "prompt_lengths": torch.tensor([5, 3, 4, 2])}))
            trainer.step += 1
        results[reference] = (steps, actor.logprobs(tiny.tokens(B, S, seed=9)))
    (full_steps, full_lp), (hydra_steps, hydra_lp) = results["full"], results["hydra"]
    assert full_steps[1]["kl"] != 0.0  # the second rollout has a real KL to the reference
    for a, b in zip(full_steps, hydra_steps):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], abs=TOL), (key, a[key], b[key])
    assert (full_lp - hydra_lp).abs().max().item() <= TOL
