"""The critic/reward server across two processes (TP=2, torchrun): rank 0 serves over PyTriton and
broadcasts each request; both ranks run the model. Scores must equal a one-process reward model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.parallel, pytest.mark.server]

REPO = Path(__file__).resolve().parents[2]
TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
            max_position_embeddings=64, make_vocab_size_divisible_by=64)


def _overrides(tmp: Path, port: int, tp: int) -> list[str]:
    return [f"reward_model_path={tmp / 'rm'}", f"tokenizer.path={tmp / 'tokenizer.json'}",
            f"server.port={port}", f"server.grpc_port={port + 1}", f"server.metrics_port={port + 2}",
            "batch.global_batch_size=4", "batch.micro_batch_size=4", f"server.checkpoint_root={tmp}",
            f"model.tensor_model_parallel_size={tp}", *[f"model.{k}={v}" for k, v in TINY.items()]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tokenizer and a random reward-model checkpoint, and its one-process scores."""
    from nemo_rlhf.checkpoint.weights import save_model_weights
    from nemo_rlhf.data import train_bpe_tokenizer
    from nemo_rlhf.models.reward_model import GPTRewardModel
    from nemo_rlhf.parallel.state import destroy_distributed, initialize_distributed

    tmp = tmp_path_factory.mktemp("tp_server")
    tok = train_bpe_tokenizer([f"Human: q{i}? Assistant: a {i * 3}." for i in range(200)], 300,
                              save_path=tmp / "tokenizer.json")
    tokens = torch.randint(1, tok.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([24, 9, 17, 3])
    initialize_distributed(1, 1, "cpu", seed=7)
    try:
        rm = GPTRewardModel(TINY, None, tok.vocab_size, micro_batch_size=4)
        save_model_weights(rm.gpt, tmp / "rm")
        scores = rm.score(tokens, lengths).numpy()
    finally:
        destroy_distributed()
    return tmp, tokens.numpy(), lengths.numpy(), scores


def test_tp2_server_matches_single_process(reference):
    from nemo_rlhf.servers.client import CriticClient
    from nemo_rlhf.servers.process import find_free_ports, start_server_process

    tmp, tokens, lengths, scores = reference
    port, master = find_free_ports(4)[0], find_free_ports(1)[0]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={master}",
           "--master-addr=127.0.0.1", str(REPO / "launchers" / "serve_critic.py"), *_overrides(tmp, port, 2)]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    server = start_server_process(cmd, "127.0.0.1", port, ready_timeout_s=240, log_path=tmp / "server.log")
    try:
        with CriticClient("127.0.0.1", port, infer_timeout_s=60, train_timeout_s=120, init_timeout_s=60) as client:
            values, rewards = client.infer(tokens, lengths)
            np.testing.assert_allclose(rewards, scores, atol=1e-5)
            np.testing.assert_allclose(values[np.arange(4), lengths - 1], scores, atol=1e-5)
            loss = client.train(tokens, np.ones((4, 24), np.float32), values, np.ones((4, 24), np.float32))["loss"]
            assert np.isfinite(loss)
            after, _ = client.infer(tokens, lengths)
            assert np.abs(after - values).max() > 1e-5  # both ranks stepped the critic
            client.save(str(tmp / "critic_tp2"))  # collective dist-checkpoint save
        assert (tmp / "critic_tp2" / "COMPLETE").exists()
    finally:
        server.stop()
    assert not server.is_alive()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"server.port={port}" not in ps, "a server rank outlived the stop"


def test_server_refuses_a_layout_that_does_not_match_its_world(reference):
    tmp = reference[0]
    cmd = [sys.executable, str(REPO / "launchers" / "serve_critic.py"), *_overrides(tmp, 1, 2)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "invalid critic-server layout" in out and "model.tensor_model_parallel_size=2" in out, out[-2000:]
