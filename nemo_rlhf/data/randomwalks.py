"""randomwalks: trlX's small online-RL benchmark, rebuilt (issue 13 section 3).

A seeded random directed graph of ``n_nodes`` nodes named ``a``, ``b``, ... (node ``a`` is the
goal). A prompt is a start node; a response is a walk written as node tokens separated by spaces
("c h a"), continuing from the start node. The reward of a walk is its *optimality*::

    optimality = shortest_path_length(start -> goal) / walk_length     in [0, 1]

where ``walk_length`` counts the edges walked (start node included as the first vertex), and
0 when the walk never reaches the goal within ``max_length`` nodes, uses an edge the graph does not
have, or writes a token that is not a node. A walk that reaches the goal is cut there (tokens
after the goal are ignored, as an end-of-walk). An optimal walk scores 1.

As in trlX (``examples/randomwalks/randomwalks.py``, Castricato et al. 2023), the policy is first
fine-tuned on *sampled* walks (uniform random next node among the current node's successors, not
shortest paths), then improved by online RL against the optimality reward. Everything here is
deterministic in ``seed``; nothing is downloaded.

The graph guarantees that every node can reach the goal (edges toward the goal are added to nodes
that cannot, see :class:`RandomWalkGraph`) and that every node has at least one successor.
"""

from __future__ import annotations

import json
import math
import os
import random
import string
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

EOS_TOKEN = "<|endoftext|>"


def node_name(i: int) -> str:
    """The token of node ``i`` (``a``..``z``, then ``n26``, ``n27``, ...)."""
    return string.ascii_lowercase[i] if i < 26 else f"n{i}"


