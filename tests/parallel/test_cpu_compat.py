"""The CPU compatibility layer maps CUDA-isms to the CPU without breaking torch's device modes."""

import torch

from nemo_rlhf.parallel import cpu_compat


def test_cuda_devices_map_to_cpu_and_device_context_still_works():
    if torch.cuda.is_available():  # the layer refuses GPU machines by design
        return
    cpu_compat.activate()
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.arange(3, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.cuda.current_device() == torch.device("cpu")
    # torch's device context (used by transformers' from_pretrained, meta-device init, ...)
    # recognises the factory calls made through the wrappers.
    with torch.device("meta"):
        assert torch.arange(4).device.type == "meta"
        assert torch.empty(2, 2).device.type == "meta"
    # The CUDA RNG maps onto the CPU generator and really seeds it.
    torch.cuda.manual_seed(5)
    a = torch.rand(3)
    torch.cuda.manual_seed(5)
    assert torch.equal(a, torch.rand(3))
