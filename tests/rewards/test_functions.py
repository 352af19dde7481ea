"""Reward functions as components (nemo_rlhf/rewards/functions.py): import by path, weighted sums,
and the checks that fail a step with the function, batch index and value named."""

import math

import numpy as np
import pytest
import torch

from nemo_rlhf.rewards.functions import (
    RewardFunction,
    RewardFunctionError,
    RewardSum,
    build_reward,
    build_reward_function,
    import_target,
)


def length_reward(prompts, responses, scale=1.0, **_):
    return [scale * len(r) for r in responses]


def nan_at_two(prompts, responses, **_):
    return torch.tensor([0.0, 1.0, math.nan, math.inf])[: len(responses)]


def wrong_shape(prompts, responses, **_):
    return np.zeros((len(responses), 2))


def raises(prompts, responses, **_):
    raise KeyError("no such answer")


HERE = __name__  # tests.rewards.test_functions or test_functions, depending on rootdir


def test_class_and_function_targets_and_weighted_sum():
    reward = build_reward([
        {"_target_": "nemo_rlhf.data.randomwalks.RandomWalkReward", "seed": 1002},
        {"_target_": f"{HERE}.length_reward", "weight": 0.5, "scale": 2.0},
    ])
    from nemo_rlhf.data.randomwalks import RandomWalkGraph, node_name
    g = RandomWalkGraph(seed=1002)
    s = next(i for i in g.starts if g.distance[i] == 1)
    prompts, responses = [node_name(s), node_name(s)], [" " + node_name(g.goal), " zz"]
    total = reward(prompts, responses)
    expected_walk = np.array([1.0, 0.0])
    expected_len = 2.0 * np.array([len(r) for r in responses])
    assert total.dtype == np.float64 and np.allclose(total, expected_walk + 0.5 * expected_len)
    terms = reward.terms(prompts, responses)
    assert np.allclose(terms["nemo_rlhf.data.randomwalks.RandomWalkReward"], expected_walk)
    assert np.allclose(terms[f"{HERE}.length_reward"], expected_len)  # unweighted


def test_torch_outputs_are_accepted():
    fn = RewardFunction(lambda p, r: torch.ones(len(r)), name="ones")
    assert fn(["a"], ["b"]).tolist() == [1.0]


@pytest.mark.parametrize("target, fragment", [
    ("nan_at_two", "returned a non-finite score nan at batch index 2 (2 of 4 non-finite)"),
    ("wrong_shape", "returned shape [4, 2]; expected [4] (one score per response)"),
    ("raises", "raised on a batch of 4: KeyError: 'no such answer'"),
])
def test_bad_reward_functions_name_function_index_and_value(target, fragment):
    fn = build_reward_function({"_target_": f"{HERE}.{target}"})
    with pytest.raises(RewardFunctionError) as err:
        fn(["p"] * 4, ["r"] * 4)
    assert f"{HERE}.{target}" in str(err.value) and fragment in str(err.value)


@pytest.mark.parametrize("spec, fragment", [
    ({"seed": 1}, "needs a '_target_' import path"),
    ({"_target_": "nomodule"}, "expected 'package.module.name'"),
    ({"_target_": "no_such_pkg_xyz.f"}, "cannot import 'no_such_pkg_xyz'"),
    ({"_target_": "nemo_rlhf.rewards.sentiment.nope"}, "has no 'nope'"),
    ({"_target_": "nemo_rlhf.data.randomwalks.RandomWalkReward", "n_nodes": 1}, "RandomWalkReward(**{'n_nodes': 1}) failed"),
])
def test_config_errors(spec, fragment):
    with pytest.raises(RewardFunctionError, match=None) as err:
        build_reward_function(spec)
    assert fragment in str(err.value)


def test_import_target_and_empty_sum():
    assert import_target("nemo_rlhf.rewards.sentiment.vader_reward").__name__ == "vader_reward"
    with pytest.raises(ValueError, match="at least one"):
        RewardSum([])
