"""The real critic/reward server (launchers/serve_critic.py: megatron critic + reward model behind
PyTriton, in its own process) against the client: infer parity with an in-process reward model,
train, save, bad requests, and an unreachable server."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
            max_position_embeddings=64)

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def served(megatron_world, tmp_path_factory):
    from nemo_rlhf.checkpoint.weights import save_model_weights
    from nemo_rlhf.data import train_bpe_tokenizer
    from nemo_rlhf.models.reward_model import GPTRewardModel
    from nemo_rlhf.servers.client import CriticClient
    from nemo_rlhf.servers.process import find_free_ports, start_server_process

    tmp = tmp_path_factory.mktemp("critic_server")
    texts = [f"Human: question {i}? Assistant: answer {i * 7} words here." for i in range(200)]
    tok = train_bpe_tokenizer(texts, 300, save_path=tmp / "tokenizer.json")
    rm = GPTRewardModel(TINY, None, tok.vocab_size, micro_batch_size=4)
    save_model_weights(rm.gpt, tmp / "rm")
    port = find_free_ports(3)[0]
    cmd = [sys.executable, str(REPO / "launchers" / "serve_critic.py"),
           f"reward_model_path={tmp / 'rm'}", f"tokenizer.path={tmp / 'tokenizer.json'}",
           f"server.port={port}", f"server.grpc_port={port + 1}", f"server.metrics_port={port + 2}",
           "batch.global_batch_size=4", "batch.micro_batch_size=4", "server.max_batch_size=16",
           f"server.checkpoint_root={tmp}",
           *[f"model.{k}={v}" for k, v in TINY.items()]]
    server = start_server_process(cmd, "127.0.0.1", port, ready_timeout_s=240, log_path=tmp / "server.log")
    client = CriticClient("127.0.0.1", port, infer_timeout_s=60, train_timeout_s=120, init_timeout_s=60)
    try:
        yield rm, client, tmp, tok
    finally:
        client.close()
        server.stop()
        assert not server.is_alive()


def test_infer_matches_in_process_reward_model(served):
    rm, client, _, tok = served
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, tok.vocab_size, (4, 24), generator=gen)
    lengths = torch.tensor([24, 10, 17, 3])
    values, rewards = client.infer(tokens.numpy(), lengths.numpy())
    assert values.shape == (4, 24) and values.dtype == np.float32
    assert rewards.shape == (4,) and rewards.dtype == np.float32
    expected = rm.score(tokens, lengths).numpy()
    np.testing.assert_allclose(rewards, expected, atol=1e-5)
    # The critic starts as a copy of the reward model: its value at the last token is the reward.
    np.testing.assert_allclose(values[np.arange(4), lengths.numpy() - 1], rewards, atol=1e-5)


def test_concurrent_infer_futures(served):
    _, client, _, tok = served
    tokens = np.random.default_rng(1).integers(1, tok.vocab_size, (2, 16)).astype(np.int64)
    futures = [client.infer_async(tokens, np.array([16, 8])) for _ in range(6)]
    results = [f.result() for f in futures]
    for v, r in results[1:]:
        np.testing.assert_allclose(v, results[0][0], atol=1e-6)


def test_train_changes_values_and_save_load_roundtrip(served):
    from nemo_rlhf.servers.protocol import CriticServerError

    _, client, tmp, tok = served
    rng = np.random.default_rng(2)
    tokens = rng.integers(1, tok.vocab_size, (4, 16)).astype(np.int64)
    lengths = np.full(4, 16)
    before, _ = client.infer(tokens, lengths)
    returns = np.ones((4, 16), np.float32)
    mask = np.ones((4, 16), np.float32)
    losses = [client.train(tokens, returns, before, mask)["loss"] for _ in range(3)]
    assert all(np.isfinite(losses))
    after, _ = client.infer(tokens, lengths)
    assert np.abs(after - before).max() > 1e-4
    # moved toward the returns (1.0)
    assert np.abs(after - 1).mean() < np.abs(before - 1).mean()
    client.save(str(tmp / "critic_ckpt"))
    assert (tmp / "critic_ckpt" / "COMPLETE").exists()
    # load restores weights, optimizer and step: the next step after a load equals the next step
    # taken straight after the save, bitwise.
    next_loss = client.train(tokens, returns, after, mask)["loss"]
    next_values, _ = client.infer(tokens, lengths)
    client.train(tokens, returns, after, mask)  # drift further
    assert client.load(str(tmp / "critic_ckpt")) == {"step": 3.0}
    np.testing.assert_array_equal(client.infer(tokens, lengths)[0], after)
    assert client.train(tokens, returns, after, mask)["loss"] == next_loss
    np.testing.assert_array_equal(client.infer(tokens, lengths)[0], next_values)
    with pytest.raises(CriticServerError, match="missing COMPLETE"):
        client.load(str(tmp / "no_such_ckpt"))


def test_bad_requests_get_errors_and_server_keeps_serving(served):
    from nemo_rlhf.servers.protocol import CriticServerError

    _, client, _, tok = served
    too_long = np.ones((2, 65), np.int64)  # model max is 64 positions
    with pytest.raises(CriticServerError):
        client.infer(too_long, np.array([65, 65]))
    with pytest.raises(CriticServerError):
        client.infer(np.ones((2, 8), np.int64), np.array([9, 1]))  # length > S
    bad = np.ones((2, 8), np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(CriticServerError):
        client.train(np.ones((2, 8), np.int64), bad, np.zeros((2, 8), np.float32), np.ones((2, 8), np.float32))
    values, rewards = client.infer(np.ones((2, 8), np.int64), np.array([8, 4]))
    assert values.shape == (2, 8) and np.isfinite(rewards).all()


def test_unreachable_server_names_host_port_and_model():
    from nemo_rlhf.servers.client import CriticClient
    from nemo_rlhf.servers.process import find_free_ports
    from nemo_rlhf.servers.protocol import CriticServerUnavailable

    port = find_free_ports(1)[0]
    with CriticClient("127.0.0.1", port, init_timeout_s=2, infer_timeout_s=2) as client:
        with pytest.raises(CriticServerUnavailable) as err:
            client.infer(np.ones((1, 4), np.int64), np.array([4]))
    msg = str(err.value)
    assert f"127.0.0.1:{port}" in msg and "critic_infer" in msg
