"""Everything megatron-core 0.16.1 needs to run on a CPU-only machine (gloo backend).

This is the ONE place in nemo-rlhf that changes the behaviour of torch or megatron-core. It is
activated by :func:`activate` only when the accelerator is CPU (see
:func:`nemo_rlhf.parallel.state.initialize_distributed`); on a GPU run nothing here is touched and
megatron-core runs unmodified with NCCL.

What megatron-core hard-codes for CUDA, and what this module does about it (each item was seen
failing on CPU without the fix, megatron-core 0.16.1, torch 2.13 CPU):

1. ``torch.cuda.current_device()`` is used as a tensor device (RoPE ``inv_freq``, attention
   buffers, p2p shape exchange, grad buffers): it returns ``torch.device("cpu")`` here.
   ``synchronize``/``set_device``/``empty_cache``/memory statistics/NVTX become no-ops;
   ``torch.cuda.Event``/``Stream``/``stream``/``current_stream`` get CPU stand-ins (events time
   with ``time.perf_counter``).
2. The CUDA RNG: megatron's ``CudaRNGStatesTracker`` (dropout masks, TP-aware init) reads and
   writes ``torch.cuda`` RNG state. It is mapped onto the CPU default generator, so
   ``model_parallel_cuda_manual_seed`` really seeds and each TP rank draws its own dropout masks.
   The tracker's "CPU RNG state changed within GPU RNG context" warning is then expected on every
   fork and its logger is silenced.
3. Literal ``device="cuda"`` tensors (pipeline schedules' token counters, the default causal mask,
   grad clipping, optimizer scalars) and ``Tensor.cuda()``: the factory functions ``torch.zeros``,
   ``ones``, ``empty``, ``full``, ``tensor``, ``arange``, ``rand``, ``randn``, ``randint`` map a
   CUDA device argument to CPU, and ``Tensor.cuda()`` returns the tensor itself.
4. String type checks ``param.type() == "torch.cuda.FloatTensor"`` in grad clipping, the
   distributed optimizer and the fp16/bf16 optimizer: only inside those functions, a
   ``TorchFunctionMode`` makes ``Tensor.type()`` report the CUDA type name of a CPU tensor.
5. The checkpoint writer's results queue: ``dist_checkpointing``'s ``FileSystemWriterAsync`` keeps
   it in a ``multiprocessing`` Manager started with the ``spawn`` method (the safe choice once CUDA
   is initialised), and a spawned process imports the launcher again: about 5 CPU-seconds and
   10 s of wall time at every process's first checkpoint on this 2-core machine (measured
   2026-12-02 on a 2-step SFT run: 16.3 -> 11.7 CPU-s). With no CUDA in the process the Manager is
   forked instead; it only relays the writers' results, so nothing saved changes.

6. Speed, not correctness: megatron's linears compute the input gradient as
   ``grad_output.matmul(weight)``. A loss on the ``[b, S, V]`` logits that ``GPTModel`` returns (a
   transposed copy of the LM head's ``[S, b, V]``) sends the LM head a transposed, non-contiguous
   gradient, and torch then runs that matmul as a ``bmm`` over S with the weight broadcast, which
   the CPU kernels do ~6x slower than the one folded matmul (measured on SmolLM2-135M's LM head,
   b = 8, S = 37: 1.15 s vs 0.19 s, a quarter of an ILQL step). The linears' backward gets the
   gradient made contiguous first (a copy of one logits-sized tensor). GPUs batch the broadcast
   weight well, and there nothing here is active.

Nothing here changes the maths: every op still runs on the CPU as written (item 6 gives the same
product through a different kernel, so gradients can differ in the last bits).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["activate", "is_active"]

_ACTIVE = False
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint")
_CPU = torch.device("cpu")


def is_active() -> bool:
    """True once :func:`activate` has run in this process."""
    return _ACTIVE


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal in torch's factory functions.
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_factory(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs["device"] = _CPU
        return fn(*args, **kwargs)

    wrapper.__nemo_rlhf_cpu_compat__ = True  # type: ignore[attr-defined]
    return wrapper


class _CpuEvent:
    """Stand-in for ``torch.cuda.Event``: records wall-clock time (``time.perf_counter``)."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self._t: float | None = None

    def record(self, stream: Any = None) -> None:
        self._t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "_CpuEvent") -> float:
        """Milliseconds between this event and ``end`` (as ``torch.cuda.Event.elapsed_time``)."""
        if self._t is None or end._t is None:
            raise RuntimeError("elapsed_time() called on an event that was never recorded")
        return (end._t - self._t) * 1000.0


