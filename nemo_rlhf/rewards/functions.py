"""Rewards as components (issue 13 section 2): Python reward functions named in a config.

A reward function is any callable ``reward_fn(prompts, responses, **metadata) -> scores [B]``
(rule-based / verifiable rewards: randomwalks optimality, VADER, exact match, ...), run in the
trainer process. In a config it is named by import path, Hydra style::

    reward:
      functions:
        - {_target_: nemo_rlhf.data.randomwalks.RandomWalkReward, seed: 1002}   # a class: instantiated
        - {_target_: nemo_rlhf.rewards.sentiment.vader_reward, weight: 0.5}     # a function: called as is

A class target is instantiated with the other keys; a function target is called with them as extra
keyword arguments. ``weight`` (default 1) scales each; the reward is the weighted sum
(:class:`RewardSum`). Every call is checked: a function that raises, returns the wrong shape or a
non-finite value fails the step with an error naming the function, the batch index and the value.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


class RewardFunctionError(RuntimeError):
    """A reward function raised, or returned the wrong shape or a non-finite value."""


def import_target(path: str) -> Any:
    """The object at ``path`` (``package.module.name``).

    Raises:
        RewardFunctionError: ``path`` has no module part, the module does not import, or it has
            no attribute of that name.
    """
    module, _, name = str(path).rpartition(".")
    if not module:
        raise RewardFunctionError(f"reward function _target_={path!r}: expected 'package.module.name'")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise RewardFunctionError(f"reward function _target_={path!r}: cannot import {module!r}: {exc}") from exc
    if not hasattr(mod, name):
        raise RewardFunctionError(f"reward function _target_={path!r}: module {module!r} has no {name!r}")
    return getattr(mod, name)


class RewardFunction:
    """One checked reward function.

    Args:
        fn: ``fn(prompts, responses, **metadata)`` returning ``B`` scores (list, numpy or torch).
        name: how errors name it (default: its import path).
        weight: multiplies its scores in a :class:`RewardSum`.
        kwargs: extra keyword arguments passed on every call.

    Returns (on call):
        float64 numpy ``[B]``.

    Raises (on call):
        RewardFunctionError: the function raised (its exception chained), returned a shape other
            than ``[B]``, or a non-finite value (the first bad batch index and value named).
    """

    def __init__(self, fn: Callable[..., Any], name: str | None = None, weight: float = 1.0, **kwargs: Any):
        if not callable(fn):
            raise RewardFunctionError(f"reward function {name or fn!r} is not callable")
        self.fn, self.weight, self.kwargs = fn, float(weight), kwargs
        self.name = name or f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], **metadata: Any) -> np.ndarray:
        b = len(responses)
        try:
            raw = self.fn(prompts, responses, **self.kwargs, **metadata)
        except Exception as exc:
            raise RewardFunctionError(f"reward function {self.name} raised on a batch of {b}: "
                                      f"{type(exc).__name__}: {exc}") from exc
        if hasattr(raw, "detach"):
            raw = raw.detach().cpu().numpy()
        try:
            scores = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise RewardFunctionError(f"reward function {self.name} returned {type(raw).__name__}, "
                                      f"not {b} numbers") from exc
        if scores.shape != (b,):
            raise RewardFunctionError(f"reward function {self.name} returned shape {list(scores.shape)}; "
                                      f"expected [{b}] (one score per response)")
        bad = np.flatnonzero(~np.isfinite(scores))
        if bad.size:
            i = int(bad[0])
            raise RewardFunctionError(f"reward function {self.name} returned a non-finite score {scores[i]} at "
                                      f"batch index {i} ({bad.size} of {b} non-finite)")
        return scores


class RewardSum:
    """The weighted sum of several :class:`RewardFunction` (``sum_k w_k * r_k``), and each term.

    Raises:
        ValueError: no functions.
    """

    def __init__(self, functions: Sequence[RewardFunction]):
        if not functions:
            raise ValueError("RewardSum needs at least one reward function")
        self.functions = list(functions)

    def terms(self, prompts: Sequence[str], responses: Sequence[str], **metadata: Any) -> dict[str, np.ndarray]:
        """``{name: scores [B]}`` per function, unweighted (for logging)."""
        return {f.name: f(prompts, responses, **metadata) for f in self.functions}

    def weighted(self, prompts: Sequence[str], responses: Sequence[str],
                 **metadata: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(sum_k w_k * r_k [B] float64, {name: r_k [B]} unweighted)``.

        Raises:
            RewardFunctionError: as :class:`RewardFunction` (names the function, index, value).
        """
        terms = self.terms(prompts, responses, **metadata)
        total = np.zeros(len(prompts), dtype=np.float64)
        for f in self.functions:
            total += f.weight * terms[f.name]
        return total, terms

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], **metadata: Any) -> np.ndarray:
        return self.weighted(prompts, responses, **metadata)[0]


def build_reward_function(spec: Mapping[str, Any]) -> RewardFunction:
    """One reward function from its config mapping (``_target_``, optional ``weight``, arguments).

    Raises:
        RewardFunctionError: no ``_target_``, or it cannot be imported / instantiated.
    """
    spec = dict(spec)
    target = spec.pop("_target_", None)
    if not target:
        raise RewardFunctionError(f"reward function {spec}: needs a '_target_' import path")
    weight = float(spec.pop("weight", 1.0))
    obj = import_target(target)
    if inspect.isclass(obj):
        try:
            fn = obj(**spec)
        except Exception as exc:
            raise RewardFunctionError(f"reward function {target}: {obj.__name__}(**{spec}) failed: {exc}") from exc
        return RewardFunction(fn, name=target, weight=weight)
    return RewardFunction(obj, name=target, weight=weight, **spec)


def build_reward(specs: Sequence[Mapping[str, Any]]) -> RewardSum:
    """The weighted sum of the reward functions ``specs`` (see the module docstring)."""
    return RewardSum([build_reward_function(s) for s in specs])
