"""Layout-parity runner: every model role on a fixed batch, in whatever TP x PP x DP layout it runs.

Run it once in the reference layout (one process) with ``--save-init`` and then under
``torchrun`` in any other layout; compare the ``result.pt`` files and the ``after`` checkpoints::

    python tools/parity.py --out ref --init init --save-init
    python -m torch.distributed.run --nproc-per-node 4 tools/parity.py \\
        --tp 2 --pp 2 --sp --out tp2pp2 --init init

The ``grpo``, ``rloo`` and ``reinforce_pp`` roles (not run by default: ``--roles``) take two whole steps of
:class:`~nemo_rlhf.algorithms.critic_free.CriticFreeTrainer` (GRPO with a k3 KL term to a frozen
reference; RLOO with the sequence KL in the reward and its leave-one-out baseline; REINFORCE++ with
the KL in the token rewards and DP-whitened returns): groups of 4
sampled responses per prompt, rewarded by :func:`even_token_reward`. The ``ilql`` role (not run by
default either) takes two ILQL steps of :class:`~nemo_rlhf.algorithms.ilql.ILQLTrainer` on a fixed
offline batch (a Polyak target sync after each) from its own initial weights (trunk and heads), and
records the step metrics, then the log-probs and the heads' outputs (Q, target Q over the whole
vocabulary, V) on the full batch and greedy ILQL decoding at beta 4 and 0; ILQL samples nothing in a step, so every layout, DP included,
must match one process.

For each role (``sft``, ``rm``, ``critic``, ``actor``) it loads the same initial weights (a
dist-checkpoint, resharded to this layout), records forward outputs on the full fixed batch
(SFT per-token NLL, reward-model scores, critic values, actor log-probs and entropy), takes one
optimizer step on this DP rank's share of the global batch (several micro-batches), records the
averaged loss, saves the updated weights (``<out>/<role>/after``) and, for the actor, greedy
generation from prompts of different lengths. Global rank 0 writes ``<out>/<role>/result.pt``.
It is the tool behind ``tests/parallel`` and a quick check of a new cluster layout.

``--num-layers-unfrozen k`` trains every role with ``model.num_layers_unfrozen=k`` (frozen
embeddings and bottom layers; at PP=2 with k=2 the whole first stage is frozen), and
``--reference hydra`` gives the ``ppo`` and ``dpo`` roles a hydra reference policy (``models/hydra.py``)
instead of a full frozen copy (needs k >= 0; DPO's first step then runs the branch inside the
policy's training forward, ``dpo.reference=hydra``); the ``ppo`` role records the reference policy's log-probs on
the full fixed batch before its steps (``reference``: equal in every layout, DP included). ``--lora`` puts LoRA adapters (:data:`LORA`) on every
role, with random non-zero B in the initial weights (``tests/multiprocess/test_lora_tp.py``).
``--ilql-q-head lm_head`` gives the ``ilql`` role Q heads read through the LM head's output matrix
(``ilql.q_head``; ``tests/multiprocess/test_frozen_parity.py``).

The ``dpo`` and ``rs`` roles (not run by default: ``--roles``) start from the ``actor`` initial weights.
``dpo``: two steps of :class:`~nemo_rlhf.algorithms.dpo.DPOTrainer` (sigmoid loss, beta 0.5) on the
fixed preference pairs of :func:`dpo_pairs`, the first against the frozen reference run on the batch
(``dpo.reference=full``), the second with reference log-probs computed once on the whole batch
(``precomputed``); it records the DPO metrics of both steps, the precomputed reference values and
the policy's log-probs after the steps; DPO samples nothing, so every layout, DP included, must
match one process. ``rs``: one round of
:class:`~nemo_rlhf.algorithms.rejection_sampling.RejectionSamplingTrainer` (4 samples per fixed
prompt, :func:`even_token_reward`, best-of-4 kept, two SFT steps on the kept samples): it records
the samples (token ids, rewards, kept flags), the round's metrics, the SFT step metrics and the
log-probs after; each DP rank samples its own prompts, so only TP/PP layouts can match one process.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

ROLES = ("sft", "rm", "critic", "actor", "ppo")
# The critic-free trainers (``--roles ...,grpo,reinforce_pp``): two whole steps each from the actor's
# initial weights, rewarded by :func:`even_token_reward` (a reward function on decoded texts).
CRITIC_FREE_ROLES = ("grpo", "rloo", "reinforce_pp")
# ILQL (``--roles ...,ilql``): two offline steps of the ILQL trainer, heads on the policy's trunk.
ILQL_ROLE = "ilql"
VOCAB = 100
# Llama-like (RMSNorm, SwiGLU, RoPE, GQA) with tied embeddings, 4 layers: divisible by TP 2 and
# PP 2 and 4. make_vocab_size_divisible_by=64 pads vocab 100 to 128 for TP 1 and TP 2 alike.
MODEL = dict(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=64, max_position_embeddings=64, make_vocab_size_divisible_by=64,
             normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
             init_method_std=0.2, share_embeddings_and_output_weights=True)
# Plain SGD with clipping: the weights after one step then differ exactly as the gradients do.
# (Adam's first step is ~lr * sign(g): near-zero gradients whose sign flips with 1e-9 of
# reduction-order noise move a weight by 2 * lr, which says nothing about the layout.)
OPTIM = dict(optimizer="sgd", lr=1.0, clip_grad=1.0, weight_decay=0.0)
GLOBAL_BATCH, SEQ, MICRO_BATCH = 8, 16, 2
# --lora: adapters on every attention/MLP linear; the scalar heads of rm/critic train with them.
LORA = dict(rank=4, alpha=8.0)
# Preference and best-of-n roles (issue 14 §4; ``--roles ...,dpo,rs``): policy (and reference) from ``actor``.
DPO_ROLE, RS_ROLE = "dpo", "rs"


def with_lora(model_cfg: dict[str, Any], role: str) -> dict[str, Any]:
    """``model_cfg`` with LoRA adapters (:data:`LORA`; ``train_head`` for the scalar-head roles)."""
    return dict(model_cfg, lora=dict(LORA, train_head=role in ("rm", "critic")))


def randomize_adapters(model, seed: int = 7, std: float = 0.1) -> None:
    """Non-zero B for the reference run's initial weights (B = 0 would make the adapters invisible
    in the forward outputs); call in one process, before saving them."""
    from nemo_rlhf.models.lora import adapter_parameters

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter_parameters(model):
            if name.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def fixed_data(seed: int = 0) -> dict[str, torch.Tensor]:
    """The fixed inputs, identical in every layout (CPU tensors from a seeded generator)."""
    g = torch.Generator().manual_seed(seed)
    b, s = GLOBAL_BATCH, SEQ
    tokens = torch.randint(2, VOCAB, (b, s), generator=g)
    prompt = torch.randint(2, 8, (b,), generator=g)
    cols = torch.arange(s).unsqueeze(0)
    loss_mask = (cols >= prompt.unsqueeze(1)).float()
    lengths = torch.randint(s // 2, s + 1, (b,), generator=g)
    rejected = torch.randint(2, VOCAB, (b, s), generator=g)
    mask = ((cols >= prompt.unsqueeze(1) - 1) & (cols < s - 1)).float()
    return {
        "tokens": tokens, "loss_mask": loss_mask, "lengths": lengths, "rejected": rejected,
        "returns": torch.randn(b, s, generator=g), "prev_values": 0.1 * torch.randn(b, s, generator=g),
        "mask": mask, "advantages": torch.randn(b, s - 1, generator=g),
        "logprob_noise": 0.05 * torch.randn(b, s - 1, generator=g),
        "prompts": torch.randint(2, VOCAB, (4, 6), generator=g), "prompt_lengths": torch.tensor([6, 3, 5, 4]),
    }


def _dp_slice(x: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    n = x.shape[0] // dp
    return x[rank * n : (rank + 1) * n]


def build_role(role: str, model_cfg: dict[str, Any], optim_cfg: dict[str, Any] | None, reference: str = "full",
               ilql_q_head: str = "mlp"):
    """A trainable model of ``role`` with the parity model and vocabulary (``ppo``: a
    :class:`~nemo_rlhf.algorithms.ppo.PPOTrainer` holding all four models, its reference policy
    ``full`` or ``hydra``; ``ilql``: its Q heads ``ilql_q_head``, ``mlp`` or ``lm_head``)."""
    from nemo_rlhf.models.critic import GPTCriticModel
    from nemo_rlhf.models.policy import GPTPolicyModel
    from nemo_rlhf.models.reward_model import GPTRewardModel

    if role == DPO_ROLE:
        return build_dpo(model_cfg, optim_cfg, reference)
    if role == RS_ROLE:
        return build_rs(model_cfg, optim_cfg)
    if role in ("sft", "actor"):
        return GPTPolicyModel(model_cfg, optim_cfg, VOCAB, MICRO_BATCH, eos_id=1, pad_id=0)
    if role == "rm":
        return GPTRewardModel(model_cfg, optim_cfg, VOCAB, MICRO_BATCH)
    if role == "critic":
        return GPTCriticModel(model_cfg, optim_cfg, VOCAB, MICRO_BATCH)
    if role == "ppo":
        return build_ppo(model_cfg, optim_cfg, reference)
    if role in CRITIC_FREE_ROLES:
        return build_critic_free(role, model_cfg, optim_cfg)
    if role == ILQL_ROLE:
        from nemo_rlhf.models.ilql import GPTILQLModel

        return GPTILQLModel(model_cfg, optim_cfg, VOCAB, MICRO_BATCH, eos_id=1, pad_id=0, q_head=ilql_q_head)
    raise ValueError(f"unknown role {role!r}; roles: {ROLES + CRITIC_FREE_ROLES + (ILQL_ROLE, DPO_ROLE, RS_ROLE)}")


class DigitTokenizer:
    """The parity vocabulary's "tokenizer" for reward functions: token ids written as numbers."""

    eos_id, pad_id = 1, 0

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


