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


def test_linear_backward_gets_a_contiguous_gradient_and_the_same_values():
    """Item 6: a loss on the batch-first transpose of a megatron linear's ``[S, b, V]`` output sends
    it a transposed gradient; the patched backward makes it contiguous (one folded matmul instead of
    a broadcast bmm) and still returns the input gradient of plain torch."""
    if torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import layers

    cpu_compat.activate()
    for cls in (layers.LinearWithFrozenWeight, layers.LinearWithGradAccumulationAndAsyncCommunication):
        assert getattr(cls.backward, "__nemo_rlhf_cpu_compat__", False), cls
    cpu_compat.activate()  # idempotent: not wrapped twice
    assert not getattr(getattr(layers.LinearWithFrozenWeight.backward, "__wrapped__", None),
                       "__nemo_rlhf_cpu_compat__", False)
    arrived = []
    torch.manual_seed(0)
    x = torch.randn(5, 3, 8, requires_grad=True)  # [S, b, H]
    w = torch.randn(11, 8)  # [V, H], frozen
    out = layers.LinearWithFrozenWeight.apply(x, w, None, False, None)  # [S, b, V]
    out.register_hook(lambda g: arrived.append(g.is_contiguous()))
    target = torch.randn(3, 5, 11)
    loss = (out.transpose(0, 1).contiguous() * target).sum()  # a loss on the [b, S, V] logits
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss.backward()
    ops = {e.key for e in prof.key_averages()}
    assert arrived == [False]  # the gradient arrives transposed ...
    assert "aten::mm" in ops and "aten::bmm" not in ops  # ... and is multiplied as one folded matmul
    torch.testing.assert_close(x.grad, target.transpose(0, 1) @ w)  # plain torch's input gradient
