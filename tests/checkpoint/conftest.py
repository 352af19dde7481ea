import pytest
import torch


@pytest.fixture(scope="module")
def megatron_world():
    """Single-process gloo world (TP = PP = 1) for one test module, torn down at its end (unless
    one existed already); one intra-op thread, as the models are tiny."""
    if torch.cuda.is_available():
        pytest.skip("runs megatron on CPU through cpu_compat, which refuses CUDA machines")
    from nemo_rlhf.utils.hydra import quiet_warnings

    quiet_warnings()
    from nemo_rlhf.parallel.state import destroy_distributed, initialize_distributed

    created = not torch.distributed.is_initialized()
    initialize_distributed(1, 1, "cpu", seed=1234)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if created:
        destroy_distributed()