class _CpuStream:
    """Stand-in for ``torch.cuda.Stream``: CPU work is already ordered."""

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any):
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _CpuEvent:
        event = event or _CpuEvent()
        event.record()
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _ReportCudaTypeName(TorchFunctionMode):
    """Makes ``Tensor.type()`` (no arguments) report ``torch.cuda.<X>Tensor`` for CPU tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            if name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch.") :]
            return name
        return func(*args, **kwargs)


def _with_cuda_type_names(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _ReportCudaTypeName():
            return fn(*args, **kwargs)

    return wrapper


def _const(value: Any, name: str) -> Callable[..., Any]:
    # A distinct function object per patched attribute: torch._dynamo's trace rules reject one
    # function registered under several torch names.
    def fn(*args: Any, **kwargs: Any) -> Any:
        return value

    fn.__name__ = fn.__qualname__ = f"cpu_compat_{name}"
    return fn


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU  # type: ignore[assignment]
    for name in ("synchronize", "set_device", "empty_cache", "reset_peak_memory_stats",
                 "reset_max_memory_allocated", "init", "_lazy_init"):
        setattr(cuda, name, _const(None, name))
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved",
                 "max_memory_reserved"):
        setattr(cuda, name, _const(0, name))
    cuda.Event = _CpuEvent  # type: ignore[misc,assignment]
    cuda.Stream = _CpuStream  # type: ignore[misc,assignment]
    cuda.current_stream = lambda device=None: _CpuStream()  # type: ignore[assignment]
    cuda.default_stream = lambda device=None: _CpuStream()  # type: ignore[assignment]
    cuda.stream = lambda stream=None: contextlib.nullcontext()  # type: ignore[assignment]
    cuda.nvtx.range_push = _const(None, "range_push")  # type: ignore[assignment]
    cuda.nvtx.range_pop = _const(None, "range_pop")  # type: ignore[assignment]
    cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]

    # (2) CUDA RNG -> the CPU default generator.
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        torch.set_rng_state(new_state)

    def manual_seed(seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))

    for mod in (cuda, cuda.random):
        mod.get_rng_state = get_rng_state  # type: ignore[assignment]
        mod.set_rng_state = set_rng_state  # type: ignore[assignment]
        mod.manual_seed = manual_seed  # type: ignore[assignment]
        # torch.manual_seed() calls this after seeding the CPU generator: nothing left to do.
        mod.manual_seed_all = _const(None, "manual_seed_all")  # type: ignore[assignment]


def _patch_torch_factories() -> None:
    # torch's `with torch.device(...)` mode recognises factory calls by identity against a set it
    # builds (and caches) on first use. Build it now, from the original functions: our wrappers
    # call those originals, so the mode keeps working (without this, e.g. transformers'
    # from_pretrained leaves RoPE `inv_freq` buffers uninitialised).
    from torch.utils._device import _device_constructors

    _device_constructors()
    for name in _FACTORIES:
        fn = getattr(torch, name)
        if not getattr(fn, "__nemo_rlhf_cpu_compat__", False):
            setattr(torch, name, _cpu_factory(fn))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]


def _patch_megatron() -> None:
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.tensor_parallel import random as mp_random

    def _get_rng(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.get_rng_state()

    def _set_rng(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    mp_random._get_cuda_rng_state = _get_rng
    mp_random._set_cuda_rng_state = _set_rng
    # The tracker swaps the (CPU) generator on purpose: its warning would fire on every dropout.
    logging.getLogger(mp_random.__name__).setLevel(logging.ERROR)

    clip_grads.clip_grad_by_total_norm_fp32 = _with_cuda_type_names(
        clip_grads.clip_grad_by_total_norm_fp32
    )
    # optimizer.py imported the function by name: rebind it there too.
    if hasattr(optimizer, "clip_grad_by_total_norm_fp32"):
        optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32
    for cls in (distrib_optimizer.DistributedOptimizer, optimizer.Float16OptimizerWithFloat16Params):
        cls.__init__ = _with_cuda_type_names(cls.__init__)  # type: ignore[method-assign]


def _patch_linear_backward() -> None:
    """Item 6: the backward of megatron's TP linears receives a contiguous ``grad_output``."""
    from megatron.core.tensor_parallel import layers

    def contiguous_grad(backward: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(backward)
        def wrapper(ctx: Any, grad_output: torch.Tensor, *rest: Any) -> Any:
            return backward(ctx, grad_output.contiguous(), *rest)

        wrapper.__nemo_rlhf_cpu_compat__ = True  # type: ignore[attr-defined]
        return wrapper

    for cls in (layers.LinearWithFrozenWeight, layers.LinearWithGradAccumulationAndAsyncCommunication):
        if not getattr(cls.backward, "__nemo_rlhf_cpu_compat__", False):
            cls.backward = staticmethod(contiguous_grad(cls.backward))  # type: ignore[method-assign]


def _end_with_parent() -> None:
    """In a forked helper: receive SIGKILL when the parent dies (Linux ``PR_SET_PDEATHSIG``), so a
    killed launcher leaves no helper behind that still carries its command line.

    The helper is started inside a save, so it inherits the blocked SIGTERM / SIGUSR1 of
    ``nemo_rlhf.checkpoint.signals.preemption_signals_deferred`` (a signal to the whole job step must
    not kill the writer the launcher's preemption save needs): a SIGTERM death signal would stay
    pending, hence SIGKILL."""
    import signal

    # The launcher's own SIGTERM handler (stop at the next step and save) is inherited by fork.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG


def _patch_checkpoint_writer() -> None:
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def _get_write_results_queue() -> Any:
        if filesystem_async._results_queue is None:
            manager = SyncManager(ctx=multiprocessing.get_context("fork"))
            manager.start(initializer=_end_with_parent)
            # The queue's proxy holds the manager: it lives as long as the queue.
            filesystem_async._results_queue = manager.Queue()
        return filesystem_async._results_queue

    filesystem_async._get_write_results_queue = _get_write_results_queue


def activate() -> None:
    """Make megatron-core runnable on CPU in this process. Idempotent.

    Raises:
        RuntimeError: if CUDA is available — on a GPU machine megatron-core must run unmodified.
    """
    global _ACTIVE
    if _ACTIVE:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "nemo_rlhf.parallel.cpu_compat.activate() called on a machine with CUDA; "
            "set trainer.accelerator=gpu (the CPU compatibility layer is for CPU-only runs)"
        )
    _patch_torch_cuda()
    _patch_torch_factories()
    _patch_megatron()
    _patch_linear_backward()
    _patch_checkpoint_writer()
    _ACTIVE = True