def even_token_reward(prompts, responses):
    """``[B]``: the fraction of even token ids in each response (0 for an empty one)."""
    out = []
    for r in responses:
        ids = [int(t) for t in r.split()]
        out.append(sum(i % 2 == 0 for i in ids) / len(ids) if ids else 0.0)
    return out


def build_critic_free(algorithm: str, model_cfg: dict[str, Any], optim_cfg: dict[str, Any] | None):
    """A :class:`~nemo_rlhf.algorithms.critic_free.CriticFreeTrainer` of ``algorithm`` with its
    policy and frozen reference in this layout (weights loaded by :func:`load_critic_free`)."""
    from nemo_rlhf.algorithms.critic_free import trainer_class
    from nemo_rlhf.config import GRPOStageConfig, parse_config
    from nemo_rlhf.models.policy import GPTPolicyModel

    kl = {"beta": 0.05} if algorithm == "grpo" else {"kl_coef": 0.05}  # rloo: KL(sequence) in the reward
    cfg = parse_config(GRPOStageConfig, {
        "run_dir": ".", "init_from": "init/actor", "tokenizer": {"path": "unused"},
        "batch": {"global_batch_size": GLOBAL_BATCH, "micro_batch_size": MICRO_BATCH},
        "reward": {"functions": [{"_target_": "tools.parity.even_token_reward"}]},
        "grpo": {"algorithm": algorithm, "num_generations": 4, "num_minibatches": 2, "seed": 5, **kl,
                 "sampling": {"max_new_tokens": 6}}})
    policy = GPTPolicyModel(model_cfg, optim_cfg, VOCAB, MICRO_BATCH, eos_id=1, pad_id=0)
    reference = GPTPolicyModel(model_cfg, None, VOCAB, MICRO_BATCH, eos_id=1, pad_id=0)
    trainer = trainer_class(algorithm).from_models(cfg, policy, reference, DigitTokenizer(),
                                                    reward_fn=_even_token_reward_sum())
    trainer.gpt = policy.gpt  # what main() saves after the steps
    return trainer


