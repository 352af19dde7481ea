"""Parity of the critic-free maths in nemo_rlhf.rl with TRL (issue 13 §4), calling TRL's own code.

TRL (``trl==1.16.0``, the "test" extra of setup.py) computes GRPO/RLOO advantages and the GRPO loss
inline inside trainer methods, not in standalone functions. So these tests call the trainer
methods themselves on a minimal object, ``object.__new__(GRPOTrainer)`` / ``object.__new__(RLOOTrainer)``
(``__init__`` skipped: it would load a model), given only the attributes those methods read and
stubs for the parts that need a model (``_generate``, ``_calculate_rewards``,
``_get_per_token_logps_and_entropies``), which return fixed tensors:

* advantages: ``GRPOTrainer._generate_and_score_completions`` (``scale_rewards="group"`` = GRPO,
  ``"none"`` = Dr.GRPO) and ``RLOOTrainer._generate_and_score_completions`` (with and without its
  sequence-level KL in the reward), in eval mode on one process;
* losses: ``GRPOTrainer._compute_loss`` for ``loss_type`` grpo / bnpo / dr_grpo / dapo / luspo,
  with symmetric and asymmetric clipping and beta = 0 / beta > 0 (k3 KL), loss and gradient.

TRL is imported only here, never by ``nemo_rlhf``. All tensors are float64; tolerance 1e-6.
TRL's ``grpo`` loss counts a response with no valid token in its mean over responses while ours
leaves it out, so every row below has at least one valid token.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl", reason="TRL is a test dependency (pip install -e '.[test]')")
from trl import GRPOTrainer, RLOOTrainer

from nemo_rlhf.rl import (
    aggregate_loss,
    grpo_advantages,
    grpo_policy_loss,
    kl_penalty,
    masked_sum,
    rloo_advantages,
)

ATOL = 1e-6
G = 4  # num_generations
# 3 groups of 4; group 1 has identical rewards (zero std), group 2 has ties
SCORES = torch.tensor([0.3, -1.2, 2.5, 0.7, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.25], dtype=torch.float64)
LENGTHS = [5, 3, 1, 4, 2, 5, 5, 1, 3, 4, 2, 5]  # response tokens per row (T = 5)
B, T = len(LENGTHS), max(LENGTHS)
MASK = (torch.arange(T).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)).long()


def _logprobs(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(B, T, generator=g, dtype=torch.float64) * 2.0 - 0.05


class _Accelerator:
    """Single-process stand-in for accelerate.Accelerator (the calls TRL makes in these methods)."""

    device = torch.device("cpu")
    process_index = 0
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x

    def unwrap_model(self, model):
        return model


def _bare(cls):
    """``cls`` instance without ``__init__`` and with the bookkeeping attributes both methods touch."""
    t = object.__new__(cls)
    t.accelerator = _Accelerator()
    t.model = SimpleNamespace(training=False, is_gradient_checkpointing=False)  # eval mode
    t._tokenizer = SimpleNamespace(pad_token_id=0)
    t.pad_to_multiple_of = None
    t.mask_truncated_completions = False
    t.use_vllm = False
    t.vllm_importance_sampling_correction = False
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t._logs = {
        "prompt": [],
        "completion": [],
        "rewards": defaultdict(list),
        "advantages": [],
        "extra": defaultdict(list),
    }
    t._pending_extra_logs = {}
    t._pending_metrics = {}
    t.log_multimodal = False
    t.reward_func_names = ["score"]
    t.reward_weights = torch.ones(1)
    t.num_generations = t.num_generations_eval = G
    return t


def _inputs():
    return [{"prompt": f"prompt {i // G}"} for i in range(B)]


def _completion_ids():
    return [list(range(1, n + 1)) for n in LENGTHS]  # lengths -> TRL's right-padded completion_mask


def _trl_grpo_advantages(scale_rewards: str) -> torch.Tensor:
    t = _bare(GRPOTrainer)
    t.environment_factories = None
    t.environments = None
    t.tools = None
    t.args = SimpleNamespace(
        per_device_eval_batch_size=B,
        steps_per_generation=1,
        gradient_accumulation_steps=1,
        gradient_checkpointing_kwargs=None,
    )
    t.num_iterations = 1
    t.beta = 0.0
    t.ref_model = None
    t.multi_objective_aggregation = "sum_then_normalize"
    t.scale_rewards = scale_rewards
    t._generate = lambda prompts: (
        [[7]] * len(prompts),
        _completion_ids(),
        None,
        ["c"] * len(prompts),
        None,
        {},
        None,
        [None] * len(prompts),
    )
    t._calculate_rewards = lambda inputs, prompts, completions, ids: SCORES.clone().unsqueeze(1)
    out = t._generate_and_score_completions(_inputs())
    torch.testing.assert_close(out["completion_mask"], MASK)  # the stub produced the intended layout
    return out["advantages"]


@pytest.mark.parametrize("scale_rewards,scale_by_std", [("group", True), ("none", False)])
def test_group_advantages_equal_trl_grpo(scale_rewards, scale_by_std):
    """GRPO (std-scaled) and Dr.GRPO (scale_rewards='none') advantages = TRL's GRPOTrainer."""
    expected = _trl_grpo_advantages(scale_rewards)
    ours = grpo_advantages(SCORES, G, scale_by_std=scale_by_std, eps=1e-4)  # 1e-4: TRL's constant
    torch.testing.assert_close(ours, expected, rtol=0, atol=ATOL)
    assert ours[4:8].abs().max() == 0  # identical rewards -> no signal


