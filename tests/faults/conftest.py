import pytest

from nemo_rlhf.utils.hydra import quiet_warnings

quiet_warnings()


@pytest.fixture(scope="module")
def one_process_world():
    """A one-process gloo world with megatron TP=PP=1 for one test module."""
    import torch

    from nemo_rlhf.parallel.state import destroy_distributed, initialize_distributed

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    env = initialize_distributed(1, 1, "cpu", seed=1234)
    yield env
    torch.set_num_threads(threads)
    destroy_distributed()
