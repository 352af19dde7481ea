import pytest

from nemo_rlhf.utils.hydra import quiet_warnings

quiet_warnings()


@pytest.fixture(scope="session")
def megatron_single_process():
    """A one-process gloo world with megatron TP=PP=1 (idempotent across test modules)."""
    from nemo_rlhf.parallel.state import initialize_distributed

    return initialize_distributed(1, 1, "cpu", seed=1234)