def _trl_rloo_advantages(beta: float, old_lp: torch.Tensor, ref_lp: torch.Tensor) -> torch.Tensor:
    t = _bare(RLOOTrainer)
    t.args = SimpleNamespace(per_device_eval_batch_size=B, gradient_checkpointing_kwargs=None)
    t.beta = beta
    t.ref_model = SimpleNamespace(name="ref")
    t.reward_clip_range = None
    t.normalize_advantages = False
    t._generate = lambda prompts: ([[7]] * len(prompts), _completion_ids(), ["c"] * len(prompts))
    t._calculate_rewards = lambda inputs, prompts, completions, ids: SCORES.clone().unsqueeze(1)
    t._get_per_token_logps_and_entropies = lambda model, *a, **k: (
        (ref_lp if model is t.ref_model else old_lp).clone(),
        None,
        None,
    )
    out = t._generate_and_score_completions(_inputs())
    torch.testing.assert_close(out["completion_mask"], MASK)
    return out["advantages"]


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_rloo_advantages_equal_trl_rloo(beta):
    """RLOO leave-one-out advantages = TRL's RLOOTrainer; with beta > 0 TRL puts the sequence KL
    ``beta * sum_t (old_lp - ref_lp)`` (k1, Ahmadian et al. 2024) into the reward first, which we
    compose from :func:`kl_penalty` and :func:`masked_sum` before :func:`rloo_advantages`."""
    old_lp, ref_lp = _logprobs(1), _logprobs(2)
    expected = _trl_rloo_advantages(beta, old_lp, ref_lp)
    scores = SCORES - beta * masked_sum(kl_penalty(old_lp, ref_lp, "k1"), MASK, dim=1)
    torch.testing.assert_close(rloo_advantages(scores, G), expected, rtol=0, atol=ATOL)


MAX_COMPLETION_LENGTH = 8  # Dr.GRPO's constant (> T: the generation budget, not the batch width)

# TRL loss_type -> our aggregation mode
LOSS_TYPES = {
    "grpo": "seq_mean_token_mean",
    "bnpo": "token_mean",
    "dapo": "token_mean",  # TRL divides the token sum by num_items_in_batch (all valid tokens, one process)
    "dr_grpo": "seq_mean_token_sum_norm",
    "luspo": "seq_mean_token_sum",  # used here for its reduction, (l * m).sum(-1).mean()
}


def _trl_loss(loss_type, logprobs, old_lp, ref_lp, advantages, eps_low, eps_high, beta):
    t = _bare(GRPOTrainer)
    t.loss_type = loss_type
    t.epsilon_low, t.epsilon_high = eps_low, eps_high
    t.beta = beta
    t.top_entropy_quantile = 1.0
    t.off_policy_mask_threshold = None
    t.importance_sampling_level = "token"
    t.args = SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
    t.max_completion_length = MAX_COMPLETION_LENGTH
    t._entropy_bonus_enabled = False
    t.aux_loss_enabled = False
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logprobs, torch.zeros_like(logprobs), None)
    inputs = {
        "prompt_ids": torch.ones(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.ones(B, T, dtype=torch.long),
        "completion_mask": MASK,
        "advantages": advantages,
        "old_per_token_logps": old_lp,
        "num_items_in_batch": MASK.sum(),
    }
    if beta != 0.0:
        inputs["ref_per_token_logps"] = ref_lp
    return t._compute_loss(None, inputs)


@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
@pytest.mark.parametrize("eps_low,eps_high,beta", [(0.2, 0.2, 0.0), (0.2, 0.28, 0.04)])
def test_grpo_loss_equals_trl(loss_type, eps_low, eps_high, beta):
    """Loss value and gradient w.r.t. the log-probs = TRL's GRPOTrainer._compute_loss, for GRPO,
    Dr.GRPO and DAPO (asymmetric clipping, k3 KL term with beta; beta = 0: no reference)."""
    base = _logprobs(3)
    old_lp = base + 0.3 * torch.randn(B, T, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref_lp = _logprobs(5)
    advantages = grpo_advantages(SCORES, G)  # [B]; many ratios fall outside [0.8, 1.28]

    lp_trl = base.clone().requires_grad_(True)
    loss_trl = _trl_loss(loss_type, lp_trl, old_lp, ref_lp, advantages, eps_low, eps_high, beta)
    loss_trl.backward()

    lp = base.clone().requires_grad_(True)
    per_token, stats = grpo_policy_loss(
        lp,
        old_lp,
        advantages,
        MASK,
        clip_eps_low=eps_low,
        clip_eps_high=eps_high,
        beta=beta,
        ref_logprobs=ref_lp if beta else None,
    )
    loss = aggregate_loss(per_token, MASK, LOSS_TYPES[loss_type], max_len=MAX_COMPLETION_LENGTH)
    loss.backward()

    torch.testing.assert_close(loss, loss_trl.detach(), rtol=0, atol=ATOL)
    torch.testing.assert_close(lp.grad, lp_trl.grad, rtol=0, atol=ATOL)
    assert 0 < stats["clipfrac"] < 1  # both clip branches are exercised