def _even_token_reward_sum():
    from nemo_rlhf.rewards.functions import RewardFunction, RewardSum

    return RewardSum([RewardFunction(even_token_reward, name="tools.parity.even_token_reward")])


def load_critic_free(trainer, init: Path) -> None:
    """Policy and reference from the ``actor`` weights."""
    from nemo_rlhf.checkpoint.weights import load_weights

    load_weights(trainer.policy, init / "actor")
    load_weights(trainer.reference, init / "actor")


def ilql_trainer(model):
    """An :class:`~nemo_rlhf.algorithms.ilql.ILQLTrainer` around the ``ilql`` role's model: a target
    sync after every step at ``alpha`` 0.5 (so the second step's value loss reads moved targets),
    AWAC weighted (``awac_beta`` 0.5) to exercise every term."""
    from nemo_rlhf.algorithms.ilql import ILQLTrainer
    from nemo_rlhf.config import ILQLStageConfig, parse_config

    cfg = parse_config(ILQLStageConfig, {
        "run_dir": ".", "tokenizer": {"path": "unused"},
        "data": {"dataset": "jsonl", "files": ["unused.jsonl"], "heldout_files": ["unused.jsonl"]},
        "batch": {"global_batch_size": GLOBAL_BATCH, "micro_batch_size": MICRO_BATCH},
        "reward": {"functions": [{"_target_": "tools.parity.even_token_reward"}]},
        "ilql": {"steps_for_target_q_sync": 1, "alpha": 0.5, "awac_beta": 0.5}})
    return ILQLTrainer.from_models(cfg, model, DigitTokenizer(), None, None, reward_fn=_even_token_reward_sum())