@dataclass
class RandomWalkGraph:
    """A seeded random directed graph with a goal node and its shortest distances to the goal.

    Args:
        n_nodes: number of nodes (>= 2); trlX uses 21.
        p_edge: probability of each directed edge ``i -> j`` (``i != j``), in (0, 1].
        seed: the graph's seed (numpy ``default_rng``).
        goal: the goal node's index.
        max_length: the most nodes a walk may have, start and goal included (>= 2).

    Attributes:
        adjacency: bool ``[n_nodes, n_nodes]``, ``adjacency[i, j]`` = edge ``i -> j``. The goal has
            no outgoing edges (a walk ends there). Every other node has at least one successor and
            a path to the goal of at most ``max_length - 1`` edges: nodes without one get an edge
            to the goal.
        distance: int ``[n_nodes]``, shortest number of edges from each node to the goal (0 for it).

    Raises:
        ValueError: a size or probability out of range.
    """

    n_nodes: int = 21
    p_edge: float = 0.1
    seed: int = 1002
    goal: int = 0
    max_length: int = 10
    adjacency: np.ndarray = field(init=False, repr=False)
    distance: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.n_nodes < 2:
            raise ValueError(f"randomwalks: n_nodes={self.n_nodes} must be >= 2")
        if not 0.0 < self.p_edge <= 1.0:
            raise ValueError(f"randomwalks: p_edge={self.p_edge} must be in (0, 1]")
        if not 0 <= self.goal < self.n_nodes:
            raise ValueError(f"randomwalks: goal={self.goal} must be a node index in [0, {self.n_nodes})")
        if self.max_length < 2:
            raise ValueError(f"randomwalks: max_length={self.max_length} must be >= 2 (a start and the goal)")
        rng = np.random.default_rng(self.seed)
        adj = rng.random((self.n_nodes, self.n_nodes)) < self.p_edge
        np.fill_diagonal(adj, False)
        adj[self.goal, :] = False
        self.adjacency = adj
        self.distance = self._distances()
        # Nodes that cannot reach the goal in max_length - 1 edges (or at all) get an edge to it.
        far = [i for i in range(self.n_nodes) if i != self.goal and self.distance[i] > self.max_length - 1]
        for i in far:
            self.adjacency[i, self.goal] = True
        if far:
            self.distance = self._distances()

    def _distances(self) -> np.ndarray:
        """Shortest edge counts to the goal (BFS on the reversed graph); a large value if unreachable."""
        dist = np.full(self.n_nodes, np.iinfo(np.int64).max // 2, dtype=np.int64)
        dist[self.goal] = 0
        queue = deque([self.goal])
        while queue:
            j = queue.popleft()
            for i in np.flatnonzero(self.adjacency[:, j]):
                if dist[i] > dist[j] + 1:
                    dist[i] = dist[j] + 1
                    queue.append(int(i))
        return dist

    @property
    def nodes(self) -> list[str]:
        """The node tokens, index order."""
        return [node_name(i) for i in range(self.n_nodes)]

    @property
    def starts(self) -> list[int]:
        """Every node but the goal (the possible start nodes)."""
        return [i for i in range(self.n_nodes) if i != self.goal]

    def successors(self, i: int) -> np.ndarray:
        """int ``[k]``: the nodes ``j`` with an edge ``i -> j``."""
        return np.flatnonzero(self.adjacency[i])

    def sample_walk(self, start: int, rng: random.Random) -> list[int]:
        """A uniform random walk from ``start`` until the goal or ``max_length`` nodes (start included)."""
        walk = [start]
        while walk[-1] != self.goal and len(walk) < self.max_length:
            walk.append(int(rng.choice(list(self.successors(walk[-1])))))
        return walk

    def parse(self, text: str) -> list[int] | None:
        """Node indices of a space-separated walk text, or None if a token is not a node."""
        index = {name: i for i, name in enumerate(self.nodes)}
        out = []
        for tok in text.replace(EOS_TOKEN, " ").split():
            if tok not in index:
                return None
            out.append(index[tok])
        return out

    def optimality(self, walk: Sequence[int]) -> float:
        """Optimality of a walk given as node indices, start first (module docstring): shortest
        distance / edges walked up to the first visit of the goal; 0 if the goal is not reached
        within ``max_length`` nodes or an edge is missing; 1 for a start that is the goal."""
        if not walk:
            return 0.0
        start = walk[0]
        if start == self.goal:
            return 1.0
        for k in range(1, min(len(walk), self.max_length)):
            if not self.adjacency[walk[k - 1], walk[k]]:
                return 0.0
            if walk[k] == self.goal:
                return float(self.distance[start]) / float(k)
        return 0.0

    def to_json(self) -> dict[str, Any]:
        """The graph's definition and derived tables (for a data set's README / provenance)."""
        return {"n_nodes": self.n_nodes, "p_edge": self.p_edge, "seed": self.seed, "goal": node_name(self.goal),
                "max_length": self.max_length,
                "edges": {node_name(i): [node_name(int(j)) for j in self.successors(i)] for i in range(self.n_nodes)},
                "distance": {node_name(i): int(self.distance[i]) for i in range(self.n_nodes)}}


def walk_text(walk: Sequence[int]) -> str:
    """``[2, 7, 0]`` -> ``"c h a"``."""
    return " ".join(node_name(i) for i in walk)


class RandomWalkReward:
    """The optimality reward as a reward function (``reward_fn(prompts, responses) -> [B]``).

    ``prompts[i]`` holds the start node (its last node token), ``responses[i]`` the rest of the walk.
    Use it from a config by import path, e.g.
    ``{_target_: nemo_rlhf.data.randomwalks.RandomWalkReward, seed: 1002}``.

    Args: those of :class:`RandomWalkGraph`.

    Returns (on call):
        float64 numpy ``[B]`` in [0, 1].

    Raises:
        ValueError: ``prompts`` and ``responses`` differ in length, or a prompt holds no node token.
    """

    def __init__(self, n_nodes: int = 21, p_edge: float = 0.1, seed: int = 1002, goal: int = 0, max_length: int = 10):
        self.graph = RandomWalkGraph(n_nodes=n_nodes, p_edge=p_edge, seed=seed, goal=goal, max_length=max_length)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], **metadata: Any) -> np.ndarray:
        if len(prompts) != len(responses):
            raise ValueError(f"randomwalks reward: {len(prompts)} prompts but {len(responses)} responses")
        out = np.zeros(len(prompts), dtype=np.float64)
        for b, (p, r) in enumerate(zip(prompts, responses)):
            start = self.graph.parse(p)
            if not start:
                raise ValueError(f"randomwalks reward: prompt {b} ({p!r}) holds no node token")
            walk = self.graph.parse(r)
            out[b] = 0.0 if walk is None else self.graph.optimality([start[-1], *walk])
        return out


