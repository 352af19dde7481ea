"""KL penalty between the actor and the reference policy, and KL-coefficient controllers."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from nemo_rlhf.rl.masked import check_float, check_same_shape

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from log-probs of tokens sampled from ``pi``.

    With ``d = logprobs - ref_logprobs`` (Schulman 2020, "Approximating KL Divergence"):

    * ``"k1"``: ``d`` — unbiased, high variance, can be negative.
    * ``"k2"``: ``0.5 * d**2`` — biased, low variance, >= 0.
    * ``"k3"``: ``exp(-d) + d - 1`` — unbiased, >= 0 (computed as ``expm1(-d) + d``).
    * ``"abs"``: ``|d|``.

    Not masked: the caller masks (e.g. via :func:`~nemo_rlhf.rl.advantages.per_token_rewards`).

    Args:
        logprobs: float ``[B, T]`` actor log-probs (nats) of the sampled tokens.
        ref_logprobs: float ``[B, T]`` reference-policy log-probs of the same tokens.
        estimator: one of ``KL_ESTIMATORS``.

    Returns:
        ``[B, T]`` tensor in the promoted dtype of the inputs (nats).

    Raises:
        TypeError: non-float inputs.
        ValueError: shapes differ, or unknown ``estimator``.
    """
    check_float("logprobs", logprobs)
    check_float("ref_logprobs", ref_logprobs)
    check_same_shape("logprobs", logprobs, "ref_logprobs", ref_logprobs)
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator == "k3":
        return torch.expm1(-d) + d
    if estimator == "abs":
        return d.abs()
    raise ValueError(f"kl estimator must be one of {list(KL_ESTIMATORS)}, got {estimator!r}")


def _check_coef(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


class _KLController:
    """Shared checkpoint state of the KL controllers: the current coefficient ``value``."""

    value: float

    def state_dict(self) -> dict[str, float]:
        """``{"value": beta}``."""
        return {"value": self.value}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``value`` from :meth:`state_dict` output; ValueError if missing or invalid."""
        if "value" not in state:
            raise ValueError("KL controller state_dict has no 'value' key")
        self.value = _check_coef("value", state["value"])


class FixedKLController(_KLController):
    """Constant KL coefficient ``beta``.

    Args:
        kl_coef: ``beta >= 0``.

    Raises:
        ValueError: ``kl_coef`` negative or not finite.
    """

    def __init__(self, kl_coef: float) -> None:
        self.value = _check_coef("kl_coef", kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (same signature as :meth:`AdaptiveKLController.update`)."""


class AdaptiveKLController(_KLController):
    """Proportional controller that steers the observed KL towards a target.

    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", §2.2::

        e_t      = clip((KL_t - KL_target) / KL_target, -0.2, 0.2)
        beta_t+1 = beta_t * (1 + e_t * n_steps / horizon)

    (the ``n_steps / horizon`` form is the one in OpenAI lm-human-preferences and TRL).
    ``n_steps`` is the number of samples (rollouts) in the update; it should stay well below
    ``5 * horizon``, otherwise the multiplier can become negative.

    Args:
        init_kl_coef: initial ``beta >= 0``.
        target: target KL (nats per sequence as measured by the caller), ``> 0``.
        horizon: controller horizon in samples, ``> 0``.

    Raises:
        ValueError: a field out of range (the message names it).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        self.value = _check_coef("init_kl_coef", init_kl_coef)
        self.target = _check_coef("target", target)
        self.horizon = _check_coef("horizon", horizon)
        if self.target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        if self.horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")

    def update(self, current_kl: float, n_steps: int) -> None:
        """Multiply ``value`` by ``1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon``.

        Args:
            current_kl: observed KL (float or 0-dim tensor), same unit as ``target``.
            n_steps: number of samples since the last update, ``>= 0``.

        Raises:
            ValueError: ``current_kl`` not finite, or ``n_steps < 0``.
        """
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite, got {current_kl}")
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


def build_kl_controller(cfg: Mapping[str, Any]) -> FixedKLController | AdaptiveKLController:
    """Build a KL controller from a config mapping (dict or OmegaConf ``DictConfig``).

    Keys: ``type`` (``"fixed"`` | ``"adaptive"``), ``init_kl_coef``; for ``"adaptive"`` also
    ``target`` and ``horizon``.

    Raises:
        ValueError: unknown ``type`` or a missing key (named as ``kl_controller.<key>``), or a
            value out of range.
    """

    def get(key: str) -> Any:
        if key not in cfg or cfg[key] is None:
            raise ValueError(f"kl_controller.{key} is required")
        return cfg[key]

    kind = get("type")
    if kind not in ("fixed", "adaptive"):
        raise ValueError(f"kl_controller.type must be 'fixed' or 'adaptive', got {kind!r}")
    if kind == "fixed":
        return FixedKLController(_check_coef("kl_controller.init_kl_coef", get("init_kl_coef")))
    try:
        return AdaptiveKLController(get("init_kl_coef"), get("target"), get("horizon"))
    except (TypeError, ValueError) as e:  # constructor messages name the field: prefix the section
        raise type(e)(f"kl_controller.{e}") from e