def ilql_head_outputs(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The heads of a :class:`~nemo_rlhf.models.ilql.GPTILQLModel` on ``tokens [B, S]`` (forward
    only), on every rank: ``q1``, ``target_q1`` (``q2``, ``target_q2``) ``[B, S, V]`` (the padded
    vocabulary, gathered over TP) and ``v [B, S]``."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from nemo_rlhf.models.megatron_module import split_microbatches
    from nemo_rlhf.models.pipeline_utils import broadcast_from_last_stage

    model.model.eval()
    names = ["q1", "q2"][: 2 if model._ilql_options[0] else 1]

    def loss_fn(mb, logits, heads):
        qs, tqs, v = heads
        out = {"v": v}
        for name, q, t in zip(names, qs, tqs):
            out[name] = gather_from_tensor_model_parallel_region(q.detach())
            out[f"target_{name}"] = gather_from_tensor_model_parallel_region(t)
        return logits.sum() * 0, out

    with torch.no_grad(), model.capturing_hidden():
        outs = model.forward_backward(split_microbatches({"tokens": tokens}, MICRO_BATCH), model.forward_step,
                                      model._with_heads(loss_fn, target_at_actions=False), forward_only=True)
    b, s = tokens.shape
    shapes = {"v": (b, s), **{k: (b, s, model.gpt.vocab_size) for n in names for k in (n, f"target_{n}")}}
    return {k: broadcast_from_last_stage(torch.cat([o[k] for o in outs]) if outs else None, shape, torch.float32)
            for k, shape in shapes.items()}


def build_ppo(model_cfg: dict[str, Any], optim_cfg: dict[str, Any] | None, reference: str = "full"):
    """A PPO trainer with its policy, reference policy and an in-process critic + reward model, all
    in this layout (weights are loaded by :func:`load_ppo`; a ``hydra`` reference is built there,
    from the loaded policy)."""
    from nemo_rlhf.algorithms.ppo import PPOTrainer
    from nemo_rlhf.config import PPOActorStageConfig, parse_config
    from nemo_rlhf.models.critic import GPTCriticModel
    from nemo_rlhf.models.policy import GPTPolicyModel
    from nemo_rlhf.models.reward_model import GPTRewardModel
    from nemo_rlhf.servers.local import LocalCriticClient
    from nemo_rlhf.servers.megatron_backend import MegatronCriticBackend

    critic = GPTCriticModel(model_cfg, optim_cfg, VOCAB, MICRO_BATCH)
    rm = GPTRewardModel(model_cfg, None, VOCAB, MICRO_BATCH)
    backend = MegatronCriticBackend(critic, rm, int(MODEL["max_position_embeddings"]), lambda path: None,
                                    value_clip=0.2)
    reference = GPTPolicyModel(model_cfg, None, VOCAB, MICRO_BATCH, eos_id=1, pad_id=0) if reference == "full" else None
    cfg = parse_config(PPOActorStageConfig, {
        "run_dir": ".", "init_from": "init/actor", "tokenizer": {"path": "unused"},
        "batch": {"global_batch_size": GLOBAL_BATCH, "micro_batch_size": MICRO_BATCH},
        "ppo": {"ppo_epochs": 1, "num_minibatches": 2, "entropy_coef": 0.01, "seed": 5,
                "kl_controller": {"type": "fixed", "init_kl_coef": 0.05}, "sampling": {"max_new_tokens": 6}}})
    policy = GPTPolicyModel(model_cfg, optim_cfg, VOCAB, MICRO_BATCH, eos_id=1, pad_id=0)
    trainer = PPOTrainer.from_models(cfg, policy, reference, LocalCriticClient(backend))
    trainer.parity_parts = (reference, critic, rm)
    trainer.gpt = trainer.policy.gpt  # what main() saves after the steps
    return trainer


def load_ppo(trainer, init: Path) -> None:
    """Policy and reference from the ``actor`` weights, critic and reward model from ``critic``/``rm``."""
    from nemo_rlhf.checkpoint.weights import load_weights

    from nemo_rlhf.models.hydra import HydraReference

    reference, critic, rm = trainer.parity_parts
    load_weights(trainer.policy, init / "actor")
    if reference is None:  # hydra: the branch copies the loaded policy's top layers
        trainer.reference = HydraReference(trainer.policy)
    else:
        load_weights(reference, init / "actor")
    load_weights(critic, init / "critic")
    load_weights(rm, init / "rm")


def dpo_pairs(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fixed preference pairs of the ``dpo`` role, in :func:`~nemo_rlhf.data.collate_preference`'s
    layout: ``tokens [2B, S]`` int64 (the B chosen rows = ``data["tokens"]``, then B rejected rows: the
    same prompt followed by ``data["rejected"]``'s tokens), ``prompt_lengths [2B]`` (the prompt of
    ``loss_mask``, 2..7 tokens) and ``lengths [2B]`` (``data["lengths"]`` for the chosen rows, the same
    rolled by one for the rejected rows; 8..16 tokens, every response non-empty)."""
    chosen = data["tokens"]
    prompt = (data["loss_mask"] == 0).sum(dim=1)
    cols = torch.arange(chosen.shape[1]).unsqueeze(0)
    rejected = torch.where(cols < prompt.unsqueeze(1), chosen, data["rejected"])
    return {"tokens": torch.cat([chosen, rejected]), "prompt_lengths": torch.cat([prompt, prompt]),
            "lengths": torch.cat([data["lengths"], data["lengths"].roll(1)])}


def _dp_pairs(pairs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This DP rank's share of :func:`dpo_pairs` (its chosen rows, then their rejected rows)."""
    out = {}
    for k, v in pairs.items():
        b = v.shape[0] // 2
        out[k] = torch.cat([_dp_slice(v[:b]), _dp_slice(v[b:])])
    return out


def build_dpo(model_cfg: dict[str, Any], optim_cfg: dict[str, Any] | None, reference: str = "full"):
    """A :class:`~nemo_rlhf.algorithms.dpo.DPOTrainer` (sigmoid loss, beta 0.5) with its policy and
    frozen reference (``full`` or ``hydra``) in this layout, without
    :meth:`~nemo_rlhf.algorithms.dpo.DPOTrainer.setup` (no data set: :func:`run_role` feeds
    :func:`dpo_pairs`); weights loaded by :func:`load_from_actor`."""
    from nemo_rlhf.algorithms.dpo import DPOTrainer, dpo_loss_fn
    from nemo_rlhf.config import DPOStageConfig, parse_config
    from nemo_rlhf.models.hydra import HydraReference
    from nemo_rlhf.models.policy import GPTPolicyModel

    cfg = parse_config(DPOStageConfig, {
        "run_dir": ".", "init_from": "init/actor", "tokenizer": {"path": "unused"},
        "batch": {"global_batch_size": GLOBAL_BATCH, "micro_batch_size": MICRO_BATCH}, "dpo": {"beta": 0.5}})
    trainer = DPOTrainer(cfg)
    trainer.model = GPTPolicyModel(model_cfg, optim_cfg, VOCAB, MICRO_BATCH, eos_id=1, pad_id=0)
    if reference == "hydra":  # the branch is copied from the policy by load_from_actor
        trainer.reference = HydraReference(trainer.model)
        trainer.loss_fn = dpo_loss_fn(trainer.model, cfg.dpo, trainer.reference)
    else:
        trainer.reference = GPTPolicyModel(model_cfg, None, VOCAB, MICRO_BATCH, eos_id=1, pad_id=0)
        trainer.loss_fn = dpo_loss_fn(trainer.model, cfg.dpo)
    trainer.policy = trainer.model
    trainer.gpt = trainer.model.gpt  # what main() saves after the steps
    return trainer


class FixedPrompts(torch.utils.data.Dataset):
    """:class:`~nemo_rlhf.data.PromptDataset` items of ``prompts [N, P]`` cut at ``prompt_lengths [N]``."""

    def __init__(self, prompts: torch.Tensor, prompt_lengths: torch.Tensor):
        self.items = [{"prompt": p[: int(n)].clone(), "prompt_length": n.clone()}
                      for p, n in zip(prompts, prompt_lengths)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return self.items[idx]


def build_rs(model_cfg: dict[str, Any], optim_cfg: dict[str, Any] | None):
    """A :class:`~nemo_rlhf.algorithms.rejection_sampling.RejectionSamplingTrainer` around a policy in
    this layout (weights loaded by :func:`load_from_actor`): 4 samples per prompt (seed 5, up to 6 new
    tokens), best-of-4 by :func:`even_token_reward`; prompts set by :func:`run_role`."""
    from nemo_rlhf.algorithms.rejection_sampling import RejectionSamplingTrainer
    from nemo_rlhf.config import RejectionSamplingStageConfig, parse_config
    from nemo_rlhf.models.policy import GPTPolicyModel

    cfg = parse_config(RejectionSamplingStageConfig, {
        "run_dir": ".", "init_from": "init/actor", "tokenizer": {"path": "unused"},
        "data": {"dataset": "jsonl", "files": ["unused.jsonl"], "heldout_files": ["unused.jsonl"]},
        "batch": {"global_batch_size": GLOBAL_BATCH, "micro_batch_size": MICRO_BATCH},
        "reward": {"functions": [{"_target_": "tools.parity.even_token_reward"}]},
        "rs": {"num_samples": 4, "prompts_per_round": 4, "generation_batch_size": 8, "seed": 5,
               "sampling": {"max_new_tokens": 6}, "best_of_n": {"enabled": False}}})
    policy = GPTPolicyModel(model_cfg, optim_cfg, VOCAB, MICRO_BATCH, eos_id=1, pad_id=0)
    trainer = RejectionSamplingTrainer.from_models(cfg, policy, DigitTokenizer(), None, None,
                                                   reward_fn=_even_token_reward_sum())
    trainer.gpt = policy.gpt  # what main() saves after the steps
    return trainer


def load_from_actor(trainer, init: Path) -> None:
    """The ``dpo`` / ``rs`` trainer's policy (and DPO's reference) from the ``actor`` weights."""
    from nemo_rlhf.checkpoint.weights import load_weights
    from nemo_rlhf.models.hydra import HydraReference

    load_weights(trainer.policy, init / "actor")
    reference = getattr(trainer, "reference", None)
    if isinstance(reference, HydraReference):
        reference.copy_from_actor()
    elif reference is not None:
        load_weights(reference, init / "actor")


def _run_dpo(trainer, data: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Two DPO steps on :func:`dpo_pairs` (this DP rank's share): reference run per batch, then
    precomputed on the whole batch."""
    pairs = dpo_pairs(data)
    steps = [trainer.train_step(_dp_pairs(pairs))]  # dpo.reference=full: the reference runs on the shard
    trainer.step += 1
    ref = trainer.reference_logps(pairs)  # dpo.reference=precomputed: once, on every pair, [2B]
    steps.append(trainer.train_step(_dp_pairs({**pairs, "ref_logps": ref})))
    trainer.step += 1
    return {"metrics": steps[-1], "steps": steps, "ref_logps": ref,
            "outputs": trainer.model.logprobs(data["tokens"])}  # the policy after two steps


def _run_rs(trainer, data: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One rejection-sampling round: sample and select (each DP rank its share of the 4 prompts),
    gather, two SFT steps on the kept samples (the global batch of :class:`KeptSamples`, this DP
    rank's share)."""
    from nemo_rlhf.algorithms.rejection_sampling import KeptSamples, _gather_rows

    trainer.train_ds = trainer.val_ds = FixedPrompts(data["prompts"], data["prompt_lengths"])
    rows = _gather_rows(trainer.generate_round(0))
    kept = [r for r in rows if r["kept"]]
    items = KeptSamples(kept, min_size=GLOBAL_BATCH)
    batch = trainer.sft_collate([items[i] for i in range(GLOBAL_BATCH)])
    steps = []
    for _ in range(2):
        steps.append(trainer.train_step({k: _dp_slice(batch[k]) for k in ("tokens", "loss_mask")}))
        trainer.step += 1
    return {"metrics": {**trainer.sample_metrics(rows, int(trainer.cfg.rs.num_samples)), **steps[-1]},
            "steps": steps, "samples": [{k: r[k] for k in ("prompt_index", "sample", "prompt_ids", "response_ids",
                                                              "reward", "kept")} for r in rows],
            "round_metrics": trainer.sample_metrics(rows, int(trainer.cfg.rs.num_samples)),
            "outputs": trainer.policy.logprobs(data["tokens"])}  # the policy after the round's SFT


def run_role(role: str, model, data: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Forward outputs on the full batch, then one optimizer step on this DP rank's share."""
    from nemo_rlhf.algorithms.ppo import ppo_loss_fn
    from nemo_rlhf.algorithms.reward_model import bradley_terry_step_loss, pair_microbatches
    from nemo_rlhf.algorithms.sft import sft_loss
    from nemo_rlhf.generation.sampling import SamplingParams
    from nemo_rlhf.models.megatron_module import split_microbatches
    from nemo_rlhf.models.pipeline_utils import broadcast_from_last_stage
    from nemo_rlhf.models.policy import shift_labels
    from nemo_rlhf.models.vocab_parallel import vocab_parallel_entropy
    from nemo_rlhf.servers.megatron_backend import critic_loss_fn

    out: dict[str, Any] = {}
    tokens = data["tokens"]
    if role == "sft":
        labels, label_mask = shift_labels(tokens, data["loss_mask"], 0)
        batch = {"tokens": tokens, "labels": labels, "label_mask": label_mask}
        nll = model.forward_backward(split_microbatches(batch, MICRO_BATCH), model.forward_step,
                                     lambda mb, o: (o.sum() * 0, {"nll": o.float()}), forward_only=True)
        out["outputs"] = broadcast_from_last_stage(torch.cat([o["nll"] for o in nll]) if nll else None,
                                                   tuple(tokens.shape), torch.float32)
        out["metrics"] = model.train_on(sft_loss, {k: _dp_slice(v) for k, v in batch.items()}, MICRO_BATCH)
    elif role == "rm":
        both = torch.cat([tokens, data["rejected"]])
        out["outputs"] = model.score(both, torch.cat([data["lengths"], data["lengths"]]), MICRO_BATCH)
        pairs = {"tokens": torch.cat([_dp_slice(tokens), _dp_slice(data["rejected"])]),
                 "lengths": torch.cat([_dp_slice(data["lengths"])] * 2)}
        out["metrics"] = model.train_on(bradley_terry_step_loss, pair_microbatches(pairs, MICRO_BATCH))
    elif role == "critic":
        out["outputs"] = model.values(tokens)
        batch = {k: _dp_slice(data[k]).float() if k != "tokens" else _dp_slice(data[k])
                 for k in ("tokens", "returns", "prev_values", "mask")}
        out["metrics"] = model.train_on(critic_loss_fn(0.2), batch)
    elif role == "actor":
        lp = model.logprobs(tokens)
        ent = model.forward_backward(
            split_microbatches({"tokens": tokens}, MICRO_BATCH), model.forward_step,
            lambda mb, o: (o.sum() * 0, {"entropy": vocab_parallel_entropy(o[:, :-1])}), forward_only=True)
        out["outputs"] = lp
        out["entropy"] = broadcast_from_last_stage(torch.cat([o["entropy"] for o in ent]) if ent else None,
                                                   (tokens.shape[0], tokens.shape[1] - 1), torch.float32)
        greedy = SamplingParams(greedy=True, max_new_tokens=8)
        gen = model.generate(data["prompts"], data["prompt_lengths"], greedy)
        out["generation"] = gen.tokens
        out["generation_lengths"] = gen.lengths
        old = lp + data["logprob_noise"]
        shard = {"tokens": _dp_slice(tokens), "old_logprobs": _dp_slice(old),
                 "advantages": _dp_slice(data["advantages"]), "mask": _dp_slice(data["mask"][:, :-1])}
        out["metrics"] = model.train_on(ppo_loss_fn(model, clip_eps=0.2, entropy_coef=0.01, clip_eps_high=None),
                                        shard)
    elif role == DPO_ROLE:
        out.update(_run_dpo(model, data))
    elif role == RS_ROLE:
        out.update(_run_rs(model, data))
    elif role == "ppo":
        prompts = tokens[:, :6]
        plens = 3 + (data["lengths"] % 4)
        out["reference"] = model.reference.logprobs(tokens)  # full batch: the same in every layout, DP too
        steps = []
        for _ in range(2):  # two full PPO steps: rollout, critic, GAE, actor + critic updates
            steps.append(model.train_step({"prompts": _dp_slice(prompts), "prompt_lengths": _dp_slice(plens)}))
            model.step += 1
        out["metrics"] = steps[-1]
        out["steps"] = steps
        out["outputs"] = model.policy.logprobs(tokens)  # the policy after two PPO steps
    elif role in CRITIC_FREE_ROLES:
        prompts, plens = data["prompts"][:2], data["prompt_lengths"][:2]  # 2 prompts x 4 responses
        steps = []
        for _ in range(2):  # two whole steps: group sampling, rewards, advantages, KL, updates
            steps.append(model.train_step({"prompts": _dp_slice(prompts), "prompt_lengths": _dp_slice(plens)}))
            model.step += 1
        out["metrics"] = steps[-1]
        out["steps"] = steps
        out["outputs"] = model.policy.logprobs(tokens)  # the policy after two steps
    elif role == ILQL_ROLE:
        trainer = ilql_trainer(model)
        batch = {"tokens": tokens, "prompt_lengths": (data["loss_mask"] == 0).sum(dim=1), "lengths": data["lengths"],
                 "rewards": data["returns"][:, 0]}
        steps = []
        for _ in range(2):  # two offline steps, a target sync after each
            steps.append(trainer.train_step({k: _dp_slice(v) for k, v in batch.items()}))
            trainer.step += 1
        out["metrics"] = steps[-1]
        out["steps"] = steps
        out["outputs"] = model.logprobs(tokens)  # the LM head after two steps
        out["heads"] = ilql_head_outputs(model, tokens)
        # decoding with the shift beta (min target Q - V) (target Q gathered over TP, last PP stage)
        gen = model.generate_ilql(data["prompts"], data["prompt_lengths"],
                                  SamplingParams(greedy=True, max_new_tokens=6), beta=4.0)
        out["generation"], out["generation_lengths"] = gen.tokens, gen.lengths
        out["generation_beta0"] = model.generate_ilql(data["prompts"], data["prompt_lengths"],
                                                      SamplingParams(greedy=True, max_new_tokens=6), beta=0.0).tokens
    return out


def layout_parser(description: str | None) -> argparse.ArgumentParser:
    """The arguments every layout tool takes: ``--tp``, ``--pp``, ``--sp``,
    ``--distributed-optimizer``, ``--out``, ``--seed``."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--sp", action="store_true")
    p.add_argument("--distributed-optimizer", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=1234)
    return p


def add_saver_args(p: argparse.ArgumentParser) -> None:
    """The memory-saver arguments of the layout tools: ``--lora`` (:data:`LORA` adapters on every
    linear, random non-zero B in the initial weights) and ``--num-layers-unfrozen k``."""
    p.add_argument("--lora", action="store_true", help="LoRA adapters (parity.LORA) on every linear; initial B random")
    p.add_argument("--num-layers-unfrozen", type=int, default=-1, help="model.num_layers_unfrozen of every model")


def init_layout(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """Validate the parity model in the layout of ``args`` for this world and initialise the
    process groups (CPU, gloo). Returns ``(model_cfg, world_size)``.

    Raises:
        LayoutError: the layout does not fit the world, the model or the batch.
    """
    from nemo_rlhf.parallel.layout import validate_layout
    from nemo_rlhf.parallel.state import initialize_distributed, read_dist_env
    from nemo_rlhf.utils.hydra import quiet_warnings

    quiet_warnings()
    model_cfg = dict(MODEL, tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                     sequence_parallel=args.sp)
    world = read_dist_env().world_size
    validate_layout(model_cfg, world, GLOBAL_BATCH, MICRO_BATCH)
    initialize_distributed(args.tp, args.pp, "cpu", seed=args.seed)
    return model_cfg, world


def main(argv: list[str] | None = None) -> None:
    p = layout_parser(__doc__)
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"),
                   help="megatron's distributed optimizer supports only adam")
    p.add_argument("--roles", default=",".join(ROLES))
    p.add_argument("--init", required=True, help="initial-weights directory (one sub-directory per role)")
    p.add_argument("--save-init", action="store_true", help="write the initial weights (reference run)")
    add_saver_args(p)
    p.add_argument("--reference", default="full", choices=("full", "hydra"), help="the ppo and dpo roles' reference policy")
    p.add_argument("--ilql-q-head", default="mlp", choices=("mlp", "lm_head"), help="the ilql role's Q heads")
    args = p.parse_args(argv)
    model_cfg, _ = init_layout(args)
    model_cfg["num_layers_unfrozen"] = args.num_layers_unfrozen
    from nemo_rlhf.checkpoint.weights import load_weights, save_model_weights
    from nemo_rlhf.parallel.state import destroy_distributed, is_rank_zero, seed_everything

    data = fixed_data()
    optim = dict(OPTIM, optimizer=args.optimizer, distributed_optimizer=args.distributed_optimizer)
    if args.optimizer == "adam":
        optim.update(lr=1e-3, eps=1e-3)  # eps >> |g| noise: no sign(g) amplification (see OPTIM)
    try:
        for role in args.roles.split(","):
            seed_everything(args.seed)
            model = build_role(role, with_lora(model_cfg, role) if args.lora else model_cfg, optim, args.reference,
                               args.ilql_q_head)
            init = Path(args.init) / role
            if role == "ppo":
                load_ppo(model, Path(args.init))  # reuses the other roles' initial weights
            elif role in CRITIC_FREE_ROLES:
                load_critic_free(model, Path(args.init))
            elif role in (DPO_ROLE, RS_ROLE):
                load_from_actor(model, Path(args.init))
            else:
                if args.save_init:
                    if args.lora:
                        randomize_adapters(model)
                    save_model_weights(model.gpt, init)
                load_weights(model, init)
            result = run_role(role, model, data)
            save_model_weights(model.gpt, Path(args.out) / role / "after")
            if is_rank_zero():
                torch.save(result, Path(args.out) / role / "result.pt")
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
