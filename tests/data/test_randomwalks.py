"""randomwalks task (nemo_rlhf/data/randomwalks.py): graph, optimality, tokenizer, task files."""

import json
import random

import numpy as np
import pytest

from nemo_rlhf.data.randomwalks import (
    RandomWalkGraph,
    RandomWalkReward,
    build_tokenizer,
    node_name,
    walk_text,
    write_task,
)


def _bfs(adj: np.ndarray, start: int, goal: int) -> int | None:
    frontier, seen, d = {start}, {start}, 0
    while frontier:
        if goal in frontier:
            return d
        frontier = {int(j) for i in frontier for j in np.flatnonzero(adj[i])} - seen
        seen |= frontier
        d += 1
    return None


def test_graph_is_seeded_and_every_start_reaches_the_goal():
    g, h = RandomWalkGraph(seed=7), RandomWalkGraph(seed=7)
    assert np.array_equal(g.adjacency, h.adjacency) and not np.array_equal(g.adjacency, RandomWalkGraph(seed=8).adjacency)
    assert not g.adjacency[g.goal].any() and not g.adjacency.diagonal().any()
    for s in g.starts:
        d = _bfs(g.adjacency, s, g.goal)  # an independent forward BFS
        assert d is not None and d == g.distance[s] and 1 <= d <= g.max_length - 1
        assert len(g.successors(s)) >= 1


def test_optimality_values():
    g = RandomWalkGraph()
    s = next(i for i in g.starts if g.distance[i] == 2)
    mid = next(int(j) for j in g.successors(s) if g.distance[j] == 1)
    assert g.optimality([s, mid, g.goal]) == 1.0  # a shortest path
    assert g.optimality([s, mid, g.goal, 5, 6]) == 1.0  # tokens after the goal are ignored
    missing = next(j for j in range(g.n_nodes) if j != s and not g.adjacency[s, j])
    assert g.optimality([s, missing, g.goal]) == 0.0  # an edge the graph does not have
    assert g.optimality([s, mid]) == 0.0  # never reaches the goal
    assert g.optimality([s]) == 0.0 and g.optimality([]) == 0.0
    # A longer valid walk: optimality = shortest / walked edges.
    rng = random.Random(0)
    for _ in range(200):
        walk = g.sample_walk(s, rng)
        if walk[-1] == g.goal:
            assert g.optimality(walk) == pytest.approx(2 / (len(walk) - 1))
            assert 0.0 < g.optimality(walk) <= 1.0
    # A walk cut at max_length nodes without the goal scores 0, even if the goal follows.
    long = [s] + [mid, s] * g.max_length
    assert g.optimality(long[: g.max_length] + [g.goal]) == 0.0


def test_reward_function_parses_text_and_refuses_bad_prompts():
    g = RandomWalkGraph()
    fn = RandomWalkReward()
    s = next(i for i in g.starts if g.distance[i] == 1)
    prompts = [node_name(s)] * 3
    responses = [" " + node_name(g.goal), " zz " + node_name(g.goal), " " + node_name(g.goal) + "<|endoftext|>"]
    out = fn(prompts, responses)
    assert out.dtype == np.float64 and out.shape == (3,)
    assert out.tolist() == [1.0, 0.0, 1.0]  # an unknown token scores 0; a trailing eos is fine
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        fn(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="prompt 0"):
        fn([""], [" a"])


def test_tokenizer_round_trips_walks():
    g = RandomWalkGraph()
    tok = build_tokenizer(g)
    walk = [3, 7, 0]
    ids = tok.encode(walk_text(walk) + "<|endoftext|>").ids
    assert ids == walk + [g.n_nodes]
    assert tok.decode(walk) == walk_text(walk) == "d h a"
    assert tok.get_vocab_size() == g.n_nodes + 1


def test_write_task_files(tmp_path):
    summary = write_task(tmp_path, n_sft_walks=50, n_offline_walks=40, n_heldout_starts=5, seed=3)
    meta = json.loads((tmp_path / "graph.json").read_text())
    heldout = {json.loads(line)["prompt"] for line in (tmp_path / "heldout.jsonl").read_text().splitlines()}
    sft = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    offline = [json.loads(line) for line in (tmp_path / "offline.jsonl").read_text().splitlines()]
    assert len(heldout) == 5 and set(meta["heldout_starts"]) == heldout
    prompts = {json.loads(line)["prompt"] for line in (tmp_path / "prompts.jsonl").read_text().splitlines()}
    assert len(prompts) == 15 and not prompts & heldout  # held-out starts are never an RL prompt
    assert len(sft) == 50 and {r["prompt"] for r in sft} & heldout  # SFT walks start everywhere (as trlX)
    assert meta["sft_from_heldout"] is True
    narrow = write_task(tmp_path / "narrow", n_sft_walks=50, n_offline_walks=4, seed=3, sft_from_heldout=False)
    narrow_sft = [json.loads(line) for line in (tmp_path / "narrow" / "sft.jsonl").read_text().splitlines()]
    assert narrow["heldout_starts"] == 5 and not {r["prompt"] for r in narrow_sft} & heldout
    assert len(offline) == 40 and summary["offline_walks"] == 40
    fn = RandomWalkReward()
    assert np.allclose(fn([r["prompt"] for r in offline], [r["response"] for r in offline]),
                       [r["reward"] for r in offline])
    # Deterministic: the same call writes the same files.
    other = tmp_path / "again"
    write_task(other, n_sft_walks=50, n_offline_walks=40, n_heldout_starts=5, seed=3)
    for name in ("sft.jsonl", "offline.jsonl", "heldout.jsonl", "graph.json"):
        assert (tmp_path / name).read_text() == (other / name).read_text()
    with pytest.raises(ValueError, match="n_heldout_starts"):
        write_task(tmp_path / "bad", n_heldout_starts=20)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"n_nodes": 1}, "n_nodes=1"), ({"p_edge": 0.0}, "p_edge=0.0"), ({"goal": 30}, "goal=30"),
    ({"max_length": 1}, "max_length=1"),
])
def test_graph_errors(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        RandomWalkGraph(**kwargs)