def build_tokenizer(graph: RandomWalkGraph):
    """A word-level ``tokenizers.Tokenizer`` over the node tokens + ``<|endoftext|>`` (eos and pad):
    ids 0..n_nodes-1 are the nodes in index order, n_nodes is ``<|endoftext|>``; encodes
    ``"c h a"`` as ``[2, 7, 0]``, decodes with spaces between nodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {name: i for i, name in enumerate(graph.nodes)}
    vocab[EOS_TOKEN] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins word tokens with spaces
    tok.add_special_tokens([EOS_TOKEN])
    return tok


def write_task(out_dir: str | os.PathLike, graph: RandomWalkGraph | None = None, n_sft_walks: int = 2000,
               n_offline_walks: int = 1000, n_heldout_starts: int = 5, seed: int = 0,
               sft_from_heldout: bool = True) -> dict[str, Any]:
    """Write a randomwalks task directory (deterministic in ``graph.seed`` and ``seed``).

    Held-out start nodes are never a prompt of the online RL stage (``prompts.jsonl``); they are
    what the policy's improvement is measured on. The SFT walks (the *behaviour* data: sampled, not
    optimal) start from every start node as trlX's do (``sft_from_heldout``): otherwise a held-out
    node is never the first token the policy sees, and the RL stage is asked to generalise to an
    input position the network never read (measured: held-out optimality peaks at ~0.6 and decays
    while the training starts reach ~0.98). ``sft_from_heldout=False`` writes that harder split.

    Files:
        ``graph.json``        :meth:`RandomWalkGraph.to_json` plus the held-out start nodes.
        ``tokenizer.json``    :func:`build_tokenizer` (``tokenizer.type: tokenizer_json``).
        ``sft.jsonl``         ``{"prompt": start, "response": " rest of walk"}`` sampled walks from
                              every start node (only the training ones if ``sft_from_heldout`` is
                              false) — SFT data: sampled, not optimal, as trlX.
        ``prompts.jsonl``     ``{"prompt": start}``: each training start node once (online RL prompts).
        ``heldout.jsonl``     ``{"prompt": start}``: the held-out start nodes (never an RL prompt).
        ``offline.jsonl``     ``{"prompt", "response", "reward"}``: ``n_offline_walks`` sampled walks
                              from every start node with their optimality (issue 14's offline data).

    Returns:
        A summary: the files, counts and the mean optimality of the sampled walks.

    Raises:
        ValueError: ``n_heldout_starts`` leaves no training start node.
    """
    graph = graph or RandomWalkGraph()
    starts = graph.starts
    if not 0 <= n_heldout_starts < len(starts):
        raise ValueError(f"randomwalks: n_heldout_starts={n_heldout_starts} must be in [0, {len(starts)})")
    rng = random.Random(seed)
    heldout = sorted(rng.sample(starts, n_heldout_starts))
    train = [s for s in starts if s not in heldout]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def rows(n: int, pool: list[int]) -> list[dict[str, Any]]:
        res = []
        for _ in range(n):
            walk = graph.sample_walk(rng.choice(pool), rng)
            res.append({"prompt": node_name(walk[0]), "response": " " + walk_text(walk[1:]),
                        "reward": graph.optimality(walk)})
        return res

    sft, offline = rows(n_sft_walks, starts if sft_from_heldout else train), rows(n_offline_walks, starts)

    def dump(name: str, items: list[dict[str, Any]]) -> None:
        tmp = out / (name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in items))
        tmp.replace(out / name)

    dump("sft.jsonl", [{"prompt": r["prompt"], "response": r["response"]} for r in sft])
    dump("prompts.jsonl", [{"prompt": node_name(s)} for s in train])
    dump("heldout.jsonl", [{"prompt": node_name(s)} for s in heldout])
    dump("offline.jsonl", offline)
    meta = {**graph.to_json(), "heldout_starts": [node_name(s) for s in heldout],
            "train_starts": [node_name(s) for s in train], "sft_from_heldout": sft_from_heldout}
    (out / "graph.json").write_text(json.dumps(meta, indent=2))
    build_tokenizer(graph).save(str(out / "tokenizer.json"))
    return {"dir": str(out), "sft_walks": len(sft), "offline_walks": len(offline),
            "train_starts": len(train), "heldout_starts": len(heldout),
            "sft_mean_optimality": float(np.mean([r["reward"] for r in sft])),
            "offline_mean_optimality": float(np.mean([r["reward"] for r in offline])),
            "optimal_fraction": float(np.mean([math.isclose(r["reward"], 1.0) for r in offline]))}


# The task's policy (trlX trains a small GPT): 2 layers, hidden 64; 32 positions hold prompt + walk.
MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, max_position_embeddings=32)


def sft_stage_node(task_dir: str | os.PathLike, run_dir: str | os.PathLike, max_steps: int,
                   model: dict[str, Any] | None = None) -> dict[str, Any]:
    """The SFT stage config (a node for ``SFTStageConfig``) that pre-trains the task's policy on
    its sampled walks (``sft.jsonl``; held-out loss on 64 of them): 32 walks per step, lr 3e-3,
    ``max_steps`` steps, no checkpoints but the final weights, ``model`` (default :data:`MODEL`)."""
    task = Path(task_dir)
    return {"run_dir": str(run_dir), "model": dict(model or MODEL),
            "tokenizer": {"type": "tokenizer_json", "path": str(task / "tokenizer.json")},
            "data": {"dataset": "jsonl", "data_dir": str(task), "files": ["sft.jsonl"], "heldout_files": ["sft.jsonl"],
                     "max_heldout_rows": 64, "max_seq_len": 16, "max_prompt_len": 4},
            "batch": {"global_batch_size": 32, "micro_batch_size": 32}, "optim": {"lr": 3e-3},
            "trainer": {"max_steps": int(max_steps), "val_check_interval": None, "limit_val_batches": 1},
            "checkpoint": {"every_n_steps": 0, "resume": False}}
